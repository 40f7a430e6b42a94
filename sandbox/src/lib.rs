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
//! - `control`: the `/_sandbox` control API;
//! - `random`: each namespace's random stream (seeded by a scenario, else from the OS);
//! - `scenario`: scenario files (TOML) that seed a namespace, checked with line numbers;
//! - `schedule`: a namespace's events at sandbox times (decisions, referrals, faults);
//! - `state`: `--state FILE`, the namespaces kept across restarts (atomic writes, versioned).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
mod random;
mod referralnet;
mod referralnet_messaging;
mod requests;
mod scenario;
mod schedule;
mod state;
mod webhook_targets;
mod webhooks;

pub use clock::{InvalidClockSpeed, MAXIMUM_CLOCK_SPEED, validate_clock_speed};
pub use scenario::{Scenario, ScenarioError};
pub use state::{STATE_VERSION, StateError};

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
    router_for(namespace::SandboxState::new(checked_config(config)))
}

fn checked_config(config: SandboxConfig) -> SandboxConfig {
    let mut config = config;
    if let Err(error) = validate_clock_speed(config.clock_speed) {
        tracing::warn!(%error, "using clock speed 1.0 instead");
        config.clock_speed = 1.0;
    }
    config
}

fn router_for(state: namespace::SandboxState) -> Router {
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
    spawn_with(address, config, SandboxOptions::default())
        .await
        .map_err(|error| match error {
            StartError::Listen { source, .. } => source,
            other => std::io::Error::other(other.to_string()),
        })
}

/// What a sandbox starts from besides its [`SandboxConfig`]: scenarios, and a state file.
#[derive(Clone, Debug, Default)]
pub struct SandboxOptions {
    /// Each seeds its namespace (no two may name the same one); their extra directory entries
    /// join the directory.
    pub scenarios: Vec<Scenario>,
    /// Keeps the namespaces across restarts: loaded at start when it exists, written
    /// atomically after changes (at most every `save_interval`) and when the handle is shut
    /// down or dropped. A namespace the file holds comes from the file, even when a scenario
    /// names it (the scenario is then only what a reset goes back to).
    pub state_file: Option<PathBuf>,
    /// How often changes are written to the state file; default 2 seconds.
    pub save_interval: Option<Duration>,
}

/// Why a sandbox did not start. Nothing was served, and an existing state file was not
/// touched.
#[derive(Debug)]
pub enum StartError {
    /// A scenario does not fit this sandbox (a directory entry that is already there, two
    /// scenarios for one namespace, a sender not in the directory).
    Scenario(ScenarioError),
    /// The state file cannot be used.
    State(StateError),
    /// The address cannot be bound.
    Listen {
        address: SocketAddr,
        source: std::io::Error,
    },
}

impl std::fmt::Display for StartError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Scenario(error) => write!(formatter, "scenario {error}"),
            StartError::State(error) => error.fmt(formatter),
            StartError::Listen { address, source } => {
                write!(formatter, "could not listen on {address}: {source}")
            }
        }
    }
}

impl std::error::Error for StartError {}

/// The state file of a running sandbox and what writes it.
#[derive(Debug)]
struct Persistence {
    sandbox: namespace::SandboxState,
    path: PathBuf,
    fingerprint: state::SandboxFingerprint,
    /// Held while a copy is rendered and written, so two writes never interleave.
    write_lock: Arc<Mutex<()>>,
    saver_task: JoinHandle<()>,
}

impl Persistence {
    /// Writes the state file now (the final write at shutdown).
    fn save_now(&self) {
        let _guard = self
            .write_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let bytes = state::render(&self.sandbox, &self.fingerprint);
        match state::write_atomically(&self.path, &bytes) {
            Ok(()) => tracing::info!(path = %self.path.display(), "sandbox state saved"),
            Err(error) => {
                tracing::error!(path = %self.path.display(), %error, "cannot save the sandbox state");
            }
        }
    }
}

