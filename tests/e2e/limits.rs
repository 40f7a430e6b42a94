//! Limits and permissions tried as an attacker would: 40 requests at once, over HTTP and over
//! WebSocket, counting what reached the provider (the sandbox's request log) and what was stored.

use std::time::Duration;

use futures::future::join_all;
use serde_json::{Value, json};

use crate::helpers::*;
use crate::ws::{WsClient, WsEvent, ws_error_code};

const LINK: &str = "mutation($input: LinkAccountInput!) { linkArgus(input: $input) { status } }";
const ARGUS_ACCOUNT: &str = "/argus/v1/account";

fn codes(responses: &[Value]) -> Vec<String> {
    responses
        .iter()
        .map(|response| error_code(response).unwrap_or("OK").to_owned())
        .collect()
}

fn count(codes: &[String], code: &str) -> usize {
    codes.iter().filter(|c| c.as_str() == code).count()
}

/// `n` copies of an operation sent at once as separate operations on one WebSocket; their
/// results, shaped like HTTP answers.
async fn over_websocket(
    app: &TestApp,
    token: &str,
    n: usize,
    query: &str,
    variables: Value,
) -> Vec<Value> {
    let mut client = WsClient::ready(app, token).await;
    for index in 0..n {
        client
            .send(json!({"id": index.to_string(), "type": "subscribe", "payload": {"query": query, "variables": variables}}))
            .await;
    }
    let mut results = Vec::new();
    for index in 0..n {
        let message = client.result_of(&index.to_string()).await;
        results.push(if message["type"] == "error" {
            json!({"errors": message["payload"]})
        } else {
            message["payload"].clone()
        });
    }
    results
}

#[tokio::test]
async fn forty_parallel_wrong_passwords_reach_the_provider_exactly_ten_times_per_user_on_both_transports()
 {
    let app = spawn_app().await;
    let chen = practitioner("dr-chen", "clinic-1");
    let patel = practitioner("dr-patel", "clinic-1");
    let lee = practitioner("dr-lee", "clinic-1");
    let wrong = json!({"input": {"username": ARGUS_USER, "password": "not-the-password"}});

    let over_http = join_all((0..40).map(|_| app.gql(Some(&chen), LINK, wrong.clone()))).await;
    let over_http = codes(&over_http);
    assert_eq!(count(&over_http, "PROVIDER_REJECTED"), 10, "{over_http:?}");
    assert_eq!(count(&over_http, "RATE_LIMITED"), 30, "{over_http:?}");
    assert_eq!(app.provider_requests("argus", ARGUS_ACCOUNT).await, 10);

    let over_ws = over_websocket(&app, &patel, 40, LINK, wrong.clone()).await;
    let over_ws = codes(&over_ws);
    assert_eq!(count(&over_ws, "PROVIDER_REJECTED"), 10, "{over_ws:?}");
    assert_eq!(count(&over_ws, "RATE_LIMITED"), 30, "{over_ws:?}");
    assert_eq!(app.provider_requests("argus", ARGUS_ACCOUNT).await, 20);

    // The username has had its 20 failures in 15 minutes, whoever tries it next.
    let third_user = join_all((0..40).map(|_| app.gql(Some(&lee), LINK, wrong.clone()))).await;
    let third_user = codes(&third_user);
    assert_eq!(count(&third_user, "RATE_LIMITED"), 40, "{third_user:?}");
    assert_eq!(app.provider_requests("argus", ARGUS_ACCOUNT).await, 20);
    assert!(
        third_user.iter().all(|code| code == "RATE_LIMITED"),
        "nothing got through"
    );
    assert_eq!(
        app.count_rows("provider_accounts").await,
        0,
        "nothing stored"
    );
}

#[tokio::test]
async fn a_successful_link_gives_its_attempt_back() {
    let app = spawn_app().await;
    let chen = practitioner("dr-chen", "clinic-1");
    for attempt in 0..9 {
        let failed = app
            .link(
                &chen,
                "linkArgus",
                ARGUS_USER,
                &format!("wrong-password-{attempt}"),
            )
            .await;
        assert_eq!(error_code(&failed), Some("PROVIDER_REJECTED"));
    }
    // The tenth slot is used by a right password and handed back, so later links still work.
    let linked = app
        .link(&chen, "linkArgus", ARGUS_USER, ARGUS_PASSWORD)
        .await;
    assert_eq!(linked["data"]["linkArgus"]["status"], "ACTIVE", "{linked}");
    let again = app
        .link(&chen, "linkArgus", ARGUS_USER, ARGUS_PASSWORD)
        .await;
    assert_eq!(again["data"]["linkArgus"]["status"], "ACTIVE", "{again}");
}

