//! The HTTP surface: `/graphql` (POST; GET for queries and GraphiQL), `/graphql/ws`
//! (graphql-transport-ws), `/healthz`, `/readyz`; CORS and the body-size limit.

use std::sync::Arc;

use std::net::SocketAddr;

use async_graphql::ServerError;
use async_graphql::parser::types::OperationType;
use async_graphql_axum::GraphQLRequest;
use axum::Router;
use axum::extract::{ConnectInfo, State, WebSocketUpgrade};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::limit::RequestBodyLimitLayer;
use tracing::Instrument;

use crate::auth::TokenVerifier;
use crate::domain::audit::Principal;
use crate::graphql::error::ApiError;
use crate::graphql::limits::ClientAddress;
use crate::graphql::{AppSchema, Caller};
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
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
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
        .layer(RequestBodyLimitLayer::new(max_body_bytes))
        .layer(cors)
        .with_state(state)
}

fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|value| value.to_str().ok())
        .filter(|value| {
            value.len() <= 64 && value.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned)
}

fn error_response(error: ApiError) -> Response {
    let mut server_error: ServerError =
        async_graphql::Error::from(error).into_server_error(Default::default());
    server_error.locations.clear();
    json_response(
        StatusCode::OK,
        &async_graphql::Response::from_errors(vec![server_error]),
    )
}

fn json_response(status: StatusCode, body: &impl serde::Serialize) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
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
        let identity = self
            .verifier
            .verify(token.trim())
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
        Ok(Some(Principal {
            user_id: user.id,
            subject: identity.subject,
            group_id: identity.group_id,
            role: identity.role,
            name: identity.name,
            request_id,
            expires_at: identity.expires_at,
        }))
    }

    async fn execute(
        &self,
        headers: &HeaderMap,
        address: SocketAddr,
        request: async_graphql::Request,
    ) -> Response {
        let request_id = request_id(headers);
        let authorization = headers
            .get(header::AUTHORIZATION)
            .map(|value| value.to_str().unwrap_or(""));
        let principal = match self.authenticate(authorization, request_id.clone()).await {
            Ok(principal) => principal,
            Err(error) => return error_response(error),
        };
        let span = tracing::info_span!("graphql", request_id = %request_id);
        let mut response = self
            .schema
            .execute(
                request
                    .data(Caller(principal))
                    .data(ClientAddress(address.ip())),
            )
            .instrument(span)
            .await;
        fill_error_codes(&mut response);
        let retry_after = rate_limited_for(&response);
        // Refused before it ran: the rate limiter's 429, with the wait in Retry-After.
        let status = if retry_after.is_some()
            && response.data == async_graphql::Value::Null
            && response.errors.iter().all(|error| error.path.is_empty())
        {
            StatusCode::TOO_MANY_REQUESTS
        } else {
            StatusCode::OK
        };
        let Ok(body) = serde_json::to_vec(&response) else {
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        };
        if body.len() > self.max_response_bytes {
            return error_response(ApiError::bad_input(format!(
                "the result is {} bytes; at most {} are sent at once — ask for fewer items (first) or fewer fields",
                body.len(),
                self.max_response_bytes
            )));
        }
        let mut http = (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
        if let Some(seconds) = retry_after
            && let Ok(value) = HeaderValue::from_str(&seconds.to_string())
        {
            http.headers_mut().insert(header::RETRY_AFTER, value);
        }
        http
    }
}

async fn graphql_post(
    State(state): State<HttpState>,
    ConnectInfo(address): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    request: GraphQLRequest,
) -> Response {
    state.execute(&headers, address, request.into_inner()).await
}

/// `GET /graphql?query=…` runs a query (never a mutation); a bare GET serves GraphiQL.
async fn graphql_get(
    State(state): State<HttpState>,
    ConnectInfo(address): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let query_string = uri.query().unwrap_or_default();
    if !query_string
        .split('&')
        .any(|pair| pair.starts_with("query="))
    {
        if state.playground.enabled() {
            return crate::playground::page(&headers);
        }
        return (
            StatusCode::NOT_FOUND,
            "the playground is disabled; POST GraphQL requests to /graphql",
        )
            .into_response();
    }
    let request = match async_graphql::http::parse_query_string(query_string) {
        Ok(request) => request,
        Err(_) => {
            return error_response(ApiError::bad_input(
                "the query string is not a GraphQL request",
            ));
        }
    };
    if let Ok(document) = async_graphql::parser::parse_query(&request.query) {
        let is_query = document
            .operations
            .iter()
            .all(|(_, operation)| operation.node.ty == OperationType::Query);
        if !is_query {
            return (
                StatusCode::METHOD_NOT_ALLOWED,
                error_response(ApiError::bad_input(
                    "mutations and subscriptions must be sent with POST",
                )),
            )
                .into_response();
        }
    }
    state.execute(&headers, address, request).await
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
    match state.store.ping().await {
        Ok(()) => (StatusCode::OK, "ready").into_response(),
        Err(error) => {
            tracing::warn!(error = ?error, "readiness check failed");
            (StatusCode::SERVICE_UNAVAILABLE, "database unavailable").into_response()
        }
    }
}