/// Builds the sandbox's state from the config, scenarios and state file; refuses anything
/// that does not fit before a namespace is touched.
fn prepare(
    config: SandboxConfig,
    options: &SandboxOptions,
) -> Result<(namespace::SandboxState, state::SandboxFingerprint), StartError> {
    let mut directory = directory::Directory::generate(config.seed, config.directory_size);
    let mut namespaces_seen = std::collections::HashSet::new();
    for scenario in &options.scenarios {
        if !namespaces_seen.insert(scenario.namespace().to_owned()) {
            return Err(StartError::Scenario(ScenarioError {
                source: scenario.source().to_owned(),
                line: None,
                column: None,
                message: format!(
                    "another scenario already seeds namespace {:?}; give each its own `namespace`",
                    scenario.namespace()
                ),
            }));
        }
        let mut new_entries = Vec::new();
        for (line, extra) in scenario.extra_directory_entries() {
            if directory.holds_extra(extra) || new_entries.contains(extra) {
                continue;
            }
            if let Some(existing) = directory.find(&extra.hpii) {
                return Err(StartError::Scenario(ScenarioError {
                    source: scenario.source().to_owned(),
                    line: Some(*line),
                    column: None,
                    message: format!(
                        "directory.hpii: {} is already in the directory ({}); choose another",
                        extra.hpii,
                        existing.display_name()
                    ),
                }));
            }
            new_entries.push(extra.clone());
        }
        directory = directory
            .with_extra_entries(&new_entries)
            .map_err(|message| {
                StartError::Scenario(ScenarioError {
                    source: scenario.source().to_owned(),
                    line: None,
                    column: None,
                    message,
                })
            })?;
    }
    for scenario in &options.scenarios {
        scenario
            .check_against(&directory)
            .map_err(StartError::Scenario)?;
    }
    let mut extra_directory_hpiis: Vec<String> = options
        .scenarios
        .iter()
        .flat_map(|scenario| scenario.extra_directory_entries())
        .map(|(_, extra)| extra.hpii.clone())
        .collect();
    extra_directory_hpiis.sort();
    extra_directory_hpiis.dedup();
    let fingerprint = state::SandboxFingerprint {
        seed: config.seed,
        directory_size: config.directory_size,
        extra_directory_hpiis,
    };

    let loaded = match &options.state_file {
        Some(path) => state::load(path, config, &fingerprint).map_err(StartError::State)?,
        None => None,
    };
    let sandbox = namespace::SandboxState::with_directory(config, directory);
    let mut restored_names = std::collections::HashSet::new();
    if let Some(loaded) = loaded {
        for mut namespace_state in loaded.namespaces {
            namespace_state.scenario = options
                .scenarios
                .iter()
                .find(|scenario| scenario.namespace() == namespace_state.name.as_str())
                .map(|scenario| Arc::new(scenario.clone()));
            restored_names.insert(namespace_state.name.as_str().to_owned());
            sandbox.install_namespace(namespace_state);
        }
    }
    for scenario in &options.scenarios {
        if restored_names.contains(scenario.namespace()) {
            tracing::info!(
                namespace = scenario.namespace(),
                "namespace restored from the state file; its scenario is what a reset goes back to"
            );
            continue;
        }
        sandbox.install_namespace(namespace::NamespaceState::from_scenario(
            scenario.namespace_name(),
            config,
            Arc::new(scenario.clone()),
        ));
        tracing::info!(
            namespace = scenario.namespace(),
            source = scenario.source(),
            "namespace seeded from its scenario"
        );
    }
    Ok((sandbox, fingerprint))
}

/// How often changes are written to the state file unless the options say otherwise.
const DEFAULT_SAVE_INTERVAL: Duration = Duration::from_secs(2);