#[tokio::test]
async fn forty_parallel_login_validations_reach_the_provider_five_times_on_both_transports() {
    let app = spawn_app().await;
    let chen = practitioner("dr-chen", "clinic-1");
    let patel = practitioner("dr-patel", "clinic-1");
    app.link(&chen, "linkArgus", ARGUS_USER, ARGUS_PASSWORD)
        .await;
    app.link(&patel, "linkArgus", ARGUS_USER, ARGUS_PASSWORD)
        .await;
    let before = app.provider_requests("argus", ARGUS_ACCOUNT).await;
    let validate = "mutation { validateLogin(provider: ARGUS) { valid } }";

    let over_http = join_all((0..40).map(|_| app.gql(Some(&chen), validate, json!({})))).await;
    let over_http = codes(&over_http);
    assert_eq!(count(&over_http, "OK"), 5, "{over_http:?}");
    assert_eq!(count(&over_http, "RATE_LIMITED"), 35, "{over_http:?}");
    assert_eq!(
        app.provider_requests("argus", ARGUS_ACCOUNT).await,
        before + 5
    );

    let over_ws = over_websocket(&app, &patel, 40, validate, json!({})).await;
    let over_ws = codes(&over_ws);
    assert_eq!(count(&over_ws, "OK"), 5, "{over_ws:?}");
    assert_eq!(
        app.provider_requests("argus", ARGUS_ACCOUNT).await,
        before + 10
    );
}

#[tokio::test]
async fn a_provider_account_linked_by_one_practice_cannot_be_linked_or_registered_by_another() {
    let app = spawn_app().await;
    let first = practitioner("dr-chen", "clinic-1");
    let other = administrator("manager", "clinic-2");
    app.link(&first, "linkArgus", ARGUS_USER, ARGUS_PASSWORD)
        .await;
    let calls = app.provider_requests("argus", ARGUS_ACCOUNT).await;

    // Forty tries at once from the other practice, right password and wrong: all CONFLICT.
    let tries = join_all((0..40).map(|attempt| {
        let password = if attempt % 2 == 0 {
            ARGUS_PASSWORD.to_owned()
        } else {
            format!("guess-password-{attempt}")
        };
        let other = other.clone();
        let app = &app;
        async move { app.link(&other, "linkArgus", ARGUS_USER, &password).await }
    }))
    .await;
    let tries = codes(&tries);
    assert_eq!(
        count(&tries, "CONFLICT") + count(&tries, "RATE_LIMITED"),
        40,
        "{tries:?}"
    );
    assert!(count(&tries, "CONFLICT") >= 10);
    let conflict = app
        .link(&other, "linkArgus", ARGUS_USER, ARGUS_PASSWORD)
        .await;
    if error_code(&conflict) == Some("CONFLICT") {
        let message = conflict["errors"][0]["message"].as_str().unwrap();
        assert!(message.contains("linked to another practice"), "{message}");
        assert!(
            !message.contains("clinic-1"),
            "the other practice is not named"
        );
    }
    let registered = app
        .register(&other, "ARGUS", ARGUS_USER, "SANDBOX-PROMO")
        .await;
    assert!(
        matches!(error_code(&registered), Some("CONFLICT" | "RATE_LIMITED")),
        "{registered}"
    );
    assert_eq!(
        app.provider_requests("argus", ARGUS_ACCOUNT).await,
        calls,
        "decided before any provider call"
    );
    assert_eq!(
        app.provider_requests("argus", "/argus/v1/registrations")
            .await,
        0
    );
    assert_eq!(
        app.count_rows("provider_accounts").await,
        1,
        "only the first practice's"
    );
}

