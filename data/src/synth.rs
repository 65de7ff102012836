//! Synthetic SFT rows (`loraops data synth`), self-instruct style, through an OpenAI-compatible
//! gateway.
//!
//! Each candidate shows the model `few_shot` seed rows (seeded draw) and asks for one new
//! instruction, then asks the same model to answer it. Candidates go through curation's
//! screening ([`Screen`]: normalisation, PII masking, the quality filters) and its dedup
//! [`Index`] (exact and MinHash near, against the seeds, indexed first, and against earlier
//! candidates), then the optional curation judge (an answer without a score rejects the
//! candidate rather than the run). Rounds of `per_round` candidates run `concurrency` at a
//! time until the accepted pool holds `pool_factor × rows` candidates, `max_rounds` rounds
//! have run or `max_candidates` were generated; then maximal marginal relevance picks `rows`
//! of the pool (relevance: the judge's score when there is one). Every written row carries
//! its provenance.
//!
//! Output: `synthetic.jsonl`, `rejected.jsonl` (each rejected candidate with its reason and
//! text) and `report.json`. No accepted candidate at all is an error (after writing the
//! report); a gateway that cannot be reached, or answers 4xx, fails the run naming its URL.
//!
//! Configuration (`--config FILE`: its `[data.synth]` or `[synth]` table; defaults shown):
//!
//! ```toml
//! [synth]
//! url = "http://127.0.0.1:8500/v1"   # OpenAI API base of the gateway
//! model = "base-or-ADAPTER@V"
//! api_key_env = "LORAOPS_TOKEN"       # optional
//! rows = 100
//! few_shot = 3
//! per_round = 16
//! max_rounds = 50
//! max_candidates = 2000
//! pool_factor = 2.0
//! concurrency = 4
//! temperature = 0.9
//! instruction_max_tokens = 96
//! answer_max_tokens = 256
//! seed = 0
//! lambda = 0.5
//! [synth.filters]   # as [curate.filters]; also [synth.pii], [synth.dedup], [synth.judge]
//! ```

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::chat::{ChatClient, ChatError, ChatSettings, resolve_token};
use crate::curate::dedup::{DedupConfig, Index, Seen, mix64};
use crate::curate::filters::FilterConfig;
use crate::curate::judge::{JudgeConfig, JudgeError, RowJudge};
use crate::curate::pii::{PiiConfig, PiiCounts, PiiKind};
use crate::curate::report::{InputReport, JudgeReport, Reason, SelectionReport, SplitReport};
use crate::curate::screen::Screen;
use crate::curate::select;
use crate::curate::splits::SplitWriter;
use crate::format::{self, Family, Record, UnicodeForm};
use crate::row::{Row, Sft};
use crate::{Error, Result};

/// `[synth]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SynthConfig {
    /// Base URL of the OpenAI-compatible API (`…/v1`).
    pub url: String,
    /// `model` of the requests: the base model's name, `ADAPTER` or `ADAPTER@V`.
    pub model: String,
    /// Environment variable holding a bearer token, if any.
    pub api_key_env: Option<String>,
    /// A bearer token given on the command line (never read from or written to a file).
    #[serde(skip)]
    pub api_key: Option<String>,
    /// Rows to write.
    pub rows: usize,
    /// Seed rows shown as examples per candidate.
    pub few_shot: usize,
    /// Candidates generated per round.
    pub per_round: usize,
    pub max_rounds: usize,
    /// Candidates generated in all, at most (default: 20 × rows).
    pub max_candidates: Option<usize>,
    /// Stop once this many times `rows` candidates are accepted (MMR picks among them).
    pub pool_factor: f64,
    /// Candidates in flight at once.
    pub concurrency: usize,
    pub temperature: f64,
    pub instruction_max_tokens: u64,
    pub answer_max_tokens: u64,
    pub timeout_s: u64,
    /// Retries per request on transport errors, 429 and 5xx answers.
    pub retries: usize,
    /// Seed examples are cut to this many characters in the prompt.
    pub example_max_chars: usize,
    pub seed: u64,
    /// MMR: 1 relevance only, 0 diversity only.
    pub lambda: f64,
    pub unicode: UnicodeForm,
    pub pii: PiiConfig,
    pub filters: FilterConfig,
    pub dedup: DedupConfig,
    /// Optional judge (off by default).
    pub judge: SynthJudge,
    /// How many rejected candidates report.json lists (all go to rejected.jsonl).
    pub listed_limit: usize,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8500/v1".into(),
            model: String::new(),
            api_key_env: None,
            api_key: None,
            rows: 100,
            few_shot: 3,
            per_round: 16,
            max_rounds: 50,
            max_candidates: None,
            pool_factor: 2.0,
            concurrency: 4,
            temperature: 0.9,
            instruction_max_tokens: 96,
            answer_max_tokens: 256,
            timeout_s: 120,
            retries: 2,
            example_max_chars: 1500,
            seed: 0,
            lambda: 0.5,
            unicode: UnicodeForm::Nfc,
            pii: PiiConfig::default(),
            filters: FilterConfig::default(),
            dedup: DedupConfig::default(),
            judge: SynthJudge::default(),
            listed_limit: 100,
        }
    }
}

