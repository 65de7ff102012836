//! DPO, ORPO and KTO: losses, gradients and metrics against TRL (recorded by
//! scripts/reference/preference_reference.py), and the preference pipeline end to end on a
//! generated tiny model.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use loraops_model::linear::lora::LoraConfig;
use loraops_model::llama::{BaseFormat, Llama, LoadOptions};
use loraops_model::tiny::TinySpec;
use loraops_model::tokenizer::Tokenizer;
use loraops_registry::api::TrainingManifest;
use loraops_trainer::Error;
use loraops_trainer::data::{Example, IGNORE};
use loraops_trainer::preference::{
    DpoLoss, Method, PreferenceConfig, PreferenceOptions, PreferenceRow, batch_loss, dpo_losses,
    kto_kl, kto_losses, load_kto, load_pairs, orpo_odds_ratio, train_preference, without_adapter,
};
use loraops_trainer::sft::{SftConfig, StepMetrics, collect_grads};
use serde_json::{Value, json};

use crate::common::{fixtures, max_abs_diff, tiny_model};

/// The precision the issue asks for, met by all three methods.
const LOSS_TOL: f64 = 3e-6;
const GRAD_TOL: f32 = 9e-7;

struct Reference {
    t: HashMap<String, Tensor>,
    meta: Value,
}

