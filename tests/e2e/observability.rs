//! What operators see: `/metrics`, who may read it, and `x-request-id` on every response.

use std::time::Duration;

use reqwest::header::HeaderValue;
use serde_json::json;

use crate::helpers::*;
use crate::ws::WsClient;

const METRICS_TOKEN: &str = "e2e-metrics-token-0123456789";

async fn spawn_app_with_metrics_token() -> TestApp {
    spawn_app_configured(Options::default(), |settings| {
        settings.metrics.token = Some(METRICS_TOKEN.into());
    })
    .await
}

impl TestApp {
    async fn scrape(&self, token: Option<&str>) -> reqwest::Response {
        let mut request = self.client.get(format!("{}/metrics", self.base_url));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.expect("gateway answers")
    }

    async fn metrics_text(&self) -> String {
        let response = self.scrape(Some(METRICS_TOKEN)).await;
        assert_eq!(response.status(), 200);
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/openmetrics-text"),
        );
        response.text().await.unwrap()
    }
}

/// The value of the sample named exactly `series` (name and labels as printed), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|value| value.trim().parse().ok())
    })
}

#[tokio::test]
async fn metrics_count_operations_refusals_provider_calls_and_purchases_with_their_labels() {
    let app = spawn_app_with_metrics_token().await;
    let token = practitioner("dr-chen", "clinic-1");

    let me = app
        .gql(Some(&token), "query Me { me { id } }", json!({}))
        .await;
    assert_eq!(me["data"]["me"]["id"], "dr-chen", "{me}");
    let refused = app
        .gql(Some("not-a-token"), "query Me { me { id } }", json!({}))
        .await;
    assert_eq!(error_code(&refused), Some("UNAUTHENTICATED"), "{refused}");
    let linked = app
        .gql(
            Some(&token),
            "mutation LinkArgus($input: LinkAccountInput!) { linkArgus(input: $input) { status } }",
            json!({"input": {"username": ARGUS_USER, "password": ARGUS_PASSWORD}}),
        )
        .await;
    assert_eq!(linked["data"]["linkArgus"]["status"], "ACTIVE", "{linked}");
    let card = app
        .gql(
            Some(&token),
            "mutation SetCard($input: SetPaymentMethodInput!) { setPaymentMethod(input: $input) { display } }",
            json!({"input": {"token": "pm_sandbox_approve"}}),
        )
        .await;
    assert!(card["errors"].is_null(), "{card}");
    let bought = app
        .gql(
            Some(&token),
            "mutation Buy($input: PurchaseCreditsInput!) { purchaseCredits(input: $input) { balance } }",
            json!({"input": {"packId": "pack-100", "idempotencyKey": uuid::Uuid::new_v4().to_string()}}),
        )
        .await;
    assert_eq!(
        bought["data"]["purchaseCredits"]["balance"], 100,
        "{bought}"
    );
    let mut socket = WsClient::ready(&app, &token).await;
    socket.subscribe("1", "query OverWs { me { id } }").await;
    let result = socket.result_of("1").await;
    assert_eq!(result["payload"]["data"]["me"]["id"], "dr-chen", "{result}");

    let operations = "smd_graphql_operations_total";
    let ws_series = format!(r#"{operations}{{operation="OverWs",transport="ws",outcome="OK"}}"#);
    // The WebSocket operation is counted when its task ends, just after its `complete`.
    let text = eventually(Duration::from_secs(5), || async {
        let text = app.metrics_text().await;
        sample(&text, &ws_series).map(|_| text)
    })
    .await;
    for (series, expected) in [
        (
            format!(r#"{operations}{{operation="Me",transport="http",outcome="OK"}}"#),
            1.0,
        ),
        (
            format!(r#"{operations}{{operation="Me",transport="http",outcome="UNAUTHENTICATED"}}"#),
            1.0,
        ),
        (
            format!(r#"{operations}{{operation="LinkArgus",transport="http",outcome="OK"}}"#),
            1.0,
        ),
        (ws_series.clone(), 1.0),
        (
            r#"smd_graphql_operation_duration_seconds_count{operation="Me",transport="http"}"#
                .into(),
            2.0,
        ),
        (
            r#"smd_provider_calls_total{provider="argus",route="account",outcome="ok"}"#.into(),
            1.0,
        ),
        (
            r#"smd_provider_call_duration_seconds_count{provider="argus",route="account"}"#.into(),
            1.0,
        ),
        (
            r#"smd_provider_calls_total{provider="payments",route="charge",outcome="ok"}"#.into(),
            1.0,
        ),
        (
            r#"smd_credit_purchases_total{outcome="succeeded"}"#.into(),
            1.0,
        ),
        (
            r#"smd_credits_credited_total{reason="purchase"}"#.into(),
            100.0,
        ),
        ("smd_outbox_queued_messages".into(), 0.0),
        ("smd_outbox_oldest_queued_age_seconds".into(), 0.0),
        ("smd_websocket_open_operations".into(), 0.0),
    ] {
        assert_eq!(
            sample(&text, &series),
            Some(expected),
            "{series} in\n{text}"
        );
    }
    assert!(
        sample(&text, r#"smd_database_pool_connections{state="idle"}"#).is_some_and(|n| n >= 0.0),
        "{text}"
    );
    // Nothing declined, nothing debited, no call failed.
    assert_eq!(
        sample(&text, r#"smd_credit_purchases_total{outcome="declined"}"#),
        None
    );
    assert!(!text.contains("smd_credits_debited_total{"), "{text}");
    assert!(!text.contains(r#"outcome="timeout""#), "{text}");
    // No credential, token, variable or query text is a label.
    for secret in [
        ARGUS_PASSWORD,
        ARGUS_USER,
        token.as_str(),
        "not-a-token",
        METRICS_TOKEN,
        "pm_sandbox_approve",
        "dr-chen",
        "linkArgus(",
        "idempotencyKey",
    ] {
        assert!(!text.contains(secret), "{secret:?} in /metrics:\n{text}");
    }
}

#[tokio::test]
async fn operation_names_that_are_not_plain_identifiers_are_counted_as_anonymous() {
    let app = spawn_app_with_metrics_token().await;
    let token = practitioner("dr-chen", "clinic-1");
    let response = app
        .client
        .post(format!("{}/graphql", app.base_url))
        .bearer_auth(&token)
        .json(&json!({"query": "{ me { id } }", "operationName": "Ada O'Brien 1961-03-04"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    app.gql(Some(&token), "{ me { id } }", json!({})).await;
    let text = app.metrics_text().await;
    assert!(!text.contains("Brien"), "{text}");
    assert!(!text.contains("1961"), "{text}");
    assert!(
        sample(
            &text,
            r#"smd_graphql_operations_total{operation="anonymous",transport="http",outcome="OK"}"#
        )
        .is_some_and(|count| count >= 1.0),
        "{text}"
    );
}

#[tokio::test]
async fn metrics_are_refused_without_the_token_and_not_served_in_production_without_one() {
    let app = spawn_app_with_metrics_token().await;
    for presented in [None, Some("wrong-token-0123456789"), Some("")] {
        let response = app.scrape(presented).await;
        assert_eq!(response.status(), 401, "{presented:?}");
        let body = response.text().await.unwrap();
        assert!(!body.contains("smd_"), "{body}");
    }
    assert_eq!(app.scrape(Some(METRICS_TOKEN)).await.status(), 200);

    // Production settings without a token: no /metrics at all on the main port.
    let production = spawn_app().await;
    let response = production.scrape(None).await;
    assert_eq!(response.status(), 404);
    assert!(!response.text().await.unwrap().contains("smd_"));
    assert_eq!(production.scrape(Some(METRICS_TOKEN)).await.status(), 404);
}

#[tokio::test]
async fn a_safe_request_id_is_echoed_and_reaches_the_audit_trail() {
    let app = spawn_app().await;
    let token = practitioner("dr-chen", "clinic-1");
    let response = app
        .client
        .post(format!("{}/graphql", app.base_url))
        .bearer_auth(&token)
        .header("x-request-id", "pms-7f3a.link:01_x")
        .json(&json!({
            "query": "mutation($input: LinkAccountInput!) { linkArgus(input: $input) { status } }",
            "variables": {"input": {"username": ARGUS_USER, "password": ARGUS_PASSWORD}}
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "pms-7f3a.link:01_x");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["data"]["linkArgus"]["status"], "ACTIVE", "{body}");
    let audit = app
        .gql(
            Some(&administrator("alex", "clinic-1")),
            "{ auditEvents(first: 20) { edges { node { action requestId } } } }",
            json!({}),
        )
        .await;
    let edges = audit["data"]["auditEvents"]["edges"]
        .as_array()
        .unwrap_or_else(|| panic!("{audit}"));
    assert!(
        edges
            .iter()
            .any(|edge| edge["node"]["requestId"] == "pms-7f3a.link:01_x"),
        "{audit}"
    );
}

#[tokio::test]
async fn a_hostile_request_id_is_replaced_and_every_response_carries_one() {
    let app = spawn_app().await;
    let token = practitioner("dr-chen", "clinic-1");
    let fresh_id = |response: &reqwest::Response| {
        let id = response.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id} is a fresh UUID");
        id
    };

    let hostile = [
        HeaderValue::from_str(&"a".repeat(200)).unwrap(),
        HeaderValue::from_static("evil%0A{\"level\":\"ERROR\"}"),
        HeaderValue::from_static("a b <script>"),
        HeaderValue::from_bytes(b"caf\xc3\xa9\xff").unwrap(),
    ];
    let mut seen = Vec::new();
    for value in hostile {
        let response = app
            .client
            .post(format!("{}/graphql", app.base_url))
            .bearer_auth(&token)
            .header("x-request-id", value.clone())
            .json(&json!({"query": "{ me { id } }"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let id = fresh_id(&response);
        assert_ne!(id.as_bytes(), value.as_bytes());
        assert!(!seen.contains(&id), "ids are not reused");
        seen.push(id);
    }

    // A 404, a 413, the webhook's refusal, /healthz and a GraphQL error: each has an id, and a
    // safe one sent along comes back.
    let not_found = app
        .client
        .get(format!("{}/no-such-page", app.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(not_found.status(), 404);
    fresh_id(&not_found);
    let too_large = app
        .client
        .post(format!("{}/graphql", app.base_url))
        .header("x-request-id", "big-body-1")
        .json(&json!({"query": format!("{{ me {{ id }} }} # {}", "x".repeat(300 * 1024))}))
        .send()
        .await
        .unwrap();
    assert_eq!(too_large.status(), 413);
    assert_eq!(too_large.headers()["x-request-id"], "big-body-1");
    let webhook = app
        .client
        .post(format!(
            "{}/webhooks/referralnet/no-such-account",
            app.base_url
        ))
        .header("x-request-id", "webhook-1")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert!(webhook.status().is_client_error(), "{}", webhook.status());
    assert_eq!(webhook.headers()["x-request-id"], "webhook-1");
    let health = app
        .client
        .get(format!("{}/healthz", app.base_url))
        .send()
        .await
        .unwrap();
    fresh_id(&health);
    let unauthenticated = app
        .client
        .post(format!("{}/graphql", app.base_url))
        .bearer_auth("not-a-token")
        .header("x-request-id", "bad-token-1")
        .json(&json!({"query": "{ me { id } }"}))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.headers()["x-request-id"], "bad-token-1");
    let body: serde_json::Value = unauthenticated.json().await.unwrap();
    assert_eq!(error_code(&body), Some("UNAUTHENTICATED"));
}

#[tokio::test]
async fn browsers_may_send_a_request_id_and_read_the_one_returned() {
    let app = spawn_app_configured(Options::default(), |settings| {
        settings.cors_allowed_origins = vec!["https://pms.example".into()];
    })
    .await;
    let preflight = app
        .client
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/graphql", app.base_url),
        )
        .header("Origin", "https://pms.example")
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "authorization,content-type,x-request-id",
        )
        .send()
        .await
        .unwrap();
    let allowed = preflight.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(allowed.contains("x-request-id"), "{allowed}");
    let response = app
        .client
        .post(format!("{}/graphql", app.base_url))
        .header("Origin", "https://pms.example")
        .header("x-request-id", "browser-1")
        .bearer_auth(practitioner("dr-chen", "clinic-1"))
        .json(&json!({"query": "{ me { id } }"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "browser-1");
    let exposed = response.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(exposed.contains("x-request-id"), "{exposed}");
    // Another origin still gets no grant (without one, a browser shows its code nothing).
    let other = app
        .client
        .post(format!("{}/graphql", app.base_url))
        .header("Origin", "https://evil.example")
        .json(&json!({"query": "{ me { id } }"}))
        .send()
        .await
        .unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
}
