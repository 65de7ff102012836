//! NF4 quantisation as QLoRA defines it and bitsandbytes stores it: the 16-value NormalFloat
//! code book, one f32 absmax per block of 64 values, two codes per byte with the first value
//! in the high nibble; optionally the absmax values themselves quantised to 8 bits (the
//! signed dynamic code book, blocks of 256, after subtracting their mean).

use candle_core::{Device, Tensor};

/// The NF4 code book (QLoRA appendix E; bitsandbytes `get_4bit_type("nf4")`).
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// The two values a packed byte holds: the high nibble's first.
const NF4_PAIRS: [[f32; 2]; 256] = {
    let mut pairs = [[0f32; 2]; 256];
    let mut b = 0;
    while b < 256 {
        pairs[b] = [NF4_CODE[b >> 4], NF4_CODE[b & 0x0f]];
        b += 1;
    }
    pairs
};

pub const NF4_BLOCK: usize = 64;
pub const ABSMAX_BLOCK: usize = 256;

/// NF4 codes of a flat array in blocks of 64, as bitsandbytes computes them: scale by the
/// reciprocal of the block's absmax (the last, partial block divides), clamp to [-1, 1], and
/// count the code-book midpoints below the value (`torch.bucketize`), so a value exactly on a
/// midpoint takes the lower code.
/// Blocks are independent: they are coded on all threads.
fn quantize_nf4_codes(data: &[f32]) -> (Vec<u8>, Vec<f32>) {
    use rayon::prelude::*;
    let mut mids = [0f32; 15];
    for (m, w) in mids.iter_mut().zip(NF4_CODE.windows(2)) {
        *m = (w[0] + w[1]) / 2.0;
    }
    let full = data.len() - data.len() % NF4_BLOCK;
    let mut idx = vec![0u8; data.len()];
    let absmax = idx
        .par_chunks_mut(NF4_BLOCK)
        .zip(data.par_chunks(NF4_BLOCK))
        .enumerate()
        .map(|(b, (codes, chunk))| {
            let m = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
            let safe = m.max(1e-38);
            let partial = b * NF4_BLOCK >= full;
            let inv = 1.0 / safe;
            for (c, &v) in codes.iter_mut().zip(chunk) {
                let scaled = if partial { v / safe } else { v * inv }.clamp(-1.0, 1.0);
                // A fixed-length, branch-free count, which the compiler unrolls.
                *c = mids.iter().map(|&mid| u8::from(mid < scaled)).sum();
            }
            m
        })
        .collect();
    (idx, absmax)
}

/// 8-bit blockwise quantisation with a sorted code book, as bitsandbytes' CPU library does it:
/// divide by the block's absmax and take the nearest code (the lower one on a tie), measuring
/// the first code as -1.0.
fn quantize_8bit_blocks(data: &[f32], block: usize, code: &[f32; 256]) -> (Vec<u8>, Vec<f32>) {
    let mut search = *code;
    search[0] = -1.0;
    let mut idx = Vec::with_capacity(data.len());
    let mut absmax = Vec::with_capacity(data.len().div_ceil(block));
    for chunk in data.chunks(block) {
        let m = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        absmax.push(m);
        for &v in chunk {
            let x = v / m;
            // The last code not above x, then whichever neighbour is closer.
            let mut i = search.partition_point(|&c| c <= x).saturating_sub(1);
            if i < 255 && (x - search[i + 1]).abs() < (x - search[i]).abs() {
                i += 1;
            }
            idx.push(i as u8);
        }
    }
    (idx, absmax)
}

/// bitsandbytes' signed dynamic 8-bit code book, `create_dynamic_map(signed=True)`, as f32
/// bit patterns. bitsandbytes computes it at run time with PyTorch's vectorised linspace,
/// whose fused multiply-adds a portable formula does not reproduce to the last bit, so the
/// table is kept as bitsandbytes 0.50 produces it on x86-64 (the reference fixture checks it).
#[rustfmt::skip]
const DYNAMIC_CODE_BITS: [u32; 256] = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000,
    0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333,
    0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666,
    0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a,
    0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a,
    0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000,
    0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
    0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334,
    0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d,
    0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148,
    0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148,
    0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4,
    0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
    0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b,
    0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000,
    0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
    0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
    0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
    0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
    0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
    0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
    0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
    0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
    0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
    0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
    0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
    0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
];

