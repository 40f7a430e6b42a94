//! Messaging: the directory, Argus send/status/inbox, ReferralNet dispatch/receipts/webhook
//! pushes/inbox, and the control routes that inject and inspect messages.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode as AxumStatusCode};
use axum::routing::post;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use reqwest::StatusCode;
use reqwest::header::CONTENT_TYPE;
use serde_json::{Value, json};
use sha2::Sha256;
use smd_sandbox::SandboxConfig;
use smd_sandbox::directory::{
    DEFAULT_DIRECTORY_SIZE, Directory, DirectoryEntry, MAGIC_NEVER_ACKNOWLEDGES,
    MAGIC_REJECTS_PAYLOAD, MAGIC_SLOW_DELIVERY, MAGIC_UNDELIVERABLE, MAGIC_UNKNOWN_ENDPOINT,
    luhn_valid,
};

use crate::helpers::*;

const HL7_MEDIA_TYPE: &str = "x-application/hl7-v2+er7";

/// A referral as the gateway would send it, with this control id (MSH-10).
fn referral(control_id: &str) -> String {
    format!(
        "MSH|^~\\&|SMD-GATEWAY|Harbourside Family Practice|SMD|Recipient|20300101090000+1000||REF^I12^REF_I12|{control_id}|P|2.4\rPID|1||MRN-1^^^GW^MR||Citizen^Jane\rOBX|1|FT|REF^Letter||Dear colleague\\.br\\see \\T\\ advise||||||F\r"
    )
}

/// The directory of a default sandbox, as the library generates it.
fn default_directory() -> Directory {
    Directory::generate(SandboxConfig::default().seed, DEFAULT_DIRECTORY_SIZE)
}

/// The first ordinary practitioner reached by exactly these providers.
fn practitioner_on(directory: &Directory, argus: bool, referralnet: bool) -> &DirectoryEntry {
    directory
        .entries()
        .iter()
        .find(|entry| {
            entry.magic.is_none() && entry.on_argus == argus && entry.on_referralnet == referralnet
        })
        .expect("the directory has one")
}

fn decode_base64(text: &Value) -> String {
    let bytes = STANDARD
        .decode(text.as_str().expect("a base64 string"))
        .expect("valid base64");
    String::from_utf8(bytes).expect("UTF-8")
}

impl TestSandbox {
    async fn argus_send(
        &self,
        prefix: &str,
        client_message_id: &str,
        recipient_hpii: &str,
        payload: &str,
    ) -> (StatusCode, Value) {
        let body = json!({
            "clientMessageId": client_message_id,
            "recipientHpii": recipient_hpii,
            "payload": STANDARD.encode(payload),
        });
        self.send(
            self.post(&format!("{prefix}/argus/v1/messages"), body)
                .basic_auth(ARGUS_DEMO_USERNAME, Some(ARGUS_DEMO_PASSWORD)),
        )
        .await
    }

    async fn argus_get(&self, path: &str) -> (StatusCode, Value) {
        self.send(
            self.get(path)
                .basic_auth(ARGUS_DEMO_USERNAME, Some(ARGUS_DEMO_PASSWORD)),
        )
        .await
    }

