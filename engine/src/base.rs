//! The resident base model as the engine reads it: plain row-major f32 buffers, or NF4 blocks
//! for the decoder's linear layers, loaded once through the model crate (the same config,
//! weight names and NF4 layout training uses) and never evicted.

use std::path::Path;
use std::sync::Arc;

use loraops_model::config::ModelConfig;
use loraops_model::kernels::matmul::{self, Operand, SendPtr, gemm_block};
use loraops_model::linear::frozen::{FrozenMatmul, FrozenWeight};
use loraops_model::linear::nf4::{NF4_BLOCK, Nf4Tensor};
use loraops_model::llama::{BaseFormat, Llama, LoadOptions};
use rayon::prelude::*;

use crate::{EngineError, dots};

/// How the base's decoder linears are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quantize {
    /// f32, as the checkpoint's values.
    #[default]
    None,
    /// NF4 with double quantisation (bitsandbytes' layout, the trainer's QLoRA base).
    Nf4,
}

impl Quantize {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Nf4 => "nf4",
        }
    }
}

impl std::str::FromStr for Quantize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" | "f32" => Ok(Self::None),
            "nf4" => Ok(Self::Nf4),
            other => Err(format!("quantize {other:?}: expected none or nf4")),
        }
    }
}

/// Output rows of an NF4 weight dequantised at once: a tile of 32 rows of a 4096-wide layer is
/// 512 KiB, which stays in cache for the product that reads it.
const NF4_TILE: usize = 32;

/// Up to this many input rows (decode steps), f32 products read the weight a few output rows
/// at a time and take their dot products with every input row (`dots::dense_rows`); beyond,
/// gemm, whose packing only many rows repay. bench_products on the 100M-parameter model's
/// shapes, at 32 rows: gemm took 3x as long as the row kernels on the 256 × 768 key and value
/// weights (which stay in cache), and packing was half its time on the larger ones.
const ROW_KERNEL_ROWS: usize = 32;

/// NF4 expands a weight row in registers only up to this many input rows; beyond, a tile of
/// rows is expanded and multiplied by gemm.
const NF4_ROW_KERNEL_ROWS: usize = 8;

/// Output rows per task of the small-batch products.
const ROWS_PER_TASK: usize = 16;

/// A frozen weight (out × in).
pub enum Weight {
    F32 {
        w: Vec<f32>,
        out_f: usize,
        in_f: usize,
    },
    Nf4(Arc<Nf4Tensor>),
}

impl Weight {
    fn from_frozen(f: FrozenMatmul) -> Result<Self, EngineError> {
        Ok(match f.weight {
            FrozenWeight::Nf4(q) => Self::Nf4(q),
            FrozenWeight::Dense(w) | FrozenWeight::Bf16(w) => {
                let (out_f, in_f) = w.dims2()?;
                Self::F32 {
                    w: values(&w)?,
                    out_f,
                    in_f,
                }
            }
        })
    }

    /// (out, in).
    pub fn dims(&self) -> (usize, usize) {
        match self {
            Self::F32 { out_f, in_f, .. } => (*out_f, *in_f),
            Self::Nf4(q) => (q.shape[0], q.shape[1]),
        }
    }

    pub fn bytes(&self) -> usize {
        match self {
            Self::F32 { w, .. } => 4 * w.len(),
            Self::Nf4(q) => q.storage_bytes(),
        }
    }

    /// `x (rows × in) · Wᵀ`, on all threads. NF4 is expanded a tile of output rows at a time
    /// into a per-thread buffer and multiplied from there: the whole weight is never expanded,
    /// so a decode step reads its 4 bits per weight from memory, not 32.
    pub fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        match self {
            Self::F32 { w, out_f, in_f } if rows <= ROW_KERNEL_ROWS => {
                dense_small_batch(w, x, rows, *in_f, *out_f)
            }
            Self::F32 { w, out_f, in_f } => matmul::linear(x, w, rows, *in_f, *out_f),
            Self::Nf4(q) if rows <= NF4_ROW_KERNEL_ROWS && q.shape[1].is_multiple_of(NF4_BLOCK) => {
                nf4_small_batch(q, x, rows)
            }
            Self::Nf4(q) => {
                let (out_f, in_f) = (q.shape[0], q.shape[1]);
                let mut y = vec![0f32; rows * out_f];
                let yp = SendPtr(y.as_mut_ptr());
                (0..out_f.div_ceil(NF4_TILE)).into_par_iter().for_each_init(
                    Vec::new,
                    |buf: &mut Vec<f32>, t| {
                        let o0 = t * NF4_TILE;
                        let n = NF4_TILE.min(out_f - o0);
                        buf.resize(n * in_f, 0.0);
                        q.dequantize_range_into(o0 * in_f, &mut buf[..n * in_f]);
                        // SAFETY: each tile writes its own columns o0..o0+n of every row of y,
                        // which outlives the parallel loop.
                        unsafe {
                            gemm_block(
                                (yp.get().add(o0), out_f),
                                0.0,
                                (rows, in_f, n),
                                (x, Operand::rows(in_f)),
                                (&buf[..n * in_f], Operand::transposed(in_f)),
                            )
                        }
                    },
                );
                y
            }
        }
    }
}

