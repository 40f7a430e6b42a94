//! What operators see: one Prometheus registry with typed families, the text served on
//! `GET /metrics`, and the one log line written per GraphQL operation (HTTP request or
//! WebSocket operation).
//!
//! Every label value comes from a small fixed set or is bounded here: operation names only when
//! they are GraphQL names of at most [`MAX_OPERATION_NAME`] characters, at most
//! [`MAX_OPERATION_NAMES`] distinct ones (later ones count as `other`), outcome codes only when
//! they look like an `extensions.code`. No token, variable, query text, provider URL or clinical
//! content reaches a label or the log line.
//!
//! The layers below report through plain interfaces they own — [`CallObserver`] (providers) and
//! [`CreditObserver`] (credits) — so only this module knows prometheus-client. Gauges that
//! describe stored state (the outbox, the pool) are computed when scraped.
//!
//! Who may read `/metrics` ([`MetricsAccess`]): in dev mode anyone on the main port; in
//! production only a bearer of `SMD_METRICS_TOKEN`, and without one the route does not exist.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use crate::domain::credits::{CreditMovement, CreditObserver, PurchaseOutcome};
use crate::providers::{CallObserver, CallOutcome, Route, Upstream};
use crate::store::Store;
use crate::ws::OpenOperations;

/// Longest operation name used as a label; longer ones are `anonymous`.
pub(crate) const MAX_OPERATION_NAME: usize = 64;
/// Distinct operation names labelled per process; the rest are `other`.
pub(crate) const MAX_OPERATION_NAMES: usize = 200;

/// The content type of the OpenMetrics text that Prometheus scrapes.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Which transport carried a GraphQL operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    /// `POST`/`GET /graphql`.
    Http,
    /// An operation on `/graphql/ws`.
    WebSocket,
}

