//! The ReferralNet emulator's messaging area, under `/referralnet/api`: provider search,
//! dispatch of a raw HL7 body (idempotent on `X-RN-Message-Id`) with receipts to poll, the
//! webhook the receipts are pushed to (see `webhooks`), and the inbox. A session bearer token
//! on every call, and only APPROVED enrolments; errors are `{"fault":{"faultCode","faultString"}}`.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::accounts::AccountStatus;
use crate::directory::{DirectoryEntry, MagicBehaviour};
use crate::faults::FaultRoute;
use crate::hl7;
use crate::messaging::{
    InboxItem, NewMessage, SentMessage, count_parameter, is_valid_client_message_id,
};
use crate::namespace::{CurrentNamespace, NamespaceState, SandboxState};
use crate::provider::{Provider, ProviderError, ProviderErrorCode};
use crate::referralnet::{bearer_token, session_account};
use crate::webhook_targets;

/// The largest page of providers or inbox items.
const LARGEST_PAGE: usize = 50;
/// The provider page size when the caller names none.
const DEFAULT_PROVIDERS_PAGE_SIZE: usize = 20;
/// The media type of a dispatch body.
const HL7_MEDIA_TYPE: &str = "x-application/hl7-v2+er7";
/// The header naming a dispatch's recipient by provider number (HPI-I).
const RECIPIENT_HEADER: &str = "x-rn-recipient";
/// The header carrying the caller's id for a dispatch.
const MESSAGE_ID_HEADER: &str = "x-rn-message-id";

/// The ReferralNet messaging routes.
pub(crate) fn routes() -> Router<SandboxState> {
    Router::new()
        .route("/referralnet/api/providers", get(search_providers))
        .route("/referralnet/api/dispatch", post(dispatch))
        .route("/referralnet/api/dispatch/{receipt_id}", get(read_receipt))
        .route(
            "/referralnet/api/webhook",
            get(read_webhook).put(set_webhook).delete(remove_webhook),
        )
        .route("/referralnet/api/inbox", get(list_inbox))
        .route("/referralnet/api/inbox/{item_id}", delete(acknowledge_item))
}

type Parameters = Result<Query<HashMap<String, String>>, QueryRejection>;

fn refusal(
    status: StatusCode,
    code: ProviderErrorCode,
    message: impl Into<String>,
) -> ProviderError {
    ProviderError::new(Provider::ReferralNet, status, code, message)
}

fn bad_param(message: impl Into<String>) -> ProviderError {
    refusal(
        StatusCode::UNPROCESSABLE_ENTITY,
        ProviderErrorCode::BadParam,
        message,
    )
}

fn badly_formed(message: impl Into<String>) -> ProviderError {
    refusal(
        StatusCode::UNPROCESSABLE_ENTITY,
        ProviderErrorCode::BadlyFormedMsg,
        message,
    )
}

fn not_found(message: impl Into<String>) -> ProviderError {
    refusal(StatusCode::NOT_FOUND, ProviderErrorCode::NotFound, message)
}

/// The user id of the APPROVED enrolment behind the call's session token; else the 401
/// (`tokenExpired`, `notAuthorised`) or 403 (`notAuthorised`) to answer.
fn approved_account(state: &NamespaceState, token: Option<&str>) -> Result<String, ProviderError> {
    let account = session_account(state, token)?;
    let enrolment_state = match account.status_at(state.clock.now()) {
        AccountStatus::Active => return Ok(account.username.clone()),
        AccountStatus::Pending => "PENDING",
        AccountStatus::Rejected => "DECLINED",
        AccountStatus::Suspended => "SUSPENDED",
    };
    Err(refusal(
        StatusCode::FORBIDDEN,
        ProviderErrorCode::NotAuthorised,
        format!("the enrolment is {enrolment_state}: messaging needs an APPROVED enrolment"),
    ))
}

fn provider_view(entry: &DirectoryEntry) -> Value {
    json!({
        "rnAddress": entry.referralnet_address(),
        "providerNumber": entry.hpii,
        "name": entry.display_name(),
        "discipline": entry.specialty,
        "practice": entry.organisation,
        "locality": entry.suburb,
        "state": entry.state,
        "postcode": entry.postcode,
    })
}

