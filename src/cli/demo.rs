//! `loraops demo`: the lifecycle end to end on embedded defaults — generate a tiny base model,
//! fine-tune a LoRA adapter on a built-in dataset, start a registry, register the base model,
//! push the adapter, push it again (same version), pull it back and verify every byte.

use clap::Args;
use loraops_registry::api::Role;
use loraops_registry::auth::Signer;
use loraops_registry::client::{RegistryClient, no_progress};
use loraops_registry::server::{Application, RegistrySettings, ServeSettings};
use loraops_trainer::sft::{Event, SftConfig, train_sft};
use serde_json::json;

use super::{Global, base_model, up::ensure_tiny_model};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Optimizer steps of the demo fine-tune.
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
}

/// A small chat dataset: the adapter learns to answer in one house style.
fn dataset() -> String {
    let pairs = [
        (
            "How do I reset my password?",
            "Open Settings, choose Security, then Reset password. A link arrives by email.",
        ),
        (
            "Where can I see my invoices?",
            "Invoices are under Billing, then History. Each one can be downloaded as PDF.",
        ),
        (
            "How do I add a team member?",
            "Go to Team, press Invite, and enter their email address.",
        ),
        (
            "Can I change my plan?",
            "Yes: Billing, then Plan. Changes apply from the next cycle.",
        ),
        (
            "How do I delete my account?",
            "Settings, then Account, then Delete. This cannot be undone.",
        ),
        (
            "Is there an API?",
            "Yes. Create a key under Settings, then API keys, and see the reference docs.",
        ),
    ];
    let mut out = String::new();
    for round in 0..4 {
        for (q, a) in pairs {
            let row = json!({"messages": [
                {"role": "system", "content": "You are the support assistant."},
                {"role": "user", "content": if round % 2 == 0 { q.to_string() } else { q.to_lowercase() }},
                {"role": "assistant", "content": a}]});
            out.push_str(&row.to_string());
            out.push('\n');
        }
    }
    out
}

pub fn run(args: DemoArgs, global: &Global) -> anyhow::Result<()> {
    let cfg = global.load_config(&[])?;
    let data_dir = cfg
        .data_dir
        .clone()
        .unwrap_or_else(|| global.data_dir.clone());
    let work = data_dir.join("demo");
    std::fs::create_dir_all(&work)?;

    println!("1/5 base model");
    let base_dir = ensure_tiny_model(&data_dir.join("models").join("tiny-llama"))?;

    println!("2/5 fine-tune a LoRA adapter ({} steps)", args.steps);
    let data = work.join("train.jsonl");
    std::fs::write(&data, dataset())?;
    let adapter = work.join("adapter");
    let sft: SftConfig = serde_json::from_value(json!({
        "model": base_dir, "data": data, "out": adapter, "steps": args.steps, "lr": 2e-3, "r": 8, "alpha": 16.0,
        "batch_size": 4, "seed": 1,
    }))?;
    let mut first = None;
    let outcome = train_sft(&sft, &loraops_trainer::default_device(), &mut |e| {
        if let Event::Step(m) = e {
            first.get_or_insert(m.loss);
        }
    })?;
    println!(
        "    loss {:.3} -> {:.3}, adapter in {}",
        first.unwrap_or(f64::NAN),
        outcome.final_loss,
        outcome.adapter_dir.display()
    );

    println!(
        "3/5 registry (SQLite + local blobs under {})",
        data_dir.display()
    );
    let settings = ServeSettings {
        data_dir: data_dir.clone(),
        registry: RegistrySettings {
            listen: "127.0.0.1:0".into(),
            ..cfg.registry.clone()
        },
        auth: cfg.auth.clone(),
        s3: cfg.s3.clone(),
    };
    let token = Signer::from_settings(&cfg.auth, &data_dir)?.issue(
        "loraops-demo",
        &[Role::Admin],
        3600,
        None,
    )?;
    actix_web::rt::System::new().block_on(async move {
        let app = Application::build(settings).await?;
        let url = format!("http://127.0.0.1:{}", app.port());
        let handle = app.handle();
        actix_web::rt::spawn(app.run_until_stopped());
        let client = RegistryClient::new(&url, Some(token));
        let base = base_model::describe(&base_dir, None)?;
        if !client
            .base_models()
            .await?
            .into_iter()
            .any(|b| b.name == base.name)
        {
            client.create_base_model(&base).await?;
        }

        println!("4/5 push {}", adapter.display());
        let pushed = client
            .push_dir(&adapter, "demo-support", None, no_progress())
            .await?;
        println!(
            "    demo-support@{} {} (new: {})",
            pushed.version.version, pushed.version.digest, pushed.created
        );
        let again = client
            .push_dir(&adapter, "demo-support", None, no_progress())
            .await?;
        anyhow::ensure!(
            !again.created && again.version.version == pushed.version.version,
            "re-push made a new version"
        );
        println!(
            "    pushing the same bytes again returns @{} (new: {})",
            again.version.version, again.created
        );

        println!("5/5 pull and verify");
        let pulled = work.join("pulled");
        let v = client
            .pull(
                "demo-support",
                pushed.version.version,
                &pulled,
                no_progress(),
            )
            .await?;
        for f in &v.files {
            anyhow::ensure!(
                std::fs::read(pulled.join(&f.name))? == std::fs::read(adapter.join(&f.name))?,
                "{} differs",
                f.name
            );
        }
        println!(
            "    {} files, sha256 verified, identical to what was trained",
            v.files.len()
        );
        if let Some(lineage) = &v.lineage {
            println!(
                "    lineage: method {}, base {}",
                lineage["method"], lineage["base_model"]
            );
        }
        handle.stop(true).await;
        println!("done. `loraops up` keeps the registry running; see README.md.");
        Ok(())
    })
}
