//! Start-up: turns [`Settings`] into a running gateway (zero2prod's `Application::build`).
//! In dev mode it also generates keys, starts the sandbox in-process and seeds demo data.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::TokenVerifier;
use crate::config::{Mode, Settings, ShutdownSettings};
use crate::crypto::SecretBox;
use crate::domain::credits::{CreditService, CreditSettings};
use crate::domain::integrations::{IntegrationService, IntegrationSettings};
use crate::domain::messaging::{MessagingService, MessagingSettings};
use crate::domain::pricing::{Catalogue, DEFAULT_TIERS};
use crate::domain::types::Provider;
use crate::drain::Drain;
use crate::graphql::limits::OperationLimits;
use crate::graphql::{Limits, Services, build_schema};
use crate::http::{CorsPolicy, HttpState, router};
use crate::metrics::{Metrics, MetricsAccess};
use crate::providers::payments::HttpPaymentGateway;
use crate::providers::{ProviderEndpoints, Providers};
use crate::ratelimit::TokenBuckets;
use crate::store::Store;
use crate::ws::{OpenOperations, WsLimits};
use crate::{dev, workers};

/// How deep an introspection query may nest: GraphiQL's own schema query (graphql-js's
/// `getIntrospectionQuery`, whose type references nest `ofType` nine times) needs 14.
const MAX_INTROSPECTION_DEPTH: usize = 16;

/// A built gateway, bound to its port, not yet serving.
pub struct App {
    listener: TcpListener,
    router: axum::Router,
    store: Store,
    shutdown: watch::Sender<bool>,
    workers: Vec<tokio::task::JoinHandle<()>>,
    /// Stops the change-notification listener (after the server has stopped).
    events_shutdown: watch::Sender<bool>,
    events_listener: Option<tokio::task::JoinHandle<()>>,
    drain: Drain,
    shutdown_settings: ShutdownSettings,
    sandbox: Option<smd_sandbox::SandboxHandle>,
    banner: Option<String>,
    credits: CreditService,
}

