//! The Argus emulator's accounts area, under `/argus/v1`: registration with a promo code, and
//! the account read that doubles as the credential check (messaging is in `argus_messaging`). Authenticated calls carry HTTP Basic
//! credentials every time. Errors are `{"error":{"code","message"}}`.

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;
use serde_json::json;

use crate::accounts::{
    AccountStatus, NewRegistration, RegistrationError, RegistrationFieldNames, RegistrationForm,
};
use crate::faults::FaultRoute;
use crate::namespace::{CurrentNamespace, SandboxState};
use crate::provider::{Provider, ProviderError, ProviderErrorCode};

const FIELD_NAMES: RegistrationFieldNames = RegistrationFieldNames {
    username: "username",
    password: "password",
    promo_code: "promoCode",
    practice_name: "practiceName",
    contact_email: "contactEmail",
};

/// The Argus routes.
pub(crate) fn routes() -> Router<SandboxState> {
    Router::new()
        .route("/argus/v1/registrations", post(register))
        .route("/argus/v1/account", get(read_account))
}

fn error(status: StatusCode, code: ProviderErrorCode, message: impl Into<String>) -> Response {
    ProviderError::new(Provider::Argus, status, code, message).into_response()
}

/// The 401 Argus gives for any failed credential check (`ProviderError` adds its Basic
/// challenge).
fn invalid_credentials(message: &str) -> Response {
    error(
        StatusCode::UNAUTHORIZED,
        ProviderErrorCode::InvalidCredentials,
        message,
    )
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RegistrationBody {
    username: Option<String>,
    password: Option<String>,
    promo_code: Option<String>,
    practice_name: Option<String>,
    contact_email: Option<String>,
}

/// `POST /argus/v1/registrations`: a pending account, decided 3–4 sandbox days later.
async fn register(namespace: CurrentNamespace, body: Bytes) -> Response {
    if let Some(fault) = namespace.take_fault(Provider::Argus, FaultRoute::Registrations) {
        return fault.respond().await;
    }
    let body: RegistrationBody = match serde_json::from_slice(&body) {
        Ok(body) => body,
        Err(parse_error) => {
            return error(
                StatusCode::BAD_REQUEST,
                ProviderErrorCode::BadParam,
                format!("body is not the expected JSON: {parse_error}"),
            );
        }
    };
    let form = RegistrationForm {
        username: body.username,
        password: body.password,
        promo_code: body.promo_code,
        practice_name: body.practice_name,
        contact_email: body.contact_email,
    };
    let registered = NewRegistration::parse(form, &FIELD_NAMES).and_then(|registration| {
        namespace.with_state(|state| state.register(Provider::Argus, registration))
    });
    match registered {
        Ok(account) => {
            tracing::info!(
                namespace = namespace.name(),
                username = account.username,
                decides_at = %account.decides_at,
                "argus registration received"
            );
            (
                StatusCode::CREATED,
                Json(json!({
                    "username": account.username,
                    "status": "PENDING",
                    "registeredAt": account.registered_at,
                })),
            )
                .into_response()
        }
        Err(refusal) => {
            let status = match refusal {
                RegistrationError::Duplicate(_) => StatusCode::CONFLICT,
                RegistrationError::BadParam(_) | RegistrationError::InvalidPromoCode => {
                    StatusCode::BAD_REQUEST
                }
            };
            error(status, refusal.provider_error_code(), refusal.to_string())
        }
    }
}

/// The username and password of an `Authorization: Basic …` header.
pub(crate) fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (username, password) = decoded.split_once(':')?;
    Some((username.to_owned(), password.to_owned()))
}

/// `GET /argus/v1/account`: the account of the Basic credentials, in any status.
async fn read_account(namespace: CurrentNamespace, headers: HeaderMap) -> Response {
    if let Some(fault) = namespace.take_fault(Provider::Argus, FaultRoute::Account) {
        return fault.respond().await;
    }
    let Some((username, password)) = basic_credentials(&headers) else {
        return invalid_credentials(
            "authentication required: HTTP Basic with your Argus username and password",
        );
    };
    namespace.with_state(|state| {
        let Some(account) = state
            .accounts(Provider::Argus)
            .authenticate(&username, &password)
        else {
            return invalid_credentials("username or password is incorrect");
        };
        let now = state.clock.now();
        if account.status_at(now) == AccountStatus::Suspended {
            return error(
                StatusCode::FORBIDDEN,
                ProviderErrorCode::NotAuthorised,
                format!("account {:?} is suspended by Argus", account.username),
            );
        }
        Json(json!({
            "username": account.username,
            "status": account.status_at(now),
            "practiceName": account.practice_name,
            "registeredAt": account.registered_at,
            "decidedAt": account.decided_at(now),
        }))
        .into_response()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn basic_credentials_are_read_from_the_authorization_header() {
        let mut headers = HeaderMap::new();
        let encoded = STANDARD.encode("demo.argus:pass:with:colons");
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {encoded}")).unwrap(),
        );
        assert_eq!(
            basic_credentials(&headers),
            Some(("demo.argus".to_owned(), "pass:with:colons".to_owned()))
        );
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(basic_credentials(&headers), None);
    }
}