    async fn argus_message(&self, prefix: &str, tracking_id: &str) -> Value {
        let (status, body) = self
            .argus_get(&format!("{prefix}/argus/v1/messages/{tracking_id}"))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    async fn dispatch(
        &self,
        token: &str,
        message_id: &str,
        recipient: &str,
        payload: &str,
    ) -> (StatusCode, Value) {
        self.send(
            self.client
                .post(self.url("/referralnet/api/dispatch"))
                .bearer_auth(token)
                .header(CONTENT_TYPE, HL7_MEDIA_TYPE)
                .header("X-RN-Recipient", recipient)
                .header("X-RN-Message-Id", message_id)
                .body(payload.to_owned()),
        )
        .await
    }

    async fn receipt(&self, token: &str, receipt_id: &str) -> Value {
        let (status, body) = self
            .send(
                self.get(&format!("/referralnet/api/dispatch/{receipt_id}"))
                    .bearer_auth(token),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    async fn demo_token(&self) -> String {
        self.referralnet_token("", REFERRALNET_DEMO_USER_ID, REFERRALNET_DEMO_PASSWORD)
            .await
    }

    async fn inbound(&self, prefix: &str, request: Value) -> Value {
        let (status, body) = self
            .send(self.post(&format!("{prefix}/_sandbox/inbound"), request))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body
    }

    async fn sent_messages(&self, prefix: &str) -> Vec<Value> {
        let (status, body) = self
            .send(self.get(&format!("{prefix}/_sandbox/messages")))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body.as_array().expect("a list").clone()
    }
}

// --- Directory ---

#[tokio::test]
async fn the_directory_is_the_same_for_a_seed_in_every_namespace_and_differs_for_another_seed() {
    let first = spawn_sandbox_with(SandboxConfig {
        seed: 7,
        ..SandboxConfig::default()
    })
    .await;
    let same_seed = spawn_sandbox_with(SandboxConfig {
        seed: 7,
        ..SandboxConfig::default()
    })
    .await;
    let other_seed = spawn_sandbox_with(SandboxConfig {
        seed: 8,
        ..SandboxConfig::default()
    })
    .await;
    let path = "/argus/v1/directory?q=&page=3&pageSize=50";

    let (status, page) = first.argus_get(path).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["results"].as_array().unwrap().len(), 50);
    assert_eq!(same_seed.argus_get(path).await.1, page);
    assert_eq!(
        first.argus_get(&format!("/ns/team-a{path}")).await.1,
        page,
        "every namespace sees the same directory"
    );
    assert_ne!(
        other_seed.argus_get(path).await.1["results"],
        page["results"]
    );
}

#[tokio::test]
async fn every_hpii_is_luhn_valid_and_the_magic_recipients_are_listed_first() {
    let sandbox = spawn_sandbox().await;

    let (status, page) = sandbox.argus_get("/argus/v1/directory?pageSize=50").await;

    assert_eq!(status, StatusCode::OK, "{page}");
    let results = page["results"].as_array().unwrap();
    let first_five: Vec<&str> = results[..5]
        .iter()
        .map(|entry| entry["hpii"].as_str().unwrap())
        .collect();
    assert_eq!(
        first_five,
        [
            MAGIC_UNKNOWN_ENDPOINT,
            MAGIC_REJECTS_PAYLOAD,
            MAGIC_UNDELIVERABLE,
            MAGIC_NEVER_ACKNOWLEDGES,
            MAGIC_SLOW_DELIVERY
        ]
    );
    assert_eq!(results[0]["givenName"], "Test");
    assert_eq!(results[0]["familyName"], "Unknown-Endpoint");
    for entry in results {
        let hpii = entry["hpii"].as_str().unwrap();
        assert!(hpii.starts_with("800361") && hpii.len() == 16, "{hpii}");
        assert!(luhn_valid(hpii), "{hpii}");
        assert!(entry["argusId"].is_string());
    }
    let ordinary: Vec<(String, String, String)> = results[5..]
        .iter()
        .map(|entry| {
            let text = |field: &str| entry[field].as_str().unwrap().to_owned();
            (text("familyName"), text("givenName"), text("hpii"))
        })
        .collect();
    let mut sorted = ordinary.clone();
    sorted.sort();
    assert_eq!(ordinary, sorted, "ordered by family, given name, HPI-I");
}

#[tokio::test]
async fn about_forty_percent_are_argus_only_thirty_referralnet_only_and_thirty_on_both() {
    let sandbox = spawn_sandbox().await;
    let token = sandbox.demo_token().await;

    let (_, argus) = sandbox.argus_get("/argus/v1/directory?pageSize=1").await;
    let (_, referralnet) = sandbox
        .send(
            sandbox
                .get("/referralnet/api/providers?limit=1")
                .bearer_auth(&token),
        )
        .await;

    // The five magic recipients are on both; the rest split.
    let ordinary = (DEFAULT_DIRECTORY_SIZE - 5) as f64;
    let on_argus = argus["total"].as_u64().unwrap() as f64 - 5.0;
    let on_referralnet = referralnet["total"].as_u64().unwrap() as f64 - 5.0;
    let argus_only = (ordinary - on_referralnet) / ordinary;
    let referralnet_only = (ordinary - on_argus) / ordinary;
    let both = 1.0 - argus_only - referralnet_only;
    assert!((argus_only - 0.4).abs() < 0.03, "{argus_only}");
    assert!((referralnet_only - 0.3).abs() < 0.03, "{referralnet_only}");
    assert!((both - 0.3).abs() < 0.03, "{both}");
}

#[tokio::test]
async fn a_directory_search_needs_every_word_and_pages_in_both_wire_styles() {
    let sandbox = spawn_sandbox().await;
    let token = sandbox.demo_token().await;

    let (status, first) = sandbox
        .argus_get("/argus/v1/directory?q=Cardiology+vic&page=1&pageSize=5")
        .await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let (_, second) = sandbox
        .argus_get("/argus/v1/directory?q=cardiology%20VIC&page=2&pageSize=5")
        .await;
    let total = first["total"].as_u64().unwrap();
    assert!(total > 10, "{total}");
    assert_eq!(second["total"], total);
    assert_eq!(
        (second["page"].clone(), second["pageSize"].clone()),
        (json!(2), json!(5))
    );
    let argus_hpiis: Vec<&str> = first["results"]
        .as_array()
        .unwrap()
        .iter()
        .chain(second["results"].as_array().unwrap())
        .map(|entry| {
            assert_eq!(entry["specialty"], "Cardiology");
            assert_eq!(entry["state"], "VIC");
            entry["hpii"].as_str().unwrap()
        })
        .collect();
    assert_eq!(
        argus_hpiis.iter().collect::<HashSet<_>>().len(),
        10,
        "pages do not overlap"
    );

    let (status, providers) = sandbox
        .send(
            sandbox
                .get("/referralnet/api/providers?search=cardiology+vic&offset=0&limit=7")
                .bearer_auth(&token),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{providers}");
    let rn_total = providers["total"].as_u64().unwrap();
    assert_eq!(providers["nextOffset"], 7);
    let provider = &providers["providers"][0];
    assert_eq!(provider["discipline"], "Cardiology");
    assert_eq!(provider["state"], "VIC");
    assert!(provider["name"].as_str().unwrap().starts_with("Dr "));
    assert!(luhn_valid(provider["providerNumber"].as_str().unwrap()));
    for field in ["rnAddress", "practice", "locality", "postcode"] {
        assert!(provider[field].is_string(), "{field}");
    }
    let (_, last_page) = sandbox
        .send(
            sandbox
                .get(&format!(
                    "/referralnet/api/providers?search=cardiology+vic&offset={}&limit=7",
                    rn_total - 1
                ))
                .bearer_auth(&token),
        )
        .await;
    assert_eq!(last_page["providers"].as_array().unwrap().len(), 1);
    assert_eq!(last_page["nextOffset"], Value::Null);

    let (_, nobody) = sandbox
        .argus_get("/argus/v1/directory?q=cardiology+no-such-word")
        .await;
    assert_eq!(
        (nobody["total"].clone(), nobody["results"].clone()),
        (json!(0), json!([]))
    );

    let (status, body) = sandbox.argus_get("/argus/v1/directory?pageSize=51").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["code"], "badParam");
    let (status, body) = sandbox.argus_get("/argus/v1/directory?page=0").await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (StatusCode::BAD_REQUEST, json!("badParam"))
    );
    let (status, body) = sandbox
        .send(
            sandbox
                .get("/referralnet/api/providers?limit=0")
                .bearer_auth(&token),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["fault"]["faultCode"], "badParam");
}

#[tokio::test]
async fn the_control_api_looks_up_a_directory_entry_with_its_providers() {
    let sandbox = spawn_sandbox().await;
    let directory = default_directory();
    let argus_only = practitioner_on(&directory, true, false);

    let (status, magic) = sandbox
        .send(sandbox.get(&format!("/_sandbox/directory/{MAGIC_UNDELIVERABLE}")))
        .await;
    assert_eq!(status, StatusCode::OK, "{magic}");
    assert_eq!(magic["familyName"], "Undeliverable");
    assert_eq!(magic["providers"], json!(["argus", "referralnet"]));

    let (_, entry) = sandbox
        .send(sandbox.get(&format!("/_sandbox/directory/{}", argus_only.hpii)))
        .await;
    assert_eq!(entry["providers"], json!(["argus"]));
    assert_eq!(entry["givenName"], argus_only.given_name);
    assert_eq!(entry["rnAddress"], Value::Null);

    let (status, body) = sandbox
        .send(sandbox.get("/_sandbox/directory/8003610000000000"))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"].is_string());
}

// --- Argus ---

#[tokio::test]
async fn an_argus_message_is_delivered_after_five_seconds_and_acknowledged_ten_seconds_later() {
    let sandbox = spawn_sandbox().await;
    let directory = default_directory();
    let recipient = practitioner_on(&directory, true, true);

    let (status, accepted) = sandbox
        .argus_send("", "gw-msg-1", &recipient.hpii, &referral("CTRL-0001"))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    assert_eq!(accepted["status"], "ACCEPTED");
    let tracking_id = accepted["trackingId"].as_str().unwrap();
    assert!(tracking_id.starts_with("AT-"), "{tracking_id}");

    let message = sandbox.argus_message("", tracking_id).await;
    assert_eq!(message["status"], "ACCEPTED");
    assert_eq!(message["clientMessageId"], "gw-msg-1");
    assert_eq!(message["recipientHpii"], recipient.hpii.as_str());
    assert_eq!(message["deliveredAt"], Value::Null);
    assert_eq!(message["acknowledgement"], Value::Null);

    sandbox.advance_clock("", 5).await;
    let message = sandbox.argus_message("", tracking_id).await;
    assert_eq!(message["status"], "DELIVERED");
    assert!(message["deliveredAt"].is_string());
    assert_eq!(message["acknowledgedAt"], Value::Null);

    sandbox.advance_clock("", 10).await;
    let message = sandbox.argus_message("", tracking_id).await;
    assert_eq!(message["status"], "ACKNOWLEDGED", "{message}");
    assert_eq!(message["failureReason"], Value::Null);
    assert!(message["acknowledgedAt"].is_string());
    let acknowledgement = decode_base64(&message["acknowledgement"]);
    assert!(
        acknowledgement.starts_with("MSH|^~\\&|"),
        "{acknowledgement}"
    );
    assert!(
        acknowledgement.contains("|RRI^I12^RRI_I12|"),
        "{acknowledgement}"
    );
    assert!(
        acknowledgement.contains("\rMSA|AA|CTRL-0001\r"),
        "{acknowledgement}"
    );
}

#[tokio::test]
async fn resending_a_client_message_id_returns_the_same_tracking_id_and_stores_one_message() {
    let sandbox = spawn_sandbox().await;
    let directory = default_directory();
    let recipient = practitioner_on(&directory, true, false);
    let (_, first) = sandbox
        .argus_send("", "gw-msg-2", &recipient.hpii, &referral("CTRL-2"))
        .await;
    sandbox.advance_clock("", 5).await;

    let (status, again) = sandbox
        .argus_send("", "gw-msg-2", &recipient.hpii, &referral("CTRL-2"))
        .await;

    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["trackingId"], first["trackingId"]);
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["status"], "DELIVERED", "the current status");
    let sent = sandbox.sent_messages("").await;
    assert_eq!(sent.len(), 1, "never a second message");
}

