//! Integration tests of the trainer: numbers against recorded PyTorch/PEFT/bitsandbytes/TRL
//! reference values (scripts/reference/trainer_reference.py, preference_reference.py), SFT and
//! preference training end to end on a generated tiny model, and the workflows built on them
//! (continuing from an adapter, schedules, best adapters, row weights). Curation's tests are
//! in data/tests/curate/.

mod architectures;
mod common;
mod pipeline;
mod preference;
mod reference;
mod workflows;