impl SynthConfig {
    /// Read the `[data.synth]` or `[synth]` table of a TOML file (defaults without one).
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text =
            String::from_utf8(crate::error::read(path)?).map_err(|e| Error::parse(path, e))?;
        let v: toml::Table = toml::from_str(&text).map_err(|e| Error::parse(path, e))?;
        match v
            .get("data")
            .and_then(|d| d.get("synth"))
            .or_else(|| v.get("synth"))
        {
            Some(t) => t.clone().try_into().map_err(|e| Error::parse(path, e)),
            None => Ok(Self::default()),
        }
    }

    /// Candidates generated in all, at most.
    pub fn candidate_limit(&self) -> usize {
        self.max_candidates
            .unwrap_or_else(|| self.rows.saturating_mul(20))
    }

    fn check(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Config(format!("synth: {m}")));
        if self.model.trim().is_empty() {
            return bad("`model` is required (the base model's name, ADAPTER or ADAPTER@V)");
        }
        if self.rows == 0 {
            return bad("rows must be at least 1");
        }
        if self.few_shot == 0 || self.per_round == 0 || self.max_rounds == 0 {
            return bad("few_shot, per_round and max_rounds must be at least 1");
        }
        if self.candidate_limit() == 0 {
            return bad("max_candidates must be at least 1");
        }
        if !(self.pool_factor.is_finite() && self.pool_factor >= 1.0) {
            return bad("pool_factor must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.lambda) {
            return bad("lambda must be in [0, 1]");
        }
        if !(0.0..=2.0).contains(&self.temperature) {
            return bad("temperature must be in [0, 2]");
        }
        if self.instruction_max_tokens == 0 || self.answer_max_tokens == 0 {
            return bad("instruction_max_tokens and answer_max_tokens must be at least 1");
        }
        let d = &self.dedup;
        if d.bands == 0 || d.rows == 0 || d.shingle_size == 0 || !(0.0..=1.0).contains(&d.threshold)
        {
            return bad(
                "dedup: bands, rows and shingle_size must be positive, threshold in [0, 1]",
            );
        }
        Ok(())
    }
}

/// `[synth.judge]`: the curation judge ([`RowJudge`]) on the candidates.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SynthJudge {
    pub enabled: bool,
    /// Default: the generator's endpoint, and its token.
    pub url: Option<String>,
    pub api_key_env: Option<String>,
    /// Default: the generator's model.
    pub model: Option<String>,
    pub rubric: String,
    /// Candidates scoring below this are rejected.
    pub threshold: f64,
}

impl Default for SynthJudge {
    fn default() -> Self {
        let j = JudgeConfig::default();
        Self {
            enabled: false,
            url: None,
            api_key_env: None,
            model: None,
            rubric: j.rubric,
            threshold: j.threshold,
        }
    }
}

impl SynthJudge {
    /// The judge's configuration, filled in from the generator's.
    pub fn resolve(&self, cfg: &SynthConfig, token: Option<String>) -> JudgeConfig {
        JudgeConfig {
            enabled: self.enabled,
            url: self.url.clone().unwrap_or_else(|| cfg.url.clone()),
            model: self.model.clone().unwrap_or_else(|| cfg.model.clone()),
            rubric: self.rubric.clone(),
            threshold: self.threshold,
            // Synthetic rows the judge doubts are dropped, never kept down-weighted.
            weight_below: None,
            weight: 1.0,
            api_key_env: self.api_key_env.clone(),
            // Another endpoint gets the generator's token only when nothing else is named.
            api_key: if self.api_key_env.is_none() {
                token
            } else {
                None
            },
            concurrency: cfg.concurrency,
            timeout_s: cfg.timeout_s,
            retries: cfg.retries,
            ..JudgeConfig::default()
        }
    }
}

/// Progress of a run, after each round: candidates generated and accepted so far, and the
/// pool wanted.
#[derive(Debug, Clone, Copy)]
pub struct Round {
    pub round: usize,
    pub generated: usize,
    pub accepted: usize,
    pub target: usize,
}

/// A seed row as an example: its instruction and its answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub id: String,
    pub instruction: String,
    pub answer: String,
}

/// The instruction and answer of an SFT row: the first user turn (after the system prompt)
/// and the last assistant turn, `prompt`/`completion`, or `instruction` (+ `input`)/`output`.
pub fn example_of(rec: &Record) -> Option<(String, String)> {
    match rec.row().ok()? {
        Row::Sft(sft) => instruction_and_answer(&sft),
        _ => None,
    }
}

/// [`example_of`] for a typed SFT row.
pub fn instruction_and_answer(row: &Sft) -> Option<(String, String)> {
    match row {
        Sft::Chat(msgs) => {
            let first_user = msgs.iter().find(|m| m.role == "user")?;
            let last_answer = msgs.iter().rev().find(|m| m.role == "assistant")?;
            Some((first_user.content.clone()?, last_answer.content.clone()?))
        }
        Sft::Alpaca {
            instruction,
            input,
            output,
        } => {
            let instruction = if input.trim().is_empty() {
                instruction.clone()
            } else {
                format!("{instruction}\n\n{input}")
            };
            Some((instruction, output.clone()))
        }
        Sft::Completion { prompt, completion } => Some((prompt.joined(), completion.joined())),
    }
}

/// The text dedup compares for an instruction and its answer, whatever the row format.
fn pair_text(instruction: &str, answer: &str) -> String {
    format!("{instruction}\n{answer}")
}

