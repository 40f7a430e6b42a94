//! The `/_sandbox` control API: early decisions, the clock and reset.

use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::*;

#[tokio::test]
async fn approving_a_pending_registration_makes_it_active_at_once() {
    let sandbox = spawn_sandbox().await;
    sandbox
        .register_argus("", "harbourside", "SANDBOX-REJECT")
        .await;

    let (status, row) = sandbox
        .send(sandbox.post(
            "/_sandbox/registrations/argus/harbourside/approve",
            json!({}),
        ))
        .await;

    assert_eq!(status, StatusCode::OK, "{row}");
    assert_eq!(row["provider"], "argus");
    assert_eq!(row["username"], "harbourside");
    assert_eq!(row["status"], "ACTIVE");
    assert!(row["decidesAt"].is_string());
    let (_, account) = sandbox.argus_account("", "harbourside", NEW_PASSWORD).await;
    assert_eq!(account["status"], "ACTIVE");
    assert!(account["decidedAt"].is_string());

    // The scheduled rejection never overrides the early approval.
    sandbox.advance_clock("", 5 * ONE_DAY_SECONDS).await;
    let (_, account) = sandbox.argus_account("", "harbourside", NEW_PASSWORD).await;
    assert_eq!(account["status"], "ACTIVE");
}

#[tokio::test]
async fn rejecting_a_pending_enrolment_makes_it_declined_at_once() {
    let sandbox = spawn_sandbox().await;
    sandbox
        .enrol_referralnet("", "harbourside", "SANDBOX-PROMO")
        .await;

    let (status, row) = sandbox
        .send(
            sandbox
                .client
                .post(sandbox.url("/_sandbox/registrations/referralnet/harbourside/reject")),
        )
        .await;

    assert_eq!(status, StatusCode::OK, "{row}");
    assert_eq!(row["status"], "REJECTED");
    let token = sandbox
        .referralnet_token("", "harbourside", NEW_PASSWORD)
        .await;
    let (_, account) = sandbox.referralnet_account("", &token).await;
    assert_eq!(account["enrolmentState"], "DECLINED");
}

#[tokio::test]
async fn a_decided_or_unknown_registration_cannot_be_decided() {
    let sandbox = spawn_sandbox().await;
    sandbox
        .register_argus("", "harbourside", "SANDBOX-PROMO")
        .await;
    let decide = |path: &str| sandbox.send(sandbox.client.post(sandbox.url(path)));

    let (status, _) = decide("/_sandbox/registrations/argus/harbourside/reject").await;
    assert_eq!(status, StatusCode::OK);

    let (status, body) = decide("/_sandbox/registrations/argus/harbourside/approve").await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(body["error"].is_string());
    let (status, _) = decide("/_sandbox/registrations/argus/demo.argus/reject").await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "demo accounts are already decided"
    );
    let (status, body) = decide("/_sandbox/registrations/argus/nobody.here/approve").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"].is_string());
    let (status, _) = decide("/_sandbox/registrations/referralnet/harbourside/approve").await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "the registration was at Argus"
    );
    let (status, _) = decide("/_sandbox/registrations/medicalobjects/harbourside/approve").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (_, account) = sandbox.argus_account("", "harbourside", NEW_PASSWORD).await;
    assert_eq!(account["status"], "REJECTED");
}

fn time_of(value: &Value) -> DateTime<Utc> {
    value
        .as_str()
        .expect("a timestamp")
        .parse()
        .expect("an RFC 3339 time")
}

