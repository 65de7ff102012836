//! SFT datasets: JSONL rows in the chat, prompt/completion or Alpaca format (read as
//! [`loraops_data::row`] types), tokenised with labels only on completion (assistant) tokens,
//! and padded batches with masks.

use std::path::Path;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use loraops_data::row::{self, Sft};
use loraops_model::tokenizer::{Message, Tokenizer};

pub use loraops_data::row::weight as row_weight;

/// Label of a position that does not count in the loss (PyTorch's ignore_index).
pub const IGNORE: i64 = -100;

/// One tokenised training row.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    /// Same length as `ids`: the token id where it is a completion token, else IGNORE.
    pub labels: Vec<i64>,
    pub weight: f32,
}

impl Example {
    /// Tokens that are predicted in the loss (the first position predicts nothing).
    pub fn trainable(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l != IGNORE).count()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DatasetStats {
    pub rows: usize,
    pub kept: usize,
    /// Rows cut to the maximum sequence length.
    pub truncated: usize,
    /// Rows left without any completion token (after truncation); not trained on.
    pub no_completion: usize,
    /// The first few of those rows' line numbers.
    pub no_completion_lines: Vec<usize>,
    pub tokens: usize,
    pub trainable_tokens: usize,
}

/// `sha256:<hex>` of a file's bytes.
pub fn file_digest(path: &Path) -> Result<String> {
    let bytes = crate::error::read(path)?;
    Ok(format!("sha256:{}", hex::encode(Sha256::digest(&bytes))))
}

/// The chat-template messages of a row's message list (every content must be text).
pub fn chat_messages(msgs: &[row::Message]) -> std::result::Result<Vec<Message>, String> {
    msgs.iter()
        .map(|m| {
            Ok(Message {
                role: m.role.clone(),
                content: m.text()?.to_string(),
            })
        })
        .collect()
}

/// Text segments of a conversation rendered with the chat template; the assistant turns from
/// message `train_from` on are trainable.
pub fn chat_segments(
    messages: &[Message],
    tok: &Tokenizer,
    train_from: usize,
) -> std::result::Result<Vec<(String, bool)>, String> {
    // Render prefix by prefix: the text an assistant turn adds to the conversation after
    // its generation prompt is what the model learns to produce.
    let mut out = Vec::new();
    let mut done = String::new();
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" || i < train_from {
            continue;
        }
        let prompt = tok
            .apply_chat_template(&messages[..i], true)
            .map_err(|e| e.to_string())?;
        let full = tok
            .apply_chat_template(&messages[..=i], false)
            .map_err(|e| e.to_string())?;
        let (Some(p), Some(f)) = (
            prompt.strip_prefix(done.as_str()),
            full.strip_prefix(prompt.as_str()),
        ) else {
            return Err("the chat template does not render conversations prefix by prefix".into());
        };
        out.push((p.to_string(), false));
        out.push((f.to_string(), true));
        done = full;
    }
    let all = tok
        .apply_chat_template(messages, false)
        .map_err(|e| e.to_string())?;
    if let Some(rest) = all.strip_prefix(done.as_str())
        && !rest.is_empty()
    {
        out.push((rest.to_string(), false));
    }
    Ok(out)
}

/// Text segments of an SFT row, each flagged trainable or not.
pub fn segments(v: &Value, tok: &Tokenizer) -> std::result::Result<Vec<(String, bool)>, String> {
    let sft = Sft::from_json(v)?;
    if let Sft::Chat(msgs) = &sft {
        return chat_segments(&chat_messages(msgs)?, tok, 0);
    }
    let (prompt, completion) = sft.text_pair().ok_or(row::NOT_SFT)?;
    let eos = tok.eos_token.clone().unwrap_or_default();
    Ok(vec![(prompt, false), (format!("{completion}{eos}"), true)])
}

/// Token ids and labels of text segments (BOS first where the tokenizer adds one).
pub fn encode_segments(
    segs: &[(String, bool)],
    tok: &Tokenizer,
) -> std::result::Result<(Vec<u32>, Vec<i64>), String> {
    let mut ids = Vec::new();
    let mut labels = Vec::new();
    if tok.add_bos
        && let Some(b) = tok.bos_id
    {
        ids.push(b);
        labels.push(IGNORE);
    }
    for (text, train) in segs {
        let piece = tok.encode(text).map_err(|e| e.to_string())?;
        labels.extend(
            piece
                .iter()
                .map(|&t| if *train { t as i64 } else { IGNORE }),
        );
        ids.extend(piece);
    }
    Ok((ids, labels))
}

/// Tokenise one JSON row.
pub fn tokenize_row(
    v: &Value,
    tok: &Tokenizer,
    max_len: usize,
) -> std::result::Result<(Example, bool), String> {
    let weight = row_weight(v)?;
    let (mut ids, mut labels) = encode_segments(&segments(v, tok)?, tok)?;
    let truncated = ids.len() > max_len;
    ids.truncate(max_len);
    labels.truncate(max_len);
    Ok((
        Example {
            ids,
            labels,
            weight,
        },
        truncated,
    ))
}

