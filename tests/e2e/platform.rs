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
    for path in [
        "/graphql",
        "/playground",
        "/playground/config.json",
        "/playground/assets/graphiql.min.js",
        "/playground/assets/playground.js",
    ] {
        let response = app
            .client
            .get(format!("{}{path}", app.base_url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404, "{path}");
        let body = response.text().await.unwrap();
        assert!(
            !body.contains("GraphiQL"),
            "{path} served the playground: {body}"
        );
    }
}

/// Hosts named in the vendored bundles' strings: XML namespaces, and links in error messages
/// and comments (React's error decoder, GraphiQL's docs). Nothing fetches them — the browser
/// check in tests/browser blocks and counts every request to another host — but a new host
/// here means a new bundle to read before it is allowed.
const HOSTS_NAMED_IN_VENDORED_BUNDLES: [&str; 6] = [
    "www.w3.org",
    "github.com",
    "codemirror.net",
    "commonmark.org",
    "en.wikipedia.org",
    "reactjs.org",
];

/// Every `http://` or `https://` host in `text` (an empty string for a bare scheme).
fn hosts_named_in(text: &str) -> Vec<String> {
    let mut hosts = Vec::new();
    for scheme in ["http://", "https://"] {
        for (start, _) in text.match_indices(scheme) {
            let rest = &text[start + scheme.len()..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == ':'))
                .unwrap_or(rest.len());
            hosts.push(rest[..end].to_owned());
        }
    }
    hosts
}

#[tokio::test]
async fn the_playground_and_its_assets_come_only_from_the_gateway_under_a_content_security_policy()
{
    let app = spawn_app_configured(Options::default(), |settings| {
        settings.graphql.playground = Some(true);
    })
    .await;
    let page = app
        .client
        .get(format!("{}/graphql", app.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let policy = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    for directive in [
        "default-src 'self'",
        "script-src 'self';",
        "style-src 'self';",
        &format!("connect-src 'self' ws://{0} wss://{0};", app.address),
    ] {
        assert!(
            policy.contains(directive),
            "{directive} missing from {policy}"
        );
    }
    assert!(!policy.contains("unsafe"), "{policy}");
    let html = page.text().await.unwrap();
    assert!(html.contains("<div id=\"graphiql\">"), "{html}");
    assert!(
        !html.contains("<script>"),
        "an inline script needs 'unsafe-inline': {html}"
    );
    assert_eq!(
        hosts_named_in(&html),
        Vec::<String>::new(),
        "the page names other hosts"
    );

    // Every asset the page names, fetched as the browser would.
    let assets: Vec<&str> = html
        .split(['"', '\''])
        .filter(|part| part.starts_with("/playground/assets/"))
        .collect();
    assert_eq!(assets.len(), 7, "{assets:?}");
    for asset in assets {
        let response = app
            .client
            .get(format!("{}{asset}", app.base_url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{asset}");
        let headers = response.headers().clone();
        assert!(
            headers["content-security-policy"]
                .to_str()
                .unwrap()
                .contains("default-src 'self'"),
            "{asset}"
        );
        assert!(
            headers["cache-control"]
                .to_str()
                .unwrap()
                .contains("immutable"),
            "{asset}"
        );
        let content_type = headers["content-type"].to_str().unwrap().to_owned();
        let expected = match asset.split('?').next().unwrap().rsplit('.').next() {
            Some("js") => "text/javascript",
            Some("css") => "text/css",
            Some("svg") => "image/svg+xml",
            other => panic!("unexpected asset kind {other:?}: {asset}"),
        };
        assert!(
            content_type.starts_with(expected),
            "{asset}: {content_type}"
        );
        let text = response.text().await.unwrap();
        for host in hosts_named_in(&text) {
            assert!(
                host.is_empty() || HOSTS_NAMED_IN_VENDORED_BUNDLES.contains(&host.as_str()),
                "{asset} names the host {host}"
            );
        }
        if expected == "text/css" {
            assert!(!text.contains("@import"), "{asset} imports a stylesheet");
            assert!(
                !text.contains("url(http"),
                "{asset} loads from another host"
            );
        }
        if asset.contains("/playground.") {
            // Our own files name no host at all.
            assert_eq!(hosts_named_in(&text), Vec::<String>::new(), "{asset}");
        }
    }
    let missing = app
        .client
        .get(format!(
            "{}/playground/assets/%2e%2e%2fCargo.toml",
            app.base_url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    // Production never hands the page a token.
    let config = app
        .client
        .get(format!("{}/playground/config.json", app.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(config.headers()["cache-control"], "no-store");
    assert!(config.headers().contains_key("content-security-policy"));
    let config: serde_json::Value = config.json().await.unwrap();
    assert_eq!(config["endpoint"], "/graphql");
    assert_eq!(config["subscriptionPath"], "/graphql/ws");
    assert_eq!(config["headers"], serde_json::Value::Null, "{config}");
}

#[tokio::test]
async fn in_dev_mode_the_playground_starts_with_a_working_demo_practitioner_token() {
    let app = spawn_app_configured(Options::default(), |settings| {
        settings.mode = smd_gateway::config::Mode::Dev;
        settings.graphql.playground = Some(true);
    })
    .await;
    let config: serde_json::Value = app
        .client
        .get(format!("{}/playground/config.json", app.base_url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let authorization = config["headers"]["Authorization"].as_str().unwrap();
    let token = authorization.strip_prefix("Bearer ").unwrap();
    let me = app
        .gql(Some(token), "{ me { id name role } }", json!({}))
        .await;
    assert_eq!(
        me["data"]["me"],
        json!({"id": "dr-chen", "name": "Dr Mei Chen", "role": "PRACTITIONER"}),
        "{me}"
    );
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
