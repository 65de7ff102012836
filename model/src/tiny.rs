//! `model init-tiny`: a small, randomly initialised Llama-layout model with a byte-level BPE
//! tokenizer learned from a built-in text, for demos and tests. Everything is derived from the
//! seed with integer arithmetic, so the same arguments give the same bytes on every machine.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::{Error, Result, write};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TinySpec {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    pub intermediate: Option<usize>,
    pub seed: u64,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            layers: 2,
            hidden: 64,
            heads: 4,
            kv_heads: 2,
            vocab: 512,
            intermediate: None,
            seed: 0,
        }
    }
}

pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// ChatML, the template of many Llama-family chat models, with tools as Qwen2.5 renders them:
/// the function definitions in the system turn, an assistant's calls as `<tool_call>` JSON,
/// tool results as `<tool_response>` in a user turn. Without tools it is plain ChatML.
pub const CHAT_TEMPLATE: &str = concat!(
    "{%- if tools %}{{ '<|im_start|>system\\n' }}",
    "{%- if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}{%- endif %}",
    "{{ '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n",
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}",
    "{%- for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{%- endfor %}",
    "{{ '\\n</tools>\\n\\nFor each function call, return a json object with function name and ",
    "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n",
    "{\"name\": <function-name>, \"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}",
    "{%- endif %}",
    "{%- for message in messages %}",
    "{%- if tools and loop.first and message['role'] == 'system' %}",
    "{%- elif message['role'] == 'assistant' and message['tool_calls'] %}",
    "{{ '<|im_start|>assistant' }}{%- if message['content'] %}{{ '\\n' + message['content'] }}{%- endif %}",
    "{%- for call in message['tool_calls'] %}{%- set f = call['function'] if call['function'] else call %}",
    "{{ '\\n<tool_call>\\n{\"name\": \"' + f['name'] + '\", \"arguments\": ' }}",
    "{%- if f['arguments'] is string %}{{ f['arguments'] }}{%- else %}{{ f['arguments'] | tojson }}{%- endif %}",
    "{{ '}\\n</tool_call>' }}{%- endfor %}{{ '<|im_end|>\\n' }}",
    "{%- elif message['role'] == 'tool' %}",
    "{{ '<|im_start|>user\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' }}",
    "{%- else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}",
    "{%- endif %}{%- endfor %}",
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
);

/// The text the tokenizer's merges are learned from.
const CORPUS: &str = "The quick brown fox jumps over the lazy dog. A model learns from data, and the data \
teaches the model what to say. user assistant system: You are a helpful assistant. What is the capital \
of France? The capital of France is Paris. Translate the following sentence into German. Write a short \
poem about the sea. Summarise the text below in one sentence. Answer the question with yes or no. \
Instruction: Input: Response: Below is an instruction that describes a task, paired with an input that \
provides further context. Write a response that appropriately completes the request. \
fine-tuning adapters with low rank adaptation keeps the base model frozen and trains two small matrices \
for each linear layer; quantisation to four bits stores the weights in blocks with one scale each. \
0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 2025 2026 3.14 42 + - * / = ( ) [ ] { } < > \" ' , ; : ! ? \
the of and to in is that it for on with as was by at be this are from or have an they which one you \
were her all she there would their we him been has when who will more no if out so said what up its \
about into than them can only other new some could time these two may then do first any my now such \
like our over man me even most made after also did many before must through back years where much your \
way well down should because each just those people how too little state good very make world still \
own see men work long get here between both life being under never day same another know while last";

/// splitmix64: a tiny, portable generator; weights must not depend on a library's sampling.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-bound, bound), from 24 random bits so it is exact in f32.
    fn uniform(&mut self, bound: f32) -> f32 {
        let u = (self.next() >> 40) as f32 / (1u64 << 24) as f32;
        (2.0 * u - 1.0) * bound
    }
}

