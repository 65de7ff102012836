//! The model's own CUDA kernels (`kernels/model.cu`, PTX built by build.rs): NF4
//! dequantisation on the GPU straight into the compute dtype, and LoRA dropout masks drawn on
//! the GPU; the attention softmax as one op; the GPU memory high-water mark. Compiled only with
//! the `cuda` feature.

use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, D, DType, Device, Layout, Shape, Storage, Tensor,
};

use crate::linear::nf4::Nf4Resident;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/model.ptx"));
const MODULE: &str = "loraops-model";
const THREADS: u32 = 256;

fn launch_config(threads: u64) -> candle_core::Result<LaunchConfig> {
    let blocks = u32::try_from(threads.div_ceil(THREADS as u64))
        .map_err(|_| candle_core::Error::Msg("kernel launch too large".into()))?;
    Ok(LaunchConfig {
        grid_dim: (blocks.max(1), 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

fn cuda_device(device: &Device) -> candle_core::Result<&CudaDevice> {
    match device {
        Device::Cuda(d) => Ok(d),
        _ => candle_core::bail!("expected a CUDA device, got {device:?}"),
    }
}

/// A fresh tensor over a buffer the kernel filled.
fn wrap<T: CudaDType>(out: CudaSlice<T>, dev: &CudaDevice, shape: Shape) -> Tensor {
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, dev.clone()));
    Tensor::from_storage(storage, shape, BackpropOp::none(), false)
}

/// The CUDA buffer of a contiguous tensor that starts at offset 0 (the resident NF4 tensors
/// are created that way), from its storage guard.
fn buffer<'s, T: CudaDType>(s: &'s Storage, l: &Layout) -> candle_core::Result<&'s CudaSlice<T>> {
    if l.contiguous_offsets() != Some((0, l.shape().elem_count())) {
        candle_core::bail!("resident NF4 tensor is not a whole contiguous buffer");
    }
    match s {
        Storage::Cuda(s) => s.as_cuda_slice::<T>(),
        _ => candle_core::bail!("resident NF4 tensor is not on the GPU"),
    }
}

/// The (out, in) weight of `r` in `dtype` (f32 or bf16; anything else goes through f32),
/// bit-identical to the CPU path's dequantisation followed by the same conversion.
pub fn nf4_dequantize(
    r: &Nf4Resident,
    shape: [usize; 2],
    dtype: DType,
) -> candle_core::Result<Tensor> {
    match dtype {
        DType::F32 => dequantize_into::<f32>(r, shape, "nf4_dequant_f32"),
        DType::BF16 => dequantize_into::<half::bf16>(r, shape, "nf4_dequant_bf16"),
        other => dequantize_into::<f32>(r, shape, "nf4_dequant_f32")?.to_dtype(other),
    }
}

fn dequantize_into<T: CudaDType + DeviceRepr>(
    r: &Nf4Resident,
    shape: [usize; 2],
    kernel: &str,
) -> candle_core::Result<Tensor> {
    let dev = cuda_device(r.packed.device())?;
    let n = (shape[0] * shape[1]) as u64;
    let func = dev.get_or_load_custom_func(kernel, MODULE, PTX)?;
    // SAFETY: the kernel writes every one of the n values before anything reads them.
    let mut out = unsafe { dev.alloc::<T>(n as usize) }?;
    let (packed_s, packed_l) = r.packed.storage_and_layout();
    let (codes_s, codes_l) = r.codes.storage_and_layout();
    let absmax_g = r.absmax.as_ref().map(|t| t.storage_and_layout());
    let q_g = r.absmax_q.as_ref().map(|t| t.storage_and_layout());
    let absmax2_g = r.absmax2.as_ref().map(|t| t.storage_and_layout());
    let packed = buffer::<u8>(&packed_s, packed_l)?;
    let codes = buffer::<f32>(&codes_s, codes_l)?;
    let absmax = absmax_g
        .as_ref()
        .map(|(s, l)| buffer::<f32>(s, l))
        .transpose()?;
    let q = q_g.as_ref().map(|(s, l)| buffer::<u8>(s, l)).transpose()?;
    let absmax2 = absmax2_g
        .as_ref()
        .map(|(s, l)| buffer::<f32>(s, l))
        .transpose()?;
    if absmax.is_some() == (q.is_some() && absmax2.is_some()) {
        candle_core::bail!("resident NF4 tensor has an inconsistent absmax");
    }
    // A null pointer for the absmax form not in use; the kernel reads the other one.
    let null: u64 = 0;
    let mut b = func.builder();
    b.arg(packed);
    match absmax {
        Some(a) => b.arg(a),
        None => b.arg(&null),
    };
    match q {
        Some(q) => b.arg(q),
        None => b.arg(&null),
    };
    match absmax2 {
        Some(a) => b.arg(a),
        None => b.arg(&null),
    };
    b.arg(codes);
    b.arg(&r.offset);
    b.arg(&mut out);
    b.arg(&n);
    // SAFETY: the arguments match nf4_dequant_* in model.cu; one thread per packed byte.
    unsafe { b.launch(launch_config(n.div_ceil(2))?) }.w()?;
    drop(b);
    Ok(wrap(out, dev, Shape::from((shape[0], shape[1]))))
}