#[tokio::test]
async fn one_user_sending_three_hundred_requests_at_once_is_held_to_the_burst_with_retry_after() {
    let app = spawn_app().await;
    let chen = practitioner("dr-chen", "clinic-1");
    let responses = join_all((0..300).map(|_| {
        app.client
            .post(format!("{}/graphql", app.base_url))
            .bearer_auth(&chen)
            .json(&json!({"query": "{ me { id } }"}))
            .send()
    }))
    .await;
    let mut allowed = 0;
    let mut refused = 0;
    for response in responses {
        let response = response.unwrap();
        if response.status() == 429 {
            let retry_after: u64 = response.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!(retry_after >= 1);
            let body: Value = response.json().await.unwrap();
            assert_eq!(error_code(&body), Some("RATE_LIMITED"));
            assert!(
                body["errors"][0]["extensions"]["retryAfterSeconds"]
                    .as_u64()
                    .unwrap()
                    >= 1
            );
            refused += 1;
        } else {
            assert_eq!(response.status(), 200);
            allowed += 1;
        }
    }
    // A burst of 60, plus what refilled (20 a second) while the 300 were being answered.
    assert!((60..=150).contains(&allowed), "allowed {allowed}");
    assert_eq!(allowed + refused, 300);

    // The same bucket holds over WebSocket (another user, so the HTTP burst above is not in it).
    let patel = practitioner("dr-patel", "clinic-1");
    let mut client = WsClient::ready(&app, &patel).await;
    for index in 0..120 {
        client
            .subscribe(&format!("q{index}"), "{ me { id } }")
            .await;
        // Results are read as they come so the per-connection cap of open operations is not hit.
        let _ = index;
    }
    let mut limited = 0;
    for index in 0..120 {
        let message = client.result_of(&format!("q{index}")).await;
        if ws_error_code(&message) == Some("RATE_LIMITED") {
            limited += 1;
        }
    }
    assert!(limited >= 30, "limited {limited}");
}

#[tokio::test]
async fn the_websocket_protocol_closes_with_its_own_codes() {
    let app = spawn_app_configured(Options::default(), |settings| {
        settings.limits.ws_connection_init_timeout_seconds = 1;
    })
    .await;
    let chen = practitioner("dr-chen", "clinic-1");

    let mut silent = WsClient::connect(&app).await;
    assert_eq!(
        silent.close_code().await,
        4408,
        "no connection_init in time"
    );

    let mut forged = WsClient::connect(&app).await;
    forged
        .send(
            json!({"type": "connection_init", "payload": {"Authorization": "Bearer not-a-token"}}),
        )
        .await;
    assert_eq!(forged.close_code().await, 4403);

    let mut early = WsClient::connect(&app).await;
    early.subscribe("1", "{ me { id } }").await;
    assert_eq!(
        early.close_code().await,
        4401,
        "subscribe before the acknowledgement"
    );

    let mut twice = WsClient::ready(&app, &chen).await;
    twice
        .send(json!({"type": "connection_init", "payload": {"Authorization": format!("Bearer {chen}")}}))
        .await;
    assert_eq!(twice.close_code().await, 4429);

    let mut reused = WsClient::ready(&app, &chen).await;
    let live = "subscription { messageStatusChanged { id status } }";
    reused.subscribe("same", live).await;
    reused.subscribe("same", live).await;
    assert_eq!(reused.close_code().await, 4409);

    let mut garbage = WsClient::ready(&app, &chen).await;
    garbage.send_text("{not json".into()).await;
    assert_eq!(garbage.close_code().await, 4400);

    let mut legacy = WsClient::connect_offering(&app, None).await;
    assert_eq!(legacy.close_code().await, 4406);

    let mut oversized = WsClient::ready(&app, &chen).await;
    oversized
        .send_text(json!({"id": "1", "type": "subscribe", "payload": {"query": format!("{{ me {{ id }} }} # {}", "x".repeat(300 * 1024))}}).to_string())
        .await;
    assert_eq!(
        oversized.close_code().await,
        1009,
        "a frame over the size cap"
    );
}

