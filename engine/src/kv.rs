//! The KV cache: one buffer per sequence, sized for its prompt plus `max_tokens` when it is
//! admitted, and accounted against one budget. A sequence is admitted only when its whole
//! reservation fits, so a running sequence never runs out of cache and the process never
//! allocates past the budget; a request that does not fit yet waits.
//!
//! Layout per sequence: `[layer][kv head][position][head_dim]` for K and for V, so one head's
//! keys are one contiguous block for the attention products. Buffers are zero-allocated:
//! pages are committed as positions are written, not when the reservation is made.

/// What the model's cache needs per token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl KvShape {
    /// f32 values per token, K and V, all layers.
    pub fn values_per_token(&self) -> usize {
        2 * self.layers * self.kv_heads * self.head_dim
    }

    pub fn bytes_for(&self, tokens: usize) -> usize {
        4 * self.values_per_token() * tokens
    }
}

/// One sequence's cache.
pub struct KvCache {
    shape: KvShape,
    cap: usize,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Positions written.
    pub len: usize,
}

impl KvCache {
    pub fn new(shape: KvShape, cap: usize) -> Self {
        let n = shape.layers * shape.kv_heads * cap * shape.head_dim;
        Self {
            shape,
            cap,
            k: vec![0.0; n],
            v: vec![0.0; n],
            len: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    fn head_offset(&self, layer: usize, head: usize) -> usize {
        (layer * self.shape.kv_heads + head) * self.cap * self.shape.head_dim
    }

    /// K and V of one head of one layer, positions `0..len` (len × head_dim each).
    pub fn head(&self, layer: usize, head: usize, len: usize) -> (&[f32], &[f32]) {
        let at = self.head_offset(layer, head);
        let n = len * self.shape.head_dim;
        (&self.k[at..at + n], &self.v[at..at + n])
    }

    /// Write the keys and values of one token (kv_heads × head_dim each) at `pos`.
    pub fn write(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        assert!(
            pos < self.cap,
            "KV cache: position {pos} beyond {}",
            self.cap
        );
        let d = self.shape.head_dim;
        for h in 0..self.shape.kv_heads {
            let at = self.head_offset(layer, h) + pos * d;
            self.k[at..at + d].copy_from_slice(&k[h * d..(h + 1) * d]);
            self.v[at..at + d].copy_from_slice(&v[h * d..(h + 1) * d]);
        }
    }
}

/// The cache budget, in bytes.
#[derive(Debug)]
pub struct KvBudget {
    total: usize,
    used: usize,
}

impl KvBudget {
    pub fn new(total: usize) -> Self {
        Self { total, used: 0 }
    }

    pub fn total(&self) -> usize {
        self.total
    }

    pub fn used(&self) -> usize {
        self.used
    }

    /// Take `bytes` if they fit.
    pub fn reserve(&mut self, bytes: usize) -> bool {
        if self.used + bytes <= self.total {
            self.used += bytes;
            true
        } else {
            false
        }
    }

    pub fn release(&mut self, bytes: usize) {
        self.used = self.used.saturating_sub(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_contiguous_and_writes_land_per_head() {
        let shape = KvShape {
            layers: 2,
            kv_heads: 2,
            head_dim: 3,
        };
        let mut c = KvCache::new(shape, 4);
        c.write(
            1,
            2,
            &[1., 2., 3., 4., 5., 6.],
            &[7., 8., 9., 10., 11., 12.],
        );
        let (k, v) = c.head(1, 1, 3);
        assert_eq!(&k[6..9], &[4., 5., 6.]);
        assert_eq!(&v[6..9], &[10., 11., 12.]);
        assert_eq!(c.head(0, 1, 3).0, &[0.0; 9]);
        assert_eq!(shape.bytes_for(10), 4 * 2 * 2 * 2 * 3 * 10);
    }

    #[test]
    fn budget_admits_only_what_fits() {
        let mut b = KvBudget::new(100);
        assert!(b.reserve(60));
        assert!(!b.reserve(41));
        b.release(60);
        assert!(b.reserve(100));
    }
}