/// An inverted-dropout mask for `x` (0 or 1/keep, in x's dtype), drawn on the GPU from `seed`.
pub fn dropout_mask(x: &Tensor, keep: f64, seed: u64) -> candle_core::Result<Tensor> {
    match x.dtype() {
        DType::BF16 => mask_into::<half::bf16>(x, keep, seed, "dropout_mask_bf16"),
        DType::F32 => mask_into::<f32>(x, keep, seed, "dropout_mask_f32"),
        other => mask_into::<f32>(x, keep, seed, "dropout_mask_f32")?.to_dtype(other),
    }
}

fn mask_into<T: CudaDType + DeviceRepr>(
    x: &Tensor,
    keep: f64,
    seed: u64,
    kernel: &str,
) -> candle_core::Result<Tensor> {
    let dev = cuda_device(x.device())?;
    let n = x.elem_count() as u64;
    let (keep, scale) = (keep as f32, (1.0 / keep) as f32);
    let func = dev.get_or_load_custom_func(kernel, MODULE, PTX)?;
    // SAFETY: the kernel writes every one of the n values.
    let mut out = unsafe { dev.alloc::<T>(n as usize) }?;
    let mut b = func.builder();
    b.arg(&seed);
    b.arg(&keep);
    b.arg(&scale);
    b.arg(&mut out);
    b.arg(&n);
    // SAFETY: the arguments match dropout_mask_* in model.cu; one thread per value.
    unsafe { b.launch(launch_config(n)?) }.w()?;
    drop(b);
    Ok(wrap(out, dev, x.shape().clone()))
}

/// The high-water mark of the memory pool candle allocates from on `device` (stream-ordered
/// allocations), in bytes: the most the process's tensors held at once. `None` off the GPU or
/// if the driver does not say.
pub fn peak_memory(device: &Device) -> Option<u64> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let Device::Cuda(d) = device else {
        return None;
    };
    let ordinal = i32::try_from(d.cuda_stream().context().ordinal()).ok()?;
    let ok = sys::CUresult::CUDA_SUCCESS;
    let mut dev: sys::CUdevice = 0;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut high: u64 = 0;
    // SAFETY: plain queries writing into locals of the types the driver API declares.
    unsafe {
        if sys::cuDeviceGet(&mut dev, ordinal) != ok
            || sys::cuDeviceGetMemPool(&mut pool, dev) != ok
            || sys::cuMemPoolGetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                (&mut high as *mut u64).cast(),
            ) != ok
        {
            return None;
        }
    }
    // Zero means candle did not allocate from the pool (no stream-ordered allocation).
    (high > 0).then_some(high)
}

/// softmax(scores + mask) over the last dimension, in f32, returned in the scores' dtype, as one
/// op that keeps only its input and output for backward: composed from basic ops it would keep
/// five more tensors of B·H·T·T values per layer.
pub fn masked_softmax(scores: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    scores
        .contiguous()?
        .apply_op1(MaskedSoftmax { mask: mask.clone() })
}

struct MaskedSoftmax {
    /// Additive, (B, 1, T, T), f32.
    mask: Tensor,
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("masked-softmax runs on the GPU only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        if l.contiguous_offsets() != Some((0, l.shape().elem_count())) {
            candle_core::bail!("masked-softmax: scores are not a whole contiguous buffer");
        }
        let x = Tensor::from_storage(
            Storage::Cuda(s.try_clone(l)?),
            l.shape().clone(),
            BackpropOp::none(),
            false,
        );
        let y =
            candle_nn::ops::softmax_last_dim(&x.to_dtype(DType::F32)?.broadcast_add(&self.mask)?)?
                .to_dtype(x.dtype())?;
        let (ys, yl) = y.storage_and_layout();
        let Storage::Cuda(ys) = &*ys else {
            candle_core::bail!("masked-softmax: output is not on the GPU")
        };
        Ok((ys.try_clone(yl)?, y.shape().clone()))
    }

    /// d scores = p · (g − Σ g·p), in f32; the mask is constant.
    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let p = res.to_dtype(DType::F32)?;
        let g = grad.to_dtype(DType::F32)?;
        let dot = (&g * &p)?.sum_keepdim(D::Minus1)?;
        let d = (g.broadcast_sub(&dot)? * p)?;
        Ok(Some(d.to_dtype(res.dtype())?))
    }
}
