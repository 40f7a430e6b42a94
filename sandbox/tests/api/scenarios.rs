//! Scenarios: the shipped files load and do what they say, events fire when the clock passes
//! them (not before), bad scenarios are refused naming the line without changing anything, and
//! a seeded scenario replays byte for byte.

use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use reqwest::StatusCode;
use reqwest::header::CONTENT_TYPE;
use serde_json::{Value, json};
use smd_sandbox::{SandboxConfig, SandboxOptions, Scenario, StartError};

use crate::helpers::*;

/// The cardiologist the happy path adds to the directory.
const CARDIOLOGIST_HPII: &str = "8003617770000017";
const SANDBOX_START: &str = "2030-03-03T22:00:00Z";

fn scenarios_directory() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios")
}

fn shipped(name: &str) -> Scenario {
    Scenario::from_file(&scenarios_directory().join(name)).expect("a shipped scenario loads")
}

fn small_config() -> SandboxConfig {
    SandboxConfig {
        directory_size: 200,
        allow_private_webhooks: true,
        ..SandboxConfig::default()
    }
}

async fn sandbox_from(scenario: Scenario) -> TestSandbox {
    spawn_sandbox_from(
        small_config(),
        SandboxOptions {
            scenarios: vec![scenario],
            ..SandboxOptions::default()
        },
    )
    .await
}

fn hl7(control_id: &str) -> String {
    format!(
        "MSH|^~\\&|SMD-GATEWAY|Harbourside|SMD|Recipient|20300304090000+1100||REF^I12^REF_I12|{control_id}|P|2.4\rPID|1||MRN-1^^^GW^MR||Citizen^Jane\r"
    )
}

impl TestSandbox {
    async fn argus_as_demo(&self, request: reqwest::RequestBuilder) -> (StatusCode, Value) {
        self.send(request.basic_auth(ARGUS_DEMO_USERNAME, Some(ARGUS_DEMO_PASSWORD)))
            .await
    }

    async fn argus_inbox(&self) -> Vec<Value> {
        let (status, body) = self.argus_as_demo(self.get("/argus/v1/inbox")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["messages"].as_array().expect("messages").clone()
    }

    async fn schedule(&self) -> Value {
        let (status, body) = self.send(self.get("/_sandbox/schedule")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }
}

#[tokio::test]
async fn every_shipped_scenario_loads_and_starts_a_sandbox_at_its_start() {
    let mut names: Vec<PathBuf> = std::fs::read_dir(scenarios_directory())
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            path.extension()
                .is_some_and(|extension| extension == "toml")
        })
        .collect();
    names.sort();
    assert_eq!(names.len(), 3, "{names:?}");
    for path in names {
        let scenario = Scenario::from_file(&path)
            .unwrap_or_else(|error| panic!("{} does not load: {error}", path.display()));
        assert!(
            scenario.seed().is_some(),
            "{} replays exactly",
            path.display()
        );
        let sandbox = sandbox_from(scenario).await;
        let (_, clock) = sandbox.send(sandbox.get("/_sandbox/clock")).await;
        assert_eq!(clock["now"], "2030-03-03T22:00:00Z", "{}", path.display());
        assert_eq!(clock["speed"], 0.0);
        let schedule = sandbox.schedule().await;
        assert_eq!(
            schedule["scenario"]["source"],
            path.display().to_string(),
            "{schedule}"
        );
        assert_eq!(
            schedule["fired"],
            json!([]),
            "nothing fires before its time"
        );
    }
}