/// `GET /referralnet/api/providers?search=&offset=0&limit=20`: ReferralNet-reachable
/// practitioners matching every word of `search`.
async fn search_providers(
    namespace: CurrentNamespace,
    headers: HeaderMap,
    parameters: Parameters,
) -> Result<Response, ProviderError> {
    if let Some(fault) = namespace.take_fault(Provider::ReferralNet, FaultRoute::Providers) {
        return Ok(fault.respond().await);
    }
    let token = bearer_token(&headers);
    namespace.with_state(|state| approved_account(state, token))?;
    let Query(parameters) =
        parameters.map_err(|_| bad_param("the query string is not understood"))?;
    let offset = count_parameter(&parameters, "offset", 0, 0..=usize::MAX).map_err(bad_param)?;
    let limit = count_parameter(
        &parameters,
        "limit",
        DEFAULT_PROVIDERS_PAGE_SIZE,
        1..=LARGEST_PAGE,
    )
    .map_err(bad_param)?;
    let search = parameters
        .get("search")
        .map(String::as_str)
        .unwrap_or_default();
    let found = namespace
        .directory()
        .search(Provider::ReferralNet, search, offset, limit);
    let end = offset.saturating_add(found.entries.len());
    let next_offset = (end < found.total).then_some(end);
    let providers: Vec<Value> = found
        .entries
        .iter()
        .map(|entry| provider_view(entry))
        .collect();
    Ok(Json(json!({
        "providers": providers,
        "total": found.total,
        "nextOffset": next_offset,
    }))
    .into_response())
}

/// A dispatch whose headers passed.
struct DispatchRequest {
    recipient: String,
    message_id: String,
    /// The HL7 text, or why the body is badly formed.
    payload: Result<String, String>,
}

/// The value of a header sent exactly once, as trimmed text.
fn single_header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    let mut values = headers.get_all(name).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    value.to_str().ok().map(str::trim)
}

fn parse_dispatch(headers: &HeaderMap, body: &Bytes) -> Result<DispatchRequest, ProviderError> {
    let media_type = single_header(headers, header::CONTENT_TYPE.as_str())
        .and_then(|value| value.split(';').next())
        .map(str::trim);
    if !media_type.is_some_and(|media_type| media_type.eq_ignore_ascii_case(HL7_MEDIA_TYPE)) {
        return Err(bad_param(format!("Content-Type must be {HL7_MEDIA_TYPE}")));
    }
    let recipient = single_header(headers, RECIPIENT_HEADER)
        .filter(|recipient| !recipient.is_empty())
        .ok_or_else(|| bad_param("X-RN-Recipient is required: the provider number"))?;
    let message_id = single_header(headers, MESSAGE_ID_HEADER)
        .filter(|message_id| is_valid_client_message_id(message_id))
        .ok_or_else(|| {
            bad_param("X-RN-Message-Id must be 1 to 64 of A-Z, a-z, 0-9, '.', '_', ':' and '-'")
        })?;
    let payload = String::from_utf8(body.to_vec())
        .map_err(|_| "the body is not UTF-8 text".to_owned())
        .and_then(|text| {
            if hl7::looks_like_hl7(&text) {
                Ok(text)
            } else {
                Err(format!(
                    "the body is not an HL7 v2 message: it must start with {}",
                    hl7::HEADER_START
                ))
            }
        });
    Ok(DispatchRequest {
        recipient: recipient.to_owned(),
        message_id: message_id.to_owned(),
        payload,
    })
}

