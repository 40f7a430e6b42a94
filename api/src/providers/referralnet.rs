//! ReferralNet: a session login returns a bearer token that expires; later calls carry it.
//! Errors come as `{"fault":{"faultCode","faultString"}}`.
//!
//! Sessions are reused until shortly before ReferralNet's 15 minutes run out (a login per call
//! was about 60 logins a minute for one busy account). A call whose reused session is refused
//! (401: it expired early, or the provider dropped it) logs in again once and repeats; a 401
//! means nothing was done, so repeating a dispatch cannot send twice. Account checks always log
//! in afresh: for them the login *is* the credential check.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};

use super::http::{Calls, dispatch, endpoint, path_segment, read_json};
use super::{
    AccountState, CallObserver, DeliveryState, DirectoryEntry, DirectoryPage, InboxItem,
    OutboundMessage, ProviderClient, ProviderError, Route, Unavailability, Upstream,
};
use crate::domain::types::{Provider, ProviderCredentials, Registration};

/// How long a session is reused: well inside ReferralNet's 15-minute lifetime.
const SESSION_REUSE: Duration = Duration::from_secs(10 * 60);
/// Sessions kept at most (one per account in use); past it, expired ones go, then all.
const MAX_SESSIONS: usize = 10_000;

/// The ReferralNet adapter.
pub struct ReferralNetClient {
    client: reqwest::Client,
    base_url: String,
    calls: Calls,
    /// Open sessions by a digest of the credentials that opened them (a changed password
    /// never reuses a session opened with the old one).
    sessions: Mutex<HashMap<[u8; 32], (String, Instant)>>,
}

fn session_key(credentials: &ProviderCredentials) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut digest = Sha256::new();
    digest.update(credentials.username.as_str().as_bytes());
    digest.update([0]);
    digest.update(credentials.password.expose().as_bytes());
    digest.finalize().into()
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SessionRequest<'a> {
    user_id: &'a str,
    password: &'a str,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SessionBody {
    session_token: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AccountBody {
    enrolment_state: String,
}

