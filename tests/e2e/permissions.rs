//! Who may change the practice: the card (first card for anyone, replacing and removing for
//! administrators), the group's provider account (administrators, or its sole linked
//! practitioner), over HTTP and WebSocket and under parallel requests; strict payment tokens;
//! and how long a token is honoured.

use std::time::{SystemTime, UNIX_EPOCH};

use futures::future::join_all;
use serde_json::{Value, json};

use crate::helpers::*;

const SET_CARD: &str = "mutation($input: SetPaymentMethodInput!) { setPaymentMethod(input: $input) { brand last4 display } }";
const REMOVE_CARD: &str = "mutation { removePaymentMethod { display } }";
const CARD: &str = "{ paymentMethod { display } }";
const DISCONNECT_GROUP: &str =
    "mutation { disconnectProvider(provider: ARGUS, scope: GROUP) { status individualStatus } }";

impl TestApp {
    async fn set_card_as(&self, token: &str, card: &str) -> Value {
        self.gql(Some(token), SET_CARD, json!({"input": {"token": card}}))
            .await
    }

    /// The practice's card as `visa •••• 4242`, or `None`.
    async fn card_display(&self, token: &str) -> Option<String> {
        let response = self.gql(Some(token), CARD, json!({})).await;
        assert!(response["errors"].is_null(), "{response}");
        response["data"]["paymentMethod"]["display"]
            .as_str()
            .map(str::to_owned)
    }

