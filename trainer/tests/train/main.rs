//! Integration tests of the trainer: numbers against recorded PyTorch/PEFT/bitsandbytes
//! reference values (scripts/reference/trainer_reference.py), and the SFT pipeline end to end
//! on a generated tiny model, and the workflows built on it (continuing from an adapter,
//! schedules, best adapters, row weights).

mod architectures;
mod common;
mod curate;
mod pipeline;
mod preference;
mod reference;
mod workflows;
