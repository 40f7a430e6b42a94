//! The emulated providers, and how each one shapes an error on the wire; and the services
//! faults can be injected into (the providers and the payment gateway).
//!
//! Argus answers `{"error":{"code","message"}}`; ReferralNet answers
//! `{"fault":{"faultCode","faultString"}}`. Both borrow their codes from the SMD standard's
//! vocabulary (ATS 5822 StandardError). The payment gateway has its own vocabulary, in
//! `payments`.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// One of the providers the sandbox emulates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Provider {
    Argus,
    ReferralNet,
}

impl Provider {
    /// The provider's name as it appears in control URLs and bodies.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Provider::Argus => "argus",
            Provider::ReferralNet => "referralnet",
        }
    }

    /// Parses the lowercase name used in control URLs and bodies.
    pub(crate) fn parse(name: &str) -> Option<Provider> {
        match name {
            "argus" => Some(Provider::Argus),
            "referralnet" => Some(Provider::ReferralNet),
            _ => None,
        }
    }
}

/// One of the services the sandbox emulates: an SMD provider or the payment gateway. Faults are
/// injected per service, named `provider` on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Service {
    Argus,
    ReferralNet,
    Payments,
}

impl Service {
    /// The service's name as it appears in control bodies.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Service::Argus => "argus",
            Service::ReferralNet => "referralnet",
            Service::Payments => "payments",
        }
    }
}

impl From<Provider> for Service {
    fn from(provider: Provider) -> Service {
        match provider {
            Provider::Argus => Service::Argus,
            Provider::ReferralNet => Service::ReferralNet,
        }
    }
}

/// The standard error words the sandbox answers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ProviderErrorCode {
    BadParam,
    InvalidPromoCode,
    Duplicate,
    InvalidCredentials,
    NotAuthorised,
    TokenExpired,
    ServiceTemporaryUnavailable,
    NotFound,
    BadlyFormedMsg,
    UnknownEndpoint,
    UnknownRecipient,
}

impl ProviderErrorCode {
    /// The word as it appears on the wire.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ProviderErrorCode::BadParam => "badParam",
            ProviderErrorCode::InvalidPromoCode => "invalidPromoCode",
            ProviderErrorCode::Duplicate => "duplicate",
            ProviderErrorCode::InvalidCredentials => "invalidCredentials",
            ProviderErrorCode::NotAuthorised => "notAuthorised",
            ProviderErrorCode::TokenExpired => "tokenExpired",
            ProviderErrorCode::ServiceTemporaryUnavailable => "serviceTemporaryUnavailable",
            ProviderErrorCode::NotFound => "notFound",
            ProviderErrorCode::BadlyFormedMsg => "badlyFormedMsg",
            ProviderErrorCode::UnknownEndpoint => "unknownEndpoint",
            ProviderErrorCode::UnknownRecipient => "unknownRecipient",
        }
    }
}

/// An error answer in the shape of one provider's protocol.
#[derive(Debug)]
pub(crate) struct ProviderError {
    pub(crate) provider: Provider,
    pub(crate) status: StatusCode,
    pub(crate) code: ProviderErrorCode,
    pub(crate) message: String,
}

impl ProviderError {
    pub(crate) fn new(
        provider: Provider,
        status: StatusCode,
        code: ProviderErrorCode,
        message: impl Into<String>,
    ) -> ProviderError {
        ProviderError {
            provider,
            status,
            code,
            message: message.into(),
        }
    }

    /// The JSON body this error is sent with.
    pub(crate) fn body(&self) -> serde_json::Value {
        match self.provider {
            Provider::Argus => json!({
                "error": { "code": self.code.as_str(), "message": self.message }
            }),
            Provider::ReferralNet => json!({
                "fault": { "faultCode": self.code.as_str(), "faultString": self.message }
            }),
        }
    }
}

impl IntoResponse for ProviderError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        // Argus answers every failed credential check with its Basic challenge.
        if self.provider == Provider::Argus && self.code == ProviderErrorCode::InvalidCredentials {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(r#"Basic realm="argus""#),
            );
        }
        response
    }
}