#[tokio::test]
async fn a_client_closing_the_websocket_gets_its_close_answered_not_a_dropped_connection() {
    let app = spawn_app().await;
    let chen = practitioner("dr-chen", "clinic-1");

    let mut before_init = WsClient::connect(&app).await;
    assert!(
        matches!(before_init.close_with(1000).await, WsEvent::Closed(1000, _)),
        "closed before connection_init"
    );

    let mut acknowledged = WsClient::ready(&app, &chen).await;
    acknowledged
        .subscribe(
            "live",
            "subscription { messageStatusChanged { id status } }",
        )
        .await;
    match acknowledged.close_with(1000).await {
        WsEvent::Closed(1000, _) => {}
        other => panic!("the server did not answer the close frame: {other:?}"),
    }
}

#[tokio::test]
async fn subscriptions_are_capped_per_connection_and_per_user() {
    let app = spawn_app_configured(Options::default(), |settings| {
        settings.limits.ws_subscriptions_per_user = 60;
    })
    .await;
    let chen = practitioner("dr-chen", "clinic-1");
    let live = "subscription { messageStatusChanged { id status } }";

    let mut first = WsClient::ready(&app, &chen).await;
    for index in 0..51 {
        first.subscribe(&format!("s{index}"), live).await;
    }
    let refused = first.result_of("s50").await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(ws_error_code(&refused), Some("RATE_LIMITED"));

    // A second connection of the same user gets only what is left of the user's 60.
    let mut second = WsClient::ready(&app, &chen).await;
    for index in 0..11 {
        second.subscribe(&format!("t{index}"), live).await;
    }
    let refused = second.result_of("t10").await;
    assert_eq!(ws_error_code(&refused), Some("RATE_LIMITED"), "{refused}");

    // Completing one frees its place.
    first.send(json!({"id": "s0", "type": "complete"})).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    second.subscribe("again", live).await;
    second
        .send(json!({"id": "probe", "type": "subscribe", "payload": {"query": "{ me { id } }"}}))
        .await;
    let probe = second.result_of("probe").await;
    assert_eq!(
        ws_error_code(&probe),
        Some("RATE_LIMITED"),
        "the freed place went to `again`: {probe}"
    );
}

#[tokio::test]
async fn document_limits_hold_on_websocket_as_on_http() {
    let app = spawn_app().await;
    let chen = practitioner("dr-chen", "clinic-1");
    let aliases: String = (0..500).map(|i| format!("a{i}: me {{ id }} ")).collect();
    let many_aliases = format!("{{ {aliases} }}");
    let big = format!("{{ me {{ id }} }} # {}", "x".repeat(200 * 1024));

    let over_http = app.gql(Some(&chen), &many_aliases, json!({})).await;
    assert_eq!(error_code(&over_http), Some("BAD_USER_INPUT"));
    assert!(over_http["data"].is_null());

    let mut client = WsClient::ready(&app, &chen).await;
    client.subscribe("aliases", &many_aliases).await;
    let refused = client.result_of("aliases").await;
    assert_eq!(
        refused["type"], "error",
        "refused before running: {refused}"
    );
    assert_eq!(ws_error_code(&refused), Some("BAD_USER_INPUT"));
    assert!(
        refused["payload"][0]["message"]
            .as_str()
            .unwrap()
            .contains("aliases")
    );

    let notes = (0..30)
        .map(|i| format!("n{i}: clinicalNotes(first: 50) {{ edges {{ node {{ id title sections {{ title body }} }} }} }} "))
        .collect::<String>();
    client.subscribe("notes", &format!("{{ {notes} }}")).await;
    let refused = client.result_of("notes").await;
    assert_eq!(
        ws_error_code(&refused),
        Some("BAD_USER_INPUT"),
        "complexity counts first: {refused}"
    );

    // Under the 256 KiB frame cap but over what a GraphQL document may be once the frame is
    // read is covered on HTTP by the body limit; here a 200 KiB comment still parses and runs.
    client.subscribe("big", &big).await;
    let answered = client.result_of("big").await;
    assert_eq!(answered["type"], "next", "{answered}");
}

