//! Training on Qwen3, Gemma 2 and Gemma 3 (text): the tiny models recorded by
//! `scripts/reference/architectures_reference.py` (whose logits `loraops-model` checks against
//! transformers) take AdamW steps on LoRA, with activation checkpointing giving the gradients
//! the plain graph gives.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{D, DType, Device, Tensor};
use loraops_model::linear::lora::{LoraConfig, derived_rng};
use loraops_model::llama::{Llama, LoadOptions, log_softmax};
use loraops_trainer::checkpoint::Checkpointing;
use loraops_trainer::optim::{AdamW, AdamWConfig};
use loraops_trainer::sft::collect_grads;

fn load(name: &str) -> (Llama, Tensor) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../model/tests/fixtures")
        .join(name);
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
    let r =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    (model, r["input_ids"].to_dtype(DType::U32).unwrap())
}

fn loss(model: &Llama, ids: &Tensor) -> Tensor {
    let t = ids.dim(1).unwrap();
    let target = ids.narrow(1, 1, t - 1).unwrap().flatten_all().unwrap();
    let logits = model
        .logits(&ids.narrow(1, 0, t - 1).unwrap(), None)
        .unwrap()
        .squeeze(0)
        .unwrap();
    log_softmax(&logits)
        .unwrap()
        .gather(&target.unsqueeze(1).unwrap(), D::Minus1)
        .unwrap()
        .mean_all()
        .unwrap()
        .neg()
        .unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn trains(name: &str) {
    let (mut model, ids) = load(name);
    let params: Vec<_> = model.lora_params().into_iter().map(|(_, v)| v).collect();
    let mut opt = AdamW::new(
        params.clone(),
        AdamWConfig {
            lr: 1e-2,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    let mut losses = Vec::new();
    for step in 0..6 {
        let l = loss(&model, &ids);
        losses.push(l.to_scalar::<f32>().unwrap());
        let grads = collect_grads(&model, &l, &params).unwrap();
        assert!(grads.iter().all(|g| max_abs(g).is_finite()), "{name}");
        if step == 2 {
            // B is non-zero by now, so every LoRA matrix has a gradient to compare.
            model.layer_step = Some(Arc::new(Checkpointing::default()));
            let ckpt = collect_grads(&model, &loss(&model, &ids), &params).unwrap();
            model.layer_step = None;
            let scale = grads.iter().map(max_abs).fold(0f32, f32::max);
            let diff = grads
                .iter()
                .zip(&ckpt)
                .map(|(a, b)| max_abs(&(a - b).unwrap()))
                .fold(0f32, f32::max);
            assert!(
                scale > 0.0 && diff <= 1e-5 * scale,
                "{name}: {diff} of {scale}"
            );
        }
        opt.step(&grads, 1e-2).unwrap();
    }
    eprintln!("{name}: LoRA AdamW losses {losses:?}");
    assert!(losses[5] < losses[0], "{name}: {losses:?}");
}

#[test]
fn qwen3_lora_trains_with_and_without_checkpointing() {
    trains("qwen3-tiny");
}

#[test]
fn gemma2_lora_trains_with_and_without_checkpointing() {
    trains("gemma2-tiny");
}

#[test]
fn gemma3_lora_trains_with_and_without_checkpointing() {
    trains("gemma3-tiny");
}
