//! The HTTP surface: `/graphql` (POST; GET for queries and GraphiQL), `/graphql/ws`
//! (graphql-transport-ws), `/healthz`, `/readyz`; CORS and the body-size limit.

use std::sync::Arc;

use std::net::SocketAddr;

use async_graphql::ServerError;
use axum::Router;
use axum::extract::{ConnectInfo, State, WebSocketUpgrade};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tracing::Instrument;

use crate::auth::TokenVerifier;
use crate::domain::audit::Principal;
use crate::graphql::error::ApiError;
use crate::graphql::limits::{ClientAddress, ReadOnly};
use crate::graphql::{AppSchema, Caller};
use crate::graphql_over_http::{self, MediaType, RequestError};
use crate::store::Store;

/// What the handlers share.
#[derive(Clone)]
pub(crate) struct HttpState {
    pub schema: AppSchema,
    pub verifier: Arc<TokenVerifier>,
    pub store: Store,
    pub playground: crate::playground::Playground,
    pub messaging: crate::domain::messaging::MessagingService,
    /// Largest response body (JSON) sent for one operation, on either transport.
    pub max_response_bytes: usize,
    pub ws_limits: crate::ws::WsLimits,
    pub open_operations: crate::ws::OpenOperations,
    /// Largest WebSocket message accepted.
    pub max_ws_message_bytes: usize,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// Tokens already verified (and their users provisioned).
    pub principals: Arc<crate::principal_cache::PrincipalCache>,
    /// Counts and logs every operation, on both transports.
    pub metrics: crate::metrics::Metrics,
    /// Whether the node is stopping (readiness, WebSockets).
    pub drain: crate::drain::Drain,
}

/// Which browser origins may call the API.
#[derive(Debug, Clone)]
pub(crate) enum CorsPolicy {
    /// Any `http://localhost:*` or `http://127.0.0.1:*` origin (dev mode).
    Localhost,
    /// Exactly these origins.
    List(Vec<String>),
}

pub(crate) fn router(state: HttpState, cors: CorsPolicy, max_body_bytes: usize) -> Router {
    let allow_origin = match cors {
        CorsPolicy::Localhost => AllowOrigin::predicate(|origin: &HeaderValue, _| {
            origin.to_str().is_ok_and(|origin| {
                ["http://localhost", "http://127.0.0.1", "http://[::1]"]
                    .iter()
                    .any(|prefix| {
                        origin
                            .strip_prefix(prefix)
                            .is_some_and(|rest| rest.is_empty() || rest.starts_with(':'))
                    })
            })
        }),
        CorsPolicy::List(origins) => AllowOrigin::list(
            origins
                .iter()
                .filter_map(|origin| HeaderValue::from_str(origin).ok()),
        ),
    };
    // Credentials travel only in the Authorization header, never cookies.
    let cors = CorsLayer::new()
        .allow_origin(allow_origin)
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::HeaderName::from_static(crate::request_id::HEADER),
        ])
        // Browser code may read the id to quote it when reporting a problem.
        .expose_headers([header::HeaderName::from_static(crate::request_id::HEADER)])
        .allow_credentials(false);
    Router::new()
        .merge(crate::playground::router(&state.playground))
        .route("/graphql", get(graphql_get).post(graphql_post))
        .route("/graphql/ws", get(graphql_ws))
        .route(
            "/webhooks/referralnet/{account_id}",
            axum::routing::post(referralnet_webhook),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        // The GraphQL handlers read their body with this limit themselves (to answer in JSON);
        // the webhook's extractor is held to it by axum.
        .layer(axum::extract::DefaultBodyLimit::max(max_body_bytes))
        .layer(cors)
        .with_state(state)
}

/// The request's id, as `crate::request_id`'s layers left it in the header (so the response,
/// the log line and audit rows share it); a fresh one if those layers are absent.
fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(crate::request_id::HEADER)
        .and_then(|value| value.to_str().ok())
        .filter(|value| crate::request_id::is_safe(value))
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned)
}

fn error_response(error: ApiError, media: MediaType) -> Response {
    let mut server_error: ServerError =
        async_graphql::Error::from(error).into_server_error(Default::default());
    server_error.locations.clear();
    let body =
        serde_json::to_vec(&serde_json::json!({ "errors": [server_error] })).unwrap_or_default();
    graphql_over_http::respond(StatusCode::OK, media, body)
}

/// Every error leaves with a code. Parse, validation and limit errors come from async-graphql
/// without one; they are all faults in the client's document.
pub(crate) fn fill_error_codes(response: &mut async_graphql::Response) {
    for error in &mut response.errors {
        let extensions = error.extensions.get_or_insert_with(Default::default);
        if extensions.get("code").is_none() {
            extensions.set("code", "BAD_USER_INPUT");
        }
    }
}