impl App {
    /// Validates settings, opens and migrates the database, wires services, binds the port.
    pub async fn build(mut settings: Settings) -> anyhow::Result<Self> {
        crate::install_crypto_provider();
        settings.validate()?;
        let mut sandbox = None;
        let mut dev_keys = None;
        if settings.mode == Mode::Dev {
            let keys = dev::ensure_dev_keys(&settings.data_dir)?;
            let jwt = &mut settings.jwt;
            if jwt.hs256_secret.is_none()
                && jwt.public_key_files.is_empty()
                && jwt.jwks_file.is_none()
            {
                jwt.hs256_secret = Some(keys.signing_secret.clone());
            }
            jwt.issuer.get_or_insert_with(|| dev::DEV_ISSUER.to_owned());
            jwt.audience
                .get_or_insert_with(|| dev::DEV_AUDIENCE.to_owned());
            settings
                .encryption_key
                .get_or_insert_with(|| keys.encryption_key.clone());
            settings
                .payments
                .api_key
                .get_or_insert_with(|| "sk_sandbox_dev".to_owned());
            if settings.providers.argus_base_url.is_none()
                || settings.providers.referralnet_base_url.is_none()
                || settings.payments.base_url.is_none()
            {
                // The gateway's ReferralNet webhook is on this machine: let the sandbox push there.
                let sandbox_config = smd_sandbox::SandboxConfig {
                    allow_private_webhooks: true,
                    ..smd_sandbox::SandboxConfig::default()
                };
                let handle = smd_sandbox::spawn(settings.sandbox_listen, sandbox_config)
                    .await
                    .map_err(|error| {
                        anyhow::anyhow!(
                            "cannot start the embedded sandbox on {}: {error} (set SMD_SANDBOX_LISTEN to a free address)",
                            settings.sandbox_listen
                        )
                    })?;
                settings
                    .providers
                    .argus_base_url
                    .get_or_insert_with(|| handle.base_url());
                settings
                    .providers
                    .referralnet_base_url
                    .get_or_insert_with(|| handle.base_url());
                settings
                    .payments
                    .base_url
                    .get_or_insert_with(|| handle.base_url());
                sandbox = Some(handle);
            }
            dev_keys = Some(keys);
        }

        let database_url = settings.effective_database_url();
        let store = Store::connect(&database_url).await.map_err(|error| {
            anyhow::anyhow!(
                "cannot open the database ({}): {error:?}",
                redact_url(&database_url)
            )
        })?;
        store
            .migrate()
            .await
            .map_err(|error| anyhow::anyhow!("migrations failed: {error:?}"))?;

        let secrets =
            SecretBox::from_base64_key(settings.encryption_key.as_deref().unwrap_or_default())
                .map_err(|error| anyhow::anyhow!("SMD_ENCRYPTION_KEY: {error}"))?;
        let verifier = Arc::new(TokenVerifier::from_settings(&settings.jwt)?);
        let metrics = Metrics::new();
        let providers = Providers::http(
            &ProviderEndpoints {
                argus_base_url: settings
                    .providers
                    .argus_base_url
                    .clone()
                    .unwrap_or_default(),
                referralnet_base_url: settings
                    .providers
                    .referralnet_base_url
                    .clone()
                    .unwrap_or_default(),
                request_timeout: Duration::from_millis(settings.providers.timeout_ms),
            },
            Arc::new(metrics.clone()),
        )?;
        // Shared between nodes through PostgreSQL's NOTIFY, in-process on SQLite; listening
        // starts before the port is bound, so no change after start-up goes unheard.
        let events = store.event_bus();
        let (events_shutdown, events_shutdown_receiver) = watch::channel(false);
        let events_listener = store
            .listen_for_changes(events.clone(), events_shutdown_receiver)
            .await
            .map_err(|error| {
                anyhow::anyhow!("cannot listen for change notifications: {error:?}")
            })?;
        let poll_interval = settings.approval_poll_interval();
        let payments = HttpPaymentGateway::new(
            settings.payments.base_url.as_deref().unwrap_or_default(),
            settings.payments.api_key.as_deref().unwrap_or_default(),
            Duration::from_millis(settings.providers.timeout_ms),
        )?
        .observed_by(Arc::new(metrics.clone()));
        let catalogue = Catalogue::new(&DEFAULT_TIERS, &settings.credits.packs)
            .map_err(|problem| anyhow::anyhow!("SMD_CREDIT_PACKS: {problem}"))?;
        let purchase_lease = Duration::from_millis(settings.credits.purchase_lease_ms);
        let credits = CreditService::new(
            store.clone(),
            Arc::new(payments),
            secrets.clone(),
            CreditSettings {
                catalogue,
                disable_auto_top_up_after: 3,
                purchase_lease,
                key_retention: Duration::from_secs(24 * 3600),
                duplicate_wait: Duration::from_secs(15),
                fail_after_charge: settings.credits.fail_after_charge,
            },
        )
        .observed_by(Arc::new(metrics.clone()));
        let providers_for_messaging = providers.clone();
        let secrets_for_messaging = secrets.clone();
        let integrations = IntegrationService::new(
            store.clone(),
            providers,
            secrets,
            events.clone(),
            IntegrationSettings {
                approval_poll_interval: poll_interval,
                approval_poll_max_backoff: Duration::from_secs(30 * 60).max(poll_interval),
                approval_check_lease: Duration::from_millis(settings.providers.timeout_ms) * 2
                    + poll_interval,
                validate_login_per_minute: settings.validate_login_per_minute,
                failed_logins_per_user: settings.limits.failed_logins_per_user,
                failed_logins_per_username: settings.limits.failed_logins_per_username,
                failed_login_window: Duration::from_secs(
                    settings.limits.failed_login_window_seconds,
                ),
            },
        );
        let listener = TcpListener::bind(settings.listen).await.map_err(|error| {
            anyhow::anyhow!(
                "cannot listen on {}: {error} (set SMD_LISTEN to a free address)",
                settings.listen
            )
        })?;
        let address = listener.local_addr()?;
        let status_poll_interval = settings.status_poll_interval();
        // Where providers push receipts: configured, else this node's own address (dev, tests).
        let public_url = match &settings.public_url {
            Some(url) => url.clone(),
            None => format!("http://{address}"),
        };
        let messaging = MessagingService::new(
            store.clone(),
            providers_for_messaging,
            secrets_for_messaging,
            credits.clone(),
            integrations.clone(),
            MessagingSettings {
                outbox_lease: Duration::from_millis(settings.providers.timeout_ms) * 3
                    + Duration::from_secs(1),
                status_poll_interval,
                retry_base: Duration::from_millis(settings.messaging.retry_base_ms.max(1)),
                retry_max: Duration::from_millis(settings.messaging.retry_max_ms.max(1)),
                give_up_after: Duration::from_secs(settings.messaging.give_up_after_seconds),
                undelivered_alert_after: Duration::from_secs(
                    settings.messaging.undelivered_alert_after_seconds,
                ),
                unacknowledged_alert_after: Duration::from_secs(
                    settings.messaging.unacknowledged_alert_after_seconds,
                ),
                expire_after: Duration::from_secs(settings.messaging.expire_after_seconds),
                provider_preference: settings
                    .messaging
                    .provider_preference
                    .iter()
                    .filter_map(|name| match name.to_lowercase().as_str() {
                        "argus" => Some(Provider::Argus),
                        "referralnet" => Some(Provider::ReferralNet),
                        _ => None,
                    })
                    .collect(),
                public_url: Some(public_url.clone()),
                webhook_tolerance: Duration::from_secs(300),
                fail_after_send: settings.messaging.fail_after_send,
                directory_cache_ttl: Duration::from_secs(
                    settings.messaging.directory_cache_seconds,
                ),
            },
        );
        let schema = build_schema(
            Services {
                integrations: integrations.clone(),
                credits: credits.clone(),
                messaging: messaging.clone(),
                store: store.clone(),
                events,
            },
            Limits {
                operation: OperationLimits {
                    max_query_bytes: settings.graphql.max_body_bytes,
                    max_aliases: settings.graphql.max_aliases,
                    max_depth: settings.graphql.max_depth,
                    max_introspection_depth: MAX_INTROSPECTION_DEPTH,
                    max_directives: settings.graphql.max_directives,
                    directory_calls_per_operation: settings.limits.directory_calls_per_operation,
                },
                max_complexity: settings.graphql.max_complexity,
                introspection: settings.introspection_enabled(),
                user_requests: TokenBuckets::new(
                    settings.limits.user_requests_per_second,
                    settings.limits.user_request_burst,
                ),
                address_requests: TokenBuckets::new(
                    settings.limits.address_requests_per_second,
                    settings.limits.address_request_burst,
                ),
            },
        );

        let (shutdown, shutdown_receiver) = watch::channel(false);
        let workers = vec![
            workers::spawn_approval_watcher(integrations, poll_interval, shutdown_receiver.clone()),
            workers::spawn_purchase_recovery(
                credits.clone(),
                purchase_lease,
                shutdown_receiver.clone(),
            ),
            workers::spawn_outbox(
                messaging.clone(),
                status_poll_interval,
                shutdown_receiver.clone(),
            ),
            workers::spawn_inbox_poller(
                messaging.clone(),
                status_poll_interval,
                shutdown_receiver.clone(),
            ),
            workers::spawn_attention_worker(
                messaging.clone(),
                settings.attention_check_interval(),
                shutdown_receiver,
            ),
        ];

        let mut banner = None;
        if dev_keys.is_some() {
            if settings.seed_demo_data {
                dev::seed_demo_practice(&store).await?;
            }
            if settings.print_banner {
                let sandbox_url = sandbox.as_ref().map_or_else(
                    || {
                        settings
                            .providers
                            .argus_base_url
                            .clone()
                            .unwrap_or_default()
                    },
                    smd_sandbox::SandboxHandle::base_url,
                );
                let database = if database_url.starts_with("sqlite:") {
                    database_url.clone()
                } else {
                    redact_url(&database_url)
                };
                let signer = settings
                    .jwt
                    .hs256_secret
                    .as_deref()
                    .map(|secret| dev::DevSigner {
                        secret,
                        issuer: settings.jwt.issuer.as_deref().unwrap_or(dev::DEV_ISSUER),
                        audience: settings
                            .jwt
                            .audience
                            .as_deref()
                            .unwrap_or(dev::DEV_AUDIENCE),
                    });
                banner = Some(dev::banner(
                    signer,
                    &format!("http://{address}/graphql"),
                    &sandbox_url,
                    &database,
                )?);
            }
        }

        // Dev mode pre-fills the playground's Headers pane with a demo practitioner's token,
        // minted afresh on each visit; production never hands out a token.
        let playground_token = match (&dev_keys, settings.jwt.hs256_secret.clone()) {
            (Some(_), Some(secret)) => {
                let issuer = settings
                    .jwt
                    .issuer
                    .clone()
                    .unwrap_or_else(|| dev::DEV_ISSUER.to_owned());
                let audience = settings
                    .jwt
                    .audience
                    .clone()
                    .unwrap_or_else(|| dev::DEV_AUDIENCE.to_owned());
                let mint: crate::playground::DevToken = Arc::new(move || {
                    dev::playground_token(&dev::DevSigner {
                        secret: &secret,
                        issuer: &issuer,
                        audience: &audience,
                    })
                    .ok()
                });
                Some(mint)
            }
            _ => None,
        };

        let cors = if settings.cors_allowed_origins.is_empty() && settings.mode == Mode::Dev {
            CorsPolicy::Localhost
        } else {
            CorsPolicy::List(settings.cors_allowed_origins.clone())
        };
        let open_operations = OpenOperations::default();
        let drain = Drain::new();
        let metrics_access = match &settings.metrics.token {
            Some(token) => MetricsAccess::Token(token.as_str().into()),
            None if settings.metrics_open() => MetricsAccess::Open,
            None => MetricsAccess::Hidden,
        };
        let metrics_routes = crate::metrics::routes(
            metrics.clone(),
            store.clone(),
            open_operations.clone(),
            metrics_access,
        );
        let router = router(
            HttpState {
                schema,
                verifier,
                store: store.clone(),
                playground: crate::playground::Playground::new(
                    settings.playground_enabled(),
                    playground_token,
                ),
                messaging: messaging.clone(),
                max_response_bytes: settings.graphql.max_response_bytes,
                ws_limits: WsLimits {
                    init_timeout: Duration::from_secs(
                        settings.limits.ws_connection_init_timeout_seconds,
                    ),
                    subscriptions_per_connection: settings.limits.ws_subscriptions_per_connection,
                    subscriptions_per_user: settings.limits.ws_subscriptions_per_user,
                    max_response_bytes: settings.graphql.max_response_bytes,
                },
                open_operations,
                max_ws_message_bytes: settings.graphql.max_body_bytes,
                max_body_bytes: settings.graphql.max_body_bytes,
                principals: Arc::default(),
                metrics,
                drain: drain.clone(),
            },
            cors,
            settings.graphql.max_body_bytes,
        )
        .merge(metrics_routes);
        let router = crate::request_id::with_request_ids(router);
        Ok(Self {
            listener,
            router,
            store,
            shutdown,
            workers,
            events_shutdown,
            events_listener,
            drain,
            shutdown_settings: settings.shutdown.clone(),
            sandbox,
            banner,
            credits,
        })
    }

