//! The payments emulator under `/payments/v1`: a card payment gateway in test mode, like
//! Stripe's, that the gateway charges for credit purchases. This module owns the documented test
//! payment methods, each namespace's charges and idempotency records ([`PaymentBook`]), the
//! payments error shape `{"error":{"code","message"}}` and the HTTP handlers.
//!
//! A charge is checked against its idempotency key and recorded in one synchronous step under
//! the namespace lock, so concurrent requests with one key never create two charges.

use std::collections::{HashMap, HashSet};

use axum::body::Bytes;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Datelike, SubsecRound, Utc};
use rand::Rng;
use rand::distributions::Alphanumeric;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::faults::FaultRoute;
use crate::namespace::{CurrentNamespace, SandboxState};
use crate::provider::Service;
use crate::random::NamespaceRandom;

/// Every API key that starts with this is accepted.
const API_KEY_PREFIX: &str = "sk_sandbox_";

/// The request header that names a charge attempt, so that retries never charge twice.
const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

/// The response header that marks an answer replayed from an earlier request with the same key.
const IDEMPOTENT_REPLAYED_HEADER: HeaderName = HeaderName::from_static("idempotent-replayed");

/// The longest idempotency key, in characters (all of them visible ASCII).
const LONGEST_IDEMPOTENCY_KEY: usize = 255;

/// The smallest charge, in cents.
const SMALLEST_AMOUNT_CENTS: i64 = 1;

/// The largest charge, in cents ($10,000, the top of the largest credit tier).
const LARGEST_AMOUNT_CENTS: i64 = 1_000_000;

/// The only currency the gateway charges in.
const ACCEPTED_CURRENCY: &str = "AUD";

/// The longest description of a charge, in characters.
const LONGEST_DESCRIPTION: usize = 500;

/// How many random letters and digits follow `ch_` in a charge id.
const CHARGE_ID_RANDOM_CHARACTERS: usize = 24;

/// Every test card expires in December…
const TEST_CARD_EXPIRY_MONTH: u32 = 12;

/// …this many years after the current sandbox year, so they never expire while in use.
const TEST_CARD_EXPIRY_YEARS_AHEAD: i32 = 3;

/// The payments routes.
pub(crate) fn routes() -> Router<SandboxState> {
    Router::new()
        .route(
            "/payments/v1/payment-methods/{token}",
            get(read_payment_method),
        )
        .route("/payments/v1/charges", post(create_charge))
        .route("/payments/v1/charges/{id}", get(read_charge))
}

/// What charging a test payment method does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TestBehaviour {
    Approve,
    Decline,
    /// The first attempt of each idempotency key fails with a processing error; later attempts
    /// approve.
    FailFirstAttempt,
}

/// One of the documented test payment methods, a stored card.
#[derive(Debug, PartialEq, Eq)]
struct TestPaymentMethod {
    token: &'static str,
    brand: &'static str,
    last4: &'static str,
    behaviour: TestBehaviour,
}

/// The test payment methods, documented in PROTOCOL.md.
static TEST_PAYMENT_METHODS: [TestPaymentMethod; 3] = [
    TestPaymentMethod {
        token: "pm_sandbox_approve",
        brand: "visa",
        last4: "4242",
        behaviour: TestBehaviour::Approve,
    },
    TestPaymentMethod {
        token: "pm_sandbox_decline",
        brand: "visa",
        last4: "0002",
        behaviour: TestBehaviour::Decline,
    },
    TestPaymentMethod {
        token: "pm_sandbox_flaky",
        brand: "mastercard",
        last4: "4444",
        behaviour: TestBehaviour::FailFirstAttempt,
    },
];

/// A payment method the gateway knows: one of the test payment methods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PaymentMethod(&'static TestPaymentMethod);

impl PaymentMethod {
    fn parse(token: &str) -> Option<PaymentMethod> {
        TEST_PAYMENT_METHODS
            .iter()
            .find(|method| method.token == token)
            .map(PaymentMethod)
    }

    fn token(self) -> &'static str {
        self.0.token
    }

    fn behaviour(self) -> TestBehaviour {
        self.0.behaviour
    }
}

fn unknown_payment_method_message(token: &str) -> String {
    format!(
        "no payment method {token:?}: use pm_sandbox_approve, pm_sandbox_decline or pm_sandbox_flaky"
    )
}

