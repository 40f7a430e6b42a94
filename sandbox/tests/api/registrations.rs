//! Registration at both providers: promo codes, the decision on the sandbox clock, duplicates,
//! and repeatable decision times.

use reqwest::StatusCode;
use serde_json::{Value, json};
use smd_sandbox::SandboxConfig;

use crate::helpers::*;

fn registration_of<'a>(registrations: &'a [Value], username: &str) -> &'a Value {
    registrations
        .iter()
        .find(|registration| registration["username"] == username)
        .unwrap_or_else(|| panic!("{username} is listed in {registrations:?}"))
}

#[tokio::test]
async fn an_argus_registration_with_sandbox_promo_stays_pending_until_the_clock_passes_its_decision()
 {
    let sandbox = spawn_sandbox().await;

    let (status, registered) = sandbox
        .register_argus("", "harbourside", "SANDBOX-PROMO")
        .await;
    assert_eq!(status, StatusCode::CREATED, "{registered}");
    assert_eq!(registered["username"], "harbourside");
    assert_eq!(registered["status"], "PENDING");
    assert!(registered["registeredAt"].is_string());

    let (status, account) = sandbox.argus_account("", "harbourside", NEW_PASSWORD).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "a pending account can be read: {account}"
    );
    assert_eq!(account["status"], "PENDING");
    assert_eq!(account["decidedAt"], Value::Null);
    assert_eq!(account["practiceName"], "Harbourside Family Practice");

    sandbox.advance_clock("", 2 * ONE_DAY_SECONDS).await;
    let (_, account) = sandbox.argus_account("", "harbourside", NEW_PASSWORD).await;
    assert_eq!(account["status"], "PENDING", "still pending after 2 days");

    sandbox.advance_clock("", 2 * ONE_DAY_SECONDS).await;
    let (_, account) = sandbox.argus_account("", "harbourside", NEW_PASSWORD).await;
    assert_eq!(account["status"], "ACTIVE", "active after 4 days");
    let listed = sandbox.registrations("").await;
    let listed = registration_of(&listed, "harbourside");
    assert_eq!(listed["provider"], "argus");
    assert_eq!(listed["status"], "ACTIVE");
    assert_eq!(account["decidedAt"], listed["decidesAt"]);
    assert_eq!(listed["registeredAt"], registered["registeredAt"]);
}

#[tokio::test]
async fn an_argus_registration_with_sandbox_reject_ends_rejected() {
    let sandbox = spawn_sandbox().await;
    let (status, _) = sandbox
        .register_argus("", "declined.clinic", "SANDBOX-REJECT")
        .await;
    assert_eq!(status, StatusCode::CREATED);

    sandbox.advance_clock("", 4 * ONE_DAY_SECONDS).await;

    let (status, account) = sandbox
        .argus_account("", "declined.clinic", NEW_PASSWORD)
        .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "a rejected account can still be read: {account}"
    );
    assert_eq!(account["status"], "REJECTED");
    assert!(account["decidedAt"].is_string());
}

#[tokio::test]
async fn a_referralnet_enrolment_is_pending_then_approved_or_declined_by_its_promotion_code() {
    let sandbox = spawn_sandbox().await;

    let (status, enrolment) = sandbox
        .enrol_referralnet("", "harbourside", "SANDBOX-PROMO")
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{enrolment}");
    assert_eq!(enrolment["userId"], "harbourside");
    assert_eq!(enrolment["state"], "PENDING");
    assert!(enrolment["enrolmentId"].is_string());
    let (status, _) = sandbox
        .enrol_referralnet("", "declined.clinic", "SANDBOX-REJECT")
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);

    let approved_token = sandbox
        .referralnet_token("", "harbourside", NEW_PASSWORD)
        .await;
    let (_, account) = sandbox.referralnet_account("", &approved_token).await;
    assert_eq!(
        account["enrolmentState"], "PENDING",
        "a pending enrolment can log in"
    );
    assert_eq!(account["organisationName"], "Harbourside Family Practice");

    sandbox.advance_clock("", 4 * ONE_DAY_SECONDS).await;

    // The earlier token expired with the clock advance, so both log in afresh.
    let approved_token = sandbox
        .referralnet_token("", "harbourside", NEW_PASSWORD)
        .await;
    let (_, account) = sandbox.referralnet_account("", &approved_token).await;
    assert_eq!(account["enrolmentState"], "APPROVED");
    let declined_token = sandbox
        .referralnet_token("", "declined.clinic", NEW_PASSWORD)
        .await;
    let (_, account) = sandbox.referralnet_account("", &declined_token).await;
    assert_eq!(account["enrolmentState"], "DECLINED");

    let listed = sandbox.registrations("").await;
    assert_eq!(registration_of(&listed, "harbourside")["status"], "ACTIVE");
    assert_eq!(
        registration_of(&listed, "declined.clinic")["status"],
        "REJECTED"
    );
    assert_eq!(
        registration_of(&listed, "declined.clinic")["provider"],
        "referralnet"
    );
}