#[tokio::test]
async fn the_clock_can_be_read_set_sped_up_and_advanced() {
    let sandbox = spawn_sandbox().await;

    let (status, clock) = sandbox.send(sandbox.get("/_sandbox/clock")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(clock["speed"], 1.0);
    let drift = (time_of(&clock["now"]) - Utc::now()).num_seconds().abs();
    assert!(drift < 5, "a new namespace starts at real now: {clock}");

    let (status, clock) = sandbox
        .send(sandbox.post(
            "/_sandbox/clock",
            json!({ "now": "2030-06-01T09:00:00+10:00", "speed": 0.000001 }),
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{clock}");
    assert_eq!(clock["speed"], 0.000001);
    assert_eq!(clock["now"], "2030-05-31T23:00:00Z");

    let (status, clock) = sandbox
        .send(sandbox.post("/_sandbox/clock/advance", json!({ "seconds": 3600 })))
        .await;
    assert_eq!(status, StatusCode::OK, "{clock}");
    assert_eq!(clock["now"], "2030-06-01T00:00:00Z");

    let (status, clock) = sandbox
        .send(sandbox.post("/_sandbox/clock", json!({ "speed": 60.0 })))
        .await;
    assert_eq!(status, StatusCode::OK, "{clock}");
    assert_eq!(clock["speed"], 60.0);
    let (_, clock) = sandbox.send(sandbox.get("/_sandbox/clock")).await;
    assert!(time_of(&clock["now"]) >= time_of(&json!("2030-06-01T00:00:00Z")));
}

#[tokio::test]
async fn speed_zero_stops_the_clock_until_it_is_advanced() {
    let sandbox = spawn_sandbox().await;
    let (status, clock) = sandbox
        .send(sandbox.post(
            "/_sandbox/clock",
            json!({ "now": "2030-01-01T00:00:00Z", "speed": 0 }),
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{clock}");
    assert_eq!(clock["speed"], 0.0);
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let (_, clock) = sandbox.send(sandbox.get("/_sandbox/clock")).await;
    assert_eq!(
        clock["now"], "2030-01-01T00:00:00Z",
        "a stopped clock does not move"
    );
    sandbox.advance_clock("", 90).await;
    let (_, clock) = sandbox.send(sandbox.get("/_sandbox/clock")).await;
    assert_eq!(clock["now"], "2030-01-01T00:01:30Z");
}

#[tokio::test]
async fn invalid_clock_changes_are_refused_and_change_nothing() {
    let sandbox = spawn_sandbox().await;
    sandbox
        .send(sandbox.post(
            "/_sandbox/clock",
            json!({ "now": "2030-01-01T00:00:00Z", "speed": 0.000001 }),
        ))
        .await;

    for (path, body) in [
        ("/_sandbox/clock/advance", json!({ "seconds": -1 })),
        ("/_sandbox/clock/advance", json!({ "secs": 10 })),
        ("/_sandbox/clock", json!({ "speed": -2.0 })),
        ("/_sandbox/clock", json!({ "speed": 2_000_000.0 })),
        ("/_sandbox/clock", json!({ "now": "yesterday" })),
    ] {
        let (status, answer) = sandbox.send(sandbox.post(path, body.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path} {body}: {answer}");
        assert!(answer["error"].is_string(), "{answer}");
    }

    let (_, clock) = sandbox.send(sandbox.get("/_sandbox/clock")).await;
    assert_eq!(clock["now"], "2030-01-01T00:00:00Z");
    assert_eq!(clock["speed"], 0.000001);
}

#[tokio::test]
async fn reset_restores_the_demo_state() {
    let sandbox = spawn_sandbox().await;
    sandbox
        .register_argus("", "harbourside", "SANDBOX-PROMO")
        .await;
    let old_token = sandbox
        .referralnet_token("", REFERRALNET_DEMO_USER_ID, REFERRALNET_DEMO_PASSWORD)
        .await;
    sandbox
        .send(sandbox.post("/_sandbox/clock", json!({ "speed": 2.0 })))
        .await;
    sandbox.advance_clock("", 30 * ONE_DAY_SECONDS).await;
    sandbox
        .add_fault(json!({ "provider": "argus", "route": "registrations", "kind": "server_error", "count": 5 }))
        .await;

    let (status, _) = sandbox
        .send(sandbox.client.post(sandbox.url("/_sandbox/reset")))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    assert!(sandbox.registrations("").await.is_empty());
    let (_, clock) = sandbox.send(sandbox.get("/_sandbox/clock")).await;
    assert_eq!(clock["speed"], 1.0);
    assert!((time_of(&clock["now"]) - Utc::now()).num_seconds().abs() < 5);
    let (_, faults) = sandbox.send(sandbox.get("/_sandbox/faults")).await;
    assert_eq!(faults, json!([]));
    let (status, body) = sandbox.referralnet_account("", &old_token).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["fault"]["faultCode"], "notAuthorised");
    let (status, account) = sandbox
        .argus_account("", ARGUS_DEMO_USERNAME, ARGUS_DEMO_PASSWORD)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(account["status"], "ACTIVE");
    let (status, _) = sandbox.argus_account("", "harbourside", NEW_PASSWORD).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = sandbox
        .register_argus("", "harbourside", "SANDBOX-PROMO")
        .await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "the username is free again, and no fault is left"
    );
}
