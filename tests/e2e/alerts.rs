//! Delivery alerts and expiry: sent messages not delivered, or not acknowledged, in time are
//! flagged once per reason and announced only to their sender; one the provider accepted but
//! never delivered expires `FAILED` without a refund.
//!
//! The gateway measures these deadlines on its own clock, so these tests configure them in
//! seconds (`spawn_app_configured`) and move only the sandbox's clock to decide what the
//! provider does.

use std::time::Duration;

use serde_json::{Value, json};
use smd_gateway::Settings;

use crate::helpers::*;
use crate::registration::Subscription;
use crate::ws::{WsClient, WsEvent, ws_error_code};

/// Never delivered within a sandbox hour (we never advance its clock that far here).
const SLOW_DELIVERY: &str = "8003619999900050";
/// Delivered five sandbox seconds after acceptance, never acknowledged.
const NEVER_ACKNOWLEDGES: &str = "8003619999900043";

const ATTENTION: &str = "subscription { messageNeedsAttention { id status refunded failureReason needsAttention { reason since } } }";

fn key() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Flag after 1 s without delivery or acknowledgement; expire after 3 s without delivery.
fn quick_alerts(settings: &mut Settings) {
    settings.messaging.undelivered_alert_after_seconds = 1;
    settings.messaging.unacknowledged_alert_after_seconds = 1;
    settings.messaging.expire_after_seconds = 3;
    settings.messaging.attention_check_interval_ms = Some(100);
}

impl TestApp {
    /// [`TestApp::ready_to_send`] plus a card and 100 credits.
    async fn funded_sender(&self, subject: &str, group: &str, hpii: &str) -> Sender {
        let sender = self.ready_to_send(subject, group, hpii).await;
        self.gql(
            Some(&sender.token),
            "mutation { setPaymentMethod(input: {token: \"pm_sandbox_approve\"}) { last4 } }",
            json!({}),
        )
        .await;
        let bought = self
            .gql(
                Some(&sender.token),
                "mutation($key: String!) { purchaseCredits(input: {packId: \"pack-100\", idempotencyKey: $key}) { balance } }",
                json!({"key": key()}),
            )
            .await;
        assert_eq!(
            bought["data"]["purchaseCredits"]["balance"], 100,
            "{bought}"
        );
        sender
    }

    /// Sends the sender's note to `recipient` through Argus; returns the message id.
    async fn send_to(&self, sender: &Sender, recipient: &str) -> String {
        let sent = self
            .gql(
                Some(&sender.token),
                SEND_MESSAGE,
                json!({"input": {"noteId": sender.note_id, "sectionKeys": ["history"], "recipientId": recipient, "provider": "ARGUS", "idempotencyKey": key()}}),
            )
            .await;
        sent["data"]["sendSecureMessage"]["message"]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("{sent}"))
            .to_owned()
    }

    async fn outbound(&self, token: &str, needs_attention: Option<bool>) -> Vec<Value> {
        let response = self
            .gql(
                Some(token),
                "query($n: Boolean) { messages(direction: OUTBOUND, needsAttention: $n) { edges { node { id status refunded needsAttention { reason since } } } } }",
                json!({"n": needs_attention}),
            )
            .await;
        response["data"]["messages"]["edges"]
            .as_array()
            .unwrap_or_else(|| panic!("{response}"))
            .iter()
            .map(|edge| edge["node"].clone())
            .collect()
    }

    async fn wait_for_message_status(&self, token: &str, id: &str, wanted: &str) {
        eventually(Duration::from_secs(15), || async {
            self.outbound(token, None)
                .await
                .iter()
                .any(|node| node["id"] == id && node["status"] == wanted)
                .then_some(())
        })
        .await;
    }

    /// The group's audit events for one message, as (action, detail).
    async fn attention_audit(&self, admin: &str, message_id: &str) -> Vec<String> {
        let response = self
            .gql(
                Some(admin),
                "{ auditEvents(first: 100) { edges { node { action target detail } } } }",
                json!({}),
            )
            .await;
        response["data"]["auditEvents"]["edges"]
            .as_array()
            .unwrap_or_else(|| panic!("{response}"))
            .iter()
            .map(|edge| &edge["node"])
            .filter(|node| {
                node["action"] == "MESSAGE_NEEDS_ATTENTION"
                    && node["target"] == format!("message:{message_id}").as_str()
            })
            .map(|node| node["detail"].as_str().unwrap_or_default().to_owned())
            .collect()
    }
}

