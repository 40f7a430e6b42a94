//! The Argus emulator's messaging area, under `/argus/v1`: directory search, sending a message
//! (idempotent on the client's message id) and polling its status, and the inbox with its
//! acknowledgements. HTTP Basic on every call, and only ACTIVE accounts; errors are
//! `{"error":{"code","message"}}`.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::accounts::AccountStatus;
use crate::argus::basic_credentials;
use crate::directory::{DirectoryEntry, MagicBehaviour};
use crate::faults::FaultRoute;
use crate::hl7;
use crate::messaging::{
    InboxItem, NewMessage, SentMessage, count_parameter, is_valid_client_message_id,
};
use crate::namespace::{CurrentNamespace, NamespaceState, SandboxState};
use crate::provider::{Provider, ProviderError, ProviderErrorCode};

/// The largest page of directory results or inbox messages.
const LARGEST_PAGE: usize = 50;
/// The directory page size when the caller names none.
const DEFAULT_DIRECTORY_PAGE_SIZE: usize = 20;

/// The Argus messaging routes.
pub(crate) fn routes() -> Router<SandboxState> {
    Router::new()
        .route("/argus/v1/directory", get(search_directory))
        .route("/argus/v1/messages", post(send_message))
        .route("/argus/v1/messages/{tracking_id}", get(read_message))
        .route("/argus/v1/inbox", get(list_inbox))
        .route(
            "/argus/v1/inbox/{inbox_id}/ack",
            post(acknowledge_inbox_item),
        )
}

type Parameters = Result<Query<HashMap<String, String>>, QueryRejection>;

fn refusal(
    status: StatusCode,
    code: ProviderErrorCode,
    message: impl Into<String>,
) -> ProviderError {
    ProviderError::new(Provider::Argus, status, code, message)
}

fn bad_param(message: impl Into<String>) -> ProviderError {
    refusal(
        StatusCode::BAD_REQUEST,
        ProviderErrorCode::BadParam,
        message,
    )
}

fn badly_formed(message: impl Into<String>) -> ProviderError {
    refusal(
        StatusCode::BAD_REQUEST,
        ProviderErrorCode::BadlyFormedMsg,
        message,
    )
}

fn not_found(message: impl Into<String>) -> ProviderError {
    refusal(StatusCode::NOT_FOUND, ProviderErrorCode::NotFound, message)
}

fn invalid_credentials(message: &str) -> ProviderError {
    refusal(
        StatusCode::UNAUTHORIZED,
        ProviderErrorCode::InvalidCredentials,
        message,
    )
}

/// The username of the ACTIVE account whose Basic credentials came with the call; else the 401
/// (`invalidCredentials`) or 403 (`notAuthorised`) to answer.
fn active_account(
    state: &NamespaceState,
    credentials: Option<&(String, String)>,
) -> Result<String, ProviderError> {
    let Some((username, password)) = credentials else {
        return Err(invalid_credentials(
            "authentication required: HTTP Basic with your Argus username and password",
        ));
    };
    let account = state
        .accounts(Provider::Argus)
        .authenticate(username, password)
        .ok_or_else(|| invalid_credentials("username or password is incorrect"))?;
    let status = match account.status_at(state.clock.now()) {
        AccountStatus::Active => return Ok(account.username.clone()),
        AccountStatus::Pending => "PENDING",
        AccountStatus::Rejected => "REJECTED",
        AccountStatus::Suspended => "SUSPENDED",
    };
    Err(refusal(
        StatusCode::FORBIDDEN,
        ProviderErrorCode::NotAuthorised,
        format!("the account is {status}: messaging needs an ACTIVE account"),
    ))
}

fn directory_entry_view(entry: &DirectoryEntry) -> Value {
    json!({
        "argusId": entry.argus_id(),
        "hpii": entry.hpii,
        "givenName": entry.given_name,
        "familyName": entry.family_name,
        "specialty": entry.specialty,
        "organisation": entry.organisation,
        "suburb": entry.suburb,
        "state": entry.state,
        "postcode": entry.postcode,
    })
}

