//! The workflows teams run on top of one training loop: continuing from an adapter (SFT, then
//! DPO, ORPO or KTO from it), learning-rate schedules, keeping the best adapter by validation
//! loss, and per-row weights in preference data.

use std::path::Path;

use candle_core::{Device, Tensor};
use loraops_model::llama::{Llama, LoadOptions};
use loraops_model::tiny::TinySpec;
use loraops_model::tokenizer::Tokenizer;
use loraops_registry::api::TrainingManifest;
use loraops_trainer::Error;
use loraops_trainer::data::load_sft;
use loraops_trainer::init::{InitAdapter, dir_digest, fill_lora_settings, frozen_copy};
use loraops_trainer::optim::LrScheduler;
use loraops_trainer::preference::{
    Method, PreferenceConfig, PreferenceOptions, load_kto, load_pairs, train_preference,
};
use loraops_trainer::sft::{Event, SaveBest, SftConfig, StepMetrics, eval_loss, train_sft};
use serde_json::{Value, json};

use crate::common::{fixtures, max_abs_diff, tiny_model};

fn sft_config(dir: &Path, out: &Path) -> SftConfig {
    SftConfig {
        model: dir.to_path_buf(),
        data: fixtures().join("sft_small.jsonl"),
        out: out.to_path_buf(),
        steps: 8,
        r: 8,
        alpha: 16.0,
        dropout: 0.0,
        lr: 3e-2,
        weight_decay: 0.0,
        batch_size: 4,
        max_len: 96,
        ..Default::default()
    }
}

