//! The decoder's linear layers: a frozen base weight (dense or NF4) with an optional bias and
//! LoRA pair.

pub mod frozen;
pub mod lora;
pub mod nf4;
