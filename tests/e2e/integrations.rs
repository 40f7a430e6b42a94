//! Linking existing accounts, individual links, validation, disconnect, tenancy, faults.

use std::time::Duration;

use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn a_practitioner_links_both_demo_accounts_and_both_become_active() {
    let app = spawn_app().await;
    let chen = practitioner("dr-chen", "clinic-1");

    let argus = app
        .link(&chen, "linkArgus", ARGUS_USER, ARGUS_PASSWORD)
        .await;
    assert_eq!(argus["data"]["linkArgus"]["status"], "ACTIVE", "{argus}");
    assert_eq!(argus["data"]["linkArgus"]["individualStatus"], "ACTIVE");
    assert_eq!(argus["data"]["linkArgus"]["origin"], "LINKED");
    assert_eq!(argus["data"]["linkArgus"]["canValidateLogin"], true);

    let referralnet = app
        .link(&chen, "linkReferralNet", RN_USER, RN_PASSWORD)
        .await;
    assert_eq!(
        referralnet["data"]["linkReferralNet"]["status"], "ACTIVE",
        "{referralnet}"
    );

    let integrations = app.integrations(&chen).await;
    assert!(
        integrations
            .iter()
            .all(|i| i["status"] == "ACTIVE" && i["individualStatus"] == "ACTIVE")
    );
    assert_eq!(app.count_rows("provider_accounts").await, 2);
    assert_eq!(app.count_rows("provider_links").await, 2);
}

#[tokio::test]
async fn a_wrong_password_is_rejected_and_nothing_is_stored() {
    let app = spawn_app().await;
    let chen = practitioner("dr-chen", "clinic-1");

    let response = app
        .link(&chen, "linkArgus", ARGUS_USER, "not-the-password")
        .await;

    assert_eq!(
        error_code(&response),
        Some("PROVIDER_REJECTED"),
        "{response}"
    );
    assert!(response["data"].is_null());
    assert_eq!(app.count_rows("provider_accounts").await, 0);
    assert_eq!(app.count_rows("provider_links").await, 0);
    assert_eq!(
        app.integration(&chen, "ARGUS").await["status"],
        "NOT_CONNECTED"
    );
}

#[tokio::test]
async fn input_that_breaks_a_rule_is_refused_before_the_provider_is_asked() {
    let app = spawn_app().await;
    let chen = practitioner("dr-chen", "clinic-1");
    // Fail every Argus call: if the gateway asked Argus we would see PROVIDER_UNAVAILABLE.
    app.inject_fault("argus", "*", "server_error", 10, json!({}))
        .await;

    let response = app.link(&chen, "linkArgus", "a", "short").await;

    assert_eq!(error_code(&response), Some("BAD_USER_INPUT"), "{response}");
    assert!(
        response["errors"][0]["message"]
            .as_str()
            .unwrap()
            .starts_with("username:")
    );
    assert_eq!(app.count_rows("provider_accounts").await, 0);
}

