//! The model against transformers (one test binary): tiny generated models and what
//! transformers computes on them, recorded by the scripts in `scripts/reference/`, loaded here
//! with the real loader.

mod architectures;
mod bnb;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::{D, Device, Tensor};
use loraops_model::linear::lora::{LoraConfig, derived_rng};
use loraops_model::llama::{Llama, LoadOptions, log_softmax};

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The tensors of a fixture's `reference.safetensors`.
pub fn reference(dir: &Path) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap()
}

/// The input ids the reference logits were computed on, (1, T).
pub fn reference_ids(dir: &Path) -> Tensor {
    reference(dir)["input_ids"]
        .to_dtype(candle_core::DType::U32)
        .unwrap()
}

/// max |a - b| over all elements.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The model's logits on the fixture's ids against the reference tensor `key`: max abs
/// difference.
pub fn logits_diff(model: &Llama, dir: &Path, key: &str, label: &str) -> f32 {
    let got = model.logits(&reference_ids(dir), None).unwrap();
    let diff = max_abs_diff(&got, &reference(dir)[key]);
    println!("{label}: max |loraops - transformers| = {diff:e}");
    diff
}

/// Five SGD steps of next-token loss over one sequence, with LoRA on every linear of the
/// model in `dir`: every LoRA weight gets a finite, non-zero gradient and the loss falls.
pub fn lora_steps(dir: &Path, ids: &Tensor, label: &str) {
    let mut model = Llama::load(dir, &LoadOptions::default()).unwrap();
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
                .unwrap_or_else(|| panic!("{label}: no gradient for {key}"));
            let gv = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(gv.iter().all(|x| x.is_finite()), "{label}: {key}");
            any |= gv.iter().any(|x| *x != 0.0);
            v.set(&(v.as_tensor() - (g * 0.05).unwrap()).unwrap())
                .unwrap();
        }
        assert!(any, "{label}: all gradients are zero");
    }
    println!("{label}: LoRA losses {losses:?}");
    assert!(
        losses[losses.len() - 1] < losses[0],
        "{label}: loss did not decrease: {losses:?}"
    );
}
