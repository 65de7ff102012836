//! loraops trainer: a differentiable Llama-family model in candle, LoRA and NF4 QLoRA
//! adapters, supervised fine-tuning, and PEFT-format adapter output.

pub mod adapter;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod error;
pub mod frozen;
pub mod llama;
pub mod lora;
pub mod nf4;
pub mod optim;
pub mod resume;
pub mod sft;
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
