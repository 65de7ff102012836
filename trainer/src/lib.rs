//! loraops trainer: a differentiable Llama-family model in candle, LoRA and NF4 QLoRA
//! adapters, supervised fine-tuning, and PEFT-format adapter output.
//!
//! - `config`: Hugging Face config.json (Llama, Mistral, Qwen2; rope_parameters; RoPE scalings)
//! - `llama`: the decoder, built only from ops that have a backward; weight loading
//! - `frozen`: frozen base linears (f32, bf16, NF4) as a custom op that returns only grad(x)
//! - `matmul`: f32 CPU matrix products (accumulating, on strided blocks)
//! - `attention`: causal self-attention as one CPU op (RoPE, GQA, block-triangular products)
//! - `fused`: one-pass CPU kernels with their own backward (RMSNorm, SwiGLU, log-softmax); `simd`: their vectorised exp and sums
//! - `nf4`: NF4 quantisation and double quantisation, bitsandbytes-compatible
//! - `lora`: LoRA pairs (PEFT init, rsLoRA, seeded dropout); `checkpoint`: per-layer recompute
//! - `tokenizer`, `data`: tokenizer + chat template; SFT rows, completion-only labels, batches, packing
//! - `optim`: AdamW, warm-up + cosine, clipping; `sft`: loss and training loop; `resume`: checkpoints
//! - `preference`: DPO (sigmoid, IPO, label-smoothed), ORPO and KTO on the SFT loop; TRL's formulas
//! - `adapter`: PEFT adapter and manifest output, adapter loading, merging; `tiny`: init-tiny
//! - `curate`: data curation (validation, PII masking, exact + MinHash dedup, filters, splits)
//! - `cuda` (feature `cuda`): GPU kernels and ops (NF4 expansion, dropout masks, attention softmax)

pub mod adapter;
pub mod attention;
pub mod checkpoint;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod curate;
pub mod data;
pub mod error;
pub mod frozen;
pub mod fused;
pub mod llama;
pub mod lora;
pub mod matmul;
pub mod nf4;
pub mod optim;
pub mod preference;
pub mod resume;
pub mod sft;
mod simd;
pub mod tiny;
pub mod tokenizer;

pub use error::{Error, Result};

pub use candle_core::Device;

/// The device training runs on: the first GPU with the `cuda` feature, else the CPU.
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