/// The error words of the payment gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PaymentsErrorCode {
    AuthenticationRequired,
    IdempotencyKeyRequired,
    IdempotencyKeyReuse,
    BadRequest,
    InvalidAmount,
    InvalidCurrency,
    InvalidPaymentMethod,
    CardDeclined,
    ProcessingError,
    RateLimited,
    ResourceMissing,
}

impl PaymentsErrorCode {
    /// The word as it appears on the wire.
    fn as_str(self) -> &'static str {
        match self {
            PaymentsErrorCode::AuthenticationRequired => "authentication_required",
            PaymentsErrorCode::IdempotencyKeyRequired => "idempotency_key_required",
            PaymentsErrorCode::IdempotencyKeyReuse => "idempotency_key_reuse",
            PaymentsErrorCode::BadRequest => "bad_request",
            PaymentsErrorCode::InvalidAmount => "invalid_amount",
            PaymentsErrorCode::InvalidCurrency => "invalid_currency",
            PaymentsErrorCode::InvalidPaymentMethod => "invalid_payment_method",
            PaymentsErrorCode::CardDeclined => "card_declined",
            PaymentsErrorCode::ProcessingError => "processing_error",
            PaymentsErrorCode::RateLimited => "rate_limited",
            PaymentsErrorCode::ResourceMissing => "resource_missing",
        }
    }
}

/// An error answer of the payment gateway: `{"error":{"code","message"}}`, plus `chargeId`
/// when a charge was recorded (a decline).
#[derive(Debug)]
pub(crate) struct PaymentsError {
    status: StatusCode,
    code: PaymentsErrorCode,
    message: String,
    charge_id: Option<String>,
}

impl PaymentsError {
    pub(crate) fn new(
        status: StatusCode,
        code: PaymentsErrorCode,
        message: impl Into<String>,
    ) -> PaymentsError {
        PaymentsError {
            status,
            code,
            message: message.into(),
            charge_id: None,
        }
    }

    fn bad_request(code: PaymentsErrorCode, message: impl Into<String>) -> PaymentsError {
        PaymentsError::new(StatusCode::BAD_REQUEST, code, message)
    }

    fn unauthenticated(message: &str) -> PaymentsError {
        PaymentsError::new(
            StatusCode::UNAUTHORIZED,
            PaymentsErrorCode::AuthenticationRequired,
            message,
        )
    }

    fn card_declined(charge_id: &str) -> PaymentsError {
        PaymentsError {
            charge_id: Some(charge_id.to_owned()),
            ..PaymentsError::new(
                StatusCode::PAYMENT_REQUIRED,
                PaymentsErrorCode::CardDeclined,
                "the card was declined",
            )
        }
    }

    /// The JSON body this error is sent with.
    fn body(&self) -> Value {
        let mut error = json!({ "code": self.code.as_str(), "message": self.message });
        if let Some(charge_id) = &self.charge_id {
            error["chargeId"] = json!(charge_id);
        }
        json!({ "error": error })
    }
}

impl IntoResponse for PaymentsError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if self.code == PaymentsErrorCode::AuthenticationRequired {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(r#"Bearer realm="payments""#),
            );
        }
        response
    }
}

/// Accepts any `Authorization: Bearer sk_sandbox_…` API key.
fn authenticate(headers: &HeaderMap) -> Result<(), PaymentsError> {
    let api_key = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, api_key)| api_key.trim());
    match api_key {
        Some(api_key) if api_key.starts_with(API_KEY_PREFIX) => Ok(()),
        Some(_) => Err(PaymentsError::unauthenticated(
            "api key is not valid: sandbox api keys start with sk_sandbox_",
        )),
        None => Err(PaymentsError::unauthenticated(
            "authentication required: send Authorization: Bearer sk_sandbox_…",
        )),
    }
}

/// A client's name for one charge attempt: 1 to 255 visible ASCII characters.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct IdempotencyKey(String);

impl IdempotencyKey {
    fn parse(value: &[u8]) -> Option<IdempotencyKey> {
        let is_valid = (1..=LONGEST_IDEMPOTENCY_KEY).contains(&value.len())
            && value.iter().all(u8::is_ascii_graphic);
        // Visible ASCII is valid UTF-8, so the conversion cannot fail once the check passed.
        is_valid
            .then(|| String::from_utf8(value.to_vec()).ok())
            .flatten()
            .map(IdempotencyKey)
    }

