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