/// Tidy a generated instruction: drop a leading label (`Task:`, `Instruction:`, `New task:`),
/// surrounding quotes, and anything after a line that starts an answer.
pub fn clean_instruction(s: &str) -> String {
    let mut t = s.trim();
    for label in ["new task:", "task:", "instruction:", "new instruction:"] {
        if t.len() >= label.len()
            && t.is_char_boundary(label.len())
            && t[..label.len()].eq_ignore_ascii_case(label)
        {
            t = t[label.len()..].trim_start();
        }
    }
    let mut out = Vec::new();
    for line in t.lines() {
        let l = line.trim_start().to_ascii_lowercase();
        if l.starts_with("answer:") || l.starts_with("response:") || l.starts_with("output:") {
            break;
        }
        out.push(line);
    }
    let t = out.join("\n");
    let t = t.trim();
    let t = t
        .strip_prefix('"')
        .and_then(|x| x.strip_suffix('"'))
        .unwrap_or(t);
    t.trim().to_string()
}

/// The prompt asking for one new instruction, given the examples.
pub fn instruction_prompt(examples: &[&Example], max_chars: usize) -> String {
    let cut = |s: &str| -> String {
        if s.chars().count() > max_chars {
            s.chars().take(max_chars).collect::<String>() + " …"
        } else {
            s.to_string()
        }
    };
    let mut p = String::from(
        "You write new tasks for training an assistant. Here are examples of tasks and their answers.\n",
    );
    for (i, e) in examples.iter().enumerate() {
        p.push_str(&format!(
            "\n### Example {}\nTask: {}\nAnswer: {}\n",
            i + 1,
            cut(&e.instruction),
            cut(&e.answer)
        ));
    }
    p.push_str(
        "\nWrite one new task of the same kind and difficulty that differs from the examples. Reply with the task only, without an answer.",
    );
    p
}

/// Which seed rows candidate `index` of `round` shows (distinct, seeded, independent of
/// scheduling).
pub fn draw_examples(
    seed: u64,
    round: usize,
    index: usize,
    n_seeds: usize,
    k: usize,
) -> Vec<usize> {
    let mut rng = StdRng::seed_from_u64(mix64(
        seed ^ mix64(((round as u64) << 32) ^ index as u64 ^ 0x5717),
    ));
    rand::seq::index::sample(&mut rng, n_seeds, k.min(n_seeds)).into_vec()
}

/// Provenance written into every synthetic row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    pub synthetic: bool,
    /// The model that wrote the instruction and the answer.
    pub generator: String,
    /// The seed rows shown as examples (their `id`, else `FILE:LINE`).
    pub seed_ids: Vec<String>,
    pub round: usize,
    pub judge_score: Option<f64>,
    /// RFC 3339.
    pub created_at: String,
}

/// A synthetic row: the chat turns, `source = "synthetic"` and the provenance.
pub fn synthetic_row(instruction: &str, answer: &str, p: &Provenance) -> Value {
    json!({
        "messages": [
            {"role": "user", "content": instruction},
            {"role": "assistant", "content": answer},
        ],
        "source": "synthetic",
        "provenance": p,
    })
}

/// A candidate that was not kept.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rejection {
    pub round: usize,
    pub index: usize,
    /// `generation_error`, `empty_instruction`, `empty_answer`, `invalid`, a filter's reason,
    /// `exact_duplicate`, `near_duplicate` or `judge`.
    pub reason: Reason,
    pub detail: String,
    pub instruction: String,
    pub answer: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SynthCounts {
    /// Candidates asked for (both requests answered or not).
    pub generated: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub exact_duplicates: u64,
    pub near_duplicates: u64,
    /// Duplicates (exact or near) whose representative is a seed row.
    pub duplicates_of_seeds: u64,
    pub judge_rejected: u64,
    /// Accepted candidates MMR left out.
    pub not_selected: u64,
    pub selected: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SeedReport {
    pub files: Vec<InputReport>,
    /// Usable seed rows.
    pub rows: u64,
    /// Rows that are not SFT rows (listed up to `listed_limit`).
    pub invalid: u64,
    pub invalid_listed: Vec<String>,
}

/// Why generation stopped; report.json names it in snake case.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stopped {
    /// `max_rounds` rounds ran.
    #[default]
    MaxRounds,
    /// `max_candidates` candidates were generated.
    MaxCandidates,
    /// The pool of accepted candidates reached `pool_factor × rows`.
    PoolFull,
}

impl Stopped {
    pub fn as_str(self) -> &'static str {
        match self {
            Stopped::MaxRounds => "max_rounds",
            Stopped::MaxCandidates => "max_candidates",
            Stopped::PoolFull => "pool_full",
        }
    }
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything a synth run did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SynthReport {
    pub generator: String,
    pub url: String,
    pub seed: u64,
    pub seeds: SeedReport,
    pub rounds: usize,
    /// Why generation stopped.
    pub stopped: Stopped,
    pub counts: SynthCounts,
    pub rejected_by_reason: BTreeMap<String, u64>,
    /// The first `listed_limit` rejected candidates (all are in rejected.jsonl).
    pub rejected: Vec<Rejection>,
    pub judge: JudgeReport,
    /// Masked values per PII type in the written rows.
    pub pii: BTreeMap<String, u64>,
    pub selection: SelectionReport,
    pub output: SplitReport,
    pub warnings: Vec<String>,
    pub elapsed_s: f64,
}

