//! The ReferralNet emulator's accounts area, under `/referralnet/api`: session login for a bearer
//! token that expires after 15 sandbox minutes, enrolment with a promotion code, and the
//! account's enrolment state (messaging is in `referralnet_messaging`). Errors are `{"fault":{"faultCode","faultString"}}`.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Duration, SubsecRound, Utc};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::accounts::{
    Account, AccountStatus, NewRegistration, RegistrationError, RegistrationFieldNames,
    RegistrationForm,
};
use crate::faults::FaultRoute;
use crate::namespace::{CurrentNamespace, NamespaceState, SandboxState};
use crate::provider::{Provider, ProviderError, ProviderErrorCode};
use crate::random::NamespaceRandom;

/// How long a session token stays valid, in sandbox time.
const SESSION_LIFETIME_MINUTES: i64 = 15;

/// How long an expired session is kept (so it can still answer `tokenExpired`) before it is
/// forgotten.
const EXPIRED_SESSION_RETENTION_DAYS: i64 = 30;

const FIELD_NAMES: RegistrationFieldNames = RegistrationFieldNames {
    username: "userId",
    password: "password",
    promo_code: "promotionCode",
    practice_name: "organisationName",
    contact_email: "email",
};

/// The ReferralNet routes.
pub(crate) fn routes() -> Router<SandboxState> {
    Router::new()
        .route("/referralnet/api/sessions", post(log_in))
        .route("/referralnet/api/enrolments", post(enrol))
        .route("/referralnet/api/account", get(read_account))
}

/// One logged-in session.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Session {
    user_id: String,
    expires_at: DateTime<Utc>,
}

/// The sessions of one namespace, keyed by the SHA-256 of their token (lowercase hex): the
/// token itself is never kept, so a state file cannot give a session away.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub(crate) struct SessionBook {
    sessions: BTreeMap<String, Session>,
}

/// The key a session is kept under: SHA-256 of its token, lowercase hex. A token holds 256
/// random bits, so a plain hash cannot be reversed by guessing.
fn token_digest(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .fold(String::with_capacity(64), |mut hex, byte| {
            use std::fmt::Write as _;
            write!(hex, "{byte:02x}").expect("writing to a string cannot fail");
            hex
        })
}

impl SessionBook {
    fn start(
        &mut self,
        user_id: &str,
        now: DateTime<Utc>,
        random: &mut NamespaceRandom,
    ) -> (String, DateTime<Utc>) {
        // Expired sessions are dropped only long after expiry, so a client holding one still
        // learns that it expired rather than that it was never valid.
        self.sessions.retain(|_, session| {
            session.expires_at + Duration::days(EXPIRED_SESSION_RETENTION_DAYS) > now
        });
        let mut token_bytes = [0_u8; 32];
        random.next_generator().fill_bytes(&mut token_bytes);
        let token = URL_SAFE_NO_PAD.encode(token_bytes);
        let expires_at = now.trunc_subsecs(0) + Duration::minutes(SESSION_LIFETIME_MINUTES);
        self.sessions.insert(
            token_digest(&token),
            Session {
                user_id: user_id.to_owned(),
                expires_at,
            },
        );
        (token, expires_at)
    }

    fn find(&self, token: &str) -> Option<&Session> {
        self.sessions.get(&token_digest(token))
    }
}

pub(crate) fn fault(
    status: StatusCode,
    code: ProviderErrorCode,
    message: impl Into<String>,
) -> Response {
    ProviderError::new(Provider::ReferralNet, status, code, message).into_response()
}

/// The 403 `notAuthorised` fault for a suspended enrolment's account read.
fn suspended(user_id: &str) -> Response {
    fault(
        StatusCode::FORBIDDEN,
        ProviderErrorCode::NotAuthorised,
        format!("enrolment {user_id:?} is suspended by ReferralNet"),
    )
}

