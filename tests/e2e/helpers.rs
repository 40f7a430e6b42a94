//! `spawn_app()` and typed helpers, after zero2prod's `tests/api/helpers.rs`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

use serde_json::{Value, json};
use smd_gateway::auth::{TokenRequest, mint_hs256};
use smd_gateway::config::{
    CreditConfig, GraphqlSettings, JwtSettings, MessagingConfig, Mode, PaymentSettings,
    ProviderSettings,
};
use smd_gateway::crypto::SecretBox;
use smd_gateway::domain::audit::Principal;
use smd_gateway::domain::types::Role;
use smd_gateway::store::Store;
use smd_gateway::{App, Settings};
use smd_sandbox::{SandboxConfig, SandboxHandle};

pub const SECRET: &str = "e2e-test-signing-secret-0123456789abcdef";
pub const ISSUER: &str = "https://pms.example.test";
pub const AUDIENCE: &str = "smd-gateway-e2e";

pub const ARGUS_USER: &str = "demo.argus";
pub const ARGUS_PASSWORD: &str = "argus-sandbox-pw";
pub const RN_USER: &str = "demo.referralnet";
pub const RN_PASSWORD: &str = "rn-sandbox-pw";

/// The stop signal and the task of a gateway started by a test.
type RunningGateway = (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<anyhow::Result<()>>,
);

pub struct TestApp {
    pub base_url: String,
    pub address: SocketAddr,
    pub sandbox: Arc<SandboxHandle>,
    pub client: reqwest::Client,
    pub store: Store,
    /// The SQLite file, when the test runs on SQLite.
    pub sqlite_path: Option<PathBuf>,
    settings: Settings,
    stop: Mutex<Option<RunningGateway>>,
    data_dir: Arc<tempfile::TempDir>,
}

pub struct Options {
    pub provider_timeout_ms: u64,
    pub validate_login_per_minute: u32,
    pub purchase_lease_ms: u64,
    pub fail_after_charge: bool,
    pub fail_after_send: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            provider_timeout_ms: 1_500,
            validate_login_per_minute: 5,
            purchase_lease_ms: 30_000,
            fail_after_charge: false,
            fail_after_send: false,
        }
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(Options::default()).await
}

pub async fn spawn_app_with(options: Options) -> TestApp {
    spawn_app_configured(options, |_| {}).await
}

/// Like [`spawn_app_with`], with a last say over the gateway's settings.
pub async fn spawn_app_configured(options: Options, change: impl FnOnce(&mut Settings)) -> TestApp {
    smd_gateway::install_crypto_provider();
    // The gateway's webhook is on loopback, which the sandbox refuses unless allowed.
    let sandbox = smd_sandbox::spawn(
        "127.0.0.1:0".parse().unwrap(),
        SandboxConfig {
            allow_private_webhooks: true,
            ..SandboxConfig::default()
        },
    )
    .await
    .expect("sandbox starts");
    let data_dir = tempfile::tempdir().expect("temp dir");
    let (database_url, sqlite_path) = match std::env::var("TEST_DATABASE_URL") {
        Ok(admin_url) if !admin_url.trim().is_empty() => {
            (fresh_postgres_database(admin_url.trim()).await, None)
        }
        _ => {
            let path = data_dir.path().join("gateway.db");
            (format!("sqlite://{}?mode=rwc", path.display()), Some(path))
        }
    };
    // Production mode, so tests see what deployments see; the crash-simulating fault points
    // are refused there, so tests that use them run in dev mode (every setting dev mode would
    // default is given explicitly here, and the demo seed and banner are off).
    let mode = if options.fail_after_charge || options.fail_after_send {
        Mode::Dev
    } else {
        Mode::Production
    };
    let settings = Settings {
        mode,
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data_dir.path().to_path_buf(),
        database_url: Some(database_url),
        jwt: JwtSettings {
            issuer: Some(ISSUER.into()),
            audience: Some(AUDIENCE.into()),
            hs256_secret: Some(SECRET.into()),
            leeway_seconds: 5,
            ..JwtSettings::default()
        },
        encryption_key: Some(SecretBox::generate_key()),
        providers: ProviderSettings {
            argus_base_url: Some(sandbox.base_url()),
            referralnet_base_url: Some(sandbox.base_url()),
            timeout_ms: options.provider_timeout_ms,
            allow_insecure_http: true,
        },
        payments: PaymentSettings {
            base_url: Some(sandbox.base_url()),
            api_key: Some("sk_sandbox_e2e".into()),
        },
        credits: CreditConfig {
            purchase_lease_ms: options.purchase_lease_ms,
            fail_after_charge: options.fail_after_charge,
            ..CreditConfig::default()
        },
        messaging: MessagingConfig {
            status_poll_interval_ms: Some(100),
            retry_base_ms: 50,
            retry_max_ms: 1_000,
            give_up_after_seconds: 600,
            fail_after_send: options.fail_after_send,
            ..MessagingConfig::default()
        },
        approval_poll_interval_ms: Some(100),
        graphql: GraphqlSettings {
            playground: Some(false),
            introspection: Some(true),
            ..GraphqlSettings::default()
        },
        validate_login_per_minute: options.validate_login_per_minute,
        seed_demo_data: false,
        print_banner: false,
        ..Settings::default()
    };
    let mut settings = settings;
    change(&mut settings);
    start_gateway(settings, Arc::new(sandbox), sqlite_path, Arc::new(data_dir)).await
}

