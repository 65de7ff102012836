//! `loraops up`: loraops in one process on embedded defaults — SQLite and a local object
//! store under the data dir, an HS256 key generated on first start — with a base model
//! registered and an admin token printed, so a newcomer can push an adapter in minutes.

use std::path::PathBuf;

use clap::Args;
use loraops_registry::api::Role;
use loraops_registry::auth::Signer;
use loraops_registry::client::RegistryClient;
use loraops_registry::server::{Application, ServeSettings};

use super::{Global, base_model, init_logging};

#[derive(Debug, Args)]
pub struct UpArgs {
    /// HOST:PORT of the registry.
    #[arg(long, default_value = "127.0.0.1:8400")]
    pub listen: String,
    /// Base model directory to register (Hugging Face layout). Without it, a tiny model is
    /// generated under the data dir on first start.
    #[arg(long)]
    pub base_model: Option<PathBuf>,
}

pub fn run(args: UpArgs, global: &Global) -> anyhow::Result<()> {
    let cfg = global.load_config(&[("registry.listen", args.listen.clone())])?;
    init_logging(&cfg);
    let data_dir = cfg
        .data_dir
        .clone()
        .unwrap_or_else(|| global.data_dir.clone());
    let base_dir = match args.base_model {
        Some(d) => d,
        None => ensure_tiny_model(&data_dir.join("models").join("tiny-llama"))?,
    };
    let settings = ServeSettings {
        data_dir: data_dir.clone(),
        registry: cfg.registry.clone(),
        auth: cfg.auth.clone(),
        s3: cfg.s3.clone(),
    };
    let token = Signer::from_settings(&cfg.auth, &data_dir)?.issue(
        "loraops-up",
        &[Role::Admin],
        12 * 3600,
        None,
    )?;
    actix_web::rt::System::new().block_on(async move {
        let app = Application::build(settings).await?;
        let url = format!("http://127.0.0.1:{}", app.port());
        let server = actix_web::rt::spawn(app.run_until_stopped());
        let client = RegistryClient::new(&url, Some(token.clone()));
        let base = base_model::describe(&base_dir, None)?;
        let known = client
            .base_models()
            .await?
            .into_iter()
            .any(|b| b.name == base.name);
        if !known {
            client.create_base_model(&base).await?;
        }
        println!("loraops is up (data in {})", data_dir.display());
        println!(
            "  registry     {url}/api/v1   (OpenAPI: {url}/openapi.json, metrics: {url}/metrics)"
        );
        println!("  base model   {} ({})", base.name, base_dir.display());
        println!("  admin token  export LORAOPS_TOKEN={token}");
        println!(
            "  try          loraops adapter push ADAPTER_DIR --name my-adapter --registry {url}"
        );
        server.await??;
        Ok(())
    })
}

/// The generated tiny model under the data dir, written on first use.
pub fn ensure_tiny_model(dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    if !dir.join("config.json").exists() {
        eprintln!("generating a tiny Llama-layout model in {}", dir.display());
        loraops_trainer::tiny::init_tiny(dir, &loraops_trainer::tiny::TinySpec::default())?;
    }
    Ok(dir.to_path_buf())
}
