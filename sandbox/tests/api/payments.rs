//! The payments emulator: test cards, idempotent charges, faults, namespaces and reset.

use reqwest::StatusCode;
use reqwest::header::RETRY_AFTER;
use serde_json::{Value, json};
use tokio::task::JoinSet;

use crate::helpers::*;

#[tokio::test]
async fn an_approving_card_is_charged_once_and_the_charge_can_be_read_back() {
    let sandbox = spawn_sandbox().await;

    let answer = sandbox
        .charge("", "purchase-1", charge_body(APPROVING_CARD, 2200))
        .await;

    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
    assert!(!answer.replayed);
    let charge = &answer.body;
    let id = charge["id"].as_str().unwrap();
    assert!(id.starts_with("ch_") && id.len() > 3, "{id}");
    assert_eq!(charge["status"], "succeeded");
    assert_eq!(charge["amountCents"], 2200);
    assert_eq!(charge["currency"], "AUD");
    assert_eq!(charge["paymentMethod"], APPROVING_CARD);
    assert_eq!(charge["idempotencyKey"], "purchase-1");
    assert_eq!(charge["description"], "100 SMD credits");
    assert!(charge["createdAt"].as_str().unwrap().ends_with('Z'));

    let (status, read_back) = sandbox
        .payments_get(&format!("/payments/v1/charges/{id}"))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&read_back, charge);
    assert_eq!(sandbox.charges("").await, vec![charge.clone()]);
}

#[tokio::test]
async fn a_declining_card_answers_402_and_the_charge_is_recorded_as_declined() {
    let sandbox = spawn_sandbox().await;

    let answer = sandbox
        .charge("", "purchase-1", charge_body(DECLINING_CARD, 2200))
        .await;

    assert_eq!(
        answer.status,
        StatusCode::PAYMENT_REQUIRED,
        "{}",
        answer.body
    );
    assert_eq!(answer.body["error"]["code"], "card_declined");
    assert!(answer.body["error"]["message"].is_string());
    let id = answer.body["error"]["chargeId"].as_str().unwrap();
    assert!(id.starts_with("ch_"));
    let (status, charge) = sandbox
        .payments_get(&format!("/payments/v1/charges/{id}"))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(charge["status"], "declined");
    assert_eq!(charge["amountCents"], 2200);
    let charges = sandbox.charges("").await;
    assert_eq!(charges.len(), 1);
    assert_eq!(charges[0]["status"], "declined");

    // A retry replays the decline: the same charge, never a second attempt at the card.
    let retry = sandbox
        .charge("", "purchase-1", charge_body(DECLINING_CARD, 2200))
        .await;
    assert_eq!(retry.status, StatusCode::PAYMENT_REQUIRED);
    assert!(retry.replayed);
    assert_eq!(retry.body, answer.body);
    assert_eq!(sandbox.charges("").await.len(), 1);
}

#[tokio::test]
async fn the_flaky_card_fails_the_first_attempt_and_approves_the_retry_with_one_charge() {
    let sandbox = spawn_sandbox().await;

    let first = sandbox
        .charge("", "purchase-1", charge_body(FLAKY_CARD, 5000))
        .await;
    assert_eq!(
        first.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        first.body
    );
    assert_eq!(first.body["error"]["code"], "processing_error");
    assert!(!first.replayed);
    assert!(
        sandbox.charges("").await.is_empty(),
        "a failed attempt records nothing"
    );

    let retry = sandbox
        .charge("", "purchase-1", charge_body(FLAKY_CARD, 5000))
        .await;
    assert_eq!(retry.status, StatusCode::CREATED, "{}", retry.body);
    assert!(!retry.replayed, "the retry is the first recorded answer");
    assert_eq!(retry.body["status"], "succeeded");
    assert_eq!(retry.body["paymentMethod"], FLAKY_CARD);

    let again = sandbox
        .charge("", "purchase-1", charge_body(FLAKY_CARD, 5000))
        .await;
    assert!(again.replayed);
    assert_eq!(again.body, retry.body);
    assert_eq!(sandbox.charges("").await.len(), 1);

    // Every new key fails once again.
    let other = sandbox
        .charge("", "purchase-2", charge_body(FLAKY_CARD, 5000))
        .await;
    assert_eq!(other.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(sandbox.charges("").await.len(), 1);
}

#[tokio::test]
async fn a_retry_with_the_same_key_replays_the_same_charge_without_charging_again() {
    let sandbox = spawn_sandbox().await;
    let first = sandbox
        .charge("", "purchase-1", charge_body(APPROVING_CARD, 2200))
        .await;
    assert_eq!(first.status, StatusCode::CREATED);

    let retry = sandbox
        .charge("", "purchase-1", charge_body(APPROVING_CARD, 2200))
        .await;

    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.replayed);
    assert_eq!(retry.body, first.body);
    let charges = sandbox.charges("").await;
    assert_eq!(charges.len(), 1);
    assert_eq!(charges[0]["id"], first.body["id"]);

    // An absent description and a null one ask for the same charge.
    let without = json!({ "paymentMethod": APPROVING_CARD, "amountCents": 900, "currency": "AUD" });
    let first = sandbox.charge("", "purchase-2", without).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.body["description"], Value::Null);
    let with_null = json!({
        "paymentMethod": APPROVING_CARD, "amountCents": 900, "currency": "AUD", "description": null
    });
    let retry = sandbox.charge("", "purchase-2", with_null).await;
    assert!(retry.replayed);
    assert_eq!(retry.body["id"], first.body["id"]);
    assert_eq!(sandbox.charges("").await.len(), 2);
}

