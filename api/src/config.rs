//! Typed settings: defaults, then an optional TOML file, then environment variables, then
//! validation for the chosen mode. This is the only module that reads the environment.
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `SMD_CONFIG` | TOML file with any of the settings below | none |
//! | `SMD_MODE` | `dev` or `production` | `dev` |
//! | `SMD_LISTEN` | gateway address | `127.0.0.1:8080` |
//! | `SMD_SANDBOX_LISTEN` | embedded sandbox address (dev) | `127.0.0.1:8081` |
//! | `SMD_DATA_DIR` | dev keys and the SQLite file | `./data` |
//! | `DATABASE_URL` | `sqlite://…` or `postgres://…` | SQLite in the data dir |
//! | `SMD_JWT_ISSUER`, `SMD_JWT_AUDIENCE` | required `iss` / `aud` | dev: `smd-gateway-dev` / `smd-gateway` |
//! | `SMD_JWT_HS256_SECRET` | HS256 secret, ≥ 32 bytes | dev: generated |
//! | `SMD_JWT_PUBLIC_KEY_FILES` | comma-separated PEM files (RS256 / ES256) | none |
//! | `SMD_JWT_JWKS_FILE` | a JWKS file | none |
//! | `SMD_JWT_LEEWAY_SECONDS` | clock skew allowed on `exp`/`nbf` | 30 |
//! | `SMD_JWT_MAX_LIFETIME_SECONDS` | longest accepted `exp − iat`; 0 = no maximum | 86400 |
//! | `SMD_ENCRYPTION_KEY` | base64 32-byte data-encryption key | dev: generated |
//! | `SMD_ARGUS_BASE_URL`, `SMD_REFERRALNET_BASE_URL` | provider endpoints | dev: embedded sandbox |
//! | `SMD_PROVIDER_TIMEOUT_MS` | per provider call | 10000 |
//! | `SMD_APPROVAL_POLL_INTERVAL_MS` | registration approval checks | dev 2000, production 60000 |
//! | `SMD_PLAYGROUND`, `SMD_INTROSPECTION` | `true`/`false` | dev on, production off |
//! | `SMD_CORS_ALLOWED_ORIGINS` | comma-separated origins | dev: any localhost origin |
//! | `SMD_VALIDATE_LOGIN_PER_MINUTE` | per user | 5 |
//! | `SMD_LOG` (else `RUST_LOG`) | log filter, tracing-subscriber's `EnvFilter` syntax | `info,sqlx=warn,sea_orm=warn` |
//! | `SMD_LOG_FORMAT` | `text` or `json` (one JSON object per line) | `text` |
//! | `SMD_METRICS_TOKEN` | bearer token that may read `/metrics` (≥ 16 characters) | dev: open; production: not served |
//! | `SMD_UNDELIVERED_ALERT_AFTER_SECONDS` | flag a sent message not delivered this long after the provider accepted it | 3600 |
//! | `SMD_UNACKNOWLEDGED_ALERT_AFTER_SECONDS` | flag a delivered message not acknowledged this long after delivery | 172800 |
//! | `SMD_EXPIRE_UNDELIVERED_AFTER_SECONDS` | a sent message not delivered this long after acceptance becomes `FAILED` (expired, not refunded) | 432000 |
//! | `SMD_ATTENTION_CHECK_INTERVAL_MS` | how often the alert worker looks for overdue messages | dev 2000, production 60000 |

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// How the gateway runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Local development: generated keys, embedded sandbox, demo data, playground.
    Dev,
    /// Real deployment: everything must be configured explicitly.
    Production,
}

/// JWT verification settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtSettings {
    /// Required `iss`.
    pub issuer: Option<String>,
    /// Required `aud`.
    pub audience: Option<String>,
    /// HS256 shared secret (at least 32 bytes).
    pub hs256_secret: Option<String>,
    /// PEM public keys (RSA → RS256, EC P-256 → ES256).
    pub public_key_files: Vec<PathBuf>,
    /// A JWKS document on disk.
    pub jwks_file: Option<PathBuf>,
    /// Allowed clock skew in seconds, on `exp` and `nbf` alike (and on `iat` in the future).
    pub leeway_seconds: u64,
    /// The longest token lifetime (`exp − iat`) accepted, in seconds; 0 means no maximum.
    /// While it is set, tokens must carry `iat`: without it their lifetime cannot be known.
    pub max_lifetime_seconds: u64,
}

impl Default for JwtSettings {
    /// No keys, issuer or audience (production must name them); 30 s leeway; one day at most.
    /// Also what a `[jwt]` table in the config file starts from, so naming one key there does
    /// not reset the others.
    fn default() -> Self {
        Self {
            issuer: None,
            audience: None,
            hs256_secret: None,
            public_key_files: Vec::new(),
            jwks_file: None,
            leeway_seconds: 30,
            max_lifetime_seconds: DEFAULT_MAX_TOKEN_LIFETIME_SECONDS,
        }
    }
}

/// The longest token lifetime accepted unless configured otherwise: one day, the lifetime of
/// the dev tokens the gateway prints.
pub const DEFAULT_MAX_TOKEN_LIFETIME_SECONDS: u64 = 86_400;