pub fn dynamic_map() -> [f32; 256] {
    DYNAMIC_CODE_BITS.map(f32::from_bits)
}

/// The absmax values of the NF4 blocks, plain or double-quantised.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    F32(Vec<f32>),
    Double {
        q: Vec<u8>,
        absmax2: Vec<f32>,
        offset: f32,
    },
}

/// A 2-D weight (out, in) in NF4.
#[derive(Debug, Clone)]
pub struct Nf4Tensor {
    pub shape: [usize; 2],
    /// Two codes per byte, first value in the high nibble (bitsandbytes layout).
    pub packed: Vec<u8>,
    pub absmax: Absmax,
    pub device: Device,
    /// On a GPU: the same bytes in GPU memory, dequantised there (`None` on the CPU).
    pub resident: Option<Nf4Resident>,
}

/// An NF4 weight's data in the memory of its (GPU) device: the packed codes, either the f32
/// absmax or the double-quantised pair, and the code books the kernel reads (the 16 NF4 values,
/// then the 256 dynamic ones). Same bytes per parameter as the host form.
#[derive(Debug, Clone)]
pub struct Nf4Resident {
    pub packed: Tensor,
    pub absmax: Option<Tensor>,
    pub absmax_q: Option<Tensor>,
    pub absmax2: Option<Tensor>,
    pub offset: f32,
    pub codes: Tensor,
}

impl Nf4Resident {
    fn upload(packed: &[u8], absmax: &Absmax, device: &Device) -> candle_core::Result<Self> {
        let bytes = |v: &[u8]| Tensor::from_slice(v, v.len(), device);
        let floats = |v: &[f32]| Tensor::from_slice(v, v.len(), device);
        let mut codes = NF4_CODE.to_vec();
        codes.extend(dynamic_map());
        let (absmax, absmax_q, absmax2, offset) = match absmax {
            Absmax::F32(a) => (Some(floats(a)?), None, None, 0.0),
            Absmax::Double { q, absmax2, offset } => {
                (None, Some(bytes(q)?), Some(floats(absmax2)?), *offset)
            }
        };
        Ok(Self {
            packed: bytes(packed)?,
            absmax,
            absmax_q,
            absmax2,
            offset,
            codes: floats(&codes)?,
        })
    }
}

impl Nf4Tensor {
    pub fn quantize(w: &Tensor, double_quant: bool) -> candle_core::Result<Self> {
        Self::quantize_to(w, double_quant, &w.device().clone())
    }

    /// Quantise `w` (on any device; the codes are computed on the host) into an NF4 weight
    /// held on `device`.
    pub fn quantize_to(
        w: &Tensor,
        double_quant: bool,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let (out_f, in_f) = w.dims2()?;
        let data = w
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let (packed, absmax) = quantize_nf4(&data);
        let absmax = if double_quant {
            double_quantize(&absmax)
        } else {
            Absmax::F32(absmax)
        };
        Self::from_parts([out_f, in_f], packed, absmax, device)
    }

    /// An NF4 weight from its stored parts (codes checked by the caller), held on `device`.
    pub fn from_parts(
        shape: [usize; 2],
        packed: Vec<u8>,
        absmax: Absmax,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let resident = if device.is_cpu() {
            None
        } else {
            Some(Nf4Resident::upload(&packed, &absmax, device)?)
        };
        Ok(Self {
            shape,
            packed,
            absmax,
            device: device.clone(),
            resident,
        })
    }

    /// The absmax of every block, in f32.
    pub fn absmax_f32(&self) -> Vec<f32> {
        match &self.absmax {
            Absmax::F32(a) => a.clone(),
            Absmax::Double { q, absmax2, offset } => {
                let code = dynamic_map();
                q.iter()
                    .enumerate()
                    .map(|(i, &c)| code[c as usize] * absmax2[i / ABSMAX_BLOCK] + offset)
                    .collect()
            }
        }
    }