#[tokio::test]
async fn reusing_a_key_for_a_different_request_is_refused_with_409_and_charges_nothing() {
    let sandbox = spawn_sandbox().await;
    let first = sandbox
        .charge("", "purchase-1", charge_body(APPROVING_CARD, 2200))
        .await;
    assert_eq!(first.status, StatusCode::CREATED);

    let mut different_description = charge_body(APPROVING_CARD, 2200);
    different_description["description"] = json!("200 SMD credits");
    for different in [
        charge_body(APPROVING_CARD, 2300),
        charge_body(DECLINING_CARD, 2200),
        different_description,
    ] {
        let answer = sandbox.charge("", "purchase-1", different.clone()).await;
        assert_eq!(answer.status, StatusCode::CONFLICT, "{different}");
        assert_eq!(answer.body["error"]["code"], "idempotency_key_reuse");
        assert!(!answer.replayed);
    }

    let charges = sandbox.charges("").await;
    assert_eq!(charges.len(), 1);
    assert_eq!(charges[0]["amountCents"], 2200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_requests_with_one_key_make_exactly_one_charge() {
    let sandbox = spawn_sandbox().await;
    let mut requests = JoinSet::new();
    for _ in 0..20 {
        let request = sandbox.charge_request("", "purchase-1", charge_body(APPROVING_CARD, 2200));
        requests.spawn(async move { charge_answer(request.send().await.unwrap()).await });
    }

    let answers: Vec<ChargeAnswer> = requests.join_all().await;

    assert!(
        answers
            .iter()
            .all(|answer| answer.status == StatusCode::CREATED)
    );
    assert!(answers.iter().all(|answer| answer.body == answers[0].body));
    let replayed = answers.iter().filter(|answer| answer.replayed).count();
    assert_eq!(replayed, 19, "all but the first are replays");
    let charges = sandbox.charges("").await;
    assert_eq!(charges.len(), 1);
    assert_eq!(charges[0]["id"], answers[0].body["id"]);
}

#[tokio::test]
async fn bad_charge_inputs_are_refused_with_their_code_and_charge_nothing() {
    let sandbox = spawn_sandbox().await;
    let with = |field: &str, value: Value| {
        let mut body = charge_body(APPROVING_CARD, 2200);
        body[field] = value;
        body
    };
    let without = |field: &str| {
        let mut body = charge_body(APPROVING_CARD, 2200);
        body.as_object_mut().unwrap().remove(field);
        body
    };
    let cases = [
        (with("amountCents", json!(0)), "invalid_amount"),
        (with("amountCents", json!(-5)), "invalid_amount"),
        (with("amountCents", json!(1_000_001)), "invalid_amount"),
        (with("amountCents", json!(22.5)), "invalid_amount"),
        (with("amountCents", json!("2200")), "invalid_amount"),
        (with("currency", json!("USD")), "invalid_currency"),
        (with("currency", json!("aud")), "invalid_currency"),
        (
            with("paymentMethod", json!("pm_card_visa")),
            "invalid_payment_method",
        ),
        (without("amountCents"), "bad_request"),
        (without("currency"), "bad_request"),
        (without("paymentMethod"), "bad_request"),
        (with("description", json!("x".repeat(501))), "bad_request"),
        (with("description", json!(42)), "bad_request"),
        (json!([APPROVING_CARD, 2200, "AUD"]), "bad_request"),
    ];
    for (index, (body, code)) in cases.into_iter().enumerate() {
        let answer = sandbox
            .charge("", &format!("bad-{index}"), body.clone())
            .await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(answer.body["error"]["code"], code, "{body}");
        assert!(answer.body["error"]["message"].is_string());
    }

    let (status, body) = sandbox
        .send(
            sandbox
                .client
                .post(sandbox.url("/payments/v1/charges"))
                .bearer_auth(PAYMENTS_API_KEY)
                .header("Idempotency-Key", "not-json")
                .body("paymentMethod=pm_sandbox_approve"),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["code"], "bad_request");

    let longest_key = "k".repeat(255);
    let answer = sandbox
        .charge("", &longest_key, charge_body(APPROVING_CARD, 1_000_000))
        .await;
    assert_eq!(
        answer.status,
        StatusCode::CREATED,
        "the largest amount and longest key"
    );
    for bad_key in ["", "has space", &"k".repeat(256)] {
        let answer = sandbox
            .charge("", bad_key, charge_body(APPROVING_CARD, 2200))
            .await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{bad_key:?}");
        assert_eq!(answer.body["error"]["code"], "idempotency_key_required");
    }
    let (status, body) = sandbox
        .send(
            sandbox
                .post("/payments/v1/charges", charge_body(APPROVING_CARD, 2200))
                .bearer_auth(PAYMENTS_API_KEY),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["code"], "idempotency_key_required");

    assert_eq!(
        sandbox.charges("").await.len(),
        1,
        "only the valid charge was made"
    );
}

#[tokio::test]
async fn calls_without_a_sandbox_api_key_are_refused_with_401() {
    let sandbox = spawn_sandbox().await;
    let approved = sandbox
        .charge("", "purchase-1", charge_body(APPROVING_CARD, 2200))
        .await;
    let charge_path = format!(
        "/payments/v1/charges/{}",
        approved.body["id"].as_str().unwrap()
    );

    let unauthenticated = [
        sandbox.post("/payments/v1/charges", charge_body(APPROVING_CARD, 2200)),
        sandbox
            .post("/payments/v1/charges", charge_body(APPROVING_CARD, 2200))
            .bearer_auth("sk_live_123"),
        sandbox
            .post("/payments/v1/charges", charge_body(APPROVING_CARD, 2200))
            .basic_auth(PAYMENTS_API_KEY, Some("")),
        sandbox.get(&charge_path),
        sandbox.get("/payments/v1/payment-methods/pm_sandbox_approve"),
    ];
    for request in unauthenticated {
        let (status, body) = sandbox
            .send(request.header("Idempotency-Key", "purchase-2"))
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert_eq!(body["error"]["code"], "authentication_required");
        assert!(body["error"]["message"].is_string());
    }
    assert_eq!(sandbox.charges("").await.len(), 1);
}

#[tokio::test]
async fn the_test_cards_are_described_with_an_expiry_three_years_ahead_of_the_sandbox_clock() {
    let sandbox = spawn_sandbox().await;
    let (status, _) = sandbox
        .send(sandbox.post("/_sandbox/clock", json!({ "now": "2030-06-01T00:00:00Z" })))
        .await;
    assert_eq!(status, StatusCode::OK);

    for (token, brand, last4) in [
        (APPROVING_CARD, "visa", "4242"),
        (DECLINING_CARD, "visa", "0002"),
        (FLAKY_CARD, "mastercard", "4444"),
    ] {
        let (status, card) = sandbox
            .payments_get(&format!("/payments/v1/payment-methods/{token}"))
            .await;
        assert_eq!(status, StatusCode::OK, "{card}");
        assert_eq!(
            card,
            json!({ "token": token, "brand": brand, "last4": last4, "expMonth": 12, "expYear": 2033 })
        );
    }

    let (status, body) = sandbox
        .payments_get("/payments/v1/payment-methods/pm_card_visa")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "invalid_payment_method");
}

#[tokio::test]
async fn an_unknown_charge_is_missing() {
    let sandbox = spawn_sandbox().await;

    let (status, body) = sandbox
        .payments_get("/payments/v1/charges/ch_doesnotexist")
        .await;

    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "resource_missing");
}

