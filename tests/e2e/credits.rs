//! Credits: purchases, the exactly-once ledger, transfers, auto top-up, buy at send.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;

const PURCHASE: &str = "mutation($input: PurchaseCreditsInput!) { purchaseCredits(input: $input) { purchase { id credits amountCents gstCents status } balance } }";
const TRANSFER: &str = "mutation($input: TransferCreditsInput!) { transferCredits(input: $input) { transferId credits fromBalance toBalance } }";

fn key() -> String {
    uuid::Uuid::new_v4().to_string()
}

impl TestApp {
    async fn set_card(&self, token: &str, card: &str) -> Value {
        self.gql(
            Some(token),
            "mutation($input: SetPaymentMethodInput!) { setPaymentMethod(input: $input) { brand last4 display } }",
            json!({"input": {"token": card}}),
        )
        .await
    }

    async fn buy(&self, token: &str, pack: &str, key: &str, practitioner: Option<&str>) -> Value {
        self.gql(Some(token), PURCHASE, json!({"input": {"packId": pack, "idempotencyKey": key, "practitionerId": practitioner}}))
            .await
    }

    async fn balance(&self, token: &str, practitioner: Option<&str>) -> i64 {
        let response = self
            .gql(
                Some(token),
                "query($id: ID) { credits(practitionerId: $id) { balance } }",
                json!({"id": practitioner}),
            )
            .await;
        response["data"]["credits"]["balance"]
            .as_i64()
            .unwrap_or_else(|| panic!("{response}"))
    }

