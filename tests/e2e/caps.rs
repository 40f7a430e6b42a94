//! Monthly spending caps: set only by administrators, decided in the purchase's own write
//! transaction, so that no number of parallel purchases (over HTTP or WebSocket) passes one,
//! and a refused purchase charges nothing.

use std::time::Duration;

use futures::future::join_all;
use serde_json::{Value, json};

use crate::helpers::*;
use crate::ws::WsClient;

const PURCHASE: &str = "mutation($input: PurchaseCreditsInput!) { purchaseCredits(input: $input) { purchase { id status amountCents } balance } }";
const SET_CAP: &str = "mutation($input: SetSpendingCapInput!) { setSpendingCap(input: $input) { scope monthlyLimitCents spentThisMonthCents remainingCents periodStart periodEnd } }";
const CAPS: &str = "query($id: ID) { credits(practitionerId: $id) { balance spendingCap { scope monthlyLimitCents spentThisMonthCents remainingCents } practiceSpendingCap { scope monthlyLimitCents spentThisMonthCents remainingCents } } }";

/// A pack-100 costs $22.00.
const PACK_100_CENTS: i64 = 2_200;

fn key() -> String {
    uuid::Uuid::new_v4().to_string()
}

impl TestApp {
    async fn set_cap(&self, token: &str, practitioner: Option<&str>, cents: Option<i64>) -> Value {
        self.gql(
            Some(token),
            SET_CAP,
            json!({"input": {"practitionerId": practitioner, "monthlyLimitCents": cents}}),
        )
        .await
    }

    async fn caps(&self, token: &str, practitioner: Option<&str>) -> Value {
        let response = self
            .gql(Some(token), CAPS, json!({"id": practitioner}))
            .await;
        assert!(response["errors"].is_null(), "{response}");
        response["data"]["credits"].clone()
    }

    async fn purchase(&self, token: &str, key: &str, practitioner: Option<&str>) -> Value {
        self.gql(
            Some(token),
            PURCHASE,
            json!({"input": {"packId": "pack-100", "idempotencyKey": key, "practitionerId": practitioner}}),
        )
        .await
    }

    async fn charges_with_status(&self, status: &str) -> usize {
        self.sandbox_control(reqwest::Method::GET, "/_sandbox/charges", None)
            .await
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter(|charge| charge["status"] == status)
            .count()
    }

