//! GraphQL over HTTP as its specification says, seen as a client sees it: status codes, media
//! types, JSON error bodies with codes for every refused request, `Allow`, field order.

use serde_json::{Value, json};

use crate::helpers::*;

async fn post(
    app: &TestApp,
    headers: &[(&str, &str)],
    body: impl Into<reqwest::Body>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut request = app
        .client
        .post(format!("{}/graphql", app.base_url))
        .body(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body: Value = response.json().await.expect("every answer is JSON");
    (status, headers, body)
}

const JSON: (&str, &str) = ("content-type", "application/json");

/// Request headers, body, and the status the gateway must answer with.
type Case = (Vec<(&'static str, &'static str)>, Vec<u8>, u16);

#[tokio::test]
async fn refused_requests_get_a_status_and_a_json_error_with_a_code() {
    let app = spawn_app().await;
    let cases: Vec<Case> = vec![
        (vec![JSON], br#"[{"query":"{ __typename }"}]"#.to_vec(), 400),
        (vec![JSON], b"{\"query\":".to_vec(), 400),
        (vec![JSON], br#"{"query": 5}"#.to_vec(), 400),
        (
            vec![JSON],
            br#"{"query":"{ __typename }","variables":"x"}"#.to_vec(),
            400,
        ),
        (
            vec![("content-type", "text/plain")],
            br#"{"query":"{ __typename }"}"#.to_vec(),
            415,
        ),
        (vec![], br#"{"query":"{ __typename }"}"#.to_vec(), 415),
        (vec![JSON], vec![b'x'; 300 * 1024], 413),
        (
            vec![JSON, ("accept", "text/html")],
            br#"{"query":"{ __typename }"}"#.to_vec(),
            406,
        ),
    ];
    for (headers, body, status) in cases {
        let shown = String::from_utf8_lossy(&body[..body.len().min(40)]).into_owned();
        let (got, _, answer) = post(&app, &headers, body).await;
        assert_eq!(got, status, "{headers:?} {shown}: {answer}");
        assert!(answer.get("data").is_none(), "nothing ran: {answer}");
        assert_eq!(error_code(&answer), Some("BAD_USER_INPUT"), "{answer}");
        let message = answer["errors"][0]["message"].as_str().unwrap();
        assert!(
            !message.contains("Io(") && !message.contains("Custom {"),
            "no Debug text: {message}"
        );
    }
}

#[tokio::test]
async fn the_media_type_follows_accept_and_request_errors_have_no_data_entry() {
    let app = spawn_app().await;
    let token = practitioner("dr-chen", "clinic-1");
    let bearer = format!("Bearer {token}");
    let broken = br#"{"query":"{ me { id "}"#.to_vec();

    let (status, headers, answer) = post(
        &app,
        &[
            JSON,
            ("accept", "application/graphql-response+json"),
            ("authorization", &bearer),
        ],
        broken.clone(),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/graphql-response+json")
    );
    assert!(answer.get("data").is_none(), "{answer}");
    assert_eq!(error_code(&answer), Some("BAD_USER_INPUT"));

    let (status, headers, answer) = post(
        &app,
        &[
            JSON,
            ("accept", "application/json"),
            ("authorization", &bearer),
        ],
        broken,
    )
    .await;
    assert_eq!(status, 200, "the legacy media type answers 200");
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    assert_eq!(error_code(&answer), Some("BAD_USER_INPUT"));

    let (status, _, answer) = post(
        &app,
        &[
            JSON,
            ("accept", "application/graphql-response+json"),
            ("authorization", &bearer),
        ],
        br#"{"query":"{ me { id } }"}"#.to_vec(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(answer["data"]["me"]["id"], "dr-chen");

    let (status, headers, answer) = post(
        &app,
        &[JSON, ("authorization", "Bearer forged")],
        br#"{"query":"{ me { id } }"}"#.to_vec(),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(headers["www-authenticate"], "Bearer");
    assert_eq!(error_code(&answer), Some("UNAUTHENTICATED"));
}

#[tokio::test]
async fn a_mutation_over_get_is_405_with_allow_post_and_does_not_run() {
    let app = spawn_app().await;
    let token = practitioner("dr-chen", "clinic-1");
    let response = app
        .client
        .get(format!("{}/graphql", app.base_url))
        .query(&[(
            "query",
            "mutation { setMyHpii(hpii: \"8003610000000006\") }",
        )])
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["allow"], "POST");
    let answer: Value = response.json().await.unwrap();
    assert_eq!(error_code(&answer), Some("BAD_USER_INPUT"));
    let me = app.gql(Some(&token), "{ me { hpii } }", json!({})).await;
    assert!(
        me["data"]["me"]["hpii"].is_null(),
        "the mutation did not run: {me}"
    );

    let query = app
        .client
        .get(format!("{}/graphql", app.base_url))
        .query(&[
            (
                "query",
                "query Q($n: String!) { __type(name: $n) { name } }",
            ),
            ("variables", "{\"n\":\"Query\"}"),
            ("operationName", "Q"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(query.status(), 200);
    let answer: Value = query.json().await.unwrap();
    assert_eq!(answer["data"]["__type"]["name"], "Query");
}

#[tokio::test]
async fn top_level_fields_come_back_in_document_order() {
    let app = spawn_app().await;
    let token = practitioner("dr-chen", "clinic-1");
    for query in [
        "{ integrations { provider } paymentMethod { display } me { id } }",
        "{ me { id } credits { balance } integrations { provider } }",
        "{ b: me { id } ...F a: me { id } } fragment F on Query { integrations { provider } }",
    ] {
        let response = app
            .client
            .post(format!("{}/graphql", app.base_url))
            .bearer_auth(&token)
            .json(&json!({"query": query}))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        // Read positions in the raw text: a JSON map type would reorder the keys itself.
        let order = match query {
            q if q.starts_with("{ integrations") => ["integrations", "paymentMethod", "me"],
            q if q.starts_with("{ me") => ["me", "credits", "integrations"],
            _ => ["b", "integrations", "a"],
        };
        let expected: Vec<usize> = order
            .iter()
            .map(|key| response.find(&format!("\"{key}\":")).expect(key))
            .collect();
        let mut sorted = expected.clone();
        sorted.sort_unstable();
        assert_eq!(expected, sorted, "{query} → {response}");
    }
}