impl SynthReport {
    pub fn summary(&self) -> String {
        use std::fmt::Write as _;
        let c = &self.counts;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "generator {} ({}): {} seed rows, {} rounds ({}), {:.1}s",
            self.generator, self.url, self.seeds.rows, self.rounds, self.stopped, self.elapsed_s
        );
        let _ = writeln!(
            s,
            "{} candidates: {} accepted, {} rejected ({} exact dups, {} near dups, {} of seeds, {} judged below threshold); {} selected by MMR (lambda {})",
            c.generated,
            c.accepted,
            c.rejected,
            c.exact_duplicates,
            c.near_duplicates,
            c.duplicates_of_seeds,
            c.judge_rejected,
            c.selected,
            self.selection.lambda
        );
        if !self.rejected_by_reason.is_empty() {
            let r: Vec<String> = self
                .rejected_by_reason
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            let _ = writeln!(s, "rejected: {}", r.join(", "));
        }
        let _ = writeln!(
            s,
            "{} {} rows  {}",
            self.output.path.display(),
            self.output.rows,
            self.output.sha256
        );
        for w in &self.warnings {
            let _ = writeln!(s, "warning: {w}");
        }
        s
    }
}

/// What the two requests of one candidate returned.
struct Generated {
    examples: Vec<usize>,
    result: std::result::Result<(String, String), ChatError>,
}

/// A candidate that passed screening and dedup, before the judge.
struct Survivor {
    index: usize,
    instruction: String,
    answer: String,
    sig: Vec<u32>,
    shown: Vec<usize>,
    pii: PiiCounts,
}

/// An accepted candidate.
struct Accepted {
    row: Value,
    sig: Vec<u32>,
    relevance: f64,
}

/// Whether a failed request should stop the run rather than count as one rejected candidate:
/// an endpoint that cannot be reached or refuses the request will not do better next time.
fn fatal(e: &ChatError) -> bool {
    match e {
        ChatError::Unreachable { .. } | ChatError::Setup(_) => true,
        ChatError::Status { status, .. } => (400..500).contains(status) && *status != 429,
        ChatError::Answer { .. } => false,
    }
}

fn read_seeds(
    paths: &[PathBuf],
    cfg: &SynthConfig,
    screen: &Screen,
    report: &mut SeedReport,
) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    for p in paths {
        let f = File::open(p).map_err(|e| Error::io(p, e))?;
        if f.metadata().map(|m| m.is_dir()).unwrap_or(false) {
            return Err(Error::parse(p, "is a directory, not a JSONL file"));
        }
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| p.display().to_string());
        let mut hash = Sha256::new();
        let (mut lines, mut bytes) = (0u64, 0u64);
        let mut r = BufReader::new(f);
        loop {
            let mut raw = Vec::new();
            let n = r.read_until(b'\n', &mut raw).map_err(|e| Error::io(p, e))?;
            if n == 0 {
                break;
            }
            hash.update(&raw);
            bytes += n as u64;
            lines += 1;
            let text = String::from_utf8_lossy(&raw);
            let text = text.trim();
            if text.is_empty() {
                continue;
            }
            let parsed = serde_json::from_str::<Value>(text)
                .map_err(|e| format!("not JSON: {e}"))
                .and_then(format::validate)
                .and_then(|row| {
                    if row.family != Family::Sft {
                        return Err(format!(
                            "a {} row; synth needs SFT rows",
                            row.family.describe()
                        ));
                    }
                    example_of(&row)
                        .map(|e| (row.obj.get("id").cloned(), e))
                        .ok_or_else(|| "no instruction and answer".to_string())
                });
            match parsed {
                Ok((id, (instruction, answer))) => {
                    let clean = |s: &str| screen.clean_str(s, &mut PiiCounts::default());
                    let id = match id {
                        Some(Value::String(s)) => s,
                        Some(Value::Number(n)) => n.to_string(),
                        _ => format!("{name}:{lines}"),
                    };
                    out.push(Example {
                        id,
                        instruction: clean(&instruction),
                        answer: clean(&answer),
                    });
                }
                Err(e) => {
                    report.invalid += 1;
                    if report.invalid_listed.len() < cfg.listed_limit {
                        report
                            .invalid_listed
                            .push(format!("{}:{lines}: {e}", p.display()));
                    }
                }
            }
        }
        report.files.push(InputReport {
            path: p.clone(),
            lines,
            bytes,
            sha256: hex::encode(hash.finalize()),
        });
    }
    report.rows = out.len() as u64;
    Ok(out)
}

/// The generator: a chat client and the threads its requests run on.
struct Generator<'a> {
    cfg: &'a SynthConfig,
    chat: ChatClient,
    threads: rayon::ThreadPool,
}