#[tokio::test]
async fn a_faulted_charge_records_nothing_and_its_retry_charges_once() {
    let sandbox = spawn_sandbox().await;
    sandbox
        .add_fault(json!({
            "provider": "payments", "route": "charges", "kind": "server_error", "count": 1, "status": 502
        }))
        .await;
    sandbox
        .add_fault(json!({
            "provider": "payments", "route": "*", "kind": "rate_limited", "count": 1, "retryAfterSeconds": 7
        }))
        .await;
    sandbox
        .add_fault(
            json!({ "provider": "payments", "route": "charges", "kind": "malformed", "count": 1 }),
        )
        .await;

    let answer = sandbox
        .charge("", "purchase-1", charge_body(FLAKY_CARD, 2200))
        .await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert_eq!(answer.body["error"]["code"], "processing_error");

    let response = sandbox
        .charge_request("", "purchase-1", charge_body(FLAKY_CARD, 2200))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()[RETRY_AFTER], "7");
    let (_, body) = status_and_json(response).await;
    assert_eq!(body["error"]["code"], "rate_limited");

    let response = sandbox
        .charge_request("", "purchase-1", charge_body(FLAKY_CARD, 2200))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let text = response.text().await.unwrap();
    assert!(serde_json::from_str::<Value>(&text).is_err(), "{text}");
    assert!(
        sandbox.charges("").await.is_empty(),
        "faulted calls record nothing"
    );

    // The faults did not use up the flaky card's first failure: it fails once, then approves.
    let answer = sandbox
        .charge("", "purchase-1", charge_body(FLAKY_CARD, 2200))
        .await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    let answer = sandbox
        .charge("", "purchase-1", charge_body(FLAKY_CARD, 2200))
        .await;
    assert_eq!(answer.status, StatusCode::CREATED);
    assert_eq!(sandbox.charges("").await.len(), 1);
}