/// The 422 `badParam` fault for a body that is not the JSON a route expects.
fn body_not_understood(error: serde_json::Error) -> Response {
    fault(
        StatusCode::UNPROCESSABLE_ENTITY,
        ProviderErrorCode::BadParam,
        format!("body is not the expected JSON: {error}"),
    )
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LoginBody {
    user_id: Option<String>,
    password: Option<String>,
}

/// `POST /referralnet/api/sessions`: a session token for any enrolment, pending and declined
/// ones included, so their state can be read.
async fn log_in(namespace: CurrentNamespace, body: Bytes) -> Response {
    if let Some(fault) = namespace.take_fault(Provider::ReferralNet, FaultRoute::Sessions) {
        return fault.respond().await;
    }
    let login: LoginBody = match serde_json::from_slice(&body) {
        Ok(login) => login,
        Err(error) => return body_not_understood(error),
    };
    let (Some(user_id), Some(password)) = (login.user_id, login.password) else {
        return fault(
            StatusCode::UNPROCESSABLE_ENTITY,
            ProviderErrorCode::BadParam,
            "userId and password are required",
        );
    };
    let session = namespace.with_state(|state| {
        state
            .accounts(Provider::ReferralNet)
            .authenticate(&user_id, &password)?;
        let now = state.clock.now();
        Some(
            state
                .referralnet_sessions
                .start(&user_id, now, &mut state.random),
        )
    });
    match session {
        Some((session_token, expires_at)) => {
            tracing::info!(
                namespace = namespace.name(),
                user_id,
                "referralnet session started"
            );
            Json(json!({ "sessionToken": session_token, "expiresAt": expires_at })).into_response()
        }
        None => fault(
            StatusCode::UNAUTHORIZED,
            ProviderErrorCode::InvalidCredentials,
            "userId or password is incorrect",
        ),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EnrolmentBody {
    user_id: Option<String>,
    password: Option<String>,
    promotion_code: Option<String>,
    organisation_name: Option<String>,
    email: Option<String>,
}

/// `POST /referralnet/api/enrolments`: a pending enrolment, decided 3–4 sandbox days later.
async fn enrol(namespace: CurrentNamespace, body: Bytes) -> Response {
    if let Some(fault) = namespace.take_fault(Provider::ReferralNet, FaultRoute::Enrolments) {
        return fault.respond().await;
    }
    let enrolment: EnrolmentBody = match serde_json::from_slice(&body) {
        Ok(enrolment) => enrolment,
        Err(error) => return body_not_understood(error),
    };
    let form = RegistrationForm {
        username: enrolment.user_id,
        password: enrolment.password,
        promo_code: enrolment.promotion_code,
        practice_name: enrolment.organisation_name,
        contact_email: enrolment.email,
    };
    let registered = NewRegistration::parse(form, &FIELD_NAMES).and_then(|registration| {
        namespace.with_state(|state| state.register(Provider::ReferralNet, registration))
    });
    match registered {
        Ok(account) => {
            tracing::info!(
                namespace = namespace.name(),
                user_id = account.username,
                decides_at = %account.decides_at,
                "referralnet enrolment received"
            );
            (
                StatusCode::ACCEPTED,
                Json(json!({
                    "enrolmentId": account.registration_id.to_string(),
                    "userId": account.username,
                    "state": "PENDING",
                })),
            )
                .into_response()
        }
        Err(error) => {
            let status = match error {
                RegistrationError::Duplicate(_) => StatusCode::CONFLICT,
                RegistrationError::BadParam(_) | RegistrationError::InvalidPromoCode => {
                    StatusCode::UNPROCESSABLE_ENTITY
                }
            };
            fault(status, error.provider_error_code(), error.to_string())
        }
    }
}

/// The token of an `Authorization: Bearer …` header.
pub(crate) fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The account behind a session token, in any enrolment state; else the 401 fault to answer:
/// `tokenExpired` for a token past its expiry on the sandbox clock, `notAuthorised` for a
/// missing or unknown one.
pub(crate) fn session_account<'state>(
    state: &'state NamespaceState,
    token: Option<&str>,
) -> Result<&'state Account, ProviderError> {
    let unauthorised = |code, message: String| {
        ProviderError::new(
            Provider::ReferralNet,
            StatusCode::UNAUTHORIZED,
            code,
            message,
        )
    };
    let not_recognised = || {
        unauthorised(
            ProviderErrorCode::NotAuthorised,
            "session token is not recognised; log in again".to_owned(),
        )
    };
    let Some(token) = token else {
        return Err(unauthorised(
            ProviderErrorCode::NotAuthorised,
            "a session token is required: Authorization: Bearer <sessionToken>".to_owned(),
        ));
    };
    let session = state
        .referralnet_sessions
        .find(token)
        .ok_or_else(not_recognised)?;
    if state.clock.now() >= session.expires_at {
        return Err(unauthorised(
            ProviderErrorCode::TokenExpired,
            format!(
                "session token expired at {}; log in again",
                session.expires_at.to_rfc3339()
            ),
        ));
    }
    state
        .accounts(Provider::ReferralNet)
        .get(&session.user_id)
        .ok_or_else(not_recognised)
}

/// `GET /referralnet/api/account`: the enrolment behind a session token.
async fn read_account(namespace: CurrentNamespace, headers: HeaderMap) -> Response {
    if let Some(fault) = namespace.take_fault(Provider::ReferralNet, FaultRoute::Account) {
        return fault.respond().await;
    }
    let token = bearer_token(&headers);
    namespace.with_state(|state| {
        let now = state.clock.now();
        let account = match session_account(state, token) {
            Ok(account) => account,
            Err(refusal) => return refusal.into_response(),
        };
        let enrolment_state = match account.status_at(now) {
            AccountStatus::Pending => "PENDING",
            AccountStatus::Active => "APPROVED",
            AccountStatus::Rejected => "DECLINED",
            AccountStatus::Suspended => return suspended(&account.username),
        };
        Json(json!({
            "userId": account.username,
            "enrolmentState": enrolment_state,
            "organisationName": account.practice_name,
        }))
        .into_response()
    })
}