impl<'a> Generator<'a> {
    fn new(cfg: &'a SynthConfig, token: Option<String>) -> Result<Self> {
        let chat = ChatClient::new(&ChatSettings {
            url: cfg.url.clone(),
            token,
            timeout_s: cfg.timeout_s,
            retries: cfg.retries,
        })
        .map_err(ChatError::into_error)?;
        let threads = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.concurrency.max(1))
            .thread_name(|i| format!("synth-{i}"))
            .build()
            .map_err(|e| Error::Config(format!("synth: {e}")))?;
        Ok(Self { cfg, chat, threads })
    }

    /// Candidate `index` of `round`: a new instruction, asked for with a seeded draw of
    /// examples, then its answer.
    fn one(&self, round: usize, index: usize, examples: &[Example]) -> Generated {
        let cfg = self.cfg;
        let picks = draw_examples(cfg.seed, round, index, examples.len(), cfg.few_shot);
        let shown: Vec<&Example> = picks.iter().map(|&p| &examples[p]).collect();
        let ask = json!({
            "model": cfg.model,
            "temperature": cfg.temperature,
            "max_tokens": cfg.instruction_max_tokens,
            "messages": [{"role": "user", "content": instruction_prompt(&shown, cfg.example_max_chars)}],
        });
        let result = self.chat.complete(&ask).and_then(|raw| {
            let instruction = clean_instruction(&raw);
            if instruction.is_empty() {
                return Ok((instruction, String::new()));
            }
            let answer = self.chat.complete(&json!({
                "model": cfg.model,
                "temperature": cfg.temperature,
                "max_tokens": cfg.answer_max_tokens,
                "messages": [{"role": "user", "content": instruction}],
            }))?;
            Ok((instruction, answer))
        });
        Generated {
            examples: picks,
            result,
        }
    }

    /// `n` candidates of `round`, `concurrency` at a time, in candidate order.
    fn round(&self, round: usize, n: usize, examples: &[Example]) -> Vec<Generated> {
        self.threads.install(|| {
            (0..n)
                .into_par_iter()
                .map(|i| self.one(round, i, examples))
                .collect()
        })
    }
}

/// The candidates accepted so far, and the dedup index new ones are checked against (the
/// seeds' instructions and answers first, so a copy of a seed is a duplicate).
struct Pool<'a> {
    cfg: &'a SynthConfig,
    screen: &'a Screen,
    index: Index,
    /// What each representative is, for the rejection's detail.
    reps: Vec<String>,
    /// Representatives below this are seed rows.
    n_seed_reps: u32,
    accepted: Vec<Accepted>,
    /// Masked values in the accepted candidates.
    pii: PiiCounts,
    judge_sum: f64,
}

impl<'a> Pool<'a> {
    fn new(cfg: &'a SynthConfig, screen: &'a Screen, examples: &[Example]) -> Self {
        let mut pool = Pool {
            cfg,
            screen,
            index: Index::new(&cfg.dedup),
            reps: Vec::new(),
            n_seed_reps: 0,
            accepted: Vec::new(),
            pii: PiiCounts::default(),
            judge_sum: 0.0,
        };
        for e in examples {
            let (key, sig) =
                screen.fingerprint(&pair_text(&e.instruction, &e.answer), cfg.dedup.near);
            if let Seen::New { rep: Some(_) } = pool.index.check(key, sig.as_deref(), true) {
                pool.reps.push(format!("seed {}", e.id));
            }
        }
        pool.n_seed_reps = pool.index.len();
        pool
    }

    /// One generated candidate through what curation does to an input row: normalisation,
    /// PII masking, the schema, the quality filters, exact and near dedup. A request the
    /// endpoint refuses, or an endpoint that is down, stops the run.
    fn screen(
        &mut self,
        round: usize,
        index: usize,
        g: Generated,
        report: &mut SynthReport,
    ) -> Result<std::result::Result<Survivor, Rejection>> {
        let reject = |reason: Reason, detail: String, i: &str, a: &str| {
            Ok(Err(Rejection {
                round,
                index,
                reason,
                detail,
                instruction: i.into(),
                answer: a.into(),
            }))
        };
        let (instruction, answer) = match g.result {
            Ok(x) => x,
            Err(e) if fatal(&e) => return Err(e.into_error()),
            Err(e) => return reject(Reason::GenerationError, e.to_string(), "", ""),
        };
        if instruction.trim().is_empty() {
            let detail = "the model wrote no instruction".into();
            return reject(Reason::EmptyInstruction, detail, &instruction, &answer);
        }
        if answer.trim().is_empty() {
            let detail = "the model wrote no answer".into();
            return reject(Reason::EmptyAnswer, detail, &instruction, &answer);
        }
        let mut obj = Map::new();
        obj.insert(
            "messages".into(),
            json!([{"role": "user", "content": instruction}, {"role": "assistant", "content": answer}]),
        );
        let mut pii = PiiCounts::default();
        self.screen.clean(&mut obj, &mut pii);
        let row = match format::validate(Value::Object(obj)) {
            Ok(r) => r,
            Err(e) => return reject(Reason::Invalid, e, &instruction, &answer),
        };
        let (mi, ma) = example_of(&row).expect("a chat row has both turns");
        if let Err((reason, detail)) = self.screen.filter(&format::content_text(&row)) {
            return reject(reason, detail, &mi, &ma);
        }
        let (key, sig) = self.screen.fingerprint(&pair_text(&mi, &ma), true);
        let sig = sig.expect("asked for");
        let near = self.cfg.dedup.near.then_some(sig.as_slice());
        let dup = match self.index.check(key, near, self.cfg.dedup.exact) {
            Seen::Exact { rep } => Some((Reason::ExactDuplicate, rep, 1.0)),
            Seen::Near { rep, jaccard } => Some((Reason::NearDuplicate, rep, jaccard)),
            Seen::New { rep } => {
                if rep.is_some() {
                    self.reps.push(format!("candidate {round}-{index}"));
                }
                None
            }
        };
        if let Some((reason, rep, j)) = dup {
            if reason == Reason::ExactDuplicate {
                report.counts.exact_duplicates += 1;
            } else {
                report.counts.near_duplicates += 1;
            }
            if rep < self.n_seed_reps {
                report.counts.duplicates_of_seeds += 1;
            }
            let detail = format!(
                "duplicate of {} (estimated Jaccard {j:.2})",
                self.reps[rep as usize]
            );
            return reject(reason, detail, &mi, &ma);
        }
        Ok(Ok(Survivor {
            index,
            instruction: mi,
            answer: ma,
            sig,
            shown: g.examples,
            pii,
        }))
    }