/// GPT-2's byte-to-unicode table used by byte-level BPE.
pub fn bytes_to_unicode() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        table[*b as usize] = char::from_u32(c).expect("valid");
    }
    table
}

/// Learn up to `n_merges` BPE merges from the corpus (and `extra` text, whitespace-separated);
/// ties go to the smaller pair.
fn learn_merges(n_merges: usize, extra: &str) -> Vec<(String, String)> {
    let table = bytes_to_unicode();
    let mut words: BTreeMap<Vec<String>, usize> = BTreeMap::new();
    let text = CORPUS.split(' ').chain(extra.split_whitespace());
    for (i, w) in text.filter(|w| !w.is_empty()).enumerate() {
        let text = if i == 0 {
            w.to_string()
        } else {
            format!(" {w}")
        };
        let syms = text
            .bytes()
            .map(|b| table[b as usize].to_string())
            .collect();
        *words.entry(syms).or_default() += 1;
    }
    let mut merges = Vec::new();
    while merges.len() < n_merges {
        let mut counts: HashMap<(&str, &str), usize> = HashMap::new();
        for (w, c) in &words {
            for p in w.windows(2) {
                *counts.entry((&p[0], &p[1])).or_default() += c;
            }
        }
        let Some((best, _)) = counts
            .into_iter()
            .max_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.cmp(&a.0)))
        else {
            break;
        };
        let (l, r) = (best.0.to_string(), best.1.to_string());
        let joined = format!("{l}{r}");
        words = words
            .into_iter()
            .map(|(w, c)| {
                let mut out = Vec::with_capacity(w.len());
                let mut i = 0;
                while i < w.len() {
                    if i + 1 < w.len() && w[i] == l && w[i + 1] == r {
                        out.push(joined.clone());
                        i += 2;
                    } else {
                        out.push(w[i].clone());
                        i += 1;
                    }
                }
                (out, c)
            })
            .fold(BTreeMap::new(), |mut m, (w, c)| {
                *m.entry(w).or_default() += c;
                m
            });
        merges.push((l, r));
    }
    merges
}

/// tokenizer.json of a byte-level BPE with `vocab` entries at most (special tokens included).
pub fn tokenizer_json(vocab: usize) -> Result<(Value, usize)> {
    tokenizer_json_with(vocab, "")
}

/// The same, its merges learned from the built-in text and `extra`.
fn tokenizer_json_with(vocab: usize, extra: &str) -> Result<(Value, usize)> {
    if vocab < 256 + SPECIAL_TOKENS.len() {
        return Err(Error::Config(format!(
            "--vocab must be at least {}",
            256 + SPECIAL_TOKENS.len()
        )));
    }
    let table = bytes_to_unicode();
    let mut ids: Vec<String> = (0..256).map(|b| table[b].to_string()).collect();
    let merges = learn_merges(vocab - 256 - SPECIAL_TOKENS.len(), extra);
    for (l, r) in &merges {
        ids.push(format!("{l}{r}"));
    }
    let mut vocab_map = serde_json::Map::new();
    for (i, t) in ids.iter().enumerate() {
        vocab_map.insert(t.clone(), json!(i));
    }
    let added: Vec<Value> = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({"id": ids.len() + i, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let merges: Vec<String> = merges.iter().map(|(l, r)| format!("{l} {r}")).collect();
    let byte_level = |prefix: bool, trim: bool| json!({"type": "ByteLevel", "add_prefix_space": prefix, "trim_offsets": trim, "use_regex": true});
    let tok = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": byte_level(false, true),
        "post_processor": byte_level(true, false),
        "decoder": byte_level(true, true),
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab_map, "merges": merges
        }
    });
    Ok((tok, ids.len() + SPECIAL_TOKENS.len()))
}

/// Write the model directory.
pub fn init_tiny(dir: &Path, spec: &TinySpec) -> Result<()> {
    init_tiny_with_corpus(dir, spec, "")
}