#[tokio::test]
async fn the_happy_path_finds_the_cardiologist_sends_and_receives_the_reply_at_ten_minutes() {
    let sandbox = sandbox_from(shipped("happy-path.toml")).await;

    let (status, found) = sandbox
        .argus_as_demo(sandbox.get("/argus/v1/directory?q=cardiology%20harbour"))
        .await;
    assert_eq!(status, StatusCode::OK, "{found}");
    assert_eq!(found["results"][0]["hpii"], CARDIOLOGIST_HPII, "{found}");

    let body = json!({
        "clientMessageId": "m-1",
        "recipientHpii": CARDIOLOGIST_HPII,
        "payload": STANDARD.encode(hl7("C-1")),
    });
    let (status, sent) = sandbox
        .argus_as_demo(sandbox.post("/argus/v1/messages", body))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{sent}");
    let (_, messages) = sandbox.send(sandbox.get("/_sandbox/messages")).await;
    assert_eq!(messages[0]["receivedAt"], SANDBOX_START, "{messages}");

    // The reply is scheduled for +10m: not there a second before.
    sandbox.advance_clock("", 599).await;
    assert!(sandbox.argus_inbox().await.is_empty());
    sandbox.advance_clock("", 1).await;
    let inbox = sandbox.argus_inbox().await;
    assert_eq!(inbox.len(), 1, "{inbox:?}");
    assert_eq!(inbox[0]["senderHpii"], CARDIOLOGIST_HPII);
    assert_eq!(inbox[0]["receivedAt"], "2030-03-03T22:10:00Z");
    let payload = String::from_utf8(
        STANDARD
            .decode(inbox[0]["payload"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert!(
        payload.contains("8003610000000006^^^AUSHICPR^NPII"),
        "{payload}"
    );
    assert!(payload.contains("echo booked"), "{payload}");
    let schedule = sandbox.schedule().await;
    assert_eq!(schedule["pending"], json!([]));
    assert_eq!(schedule["fired"][0]["outcome"], "done", "{schedule}");

    // The message sent at the start is acknowledged 15 s in, on the clock that was moved.
    let (_, message) = sandbox
        .argus_as_demo(sandbox.get(&format!(
            "/argus/v1/messages/{}",
            sent["trackingId"].as_str().unwrap()
        )))
        .await;
    assert_eq!(message["status"], "ACKNOWLEDGED", "{message}");

    // The request log works in a scenario's namespace as anywhere: method, path without the
    // query, status, time; never credentials or bodies.
    let (_, requests) = sandbox
        .send(sandbox.get("/_sandbox/requests?provider=argus"))
        .await;
    let seen: Vec<(&str, &str, u64)> = requests
        .as_array()
        .unwrap()
        .iter()
        .map(|record| {
            (
                record["method"].as_str().unwrap(),
                record["path"].as_str().unwrap(),
                record["status"].as_u64().unwrap(),
            )
        })
        .take(2)
        .collect();
    assert_eq!(
        seen,
        [
            ("GET", "/argus/v1/directory", 200),
            ("POST", "/argus/v1/messages", 202)
        ]
    );
    let log = requests.to_string();
    assert!(
        !log.contains(ARGUS_DEMO_PASSWORD) && !log.contains("cardiology"),
        "{log}"
    );
}

#[tokio::test]
async fn the_outage_scenario_fails_argus_only_inside_its_window_and_rate_limits_later() {
    let sandbox = sandbox_from(shipped("argus-outage.toml")).await;
    let account = async |sandbox: &TestSandbox| {
        let request = sandbox.get("/argus/v1/account");
        sandbox.argus_as_demo(request).await
    };

    assert_eq!(account(&sandbox).await.0, StatusCode::OK);
    sandbox.advance_clock("", 5 * 60).await;
    let (status, body) = account(&sandbox).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "serviceTemporaryUnavailable");
    // A window is not used up: every call inside it fails.
    assert_eq!(account(&sandbox).await.0, StatusCode::SERVICE_UNAVAILABLE);
    // ReferralNet is not affected.
    let (status, _) = sandbox
        .referralnet_login("", REFERRALNET_DEMO_USER_ID, REFERRALNET_DEMO_PASSWORD)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, faults) = sandbox.send(sandbox.get("/_sandbox/faults")).await;
    assert_eq!(faults.as_array().unwrap().len(), 1, "{faults}");
    assert_eq!(faults[0]["until"], "2030-03-03T22:35:00Z");

    sandbox.advance_clock("", 30 * 60).await;
    assert_eq!(account(&sandbox).await.0, StatusCode::OK);
    let (_, faults) = sandbox.send(sandbox.get("/_sandbox/faults")).await;
    assert_eq!(
        faults,
        json!([]),
        "the window is over and the rate limit not yet due"
    );

    sandbox.advance_clock("", 5 * 60).await;
    let token = sandbox
        .referralnet_token("", REFERRALNET_DEMO_USER_ID, REFERRALNET_DEMO_PASSWORD)
        .await;
    let dispatch = |sandbox: &TestSandbox, message_id: &str| {
        let request = sandbox
            .client
            .post(sandbox.url("/referralnet/api/dispatch"))
            .bearer_auth(&token)
            .header(CONTENT_TYPE, "x-application/hl7-v2+er7")
            .header("X-RN-Recipient", CARDIOLOGIST_HPII)
            .header("X-RN-Message-Id", message_id.to_owned())
            .body(hl7(message_id));
        async move { request.send().await.unwrap() }
    };
    for message_id in ["r-1", "r-2"] {
        let response = dispatch(&sandbox, message_id).await;
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()["retry-after"], "120");
    }
    // Used up: the third goes to the recipient check (the cardiologist is not in this
    // scenario's directory, so 404), and nothing was stored for the first two.
    assert_eq!(
        dispatch(&sandbox, "r-3").await.status(),
        StatusCode::NOT_FOUND
    );
    let (_, messages) = sandbox.send(sandbox.get("/_sandbox/messages")).await;
    assert_eq!(messages, json!([]));
}