/// Provider endpoints.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProviderSettings {
    /// Argus base URL.
    pub argus_base_url: Option<String>,
    /// ReferralNet base URL.
    pub referralnet_base_url: Option<String>,
    /// Whole-request timeout per provider call, in milliseconds.
    pub timeout_ms: u64,
    /// Allow `http://` provider URLs in production (a sandbox on a private network); off by
    /// default because Argus sends credentials with every request.
    pub allow_insecure_http: bool,
}

impl Default for ProviderSettings {
    fn default() -> Self {
        Self {
            argus_base_url: None,
            referralnet_base_url: None,
            timeout_ms: 10_000,
            allow_insecure_http: false,
        }
    }
}

/// The payment gateway.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PaymentSettings {
    /// Base URL (dev: the embedded sandbox).
    pub base_url: Option<String>,
    /// Secret API key (dev: `sk_sandbox_dev`).
    pub api_key: Option<String>,
}

/// Credits.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CreditConfig {
    /// Pack sizes on offer, in credits.
    pub packs: Vec<i64>,
    /// Milliseconds a purchase being charged is left to its request before the recovery
    /// worker may take it over.
    pub purchase_lease_ms: u64,
    /// Test-only fault point: stop after a successful charge, before the ledger write.
    #[doc(hidden)]
    pub fail_after_charge: bool,
}

impl Default for CreditConfig {
    fn default() -> Self {
        Self {
            packs: crate::domain::pricing::DEFAULT_PACK_CREDITS.to_vec(),
            purchase_lease_ms: 30_000,
            fail_after_charge: false,
        }
    }
}

/// The messaging outbox.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MessagingConfig {
    /// How often sent messages' delivery is checked, ms (default: dev 2000, production 30000).
    pub status_poll_interval_ms: Option<u64>,
    /// First retry delay after a transient provider fault, ms (doubles, with jitter).
    pub retry_base_ms: u64,
    /// Longest retry delay, ms.
    pub retry_max_ms: u64,
    /// A message the provider has not accepted after this many seconds fails and is refunded.
    pub give_up_after_seconds: u64,
    /// A sent message not `DELIVERED` this many seconds after the provider accepted it is
    /// flagged as needing attention (`NOT_DELIVERED`).
    pub undelivered_alert_after_seconds: u64,
    /// A delivered message not `ACKNOWLEDGED` this many seconds after delivery is flagged
    /// (`NOT_ACKNOWLEDGED`).
    pub unacknowledged_alert_after_seconds: u64,
    /// A sent message not delivered this many seconds after the provider accepted it becomes
    /// `FAILED` (expired, not refunded); a delivered one is followed this long for its
    /// acknowledgement.
    pub expire_after_seconds: u64,
    /// How often the alert worker looks for overdue messages, ms (default: dev 2000,
    /// production 60000).
    pub attention_check_interval_ms: Option<u64>,
    /// Test-only fault point: stop right after the provider accepted a message, before the
    /// gateway records it (as a crash would).
    #[doc(hidden)]
    pub fail_after_send: bool,
    /// Provider order when a send names none (e.g. `["argus", "referralnet"]`); empty: the one
    /// with the better recent delivery record.
    pub provider_preference: Vec<String>,
    /// How long a practice reuses a provider directory page it fetched (searches and the
    /// recipient check before each send), seconds; 0 turns the cache off. Failed lookups are
    /// never cached.
    pub directory_cache_seconds: u64,
}

impl Default for MessagingConfig {
    fn default() -> Self {
        Self {
            status_poll_interval_ms: None,
            retry_base_ms: 1_000,
            retry_max_ms: 300_000,
            give_up_after_seconds: 86_400,
            undelivered_alert_after_seconds: 3_600,
            unacknowledged_alert_after_seconds: 48 * 3_600,
            expire_after_seconds: 5 * 86_400,
            attention_check_interval_ms: None,
            fail_after_send: false,
            provider_preference: Vec::new(),
            directory_cache_seconds: 60,
        }
    }
}

/// GraphQL endpoint limits and tools.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GraphqlSettings {
    /// Serve GraphiQL on `GET /graphql` (default: dev only).
    pub playground: Option<bool>,
    /// Answer introspection queries (default: dev only).
    pub introspection: Option<bool>,
    /// Maximum selection depth.
    pub max_depth: usize,
    /// Maximum query complexity.
    pub max_complexity: usize,
    /// Maximum aliased fields in one document.
    pub max_aliases: usize,
    /// Maximum request body in bytes (HTTP), and WebSocket message and operation text size.
    pub max_body_bytes: usize,
    /// Maximum response in bytes for one operation (HTTP body or WebSocket message).
    pub max_response_bytes: usize,
    /// Maximum directives in one document.
    pub max_directives: usize,
}

impl Default for GraphqlSettings {
    fn default() -> Self {
        Self {
            playground: None,
            introspection: None,
            max_depth: 12,
            max_complexity: 2000,
            max_aliases: 30,
            max_body_bytes: 256 * 1024,
            max_response_bytes: 4 * 1024 * 1024,
            max_directives: 50,
        }
    }
}

