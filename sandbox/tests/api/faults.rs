//! Injected faults: each kind, their order and count, and that they stay on their route.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::header::RETRY_AFTER;
use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn a_server_error_fault_answers_the_next_two_calls_then_the_normal_answer_returns() {
    let sandbox = spawn_sandbox().await;
    let fault = sandbox
        .add_fault(
            json!({ "provider": "argus", "route": "account", "kind": "server_error", "count": 2 }),
        )
        .await;
    assert!(fault["id"].is_string());
    assert_eq!(fault["status"], 503);

    for _ in 0..2 {
        let (status, body) = sandbox
            .argus_account("", ARGUS_DEMO_USERNAME, ARGUS_DEMO_PASSWORD)
            .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["error"]["code"], "serviceTemporaryUnavailable");
    }
    let (status, account) = sandbox
        .argus_account("", ARGUS_DEMO_USERNAME, ARGUS_DEMO_PASSWORD)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(account["status"], "ACTIVE");
    let (_, remaining) = sandbox.send(sandbox.get("/_sandbox/faults")).await;
    assert_eq!(remaining, json!([]));
}

#[tokio::test]
async fn a_server_error_fault_uses_the_chosen_status_and_the_providers_error_shape() {
    let sandbox = spawn_sandbox().await;
    sandbox
        .add_fault(json!({
            "provider": "referralnet", "route": "*", "kind": "server_error", "count": 1, "status": 502
        }))
        .await;

    let (status, body) = sandbox
        .referralnet_login("", REFERRALNET_DEMO_USER_ID, REFERRALNET_DEMO_PASSWORD)
        .await;

    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(body["fault"]["faultCode"], "serviceTemporaryUnavailable");
}

#[tokio::test]
async fn a_faulted_registration_registers_nothing() {
    let sandbox = spawn_sandbox().await;
    sandbox
        .add_fault(json!({ "provider": "argus", "route": "registrations", "kind": "server_error", "count": 1 }))
        .await;

    let (status, _) = sandbox
        .register_argus("", "harbourside", "SANDBOX-PROMO")
        .await;

    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(sandbox.registrations("").await.is_empty());
}

#[tokio::test]
async fn a_rate_limited_fault_answers_429_with_retry_after() {
    let sandbox = spawn_sandbox().await;
    sandbox
        .add_fault(json!({
            "provider": "referralnet", "route": "sessions", "kind": "rate_limited", "count": 1,
            "retryAfterSeconds": 12
        }))
        .await;

    let response = sandbox
        .post(
            "/referralnet/api/sessions",
            json!({ "userId": REFERRALNET_DEMO_USER_ID, "password": REFERRALNET_DEMO_PASSWORD }),
        )
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()[RETRY_AFTER], "12");
    let (_, body) = status_and_json(response).await;
    assert!(body["fault"]["faultCode"].is_string());
    assert!(body.get("sessionToken").is_none());
}

#[tokio::test]
async fn a_malformed_fault_answers_200_with_a_body_that_is_not_json() {
    let sandbox = spawn_sandbox().await;
    sandbox
        .add_fault(
            json!({ "provider": "argus", "route": "account", "kind": "malformed", "count": 1 }),
        )
        .await;

    let response = sandbox
        .get("/argus/v1/account")
        .basic_auth(ARGUS_DEMO_USERNAME, Some(ARGUS_DEMO_PASSWORD))
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), StatusCode::OK);
    let text = response.text().await.unwrap();
    assert!(!text.is_empty());
    assert!(
        serde_json::from_str::<serde_json::Value>(&text).is_err(),
        "{text}"
    );
}

