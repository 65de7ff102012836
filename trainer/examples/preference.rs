//! Preference training from a TOML file, for the benchmark and reference scripts (so they need
//! not build the whole `loraops` binary). Prints each step's metrics as a JSON line.
//!
//!   preference dpo|orpo|kto CONFIG.toml

use std::path::Path;

use loraops_trainer::preference::{Method, read_config, train_preference};
use loraops_trainer::sft::Event;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(method), Some(path)) = (args.first(), args.get(1)) else {
        return Err("usage: preference dpo|orpo|kto CONFIG.toml".into());
    };
    let method: Method = method.parse()?;
    let cfg = read_config(Path::new(path), method)?;
    let out = train_preference(&cfg, &candle_core::Device::Cpu, &mut |e| {
        if let Event::Step(m) = e {
            println!("{}", serde_json::to_string(m).expect("serialisable"));
        }
    })?;
    eprintln!("{}", serde_json::to_string(&out)?);
    Ok(())
}
