//! Frozen base-model linear layers.
//!
//! candle's matmul backward always computes the gradient of both operands. For a frozen
//! weight that gradient is thrown away, so a frozen linear is a custom op on the activations
//! alone: its backward returns only `grad · W`. Weights stored in bf16 or NF4 are expanded to
//! the compute dtype (f32, or bf16 in mixed precision) for the duration of one product and
//! dropped right after, in forward and in backward; on a GPU, NF4 is expanded by a kernel.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor};

use crate::linear::nf4::Nf4Tensor;

/// How a frozen weight of shape (out, in) is stored.
#[derive(Debug, Clone)]
pub enum FrozenWeight {
    /// Used as is (f32, or bf16 on devices that compute in bf16).
    Dense(Tensor),
    /// Stored in bf16, computed in the activations' dtype.
    Bf16(Tensor),
    /// NF4 blocks, computed in the activations' dtype.
    Nf4(Arc<Nf4Tensor>),
}

impl FrozenWeight {
    /// The weight in the compute dtype, materialised for one use.
    pub fn materialize(&self, dtype: DType) -> candle_core::Result<Tensor> {
        match self {
            FrozenWeight::Dense(w) => w.to_dtype(dtype),
            FrozenWeight::Bf16(w) => w.to_dtype(dtype),
            FrozenWeight::Nf4(q) => q.dequantize_as(dtype),
        }
    }

    pub fn dims2(&self) -> candle_core::Result<(usize, usize)> {
        match self {
            FrozenWeight::Dense(w) | FrozenWeight::Bf16(w) => w.dims2(),
            FrozenWeight::Nf4(q) => Ok((q.shape[0], q.shape[1])),
        }
    }

    /// Bytes the stored weight occupies.
    pub fn storage_bytes(&self) -> usize {
        match self {
            FrozenWeight::Dense(w) | FrozenWeight::Bf16(w) => {
                w.elem_count() * w.dtype().size_in_bytes()
            }
            FrozenWeight::Nf4(q) => q.storage_bytes(),
        }
    }
}

/// `x · Wᵀ` where only `x` receives a gradient.
#[derive(Debug, Clone)]
pub struct FrozenMatmul {
    pub weight: FrozenWeight,
}

impl FrozenMatmul {
    pub fn new(weight: FrozenWeight) -> Self {
        Self { weight }
    }

    /// x: (..., in) → (..., out).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = x.contiguous()?;
        if x.track_op() {
            x.apply_op1(self.clone())
        } else {
            // No graph needed (inference, or activations of a frozen prefix): plain product.
            let w = self.weight.materialize(x.dtype())?;
            x.broadcast_matmul(&w.t()?)
        }
    }

    fn out_shape(&self, in_shape: &Shape) -> candle_core::Result<(usize, usize, Shape)> {
        let (out_f, in_f) = self.weight.dims2()?;
        let dims = in_shape.dims();
        let last = *dims
            .last()
            .ok_or_else(|| candle_core::Error::Msg("frozen linear on a scalar".into()))?;
        if last != in_f {
            candle_core::bail!("frozen linear: input has {last} features, weight expects {in_f}");
        }
        let rows = in_shape.elem_count() / in_f;
        let mut out = dims.to_vec();
        *out.last_mut().expect("non-empty") = out_f;
        Ok((rows, out_f, Shape::from(out)))
    }
}

/// Run `storage(rows × in) · W(out × in)ᵀ` on the backend without building a graph.
fn product<S: BackendStorage>(
    x: &S,
    x_l: &Layout,
    w: &S,
    w_l: &Layout,
    rows: usize,
    out_f: usize,
) -> candle_core::Result<S> {
    let in_f = w_l.dims()[1];
    let (start, _) = x_l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("frozen linear: input is not contiguous".into()))?;
    let lhs = Layout::contiguous_with_offset((rows, in_f), start);
    let rhs = w_l.transpose(0, 1)?;
    x.matmul(w, (1, rows, out_f, in_f), &lhs, &rhs)
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, out_f, shape) = self.out_shape(l.shape())?;
        let w = self.weight.materialize(s.dtype())?.contiguous()?;
        let (ws, wl) = w.storage_and_layout();
        let Storage::Cpu(ws) = &*ws else {
            candle_core::bail!("frozen linear: weight is not on the CPU")
        };
        Ok((product(s, l, ws, wl, rows, out_f)?, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (rows, out_f, shape) = self.out_shape(l.shape())?;
        let w = self.weight.materialize(s.dtype())?.contiguous()?;
        let (ws, wl) = w.storage_and_layout();
        let Storage::Cuda(ws) = &*ws else {
            candle_core::bail!("frozen linear: weight is not on the GPU")
        };
        Ok((product(s, l, ws, wl, rows, out_f)?, shape))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (out_f, in_f) = self.weight.dims2()?;
        let w = self.weight.materialize(grad.dtype())?;
        let g = grad.contiguous()?.reshape(((), out_f))?.matmul(&w)?;
        let mut dims = arg.dims().to_vec();
        *dims.last_mut().expect("non-empty") = in_f;
        Ok(Some(g.reshape(dims)?))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use super::*;

    /// candle 0.10.2's CPU batched matmul returns wrong values when the left operand's batch
    /// stride is 0 (`broadcast_as(…).matmul(…)`, candle issue 3744, fixed in 0.11.1). The
    /// frozen product broadcasts only the weight, on the right; this checks every batched path
    /// it takes against row-by-row products, and would catch a change that fed the bad pattern.
    #[test]
    fn batched_products_equal_row_by_row_products() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (5, 7), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (3, 4, 7), &dev).unwrap();
        let lin = FrozenMatmul::new(FrozenWeight::Dense(w.clone()));
        let rows = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
        let mut want = Vec::new();
        for b in 0..3 {
            for r in 0..4 {
                let xr = x.get(b).unwrap().get(r).unwrap().unsqueeze(0).unwrap();
                want.extend(rows(&xr.matmul(&w.t().unwrap()).unwrap()));
            }
        }
        let plain = lin.forward(&x).unwrap();
        let tracked = lin
            .forward(Var::from_tensor(&x).unwrap().as_tensor())
            .unwrap();
        for got in [rows(&plain), rows(&tracked)] {
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-5, "{worst}");
        }
    }
}