#[tokio::test]
async fn an_undelivered_message_is_flagged_once_then_expires_failed_without_a_refund_on_any_node() {
    let app = spawn_app_configured(Options::default(), quick_alerts).await;
    // On PostgreSQL a second node on the same database runs its own alert worker and outbox
    // (its flags reach this node's subscriber through NOTIFY). SQLite is one node by design:
    // its events stay in-process, so there the test runs one node.
    let second = match app.sqlite_path {
        None => Some(app.spawn_second_gateway().await),
        Some(_) => None,
    };
    let chen = app
        .funded_sender("dr-chen", "clinic-1", &valid_hpii("800361000000001"))
        .await;
    let mut watching = Subscription::open_query(
        &app,
        json!({"Authorization": format!("Bearer {}", chen.token)}),
        ATTENTION,
    )
    .await
    .unwrap();

    let id = app.send_to(&chen, SLOW_DELIVERY).await;

    let first = watching.next_data().await["messageNeedsAttention"].clone();
    assert_eq!(first["id"], id.as_str(), "{first}");
    assert_eq!(first["status"], "SENT", "{first}");
    assert_eq!(
        first["needsAttention"]["reason"], "NOT_DELIVERED",
        "{first}"
    );
    // The next event is the expiry, two seconds and many worker passes (on two nodes) later:
    // NOT_DELIVERED is never announced twice.
    let second_event = watching.next_data().await["messageNeedsAttention"].clone();
    assert_eq!(second_event["id"], id.as_str(), "{second_event}");
    assert_eq!(
        second_event["needsAttention"]["reason"], "EXPIRED",
        "{second_event}"
    );
    assert_eq!(second_event["status"], "FAILED", "{second_event}");
    assert_eq!(second_event["refunded"], false, "{second_event}");
    assert!(
        second_event["failureReason"]
            .as_str()
            .unwrap()
            .starts_with("expired: Argus accepted the message"),
        "{second_event}"
    );

    // No refund: the 3 credits stay spent and no REFUND entry exists.
    let credits = app
        .gql(
            Some(&chen.token),
            "{ credits { balance ledger { edges { node { kind } } } } }",
            json!({}),
        )
        .await;
    assert_eq!(credits["data"]["credits"]["balance"], 97, "{credits}");
    let kinds: Vec<&str> = credits["data"]["credits"]["ledger"]["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|edge| edge["node"]["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, vec!["SEND_DEBIT", "PURCHASE"], "{credits}");

    // Listed as needing attention, with the reason it shows now.
    let flagged = app.outbound(&chen.token, Some(true)).await;
    assert_eq!(flagged.len(), 1, "{flagged:?}");
    assert_eq!(flagged[0]["needsAttention"]["reason"], "EXPIRED");
    assert!(app.outbound(&chen.token, Some(false)).await.is_empty());

    // Flagged once per reason across both nodes: one audit event each.
    let admin = administrator("manager", "clinic-1");
    let audit = app.attention_audit(&admin, &id).await;
    assert_eq!(audit.len(), 2, "{audit:?}");
    assert!(
        audit
            .iter()
            .any(|detail| detail.starts_with("NOT_DELIVERED"))
    );
    assert!(audit.iter().any(|detail| detail.starts_with("EXPIRED")));
    // The provider got the message once; nothing was sent again.
    assert_eq!(
        app.provider_requests("argus", "/argus/v1/messages").await,
        1
    );
    if let Some(second) = second {
        second.stop().await;
    }
}