    /// The judge's stage (it sees only candidates that passed everything else), then the
    /// survivors join the pool with their provenance.
    #[allow(clippy::too_many_arguments)]
    fn judge_and_accept(
        &mut self,
        round: usize,
        survivors: Vec<Survivor>,
        judge: Option<&RowJudge>,
        examples: &[Example],
        report: &mut SynthReport,
        rejects: &mut Vec<Rejection>,
    ) -> Result<()> {
        let scores: Vec<Option<std::result::Result<_, JudgeError>>> = match judge {
            Some(j) => {
                let texts: Vec<String> = survivors
                    .iter()
                    .map(|s| format!("user: {}\nassistant: {}", s.instruction, s.answer))
                    .collect();
                let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                j.score_each(&refs)
                    .map_err(JudgeError::into_error)?
                    .into_iter()
                    .map(Some)
                    .collect()
            }
            None => survivors.iter().map(|_| None).collect(),
        };
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        for (sv, s) in survivors.into_iter().zip(scores) {
            let (index, i, a) = (sv.index, &sv.instruction, &sv.answer);
            let reject = |detail: String| Rejection {
                round,
                index,
                reason: Reason::Judge,
                detail,
                instruction: i.clone(),
                answer: a.clone(),
            };
            let score = match s {
                None => None,
                Some(Ok(s)) => {
                    report.judge.scored += 1;
                    self.judge_sum += s.score;
                    let th = self.cfg.judge.threshold;
                    if s.score < th {
                        report.judge.rejected += 1;
                        report.counts.judge_rejected += 1;
                        rejects.push(reject(format!(
                            "judge score {} < {th}: {}",
                            s.score, s.reason
                        )));
                        continue;
                    }
                    Some(s.score)
                }
                // A judge that answers without a score is a verdict against the candidate.
                Some(Err(JudgeError::NoScore { answer, .. })) => {
                    report.judge.rejected += 1;
                    report.counts.judge_rejected += 1;
                    rejects.push(reject(format!(
                        "judge answered without a score: {answer:?}"
                    )));
                    continue;
                }
                Some(Err(JudgeError::Chat(e))) => return Err(e.into_error()),
            };
            let prov = Provenance {
                synthetic: true,
                generator: self.cfg.model.clone(),
                seed_ids: sv.shown.iter().map(|&s| examples[s].id.clone()).collect(),
                round,
                judge_score: score,
                created_at: now.clone(),
            };
            self.pii.add(&sv.pii);
            self.accepted.push(Accepted {
                row: synthetic_row(i, a, &prov),
                sig: sv.sig,
                relevance: score.map_or(1.0, |s| s / 10.0),
            });
        }
        Ok(())
    }

    /// MMR's pick of `rows` of the pool (relevance: the judge's score when there is one),
    /// written to `synthetic.jsonl` in the order they were accepted.
    fn write_selection(&self, out: &Path, report: &mut SynthReport) -> Result<u64> {
        let sigs: Vec<Vec<u32>> = self.accepted.iter().map(|a| a.sig.clone()).collect();
        let rel: Vec<f64> = self.accepted.iter().map(|a| a.relevance).collect();
        let mut picks =
            select::mmr_select_signatures(&sigs, self.cfg.rows, self.cfg.lambda, Some(&rel));
        picks.sort_unstable();
        let path = out.join("synthetic.jsonl");
        let mut w = SplitWriter::create(&path)?;
        for &p in &picks {
            w.write_line(&serde_json::to_string(&self.accepted[p].row).expect("JSON"))?;
        }
        let rows = w.rows;
        report.output = SplitReport {
            path: PathBuf::from("synthetic.jsonl"),
            rows,
            sha256: w.finish()?,
            desirable: None,
            undesirable: None,
        };
        report.counts.selected = rows;
        report.counts.not_selected = self.accepted.len() as u64 - rows;
        report.selection = SelectionReport {
            split: "synthetic".into(),
            from: self.accepted.len() as u64,
            selected: rows,
            lambda: self.cfg.lambda,
        };
        for k in PiiKind::ALL {
            if self.pii.get(k) > 0 {
                report.pii.insert(k.name().to_string(), self.pii.get(k));
            }
        }
        Ok(rows)
    }
}

/// A round's rejected candidates, in candidate order, into the report and rejected.jsonl.
fn record_rejections(
    mut rejects: Vec<Rejection>,
    report: &mut SynthReport,
    w: &mut SplitWriter,
    listed_limit: usize,
) -> Result<()> {
    rejects.sort_by_key(|r| r.index);
    for r in rejects {
        report.counts.rejected += 1;
        *report
            .rejected_by_reason
            .entry(r.reason.as_str().into())
            .or_default() += 1;
        w.write_line(&serde_json::to_string(&r).expect("JSON"))?;
        if report.rejected.len() < listed_limit {
            report.rejected.push(r);
        }
    }
    Ok(())
}

