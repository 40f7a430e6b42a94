//! The payment gateway: charge the practice's stored card token, with an idempotency key so a
//! retried charge is never taken twice. One HTTP adapter (the sandbox's Stripe-like API).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};

use super::http::{Calls, build_client, dispatch, endpoint, path_segment, read_json};
use super::{CallObserver, ProviderError, Route, Unavailability, Upstream};

/// A card as the gateway may show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardSummary {
    /// Brand (visa, mastercard, …).
    pub brand: String,
    /// Last four digits.
    pub last4: String,
    /// Expiry month.
    pub exp_month: i32,
    /// Expiry year.
    pub exp_year: i32,
}

/// One charge to make.
#[derive(Debug, Clone)]
pub struct ChargeRequest<'a> {
    /// The stored payment-method token.
    pub token: &'a str,
    /// Amount in cents (AUD, GST included).
    pub amount_cents: i64,
    /// Makes retries safe: the same key never charges twice.
    pub idempotency_key: &'a str,
    /// Shown on the practice's statement.
    pub description: &'a str,
}

/// A definitive answer to a charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeOutcome {
    /// Money taken.
    Succeeded {
        /// The gateway's charge id.
        charge_id: String,
    },
    /// The card was declined; nothing taken.
    Declined {
        /// The gateway's charge id, when it recorded one.
        charge_id: Option<String>,
        /// The decline code.
        code: String,
    },
}

/// What the payment gateway offers.
#[async_trait]
pub trait PaymentGateway: Send + Sync + 'static {
    /// Looks a payment-method token up (to validate it and show its masked form).
    /// `Refused` with `invalid_payment_method` when it does not exist.
    async fn describe(&self, token: &str) -> Result<CardSummary, ProviderError>;

    /// Charges a token. `Unavailable` means the outcome is unknown: retry with the same key.
    async fn charge(&self, request: &ChargeRequest<'_>) -> Result<ChargeOutcome, ProviderError>;
}

/// The HTTP adapter.
pub struct HttpPaymentGateway {
    client: reqwest::Client,
    base_url: String,
    api_key: String,
    calls: Calls,
}

impl HttpPaymentGateway {
    /// An adapter for the payment API at `base_url`.
    pub fn new(base_url: &str, api_key: &str, timeout: Duration) -> anyhow::Result<Self> {
        Ok(Self {
            client: build_client(timeout)?,
            base_url: base_url.to_owned(),
            api_key: api_key.to_owned(),
            calls: Calls::new(Upstream::Payments),
        })
    }

