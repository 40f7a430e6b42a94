//! `--state FILE`: what a sandbox did is there after a restart, the file never holds passwords
//! or session tokens in clear, and a file that cannot be used stops the start untouched.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use reqwest::StatusCode;
use serde_json::{Value, json};
use smd_sandbox::directory::Directory;
use smd_sandbox::{SandboxConfig, SandboxOptions, Scenario, StartError};

use crate::helpers::*;

/// A fresh directory under the system's temporary directory, removed when dropped.
pub struct TemporaryDirectory(pub PathBuf);

impl TemporaryDirectory {
    pub fn new() -> TemporaryDirectory {
        let path = std::env::temp_dir().join(format!("smd-sandbox-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&path).unwrap();
        TemporaryDirectory(path)
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TemporaryDirectory {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn config() -> SandboxConfig {
    SandboxConfig {
        directory_size: 200,
        ..SandboxConfig::default()
    }
}

fn options(state_file: PathBuf) -> SandboxOptions {
    SandboxOptions {
        state_file: Some(state_file),
        save_interval: Some(Duration::from_millis(100)),
        ..SandboxOptions::default()
    }
}

fn argus_recipient() -> String {
    let config = config();
    Directory::generate(config.seed, config.directory_size)
        .entries()
        .iter()
        .find(|entry| entry.magic.is_none() && entry.on_argus)
        .expect("an ordinary Argus practitioner")
        .hpii
        .clone()
}

const KEPT_USERNAME: &str = "kept.clinic";

#[tokio::test]
async fn accounts_sessions_messages_and_charges_are_there_after_a_restart_and_no_secret_is_in_clear()
 {
    let directory = TemporaryDirectory::new();
    let state_file = directory.join("sandbox-state.json");
    let sandbox = spawn_sandbox_from(config(), options(state_file.clone())).await;

    // Register, approve, send; log in to ReferralNet; a referral arrives; a charge; a fault.
    let (status, _) = sandbox
        .register_argus("", KEPT_USERNAME, "SANDBOX-PROMO")
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = sandbox
        .send(sandbox.post(
            &format!("/_sandbox/registrations/argus/{KEPT_USERNAME}/approve"),
            json!({}),
        ))
        .await;
    assert_eq!(status, StatusCode::OK);
    let payload =
        "MSH|^~\\&|GW|Kept Clinic|ARGUS|Recipient|20300101000000||REF^I12^REF_I12|C-9|P|2.4\r";
    let (status, sent) = sandbox
        .send(
            sandbox
                .post(
                    "/argus/v1/messages",
                    json!({"clientMessageId": "kept-1", "recipientHpii": argus_recipient(),
                           "payload": STANDARD.encode(payload)}),
                )
                .basic_auth(KEPT_USERNAME, Some(NEW_PASSWORD)),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{sent}");
    let token = sandbox
        .referralnet_token(
            "/ns/team-a",
            REFERRALNET_DEMO_USER_ID,
            REFERRALNET_DEMO_PASSWORD,
        )
        .await;
    let (status, _) = sandbox
        .send(sandbox.post(
            "/_sandbox/inbound",
            json!({"provider": "argus", "account": KEPT_USERNAME, "text": "Kept"}),
        ))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let charged = sandbox
        .charge("", "kept-key", charge_body(APPROVING_CARD, 2_000))
        .await;
    assert_eq!(charged.status, StatusCode::CREATED);
    sandbox
        .add_fault(
            json!({"provider": "argus", "route": "directory", "kind": "timeout", "count": 1}),
        )
        .await;
    let (_, clock_before) = sandbox.send(sandbox.get("/_sandbox/clock")).await;
    let (_, requests_before) = sandbox
        .send(sandbox.get("/_sandbox/requests?provider=argus"))
        .await;
    sandbox.stop().await;

    let text = std::fs::read_to_string(&state_file).unwrap();
    let file: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(file["format"], "smd-sandbox-state");
    assert_eq!(file["version"], 1);
    assert!(
        text.contains("pbkdf2-sha256$"),
        "passwords are kept as hashes"
    );
    for secret in [
        NEW_PASSWORD,
        ARGUS_DEMO_PASSWORD,
        REFERRALNET_DEMO_PASSWORD,
        token.as_str(),
        PAYMENTS_API_KEY,
    ] {
        assert!(
            !text.contains(secret),
            "{secret:?} is in the state file in clear"
        );
    }

    let restarted = spawn_sandbox_from(config(), options(state_file.clone())).await;
    let (status, account) = restarted
        .argus_account("", KEPT_USERNAME, NEW_PASSWORD)
        .await;
    assert_eq!(status, StatusCode::OK, "{account}");
    assert_eq!(account["status"], "ACTIVE");
    let (status, _) = restarted
        .argus_account("", KEPT_USERNAME, "not-the-password")
        .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "a wrong password still fails"
    );
    let (status, _) = restarted
        .argus_account("", ARGUS_DEMO_USERNAME, ARGUS_DEMO_PASSWORD)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, enrolment) = restarted.referralnet_account("/ns/team-a", &token).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the session outlives the restart: {enrolment}"
    );
    let (status, _) = restarted.referralnet_account("", &token).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "sessions stay in their namespace"
    );

    let (_, messages) = restarted.send(restarted.get("/_sandbox/messages")).await;
    assert_eq!(messages[0]["id"], sent["trackingId"], "{messages}");
    assert_eq!(messages[0]["payload"], payload);
    let (status, inbox) = restarted
        .send(
            restarted
                .get("/argus/v1/inbox")
                .basic_auth(KEPT_USERNAME, Some(NEW_PASSWORD)),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(inbox["messages"].as_array().unwrap().len(), 1, "{inbox}");
    let charges = restarted.charges("").await;
    assert_eq!(charges.len(), 1);
    let replayed = restarted
        .charge("", "kept-key", charge_body(APPROVING_CARD, 2_000))
        .await;
    assert!(replayed.replayed, "the idempotency key's answer was kept");
    assert_eq!(restarted.charges("").await.len(), 1, "no second charge");
    let (_, faults) = restarted.send(restarted.get("/_sandbox/faults")).await;
    assert_eq!(faults.as_array().unwrap().len(), 1, "{faults}");
    let (_, clock_after) = restarted.send(restarted.get("/_sandbox/clock")).await;
    assert!(
        clock_after["now"].as_str() >= clock_before["now"].as_str(),
        "{clock_before} → {clock_after}"
    );

    // The request log came back too, and still holds no secrets.
    let (_, requests_after) = restarted
        .send(restarted.get("/_sandbox/requests?provider=argus"))
        .await;
    let before = requests_before.as_array().unwrap();
    assert_eq!(
        &requests_after.as_array().unwrap()[..before.len()],
        &before[..]
    );
    let log = requests_after.to_string();
    for record in requests_after.as_array().unwrap() {
        let fields: Vec<&String> = record.as_object().unwrap().keys().collect();
        assert_eq!(
            fields,
            ["at", "method", "path", "provider", "status"],
            "{record}"
        );
    }
    for secret in [NEW_PASSWORD, ARGUS_DEMO_PASSWORD, token.as_str(), "?"] {
        assert!(!log.contains(secret), "{secret:?} in {log}");
    }
}

#[tokio::test]
async fn changes_reach_the_file_while_the_sandbox_runs() {
    let directory = TemporaryDirectory::new();
    let state_file = directory.join("new-directory").join("state.json");
    let sandbox = spawn_sandbox_from(config(), options(state_file.clone())).await;
    assert!(state_file.exists(), "the first state is written at start");
    sandbox
        .register_argus("", "early.clinic", "SANDBOX-PROMO")
        .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let written = std::fs::read_to_string(&state_file).unwrap_or_default();
        if written.contains("early.clinic") {
            assert!(!written.contains(NEW_PASSWORD));
            break;
        }
        assert!(Instant::now() < deadline, "the change was never written");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let leftovers: Vec<_> = std::fs::read_dir(state_file.parent().unwrap())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .filter(|name| name != "state.json")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    drop(sandbox);
}

#[tokio::test]
async fn a_damaged_foreign_or_mismatched_state_file_stops_the_start_and_is_left_as_it_was() {
    let directory = TemporaryDirectory::new();
    let state_file = directory.join("state.json");
    let cases: [(&str, &str); 3] = [
        (
            "{\"format\":\"smd-sandbox-state\",\"version\":1,\"namesp",
            "is not JSON",
        ),
        (
            "{\"format\":\"smd-sandbox-state\",\"version\":9}",
            "has version 9",
        ),
        ("[1, 2, 3]", "is not an smd-sandbox state file"),
    ];
    for (text, words) in cases {
        std::fs::write(&state_file, text).unwrap();
        let refusal = try_spawn_sandbox_from(config(), options(state_file.clone()))
            .await
            .err()
            .expect("the start is refused");
        assert!(matches!(refusal, StartError::State(_)), "{refusal}");
        assert!(refusal.to_string().contains(words), "{refusal}");
        assert!(refusal.to_string().contains("state.json"), "{refusal}");
        assert_eq!(std::fs::read_to_string(&state_file).unwrap(), text);
    }

    // A state file that can be neither read nor written stops the start too, at once.
    let blocked = directory.join("a-file-not-a-directory");
    std::fs::write(&blocked, "x").unwrap();
    let refusal = try_spawn_sandbox_from(config(), options(blocked.join("state.json")))
        .await
        .err()
        .expect("an unusable path is refused");
    assert!(matches!(refusal, StartError::State(_)), "{refusal}");
    assert!(
        refusal
            .to_string()
            .contains("a-file-not-a-directory/state.json"),
        "{refusal}"
    );

    // A good file from a sandbox with another seed does not fit this one's directory.
    std::fs::remove_file(&state_file).unwrap();
    let sandbox = spawn_sandbox_from(config(), options(state_file.clone())).await;
    sandbox
        .register_argus("", "seeded.clinic", "SANDBOX-PROMO")
        .await;
    sandbox.stop().await;
    let written = std::fs::read_to_string(&state_file).unwrap();
    let other_seed = SandboxConfig {
        seed: 43,
        ..config()
    };
    let refusal = try_spawn_sandbox_from(other_seed, options(state_file.clone()))
        .await
        .err()
        .expect("another seed is refused");
    assert!(refusal.to_string().contains("seed 42"), "{refusal}");
    assert_eq!(std::fs::read_to_string(&state_file).unwrap(), written);
}

#[tokio::test]
async fn a_seeded_scenario_namespace_continues_its_random_stream_after_a_restart() {
    let directory = TemporaryDirectory::new();
    let state_file = directory.join("state.json");
    let scenario = || {
        Scenario::parse(
            "seed = 5\n[clock]\nstart = 2030-01-01T00:00:00Z\nspeed = 0\n",
            "seeded.toml",
        )
        .unwrap()
    };
    let with_scenario = |state_file: PathBuf| SandboxOptions {
        scenarios: vec![scenario()],
        ..options(state_file)
    };
    let inbound = json!({"provider": "argus", "account": ARGUS_DEMO_USERNAME});
    let sandbox = spawn_sandbox_from(config(), with_scenario(state_file.clone())).await;
    let (_, first) = sandbox
        .send(sandbox.post("/_sandbox/inbound", inbound.clone()))
        .await;
    sandbox.stop().await;

    let restarted = spawn_sandbox_from(config(), with_scenario(state_file.clone())).await;
    let (_, second) = restarted
        .send(restarted.post("/_sandbox/inbound", inbound.clone()))
        .await;
    assert_ne!(
        first["inboxId"], second["inboxId"],
        "ids are not drawn twice"
    );
    let (_, clock) = restarted.send(restarted.get("/_sandbox/clock")).await;
    assert_eq!(
        clock["now"], "2030-01-01T00:00:00Z",
        "the stopped clock stayed stopped"
    );

    // A run without the restart draws the same two ids: the stream continued exactly.
    let straight = spawn_sandbox_from(
        config(),
        SandboxOptions {
            scenarios: vec![scenario()],
            ..SandboxOptions::default()
        },
    )
    .await;
    let (_, straight_first) = straight
        .send(straight.post("/_sandbox/inbound", inbound.clone()))
        .await;
    let (_, straight_second) = straight
        .send(straight.post("/_sandbox/inbound", inbound))
        .await;
    assert_eq!(first, straight_first);
    assert_eq!(second, straight_second);

    // A reset goes back to the scenario, not to the file.
    let (status, _) = restarted
        .send(restarted.post("/_sandbox/reset", json!({})))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, inbox) = restarted
        .send(
            restarted
                .get("/argus/v1/inbox")
                .basic_auth(ARGUS_DEMO_USERNAME, Some(ARGUS_DEMO_PASSWORD)),
        )
        .await;
    assert_eq!(inbox["messages"], json!([]));
}