    /// (action, outcome) of the group's audit events, oldest first.
    async fn audit_trail(&self, admin: &str) -> Vec<(String, String)> {
        let response = self
            .gql(
                Some(admin),
                "{ auditEvents(first: 100) { edges { node { action outcome } } } }",
                json!({}),
            )
            .await;
        let mut trail: Vec<(String, String)> = response["data"]["auditEvents"]["edges"]
            .as_array()
            .unwrap_or_else(|| panic!("{response}"))
            .iter()
            .map(|edge| {
                (
                    edge["node"]["action"].as_str().unwrap().to_owned(),
                    edge["node"]["outcome"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        trail.reverse();
        trail
    }

    async fn payment_charges(&self) -> Vec<Value> {
        self.sandbox_control(reqwest::Method::GET, "/_sandbox/charges", None)
            .await
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

fn count(trail: &[(String, String)], action: &str, outcome: &str) -> usize {
    trail
        .iter()
        .filter(|(a, o)| a == action && o == outcome)
        .count()
}

fn message(response: &Value) -> &str {
    response["errors"][0]["message"]
        .as_str()
        .unwrap_or_default()
}

// --- The practice's card ---

#[tokio::test]
async fn a_practitioner_sets_the_first_card_but_cannot_replace_or_remove_it() {
    let app = spawn_app().await;
    let chen = practitioner("dr-chen", "clinic-1");
    let admin = administrator("manager", "clinic-1");

    let first = app.set_card_as(&chen, "pm_sandbox_approve").await;
    assert_eq!(
        first["data"]["setPaymentMethod"]["display"], "visa •••• 4242",
        "{first}"
    );

    let replace = app.set_card_as(&chen, "pm_sandbox_decline").await;
    assert_eq!(error_code(&replace), Some("FORBIDDEN"), "{replace}");
    assert!(message(&replace).contains("administrator"), "{replace}");
    let remove = app.gql(Some(&chen), REMOVE_CARD, json!({})).await;
    assert_eq!(error_code(&remove), Some("FORBIDDEN"), "{remove}");
    assert!(message(&remove).contains("administrator"), "{remove}");

    assert_eq!(
        app.card_display(&chen).await.as_deref(),
        Some("visa •••• 4242"),
        "the card is unchanged"
    );
    assert_eq!(app.count_rows("payment_methods").await, 1);
    assert!(
        app.payment_charges().await.is_empty(),
        "nothing was charged"
    );
    let trail = app.audit_trail(&admin).await;
    assert_eq!(
        count(&trail, "SET_PAYMENT_METHOD", "SUCCESS"),
        1,
        "{trail:?}"
    );
    assert_eq!(
        count(&trail, "SET_PAYMENT_METHOD", "DENIED"),
        1,
        "{trail:?}"
    );
    assert_eq!(
        count(&trail, "REMOVE_PAYMENT_METHOD", "DENIED"),
        1,
        "{trail:?}"
    );
}

#[tokio::test]
async fn an_administrator_replaces_and_removes_the_practices_card() {
    let app = spawn_app().await;
    let chen = practitioner("dr-chen", "clinic-1");
    let admin = administrator("manager", "clinic-1");
    app.set_card_as(&chen, "pm_sandbox_approve").await;

    let replaced = app.set_card_as(&admin, "pm_sandbox_flaky").await;
    assert_eq!(
        replaced["data"]["setPaymentMethod"]["display"], "mastercard •••• 4444",
        "{replaced}"
    );
    let removed = app.gql(Some(&admin), REMOVE_CARD, json!({})).await;
    assert_eq!(
        removed["data"]["removePaymentMethod"]["display"], "mastercard •••• 4444",
        "{removed}"
    );
    assert_eq!(app.card_display(&chen).await, None);
    assert_eq!(app.count_rows("payment_methods").await, 0);

    let again = app.gql(Some(&admin), REMOVE_CARD, json!({})).await;
    assert_eq!(error_code(&again), Some("NOT_FOUND"), "{again}");
    let buy = app
        .gql(
            Some(&chen),
            "mutation($input: PurchaseCreditsInput!) { purchaseCredits(input: $input) { balance } }",
            json!({"input": {"packId": "pack-100", "idempotencyKey": uuid::Uuid::new_v4().to_string()}}),
        )
        .await;
    assert!(buy["data"].is_null(), "no card, no purchase: {buy}");
    assert!(
        app.payment_charges().await.is_empty(),
        "nothing was charged"
    );
    let trail = app.audit_trail(&admin).await;
    assert_eq!(
        count(&trail, "SET_PAYMENT_METHOD", "SUCCESS"),
        2,
        "{trail:?}"
    );
    assert_eq!(
        count(&trail, "REMOVE_PAYMENT_METHOD", "SUCCESS"),
        1,
        "{trail:?}"
    );
}

#[tokio::test]
async fn forty_practitioners_racing_to_set_the_first_card_leave_exactly_one_card() {
    let app = spawn_app().await;
    let admin = administrator("manager", "clinic-1");
    let practitioners: Vec<String> = (0..40)
        .map(|n| practitioner(&format!("dr-{n}"), "clinic-1"))
        .collect();
    for token in &practitioners {
        app.gql(Some(token), "{ me { id } }", json!({})).await;
    }

    // Even-numbered practitioners offer the visa, odd ones the mastercard.
    let answers = join_all(practitioners.iter().enumerate().map(|(n, token)| {
        let card = if n % 2 == 0 {
            "pm_sandbox_approve"
        } else {
            "pm_sandbox_flaky"
        };
        app.set_card_as(token, card)
    }))
    .await;

    let winners: Vec<&Value> = answers
        .iter()
        .filter(|answer| answer["errors"].is_null())
        .collect();
    assert_eq!(winners.len(), 1, "{answers:?}");
    for answer in answers.iter().filter(|answer| !answer["errors"].is_null()) {
        assert_eq!(error_code(answer), Some("FORBIDDEN"), "{answer}");
    }
    let winning_card = winners[0]["data"]["setPaymentMethod"]["display"]
        .as_str()
        .unwrap();
    assert_eq!(
        app.card_display(&admin).await.as_deref(),
        Some(winning_card),
        "the stored card is the one the winner was told about"
    );
    assert_eq!(app.count_rows("payment_methods").await, 1);
    let trail = app.audit_trail(&admin).await;
    assert_eq!(
        count(&trail, "SET_PAYMENT_METHOD", "SUCCESS"),
        1,
        "{trail:?}"
    );
    assert_eq!(
        count(&trail, "SET_PAYMENT_METHOD", "DENIED"),
        39,
        "{trail:?}"
    );
}

#[tokio::test]
async fn the_store_decides_the_first_card_atomically_even_without_the_early_check() {
    use smd_gateway::domain::audit::{AuditEntry, AuditOutcome};
    use smd_gateway::domain::types::Role;
    use smd_gateway::store::credits::{CardWrite, CardWritten, PaymentMethodRow};

    let app = spawn_app().await;
    let mut writers = Vec::new();
    for n in 0..40 {
        writers.push(
            app.principal(&format!("dr-{n}"), "clinic-1", Role::Practitioner)
                .await,
        );
    }
    let row = |last4: String| PaymentMethodRow {
        token_ciphertext: "sealed".into(),
        brand: "visa".into(),
        last4,
        exp_month: 12,
        exp_year: 2030,
        updated_at: chrono::Utc::now(),
    };

    // Straight at the store: no early "is there a card?" read to hide behind.
    let outcomes = join_all(writers.iter().enumerate().map(|(n, principal)| {
        let store = app.store.clone();
        let row = row(format!("{n:04}"));
        let audit = AuditEntry::by(
            principal,
            "SET_PAYMENT_METHOD",
            "group:clinic-1".into(),
            AuditOutcome::Success,
        );
        async move {
            store
                .set_payment_method(
                    "clinic-1",
                    &principal.user_id,
                    &row,
                    CardWrite::FirstOnly,
                    &audit,
                )
                .await
                .unwrap()
        }
    }))
    .await;

    let stored = outcomes
        .iter()
        .filter(|outcome| **outcome == CardWritten::Stored)
        .count();
    assert_eq!(stored, 1, "{outcomes:?}");
    assert_eq!(app.count_rows("payment_methods").await, 1);
    assert_eq!(
        app.count_rows("audit_events").await,
        1,
        "only the stored card is audited as a success"
    );
}

#[tokio::test]
async fn forty_parallel_card_replacements_by_a_practitioner_are_all_forbidden() {
    let app = spawn_app().await;
    let chen = practitioner("dr-chen", "clinic-1");
    let admin = administrator("manager", "clinic-1");
    app.set_card_as(&admin, "pm_sandbox_approve").await;

    let answers = join_all((0..40).map(|_| app.set_card_as(&chen, "pm_sandbox_decline"))).await;

    for answer in &answers {
        assert_eq!(error_code(answer), Some("FORBIDDEN"), "{answer}");
    }
    assert_eq!(
        app.card_display(&chen).await.as_deref(),
        Some("visa •••• 4242"),
        "the card is unchanged"
    );
    let trail = app.audit_trail(&admin).await;
    assert_eq!(
        count(&trail, "SET_PAYMENT_METHOD", "SUCCESS"),
        1,
        "{trail:?}"
    );
    assert_eq!(
        count(&trail, "SET_PAYMENT_METHOD", "DENIED"),
        40,
        "{trail:?}"
    );
}

#[tokio::test]
async fn a_malformed_payment_token_is_bad_user_input_and_never_reaches_the_payment_gateway() {
    let app = spawn_app().await;
    let admin = administrator("manager", "clinic-1");
    // Any request to the payment gateway would use this fault up; it must still be there.
    app.inject_fault("payments", "*", "server_error", 1, json!({}))
        .await;

    for token in [
        "pm_sandbox_approve#frag",
        "pm_sandbox_approve?expand=1",
        "%2e%2e",
        "pm_%2e%2e",
        "../charges",
        "pm_sandbox/../../charges",
        "pm_sandbox approve",
        " pm_sandbox_approve",
        "",
        "pm_",
        "sk_sandbox_dev",
    ] {
        let answer = app.set_card_as(&admin, token).await;
        assert_eq!(
            error_code(&answer),
            Some("BAD_USER_INPUT"),
            "{token:?}: {answer}"
        );
        assert!(message(&answer).contains("pm_"), "{answer}");
    }

    let faults = app
        .sandbox_control(reqwest::Method::GET, "/_sandbox/faults", None)
        .await;
    assert_eq!(
        faults[0]["count"], 1,
        "no request reached the payment gateway: {faults}"
    );
    assert!(
        app.payment_charges().await.is_empty(),
        "nothing was charged"
    );
    assert_eq!(app.card_display(&admin).await, None, "no card was stored");
}

// --- Over WebSocket ---

#[tokio::test]
async fn a_practitioner_replacing_the_card_over_websocket_is_forbidden() {
    let app = spawn_app().await;
    let chen = practitioner("dr-chen", "clinic-1");
    let admin = administrator("manager", "clinic-1");
    app.set_card_as(&admin, "pm_sandbox_approve").await;
    let mut socket = crate::ws::WsClient::ready(&app, &chen).await;

    let replace = socket
        .run(SET_CARD, json!({"input": {"token": "pm_sandbox_decline"}}))
        .await;
    let remove = socket.run(REMOVE_CARD, json!({})).await;

    assert_eq!(error_code(&replace), Some("FORBIDDEN"), "{replace}");
    assert_eq!(error_code(&remove), Some("FORBIDDEN"), "{remove}");
    assert_eq!(
        app.card_display(&chen).await.as_deref(),
        Some("visa •••• 4242"),
        "the card is unchanged"
    );
}

// --- The practice's provider account ---

#[tokio::test]
async fn a_practitioner_cannot_disconnect_the_group_account_while_a_colleague_is_linked() {
    let app = spawn_app().await;
    let chen = practitioner("dr-chen", "clinic-1");
    let patel = practitioner("dr-patel", "clinic-1");
    let admin = administrator("manager", "clinic-1");
    app.link(&chen, "linkArgus", ARGUS_USER, ARGUS_PASSWORD)
        .await;
    app.link(&patel, "linkArgus", ARGUS_USER, ARGUS_PASSWORD)
        .await;

    let refused = app.gql(Some(&chen), DISCONNECT_GROUP, json!({})).await;

    assert_eq!(error_code(&refused), Some("FORBIDDEN"), "{refused}");
    assert!(message(&refused).contains("administrator"), "{refused}");
    assert_eq!(
        app.integration(&patel, "ARGUS").await["individualStatus"],
        "ACTIVE"
    );
    assert_eq!(
        app.count_rows("provider_accounts").await,
        1,
        "the account is still there"
    );
    assert_eq!(
        app.count_rows("provider_links").await,
        2,
        "both links are still there"
    );
    let trail = app.audit_trail(&admin).await;
    assert_eq!(
        count(&trail, "DISCONNECT_GROUP_ACCOUNT", "DENIED"),
        1,
        "{trail:?}"
    );
    assert_eq!(
        count(&trail, "DISCONNECT_GROUP_ACCOUNT", "SUCCESS"),
        0,
        "{trail:?}"
    );

    let by_admin = app.gql(Some(&admin), DISCONNECT_GROUP, json!({})).await;
    assert_eq!(
        by_admin["data"]["disconnectProvider"]["status"], "NOT_CONNECTED",
        "{by_admin}"
    );
    assert_eq!(app.count_rows("provider_links").await, 0);
}

#[tokio::test]
async fn a_solo_practitioner_disconnects_their_practices_account() {
    let app = spawn_app().await;
    let chen = practitioner("dr-chen", "solo-practice");
    let admin = administrator("manager", "solo-practice");
    app.link(&chen, "linkArgus", ARGUS_USER, ARGUS_PASSWORD)
        .await;

    let done = app.gql(Some(&chen), DISCONNECT_GROUP, json!({})).await;

    assert_eq!(
        done["data"]["disconnectProvider"],
        json!({"status": "NOT_CONNECTED", "individualStatus": "NOT_CONNECTED"}),
        "{done}"
    );
    assert_eq!(app.count_rows("provider_accounts").await, 0);
    assert_eq!(app.count_rows("provider_links").await, 0);
    let trail = app.audit_trail(&admin).await;
    assert_eq!(
        count(&trail, "DISCONNECT_GROUP_ACCOUNT", "SUCCESS"),
        1,
        "{trail:?}"
    );
}

#[tokio::test]
async fn a_practitioner_not_linked_to_the_group_account_cannot_disconnect_it() {
    let app = spawn_app().await;
    let chen = practitioner("dr-chen", "clinic-1");
    let admin = administrator("manager", "clinic-1");
    app.link(&admin, "linkArgus", ARGUS_USER, ARGUS_PASSWORD)
        .await;

    let refused = app.gql(Some(&chen), DISCONNECT_GROUP, json!({})).await;

    assert_eq!(error_code(&refused), Some("FORBIDDEN"), "{refused}");
    assert_eq!(app.integration(&admin, "ARGUS").await["status"], "ACTIVE");
    assert_eq!(app.count_rows("provider_accounts").await, 1);
}

#[tokio::test]
async fn forty_parallel_group_disconnects_by_practitioners_of_a_shared_account_are_all_forbidden() {
    let app = spawn_app().await;
    let admin = administrator("manager", "clinic-1");
    let linked = [
        practitioner("dr-chen", "clinic-1"),
        practitioner("dr-patel", "clinic-1"),
    ];
    for token in &linked {
        app.link(token, "linkArgus", ARGUS_USER, ARGUS_PASSWORD)
            .await;
    }

    let answers =
        join_all((0..40).map(|n| app.gql(Some(&linked[n % 2]), DISCONNECT_GROUP, json!({})))).await;

    for answer in &answers {
        assert_eq!(error_code(answer), Some("FORBIDDEN"), "{answer}");
    }
    assert_eq!(
        app.count_rows("provider_accounts").await,
        1,
        "the account is still there"
    );
    assert_eq!(app.count_rows("provider_links").await, 2);
    let trail = app.audit_trail(&admin).await;
    assert_eq!(
        count(&trail, "DISCONNECT_GROUP_ACCOUNT", "DENIED"),
        40,
        "{trail:?}"
    );
}

// --- Tokens ---

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn sign(claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn claims(iat: Option<u64>, exp: u64) -> Value {
    let mut claims = json!({
        "sub": "dr-chen", "group": "clinic-1", "role": "practitioner", "iss": ISSUER, "aud": AUDIENCE, "exp": exp
    });
    if let Some(iat) = iat {
        claims["iat"] = iat.into();
    }
    claims
}

#[tokio::test]
async fn a_token_living_longer_than_a_day_or_without_iat_is_unauthenticated_with_the_reason() {
    let app = spawn_app().await;
    let now = unix_now();

    let week = sign(claims(Some(now), now + 7 * 86_400));
    let answer = app.gql(Some(&week), "{ me { id } }", json!({})).await;
    assert_eq!(error_code(&answer), Some("UNAUTHENTICATED"), "{answer}");
    assert!(message(&answer).contains("lifetime"), "{answer}");
    assert!(message(&answer).contains("86400"), "{answer}");

    let no_iat = sign(claims(None, now + 600));
    let answer = app.gql(Some(&no_iat), "{ me { id } }", json!({})).await;
    assert_eq!(error_code(&answer), Some("UNAUTHENTICATED"), "{answer}");
    assert!(message(&answer).contains("iat"), "{answer}");

    assert_eq!(app.count_rows("users").await, 0, "nobody was provisioned");
    let day = sign(claims(Some(now), now + 86_400));
    let answer = app.gql(Some(&day), "{ me { id } }", json!({})).await;
    assert_eq!(
        answer["data"]["me"]["id"], "dr-chen",
        "exactly a day is fine: {answer}"
    );
}

#[tokio::test]
async fn the_exp_leeway_is_the_same_over_http_and_websocket() {
    // The test gateway allows 5 s of clock skew. This token expired a second ago, so it is
    // honoured for about four more seconds, then refused on both transports.
    let app = spawn_app().await;
    let now = unix_now();
    let token = sign(claims(Some(now - 60), now - 1));

    let over_http = app.gql(Some(&token), "{ me { id } }", json!({})).await;
    assert_eq!(over_http["data"]["me"]["id"], "dr-chen", "{over_http}");
    let mut socket = crate::ws::WsClient::ready(&app, &token).await;
    socket.subscribe("1", "{ me { id } }").await;
    let over_websocket = socket.result_of("1").await;
    assert_eq!(
        over_websocket["payload"]["data"]["me"]["id"], "dr-chen",
        "{over_websocket}"
    );

    // Past exp + leeway the gateway closes the connection itself (4403, as graphql-transport-ws
    // says for a refused identity), so no operation runs on an expired token; HTTP refuses too.
    assert_eq!(socket.close_code().await, 4403);
    assert!(
        unix_now() >= now - 1 + 5,
        "refused only once the leeway had run out"
    );
    let over_http = app.gql(Some(&token), "{ me { id } }", json!({})).await;
    assert_eq!(
        error_code(&over_http),
        Some("UNAUTHENTICATED"),
        "{over_http}"
    );
}