/// The seconds of the first `RATE_LIMITED` error, if any.
fn rate_limited_for(response: &async_graphql::Response) -> Option<u64> {
    response.errors.iter().find_map(|error| {
        let extensions = error.extensions.as_ref()?;
        match extensions.get("code")? {
            async_graphql::Value::String(code) if code == "RATE_LIMITED" => {
                match extensions.get("retryAfterSeconds")? {
                    async_graphql::Value::Number(seconds) => seconds.as_u64(),
                    _ => None,
                }
            }
            _ => None,
        }
    })
}

impl HttpState {
    /// Turns a bearer token into a provisioned principal. No token → `None` (only the
    /// schema's public parts answer); a bad token → `UNAUTHENTICATED`, never anonymous.
    async fn authenticate(
        &self,
        authorization: Option<&str>,
        request_id: String,
    ) -> Result<Option<Principal>, ApiError> {
        let Some(authorization) = authorization else {
            return Ok(None);
        };
        let token = authorization
            .strip_prefix("Bearer ")
            .or_else(|| authorization.strip_prefix("bearer "))
            .ok_or_else(ApiError::unauthenticated)?;
        let token = token.trim();
        let now = chrono::Utc::now();
        if let Some(mut principal) = self.principals.get(token, now) {
            principal.request_id = request_id;
            return Ok(Some(principal));
        }
        let identity = self
            .verifier
            .verify(token)
            .map_err(|error| ApiError::new("UNAUTHENTICATED", error.0))?;
        let user = self
            .store
            .provision_user(
                &identity.group_id,
                &identity.subject,
                identity.role,
                &identity.name,
            )
            .await
            .map_err(|error| ApiError::from(crate::domain::GatewayError::from(error)))?;
        // Role and name come from this request's verified token, not from the stored row: two
        // requests with different roles for one user must each act with their own.
        let principal = Principal {
            user_id: user.id,
            subject: identity.subject,
            group_id: identity.group_id,
            role: identity.role,
            name: identity.name,
            request_id,
            expires_at: identity.expires_at,
        };
        self.principals.insert(token, &principal, now);
        Ok(Some(principal))
    }

    async fn execute(
        &self,
        headers: &HeaderMap,
        address: SocketAddr,
        media: MediaType,
        request: async_graphql::Request,
        read_only: Option<ReadOnly>,
    ) -> Response {
        let request_id = request_id(headers);
        let mut record = self.metrics.operation_started(
            crate::metrics::Transport::Http,
            &request_id,
            crate::graphql::operation_name(&request),
        );
        let authorization = headers
            .get(header::AUTHORIZATION)
            .map(|value| value.to_str().unwrap_or(""));
        let principal = match self.authenticate(authorization, request_id.clone()).await {
            Ok(principal) => principal,
            Err(error) => {
                record.outcome(error.code());
                let mut response = error_response(error, media);
                *response.status_mut() = StatusCode::UNAUTHORIZED;
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return response;
            }
        };
        if let Some(principal) = &principal {
            record.user(&principal.user_id);
        }
        let span = tracing::info_span!("graphql", request_id = %request_id);
        let mut request = request
            .data(Caller(principal))
            .data(ClientAddress(address.ip()));
        if let Some(read_only) = &read_only {
            request = request.data(read_only.clone());
        }
        let mut response = self.schema.execute(request).instrument(span).await;
        fill_error_codes(&mut response);
        record.outcome(crate::graphql::error::outcome_code(&response));
        if read_only.is_some_and(|read_only| read_only.was_refused()) {
            let mut refused = graphql_over_http::error_body_response(
                StatusCode::METHOD_NOT_ALLOWED,
                media,
                "BAD_USER_INPUT",
                "mutations and subscriptions must be sent with POST",
            );
            refused
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
            return refused;
        }
        let status = graphql_over_http::status_for(&response, media);
        let Some(body) = graphql_over_http::body(&response, media) else {
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        };
        if body.len() > self.max_response_bytes {
            record.outcome("BAD_USER_INPUT");
            return error_response(
                ApiError::bad_input(format!(
                    "the result is {} bytes; at most {} are sent at once — ask for fewer items (first) or fewer fields",
                    body.len(),
                    self.max_response_bytes
                )),
                media,
            );
        }
        let mut http = graphql_over_http::respond(status, media, body);
        if let Some(seconds) = rate_limited_for(&response)
            && let Ok(value) = HeaderValue::from_str(&seconds.to_string())
        {
            http.headers_mut().insert(header::RETRY_AFTER, value);
        }
        http
    }
}