/// `y = x · Wᵀ` for a few rows of x: output rows are split among the threads, and each weight
/// row is read from memory once per step and multiplied with every input row from cache. A
/// task's block (out × rows) is built on its stack and written into y's rows in place: a
/// whole transposed copy was a second buffer of up to 256 KiB per product, which glibc maps
/// and faults in afresh each step, and a pass over it.
fn dense_small_batch(w: &[f32], x: &[f32], rows: usize, in_f: usize, out_f: usize) -> Vec<f32> {
    assert!(rows <= ROW_KERNEL_ROWS, "{rows} rows for the row kernels");
    let x = &x[..rows * in_f];
    let mut y = vec![0f32; rows * out_f];
    let yp = SendPtr(y.as_mut_ptr());
    (0..out_f.div_ceil(ROWS_PER_TASK))
        .into_par_iter()
        .for_each(|t| {
            let o = t * ROWS_PER_TASK;
            let n = ROWS_PER_TASK.min(out_f - o);
            let mut block = [0f32; ROWS_PER_TASK * ROW_KERNEL_ROWS];
            let block = &mut block[..n * rows];
            dots::dense_rows(&w[o * in_f..(o + n) * in_f], x, rows, block);
            for (i, column) in block.chunks_exact(rows).enumerate() {
                for (r, &v) in column.iter().enumerate() {
                    // SAFETY: task t alone writes columns o .. o + n of y's rows (r < rows,
                    // o + i < out_f), and y outlives the parallel loop.
                    unsafe { *yp.get().add(r * out_f + o + i) = v };
                }
            }
        });
    y
}

/// NF4 for a few rows: the same, each weight row expanded in registers as it is multiplied.
fn nf4_small_batch(q: &Nf4Tensor, x: &[f32], rows: usize) -> Vec<f32> {
    let out_f = q.shape[0];
    let xp = dots::nf4_layout(x, q.shape[1]);
    let mut yt = vec![0f32; out_f * rows];
    yt.par_chunks_mut(ROWS_PER_TASK * rows)
        .enumerate()
        .for_each(|(t, block)| {
            for (i, out) in block.chunks_exact_mut(rows).enumerate() {
                dots::nf4_row(q, t * ROWS_PER_TASK + i, &xp, out);
            }
        });
    transpose(&yt, out_f, rows)
}

/// (a × b) row-major → (b × a).
fn transpose(m: &[f32], a: usize, b: usize) -> Vec<f32> {
    if b == 1 {
        return m.to_vec();
    }
    let mut out = vec![0f32; a * b];
    for (i, row) in m.chunks_exact(b).enumerate() {
        for (j, &v) in row.iter().enumerate() {
            out[j * a + i] = v;
        }
    }
    out
}

/// A decoder linear layer of the base: weight and optional bias.
pub struct Linear {
    pub weight: Weight,
    pub bias: Option<Vec<f32>>,
}

impl Linear {
    /// `x · Wᵀ + b`.
    pub fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let mut y = self.weight.forward(x, rows);
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(b.len()) {
                row.iter_mut().zip(b).for_each(|(y, b)| *y += b);
            }
        }
        y
    }
}

/// Index of a module in [`Layer::linears`] (the order of `peft::LINEAR_MODULES`).
pub const Q: usize = 0;
pub const K: usize = 1;
pub const V: usize = 2;
pub const O: usize = 3;
pub const GATE: usize = 4;
pub const UP: usize = 5;
pub const DOWN: usize = 6;

pub struct Layer {
    pub input_norm: Vec<f32>,
    pub post_norm: Vec<f32>,
    /// Per-head norms of q and k before RoPE (Qwen3).
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    /// q, k, v, o, gate, up, down.
    pub linears: [Linear; 7],
}

