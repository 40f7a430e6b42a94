//! The control API under `/_sandbox`, scoped to the request's namespace like everything else:
//! read, set and advance the clock; list registrations and decide them early; inject, list and
//! clear faults; list payment charges; have a directory practitioner send an account a
//! referral, list every message sent through the providers, look up a directory entry; reset
//! the namespace. Errors are `{"error":"…"}`.

use axum::body::Bytes;
use axum::extract::Path;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Duration, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::accounts::{Account, AccountStatus, Decision, EarlyDecisionError};
use crate::clock::validate_clock_speed;
use crate::directory::DirectoryEntry;
use crate::faults::{Fault, FaultRequest};
use crate::namespace::{
    CurrentNamespace, InboundError, InboundRequest, NamespaceState, SandboxState,
};
use crate::payments::Charge;
use crate::provider::Provider;
use crate::scenario::Scenario;

/// The control routes.
pub(crate) fn routes() -> Router<SandboxState> {
    Router::new()
        .route("/_sandbox/clock", get(read_clock).post(set_clock))
        .route("/_sandbox/clock/advance", post(advance_clock))
        .route("/_sandbox/registrations", get(list_registrations))
        .route(
            "/_sandbox/registrations/{provider}/{username}/approve",
            post(approve_registration),
        )
        .route(
            "/_sandbox/registrations/{provider}/{username}/reject",
            post(reject_registration),
        )
        .route(
            "/_sandbox/faults",
            get(list_faults).post(add_fault).delete(clear_faults),
        )
        .route("/_sandbox/charges", get(list_charges))
        .route("/_sandbox/requests", get(list_requests))
        .route("/_sandbox/inbound", post(send_inbound))
        .route("/_sandbox/messages", get(list_messages))
        .route("/_sandbox/directory/{hpii}", get(read_directory_entry))
        .route("/_sandbox/reset", post(reset_namespace))
        .route("/_sandbox/scenario", post(load_scenario))
        .route("/_sandbox/schedule", get(read_schedule))
}

/// Why a control call was refused.
#[derive(Debug, thiserror::Error)]
enum ControlError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
}

impl IntoResponse for ControlError {
    fn into_response(self) -> Response {
        let status = match self {
            ControlError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ControlError::NotFound(_) => StatusCode::NOT_FOUND,
            ControlError::Conflict(_) => StatusCode::CONFLICT,
        };
        (status, Json(json!({ "error": self.to_string() }))).into_response()
    }
}

fn parse_body<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, ControlError> {
    serde_json::from_slice(body).map_err(|error| {
        ControlError::BadRequest(format!("body is not the expected JSON: {error}"))
    })
}

#[derive(Serialize)]
struct ClockView {
    now: DateTime<Utc>,
    speed: f64,
}

fn clock_view(state: &NamespaceState) -> Json<ClockView> {
    Json(ClockView {
        now: state.clock.now().trunc_subsecs(3),
        speed: state.clock.speed(),
    })
}