    pub fn dequantize_vec(&self) -> Vec<f32> {
        use rayon::prelude::*;
        let n = self.shape[0] * self.shape[1];
        let absmax = self.absmax_f32();
        let mut out = crate::kernels::fused::zeros(n);
        // Block by block on all threads: it runs for every frozen product, forward and backward.
        // A byte's two values come from one lookup (NF4_PAIRS), with no branch on the nibble.
        out.par_chunks_mut(NF4_BLOCK)
            .zip(self.packed.par_chunks(NF4_BLOCK / 2))
            .zip(absmax.par_iter())
            .for_each(|((out, bytes), &m)| {
                let pairs = out.chunks_exact_mut(2);
                crate::kernels::simd::dispatch(|| {
                    for (o, &byte) in pairs.zip(bytes) {
                        let [hi, lo] = NF4_PAIRS[byte as usize];
                        o[0] = hi * m;
                        o[1] = lo * m;
                    }
                });
                // An odd-sized last block ends in a high nibble.
                if out.len() % 2 == 1 {
                    let [hi, _] = NF4_PAIRS[bytes[out.len() / 2] as usize];
                    out[out.len() - 1] = hi * m;
                }
            });
        out
    }

    /// The absmax of block `b` (decoded from its 8-bit code when double-quantised).
    #[inline]
    pub fn block_absmax(&self, b: usize) -> f32 {
        match &self.absmax {
            Absmax::F32(a) => a[b],
            Absmax::Double { q, absmax2, offset } => {
                f32::from_bits(DYNAMIC_CODE_BITS[q[b] as usize]) * absmax2[b / ABSMAX_BLOCK]
                    + offset
            }
        }
    }

    /// Values `start .. start + out.len()` of the flattened weight, dequantised into `out`
    /// (on the calling thread): the rows one product needs, without expanding the rest.
    pub fn dequantize_range_into(&self, start: usize, out: &mut [f32]) {
        let mut i = 0;
        while i < out.len() {
            let e = start + i;
            let block = e / NF4_BLOCK;
            let end = ((block + 1) * NF4_BLOCK - start).min(out.len());
            let m = self.block_absmax(block);
            if e % 2 == 1 {
                out[i] = NF4_CODE[(self.packed[e / 2] & 0x0f) as usize] * m;
                i += 1;
            }
            // From here on, out[i] is a high nibble.
            let pairs = (end - i) / 2;
            let first = (start + i) / 2;
            for (o, &byte) in out[i..i + 2 * pairs]
                .chunks_exact_mut(2)
                .zip(&self.packed[first..first + pairs])
            {
                let [hi, lo] = NF4_PAIRS[byte as usize];
                o[0] = hi * m;
                o[1] = lo * m;
            }
            i += 2 * pairs;
            if i < end {
                out[i] = NF4_PAIRS[self.packed[(start + i) / 2] as usize][0] * m;
                i += 1;
            }
        }
    }

    /// The weight in f32, (out, in).
    pub fn dequantize(&self) -> candle_core::Result<Tensor> {
        self.dequantize_as(candle_core::DType::F32)
    }

    /// The weight in `dtype`, (out, in): on a GPU by a kernel, straight into `dtype`; on the
    /// CPU in f32 and then converted. Both give the same values.
    pub fn dequantize_as(&self, dtype: candle_core::DType) -> candle_core::Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(r) = &self.resident {
            return crate::kernels::cuda::nf4_dequantize(r, self.shape, dtype);
        }
        Tensor::from_vec(
            self.dequantize_vec(),
            (self.shape[0], self.shape[1]),
            &self.device,
        )?
        .to_dtype(dtype)
    }

    /// Bytes of the quantised weight (the same on a GPU, where `resident` holds it).
    pub fn storage_bytes(&self) -> usize {
        self.packed.len()
            + match &self.absmax {
                Absmax::F32(a) => 4 * a.len(),
                Absmax::Double { q, absmax2, .. } => q.len() + 4 * absmax2.len() + 4,
            }
    }
}

