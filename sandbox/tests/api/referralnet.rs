//! ReferralNet: session login, bearer tokens and their expiry on the sandbox clock.

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn the_referralnet_demo_account_logs_in_and_is_approved() {
    let sandbox = spawn_sandbox().await;

    let (status, session) = sandbox
        .referralnet_login("", REFERRALNET_DEMO_USER_ID, REFERRALNET_DEMO_PASSWORD)
        .await;
    assert_eq!(status, StatusCode::OK, "{session}");
    assert!(session["expiresAt"].is_string());
    let token = session["sessionToken"].as_str().unwrap();

    let (status, account) = sandbox.referralnet_account("", token).await;
    assert_eq!(status, StatusCode::OK, "{account}");
    assert_eq!(account["userId"], REFERRALNET_DEMO_USER_ID);
    assert_eq!(account["enrolmentState"], "APPROVED");
    assert!(account["organisationName"].is_string());
}

#[tokio::test]
async fn a_wrong_referralnet_password_or_unknown_user_gets_an_invalid_credentials_fault() {
    let sandbox = spawn_sandbox().await;

    for (user_id, password) in [
        (REFERRALNET_DEMO_USER_ID, "not-the-password"),
        ("nobody.here", REFERRALNET_DEMO_PASSWORD),
        // Argus's demo credentials mean nothing to ReferralNet.
        (ARGUS_DEMO_USERNAME, ARGUS_DEMO_PASSWORD),
    ] {
        let (status, body) = sandbox.referralnet_login("", user_id, password).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert_eq!(body["fault"]["faultCode"], "invalidCredentials");
        assert!(body["fault"]["faultString"].is_string());
        assert!(body.get("sessionToken").is_none());
    }
}

#[tokio::test]
async fn a_login_without_a_user_id_is_a_bad_param() {
    let sandbox = spawn_sandbox().await;

    let (status, body) = sandbox
        .send(sandbox.post(
            "/referralnet/api/sessions",
            json!({ "password": REFERRALNET_DEMO_PASSWORD }),
        ))
        .await;

    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["fault"]["faultCode"], "badParam");
}

#[tokio::test]
async fn an_unknown_or_missing_session_token_is_not_authorised() {
    let sandbox = spawn_sandbox().await;

    let (status, body) = sandbox.referralnet_account("", "made-up-token").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["fault"]["faultCode"], "notAuthorised");

    let (status, body) = sandbox.send(sandbox.get("/referralnet/api/account")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["fault"]["faultCode"], "notAuthorised");
}

#[tokio::test]
async fn a_session_token_expires_after_fifteen_sandbox_minutes_and_a_fresh_login_works() {
    let sandbox = spawn_sandbox().await;
    let token = sandbox
        .referralnet_token("", REFERRALNET_DEMO_USER_ID, REFERRALNET_DEMO_PASSWORD)
        .await;

    sandbox.advance_clock("", 14 * 60).await;
    let (status, body) = sandbox.referralnet_account("", &token).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "still valid after 14 minutes: {body}"
    );

    sandbox.advance_clock("", 2 * 60).await;
    let (status, body) = sandbox.referralnet_account("", &token).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["fault"]["faultCode"], "tokenExpired");

    let fresh_token = sandbox
        .referralnet_token("", REFERRALNET_DEMO_USER_ID, REFERRALNET_DEMO_PASSWORD)
        .await;
    assert_ne!(fresh_token, token);
    let (status, body) = sandbox.referralnet_account("", &fresh_token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["enrolmentState"], "APPROVED");
}
