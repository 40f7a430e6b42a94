//! The only way a domain error reaches a client. [`ApiError`] has no `Display`, so the blanket
//! `From<Display>` of async-graphql (which would copy internal text into the response) cannot
//! apply to it; resolvers return `Result<T, ApiError>` and `?` converts domain errors here.

use crate::domain::GatewayError;

/// A client-facing error: one of the `extensions.code` values the README lists and a
/// sentence a person can act on.
#[derive(Clone, Debug)]
pub struct ApiError {
    code: &'static str,
    message: String,
    retry_after_seconds: Option<u64>,
}

impl ApiError {
    pub(crate) fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after_seconds: None,
        }
    }

    pub(crate) fn bad_input(message: impl Into<String>) -> Self {
        Self::new("BAD_USER_INPUT", message)
    }

    pub(crate) fn unauthenticated() -> Self {
        Self::new(
            "UNAUTHENTICATED",
            "send a valid bearer token in the Authorization header (or in connection_init for subscriptions)",
        )
    }

    /// The `extensions.code`.
    pub fn code(&self) -> &'static str {
        self.code
    }
}

/// How a response ended, for logs and metrics: `OK`, or the first error's `extensions.code`
/// (`INTERNAL_SERVER_ERROR` when it has none, which [`crate::http::fill_error_codes`] prevents).
pub(crate) fn outcome_code(response: &async_graphql::Response) -> &str {
    let Some(error) = response.errors.first() else {
        return "OK";
    };
    match error
        .extensions
        .as_ref()
        .and_then(|extensions| extensions.get("code"))
    {
        Some(async_graphql::Value::String(code)) => code,
        _ => "INTERNAL_SERVER_ERROR",
    }
}

impl From<GatewayError> for ApiError {
    fn from(error: GatewayError) -> Self {
        match error {
            GatewayError::Unauthenticated(message) => Self::new("UNAUTHENTICATED", message),
            GatewayError::Forbidden(message) => Self::new("FORBIDDEN", message),
            GatewayError::BadUserInput(message) => Self::new("BAD_USER_INPUT", message),
            GatewayError::NotFound(message) => Self::new("NOT_FOUND", message),
            GatewayError::Conflict(message) => Self::new("CONFLICT", message),
            GatewayError::IntegrationNotActive(message) => {
                Self::new("INTEGRATION_NOT_ACTIVE", message)
            }
            GatewayError::ProviderRejected(message) => Self::new("PROVIDER_REJECTED", message),
            GatewayError::ProviderUnavailable {
                provider,
                retry_after,
            } => Self {
                code: "PROVIDER_UNAVAILABLE",
                message: format!(
                    "{provider} is not responding properly right now and nothing was saved; try again in a minute"
                ),
                retry_after_seconds: retry_after.map(|delay| delay.as_secs()),
            },
            GatewayError::RateLimited {
                message,
                retry_after,
            } => Self {
                code: "RATE_LIMITED",
                message,
                retry_after_seconds: Some(retry_after.as_secs()),
            },
            GatewayError::PaymentDeclined(message) => Self::new("PAYMENT_DECLINED", message),
            GatewayError::PaymentUnavailable { retry_after } => Self {
                code: "PROVIDER_UNAVAILABLE",
                message: "the payment gateway did not confirm the payment; it is retried automatically with the same key and will never be charged twice — check your credits shortly".into(),
                retry_after_seconds: retry_after.map(|delay| delay.as_secs()),
            },
            GatewayError::InsufficientCredits(message) => Self::new("INSUFFICIENT_CREDITS", message),
            GatewayError::SpendingLimitReached(message) => {
                Self::new("SPENDING_LIMIT_REACHED", message)
            }
            GatewayError::RecipientNotReachable(message) => Self::new("RECIPIENT_NOT_REACHABLE", message),
            GatewayError::Internal(error) => {
                tracing::error!(error = ?error, "internal error");
                Self::new(
                    "INTERNAL_SERVER_ERROR",
                    "something went wrong on our side; it has been logged — try again later",
                )
            }
        }
    }
}

impl From<ApiError> for async_graphql::Error {
    fn from(error: ApiError) -> Self {
        use async_graphql::ErrorExtensions;
        let mut graphql_error = async_graphql::Error::new(error.message);
        let code = error.code;
        let retry_after = error.retry_after_seconds;
        graphql_error = graphql_error.extend_with(|_, extensions| {
            extensions.set("code", code);
            if let Some(seconds) = retry_after {
                extensions.set("retryAfterSeconds", seconds);
            }
        });
        graphql_error
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::domain::types::Provider;

    fn code_of(error: GatewayError) -> &'static str {
        ApiError::from(error).code
    }

    #[test]
    fn every_kind_has_its_documented_code() {
        assert_eq!(
            code_of(GatewayError::Unauthenticated("x".into())),
            "UNAUTHENTICATED"
        );
        assert_eq!(code_of(GatewayError::Forbidden("x".into())), "FORBIDDEN");
        assert_eq!(
            code_of(GatewayError::BadUserInput("x".into())),
            "BAD_USER_INPUT"
        );
        assert_eq!(code_of(GatewayError::NotFound("x".into())), "NOT_FOUND");
        assert_eq!(code_of(GatewayError::Conflict("x".into())), "CONFLICT");
        assert_eq!(
            code_of(GatewayError::IntegrationNotActive("x".into())),
            "INTEGRATION_NOT_ACTIVE"
        );
        assert_eq!(
            code_of(GatewayError::ProviderRejected("x".into())),
            "PROVIDER_REJECTED"
        );
        assert_eq!(
            code_of(GatewayError::ProviderUnavailable {
                provider: Provider::Argus,
                retry_after: None
            }),
            "PROVIDER_UNAVAILABLE"
        );
        assert_eq!(
            code_of(GatewayError::SpendingLimitReached("x".into())),
            "SPENDING_LIMIT_REACHED"
        );
        assert_eq!(
            code_of(GatewayError::RateLimited {
                message: "x".into(),
                retry_after: Duration::from_secs(1)
            }),
            "RATE_LIMITED"
        );
    }

    #[test]
    fn internal_errors_do_not_leak_their_text() {
        let error = ApiError::from(GatewayError::internal(anyhow::anyhow!(
            "UNIQUE constraint failed: users.secret"
        )));
        assert_eq!(error.code, "INTERNAL_SERVER_ERROR");
        assert!(!error.message.contains("UNIQUE"));
        let graphql_error: async_graphql::Error = error.into();
        assert!(!graphql_error.message.contains("users"));
    }
}