/// Write the model directory, its tokenizer's merges learned from the built-in text and
/// `corpus` (so that a model for one domain reads its words as tokens, not bytes).
pub fn init_tiny_with_corpus(dir: &Path, spec: &TinySpec, corpus: &str) -> Result<()> {
    let TinySpec {
        layers,
        hidden,
        heads,
        kv_heads,
        vocab,
        seed,
        ..
    } = *spec;
    if heads == 0 || kv_heads == 0 || hidden % heads != 0 || heads % kv_heads != 0 {
        return Err(Error::Config(format!(
            "hidden {hidden}, heads {heads}, kv-heads {kv_heads}: hidden must divide by heads and heads by kv-heads"
        )));
    }
    let head_dim = hidden / heads;
    if head_dim % 2 != 0 {
        return Err(Error::Config(format!(
            "head dimension {head_dim} must be even for RoPE"
        )));
    }
    let inter = spec
        .intermediate
        .unwrap_or((8 * hidden / 3).div_ceil(32) * 32);
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;

    let (tok, tok_len) = tokenizer_json_with(vocab, corpus)?;
    let special_id = |name: &str| {
        tok_len - SPECIAL_TOKENS.len()
            + SPECIAL_TOKENS
                .iter()
                .position(|t| *t == name)
                .expect("special")
    };
    let (bos, eos, pad) = (
        special_id("<|endoftext|>"),
        special_id("<|im_end|>"),
        special_id("<|endoftext|>"),
    );

    let mut rng = SplitMix(seed);
    let dev = Device::Cpu;
    let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
    let mat = |rng: &mut SplitMix, rows: usize, cols: usize, bound: f32| -> Result<Tensor> {
        let v: Vec<f32> = (0..rows * cols).map(|_| rng.uniform(bound)).collect();
        Ok(Tensor::from_vec(v, (rows, cols), &dev)?)
    };
    let lin =
        |rng: &mut SplitMix, out: usize, inp: usize| mat(rng, out, inp, 1.0 / (inp as f32).sqrt());
    let norm = |rng: &mut SplitMix, n: usize| -> Result<Tensor> {
        let v: Vec<f32> = (0..n).map(|_| 1.0 + rng.uniform(0.1)).collect();
        Ok(Tensor::from_vec(v, n, &Device::Cpu)?)
    };
    tensors.insert(
        "model.embed_tokens.weight".into(),
        mat(&mut rng, vocab, hidden, 1.0)?,
    );
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        tensors.insert(
            format!("{p}.input_layernorm.weight"),
            norm(&mut rng, hidden)?,
        );
        tensors.insert(
            format!("{p}.self_attn.q_proj.weight"),
            lin(&mut rng, heads * head_dim, hidden)?,
        );
        tensors.insert(
            format!("{p}.self_attn.k_proj.weight"),
            lin(&mut rng, kv_heads * head_dim, hidden)?,
        );
        tensors.insert(
            format!("{p}.self_attn.v_proj.weight"),
            lin(&mut rng, kv_heads * head_dim, hidden)?,
        );
        tensors.insert(
            format!("{p}.self_attn.o_proj.weight"),
            lin(&mut rng, hidden, heads * head_dim)?,
        );
        tensors.insert(
            format!("{p}.post_attention_layernorm.weight"),
            norm(&mut rng, hidden)?,
        );
        tensors.insert(
            format!("{p}.mlp.gate_proj.weight"),
            lin(&mut rng, inter, hidden)?,
        );
        tensors.insert(
            format!("{p}.mlp.up_proj.weight"),
            lin(&mut rng, inter, hidden)?,
        );
        tensors.insert(
            format!("{p}.mlp.down_proj.weight"),
            lin(&mut rng, hidden, inter)?,
        );
    }
    tensors.insert("model.norm.weight".into(), norm(&mut rng, hidden)?);
    tensors.insert("lm_head.weight".into(), lin(&mut rng, vocab, hidden)?);
    let path = dir.join("model.safetensors");
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let views: Vec<(String, Tensor)> = tensors.into_iter().collect();
    safetensors::serialize_to_file(
        views.iter().map(|(k, v)| (k.as_str(), v)),
        Some(meta),
        &path,
    )
    .map_err(|e| Error::parse(&path, e))?;

    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": null,
        "attention_bias": false,
        "attention_dropout": 0.0,
        "mlp_bias": false,
        "tie_word_embeddings": false,
        "initializer_range": 0.02,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": "float32",
        "use_cache": true
    });
    let generation =
        json!({"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad, "do_sample": false});
    let added_decoder: serde_json::Map<String, Value> = SPECIAL_TOKENS
        .iter()
        .map(|t| {
            (special_id(t).to_string(), json!({"content": t, "lstrip": false, "normalized": false, "rstrip": false, "single_word": false, "special": true}))
        })
        .collect();
    let tok_config = json!({
        "add_bos_token": false,
        "add_prefix_space": false,
        "added_tokens_decoder": added_decoder,
        "bos_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": null,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": false,
        "model_max_length": 2048,
        "tokenizer_class": "PreTrainedTokenizerFast"
    });
    let specials = json!({"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"});
    let pretty = |v: &Value| serde_json::to_vec_pretty(v).expect("serialisable");
    write(&dir.join("config.json"), pretty(&config))?;
    write(&dir.join("generation_config.json"), pretty(&generation))?;
    write(&dir.join("tokenizer.json"), pretty(&tok))?;
    write(&dir.join("tokenizer_config.json"), pretty(&tok_config))?;
    write(&dir.join("special_tokens_map.json"), pretty(&specials))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_a_bijection() {
        let t = bytes_to_unicode();
        let set: std::collections::BTreeSet<char> = t.iter().copied().collect();
        assert_eq!(set.len(), 256);
        assert_eq!(t[b' ' as usize], 'Ġ');
    }

    #[test]
    fn merges_are_deterministic_and_frequent_first() {
        let a = learn_merges(50, "");
        assert_eq!(a, learn_merges(50, ""));
        assert_eq!(a.len(), 50);
        // " t" / "th" / "he" are among the most frequent pairs of English text.
        assert!(
            a[..10]
                .iter()
                .any(|(l, r)| (l.as_str(), r.as_str()) == ("Ġ", "t")
                    || (l.as_str(), r.as_str()) == ("t", "h")),
            "{a:?}"
        );
    }

    /// Without tools the template is plain ChatML (what the recorded reference prompts used);
    /// with them, the definitions, calls and results render as Qwen2.5's template does.
    #[test]
    fn the_chat_template_is_chatml_and_renders_tools() {
        let dir = tempfile::tempdir().unwrap();
        init_tiny(dir.path(), &TinySpec::default()).unwrap();
        let tok = crate::tokenizer::Tokenizer::load(dir.path()).unwrap();
        let plain = serde_json::json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
        ]);
        assert_eq!(
            tok.render_chat(&plain, None, true).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n\
             <|im_start|>assistant\nhello<|im_end|>\n<|im_start|>assistant\n"
        );
        let tools = serde_json::json!([{"type": "function", "function": {"name": "weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
        let turns = serde_json::json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
                "function": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        ]);
        let text = tok.render_chat(&turns, Some(&tools), true).unwrap();
        assert!(
            text.starts_with("<|im_start|>system\nBe brief.\n\n# Tools"),
            "{text}"
        );
        assert!(text.contains("\"name\":\"weather\""), "{text}");
        assert!(
            text.contains("<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"),
            "{text}"
        );
        assert!(
            text.contains("<tool_response>\nsunny\n</tool_response>"),
            "{text}"
        );
        assert_eq!(text.matches("Be brief.").count(), 1, "{text}");
    }
}
