//! New registrations: waiting for approval, decided by the sandbox clock, seen live.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::helpers::*;

const FOUR_DAYS: u64 = 4 * 24 * 3600;

pub(crate) struct Subscription {
    socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
}

impl Subscription {
    async fn open(app: &TestApp, payload: Value) -> Result<Self, String> {
        Self::open_query(
            app,
            payload,
            "subscription { integrationStatusChanged { provider status individualStatus } }",
        )
        .await
    }

    pub(crate) async fn open_query(
        app: &TestApp,
        payload: Value,
        query: &str,
    ) -> Result<Self, String> {
        let mut request = format!("ws://{}/graphql/ws", app.address)
            .into_client_request()
            .unwrap();
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            "graphql-transport-ws".parse().unwrap(),
        );
        let (mut socket, _) = tokio_tungstenite::connect_async(request)
            .await
            .map_err(|e| e.to_string())?;
        socket
            .send(Message::text(
                json!({"type": "connection_init", "payload": payload}).to_string(),
            ))
            .await
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(Duration::from_secs(5), socket.next()).await {
            Ok(Some(Ok(Message::Text(text)))) if text.contains("connection_ack") => {}
            other => return Err(format!("no ack: {other:?}")),
        }
        socket
            .send(Message::text(
                json!({"id": "1", "type": "subscribe", "payload": {
                    "query": query
                }})
                .to_string(),
            ))
            .await
            .map_err(|e| e.to_string())?;
        Ok(Self { socket })
    }

    async fn next_change(&mut self) -> Value {
        self.next_data().await["integrationStatusChanged"].clone()
    }

    /// The `data` of the next `next` frame.
    pub(crate) async fn next_data(&mut self) -> Value {
        loop {
            let message = tokio::time::timeout(Duration::from_secs(10), self.socket.next())
                .await
                .expect("a change arrives in time")
                .expect("socket open")
                .expect("valid frame");
            if let Message::Text(text) = message {
                let value: Value = serde_json::from_str(&text).unwrap();
                if value["type"] == "next" {
                    return value["payload"]["data"].clone();
                }
                assert_ne!(value["type"], "error", "{value}");
            }
        }
    }
}

#[tokio::test]
async fn a_sandbox_promo_registration_waits_then_becomes_active_seen_through_the_subscription() {
    let app = spawn_app().await;
    let admin = administrator("manager", "clinic-1");

    let registered = app
        .register(&admin, "ARGUS", "bondi.clinic", "SANDBOX-PROMO")
        .await;
    assert_eq!(
        registered["data"]["registerProviderAccount"]["status"], "WAITING_FOR_APPROVAL",
        "{registered}"
    );
    assert_eq!(
        registered["data"]["registerProviderAccount"]["origin"],
        "REGISTERED"
    );

    let mut subscription =
        Subscription::open(&app, json!({"Authorization": format!("Bearer {admin}")}))
            .await
            .unwrap();
    // Prove the subscription is live before the decision: a second registration shows up first.
    app.register(&admin, "REFERRALNET", "bondi.clinic", "SANDBOX-PROMO")
        .await;
    let first = subscription.next_change().await;
    assert_eq!(
        first,
        json!({"provider": "REFERRALNET", "status": "WAITING_FOR_APPROVAL", "individualStatus": "NOT_CONNECTED"})
    );
    // Three sandbox days are not enough.
    app.advance_sandbox_clock(3 * 24 * 3600 - 60).await;
    assert_eq!(
        app.integration(&admin, "ARGUS").await["status"],
        "WAITING_FOR_APPROVAL"
    );

    app.advance_sandbox_clock(FOUR_DAYS).await;

    let mut active = Vec::new();
    while active.len() < 2 {
        let change = subscription.next_change().await;
        assert_eq!(change["status"], "ACTIVE", "{change}");
        active.push(change["provider"].as_str().unwrap().to_owned());
    }
    active.sort();
    assert_eq!(active, ["ARGUS", "REFERRALNET"]);
    assert_eq!(app.integration(&admin, "ARGUS").await["status"], "ACTIVE");
}

#[tokio::test]
async fn a_sandbox_reject_registration_ends_rejected() {
    let app = spawn_app().await;
    let chen = practitioner("dr-chen", "clinic-1");

    let registered = app
        .register(&chen, "REFERRALNET", "rejected.clinic", "SANDBOX-REJECT")
        .await;
    assert_eq!(
        registered["data"]["registerProviderAccount"]["status"], "WAITING_FOR_APPROVAL",
        "{registered}"
    );
    app.advance_sandbox_clock(FOUR_DAYS).await;

    let status = eventually(Duration::from_secs(10), || async {
        let integration = app.integration(&chen, "REFERRALNET").await;
        (integration["status"] != "WAITING_FOR_APPROVAL").then_some(integration["status"].clone())
    })
    .await;
    assert_eq!(status, "REJECTED");
}