/// Read and tokenise a JSONL file; rows without a completion token are counted, not kept.
pub fn load_sft(
    path: &Path,
    tok: &Tokenizer,
    max_len: usize,
) -> Result<(Vec<Example>, DatasetStats)> {
    let text = String::from_utf8(crate::error::read(path)?).map_err(|e| Error::parse(path, e))?;
    let mut stats = DatasetStats::default();
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let data_err = |message: String| Error::Data {
            path: path.to_path_buf(),
            line: i + 1,
            message,
        };
        let v: Value = serde_json::from_str(line).map_err(|e| data_err(e.to_string()))?;
        stats.rows += 1;
        let (ex, truncated) = tokenize_row(&v, tok, max_len).map_err(data_err)?;
        stats.truncated += usize::from(truncated);
        if ex.trainable() == 0 {
            stats.no_completion += 1;
            if stats.no_completion_lines.len() < 10 {
                stats.no_completion_lines.push(i + 1);
            }
            continue;
        }
        stats.kept += 1;
        stats.tokens += ex.ids.len();
        stats.trainable_tokens += ex.trainable();
        out.push(ex);
    }
    if stats.no_completion > 0 {
        tracing::warn!(
            path = %path.display(),
            rows = stats.no_completion,
            first_lines = ?stats.no_completion_lines,
            "rows without a completion token (after truncation) are not trained on"
        );
    }
    if out.is_empty() {
        return Err(Error::NoTrainableRows {
            path: path.to_path_buf(),
            rows: stats.rows,
            max_len,
        });
    }
    Ok((out, stats))
}

/// One row of a batch: a single example, or several packed one after another.
#[derive(Debug, Clone, PartialEq)]
pub struct Packed {
    pub ids: Vec<u32>,
    pub labels: Vec<i64>,
    /// The weight of each token's row.
    pub weights: Vec<f32>,
    /// Which packed example each token belongs to (1, 2, …).
    pub segments: Vec<u32>,
}

impl From<&Example> for Packed {
    fn from(e: &Example) -> Self {
        Self {
            ids: e.ids.clone(),
            labels: e.labels.clone(),
            weights: vec![e.weight; e.ids.len()],
            segments: vec![1; e.ids.len()],
        }
    }
}

/// Concatenate examples, in order, into rows of at most `max_len` tokens. Each example keeps
/// its own positions and attends only to itself; its first token predicts nothing.
pub fn pack(examples: &[Example], max_len: usize) -> Vec<Packed> {
    let mut out: Vec<Packed> = Vec::new();
    for e in examples {
        let fits = out
            .last()
            .is_some_and(|p| p.ids.len() + e.ids.len() <= max_len);
        if !fits {
            out.push(Packed {
                ids: vec![],
                labels: vec![],
                weights: vec![],
                segments: vec![],
            });
        }
        let row = out.last_mut().expect("pushed");
        let seg = row.segments.last().copied().unwrap_or(0) + 1;
        row.ids.extend(&e.ids);
        row.labels.push(IGNORE);
        row.labels.extend(e.labels.iter().skip(1));
        row.weights
            .extend(std::iter::repeat_n(e.weight, e.ids.len()));
        row.segments.extend(std::iter::repeat_n(seg, e.ids.len()));
    }
    out
}

/// A padded batch, with the loss positions already gathered.
#[derive(Debug)]
pub struct Batch {
    /// (B, T) u32.
    pub input_ids: Tensor,
    /// Per token: 0 for padding (on the right), else the packed example it belongs to
    /// (always 1 without packing).
    pub attention_mask: Vec<Vec<u32>>,
    /// Flat indices b·T + t of the positions whose next token is a target (N).
    pub positions: Tensor,
    /// The target token of each position (N).
    pub targets: Tensor,
    /// The row weight of each position (N).
    pub weights: Tensor,
    pub n_targets: usize,
    pub n_tokens: usize,
}

pub fn make_batch(rows: &[&Example], pad_id: u32, device: &Device) -> Result<Batch> {
    let packed: Vec<Packed> = rows.iter().map(|e| Packed::from(*e)).collect();
    make_packed_batch(&packed.iter().collect::<Vec<_>>(), pad_id, device)
}

pub fn make_packed_batch(rows: &[&Packed], pad_id: u32, device: &Device) -> Result<Batch> {
    let b = rows.len();
    let t = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0).max(1);
    let mut ids = vec![pad_id; b * t];
    let mut mask = vec![vec![0u32; t]; b];
    let (mut pos, mut tgt, mut w) = (Vec::new(), Vec::new(), Vec::new());
    let mut n_tokens = 0;
    for (bi, r) in rows.iter().enumerate() {
        for (ti, &id) in r.ids.iter().enumerate() {
            ids[bi * t + ti] = id;
            mask[bi][ti] = r.segments[ti];
        }
        n_tokens += r.ids.len();
        for ti in 0..r.ids.len().saturating_sub(1) {
            let l = r.labels[ti + 1];
            if l != IGNORE && r.segments[ti] == r.segments[ti + 1] {
                pos.push((bi * t + ti) as u32);
                tgt.push(l as u32);
                w.push(r.weights[ti + 1]);
            }
        }
    }
    let n = pos.len();
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (b, t), device)?,
        attention_mask: mask,
        positions: Tensor::from_vec(pos, n, device)?,
        targets: Tensor::from_vec(tgt, n, device)?,
        weights: Tensor::from_vec(w, n, device)?,
        n_targets: n,
        n_tokens,
    })
}
