//! Against the values PyTorch + transformers + PEFT (+ bitsandbytes) recorded.

use std::collections::{BTreeSet, HashMap};

use candle_core::{DType, Device, IndexOp, Tensor};
use loraops_model::linear::lora::LoraConfig;
use loraops_model::linear::nf4::{Absmax, Nf4Tensor, double_quantize, dynamic_map, quantize_nf4};
use loraops_model::llama::{BaseFormat, Llama, LoadOptions};
use loraops_model::tiny::TinySpec;
use loraops_trainer::data::{Example, make_batch};
use loraops_trainer::optim::{AdamW, AdamWConfig, clip_grad_norm, cosine_with_warmup};
use loraops_trainer::sft::{SftConfig, collect_grads, loss_sum, train_sft};
use serde_json::Value;

use crate::common::{fixtures, max_abs_diff, tiny_model};

struct Reference {
    t: HashMap<String, Tensor>,
    meta: Value,
}

fn reference() -> Reference {
    let t = candle_core::safetensors::load(fixtures().join("reference.safetensors"), &Device::Cpu)
        .unwrap();
    let meta =
        serde_json::from_slice(&std::fs::read(fixtures().join("reference.json")).unwrap()).unwrap();
    Reference { t, meta }
}

impl Reference {
    fn get(&self, k: &str) -> &Tensor {
        self.t
            .get(k)
            .unwrap_or_else(|| panic!("fixture tensor {k} missing"))
    }

    fn spec(&self) -> TinySpec {
        let s = &self.meta["tiny"];
        let u = |k: &str| s[k].as_u64().unwrap() as usize;
        TinySpec {
            layers: u("layers"),
            hidden: u("hidden"),
            heads: u("heads"),
            kv_heads: u("kv_heads"),
            vocab: u("vocab"),
            intermediate: None,
            seed: s["seed"].as_u64().unwrap(),
        }
    }

    fn ids(&self) -> Tensor {
        self.get("input_ids").to_dtype(DType::U32).unwrap()
    }

    fn mask(&self) -> Vec<Vec<u32>> {
        self.get("attention_mask")
            .to_vec2::<i64>()
            .unwrap()
            .into_iter()
            .map(|r| r.into_iter().map(|x| x as u32).collect())
            .collect()
    }

    /// The fixture batch as trainer examples (padding stripped; make_batch pads again).
    fn examples(&self) -> Vec<Example> {
        let ids = self.get("input_ids").to_vec2::<i64>().unwrap();
        let labels = self.get("labels").to_vec2::<i64>().unwrap();
        self.mask()
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let n = m.iter().filter(|&&x| x == 1).count();
                Example {
                    ids: ids[i][..n].iter().map(|&x| x as u32).collect(),
                    labels: labels[i][..n].to_vec(),
                    weight: 1.0,
                }
            })
            .collect()
    }

    /// Max |a - b| over the real (unpadded) positions of (B, T, V) logits.
    fn logits_diff(&self, ours: &Tensor, key: &str) -> f32 {
        let theirs = self.get(key);
        let mut worst = 0f32;
        for (b, m) in self.mask().iter().enumerate() {
            let n = m.iter().filter(|&&x| x == 1).count();
            worst = worst.max(max_abs_diff(
                &ours.i((b, ..n)).unwrap(),
                &theirs.i((b, ..n)).unwrap(),
            ));
        }
        worst
    }
}

fn load(dir: &std::path::Path, format: BaseFormat) -> Llama {
    Llama::load(
        dir,
        &LoadOptions {
            format,
            ..Default::default()
        },
    )
    .unwrap()
}

