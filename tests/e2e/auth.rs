//! Tokens: only verified ones get in, and a bad one is never treated as anonymous.

use base64::Engine;
use serde_json::json;
use smd_gateway::domain::types::Role;

use crate::helpers::*;

async fn assert_refused(app: &TestApp, token: &str) {
    let response = app.gql(Some(token), "{ me { id } }", json!({})).await;
    assert_eq!(error_code(&response), Some("UNAUTHENTICATED"), "{response}");
    assert!(response["data"].is_null());
}

#[tokio::test]
async fn a_valid_token_provisions_the_user_and_group() {
    let app = spawn_app().await;
    let response = app
        .gql(
            Some(&practitioner("dr-chen", "clinic-1")),
            "{ me { id name role groupId canSendSecureMessages } }",
            json!({}),
        )
        .await;
    assert_eq!(
        response["data"]["me"],
        json!({"id": "dr-chen", "name": "dr-chen name", "role": "PRACTITIONER", "groupId": "clinic-1", "canSendSecureMessages": true}),
        "{response}"
    );
    assert_eq!(app.count_rows("users").await, 1);
    assert_eq!(app.count_rows("groups").await, 1);
}

#[tokio::test]
async fn no_token_means_unauthenticated_not_anonymous() {
    let app = spawn_app().await;
    let response = app
        .gql(None, "{ integrations { status } }", json!({}))
        .await;
    assert_eq!(error_code(&response), Some("UNAUTHENTICATED"), "{response}");
    let response = app
        .gql(
            None,
            "mutation { validateLogin(provider: ARGUS) { valid } }",
            json!({}),
        )
        .await;
    assert_eq!(error_code(&response), Some("UNAUTHENTICATED"));
}

#[tokio::test]
async fn expired_wrongly_signed_unsigned_and_wrong_audience_tokens_are_unauthenticated() {
    let app = spawn_app().await;
    // Expired well beyond the 5 s leeway: a token minted with a negative lifetime is not
    // possible, so sign one by hand with exp in the past.
    let expired = {
        jsonwebtoken_free::sign_claims(
            json!({"sub": "u", "group": "g", "role": "practitioner", "iss": ISSUER, "aud": AUDIENCE, "exp": 1_000_000_000}),
        )
    };
    assert_refused(&app, &expired).await;
    let wrong_key = token_with(
        "another-secret-that-is-long-enough-000",
        ISSUER,
        AUDIENCE,
        "u",
        "g",
        Role::Practitioner,
        600,
    );
    assert_refused(&app, &wrong_key).await;
    let wrong_audience = token_with(
        SECRET,
        ISSUER,
        "someone-else",
        "u",
        "g",
        Role::Practitioner,
        600,
    );
    assert_refused(&app, &wrong_audience).await;
    let wrong_issuer = token_with(
        SECRET,
        "https://evil.example",
        AUDIENCE,
        "u",
        "g",
        Role::Practitioner,
        600,
    );
    assert_refused(&app, &wrong_issuer).await;
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let unsigned = format!(
        "{}.{}.",
        engine.encode(br#"{"alg":"none","typ":"JWT"}"#),
        engine.encode(json!({"sub": "u", "group": "g", "role": "practitioner", "iss": ISSUER, "aud": AUDIENCE, "exp": 9_999_999_999u64}).to_string())
    );
    assert_refused(&app, &unsigned).await;
    assert_refused(&app, "garbage").await;
    let bad_role = jsonwebtoken_free::sign_claims(
        json!({"sub": "u", "group": "g", "role": "superuser", "iss": ISSUER, "aud": AUDIENCE, "exp": 9_999_999_999u64}),
    );
    assert_refused(&app, &bad_role).await;

    assert_eq!(
        app.count_rows("users").await,
        0,
        "no refused token provisioned anyone"
    );
}

/// Signs arbitrary claims with the test secret (HS256), for tokens `mint_hs256` will not make.
mod jsonwebtoken_free {
    pub fn sign_claims(claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(super::SECRET.as_bytes()),
        )
        .unwrap()
    }
}
