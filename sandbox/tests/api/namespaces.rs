//! Namespaces: by header or path prefix, isolated from each other.

use reqwest::StatusCode;
use serde_json::json;
use smd_sandbox::NAMESPACE_HEADER;

use crate::helpers::*;

#[tokio::test]
async fn a_registration_in_one_header_namespace_is_invisible_in_another() {
    let sandbox = spawn_sandbox().await;
    let registration = json!({
        "username": "harbourside",
        "password": NEW_PASSWORD,
        "promoCode": "SANDBOX-PROMO",
        "practiceName": "Harbourside Family Practice",
        "contactEmail": "front.desk@harbourside.example",
    });

    let (status, _) = sandbox
        .send(
            sandbox
                .post("/argus/v1/registrations", registration.clone())
                .header(NAMESPACE_HEADER, "team-a"),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);

    let listed_in = |namespace: &'static str| {
        sandbox.send(
            sandbox
                .get("/_sandbox/registrations")
                .header(NAMESPACE_HEADER, namespace),
        )
    };
    let (_, team_a) = listed_in("team-a").await;
    assert_eq!(team_a.as_array().unwrap().len(), 1);
    let (_, team_b) = listed_in("team-b").await;
    assert_eq!(team_b, json!([]));
    assert!(
        sandbox.registrations("").await.is_empty(),
        "nor in the default namespace"
    );

    // The same username is free in another namespace.
    let (status, _) = sandbox
        .send(
            sandbox
                .post("/argus/v1/registrations", registration)
                .header(NAMESPACE_HEADER, "team-b"),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
}

#[tokio::test]
async fn a_clock_advance_in_one_path_namespace_is_invisible_in_another() {
    let sandbox = spawn_sandbox().await;
    sandbox
        .register_argus("/ns/team-a", "harbourside", "SANDBOX-PROMO")
        .await;
    sandbox
        .register_argus("/ns/team-b", "harbourside", "SANDBOX-PROMO")
        .await;

    sandbox
        .advance_clock("/ns/team-a", 4 * ONE_DAY_SECONDS)
        .await;

    let (_, in_team_a) = sandbox
        .argus_account("/ns/team-a", "harbourside", NEW_PASSWORD)
        .await;
    assert_eq!(in_team_a["status"], "ACTIVE");
    let (_, in_team_b) = sandbox
        .argus_account("/ns/team-b", "harbourside", NEW_PASSWORD)
        .await;
    assert_eq!(in_team_b["status"], "PENDING");
    let (_, clock_a) = sandbox.send(sandbox.get("/ns/team-a/_sandbox/clock")).await;
    let (_, clock_b) = sandbox.send(sandbox.get("/ns/team-b/_sandbox/clock")).await;
    assert_ne!(clock_a["now"], clock_b["now"]);
}

#[tokio::test]
async fn the_path_prefix_and_the_header_reach_the_same_namespace() {
    let sandbox = spawn_sandbox().await;
    sandbox
        .register_argus("/ns/ci_run-42", "harbourside", "SANDBOX-PROMO")
        .await;

    let (status, account) = sandbox
        .send(
            sandbox
                .get("/argus/v1/account")
                .basic_auth("harbourside", Some(NEW_PASSWORD))
                .header(NAMESPACE_HEADER, "ci_run-42"),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{account}");

    // The path prefix wins over the header.
    let (status, _) = sandbox
        .send(
            sandbox
                .get("/ns/other/argus/v1/account")
                .basic_auth("harbourside", Some(NEW_PASSWORD))
                .header(NAMESPACE_HEADER, "ci_run-42"),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn faults_and_sessions_in_one_namespace_do_not_reach_another() {
    let sandbox = spawn_sandbox().await;
    let (status, _) = sandbox
        .send(sandbox.post(
            "/ns/team-a/_sandbox/faults",
            json!({ "provider": "argus", "route": "*", "kind": "server_error", "count": 1 }),
        ))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let token_in_team_a = sandbox
        .referralnet_token(
            "/ns/team-a",
            REFERRALNET_DEMO_USER_ID,
            REFERRALNET_DEMO_PASSWORD,
        )
        .await;

    let (status, _) = sandbox
        .argus_account("/ns/team-b", ARGUS_DEMO_USERNAME, ARGUS_DEMO_PASSWORD)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = sandbox
        .referralnet_account("/ns/team-b", &token_in_team_a)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["fault"]["faultCode"], "notAuthorised");

    let (status, _) = sandbox
        .argus_account("/ns/team-a", ARGUS_DEMO_USERNAME, ARGUS_DEMO_PASSWORD)
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn an_invalid_namespace_name_is_refused_before_anything_happens() {
    let sandbox = spawn_sandbox().await;

    let (status, body) = sandbox.send(sandbox.get("/ns/Team_A/_sandbox/clock")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("invalid namespace name")
    );

    let (status, body) = sandbox
        .send(
            sandbox
                .get("/_sandbox/clock")
                .header(NAMESPACE_HEADER, "has space"),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("invalid namespace name")
    );

    let (status, _) = sandbox.send(sandbox.get("/ns//_sandbox/clock")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_path_outside_every_route_is_not_found_in_a_namespace_too() {
    let sandbox = spawn_sandbox().await;

    let (status, _) = sandbox
        .send(sandbox.get("/ns/team-a/argus/v2/account"))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = sandbox.send(sandbox.get("/ns/team-a")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}