#[tokio::test]
async fn each_magic_recipient_behaves_as_documented_at_argus() {
    let sandbox = spawn_sandbox().await;
    let payload = referral("CTRL-MAGIC");

    let (status, body) = sandbox
        .argus_send("", "m-unknown", MAGIC_UNKNOWN_ENDPOINT, &payload)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "unknownEndpoint");
    let (status, body) = sandbox
        .argus_send("", "m-rejects", MAGIC_REJECTS_PAYLOAD, &payload)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["code"], "badlyFormedMsg");

    let mut tracking_ids = Vec::new();
    for (client_message_id, hpii) in [
        ("m-undeliverable", MAGIC_UNDELIVERABLE),
        ("m-silent", MAGIC_NEVER_ACKNOWLEDGES),
        ("m-slow", MAGIC_SLOW_DELIVERY),
    ] {
        let (status, body) = sandbox
            .argus_send("", client_message_id, hpii, &payload)
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        tracking_ids.push(body["trackingId"].as_str().unwrap().to_owned());
    }
    let [undeliverable, silent, slow] = &tracking_ids[..] else {
        unreachable!()
    };
    assert_eq!(
        sandbox.sent_messages("").await.len(),
        3,
        "refused sends are not stored"
    );

    sandbox.advance_clock("", 5).await;
    let failed = sandbox.argus_message("", undeliverable).await;
    assert_eq!(failed["status"], "FAILED");
    assert_eq!(failed["failureReason"], "recipient endpoint unreachable");
    assert_eq!(failed["deliveredAt"], Value::Null);
    assert_eq!(
        sandbox.argus_message("", silent).await["status"],
        "DELIVERED"
    );
    assert_eq!(sandbox.argus_message("", slow).await["status"], "ACCEPTED");

    sandbox.advance_clock("", 3595).await;
    assert_eq!(
        sandbox.argus_message("", slow).await["status"],
        "DELIVERED",
        "an hour after acceptance"
    );
    sandbox.advance_clock("", 10).await;
    assert_eq!(
        sandbox.argus_message("", slow).await["status"],
        "ACKNOWLEDGED"
    );
    let silent = sandbox.argus_message("", silent).await;
    assert_eq!(silent["status"], "DELIVERED", "never acknowledged");
    assert_eq!(silent["acknowledgement"], Value::Null);
    assert_eq!(
        sandbox.argus_message("", undeliverable).await["status"],
        "FAILED"
    );
}

#[tokio::test]
async fn an_argus_send_is_refused_for_a_bad_body_a_bad_payload_or_an_unreachable_recipient() {
    let sandbox = spawn_sandbox().await;
    let directory = default_directory();
    let on_argus = practitioner_on(&directory, true, false);
    let referralnet_only = practitioner_on(&directory, false, true);
    let valid_payload = STANDARD.encode(referral("CTRL-3"));

    let refusals = [
        (
            json!({ "recipientHpii": on_argus.hpii, "payload": valid_payload }),
            StatusCode::BAD_REQUEST,
            "badParam",
        ),
        (
            json!({ "clientMessageId": "has space", "recipientHpii": on_argus.hpii, "payload": valid_payload }),
            StatusCode::BAD_REQUEST,
            "badParam",
        ),
        (
            json!({ "clientMessageId": "m1", "recipientHpii": on_argus.hpii, "payload": "not base64!" }),
            StatusCode::BAD_REQUEST,
            "badlyFormedMsg",
        ),
        (
            json!({ "clientMessageId": "m2", "recipientHpii": on_argus.hpii, "payload": STANDARD.encode("PID|1\r") }),
            StatusCode::BAD_REQUEST,
            "badlyFormedMsg",
        ),
        (
            json!({ "clientMessageId": "m3", "recipientHpii": referralnet_only.hpii, "payload": valid_payload }),
            StatusCode::NOT_FOUND,
            "unknownEndpoint",
        ),
        (
            json!({ "clientMessageId": "m4", "recipientHpii": "8003610000000000", "payload": valid_payload }),
            StatusCode::NOT_FOUND,
            "unknownEndpoint",
        ),
    ];
    for (body, expected_status, expected_code) in refusals {
        let (status, answer) = sandbox
            .send(
                sandbox
                    .post("/argus/v1/messages", body.clone())
                    .basic_auth(ARGUS_DEMO_USERNAME, Some(ARGUS_DEMO_PASSWORD)),
            )
            .await;
        assert_eq!(status, expected_status, "{body}: {answer}");
        assert_eq!(answer["error"]["code"], expected_code, "{body}");
    }
    assert!(sandbox.sent_messages("").await.is_empty());

    // A refused id is not bound: the corrected send goes through.
    let (status, body) = sandbox
        .argus_send("", "m3", &on_argus.hpii, &referral("CTRL-3"))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
}

