//! `loraops up`: loraops in one process on embedded defaults — SQLite and a local object
//! store under the data dir, an HS256 key generated on first start, and the gateway serving
//! the base model and the registry's adapters with the native engine — with a base model
//! registered and an admin token printed, so a newcomer can push an adapter and chat with it
//! in minutes.
//!
//! The in-process gateway gets its own token with only the `gateway` role, written to
//! `<data-dir>/gateway.token` and re-minted well before it expires (the gateway re-reads the
//! file), so neither an expired token nor an admin one ever sits in the data plane. Inference
//! is open only on a loopback listener unless `gateway.require_auth` says otherwise.

use std::path::PathBuf;

use clap::Args;
use loraops_gateway::{Application as GatewayApp, GatewaySettings};
use loraops_registry::api::Role;
use loraops_registry::auth::Signer;
use loraops_registry::client::RegistryClient;
use loraops_registry::server::{Application, ServeSettings};

use super::{Global, base_model, init_logging};

#[derive(Debug, Args)]
pub struct UpArgs {
    /// HOST:PORT of the registry [default: 127.0.0.1:8400; config registry.listen].
    #[arg(long)]
    pub listen: Option<String>,
    /// Base model directory to register (Hugging Face layout). Without it, a tiny model is
    /// generated under the data dir on first start.
    #[arg(long)]
    pub base_model: Option<PathBuf>,
    /// HOST:PORT of the gateway (OpenAI API) [default: 127.0.0.1:8500; config gateway.listen].
    #[arg(long)]
    pub gateway_listen: Option<String>,
}

pub fn run(args: UpArgs, global: &Global) -> anyhow::Result<()> {
    // A flag overrides the configuration (file or LORAOPS_* variables), which overrides the
    // defaults.
    let overrides: Vec<(&str, String)> = [
        ("registry.listen", &args.listen),
        ("gateway.listen", &args.gateway_listen),
    ]
    .into_iter()
    .filter_map(|(key, flag)| Some((key, flag.clone()?)))
    .collect();
    let cfg = global.load_config(&overrides)?;
    let gateway_listen = cfg
        .gateway
        .listen
        .clone()
        .unwrap_or_else(|| "127.0.0.1:8500".into());
    cfg.gateway
        .validate()
        .map_err(|e| anyhow::Error::new(super::ConfigError(e)))?;
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
    // Before any thread starts: the gateway's engine finds adapters through the environment.
    let cache = super::gateway::cache_dir(&data_dir, None)?;
    super::gateway::prepare_process(&cache);
    let signer = Signer::from_settings(&cfg.auth, &data_dir)?;
    let token = signer.issue("loraops-up", &[Role::Admin], 12 * 3600, None)?;
    let gateway_auth = gateway_auth(cfg.gateway.require_auth, &gateway_listen, &cfg.auth)
        .map_err(|e| anyhow::Error::new(super::ConfigError(e)))?;
    let token_file = data_dir.join("gateway.token");
    write_gateway_token(&signer, &token_file)?;
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
        let mut gw = GatewaySettings::new(base_dir.clone(), cache);
        cfg.gateway
            .apply_to(&mut gw)
            .map_err(|e| anyhow::Error::new(super::ConfigError(e)))?;
        gw.listen = gateway_listen;
        gw.base_model_name = Some(base.name.to_string());
        gw.registry_url = Some(url.clone());
        gw.registry_token = None;
        gw.registry_token_file = Some(token_file.clone());
        gw.data_dir = data_dir.clone();
        gw.auth = gateway_auth;
        // Re-mint the gateway's token long before it expires.
        actix_web::rt::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(GATEWAY_TOKEN_TTL / 4)).await;
                if let Err(e) = write_gateway_token(&signer, &token_file) {
                    tracing::error!(error = %e, "cannot renew the gateway's registry token");
                }
            }
        });
        let gateway = GatewayApp::build(gw).await?;
        let gw_url = format!("http://127.0.0.1:{}", gateway.port());
        let gateway = actix_web::rt::spawn(gateway.run_until_stopped());
        println!("loraops is up (data in {})", data_dir.display());
        println!(
            "  registry     {url}/api/v1   (OpenAPI: {url}/openapi.json, metrics: {url}/metrics)"
        );
        println!("  gateway      {gw_url}/v1   (OpenAI API; model \"{}\" is the base, NAME or NAME@V an adapter)", base.name);
        println!("  base model   {} ({})", base.name, base_dir.display());
        println!("  admin token  export LORAOPS_TOKEN={token}");
        println!(
            "  try          loraops adapter push ADAPTER_DIR --name my-adapter --registry {url}"
        );
        tokio::select! {
            r = server => r??,
            r = gateway => r??,
        }
        Ok(())
    })
}

/// Lifetime of the in-process gateway's token; renewed every quarter of it.
const GATEWAY_TOKEN_TTL: u64 = 24 * 3600;

/// Mint a `gateway`-only token into `path` (mode 0600), replacing the old one atomically.
fn write_gateway_token(signer: &Signer, path: &std::path::Path) -> anyhow::Result<()> {
    let t = signer.issue(
        "loraops-up-gateway",
        &[Role::Gateway],
        GATEWAY_TOKEN_TTL as i64,
        None,
    )?;
    let tmp = path.with_extension("token.tmp");
    {
        use std::io::Write;
        let mut o = std::fs::OpenOptions::new();
        o.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            o.mode(0o600);
        }
        let mut f = o.open(&tmp)?;
        f.write_all(t.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Inference auth for the embedded gateway: `gateway.require_auth` when set; unset, open
/// only on a loopback address (anything reachable from elsewhere must choose explicitly).
pub fn gateway_auth(
    require_auth: Option<bool>,
    listen: &str,
    auth: &loraops_registry::auth::AuthSettings,
) -> Result<Option<loraops_registry::auth::AuthSettings>, String> {
    match require_auth {
        Some(true) => Ok(Some(auth.clone())),
        Some(false) => Ok(None),
        None if is_loopback(listen) => Ok(None),
        None => Err(format!(
            "--gateway-listen {listen} is not a loopback address: set gateway.require_auth \
             (LORAOPS_GATEWAY__REQUIRE_AUTH=true to require tokens, false to serve openly)"
        )),
    }
}

fn is_loopback(listen: &str) -> bool {
    let host = listen
        .rsplit_once(':')
        .map_or(listen, |(h, _)| h)
        .trim_matches(['[', ']']);
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The generated tiny model under the data dir, written on first use.
pub fn ensure_tiny_model(dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    if !dir.join("config.json").exists() {
        eprintln!("generating a tiny Llama-layout model in {}", dir.display());
        loraops_model::tiny::init_tiny(dir, &loraops_model::tiny::TinySpec::default())?;
    }
    Ok(dir.to_path_buf())
}