#[tokio::test]
async fn a_delivered_message_not_acknowledged_in_time_is_flagged_and_an_acknowledged_one_is_not() {
    let app = spawn_app_configured(Options::default(), |settings| {
        settings.messaging.undelivered_alert_after_seconds = 600;
        settings.messaging.unacknowledged_alert_after_seconds = 1;
        settings.messaging.attention_check_interval_ms = Some(100);
    })
    .await;
    let chen = app
        .funded_sender("dr-chen", "clinic-1", &valid_hpii("800361000000001"))
        .await;
    let silent = app.send_to(&chen, NEVER_ACKNOWLEDGES).await;
    let normal = app.send_to(&chen, &chen.recipient).await;
    app.wait_for_message_status(&chen.token, &silent, "SENT")
        .await;
    app.wait_for_message_status(&chen.token, &normal, "SENT")
        .await;
    app.advance_sandbox_clock(30).await;
    app.wait_for_message_status(&chen.token, &normal, "ACKNOWLEDGED")
        .await;

    let flagged = eventually(Duration::from_secs(15), || async {
        let flagged = app.outbound(&chen.token, Some(true)).await;
        (!flagged.is_empty()).then_some(flagged)
    })
    .await;
    assert_eq!(flagged.len(), 1, "{flagged:?}");
    assert_eq!(flagged[0]["id"], silent.as_str());
    assert_eq!(flagged[0]["status"], "DELIVERED");
    assert_eq!(flagged[0]["needsAttention"]["reason"], "NOT_ACKNOWLEDGED");
    // The acknowledged message needs nothing, and is not in the flagged list.
    let rest = app.outbound(&chen.token, Some(false)).await;
    assert_eq!(rest.len(), 1, "{rest:?}");
    assert_eq!(rest[0]["id"], normal.as_str());
    assert!(rest[0]["needsAttention"].is_null(), "{rest:?}");
    // Not delivered in time was never said of either (600 s deadline), and nothing refunded.
    let admin = administrator("manager", "clinic-1");
    assert_eq!(
        app.attention_audit(&admin, &normal).await,
        Vec::<String>::new()
    );
    let audit = app.attention_audit(&admin, &silent).await;
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert!(audit[0].starts_with("NOT_ACKNOWLEDGED"), "{audit:?}");
    assert!(flagged.iter().all(|node| node["refunded"] == false));
}

#[tokio::test]
async fn another_practice_and_a_colleague_are_never_told_about_a_practitioners_flagged_message() {
    let app = spawn_app_configured(Options::default(), quick_alerts).await;
    let chen = app
        .funded_sender("dr-chen", "clinic-1", &valid_hpii("800361000000001"))
        .await;
    let patel = app
        .funded_sender("dr-patel", "clinic-1", &valid_hpii("800361000000002"))
        .await;
    // The same provider account in another practice is refused, so the other practice only
    // watches: its subscriber must see nothing of clinic-1's messages.
    let other = practitioner("dr-lee", "clinic-2");
    let mut colleague = Subscription::open_query(
        &app,
        json!({"Authorization": format!("Bearer {}", patel.token)}),
        ATTENTION,
    )
    .await
    .unwrap();
    let mut stranger = WsClient::ready(&app, &other).await;
    stranger.subscribe("stranger", ATTENTION).await;
    let mut owner = Subscription::open_query(
        &app,
        json!({"Authorization": format!("Bearer {}", chen.token)}),
        ATTENTION,
    )
    .await
    .unwrap();

    let chens = app.send_to(&chen, SLOW_DELIVERY).await;
    let seen = owner.next_data().await["messageNeedsAttention"].clone();
    assert_eq!(seen["id"], chens.as_str(), "{seen}");

    // Dr Patel's own message is the first thing his subscription reports: Dr Chen's flag,
    // made earlier, never reached him.
    let patels = app.send_to(&patel, SLOW_DELIVERY).await;
    let first_for_patel = colleague.next_data().await["messageNeedsAttention"].clone();
    assert_eq!(first_for_patel["id"], patels.as_str(), "{first_for_patel}");
    assert_eq!(first_for_patel["needsAttention"]["reason"], "NOT_DELIVERED");

    // The other practice cannot list them either, and its subscriber was given nothing by the
    // time both messages have expired.
    for (token, id) in [(&chen.token, &chens), (&patel.token, &patels)] {
        app.wait_for_message_status(token, id, "FAILED").await;
    }
    let listed = app
        .gql(
            Some(&other),
            "{ messages(needsAttention: true) { edges { node { id } } } }",
            json!({}),
        )
        .await;
    assert_eq!(listed["data"]["messages"]["edges"], json!([]), "{listed}");
    // Whatever the server had sent the stranger would come before its answer to our close.
    match stranger.close_with(1000).await {
        WsEvent::Closed(code, _) => assert_eq!(code, 1000),
        WsEvent::Message(message) => panic!("the other practice was told: {message}"),
    }

    // Administrators do not follow messages (they never see sent ones).
    let admin = administrator("manager", "clinic-1");
    let mut refused = WsClient::ready(&app, &admin).await;
    refused.subscribe("admin", ATTENTION).await;
    let answer = refused.result_of("admin").await;
    assert_eq!(ws_error_code(&answer), Some("FORBIDDEN"), "{answer}");
}