    /// The one `Idempotency-Key` header of a request.
    fn from_headers(headers: &HeaderMap) -> Result<IdempotencyKey, PaymentsError> {
        let mut values = headers.get_all(IDEMPOTENCY_KEY_HEADER).iter();
        let key = match (values.next(), values.next()) {
            (Some(value), None) => IdempotencyKey::parse(value.as_bytes()),
            _ => None,
        };
        key.ok_or_else(|| {
            PaymentsError::bad_request(
                PaymentsErrorCode::IdempotencyKeyRequired,
                "send one Idempotency-Key header of 1 to 255 visible ASCII characters",
            )
        })
    }

    fn as_str(&self) -> &str {
        &self.0
    }
}

/// An amount to charge: whole cents from 1 to 1,000,000.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct AmountCents(i64);

impl AmountCents {
    fn parse(value: &Value) -> Option<AmountCents> {
        value
            .as_i64()
            .filter(|cents| (SMALLEST_AMOUNT_CENTS..=LARGEST_AMOUNT_CENTS).contains(cents))
            .map(AmountCents)
    }
}

/// A charge's description: at most 500 characters.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Description(String);

impl Description {
    fn parse(text: &str) -> Option<Description> {
        (text.chars().count() <= LONGEST_DESCRIPTION).then(|| Description(text.to_owned()))
    }
}

/// What a charge request asks for; two requests with one idempotency key must ask for the same.
/// The currency is always AUD, the only one accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ChargeRequest {
    payment_method: PaymentMethod,
    amount_cents: AmountCents,
    description: Option<Description>,
}

impl ChargeRequest {
    /// Reads a charge body. Refusals come in this order: `bad_request` (not a JSON object, a
    /// required field missing or null, a description that is not a string of at most 500
    /// characters), then `invalid_amount`, `invalid_currency` and `invalid_payment_method`.
    /// Fields the protocol does not name are ignored.
    fn parse(body: &[u8]) -> Result<ChargeRequest, PaymentsError> {
        let bad_request =
            |message: String| PaymentsError::bad_request(PaymentsErrorCode::BadRequest, message);
        let fields = match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(fields)) => fields,
            Ok(_) => return Err(bad_request("body must be a JSON object".to_owned())),
            Err(error) => return Err(bad_request(format!("body is not JSON: {error}"))),
        };
        let required = |name: &str| {
            present(&fields, name).ok_or_else(|| bad_request(format!("{name} is required")))
        };
        let payment_method = required("paymentMethod")?;
        let amount_cents = required("amountCents")?;
        let currency = required("currency")?;
        let description = match present(&fields, "description") {
            None => None,
            Some(Value::String(text)) => Some(Description::parse(text).ok_or_else(|| {
                bad_request(format!(
                    "description must be at most {LONGEST_DESCRIPTION} characters"
                ))
            })?),
            Some(_) => return Err(bad_request("description must be a string".to_owned())),
        };

        let amount_cents = AmountCents::parse(amount_cents).ok_or_else(|| {
            PaymentsError::bad_request(
                PaymentsErrorCode::InvalidAmount,
                format!(
                    "amountCents must be a whole number of cents from {SMALLEST_AMOUNT_CENTS} to {LARGEST_AMOUNT_CENTS}"
                ),
            )
        })?;
        if currency.as_str() != Some(ACCEPTED_CURRENCY) {
            return Err(PaymentsError::bad_request(
                PaymentsErrorCode::InvalidCurrency,
                format!("currency must be {ACCEPTED_CURRENCY}"),
            ));
        }
        let payment_method = match payment_method {
            Value::String(token) => PaymentMethod::parse(token).ok_or(token.clone()),
            other => Err(other.to_string()),
        }
        .map_err(|token| {
            PaymentsError::bad_request(
                PaymentsErrorCode::InvalidPaymentMethod,
                unknown_payment_method_message(&token),
            )
        })?;
        Ok(ChargeRequest {
            payment_method,
            amount_cents,
            description,
        })
    }
}

/// A field of a JSON object, unless it is absent or null.
fn present<'a>(fields: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    fields.get(name).filter(|value| !value.is_null())
}