#[tokio::test]
async fn a_second_practitioner_links_individually_with_the_same_credentials() {
    let app = spawn_app().await;
    let chen = practitioner("dr-chen", "clinic-1");
    let patel = practitioner("dr-patel", "clinic-1");
    app.link(&chen, "linkArgus", ARGUS_USER, ARGUS_PASSWORD)
        .await;
    assert_eq!(
        app.integration(&patel, "ARGUS").await["individualStatus"],
        "NOT_CONNECTED"
    );

    let different = app
        .link(&patel, "linkArgus", ARGUS_USER, "another-password")
        .await;
    assert_eq!(
        error_code(&different),
        Some("BAD_USER_INPUT"),
        "{different}"
    );
    assert!(
        different["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("same username and password")
    );
    assert_eq!(app.count_rows("provider_links").await, 1);

    let same = app
        .link(&patel, "linkArgus", ARGUS_USER, ARGUS_PASSWORD)
        .await;
    assert_eq!(
        same["data"]["linkArgus"]["individualStatus"], "ACTIVE",
        "{same}"
    );
    assert_eq!(
        app.count_rows("provider_accounts").await,
        1,
        "still one group account"
    );
    assert_eq!(app.count_rows("provider_links").await, 2);

    // Linking again (a retry or a double click) changes nothing.
    let again = app
        .link(&patel, "linkArgus", ARGUS_USER, ARGUS_PASSWORD)
        .await;
    assert_eq!(
        again["data"]["linkArgus"]["individualStatus"], "ACTIVE",
        "{again}"
    );
    assert_eq!(app.count_rows("provider_links").await, 2);
}

#[tokio::test]
async fn an_administrator_sets_up_the_group_account_without_an_individual_link() {
    let app = spawn_app().await;
    let admin = administrator("manager", "clinic-1");
    let chen = practitioner("dr-chen", "clinic-1");

    let response = app
        .link(&admin, "linkArgus", ARGUS_USER, ARGUS_PASSWORD)
        .await;
    assert_eq!(
        response["data"]["linkArgus"]["status"], "ACTIVE",
        "{response}"
    );
    assert_eq!(
        response["data"]["linkArgus"]["individualStatus"],
        "NOT_CONNECTED"
    );
    assert_eq!(app.count_rows("provider_links").await, 0);

    let chen_view = app.integration(&chen, "ARGUS").await;
    assert_eq!(
        (
            chen_view["status"].as_str(),
            chen_view["individualStatus"].as_str()
        ),
        (Some("ACTIVE"), Some("NOT_CONNECTED"))
    );
}

#[tokio::test]
async fn a_token_of_another_group_sees_nothing() {
    let app = spawn_app().await;
    let chen = practitioner("dr-chen", "clinic-1");
    app.link(&chen, "linkArgus", ARGUS_USER, ARGUS_PASSWORD)
        .await;
    let outsider = administrator("manager", "clinic-2");

    let integrations = app.integrations(&outsider).await;
    assert!(
        integrations
            .iter()
            .all(|i| i["status"] == "NOT_CONNECTED" && i["username"].is_null()),
        "{integrations:?}"
    );
    let audit = app
        .gql(
            Some(&outsider),
            "{ auditEvents { edges { node { action } } } }",
            json!({}),
        )
        .await;
    assert_eq!(audit["data"]["auditEvents"]["edges"], json!([]), "{audit}");
    let validation = app
        .gql(
            Some(&outsider),
            "mutation { validateLogin(provider: ARGUS) { valid } }",
            json!({}),
        )
        .await;
    assert_eq!(error_code(&validation), Some("INTEGRATION_NOT_ACTIVE"));
}

#[tokio::test]
async fn validate_login_checks_the_stored_credentials_and_is_rate_limited() {
    let app = spawn_app_with(Options {
        validate_login_per_minute: 2,
        ..Options::default()
    })
    .await;
    let chen = practitioner("dr-chen", "clinic-1");
    app.link(&chen, "linkArgus", ARGUS_USER, ARGUS_PASSWORD)
        .await;
    let validate = "mutation { validateLogin(provider: ARGUS) { valid checkedAt message } }";

    let first = app.gql(Some(&chen), validate, json!({})).await;
    assert_eq!(first["data"]["validateLogin"]["valid"], true, "{first}");
    let second = app.gql(Some(&chen), validate, json!({})).await;
    assert_eq!(second["data"]["validateLogin"]["valid"], true);
    let third = app.gql(Some(&chen), validate, json!({})).await;
    assert_eq!(error_code(&third), Some("RATE_LIMITED"), "{third}");
    let retry_after = third["errors"][0]["extensions"]["retryAfterSeconds"]
        .as_u64()
        .unwrap();
    assert!(
        (1..=60).contains(&retry_after),
        "until the oldest check leaves the minute: {retry_after}"
    );
}

#[tokio::test]
async fn validate_login_needs_the_callers_own_link() {
    let app = spawn_app().await;
    let chen = practitioner("dr-chen", "clinic-1");
    let patel = practitioner("dr-patel", "clinic-1");
    app.link(&chen, "linkArgus", ARGUS_USER, ARGUS_PASSWORD)
        .await;

    let response = app
        .gql(
            Some(&patel),
            "mutation { validateLogin(provider: ARGUS) { valid } }",
            json!({}),
        )
        .await;

    assert_eq!(
        error_code(&response),
        Some("INTEGRATION_NOT_ACTIVE"),
        "{response}"
    );
    assert!(
        response["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("link your own")
    );
}

#[tokio::test]
async fn disconnecting_removes_the_individual_link_then_the_group_account() {
    let app = spawn_app().await;
    let chen = practitioner("dr-chen", "clinic-1");
    let admin = administrator("manager", "clinic-1");
    app.link(&chen, "linkArgus", ARGUS_USER, ARGUS_PASSWORD)
        .await;
    let disconnect = "mutation($scope: DisconnectScope) { disconnectProvider(provider: ARGUS, scope: $scope) { status individualStatus } }";

    let own = app.gql(Some(&chen), disconnect, json!({})).await;
    assert_eq!(
        own["data"]["disconnectProvider"],
        json!({"status": "ACTIVE", "individualStatus": "NOT_CONNECTED"}),
        "{own}"
    );
    let again = app.gql(Some(&chen), disconnect, json!({})).await;
    assert_eq!(error_code(&again), Some("NOT_FOUND"));

    let group = app
        .gql(Some(&admin), disconnect, json!({"scope": "GROUP"}))
        .await;
    assert_eq!(
        group["data"]["disconnectProvider"]["status"], "NOT_CONNECTED",
        "{group}"
    );
    assert_eq!(app.count_rows("provider_accounts").await, 0);
}

#[tokio::test]
async fn a_provider_5xx_gives_provider_unavailable_and_stores_nothing() {
    let app = spawn_app().await;
    let chen = practitioner("dr-chen", "clinic-1");
    app.inject_fault(
        "argus",
        "account",
        "server_error",
        1,
        json!({"status": 503}),
    )
    .await;

    let response = app
        .link(&chen, "linkArgus", ARGUS_USER, ARGUS_PASSWORD)
        .await;

    assert_eq!(
        error_code(&response),
        Some("PROVIDER_UNAVAILABLE"),
        "{response}"
    );
    let message = response["errors"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("nothing was saved") && !message.contains("503"),
        "{message}"
    );
    assert_eq!(app.count_rows("provider_accounts").await, 0);
    // The fault was for one call: the retry succeeds.
    let retry = app
        .link(&chen, "linkArgus", ARGUS_USER, ARGUS_PASSWORD)
        .await;
    assert_eq!(retry["data"]["linkArgus"]["status"], "ACTIVE", "{retry}");
}

#[tokio::test]
async fn a_provider_timeout_gives_provider_unavailable_and_stores_nothing() {
    let app = spawn_app_with(Options {
        provider_timeout_ms: 300,
        ..Options::default()
    })
    .await;
    let chen = practitioner("dr-chen", "clinic-1");
    app.inject_fault(
        "referralnet",
        "sessions",
        "timeout",
        1,
        json!({"holdSeconds": 3}),
    )
    .await;

    let started = std::time::Instant::now();
    let response = app
        .link(&chen, "linkReferralNet", RN_USER, RN_PASSWORD)
        .await;

    assert_eq!(
        error_code(&response),
        Some("PROVIDER_UNAVAILABLE"),
        "{response}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the gateway gave up at its own timeout"
    );
    assert_eq!(app.count_rows("provider_accounts").await, 0);
}

#[tokio::test]
async fn malformed_and_throttled_provider_answers_are_provider_unavailable() {
    let app = spawn_app().await;
    let chen = practitioner("dr-chen", "clinic-1");
    app.inject_fault("argus", "account", "malformed", 1, json!({}))
        .await;
    let malformed = app
        .link(&chen, "linkArgus", ARGUS_USER, ARGUS_PASSWORD)
        .await;
    assert_eq!(
        error_code(&malformed),
        Some("PROVIDER_UNAVAILABLE"),
        "{malformed}"
    );

    app.inject_fault(
        "argus",
        "account",
        "rate_limited",
        1,
        json!({"retryAfterSeconds": 12}),
    )
    .await;
    let throttled = app
        .link(&chen, "linkArgus", ARGUS_USER, ARGUS_PASSWORD)
        .await;
    assert_eq!(
        error_code(&throttled),
        Some("PROVIDER_UNAVAILABLE"),
        "{throttled}"
    );
    assert_eq!(
        throttled["errors"][0]["extensions"]["retryAfterSeconds"],
        12
    );
    assert_eq!(app.count_rows("provider_accounts").await, 0);
}

#[tokio::test]
async fn the_provider_password_is_not_readable_in_the_database_file() {
    let app = spawn_app().await;
    let Some(path) = app.sqlite_path.clone() else {
        return; // On PostgreSQL there is no single file; the ciphertext check below still runs in the SQLite pass.
    };
    let chen = practitioner("dr-chen", "clinic-1");
    app.link(&chen, "linkArgus", ARGUS_USER, ARGUS_PASSWORD)
        .await;
    app.link(&chen, "linkReferralNet", RN_USER, RN_PASSWORD)
        .await;

    let mut bytes = Vec::new();
    for suffix in ["", "-wal"] {
        let file = std::path::PathBuf::from(format!("{}{suffix}", path.display()));
        if let Ok(content) = std::fs::read(&file) {
            bytes.extend(content);
        }
    }
    let haystack = String::from_utf8_lossy(&bytes);
    assert!(
        haystack.contains(ARGUS_USER),
        "the username is stored in clear, so the search works"
    );
    assert!(!haystack.contains(ARGUS_PASSWORD));
    assert!(!haystack.contains(RN_PASSWORD));
}

#[tokio::test]
async fn audit_events_record_links_without_secrets_and_only_administrators_read_them() {
    let app = spawn_app().await;
    let chen = practitioner("dr-chen", "clinic-1");
    let admin = administrator("manager", "clinic-1");
    app.link(&chen, "linkArgus", ARGUS_USER, "wrong-password-1")
        .await;
    app.link(&chen, "linkArgus", ARGUS_USER, ARGUS_PASSWORD)
        .await;
    let query = "{ auditEvents(first: 10) { edges { node { actor action target outcome detail requestId } } pageInfo { hasNextPage } } }";

    let forbidden = app.gql(Some(&chen), query, json!({})).await;
    assert_eq!(error_code(&forbidden), Some("FORBIDDEN"));

    let events = app.gql(Some(&admin), query, json!({})).await;
    let edges = events["data"]["auditEvents"]["edges"]
        .as_array()
        .unwrap()
        .clone();
    let actions: Vec<_> = edges
        .iter()
        .map(|e| {
            (
                e["node"]["action"].as_str().unwrap(),
                e["node"]["outcome"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        actions,
        vec![
            ("LINK_GROUP_ACCOUNT", "SUCCESS"),
            ("LINK_GROUP_ACCOUNT", "FAILURE")
        ],
        "{events}"
    );
    assert!(edges.iter().all(|e| e["node"]["actor"] == "dr-chen"));
    assert!(!events.to_string().contains("password"));
}

#[tokio::test]
async fn many_practitioners_linking_at_once_share_one_group_account_without_errors() {
    let app = spawn_app().await;
    let tokens: Vec<String> = (0..16)
        .map(|i| practitioner(&format!("dr-{i}"), "clinic-1"))
        .collect();

    let responses = futures::future::join_all(
        tokens
            .iter()
            .map(|token| app.link(token, "linkArgus", ARGUS_USER, ARGUS_PASSWORD)),
    )
    .await;

    for response in &responses {
        assert_eq!(
            response["data"]["linkArgus"]["individualStatus"], "ACTIVE",
            "{response}"
        );
    }
    assert_eq!(app.count_rows("provider_accounts").await, 1);
    assert_eq!(app.count_rows("provider_links").await, 16);
}

#[tokio::test]
async fn repeated_wrong_passwords_are_rate_limited_per_user() {
    let app = spawn_app().await;
    let chen = practitioner("dr-chen", "clinic-1");
    for attempt in 0..10 {
        let response = app
            .link(
                &chen,
                "linkArgus",
                ARGUS_USER,
                &format!("wrong-password-{attempt}"),
            )
            .await;
        assert_eq!(
            error_code(&response),
            Some("PROVIDER_REJECTED"),
            "{response}"
        );
    }

    let limited = app
        .link(&chen, "linkArgus", ARGUS_USER, ARGUS_PASSWORD)
        .await;
    assert_eq!(error_code(&limited), Some("RATE_LIMITED"), "{limited}");
    assert_eq!(app.count_rows("provider_accounts").await, 0);
    // Another practitioner is not affected.
    let patel = practitioner("dr-patel", "clinic-1");
    let other = app
        .link(&patel, "linkArgus", ARGUS_USER, ARGUS_PASSWORD)
        .await;
    assert_eq!(other["data"]["linkArgus"]["status"], "ACTIVE", "{other}");
}

#[tokio::test]
async fn a_practitioner_cannot_join_a_rejected_group_account() {
    let app = spawn_app().await;
    let admin = administrator("manager", "clinic-1");
    let chen = practitioner("dr-chen", "clinic-1");
    app.register(&admin, "ARGUS", "doomed.clinic", "SANDBOX-REJECT")
        .await;
    app.sandbox_control(
        reqwest::Method::POST,
        "/_sandbox/registrations/argus/doomed.clinic/reject",
        None,
    )
    .await;
    eventually(std::time::Duration::from_secs(10), || async {
        (app.integration(&admin, "ARGUS").await["status"] == "REJECTED").then_some(())
    })
    .await;

    let response = app
        .link(&chen, "linkArgus", "doomed.clinic", "new-clinic-password")
        .await;

    assert_eq!(
        error_code(&response),
        Some("PROVIDER_REJECTED"),
        "{response}"
    );
    assert_eq!(app.count_rows("provider_links").await, 0);
}