fn reference() -> Reference {
    let t = candle_core::safetensors::load(fixtures().join("preference.safetensors"), &Device::Cpu)
        .unwrap();
    let meta = serde_json::from_slice(&std::fs::read(fixtures().join("preference.json")).unwrap())
        .unwrap();
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

    /// A fixed-log-prob input as an f64 variable (the trainer computes the loss tail in f64).
    fn var(&self, k: &str) -> Var {
        Var::from_tensor(&self.get(k).to_dtype(DType::F64).unwrap()).unwrap()
    }

    /// The sequences `prefix.{ids,labels,len}` as examples (padding stripped).
    fn examples(&self, prefix: &str) -> Vec<Example> {
        let ids = self.get(&format!("{prefix}.ids")).to_vec2::<i64>().unwrap();
        let labels = self
            .get(&format!("{prefix}.labels"))
            .to_vec2::<i64>()
            .unwrap();
        let len = self.get(&format!("{prefix}.len")).to_vec1::<i64>().unwrap();
        (0..ids.len())
            .map(|i| {
                let n = len[i] as usize;
                Example {
                    ids: ids[i][..n].iter().map(|&x| x as u32).collect(),
                    labels: labels[i][..n].to_vec(),
                    weight: 1.0,
                }
            })
            .collect()
    }

    fn rows(&self, first: &str, second: &str, labels: Option<Vec<bool>>) -> Vec<PreferenceRow> {
        let (a, b) = (self.examples(first), self.examples(second));
        a.into_iter()
            .zip(b)
            .enumerate()
            .map(|(i, (x, y))| PreferenceRow {
                seqs: [x, y],
                desirable: labels.as_ref().is_none_or(|l| l[i]),
                weight: 1.0,
                line: i + 1,
            })
            .collect()
    }
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

fn grad_diff(store: &candle_core::backprop::GradStore, v: &Var, want: &Tensor) -> f32 {
    let g = store
        .get(v.as_tensor())
        .expect("gradient")
        .to_dtype(DType::F32)
        .unwrap();
    max_abs_diff(&g, want)
}

#[test]
fn losses_and_gradients_match_trl_on_fixed_log_probs() {
    let r = reference();
    let (pc, pr, rc, rr) = (
        r.var("fixed.policy_chosen"),
        r.var("fixed.policy_rejected"),
        r.var("fixed.ref_chosen"),
        r.var("fixed.ref_rejected"),
    );
    let (nc, nr) = (
        r.get("fixed.chosen_tokens").to_dtype(DType::F64).unwrap(),
        r.get("fixed.rejected_tokens").to_dtype(DType::F64).unwrap(),
    );
    let mut report = Vec::new();
    for case in ["dpo_sigmoid", "dpo_robust", "dpo_ipo", "dpo_cdpo"] {
        let m = &r.meta["fixed"][case];
        let lt: DpoLoss = serde_json::from_value(m["loss_type"].clone()).unwrap();
        let (losses, cr, rj) = dpo_losses(
            pc.as_tensor(),
            pr.as_tensor(),
            rc.as_tensor(),
            rr.as_tensor(),
            &nc,
            &nr,
            m["beta"].as_f64().unwrap(),
            lt,
            m["label_smoothing"].as_f64().unwrap(),
        )
        .unwrap();
        let loss = losses.mean_all().unwrap();
        let dl = (scalar(&loss) - m["loss"].as_f64().unwrap()).abs();
        let store = loss.backward().unwrap();
        let dg = grad_diff(
            &store,
            &pc,
            r.get(&format!("fixed.{case}.grad.policy_chosen")),
        )
        .max(grad_diff(
            &store,
            &pr,
            r.get(&format!("fixed.{case}.grad.policy_rejected")),
        ));
        let dr = (scalar(&cr.mean_all().unwrap()) - m["rewards_chosen"].as_f64().unwrap())
            .abs()
            .max((scalar(&rj.mean_all().unwrap()) - m["rewards_rejected"].as_f64().unwrap()).abs());
        report.push(format!("{case}: loss {dl:e}, grad {dg:e}, rewards {dr:e}"));
        assert!(dl <= LOSS_TOL, "{case}: loss differs by {dl}");
        assert!(dg <= GRAD_TOL, "{case}: gradients differ by {dg}");
        assert!(dr <= 1e-6, "{case}: rewards differ by {dr}");
    }

    // ORPO's odds-ratio term (TRL's loss subtracts mean(β · log σ(log-odds))).
    let m = &r.meta["fixed"]["orpo"];
    let (oc, or) = (
        r.var("fixed.orpo.policy_chosen"),
        r.var("fixed.orpo.policy_rejected"),
    );
    let (losses, ratio, log_odds) =
        orpo_odds_ratio(oc.as_tensor(), or.as_tensor(), m["beta"].as_f64().unwrap()).unwrap();
    let loss = losses.mean_all().unwrap();
    let dl = (scalar(&loss) - m["loss"].as_f64().unwrap()).abs();
    let store = loss.backward().unwrap();
    let dg = grad_diff(&store, &oc, r.get("fixed.orpo.grad.policy_chosen")).max(grad_diff(
        &store,
        &or,
        r.get("fixed.orpo.grad.policy_rejected"),
    ));
    let dm = (scalar(&ratio.mean_all().unwrap()) - m["log_odds_ratio"].as_f64().unwrap())
        .abs()
        .max(
            (scalar(&log_odds.mean_all().unwrap()) - m["log_odds_chosen"].as_f64().unwrap()).abs(),
        );
    report.push(format!("orpo: loss {dl:e}, grad {dg:e}, log-odds {dm:e}"));
    assert!(dl <= LOSS_TOL, "orpo: loss differs by {dl}");
    assert!(dg <= GRAD_TOL, "orpo: gradients differ by {dg}");
    assert!(dm <= 1e-6, "orpo: log-odds metrics differ by {dm}");

    // KTO: desirable rows first, then undesirable ones, as TRL concatenates its losses.
    let m = &r.meta["fixed"]["kto"];
    let (kc, kr) = (
        r.var("fixed.kto.policy_chosen"),
        r.var("fixed.kto.policy_rejected"),
    );
    let (nc, nr) = (kc.dim(0).unwrap(), kr.dim(0).unwrap());
    let policy = Tensor::cat(&[kc.as_tensor(), kr.as_tensor()], 0).unwrap();
    let refs = Tensor::cat(
        &[
            r.get("fixed.kto.ref_chosen"),
            r.get("fixed.kto.ref_rejected"),
        ],
        0,
    )
    .unwrap()
    .to_dtype(DType::F64)
    .unwrap();
    let desirable = Tensor::from_vec(
        (0..nc + nr)
            .map(|i| f64::from(u8::from(i < nc)))
            .collect::<Vec<_>>(),
        nc + nr,
        &Device::Cpu,
    )
    .unwrap();
    let kl = kto_kl(
        &r.get("fixed.kto.policy_kl").to_dtype(DType::F64).unwrap(),
        &r.get("fixed.kto.ref_kl").to_dtype(DType::F64).unwrap(),
    )
    .unwrap();
    let (losses, rewards) = kto_losses(
        &policy,
        &refs,
        &desirable,
        kl,
        m["beta"].as_f64().unwrap(),
        m["desirable_weight"].as_f64().unwrap(),
        m["undesirable_weight"].as_f64().unwrap(),
    )
    .unwrap();
    let loss = losses.mean_all().unwrap();
    let dl = (scalar(&loss) - m["loss"].as_f64().unwrap()).abs();
    let dk = (kl - m["kl"].as_f64().unwrap()).abs();
    let store = loss.backward().unwrap();
    let dg = grad_diff(&store, &kc, r.get("fixed.kto.grad.policy_chosen")).max(grad_diff(
        &store,
        &kr,
        r.get("fixed.kto.grad.policy_rejected"),
    ));
    let rw: Vec<f64> = rewards.to_vec1().unwrap();
    let dr = ((rw[..nc].iter().sum::<f64>() / nc as f64) - m["rewards_chosen"].as_f64().unwrap())
        .abs()
        .max(
            ((rw[nc..].iter().sum::<f64>() / nr as f64) - m["rewards_rejected"].as_f64().unwrap())
                .abs(),
        );
    report.push(format!(
        "kto: loss {dl:e}, kl {dk:e}, grad {dg:e}, rewards {dr:e}"
    ));
    assert!(kl > 0.0, "the fixture exercises a positive KL estimate");
    assert!(dl <= LOSS_TOL, "kto: loss differs by {dl}");
    assert!(dk <= 1e-6, "kto: KL differs by {dk}");
    assert!(dg <= GRAD_TOL, "kto: gradients differ by {dg}");
    assert!(dr <= 1e-6, "kto: rewards differ by {dr}");
    eprintln!("fixed log-probs vs TRL:\n  {}", report.join("\n  "));
}

fn all_targets() -> BTreeSet<String> {
    loraops_registry::peft::LINEAR_MODULES
        .iter()
        .map(|(m, _)| m.to_string())
        .collect()
}

/// The tiny model with LoRA set to the fixture's weights.
fn fixture_model(r: &Reference, dir: &Path) -> Llama {
    let mut model = Llama::load(dir, &LoadOptions::default()).unwrap();
    let l = &r.meta["lora"];
    let cfg = LoraConfig {
        r: l["r"].as_u64().unwrap() as usize,
        alpha: l["alpha"].as_f64().unwrap(),
        dropout: 0.0,
        use_rslora: false,
        targets: all_targets(),
    };
    model
        .add_lora(&cfg, &mut loraops_model::linear::lora::derived_rng(0, 0, 0))
        .unwrap();
    for (k, v) in model.lora_params() {
        v.set(r.get(&format!("lora.{k}"))).unwrap();
    }
    model
}

#[test]
fn losses_gradients_and_metrics_match_trl_on_the_tiny_model() {
    let r = reference();
    let (_tmp, dir) = tiny_model(&r.spec());
    let model = fixture_model(&r, &dir);
    let named = model.lora_params();
    let params: Vec<Var> = named.iter().map(|(_, v)| v.clone()).collect();
    let labels: Vec<bool> = r.meta["kto_labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_bool().unwrap())
        .collect();
    let mut report = Vec::new();
    for case in [
        "dpo_sigmoid",
        "dpo_robust",
        "dpo_ipo",
        "dpo_cdpo",
        "orpo",
        "kto",
    ] {
        let m = &r.meta["model"][case];
        let opts: PreferenceOptions = serde_json::from_value(m["options"].clone()).unwrap();
        let (method, rows) = match case {
            "kto" => (
                Method::Kto,
                r.rows("model.kto.completion", "model.kto.kl", Some(labels.clone())),
            ),
            "orpo" => (Method::Orpo, r.rows("model.chosen", "model.rejected", None)),
            _ => (Method::Dpo, r.rows("model.chosen", "model.rejected", None)),
        };
        let (loss, metrics) = batch_loss(&model, method, &opts, rows, 0).unwrap();
        let dl = (scalar(&loss) - m["loss"].as_f64().unwrap()).abs();
        let grads = collect_grads(&model, &loss, &params).unwrap();
        let (mut dg, mut gmax) = (0f32, 0f32);
        for ((k, _), g) in named.iter().zip(&grads) {
            let want = r.get(&format!("model.{case}.grad.{k}"));
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
        let mut dm = 0f64;
        for (k, want) in m["metrics"].as_object().unwrap() {
            let got = metrics
                .get(k)
                .unwrap_or_else(|| panic!("{case}: metric {k} is not logged"));
            dm = dm.max((got - want.as_f64().unwrap()).abs());
        }
        report.push(format!(
            "{case}: loss {:.6} diff {dl:e}, grad diff {dg:e} (largest {gmax:e}), metrics diff {dm:e}",
            scalar(&loss)
        ));
        assert!(
            gmax > 1e-4,
            "{case}: the fixture's gradients are not trivial"
        );
        assert!(dl <= LOSS_TOL, "{case}: loss differs by {dl}");
        assert!(dg <= GRAD_TOL, "{case}: gradients differ by {dg}");
        assert!(dm <= 5e-6, "{case}: metrics differ by {dm}");
    }
    eprintln!("tiny model vs TRL:\n  {}", report.join("\n  "));
}

#[test]
fn the_reference_is_the_base_without_the_adapter() {
    let r = reference();
    let (_tmp, dir) = tiny_model(&r.spec());
    let model = fixture_model(&r, &dir);
    let base = Llama::load(&dir, &LoadOptions::default()).unwrap();
    let ex = r.examples("model.chosen");
    let batch =
        loraops_trainer::data::make_batch(&ex.iter().collect::<Vec<_>>(), 0, &Device::Cpu).unwrap();
    let reference = without_adapter(&model);
    let a = reference
        .logits(&batch.input_ids, Some(&batch.attention_mask))
        .unwrap();
    let want = base
        .logits(&batch.input_ids, Some(&batch.attention_mask))
        .unwrap();
    assert_eq!(max_abs_diff(&a, &want), 0.0);
    assert!(reference.lora_params().is_empty());
    assert_eq!(
        model.lora_params().len(),
        2 * 7 * 2,
        "the policy keeps its adapter"
    );
    // The same frozen weights, not a copy.
    use loraops_model::linear::frozen::FrozenWeight;
    match (
        &model.layers[0].self_attn.q_proj.base.weight,
        &reference.layers[0].self_attn.q_proj.base.weight,
    ) {
        (FrozenWeight::Dense(a), FrozenWeight::Dense(b)) => assert_eq!(a.id(), b.id()),
        _ => panic!("an f32 base holds dense weights"),
    }
}

// ---------------------------------------------------------------------------------------
// The pipeline on a generated tiny model.

fn config(method: Method, dir: &Path, out: &Path) -> PreferenceConfig {
    let data = match method {
        Method::Kto => "kto_small.jsonl",
        _ => "dpo_small.jsonl",
    };
    PreferenceConfig {
        method,
        train: SftConfig {
            model: dir.to_path_buf(),
            data: fixtures().join(data),
            out: out.to_path_buf(),
            steps: 10,
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            lr: 2e-2,
            weight_decay: 0.0,
            batch_size: 4,
            max_len: 96,
            ..Default::default()
        },
        options: PreferenceOptions::default(),
    }
}

fn step_metrics(out: &Path) -> Vec<StepMetrics> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

#[test]
fn each_method_learns_and_writes_adapter_metrics_and_manifest() {
    let (tmp, dir) = tiny_model(&TinySpec::default());
    for method in [Method::Dpo, Method::Orpo, Method::Kto] {
        let out = tmp.path().join(method.name());
        let cfg = config(method, &dir, &out);
        let outcome = train_preference(&cfg, &Device::Cpu, &mut |_| {}).unwrap();
        assert_eq!(outcome.steps_done, 10);
        let steps = step_metrics(&out);
        assert_eq!(steps.len(), 10);
        let losses: Vec<f64> = steps.iter().map(|s| s.loss).collect();
        let names: BTreeSet<&str> = steps[0].metrics.keys().map(String::as_str).collect();
        let want: &[&str] = match method {
            Method::Dpo => &[
                "rewards/chosen",
                "rewards/rejected",
                "rewards/margins",
                "rewards/accuracies",
                "logps/chosen",
                "logps/rejected",
            ],
            Method::Orpo => &[
                "rewards/chosen",
                "rewards/margins",
                "nll_loss",
                "log_odds_ratio",
                "log_odds_chosen",
            ],
            Method::Kto => &[
                "rewards/chosen",
                "rewards/rejected",
                "rewards/margins",
                "kl",
            ],
        };
        for n in want {
            assert!(
                names.contains(n),
                "{}: {n} not logged: {names:?}",
                method.name()
            );
        }
        // A fresh adapter (B = 0) is the reference: DPO starts at log 2, KTO at 1/2.
        match method {
            Method::Dpo => assert!((losses[0] - std::f64::consts::LN_2).abs() < 1e-6),
            Method::Kto => assert!((losses[0] - 0.5).abs() < 1e-6),
            Method::Orpo => {}
        }
        let (first, last) = (mean(&losses[..3]), mean(&losses[7..]));
        eprintln!(
            "{}: loss {first:.4} -> {last:.4} ({losses:?})",
            method.name()
        );
        assert!(last < first - 0.02, "{}: {losses:?}", method.name());
        if method != Method::Kto {
            let margins: Vec<f64> = steps.iter().map(|s| s.metrics["rewards/margins"]).collect();
            assert!(mean(&margins[7..]) > mean(&margins[..3]), "{margins:?}");
        }
        let manifest: TrainingManifest =
            serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
        assert_eq!(manifest.method, method.name());
        assert_eq!(manifest.config["beta"], json!(0.1));
        assert_eq!(manifest.datasets[0].rows, 8);
        assert!(out.join("adapter_model.safetensors").exists());
        assert!(out.join("adapter_config.json").exists());
    }
}

#[test]
fn precomputed_reference_log_probs_give_the_same_run() {
    let (tmp, dir) = tiny_model(&TinySpec::default());
    for method in [Method::Dpo, Method::Kto] {
        let mut runs = Vec::new();
        for pre in [false, true] {
            let out = tmp.path().join(format!("{}-{pre}", method.name()));
            let mut cfg = config(method, &dir, &out);
            cfg.train.steps = 4;
            cfg.options.precompute_ref_log_probs = pre;
            train_preference(&cfg, &Device::Cpu, &mut |_| {}).unwrap();
            runs.push(step_metrics(&out));
        }
        for (a, b) in runs[0].iter().zip(&runs[1]) {
            assert!(
                (a.loss - b.loss).abs() < 1e-5,
                "{} {} vs {}",
                method.name(),
                a.loss,
                b.loss
            );
            for (k, v) in &a.metrics {
                assert!(
                    (v - b.metrics[k]).abs() < 1e-4,
                    "{k}: {v} vs {}",
                    b.metrics[k]
                );
            }
        }
    }
}

#[test]
fn accumulation_equals_one_big_batch() {
    let (tmp, dir) = tiny_model(&TinySpec::default());
    for method in [Method::Dpo, Method::Orpo, Method::Kto] {
        let mut runs = Vec::new();
        for (bs, accum) in [(4, 1), (2, 2)] {
            let out = tmp.path().join(format!("{}-{bs}", method.name()));
            let mut cfg = config(method, &dir, &out);
            cfg.train.steps = 2;
            cfg.train.batch_size = bs;
            cfg.train.grad_accum = accum;
            train_preference(&cfg, &Device::Cpu, &mut |_| {}).unwrap();
            runs.push(step_metrics(&out));
        }
        // KTO's KL estimate is per micro-batch (as TRL's), so only its first step (with a
        // zero KL from the fresh adapter) must agree exactly.
        let n = if method == Method::Kto { 1 } else { 2 };
        for (a, b) in runs[0].iter().zip(&runs[1]).take(n) {
            assert!(
                (a.loss - b.loss).abs() < 1e-5 && (a.grad_norm - b.grad_norm).abs() < 1e-4,
                "{}: {a:?} vs {b:?}",
                method.name()
            );
        }
    }
}

#[test]
fn nf4_base_validation_and_early_stopping() {
    let (tmp, dir) = tiny_model(&TinySpec::default());
    let out = tmp.path().join("nf4");
    let mut cfg = config(Method::Dpo, &dir, &out);
    cfg.train.quantize = "nf4".into();
    cfg.train.val_data = Some(fixtures().join("dpo_small.jsonl"));
    cfg.train.eval_every = 1;
    cfg.train.patience = 2;
    cfg.train.lr = 0.5;
    cfg.train.steps = 30;
    cfg.options.loss_type = DpoLoss::Ipo;
    cfg.options.beta = 0.5;
    let mut evals = Vec::new();
    let mut stopped = false;
    let outcome = train_preference(&cfg, &Device::Cpu, &mut |e| match e {
        loraops_trainer::sft::Event::Eval { val_loss, .. } => evals.push(val_loss),
        loraops_trainer::sft::Event::EarlyStop { .. } => stopped = true,
        _ => {}
    })
    .unwrap();
    assert!(!evals.is_empty());
    let best = evals.iter().cloned().fold(f64::INFINITY, f64::min);
    assert_eq!(outcome.best_val_loss, Some(best));
    if stopped {
        assert!(outcome.steps_done < 30);
    }
    let manifest: TrainingManifest =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest.config["quantize"], json!("nf4"));
    assert_eq!(manifest.config["loss_type"], json!("ipo"));
    assert_eq!(manifest.datasets.len(), 2);
}

#[test]
fn a_resumed_run_continues_exactly() {
    let (tmp, dir) = tiny_model(&TinySpec::default());
    let whole = tmp.path().join("whole");
    let cfg = {
        let mut c = config(Method::Kto, &dir, &whole);
        c.train.steps = 4;
        c.train.batch_size = 2;
        c
    };
    train_preference(&cfg, &Device::Cpu, &mut |_| {}).unwrap();
    let split = tmp.path().join("split");
    let mut c = cfg.clone();
    c.train.out = split.clone();
    c.train.stop_after = Some(2);
    train_preference(&c, &Device::Cpu, &mut |_| {}).unwrap();
    c.train.stop_after = None;
    c.train.resume = true;
    train_preference(&c, &Device::Cpu, &mut |_| {}).unwrap();
    let (a, b) = (step_metrics(&whole), step_metrics(&split));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert!((x.loss - y.loss).abs() < 1e-6, "{} vs {}", x.loss, y.loss);
    }
    assert_eq!(
        std::fs::read(whole.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(split.join("adapter_model.safetensors")).unwrap()
    );
}

// ---------------------------------------------------------------------------------------
// Data.

fn labelled(tok: &Tokenizer, e: &Example) -> String {
    let ids: Vec<u32> = e
        .ids
        .iter()
        .zip(&e.labels)
        .filter(|(_, l)| **l != IGNORE)
        .map(|(i, _)| *i)
        .collect();
    tok.decode(&ids).unwrap()
}

fn write(tmp: &Path, name: &str, rows: &[Value]) -> std::path::PathBuf {
    let p = tmp.join(name);
    let text: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
    std::fs::write(&p, text.join("\n")).unwrap();
    p
}

#[test]
fn prompt_tokens_are_masked_in_strings_messages_and_implicit_prompts() {
    let (tmp, dir) = tiny_model(&TinySpec::default());
    let tok = Tokenizer::load(&dir).unwrap();
    let (rows, stats) = load_pairs(&fixtures().join("dpo_small.jsonl"), &tok, 512).unwrap();
    assert_eq!((stats.rows, stats.kept), (8, 8));
    assert_eq!(labelled(&tok, &rows[1].seqs[0]), " das Meer<|im_end|>");
    assert_eq!(labelled(&tok, &rows[1].seqs[1]), " la mer<|im_end|>");
    // Message lists: the template's assistant turn only, the prompt (system + user) masked.
    assert_eq!(
        labelled(&tok, &rows[5].seqs[0]),
        "Yes, water makes things wet.<|im_end|>\n"
    );
    let full = tok.decode(&rows[5].seqs[0].ids).unwrap();
    assert!(full.contains("<|im_start|>user\nIs water wet?"), "{full}");
    // No "prompt": the shared first messages are the prompt.
    assert_eq!(labelled(&tok, &rows[6].seqs[0]), "7 is larger.<|im_end|>\n");
    assert_eq!(labelled(&tok, &rows[6].seqs[1]), "3 is larger.<|im_end|>\n");
    // The two sequences of a pair share the prompt.
    let p = |e: &Example| e.labels.iter().position(|&l| l != IGNORE).unwrap();
    for r in &rows {
        let (a, b) = (&r.seqs[0], &r.seqs[1]);
        assert_eq!(a.ids[..p(a)], b.ids[..p(b)]);
    }

    // KTO: the KL sequence is the prompt with the previous row's completion.
    let (rows, _) = load_kto(&fixtures().join("kto_small.jsonl"), &tok, 512, true).unwrap();
    assert_eq!(rows.len(), 8);
    assert_eq!(labelled(&tok, &rows[2].seqs[0]), " das Meer<|im_end|>");
    assert_eq!(
        labelled(&tok, &rows[2].seqs[1]),
        " I think it is Rome.<|im_end|>"
    );
    assert_eq!(labelled(&tok, &rows[0].seqs[1]), " warm soup.<|im_end|>");
    assert_eq!(
        rows.iter().map(|r| r.desirable).collect::<Vec<_>>(),
        [true, false, true, false, true, false, true, false]
    );

    // Truncation that leaves a pair without completion tokens: counted, not kept.
    let p = write(
        tmp.path(),
        "long.jsonl",
        &[
            json!({"prompt": "word ".repeat(100), "chosen": " a", "rejected": " b"}),
            json!({"prompt": "x", "chosen": " a", "rejected": " b"}),
        ],
    );
    let (rows, stats) = load_pairs(&p, &tok, 32).unwrap();
    assert_eq!(
        (rows.len(), stats.no_completion, stats.truncated),
        (1, 1, 1)
    );
    assert_eq!(stats.no_completion_lines, vec![1]);
}

#[test]
fn bad_preference_data_is_an_error_naming_the_row() {
    let (tmp, dir) = tiny_model(&TinySpec::default());
    let tok = Tokenizer::load(&dir).unwrap();
    let line_of = |e: Error| match e {
        Error::Data { line, message, .. } => (line, message),
        other => panic!("expected a data error, got {other}"),
    };
    let p = write(
        tmp.path(),
        "same.jsonl",
        &[
            json!({"prompt": "a", "chosen": " yes", "rejected": " no"}),
            json!({"prompt": "b", "chosen": " same", "rejected": " same"}),
        ],
    );
    let (line, msg) = line_of(load_pairs(&p, &tok, 64).unwrap_err());
    assert_eq!(line, 2);
    assert!(msg.contains("chosen and rejected are identical"), "{msg}");
    // Equal after the chat template too (message lists with the same content).
    let p = write(
        tmp.path(),
        "same2.jsonl",
        &[json!({"prompt": [{"role": "user", "content": "q"}],
                 "chosen": [{"role": "assistant", "content": "x"}],
                 "rejected": [{"role": "assistant", "content": "x"}]})],
    );
    assert_eq!(line_of(load_pairs(&p, &tok, 64).unwrap_err()).0, 1);

    let p = write(
        tmp.path(),
        "one_label.jsonl",
        &[
            json!({"prompt": "a", "completion": " x", "label": true}),
            json!({"prompt": "b", "completion": " y", "label": true}),
        ],
    );
    let (line, msg) = line_of(load_kto(&p, &tok, 64, true).unwrap_err());
    assert_eq!(line, 1);
    assert!(
        msg.contains("labelled true") && msg.contains("both desirable"),
        "{msg}"
    );

    let p = write(
        tmp.path(),
        "bad_label.jsonl",
        &[json!({"prompt": "a", "completion": " x", "label": "yes"})],
    );
    assert!(
        line_of(load_kto(&p, &tok, 64, true).unwrap_err())
            .1
            .contains("\"label\"")
    );
    let p = write(
        tmp.path(),
        "mixed.jsonl",
        &[
            json!({"prompt": "a", "chosen": [{"role": "assistant", "content": "x"}], "rejected": " y"}),
        ],
    );
    let msg = line_of(load_pairs(&p, &tok, 64).unwrap_err()).1;
    assert!(msg.contains("both strings or both message lists"), "{msg}");
    let p = write(
        tmp.path(),
        "sft.jsonl",
        &[json!({"prompt": "a", "completion": " x"})],
    );
    let msg = line_of(load_pairs(&p, &tok, 64).unwrap_err()).1;
    assert!(msg.contains("\"chosen\" is missing"), "{msg}");

    // Through the trainer: the error surfaces before any training.
    let out = tmp.path().join("out");
    let mut cfg = config(Method::Kto, &dir, &out);
    cfg.train.data = tmp.path().join("one_label.jsonl");
    let e = train_preference(&cfg, &Device::Cpu, &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("line 1"), "{e}");
}

#[test]
fn the_base_format_and_targets_of_sft_apply() {
    // An NF4 (double-quantised) base with LoRA on two modules only, bf16 not involved.
    let (tmp, dir) = tiny_model(&TinySpec::default());
    let out = tmp.path().join("orpo-nf4");
    let mut cfg = config(Method::Orpo, &dir, &out);
    cfg.train.quantize = "nf4".into();
    cfg.train.targets = vec!["q_proj".into(), "v_proj".into()];
    cfg.train.steps = 2;
    cfg.train.activation_checkpointing = true;
    train_preference(&cfg, &Device::Cpu, &mut |_| {}).unwrap();
    let acfg: Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(acfg["target_modules"], json!(["q_proj", "v_proj"]));
    let model = Llama::load(
        &dir,
        &LoadOptions {
            format: BaseFormat::Nf4,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(model.lora_params().is_empty());
}

#[test]
fn a_row_of_weight_zero_adds_nothing_to_the_loss_or_gradients() {
    let r = reference();
    let spec = r.spec();
    let (_tmp, dir) = tiny_model(&spec);
    let model = fixture_model(&r, &dir);
    let params: Vec<Var> = model.lora_params().into_iter().map(|(_, v)| v).collect();
    let labels: Vec<bool> = r.meta["kto_labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_bool().unwrap())
        .collect();
    // Other tokens, same lengths and masks: every normaliser stays the same.
    let scramble = |row: &mut PreferenceRow| {
        for s in &mut row.seqs {
            for (id, l) in s.ids.iter_mut().zip(s.labels.iter_mut()) {
                *id = 3 + (*id - 3 + 1) % (spec.vocab as u32 - 3);
                if *l != IGNORE {
                    *l = *id as i64;
                }
            }
        }
    };
    for (method, rows) in [
        (Method::Dpo, r.rows("model.chosen", "model.rejected", None)),
        (Method::Orpo, r.rows("model.chosen", "model.rejected", None)),
        (
            Method::Kto,
            r.rows("model.kto.completion", "model.kto.kl", Some(labels.clone())),
        ),
    ] {
        let opts = PreferenceOptions::default();
        let run = |weight: f64, scrambled: bool| -> (f64, Vec<Tensor>) {
            let mut rows = rows.clone();
            rows[1].weight = weight;
            if scrambled {
                scramble(&mut rows[1]);
            }
            let (loss, _) = batch_loss(&model, method, &opts, rows, 0).unwrap();
            let g = collect_grads(&model, &loss, &params).unwrap();
            (scalar(&loss), g)
        };
        let grad_diff = |a: &[Tensor], b: &[Tensor]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| max_abs_diff(x, y))
                .fold(0f32, f32::max)
        };
        let name = method.name();
        let (l0, g0) = run(0.0, false);
        let (l0s, g0s) = run(0.0, true);
        assert!((l0 - l0s).abs() < 1e-9, "{name}: {l0} vs {l0s}");
        assert!(grad_diff(&g0, &g0s) < 1e-9, "{name}");
        // At weight 1 the row counts: its tokens change the loss.
        let (l1, g1) = run(1.0, false);
        let (l1s, _) = run(1.0, true);
        assert!((l1 - l1s).abs() > 1e-4, "{name}: {l1} vs {l1s}");
        if method != Method::Kto {
            // The row's share is linear in its weight (KTO's KL estimate is weighted too).
            let (l2, g2) = run(2.0, false);
            assert!(((l2 - l1) - (l1 - l0)).abs() < 1e-6, "{name}");
            let second: Vec<Tensor> = g2.iter().zip(&g1).map(|(a, b)| (a - b).unwrap()).collect();
            let first: Vec<Tensor> = g1.iter().zip(&g0).map(|(a, b)| (a - b).unwrap()).collect();
            assert!(grad_diff(&second, &first) < 1e-6, "{name}");
        }
    }
}

#[test]
fn dpo_from_an_adapter_matches_trl_with_a_peft_model() {
    // TRL's DPOTrainer, given a PeftModel whose adapter is the starting point, copies it into
    // a frozen "ref" adapter: the reference is the base with that adapter. Here the starting
    // adapter is the fixture's LoRA and the reference its frozen copy.
    let r = reference();
    let (_tmp, dir) = tiny_model(&r.spec());
    let model = fixture_model(&r, &dir);
    let reference = loraops_trainer::init::frozen_copy(&model).unwrap();
    let named = model.lora_params();
    let params: Vec<Var> = named.iter().map(|(_, v)| v.clone()).collect();
    let mut report = Vec::new();
    for case in ["dpo_from_adapter_start", "dpo_from_adapter"] {
        if case == "dpo_from_adapter" {
            // The policy after some training; the reference stays where it started.
            for (k, v) in &named {
                v.set(r.get(&format!("dpo_from_adapter.policy.{k}")))
                    .unwrap();
            }
        }
        let m = &r.meta["model"][case];
        let opts: PreferenceOptions = serde_json::from_value(m["options"].clone()).unwrap();
        let rows = r.rows("model.chosen", "model.rejected", None);
        let (loss, metrics) = loraops_trainer::preference::batch_loss_against(
            &model,
            Some(reference.clone()),
            Method::Dpo,
            &opts,
            rows,
            0,
        )
        .unwrap();
        let dl = (scalar(&loss) - m["loss"].as_f64().unwrap()).abs();
        let grads = collect_grads(&model, &loss, &params).unwrap();
        let (mut dg, mut gmax) = (0f32, 0f32);
        for ((k, _), g) in named.iter().zip(&grads) {
            let want = r.get(&format!("model.{case}.grad.{k}"));
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
        let mut dm = 0f64;
        for (k, want) in m["metrics"].as_object().unwrap() {
            dm = dm.max((metrics[k] - want.as_f64().unwrap()).abs());
        }
        report.push(format!(
            "{case}: loss {:.6} diff {dl:e}, grad diff {dg:e} (largest {gmax:e}), metrics diff {dm:e}",
            scalar(&loss)
        ));
        assert!(
            gmax > 1e-4,
            "{case}: the fixture's gradients are not trivial"
        );
        assert!(dl <= LOSS_TOL, "{case}: loss differs by {dl}");
        assert!(dg <= GRAD_TOL, "{case}: gradients differ by {dg}");
        assert!(dm <= 5e-6, "{case}: metrics differ by {dm}");
        if case == "dpo_from_adapter_start" {
            assert!((scalar(&loss) - std::f64::consts::LN_2).abs() < 1e-7);
        }
    }
    eprintln!("DPO from an adapter vs TRL:\n  {}", report.join("\n  "));
}
