//! `loraops data …`: dataset curation. The pipeline lives in `loraops_trainer::curate`; this
//! module maps flags onto its configuration (file `[curate]` table < flags) and prints.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use loraops_trainer::curate::{CurateConfig, Event, curate, format::FormatChoice};

use super::{ConfigError, Global, UsageError};

#[derive(Debug, Subcommand)]
pub enum DataCmd {
    /// Validate, normalise, PII-mask, deduplicate (exact + MinHash), filter and split JSONL
    /// datasets into train/val/holdout/regression with report.json.
    Curate(CurateArgs),
}

#[derive(Debug, Args)]
pub struct CurateArgs {
    /// Input JSONL files (SFT, preference or KTO rows).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Output directory for the splits, rejected.jsonl and report.json.
    #[arg(long)]
    out: PathBuf,
    /// Seed of the split assignment.
    #[arg(long)]
    seed: Option<u64>,
    /// Dataset family (default: the first valid row's).
    #[arg(long, value_parser = ["auto", "sft", "preference", "kto"])]
    format: Option<String>,
    /// JSONL rows pinned as the regression split.
    #[arg(long)]
    regression_file: Option<PathBuf>,
    /// Jaccard similarity at which rows count as near duplicates.
    #[arg(long)]
    near_dup_threshold: Option<f64>,
    /// Split fractions train,val,holdout[,regression].
    #[arg(long, value_delimiter = ',')]
    fractions: Option<Vec<f64>>,
    /// Do not mask PII.
    #[arg(long)]
    no_pii: bool,
}

pub fn run(cmd: DataCmd, global: &Global) -> anyhow::Result<()> {
    match cmd {
        DataCmd::Curate(a) => curate_cmd(a, global),
    }
}

fn curate_cmd(a: CurateArgs, global: &Global) -> anyhow::Result<()> {
    let mut cfg = match &global.config {
        Some(p) => CurateConfig::from_toml_file(p)
            .map_err(|e| anyhow::Error::new(ConfigError(e.to_string())))?,
        None => CurateConfig::default(),
    };
    if let Some(s) = a.seed {
        cfg.seed = s;
    }
    if let Some(f) = a.format {
        cfg.format = match f.as_str() {
            "sft" => FormatChoice::Sft,
            "preference" => FormatChoice::Preference,
            "kto" => FormatChoice::Kto,
            _ => FormatChoice::Auto,
        };
    }
    if let Some(r) = a.regression_file {
        cfg.splits.regression_file = Some(r);
    }
    if let Some(t) = a.near_dup_threshold {
        cfg.dedup.threshold = t;
    }
    if let Some(f) = a.fractions {
        if !(3..=4).contains(&f.len()) {
            return Err(
                UsageError("--fractions takes train,val,holdout[,regression]".into()).into(),
            );
        }
        cfg.splits.train = f[0];
        cfg.splits.val = f[1];
        cfg.splits.holdout = f[2];
        cfg.splits.regression = f.get(3).copied().unwrap_or(0.0);
    }
    if a.no_pii {
        cfg.pii.enabled = false;
    }

    let bar = if global.json {
        ProgressBar::hidden()
    } else {
        let b = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        b.set_style(
            ProgressStyle::with_template(
                "{bar:30} {bytes}/{total_bytes}  {msg}  {bytes_per_sec}  ETA {eta}",
            )
            .expect("valid template"),
        );
        b
    };
    let mut inputs = a.inputs.clone();
    inputs.extend(cfg.splits.regression_file.clone());
    let result = curate(&a.inputs, &a.out, &cfg, &mut |e| match e {
        Event::Progress { bytes, total, rows } => {
            bar.set_length(total);
            bar.set_position(bytes);
            bar.set_message(format!("{rows} rows"));
        }
    });
    bar.finish_and_clear();
    let report = result.map_err(|e| {
        use loraops_trainer::Error as E;
        match e {
            E::Config(_) => anyhow::Error::new(ConfigError(e.to_string())),
            E::Parse { .. } | E::Data { .. } => anyhow::Error::new(UsageError(e.to_string())),
            // An input that cannot be read is bad input; an output that cannot be written is not.
            E::Io { ref path, .. } if inputs.contains(path) => {
                anyhow::Error::new(UsageError(e.to_string()))
            }
            e => anyhow::Error::new(e),
        }
    })?;
    if global.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.summary());
        println!("report: {}", a.out.join("report.json").display());
    }
    Ok(())
}