#[derive(Deserialize)]
struct FaultBody {
    fault: Fault,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Fault {
    fault_code: String,
    #[serde(default)]
    fault_string: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EnrolmentRequest<'a> {
    user_id: &'a str,
    password: &'a str,
    promotion_code: &'a str,
    organisation_name: &'a str,
    email: &'a str,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProvidersBody {
    providers: Vec<ProviderEntry>,
    total: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProviderEntry {
    provider_number: String,
    name: String,
    discipline: String,
    practice: String,
    locality: String,
    state: String,
    postcode: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DispatchBody {
    receipt_id: String,
}

#[derive(Deserialize)]
struct ReceiptBody {
    state: String,
    reason: Option<String>,
}

#[derive(Deserialize)]
struct RnInboxBody {
    items: Vec<RnInboxItem>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RnInboxItem {
    item_id: String,
    from: String,
    from_name: String,
    hl7: String,
}

#[derive(Deserialize)]
struct WebhookBody {
    secret: String,
}

#[derive(Deserialize)]
struct EnrolmentBody {
    state: String,
}

impl ReferralNetClient {
    /// An adapter for the ReferralNet API at `base_url`.
    pub fn new(client: reqwest::Client, base_url: &str) -> Self {
        Self {
            client,
            base_url: base_url.to_owned(),
            calls: Calls::new(Upstream::ReferralNet),
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// Reports every call to `observer` (metrics).
    pub fn observed_by(self, observer: Arc<dyn CallObserver>) -> Self {
        Self {
            calls: self.calls.observed_by(observer),
            ..self
        }
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], (String, Instant)>> {
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn remember(&self, credentials: &ProviderCredentials, token: &str) {
        let now = Instant::now();
        let mut sessions = self.sessions();
        if sessions.len() >= MAX_SESSIONS {
            sessions.retain(|_, (_, until)| *until > now);
            if sessions.len() >= MAX_SESSIONS {
                sessions.clear();
            }
        }
        sessions.insert(
            session_key(credentials),
            (token.to_owned(), now + SESSION_REUSE),
        );
    }

    /// A fresh login, remembered for later calls (or forgotten when it failed).
    async fn fresh_session(
        &self,
        credentials: &ProviderCredentials,
    ) -> Result<String, ProviderError> {
        match self.login(credentials).await {
            Ok(token) => {
                self.remember(credentials, &token);
                Ok(token)
            }
            Err(error) => {
                self.sessions().remove(&session_key(credentials));
                Err(error)
            }
        }
    }

    /// Sends the request `build` makes with a session token: a reused one when there is one,
    /// and once more with a fresh login if ReferralNet refuses the reused one.
    async fn authorized(
        &self,
        credentials: &ProviderCredentials,
        route: Route,
        build: impl Fn(&str) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ProviderError> {
        let reused = {
            let now = Instant::now();
            self.sessions()
                .get(&session_key(credentials))
                .filter(|(_, until)| *until > now)
                .map(|(token, _)| token.clone())
        };
        let token = match reused {
            Some(token) => {
                let response = dispatch(&self.calls, route, build(&token)).await?;
                if response.status() != StatusCode::UNAUTHORIZED {
                    return Ok(response);
                }
                self.fresh_session(credentials).await?
            }
            None => self.fresh_session(credentials).await?,
        };
        dispatch(&self.calls, route, build(&token)).await
    }

    async fn login(&self, credentials: &ProviderCredentials) -> Result<String, ProviderError> {
        let response = dispatch(
            &self.calls,
            Route::Session,
            self.client
                .post(endpoint(&self.base_url, "/referralnet/api/sessions"))
                .json(&SessionRequest {
                    user_id: credentials.username.as_str(),
                    password: credentials.password.expose(),
                }),
        )
        .await?;
        match response.status() {
            StatusCode::OK => Ok(read_json::<SessionBody>(response).await?.session_token),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                Err(ProviderError::InvalidCredentials)
            }
            _ => Err(fault(response).await),
        }
    }
}

fn state_from_word(state: &str) -> Result<AccountState, ProviderError> {
    match state {
        "APPROVED" => Ok(AccountState::Active),
        "PENDING" => Ok(AccountState::Pending),
        "DECLINED" => Ok(AccountState::Rejected),
        other => Err(ProviderError::Unavailable {
            kind: Unavailability::MalformedReply,
            reason: format!("unknown enrolment state {other:?}"),
            retry_after: None,
        }),
    }
}

async fn fault(response: reqwest::Response) -> ProviderError {
    match read_json::<FaultBody>(response).await {
        Ok(body) => ProviderError::Refused {
            code: body.fault.fault_code,
            message: body.fault.fault_string,
        },
        Err(error) => error,
    }
}

#[async_trait]
impl ProviderClient for ReferralNetClient {
    fn provider(&self) -> Provider {
        Provider::ReferralNet
    }

    async fn account_state(
        &self,
        credentials: &ProviderCredentials,
    ) -> Result<AccountState, ProviderError> {
        let token = self.fresh_session(credentials).await?;
        let response = dispatch(
            &self.calls,
            Route::Account,
            self.client
                .get(endpoint(&self.base_url, "/referralnet/api/account"))
                .bearer_auth(token),
        )
        .await?;
        match response.status() {
            StatusCode::OK => {
                state_from_word(&read_json::<AccountBody>(response).await?.enrolment_state)
            }
            // A token that expired between login and use: the provider is misbehaving; retry later.
            StatusCode::UNAUTHORIZED => Err(ProviderError::Unavailable {
                kind: Unavailability::ServerError,
                reason: "fresh session token refused".into(),
                retry_after: None,
            }),
            _ => Err(fault(response).await),
        }
    }

    async fn register(&self, registration: &Registration) -> Result<AccountState, ProviderError> {
        let response = dispatch(
            &self.calls,
            Route::Registrations,
            self.client
                .post(endpoint(&self.base_url, "/referralnet/api/enrolments"))
                .json(&EnrolmentRequest {
                    user_id: registration.credentials.username.as_str(),
                    password: registration.credentials.password.expose(),
                    promotion_code: registration.promo_code.as_str(),
                    organisation_name: registration.practice_name.as_str(),
                    email: registration.contact_email.as_str(),
                }),
        )
        .await?;
        match response.status() {
            StatusCode::ACCEPTED | StatusCode::CREATED | StatusCode::OK => {
                state_from_word(&read_json::<EnrolmentBody>(response).await?.state)
            }
            StatusCode::CONFLICT => Err(ProviderError::Duplicate),
            _ => Err(fault(response).await),
        }
    }

    async fn search_directory(
        &self,
        credentials: &ProviderCredentials,
        query: &str,
        offset: u64,
        limit: u64,
    ) -> Result<DirectoryPage, ProviderError> {
        let response = self
            .authorized(credentials, Route::Directory, |token| {
                self.client
                    .get(endpoint(&self.base_url, "/referralnet/api/providers"))
                    .bearer_auth(token)
                    .query(&[
                        ("search", query.to_owned()),
                        ("offset", offset.to_string()),
                        ("limit", limit.clamp(1, 50).to_string()),
                    ])
            })
            .await?;
        match response.status() {
            StatusCode::OK => {
                let body: ProvidersBody = read_json(response).await?;
                Ok(DirectoryPage {
                    total: body.total,
                    entries: body
                        .providers
                        .into_iter()
                        .map(|entry| {
                            // ReferralNet gives one display name, "Dr Given Family".
                            let name = entry
                                .name
                                .strip_prefix("Dr ")
                                .unwrap_or(&entry.name)
                                .to_owned();
                            let (given_name, family_name) = match name.rsplit_once(' ') {
                                Some((given, family)) => (given.to_owned(), family.to_owned()),
                                None => (String::new(), name),
                            };
                            DirectoryEntry {
                                hpii: entry.provider_number,
                                given_name,
                                family_name,
                                specialty: entry.discipline,
                                organisation: entry.practice,
                                suburb: entry.locality,
                                state: entry.state,
                                postcode: entry.postcode,
                            }
                        })
                        .collect(),
                })
            }
            _ => Err(fault(response).await),
        }
    }

    async fn send(
        &self,
        credentials: &ProviderCredentials,
        message: &OutboundMessage<'_>,
    ) -> Result<String, ProviderError> {
        let response = self
            .authorized(credentials, Route::Send, |token| {
                self.client
                    .post(endpoint(&self.base_url, "/referralnet/api/dispatch"))
                    .bearer_auth(token)
                    .header(reqwest::header::CONTENT_TYPE, "x-application/hl7-v2+er7")
                    .header("X-RN-Recipient", message.recipient_hpii)
                    .header("X-RN-Message-Id", message.client_message_id)
                    .body(message.payload.to_owned())
            })
            .await?;
        match response.status() {
            StatusCode::OK | StatusCode::ACCEPTED | StatusCode::CREATED => {
                Ok(read_json::<DispatchBody>(response).await?.receipt_id)
            }
            _ => Err(fault(response).await),
        }
    }

    async fn delivery_state(
        &self,
        credentials: &ProviderCredentials,
        reference: &str,
    ) -> Result<DeliveryState, ProviderError> {
        let reference = path_segment(reference)?;
        let response = self
            .authorized(credentials, Route::Status, |token| {
                self.client
                    .get(endpoint(
                        &self.base_url,
                        &format!("/referralnet/api/dispatch/{reference}"),
                    ))
                    .bearer_auth(token)
            })
            .await?;
        match response.status() {
            StatusCode::OK => {
                let body: ReceiptBody = read_json(response).await?;
                Ok(match body.state.as_str() {
                    "QUEUED" => DeliveryState::Accepted,
                    "DELIVERED" => DeliveryState::Delivered,
                    "ACKNOWLEDGED" => DeliveryState::Acknowledged,
                    "UNDELIVERABLE" => {
                        DeliveryState::Failed(body.reason.unwrap_or_else(|| "undeliverable".into()))
                    }
                    other => {
                        return Err(ProviderError::Unavailable {
                            kind: Unavailability::MalformedReply,
                            reason: format!("unknown state {other:?}"),
                            retry_after: None,
                        });
                    }
                })
            }
            _ => Err(fault(response).await),
        }
    }

    async fn fetch_inbox(
        &self,
        credentials: &ProviderCredentials,
    ) -> Result<Vec<InboxItem>, ProviderError> {
        let response = self
            .authorized(credentials, Route::Inbox, |token| {
                self.client
                    .get(endpoint(&self.base_url, "/referralnet/api/inbox"))
                    .bearer_auth(token)
                    .query(&[("limit", "50")])
            })
            .await?;
        match response.status() {
            StatusCode::OK => {
                let body: RnInboxBody = read_json(response).await?;
                Ok(body
                    .items
                    .into_iter()
                    .map(|item| InboxItem {
                        id: item.item_id,
                        sender_hpii: item.from,
                        sender_name: item.from_name,
                        payload: item.hl7,
                    })
                    .collect())
            }
            _ => Err(fault(response).await),
        }
    }

    async fn acknowledge_inbox(
        &self,
        credentials: &ProviderCredentials,
        id: &str,
    ) -> Result<(), ProviderError> {
        let id = path_segment(id)?;
        let response = self
            .authorized(credentials, Route::Ack, |token| {
                self.client
                    .delete(endpoint(
                        &self.base_url,
                        &format!("/referralnet/api/inbox/{id}"),
                    ))
                    .bearer_auth(token)
            })
            .await?;
        match response.status() {
            status if status.is_success() => Ok(()),
            _ => Err(fault(response).await),
        }
    }

    async fn register_webhook(
        &self,
        credentials: &ProviderCredentials,
        url: &str,
    ) -> Result<Option<String>, ProviderError> {
        let response = self
            .authorized(credentials, Route::Webhook, |token| {
                self.client
                    .put(endpoint(&self.base_url, "/referralnet/api/webhook"))
                    .bearer_auth(token)
                    .json(&serde_json::json!({ "url": url }))
            })
            .await?;
        match response.status() {
            StatusCode::OK | StatusCode::CREATED => {
                Ok(Some(read_json::<WebhookBody>(response).await?.secret))
            }
            _ => Err(fault(response).await),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use wiremock::matchers::{body_json, header, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    use super::*;
    use crate::domain::types::{ProviderPassword, ProviderUsername};
    use crate::providers::ProviderFailure;

    fn adapter(server: &MockServer, timeout: Duration) -> ReferralNetClient {
        crate::install_crypto_provider();
        ReferralNetClient::new(
            super::super::http::build_client(timeout).unwrap(),
            &server.uri(),
        )
    }

    fn credentials() -> ProviderCredentials {
        ProviderCredentials {
            username: ProviderUsername::parse("demo.referralnet").unwrap(),
            password: ProviderPassword::parse("rn-sandbox-pw").unwrap(),
        }
    }

    async fn mount_login(server: &MockServer) {
        Mock::given(method("POST"))
            .and(path("/referralnet/api/sessions"))
            .and(body_json(
                serde_json::json!({"userId": "demo.referralnet", "password": "rn-sandbox-pw"}),
            ))
            .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
                "sessionToken": "tok-1", "expiresAt": "2026-11-24T21:00:00Z"
            })))
            .mount(server)
            .await;
    }

    #[tokio::test]
    async fn an_account_check_logs_in_then_sends_the_bearer_token() {
        let server = MockServer::start().await;
        mount_login(&server).await;
        Mock::given(method("GET"))
            .and(path("/referralnet/api/account"))
            .and(header("authorization", "Bearer tok-1"))
            .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
                "userId": "demo.referralnet", "enrolmentState": "APPROVED"
            })))
            .expect(1)
            .mount(&server)
            .await;
        let state = adapter(&server, Duration::from_secs(2))
            .account_state(&credentials())
            .await;
        assert_eq!(state.unwrap(), AccountState::Active);
    }

    fn session_as(token: &str) -> ResponseTemplate {
        ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "sessionToken": token, "expiresAt": "2026-11-24T21:00:00Z"
        }))
    }

    fn empty_directory() -> ResponseTemplate {
        ResponseTemplate::new(200).set_body_json(serde_json::json!({"providers": [], "total": 0}))
    }

    #[tokio::test]
    async fn one_session_serves_many_calls() {
        let server = MockServer::start().await;
        Mock::given(path("/referralnet/api/sessions"))
            .respond_with(session_as("tok-1"))
            .expect(1)
            .mount(&server)
            .await;
        Mock::given(path("/referralnet/api/providers"))
            .and(header("authorization", "Bearer tok-1"))
            .respond_with(empty_directory())
            .expect(5)
            .mount(&server)
            .await;
        let adapter = adapter(&server, Duration::from_secs(2));
        for _ in 0..5 {
            adapter
                .search_directory(&credentials(), "cardiology", 0, 50)
                .await
                .unwrap();
        }
    }

    #[tokio::test]
    async fn a_refused_reused_session_logs_in_again_once_and_repeats_the_call() {
        let server = MockServer::start().await;
        Mock::given(path("/referralnet/api/sessions"))
            .respond_with(session_as("tok-1"))
            .up_to_n_times(1)
            .expect(1)
            .mount(&server)
            .await;
        Mock::given(path("/referralnet/api/sessions"))
            .respond_with(session_as("tok-2"))
            .expect(1)
            .mount(&server)
            .await;
        // The provider dropped tok-1 after its first use.
        Mock::given(path("/referralnet/api/providers"))
            .and(header("authorization", "Bearer tok-1"))
            .respond_with(empty_directory())
            .up_to_n_times(1)
            .mount(&server)
            .await;
        Mock::given(path("/referralnet/api/providers"))
            .and(header("authorization", "Bearer tok-1"))
            .respond_with(ResponseTemplate::new(401).set_body_json(serde_json::json!({
                "fault": {"faultCode": "notAuthorised", "faultString": "session expired"}
            })))
            .mount(&server)
            .await;
        Mock::given(path("/referralnet/api/providers"))
            .and(header("authorization", "Bearer tok-2"))
            .respond_with(empty_directory())
            .expect(2)
            .mount(&server)
            .await;
        let adapter = adapter(&server, Duration::from_secs(2));
        for _ in 0..3 {
            adapter
                .search_directory(&credentials(), "cardiology", 0, 50)
                .await
                .unwrap();
        }
    }

    #[tokio::test]
    async fn an_account_check_always_logs_in_afresh_and_another_password_gets_its_own_session() {
        let server = MockServer::start().await;
        Mock::given(path("/referralnet/api/sessions"))
            .respond_with(session_as("tok-1"))
            .expect(3)
            .mount(&server)
            .await;
        Mock::given(path("/referralnet/api/account"))
            .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
                "userId": "demo.referralnet", "enrolmentState": "APPROVED"
            })))
            .expect(2)
            .mount(&server)
            .await;
        Mock::given(path("/referralnet/api/providers"))
            .respond_with(empty_directory())
            .mount(&server)
            .await;
        let adapter = adapter(&server, Duration::from_secs(2));
        adapter.account_state(&credentials()).await.unwrap();
        adapter.account_state(&credentials()).await.unwrap();
        // Reuses the account check's session.
        adapter
            .search_directory(&credentials(), "x", 0, 50)
            .await
            .unwrap();
        let other = ProviderCredentials {
            username: ProviderUsername::parse("demo.referralnet").unwrap(),
            password: ProviderPassword::parse("a-different-password").unwrap(),
        };
        adapter.search_directory(&other, "x", 0, 50).await.unwrap();
    }

    #[tokio::test]
    async fn a_refused_login_means_invalid_credentials() {
        let server = MockServer::start().await;
        Mock::given(path("/referralnet/api/sessions"))
            .respond_with(ResponseTemplate::new(401).set_body_json(serde_json::json!({
                "fault": {"faultCode": "invalidCredentials", "faultString": "no"}
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
    async fn a_5xx_on_the_account_call_is_unavailable() {
        let server = MockServer::start().await;
        mount_login(&server).await;
        Mock::given(path("/referralnet/api/account"))
            .respond_with(ResponseTemplate::new(502))
            .mount(&server)
            .await;
        let error = adapter(&server, Duration::from_secs(2))
            .account_state(&credentials())
            .await
            .unwrap_err();
        assert!(matches!(error, ProviderError::Unavailable { .. }));
    }

    #[tokio::test]
    async fn a_slow_login_times_out_as_unavailable() {
        let server = MockServer::start().await;
        Mock::given(path("/referralnet/api/sessions"))
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
    async fn a_malformed_session_body_is_unavailable() {
        let server = MockServer::start().await;
        Mock::given(path("/referralnet/api/sessions"))
            .respond_with(ResponseTemplate::new(200).set_body_string("<html>oops"))
            .mount(&server)
            .await;
        let error = adapter(&server, Duration::from_secs(2))
            .account_state(&credentials())
            .await
            .unwrap_err();
        assert!(error.failure() == ProviderFailure::MalformedReply);
    }

    #[tokio::test]
    async fn a_duplicate_enrolment_is_reported_as_such() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/referralnet/api/enrolments"))
            .respond_with(ResponseTemplate::new(409).set_body_json(serde_json::json!({
                "fault": {"faultCode": "duplicate", "faultString": "taken"}
            })))
            .mount(&server)
            .await;
        let registration = Registration {
            credentials: credentials(),
            promo_code: crate::domain::types::PromoCode::parse("SANDBOX-PROMO").unwrap(),
            practice_name: crate::domain::types::PracticeName::parse("Clinic").unwrap(),
            contact_email: crate::domain::types::ContactEmail::parse("a@b.com.au").unwrap(),
        };
        let error = adapter(&server, Duration::from_secs(2))
            .register(&registration)
            .await
            .unwrap_err();
        assert!(matches!(error, ProviderError::Duplicate));
    }
}