impl Transport {
    fn label(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::WebSocket => "ws",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: String,
    transport: &'static str,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLatencyLabels {
    operation: String,
    transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    provider: &'static str,
    route: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLatencyLabels {
    provider: &'static str,
    route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

type Latency<S> = Family<S, Histogram, fn() -> Histogram>;

/// 5 ms to about 10 s, doubling.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 12))
}

struct Families {
    operations: Family<OperationLabels, Counter>,
    operation_seconds: Latency<OperationLatencyLabels>,
    provider_calls: Family<CallLabels, Counter>,
    provider_call_seconds: Latency<CallLatencyLabels>,
    outbox_queued: Gauge,
    outbox_oldest_age_seconds: Gauge<f64, AtomicU64>,
    websocket_operations: Gauge,
    purchases: Family<OutcomeLabels, Counter>,
    credits_debited: Family<ReasonLabels, Counter>,
    credits_credited: Family<ReasonLabels, Counter>,
    pool_connections: Family<StateLabels, Gauge>,
}

struct Inner {
    registry: Registry,
    families: Families,
    operation_names: Mutex<HashSet<String>>,
}

/// The node's metrics; cheap to clone, one per [`crate::App`].
#[derive(Clone)]
pub(crate) struct Metrics(Arc<Inner>);

impl std::fmt::Debug for Metrics {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every family registered (and empty).
    pub(crate) fn new() -> Self {
        let families = Families {
            operations: Family::default(),
            operation_seconds: Family::new_with_constructor(latency_histogram),
            provider_calls: Family::default(),
            provider_call_seconds: Family::new_with_constructor(latency_histogram),
            outbox_queued: Gauge::default(),
            outbox_oldest_age_seconds: Gauge::default(),
            websocket_operations: Gauge::default(),
            purchases: Family::default(),
            credits_debited: Family::default(),
            credits_credited: Family::default(),
            pool_connections: Family::default(),
        };
        let mut registry = Registry::with_prefix("smd");
        registry.register(
            "graphql_operations",
            "GraphQL operations finished, by operation name, transport (http, ws) and outcome (OK or the first error's code)",
            families.operations.clone(),
        );
        registry.register(
            "graphql_operation_duration_seconds",
            "Time from a GraphQL operation's arrival to its last result",
            families.operation_seconds.clone(),
        );
        registry.register(
            "provider_calls",
            "Calls to SMD providers and the payment gateway, by provider, route and outcome",
            families.provider_calls.clone(),
        );
        registry.register(
            "provider_call_duration_seconds",
            "Time from sending a provider call to its response headers (or its failure)",
            families.provider_call_seconds.clone(),
        );
        registry.register(
            "outbox_queued_messages",
            "Outbound messages waiting in QUEUED, not yet handed to a provider (all nodes)",
            families.outbox_queued.clone(),
        );
        registry.register(
            "outbox_oldest_queued_age_seconds",
            "Age of the oldest QUEUED outbound message; 0 when none waits",
            families.outbox_oldest_age_seconds.clone(),
        );
        registry.register(
            "websocket_open_operations",
            "GraphQL operations open on this node's WebSockets",
            families.websocket_operations.clone(),
        );
        registry.register(
            "credit_purchases",
            "Credit purchases by outcome (succeeded, declined, unresolved)",
            families.purchases.clone(),
        );
        registry.register(
            "credits_debited",
            "Credits taken from wallets in committed ledger entries, by reason",
            families.credits_debited.clone(),
        );
        registry.register(
            "credits_credited",
            "Credits added to wallets in committed ledger entries, by reason",
            families.credits_credited.clone(),
        );
        registry.register(
            "database_pool_connections",
            "This node's database connections by state (idle, in_use)",
            families.pool_connections.clone(),
        );
        Self(Arc::new(Inner {
            registry,
            families,
            operation_names: Mutex::new(HashSet::new()),
        }))
    }

    /// Starts the log line and metrics of one GraphQL operation; they are written when the
    /// returned record is dropped, so an operation cut short (a WebSocket `complete`, a closed
    /// connection) is counted too.
    pub(crate) fn operation_started(
        &self,
        transport: Transport,
        request_id: &str,
        operation_name: Option<&str>,
    ) -> RequestRecord {
        RequestRecord {
            metrics: self.clone(),
            transport,
            request_id: request_id.to_owned(),
            operation: self.operation_label(operation_name),
            user_id: None,
            outcome: None,
            started: Instant::now(),
        }
    }

    /// The operation name as a label: a GraphQL name of bounded length, one of the first
    /// [`MAX_OPERATION_NAMES`] seen; otherwise `anonymous` or `other`.
    fn operation_label(&self, name: Option<&str>) -> String {
        let Some(name) = name.filter(|name| is_graphql_name(name, MAX_OPERATION_NAME)) else {
            return "anonymous".into();
        };
        let mut names = self
            .0
            .operation_names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if names.contains(name) {
            return name.to_owned();
        }
        if names.len() >= MAX_OPERATION_NAMES {
            return "other".into();
        }
        names.insert(name.to_owned());
        name.to_owned()
    }

    /// Refreshes the gauges that describe stored and shared state, then renders the registry
    /// as OpenMetrics text.
    pub(crate) async fn render(&self, store: &Store, open_operations: &OpenOperations) -> String {
        let families = &self.0.families;
        match store.outbox_backlog().await {
            Ok(backlog) => {
                families
                    .outbox_queued
                    .set(i64::try_from(backlog.queued).unwrap_or(i64::MAX));
                let age = backlog.oldest_created_at.map_or(0.0, |created| {
                    (chrono::Utc::now() - created)
                        .to_std()
                        .unwrap_or_default()
                        .as_secs_f64()
                });
                families.outbox_oldest_age_seconds.set(age);
            }
            // The gauges keep their last values; the failure is the operator's to see.
            Err(error) => tracing::warn!(error = ?error, "metrics: outbox backlog query failed"),
        }
        let pool = store.pool_stats();
        families
            .pool_connections
            .get_or_create(&StateLabels { state: "idle" })
            .set(i64::from(pool.idle));
        families
            .pool_connections
            .get_or_create(&StateLabels { state: "in_use" })
            .set(i64::from(pool.open.saturating_sub(pool.idle)));
        families
            .websocket_operations
            .set(i64::try_from(open_operations.total()).unwrap_or(i64::MAX));
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.0.registry).is_err() {
            tracing::error!("metrics: encoding the registry failed");
        }
        text
    }
}

impl CallObserver for Metrics {
    fn call_finished(
        &self,
        upstream: Upstream,
        route: Route,
        outcome: CallOutcome,
        elapsed: Duration,
    ) {
        let provider = match upstream {
            Upstream::Argus => "argus",
            Upstream::ReferralNet => "referralnet",
            Upstream::Payments => "payments",
        };
        let route = match route {
            Route::Account => "account",
            Route::Registrations => "registrations",
            Route::Directory => "directory",
            Route::Send => "send",
            Route::Status => "status",
            Route::Inbox => "inbox",
            Route::Ack => "ack",
            Route::Session => "session",
            Route::Webhook => "webhook",
            Route::Charge => "charge",
            Route::PaymentMethod => "payment_method",
        };
        let outcome = match outcome {
            CallOutcome::Ok => "ok",
            CallOutcome::Refused => "refused",
            CallOutcome::RateLimited => "rate_limited",
            CallOutcome::ServerError => "server_error",
            CallOutcome::Timeout => "timeout",
            CallOutcome::ConnectFailed => "connect_failed",
            CallOutcome::TransportError => "transport_error",
        };
        let families = &self.0.families;
        families
            .provider_calls
            .get_or_create(&CallLabels {
                provider,
                route,
                outcome,
            })
            .inc();
        families
            .provider_call_seconds
            .get_or_create(&CallLatencyLabels { provider, route })
            .observe(elapsed.as_secs_f64());
    }
}

impl CreditObserver for Metrics {
    fn purchase_finished(&self, outcome: PurchaseOutcome) {
        let outcome = match outcome {
            PurchaseOutcome::Succeeded => "succeeded",
            PurchaseOutcome::Declined => "declined",
            PurchaseOutcome::Unresolved => "unresolved",
        };
        self.0
            .families
            .purchases
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    fn credits_moved(&self, movement: CreditMovement, credits: i64) {
        let reason = match movement {
            CreditMovement::SendDebit => "send",
            CreditMovement::TransferOut => "transfer_out",
            CreditMovement::TransferIn => "transfer_in",
            CreditMovement::Purchase => "purchase",
            CreditMovement::Refund => "refund",
        };
        let family = if movement.is_debit() {
            &self.0.families.credits_debited
        } else {
            &self.0.families.credits_credited
        };
        family
            .get_or_create(&ReasonLabels { reason })
            .inc_by(u64::try_from(credits).unwrap_or(0));
    }
}

/// One GraphQL operation on its way: written to the log (at info, target
/// `smd_gateway::requests`) and counted when dropped. It holds only ids, the bounded operation
/// label and the outcome code — never a token, variables, query text or clinical content.
#[must_use = "the record is written when dropped"]
pub(crate) struct RequestRecord {
    metrics: Metrics,
    transport: Transport,
    request_id: String,
    operation: String,
    user_id: Option<String>,
    outcome: Option<String>,
    started: Instant,
}

impl RequestRecord {
    /// Whose operation it is (the gateway's user id, not the token's subject).
    pub(crate) fn user(&mut self, user_id: &str) {
        self.user_id = Some(user_id.to_owned());
    }

