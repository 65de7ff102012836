//! loraops model: the Llama-family decoder that training, serving and evaluation share.
//!
//! - `config`: Hugging Face config.json (Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 text;
//!   rope_parameters; RoPE scalings)
//! - `tokenizer`: tokenizer.json and the chat template (minijinja, as transformers renders it)
//! - `llama`: the differentiable decoder, built only from ops that have a backward; weight
//!   loading; a per-layer step a caller may wrap (`LayerStep`)
//! - `linear`: the decoder's linear layers: frozen base weights (f32, bf16, NF4 as a custom op
//!   returning only grad(x)), NF4 and double quantisation (bitsandbytes layout), LoRA pairs
//! - `kernels`: what makes it fast: one-pass CPU kernels with their own backward (RMSNorm,
//!   SwiGLU, log-softmax, causal attention), CPU products on gemm, vectorised exp and sums, and
//!   (feature `cuda`) the GPU kernels
//! - `bnb`: bitsandbytes-serialised 4-bit checkpoints (`*-bnb-4bit`), read and written
//! - `adapter`: PEFT adapter directories, both ways, and merging; `tiny`: `model init-tiny`
//!
//! The model knows nothing of optimisers, data or serving: the trainer wraps it for training
//! (checkpointing through `LayerStep`), the engine reads its weights for serving.

pub mod adapter;
pub mod bnb;
pub mod config;
pub mod error;
pub mod kernels;
pub mod linear;
pub mod llama;
pub mod tiny;
pub mod tokenizer;

pub use candle_core::Device;
pub use error::{Error, Result};

/// The device to compute on by default: the first GPU with the `cuda` feature, else the CPU.
pub fn default_device() -> Device {
    #[cfg(feature = "cuda")]
    if let Ok(d) = Device::new_cuda(0) {
        return d;
    }
    Device::Cpu
}

/// A device by name: `auto` ([`default_device`]), `cpu`, `cuda` or `cuda:N`.
pub fn select_device(name: &str) -> Result<Device> {
    let ordinal = match name {
        "auto" => return Ok(default_device()),
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| {
                Error::Config(format!(
                    "device {other:?}: expected auto, cpu, cuda or cuda:N"
                ))
            })?,
    };
    if !cfg!(feature = "cuda") {
        return Err(Error::Config(format!(
            "device {name:?}: this loraops was built without the cuda feature"
        )));
    }
    Device::new_cuda(ordinal).map_err(|e| Error::Config(format!("device {name:?}: {e}")))
}