    /// The port the gateway listens on (useful with port 0).
    pub fn port(&self) -> u16 {
        self.address().port()
    }

    /// The address the gateway listens on.
    pub fn address(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The embedded sandbox's URL, in dev mode.
    pub fn sandbox_url(&self) -> Option<String> {
        self.sandbox
            .as_ref()
            .map(smd_sandbox::SandboxHandle::base_url)
    }

    /// The dev-mode banner (URLs, demo credentials, tokens).
    pub fn banner(&self) -> Option<&str> {
        self.banner.as_deref()
    }

    /// The credit rules (the messaging layer debits through them; tests drive debits).
    pub fn credits(&self) -> CreditService {
        self.credits.clone()
    }

    /// A handle on the database (tests inspect what was stored).
    pub fn store(&self) -> Store {
        self.store.clone()
    }

    /// Serves until Ctrl-C / SIGTERM, then stops workers and the sandbox.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        self.run_until(shutdown_signal()).await
    }

    /// Whether the node is draining (tests and diagnostics).
    pub fn drain(&self) -> Drain {
        self.drain.clone()
    }

    /// Serves until `stop` completes, then stops in order:
    /// 1. `/readyz` answers 503 and the workers stop claiming work (their current pass
    ///    finishes, recording each outcome, which ends that message's or purchase's lease);
    /// 2. after `shutdown.readiness_grace_ms` the port stops accepting and every WebSocket is
    ///    closed with 1001 (going away);
    /// 3. in-flight requests finish (up to `shutdown.drain_timeout_ms`; the rest are cut, and
    ///    what they held is left to lease expiry, as after a crash);
    /// 4. the workers' passes end (same limit), then the change listener and the sandbox.
    pub async fn run_until(
        self,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Self {
            listener,
            router,
            shutdown,
            mut workers,
            events_shutdown,
            events_listener,
            drain,
            shutdown_settings,
            sandbox,
            ..
        } = self;
        let grace = Duration::from_millis(shutdown_settings.readiness_grace_ms);
        let drain_timeout = Duration::from_millis(shutdown_settings.drain_timeout_ms);
        let (stop_accepting, accepting_stopped) = tokio::sync::oneshot::channel::<()>();
        let control = {
            let drain = drain.clone();
            tokio::spawn(async move {
                stop.await;
                tracing::info!(
                    grace_ms = grace.as_millis() as u64,
                    "stopping: not ready any more; workers stop claiming work"
                );
                drain.start();
                let _ = shutdown.send(true);
                tokio::time::sleep(grace).await;
                tracing::info!("stopping: no new connections; closing WebSockets (1001)");
                drain.close_connections();
                let _ = stop_accepting.send(());
            })
        };
        // Client addresses feed the per-address request limits.
        let server = axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move {
            let _ = accepting_stopped.await;
        });
        let served = std::future::IntoFuture::into_future(server);
        tokio::pin!(served);
        // Until the stop begins the server runs unbounded; from then on, `drain_timeout`.
        let result = tokio::select! {
            result = &mut served => Some(result),
            () = drain.closing() => None,
        };
        let result = match result {
            Some(result) => result,
            None => match tokio::time::timeout(drain_timeout, &mut served).await {
                Ok(result) => result,
                Err(_) => {
                    tracing::warn!(
                        timeout_ms = drain_timeout.as_millis() as u64,
                        "stopping: in-flight requests did not finish in time; cut"
                    );
                    Ok(())
                }
            },
        };
        control.abort();
        drain.start();
        drain.close_connections();
        let workers_done = futures::future::join_all(workers.iter_mut());
        if tokio::time::timeout(drain_timeout, workers_done)
            .await
            .is_err()
        {
            tracing::warn!("stopping: a worker pass did not finish in time; its leases expire");
            for worker in &workers {
                worker.abort();
            }
        }
        drain.websockets_closed(Duration::from_secs(5)).await;
        let _ = events_shutdown.send(true);
        if let Some(events_listener) = events_listener {
            let _ = events_listener.await;
        }
        if let Some(sandbox) = sandbox {
            sandbox.shutdown().await;
        }
        result?;
        tracing::info!("stopped");
        Ok(())
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

/// Hides a password in a database URL before it is printed.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &url[scheme_end + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn database_passwords_are_hidden_in_messages() {
        assert_eq!(
            super::redact_url("postgres://app:s3cret@db:5432/smd"),
            "postgres://app:***@db:5432/smd"
        );
        assert_eq!(
            super::redact_url("sqlite://./data/x.db"),
            "sqlite://./data/x.db"
        );
    }
}