#[tokio::test]
async fn an_unknown_promo_code_is_refused_at_both_providers_and_registers_nothing() {
    let sandbox = spawn_sandbox().await;

    let (status, body) = sandbox
        .register_argus("", "harbourside", "FREE-CREDITS")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["code"], "invalidPromoCode");

    let (status, body) = sandbox
        .enrol_referralnet("", "harbourside", "sandbox-promo")
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["fault"]["faultCode"], "invalidPromoCode");

    assert!(sandbox.registrations("").await.is_empty());
    let (status, _) = sandbox.argus_account("", "harbourside", NEW_PASSWORD).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_referralnet_enrolment_with_a_bad_field_is_a_bad_param() {
    let sandbox = spawn_sandbox().await;

    let (status, body) = sandbox
        .send(sandbox.post(
            "/referralnet/api/enrolments",
            json!({
                "userId": "harbourside",
                "password": NEW_PASSWORD,
                "promotionCode": "SANDBOX-PROMO",
                "email": "front.desk@harbourside.example",
            }),
        ))
        .await;

    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["fault"]["faultCode"], "badParam");
    assert!(
        body["fault"]["faultString"]
            .as_str()
            .unwrap()
            .contains("organisationName")
    );
    assert!(sandbox.registrations("").await.is_empty());
}

#[tokio::test]
async fn a_taken_username_is_refused_as_a_duplicate() {
    let sandbox = spawn_sandbox().await;
    let (status, _) = sandbox
        .register_argus("", "harbourside", "SANDBOX-PROMO")
        .await;
    assert_eq!(status, StatusCode::CREATED);

    let (status, body) = sandbox
        .register_argus("", "harbourside", "SANDBOX-REJECT")
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["error"]["code"], "duplicate");
    let (status, body) = sandbox
        .register_argus("", ARGUS_DEMO_USERNAME, "SANDBOX-PROMO")
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["error"]["code"], "duplicate");
    let (status, body) = sandbox
        .enrol_referralnet("", REFERRALNET_DEMO_USER_ID, "SANDBOX-PROMO")
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["fault"]["faultCode"], "duplicate");

    // The first registration is untouched: still approved on schedule, password unchanged.
    let listed = sandbox.registrations("").await;
    assert_eq!(listed.len(), 1);
    sandbox.advance_clock("", 4 * ONE_DAY_SECONDS).await;
    let (_, account) = sandbox.argus_account("", "harbourside", NEW_PASSWORD).await;
    assert_eq!(account["status"], "ACTIVE");
}

/// Registers `harbourside` at a fixed sandbox time and returns its decision time.
async fn decision_time_with_seed(seed: u64) -> Value {
    let sandbox = spawn_sandbox_with(SandboxConfig {
        seed,
        clock_speed: 1.0,
        ..SandboxConfig::default()
    })
    .await;
    // A near-stopped clock keeps registeredAt on the same whole second in every run.
    let (status, body) = sandbox
        .send(sandbox.post(
            "/_sandbox/clock",
            json!({ "now": "2030-01-01T00:00:00Z", "speed": 0.000001 }),
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, registered) = sandbox
        .register_argus("", "harbourside", "SANDBOX-PROMO")
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(registered["registeredAt"], "2030-01-01T00:00:00Z");
    let listed = sandbox.registrations("").await;
    registration_of(&listed, "harbourside")["decidesAt"].clone()
}

#[tokio::test]
async fn the_same_seed_gives_the_same_decision_time_and_another_seed_a_different_one() {
    let first = decision_time_with_seed(7).await;
    let second = decision_time_with_seed(7).await;
    let other_seed = decision_time_with_seed(8).await;

    assert_eq!(first, second);
    assert_ne!(first, other_seed);
    let decides_at: chrono::DateTime<chrono::Utc> =
        first.as_str().unwrap().parse().expect("an RFC 3339 time");
    let registered_at: chrono::DateTime<chrono::Utc> = "2030-01-01T00:00:00Z".parse().unwrap();
    let delay = decides_at - registered_at;
    assert!(delay >= chrono::Duration::days(3) && delay <= chrono::Duration::days(4));
}