/// `GET /argus/v1/directory?q=&page=1&pageSize=20`: Argus-reachable practitioners matching
/// every word of `q`.
async fn search_directory(
    namespace: CurrentNamespace,
    headers: HeaderMap,
    parameters: Parameters,
) -> Result<Response, ProviderError> {
    if let Some(fault) = namespace.take_fault(Provider::Argus, FaultRoute::Directory) {
        return Ok(fault.respond().await);
    }
    let credentials = basic_credentials(&headers);
    namespace.with_state(|state| active_account(state, credentials.as_ref()))?;
    let Query(parameters) =
        parameters.map_err(|_| bad_param("the query string is not understood"))?;
    let page = count_parameter(&parameters, "page", 1, 1..=usize::MAX).map_err(bad_param)?;
    let page_size = count_parameter(
        &parameters,
        "pageSize",
        DEFAULT_DIRECTORY_PAGE_SIZE,
        1..=LARGEST_PAGE,
    )
    .map_err(bad_param)?;
    let query = parameters.get("q").map(String::as_str).unwrap_or_default();
    let offset = (page - 1).saturating_mul(page_size);
    let found = namespace
        .directory()
        .search(Provider::Argus, query, offset, page_size);
    let results: Vec<Value> = found
        .entries
        .iter()
        .map(|entry| directory_entry_view(entry))
        .collect();
    Ok(Json(json!({
        "results": results,
        "page": page,
        "pageSize": page_size,
        "total": found.total,
    }))
    .into_response())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SendBody {
    client_message_id: Option<String>,
    recipient_hpii: Option<String>,
    payload: Option<String>,
}

/// A send whose fields are all present and whose id is valid.
struct SendRequest {
    client_message_id: String,
    recipient_hpii: String,
    /// The HL7 text, or why the payload is badly formed.
    payload: Result<String, String>,
}

fn parse_send_body(body: &Bytes) -> Result<SendRequest, ProviderError> {
    let body: SendBody = serde_json::from_slice(body)
        .map_err(|error| bad_param(format!("body is not the expected JSON: {error}")))?;
    let (Some(client_message_id), Some(recipient_hpii), Some(payload)) =
        (body.client_message_id, body.recipient_hpii, body.payload)
    else {
        return Err(bad_param(
            "clientMessageId, recipientHpii and payload are required",
        ));
    };
    if !is_valid_client_message_id(&client_message_id) {
        return Err(bad_param(
            "clientMessageId must be 1 to 64 of A-Z, a-z, 0-9, '.', '_', ':' and '-'",
        ));
    }
    let recipient_hpii = recipient_hpii.trim().to_owned();
    if recipient_hpii.is_empty() {
        return Err(bad_param("recipientHpii is required"));
    }
    Ok(SendRequest {
        client_message_id,
        recipient_hpii,
        payload: decode_payload(&payload),
    })
}

/// The HL7 text of a base64 payload, or why it is badly formed.
fn decode_payload(payload: &str) -> Result<String, String> {
    let bytes = STANDARD
        .decode(payload)
        .map_err(|_| "payload is not base64 (standard alphabet, padded)".to_owned())?;
    let text = String::from_utf8(bytes)
        .map_err(|_| "payload is not UTF-8 text once decoded".to_owned())?;
    if !hl7::looks_like_hl7(&text) {
        return Err(format!(
            "payload is not an HL7 v2 message: it must start with {}",
            hl7::HEADER_START
        ));
    }
    Ok(text)
}

/// `POST /argus/v1/messages`: accepts a message for a directory practitioner, once per
/// `clientMessageId`.
async fn send_message(
    namespace: CurrentNamespace,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ProviderError> {
    if let Some(fault) = namespace.take_fault(Provider::Argus, FaultRoute::Messages) {
        return Ok(fault.respond().await);
    }
    let credentials = basic_credentials(&headers);
    let request = parse_send_body(&body);
    let directory = namespace.directory();
    namespace.with_state(|state| {
        let username = active_account(state, credentials.as_ref())?;
        let request = request?;
        let now = state.clock.now();
        if let Some(original) = state.messages.find_sent_by_client_message_id(
            Provider::Argus,
            &username,
            &request.client_message_id,
        ) {
            let status = original.progress_at(now).status.word(Provider::Argus);
            return Ok(Json(json!({
                "trackingId": original.id,
                "status": status,
                "duplicate": true,
            }))
            .into_response());
        }
        let payload = request.payload.map_err(badly_formed)?;
        let recipient = directory
            .find(&request.recipient_hpii)
            .filter(|entry| entry.on_argus)
            .filter(|entry| entry.magic != Some(MagicBehaviour::UnknownEndpoint))
            .ok_or_else(|| {
                refusal(
                    StatusCode::NOT_FOUND,
                    ProviderErrorCode::UnknownEndpoint,
                    format!("no Argus endpoint for HPI-I {:?}", request.recipient_hpii),
                )
            })?;
        if recipient.magic == Some(MagicBehaviour::RejectsPayload) {
            return Err(badly_formed("the recipient's system rejected the payload"));
        }
        let message = state.messages.accept(
            NewMessage {
                provider: Provider::Argus,
                account: &username,
                client_message_id: &request.client_message_id,
                recipient,
                payload,
            },
            now,
            &mut state.random,
        );
        tracing::info!(
            namespace = namespace.name(),
            account = username,
            tracking_id = message.id,
            recipient = message.recipient_hpii,
            "argus message accepted"
        );
        Ok((
            StatusCode::ACCEPTED,
            Json(json!({ "trackingId": message.id, "status": "ACCEPTED" })),
        )
            .into_response())
    })
}

fn message_view(message: &SentMessage, now: DateTime<Utc>) -> Value {
    let progress = message.progress_at(now);
    let acknowledgement = message
        .acknowledgement_at(now)
        .map(|acknowledgement| STANDARD.encode(acknowledgement));
    json!({
        "trackingId": message.id,
        "clientMessageId": message.client_message_id,
        "recipientHpii": message.recipient_hpii,
        "status": progress.status.word(Provider::Argus),
        "failureReason": progress.failure_reason,
        "acceptedAt": message.accepted_at,
        "deliveredAt": progress.delivered_at,
        "acknowledgedAt": progress.acknowledged_at,
        "acknowledgement": acknowledgement,
    })
}

/// `GET /argus/v1/messages/{trackingId}`: where a message of this account stands.
async fn read_message(
    namespace: CurrentNamespace,
    headers: HeaderMap,
    Path(tracking_id): Path<String>,
) -> Result<Response, ProviderError> {
    if let Some(fault) = namespace.take_fault(Provider::Argus, FaultRoute::Messages) {
        return Ok(fault.respond().await);
    }
    let credentials = basic_credentials(&headers);
    namespace.with_state(|state| {
        let username = active_account(state, credentials.as_ref())?;
        let message = state
            .messages
            .find_sent(Provider::Argus, &username, &tracking_id)
            .ok_or_else(|| not_found(format!("no message {tracking_id:?} from this account")))?;
        Ok(Json(message_view(message, state.clock.now())).into_response())
    })
}

fn inbox_item_view(item: &InboxItem) -> Value {
    json!({
        "inboxId": item.id,
        "senderHpii": item.sender_hpii,
        "senderName": item.sender_name,
        "receivedAt": item.received_at,
        "payload": STANDARD.encode(&item.payload),
    })
}

/// `GET /argus/v1/inbox?after=&limit=50`: the account's unacknowledged messages, oldest first.
async fn list_inbox(
    namespace: CurrentNamespace,
    headers: HeaderMap,
    parameters: Parameters,
) -> Result<Response, ProviderError> {
    if let Some(fault) = namespace.take_fault(Provider::Argus, FaultRoute::Inbox) {
        return Ok(fault.respond().await);
    }
    let credentials = basic_credentials(&headers);
    namespace.with_state(|state| {
        let username = active_account(state, credentials.as_ref())?;
        let Query(parameters) =
            parameters.map_err(|_| bad_param("the query string is not understood"))?;
        let limit = count_parameter(&parameters, "limit", LARGEST_PAGE, 1..=LARGEST_PAGE)
            .map_err(bad_param)?;
        let after = parameters.get("after").map(String::as_str);
        let page = state
            .messages
            .inbox_page(Provider::Argus, &username, after, limit)
            .ok_or_else(|| bad_param("after is not a cursor this inbox gave"))?;
        let messages: Vec<Value> = page
            .items
            .iter()
            .map(|item| inbox_item_view(item))
            .collect();
        Ok(Json(json!({ "messages": messages, "nextCursor": page.next_cursor })).into_response())
    })
}

/// `POST /argus/v1/inbox/{inboxId}/ack`: the account has taken the message; it is not listed
/// again.
async fn acknowledge_inbox_item(
    namespace: CurrentNamespace,
    headers: HeaderMap,
    Path(inbox_id): Path<String>,
) -> Result<Response, ProviderError> {
    if let Some(fault) = namespace.take_fault(Provider::Argus, FaultRoute::Inbox) {
        return Ok(fault.respond().await);
    }
    let credentials = basic_credentials(&headers);
    namespace.with_state(|state| {
        let username = active_account(state, credentials.as_ref())?;
        if state
            .messages
            .acknowledge_inbox_item(Provider::Argus, &username, &inbox_id)
        {
            Ok(StatusCode::NO_CONTENT.into_response())
        } else {
            Err(not_found(format!(
                "no inbox message {inbox_id:?} for this account"
            )))
        }
    })
}
