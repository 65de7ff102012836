//! loraops trainer: LoRA and NF4 QLoRA training on the shared model (`loraops-model`):
//! supervised fine-tuning and preference objectives on one loop, PEFT-format adapter output.
//!
//! - `data`: SFT rows (read as `loraops_data::row` types), completion-only labels, batches,
//!   packing
//! - `optim`: AdamW, learning-rate schedules, clipping; `sft`: loss and training loop; `resume`: checkpoints
//! - `init`: continuing from an adapter (its settings, weights, lineage, the frozen reference)
//! - `checkpoint`: per-layer recompute, installed on the model as its layer step
//! - `preference`: DPO (sigmoid, IPO, label-smoothed), ORPO and KTO on the SFT loop; TRL's formulas

pub mod checkpoint;
pub mod data;
pub mod error;
pub mod init;
pub mod optim;
pub mod preference;
pub mod resume;
pub mod sft;

pub use error::{Error, Result};
pub use loraops_model::{Device, default_device, select_device};