#[tokio::test]
async fn validate_login_before_approval_is_refused() {
    let app = spawn_app().await;
    let chen = practitioner("dr-chen", "clinic-1");
    app.register(&chen, "ARGUS", "waiting.clinic", "SANDBOX-PROMO")
        .await;

    let response = app
        .gql(
            Some(&chen),
            "mutation { validateLogin(provider: ARGUS) { valid } }",
            json!({}),
        )
        .await;

    assert_eq!(
        error_code(&response),
        Some("INTEGRATION_NOT_ACTIVE"),
        "{response}"
    );
    assert!(
        response["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("waiting")
    );
}

#[tokio::test]
async fn approving_in_the_sandbox_control_api_shows_without_moving_the_clock() {
    let app = spawn_app().await;
    let chen = practitioner("dr-chen", "clinic-1");
    app.register(&chen, "ARGUS", "fast.clinic", "SANDBOX-PROMO")
        .await;

    app.sandbox_control(
        reqwest::Method::POST,
        "/_sandbox/registrations/argus/fast.clinic/approve",
        None,
    )
    .await;

    eventually(Duration::from_secs(10), || async {
        (app.integration(&chen, "ARGUS").await["individualStatus"] == "ACTIVE").then_some(())
    })
    .await;
}

#[tokio::test]
async fn an_invalid_promo_code_is_rejected_and_nothing_is_stored() {
    let app = spawn_app().await;
    let chen = practitioner("dr-chen", "clinic-1");

    let response = app
        .register(&chen, "ARGUS", "new.clinic", "NOT-A-PROMO")
        .await;

    assert_eq!(
        error_code(&response),
        Some("PROVIDER_REJECTED"),
        "{response}"
    );
    assert!(
        response["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("promo code")
    );
    assert_eq!(app.count_rows("provider_accounts").await, 0);
}

#[tokio::test]
async fn registering_twice_answers_the_same_and_a_different_registration_conflicts() {
    let app = spawn_app().await;
    let chen = practitioner("dr-chen", "clinic-1");
    app.register(&chen, "ARGUS", "twice.clinic", "SANDBOX-PROMO")
        .await;

    let again = app
        .register(&chen, "ARGUS", "twice.clinic", "SANDBOX-PROMO")
        .await;
    assert_eq!(
        again["data"]["registerProviderAccount"]["status"], "WAITING_FOR_APPROVAL",
        "{again}"
    );
    let other = app
        .register(&chen, "ARGUS", "other.clinic", "SANDBOX-PROMO")
        .await;
    assert_eq!(error_code(&other), Some("CONFLICT"), "{other}");
    assert_eq!(app.count_rows("provider_accounts").await, 1);
}

#[tokio::test]
async fn a_subscription_without_a_valid_token_is_refused() {
    let app = spawn_app().await;
    assert!(Subscription::open(&app, json!({})).await.is_err());
    assert!(
        Subscription::open(&app, json!({"Authorization": "Bearer not-a-token"}))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn the_watcher_backs_off_through_provider_faults_and_still_sees_the_decision() {
    let app = spawn_app().await;
    let admin = administrator("manager", "clinic-1");
    app.register(&admin, "ARGUS", "flaky.clinic", "SANDBOX-PROMO")
        .await;
    // The next five account checks fail; the watcher must keep its schedule and try again.
    app.inject_fault("argus", "account", "server_error", 5, json!({}))
        .await;
    app.advance_sandbox_clock(FOUR_DAYS).await;

    eventually(Duration::from_secs(20), || async {
        (app.integration(&admin, "ARGUS").await["status"] == "ACTIVE").then_some(())
    })
    .await;
    let faults = app
        .sandbox_control(reqwest::Method::GET, "/_sandbox/faults", None)
        .await;
    assert_eq!(
        faults,
        json!([]),
        "every injected failure was consumed by a retry"
    );
}

#[tokio::test]
async fn a_waiting_registration_is_still_watched_after_the_gateway_restarts() {
    let app = spawn_app().await;
    let admin = administrator("manager", "clinic-1");
    app.register(&admin, "REFERRALNET", "restart.clinic", "SANDBOX-PROMO")
        .await;
    // A second gateway on the same database (a restart, or another node) takes over.
    let second = app.spawn_second_gateway().await;
    app.stop().await;
    app.advance_sandbox_clock(FOUR_DAYS).await;

    eventually(Duration::from_secs(10), || async {
        (second.integration(&admin, "REFERRALNET").await["status"] == "ACTIVE").then_some(())
    })
    .await;
}
