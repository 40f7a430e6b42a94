//! SMD Gateway sandbox: emulators of the Argus and ReferralNet Secure Message Delivery providers
//! and of a card payment gateway, for the gateway to be built and tested against without real
//! provider accounts or real money.
//!
//! This module owns the configuration, the assembly of the full application (provider and
//! payments routers, control router, namespace routing in front of them) and serving it on a
//! socket.
//! The wire protocol is specified in `PROTOCOL.md` next to this crate's `Cargo.toml`.
//!
//! Module map:
//! - `namespace`: which namespace a request is in, and every namespace's state;
//! - `clock`: the per-namespace sandbox clock;
//! - `accounts`: the account model shared by both providers (registration, decisions);
//! - `faults`: injected faults and the answers they give;
//! - `provider`: provider names, each provider's error shape, and the services faults target;
//! - `argus`, `referralnet`: the two providers' accounts APIs;
//! - `directory`: the seeded practitioner directory and its magic recipients (public);
//! - `hl7`: escaping, and the referrals and acknowledgements the sandbox writes;
//! - `messaging`: each namespace's sent messages, inboxes and webhook settings;
//! - `argus_messaging`, `referralnet_messaging`: the two providers' messaging APIs;
//! - `webhooks`: the background pushes of ReferralNet receipts;
//! - `webhook_targets`: which addresses webhooks may go to (public ones, unless allowed);
//! - `payments`: the payment gateway's HTTP API, test cards, charges and idempotency keys;
//! - `requests`: the recent provider requests of each namespace (`GET /_sandbox/requests`);
//! - `control`: the `/_sandbox` control API.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

mod accounts;
mod argus;
mod argus_messaging;
mod clock;
mod control;
pub mod directory;
mod faults;
mod hl7;
mod messaging;
mod namespace;
mod payments;
mod provider;
mod referralnet;
mod referralnet_messaging;
mod requests;
mod webhook_targets;
mod webhooks;

pub use clock::{InvalidClockSpeed, MAXIMUM_CLOCK_SPEED, validate_clock_speed};

/// The header that names the namespace of a request without a `/ns/{name}` path prefix.
pub const NAMESPACE_HEADER: &str = namespace::NAMESPACE_HEADER;

/// How a sandbox is set up.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SandboxConfig {
    /// Seeds every random draw that should repeat between runs, such as decision times.
    pub seed: u64,
    /// Sandbox seconds per real second for new namespaces' clocks; see [`validate_clock_speed`].
    pub clock_speed: f64,
    /// How many practitioners the directory holds, the five magic recipients included (so at
    /// least five); generated from `seed`.
    pub directory_size: usize,
    /// Push ReferralNet webhooks to loopback, private, link-local and other non-public
    /// addresses too. Off by default: a shared sandbox must not be a way into its own network.
    /// Turn it on when the gateway runs beside the sandbox (dev mode, tests).
    pub allow_private_webhooks: bool,
}

impl Default for SandboxConfig {
    fn default() -> SandboxConfig {
        SandboxConfig {
            seed: 42,
            clock_speed: 1.0,
            directory_size: directory::DEFAULT_DIRECTORY_SIZE,
            allow_private_webhooks: false,
        }
    }
}

/// The whole sandbox as one router: Argus under `/argus/v1`, ReferralNet under
/// `/referralnet/api`, payments under `/payments/v1`, control under `/_sandbox`, with namespace
/// routing in front.
///
/// The `/ns/{name}` prefix is stripped before the inner routes are matched, so the returned
/// router can be served as it is (`axum::serve(listener, router(config))`) or mounted in
/// another application with `Router::nest_service`. A `clock_speed` that
/// [`validate_clock_speed`] refuses is replaced by 1.0, with a warning.
pub fn router(config: SandboxConfig) -> Router {
    let mut config = config;
    if let Err(error) = validate_clock_speed(config.clock_speed) {
        tracing::warn!(%error, "using clock speed 1.0 instead");
        config.clock_speed = 1.0;
    }
    let state = namespace::SandboxState::new(config);
    // Pushes webhooks while the router lives; without a runtime here, the first request starts it.
    state.ensure_webhook_ticker();
    let routes = Router::new()
        .merge(argus::routes())
        .merge(argus_messaging::routes())
        .merge(referralnet::routes())
        .merge(referralnet_messaging::routes())
        .merge(payments::routes())
        .merge(control::routes())
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            requests::record,
        ))
        .with_state(state);
    namespace::with_namespace_routing(routes)
}

/// Binds `address` (port 0 picks a free port) and serves the sandbox on a tokio task.
///
/// The server stops gracefully when the returned handle is shut down or dropped.
pub async fn spawn(address: SocketAddr, config: SandboxConfig) -> std::io::Result<SandboxHandle> {
    let listener = TcpListener::bind(address).await?;
    let bound_address = listener.local_addr()?;
    let (stop_sender, stop_receiver) = oneshot::channel::<()>();
    let application = router(config);
    let server_task = tokio::spawn(async move {
        let stopped = async move {
            // An error means the handle was dropped without sending: stop then too.
            let _ = stop_receiver.await;
        };
        axum::serve(listener, application)
            .with_graceful_shutdown(stopped)
            .await
    });
    tracing::info!(address = %bound_address, "sandbox listening");
    Ok(SandboxHandle {
        address: bound_address,
        stop_sender: Some(stop_sender),
        server_task: Some(server_task),
    })
}

/// A running sandbox server. Dropping it asks the server to stop.
#[derive(Debug)]
pub struct SandboxHandle {
    address: SocketAddr,
    stop_sender: Option<oneshot::Sender<()>>,
    server_task: Option<JoinHandle<std::io::Result<()>>>,
}

impl SandboxHandle {
    /// The address the server is bound to.
    pub fn addr(&self) -> SocketAddr {
        self.address
    }

    /// The URL to reach the server at, such as `http://127.0.0.1:8081`. An unspecified bind
    /// address (`0.0.0.0` or `::`) is reached through loopback.
    pub fn base_url(&self) -> String {
        let reachable_address = match self.address.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => {
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), self.address.port())
            }
            IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(
                IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
                self.address.port(),
            ),
            _ => self.address,
        };
        format!("http://{reachable_address}")
    }

    /// Stops accepting connections and waits for requests in flight to finish.
    pub async fn shutdown(mut self) {
        if let Some(stop_sender) = self.stop_sender.take() {
            let _ = stop_sender.send(());
        }
        if let Some(server_task) = self.server_task.take() {
            match server_task.await {
                Ok(Ok(())) => tracing::info!("sandbox stopped"),
                Ok(Err(error)) => tracing::error!(%error, "sandbox server failed"),
                Err(error) => tracing::error!(%error, "sandbox server task failed"),
            }
        }
    }
}

impl Drop for SandboxHandle {
    fn drop(&mut self) {
        if let Some(stop_sender) = self.stop_sender.take() {
            let _ = stop_sender.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    #[tokio::test]
    async fn the_router_can_be_nested_into_another_application_under_a_prefix() {
        let application = Router::new().nest_service("/sandbox", router(SandboxConfig::default()));

        let response = application
            .oneshot(
                Request::get("/sandbox/ns/team-a/_sandbox/clock")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();

        assert_eq!(response.status(), StatusCode::OK);
    }

    #[test]
    fn the_base_url_of_an_unspecified_address_is_loopback() {
        let handle = SandboxHandle {
            address: "0.0.0.0:8081".parse().unwrap(),
            stop_sender: None,
            server_task: None,
        };
        assert_eq!(handle.base_url(), "http://127.0.0.1:8081");
    }
}
