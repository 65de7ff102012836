//! `loraops registry serve|migrate|sweep`.

use std::time::Duration;

use clap::Subcommand;
use loraops_registry::server::{self, AppState, Application, ServeSettings};

use super::{Global, init_logging, runtime};
use crate::config::Config;

#[derive(Debug, Subcommand)]
pub enum RegistryCmd {
    /// Run the registry service.
    Serve {
        /// HOST:PORT to listen on.
        #[arg(long)]
        listen: Option<String>,
        /// `sqlite://…?mode=rwc` or `postgres://…`.
        #[arg(long)]
        database_url: Option<String>,
        /// A directory, `file:///…` or `s3://bucket/prefix`.
        #[arg(long)]
        object_store_url: Option<String>,
        /// Load and check the configuration, print it (secrets redacted), and exit.
        #[arg(long)]
        check_config: bool,
    },
    /// Apply pending database migrations and exit.
    Migrate {
        #[arg(long)]
        database_url: Option<String>,
    },
    /// Delete blobs of uploads that never became a version, and exit.
    Sweep {
        /// Only blobs older than this many seconds.
        #[arg(long, default_value_t = 3600)]
        grace_secs: u64,
    },
}

fn settings(cfg: &Config, global: &Global) -> ServeSettings {
    ServeSettings {
        data_dir: cfg
            .data_dir
            .clone()
            .unwrap_or_else(|| global.data_dir.clone()),
        registry: cfg.registry.clone(),
        auth: cfg.auth.clone(),
        s3: cfg.s3.clone(),
    }
}

/// The effective configuration with secrets hidden, for `--check-config`.
fn redacted(cfg: &Config, s: &ServeSettings) -> serde_json::Value {
    let mut v = serde_json::to_value(cfg).expect("config serialises");
    v["data_dir"] = serde_json::json!(s.data_dir);
    v["registry"]["database_url"] =
        serde_json::json!(server::redact(&s.registry.database_url(&s.data_dir)));
    v["registry"]["object_store_url"] = serde_json::json!(s.registry.object_store_url(&s.data_dir));
    for secret in ["hs256_secret"] {
        if !v["auth"][secret].is_null() {
            v["auth"][secret] = serde_json::json!("***");
        }
    }
    if !v["s3"]["secret_access_key"].is_null() {
        v["s3"]["secret_access_key"] = serde_json::json!("***");
    }
    v
}

pub fn run(cmd: RegistryCmd, global: &Global) -> anyhow::Result<()> {
    match cmd {
        RegistryCmd::Serve {
            listen,
            database_url,
            object_store_url,
            check_config,
        } => {
            let mut o = Vec::new();
            if let Some(l) = listen {
                o.push(("registry.listen", l));
            }
            if let Some(d) = database_url {
                o.push(("registry.database_url", d));
            }
            if let Some(u) = object_store_url {
                o.push(("registry.object_store_url", u));
            }
            let cfg = global.load_config(&o)?;
            let s = settings(&cfg, global);
            if check_config {
                // Key files must be readable; nothing is created or contacted.
                if cfg.auth.public_key_file.is_some()
                    || cfg.auth.jwks_file.is_some()
                    || cfg.auth.hs256_secret.is_some()
                    || cfg.auth.hs256_secret_file.is_some()
                {
                    loraops_registry::auth::Verifier::from_settings(&cfg.auth, &s.data_dir, false)?;
                }
                println!("{}", serde_json::to_string_pretty(&redacted(&cfg, &s))?);
                return Ok(());
            }
            init_logging(&cfg);
            actix_web::rt::System::new().block_on(async move {
                let app = Application::build(s).await?;
                tracing::info!(port = app.port(), "registry listening");
                app.run_until_stopped().await?;
                Ok(())
            })
        }
        RegistryCmd::Migrate { database_url } => {
            let mut o = Vec::new();
            if let Some(d) = database_url {
                o.push(("registry.database_url", d));
            }
            let cfg = global.load_config(&o)?;
            init_logging(&cfg);
            let s = settings(&cfg, global);
            let url = s.registry.database_url(&s.data_dir);
            runtime()?.block_on(server::connect_and_migrate(&url, 1))?;
            eprintln!("migrated {}", server::redact(&url));
            Ok(())
        }
        RegistryCmd::Sweep { grace_secs } => {
            let cfg = global.load_config(&[])?;
            init_logging(&cfg);
            let s = settings(&cfg, global);
            let json = global.json;
            actix_web::rt::System::new().block_on(async move {
                let state = AppState::new(s).await?;
                let report =
                    server::sweep::sweep_orphans(&state, Duration::from_secs(grace_secs)).await?;
                crate::output::emit(json, &report, || {
                    format!(
                        "removed {} stale uploads, deleted {} blobs",
                        report.uploads_removed, report.blobs_deleted
                    )
                });
                Ok(())
            })
        }
    }
}