/// Limits on how often and how much a client may ask (see README "Limits and permissions").
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitSettings {
    /// Failed link/registration attempts per user per window (shared by every node).
    pub failed_logins_per_user: u32,
    /// Failed link/registration attempts per provider username per window, gateway-wide.
    pub failed_logins_per_username: u32,
    /// The sliding window of the two limits above, seconds.
    pub failed_login_window_seconds: u64,
    /// Requests per user: tokens refilled per second (per node).
    pub user_requests_per_second: u32,
    /// Requests per user: bucket size (the burst allowed at once).
    pub user_request_burst: u32,
    /// Requests per client address: tokens refilled per second (per node).
    pub address_requests_per_second: u32,
    /// Requests per client address: bucket size.
    pub address_request_burst: u32,
    /// Seconds a WebSocket may stay open without `connection_init`.
    pub ws_connection_init_timeout_seconds: u64,
    /// Subscriptions open at once on one WebSocket.
    pub ws_subscriptions_per_connection: usize,
    /// Subscriptions open at once per user, over all their WebSockets on a node.
    pub ws_subscriptions_per_user: usize,
    /// Directory provider calls one GraphQL operation may cause, whatever it aliases or pages.
    pub directory_calls_per_operation: u32,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            failed_logins_per_user: 10,
            failed_logins_per_username: 20,
            failed_login_window_seconds: 15 * 60,
            user_requests_per_second: 20,
            user_request_burst: 60,
            address_requests_per_second: 50,
            address_request_burst: 150,
            ws_connection_init_timeout_seconds: 10,
            ws_subscriptions_per_connection: 50,
            ws_subscriptions_per_user: 100,
            directory_calls_per_operation: 12,
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event; coloured only when written to a terminal.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Logging.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// Text or JSON lines.
    pub format: LogFormat,
    /// An `EnvFilter` directive such as `info,smd_gateway=debug`; default
    /// `info,sqlx=warn,sea_orm=warn`.
    pub filter: Option<String>,
}

/// Metrics.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSettings {
    /// The bearer token that may read `/metrics`. Without one, `/metrics` is open in dev mode
    /// and not served in production.
    pub token: Option<String>,
}

/// How a node stops (SIGTERM / Ctrl-C).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownSettings {
    /// After the signal, how long the node keeps serving while `/readyz` already answers 503,
    /// so a load balancer stops sending new requests before the port closes, milliseconds.
    pub readiness_grace_ms: u64,
    /// How long in-flight requests and the workers' current pass may take to finish once the
    /// node stopped accepting, milliseconds; what is still running then is dropped (its
    /// leases expire and another node finishes the work).
    pub drain_timeout_ms: u64,
}

impl Default for ShutdownSettings {
    fn default() -> Self {
        Self {
            readiness_grace_ms: 0,
            drain_timeout_ms: 30_000,
        }
    }
}

/// Everything the gateway can be told.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// dev or production.
    pub mode: Mode,
    /// Gateway listen address.
    pub listen: SocketAddr,
    /// Embedded sandbox listen address (dev mode).
    pub sandbox_listen: SocketAddr,
    /// Where dev keys and the default SQLite file live.
    pub data_dir: PathBuf,
    /// Database URL; default SQLite under the data dir.
    pub database_url: Option<String>,
    /// Token verification.
    pub jwt: JwtSettings,
    /// Base64 32-byte key that encrypts provider passwords.
    pub encryption_key: Option<String>,
    /// Provider endpoints.
    pub providers: ProviderSettings,
    /// The payment gateway.
    pub payments: PaymentSettings,
    /// Credit packs and purchase recovery.
    pub credits: CreditConfig,
    /// The messaging outbox.
    pub messaging: MessagingConfig,
    /// The gateway's externally reachable base URL (for provider webhooks); default: the
    /// listen address.
    pub public_url: Option<String>,
    /// Approval checks interval, milliseconds.
    pub approval_poll_interval_ms: Option<u64>,
    /// GraphQL endpoint.
    pub graphql: GraphqlSettings,
    /// Allowed browser origins.
    pub cors_allowed_origins: Vec<String>,
    /// `validateLogin` calls per user per minute.
    pub validate_login_per_minute: u32,
    /// Attempt, request and WebSocket limits.
    pub limits: LimitSettings,
    /// Seed the demo practice (dev mode).
    pub seed_demo_data: bool,
    /// Print the dev banner with tokens (dev mode).
    pub print_banner: bool,
    /// Log format and filter.
    pub log: LogSettings,
    /// Who may read `/metrics`.
    pub metrics: MetricsSettings,
    /// Stopping: readiness grace and drain timeout.
    pub shutdown: ShutdownSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            mode: Mode::Dev,
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            sandbox_listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            data_dir: PathBuf::from("./data"),
            database_url: None,
            jwt: JwtSettings::default(),
            encryption_key: None,
            providers: ProviderSettings::default(),
            payments: PaymentSettings::default(),
            credits: CreditConfig::default(),
            messaging: MessagingConfig::default(),
            public_url: None,
            approval_poll_interval_ms: None,
            graphql: GraphqlSettings::default(),
            cors_allowed_origins: Vec::new(),
            validate_login_per_minute: 5,
            limits: LimitSettings::default(),
            seed_demo_data: true,
            print_banner: true,
            log: LogSettings::default(),
            metrics: MetricsSettings::default(),
            shutdown: ShutdownSettings::default(),
        }
    }
}

