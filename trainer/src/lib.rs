//! loraops trainer.
