//! CPU and GPU kernels in place of candle's composed ops where those are slow: the model's
//! meaning is in `llama` and `linear`, these compute the same values faster.

pub mod attention;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod fused;
pub mod matmul;
pub mod simd;
