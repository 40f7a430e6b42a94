//! Argus: JSON over HTTPS with HTTP Basic auth on every request.
//! Errors come as `{"error":{"code","message"}}` in the SMD standard's vocabulary.

use std::sync::Arc;

use async_trait::async_trait;
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};

use super::http::{Calls, dispatch, endpoint, path_segment, read_json};
use super::{
    AccountState, CallObserver, DeliveryState, DirectoryEntry, DirectoryPage, InboxItem,
    OutboundMessage, ProviderClient, ProviderError, Route, Unavailability, Upstream,
};
use crate::domain::types::{Provider, ProviderCredentials, Registration};

/// The Argus adapter.
pub struct ArgusClient {
    client: reqwest::Client,
    base_url: String,
    calls: Calls,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DirectoryBody {
    results: Vec<DirectoryResult>,
    total: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DirectoryResult {
    hpii: String,
    given_name: String,
    family_name: String,
    specialty: String,
    organisation: String,
    suburb: String,
    state: String,
    postcode: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SendBody {
    tracking_id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StatusBody {
    status: String,
    failure_reason: Option<String>,
}

#[derive(Deserialize)]
struct InboxBody {
    messages: Vec<InboxEntry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct InboxEntry {
    inbox_id: String,
    sender_hpii: String,
    sender_name: String,
    payload: String,
}

#[derive(Deserialize)]
struct AccountBody {
    status: String,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    code: String,
    #[serde(default)]
    message: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RegistrationBody<'a> {
    username: &'a str,
    password: &'a str,
    promo_code: &'a str,
    practice_name: &'a str,
    contact_email: &'a str,
}

impl ArgusClient {
    /// An adapter for the Argus API at `base_url`.
    pub fn new(client: reqwest::Client, base_url: &str) -> Self {
        Self {
            client,
            base_url: base_url.to_owned(),
            calls: Calls::new(Upstream::Argus),
        }
    }

    /// Reports every call to `observer` (metrics).
    pub fn observed_by(self, observer: Arc<dyn CallObserver>) -> Self {
        Self {
            calls: self.calls.observed_by(observer),
            ..self
        }
    }
}

fn state_from_word(status: &str) -> Result<AccountState, ProviderError> {
    match status {
        "ACTIVE" => Ok(AccountState::Active),
        "PENDING" => Ok(AccountState::Pending),
        "REJECTED" => Ok(AccountState::Rejected),
        other => Err(ProviderError::Unavailable {
            kind: Unavailability::MalformedReply,
            reason: format!("unknown account status {other:?}"),
            retry_after: None,
        }),
    }
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
impl ProviderClient for ArgusClient {
    fn provider(&self) -> Provider {
        Provider::Argus
    }

    async fn account_state(
        &self,
        credentials: &ProviderCredentials,
    ) -> Result<AccountState, ProviderError> {
        let response = dispatch(
            &self.calls,
            Route::Account,
            self.client
                .get(endpoint(&self.base_url, "/argus/v1/account"))
                .basic_auth(
                    credentials.username.as_str(),
                    Some(credentials.password.expose()),
                ),
        )
        .await?;
        match response.status() {
            StatusCode::OK => state_from_word(&read_json::<AccountBody>(response).await?.status),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                Err(ProviderError::InvalidCredentials)
            }
            _ => Err(refusal(response).await),
        }
    }

    async fn register(&self, registration: &Registration) -> Result<AccountState, ProviderError> {
        let body = RegistrationBody {
            username: registration.credentials.username.as_str(),
            password: registration.credentials.password.expose(),
            promo_code: registration.promo_code.as_str(),
            practice_name: registration.practice_name.as_str(),
            contact_email: registration.contact_email.as_str(),
        };
        let response = dispatch(
            &self.calls,
            Route::Registrations,
            self.client
                .post(endpoint(&self.base_url, "/argus/v1/registrations"))
                .json(&body),
        )
        .await?;
        match response.status() {
            StatusCode::CREATED | StatusCode::OK => {
                state_from_word(&read_json::<AccountBody>(response).await?.status)
            }
            StatusCode::CONFLICT => Err(ProviderError::Duplicate),
            _ => Err(refusal(response).await),
        }
    }

    async fn search_directory(
        &self,
        credentials: &ProviderCredentials,
        query: &str,
        offset: u64,
        limit: u64,
    ) -> Result<DirectoryPage, ProviderError> {
        let limit = limit.clamp(1, 50);
        let page = offset / limit + 1;
        let response = dispatch(
            &self.calls,
            Route::Directory,
            self.client
                .get(endpoint(&self.base_url, "/argus/v1/directory"))
                .basic_auth(
                    credentials.username.as_str(),
                    Some(credentials.password.expose()),
                )
                .query(&[
                    ("q", query.to_owned()),
                    ("page", page.to_string()),
                    ("pageSize", limit.to_string()),
                ]),
        )
        .await?;
        match response.status() {
            StatusCode::OK => {
                let body: DirectoryBody = read_json(response).await?;
                Ok(DirectoryPage {
                    total: body.total,
                    entries: body
                        .results
                        .into_iter()
                        .map(|entry| DirectoryEntry {
                            hpii: entry.hpii,
                            given_name: entry.given_name,
                            family_name: entry.family_name,
                            specialty: entry.specialty,
                            organisation: entry.organisation,
                            suburb: entry.suburb,
                            state: entry.state,
                            postcode: entry.postcode,
                        })
                        .collect(),
                })
            }
            StatusCode::UNAUTHORIZED => Err(ProviderError::InvalidCredentials),
            _ => Err(refusal(response).await),
        }
    }

    async fn send(
        &self,
        credentials: &ProviderCredentials,
        message: &OutboundMessage<'_>,
    ) -> Result<String, ProviderError> {
        use base64::Engine;
        let body = serde_json::json!({
            "clientMessageId": message.client_message_id,
            "recipientHpii": message.recipient_hpii,
            "payload": base64::engine::general_purpose::STANDARD.encode(message.payload),
        });
        let response = dispatch(
            &self.calls,
            Route::Send,
            self.client
                .post(endpoint(&self.base_url, "/argus/v1/messages"))
                .basic_auth(
                    credentials.username.as_str(),
                    Some(credentials.password.expose()),
                )
                .json(&body),
        )
        .await?;
        match response.status() {
            StatusCode::OK | StatusCode::ACCEPTED | StatusCode::CREATED => {
                Ok(read_json::<SendBody>(response).await?.tracking_id)
            }
            StatusCode::UNAUTHORIZED => Err(ProviderError::InvalidCredentials),
            _ => Err(refusal(response).await),
        }
    }

    async fn delivery_state(
        &self,
        credentials: &ProviderCredentials,
        reference: &str,
    ) -> Result<DeliveryState, ProviderError> {
        let response = dispatch(
            &self.calls,
            Route::Status,
            self.client
                .get(endpoint(
                    &self.base_url,
                    &format!("/argus/v1/messages/{}", path_segment(reference)?),
                ))
                .basic_auth(
                    credentials.username.as_str(),
                    Some(credentials.password.expose()),
                ),
        )
        .await?;
        match response.status() {
            StatusCode::OK => {
                let body: StatusBody = read_json(response).await?;
                Ok(match body.status.as_str() {
                    "ACCEPTED" => DeliveryState::Accepted,
                    "DELIVERED" => DeliveryState::Delivered,
                    "ACKNOWLEDGED" => DeliveryState::Acknowledged,
                    "FAILED" => DeliveryState::Failed(
                        body.failure_reason
                            .unwrap_or_else(|| "delivery failed".into()),
                    ),
                    other => {
                        return Err(ProviderError::Unavailable {
                            kind: Unavailability::MalformedReply,
                            reason: format!("unknown status {other:?}"),
                            retry_after: None,
                        });
                    }
                })
            }
            StatusCode::UNAUTHORIZED => Err(ProviderError::InvalidCredentials),
            _ => Err(refusal(response).await),
        }
    }

    async fn fetch_inbox(
        &self,
        credentials: &ProviderCredentials,
    ) -> Result<Vec<InboxItem>, ProviderError> {
        use base64::Engine;
        let response = dispatch(
            &self.calls,
            Route::Inbox,
            self.client
                .get(endpoint(&self.base_url, "/argus/v1/inbox"))
                .basic_auth(
                    credentials.username.as_str(),
                    Some(credentials.password.expose()),
                )
                .query(&[("limit", "50")]),
        )
        .await?;
        match response.status() {
            StatusCode::OK => {
                let body: InboxBody = read_json(response).await?;
                body.messages
                    .into_iter()
                    .map(|item| {
                        let bytes = base64::engine::general_purpose::STANDARD
                            .decode(&item.payload)
                            .map_err(|_| ProviderError::Unavailable {
                                kind: Unavailability::MalformedReply,
                                reason: "inbox payload is not base64".into(),
                                retry_after: None,
                            })?;
                        Ok(InboxItem {
                            id: item.inbox_id,
                            sender_hpii: item.sender_hpii,
                            sender_name: item.sender_name,
                            payload: String::from_utf8_lossy(&bytes).into_owned(),
                        })
                    })
                    .collect()
            }
            StatusCode::UNAUTHORIZED => Err(ProviderError::InvalidCredentials),
            _ => Err(refusal(response).await),
        }
    }

    async fn acknowledge_inbox(
        &self,
        credentials: &ProviderCredentials,
        id: &str,
    ) -> Result<(), ProviderError> {
        let response = dispatch(
            &self.calls,
            Route::Ack,
            self.client
                .post(endpoint(
                    &self.base_url,
                    &format!("/argus/v1/inbox/{}/ack", path_segment(id)?),
                ))
                .basic_auth(
                    credentials.username.as_str(),
                    Some(credentials.password.expose()),
                ),
        )
        .await?;
        match response.status() {
            status if status.is_success() => Ok(()),
            StatusCode::UNAUTHORIZED => Err(ProviderError::InvalidCredentials),
            _ => Err(refusal(response).await),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use wiremock::matchers::{body_json, header, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    use super::*;
    use crate::domain::types::{
        ContactEmail, PracticeName, PromoCode, ProviderPassword, ProviderUsername,
    };
    use crate::providers::ProviderFailure;

    fn adapter(server: &MockServer, timeout: Duration) -> ArgusClient {
        crate::install_crypto_provider();
        ArgusClient::new(
            super::super::http::build_client(timeout).unwrap(),
            &server.uri(),
        )
    }

    fn credentials() -> ProviderCredentials {
        ProviderCredentials {
            username: ProviderUsername::parse("demo.argus").unwrap(),
            password: ProviderPassword::parse("argus-sandbox-pw").unwrap(),
        }
    }

    #[tokio::test]
    async fn an_account_check_sends_basic_auth_and_reads_the_status() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path("/argus/v1/account"))
            // base64("demo.argus:argus-sandbox-pw")
            .and(header(
                "authorization",
                "Basic ZGVtby5hcmd1czphcmd1cy1zYW5kYm94LXB3",
            ))
            .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
                "username": "demo.argus", "status": "PENDING"
            })))
            .expect(1)
            .mount(&server)
            .await;
        let state = adapter(&server, Duration::from_secs(2))
            .account_state(&credentials())
            .await;
        assert_eq!(state.unwrap(), AccountState::Pending);
    }

    #[tokio::test]
    async fn a_401_means_invalid_credentials() {
        let server = MockServer::start().await;
        Mock::given(path("/argus/v1/account"))
            .respond_with(ResponseTemplate::new(401).set_body_json(serde_json::json!({
                "error": {"code": "invalidCredentials", "message": "no"}
            })))
            .mount(&server)
            .await;
        let error = adapter(&server, Duration::from_secs(2))
            .account_state(&credentials())
            .await
            .unwrap_err();
        assert!(matches!(error, ProviderError::InvalidCredentials));
    }

    #[tokio::test]
    async fn a_5xx_is_unavailable_and_keeps_retry_after() {
        let server = MockServer::start().await;
        Mock::given(path("/argus/v1/account"))
            .respond_with(ResponseTemplate::new(503).insert_header("retry-after", "7"))
            .mount(&server)
            .await;
        let error = adapter(&server, Duration::from_secs(2))
            .account_state(&credentials())
            .await
            .unwrap_err();
        assert!(matches!(
            error,
            ProviderError::Unavailable { retry_after: Some(delay), .. } if delay == Duration::from_secs(7)
        ));
    }

    #[tokio::test]
    async fn a_slow_provider_times_out_as_unavailable() {
        let server = MockServer::start().await;
        Mock::given(path("/argus/v1/account"))
            .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(5)))
            .mount(&server)
            .await;
        let error = adapter(&server, Duration::from_millis(200))
            .account_state(&credentials())
            .await
            .unwrap_err();
        assert!(error.failure() == ProviderFailure::Timeout);
    }