impl SynthReport {
    /// Why no candidate was accepted, for the error of such a run.
    fn why_nothing_accepted(&self) -> String {
        let reasons: Vec<String> = self
            .rejected_by_reason
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let first = self
            .rejected
            .first()
            .map(|r| {
                let d: String = r.detail.chars().take(160).collect();
                format!("; first: {}: {d:?}", r.reason)
            })
            .unwrap_or_default();
        format!(
            "synth accepted no candidate: {} generated in {} rounds, rejected: {}{first}",
            self.counts.generated,
            self.rounds,
            if reasons.is_empty() {
                "none".into()
            } else {
                reasons.join(", ")
            }
        )
    }
}

/// Generate synthetic rows from `seeds` into `out` (see the module docs).
pub fn synth(
    seeds: &[PathBuf],
    out: &Path,
    cfg: &SynthConfig,
    on: &mut dyn FnMut(Round),
) -> Result<SynthReport> {
    let started = Instant::now();
    cfg.check()?;
    if seeds.is_empty() {
        return Err(Error::Config("synth: no seed files".into()));
    }
    let screen = Screen::new(cfg.unicode, &cfg.pii, &cfg.filters, &cfg.dedup)?;
    let mut report = SynthReport {
        generator: cfg.model.clone(),
        url: cfg.url.clone(),
        seed: cfg.seed,
        ..Default::default()
    };
    let examples = read_seeds(seeds, cfg, &screen, &mut report.seeds)?;
    if examples.is_empty() {
        let first = report
            .seeds
            .invalid_listed
            .first()
            .map(|f| format!("; first: {f}"))
            .unwrap_or_default();
        return Err(Error::parse(
            &seeds[0],
            format!(
                "no usable seed rows ({} invalid){first}",
                report.seeds.invalid
            ),
        ));
    }
    let token = resolve_token(cfg.api_key.as_deref(), cfg.api_key_env.as_deref(), "synth")
        .map_err(ChatError::into_error)?;
    let generator = Generator::new(cfg, token.clone())?;
    let judge = if cfg.judge.enabled {
        let j = cfg.judge.resolve(cfg, token);
        report.judge.model = Some(j.model.clone());
        report.judge.threshold = Some(j.threshold);
        Some(RowJudge::new(&j).map_err(Error::Config)?)
    } else {
        None
    };
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut rejected_w = SplitWriter::create(&out.join("rejected.jsonl"))?;
    let mut pool = Pool::new(cfg, &screen, &examples);

    // Rounds until the pool is full, or the rounds or candidates run out.
    let target = ((cfg.rows as f64) * cfg.pool_factor).ceil() as usize;
    let limit = cfg.candidate_limit();
    let mut round = 0;
    report.stopped = Stopped::MaxRounds;
    while round < cfg.max_rounds {
        let n = cfg.per_round.min(limit - report.counts.generated as usize);
        if n == 0 {
            report.stopped = Stopped::MaxCandidates;
            break;
        }
        round += 1;
        let batch = generator.round(round, n, &examples);
        report.counts.generated += n as u64;
        // In candidate order, so that a run is reproducible whatever finished first.
        let (mut survivors, mut rejects) = (Vec::new(), Vec::new());
        for (index, g) in batch.into_iter().enumerate() {
            match pool.screen(round, index, g, &mut report)? {
                Ok(s) => survivors.push(s),
                Err(r) => rejects.push(r),
            }
        }
        pool.judge_and_accept(
            round,
            survivors,
            judge.as_ref(),
            &examples,
            &mut report,
            &mut rejects,
        )?;
        record_rejections(rejects, &mut report, &mut rejected_w, cfg.listed_limit)?;
        report.counts.accepted = pool.accepted.len() as u64;
        on(Round {
            round,
            generated: report.counts.generated as usize,
            accepted: pool.accepted.len(),
            target,
        });
        if pool.accepted.len() >= target {
            report.stopped = Stopped::PoolFull;
            break;
        }
        if report.counts.generated as usize >= limit {
            report.stopped = Stopped::MaxCandidates;
            break;
        }
    }
    report.rounds = round;
    rejected_w.finish()?;
    if report.judge.scored > 0 {
        report.judge.mean_score = Some(pool.judge_sum / report.judge.scored as f64);
    }

    let rows = pool.write_selection(out, &mut report)?;
    if report.seeds.invalid > 0 {
        report.warnings.push(format!(
            "{} seed rows are not usable SFT rows (report.json seeds.invalid_listed)",
            report.seeds.invalid
        ));
    }
    if rows > 0 && (rows as usize) < cfg.rows {
        report.warnings.push(format!(
            "only {rows} of {} rows: {} candidates accepted of {} generated ({})",
            cfg.rows, report.counts.accepted, report.counts.generated, report.stopped
        ));
    }
    report.elapsed_s = started.elapsed().as_secs_f64();
    let path = out.join("report.json");
    let json = serde_json::to_vec_pretty(&report).expect("report serialises");
    crate::error::write(&path, json)?;
    if rows == 0 {
        return Err(Error::NothingKept {
            report: path,
            why: report.why_nothing_accepted(),
        });
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn examples_come_from_every_sft_format() {
        let row = |v: Value| format::validate(v).unwrap();
        let chat = row(json!({"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "A2"}]}));
        assert_eq!(example_of(&chat), Some(("Q1".into(), "A2".into())));
        let pc = row(json!({"prompt": "P", "completion": "C"}));
        assert_eq!(example_of(&pc), Some(("P".into(), "C".into())));
        let alpaca = row(json!({"instruction": "Translate", "input": "hello", "output": "안녕"}));
        assert_eq!(
            example_of(&alpaca),
            Some(("Translate\n\nhello".into(), "안녕".into()))
        );
        let alpaca = row(json!({"instruction": "Say hi", "input": "", "output": "hi"}));
        assert_eq!(example_of(&alpaca), Some(("Say hi".into(), "hi".into())));
    }

    #[test]
    fn instructions_are_cleaned() {
        assert_eq!(
            clean_instruction("  Task: Name three rivers.  "),
            "Name three rivers."
        );
        assert_eq!(
            clean_instruction("New task: \"List primes.\""),
            "List primes."
        );
        assert_eq!(
            clean_instruction("Explain tides.\nAnswer: The moon pulls..."),
            "Explain tides."
        );
        assert_eq!(clean_instruction("Answer: nothing"), "");
        assert_eq!(clean_instruction("   "), "");
        // Non-ASCII text right after where a label would end is left alone.
        assert_eq!(
            clean_instruction("바다에 대해 쓰세요"),
            "바다에 대해 쓰세요"
        );
    }

    #[test]
    fn the_prompt_shows_the_examples_cut_to_length() {
        let a = Example {
            id: "a".into(),
            instruction: "Name a colour.".into(),
            answer: "x".repeat(50),
        };
        let b = Example {
            id: "b".into(),
            instruction: "Name a fruit.".into(),
            answer: "Apple.".into(),
        };
        let p = instruction_prompt(&[&a, &b], 10);
        assert!(p.contains("### Example 1\nTask: Name a col …"), "{p}");
        assert!(p.contains(&format!("Answer: {} …", "x".repeat(10))), "{p}");
        assert!(p.contains("### Example 2\nTask: Name a fru …"), "{p}");
        assert!(p.ends_with("without an answer."));
    }

    #[test]
    fn example_draws_are_distinct_seeded_and_bounded() {
        let d = draw_examples(7, 1, 0, 10, 3);
        assert_eq!(d.len(), 3);
        let mut u = d.clone();
        u.sort();
        u.dedup();
        assert_eq!(u.len(), 3);
        assert!(d.iter().all(|&i| i < 10));
        assert_eq!(draw_examples(7, 1, 0, 10, 3), d, "same seed, same draw");
        let others: Vec<Vec<usize>> = (1..20).map(|i| draw_examples(7, 1, i, 10, 3)).collect();
        assert!(
            others.iter().any(|o| *o != d),
            "candidates see different seeds"
        );
        assert_eq!(
            draw_examples(7, 1, 0, 2, 3).len(),
            2,
            "k is capped by the seeds"
        );
    }

    #[test]
    fn provenance_is_written_into_each_row() {
        let p = Provenance {
            synthetic: true,
            generator: "bot@2".into(),
            seed_ids: vec!["s1".into(), "seeds.jsonl:4".into()],
            round: 3,
            judge_score: None,
            created_at: "2026-01-01T00:00:00Z".into(),
        };
        let row = synthetic_row("Q", "A", &p);
        let parsed = format::validate(row.clone()).unwrap();
        assert_eq!(parsed.family, Family::Sft);
        assert_eq!(parsed.source.as_deref(), Some("synthetic"));
        assert_eq!(row["provenance"]["judge_score"], Value::Null);
        assert_eq!(row["provenance"]["seed_ids"][1], "seeds.jsonl:4");
        let back: Provenance = serde_json::from_value(row["provenance"].clone()).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn only_unreachable_or_refusing_endpoints_stop_a_run() {
        let url = "http://x/v1/chat/completions".to_string();
        let status = |s: u16| ChatError::Status {
            url: url.clone(),
            status: s,
            body: String::new(),
        };
        assert!(fatal(&ChatError::Unreachable {
            url: url.clone(),
            message: "refused".into()
        }));
        assert!(fatal(&status(404)));
        assert!(fatal(&status(401)));
        assert!(!fatal(&status(429)));
        assert!(!fatal(&status(503)));
        assert!(!fatal(&ChatError::Answer {
            url,
            message: "bad JSON".into()
        }));
    }

    #[test]
    fn configuration_is_checked() {
        let ok = SynthConfig {
            model: "m".into(),
            ..Default::default()
        };
        assert!(ok.check().is_ok());
        assert_eq!(ok.candidate_limit(), 2000);
        for (c, want) in [
            (SynthConfig::default(), "`model` is required"),
            (
                SynthConfig {
                    rows: 0,
                    ..ok.clone()
                },
                "rows must be",
            ),
            (
                SynthConfig {
                    lambda: 1.5,
                    ..ok.clone()
                },
                "lambda",
            ),
            (
                SynthConfig {
                    pool_factor: 0.5,
                    ..ok.clone()
                },
                "pool_factor",
            ),
            (
                SynthConfig {
                    max_candidates: Some(0),
                    ..ok.clone()
                },
                "max_candidates",
            ),
        ] {
            let e = c.check().unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }
}