fn pref_config(method: Method, dir: &Path, out: &Path) -> PreferenceConfig {
    let data = match method {
        Method::Kto => "kto_small.jsonl",
        _ => "dpo_small.jsonl",
    };
    PreferenceConfig {
        method,
        train: SftConfig {
            data: fixtures().join(data),
            steps: 4,
            lr: 2e-2,
            ..sft_config(dir, out)
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

fn manifest(out: &Path) -> TrainingManifest {
    serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap()
}

fn adapter_tensors(dir: &Path) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap()
}

/// An SFT adapter on the tiny model (r 8, alpha 16, all linear modules).
fn sft_adapter(dir: &Path, out: &Path) {
    train_sft(&sft_config(dir, out), &Device::Cpu, &mut |_| {}).unwrap();
}

#[test]
fn dpo_from_an_sft_adapter_starts_at_ln2_against_that_adapter() {
    let (tmp, dir) = tiny_model(&TinySpec::default());
    let sft = tmp.path().join("sft");
    sft_adapter(&dir, &sft);

    let mut runs = Vec::new();
    for init in [false, true] {
        let out = tmp.path().join(format!("dpo-{init}"));
        let mut cfg = pref_config(Method::Dpo, &dir, &out);
        if init {
            cfg.train.init_adapter = Some(sft.display().to_string());
        }
        train_preference(&cfg, &Device::Cpu, &mut |_| {}).unwrap();
        runs.push((out.clone(), step_metrics(&out)));
    }
    let (fresh, from_sft) = (&runs[0].1, &runs[1].1);
    // Policy and reference are the same model at the first step, with or without an adapter
    // to start from: loss ln 2, rewards 0 (as TRL's first step).
    for steps in [fresh, from_sft] {
        assert!(
            (steps[0].loss - std::f64::consts::LN_2).abs() < 1e-6,
            "{}",
            steps[0].loss
        );
        assert_eq!(steps[0].metrics["rewards/chosen"], 0.0);
        assert_eq!(steps[0].metrics["rewards/margins"], 0.0);
    }
    // But the policy is the SFT adapter, not the base: other log-probs, another run.
    let lp = |s: &[StepMetrics]| s[0].metrics["logps/chosen"];
    assert!(
        (lp(fresh) - lp(from_sft)).abs() > 1e-2,
        "{} vs {}",
        lp(fresh),
        lp(from_sft)
    );
    assert!(
        (fresh[3].loss - from_sft[3].loss).abs() > 1e-6,
        "{fresh:?} vs {from_sft:?}"
    );
    // The reference stays the SFT adapter: the rewards move away from 0 as the policy learns.
    assert!(from_sft[3].metrics["rewards/margins"] > 0.0, "{from_sft:?}");

    // The manifest names the parent by path and digest (the digest a push would give it).
    let m = manifest(&runs[1].0);
    assert_eq!(
        m.extra["parent"],
        json!({"path": sft.display().to_string(), "digest": dir_digest(&sft).unwrap()})
    );
    assert_eq!(m.config["init_adapter"], json!(sft.display().to_string()));
    assert!(!manifest(&runs[0].0).extra.contains_key("parent"));
    let acfg: Value =
        serde_json::from_slice(&std::fs::read(runs[1].0.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        (acfg["r"].clone(), acfg["lora_alpha"].clone()),
        (json!(8), json!(16.0))
    );
}

#[test]
fn kto_and_orpo_continue_from_an_adapter_too() {
    let (tmp, dir) = tiny_model(&TinySpec::default());
    let sft = tmp.path().join("sft");
    sft_adapter(&dir, &sft);
    for method in [Method::Kto, Method::Orpo] {
        let mut first = Vec::new();
        for init in [false, true] {
            let out = tmp.path().join(format!("{}-{init}", method.name()));
            let mut cfg = pref_config(method, &dir, &out);
            cfg.train.steps = 2;
            if init {
                cfg.train.init_adapter = Some(sft.display().to_string());
            }
            train_preference(&cfg, &Device::Cpu, &mut |_| {}).unwrap();
            first.push(step_metrics(&out)[0].clone());
        }
        if method == Method::Kto {
            // The reference is the SFT adapter: KL 0 and loss 1/2 at the first step.
            assert!((first[1].loss - 0.5).abs() < 1e-6, "{:?}", first[1]);
            assert_eq!(first[1].metrics["kl"], 0.0);
        }
        assert!(
            (first[0].metrics["logps/chosen"] - first[1].metrics["logps/chosen"]).abs() > 1e-2,
            "{}: {first:?}",
            method.name()
        );
    }
}

#[test]
fn an_init_adapter_is_continued_exactly_and_its_settings_are_the_runs() {
    let (tmp, dir) = tiny_model(&TinySpec::default());
    let sft = tmp.path().join("sft");
    sft_adapter(&dir, &sft);

    // A zero learning rate writes the adapter it started from, value for value.
    let out = tmp.path().join("again");
    let cfg = SftConfig {
        init_adapter: Some(sft.display().to_string()),
        lr: 0.0,
        steps: 1,
        ..sft_config(&dir, &out)
    };
    train_sft(&cfg, &Device::Cpu, &mut |_| {}).unwrap();
    let (a, b) = (adapter_tensors(&sft), adapter_tensors(&out));
    assert_eq!(a.len(), b.len());
    for (k, t) in &a {
        assert_eq!(max_abs_diff(t, &b[k]), 0.0, "{k}");
    }
    // Continued SFT starts where the adapter is: lower loss than a fresh adapter.
    let fresh = tmp.path().join("fresh");
    train_sft(
        &SftConfig {
            steps: 1,
            ..sft_config(&dir, &fresh)
        },
        &Device::Cpu,
        &mut |_| {},
    )
    .unwrap();
    assert!(step_metrics(&out)[0].loss < step_metrics(&fresh)[0].loss - 0.1);

    // The adapter's settings fill what the table leaves out and keep what it sets.
    let mut table = serde_json::Map::new();
    table.insert("r".into(), json!(4));
    fill_lora_settings(&mut table, &sft).unwrap();
    assert_eq!(table["r"], json!(4));
    assert_eq!(table["alpha"], json!(16.0));
    assert_eq!(table["use_rslora"], json!(false));
    assert_eq!(table["targets"].as_array().unwrap().len(), 7);

    // Settings that differ from the adapter's are refused, naming them.
    for (patch, want) in [
        (
            SftConfig {
                r: 4,
                ..cfg.clone()
            },
            "r 8 (this run: 4)",
        ),
        (
            SftConfig {
                alpha: 32.0,
                ..cfg.clone()
            },
            "alpha 16 (this run: 32)",
        ),
        (
            SftConfig {
                targets: vec!["q_proj".into(), "v_proj".into()],
                ..cfg.clone()
            },
            "(this run: q_proj,v_proj)",
        ),
    ] {
        let e = train_sft(&patch, &Device::Cpu, &mut |_| {}).unwrap_err();
        assert!(matches!(e, Error::Config(_)), "{e}");
        assert!(e.to_string().contains(want), "{e}");
        assert!(e.to_string().contains(&sft.display().to_string()), "{e}");
    }
    // A missing directory, or a registry version without the CLI to pull it.
    for (init, want) in [
        ("/nonexistent/adapter", "no such directory"),
        ("helpdesk@3", "pulled by `loraops train`"),
    ] {
        let e = train_sft(
            &SftConfig {
                init_adapter: Some(init.into()),
                ..cfg.clone()
            },
            &Device::Cpu,
            &mut |_| {},
        )
        .unwrap_err();
        assert!(e.to_string().contains(want), "{e}");
    }
    let e = InitAdapter::from_dir(&dir).unwrap_err();
    assert!(e.to_string().contains("not an adapter directory"), "{e}");
}

#[test]
fn the_reference_of_a_continued_run_is_the_adapter_frozen() {
    let (tmp, dir) = tiny_model(&TinySpec::default());
    let sft = tmp.path().join("sft");
    sft_adapter(&dir, &sft);
    let mut model = Llama::load(&dir, &LoadOptions::default()).unwrap();
    loraops_model::adapter::load_adapter(&sft, &mut model).unwrap();
    let ids = Tensor::new(&[[1u32, 50, 99, 7, 300, 2]], &Device::Cpu).unwrap();
    let reference = frozen_copy(&model).unwrap();
    let before = model.logits(&ids, None).unwrap();
    assert_eq!(
        max_abs_diff(&reference.logits(&ids, None).unwrap(), &before),
        0.0
    );
    // Training moves the policy's weights; the reference keeps the starting ones.
    for (_, v) in model.lora_params() {
        v.set(&(v.as_tensor() * 2.0).unwrap()).unwrap();
    }
    assert!(max_abs_diff(&model.logits(&ids, None).unwrap(), &before) > 1e-3);
    assert_eq!(
        max_abs_diff(&reference.logits(&ids, None).unwrap(), &before),
        0.0
    );
}

#[test]
fn a_continued_preference_run_resumes_exactly() {
    let (tmp, dir) = tiny_model(&TinySpec::default());
    let sft = tmp.path().join("sft");
    sft_adapter(&dir, &sft);
    let whole = tmp.path().join("whole");
    let mut cfg = pref_config(Method::Dpo, &dir, &whole);
    cfg.train.init_adapter = Some(sft.display().to_string());
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
        // The reference after resuming is still the SFT adapter, not the checkpoint's.
        assert!((x.loss - y.loss).abs() < 1e-6, "{} vs {}", x.loss, y.loss);
    }
    assert_eq!(
        std::fs::read(whole.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(split.join("adapter_model.safetensors")).unwrap()
    );
}

// ---------------------------------------------------------------------------------------
// Learning-rate schedules.

#[test]
fn each_schedule_sets_the_learning_rate_of_each_update() {
    let (tmp, dir) = tiny_model(&TinySpec::default());
    let peak = 1e-2;
    for (name, sched) in [
        ("constant", LrScheduler::Constant),
        ("constant_with_warmup", LrScheduler::ConstantWithWarmup),
        ("linear", LrScheduler::Linear),
        ("cosine", LrScheduler::Cosine),
        ("cosine_with_min_lr", LrScheduler::CosineWithMinLr),
    ] {
        let out = tmp.path().join(name);
        let mut cfg = SftConfig {
            steps: 6,
            lr: peak,
            lr_scheduler: sched,
            warmup_steps: 2,
            ..sft_config(&dir, &out)
        };
        if sched == LrScheduler::Constant {
            cfg.warmup_steps = 0;
        }
        if sched == LrScheduler::CosineWithMinLr {
            cfg.min_lr_rate = Some(0.1);
        }
        // The configuration table names it as transformers does.
        let parsed: SftConfig = serde_json::from_value(json!({"lr_scheduler": name})).unwrap();
        assert_eq!(parsed.lr_scheduler, sched);
        train_sft(&cfg, &Device::Cpu, &mut |_| {}).unwrap();
        let lrs: Vec<f64> = step_metrics(&out).iter().map(|m| m.lr).collect();
        // Worked out by hand from transformers' lr_lambda: warm-up 0, 1/2; then 4 updates.
        let want: Vec<f64> = match sched {
            LrScheduler::Constant => vec![1.0; 6],
            LrScheduler::ConstantWithWarmup => vec![0.0, 0.5, 1.0, 1.0, 1.0, 1.0],
            LrScheduler::Linear => vec![0.0, 0.5, 1.0, 0.75, 0.5, 0.25],
            LrScheduler::Cosine => {
                let s = 0.5f64.sqrt();
                vec![0.0, 0.5, 1.0, 0.5 + s / 2.0, 0.5, 0.5 - s / 2.0]
            }
            LrScheduler::CosineWithMinLr => {
                let s = 0.5f64.sqrt();
                [0.5 + s / 2.0, 0.5, 0.5 - s / 2.0]
                    .iter()
                    .fold(vec![0.0, 0.5, 1.0], |mut v, c| {
                        v.push(c * 0.9 + 0.1);
                        v
                    })
            }
        };
        for (got, w) in lrs.iter().zip(&want) {
            assert!(
                (got - peak * w).abs() < 1e-12,
                "{name}: {lrs:?} vs {want:?}"
            );
        }
        assert_eq!(manifest(&out).config["lr_scheduler"], json!(name));
    }
    // Settings that cannot apply are refused.
    for (patch, want) in [
        (
            json!({"lr_scheduler": "cosine_with_min_lr"}),
            "needs min_lr_rate",
        ),
        (
            json!({"lr_scheduler": "cosine", "min_lr_rate": 0.1}),
            "min_lr_rate applies to lr_scheduler cosine_with_min_lr",
        ),
        (
            json!({"lr_scheduler": "constant", "warmup_steps": 3}),
            "constant_with_warmup",
        ),
        (
            json!({"lr_scheduler": "cosine_with_min_lr", "min_lr_rate": 1.5}),
            "min_lr_rate must be in [0, 1]",
        ),
    ] {
        let mut t = json!({"model": "m", "data": "d", "out": "o"});
        t.as_object_mut()
            .unwrap()
            .extend(patch.as_object().unwrap().clone());
        let cfg: SftConfig = serde_json::from_value(t).unwrap();
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
    assert!(serde_json::from_value::<SftConfig>(json!({"lr_scheduler": "polynomial"})).is_err());
}

// ---------------------------------------------------------------------------------------
// The best adapter by validation loss.

/// The validation loss of the adapter written to `out`.
fn written_val_loss(dir: &Path, out: &Path, val: &Path) -> f64 {
    let mut model = Llama::load(dir, &LoadOptions::default()).unwrap();
    loraops_model::adapter::load_adapter(out, &mut model).unwrap();
    let tok = Tokenizer::load(dir).unwrap();
    let (rows, _) = load_sft(val, &tok, 96).unwrap();
    eval_loss(&model, &rows, 4, tok.pad_id, 0.0).unwrap()
}

#[test]
fn save_best_writes_the_adapter_of_the_best_validation_and_names_its_step() {
    let (tmp, dir) = tiny_model(&TinySpec::default());
    // Held-out rows unlike the training rows: a long run overfits, and their loss rises.
    let val = write_rows(
        tmp.path(),
        "val.jsonl",
        &[
            json!({"prompt": "Name a colour of the sky.", "completion": " Blue."}),
            json!({"prompt": "What do bees make?", "completion": " Honey."}),
            json!({"prompt": "How many legs has a cat?", "completion": " Four."}),
            json!({"prompt": "Opposite of hot?", "completion": " Cold."}),
        ],
    );
    // A high learning rate, kept constant (the same updates whatever the length of the run).
    let diverging = |out: &Path| SftConfig {
        steps: 20,
        lr_scheduler: LrScheduler::Constant,
        r: 4,
        alpha: 8.0,
        lr: 0.1,
        batch_size: 2,
        max_grad_norm: 0.0,
        val_data: Some(val.clone()),
        eval_every: 1,
        ..sft_config(&dir, out)
    };
    let out = tmp.path().join("best");
    let cfg = SftConfig {
        save_best: Some(SaveBest::EvalLoss),
        patience: 4,
        ..diverging(&out)
    };
    let mut evals: Vec<(usize, f64)> = Vec::new();
    let mut stopped = None;
    let o = train_sft(&cfg, &Device::Cpu, &mut |e| match e {
        Event::Eval { step, val_loss } => evals.push((step, val_loss)),
        Event::EarlyStop { step, .. } => stopped = Some(step),
        _ => {}
    })
    .unwrap();
    let (best_step, best) = evals
        .iter()
        .cloned()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap();
    let last = evals.last().unwrap().1;
    eprintln!("validation losses: {evals:?}");
    assert!(last > best + 1e-3, "the run must get worse: {evals:?}");
    assert_eq!(stopped, Some(best_step + 4), "{evals:?}");
    assert_eq!(o.best_val_loss, Some(best));
    let m = manifest(&out);
    assert_eq!(m.extra["best_step"], json!(best_step));
    assert_eq!(m.extra["adapter_selected"], json!("best_val_loss"));
    assert_eq!(m.extra["stopped_early"], json!(true));
    assert_eq!(m.config["save_best"], json!("eval_loss"));
    let written = written_val_loss(&dir, &out, &val);
    assert!((written - best).abs() < 1e-5, "{written} vs best {best}");

    // `last`: the adapter of the last update, whatever the validation said.
    let out = tmp.path().join("last");
    let cfg = SftConfig {
        save_best: Some(SaveBest::Last),
        ..diverging(&out)
    };
    let mut evals = Vec::new();
    train_sft(&cfg, &Device::Cpu, &mut |e| {
        if let Event::Eval { val_loss, .. } = e {
            evals.push(val_loss)
        }
    })
    .unwrap();
    let written = written_val_loss(&dir, &out, &val);
    assert!((written - evals.last().unwrap()).abs() < 1e-5);
    let m = manifest(&out);
    assert_eq!(m.extra["adapter_selected"], json!("final"));
    assert!(!m.extra.contains_key("best_step"));

    // The best adapter survives a stop and a resume.
    let whole = tmp.path().join("whole");
    let split = tmp.path().join("split");
    let base = SftConfig {
        save_best: Some(SaveBest::EvalLoss),
        ..diverging(&whole)
    };
    train_sft(&base, &Device::Cpu, &mut |_| {}).unwrap();
    let best_step = manifest(&whole).extra["best_step"].as_u64().unwrap() as usize;
    assert!(best_step < base.steps, "the best is not the last update");
    // Stopped after the best: only the checkpoint knows it.
    let part = SftConfig {
        out: split.clone(),
        stop_after: Some(best_step + 1),
        ..base.clone()
    };
    train_sft(&part, &Device::Cpu, &mut |_| {}).unwrap();
    let rest = SftConfig {
        out: split.clone(),
        resume: true,
        ..base.clone()
    };
    train_sft(&rest, &Device::Cpu, &mut |_| {}).unwrap();
    assert_eq!(
        std::fs::read(whole.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(split.join("adapter_model.safetensors")).unwrap()
    );
    assert_eq!(
        manifest(&whole).extra["best_step"],
        manifest(&split).extra["best_step"]
    );

    // Selecting or stopping on validation loss needs validation data.
    for cfg in [
        SftConfig {
            save_best: Some(SaveBest::EvalLoss),
            ..sft_config(&dir, &out)
        },
        SftConfig {
            patience: 2,
            ..sft_config(&dir, &out)
        },
    ] {
        let e = train_sft(&cfg, &Device::Cpu, &mut |_| {}).unwrap_err();
        assert!(e.to_string().contains("needs validation data"), "{e}");
    }
}

// ---------------------------------------------------------------------------------------
// Per-row weights in preference data.

fn write_rows(dir: &Path, name: &str, rows: &[Value]) -> std::path::PathBuf {
    let p = dir.join(name);
    let text: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
    std::fs::write(&p, text.join("\n")).unwrap();
    p
}

/// The weights `loraops data curate` writes (its judge's down-weighting) are what an SFT run
/// trains with.
#[test]
fn sft_rows_read_the_weight_curation_writes() {
    let (tmp, dir) = tiny_model(&TinySpec::default());
    let tok = Tokenizer::load(&dir).unwrap();
    let p = write_rows(
        tmp.path(),
        "train.jsonl",
        &[
            json!({"prompt": "a b", "completion": " c", "weight": 0.25}),
            json!({"instruction": "a", "output": "b", "weight": 0.5}),
            json!({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
        ],
    );
    let (examples, _) = load_sft(&p, &tok, 128).unwrap();
    let w: Vec<f32> = examples.iter().map(|e| e.weight).collect();
    assert_eq!(w, [0.25, 0.5, 1.0]);
}

#[test]
fn preference_and_kto_rows_read_their_weight() {
    let (tmp, dir) = tiny_model(&TinySpec::default());
    let tok = Tokenizer::load(&dir).unwrap();
    let p = write_rows(
        tmp.path(),
        "pairs.jsonl",
        &[
            json!({"prompt": "a", "chosen": " x", "rejected": " y", "weight": 0.25}),
            json!({"prompt": "b", "chosen": " x", "rejected": " y"}),
            json!({"prompt": "c", "chosen": " x", "rejected": " y", "weight": 0}),
        ],
    );
    let (rows, _) = load_pairs(&p, &tok, 64).unwrap();
    assert_eq!(
        rows.iter().map(|r| r.weight).collect::<Vec<_>>(),
        [0.25, 1.0, 0.0]
    );
    let p = write_rows(
        tmp.path(),
        "kto.jsonl",
        &[
            json!({"prompt": "a", "completion": " x", "label": true, "weight": 2}),
            json!({"prompt": "b", "completion": " y", "label": false}),
        ],
    );
    let (rows, _) = load_kto(&p, &tok, 64, true).unwrap();
    assert_eq!(
        rows.iter().map(|r| r.weight).collect::<Vec<_>>(),
        [2.0, 1.0]
    );
    for bad in [json!(-1), json!("high"), json!(true)] {
        let p = write_rows(
            tmp.path(),
            "bad.jsonl",
            &[
                json!({"prompt": "a", "chosen": " x", "rejected": " y"}),
                json!({"prompt": "b", "chosen": " x", "rejected": " y", "weight": bad}),
            ],
        );
        match load_pairs(&p, &tok, 64).unwrap_err() {
            Error::Data { line, message, .. } => {
                assert_eq!(line, 2);
                assert!(message.contains("\"weight\" must be a non-negative number"));
            }
            e => panic!("{e}"),
        }
    }
}

#[test]
fn a_run_on_rows_of_weight_zero_learns_nothing() {
    let (tmp, dir) = tiny_model(&TinySpec::default());
    for method in [Method::Dpo, Method::Orpo, Method::Kto] {
        let src = pref_config(method, &dir, tmp.path()).train.data;
        let rows: Vec<Value> = std::fs::read_to_string(&src)
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: Value = serde_json::from_str(l).unwrap();
                v["weight"] = json!(0.0);
                v
            })
            .collect();
        let data = write_rows(tmp.path(), &format!("{}-zero.jsonl", method.name()), &rows);
        let out = tmp.path().join(format!("{}-zero", method.name()));
        let mut cfg = pref_config(method, &dir, &out);
        cfg.train.data = data;
        cfg.train.steps = 2;
        train_preference(&cfg, &Device::Cpu, &mut |_| {}).unwrap();
        let steps = step_metrics(&out);
        for s in &steps {
            assert_eq!((s.loss, s.grad_norm), (0.0, 0.0), "{}", method.name());
        }
        // Zero gradients: AdamW leaves B at its initial zeros.
        for (k, t) in adapter_tensors(&out) {
            if k.contains("lora_B") {
                assert_eq!(
                    t.abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap(),
                    0.0
                );
            }
        }
    }
}