    /// How (part of) it ended: `OK` or an error's code. The first error's code is kept; a
    /// code that does not look like one (`[A-Z_]`, at most 40) is recorded as `OTHER`.
    pub(crate) fn outcome(&mut self, code: &str) {
        if self.outcome.as_deref().is_some_and(|kept| kept != "OK") {
            return;
        }
        let code = if code.is_empty()
            || code.len() > 40
            || !code.chars().all(|c| c.is_ascii_uppercase() || c == '_')
        {
            "OTHER"
        } else {
            code
        };
        self.outcome = Some(code.to_owned());
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        let elapsed = self.started.elapsed();
        let outcome = self.outcome.as_deref().unwrap_or("OK");
        let transport = self.transport.label();
        tracing::info!(
            target: "smd_gateway::requests",
            request_id = %self.request_id,
            transport,
            operation = %self.operation,
            user_id = self.user_id.as_deref().unwrap_or("-"),
            duration_ms = elapsed.as_micros() as f64 / 1000.0,
            outcome,
            "graphql operation finished"
        );
        let families = &self.metrics.0.families;
        families
            .operations
            .get_or_create(&OperationLabels {
                operation: self.operation.clone(),
                transport,
                outcome: outcome.to_owned(),
            })
            .inc();
        families
            .operation_seconds
            .get_or_create(&OperationLatencyLabels {
                operation: self.operation.clone(),
                transport,
            })
            .observe(elapsed.as_secs_f64());
    }
}

/// Whether `name` is a GraphQL name (`[_A-Za-z][_0-9A-Za-z]*`) of at most `max` characters.
fn is_graphql_name(name: &str, max: usize) -> bool {
    let mut chars = name.chars();
    name.len() <= max
        && chars
            .next()
            .is_some_and(|first| first.is_ascii_alphabetic() || first == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Who may read `/metrics`.
#[derive(Clone)]
pub(crate) enum MetricsAccess {
    /// Anyone who reaches the port (dev mode without a token).
    Open,
    /// Only requests with `Authorization: Bearer <token>`.
    Token(Arc<str>),
    /// Not served (production without a token): 404 like any unknown path.
    Hidden,
}

#[derive(Clone)]
struct MetricsState {
    metrics: Metrics,
    store: Store,
    open_operations: OpenOperations,
    access: MetricsAccess,
}

/// `GET /metrics`, guarded by `access`.
pub(crate) fn routes(
    metrics: Metrics,
    store: Store,
    open_operations: OpenOperations,
    access: MetricsAccess,
) -> Router {
    if matches!(access, MetricsAccess::Hidden) {
        return Router::new();
    }
    Router::new()
        .route("/metrics", get(scrape))
        .with_state(MetricsState {
            metrics,
            store,
            open_operations,
            access,
        })
}

async fn scrape(State(state): State<MetricsState>, headers: HeaderMap) -> Response {
    if let MetricsAccess::Token(expected) = &state.access {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .unwrap_or_default();
        use subtle::ConstantTimeEq;
        if !bool::from(presented.as_bytes().ct_eq(expected.as_bytes())) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "metrics need the bearer token configured as SMD_METRICS_TOKEN",
            )
                .into_response();
        }
    }
    let text = state
        .metrics
        .render(&state.store, &state.open_operations)
        .await;
    ([(header::CONTENT_TYPE, OPENMETRICS)], text).into_response()
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Collects what a test subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn captured_json_log(run: impl FnOnce()) -> String {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, run);
        String::from_utf8(captured.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn the_request_log_line_has_the_ids_name_duration_and_outcome_and_nothing_secret() {
        let metrics = Metrics::new();
        // What a client sent: a token, variables with a password, a query with clinical text.
        let token = "eyJhbGciOiJIUzI1NiJ9.c2VjcmV0LXBheWxvYWQ.c2lnbmF0dXJl";
        let query = r#"mutation LinkArgus($password: String!) { linkArgus(input: {username: "demo.argus", password: $password}) { status } } # chest pain"#;
        let variables = r#"{"password": "argus-sandbox-pw"}"#;
        let output = captured_json_log(|| {
            let mut record =
                metrics.operation_started(Transport::Http, "req-0123", Some("LinkArgus"));
            record.user("user-42");
            record.outcome("PROVIDER_REJECTED");
        });
        let line: serde_json::Value =
            serde_json::from_str(output.trim()).expect("one JSON log line");
        let fields = &line["fields"];
        assert_eq!(line["target"], "smd_gateway::requests");
        assert_eq!(line["level"], "INFO");
        assert_eq!(fields["request_id"], "req-0123");
        assert_eq!(fields["transport"], "http");
        assert_eq!(fields["operation"], "LinkArgus");
        assert_eq!(fields["user_id"], "user-42");
        assert_eq!(fields["outcome"], "PROVIDER_REJECTED");
        assert!(fields["duration_ms"].as_f64().is_some_and(|ms| ms >= 0.0));
        for secret in [
            token,
            "argus-sandbox-pw",
            variables,
            query,
            "chest pain",
            "password",
        ] {
            assert!(!output.contains(secret), "{secret:?} leaked into {output}");
        }
    }

    #[test]
    fn the_first_error_code_is_kept_and_odd_codes_are_not_labels() {
        let metrics = Metrics::new();
        let output = captured_json_log(|| {
            let mut record = metrics.operation_started(Transport::WebSocket, "r", None);
            record.outcome("OK");
            record.outcome("RATE_LIMITED");
            record.outcome("FORBIDDEN");
            let mut odd = metrics.operation_started(Transport::WebSocket, "r", Some("x"));
            odd.outcome("secret text\nwith a newline");
        });
        assert!(output.contains(r#""outcome":"RATE_LIMITED""#), "{output}");
        assert!(output.contains(r#""outcome":"OTHER""#), "{output}");
        assert!(!output.contains("FORBIDDEN"));
        assert!(!output.contains("secret text"));
    }

    #[test]
    fn operation_names_are_bounded_in_form_and_number() {
        let metrics = Metrics::new();
        assert_eq!(metrics.operation_label(Some("Me")), "Me");
        assert_eq!(metrics.operation_label(None), "anonymous");
        for hostile in ["", "1abc", "a b", "a\nb", "名前", &"x".repeat(65)] {
            assert_eq!(metrics.operation_label(Some(hostile)), "anonymous");
        }
        for index in 1..MAX_OPERATION_NAMES {
            assert_eq!(
                metrics.operation_label(Some(&format!("Op{index}"))),
                format!("Op{index}")
            );
        }
        assert_eq!(metrics.operation_label(Some("OneTooMany")), "other");
        assert_eq!(metrics.operation_label(Some("Me")), "Me");
    }
}