async fn start_gateway(
    settings: Settings,
    sandbox: Arc<SandboxHandle>,
    sqlite_path: Option<PathBuf>,
    data_dir: Arc<tempfile::TempDir>,
) -> TestApp {
    let app = App::build(settings.clone()).await.expect("gateway builds");
    let address = app.address();
    let store = app.store();
    let (stop_sender, stop_receiver) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until(async move {
        let _ = stop_receiver.await;
    }));
    TestApp {
        base_url: format!("http://{address}"),
        address,
        sandbox,
        client: reqwest::Client::new(),
        store,
        sqlite_path,
        settings,
        stop: Mutex::new(Some((stop_sender, server))),
        data_dir,
    }
}

/// Creates an empty database next to the one `admin_url` names and returns its URL.
pub async fn fresh_postgres_database(admin_url: &str) -> String {
    use sea_orm::ConnectionTrait;
    let name = format!("smd_test_{}", uuid::Uuid::new_v4().simple());
    let admin = sea_orm::Database::connect(admin_url)
        .await
        .expect("TEST_DATABASE_URL reachable");
    admin
        .execute_unprepared(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create test database");
    admin.close().await.ok();
    let (without_query, query) = match admin_url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (admin_url, String::new()),
    };
    let base = match without_query.rfind('/') {
        Some(slash) if slash > "postgres://".len() => &without_query[..slash],
        _ => without_query,
    };
    format!("{base}/{name}{query}")
}

pub fn token(subject: &str, group: &str, role: Role) -> String {
    token_with(SECRET, ISSUER, AUDIENCE, subject, group, role, 600)
}

pub fn token_with(
    secret: &str,
    issuer: &str,
    audience: &str,
    subject: &str,
    group: &str,
    role: Role,
    ttl_seconds: u64,
) -> String {
    mint_hs256(
        secret,
        issuer,
        audience,
        &TokenRequest {
            subject: subject.into(),
            group_id: group.into(),
            role,
            name: Some(format!("{subject} name")),
            ttl_seconds,
        },
    )
    .unwrap()
}

pub fn practitioner(subject: &str, group: &str) -> String {
    token(subject, group, Role::Practitioner)
}

pub fn administrator(subject: &str, group: &str) -> String {
    token(subject, group, Role::Administrator)
}

impl TestApp {
    /// Another gateway on the same database, sandbox and keys (a restart, or a second node).
    pub async fn spawn_second_gateway(&self) -> TestApp {
        start_gateway(
            self.settings.clone(),
            self.sandbox.clone(),
            self.sqlite_path.clone(),
            self.data_dir.clone(),
        )
        .await
    }

