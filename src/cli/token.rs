//! `loraops token issue`: mint a JWT with the configured signing key (the embedded HS256
//! secret under the data dir by default). Prints the token alone on stdout.

use clap::Subcommand;
use loraops_registry::api::Role;
use loraops_registry::auth::Signer;

use super::{Global, UsageError};

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Mint a token. It carries a `jti` (printed with `--json`): listing it in `[auth]
    /// revoked_tokens_file` revokes the token on every registry and gateway reading that file.
    Issue {
        /// Subject (who the token is for).
        #[arg(long)]
        sub: String,
        /// Roles, comma-separated: viewer, publisher, evaluator, deployer, admin, gateway,
        /// inference (end users of the gateway: no registry access).
        #[arg(long = "role", value_delimiter = ',', required = true)]
        roles: Vec<String>,
        /// Lifetime, e.g. 3600, 90m, 12h, 30d.
        #[arg(long, default_value = "12h")]
        ttl: String,
        /// Limit writes to adapters matching these patterns (`*` wildcard), comma-separated.
        #[arg(long, value_delimiter = ',')]
        adapters: Option<Vec<String>>,
    },
}

/// `3600`, `90s`, `90m`, `12h`, `30d` → seconds.
pub fn parse_ttl(s: &str) -> Result<i64, UsageError> {
    let (num, mult) = match s.chars().last() {
        Some('s') => (&s[..s.len() - 1], 1),
        Some('m') => (&s[..s.len() - 1], 60),
        Some('h') => (&s[..s.len() - 1], 3600),
        Some('d') => (&s[..s.len() - 1], 86400),
        _ => (s, 1),
    };
    match num.parse::<i64>().ok().and_then(|n| n.checked_mul(mult)) {
        Some(n) if n > 0 => Ok(n),
        _ => Err(UsageError(format!(
            "--ttl {s:?}: expected a positive duration like 3600, 90m, 12h or 30d"
        ))),
    }
}

pub fn run(cmd: TokenCmd, global: &Global) -> anyhow::Result<()> {
    match cmd {
        TokenCmd::Issue {
            sub,
            roles,
            ttl,
            adapters,
        } => {
            let roles = roles
                .iter()
                .map(|r| r.trim().parse::<Role>().map_err(UsageError))
                .collect::<Result<Vec<_>, _>>()?;
            let cfg = global.load_config(&[])?;
            let data_dir = cfg
                .data_dir
                .clone()
                .unwrap_or_else(|| global.data_dir.clone());
            let signer = Signer::from_settings(&cfg.auth, &data_dir)?;
            let (token, claims) = signer.issue_claims(&sub, &roles, parse_ttl(&ttl)?, adapters)?;
            if global.json {
                // The jti is what `[auth] revoked_tokens_file` names to revoke this token.
                println!(
                    "{}",
                    serde_json::json!({"token": token, "jti": claims.jti, "exp": claims.exp})
                );
            } else {
                println!("{token}");
            }
            Ok(())
        }
    }
}
