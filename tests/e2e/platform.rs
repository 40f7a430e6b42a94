//! The HTTP surface: health, readiness, GET rules, limits, CORS.

use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn health_and_readiness_answer() {
    let app = spawn_app().await;
    let health = app
        .client
        .get(format!("{}/healthz", app.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let ready = app
        .client
        .get(format!("{}/readyz", app.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
}

#[tokio::test]
async fn get_runs_queries_but_never_mutations() {
    let app = spawn_app().await;
    let token = practitioner("dr-chen", "clinic-1");
    let query = app
        .client
        .get(
            reqwest::Url::parse_with_params(
                &format!("{}/graphql", app.base_url),
                &[("query", "{ me { id } }")],
            )
            .unwrap(),
        )
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = query.json().await.unwrap();
    assert_eq!(body["data"]["me"]["id"], "dr-chen", "{body}");

    let mutation = app
        .client
        .get(
            reqwest::Url::parse_with_params(
                &format!("{}/graphql", app.base_url),
                &[(
                    "query",
                    "mutation { disconnectProvider(provider: ARGUS) { status } }",
                )],
            )
            .unwrap(),
        )
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(mutation.status(), 405);
}

#[tokio::test]
async fn the_playground_is_off_when_not_enabled() {
    let app = spawn_app().await;
    let response = app
        .client
        .get(format!("{}/graphql", app.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
}

#[tokio::test]
async fn oversized_bodies_deep_queries_many_aliases_and_batches_are_refused() {
    let app = spawn_app().await;
    let token = practitioner("dr-chen", "clinic-1");

    let huge = "x".repeat(300 * 1024);
    let response = app
        .client
        .post(format!("{}/graphql", app.base_url))
        .bearer_auth(&token)
        .json(&json!({"query": format!("{{ me {{ id }} }} # {huge}")}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);

    let aliases: String = (0..40).map(|i| format!("a{i}: me {{ id }} ")).collect();
    let response = app
        .gql(Some(&token), &format!("{{ {aliases} }}"), json!({}))
        .await;
    assert_eq!(error_code(&response), Some("BAD_USER_INPUT"), "{response}");

    // Introspection has its own allowance (GraphiQL's schema query needs 15); past it, refused.
    let opening = "__schema { types { fields { type { ".to_owned() + &"ofType { ".repeat(14);
    let deep = format!(
        "{{ {opening}name {} }}",
        "} ".repeat(opening.matches('{').count())
    );
    let response = app.gql(Some(&token), &deep, json!({})).await;
    assert_eq!(error_code(&response), Some("BAD_USER_INPUT"));
    assert!(
        response["errors"][0]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("too deep"),
        "{response}"
    );

    let batch = app
        .client
        .post(format!("{}/graphql", app.base_url))
        .bearer_auth(&token)
        .json(&json!([{"query": "{ me { id } }"}, {"query": "{ me { id } }"}]))
        .send()
        .await
        .unwrap();
    let status = batch.status();
    let body = batch.text().await.unwrap();
    assert!(
        status.is_client_error() || body.contains("errors"),
        "a batch is not executed: {status} {body}"
    );
    assert!(!body.contains("dr-chen"));
}

#[tokio::test]
async fn browsers_from_unlisted_origins_get_no_cors_grant() {
    let app = spawn_app().await;
    let response = app
        .client
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/graphql", app.base_url),
        )
        .header("Origin", "https://evil.example")
        .header("Access-Control-Request-Method", "POST")
        .send()
        .await
        .unwrap();
    assert!(
        response
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
}
