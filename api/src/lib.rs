//! SMD Gateway: one GraphQL API in front of Australian Secure Message Delivery providers.
//! See the README's code map for how the modules fit together.

pub mod app;
pub mod auth;
pub mod config;
pub mod crypto;
pub mod dev;
pub mod domain;
pub mod drain;
pub mod events;
pub mod graphql;
mod graphql_over_http;
mod http;
mod metrics;
mod playground;
mod principal_cache;
pub mod providers;
pub mod ratelimit;
mod request_id;
pub mod store;
mod workers;
mod ws;

pub use app::App;
pub use config::Settings;

/// Installs rustls' ring crypto provider for the process (reqwest is built without one so the
/// tree has a single TLS backend, the one sqlx already uses). Safe to call more than once.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
