//! Qwen3, Gemma 2 and Gemma 3 (text) against transformers: tiny generated models and their
//! f32 logits recorded by `scripts/reference/architectures_reference.py`, loaded here with
//! the real loader; then a few LoRA steps on each, through the same forward training uses.

use loraops_model::config::Architecture;
use loraops_model::llama::{Llama, LoadOptions};

use crate::{fixture, logits_diff, lora_steps, reference_ids};

/// Loads the fixture, compares its logits with transformers', returns the max abs difference.
fn arch_diff(name: &str, arch: Architecture) -> f32 {
    let dir = fixture(name);
    let model = Llama::load(&dir, &LoadOptions::default()).unwrap();
    assert_eq!(model.config.architecture, arch);
    logits_diff(&model, &dir, "logits", name)
}

fn arch_lora_steps(name: &str) {
    let dir = fixture(name);
    lora_steps(&dir, &reference_ids(&dir), name);
}

#[test]
fn qwen3_logits_match_transformers() {
    let d = arch_diff("qwen3-tiny", Architecture::Qwen3);
    assert!(d <= 1e-4, "{d}");
}

#[test]
fn gemma2_logits_match_transformers() {
    let d = arch_diff("gemma2-tiny", Architecture::Gemma2);
    assert!(d <= 1e-4, "{d}");
}

#[test]
fn gemma3_logits_match_transformers() {
    let d = arch_diff("gemma3-tiny", Architecture::Gemma3);
    assert!(d <= 1e-4, "{d}");
}

#[test]
fn configs_name_their_pieces() {
    let load = |n: &str| Llama::load(&fixture(n), &LoadOptions::default()).unwrap();
    let q = load("qwen3-tiny");
    assert!(q.config.qk_norm && !q.config.qkv_bias && !q.config.gemma);
    // head_dim from the config, not hidden / heads.
    assert_eq!((q.config.head_dim, q.config.hidden_size), (16, 32));
    let g2 = load("gemma2-tiny");
    assert!(g2.config.gemma && !g2.config.qk_norm);
    assert_eq!(g2.config.attn_logit_softcapping, Some(2.0));
    assert_eq!(g2.config.final_logit_softcapping, Some(3.0));
    assert_eq!(g2.config.sliding_layers, vec![true, false, true]);
    let g3 = load("gemma3-tiny");
    assert!(g3.config.gemma && g3.config.qk_norm);
    assert_eq!(g3.config.local_rope_theta, Some(1e4));
    assert_eq!(g3.config.sliding_layers, vec![true, false, true]);
}

#[test]
fn qwen3_lora_steps_lower_the_loss() {
    arch_lora_steps("qwen3-tiny");
}

#[test]
fn gemma2_lora_steps_lower_the_loss() {
    arch_lora_steps("gemma2-tiny");
}

#[test]
fn gemma3_lora_steps_lower_the_loss() {
    arch_lora_steps("gemma3-tiny");
}