/// The base model resident in memory.
pub struct Base {
    pub config: ModelConfig,
    /// (vocab × hidden).
    pub embed: Vec<f32>,
    pub layers: Vec<Layer>,
    pub norm: Vec<f32>,
    /// `None`: tied to the embeddings.
    pub lm_head: Option<Weight>,
    /// RoPE's inverse frequencies (head_dim / 2), scalings applied.
    pub inv_freq: Vec<f32>,
    pub quantize: Quantize,
}

/// The engine computes Llama, Mistral, Qwen2 and Qwen3; an architecture needing pieces its
/// forward pass lacks is refused by name rather than served wrong.
pub fn refuse_unsupported(c: &ModelConfig) -> Result<(), EngineError> {
    let mut missing = Vec::new();
    if c.gemma {
        missing.push("Gemma's (1 + w) norms around attention and MLP, GeGLU, scaled embeddings");
    }
    if c.attn_logit_softcapping.is_some() {
        missing.push("attention logit soft-capping");
    }
    if c.final_logit_softcapping.is_some() {
        missing.push("final logit soft-capping");
    }
    if c.query_pre_attn_scalar.is_some() {
        missing.push("query_pre_attn_scalar");
    }
    if c.sliding_layers.contains(&true) {
        missing.push("sliding-window attention");
    }
    if c.local_rope_theta.is_some() {
        missing.push("local RoPE bases");
    }
    if missing.is_empty() {
        return Ok(());
    }
    Err(EngineError::UnsupportedArchitecture {
        architecture: format!("{:?}", c.architecture),
        missing: missing.join(", "),
    })
}

fn values(t: &candle_core::Tensor) -> Result<Vec<f32>, EngineError> {
    Ok(t.to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

impl Base {
    /// Load a Hugging Face model directory on the CPU, its decoder linears in f32 or NF4.
    pub fn load(dir: &Path, quantize: Quantize) -> Result<Self, EngineError> {
        let opts = LoadOptions {
            format: match quantize {
                Quantize::None => BaseFormat::F32,
                Quantize::Nf4 => BaseFormat::Nf4,
            },
            double_quant: true,
            ..Default::default()
        };
        let config = loraops_model::config::ModelConfig::from_file(&dir.join("config.json"))?;
        refuse_unsupported(&config)?;
        let Llama {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            ..
        } = Llama::load(dir, &opts)?;
        let embed = values(&embed_tokens)?;
        drop(embed_tokens);
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(Weight::from_frozen(lm_head)?)
        };
        let mut out = Vec::with_capacity(layers.len());
        // Layer by layer, so at most one layer exists twice while it is converted.
        for l in layers {
            let lin = |l: loraops_model::linear::lora::Linear| -> Result<Linear, EngineError> {
                Ok(Linear {
                    weight: Weight::from_frozen(l.base)?,
                    bias: l.bias.as_ref().map(values).transpose()?,
                })
            };
            let (a, m) = (l.self_attn, l.mlp);
            out.push(Layer {
                q_norm: l.q_norm.as_ref().map(values).transpose()?,
                k_norm: l.k_norm.as_ref().map(values).transpose()?,
                input_norm: values(&l.input_layernorm)?,
                post_norm: values(&l.post_attention_layernorm)?,
                linears: [
                    lin(a.q_proj)?,
                    lin(a.k_proj)?,
                    lin(a.v_proj)?,
                    lin(a.o_proj)?,
                    lin(m.gate_proj)?,
                    lin(m.up_proj)?,
                    lin(m.down_proj)?,
                ],
            });
        }
        Ok(Self {
            inv_freq: config.inv_freq(),
            config,
            embed,
            layers: out,
            norm: values(&norm)?,
            lm_head,
            quantize,
        })
    }

    /// Bytes of the resident weights.
    pub fn bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                4 * (l.input_norm.len() + l.post_norm.len())
                    + l.linears
                        .iter()
                        .map(|x| x.weight.bytes() + 4 * x.bias.as_ref().map_or(0, Vec::len))
                        .sum::<usize>()
            })
            .sum();
        4 * (self.embed.len() + self.norm.len())
            + layers
            + self.lm_head.as_ref().map_or(0, Weight::bytes)
    }

    /// Logits (rows × vocab) of final hidden states.
    pub fn head(&self, h: &[f32], rows: usize) -> Vec<f32> {
        match &self.lm_head {
            Some(w) => w.forward(h, rows),
            None => {
                let hidden = self.config.hidden_size;
                let vocab = self.embed.len() / hidden;
                matmul::linear(h, &self.embed, rows, hidden, vocab)
            }
        }
    }
}
