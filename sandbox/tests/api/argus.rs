//! Argus: Basic-auth account reads and registration refusals.

use reqwest::StatusCode;
use reqwest::header::WWW_AUTHENTICATE;
use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn the_argus_demo_account_authenticates_and_is_active() {
    let sandbox = spawn_sandbox().await;

    let (status, account) = sandbox
        .argus_account("", ARGUS_DEMO_USERNAME, ARGUS_DEMO_PASSWORD)
        .await;

    assert_eq!(status, StatusCode::OK, "{account}");
    assert_eq!(account["username"], ARGUS_DEMO_USERNAME);
    assert_eq!(account["status"], "ACTIVE");
    assert!(account["practiceName"].is_string());
    assert!(account["registeredAt"].is_string());
    assert!(account["decidedAt"].is_string());
}

#[tokio::test]
async fn a_wrong_password_unknown_user_or_missing_credentials_get_invalid_credentials_with_a_basic_challenge()
 {
    let sandbox = spawn_sandbox().await;
    let account_url = sandbox.url("/argus/v1/account");
    let requests = [
        sandbox
            .client
            .get(&account_url)
            .basic_auth(ARGUS_DEMO_USERNAME, Some("not-the-password")),
        sandbox
            .client
            .get(&account_url)
            .basic_auth("nobody.here", Some(ARGUS_DEMO_PASSWORD)),
        sandbox.client.get(&account_url),
    ];

    for request in requests {
        let response = request.send().await.unwrap();
        let challenge = response.headers().get(WWW_AUTHENTICATE).cloned();
        let (status, body) = status_and_json(response).await;

        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body["error"]["code"], "invalidCredentials");
        assert!(body["error"]["message"].is_string());
        assert!(
            !body.to_string().contains(ARGUS_DEMO_PASSWORD),
            "the answer must not echo a password"
        );
        assert_eq!(challenge.unwrap(), r#"Basic realm="argus""#);
    }
}

#[tokio::test]
async fn an_argus_registration_with_a_bad_field_is_a_bad_param_and_registers_nothing() {
    let sandbox = spawn_sandbox().await;
    let valid_form = json!({
        "username": "new.practice",
        "password": NEW_PASSWORD,
        "promoCode": "SANDBOX-PROMO",
        "practiceName": "Harbourside Family Practice",
        "contactEmail": "front.desk@harbourside.example",
    });
    let bad_forms = [
        ("username", json!("  ")),
        ("username", json!("no")),
        ("username", json!("has space")),
        ("password", json!("short")),
        ("contactEmail", json!("no-at-sign")),
        ("practiceName", json!(null)),
    ];

    for (field, bad_value) in bad_forms {
        let mut form = valid_form.clone();
        form[field] = bad_value;
        let (status, body) = sandbox
            .send(sandbox.post("/argus/v1/registrations", form))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{field}: {body}");
        assert_eq!(body["error"]["code"], "badParam", "{field}: {body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(field),
            "the message names {field}: {body}"
        );
    }
    let not_json = sandbox
        .client
        .post(sandbox.url("/argus/v1/registrations"))
        .body("username=new.practice");
    let (status, body) = sandbox.send(not_json).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["code"], "badParam");

    assert!(sandbox.registrations("").await.is_empty());
}