/// How a recorded charge ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ChargeStatus {
    Succeeded,
    Declined,
}

/// A charge as the API and the control API show it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Charge {
    id: String,
    status: ChargeStatus,
    amount_cents: i64,
    currency: &'static str,
    payment_method: &'static str,
    idempotency_key: String,
    description: Option<String>,
    created_at: DateTime<Utc>,
}

/// The first answer given for an idempotency key, replayed to every later request with it.
#[derive(Clone, Debug)]
struct RecordedAnswer {
    request: ChargeRequest,
    status: StatusCode,
    body: Value,
}

/// What became of one charge attempt.
#[derive(Debug)]
enum ChargeAttempt {
    /// A new charge, succeeded or declined, and the answer now recorded for its key.
    Charged {
        charge: Charge,
        status: StatusCode,
        body: Value,
    },
    /// The key's recorded answer, for a request asking for the same as the first.
    Replayed { status: StatusCode, body: Value },
    /// The key was first used for a request asking for something else.
    KeyReused,
    /// The first attempt of a key with the flaky test card: nothing is recorded.
    ProcessingFailed,
}

/// The charges of one namespace, in creation order, and the answers recorded per idempotency key.
#[derive(Debug, Default)]
pub(crate) struct PaymentBook {
    charges: Vec<Charge>,
    charge_positions: HashMap<String, usize>,
    answers_by_key: HashMap<IdempotencyKey, RecordedAnswer>,
    /// Keys whose first attempt with the flaky test card has already failed.
    failed_first_attempts: HashSet<IdempotencyKey>,
}

impl PaymentBook {
    /// Every charge, oldest first.
    pub(crate) fn charges(&self) -> &[Charge] {
        &self.charges
    }

    fn charge(&self, id: &str) -> Option<&Charge> {
        self.charge_positions
            .get(id)
            .map(|&position| &self.charges[position])
    }

    /// Checks `key` and, unless it already has an answer, charges at sandbox time `now` and
    /// records the answer against it. One call does both, under one lock, so no two requests
    /// with one key can both charge.
    fn attempt_charge(
        &mut self,
        key: IdempotencyKey,
        request: ChargeRequest,
        now: DateTime<Utc>,
        random: &mut NamespaceRandom,
    ) -> ChargeAttempt {
        if let Some(recorded) = self.answers_by_key.get(&key) {
            return if recorded.request == request {
                ChargeAttempt::Replayed {
                    status: recorded.status,
                    body: recorded.body.clone(),
                }
            } else {
                ChargeAttempt::KeyReused
            };
        }
        let status = match request.payment_method.behaviour() {
            TestBehaviour::FailFirstAttempt if self.failed_first_attempts.insert(key.clone()) => {
                return ChargeAttempt::ProcessingFailed;
            }
            TestBehaviour::Approve | TestBehaviour::FailFirstAttempt => ChargeStatus::Succeeded,
            TestBehaviour::Decline => ChargeStatus::Declined,
        };
        let charge = Charge {
            id: self.new_charge_id(random),
            status,
            amount_cents: request.amount_cents.0,
            currency: ACCEPTED_CURRENCY,
            payment_method: request.payment_method.token(),
            idempotency_key: key.as_str().to_owned(),
            description: request
                .description
                .as_ref()
                .map(|description| description.0.clone()),
            created_at: now.trunc_subsecs(0),
        };
        let (status, body) = match charge.status {
            ChargeStatus::Succeeded => (StatusCode::CREATED, json!(charge)),
            ChargeStatus::Declined => (
                StatusCode::PAYMENT_REQUIRED,
                PaymentsError::card_declined(&charge.id).body(),
            ),
        };
        self.charge_positions
            .insert(charge.id.clone(), self.charges.len());
        self.charges.push(charge.clone());
        self.answers_by_key.insert(
            key,
            RecordedAnswer {
                request,
                status,
                body: body.clone(),
            },
        );
        ChargeAttempt::Charged {
            charge,
            status,
            body,
        }
    }

    /// `ch_` and random letters and digits, unused in this namespace.
    fn new_charge_id(&self, random: &mut NamespaceRandom) -> String {
        loop {
            let random: String = random
                .next_generator()
                .sample_iter(&Alphanumeric)
                .take(CHARGE_ID_RANDOM_CHARACTERS)
                .map(char::from)
                .collect();
            let id = format!("ch_{random}");
            if !self.charge_positions.contains_key(&id) {
                return id;
            }
        }
    }
}