#[tokio::test]
async fn argus_credentials_are_checked_and_another_accounts_message_is_not_found() {
    let sandbox = spawn_sandbox().await;
    let (status, body) = sandbox
        .send(
            sandbox
                .get("/argus/v1/directory")
                .basic_auth(ARGUS_DEMO_USERNAME, Some("wrong-password")),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["code"], "invalidCredentials");

    let (status, body) = sandbox
        .argus_get("/argus/v1/messages/AT-NOSUCHMESSAGE")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "notFound");
}

// --- ReferralNet ---

#[tokio::test]
async fn a_referralnet_dispatch_is_queued_and_its_receipt_follows_the_sandbox_clock() {
    let sandbox = spawn_sandbox().await;
    let directory = default_directory();
    let recipient = practitioner_on(&directory, false, true);
    let token = sandbox.demo_token().await;

    let (status, queued) = sandbox
        .dispatch(&token, "rn-msg-1", &recipient.hpii, &referral("CTRL-RN-1"))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{queued}");
    assert_eq!(queued["state"], "QUEUED");
    let receipt_id = queued["receiptId"].as_str().unwrap();
    assert!(receipt_id.starts_with("RN-"), "{receipt_id}");

    let receipt = sandbox.receipt(&token, receipt_id).await;
    assert_eq!(receipt["state"], "QUEUED");
    assert_eq!(receipt["messageId"], "rn-msg-1");
    assert_eq!(
        (receipt["reason"].clone(), receipt["ack"].clone()),
        (Value::Null, Value::Null)
    );

    sandbox.advance_clock("", 5).await;
    let delivered = sandbox.receipt(&token, receipt_id).await;
    assert_eq!(delivered["state"], "DELIVERED");
    assert_ne!(delivered["updatedAt"], receipt["updatedAt"]);

    let (status, again) = sandbox
        .dispatch(&token, "rn-msg-1", &recipient.hpii, &referral("CTRL-RN-1"))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again["receiptId"], receipt_id);
    assert_eq!(again["state"], "DELIVERED");
    assert_eq!(again["duplicate"], true);

    sandbox.advance_clock("", 10).await;
    let acknowledged = sandbox.receipt(&token, receipt_id).await;
    assert_eq!(acknowledged["state"], "ACKNOWLEDGED");
    let ack = acknowledged["ack"].as_str().unwrap();
    assert!(
        ack.contains("|RRI^I12^RRI_I12|") && ack.contains("\rMSA|AA|CTRL-RN-1\r"),
        "{ack}"
    );
    assert_eq!(sandbox.sent_messages("").await.len(), 1);
}

#[tokio::test]
async fn each_magic_recipient_behaves_as_documented_at_referralnet() {
    let sandbox = spawn_sandbox().await;
    let token = sandbox.demo_token().await;
    let payload = referral("CTRL-RN-MAGIC");

    let (status, body) = sandbox
        .dispatch(&token, "m-unknown", MAGIC_UNKNOWN_ENDPOINT, &payload)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["fault"]["faultCode"], "unknownRecipient");
    let (status, body) = sandbox
        .dispatch(&token, "m-rejects", MAGIC_REJECTS_PAYLOAD, &payload)
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["fault"]["faultCode"], "badlyFormedMsg");

    let (_, undeliverable) = sandbox
        .dispatch(&token, "m-undeliverable", MAGIC_UNDELIVERABLE, &payload)
        .await;
    let (_, silent) = sandbox
        .dispatch(&token, "m-silent", MAGIC_NEVER_ACKNOWLEDGES, &payload)
        .await;
    let (_, slow) = sandbox
        .dispatch(&token, "m-slow", MAGIC_SLOW_DELIVERY, &payload)
        .await;
    let id = |answer: &Value| answer["receiptId"].as_str().unwrap().to_owned();

    sandbox.advance_clock("", 60).await;
    let failed = sandbox.receipt(&token, &id(&undeliverable)).await;
    assert_eq!(failed["state"], "UNDELIVERABLE");
    assert_eq!(failed["reason"], "recipient endpoint unreachable");
    assert_eq!(
        sandbox.receipt(&token, &id(&silent)).await["state"],
        "DELIVERED"
    );
    assert_eq!(sandbox.receipt(&token, &id(&slow)).await["state"], "QUEUED");

    sandbox.advance_clock("", 3600).await;
    // The session expired meanwhile (15 sandbox minutes).
    let token = sandbox.demo_token().await;
    assert_eq!(
        sandbox.receipt(&token, &id(&silent)).await["ack"],
        Value::Null
    );
    assert_eq!(
        sandbox.receipt(&token, &id(&slow)).await["state"],
        "ACKNOWLEDGED"
    );
}

#[tokio::test]
async fn a_dispatch_is_refused_for_bad_headers_a_bad_body_or_an_unreachable_recipient() {
    let sandbox = spawn_sandbox().await;
    let directory = default_directory();
    let on_referralnet = practitioner_on(&directory, false, true);
    let argus_only = practitioner_on(&directory, true, false);
    let token = sandbox.demo_token().await;

    let without_message_id = sandbox
        .client
        .post(sandbox.url("/referralnet/api/dispatch"))
        .bearer_auth(&token)
        .header(CONTENT_TYPE, HL7_MEDIA_TYPE)
        .header("X-RN-Recipient", &on_referralnet.hpii)
        .body(referral("C"));
    let (status, body) = sandbox.send(without_message_id).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["fault"]["faultCode"], "badParam");

    let wrong_media_type = sandbox
        .client
        .post(sandbox.url("/referralnet/api/dispatch"))
        .bearer_auth(&token)
        .header(CONTENT_TYPE, "text/plain")
        .header("X-RN-Recipient", &on_referralnet.hpii)
        .header("X-RN-Message-Id", "m0")
        .body(referral("C"));
    let (status, body) = sandbox.send(wrong_media_type).await;
    assert_eq!(
        (status, body["fault"]["faultCode"].clone()),
        (StatusCode::UNPROCESSABLE_ENTITY, json!("badParam"))
    );

    let (status, body) = sandbox
        .dispatch(&token, "m1", &on_referralnet.hpii, "PID|1\r")
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["fault"]["faultCode"], "badlyFormedMsg");

    let (status, body) = sandbox
        .dispatch(&token, "m2", &argus_only.hpii, &referral("C"))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["fault"]["faultCode"], "unknownRecipient");

    assert!(sandbox.sent_messages("").await.is_empty());
    let (status, body) = sandbox
        .send(
            sandbox
                .get("/referralnet/api/dispatch/RN-NOSUCHRECEIPT")
                .bearer_auth(&token),
        )
        .await;
    assert_eq!(
        (status, body["fault"]["faultCode"].clone()),
        (StatusCode::NOT_FOUND, json!("notFound"))
    );
}