/// The answer when the client accepts no media type the gateway speaks.
fn not_acceptable() -> Response {
    graphql_over_http::error_body_response(
        StatusCode::NOT_ACCEPTABLE,
        MediaType::Json,
        "BAD_USER_INPUT",
        "accept application/graphql-response+json or application/json",
    )
}

async fn graphql_post(
    State(state): State<HttpState>,
    ConnectInfo(address): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let Some(media) = graphql_over_http::negotiate(&headers) else {
        return not_acceptable();
    };
    let Ok(bytes) = axum::body::to_bytes(body, state.max_body_bytes).await else {
        return graphql_over_http::request_error_response(
            RequestError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the request body is over {} bytes; send a smaller operation",
                    state.max_body_bytes
                ),
            ),
            media,
        );
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok());
    match graphql_over_http::parse_post(content_type, &bytes) {
        Ok(request) => state.execute(&headers, address, media, request, None).await,
        Err(error) => graphql_over_http::request_error_response(error, media),
    }
}

/// `GET /graphql?query=…` runs a query (never a mutation); a bare GET serves GraphiQL.
async fn graphql_get(
    State(state): State<HttpState>,
    ConnectInfo(address): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let query_string = uri.query().unwrap_or_default();
    if query_string.is_empty() {
        if state.playground.enabled() {
            return crate::playground::page(&headers);
        }
        return (
            StatusCode::NOT_FOUND,
            "the playground is disabled; POST GraphQL requests to /graphql",
        )
            .into_response();
    }
    let Some(media) = graphql_over_http::negotiate(&headers) else {
        return not_acceptable();
    };
    match graphql_over_http::parse_get(query_string) {
        Ok(request) => {
            state
                .execute(&headers, address, media, request, Some(ReadOnly::default()))
                .await
        }
        Err(error) => graphql_over_http::request_error_response(error, media),
    }
}

async fn graphql_ws(
    State(state): State<HttpState>,
    ConnectInfo(address): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let request_id = request_id(&headers);
    let upgrade = upgrade
        .protocols([crate::ws::PROTOCOL])
        .max_message_size(state.max_ws_message_bytes)
        .max_frame_size(state.max_ws_message_bytes);
    let subprotocol_ok = upgrade.selected_protocol().is_some();
    upgrade.on_upgrade(move |socket| async move {
        let connection = crate::ws::Connection {
            schema: state.schema.clone(),
            limits: state.ws_limits,
            open: state.open_operations.clone(),
            address: address.ip(),
            metrics: state.metrics.clone(),
            drain: state.drain.clone(),
        };
        crate::ws::serve(socket, connection, subprotocol_ok, |payload| async move {
            let authorization = ["Authorization", "authorization"]
                .iter()
                .find_map(|key| {
                    payload
                        .get(key)
                        .and_then(|value| value.as_str())
                        .map(str::to_owned)
                })
                .or_else(|| {
                    payload
                        .get("token")
                        .and_then(|value| value.as_str())
                        .map(|token| format!("Bearer {token}"))
                });
            state
                .authenticate(authorization.as_deref(), request_id)
                .await
                .ok()
                .flatten()
        })
        .await;
    })
}

/// Delivery receipts pushed by ReferralNet: 204 when accepted, 401 when the signature or
/// timestamp does not check out (forged or replayed), 400 for an unreadable body.
async fn referralnet_webhook(
    State(state): State<HttpState>,
    axum::extract::Path(account_id): axum::extract::Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    match state
        .messaging
        .receive_receipt(
            &account_id,
            header("x-rn-timestamp"),
            header("x-rn-signature"),
            &body,
        )
        .await
    {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(crate::domain::GatewayError::Unauthenticated(message)) => {
            (StatusCode::UNAUTHORIZED, message).into_response()
        }
        Err(crate::domain::GatewayError::BadUserInput(message)) => {
            (StatusCode::BAD_REQUEST, message).into_response()
        }
        Err(error) => {
            tracing::error!(error = ?error, "webhook handling failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "try again later").into_response()
        }
    }
}

async fn readyz(State(state): State<HttpState>) -> Response {
    // A stopping node takes no new work: the load balancer should send it elsewhere.
    if state.drain.is_draining() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response();
    }
    match state.store.ping().await {
        Ok(()) => (StatusCode::OK, "ready").into_response(),
        Err(error) => {
            tracing::warn!(error = ?error, "readiness check failed");
            (StatusCode::SERVICE_UNAVAILABLE, "database unavailable").into_response()
        }
    }
}