    /// Reports every call to `observer` (metrics).
    pub fn observed_by(self, observer: Arc<dyn CallObserver>) -> Self {
        Self {
            calls: self.calls.observed_by(observer),
            ..self
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MethodBody {
    brand: String,
    last4: String,
    exp_month: i32,
    exp_year: i32,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ChargeBody<'a> {
    payment_method: &'a str,
    amount_cents: i64,
    currency: &'static str,
    description: &'a str,
}

#[derive(Deserialize)]
struct ChargeResponse {
    id: String,
    status: String,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ErrorDetail {
    code: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    charge_id: Option<String>,
}

async fn refusal(response: reqwest::Response) -> ProviderError {
    match read_json::<ErrorBody>(response).await {
        Ok(body) => ProviderError::Refused {
            code: body.error.code,
            message: body.error.message,
        },
        Err(error) => error,
    }
}

#[async_trait]
impl PaymentGateway for HttpPaymentGateway {
    async fn describe(&self, token: &str) -> Result<CardSummary, ProviderError> {
        // The domain only passes tokens of a strict grammar; the path is escaped regardless.
        let response = dispatch(
            &self.calls,
            Route::PaymentMethod,
            self.client
                .get(endpoint(
                    &self.base_url,
                    &format!("/payments/v1/payment-methods/{}", path_segment(token)?),
                ))
                .bearer_auth(&self.api_key),
        )
        .await?;
        match response.status() {
            StatusCode::OK => {
                let body: MethodBody = read_json(response).await?;
                Ok(CardSummary {
                    brand: body.brand,
                    last4: body.last4,
                    exp_month: body.exp_month,
                    exp_year: body.exp_year,
                })
            }
            StatusCode::UNAUTHORIZED => Err(ProviderError::Unavailable {
                kind: Unavailability::ServerError,
                reason: "payment gateway refused the API key".into(),
                retry_after: None,
            }),
            _ => Err(refusal(response).await),
        }
    }

    async fn charge(&self, request: &ChargeRequest<'_>) -> Result<ChargeOutcome, ProviderError> {
        let response = dispatch(
            &self.calls,
            Route::Charge,
            self.client
                .post(endpoint(&self.base_url, "/payments/v1/charges"))
                .bearer_auth(&self.api_key)
                .header("Idempotency-Key", request.idempotency_key)
                .json(&ChargeBody {
                    payment_method: request.token,
                    amount_cents: request.amount_cents,
                    currency: "AUD",
                    description: request.description,
                }),
        )
        .await?;
        match response.status() {
            StatusCode::OK | StatusCode::CREATED => {
                let body: ChargeResponse = read_json(response).await?;
                match body.status.as_str() {
                    "succeeded" => Ok(ChargeOutcome::Succeeded { charge_id: body.id }),
                    "declined" => Ok(ChargeOutcome::Declined {
                        charge_id: Some(body.id),
                        code: "card_declined".into(),
                    }),
                    other => Err(ProviderError::Unavailable {
                        kind: Unavailability::MalformedReply,
                        reason: format!("charge status {other:?}"),
                        retry_after: None,
                    }),
                }
            }
            // The same key with a different request: never a decline (money may have moved);
            // leave it unresolved so it is looked at, not recorded as failed.
            StatusCode::CONFLICT => Err(ProviderError::Unavailable {
                kind: Unavailability::ServerError,
                reason:
                    "payment gateway reports the idempotency key reused with a different request"
                        .into(),
                retry_after: None,
            }),
            StatusCode::PAYMENT_REQUIRED => {
                let body: ErrorBody = read_json(response).await?;
                Ok(ChargeOutcome::Declined {
                    charge_id: body.error.charge_id,
                    code: body.error.code,
                })
            }
            StatusCode::UNAUTHORIZED => Err(ProviderError::Unavailable {
                kind: Unavailability::ServerError,
                reason: "payment gateway refused the API key".into(),
                retry_after: None,
            }),
            _ => Err(refusal(response).await),
        }
    }
}

#[cfg(test)]
mod tests {
    use wiremock::matchers::{body_json, header, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    use super::*;
    use crate::providers::ProviderFailure;

    fn gateway(server: &MockServer, timeout: Duration) -> HttpPaymentGateway {
        crate::install_crypto_provider();
        HttpPaymentGateway::new(&server.uri(), "sk_sandbox_test", timeout).unwrap()
    }

    fn request() -> ChargeRequest<'static> {
        ChargeRequest {
            token: "pm_sandbox_approve",
            amount_cents: 2200,
            idempotency_key: "purchase-1",
            description: "100 credits",
        }
    }

    #[tokio::test]
    async fn a_charge_sends_the_key_the_amount_and_the_token() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/payments/v1/charges"))
            .and(header("idempotency-key", "purchase-1"))
            .and(header("authorization", "Bearer sk_sandbox_test"))
            .and(body_json(serde_json::json!({
                "paymentMethod": "pm_sandbox_approve", "amountCents": 2200, "currency": "AUD", "description": "100 credits"
            })))
            .respond_with(ResponseTemplate::new(201).set_body_json(serde_json::json!({"id": "ch_1", "status": "succeeded"})))
            .expect(1)
            .mount(&server)
            .await;
        let outcome = gateway(&server, Duration::from_secs(2))
            .charge(&request())
            .await
            .unwrap();
        assert_eq!(
            outcome,
            ChargeOutcome::Succeeded {
                charge_id: "ch_1".into()
            }
        );
    }

    #[tokio::test]
    async fn a_402_is_a_decline_not_an_error() {
        let server = MockServer::start().await;
        Mock::given(path("/payments/v1/charges"))
            .respond_with(ResponseTemplate::new(402).set_body_json(serde_json::json!({
                "error": {"code": "card_declined", "message": "no", "chargeId": "ch_2"}
            })))
            .mount(&server)
            .await;
        let outcome = gateway(&server, Duration::from_secs(2))
            .charge(&request())
            .await
            .unwrap();
        assert_eq!(
            outcome,
            ChargeOutcome::Declined {
                charge_id: Some("ch_2".into()),
                code: "card_declined".into()
            }
        );
    }

    #[tokio::test]
    async fn a_5xx_or_a_timeout_leaves_the_outcome_unknown() {
        let server = MockServer::start().await;
        Mock::given(path("/payments/v1/charges"))
            .respond_with(ResponseTemplate::new(503))
            .mount(&server)
            .await;
        let error = gateway(&server, Duration::from_secs(2))
            .charge(&request())
            .await
            .unwrap_err();
        assert!(matches!(error, ProviderError::Unavailable { .. }));

        let slow = MockServer::start().await;
        Mock::given(path("/payments/v1/charges"))
            .respond_with(ResponseTemplate::new(201).set_delay(Duration::from_secs(5)))
            .mount(&slow)
            .await;
        let error = gateway(&slow, Duration::from_millis(200))
            .charge(&request())
            .await
            .unwrap_err();
        assert!(error.failure() == ProviderFailure::Timeout);
    }

    #[tokio::test]
    async fn a_malformed_charge_body_leaves_the_outcome_unknown() {
        let server = MockServer::start().await;
        Mock::given(path("/payments/v1/charges"))
            .respond_with(ResponseTemplate::new(201).set_body_string("{\"id\":"))
            .mount(&server)
            .await;
        let error = gateway(&server, Duration::from_secs(2))
            .charge(&request())
            .await
            .unwrap_err();
        assert!(matches!(error, ProviderError::Unavailable { .. }));
    }

    #[tokio::test]
    async fn a_hostile_token_stays_inside_one_escaped_path_segment() {
        let server = MockServer::start().await;
        // Only the exact escaped segment is answered; any other path (a charge, a listing, a
        // climb out of /payment-methods) would hit the catch-all and fail the test.
        for (token, escaped) in [
            ("../charges", "%2E%2E%2Fcharges"),
            ("%2e%2e", "%252e%252e"),
            ("pm_x?refund=1#frag", "pm_x%3Frefund%3D1%23frag"),
            (
                "pm_x/../../v1/charges",
                "pm_x%2F%2E%2E%2F%2E%2E%2Fv1%2Fcharges",
            ),
        ] {
            Mock::given(method("GET"))
                .and(path(format!("/payments/v1/payment-methods/{escaped}")))
                .respond_with(ResponseTemplate::new(404).set_body_json(serde_json::json!({
                    "error": {"code": "invalid_payment_method", "message": "no such token"}
                })))
                .expect(1)
                .named(token)
                .mount(&server)
                .await;
        }
        Mock::given(wiremock::matchers::any())
            .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
                "brand": "visa", "last4": "4242", "expMonth": 12, "expYear": 2030
            })))
            .expect(0)
            .named("any other request")
            .mount(&server)
            .await;
        let gateway = gateway(&server, Duration::from_secs(2));
        for token in [
            "../charges",
            "%2e%2e",
            "..",
            ".",
            "",
            "pm_x?refund=1#frag",
            "pm_x/../../v1/charges",
        ] {
            let error = gateway.describe(token).await.unwrap_err();
            assert!(
                matches!(error, ProviderError::Refused { .. }),
                "{token}: {error:?}"
            );
        }
        let requests = server.received_requests().await.unwrap();
        assert_eq!(requests.len(), 4, "., .. and the empty token never leave");
        for request in &requests {
            assert!(request.url.query().is_none(), "{}", request.url);
            assert!(request.url.fragment().is_none(), "{}", request.url);
            assert_eq!(
                request.url.path_segments().unwrap().count(),
                4,
                "{}",
                request.url
            );
        }
    }

    #[tokio::test]
    async fn a_transport_failure_does_not_carry_the_url_with_the_token() {
        // Nothing listens on port 9 of loopback (discard); the connection is refused.
        crate::install_crypto_provider();
        let gateway = HttpPaymentGateway::new(
            "http://127.0.0.1:9",
            "sk_sandbox_test",
            Duration::from_secs(2),
        )
        .unwrap();
        let error = gateway.describe("pm_secret_token").await.unwrap_err();
        assert!(
            !format!("{error} {error:?}").contains("pm_secret_token"),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn an_unknown_token_is_refused() {
        let server = MockServer::start().await;
        Mock::given(path("/payments/v1/payment-methods/pm_nope"))
            .respond_with(ResponseTemplate::new(404).set_body_json(serde_json::json!({
                "error": {"code": "invalid_payment_method", "message": "no such token"}
            })))
            .mount(&server)
            .await;
        let error = gateway(&server, Duration::from_secs(2))
            .describe("pm_nope")
            .await
            .unwrap_err();
        assert!(
            matches!(error, ProviderError::Refused { ref code, .. } if code == "invalid_payment_method")
        );
    }
}