#[tokio::test]
async fn a_timeout_fault_holds_the_request_past_the_clients_timeout() {
    let sandbox = spawn_sandbox().await;
    sandbox
        .add_fault(json!({
            "provider": "argus", "route": "account", "kind": "timeout", "count": 1, "holdSeconds": 1
        }))
        .await;

    let started = Instant::now();
    let outcome = sandbox
        .get("/argus/v1/account")
        .basic_auth(ARGUS_DEMO_USERNAME, Some(ARGUS_DEMO_PASSWORD))
        .timeout(Duration::from_millis(200))
        .send()
        .await;

    let error = outcome.expect_err("the request is held past the client's timeout");
    assert!(error.is_timeout(), "{error}");
    assert!(started.elapsed() < Duration::from_secs(1));

    // Held to the end, the call answers 504.
    sandbox
        .add_fault(json!({
            "provider": "argus", "route": "account", "kind": "timeout", "count": 1, "holdSeconds": 1
        }))
        .await;
    let started = Instant::now();
    let (status, body) = sandbox
        .argus_account("", ARGUS_DEMO_USERNAME, ARGUS_DEMO_PASSWORD)
        .await;
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(body["error"]["code"], "serviceTemporaryUnavailable");

    let (status, _) = sandbox
        .argus_account("", ARGUS_DEMO_USERNAME, ARGUS_DEMO_PASSWORD)
        .await;
    assert_eq!(status, StatusCode::OK, "the fault is used up");
}

#[tokio::test]
async fn faults_hit_only_their_provider_and_route_in_the_order_they_were_added() {
    let sandbox = spawn_sandbox().await;
    sandbox
        .add_fault(json!({ "provider": "referralnet", "route": "account", "kind": "server_error", "count": 1 }))
        .await;
    sandbox
        .add_fault(json!({ "provider": "argus", "route": "*", "kind": "rate_limited", "count": 1 }))
        .await;
    sandbox
        .add_fault(
            json!({ "provider": "argus", "route": "account", "kind": "server_error", "count": 1 }),
        )
        .await;

    let (status, _) = sandbox
        .referralnet_login("", REFERRALNET_DEMO_USER_ID, REFERRALNET_DEMO_PASSWORD)
        .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "a fault on account leaves sessions alone"
    );
    let (status, _) = sandbox
        .argus_account("", ARGUS_DEMO_USERNAME, ARGUS_DEMO_PASSWORD)
        .await;
    assert_eq!(
        status,
        StatusCode::TOO_MANY_REQUESTS,
        "the older argus fault comes first"
    );
    let (status, _) = sandbox
        .argus_account("", ARGUS_DEMO_USERNAME, ARGUS_DEMO_PASSWORD)
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);

    let (_, remaining) = sandbox.send(sandbox.get("/_sandbox/faults")).await;
    let remaining = remaining.as_array().unwrap();
    assert_eq!(remaining.len(), 1);
    assert_eq!(remaining[0]["provider"], "referralnet");
    assert_eq!(remaining[0]["count"], 1);
}

#[tokio::test]
async fn clearing_faults_removes_every_waiting_fault() {
    let sandbox = spawn_sandbox().await;
    sandbox
        .add_fault(
            json!({ "provider": "argus", "route": "account", "kind": "server_error", "count": 3 }),
        )
        .await;

    let (status, _) = sandbox
        .send(sandbox.client.delete(sandbox.url("/_sandbox/faults")))
        .await;

    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = sandbox
        .argus_account("", ARGUS_DEMO_USERNAME, ARGUS_DEMO_PASSWORD)
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn an_impossible_fault_is_refused() {
    let sandbox = spawn_sandbox().await;

    for fault in [
        json!({ "provider": "argus", "route": "sessions", "kind": "timeout", "count": 1 }),
        json!({ "provider": "argus", "route": "account", "kind": "explode", "count": 1 }),
        json!({ "provider": "argus", "route": "account", "kind": "server_error", "count": 0 }),
        json!({ "provider": "argus", "route": "account", "kind": "server_error", "count": 1, "status": 404 }),
        json!({ "provider": "payments", "route": "account", "kind": "server_error", "count": 1 }),
        json!({ "provider": "argus", "route": "charges", "kind": "server_error", "count": 1 }),
        json!({ "provider": "bank", "route": "*", "kind": "server_error", "count": 1 }),
    ] {
        let (status, body) = sandbox
            .send(sandbox.post("/_sandbox/faults", fault.clone()))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{fault}: {body}");
        assert!(body["error"].is_string());
    }
    let (_, remaining) = sandbox.send(sandbox.get("/_sandbox/faults")).await;
    assert_eq!(remaining, json!([]));
}