    async fn charges(&self) -> Vec<Value> {
        self.sandbox_control(reqwest::Method::GET, "/_sandbox/charges", None)
            .await
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    async fn succeeded_charges(&self) -> Vec<Value> {
        self.charges()
            .await
            .into_iter()
            .filter(|charge| charge["status"] == "succeeded")
            .collect()
    }

    /// Provisions the token's user (as its first request would).
    async fn touch(&self, token: &str) {
        let response = self.gql(Some(token), "{ me { id } }", json!({})).await;
        assert!(response["errors"].is_null(), "{response}");
    }

    /// A practitioner with `credits` bought through the API (100-credit packs).
    async fn funded_practitioner(&self, subject: &str, group: &str, packs: usize) -> String {
        let token = practitioner(subject, group);
        self.set_card(&token, "pm_sandbox_approve").await;
        for _ in 0..packs {
            let response = self.buy(&token, "pack-100", &key(), None).await;
            assert_eq!(
                response["data"]["purchaseCredits"]["purchase"]["status"], "SUCCEEDED",
                "{response}"
            );
        }
        token
    }
}

#[tokio::test]
async fn credit_packs_are_priced_by_purchase_size_in_whole_cents() {
    let app = spawn_app().await;
    let token = practitioner("dr-chen", "clinic-1");
    let response = app
        .gql(
            Some(&token),
            "{ creditPacks { id credits priceCents centsPerCredit gstCents } }",
            json!({}),
        )
        .await;
    assert_eq!(
        response["data"]["creditPacks"],
        json!([
            {"id": "pack-100", "credits": 100, "priceCents": 2200, "centsPerCredit": 22, "gstCents": 200},
            {"id": "pack-500", "credits": 500, "priceCents": 10000, "centsPerCredit": 20, "gstCents": 909},
            {"id": "pack-1200", "credits": 1200, "priceCents": 21600, "centsPerCredit": 18, "gstCents": 1964},
            {"id": "pack-3000", "credits": 3000, "priceCents": 45000, "centsPerCredit": 15, "gstCents": 4091}
        ]),
        "{response}"
    );
}

#[tokio::test]
async fn an_approved_purchase_adds_the_pack_and_charges_the_card_once() {
    let app = spawn_app().await;
    let chen = practitioner("dr-chen", "clinic-1");
    let card = app.set_card(&chen, "pm_sandbox_approve").await;
    assert_eq!(
        card["data"]["setPaymentMethod"]["display"], "visa •••• 4242",
        "{card}"
    );
    assert!(
        !card.to_string().contains("pm_sandbox"),
        "the token is never shown back"
    );

    let response = app.buy(&chen, "pack-500", &key(), None).await;

    let payload = &response["data"]["purchaseCredits"];
    assert_eq!(payload["purchase"]["status"], "SUCCEEDED", "{response}");
    assert_eq!(
        (
            payload["purchase"]["credits"].as_i64(),
            payload["purchase"]["amountCents"].as_i64()
        ),
        (Some(500), Some(10_000))
    );
    assert_eq!(payload["balance"], 500);
    let charges = app.succeeded_charges().await;
    assert_eq!(charges.len(), 1);
    assert_eq!(charges[0]["amountCents"], 10_000);
    let ledger = app
        .gql(
            Some(&chen),
            "{ credits { ledger { edges { node { kind credits balanceAfter } } } } }",
            json!({}),
        )
        .await;
    assert_eq!(
        ledger["data"]["credits"]["ledger"]["edges"],
        json!([{"node": {"kind": "PURCHASE", "credits": 500, "balanceAfter": 500}}])
    );
}

#[tokio::test]
async fn a_declined_card_gives_payment_declined_and_no_credits() {
    let app = spawn_app().await;
    let chen = practitioner("dr-chen", "clinic-1");
    app.set_card(&chen, "pm_sandbox_decline").await;

    let response = app.buy(&chen, "pack-100", &key(), None).await;

    assert_eq!(
        error_code(&response),
        Some("PAYMENT_DECLINED"),
        "{response}"
    );
    assert_eq!(app.balance(&chen, None).await, 0);
    assert_eq!(app.count_rows("ledger_entries").await, 0);
    assert!(app.succeeded_charges().await.is_empty());
}

#[tokio::test]
async fn a_flaky_card_is_retried_with_the_same_key_and_charged_once() {
    let app = spawn_app().await;
    let chen = practitioner("dr-chen", "clinic-1");
    app.set_card(&chen, "pm_sandbox_flaky").await;

    let response = app.buy(&chen, "pack-100", &key(), None).await;

    assert_eq!(
        response["data"]["purchaseCredits"]["balance"], 100,
        "{response}"
    );
    assert_eq!(app.succeeded_charges().await.len(), 1);
}

#[tokio::test]
async fn replaying_a_key_returns_the_first_purchase_and_another_pack_with_it_conflicts() {
    let app = spawn_app().await;
    let chen = practitioner("dr-chen", "clinic-1");
    app.set_card(&chen, "pm_sandbox_approve").await;
    let key = key();

    let first = app.buy(&chen, "pack-100", &key, None).await;
    let again = app.buy(&chen, "pack-100", &key, None).await;
    let other = app.buy(&chen, "pack-500", &key, None).await;

    assert_eq!(
        first["data"], again["data"],
        "a replay answers exactly as the first time"
    );
    assert_eq!(error_code(&other), Some("CONFLICT"), "{other}");
    assert_eq!(app.succeeded_charges().await.len(), 1);
    assert_eq!(app.balance(&chen, None).await, 100);
}

#[tokio::test]
async fn fifty_concurrent_purchases_with_one_key_charge_once() {
    let app = spawn_app().await;
    let chen = practitioner("dr-chen", "clinic-1");
    app.set_card(&chen, "pm_sandbox_approve").await;
    let key = key();

    let responses =
        futures::future::join_all((0..50).map(|_| app.buy(&chen, "pack-100", &key, None))).await;

    let ids: std::collections::HashSet<String> = responses
        .iter()
        .map(|response| {
            response["data"]["purchaseCredits"]["purchase"]["id"]
                .as_str()
                .unwrap_or_else(|| panic!("{response}"))
                .to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 1, "every duplicate saw the one purchase");
    assert_eq!(app.succeeded_charges().await.len(), 1);
    assert_eq!(app.balance(&chen, None).await, 100);
}

#[tokio::test]
async fn twenty_concurrent_sends_against_thirty_credits_let_exactly_ten_through_and_store_no_others()
 {
    let app = spawn_app().await;
    let admin = administrator("manager", "clinic-1");
    let chen = app
        .ready_to_send("dr-chen", "clinic-1", &valid_hpii("800361700000001"))
        .await;
    app.set_card(&admin, "pm_sandbox_approve").await;
    // 100 credits, then move 70 away to leave exactly 30.
    app.buy(&chen.token, "pack-100", &key(), None).await;
    let patel = practitioner("dr-patel", "clinic-1");
    app.touch(&patel).await;
    let moved = app.gql(Some(&chen.token), TRANSFER, json!({"input": {"fromPractitionerId": "dr-chen", "toPractitionerId": "dr-patel", "credits": 70, "idempotencyKey": key()}})).await;
    assert_eq!(
        moved["data"]["transferCredits"]["fromBalance"], 30,
        "{moved}"
    );

    let responses = {
        let keys: Vec<String> = (0..20).map(|_| key()).collect();
        futures::future::join_all(keys.iter().map(|key| app.send_note(&chen, key, false))).await
    };

    let sent = responses
        .iter()
        .filter(|response| response["data"]["sendSecureMessage"].is_object())
        .count();
    assert_eq!(sent, 10, "{responses:?}");
    for response in &responses {
        assert!(
            response["data"]["sendSecureMessage"].is_object()
                || error_code(response) == Some("INSUFFICIENT_CREDITS"),
            "{response}"
        );
    }
    assert_eq!(app.balance(&chen.token, None).await, 0);
    assert_eq!(
        app.count_rows("messages").await,
        10,
        "a refused send stores no message"
    );
    let ledger = app
        .gql(
            Some(&chen.token),
            "{ credits { ledger(first: 100) { edges { node { kind balanceAfter } } } } }",
            json!({}),
        )
        .await;
    let debits: Vec<i64> = ledger["data"]["credits"]["ledger"]["edges"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|edge| edge["node"]["kind"] == "SEND_DEBIT")
        .map(|edge| edge["node"]["balanceAfter"].as_i64().unwrap())
        .collect();
    assert_eq!(debits.len(), 10);
    assert!(debits.iter().all(|balance| *balance >= 0));
}

#[tokio::test]
async fn concurrent_transfers_never_create_or_lose_credits() {
    let app = spawn_app().await;
    let admin = administrator("manager", "clinic-1");
    let names = ["dr-a", "dr-b", "dr-c", "dr-d"];
    for name in names {
        app.funded_practitioner(name, "clinic-1", 1).await;
    }
    let transfers = (0..40).map(|i| {
        let from = names[i % 4];
        let to = names[(i * 3 + 1) % 4];
        let to = if to == from { names[(i + 2) % 4] } else { to };
        app.gql(Some(&admin), TRANSFER, json!({"input": {"fromPractitionerId": from, "toPractitionerId": to, "credits": 7 + (i % 5) as i64 * 11, "idempotencyKey": key()}}))
    });

    let responses = futures::future::join_all(transfers).await;

    for response in &responses {
        let ok = response["data"]["transferCredits"].is_object();
        assert!(
            ok || error_code(response) == Some("INSUFFICIENT_CREDITS"),
            "{response}"
        );
    }
    let mut total = 0;
    for name in names {
        total += app.balance(&admin, Some(name)).await;
    }
    assert_eq!(total, 400, "the group's credits are conserved");
}

#[tokio::test]
async fn auto_top_up_fires_exactly_once_when_concurrent_sends_cross_the_threshold() {
    let app = spawn_app().await;
    let chen = app
        .ready_to_send("dr-chen", "clinic-1", &valid_hpii("800361700000002"))
        .await;
    app.funded_practitioner("dr-chen", "clinic-1", 1).await;
    let settings = app
        .gql(
            Some(&chen.token),
            "mutation { setAutoTopUp(input: {enabled: true, thresholdCredits: 90, packId: \"pack-500\"}) { autoTopUp { enabled thresholdCredits pack { id } } } }",
            json!({}),
        )
        .await;
    assert_eq!(
        settings["data"]["setAutoTopUp"]["autoTopUp"]["pack"]["id"], "pack-500",
        "{settings}"
    );

    // 100 → 70 over ten sends: every send from the 4th on leaves the balance below 90.
    let responses = {
        let keys: Vec<String> = (0..10).map(|_| key()).collect();
        futures::future::join_all(keys.iter().map(|key| app.send_note(&chen, key, false))).await
    };
    for response in &responses {
        assert!(
            response["data"]["sendSecureMessage"].is_object(),
            "{response}"
        );
    }

    let balance = eventually(Duration::from_secs(10), || async {
        let balance = app.balance(&chen.token, None).await;
        (balance > 100).then_some(balance)
    })
    .await;
    assert_eq!(balance, 570);
    let top_ups: Vec<Value> = app
        .succeeded_charges()
        .await
        .into_iter()
        .filter(|c| c["amountCents"] == 10_000)
        .collect();
    assert_eq!(top_ups.len(), 1, "exactly one top-up purchase");
}

#[tokio::test]
async fn declined_top_ups_are_shown_store_no_credits_and_switch_auto_top_up_off_after_three() {
    let app = spawn_app().await;
    let chen = app
        .ready_to_send("dr-chen", "clinic-1", &valid_hpii("800361700000003"))
        .await;
    app.funded_practitioner("dr-chen", "clinic-1", 1).await;
    app.gql(
        Some(&chen.token),
        "mutation { setAutoTopUp(input: {enabled: true, thresholdCredits: 100}) { balance } }",
        json!({}),
    )
    .await;
    // Replacing the practice's card is for administrators.
    let admin = administrator("manager", "clinic-1");
    let replaced = app.set_card(&admin, "pm_sandbox_decline").await;
    assert_eq!(
        replaced["data"]["setPaymentMethod"]["last4"], "0002",
        "{replaced}"
    );
    let query = "{ credits { balance autoTopUp { enabled lastFailure consecutiveFailures disabledReason } } }";

    for i in 0..3 {
        let sent = app.send_note(&chen, &key(), false).await;
        assert!(
            sent["data"]["sendSecureMessage"].is_object(),
            "sends with credits are not blocked: {sent}"
        );
        eventually(Duration::from_secs(10), || async {
            let state = app.gql(Some(&chen.token), query, json!({})).await;
            (state["data"]["credits"]["autoTopUp"]["consecutiveFailures"] == i + 1).then_some(())
        })
        .await;
    }

    let state = app.gql(Some(&chen.token), query, json!({})).await;
    let credits = &state["data"]["credits"];
    assert_eq!(
        credits["balance"], 91,
        "three sends, no credits from declined top-ups"
    );
    assert!(
        credits["autoTopUp"]["lastFailure"]
            .as_str()
            .unwrap()
            .contains("declined"),
        "{state}"
    );
    assert_eq!(credits["autoTopUp"]["enabled"], false);
    assert!(
        credits["autoTopUp"]["disabledReason"]
            .as_str()
            .unwrap()
            .contains("3 declined")
    );
    // Switched off: a fourth send tries no charge.
    let charges_before = app.charges().await.len();
    let fourth = app.send_note(&chen, &key(), false).await;
    assert!(fourth["data"]["sendSecureMessage"].is_object(), "{fourth}");
    assert_eq!(app.charges().await.len(), charges_before);
}

#[tokio::test]
async fn buying_at_send_time_tops_up_a_short_wallet_once_per_message() {
    let app = spawn_app().await;
    let chen = app
        .ready_to_send("dr-chen", "clinic-1", &valid_hpii("800361700000004"))
        .await;
    app.set_card(&chen.token, "pm_sandbox_approve").await;
    let send_key = key();

    let refused = app.send_note(&chen, &send_key, false).await;
    assert_eq!(
        error_code(&refused),
        Some("INSUFFICIENT_CREDITS"),
        "{refused}"
    );
    assert_eq!(app.succeeded_charges().await.len(), 0);
    assert_eq!(app.count_rows("messages").await, 0);

    let first = app.send_note(&chen, &send_key, true).await;
    assert_eq!(
        first["data"]["sendSecureMessage"]["creditsRemaining"], 97,
        "{first}"
    );
    let again = app.send_note(&chen, &send_key, true).await;
    assert_eq!(
        again["data"]["sendSecureMessage"]["message"]["id"],
        first["data"]["sendSecureMessage"]["message"]["id"]
    );
    assert_eq!(app.succeeded_charges().await.len(), 1);
}

#[tokio::test]
async fn an_administrator_cannot_spend_on_sending_and_nothing_is_charged_or_stored() {
    let app = spawn_app().await;
    let chen = app
        .ready_to_send("dr-chen", "clinic-1", &valid_hpii("800361700000005"))
        .await;
    app.funded_practitioner("dr-chen", "clinic-1", 1).await;
    let admin = Sender {
        token: administrator("manager", "clinic-1"),
        ..chen
    };

    let refused = app.send_note(&admin, &key(), true).await;

    assert_eq!(error_code(&refused), Some("FORBIDDEN"), "{refused}");
    assert_eq!(app.balance(&admin.token, Some("dr-chen")).await, 100);
    assert_eq!(
        app.succeeded_charges().await.len(),
        1,
        "only the pack bought"
    );
    assert_eq!(app.count_rows("messages").await, 0);
}

#[tokio::test]
async fn administrators_buy_for_practitioners_who_cannot_buy_for_or_drain_each_other() {
    let app = spawn_app().await;
    let admin = administrator("manager", "clinic-1");
    let chen = practitioner("dr-chen", "clinic-1");
    let patel = practitioner("dr-patel", "clinic-1");
    app.touch(&chen).await;
    app.touch(&patel).await;
    app.set_card(&admin, "pm_sandbox_approve").await;

    let unnamed = app.buy(&admin, "pack-100", &key(), None).await;
    assert_eq!(error_code(&unnamed), Some("BAD_USER_INPUT"), "{unnamed}");
    let for_chen = app.buy(&admin, "pack-100", &key(), Some("dr-chen")).await;
    assert_eq!(
        for_chen["data"]["purchaseCredits"]["balance"], 100,
        "{for_chen}"
    );

    let for_other = app.buy(&patel, "pack-100", &key(), Some("dr-chen")).await;
    assert_eq!(error_code(&for_other), Some("FORBIDDEN"), "{for_other}");
    let drain = app.gql(Some(&patel), TRANSFER, json!({"input": {"fromPractitionerId": "dr-chen", "toPractitionerId": "dr-patel", "credits": 50, "idempotencyKey": key()}})).await;
    assert_eq!(error_code(&drain), Some("FORBIDDEN"), "{drain}");
    let peek = app
        .gql(
            Some(&patel),
            "{ credits(practitionerId: \"dr-chen\") { balance } }",
            json!({}),
        )
        .await;
    assert_eq!(error_code(&peek), Some("FORBIDDEN"));
    assert_eq!(app.balance(&admin, Some("dr-chen")).await, 100);
    let list = app
        .gql(
            Some(&patel),
            "{ practitioners { id name balance } }",
            json!({}),
        )
        .await;
    let chen_row = list["data"]["practitioners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == "dr-chen")
        .cloned()
        .unwrap();
    assert!(
        chen_row["balance"].is_null(),
        "practitioners do not see each other's balances"
    );
}

#[tokio::test]
async fn another_groups_token_cannot_see_or_touch_these_wallets() {
    let app = spawn_app().await;
    app.funded_practitioner("dr-chen", "clinic-1", 1).await;
    let outsider = administrator("manager", "clinic-2");
    app.set_card(&outsider, "pm_sandbox_approve").await;

    let peek = app
        .gql(
            Some(&outsider),
            "{ credits(practitionerId: \"dr-chen\") { balance } }",
            json!({}),
        )
        .await;
    assert_eq!(error_code(&peek), Some("NOT_FOUND"), "{peek}");
    let buy = app
        .buy(&outsider, "pack-100", &key(), Some("dr-chen"))
        .await;
    assert_eq!(error_code(&buy), Some("NOT_FOUND"));
    let list = app
        .gql(Some(&outsider), "{ practitioners { id } }", json!({}))
        .await;
    assert_eq!(list["data"]["practitioners"], json!([]));
}

#[tokio::test]
async fn negative_zero_unknown_and_overflowing_inputs_are_bad_user_input() {
    let app = spawn_app().await;
    let chen = app.funded_practitioner("dr-chen", "clinic-1", 1).await;
    let patel = practitioner("dr-patel", "clinic-1");
    app.touch(&patel).await;
    let transfer = |credits: Value| {
        app.gql(Some(&chen), TRANSFER, json!({"input": {"fromPractitionerId": "dr-chen", "toPractitionerId": "dr-patel", "credits": credits, "idempotencyKey": key()}}))
    };

    for credits in [
        json!(-5),
        json!(0),
        json!(1_000_001),
        json!(9_223_372_036_854_775_807i64),
        json!(1e30),
        json!("ten"),
    ] {
        let response = transfer(credits.clone()).await;
        assert_eq!(
            error_code(&response),
            Some("BAD_USER_INPUT"),
            "{credits}: {response}"
        );
    }
    let unknown_pack = app.buy(&chen, "pack-7", &key(), None).await;
    assert_eq!(error_code(&unknown_pack), Some("BAD_USER_INPUT"));
    let bad_key = app.buy(&chen, "pack-100", "short", None).await;
    assert_eq!(error_code(&bad_key), Some("BAD_USER_INPUT"));
    let threshold = app
        .gql(
            Some(&chen),
            "mutation { setAutoTopUp(input: {enabled: true, thresholdCredits: -1}) { balance } }",
            json!({}),
        )
        .await;
    assert_eq!(error_code(&threshold), Some("BAD_USER_INPUT"));
    // Well-formed but unknown to the payment gateway (an administrator may replace the card).
    let admin = administrator("manager", "clinic-1");
    let unknown_card = app.set_card(&admin, "pm_unknown_card").await;
    assert_eq!(
        error_code(&unknown_card),
        Some("BAD_USER_INPUT"),
        "{unknown_card}"
    );
    let malformed_card = app.set_card(&admin, "pm_unknown card").await;
    assert_eq!(
        error_code(&malformed_card),
        Some("BAD_USER_INPUT"),
        "{malformed_card}"
    );
    assert_eq!(app.balance(&chen, None).await, 100, "nothing moved");
    assert_eq!(app.balance(&patel, None).await, 0);
}

#[tokio::test]
async fn a_crash_between_the_charge_and_the_ledger_write_is_completed_after_restart() {
    let app = spawn_app_with(Options {
        fail_after_charge: true,
        purchase_lease_ms: 300,
        ..Options::default()
    })
    .await;
    let chen = practitioner("dr-chen", "clinic-1");
    app.set_card(&chen, "pm_sandbox_approve").await;
    let key = key();

    let crashed = app.buy(&chen, "pack-100", &key, None).await;
    assert_eq!(
        error_code(&crashed),
        Some("INTERNAL_SERVER_ERROR"),
        "{crashed}"
    );
    assert_eq!(
        app.succeeded_charges().await.len(),
        1,
        "the card was charged"
    );
    app.stop().await;
    assert_eq!(
        app.count_rows("ledger_entries").await,
        0,
        "but no credits were recorded"
    );

    // The restarted gateway (without the fault) finds the pending purchase and completes it
    // with the same payment idempotency key.
    let restarted = app
        .spawn_second_gateway_with(|settings| settings.credits.fail_after_charge = false)
        .await;
    let balance = eventually(Duration::from_secs(10), || async {
        let balance = restarted.balance(&chen, None).await;
        (balance > 0).then_some(balance)
    })
    .await;
    assert_eq!(balance, 100);
    assert_eq!(
        restarted.succeeded_charges().await.len(),
        1,
        "charged once, credited once"
    );
    let replay = restarted.buy(&chen, "pack-100", &key, None).await;
    assert_eq!(
        replay["data"]["purchaseCredits"]["purchase"]["status"], "SUCCEEDED",
        "{replay}"
    );
    assert_eq!(restarted.succeeded_charges().await.len(), 1);
}
