//! The `smd-sandbox` binary: its ready line, serving, and refusing bad flags.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use reqwest::StatusCode;

use crate::helpers::*;

const BINARY: &str = env!("CARGO_BIN_EXE_smd-sandbox");

#[tokio::test]
async fn the_binary_prints_its_ready_line_serves_and_stops_on_interrupt() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut child = Command::new(BINARY)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--seed",
            "7",
            "--clock-speed",
            "2",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the binary starts");
    let stdout = child.stdout.take().unwrap();
    let ready_line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        line
    })
    .await
    .unwrap();
    let base_url = ready_line
        .trim_end()
        .strip_prefix("ready ")
        .unwrap_or_else(|| panic!("unexpected first line {ready_line:?}"))
        .to_owned();
    assert!(base_url.starts_with("http://127.0.0.1:"), "{base_url}");

    let client = reqwest::Client::new();
    let response = client
        .get(format!("{base_url}/argus/v1/account"))
        .basic_auth(ARGUS_DEMO_USERNAME, Some(ARGUS_DEMO_PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let clock: serde_json::Value = client
        .get(format!("{base_url}/_sandbox/clock"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(clock["speed"], 2.0);

    let interrupted = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupted.success());
    let exit = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(exit.success(), "a graceful stop exits cleanly: {exit}");
}

#[test]
fn the_binary_refuses_a_clock_speed_that_is_not_positive() {
    for speed in ["0", "-1", "NaN", "fast"] {
        let output = Command::new(BINARY)
            .args(["--listen", "127.0.0.1:0", "--clock-speed", speed])
            .output()
            .expect("the binary runs");
        assert!(!output.status.success(), "{speed} was accepted");
        assert!(
            output.stdout.is_empty(),
            "nothing is ready with speed {speed}"
        );
        let errors = String::from_utf8_lossy(&output.stderr);
        assert!(errors.contains("--clock-speed"), "{errors}");
    }
}

/// Starts the binary with `arguments` and returns it with the base URL from its ready line.
async fn start_binary(arguments: &[&str]) -> (std::process::Child, String) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut child = Command::new(BINARY)
        .args(arguments)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the binary starts");
    let stdout = child.stdout.take().unwrap();
    let ready_line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        line
    })
    .await
    .unwrap();
    let base_url = ready_line
        .trim_end()
        .strip_prefix("ready ")
        .unwrap_or_else(|| panic!("unexpected first line {ready_line:?}"))
        .to_owned();
    (child, base_url)
}

/// Sends `signal` to the binary and waits for it to exit cleanly.
async fn stop_binary(child: std::process::Child, signal: &str) {
    let sent = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let mut child = child;
    let exit = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(exit.success(), "a graceful stop exits cleanly: {exit}");
}

#[test]
fn the_binary_refuses_a_bad_scenario_naming_its_line_and_never_gets_ready() {
    let directory = crate::state::TemporaryDirectory::new();
    let scenario = directory.join("broken.toml");
    std::fs::write(
        &scenario,
        "seed = 1\n\n[[accounts]]\nprovider = \"argus\"\nusername = \"ok.clinic\"\npassword = \"long-enough\"\npractice_name = \"OK\"\nstatus = \"on holiday\"\n",
    )
    .unwrap();
    let state_file = directory.join("state.json");
    let output = Command::new(BINARY)
        .args(["--listen", "127.0.0.1:0", "--scenario"])
        .arg(&scenario)
        .arg("--state")
        .arg(&state_file)
        .output()
        .expect("the binary runs");
    assert!(!output.status.success());
    assert!(output.stdout.is_empty(), "nothing is ready");
    let errors = String::from_utf8_lossy(&output.stderr);
    assert!(errors.contains("broken.toml: line 8"), "{errors}");
    assert!(errors.contains("unknown variant `on holiday`"), "{errors}");
    assert!(!state_file.exists(), "no state file is written");
}

#[test]
fn the_binary_refuses_a_damaged_state_file_and_leaves_it_alone() {
    let directory = crate::state::TemporaryDirectory::new();
    let state_file = directory.join("state.json");
    std::fs::write(&state_file, "{\"format\":\"smd-sandbox-state\",").unwrap();
    let output = Command::new(BINARY)
        .args(["--listen", "127.0.0.1:0", "--state"])
        .arg(&state_file)
        .output()
        .expect("the binary runs");
    assert!(!output.status.success());
    assert!(output.stdout.is_empty(), "nothing is ready");
    let errors = String::from_utf8_lossy(&output.stderr);
    assert!(errors.contains("is not JSON"), "{errors}");
    assert_eq!(
        std::fs::read_to_string(&state_file).unwrap(),
        "{\"format\":\"smd-sandbox-state\","
    );
}

#[tokio::test]
async fn the_binary_keeps_its_state_across_a_sigterm_and_a_restart() {
    let directory = crate::state::TemporaryDirectory::new();
    let state_file = directory.join("state.json");
    let state_argument = state_file.to_str().unwrap().to_owned();
    let arguments = [
        "--listen",
        "127.0.0.1:0",
        "--directory-size",
        "200",
        "--state",
        &state_argument,
    ];
    let (child, base_url) = start_binary(&arguments).await;
    let client = reqwest::Client::new();
    let registered = client
        .post(format!("{base_url}/referralnet/api/enrolments"))
        .json(&serde_json::json!({
            "userId": "restart.clinic", "password": NEW_PASSWORD, "promotionCode": "SANDBOX-PROMO",
            "organisationName": "Restart Clinic", "email": "front@restart.example",
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(registered.status(), StatusCode::ACCEPTED);
    let approved = client
        .post(format!(
            "{base_url}/_sandbox/registrations/referralnet/restart.clinic/approve"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(approved.status(), StatusCode::OK);
    stop_binary(child, "-TERM").await;
    let written = std::fs::read_to_string(&state_file).unwrap();
    assert!(written.contains("restart.clinic"));
    assert!(!written.contains(NEW_PASSWORD));

    let (child, base_url) = start_binary(&arguments).await;
    let login: serde_json::Value = client
        .post(format!("{base_url}/referralnet/api/sessions"))
        .json(&serde_json::json!({"userId": "restart.clinic", "password": NEW_PASSWORD}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = login["sessionToken"].as_str().expect("the login works");
    let account: serde_json::Value = client
        .get(format!("{base_url}/referralnet/api/account"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(account["enrolmentState"], "APPROVED", "{account}");
    stop_binary(child, "-INT").await;
}