    /// The settings this gateway was started with (to start more nodes like it).
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The principal a token for (`subject`, `group`, `role`) becomes, provisioned.
    pub async fn principal(&self, subject: &str, group: &str, role: Role) -> Principal {
        let user = self
            .store
            .provision_user(group, subject, role, &format!("{subject} name"))
            .await
            .unwrap();
        Principal {
            user_id: user.id,
            subject: user.subject,
            group_id: user.group_id,
            role,
            name: user.name,
            request_id: "test".into(),
            expires_at: chrono::Utc::now() + chrono::Duration::hours(1),
        }
    }

    /// A second gateway on the same database with different options (e.g. without a fault).
    pub async fn spawn_second_gateway_with(&self, change: impl FnOnce(&mut Settings)) -> TestApp {
        let mut settings = self.settings.clone();
        change(&mut settings);
        start_gateway(
            settings,
            self.sandbox.clone(),
            self.sqlite_path.clone(),
            self.data_dir.clone(),
        )
        .await
    }

    /// Stops this gateway gracefully (its background workers too) and waits until it has.
    pub async fn stop(&self) {
        let running = self.stop.lock().unwrap().take();
        if let Some((stop, server)) = running {
            let _ = stop.send(());
            server
                .await
                .expect("server task")
                .expect("server stopped cleanly");
        }
    }

    /// POSTs a GraphQL operation and returns the whole JSON response.
    pub async fn gql(&self, token: Option<&str>, query: &str, variables: Value) -> Value {
        let mut request = self
            .client
            .post(format!("{}/graphql", self.base_url))
            .json(&json!({
                "query": query, "variables": variables
            }));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("gateway answers");
        response.json().await.expect("gateway answers JSON")
    }

    pub async fn link(&self, token: &str, mutation: &str, username: &str, password: &str) -> Value {
        self.gql(
            Some(token),
            &format!(
                "mutation($input: LinkAccountInput!) {{ {mutation}(input: $input) {{ provider status individualStatus username origin canValidateLogin }} }}"
            ),
            json!({"input": {"username": username, "password": password}}),
        )
        .await
    }

    pub async fn register(
        &self,
        token: &str,
        provider: &str,
        username: &str,
        promo: &str,
    ) -> Value {
        self.gql(
            Some(token),
            "mutation($input: RegisterProviderAccountInput!) { registerProviderAccount(input: $input) { provider status individualStatus origin } }",
            json!({"input": {
                "provider": provider, "promoCode": promo, "username": username, "password": "new-clinic-password",
                "practiceName": "Bondi Junction Family Practice", "contactEmail": "reception@bondi.example.com.au"
            }}),
        )
        .await
    }

    pub async fn integrations(&self, token: &str) -> Vec<Value> {
        let response = self
            .gql(
                Some(token),
                "{ integrations { provider status individualStatus username } }",
                json!({}),
            )
            .await;
        response["data"]["integrations"]
            .as_array()
            .cloned()
            .unwrap_or_else(|| panic!("integrations failed: {response}"))
    }

    pub async fn integration(&self, token: &str, provider: &str) -> Value {
        self.integrations(token)
            .await
            .into_iter()
            .find(|integration| integration["provider"] == provider)
            .expect("every provider is listed")
    }