#[tokio::test]
async fn a_payment_methods_fault_leaves_charges_and_the_providers_alone() {
    let sandbox = spawn_sandbox().await;
    sandbox
        .add_fault(json!({
            "provider": "payments", "route": "payment-methods", "kind": "server_error", "count": 1
        }))
        .await;

    let answer = sandbox
        .charge("", "purchase-1", charge_body(APPROVING_CARD, 2200))
        .await;
    assert_eq!(answer.status, StatusCode::CREATED);
    let (status, _) = sandbox
        .argus_account("", ARGUS_DEMO_USERNAME, ARGUS_DEMO_PASSWORD)
        .await;
    assert_eq!(status, StatusCode::OK);

    let (status, body) = sandbox
        .payments_get("/payments/v1/payment-methods/pm_sandbox_approve")
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["error"]["code"], "processing_error");
    let (status, _) = sandbox
        .payments_get("/payments/v1/payment-methods/pm_sandbox_approve")
        .await;
    assert_eq!(status, StatusCode::OK, "the fault is used up");
}

#[tokio::test]
async fn charges_and_idempotency_keys_of_one_namespace_are_invisible_in_another() {
    let sandbox = spawn_sandbox().await;

    let in_team_a = sandbox
        .charge(
            "/ns/team-a",
            "purchase-1",
            charge_body(APPROVING_CARD, 2200),
        )
        .await;
    let in_team_b = sandbox
        .charge(
            "/ns/team-b",
            "purchase-1",
            charge_body(APPROVING_CARD, 4400),
        )
        .await;

    assert_eq!(in_team_a.status, StatusCode::CREATED);
    assert_eq!(
        in_team_b.status,
        StatusCode::CREATED,
        "the key is free in another namespace"
    );
    assert!(!in_team_b.replayed);
    assert_ne!(in_team_a.body["id"], in_team_b.body["id"]);
    let team_a_charges = sandbox.charges("/ns/team-a").await;
    assert_eq!(team_a_charges.len(), 1);
    assert_eq!(team_a_charges[0]["amountCents"], 2200);
    assert_eq!(sandbox.charges("/ns/team-b").await.len(), 1);
    assert!(sandbox.charges("").await.is_empty());

    let team_a_charge = in_team_a.body["id"].as_str().unwrap();
    let (status, _) = sandbox
        .payments_get(&format!("/ns/team-b/payments/v1/charges/{team_a_charge}"))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn reset_clears_charges_and_idempotency_keys() {
    let sandbox = spawn_sandbox().await;
    let before = sandbox
        .charge("", "purchase-1", charge_body(APPROVING_CARD, 2200))
        .await;
    sandbox
        .charge("", "purchase-2", charge_body(DECLINING_CARD, 2200))
        .await;
    assert_eq!(sandbox.charges("").await.len(), 2);

    let (status, _) = sandbox
        .send(sandbox.client.post(sandbox.url("/_sandbox/reset")))
        .await;

    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(sandbox.charges("").await.is_empty());
    let old_charge = before.body["id"].as_str().unwrap();
    let (status, _) = sandbox
        .payments_get(&format!("/payments/v1/charges/{old_charge}"))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let after = sandbox
        .charge("", "purchase-1", charge_body(APPROVING_CARD, 9900))
        .await;
    assert_eq!(after.status, StatusCode::CREATED, "the key is free again");
    assert!(!after.replayed);
    assert_eq!(sandbox.charges("").await.len(), 1);
}
