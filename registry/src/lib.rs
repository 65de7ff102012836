//! loraops control plane.
//!
//! Always compiled (no server stack): [`api`], the wire types every part of loraops shares, and
//! [`peft`], the PEFT adapter format and its checks. Feature `client`: [`client`], the registry's
//! HTTP client. Feature `auth`: [`auth`], JWT minting and verification. Feature `server`:
//! [`server`], the registry service.

pub mod api;
pub mod peft;

#[cfg(feature = "auth")]
pub mod auth;
#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "server")]
pub mod server;