/// `POST /referralnet/api/dispatch`: queues a raw HL7 message for a provider, once per
/// `X-RN-Message-Id`.
async fn dispatch(
    namespace: CurrentNamespace,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ProviderError> {
    if let Some(fault) = namespace.take_fault(Provider::ReferralNet, FaultRoute::Dispatch) {
        return Ok(fault.respond().await);
    }
    let token = bearer_token(&headers);
    let request = parse_dispatch(&headers, &body);
    let directory = namespace.directory();
    namespace.with_state(|state| {
        let user_id = approved_account(state, token)?;
        let request = request?;
        let now = state.clock.now();
        if let Some(original) = state.messages.find_sent_by_client_message_id(
            Provider::ReferralNet,
            &user_id,
            &request.message_id,
        ) {
            let current = original.progress_at(now).status.word(Provider::ReferralNet);
            return Ok(Json(json!({
                "receiptId": original.id,
                "state": current,
                "duplicate": true,
            }))
            .into_response());
        }
        let payload = request.payload.map_err(badly_formed)?;
        let recipient = directory
            .find(&request.recipient)
            .filter(|entry| entry.on_referralnet)
            .filter(|entry| entry.magic != Some(MagicBehaviour::UnknownEndpoint))
            .ok_or_else(|| {
                refusal(
                    StatusCode::NOT_FOUND,
                    ProviderErrorCode::UnknownRecipient,
                    format!("no ReferralNet provider {:?}", request.recipient),
                )
            })?;
        if recipient.magic == Some(MagicBehaviour::RejectsPayload) {
            return Err(badly_formed("the recipient's system rejected the message"));
        }
        let message = state.messages.accept(
            NewMessage {
                provider: Provider::ReferralNet,
                account: &user_id,
                client_message_id: &request.message_id,
                recipient,
                payload,
            },
            now,
            &mut state.random,
        );
        tracing::info!(
            namespace = namespace.name(),
            account = user_id,
            receipt_id = message.id,
            recipient = message.recipient_hpii,
            "referralnet dispatch queued"
        );
        Ok((
            StatusCode::ACCEPTED,
            Json(json!({ "receiptId": message.id, "state": "QUEUED" })),
        )
            .into_response())
    })
}

fn receipt_view(message: &SentMessage, now: DateTime<Utc>) -> Value {
    let progress = message.progress_at(now);
    json!({
        "receiptId": message.id,
        "messageId": message.client_message_id,
        "state": progress.status.word(Provider::ReferralNet),
        "reason": progress.failure_reason,
        "updatedAt": progress.updated_at,
        "ack": message.acknowledgement_at(now),
    })
}

/// `GET /referralnet/api/dispatch/{receiptId}`: the receipt of a dispatch of this account (the
/// polling fallback to the webhook).
async fn read_receipt(
    namespace: CurrentNamespace,
    headers: HeaderMap,
    Path(receipt_id): Path<String>,
) -> Result<Response, ProviderError> {
    if let Some(fault) = namespace.take_fault(Provider::ReferralNet, FaultRoute::Dispatch) {
        return Ok(fault.respond().await);
    }
    let token = bearer_token(&headers);
    namespace.with_state(|state| {
        let user_id = approved_account(state, token)?;
        let message = state
            .messages
            .find_sent(Provider::ReferralNet, &user_id, &receipt_id)
            .ok_or_else(|| not_found(format!("no receipt {receipt_id:?} for this account")))?;
        Ok(Json(receipt_view(message, state.clock.now())).into_response())
    })
}

#[derive(Deserialize)]
struct WebhookBody {
    url: Option<String>,
}

/// The URL if it is an absolute http or https URL with a host.
fn parse_webhook_url(body: &Bytes) -> Result<reqwest::Url, ProviderError> {
    let body: WebhookBody = serde_json::from_slice(body)
        .map_err(|error| bad_param(format!("body is not the expected JSON: {error}")))?;
    let url = body.url.unwrap_or_default();
    reqwest::Url::parse(url.trim())
        .ok()
        .filter(|parsed| matches!(parsed.scheme(), "http" | "https") && parsed.host_str().is_some())
        .ok_or_else(|| bad_param("url must be an absolute http:// or https:// URL"))
}

/// `PUT /referralnet/api/webhook`: where this account's receipts are pushed.
async fn set_webhook(
    namespace: CurrentNamespace,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ProviderError> {
    if let Some(fault) = namespace.take_fault(Provider::ReferralNet, FaultRoute::Webhook) {
        return Ok(fault.respond().await);
    }
    let token = bearer_token(&headers);
    // Who asks first (no lookups for strangers), then the URL, resolved and checked outside
    // the namespace lock.
    namespace.with_state(|state| approved_account(state, token))?;
    let url = parse_webhook_url(&body)?;
    if !namespace.allows_private_webhooks() {
        webhook_targets::check_registration(&url)
            .await
            .map_err(|refused| bad_param(refused.to_string()))?;
    }
    namespace.with_state(|state| {
        let user_id = approved_account(state, token)?;
        let webhook = state
            .messages
            .set_webhook(&user_id, url.to_string(), &mut state.random);
        tracing::info!(
            namespace = namespace.name(),
            account = user_id,
            url = webhook.url,
            "referralnet webhook set"
        );
        Ok(Json(webhook).into_response())
    })
}

/// `GET /referralnet/api/webhook`: this account's webhook and its signing secret.
async fn read_webhook(
    namespace: CurrentNamespace,
    headers: HeaderMap,
) -> Result<Response, ProviderError> {
    if let Some(fault) = namespace.take_fault(Provider::ReferralNet, FaultRoute::Webhook) {
        return Ok(fault.respond().await);
    }
    let token = bearer_token(&headers);
    namespace.with_state(|state| {
        let user_id = approved_account(state, token)?;
        let webhook = state
            .messages
            .webhook(&user_id)
            .ok_or_else(|| not_found("no webhook is set for this account"))?;
        Ok(Json(webhook).into_response())
    })
}

/// `DELETE /referralnet/api/webhook`: stops pushes to this account (polling still works).
async fn remove_webhook(
    namespace: CurrentNamespace,
    headers: HeaderMap,
) -> Result<Response, ProviderError> {
    if let Some(fault) = namespace.take_fault(Provider::ReferralNet, FaultRoute::Webhook) {
        return Ok(fault.respond().await);
    }
    let token = bearer_token(&headers);
    namespace.with_state(|state| {
        let user_id = approved_account(state, token)?;
        state.messages.remove_webhook(&user_id);
        Ok(StatusCode::NO_CONTENT.into_response())
    })
}

fn inbox_item_view(item: &InboxItem) -> Value {
    json!({
        "itemId": item.id,
        "from": item.sender_hpii,
        "fromName": item.sender_name,
        "received": item.received_at,
        "hl7": item.payload,
    })
}

/// `GET /referralnet/api/inbox?since=&limit=50`: the account's unacknowledged items, oldest
/// first.
async fn list_inbox(
    namespace: CurrentNamespace,
    headers: HeaderMap,
    parameters: Parameters,
) -> Result<Response, ProviderError> {
    if let Some(fault) = namespace.take_fault(Provider::ReferralNet, FaultRoute::Inbox) {
        return Ok(fault.respond().await);
    }
    let token = bearer_token(&headers);
    namespace.with_state(|state| {
        let user_id = approved_account(state, token)?;
        let Query(parameters) =
            parameters.map_err(|_| bad_param("the query string is not understood"))?;
        let limit = count_parameter(&parameters, "limit", LARGEST_PAGE, 1..=LARGEST_PAGE)
            .map_err(bad_param)?;
        let since = parameters.get("since").map(String::as_str);
        let page = state
            .messages
            .inbox_page(Provider::ReferralNet, &user_id, since, limit)
            .ok_or_else(|| bad_param("since is not a cursor this inbox gave"))?;
        let items: Vec<Value> = page
            .items
            .iter()
            .map(|item| inbox_item_view(item))
            .collect();
        Ok(Json(json!({ "items": items, "cursor": page.next_cursor })).into_response())
    })
}

/// `DELETE /referralnet/api/inbox/{itemId}`: the account has taken the item; it is not listed
/// again.
async fn acknowledge_item(
    namespace: CurrentNamespace,
    headers: HeaderMap,
    Path(item_id): Path<String>,
) -> Result<Response, ProviderError> {
    if let Some(fault) = namespace.take_fault(Provider::ReferralNet, FaultRoute::Inbox) {
        return Ok(fault.respond().await);
    }
    let token = bearer_token(&headers);
    namespace.with_state(|state| {
        let user_id = approved_account(state, token)?;
        if state
            .messages
            .acknowledge_inbox_item(Provider::ReferralNet, &user_id, &item_id)
        {
            Ok(StatusCode::NO_CONTENT.into_response())
        } else {
            Err(not_found(format!(
                "no inbox item {item_id:?} for this account"
            )))
        }
    })
}