/// A namespace's payments as a state file keeps them: every charge, every recorded answer (with
/// the request it answered) and the keys whose flaky first attempt failed. No API key is kept:
/// the sandbox never stores one.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct PaymentsSnapshot {
    charges: Vec<ChargeSnapshot>,
    answers: Vec<AnswerSnapshot>,
    failed_first_attempts: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ChargeSnapshot {
    id: String,
    status: ChargeStatus,
    amount_cents: i64,
    payment_method: String,
    idempotency_key: String,
    description: Option<String>,
    created_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AnswerSnapshot {
    idempotency_key: String,
    payment_method: String,
    amount_cents: i64,
    description: Option<String>,
    status: u16,
    body: Value,
}

impl PaymentBook {
    /// What a state file keeps of the book.
    pub(crate) fn snapshot(&self) -> PaymentsSnapshot {
        let mut answers: Vec<AnswerSnapshot> = self
            .answers_by_key
            .iter()
            .map(|(key, answer)| AnswerSnapshot {
                idempotency_key: key.as_str().to_owned(),
                payment_method: answer.request.payment_method.token().to_owned(),
                amount_cents: answer.request.amount_cents.0,
                description: answer
                    .request
                    .description
                    .as_ref()
                    .map(|description| description.0.clone()),
                status: answer.status.as_u16(),
                body: answer.body.clone(),
            })
            .collect();
        answers.sort_by(|left, right| left.idempotency_key.cmp(&right.idempotency_key));
        let mut failed_first_attempts: Vec<String> = self
            .failed_first_attempts
            .iter()
            .map(|key| key.as_str().to_owned())
            .collect();
        failed_first_attempts.sort();
        PaymentsSnapshot {
            charges: self
                .charges
                .iter()
                .map(|charge| ChargeSnapshot {
                    id: charge.id.clone(),
                    status: charge.status,
                    amount_cents: charge.amount_cents,
                    payment_method: charge.payment_method.to_owned(),
                    idempotency_key: charge.idempotency_key.clone(),
                    description: charge.description.clone(),
                    created_at: charge.created_at,
                })
                .collect(),
            answers,
            failed_first_attempts,
        }
    }

    /// The book a state file kept; the message says what does not fit.
    pub(crate) fn restore(snapshot: PaymentsSnapshot) -> Result<PaymentBook, String> {
        let payment_method = |token: &str| {
            PaymentMethod::parse(token).ok_or_else(|| format!("unknown payment method {token:?}"))
        };
        let key = |text: &str| {
            IdempotencyKey::parse(text.as_bytes())
                .ok_or_else(|| format!("invalid idempotency key {text:?}"))
        };
        let mut book = PaymentBook::default();
        for charge in snapshot.charges {
            let method = payment_method(&charge.payment_method)?;
            if book
                .charge_positions
                .insert(charge.id.clone(), book.charges.len())
                .is_some()
            {
                return Err(format!("charge {} is there twice", charge.id));
            }
            book.charges.push(Charge {
                id: charge.id,
                status: charge.status,
                amount_cents: charge.amount_cents,
                currency: ACCEPTED_CURRENCY,
                payment_method: method.token(),
                idempotency_key: charge.idempotency_key,
                description: charge.description,
                created_at: charge.created_at,
            });
        }
        for answer in snapshot.answers {
            let request = ChargeRequest {
                payment_method: payment_method(&answer.payment_method)?,
                amount_cents: AmountCents(answer.amount_cents),
                description: answer.description.map(Description),
            };
            let status = StatusCode::from_u16(answer.status)
                .map_err(|_| format!("invalid status {}", answer.status))?;
            book.answers_by_key.insert(
                key(&answer.idempotency_key)?,
                RecordedAnswer {
                    request,
                    status,
                    body: answer.body,
                },
            );
        }
        for failed in snapshot.failed_first_attempts {
            book.failed_first_attempts.insert(key(&failed)?);
        }
        Ok(book)
    }
}

/// A test payment method as `GET /payments/v1/payment-methods/{token}` shows it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PaymentMethodView {
    token: &'static str,
    brand: &'static str,
    last4: &'static str,
    exp_month: u32,
    exp_year: i32,
}