/// What a webhook receiver got in one POST.
#[derive(Clone, Debug)]
struct ReceivedPush {
    timestamp: String,
    signature: String,
    body: Bytes,
}

#[derive(Clone)]
struct Receiver {
    pushes: Arc<Mutex<Vec<ReceivedPush>>>,
    failures_left: Arc<AtomicUsize>,
}

/// A webhook endpoint on a free port that records every push and answers 500 to the first
/// `failures` of them.
async fn spawn_webhook_receiver(failures: usize) -> (String, Receiver) {
    async fn receive(
        State(receiver): State<Receiver>,
        headers: HeaderMap,
        body: Bytes,
    ) -> AxumStatusCode {
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|value| value.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        receiver.pushes.lock().unwrap().push(ReceivedPush {
            timestamp: header("x-rn-timestamp"),
            signature: header("x-rn-signature"),
            body,
        });
        let failing = receiver
            .failures_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                left.checked_sub(1)
            })
            .is_ok();
        if failing {
            AxumStatusCode::INTERNAL_SERVER_ERROR
        } else {
            AxumStatusCode::OK
        }
    }
    let receiver = Receiver {
        pushes: Arc::default(),
        failures_left: Arc::new(AtomicUsize::new(failures)),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/hooks/referralnet",
        listener.local_addr().unwrap()
    );
    let application = axum::Router::new()
        .route("/hooks/referralnet", post(receive))
        .with_state(receiver.clone());
    tokio::spawn(async move { axum::serve(listener, application).await });
    (url, receiver)
}