    /// Audit events with this action and outcome, as their details.
    async fn audited(&self, admin: &str, action: &str, outcome: &str) -> Vec<String> {
        let response = self
            .gql(
                Some(admin),
                "{ auditEvents(first: 100) { edges { node { action outcome detail } } } }",
                json!({}),
            )
            .await;
        response["data"]["auditEvents"]["edges"]
            .as_array()
            .unwrap_or_else(|| panic!("{response}"))
            .iter()
            .map(|edge| &edge["node"])
            .filter(|node| node["action"] == action && node["outcome"] == outcome)
            .map(|node| node["detail"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    async fn approve_card(&self, token: &str) {
        let set = self
            .gql(
                Some(token),
                "mutation { setPaymentMethod(input: {token: \"pm_sandbox_approve\"}) { last4 } }",
                json!({}),
            )
            .await;
        assert!(set["errors"].is_null(), "{set}");
    }

    async fn provision(&self, token: &str) {
        let me = self.gql(Some(token), "{ me { id } }", json!({})).await;
        assert!(me["errors"].is_null(), "{me}");
    }
}

/// Splits answers into (succeeded, refused at the cap), failing on anything else.
fn tally(answers: &[Value]) -> (usize, usize) {
    let mut succeeded = 0;
    let mut refused = 0;
    for answer in answers {
        match error_code(answer) {
            None if answer["data"]["purchaseCredits"]["purchase"]["status"] == "SUCCEEDED" => {
                succeeded += 1
            }
            Some("SPENDING_LIMIT_REACHED") => refused += 1,
            _ => panic!("neither a purchase nor a cap refusal: {answer}"),
        }
    }
    (succeeded, refused)
}

#[tokio::test]
async fn only_administrators_set_spending_caps_and_a_refused_attempt_changes_nothing() {
    let app = spawn_app().await;
    let admin = administrator("manager", "clinic-1");
    let chen = practitioner("dr-chen", "clinic-1");
    app.provision(&chen).await;

    for practitioner in [Some("dr-chen"), None] {
        let refused = app.set_cap(&chen, practitioner, Some(1_000_000)).await;
        assert_eq!(error_code(&refused), Some("FORBIDDEN"), "{refused}");
    }
    let caps = app.caps(&chen, None).await;
    assert!(caps["spendingCap"]["monthlyLimitCents"].is_null(), "{caps}");
    assert!(
        caps["practiceSpendingCap"]["monthlyLimitCents"].is_null(),
        "{caps}"
    );
    assert_eq!(app.count_rows("spending_caps").await, 0);
    assert_eq!(
        app.audited(&admin, "SET_SPENDING_CAP", "DENIED")
            .await
            .len(),
        2
    );

    // Bad amounts are refused before anything is stored; a practitioner of another practice
    // is not found.
    for cents in [-1, 100_000_001] {
        let bad = app.set_cap(&admin, Some("dr-chen"), Some(cents)).await;
        assert_eq!(error_code(&bad), Some("BAD_USER_INPUT"), "{bad}");
    }
    let elsewhere = app.set_cap(&admin, Some("dr-lee"), Some(5_000)).await;
    assert_eq!(error_code(&elsewhere), Some("NOT_FOUND"), "{elsewhere}");
    assert_eq!(app.count_rows("spending_caps").await, 0);

    let set = app.set_cap(&admin, Some("dr-chen"), Some(5_000)).await;
    assert_eq!(
        set["data"]["setSpendingCap"]["scope"], "PRACTITIONER",
        "{set}"
    );
    assert_eq!(
        set["data"]["setSpendingCap"]["remainingCents"], 5_000,
        "{set}"
    );
    let removed = app.set_cap(&admin, Some("dr-chen"), None).await;
    assert!(
        removed["data"]["setSpendingCap"]["monthlyLimitCents"].is_null(),
        "{removed}"
    );
    assert_eq!(app.count_rows("spending_caps").await, 0);
    assert_eq!(
        app.audited(&admin, "SET_SPENDING_CAP", "SUCCESS")
            .await
            .len(),
        2
    );
}

#[tokio::test]
async fn a_purchase_past_a_practitioners_cap_is_refused_charges_nothing_and_keeps_its_key() {
    let app = spawn_app().await;
    let admin = administrator("manager", "clinic-1");
    let chen = practitioner("dr-chen", "clinic-1");
    app.provision(&chen).await;
    app.approve_card(&chen).await;
    app.set_cap(&admin, Some("dr-chen"), Some(5_000)).await;

    for _ in 0..2 {
        let bought = app.purchase(&chen, &key(), None).await;
        assert_eq!(tally(&[bought]), (1, 0));
    }
    let retried_key = key();
    let refused = app.purchase(&chen, &retried_key, None).await;
    assert_eq!(
        error_code(&refused),
        Some("SPENDING_LIMIT_REACHED"),
        "{refused}"
    );
    let message = refused["errors"][0]["message"].as_str().unwrap();
    for part in [
        "$22.00",
        "dr-chen name's monthly spending cap of $50.00",
        "$44.00 spent this month",
        "$6.00 left",
        "nothing was charged",
        "an administrator",
    ] {
        assert!(message.contains(part), "{part:?} missing from {message:?}");
    }
    // Nothing charged, stored or credited for it; the refusal is in the audit trail.
    assert_eq!(app.charges_with_status("succeeded").await, 2);
    assert_eq!(app.count_rows("purchases").await, 2);
    let caps = app.caps(&chen, None).await;
    assert_eq!(caps["balance"], 200, "{caps}");
    assert_eq!(
        caps["spendingCap"],
        json!({"scope": "PRACTITIONER", "monthlyLimitCents": 5000, "spentThisMonthCents": 4400, "remainingCents": 600})
    );
    let denied = app.audited(&admin, "PURCHASE_CREDITS", "DENIED").await;
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert!(denied[0].starts_with("SPENDING_LIMIT_REACHED: MANUAL 100 credits, 2200 cents"));

    // The key was not used up: once the cap allows it, the same request goes through.
    app.set_cap(&admin, Some("dr-chen"), Some(10_000)).await;
    let bought = app.purchase(&chen, &retried_key, None).await;
    assert_eq!(tally(&[bought]), (1, 0));
    assert_eq!(app.charges_with_status("succeeded").await, 3);
}

#[tokio::test]
async fn thirty_parallel_purchases_over_http_never_pass_the_practices_cap() {
    let app = spawn_app().await;
    let admin = administrator("manager", "clinic-1");
    for subject in ["dr-chen", "dr-patel", "dr-lee"] {
        app.provision(&practitioner(subject, "clinic-1")).await;
    }
    app.approve_card(&admin).await;
    // Room for exactly five $22.00 packs, whoever they are for.
    let cap = 5 * PACK_100_CENTS + PACK_100_CENTS / 2;
    app.set_cap(&admin, None, Some(cap)).await;

    let answers = join_all((0..30).map(|attempt| {
        let subject = ["dr-chen", "dr-patel", "dr-lee"][attempt % 3];
        let (app, admin) = (&app, &admin);
        async move { app.purchase(admin, &key(), Some(subject)).await }
    }))
    .await;

    assert_eq!(tally(&answers), (5, 25));
    assert_eq!(app.charges_with_status("succeeded").await, 5);
    assert_eq!(app.charges_with_status("declined").await, 0);
    assert_eq!(app.count_rows("purchases").await, 5);
    let caps = app.caps(&admin, Some("dr-chen")).await;
    assert_eq!(
        caps["practiceSpendingCap"]["spentThisMonthCents"],
        5 * PACK_100_CENTS,
        "{caps}"
    );
    assert_eq!(
        caps["practiceSpendingCap"]["remainingCents"],
        PACK_100_CENTS / 2
    );
    let practice = app
        .gql(
            Some(&admin),
            "{ practiceSpendingCap { scope monthlyLimitCents spentThisMonthCents remainingCents } }",
            json!({}),
        )
        .await;
    assert_eq!(
        practice["data"]["practiceSpendingCap"],
        json!({"scope": "PRACTICE", "monthlyLimitCents": cap, "spentThisMonthCents": 5 * PACK_100_CENTS, "remainingCents": PACK_100_CENTS / 2}),
        "{practice}"
    );
    assert_eq!(
        app.audited(&admin, "PURCHASE_CREDITS", "DENIED")
            .await
            .len(),
        25
    );
}

#[tokio::test]
async fn parallel_purchases_over_websockets_never_pass_a_practitioners_cap() {
    let app = spawn_app().await;
    let admin = administrator("manager", "clinic-1");
    let chen = practitioner("dr-chen", "clinic-1");
    app.provision(&chen).await;
    app.approve_card(&chen).await;
    app.set_cap(&admin, Some("dr-chen"), Some(3 * PACK_100_CENTS))
        .await;

    // Four sockets, six purchases on each, all at once.
    let mut sockets = Vec::new();
    for _ in 0..4 {
        sockets.push(WsClient::ready(&app, &chen).await);
    }
    let answers: Vec<Value> = join_all(sockets.iter_mut().map(|socket| async move {
        let mut answers = Vec::new();
        let ids: Vec<String> = (0..6).map(|n| format!("buy-{n}")).collect();
        for id in &ids {
            socket
                .send(json!({"id": id, "type": "subscribe", "payload": {"query": PURCHASE, "variables": {"input": {"packId": "pack-100", "idempotencyKey": key()}}}}))
                .await;
        }
        for id in &ids {
            let message = socket.result_of(id).await;
            answers.push(if message["type"] == "error" {
                json!({"errors": message["payload"]})
            } else {
                message["payload"].clone()
            });
        }
        answers
    }))
    .await
    .into_iter()
    .flatten()
    .collect();

    assert_eq!(answers.len(), 24);
    assert_eq!(tally(&answers), (3, 21));
    assert_eq!(app.charges_with_status("succeeded").await, 3);
    assert_eq!(app.count_rows("purchases").await, 3);
    let caps = app.caps(&chen, None).await;
    assert_eq!(caps["balance"], 300, "{caps}");
    assert_eq!(caps["spendingCap"]["remainingCents"], 0, "{caps}");
}

#[tokio::test]
async fn buying_at_send_time_past_the_cap_is_refused_and_nothing_is_sent_stored_or_charged() {
    let app = spawn_app().await;
    let admin = administrator("manager", "clinic-1");
    let sender = app
        .ready_to_send("dr-chen", "clinic-1", &valid_hpii("800361000000001"))
        .await;
    app.approve_card(&sender.token).await;
    // 0 allows no purchases at all.
    app.set_cap(&admin, Some("dr-chen"), Some(0)).await;

    let refused = app.send_note(&sender, &key(), true).await;
    assert_eq!(
        error_code(&refused),
        Some("SPENDING_LIMIT_REACHED"),
        "{refused}"
    );
    assert!(
        refused["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("of $0.00"),
        "{refused}"
    );
    assert_eq!(app.count_rows("messages").await, 0);
    assert_eq!(app.count_rows("purchases").await, 0);
    assert_eq!(app.charges_with_status("succeeded").await, 0);
    assert_eq!(
        app.provider_requests("argus", "/argus/v1/messages").await,
        0
    );
    let denied = app.audited(&admin, "PURCHASE_CREDITS", "DENIED").await;
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert!(
        denied[0].starts_with("SPENDING_LIMIT_REACHED: BUY_AT_SEND"),
        "{denied:?}"
    );
}

#[tokio::test]
async fn auto_top_up_at_the_cap_buys_nothing_and_says_why() {
    let app = spawn_app().await;
    let admin = administrator("manager", "clinic-1");
    let sender = app
        .ready_to_send("dr-chen", "clinic-1", &valid_hpii("800361000000001"))
        .await;
    app.approve_card(&sender.token).await;
    app.set_cap(&admin, None, Some(PACK_100_CENTS)).await;
    let bought = app.purchase(&sender.token, &key(), None).await;
    assert_eq!(tally(&[bought]), (1, 0));
    let auto = app
        .gql(
            Some(&sender.token),
            "mutation { setAutoTopUp(input: {enabled: true, thresholdCredits: 100, packId: \"pack-100\"}) { autoTopUp { enabled } } }",
            json!({}),
        )
        .await;
    assert_eq!(
        auto["data"]["setAutoTopUp"]["autoTopUp"]["enabled"], true,
        "{auto}"
    );

    // The send itself is paid from the balance; the top-up it would trigger is refused.
    let sent = app.send_note(&sender, &key(), false).await;
    assert_eq!(
        sent["data"]["sendSecureMessage"]["creditsRemaining"], 97,
        "{sent}"
    );
    let failure = eventually(Duration::from_secs(10), || async {
        let response = app
            .gql(
                Some(&sender.token),
                "{ credits { balance autoTopUp { enabled lastFailure consecutiveFailures } } }",
                json!({}),
            )
            .await;
        let top_up = response["data"]["credits"]["autoTopUp"].clone();
        top_up["lastFailure"]
            .is_string()
            .then_some((response, top_up))
    })
    .await;
    let (credits, top_up) = failure;
    assert!(
        top_up["lastFailure"]
            .as_str()
            .unwrap()
            .contains("refused by the practice's monthly spending cap of $22.00"),
        "{top_up}"
    );
    // Still on (a cap is not a decline), no second purchase or charge, no credits added.
    assert_eq!(top_up["enabled"], true);
    assert_eq!(top_up["consecutiveFailures"], 0);
    assert_eq!(credits["data"]["credits"]["balance"], 97);
    assert_eq!(app.count_rows("purchases").await, 1);
    assert_eq!(app.charges_with_status("succeeded").await, 1);
    let denied = app.audited(&admin, "PURCHASE_CREDITS", "DENIED").await;
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert!(
        denied[0].starts_with("SPENDING_LIMIT_REACHED: AUTO_TOP_UP"),
        "{denied:?}"
    );
}
