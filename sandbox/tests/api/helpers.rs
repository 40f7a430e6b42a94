//! A sandbox spawned on port 0 per test, and typed helpers to talk to it.

use std::net::SocketAddr;

use reqwest::{RequestBuilder, Response, StatusCode};
use serde_json::{Value, json};
use smd_sandbox::{SandboxConfig, SandboxHandle, SandboxOptions, StartError};

pub const ARGUS_DEMO_USERNAME: &str = "demo.argus";
pub const ARGUS_DEMO_PASSWORD: &str = "argus-sandbox-pw";
pub const REFERRALNET_DEMO_USER_ID: &str = "demo.referralnet";
pub const REFERRALNET_DEMO_PASSWORD: &str = "rn-sandbox-pw";
pub const NEW_PASSWORD: &str = "correct-horse-battery";
pub const ONE_DAY_SECONDS: i64 = 24 * 60 * 60;
pub const PAYMENTS_API_KEY: &str = "sk_sandbox_gateway_tests";
pub const APPROVING_CARD: &str = "pm_sandbox_approve";
pub const DECLINING_CARD: &str = "pm_sandbox_decline";
pub const FLAKY_CARD: &str = "pm_sandbox_flaky";

/// A charge body for `amount_cents` AUD with this payment method token.
pub fn charge_body(payment_method: &str, amount_cents: i64) -> Value {
    json!({
        "paymentMethod": payment_method,
        "amountCents": amount_cents,
        "currency": "AUD",
        "description": "100 SMD credits",
    })
}

/// What `POST /payments/v1/charges` answered.
#[derive(Debug)]
pub struct ChargeAnswer {
    pub status: StatusCode,
    /// Whether the `Idempotent-Replayed: true` header came with it.
    pub replayed: bool,
    pub body: Value,
}

pub async fn charge_answer(response: Response) -> ChargeAnswer {
    let replayed = match response.headers().get("idempotent-replayed") {
        None => false,
        Some(value) => {
            assert_eq!(value, "true");
            true
        }
    };
    let (status, body) = status_and_json(response).await;
    ChargeAnswer {
        status,
        replayed,
        body,
    }
}

/// A running sandbox and an HTTP client for it. Every path given to its helpers may start with
/// `/ns/{name}` to address a namespace.
pub struct TestSandbox {
    pub client: reqwest::Client,
    pub base_url: String,
    handle: SandboxHandle,
}

pub async fn spawn_sandbox() -> TestSandbox {
    spawn_sandbox_with(SandboxConfig::default()).await
}

pub async fn spawn_sandbox_with(config: SandboxConfig) -> TestSandbox {
    try_spawn_sandbox_from(config, SandboxOptions::default())
        .await
        .expect("the sandbox binds a free port")
}

/// A sandbox started with scenarios and/or a state file; panics when it refuses to start.
pub async fn spawn_sandbox_from(config: SandboxConfig, options: SandboxOptions) -> TestSandbox {
    try_spawn_sandbox_from(config, options)
        .await
        .unwrap_or_else(|error| panic!("the sandbox did not start: {error}"))
}

/// A sandbox started with scenarios and/or a state file, or why it refused to start.
pub async fn try_spawn_sandbox_from(
    config: SandboxConfig,
    options: SandboxOptions,
) -> Result<TestSandbox, StartError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let handle =
        smd_sandbox::spawn_with(SocketAddr::from(([127, 0, 0, 1], 0)), config, options).await?;
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .expect("a client builds");
    Ok(TestSandbox {
        client,
        base_url: handle.base_url(),
        handle,
    })
}

/// A response's status and JSON body (`Value::Null` when the body is empty).
pub async fn status_and_json(response: Response) -> (StatusCode, Value) {
    let status = response.status();
    let text = response.text().await.expect("a body arrives");
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|error| panic!("{error}: {text}"))
    };
    (status, body)
}