#[tokio::test]
async fn complexity_weighs_lists_by_first() {
    let app = spawn_app().await;
    let chen = practitioner("dr-chen", "clinic-1");
    let notes = (0..30)
        .map(|i| format!("n{i}: clinicalNotes(first: 50) {{ edges {{ node {{ id title sections {{ title body }} }} }} }} "))
        .collect::<String>();
    let heavy = app
        .gql(Some(&chen), &format!("{{ {notes} }}"), json!({}))
        .await;
    assert_eq!(error_code(&heavy), Some("BAD_USER_INPUT"), "{heavy}");
    assert!(
        heavy["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("complex"),
        "{heavy}"
    );
    let light = app
        .gql(
            Some(&chen),
            "{ clinicalNotes(first: 50) { edges { node { id title sections { title body } } } } }",
            json!({}),
        )
        .await;
    assert!(light["errors"].is_null(), "{light}");
}

#[tokio::test]
async fn an_aliased_directory_search_makes_a_bounded_number_of_provider_calls() {
    let app = spawn_app().await;
    let chen = practitioner("dr-chen", "clinic-1");
    app.link(&chen, "linkArgus", ARGUS_USER, ARGUS_PASSWORD)
        .await;
    app.link(&chen, "linkReferralNet", RN_USER, RN_PASSWORD)
        .await;
    let searches = |query: &str| {
        (0..12)
            .map(|i| format!("s{i}: searchPractitioners(query: \"{query}{i}\", first: 50) {{ edges {{ node {{ id }} }} }} "))
            .collect::<String>()
    };
    let before = app.provider_requests("argus", "/argus/v1/directory").await
        + app
            .provider_requests("referralnet", "/referralnet/api/providers")
            .await;
    let different = app
        .gql(Some(&chen), &format!("{{ {} }}", searches("a")), json!({}))
        .await;
    assert_eq!(
        error_code(&different),
        Some("BAD_USER_INPUT"),
        "{different}"
    );
    let after = app.provider_requests("argus", "/argus/v1/directory").await
        + app
            .provider_requests("referralnet", "/referralnet/api/providers")
            .await;
    assert!(
        after - before <= 12,
        "at most the operation's allowance: {}",
        after - before
    );

    // The same search under thirty aliases is asked once per provider page.
    let same = (0..30)
        .map(|i| format!("s{i}: searchPractitioners(query: \"cardiology\", first: 5) {{ edges {{ node {{ id }} }} }} "))
        .collect::<String>();
    let answered = app
        .gql(Some(&chen), &format!("{{ {same} }}"), json!({}))
        .await;
    assert!(answered["errors"].is_null(), "{answered}");
    let again = app.provider_requests("argus", "/argus/v1/directory").await
        + app
            .provider_requests("referralnet", "/referralnet/api/providers")
            .await;
    assert!(
        again - after <= 2,
        "one page from each provider: {}",
        again - after
    );
}

#[tokio::test]
async fn graphiqls_own_introspection_query_passes_the_depth_rule() {
    let app = spawn_app().await;
    let answered = app.gql(None, INTROSPECTION, json!({})).await;
    assert!(answered["errors"].is_null(), "{answered}");
    assert_eq!(answered["data"]["__schema"]["queryType"]["name"], "Query");
    // Nested past the introspection allowance is still refused.
    let opening = "__schema { types { fields { type { ".to_owned() + &"ofType { ".repeat(16);
    let deep = format!(
        "{{ {opening}name {} }}",
        "} ".repeat(opening.matches('{').count())
    );
    let refused = app.gql(None, &deep, json!({})).await;
    assert_eq!(error_code(&refused), Some("BAD_USER_INPUT"));
    assert!(
        refused["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("deep"),
        "{refused}"
    );
}

/// graphql-js's `getIntrospectionQuery()` with every option GraphiQL turns on.
const INTROSPECTION: &str = r#"
query IntrospectionQuery {
  __schema {
    description
    queryType { name }
    mutationType { name }
    subscriptionType { name }
    types { ...FullType }
    directives { name description isRepeatable locations args(includeDeprecated: true) { ...InputValue } }
  }
}
fragment FullType on __Type {
  kind name description specifiedByURL
  fields(includeDeprecated: true) { name description args(includeDeprecated: true) { ...InputValue } type { ...TypeRef } isDeprecated deprecationReason }
  inputFields(includeDeprecated: true) { ...InputValue }
  interfaces { ...TypeRef }
  enumValues(includeDeprecated: true) { name description isDeprecated deprecationReason }
  possibleTypes { ...TypeRef }
}
fragment InputValue on __InputValue { name description type { ...TypeRef } defaultValue isDeprecated deprecationReason }
fragment TypeRef on __Type {
  kind name
  ofType { kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name } } } } } } } } }
}
"#;
