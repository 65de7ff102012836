//! Configuration: a TOML file < `LORAOPS_SECTION__KEY` environment variables < flags.
//!
//! ```toml
//! data_dir = "/var/lib/loraops"
//! [registry]
//! listen = "0.0.0.0:8400"
//! database_url = "postgres://loraops@db/loraops"
//! object_store_url = "s3://adapters/prod"
//! [s3]
//! endpoint = "http://minio:9000"
//! [gateway]
//! base_model = "/models/base"
//! registry_url = "http://loraops-registry:8400"
//! [auth]
//! audience = "loraops"
//! [log]
//! json = true
//! ```
//! The same keys as environment variables: `LORAOPS_DATA_DIR`, `LORAOPS_REGISTRY__LISTEN`,
//! `LORAOPS_S3__ENDPOINT`, `LORAOPS_AUTH__HS256_SECRET`, `LORAOPS_LOG__JSON`, … (the double
//! underscore marks a configuration key). Unknown keys are errors, so a typo never silently
//! falls back to a default.

use std::collections::HashMap;
use std::path::PathBuf;

use loraops_gateway::GatewayConfig;
use loraops_registry::auth::AuthSettings;
use loraops_registry::server::{RegistrySettings, S3Settings};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// JSON lines instead of human-readable logs.
    pub json: bool,
    /// A tracing filter, e.g. `info,loraops=debug` (RUST_LOG wins when set).
    pub level: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub data_dir: Option<PathBuf>,
    pub registry: RegistrySettings,
    pub auth: AuthSettings,
    pub s3: S3Settings,
    pub gateway: GatewayConfig,
    pub log: LogSettings,
}

/// Load the layered configuration. `overrides` are `section.key = value` pairs from flags.
pub fn load(
    file: Option<&std::path::Path>,
    overrides: &[(&str, String)],
) -> Result<Config, config::ConfigError> {
    let mut b = config::Config::builder();
    if let Some(f) = file {
        b = b.add_source(
            config::File::from(f)
                .format(config::FileFormat::Toml)
                .required(true),
        );
    }
    // Only `LORAOPS_SECTION__KEY` names are configuration; single-underscore ones
    // (LORAOPS_TOKEN, LORAOPS_REGISTRY_URL, LORAOPS_DATA_DIR, …) are flags' variables.
    let env: HashMap<String, String> = std::env::vars()
        .filter(|(k, _)| {
            k.strip_prefix("LORAOPS_")
                .is_some_and(|rest| rest.contains("__"))
        })
        .collect();
    b = b.add_source(
        config::Environment::with_prefix("LORAOPS")
            .prefix_separator("_")
            .separator("__")
            .source(Some(env)),
    );
    for (k, v) in overrides {
        b = b.set_override(*k, v.clone())?;
    }
    b.build()?.try_deserialize()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_overrides_and_unknown_keys_fail() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "[registry]\nlisten = \"0.0.0.0:1\"\nmax_upload_bytes = 10\n[auth]\nhs256_secret = \"1234567890123456\"\n").unwrap();
        let c = load(Some(&f), &[("registry.listen", "127.0.0.1:2".into())]).unwrap();
        assert_eq!(c.registry.listen, "127.0.0.1:2");
        assert_eq!(c.registry.max_upload_bytes, 10);
        // A numeric-looking secret stays a string.
        assert_eq!(c.auth.hs256_secret.as_deref(), Some("1234567890123456"));
        std::fs::write(&f, "[registry]\nlisten_typo = \"x\"\n").unwrap();
        let err = load(Some(&f), &[]).unwrap_err().to_string();
        assert!(err.contains("listen_typo"), "{err}");
    }
}
