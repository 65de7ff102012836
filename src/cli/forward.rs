//! `loraops model generate`: greedy tokens from the trainer's own forward pass (the base model,
//! optionally with a PEFT adapter), to hold a serving engine's output against the training code.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use loraops_model::adapter::load_adapter;
use loraops_model::llama::{Llama, LoadOptions};
use loraops_model::tokenizer::{Message, Tokenizer};
use serde_json::json;

use super::Global;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Base model directory (Hugging Face layout).
    pub dir: PathBuf,
    /// PEFT adapter directory to apply (unmerged, as in training).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// A user message, sent through the chat template with the generation prompt; repeatable.
    #[arg(long = "prompt", required = true)]
    pub prompts: Vec<String>,
    /// Tokens to generate per prompt (fewer when the model emits its end-of-sequence token).
    #[arg(long, default_value_t = 16)]
    pub max_tokens: usize,
    /// auto (the first GPU when built with cuda, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

pub fn run(a: GenerateArgs, global: &Global) -> anyhow::Result<()> {
    let device = loraops_model::select_device(&a.device)?;
    let tok = Tokenizer::load(&a.dir)?;
    let opts = LoadOptions {
        device: device.clone(),
        ..Default::default()
    };
    let mut model = Llama::load(&a.dir, &opts)?;
    if let Some(dir) = &a.adapter {
        load_adapter(dir, &mut model).with_context(|| format!("adapter {}", dir.display()))?;
    }
    let mut out = Vec::new();
    for prompt in &a.prompts {
        let text = tok.apply_chat_template(
            &[Message {
                role: "user".into(),
                content: prompt.clone(),
            }],
            true,
        )?;
        let mut ids = Vec::new();
        if tok.add_bos
            && let Some(b) = tok.bos_id
        {
            ids.push(b);
        }
        ids.extend(tok.encode(&text)?);
        let prompt_len = ids.len();
        // No KV cache: each token reruns the whole sequence, which is plenty for a check.
        for _ in 0..a.max_tokens {
            let next = model.greedy_next(&ids)?;
            if Some(next) == tok.eos_id {
                break;
            }
            ids.push(next);
        }
        let generated = &ids[prompt_len..];
        let text = tok.decode_text(generated)?;
        if global.json {
            out.push(json!({"prompt": prompt, "prompt_ids": &ids[..prompt_len],
                "ids": generated, "text": text}));
        } else {
            println!("{prompt}\n  -> {text:?}");
        }
    }
    if global.json {
        println!("{}", serde_json::to_string(&out)?);
    }
    Ok(())
}