    #[tokio::test]
    async fn a_malformed_body_is_unavailable() {
        let server = MockServer::start().await;
        Mock::given(path("/argus/v1/account"))
            .respond_with(ResponseTemplate::new(200).set_body_string("{\"status\":"))
            .mount(&server)
            .await;
        let error = adapter(&server, Duration::from_secs(2))
            .account_state(&credentials())
            .await
            .unwrap_err();
        assert!(error.failure() == ProviderFailure::MalformedReply);
    }

    #[tokio::test]
    async fn a_registration_posts_the_documented_json() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/argus/v1/registrations"))
            .and(body_json(serde_json::json!({
                "username": "new.clinic", "password": "a-long-password", "promoCode": "SANDBOX-PROMO",
                "practiceName": "Bondi Clinic", "contactEmail": "reception@bondi.example.au"
            })))
            .respond_with(ResponseTemplate::new(201).set_body_json(serde_json::json!({
                "username": "new.clinic", "status": "PENDING"
            })))
            .expect(1)
            .mount(&server)
            .await;
        let registration = Registration {
            credentials: ProviderCredentials {
                username: ProviderUsername::parse("new.clinic").unwrap(),
                password: ProviderPassword::parse("a-long-password").unwrap(),
            },
            promo_code: PromoCode::parse("SANDBOX-PROMO").unwrap(),
            practice_name: PracticeName::parse("Bondi Clinic").unwrap(),
            contact_email: ContactEmail::parse("reception@bondi.example.au").unwrap(),
        };
        let state = adapter(&server, Duration::from_secs(2))
            .register(&registration)
            .await
            .unwrap();
        assert_eq!(state, AccountState::Pending);
    }

    #[tokio::test]
    async fn a_refused_promo_code_keeps_the_providers_word() {
        let server = MockServer::start().await;
        Mock::given(path("/argus/v1/registrations"))
            .respond_with(ResponseTemplate::new(400).set_body_json(serde_json::json!({
                "error": {"code": "invalidPromoCode", "message": "unknown promo code"}
            })))
            .mount(&server)
            .await;
        let registration = Registration {
            credentials: credentials(),
            promo_code: PromoCode::parse("NOPE-123").unwrap(),
            practice_name: PracticeName::parse("Bondi Clinic").unwrap(),
            contact_email: ContactEmail::parse("reception@bondi.example.au").unwrap(),
        };
        let error = adapter(&server, Duration::from_secs(2))
            .register(&registration)
            .await
            .unwrap_err();
        assert!(
            matches!(error, ProviderError::Refused { ref code, .. } if code == "invalidPromoCode")
        );
    }
}