impl TestSandbox {
    /// Stops the sandbox as a shutdown signal would: requests finish, the state file (if any)
    /// is written a last time.
    pub async fn stop(self) {
        self.handle.shutdown().await;
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    pub fn get(&self, path: &str) -> RequestBuilder {
        self.client.get(self.url(path))
    }

    pub fn post(&self, path: &str, body: Value) -> RequestBuilder {
        self.client.post(self.url(path)).json(&body)
    }

    pub async fn send(&self, request: RequestBuilder) -> (StatusCode, Value) {
        status_and_json(request.send().await.expect("the sandbox answers")).await
    }

    /// `GET /argus/v1/account` with Basic credentials, under `prefix` (`""` or `/ns/{name}`).
    pub async fn argus_account(
        &self,
        prefix: &str,
        username: &str,
        password: &str,
    ) -> (StatusCode, Value) {
        let path = format!("{prefix}/argus/v1/account");
        self.send(self.get(&path).basic_auth(username, Some(password)))
            .await
    }

    /// `POST /argus/v1/registrations` of a valid form with this username and promo code.
    pub async fn register_argus(
        &self,
        prefix: &str,
        username: &str,
        promo_code: &str,
    ) -> (StatusCode, Value) {
        let path = format!("{prefix}/argus/v1/registrations");
        let form = json!({
            "username": username,
            "password": NEW_PASSWORD,
            "promoCode": promo_code,
            "practiceName": "Harbourside Family Practice",
            "contactEmail": "front.desk@harbourside.example",
        });
        self.send(self.post(&path, form)).await
    }

    /// `POST /referralnet/api/enrolments` of a valid form with this user id and promotion code.
    pub async fn enrol_referralnet(
        &self,
        prefix: &str,
        user_id: &str,
        promotion_code: &str,
    ) -> (StatusCode, Value) {
        let path = format!("{prefix}/referralnet/api/enrolments");
        let form = json!({
            "userId": user_id,
            "password": NEW_PASSWORD,
            "promotionCode": promotion_code,
            "organisationName": "Harbourside Family Practice",
            "email": "front.desk@harbourside.example",
        });
        self.send(self.post(&path, form)).await
    }

    /// `POST /referralnet/api/sessions`.
    pub async fn referralnet_login(
        &self,
        prefix: &str,
        user_id: &str,
        password: &str,
    ) -> (StatusCode, Value) {
        let path = format!("{prefix}/referralnet/api/sessions");
        self.send(self.post(&path, json!({ "userId": user_id, "password": password })))
            .await
    }

    /// Logs in and returns the session token, failing the test if login fails.
    pub async fn referralnet_token(&self, prefix: &str, user_id: &str, password: &str) -> String {
        let (status, body) = self.referralnet_login(prefix, user_id, password).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["sessionToken"].as_str().expect("a token").to_owned()
    }

    /// `GET /referralnet/api/account` with a bearer token.
    pub async fn referralnet_account(&self, prefix: &str, token: &str) -> (StatusCode, Value) {
        let path = format!("{prefix}/referralnet/api/account");
        self.send(self.get(&path).bearer_auth(token)).await
    }

    /// Advances the sandbox clock of the namespace under `prefix`.
    pub async fn advance_clock(&self, prefix: &str, seconds: i64) {
        let path = format!("{prefix}/_sandbox/clock/advance");
        let (status, body) = self
            .send(self.post(&path, json!({ "seconds": seconds })))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    /// Queues a fault in the default namespace.
    pub async fn add_fault(&self, fault: Value) -> Value {
        let (status, body) = self.send(self.post("/_sandbox/faults", fault)).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body
    }

    /// `POST /payments/v1/charges` under `prefix`, with the sandbox API key and this
    /// idempotency key.
    pub fn charge_request(
        &self,
        prefix: &str,
        idempotency_key: &str,
        body: Value,
    ) -> RequestBuilder {
        self.post(&format!("{prefix}/payments/v1/charges"), body)
            .bearer_auth(PAYMENTS_API_KEY)
            .header("Idempotency-Key", idempotency_key)
    }

    /// Sends [`TestSandbox::charge_request`].
    pub async fn charge(&self, prefix: &str, idempotency_key: &str, body: Value) -> ChargeAnswer {
        let response = self
            .charge_request(prefix, idempotency_key, body)
            .send()
            .await
            .expect("the sandbox answers");
        charge_answer(response).await
    }

    /// `GET` a `/payments/v1/…` path (`prefix` included) with the sandbox API key.
    pub async fn payments_get(&self, path: &str) -> (StatusCode, Value) {
        self.send(self.get(path).bearer_auth(PAYMENTS_API_KEY))
            .await
    }

    /// `GET /_sandbox/charges` under `prefix`: every charge really made, oldest first.
    pub async fn charges(&self, prefix: &str) -> Vec<Value> {
        let path = format!("{prefix}/_sandbox/charges");
        let (status, body) = self.send(self.get(&path)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body.as_array().expect("a list").clone()
    }

    /// `GET /_sandbox/registrations` under `prefix`.
    pub async fn registrations(&self, prefix: &str) -> Vec<Value> {
        let path = format!("{prefix}/_sandbox/registrations");
        let (status, body) = self.send(self.get(&path)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body.as_array().expect("a list").clone()
    }
}