/// `GET /payments/v1/payment-methods/{token}`: one of the test payment methods.
async fn read_payment_method(
    namespace: CurrentNamespace,
    headers: HeaderMap,
    Path(token): Path<String>,
) -> Result<Response, PaymentsError> {
    if let Some(fault) = namespace.take_fault(Service::Payments, FaultRoute::PaymentMethods) {
        return Ok(fault.respond().await);
    }
    authenticate(&headers)?;
    let PaymentMethod(method) = PaymentMethod::parse(&token).ok_or_else(|| {
        PaymentsError::new(
            StatusCode::NOT_FOUND,
            PaymentsErrorCode::InvalidPaymentMethod,
            unknown_payment_method_message(&token),
        )
    })?;
    let sandbox_year = namespace.with_state(|state| state.clock.now().year());
    Ok(Json(PaymentMethodView {
        token: method.token,
        brand: method.brand,
        last4: method.last4,
        exp_month: TEST_CARD_EXPIRY_MONTH,
        exp_year: sandbox_year + TEST_CARD_EXPIRY_YEARS_AHEAD,
    })
    .into_response())
}

/// `POST /payments/v1/charges`: charges a test payment method, at most once per idempotency key.
async fn create_charge(
    namespace: CurrentNamespace,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, PaymentsError> {
    if let Some(fault) = namespace.take_fault(Service::Payments, FaultRoute::Charges) {
        return Ok(fault.respond().await);
    }
    authenticate(&headers)?;
    let key = IdempotencyKey::from_headers(&headers)?;
    let request = ChargeRequest::parse(&body)?;
    let attempt = namespace.with_state(|state| {
        let now = state.clock.now();
        state
            .payments
            .attempt_charge(key.clone(), request, now, &mut state.random)
    });
    match attempt {
        ChargeAttempt::Charged {
            charge,
            status,
            body,
        } => {
            tracing::info!(
                namespace = namespace.name(),
                charge_id = charge.id,
                status = ?charge.status,
                amount_cents = charge.amount_cents,
                idempotency_key = key.as_str(),
                "charge recorded"
            );
            Ok((status, Json(body)).into_response())
        }
        ChargeAttempt::Replayed { status, body } => Ok((
            status,
            [(IDEMPOTENT_REPLAYED_HEADER, HeaderValue::from_static("true"))],
            Json(body),
        )
            .into_response()),
        ChargeAttempt::KeyReused => Err(PaymentsError::new(
            StatusCode::CONFLICT,
            PaymentsErrorCode::IdempotencyKeyReuse,
            "this Idempotency-Key was already used for a charge with different parameters",
        )),
        ChargeAttempt::ProcessingFailed => Err(PaymentsError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            PaymentsErrorCode::ProcessingError,
            "the card could not be processed; retry with the same Idempotency-Key",
        )),
    }
}