/// `GET /_sandbox/clock`.
async fn read_clock(namespace: CurrentNamespace) -> Json<ClockView> {
    namespace.with_state(|state| clock_view(state))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetClockBody {
    now: Option<DateTime<Utc>>,
    speed: Option<f64>,
}

/// `POST /_sandbox/clock`: sets sandbox now, speed, or both.
async fn set_clock(
    namespace: CurrentNamespace,
    body: Bytes,
) -> Result<Json<ClockView>, ControlError> {
    let change: SetClockBody = parse_body(&body)?;
    // 0 stops the clock: it then moves only when set or advanced (exact replays need that).
    let speed = change
        .speed
        .map(|speed| {
            if speed == 0.0 {
                Ok(0.0)
            } else {
                validate_clock_speed(speed)
            }
        })
        .transpose()
        .map_err(|error| ControlError::BadRequest(error.to_string()))?;
    namespace.with_state(|state| {
        if let Some(now) = change.now {
            state
                .clock
                .set_now(now)
                .map_err(|error| ControlError::BadRequest(error.to_string()))?;
        }
        if let Some(speed) = speed {
            state.clock.set_speed(speed);
        }
        tracing::info!(namespace = namespace.name(), now = %state.clock.now(), speed = state.clock.speed(), "sandbox clock set");
        Ok(clock_view(state))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdvanceClockBody {
    seconds: i64,
}

/// `POST /_sandbox/clock/advance`: moves sandbox time forward at once.
async fn advance_clock(
    namespace: CurrentNamespace,
    body: Bytes,
) -> Result<Json<ClockView>, ControlError> {
    let advance: AdvanceClockBody = parse_body(&body)?;
    if advance.seconds < 0 {
        return Err(ControlError::BadRequest(format!(
            "seconds must not be negative, got {}",
            advance.seconds
        )));
    }
    let out_of_range = || ControlError::BadRequest("seconds is too large".to_owned());
    let by = Duration::try_seconds(advance.seconds).ok_or_else(out_of_range)?;
    namespace.with_state(|state| {
        state.clock.advance(by).map_err(|_| out_of_range())?;
        tracing::info!(
            namespace = namespace.name(),
            seconds = advance.seconds,
            "sandbox clock advanced"
        );
        Ok(clock_view(state))
    })
}

/// One registration as the control API lists it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RegistrationView {
    provider: Provider,
    username: String,
    status: AccountStatus,
    registered_at: DateTime<Utc>,
    /// When the scheduled decision falls (or fell) due.
    decides_at: DateTime<Utc>,
    /// When it was actually decided: `decidesAt`, or earlier through control; null while pending.
    decided_at: Option<DateTime<Utc>>,
}

impl RegistrationView {
    fn of(provider: Provider, account: &Account, now: DateTime<Utc>) -> RegistrationView {
        RegistrationView {
            provider,
            username: account.username.clone(),
            status: account.status_at(now),
            registered_at: account.registered_at,
            decides_at: account.decides_at,
            decided_at: account.decided_at(now),
        }
    }
}

/// `GET /_sandbox/registrations`: registrations at both providers, oldest first.
async fn list_registrations(namespace: CurrentNamespace) -> Json<Vec<RegistrationView>> {
    namespace.with_state(|state| {
        let now = state.clock.now();
        let mut registrations: Vec<RegistrationView> = [Provider::Argus, Provider::ReferralNet]
            .into_iter()
            .flat_map(|provider| {
                state
                    .accounts(provider)
                    .registrations()
                    .into_iter()
                    .map(move |account| RegistrationView::of(provider, account, now))
            })
            .collect();
        // A stable sort keeps each provider's own order among equal timestamps.
        registrations.sort_by_key(|registration| registration.registered_at);
        Json(registrations)
    })
}

async fn approve_registration(
    namespace: CurrentNamespace,
    Path((provider, username)): Path<(String, String)>,
) -> Result<Json<RegistrationView>, ControlError> {
    decide_registration(namespace, &provider, &username, Decision::Approve)
}

async fn reject_registration(
    namespace: CurrentNamespace,
    Path((provider, username)): Path<(String, String)>,
) -> Result<Json<RegistrationView>, ControlError> {
    decide_registration(namespace, &provider, &username, Decision::Reject)
}

/// `POST /_sandbox/registrations/{provider}/{username}/approve|reject`: decides now.
fn decide_registration(
    namespace: CurrentNamespace,
    provider_name: &str,
    username: &str,
    decision: Decision,
) -> Result<Json<RegistrationView>, ControlError> {
    let provider = Provider::parse(provider_name).ok_or_else(|| {
        ControlError::NotFound(format!(
            "unknown provider {provider_name:?}: use argus or referralnet"
        ))
    })?;
    namespace.with_state(|state| {
        let now = state.clock.now();
        let account = state
            .accounts_mut(provider)
            .decide_early(username, decision, now)
            .map_err(|error| match error {
                EarlyDecisionError::UnknownAccount(_) => ControlError::NotFound(error.to_string()),
                EarlyDecisionError::AlreadyDecided(_) => ControlError::Conflict(error.to_string()),
            })?;
        tracing::info!(
            namespace = namespace.name(),
            provider = provider.as_str(),
            username,
            ?decision,
            "registration decided early"
        );
        Ok(Json(RegistrationView::of(provider, account, now)))
    })
}

/// `POST /_sandbox/faults`: queues a fault for the next matching provider calls.
async fn add_fault(namespace: CurrentNamespace, body: Bytes) -> Result<Response, ControlError> {
    let request: FaultRequest = parse_body(&body)?;
    let fault = namespace.with_state(|state| {
        let fault =
            Fault::from_request(request, &mut state.random).map_err(ControlError::BadRequest)?;
        state.faults.add(fault.clone());
        Ok::<Fault, ControlError>(fault)
    })?;
    tracing::info!(namespace = namespace.name(), ?fault, "fault injected");
    Ok((StatusCode::CREATED, Json(fault)).into_response())
}

/// `GET /_sandbox/faults`: the counted faults still waiting, oldest first, then the windows
/// (from scenarios) not yet over.
async fn list_faults(namespace: CurrentNamespace) -> Json<Vec<serde_json::Value>> {
    namespace.with_state(|state| {
        let now = state.clock.now();
        let counted = state.faults.remaining().iter().map(|fault| json!(fault));
        let windows = state
            .faults
            .windows(now)
            .into_iter()
            .map(|window| json!(window));
        Json(counted.chain(windows).collect())
    })
}

/// `DELETE /_sandbox/faults`: removes every waiting fault.
async fn clear_faults(namespace: CurrentNamespace) -> StatusCode {
    namespace.with_state(|state| state.faults.clear());
    StatusCode::NO_CONTENT
}

/// `GET /_sandbox/charges`: every charge of the namespace, succeeded and declined, oldest first,
/// so tests can count what was really charged.
async fn list_charges(namespace: CurrentNamespace) -> Json<Vec<Charge>> {
    namespace.with_state(|state| Json(state.payments.charges().to_vec()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestsQuery {
    provider: Option<String>,
}

/// `GET /_sandbox/requests[?provider=argus|referralnet|payments]`: the recent requests the
/// providers received in this namespace, oldest first (method, path, status, time; no secrets).
async fn list_requests(
    namespace: CurrentNamespace,
    axum::extract::Query(query): axum::extract::Query<RequestsQuery>,
) -> Json<Vec<crate::requests::RequestRecord>> {
    namespace.with_state(|state| Json(state.requests.list(query.provider.as_deref())))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct InboundBody {
    provider: String,
    account: String,
    from_hpii: Option<String>,
    recipient_hpii: Option<String>,
    recipient_name: Option<String>,
    text: Option<String>,
}

/// `POST /_sandbox/inbound`: a directory practitioner sends a `REF^I12` referral to the inbox
/// of an account.
async fn send_inbound(namespace: CurrentNamespace, body: Bytes) -> Result<Response, ControlError> {
    let inbound: InboundBody = parse_body(&body)?;
    let provider = Provider::parse(&inbound.provider).ok_or_else(|| {
        ControlError::BadRequest(format!(
            "unknown provider {:?}: use argus or referralnet",
            inbound.provider
        ))
    })?;
    let request = InboundRequest {
        provider,
        account: &inbound.account,
        from_hpii: inbound.from_hpii.as_deref(),
        recipient_hpii: inbound.recipient_hpii.as_deref(),
        recipient_name: inbound.recipient_name.as_deref(),
        text: inbound.text.as_deref(),
    };
    namespace.with_state(|state| {
        let now = state.clock.now();
        let item = state
            .deliver_inbound(namespace.directory(), &request, now)
            .map_err(|error| match error {
                InboundError::Sender(message) => ControlError::BadRequest(message),
                InboundError::Account(message) => ControlError::NotFound(message),
            })?;
        tracing::info!(
            namespace = namespace.name(),
            provider = provider.as_str(),
            account = item.account,
            sender = item.sender_hpii,
            "inbound referral delivered"
        );
        let id_field = match provider {
            Provider::Argus => "inboxId",
            Provider::ReferralNet => "itemId",
        };
        Ok((
            StatusCode::CREATED,
            Json(json!({ id_field: item.id, "payload": item.payload })),
        )
            .into_response())
    })
}

/// The longest scenario the control API takes, in bytes.
const LONGEST_SCENARIO_BYTES: usize = 1024 * 1024;

/// `POST /_sandbox/scenario` (body: a scenario's TOML text): the namespace starts over from
/// the scenario. Nothing changes when the scenario is refused.
async fn load_scenario(namespace: CurrentNamespace, body: Bytes) -> Result<Response, ControlError> {
    if body.len() > LONGEST_SCENARIO_BYTES {
        return Err(ControlError::BadRequest(format!(
            "a scenario must be at most {LONGEST_SCENARIO_BYTES} bytes"
        )));
    }
    let text = std::str::from_utf8(&body)
        .map_err(|_| ControlError::BadRequest("a scenario must be UTF-8 TOML text".to_owned()))?;
    let scenario = Scenario::parse(text, "request body")
        .map_err(|error| ControlError::BadRequest(error.to_string()))?;
    if let Some(named) = scenario
        .named_namespace()
        .filter(|named| *named != namespace.name())
    {
        return Err(ControlError::BadRequest(format!(
            "request body: the scenario names namespace {named:?} but was sent to {:?}: send it there, or leave namespace out",
            namespace.name()
        )));
    }
    scenario
        .check_against(namespace.directory())
        .map_err(|error| ControlError::BadRequest(error.to_string()))?;
    let scenario = std::sync::Arc::new(scenario);
    let config = namespace.config();
    let view = namespace.with_state(|state| {
        *state = NamespaceState::from_scenario(state.name.clone(), config, scenario);
        schedule_view(state)
    });
    tracing::info!(namespace = namespace.name(), "scenario loaded");
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

/// The namespace's scenario and events, as `GET /_sandbox/schedule` shows them.
fn schedule_view(state: &NamespaceState) -> serde_json::Value {
    json!({
        "scenario": state.scenario.as_ref().map(|scenario| json!({
            "source": scenario.source(),
            "description": scenario.description(),
            "seed": scenario.seed(),
        })),
        "now": state.clock.now().trunc_subsecs(3),
        "pending": state.schedule.pending(),
        "fired": state.schedule.fired(),
    })
}

/// `GET /_sandbox/schedule`: the scenario the namespace started from, the events still
/// waiting for the clock, and those that fired with what came of them.
async fn read_schedule(namespace: CurrentNamespace) -> Json<serde_json::Value> {
    namespace.with_state(|state| Json(schedule_view(state)))
}

/// One message sent through a provider, as the control API lists it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SentMessageView {
    provider: Provider,
    account: String,
    id: String,
    client_message_id: String,
    recipient_hpii: String,
    status: &'static str,
    payload: String,
    received_at: DateTime<Utc>,
}

/// `GET /_sandbox/messages`: every message accepted through the send APIs, oldest first, with
/// its payload exactly as received.
async fn list_messages(namespace: CurrentNamespace) -> Json<Vec<SentMessageView>> {
    namespace.with_state(|state| {
        let now = state.clock.now();
        let messages = state
            .messages
            .sent()
            .iter()
            .map(|message| SentMessageView {
                provider: message.provider,
                account: message.account.clone(),
                id: message.id.clone(),
                client_message_id: message.client_message_id.clone(),
                recipient_hpii: message.recipient_hpii.clone(),
                status: message.progress_at(now).status.word(message.provider),
                payload: message.payload.clone(),
                received_at: message.accepted_at,
            })
            .collect();
        Json(messages)
    })
}

fn directory_entry_view(entry: &DirectoryEntry) -> serde_json::Value {
    json!({
        "hpii": entry.hpii,
        "givenName": entry.given_name,
        "familyName": entry.family_name,
        "specialty": entry.specialty,
        "organisation": entry.organisation,
        "suburb": entry.suburb,
        "state": entry.state,
        "postcode": entry.postcode,
        "providers": entry.provider_names(),
        "argusId": entry.on_argus.then(|| entry.argus_id()),
        "rnAddress": entry.on_referralnet.then(|| entry.referralnet_address()),
    })
}

/// `GET /_sandbox/directory/{hpii}`: one directory entry and the providers that reach it.
async fn read_directory_entry(
    namespace: CurrentNamespace,
    Path(hpii): Path<String>,
) -> Result<Json<serde_json::Value>, ControlError> {
    namespace
        .directory()
        .find(&hpii)
        .map(|entry| Json(directory_entry_view(entry)))
        .ok_or_else(|| ControlError::NotFound(format!("no directory entry with HPI-I {hpii:?}")))
}

/// `POST /_sandbox/reset`: the namespace back to its initial state.
async fn reset_namespace(namespace: CurrentNamespace) -> StatusCode {
    namespace.with_state(|state| state.reset());
    tracing::info!(namespace = namespace.name(), "namespace reset");
    StatusCode::NO_CONTENT
}
