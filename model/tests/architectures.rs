//! Qwen3, Gemma 2 and Gemma 3 (text) against transformers: tiny generated models and their
//! f32 logits recorded by `scripts/reference/architectures_reference.py`, loaded here with
//! the real loader; then a few LoRA steps on each, through the same forward training uses.

use std::collections::BTreeSet;
use std::path::PathBuf;

use candle_core::{D, Device};
use loraops_model::config::Architecture;
use loraops_model::linear::lora::{LoraConfig, derived_rng};
use loraops_model::llama::{Llama, LoadOptions, log_softmax};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Loads the fixture, compares its logits with transformers', returns the max abs difference.
fn logits_diff(name: &str, arch: Architecture) -> f32 {
    let dir = fixture(name);
    let model = Llama::load(&dir, &LoadOptions::default()).unwrap();
    assert_eq!(model.config.architecture, arch);
    let reference =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let ids = reference["input_ids"]
        .to_dtype(candle_core::DType::U32)
        .unwrap();
    let expected = &reference["logits"];
    let got = model.logits(&ids, None).unwrap();
    assert_eq!(got.dims(), expected.dims());
    let diff = (got - expected)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    println!("{name}: max |loraops - transformers| = {diff:e}");
    diff
}

#[test]
fn qwen3_logits_match_transformers() {
    let d = logits_diff("qwen3-tiny", Architecture::Qwen3);
    assert!(d <= 1e-4, "{d}");
}

#[test]
fn gemma2_logits_match_transformers() {
    let d = logits_diff("gemma2-tiny", Architecture::Gemma2);
    assert!(d <= 1e-4, "{d}");
}

#[test]
fn gemma3_logits_match_transformers() {
    let d = logits_diff("gemma3-tiny", Architecture::Gemma3);
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

/// Next-token loss over one sequence, with LoRA on every linear.
fn lora_steps(name: &str) {
    let dir = fixture(name);
    let mut model = Llama::load(&dir, &LoadOptions::default()).unwrap();
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        use_rslora: false,
        targets: model
            .config
            .linear_modules()
            .iter()
            .map(|s| s.to_string())
            .collect::<BTreeSet<_>>(),
    };
    model.add_lora(&cfg, &mut derived_rng(0, 0, 0)).unwrap();
    let reference =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let ids = reference["input_ids"]
        .to_dtype(candle_core::DType::U32)
        .unwrap();
    let t = ids.dim(1).unwrap();
    let input = ids.narrow(1, 0, t - 1).unwrap();
    let target = ids.narrow(1, 1, t - 1).unwrap().flatten_all().unwrap();
    let params = model.lora_params();
    let mut losses = Vec::new();
    for _ in 0..5 {
        let logits = model.logits(&input, None).unwrap().squeeze(0).unwrap();
        let lp = log_softmax(&logits).unwrap();
        let loss = lp
            .gather(&target.unsqueeze(1).unwrap(), D::Minus1)
            .unwrap()
            .mean_all()
            .unwrap()
            .neg()
            .unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        let grads = loss.backward().unwrap();
        let mut any = false;
        for (key, v) in &params {
            let g = grads
                .get(v)
                .unwrap_or_else(|| panic!("{name}: no gradient for {key}"));
            let gv = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(gv.iter().all(|x| x.is_finite()), "{name}: {key}");
            any |= gv.iter().any(|x| *x != 0.0);
            v.set(&(v.as_tensor() - (g * 0.05).unwrap()).unwrap())
                .unwrap();
        }
        assert!(any, "{name}: all gradients are zero");
    }
    println!("{name}: LoRA losses {losses:?}");
    assert!(
        losses[losses.len() - 1] < losses[0],
        "{name}: loss did not decrease: {losses:?}"
    );
}

#[test]
fn qwen3_lora_steps_lower_the_loss() {
    lora_steps("qwen3-tiny");
}

#[test]
fn gemma2_lora_steps_lower_the_loss() {
    lora_steps("gemma2-tiny");
}

#[test]
fn gemma3_lora_steps_lower_the_loss() {
    lora_steps("gemma3-tiny");
}
