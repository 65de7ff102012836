//! The engine against the model it serves: logits and greedy tokens against the trainer's
//! forward pass and PEFT's recorded values, mixed batches against requests served alone, and
//! the scheduler's promises (admission, cancellation, stop sequences, adapter swaps).

mod architectures;
mod helpers;
mod parity;
mod serving;
