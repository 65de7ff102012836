//! Resumable checkpoints: adapter weights, AdamW moments, step and loop state, and the best
//! adapter so far by validation loss. The data order and dropout masks derive from
//! (seed, step), so a resumed run continues exactly.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Tensor, Var};

use crate::error::{Error, Result};
use crate::optim::AdamW;
use crate::sft::LoopState;
use loraops_model::adapter::save_safetensors;

const TENSORS: &str = "trainer_state.safetensors";
const STATE: &str = "trainer_state.json";

/// Write a checkpoint; `best` is the adapter with the best validation loss so far, in the
/// order of `named`.
pub fn save(
    dir: &Path,
    named: &[(String, Var)],
    opt: &AdamW,
    state: &LoopState,
    best: Option<&[Tensor]>,
) -> Result<()> {
    // Write next to the old checkpoint and swap, so a crash never leaves half a checkpoint.
    let tmp = dir.with_extension("tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut t = BTreeMap::new();
    for (i, (k, v)) in named.iter().enumerate() {
        t.insert(format!("param.{k}"), v.as_tensor().clone());
        t.insert(format!("exp_avg.{k}"), opt.m[i].clone());
        t.insert(format!("exp_avg_sq.{k}"), opt.v[i].clone());
        if let Some(b) = best {
            t.insert(format!("best.{k}"), b[i].clone());
        }
    }
    save_safetensors(&tmp.join(TENSORS), &t)?;
    let json = serde_json::json!({"loop": state, "optimizer_step": opt.step});
    crate::error::write(
        &tmp.join(STATE),
        serde_json::to_vec_pretty(&json).expect("serialisable"),
    )?;
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))
}

/// Restore a checkpoint into the parameters and the optimiser: the loop state, and the best
/// adapter so far when the checkpoint has one.
pub fn load(
    dir: &Path,
    named: &[(String, Var)],
    opt: &mut AdamW,
) -> Result<(LoopState, Option<Vec<Tensor>>)> {
    let bad = |m: String| Error::Checkpoint {
        path: dir.to_path_buf(),
        message: m,
    };
    let state_path = dir.join(STATE);
    let json: serde_json::Value = serde_json::from_slice(&crate::error::read(&state_path)?)
        .map_err(|e| Error::parse(&state_path, e))?;
    let state: LoopState =
        serde_json::from_value(json["loop"].clone()).map_err(|e| bad(e.to_string()))?;
    let device = named
        .first()
        .map(|(_, v)| v.device().clone())
        .unwrap_or(candle_core::Device::Cpu);
    let t = candle_core::safetensors::load(dir.join(TENSORS), &device)?;
    let get = |k: &str| -> Result<&Tensor> {
        t.get(k).ok_or_else(|| {
            bad(format!(
                "tensor {k} is missing (different LoRA targets or rank?)"
            ))
        })
    };
    for (i, (k, v)) in named.iter().enumerate() {
        let p = get(&format!("param.{k}"))?;
        if p.dims() != v.dims() {
            return Err(bad(format!(
                "{k} has shape {:?}, the model's is {:?}",
                p.dims(),
                v.dims()
            )));
        }
        v.set(p)?;
        opt.m[i] = get(&format!("exp_avg.{k}"))?.clone();
        opt.v[i] = get(&format!("exp_avg_sq.{k}"))?.clone();
    }
    opt.step = json["optimizer_step"]
        .as_u64()
        .ok_or_else(|| bad("optimizer_step is missing".into()))? as usize;
    let best = if named
        .iter()
        .all(|(k, _)| t.contains_key(&format!("best.{k}")))
    {
        Some(
            named
                .iter()
                .map(|(k, _)| get(&format!("best.{k}")).cloned())
                .collect::<Result<Vec<_>>>()?,
        )
    } else {
        None
    };
    Ok((state, best))
}