impl Receiver {
    /// Waits (up to 15 s) until at least `count` pushes arrived, and returns them all.
    async fn wait_for(&self, count: usize) -> Vec<ReceivedPush> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let pushes = self.pushes.lock().unwrap().clone();
            if pushes.len() >= count {
                return pushes;
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {count} pushes arrived",
                pushes.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn expected_signature(secret: &str, push: &ReceivedPush) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(push.timestamp.as_bytes());
    mac.update(b".");
    mac.update(&push.body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    format!("sha256={hex}")
}

#[tokio::test]
async fn referralnet_pushes_signed_receipts_to_the_webhook_for_delivered_then_acknowledged() {
    let sandbox = spawn_sandbox_allowing_private_webhooks().await;
    let directory = default_directory();
    let recipient = practitioner_on(&directory, false, true);
    let token = sandbox.demo_token().await;
    let (url, receiver) = spawn_webhook_receiver(0).await;
    let (status, webhook) = sandbox
        .send(
            sandbox
                .client
                .put(sandbox.url("/referralnet/api/webhook"))
                .bearer_auth(&token)
                .json(&json!({ "url": url })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{webhook}");
    let secret = webhook["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"));
    let (_, queued) = sandbox
        .dispatch(&token, "rn-hook-1", &recipient.hpii, &referral("CTRL-HOOK"))
        .await;
    let receipt_id = queued["receiptId"].as_str().unwrap();

    sandbox.advance_clock("", 5).await;
    let pushes = receiver.wait_for(1).await;
    sandbox.advance_clock("", 10).await;
    let pushes = {
        assert_eq!(pushes.len(), 1, "nothing is pushed twice");
        receiver.wait_for(2).await
    };

    let events: Vec<Value> = pushes
        .iter()
        .map(|push| serde_json::from_slice(&push.body).unwrap())
        .collect();
    assert_eq!(events[0]["state"], "DELIVERED");
    assert_eq!(events[1]["state"], "ACKNOWLEDGED");
    let receipt = sandbox.receipt(&token, receipt_id).await;
    for event in &events {
        assert_eq!(event["receiptId"], receipt_id);
        assert_eq!(event["messageId"], "rn-hook-1");
        assert_eq!(event["reason"], Value::Null);
        assert!(event["occurredAt"].is_string());
    }
    assert_eq!(events[1]["occurredAt"], receipt["updatedAt"]);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for push in &pushes {
        let timestamp: u64 = push.timestamp.parse().unwrap();
        assert!(timestamp.abs_diff(now) < 60, "real time: {timestamp}");
        assert_eq!(push.signature, expected_signature(&secret, push));
    }
    assert_ne!(
        pushes[0].signature,
        expected_signature("whsec_wrong", &pushes[0]),
        "the signature depends on the secret"
    );
}

#[tokio::test]
async fn a_webhook_that_fails_is_retried_until_it_answers_2xx() {
    let sandbox = spawn_sandbox_allowing_private_webhooks().await;
    let token = sandbox.demo_token().await;
    let (url, receiver) = spawn_webhook_receiver(2).await;
    sandbox
        .send(
            sandbox
                .client
                .put(sandbox.url("/referralnet/api/webhook"))
                .bearer_auth(&token)
                .json(&json!({ "url": url })),
        )
        .await;
    let (_, queued) = sandbox
        .dispatch(&token, "rn-retry", MAGIC_UNDELIVERABLE, &referral("CTRL-R"))
        .await;

    sandbox.advance_clock("", 5).await;
    let pushes = receiver.wait_for(3).await;

    let bodies: HashSet<&Bytes> = pushes.iter().map(|push| &push.body).collect();
    assert_eq!(bodies.len(), 1, "the same event three times");
    let event: Value = serde_json::from_slice(&pushes[2].body).unwrap();
    assert_eq!(event["receiptId"], queued["receiptId"]);
    assert_eq!(event["state"], "UNDELIVERABLE");
    assert_eq!(event["reason"], "recipient endpoint unreachable");
}

#[tokio::test]
async fn a_webhook_keeps_its_secret_across_puts_and_can_be_removed() {
    // gateway.example does not resolve; this test is about secrets, not addresses.
    let sandbox = spawn_sandbox_allowing_private_webhooks().await;
    let token = sandbox.demo_token().await;
    let put = |url: &str| {
        sandbox.send(
            sandbox
                .client
                .put(sandbox.url("/referralnet/api/webhook"))
                .bearer_auth(&token)
                .json(&json!({ "url": url })),
        )
    };
    let read = || sandbox.send(sandbox.get("/referralnet/api/webhook").bearer_auth(&token));

    let (status, body) = read().await;
    assert_eq!(
        (status, body["fault"]["faultCode"].clone()),
        (StatusCode::NOT_FOUND, json!("notFound"))
    );
    let (_, first) = put("https://gateway.example/hooks/a").await;
    let (_, second) = put("http://gateway.example/hooks/b").await;
    assert_eq!(second["secret"], first["secret"]);
    assert_eq!(second["url"], "http://gateway.example/hooks/b");
    assert_eq!(read().await.1, second);

    for invalid in ["ftp://gateway.example/hook", "not a url", ""] {
        let (status, body) = put(invalid).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{invalid:?}");
        assert_eq!(body["fault"]["faultCode"], "badParam");
    }

    let (status, _) = sandbox
        .send(
            sandbox
                .client
                .delete(sandbox.url("/referralnet/api/webhook"))
                .bearer_auth(&token),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(read().await.0, StatusCode::NOT_FOUND);
}

/// A sandbox started with `--allow-private-webhooks`, for webhook receivers on loopback.
async fn spawn_sandbox_allowing_private_webhooks() -> TestSandbox {
    spawn_sandbox_with(SandboxConfig {
        allow_private_webhooks: true,
        ..SandboxConfig::default()
    })
    .await
}

impl TestSandbox {
    async fn put_webhook(&self, token: &str, url: &str) -> (StatusCode, Value) {
        self.send(
            self.client
                .put(self.url("/referralnet/api/webhook"))
                .bearer_auth(token)
                .json(&json!({ "url": url })),
        )
        .await
    }
}

#[tokio::test]
async fn a_loopback_webhook_is_refused_with_a_reason_and_nothing_is_posted_to_it() {
    let sandbox = spawn_sandbox().await;
    let token = sandbox.demo_token().await;
    let (url, receiver) = spawn_webhook_receiver(0).await;

    let (status, body) = sandbox.put_webhook(&token, &url).await;

    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["fault"]["faultCode"], "badParam");
    let reason = body["fault"]["faultString"].as_str().unwrap();
    assert!(reason.contains("loopback"), "{reason}");
    assert!(reason.contains("--allow-private-webhooks"), "{reason}");
    let (status, _) = sandbox
        .send(sandbox.get("/referralnet/api/webhook").bearer_auth(&token))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "nothing was stored");
    // A dispatch runs its whole course; with no webhook stored no push is ever queued. Give
    // the 200 ms push ticker several passes after the last milestone before looking.
    let (_, queued) = sandbox
        .dispatch(
            &token,
            "rn-refused-hook",
            MAGIC_NEVER_ACKNOWLEDGES,
            &referral("CTRL-NOHOOK"),
        )
        .await;
    sandbox.advance_clock("", 60).await;
    let receipt = sandbox
        .receipt(&token, queued["receiptId"].as_str().unwrap())
        .await;
    assert_eq!(receipt["state"], "DELIVERED", "{receipt}");
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert!(
        receiver.pushes.lock().unwrap().is_empty(),
        "nothing was posted"
    );
}

#[tokio::test]
async fn non_public_webhook_addresses_are_refused_after_resolving_the_host() {
    let sandbox = spawn_sandbox().await;
    let token = sandbox.demo_token().await;
    for (url, reason) in [
        ("http://localhost:9/hook", "loopback"),
        ("http://127.0.0.1:9/hook", "loopback"),
        ("http://[::1]:9/hook", "loopback"),
        ("http://10.0.0.8/hook", "private"),
        ("http://192.168.1.20/hook", "private"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://100.64.0.1/hook", "CGNAT"),
        ("http://[fd00::1]/hook", "unique local"),
        ("http://[::ffff:127.0.0.1]/hook", "loopback"),
        ("http://0.0.0.0:9/hook", "unspecified"),
        ("http://255.255.255.255/hook", "broadcast"),
        ("http://no-such-host.invalid/hook", "does not resolve"),
    ] {
        let (status, body) = sandbox.put_webhook(&token, url).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{url}: {body}");
        let message = body["fault"]["faultString"].as_str().unwrap();
        assert!(message.contains(reason), "{url}: {message}");
    }
    let (status, _) = sandbox
        .send(sandbox.get("/referralnet/api/webhook").bearer_auth(&token))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "none of them was stored");

    // A public address is accepted (registering it makes no connection).
    let (status, body) = sandbox
        .put_webhook(&token, "https://93.184.215.14/hooks/referralnet")
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn with_allow_private_webhooks_a_loopback_webhook_receives_its_pushes() {
    let sandbox = spawn_sandbox_allowing_private_webhooks().await;
    let token = sandbox.demo_token().await;
    let (url, receiver) = spawn_webhook_receiver(0).await;

    let (status, body) = sandbox.put_webhook(&token, &url).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let localhost_url = url.replace("127.0.0.1", "localhost");
    let (status, body) = sandbox.put_webhook(&token, &localhost_url).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "a name for loopback is allowed too: {body}"
    );
    sandbox
        .dispatch(
            &token,
            "rn-allowed-hook",
            MAGIC_NEVER_ACKNOWLEDGES,
            &referral("CTRL-ALLOW"),
        )
        .await;
    sandbox.advance_clock("", 5).await;

    let pushes = receiver.wait_for(1).await;
    let event: Value = serde_json::from_slice(&pushes[0].body).unwrap();
    assert_eq!(event["messageId"], "rn-allowed-hook");
    assert_eq!(event["state"], "DELIVERED");
}

// --- Inboxes and control ---

#[tokio::test]
async fn the_argus_inbox_lists_messages_until_they_are_acknowledged() {
    let sandbox = spawn_sandbox().await;
    let mut inbox_ids = Vec::new();
    for number in 0..3 {
        let inbound = sandbox
            .inbound(
                "",
                json!({ "provider": "argus", "account": ARGUS_DEMO_USERNAME, "text": format!("letter {number}") }),
            )
            .await;
        inbox_ids.push(inbound["inboxId"].as_str().unwrap().to_owned());
    }

    let (status, first_page) = sandbox.argus_get("/argus/v1/inbox?limit=2").await;
    assert_eq!(status, StatusCode::OK, "{first_page}");
    let messages = first_page["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0]["inboxId"], inbox_ids[0].as_str());
    assert!(decode_base64(&messages[0]["payload"]).contains("letter 0"));
    assert!(luhn_valid(messages[0]["senderHpii"].as_str().unwrap()));
    assert!(
        messages[0]["senderName"]
            .as_str()
            .unwrap()
            .starts_with("Dr ")
    );
    assert!(messages[0]["receivedAt"].is_string());
    let cursor = first_page["nextCursor"].as_str().unwrap();
    let (_, second_page) = sandbox
        .argus_get(&format!("/argus/v1/inbox?after={cursor}&limit=2"))
        .await;
    assert_eq!(second_page["messages"][0]["inboxId"], inbox_ids[2].as_str());
    assert_eq!(second_page["nextCursor"], Value::Null);

    let acknowledge = |inbox_id: String| {
        sandbox.send(
            sandbox
                .post(&format!("/argus/v1/inbox/{inbox_id}/ack"), Value::Null)
                .basic_auth(ARGUS_DEMO_USERNAME, Some(ARGUS_DEMO_PASSWORD)),
        )
    };
    assert_eq!(
        acknowledge(inbox_ids[0].clone()).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        acknowledge(inbox_ids[0].clone()).await.0,
        StatusCode::NO_CONTENT,
        "idempotent"
    );
    let (status, body) = acknowledge("AIN-NOSUCHITEM".to_owned()).await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (StatusCode::NOT_FOUND, json!("notFound"))
    );

    let (_, remaining) = sandbox.argus_get("/argus/v1/inbox").await;
    let remaining: Vec<&Value> = remaining["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|message| &message["inboxId"])
        .collect();
    assert_eq!(remaining, [&json!(inbox_ids[1]), &json!(inbox_ids[2])]);
}

#[tokio::test]
async fn the_referralnet_inbox_lists_items_until_they_are_deleted() {
    let sandbox = spawn_sandbox().await;
    let token = sandbox.demo_token().await;
    let first = sandbox
        .inbound(
            "",
            json!({ "provider": "referralnet", "account": REFERRALNET_DEMO_USER_ID }),
        )
        .await;
    let second = sandbox
        .inbound(
            "",
            json!({ "provider": "referralnet", "account": REFERRALNET_DEMO_USER_ID }),
        )
        .await;
    let list = |query: &str| {
        sandbox.send(
            sandbox
                .get(&format!("/referralnet/api/inbox{query}"))
                .bearer_auth(&token),
        )
    };

    let (status, page) = list("?limit=1").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let item = &page["items"][0];
    assert_eq!(item["itemId"], first["itemId"]);
    assert_eq!(item["hl7"], first["payload"]);
    assert!(
        item["from"].is_string() && item["fromName"].is_string() && item["received"].is_string()
    );
    let cursor = page["cursor"].as_str().unwrap();
    let (_, rest) = list(&format!("?since={cursor}")).await;
    assert_eq!(rest["items"][0]["itemId"], second["itemId"]);
    assert_eq!(rest["cursor"], Value::Null);

    let item_id = first["itemId"].as_str().unwrap();
    for _ in 0..2 {
        let (status, _) = sandbox
            .send(
                sandbox
                    .client
                    .delete(sandbox.url(&format!("/referralnet/api/inbox/{item_id}")))
                    .bearer_auth(&token),
            )
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
    }
    let (_, after_delete) = list("").await;
    let items = after_delete["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["itemId"], second["itemId"]);

    // Argus's inbox is another inbox.
    let (_, argus_inbox) = sandbox.argus_get("/argus/v1/inbox").await;
    assert_eq!(argus_inbox["messages"], json!([]));
}

#[tokio::test]
async fn an_inbound_referral_is_a_ref_i12_with_prd_segments_and_escaped_text() {
    let sandbox = spawn_sandbox().await;
    let directory = default_directory();
    let sender = practitioner_on(&directory, true, true);

    let inbound = sandbox
        .inbound(
            "",
            json!({
                "provider": "argus",
                "account": ARGUS_DEMO_USERNAME,
                "fromHpii": sender.hpii,
                "recipientHpii": "8003619900015717",
                "recipientName": "Dr Demo | Argus",
                "text": "Line one & more\nA|B^C~D\\E",
            }),
        )
        .await;

    let payload = inbound["payload"].as_str().unwrap();
    let segments: Vec<&str> = payload.trim_end_matches('\r').split('\r').collect();
    assert!(segments[0].starts_with("MSH|^~\\&|"), "{payload}");
    assert!(segments[0].contains("|REF^I12^REF_I12|"), "{payload}");
    let segment = |name: &str| -> Vec<&str> {
        segments
            .iter()
            .copied()
            .filter(|segment| segment.starts_with(&format!("{name}|")))
            .collect()
    };
    assert_eq!(segment("PID").len(), 1);
    let providers = segment("PRD");
    assert_eq!(providers.len(), 2);
    assert!(providers[0].starts_with(&format!(
        "PRD|RP|{}^{}^^^Dr|",
        sender.family_name, sender.given_name
    )));
    assert!(providers[0].contains(&sender.hpii));
    assert!(
        providers[1].starts_with("PRD|RT|Dr Demo \\F\\ Argus|"),
        "{}",
        providers[1]
    );
    assert!(providers[1].contains("8003619900015717"));
    let observations = segment("OBX").join("\r");
    assert!(
        observations.contains("Line one \\T\\ more\\.br\\A\\F\\B\\S\\C\\R\\D\\E\\E"),
        "{observations}"
    );

    let (_, inbox) = sandbox.argus_get("/argus/v1/inbox").await;
    let message = &inbox["messages"][0];
    assert_eq!(message["inboxId"], inbound["inboxId"]);
    assert_eq!(message["senderHpii"], sender.hpii.as_str());
    assert_eq!(decode_base64(&message["payload"]), payload);

    let refused = [
        (
            json!({ "provider": "argus", "account": "nobody.here" }),
            StatusCode::NOT_FOUND,
        ),
        (
            json!({ "provider": "argus", "account": ARGUS_DEMO_USERNAME, "fromHpii": practitioner_on(&directory, false, true).hpii }),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({ "provider": "fax", "account": ARGUS_DEMO_USERNAME }),
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (request, expected_status) in refused {
        let (status, body) = sandbox
            .send(sandbox.post("/_sandbox/inbound", request.clone()))
            .await;
        assert_eq!(status, expected_status, "{request}: {body}");
        assert!(body["error"].is_string());
    }
}

#[tokio::test]
async fn the_control_api_shows_each_sent_payload_exactly_as_received() {
    let sandbox = spawn_sandbox().await;
    let directory = default_directory();
    let recipient = practitioner_on(&directory, true, true);
    let token = sandbox.demo_token().await;
    let argus_payload = format!("{}NTE|1||ünïcödé \\T\\ text\r\n", referral("CTRL-EXACT"));
    let referralnet_payload = referral("CTRL-EXACT-RN");

    let (_, sent) = sandbox
        .argus_send("", "exact-1", &recipient.hpii, &argus_payload)
        .await;
    let (_, dispatched) = sandbox
        .dispatch(&token, "exact-2", &recipient.hpii, &referralnet_payload)
        .await;

    let messages = sandbox.sent_messages("").await;
    assert_eq!(messages.len(), 2);
    assert_eq!(
        messages[0],
        json!({
            "provider": "argus",
            "account": ARGUS_DEMO_USERNAME,
            "id": sent["trackingId"],
            "clientMessageId": "exact-1",
            "recipientHpii": recipient.hpii,
            "status": "ACCEPTED",
            "payload": argus_payload,
            "receivedAt": messages[0]["receivedAt"],
        })
    );
    assert!(messages[0]["receivedAt"].is_string());
    assert_eq!(messages[1]["provider"], "referralnet");
    assert_eq!(messages[1]["account"], REFERRALNET_DEMO_USER_ID);
    assert_eq!(messages[1]["id"], dispatched["receiptId"]);
    assert_eq!(messages[1]["status"], "QUEUED");
    assert_eq!(messages[1]["payload"], referralnet_payload.as_str());
}

#[tokio::test]
async fn pending_and_rejected_accounts_cannot_use_messaging() {
    let sandbox = spawn_sandbox().await;
    sandbox
        .register_argus("", "pending.practice", "SANDBOX-PROMO")
        .await;
    sandbox
        .register_argus("", "rejected.practice", "SANDBOX-REJECT")
        .await;
    let (status, _) = sandbox
        .send(sandbox.post(
            "/_sandbox/registrations/argus/rejected.practice/reject",
            Value::Null,
        ))
        .await;
    assert_eq!(status, StatusCode::OK);

    for username in ["pending.practice", "rejected.practice"] {
        let as_user = |request: reqwest::RequestBuilder| {
            sandbox.send(request.basic_auth(username, Some(NEW_PASSWORD)))
        };
        let (status, body) = as_user(sandbox.get("/argus/v1/directory")).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{username}: {body}");
        assert_eq!(body["error"]["code"], "notAuthorised");
        let (status, _) = as_user(sandbox.post(
            "/argus/v1/messages",
            json!({ "clientMessageId": "x", "recipientHpii": MAGIC_SLOW_DELIVERY, "payload": STANDARD.encode(referral("C")) }),
        ))
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        let (status, _) = as_user(sandbox.get("/argus/v1/inbox")).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
    }

    sandbox
        .enrol_referralnet("", "pending.clinic", "SANDBOX-PROMO")
        .await;
    let token = sandbox
        .referralnet_token("", "pending.clinic", NEW_PASSWORD)
        .await;
    let (status, body) = sandbox
        .dispatch(&token, "x", MAGIC_SLOW_DELIVERY, &referral("C"))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["fault"]["faultCode"], "notAuthorised");
    let (status, _) = sandbox
        .send(
            sandbox
                .get("/referralnet/api/providers")
                .bearer_auth(&token),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(sandbox.sent_messages("").await.is_empty());
}

#[tokio::test]
async fn namespaces_do_not_see_each_others_messages_and_reset_clears_them() {
    let sandbox = spawn_sandbox().await;
    let directory = default_directory();
    let recipient = practitioner_on(&directory, true, false);
    let (status, sent) = sandbox
        .argus_send("/ns/team-a", "shared-id", &recipient.hpii, &referral("C-A"))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let tracking_id = sent["trackingId"].as_str().unwrap();
    sandbox
        .inbound(
            "/ns/team-a",
            json!({ "provider": "argus", "account": ARGUS_DEMO_USERNAME }),
        )
        .await;

    assert!(sandbox.sent_messages("/ns/team-b").await.is_empty());
    let (status, _) = sandbox
        .argus_get(&format!("/ns/team-b/argus/v1/messages/{tracking_id}"))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, inbox) = sandbox.argus_get("/ns/team-b/argus/v1/inbox").await;
    assert_eq!(inbox["messages"], json!([]));
    let (status, other) = sandbox
        .argus_send("/ns/team-b", "shared-id", &recipient.hpii, &referral("C-B"))
        .await;
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "the same id is new in another namespace"
    );
    assert_ne!(other["trackingId"], sent["trackingId"]);

    let (status, _) = sandbox
        .send(sandbox.post("/ns/team-a/_sandbox/reset", Value::Null))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(sandbox.sent_messages("/ns/team-a").await.is_empty());
    let (_, inbox) = sandbox.argus_get("/ns/team-a/argus/v1/inbox").await;
    assert_eq!(inbox["messages"], json!([]));
    assert_eq!(sandbox.sent_messages("/ns/team-b").await.len(), 1);
}

#[tokio::test]
async fn faults_hit_the_messaging_routes_and_a_faulted_send_stores_nothing() {
    let sandbox = spawn_sandbox().await;
    let directory = default_directory();
    let recipient = practitioner_on(&directory, true, true);
    let token = sandbox.demo_token().await;
    for (provider, route, kind) in [
        ("argus", "messages", "server_error"),
        ("argus", "directory", "rate_limited"),
        ("argus", "inbox", "malformed"),
        ("referralnet", "dispatch", "server_error"),
        ("referralnet", "providers", "rate_limited"),
        ("referralnet", "inbox", "server_error"),
    ] {
        sandbox
            .add_fault(json!({ "provider": provider, "route": route, "kind": kind, "count": 1 }))
            .await;
    }

    let (status, body) = sandbox
        .argus_send("", "faulted", &recipient.hpii, &referral("C"))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["error"]["code"], "serviceTemporaryUnavailable");
    let (status, _) = sandbox.argus_get("/argus/v1/directory").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let response = sandbox
        .get("/argus/v1/inbox")
        .basic_auth(ARGUS_DEMO_USERNAME, Some(ARGUS_DEMO_PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let text = response.text().await.unwrap();
    assert!(serde_json::from_str::<Value>(&text).is_err(), "{text}");
    let (status, body) = sandbox
        .dispatch(&token, "faulted", &recipient.hpii, &referral("C"))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["fault"]["faultCode"], "serviceTemporaryUnavailable");
    let (status, _) = sandbox
        .send(
            sandbox
                .get("/referralnet/api/providers")
                .bearer_auth(&token),
        )
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let (status, _) = sandbox
        .send(sandbox.get("/referralnet/api/inbox").bearer_auth(&token))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);

    assert!(
        sandbox.sent_messages("").await.is_empty(),
        "faulted sends store nothing"
    );
    let (_, remaining) = sandbox.send(sandbox.get("/_sandbox/faults")).await;
    assert_eq!(remaining, json!([]));
    let (status, _) = sandbox
        .argus_send("", "faulted", &recipient.hpii, &referral("C"))
        .await;
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "the id was not bound by the faulted call"
    );

    for impossible in [
        json!({ "provider": "referralnet", "route": "messages", "kind": "timeout", "count": 1 }),
        json!({ "provider": "argus", "route": "dispatch", "kind": "timeout", "count": 1 }),
        json!({ "provider": "payments", "route": "inbox", "kind": "timeout", "count": 1 }),
    ] {
        let (status, _) = sandbox
            .send(sandbox.post("/_sandbox/faults", impossible.clone()))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{impossible}");
    }
}