#[tokio::test]
async fn the_rejected_registration_scenario_rejects_declines_and_suspends_on_time() {
    let sandbox = sandbox_from(shipped("rejected-registration.toml")).await;
    let form = json!({
        "username": "coogee.clinic",
        "password": NEW_PASSWORD,
        "promoCode": "SANDBOX-PROMO",
        "practiceName": "Coogee Medical",
        "contactEmail": "hello@coogee.example",
    });
    let (status, body) = sandbox
        .send(sandbox.post("/argus/v1/registrations", form))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let coogee = async |sandbox: &TestSandbox| {
        let request = sandbox
            .get("/argus/v1/account")
            .basic_auth("coogee.clinic", Some(NEW_PASSWORD));
        sandbox.send(request).await.1
    };

    sandbox.advance_clock("", 2 * 3600 - 1).await;
    assert_eq!(coogee(&sandbox).await["status"], "PENDING");
    sandbox.advance_clock("", 1).await;
    let account = coogee(&sandbox).await;
    assert_eq!(account["status"], "REJECTED", "{account}");
    assert_eq!(account["decidedAt"], "2030-03-04T00:00:00Z");

    let token = sandbox
        .referralnet_token("", "bondi.clinic", "bondi-sandbox-pw")
        .await;
    assert_eq!(
        sandbox.referralnet_account("", &token).await.1["enrolmentState"],
        "PENDING"
    );
    sandbox.advance_clock("", 22 * 3600).await;
    // Sessions last 15 sandbox minutes: log in again.
    let token = sandbox
        .referralnet_token("", "bondi.clinic", "bondi-sandbox-pw")
        .await;
    assert_eq!(
        sandbox.referralnet_account("", &token).await.1["enrolmentState"],
        "DECLINED"
    );

    assert_eq!(
        sandbox
            .argus_account("", ARGUS_DEMO_USERNAME, ARGUS_DEMO_PASSWORD)
            .await
            .0,
        StatusCode::OK
    );
    sandbox.advance_clock("", 2 * 86_400).await;
    let (status, body) = sandbox
        .argus_account("", ARGUS_DEMO_USERNAME, ARGUS_DEMO_PASSWORD)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["error"]["code"], "notAuthorised");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("suspended"),
        "{body}"
    );
    let (status, _) = sandbox.argus_as_demo(sandbox.get("/argus/v1/inbox")).await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "a suspended account cannot use messaging"
    );
    let registrations = sandbox.registrations("").await;
    let statuses: Vec<(&str, &str)> = registrations
        .iter()
        .map(|row| {
            (
                row["username"].as_str().unwrap(),
                row["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        statuses,
        [("bondi.clinic", "REJECTED"), ("coogee.clinic", "REJECTED")]
    );
}

#[tokio::test]
async fn a_decision_for_a_username_nobody_registered_does_nothing_and_says_so() {
    let sandbox = sandbox_from(shipped("rejected-registration.toml")).await;
    sandbox.advance_clock("", 2 * 3600).await;
    let schedule = sandbox.schedule().await;
    let outcome = schedule["fired"][0]["outcome"].as_str().unwrap();
    assert!(outcome.starts_with("nothing happened"), "{schedule}");
    assert!(outcome.contains("coogee.clinic"), "{outcome}");
    assert!(
        sandbox
            .registrations("")
            .await
            .iter()
            .all(|row| row["username"] != "coogee.clinic")
    );
}

#[tokio::test]
async fn a_scenario_loaded_through_control_replaces_the_namespace_and_a_reset_goes_back_to_it() {
    let sandbox = spawn_sandbox_with(small_config()).await;
    sandbox
        .register_argus("/ns/team-a", "before.scenario", "SANDBOX-PROMO")
        .await;
    let text = std::fs::read_to_string(scenarios_directory().join("argus-outage.toml")).unwrap();
    let (status, body) = sandbox
        .send(
            sandbox
                .client
                .post(sandbox.url("/ns/team-a/_sandbox/scenario"))
                .body(text),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["scenario"]["seed"], 11);
    assert!(sandbox.registrations("/ns/team-a").await.is_empty());
    // Only team-a changed.
    let (_, clock) = sandbox.send(sandbox.get("/_sandbox/clock")).await;
    assert_ne!(clock["now"], SANDBOX_START);

    sandbox.advance_clock("/ns/team-a", 6 * 60).await;
    sandbox
        .register_argus("/ns/team-a", "during.outage", "SANDBOX-PROMO")
        .await;
    let (status, _) = sandbox
        .send(sandbox.post("/ns/team-a/_sandbox/reset", json!({})))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, clock) = sandbox.send(sandbox.get("/ns/team-a/_sandbox/clock")).await;
    assert_eq!(
        clock["now"], SANDBOX_START,
        "a reset goes back to the scenario's start"
    );
    let (_, faults) = sandbox
        .send(sandbox.get("/ns/team-a/_sandbox/faults"))
        .await;
    assert_eq!(faults.as_array().unwrap().len(), 1, "{faults}");
}

#[tokio::test]
async fn a_bad_scenario_sent_to_control_is_refused_naming_the_line_and_changes_nothing() {
    let sandbox = spawn_sandbox_with(small_config()).await;
    sandbox
        .register_argus("", "kept.clinic", "SANDBOX-PROMO")
        .await;
    let cases = [
        (
            "seed = 3\n[[accounts]]\nprovider = \"argus\"\n",
            "line 2, column 1: missing field `username`",
        ),
        (
            "seed = 3\n[[accounts]]\nprovider = \"argus\"\nusername = \"x\"\npassword = \"long-enough\"\npractice_name = \"P\"\nstatus = \"active\"\n",
            "line 4, column 12: accounts.username",
        ),
        (
            "[[faults]]\nprovider = \"payments\"\nroute = \"account\"\nkind = \"timeout\"\ncount = 1\n",
            "payments has no route \"account\"",
        ),
        (
            "namespace = \"team-b\"\n",
            "names namespace \"team-b\" but was sent to \"default\"",
        ),
        (
            "[[directory]]\nhpii = \"8003617770000017\"\ngiven_name = \"Grace\"\nfamily_name = \"Harbour\"\nspecialty = \"Cardiology\"\norganisation = \"Harbour Heart Clinic\"\nsuburb = \"Darlinghurst\"\nstate = \"NSW\"\npostcode = \"2010\"\nproviders = [\"argus\"]\n",
            "can only be added when the sandbox starts",
        ),
        (
            "[[inbound]]\nprovider = \"argus\"\naccount = \"demo.argus\"\nfrom_hpii = \"8003617770000017\"\n",
            "line 1: inbound.from_hpii",
        ),
    ];
    for (text, words) in cases {
        let (status, body) = sandbox
            .send(
                sandbox
                    .client
                    .post(sandbox.url("/_sandbox/scenario"))
                    .body(text),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
        let message = body["error"].as_str().unwrap();
        assert!(message.contains(words), "{text:?} → {message}");
        assert!(message.starts_with("request body: "), "{message}");
    }
    let registrations = sandbox.registrations("").await;
    assert_eq!(registrations.len(), 1, "the namespace is untouched");
    assert_eq!(sandbox.schedule().await["scenario"], Value::Null);
}

#[tokio::test]
async fn a_sandbox_refuses_to_start_from_scenarios_that_do_not_fit_it() {
    let happy = shipped("happy-path.toml");
    let refusal = try_spawn_sandbox_from(
        small_config(),
        SandboxOptions {
            scenarios: vec![happy.clone(), happy],
            ..SandboxOptions::default()
        },
    )
    .await
    .err()
    .expect("two scenarios for one namespace are refused");
    assert!(matches!(refusal, StartError::Scenario(_)));
    assert!(
        refusal
            .to_string()
            .contains("already seeds namespace \"default\""),
        "{refusal}"
    );

    // A sender the directory does not hold.
    let stranger = Scenario::parse(
        "[[inbound]]\nprovider = \"referralnet\"\naccount = \"demo.referralnet\"\nfrom_hpii = \"8003617770000025\"\n",
        "stranger.toml",
    )
    .unwrap();
    let refusal = try_spawn_sandbox_from(
        small_config(),
        SandboxOptions {
            scenarios: vec![stranger],
            ..SandboxOptions::default()
        },
    )
    .await
    .err()
    .expect("an unknown sender is refused");
    assert!(
        refusal.to_string().contains("stranger.toml: line 1"),
        "{refusal}"
    );
}

/// Everything a client sees in one scripted session, in order: each request's method, path,
/// status and body, byte for byte.
async fn scripted_session(sandbox: &TestSandbox) -> String {
    let mut transcript = String::new();
    let mut record = |label: &str, status: StatusCode, body: &str| {
        transcript.push_str(&format!("{label} {}\n{body}\n", status.as_u16()));
    };
    async fn text(request: reqwest::RequestBuilder) -> (StatusCode, String) {
        let response = request.send().await.unwrap();
        (response.status(), response.text().await.unwrap())
    }
    let argus = |request: reqwest::RequestBuilder| {
        request.basic_auth(ARGUS_DEMO_USERNAME, Some(ARGUS_DEMO_PASSWORD))
    };

    let (status, body) = text(sandbox.post(
        "/argus/v1/registrations",
        json!({"username": "replay.clinic", "password": NEW_PASSWORD, "promoCode": "SANDBOX-PROMO",
               "practiceName": "Replay Clinic", "contactEmail": "replay@clinic.example"}),
    ))
    .await;
    record("register", status, &body);
    let (status, body) = text(sandbox.post(
        "/referralnet/api/sessions",
        json!({"userId": REFERRALNET_DEMO_USER_ID, "password": REFERRALNET_DEMO_PASSWORD}),
    ))
    .await;
    record("login", status, &body);
    let token: Value = serde_json::from_str(&body).unwrap();
    let token = token["sessionToken"].as_str().unwrap().to_owned();
    let (status, body) = text(
        sandbox
            .client
            .put(sandbox.url("/referralnet/api/webhook"))
            .bearer_auth(&token)
            .json(&json!({"url": "http://127.0.0.1:9/hook"})),
    )
    .await;
    record("webhook", status, &body);
    let (status, body) = text(argus(sandbox.post(
        "/argus/v1/messages",
        json!({"clientMessageId": "m-1", "recipientHpii": CARDIOLOGIST_HPII,
               "payload": STANDARD.encode(hl7("C-1"))}),
    )))
    .await;
    record("argus send", status, &body);
    let (status, body) = text(
        sandbox
            .client
            .post(sandbox.url("/referralnet/api/dispatch"))
            .bearer_auth(&token)
            .header(CONTENT_TYPE, "x-application/hl7-v2+er7")
            .header("X-RN-Recipient", CARDIOLOGIST_HPII)
            .header("X-RN-Message-Id", "r-1")
            .body(hl7("C-2")),
    )
    .await;
    record("dispatch", status, &body);
    let (status, body) =
        text(sandbox.charge_request("", "key-1", charge_body(APPROVING_CARD, 2_000))).await;
    record("charge", status, &body);
    let (status, body) = text(sandbox.post(
        "/_sandbox/faults",
        json!({"provider": "argus", "route": "inbox", "kind": "server_error", "count": 1}),
    ))
    .await;
    record("fault", status, &body);
    let (status, body) = text(sandbox.post(
        "/_sandbox/inbound",
        json!({"provider": "referralnet", "account": REFERRALNET_DEMO_USER_ID}),
    ))
    .await;
    record("inbound", status, &body);
    let (status, body) =
        text(sandbox.post("/_sandbox/clock/advance", json!({"seconds": 600}))).await;
    record("advance", status, &body);
    for (label, path) in [
        ("argus inbox (faulted)", "/argus/v1/inbox"),
        ("argus inbox", "/argus/v1/inbox"),
    ] {
        let (status, body) = text(argus(sandbox.get(path))).await;
        record(label, status, &body);
    }
    let (status, body) = text(sandbox.get("/referralnet/api/inbox").bearer_auth(&token)).await;
    record("referralnet inbox", status, &body);
    for path in [
        "/_sandbox/messages",
        "/_sandbox/registrations",
        "/_sandbox/charges",
        "/_sandbox/schedule",
        "/_sandbox/clock",
    ] {
        let (status, body) = text(sandbox.get(path)).await;
        record(path, status, &body);
    }
    transcript
}

#[tokio::test]
async fn a_seeded_scenario_replays_byte_for_byte_and_another_seed_does_not() {
    let first = sandbox_from(shipped("happy-path.toml")).await;
    let second = sandbox_from(shipped("happy-path.toml")).await;
    let first_run = scripted_session(&first).await;
    let second_run = scripted_session(&second).await;
    assert_eq!(first_run, second_run);
    // The run did produce ids, tokens and times that would differ without a seed.
    for word in [
        "\"trackingId\":\"AT-",
        "\"receiptId\":\"RN-",
        "whsec_",
        "\"id\":\"ch_",
        "AIN-",
        "RNI-",
        "SBX",
    ] {
        assert!(first_run.contains(word), "{word} is in the transcript");
    }

    let text = std::fs::read_to_string(scenarios_directory().join("happy-path.toml"))
        .unwrap()
        .replace("seed = 7", "seed = 8");
    let reseeded = sandbox_from(Scenario::parse(&text, "reseeded.toml").unwrap()).await;
    let reseeded_run = scripted_session(&reseeded).await;
    assert_ne!(first_run, reseeded_run);
    // Same shape, different draws: the statuses line up, the ids do not.
    let statuses = |transcript: &str| {
        transcript
            .lines()
            .step_by(2)
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(statuses(&first_run), statuses(&reseeded_run));

    // Without a seed, nothing is repeatable: tokens come from the operating system.
    let unseeded_text = text.replace("seed = 8", "");
    let unseeded_one =
        sandbox_from(Scenario::parse(&unseeded_text, "unseeded.toml").unwrap()).await;
    let unseeded_two =
        sandbox_from(Scenario::parse(&unseeded_text, "unseeded.toml").unwrap()).await;
    assert_ne!(
        scripted_session(&unseeded_one).await,
        scripted_session(&unseeded_two).await
    );
}