/// `GET /payments/v1/charges/{id}`: one charge of the namespace, succeeded or declined.
async fn read_charge(
    namespace: CurrentNamespace,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, PaymentsError> {
    if let Some(fault) = namespace.take_fault(Service::Payments, FaultRoute::Charges) {
        return Ok(fault.respond().await);
    }
    authenticate(&headers)?;
    let charge = namespace.with_state(|state| state.payments.charge(&id).cloned());
    match charge {
        Some(charge) => Ok(Json(charge).into_response()),
        None => Err(PaymentsError::new(
            StatusCode::NOT_FOUND,
            PaymentsErrorCode::ResourceMissing,
            format!("no charge {id:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(token: &str, amount_cents: i64) -> ChargeRequest {
        ChargeRequest {
            payment_method: PaymentMethod::parse(token).unwrap(),
            amount_cents: AmountCents(amount_cents),
            description: None,
        }
    }

    fn key(text: &str) -> IdempotencyKey {
        IdempotencyKey::parse(text.as_bytes()).unwrap()
    }

    fn refusal_code(body: &str) -> Option<&'static str> {
        ChargeRequest::parse(body.as_bytes())
            .err()
            .map(|error| error.code.as_str())
    }

    #[test]
    fn idempotency_keys_are_1_to_255_visible_ascii_characters() {
        assert!(IdempotencyKey::parse(b"purchase-7f3a:1").is_some());
        assert!(IdempotencyKey::parse("k".repeat(255).as_bytes()).is_some());
        for invalid in [&b""[..], b"has space", b"tab\t", "é".as_bytes()] {
            assert!(IdempotencyKey::parse(invalid).is_none(), "{invalid:?}");
        }
        assert!(IdempotencyKey::parse("k".repeat(256).as_bytes()).is_none());
    }

    #[test]
    fn charge_bodies_are_refused_with_the_code_of_the_first_problem() {
        let valid = r#"{"paymentMethod":"pm_sandbox_approve","amountCents":2200,"currency":"AUD"}"#;
        assert_eq!(refusal_code(valid), None);
        assert_eq!(refusal_code("not json"), Some("bad_request"));
        assert_eq!(refusal_code("[1,2]"), Some("bad_request"));
        assert_eq!(
            refusal_code(r#"{"paymentMethod":"pm_sandbox_approve","currency":"AUD"}"#),
            Some("bad_request")
        );
        assert_eq!(
            refusal_code(
                r#"{"paymentMethod":"pm_nope","amountCents":0,"currency":"USD","description":7}"#
            ),
            Some("bad_request")
        );
        assert_eq!(
            refusal_code(r#"{"paymentMethod":"pm_nope","amountCents":0,"currency":"USD"}"#),
            Some("invalid_amount")
        );
        assert_eq!(
            refusal_code(r#"{"paymentMethod":"pm_nope","amountCents":22.5,"currency":"AUD"}"#),
            Some("invalid_amount")
        );
        assert_eq!(
            refusal_code(r#"{"paymentMethod":"pm_nope","amountCents":1000000,"currency":"aud"}"#),
            Some("invalid_currency")
        );
        assert_eq!(
            refusal_code(r#"{"paymentMethod":"pm_nope","amountCents":1,"currency":"AUD"}"#),
            Some("invalid_payment_method")
        );
        let long_description = format!(
            r#"{{"paymentMethod":"pm_sandbox_approve","amountCents":1,"currency":"AUD","description":"{}"}}"#,
            "é".repeat(501)
        );
        assert_eq!(refusal_code(&long_description), Some("bad_request"));
    }

    #[test]
    fn a_key_answers_its_first_outcome_again_and_refuses_a_different_request() {
        let mut book = PaymentBook::default();
        let now = Utc::now();
        let ChargeAttempt::Charged { charge, body, .. } = book.attempt_charge(
            key("a"),
            request("pm_sandbox_decline", 500),
            now,
            &mut NamespaceRandom::from_entropy(),
        ) else {
            panic!("the first attempt charges");
        };
        assert_eq!(charge.status, ChargeStatus::Declined);
        assert_eq!(body["error"]["chargeId"], charge.id);

        let ChargeAttempt::Replayed {
            status,
            body: replayed,
        } = book.attempt_charge(
            key("a"),
            request("pm_sandbox_decline", 500),
            now,
            &mut NamespaceRandom::from_entropy(),
        )
        else {
            panic!("the same request replays");
        };
        assert_eq!(status, StatusCode::PAYMENT_REQUIRED);
        assert_eq!(replayed, body);
        assert!(matches!(
            book.attempt_charge(
                key("a"),
                request("pm_sandbox_decline", 501),
                now,
                &mut NamespaceRandom::from_entropy()
            ),
            ChargeAttempt::KeyReused
        ));
        assert_eq!(book.charges().len(), 1);
    }

    #[test]
    fn the_flaky_card_fails_only_the_first_attempt_of_each_key() {
        let mut book = PaymentBook::default();
        let now = Utc::now();
        let flaky = || request("pm_sandbox_flaky", 2200);
        assert!(matches!(
            book.attempt_charge(key("a"), flaky(), now, &mut NamespaceRandom::from_entropy()),
            ChargeAttempt::ProcessingFailed
        ));
        assert!(book.charges().is_empty());
        assert!(matches!(
            book.attempt_charge(key("a"), flaky(), now, &mut NamespaceRandom::from_entropy()),
            ChargeAttempt::Charged { .. }
        ));
        assert!(matches!(
            book.attempt_charge(key("b"), flaky(), now, &mut NamespaceRandom::from_entropy()),
            ChargeAttempt::ProcessingFailed
        ));
        assert_eq!(book.charges().len(), 1);
    }
}