/// A setting that could not be used; the message says which and how to fix it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl Settings {
    /// Defaults, then the file named by `config_file` or `SMD_CONFIG`, then the environment.
    pub fn load(config_file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(config_file, |name| std::env::var(name).ok())
    }

    /// Like [`Settings::load`], reading variables through `lookup` (tests pass a map).
    pub fn load_from(
        config_file: Option<&Path>,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let file = config_file
            .map(Path::to_path_buf)
            .or_else(|| lookup("SMD_CONFIG").map(PathBuf::from));
        let mut settings = match file {
            Some(path) => {
                let text = std::fs::read_to_string(&path).map_err(|error| {
                    ConfigError(format!(
                        "cannot read config file {}: {error}",
                        path.display()
                    ))
                })?;
                toml::from_str(&text).map_err(|error| {
                    ConfigError(format!(
                        "config file {} is invalid: {error}",
                        path.display()
                    ))
                })?
            }
            None => Settings::default(),
        };
        settings.apply_environment(&lookup)?;
        Ok(settings)
    }

    fn apply_environment(
        &mut self,
        lookup: &impl Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        let get = |name: &str| {
            lookup(name)
                .map(|value| value.trim().to_owned())
                .filter(|value| !value.is_empty())
        };
        if let Some(mode) = get("SMD_MODE") {
            self.mode = match mode.as_str() {
                "dev" => Mode::Dev,
                "production" => Mode::Production,
                other => {
                    return Err(ConfigError(format!(
                        "SMD_MODE must be dev or production, not {other:?}"
                    )));
                }
            };
        }
        if let Some(listen) = get("SMD_LISTEN") {
            self.listen = parse_addr("SMD_LISTEN", &listen)?;
        }
        if let Some(listen) = get("SMD_SANDBOX_LISTEN") {
            self.sandbox_listen = parse_addr("SMD_SANDBOX_LISTEN", &listen)?;
        }
        if let Some(dir) = get("SMD_DATA_DIR") {
            self.data_dir = PathBuf::from(dir);
        }
        if let Some(url) = get("DATABASE_URL") {
            self.database_url = Some(url);
        }
        set_opt(&mut self.jwt.issuer, get("SMD_JWT_ISSUER"));
        set_opt(&mut self.jwt.audience, get("SMD_JWT_AUDIENCE"));
        set_opt(&mut self.jwt.hs256_secret, get("SMD_JWT_HS256_SECRET"));
        if let Some(files) = get("SMD_JWT_PUBLIC_KEY_FILES") {
            self.jwt.public_key_files = split_list(&files).map(PathBuf::from).collect();
        }
        if let Some(file) = get("SMD_JWT_JWKS_FILE") {
            self.jwt.jwks_file = Some(PathBuf::from(file));
        }
        if let Some(leeway) = get("SMD_JWT_LEEWAY_SECONDS") {
            self.jwt.leeway_seconds = parse_number("SMD_JWT_LEEWAY_SECONDS", &leeway)?;
        }
        if let Some(lifetime) = get("SMD_JWT_MAX_LIFETIME_SECONDS") {
            self.jwt.max_lifetime_seconds =
                parse_number("SMD_JWT_MAX_LIFETIME_SECONDS", &lifetime)?;
        }
        set_opt(&mut self.encryption_key, get("SMD_ENCRYPTION_KEY"));
        set_opt(
            &mut self.providers.argus_base_url,
            get("SMD_ARGUS_BASE_URL"),
        );
        set_opt(
            &mut self.providers.referralnet_base_url,
            get("SMD_REFERRALNET_BASE_URL"),
        );
        if let Some(timeout) = get("SMD_PROVIDER_TIMEOUT_MS") {
            self.providers.timeout_ms = parse_number("SMD_PROVIDER_TIMEOUT_MS", &timeout)?;
        }
        set_opt(&mut self.public_url, get("SMD_PUBLIC_URL"));
        if let Some(seconds) = get("SMD_DIRECTORY_CACHE_SECONDS") {
            self.messaging.directory_cache_seconds =
                parse_number("SMD_DIRECTORY_CACHE_SECONDS", &seconds)?;
        }
        if let Some(order) = get("SMD_PROVIDER_PREFERENCE") {
            self.messaging.provider_preference = split_list(&order).map(str::to_owned).collect();
        }
        set_opt(&mut self.payments.base_url, get("SMD_PAYMENTS_BASE_URL"));
        set_opt(&mut self.payments.api_key, get("SMD_PAYMENTS_API_KEY"));
        if let Some(packs) = get("SMD_CREDIT_PACKS") {
            self.credits.packs = split_list(&packs)
                .map(|pack| parse_number("SMD_CREDIT_PACKS", pack))
                .collect::<Result<_, _>>()?;
        }
        if let Some(flag) = get("SMD_ALLOW_INSECURE_PROVIDER_URLS") {
            self.providers.allow_insecure_http =
                parse_bool("SMD_ALLOW_INSECURE_PROVIDER_URLS", &flag)?;
        }
        if let Some(interval) = get("SMD_APPROVAL_POLL_INTERVAL_MS") {
            self.approval_poll_interval_ms =
                Some(parse_number("SMD_APPROVAL_POLL_INTERVAL_MS", &interval)?);
        }
        if let Some(flag) = get("SMD_PLAYGROUND") {
            self.graphql.playground = Some(parse_bool("SMD_PLAYGROUND", &flag)?);
        }
        if let Some(flag) = get("SMD_INTROSPECTION") {
            self.graphql.introspection = Some(parse_bool("SMD_INTROSPECTION", &flag)?);
        }
        if let Some(origins) = get("SMD_CORS_ALLOWED_ORIGINS") {
            self.cors_allowed_origins = split_list(&origins).map(str::to_owned).collect();
        }
        if let Some(filter) = get("SMD_LOG").or_else(|| get("RUST_LOG")) {
            self.log.filter = Some(filter);
        }
        if let Some(format) = get("SMD_LOG_FORMAT") {
            self.log.format = match format.to_ascii_lowercase().as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => {
                    return Err(ConfigError(format!(
                        "SMD_LOG_FORMAT must be text or json, not {other:?}"
                    )));
                }
            };
        }
        set_opt(&mut self.metrics.token, get("SMD_METRICS_TOKEN"));
        if let Some(grace) = get("SMD_SHUTDOWN_GRACE_MS") {
            self.shutdown.readiness_grace_ms = parse_number("SMD_SHUTDOWN_GRACE_MS", &grace)?;
        }
        if let Some(timeout) = get("SMD_SHUTDOWN_TIMEOUT_MS") {
            self.shutdown.drain_timeout_ms = parse_number("SMD_SHUTDOWN_TIMEOUT_MS", &timeout)?;
        }
        if let Some(limit) = get("SMD_VALIDATE_LOGIN_PER_MINUTE") {
            self.validate_login_per_minute = parse_number("SMD_VALIDATE_LOGIN_PER_MINUTE", &limit)?;
        }
        let limits = &mut self.limits;
        for (name, field) in [
            (
                "SMD_FAILED_LOGINS_PER_USER",
                &mut limits.failed_logins_per_user,
            ),
            (
                "SMD_FAILED_LOGINS_PER_USERNAME",
                &mut limits.failed_logins_per_username,
            ),
            (
                "SMD_USER_REQUESTS_PER_SECOND",
                &mut limits.user_requests_per_second,
            ),
            ("SMD_USER_REQUEST_BURST", &mut limits.user_request_burst),
            (
                "SMD_ADDRESS_REQUESTS_PER_SECOND",
                &mut limits.address_requests_per_second,
            ),
            (
                "SMD_ADDRESS_REQUEST_BURST",
                &mut limits.address_request_burst,
            ),
        ] {
            if let Some(value) = get(name) {
                *field = parse_number(name, &value)?;
            }
        }
        if let Some(value) = get("SMD_WS_SUBSCRIPTIONS_PER_CONNECTION") {
            limits.ws_subscriptions_per_connection =
                parse_number("SMD_WS_SUBSCRIPTIONS_PER_CONNECTION", &value)?;
        }
        let messaging = &mut self.messaging;
        for (name, field) in [
            (
                "SMD_UNDELIVERED_ALERT_AFTER_SECONDS",
                &mut messaging.undelivered_alert_after_seconds,
            ),
            (
                "SMD_UNACKNOWLEDGED_ALERT_AFTER_SECONDS",
                &mut messaging.unacknowledged_alert_after_seconds,
            ),
            (
                "SMD_EXPIRE_UNDELIVERED_AFTER_SECONDS",
                &mut messaging.expire_after_seconds,
            ),
        ] {
            if let Some(value) = get(name) {
                *field = parse_number(name, &value)?;
            }
        }
        if let Some(value) = get("SMD_ATTENTION_CHECK_INTERVAL_MS") {
            messaging.attention_check_interval_ms =
                Some(parse_number("SMD_ATTENTION_CHECK_INTERVAL_MS", &value)?);
        }
        if let Some(value) = get("SMD_WS_SUBSCRIPTIONS_PER_USER") {
            limits.ws_subscriptions_per_user =
                parse_number("SMD_WS_SUBSCRIPTIONS_PER_USER", &value)?;
        }
        Ok(())
    }

    /// Checks what the mode requires. Production refuses to start with anything missing, and
    /// says everything that is missing at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if self.mode == Mode::Production {
            let has_key = self.jwt.hs256_secret.is_some()
                || !self.jwt.public_key_files.is_empty()
                || self.jwt.jwks_file.is_some();
            if !has_key {
                problems.push("a JWT verification key (SMD_JWT_PUBLIC_KEY_FILES, SMD_JWT_JWKS_FILE or SMD_JWT_HS256_SECRET)");
            }
            if self.jwt.issuer.is_none() {
                problems.push("the JWT issuer (SMD_JWT_ISSUER)");
            }
            if self.jwt.audience.is_none() {
                problems.push("the JWT audience (SMD_JWT_AUDIENCE)");
            }
            if self.encryption_key.is_none() {
                problems.push(
                    "the data-encryption key (SMD_ENCRYPTION_KEY, base64 of 32 random bytes)",
                );
            }
            if self.providers.argus_base_url.is_none() {
                problems.push("the Argus base URL (SMD_ARGUS_BASE_URL)");
            }
            if self.providers.referralnet_base_url.is_none() {
                problems.push("the ReferralNet base URL (SMD_REFERRALNET_BASE_URL)");
            }
            if self.payments.base_url.is_none() {
                problems.push("the payment gateway URL (SMD_PAYMENTS_BASE_URL)");
            }
            if self.payments.api_key.is_none() {
                problems.push("the payment gateway API key (SMD_PAYMENTS_API_KEY)");
            }
        }
        if !problems.is_empty() {
            return Err(ConfigError(format!(
                "production mode needs explicit settings; missing: {}",
                problems.join("; ")
            )));
        }
        // The fault points exist for tests that simulate a crash; in production they would
        // take customers' money without crediting it, or lose track of sent messages.
        if self.mode == Mode::Production {
            let faults: Vec<&str> = [
                (self.credits.fail_after_charge, "credits.fail_after_charge"),
                (self.messaging.fail_after_send, "messaging.fail_after_send"),
            ]
            .into_iter()
            .filter_map(|(on, name)| on.then_some(name))
            .collect();
            if !faults.is_empty() {
                return Err(ConfigError(format!(
                    "test-only fault settings cannot be used in production mode: {} (remove them from the config file)",
                    faults.join(", ")
                )));
            }
        }
        if let Some(token) = &self.metrics.token
            && token.len() < 16
        {
            return Err(ConfigError(
                "SMD_METRICS_TOKEN must be at least 16 characters".into(),
            ));
        }
        if let Some(filter) = &self.log.filter
            && tracing_subscriber::EnvFilter::try_new(filter).is_err()
        {
            return Err(ConfigError(format!(
                "SMD_LOG / RUST_LOG {filter:?} is not a log filter such as info,smd_gateway=debug"
            )));
        }
        if let Some(secret) = &self.jwt.hs256_secret
            && secret.len() < 32
        {
            return Err(ConfigError(
                "SMD_JWT_HS256_SECRET must be at least 32 bytes".into(),
            ));
        }
        for url in [
            &self.providers.argus_base_url,
            &self.providers.referralnet_base_url,
            &self.payments.base_url,
        ]
        .into_iter()
        .flatten()
        {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(ConfigError(format!(
                    "provider base URL {url:?} must start with http:// or https://"
                )));
            }
        }
        if self.mode == Mode::Production && !self.providers.allow_insecure_http {
            for url in [
                &self.providers.argus_base_url,
                &self.providers.referralnet_base_url,
                &self.payments.base_url,
            ]
            .into_iter()
            .flatten()
            {
                if url.starts_with("http://") {
                    return Err(ConfigError(format!(
                        "provider base URL {url:?} must use https:// in production (set SMD_ALLOW_INSECURE_PROVIDER_URLS=true only for a sandbox)"
                    )));
                }
            }
        }
        for name in &self.messaging.provider_preference {
            if !matches!(name.to_lowercase().as_str(), "argus" | "referralnet") {
                return Err(ConfigError(format!(
                    "SMD_PROVIDER_PREFERENCE lists {name:?}; use argus and/or referralnet"
                )));
            }
        }
        if self.providers.timeout_ms == 0 {
            return Err(ConfigError(
                "SMD_PROVIDER_TIMEOUT_MS must be more than 0".into(),
            ));
        }
        // Up to ten years; a zero deadline would flag every message the moment it is sent.
        for (name, seconds) in [
            (
                "SMD_UNDELIVERED_ALERT_AFTER_SECONDS",
                self.messaging.undelivered_alert_after_seconds,
            ),
            (
                "SMD_UNACKNOWLEDGED_ALERT_AFTER_SECONDS",
                self.messaging.unacknowledged_alert_after_seconds,
            ),
            (
                "SMD_EXPIRE_UNDELIVERED_AFTER_SECONDS",
                self.messaging.expire_after_seconds,
            ),
        ] {
            if !(1..=315_360_000).contains(&seconds) {
                return Err(ConfigError(format!(
                    "{name} must be between 1 and 315360000 (ten years), not {seconds}"
                )));
            }
        }
        if let Some(interval) = self.messaging.attention_check_interval_ms
            && !(1..=86_400_000).contains(&interval)
        {
            return Err(ConfigError(
                "SMD_ATTENTION_CHECK_INTERVAL_MS must be between 1 and 86400000 (one day)".into(),
            ));
        }
        if let Some(interval) = self.approval_poll_interval_ms
            && !(1..=86_400_000).contains(&interval)
        {
            return Err(ConfigError(
                "SMD_APPROVAL_POLL_INTERVAL_MS must be between 1 and 86400000 (one day)".into(),
            ));
        }
        if self.providers.timeout_ms > 300_000 {
            return Err(ConfigError(
                "SMD_PROVIDER_TIMEOUT_MS must be at most 300000".into(),
            ));
        }
        if self.cors_allowed_origins.iter().any(|origin| origin == "*") {
            return Err(ConfigError(
                "SMD_CORS_ALLOWED_ORIGINS cannot be *: list the PMS origins (tokens travel in a header, so a wildcard would let any site call the API with a stolen token)".into(),
            ));
        }
        let limits = &self.limits;
        for (name, value) in [
            (
                "failed_logins_per_user",
                u64::from(limits.failed_logins_per_user),
            ),
            (
                "failed_logins_per_username",
                u64::from(limits.failed_logins_per_username),
            ),
            (
                "failed_login_window_seconds",
                limits.failed_login_window_seconds,
            ),
            (
                "user_requests_per_second",
                u64::from(limits.user_requests_per_second),
            ),
            ("user_request_burst", u64::from(limits.user_request_burst)),
            (
                "address_requests_per_second",
                u64::from(limits.address_requests_per_second),
            ),
            (
                "address_request_burst",
                u64::from(limits.address_request_burst),
            ),
            (
                "ws_connection_init_timeout_seconds",
                limits.ws_connection_init_timeout_seconds,
            ),
            (
                "ws_subscriptions_per_connection",
                limits.ws_subscriptions_per_connection as u64,
            ),
            (
                "ws_subscriptions_per_user",
                limits.ws_subscriptions_per_user as u64,
            ),
            (
                "directory_calls_per_operation",
                u64::from(limits.directory_calls_per_operation),
            ),
        ] {
            if value == 0 {
                return Err(ConfigError(format!(
                    "limits.{name} must be at least 1 (a limit of 0 would refuse everything)"
                )));
            }
        }
        if self.validate_login_per_minute == 0 {
            return Err(ConfigError(
                "SMD_VALIDATE_LOGIN_PER_MINUTE must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// Whether `/metrics` is served to anyone on the port: dev mode without a token.
    pub fn metrics_open(&self) -> bool {
        self.mode == Mode::Dev && self.metrics.token.is_none()
    }

    /// Whether GraphiQL is served.
    pub fn playground_enabled(&self) -> bool {
        self.graphql.playground.unwrap_or(self.mode == Mode::Dev)
    }

    /// Whether introspection is answered.
    pub fn introspection_enabled(&self) -> bool {
        self.graphql.introspection.unwrap_or(self.mode == Mode::Dev)
    }

    /// The approval watcher's interval.
    pub fn approval_poll_interval(&self) -> std::time::Duration {
        let default = if self.mode == Mode::Dev {
            2_000
        } else {
            60_000
        };
        std::time::Duration::from_millis(self.approval_poll_interval_ms.unwrap_or(default))
    }

    /// How often the alert worker looks for overdue messages.
    pub fn attention_check_interval(&self) -> std::time::Duration {
        let default = if self.mode == Mode::Dev {
            2_000
        } else {
            60_000
        };
        std::time::Duration::from_millis(
            self.messaging
                .attention_check_interval_ms
                .unwrap_or(default)
                .max(1),
        )
    }

    /// How often sent messages' delivery is checked.
    pub fn status_poll_interval(&self) -> std::time::Duration {
        let default = if self.mode == Mode::Dev {
            2_000
        } else {
            30_000
        };
        std::time::Duration::from_millis(
            self.messaging
                .status_poll_interval_ms
                .unwrap_or(default)
                .max(1),
        )
    }

    /// The database URL in effect.
    pub fn effective_database_url(&self) -> String {
        self.database_url.clone().unwrap_or_else(|| {
            format!(
                "sqlite://{}?mode=rwc",
                self.data_dir.join("smd-gateway.db").display()
            )
        })
    }
}

fn set_opt(target: &mut Option<String>, value: Option<String>) {
    if value.is_some() {
        *target = value;
    }
}

fn split_list(value: &str) -> impl Iterator<Item = &str> {
    value
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
}

fn parse_addr(name: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        ConfigError(format!(
            "{name} must be an address like 127.0.0.1:8080, not {value:?}"
        ))
    })
}