    /// Calls the sandbox control API.
    pub async fn sandbox_control(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Value {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.sandbox.base_url()));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("sandbox answers");
        assert!(
            response.status().is_success(),
            "sandbox control {path} failed: {}",
            response.status()
        );
        response.json().await.unwrap_or(Value::Null)
    }

    pub async fn advance_sandbox_clock(&self, seconds: u64) {
        self.sandbox_control(
            reqwest::Method::POST,
            "/_sandbox/clock/advance",
            Some(json!({"seconds": seconds})),
        )
        .await;
    }

    pub async fn inject_fault(
        &self,
        provider: &str,
        route: &str,
        kind: &str,
        count: u32,
        extra: Value,
    ) {
        let mut body = json!({"provider": provider, "route": route, "kind": kind, "count": count});
        if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            body.extend(extra.clone());
        }
        self.sandbox_control(reqwest::Method::POST, "/_sandbox/faults", Some(body))
            .await;
    }

    /// The requests a sandbox provider (`argus`, `referralnet`, `payments`) received whose
    /// path is `path`.
    pub async fn provider_requests(&self, provider: &str, path: &str) -> usize {
        let records: Vec<Value> = self
            .client
            .get(format!(
                "{}/_sandbox/requests?provider={provider}",
                self.sandbox.base_url()
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        records
            .iter()
            .filter(|record| record["path"] == path)
            .count()
    }

    /// Counts rows in a table (to prove nothing was stored).
    pub async fn count_rows(&self, table: &str) -> i64 {
        self.store.count_rows_for_tests(table).await
    }
}

/// The `extensions.code` of the first error, if any.
pub fn error_code(response: &Value) -> Option<&str> {
    response["errors"][0]["extensions"]["code"].as_str()
}

/// Polls `check` until it returns `Some`, failing after `timeout`. No fixed sleeps.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A valid HPI-I (check digit included) for a 15-digit prefix.
pub fn valid_hpii(prefix15: &str) -> String {
    (0..10)
        .map(|digit| format!("{prefix15}{digit}"))
        .find(|candidate| smd_gateway::domain::types::Hpii::parse(candidate).is_ok())
        .unwrap()
}

/// Everything a practitioner needs to call `sendSecureMessage` except credits.
pub struct Sender {
    pub token: String,
    pub note_id: String,
    pub recipient: String,
}

pub const SEND_MESSAGE: &str = "mutation($input: SendSecureMessageInput!) { sendSecureMessage(input: $input) { message { id status provider } creditsRemaining } }";

impl TestApp {
    /// Links `subject` to the demo Argus account, sets `hpii` as theirs, writes a one-section
    /// note and picks a directory practitioner on Argus to send it to. Buys no credits.
    pub async fn ready_to_send(&self, subject: &str, group: &str, hpii: &str) -> Sender {
        let token = practitioner(subject, group);
        let linked = self
            .link(&token, "linkArgus", ARGUS_USER, ARGUS_PASSWORD)
            .await;
        assert_eq!(
            linked["data"]["linkArgus"]["individualStatus"], "ACTIVE",
            "{linked}"
        );
        let set = self
            .gql(
                Some(&token),
                "mutation($h: String!) { setMyHpii(hpii: $h) }",
                json!({"h": hpii}),
            )
            .await;
        assert!(set["errors"].is_null(), "{set}");
        let patient = self
            .gql(
                Some(&token),
                "mutation { createPatient(input: {givenName: \"Ada\", familyName: \"O'Brien\", dateOfBirth: \"1961-03-04\"}) { id } }",
                json!({}),
            )
            .await;
        let note = self
            .gql(
                Some(&token),
                "mutation($p: ID!) { createClinicalNote(input: {patientId: $p, title: \"Review\", sections: [{key: \"history\", title: \"History\", body: \"well\"}]}) { id } }",
                json!({"p": patient["data"]["createPatient"]["id"]}),
            )
            .await;
        let note_id = note["data"]["createClinicalNote"]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("{note}"))
            .to_owned();
        let search = self
            .gql(
                Some(&token),
                "{ searchPractitioners(query: \"\", first: 50, provider: ARGUS) { edges { node { id name } } } }",
                json!({}),
            )
            .await;
        let recipient = search["data"]["searchPractitioners"]["edges"]
            .as_array()
            .unwrap_or_else(|| panic!("{search}"))
            .iter()
            .find(|edge| {
                !edge["node"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("Test ")
            })
            .map(|edge| edge["node"]["id"].as_str().unwrap().to_owned())
            .unwrap_or_else(|| panic!("no Argus practitioner in {search}"));
        Sender {
            token,
            note_id,
            recipient,
        }
    }

    /// `sendSecureMessage` of the sender's note to their recipient through Argus.
    pub async fn send_note(&self, sender: &Sender, key: &str, top_up_if_short: bool) -> Value {
        self.gql(
            Some(&sender.token),
            SEND_MESSAGE,
            json!({"input": {"noteId": sender.note_id, "sectionKeys": ["history"], "recipientId": sender.recipient, "provider": "ARGUS", "idempotencyKey": key, "topUpIfShort": top_up_if_short}}),
        )
        .await
    }
}