/// NF4-quantise a flat f32 array in blocks of 64: (packed bytes, absmax per block).
pub fn quantize_nf4(data: &[f32]) -> (Vec<u8>, Vec<f32>) {
    use rayon::prelude::*;
    let (idx, absmax) = quantize_nf4_codes(data);
    let packed = idx
        .par_chunks(2)
        .map(|p| (p[0] << 4) | p.get(1).copied().unwrap_or(0))
        .collect();
    (packed, absmax)
}

/// Double quantisation of NF4 absmax values: subtract the mean, 8-bit dynamic code, block 256.
/// bitsandbytes' CPU library finds the code with an approximate bucketed search that picks a
/// neighbour of the nearest code for a fraction of a percent of values; loraops takes the
/// nearest, so those few codes differ by one step (the reference test bounds this).
pub fn double_quantize(absmax: &[f32]) -> Absmax {
    // The mean is accumulated in f64 and rounded once.
    let offset =
        (absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len().max(1) as f64) as f32;
    let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
    let (q, absmax2) = quantize_8bit_blocks(&centred, ABSMAX_BLOCK, &dynamic_map());
    Absmax::Double { q, absmax2, offset }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_book_is_sorted_and_symmetric_at_the_ends() {
        assert!(NF4_CODE.windows(2).all(|w| w[0] < w[1]));
        assert_eq!((NF4_CODE[0], NF4_CODE[7], NF4_CODE[15]), (-1.0, 0.0, 1.0));
    }

    #[test]
    fn round_trip_error_is_bounded_by_half_the_widest_code_gap() {
        // Full blocks and a partial one; the second shape ends in a lone high nibble.
        for (rows, cols) in [(10, 100), (7, 9)] {
            let data: Vec<f32> = (0..rows * cols)
                .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
                .collect();
            let (packed, absmax) = quantize_nf4(&data);
            assert_eq!(packed.len(), data.len().div_ceil(2));
            let t = Nf4Tensor {
                shape: [rows, cols],
                packed,
                absmax: Absmax::F32(absmax.clone()),
                device: Device::Cpu,
                resident: None,
            };
            let back = t.dequantize_vec();
            assert_eq!(back.len(), data.len());
            let widest = NF4_CODE
                .windows(2)
                .map(|w| w[1] - w[0])
                .fold(0f32, f32::max);
            for (i, (a, b)) in data.iter().zip(&back).enumerate() {
                let m = absmax[i / NF4_BLOCK];
                assert!((a - b).abs() <= 0.5 * widest * m + 1e-6, "{i}: {a} vs {b}");
            }
        }
    }

    /// Any range, at any alignment, dequantises to the same values as the whole weight, plain
    /// and double-quantised.
    #[test]
    fn ranges_dequantise_like_the_whole_weight() {
        let (rows, cols) = (7, 45);
        let data: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 1000) as f32 / 250.0 - 2.0)
            .collect();
        let w = Tensor::from_vec(data, (rows, cols), &Device::Cpu).unwrap();
        for double in [false, true] {
            let q = Nf4Tensor::quantize(&w, double).unwrap();
            let whole = q.dequantize_vec();
            for (start, len) in [
                (0, 315),
                (1, 64),
                (63, 2),
                (64, 65),
                (45, 90),
                (313, 2),
                (7, 0),
            ] {
                let mut out = vec![f32::NAN; len];
                q.dequantize_range_into(start, &mut out);
                assert_eq!(
                    out,
                    whole[start..start + len],
                    "{start}+{len} (double {double})"
                );
            }
            for b in 0..whole.len().div_ceil(NF4_BLOCK) {
                assert_eq!(q.block_absmax(b), q.absmax_f32()[b]);
            }
        }
    }

    #[test]
    fn first_value_goes_to_the_high_nibble() {
        let mut data = vec![0f32; 64];
        data[0] = -1.0;
        data[1] = 1.0;
        let (packed, absmax) = quantize_nf4(&data);
        assert_eq!(absmax, vec![1.0]);
        assert_eq!(packed[0], 0x0f);
        assert_eq!(packed[1], 0x77);
    }

    #[test]
    fn dynamic_map_has_zero_one_and_256_distinct_values() {
        let m = dynamic_map();
        assert_eq!(m[255], 1.0);
        assert!(m.contains(&0.0));
        assert!(m.windows(2).all(|w| w[0] < w[1]));
    }
}