fn parse_number<T: std::str::FromStr>(name: &str, value: &str) -> Result<T, ConfigError> {
    value
        .parse()
        .map_err(|_| ConfigError(format!("{name} must be a whole number, not {value:?}")))
}

fn parse_bool(name: &str, value: &str) -> Result<bool, ConfigError> {
    match value {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        other => Err(ConfigError(format!(
            "{name} must be true or false, not {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn load(vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::load_from(None, |name| map.get(name).cloned())
    }

    #[test]
    fn dev_mode_needs_nothing() {
        let settings = load(&[]).unwrap();
        assert_eq!(settings.mode, Mode::Dev);
        settings.validate().unwrap();
        assert!(settings.playground_enabled());
    }

    #[test]
    fn production_lists_everything_missing() {
        let error = load(&[("SMD_MODE", "production")])
            .unwrap()
            .validate()
            .unwrap_err()
            .0;
        for needed in [
            "SMD_JWT_ISSUER",
            "SMD_JWT_AUDIENCE",
            "SMD_ENCRYPTION_KEY",
            "SMD_ARGUS_BASE_URL",
            "verification key",
        ] {
            assert!(error.contains(needed), "{error} should mention {needed}");
        }
    }

    #[test]
    fn production_turns_the_playground_off_unless_asked() {
        let settings = load(&[("SMD_MODE", "production")]).unwrap();
        assert!(!settings.playground_enabled());
        assert!(!settings.introspection_enabled());
        let settings = load(&[("SMD_MODE", "production"), ("SMD_PLAYGROUND", "true")]).unwrap();
        assert!(settings.playground_enabled());
    }

    #[test]
    fn log_format_filter_and_metrics_token_come_from_the_environment() {
        let settings = load(&[]).unwrap();
        assert_eq!(settings.log.format, LogFormat::Text);
        assert!(settings.metrics_open(), "dev mode without a token: open");
        let settings = load(&[
            ("SMD_LOG_FORMAT", "JSON"),
            ("RUST_LOG", "warn"),
            ("SMD_LOG", "info,smd_gateway=debug"),
            ("SMD_METRICS_TOKEN", "a-long-metrics-token"),
        ])
        .unwrap();
        settings.validate().unwrap();
        assert_eq!(settings.log.format, LogFormat::Json);
        assert_eq!(
            settings.log.filter.as_deref(),
            Some("info,smd_gateway=debug")
        );
        assert!(!settings.metrics_open(), "a token is required once set");
        let production = load(&[("SMD_MODE", "production")]).unwrap();
        assert!(!production.metrics_open(), "production: never open");
        assert!(load(&[("SMD_LOG_FORMAT", "xml")]).is_err());
        let short = load(&[("SMD_METRICS_TOKEN", "short")]).unwrap().validate();
        assert!(short.unwrap_err().0.contains("SMD_METRICS_TOKEN"));
        let filter = load(&[("SMD_LOG", "info,=[")]).unwrap().validate();
        assert!(filter.unwrap_err().0.contains("SMD_LOG"));
    }

    #[test]
    fn alert_deadlines_default_to_an_hour_two_days_and_five_days_and_come_from_the_environment() {
        let settings = load(&[]).unwrap();
        assert_eq!(settings.messaging.undelivered_alert_after_seconds, 3_600);
        assert_eq!(
            settings.messaging.unacknowledged_alert_after_seconds,
            172_800
        );
        assert_eq!(settings.messaging.expire_after_seconds, 432_000);
        assert_eq!(
            settings.attention_check_interval(),
            std::time::Duration::from_secs(2)
        );
        let settings = load(&[
            ("SMD_UNDELIVERED_ALERT_AFTER_SECONDS", "20"),
            ("SMD_UNACKNOWLEDGED_ALERT_AFTER_SECONDS", "60"),
            ("SMD_EXPIRE_UNDELIVERED_AFTER_SECONDS", "600"),
            ("SMD_ATTENTION_CHECK_INTERVAL_MS", "500"),
        ])
        .unwrap();
        settings.validate().unwrap();
        assert_eq!(settings.messaging.undelivered_alert_after_seconds, 20);
        assert_eq!(settings.messaging.unacknowledged_alert_after_seconds, 60);
        assert_eq!(settings.messaging.expire_after_seconds, 600);
        assert_eq!(
            settings.attention_check_interval(),
            std::time::Duration::from_millis(500)
        );
        // A zero deadline would flag every message at once.
        let error = load(&[("SMD_UNDELIVERED_ALERT_AFTER_SECONDS", "0")])
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(
            error.0.contains("SMD_UNDELIVERED_ALERT_AFTER_SECONDS"),
            "{error}"
        );
        assert!(load(&[("SMD_EXPIRE_UNDELIVERED_AFTER_SECONDS", "soon")]).is_err());
    }

    #[test]
    fn a_short_hs256_secret_is_refused() {
        let error = load(&[("SMD_JWT_HS256_SECRET", "short")])
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(error.0.contains("32 bytes"));
    }

    fn complete_production_settings() -> Settings {
        load(&[
            ("SMD_MODE", "production"),
            ("SMD_JWT_ISSUER", "https://pms.example"),
            ("SMD_JWT_AUDIENCE", "smd-gateway"),
            ("SMD_JWT_HS256_SECRET", "0123456789abcdef0123456789abcdef"),
            (
                "SMD_ENCRYPTION_KEY",
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            ),
            ("SMD_ARGUS_BASE_URL", "https://argus.example"),
            ("SMD_REFERRALNET_BASE_URL", "https://referralnet.example"),
            ("SMD_PAYMENTS_BASE_URL", "https://payments.example"),
            ("SMD_PAYMENTS_API_KEY", "sk_live"),
        ])
        .unwrap()
    }

    #[test]
    fn test_only_fault_settings_are_refused_in_production_by_name() {
        complete_production_settings().validate().unwrap();

        let mut charge = complete_production_settings();
        charge.credits.fail_after_charge = true;
        let error = charge.validate().unwrap_err().0;
        assert!(error.contains("credits.fail_after_charge"), "{error}");
        assert!(!error.contains("messaging.fail_after_send"), "{error}");

        let mut both = complete_production_settings();
        both.credits.fail_after_charge = true;
        both.messaging.fail_after_send = true;
        let error = both.validate().unwrap_err().0;
        assert!(
            error.contains("credits.fail_after_charge")
                && error.contains("messaging.fail_after_send"),
            "{error}"
        );

        let mut dev = load(&[]).unwrap();
        dev.credits.fail_after_charge = true;
        dev.messaging.fail_after_send = true;
        dev.validate().expect("tests may use them in dev mode");
    }

    #[test]
    fn the_maximum_token_lifetime_defaults_to_a_day_and_can_be_set() {
        assert_eq!(load(&[]).unwrap().jwt.max_lifetime_seconds, 86_400);
        let settings = load(&[("SMD_JWT_MAX_LIFETIME_SECONDS", "3600")]).unwrap();
        assert_eq!(settings.jwt.max_lifetime_seconds, 3600);
        assert!(
            load(&[("SMD_JWT_MAX_LIFETIME_SECONDS", "a day")])
                .unwrap_err()
                .0
                .contains("SMD_JWT_MAX_LIFETIME_SECONDS")
        );
    }

    #[test]
    fn bad_values_name_the_variable() {
        assert!(
            load(&[("SMD_LISTEN", "nowhere")])
                .unwrap_err()
                .0
                .contains("SMD_LISTEN")
        );
        assert!(
            load(&[("SMD_MODE", "prod")])
                .unwrap_err()
                .0
                .contains("SMD_MODE")
        );
    }
}
