//! A minimal command line over the trainer library, used by the reference and benchmark
//! scripts so they need not build the whole `loraops` binary:
//!
//!   trainer init-tiny DIR [--layers N --hidden N --heads N --kv-heads N --vocab N --intermediate N --seed N]
//!   trainer sft CONFIG.toml

use std::path::PathBuf;

use loraops_model::tiny::{TinySpec, init_tiny};
use loraops_trainer::sft::{Event, SftConfig, train_sft};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("init-tiny") => {
            let dir = PathBuf::from(args.get(1).ok_or("init-tiny DIR")?);
            let mut spec = TinySpec::default();
            for pair in args[2..].chunks(2) {
                let v: u64 = pair.get(1).ok_or("flag without value")?.parse()?;
                match pair[0].as_str() {
                    "--layers" => spec.layers = v as usize,
                    "--hidden" => spec.hidden = v as usize,
                    "--heads" => spec.heads = v as usize,
                    "--kv-heads" => spec.kv_heads = v as usize,
                    "--vocab" => spec.vocab = v as usize,
                    "--intermediate" => spec.intermediate = Some(v as usize),
                    "--seed" => spec.seed = v,
                    other => return Err(format!("unknown flag {other}").into()),
                }
            }
            init_tiny(&dir, &spec)?;
        }
        Some("sft") => {
            let path = args.get(1).ok_or("sft CONFIG.toml")?;
            let cfg: SftConfig = toml::from_str(&std::fs::read_to_string(path)?)?;
            let out = train_sft(&cfg, &candle_core::Device::Cpu, &mut |e| {
                if let Event::Step(m) = e {
                    println!("{}", serde_json::to_string(m).expect("serialisable"));
                }
            })?;
            eprintln!("{}", serde_json::to_string(&out)?);
        }
        _ => return Err("usage: trainer init-tiny DIR [flags] | trainer sft CONFIG.toml".into()),
    }
    Ok(())
}
