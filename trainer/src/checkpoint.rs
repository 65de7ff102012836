//! Activation checkpointing per decoder layer, installed as the model's layer step
//! ([`Checkpointing`]).
//!
//! A checkpointed layer is a custom op on its input: forward runs the layer, keeps only the
//! output and drops the layer's activations; backward runs the layer again with a graph (the
//! same dropout masks, from a copy of the generator), back-propagates the incoming gradient
//! through it, returns the input's gradient and leaves the LoRA gradients in a sink that the
//! training loop adds to the ones of the main graph (`Llama::take_step_grad`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor, TensorId, Var};
use rand::rngs::StdRng;

use loraops_model::config::ModelConfig;
use loraops_model::linear::lora::DropoutRng;
use loraops_model::llama::{Context, DecoderLayer, LayerStep, layer_forward};

/// Gradients of LoRA parameters computed inside checkpointed layers.
#[derive(Debug, Default)]
pub struct GradSink(Mutex<HashMap<TensorId, Tensor>>);

/// The layer step that recomputes each decoder layer in backward instead of keeping its
/// activations.
#[derive(Debug, Default)]
pub struct Checkpointing {
    sink: Arc<GradSink>,
}

impl LayerStep for Checkpointing {
    fn run(
        &self,
        layer: &DecoderLayer,
        config: &ModelConfig,
        x: &Tensor,
        ctx: &Context,
        rng: &mut DropoutRng,
    ) -> candle_core::Result<Tensor> {
        layer_forward_checkpointed(layer, config, x, ctx, rng, &self.sink)
    }

    fn take_grad(&self, v: &Var) -> Option<Tensor> {
        self.sink.take(v)
    }
}

impl GradSink {
    fn add(&self, id: TensorId, g: Tensor) -> candle_core::Result<()> {
        let mut m = self.0.lock().expect("grad sink lock");
        let sum = match m.remove(&id) {
            Some(prev) => (prev + g)?,
            None => g,
        };
        m.insert(id, sum);
        Ok(())
    }

    pub fn take(&self, v: &Var) -> Option<Tensor> {
        self.0
            .lock()
            .expect("grad sink lock")
            .remove(&v.as_tensor().id())
    }
}

struct CheckpointedLayer {
    layer: DecoderLayer,
    config: ModelConfig,
    ctx: Context,
    rng: Option<StdRng>,
    output: Mutex<Option<Tensor>>,
    sink: Arc<GradSink>,
}

impl CheckpointedLayer {
    fn take_output(&self) -> candle_core::Result<Tensor> {
        self.output
            .lock()
            .expect("checkpoint lock")
            .take()
            .ok_or_else(|| candle_core::Error::Msg("checkpointed layer: forward ran twice".into()))
    }
}

impl CustomOp1 for CheckpointedLayer {
    fn name(&self) -> &'static str {
        "checkpointed-decoder-layer"
    }

    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = self.take_output()?.contiguous()?;
        let (s, l) = y.storage_and_layout();
        let Storage::Cpu(s) = &*s else {
            candle_core::bail!("checkpointed layer: output is not on the CPU")
        };
        let out = match l.contiguous_offsets() {
            Some((0, end)) if end == s.as_slice::<f32>().map(|x| x.len()).unwrap_or(end) => {
                s.clone()
            }
            _ => candle_core::bail!("checkpointed layer: output is not a whole contiguous buffer"),
        };
        Ok((out, y.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s: &candle_core::CudaStorage,
        _l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let y = self.take_output()?.contiguous()?;
        let (s, l) = y.storage_and_layout();
        let Storage::Cuda(s) = &*s else {
            candle_core::bail!("checkpointed layer: output is not on the GPU")
        };
        Ok((s.try_clone(l)?, y.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let x = Var::from_tensor(&arg.detach())?;
        let mut rng = self.rng.clone();
        let mut drop: DropoutRng = rng.as_mut();
        let y = layer_forward(
            &self.layer,
            &self.config,
            x.as_tensor(),
            &self.ctx,
            &mut drop,
        )?;
        let mut grads = (y * grad.detach())?.sum_all()?.backward()?;
        for m in self.config.linear_modules() {
            if let Some(l) = self.layer.linear(m).and_then(|l| l.lora.as_ref()) {
                for v in [&l.a, &l.b] {
                    if let Some(g) = grads.remove(v.as_tensor()) {
                        self.sink.add(v.as_tensor().id(), g)?;
                    }
                }
            }
        }
        Ok(grads.remove(x.as_tensor()))
    }
}

/// Run `layer` on `x` keeping only its output for backward.
pub fn layer_forward_checkpointed(
    layer: &DecoderLayer,
    config: &ModelConfig,
    x: &Tensor,
    ctx: &Context,
    rng: &mut DropoutRng,
    sink: &Arc<GradSink>,
) -> candle_core::Result<Tensor> {
    let snapshot = rng.as_ref().map(|r| (**r).clone());
    let y = layer_forward(layer, config, &x.detach(), ctx, rng)?.detach();
    // The op is recorded only on an input that is part of a graph.
    let x = if x.track_op() {
        x.clone()
    } else {
        Var::from_tensor(x)?.as_tensor().clone()
    };
    x.apply_op1(CheckpointedLayer {
        layer: layer.clone(),
        config: config.clone(),
        ctx: ctx.clone(),
        rng: snapshot,
        output: Mutex::new(Some(y)),
        sink: sink.clone(),
    })
}