/// Like [`spawn`], with scenarios and a state file. Every scenario and the state file are
/// checked before the address is bound; on any error nothing is served and nothing written.
pub async fn spawn_with(
    address: SocketAddr,
    config: SandboxConfig,
    options: SandboxOptions,
) -> Result<SandboxHandle, StartError> {
    let config = checked_config(config);
    let (sandbox, fingerprint) = prepare(config, &options)?;
    let listener = TcpListener::bind(address)
        .await
        .map_err(|source| StartError::Listen { address, source })?;
    let bound_address = listener
        .local_addr()
        .map_err(|source| StartError::Listen { address, source })?;
    if let Some(path) = &options.state_file {
        write_first_state(&sandbox, path, &fingerprint).map_err(StartError::State)?;
    }
    let persistence = options.state_file.map(|path| {
        let write_lock = Arc::new(Mutex::new(()));
        let saver_task = tokio::spawn(run_saver(
            sandbox.downgrade(),
            path.clone(),
            clone_fingerprint(&fingerprint),
            Arc::clone(&write_lock),
            options.save_interval.unwrap_or(DEFAULT_SAVE_INTERVAL),
        ));
        Persistence {
            sandbox: sandbox.clone(),
            path,
            fingerprint,
            write_lock,
            saver_task,
        }
    });
    let (stop_sender, stop_receiver) = oneshot::channel::<()>();
    let application = router_for(sandbox);
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
        persistence,
    })
}

/// Writes the state file at once when there is none yet (creating its directory), so a path
/// that cannot be written stops the start instead of failing at the first save.
fn write_first_state(
    sandbox: &namespace::SandboxState,
    path: &std::path::Path,
    fingerprint: &state::SandboxFingerprint,
) -> Result<(), StateError> {
    if path.exists() {
        return Ok(());
    }
    let cannot_write = |error: std::io::Error| StateError {
        path: path.to_owned(),
        message: format!("cannot be written: {error}"),
    };
    if let Some(parent) = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
    {
        std::fs::create_dir_all(parent).map_err(cannot_write)?;
    }
    state::write_atomically(path, &state::render(sandbox, fingerprint)).map_err(cannot_write)
}

fn clone_fingerprint(fingerprint: &state::SandboxFingerprint) -> state::SandboxFingerprint {
    state::SandboxFingerprint {
        seed: fingerprint.seed,
        directory_size: fingerprint.directory_size,
        extra_directory_hpiis: fingerprint.extra_directory_hpiis.clone(),
    }
}

/// Writes the state file whenever something changed since the last write, at most once per
/// `interval`; ends with the sandbox.
async fn run_saver(
    sandbox: namespace::WeakSandboxState,
    path: PathBuf,
    fingerprint: state::SandboxFingerprint,
    write_lock: Arc<Mutex<()>>,
    interval: Duration,
) {
    let fingerprint = Arc::new(fingerprint);
    let mut saved_changes = sandbox.upgrade().map(|state| state.change_count());
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(state) = sandbox.upgrade() else {
            break;
        };
        let changes = state.change_count();
        if saved_changes == Some(changes) {
            continue;
        }
        let path = path.clone();
        let fingerprint = Arc::clone(&fingerprint);
        let write_lock = Arc::clone(&write_lock);
        let written = tokio::task::spawn_blocking(move || {
            let _guard = write_lock
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let bytes = state::render(&state, &fingerprint);
            state::write_atomically(&path, &bytes)
        })
        .await;
        match written {
            Ok(Ok(())) => saved_changes = Some(changes),
            Ok(Err(error)) => tracing::error!(%error, "cannot save the sandbox state; will retry"),
            Err(error) => tracing::error!(%error, "the state saver failed; will retry"),
        }
    }
}

/// A running sandbox server. Dropping it asks the server to stop.
#[derive(Debug)]
pub struct SandboxHandle {
    address: SocketAddr,
    stop_sender: Option<oneshot::Sender<()>>,
    server_task: Option<JoinHandle<std::io::Result<()>>>,
    persistence: Option<Persistence>,
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

    /// Stops accepting connections, waits for requests in flight to finish, then writes the
    /// state file (when there is one) a last time.
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
        if let Some(persistence) = self.persistence.take() {
            persistence.saver_task.abort();
            tokio::task::spawn_blocking(move || persistence.save_now())
                .await
                .unwrap_or_else(|error| tracing::error!(%error, "the final save failed"));
        }
    }
}

impl Drop for SandboxHandle {
    fn drop(&mut self) {
        if let Some(stop_sender) = self.stop_sender.take() {
            let _ = stop_sender.send(());
        }
        if let Some(persistence) = self.persistence.take() {
            persistence.saver_task.abort();
            persistence.save_now();
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
            persistence: None,
        };
        assert_eq!(handle.base_url(), "http://127.0.0.1:8081");
    }
}