fn all_targets() -> BTreeSet<String> {
    [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Attach LoRA and set every A/B to the fixture's `prefix.KEY` tensors.
fn set_lora(model: &mut Llama, r: &Reference, prefix: &str) {
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        use_rslora: false,
        targets: all_targets(),
    };
    model
        .add_lora(&cfg, &mut loraops_model::linear::lora::derived_rng(0, 0, 0))
        .unwrap();
    for (k, v) in model.lora_params() {
        v.set(r.get(&format!("{prefix}.{k}"))).unwrap();
    }
}

fn loss_of(model: &Llama, r: &Reference) -> (f64, Tensor) {
    let ex = r.examples();
    let batch = make_batch(&ex.iter().collect::<Vec<_>>(), 0, &Device::Cpu).unwrap();
    let sum = loss_sum(model, &batch, 0.0, &mut None).unwrap();
    let loss = (sum / batch.n_targets as f64).unwrap();
    (loss.to_scalar::<f32>().unwrap() as f64, loss)
}

#[test]
fn base_logits_and_loss_match_transformers() {
    let r = reference();
    let (_tmp, dir) = tiny_model(&r.spec());
    let model = load(&dir, BaseFormat::F32);
    let logits = model.logits(&r.ids(), Some(&r.mask())).unwrap();
    let d = r.logits_diff(&logits, "base_logits");
    let (loss, _) = loss_of(&model, &r);
    let dl = (loss - r.meta["base_loss"].as_f64().unwrap()).abs();
    eprintln!("base: logits max diff {d:e}, loss diff {dl:e}");
    assert!(d <= 2e-6, "logits differ by {d}");
    assert!(dl <= 1e-6, "loss differs by {dl}");
}

#[test]
fn lora_logits_loss_and_gradients_match_peft() {
    let r = reference();
    let (_tmp, dir) = tiny_model(&r.spec());
    let mut model = load(&dir, BaseFormat::F32);
    set_lora(&mut model, &r, "lora");
    let logits = model.logits(&r.ids(), Some(&r.mask())).unwrap();
    let d = r.logits_diff(&logits, "lora_logits");
    let (loss, loss_t) = loss_of(&model, &r);
    let dl = (loss - r.meta["lora_loss"].as_f64().unwrap()).abs();
    let named = model.lora_params();
    let params: Vec<_> = named.iter().map(|(_, v)| v.clone()).collect();
    let grads = collect_grads(&model, &loss_t, &params).unwrap();
    let (mut dg, mut gmax) = (0f32, 0f32);
    for ((k, _), g) in named.iter().zip(&grads) {
        let want = r.get(&format!("grad.{k}"));
        dg = dg.max(max_abs_diff(g, want));
        gmax = gmax.max(
            want.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
        );
    }
    eprintln!(
        "lora: logits max diff {d:e}, loss diff {dl:e}, grad max diff {dg:e} (largest gradient {gmax:e}) over {} tensors",
        named.len()
    );
    assert_eq!(named.len(), 2 * 7 * 2);
    assert!(d <= 2e-6, "logits differ by {d}");
    assert!(dl <= 1e-6, "loss differs by {dl}");
    // Float rounding differences of the two matmul libraries, relative to the gradients' scale.
    assert!(
        dg <= 1e-6 * gmax,
        "gradients differ by {dg} (largest {gmax})"
    );
}

#[test]
fn activation_checkpointing_gives_the_same_gradients() {
    let r = reference();
    let (_tmp, dir) = tiny_model(&r.spec());
    let mut model = load(&dir, BaseFormat::F32);
    set_lora(&mut model, &r, "lora");
    let params: Vec<_> = model.lora_params().into_iter().map(|(_, v)| v).collect();
    let (_, loss) = loss_of(&model, &r);
    let plain = collect_grads(&model, &loss, &params).unwrap();
    model.layer_step = Some(std::sync::Arc::new(
        loraops_trainer::checkpoint::Checkpointing::default(),
    ));
    let (_, loss) = loss_of(&model, &r);
    let ckpt = collect_grads(&model, &loss, &params).unwrap();
    for (a, b) in plain.iter().zip(&ckpt) {
        assert!(max_abs_diff(a, b) <= 1e-9);
    }
    assert!(plain.iter().any(|g| {
        g.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    }));
}

#[test]
fn adamw_trajectory_matches_torch() {
    let r = reference();
    let tr = &r.meta["trajectory"];
    let f = |k: &str| tr[k].as_f64().unwrap();
    let steps = tr["steps"].as_u64().unwrap() as usize;
    let (_tmp, dir) = tiny_model(&r.spec());
    let mut model = load(&dir, BaseFormat::F32);
    set_lora(&mut model, &r, "init");
    let params: Vec<_> = model.lora_params().into_iter().map(|(_, v)| v).collect();
    let cfg = AdamWConfig {
        lr: f("lr"),
        beta1: f("beta1"),
        beta2: f("beta2"),
        eps: f("eps"),
        weight_decay: f("weight_decay"),
    };
    let mut opt = AdamW::new(params.clone(), cfg).unwrap();
    let want: Vec<f64> = tr["losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let mut worst = 0f64;
    for (step, w) in want.iter().enumerate().take(steps) {
        let (loss, t) = loss_of(&model, &r);
        worst = worst.max((loss - w).abs());
        let mut grads = collect_grads(&model, &t, &params).unwrap();
        clip_grad_norm(&mut grads, f("max_grad_norm")).unwrap();
        let lr = cfg.lr * cosine_with_warmup(step, tr["warmup"].as_u64().unwrap() as usize, steps);
        opt.step(&grads, lr).unwrap();
    }
    eprintln!(
        "trajectory: {steps} steps, loss {:.5} -> {:.5}, max diff {worst:e}",
        want[0],
        want[steps - 1]
    );
    assert!(
        want[steps - 1] < want[0] - 0.1,
        "the reference run must actually learn"
    );
    assert!(worst <= 1.1e-5, "trajectory differs by {worst}");
}

#[test]
fn nf4_bytes_match_bitsandbytes() {
    let r = reference();
    if !r.t.contains_key("nf4.dynamic_code") {
        panic!(
            "fixture has no bitsandbytes values: {}",
            r.meta["nf4_error"]
        );
    }
    let code: Vec<f32> = r.get("nf4.dynamic_code").to_vec1().unwrap();
    assert_eq!(dynamic_map().to_vec(), code, "dynamic 8-bit code book");
    for name in ["gate", "randn"] {
        let input = r.get(&format!("nf4.{name}.input"));
        let data: Vec<f32> = input.flatten_all().unwrap().to_vec1().unwrap();
        let (packed, absmax) = quantize_nf4(&data);
        let want: Vec<u8> = r.get(&format!("nf4.{name}.packed")).to_vec1().unwrap();
        assert_eq!(packed, want, "{name}: packed NF4 bytes");
        assert_eq!(
            absmax,
            r.get(&format!("nf4.{name}.absmax"))
                .to_vec1::<f32>()
                .unwrap(),
            "{name}: absmax"
        );
        if let Some(want) = r.t.get(&format!("nf4.{name}.dequant")) {
            let q = Nf4Tensor::quantize(input, false).unwrap();
            assert_eq!(
                max_abs_diff(&q.dequantize().unwrap(), want),
                0.0,
                "{name}: dequantised NF4"
            );
        }
        // Double quantisation: same offset and block scales; codes equal except where
        // bitsandbytes' approximate search picked a neighbour of the nearest code.
        let Absmax::Double {
            q: qa,
            absmax2,
            offset,
        } = double_quantize(&absmax)
        else {
            unreachable!()
        };
        let want_q: Vec<u8> = r.get(&format!("nf4.{name}.dq.qabsmax")).to_vec1().unwrap();
        let want_offset = r
            .get(&format!("nf4.{name}.dq.offset"))
            .to_vec1::<f32>()
            .unwrap()[0];
        assert_eq!(
            offset.to_bits(),
            want_offset.to_bits(),
            "{name}: absmax mean"
        );
        assert_eq!(
            absmax2,
            r.get(&format!("nf4.{name}.dq.absmax2"))
                .to_vec1::<f32>()
                .unwrap()
        );
        let mismatched: Vec<(u8, u8)> = qa
            .iter()
            .zip(&want_q)
            .filter(|(a, b)| a != b)
            .map(|(a, b)| (*a, *b))
            .collect();
        eprintln!(
            "{name}: {} of {} double-quant codes differ from bitsandbytes: {mismatched:?}",
            mismatched.len(),
            qa.len()
        );
        assert!(
            mismatched.len() * 100 <= qa.len(),
            "{name}: too many differing codes"
        );
        assert!(
            mismatched.iter().all(|(a, b)| a.abs_diff(*b) == 1),
            "{name}: only neighbouring codes may differ"
        );
        if let Some(want) = r.t.get(&format!("nf4.{name}.dq.dequant")) {
            let q = Nf4Tensor::quantize(input, true).unwrap();
            let d = max_abs_diff(&q.dequantize().unwrap(), want);
            eprintln!("{name}: double-quant dequantised weights max diff {d:e}");
            assert!(
                d <= 1e-3 * absmax.iter().fold(0f32, |m, a| m.max(*a)),
                "{name}: double-quant dequantised weights differ by {d}"
            );
        }
    }
}

#[test]
fn nf4_model_logits_match_bitsandbytes_dequantisation() {
    let r = reference();
    assert!(
        r.t.contains_key("nf4_logits"),
        "fixture has no NF4 model logits: {}",
        r.meta["nf4_model_error"]
    );
    let (_tmp, dir) = tiny_model(&r.spec());
    let model = Llama::load(
        &dir,
        &LoadOptions {
            format: BaseFormat::Nf4,
            double_quant: false,
            ..Default::default()
        },
    )
    .unwrap();
    let logits = model.logits(&r.ids(), Some(&r.mask())).unwrap();
    let d = r.logits_diff(&logits, "nf4_logits");
    let (loss, _) = loss_of(&model, &r);
    let dl = (loss - r.meta["nf4_loss"].as_f64().unwrap()).abs();
    eprintln!("nf4 model: logits max diff {d:e}, loss diff {dl:e}");
    assert!(d <= 2e-6, "NF4 logits differ by {d}");
    assert!(dl <= 1e-6, "NF4 loss differs by {dl}");
}

#[test]
fn peft_loads_our_adapter_with_identical_logits() {
    let r = reference();
    let e2e = &r.meta["e2e"];
    assert_eq!(
        e2e["peft_missing"].as_array().unwrap().len(),
        0,
        "PEFT reported missing keys"
    );
    assert_eq!(
        e2e["peft_unexpected"].as_array().unwrap().len(),
        0,
        "PEFT reported unexpected keys"
    );
    let (tmp, dir) = tiny_model(&r.spec());
    let out = tmp.path().join("adapter");
    let mut cfg = SftConfig {
        model: dir.clone(),
        data: fixtures().join("sft_small.jsonl"),
        out: out.clone(),
        ..Default::default()
    };
    cfg.steps = e2e["steps"].as_u64().unwrap() as usize;
    cfg.r = e2e["r"].as_u64().unwrap() as usize;
    cfg.alpha = e2e["alpha"].as_f64().unwrap();
    cfg.dropout = e2e["dropout"].as_f64().unwrap();
    cfg.lr = e2e["lr"].as_f64().unwrap();
    cfg.batch_size = e2e["batch_size"].as_u64().unwrap() as usize;
    cfg.seed = e2e["seed"].as_u64().unwrap();
    cfg.max_len = e2e["max_len"].as_u64().unwrap() as usize;
    cfg.warmup_steps = e2e["warmup_steps"].as_u64().unwrap() as usize;
    train_sft(&cfg, &Device::Cpu, &mut |_| {}).unwrap();
    let mut model = load(&dir, BaseFormat::F32);
    loraops_model::adapter::load_adapter(&out, &mut model).unwrap();
    let logits = model.logits(&r.ids(), Some(&r.mask())).unwrap();
    let d = r.logits_diff(&logits, "e2e.peft_logits");
    let moved = r.logits_diff(&logits, "base_logits");
    eprintln!("PEFT-loaded adapter: logits max diff {d:e} (the adapter moved logits by {moved:e})");
    assert!(moved > 1e-2, "the trained adapter must change the model");
    assert!(d <= 1e-4, "PEFT's logits differ from ours by {d}");
}

#[test]
fn qwen2_layout_sharded_tied_with_biases_matches_transformers() {
    let r = reference();
    let dir = fixtures().join("qwen2-tiny");
    assert!(
        dir.join("model.safetensors.index.json").exists(),
        "the fixture is sharded"
    );
    let model = load(&dir, BaseFormat::F32);
    assert!(model.config.qkv_bias && model.config.tie_word_embeddings);
    assert_eq!(model.config.rope_theta, 1e6);
    assert!(matches!(
        model.config.rope_scaling,
        loraops_model::config::RopeScaling::Llama3 {
            original_max: 16,
            ..
        }
    ));
    let ids = r.get("qwen2.input_ids").to_dtype(DType::U32).unwrap();
    let want = r.get("qwen2.logits");
    let d = max_abs_diff(&model.logits(&ids, None).unwrap(), want);
    let scale = want
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    eprintln!("qwen2: logits max diff {d:e} (largest logit {scale})");
    // f32 rounding, relative to logits that are larger here (tied unit-variance embeddings).
    assert!(d <= 5e-7 * scale, "logits differ by {d}");
}

#[test]
fn rslora_scaling_matches_peft() {
    let r = reference();
    let (_tmp, dir) = tiny_model(&r.spec());
    let mut model = load(&dir, BaseFormat::F32);
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        use_rslora: true,
        targets: all_targets(),
    };
    model
        .add_lora(&cfg, &mut loraops_model::linear::lora::derived_rng(0, 0, 0))
        .unwrap();
    for (k, v) in model.lora_params() {
        v.set(r.get(&format!("lora.{k}"))).unwrap();
    }
    let logits = model.logits(&r.ids(), Some(&r.mask())).unwrap();
    let d = r.logits_diff(&logits, "rslora_logits");
    let vs_plain = r.logits_diff(&logits, "lora_logits");
    eprintln!("rslora: logits max diff {d:e} (differs from plain LoRA by {vs_plain:e})");
    assert!(
        vs_plain > 1e-3,
        "rsLoRA must scale differently from LoRA at r = 4"
    );
    assert!(d <= 2e-6, "logits differ by {d}");
}
