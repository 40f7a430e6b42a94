//! Secure messaging: notes, directory, send, deliver, refund — gateway and sandbox over HTTP.

use std::time::Duration;

use serde_json::{Value, json};
use smd_sandbox::directory::{MAGIC_REJECTS_PAYLOAD, MAGIC_UNKNOWN_ENDPOINT};

use crate::helpers::*;

const SEND: &str = "mutation($input: SendSecureMessageInput!) { sendSecureMessage(input: $input) { message { id status provider counterpartId counterpartName } creditsRemaining } }";

fn key() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Dr Chen's HPI-I in [`TestApp::practice`].
fn chen_hpii() -> String {
    valid_hpii("800361222000001")
}

struct Practice {
    chen: String,
    note_id: String,
}

impl TestApp {
    /// A practitioner linked to both demo accounts, with their HPI-I ([`chen_hpii`]), 100
    /// credits and a three-section note.
    async fn practice(&self, group: &str) -> Practice {
        let practice = self.practice_without_hpii(group).await;
        let set = self
            .gql(
                Some(&practice.chen),
                "mutation($h: String!) { setMyHpii(hpii: $h) }",
                json!({"h": chen_hpii()}),
            )
            .await;
        assert!(set["errors"].is_null(), "{set}");
        practice
    }

    /// [`Self::practice`] before Dr Chen has set an HPI-I.
    async fn practice_without_hpii(&self, group: &str) -> Practice {
        let chen = practitioner("dr-chen", group);
        let linked = self
            .link(&chen, "linkArgus", ARGUS_USER, ARGUS_PASSWORD)
            .await;
        assert_eq!(
            linked["data"]["linkArgus"]["individualStatus"], "ACTIVE",
            "{linked}"
        );
        self.link(&chen, "linkReferralNet", RN_USER, RN_PASSWORD)
            .await;
        self.gql(
            Some(&chen),
            "mutation { setPaymentMethod(input: {token: \"pm_sandbox_approve\"}) { last4 } }",
            json!({}),
        )
        .await;
        let bought = self
            .gql(
                Some(&chen),
                "mutation($key: String!) { purchaseCredits(input: {packId: \"pack-100\", idempotencyKey: $key}) { balance } }",
                json!({"key": key()}),
            )
            .await;
        assert_eq!(
            bought["data"]["purchaseCredits"]["balance"], 100,
            "{bought}"
        );
        let patient = self
            .gql(
                Some(&chen),
                "mutation { createPatient(input: {givenName: \"Ada\", familyName: \"O'Brien\", dateOfBirth: \"1961-03-04\"}) { id } }",
                json!({}),
            )
            .await;
        let patient_id = patient["data"]["createPatient"]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("{patient}"))
            .to_owned();
        let note = self
            .gql(
                Some(&chen),
                "mutation($input: CreateClinicalNoteInput!) { createClinicalNote(input: $input) { id sections { key } } }",
                json!({"input": {"patientId": patient_id, "title": "Chest pain review", "sections": [
                    {"key": "history", "title": "History", "body": "Chest pain on exertion | 3 weeks ^ worse ~ at night\nNo syncope & no palpitations \\ none"},
                    {"key": "medications", "title": "Medications", "body": "Aspirin 100 mg daily"},
                    {"key": "private", "title": "Private notes", "body": "SECRET-NOT-FOR-SHARING"}
                ]}}),
            )
            .await;
        let note_id = note["data"]["createClinicalNote"]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("{note}"))
            .to_owned();
        Practice { chen, note_id }
    }

    async fn search(&self, token: &str, query: &str) -> Value {
        self.gql(
            Some(token),
            "query($q: String!) { searchPractitioners(query: $q, first: 50) { edges { node { id name specialty providers } } warnings pageInfo { hasNextPage } } }",
            json!({"q": query}),
        )
        .await
    }

    /// A directory practitioner reached exactly by `providers`.
    async fn recipient_on(&self, token: &str, providers: &[&str]) -> String {
        let result = self.search(token, "").await;
        let edges = result["data"]["searchPractitioners"]["edges"]
            .as_array()
            .unwrap_or_else(|| panic!("{result}"))
            .clone();
        edges
            .iter()
            .find(|edge| {
                let on: Vec<&str> = edge["node"]["providers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p.as_str().unwrap())
                    .collect();
                on == providers && !edge["node"]["name"].as_str().unwrap().contains("Test ")
            })
            .map(|edge| edge["node"]["id"].as_str().unwrap().to_owned())
            .unwrap_or_else(|| panic!("no practitioner on exactly {providers:?} in {result}"))
    }

    async fn send(
        &self,
        token: &str,
        note_id: &str,
        sections: &[&str],
        recipient: &str,
        provider: Option<&str>,
        key: &str,
    ) -> Value {
        self.gql(
            Some(token),
            SEND,
            json!({"input": {"noteId": note_id, "sectionKeys": sections, "recipientId": recipient, "provider": provider, "idempotencyKey": key}}),
        )
        .await
    }

    async fn message_status(&self, token: &str, id: &str) -> String {
        let response = self
            .gql(
                Some(token),
                "query($id: ID!) { message(id: $id) { status } }",
                json!({"id": id}),
            )
            .await;
        response["data"]["message"]["status"]
            .as_str()
            .unwrap_or_else(|| panic!("{response}"))
            .to_owned()
    }

    async fn sandbox_messages(&self) -> Vec<Value> {
        self.sandbox_control(reqwest::Method::GET, "/_sandbox/messages", None)
            .await
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    async fn wait_for_status(&self, token: &str, id: &str, wanted: &str) {
        eventually(Duration::from_secs(15), || async {
            (self.message_status(token, id).await == wanted).then_some(())
        })
        .await;
    }
}

#[tokio::test]
async fn a_note_goes_from_a_fresh_practice_to_acknowledged_with_only_the_chosen_sections() {
    let app = spawn_app().await;
    let Practice { chen, note_id } = app.practice("clinic-1").await;
    let recipient = app.recipient_on(&chen, &["ARGUS"]).await;

    let sent = app
        .send(
            &chen,
            &note_id,
            &["history", "medications"],
            &recipient,
            Some("ARGUS"),
            &key(),
        )
        .await;

    let payload = &sent["data"]["sendSecureMessage"];
    assert_eq!(payload["message"]["status"], "QUEUED", "{sent}");
    assert_eq!(payload["creditsRemaining"], 97);
    let id = payload["message"]["id"].as_str().unwrap().to_owned();
    app.wait_for_status(&chen, &id, "SENT").await;
    app.advance_sandbox_clock(6).await;
    app.wait_for_status(&chen, &id, "DELIVERED").await;
    app.advance_sandbox_clock(11).await;
    app.wait_for_status(&chen, &id, "ACKNOWLEDGED").await;

    let received = app.sandbox_messages().await;
    assert_eq!(received.len(), 1, "exactly one copy reached the provider");
    let hl7_text = received[0]["payload"].as_str().unwrap();
    let parsed = smd_gateway::domain::hl7::parse(hl7_text).expect("the payload parses back");
    let sections = parsed.referral_sections();
    let keys: Vec<&str> = sections
        .iter()
        .map(|section| section.key.as_str())
        .collect();
    assert_eq!(keys, ["history", "medications"]);
    assert_eq!(
        sections[0].body,
        "Chest pain on exertion | 3 weeks ^ worse ~ at night\nNo syncope & no palpitations \\ none"
    );
    assert!(
        !hl7_text.contains("SECRET-NOT-FOR-SHARING"),
        "an unchosen section never leaves the gateway"
    );
    assert_eq!(parsed.message_type().as_deref(), Some("REF^I12"));
}

#[tokio::test]
async fn an_administrator_cannot_send_a_secure_message() {
    let app = spawn_app().await;
    let Practice { chen: _, note_id } = app.practice("clinic-1").await;
    let admin = administrator("manager", "clinic-1");

    let response = app
        .send(
            &admin,
            &note_id,
            &["history"],
            MAGIC_UNKNOWN_ENDPOINT,
            None,
            &key(),
        )
        .await;

    assert_eq!(error_code(&response), Some("FORBIDDEN"), "{response}");
    assert!(
        response["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("practitioners")
    );
    assert!(app.sandbox_messages().await.is_empty());
}

#[tokio::test]
async fn sending_needs_the_callers_own_active_connection_and_charges_nothing_otherwise() {
    let app = spawn_app().await;
    let Practice { chen, note_id: _ } = app.practice("clinic-1").await;
    let recipient = app.recipient_on(&chen, &["ARGUS"]).await;
    let patel = practitioner("dr-patel", "clinic-1");
    let patient = app.gql(Some(&patel), "mutation { createPatient(input: {givenName: \"B\", familyName: \"C\", dateOfBirth: \"1990-01-01\"}) { id } }", json!({})).await;
    let note = app
        .gql(
            Some(&patel),
            "mutation($p: ID!) { createClinicalNote(input: {patientId: $p, title: \"t\", sections: [{key: \"a\", title: \"A\", body: \"b\"}]}) { id } }",
            json!({"p": patient["data"]["createPatient"]["id"]}),
        )
        .await;
    let note_id = note["data"]["createClinicalNote"]["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let response = app
        .send(&patel, &note_id, &["a"], &recipient, Some("ARGUS"), &key())
        .await;

    assert_eq!(
        error_code(&response),
        Some("INTEGRATION_NOT_ACTIVE"),
        "{response}"
    );
    assert_eq!(app.count_rows("messages").await, 0);
}

#[tokio::test]
async fn a_recipient_not_on_the_chosen_provider_is_refused_naming_the_providers_that_reach_them() {
    let app = spawn_app().await;
    let Practice { chen, note_id } = app.practice("clinic-1").await;
    let referralnet_only = app.recipient_on(&chen, &["REFERRALNET"]).await;

    let response = app
        .send(
            &chen,
            &note_id,
            &["history"],
            &referralnet_only,
            Some("ARGUS"),
            &key(),
        )
        .await;

    assert_eq!(
        error_code(&response),
        Some("RECIPIENT_NOT_REACHABLE"),
        "{response}"
    );
    assert!(
        response["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("ReferralNet")
    );
    assert_eq!(app.count_rows("messages").await, 0);
    let credits = app
        .gql(Some(&chen), "{ credits { balance } }", json!({}))
        .await;
    assert_eq!(credits["data"]["credits"]["balance"], 100, "no debit");

    // Without a provider, the gateway routes through the one that reaches them.
    let routed = app
        .send(
            &chen,
            &note_id,
            &["history"],
            &referralnet_only,
            None,
            &key(),
        )
        .await;
    assert_eq!(
        routed["data"]["sendSecureMessage"]["message"]["provider"], "REFERRALNET",
        "{routed}"
    );
}

#[tokio::test]
async fn unknown_or_no_sections_are_bad_user_input_and_charge_nothing() {
    let app = spawn_app().await;
    let Practice { chen, note_id } = app.practice("clinic-1").await;
    let recipient = app.recipient_on(&chen, &["ARGUS"]).await;

    let none = app
        .send(&chen, &note_id, &[], &recipient, None, &key())
        .await;
    let unknown = app
        .send(
            &chen,
            &note_id,
            &["history", "nope"],
            &recipient,
            None,
            &key(),
        )
        .await;

    assert_eq!(error_code(&none), Some("BAD_USER_INPUT"), "{none}");
    assert_eq!(error_code(&unknown), Some("BAD_USER_INPUT"), "{unknown}");
    assert!(
        unknown["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("nope")
    );
    assert_eq!(app.count_rows("messages").await, 0);
}

#[tokio::test]
async fn replaying_a_send_returns_the_same_message_and_charges_once() {
    let app = spawn_app().await;
    let Practice { chen, note_id } = app.practice("clinic-1").await;
    let recipient = app.recipient_on(&chen, &["ARGUS"]).await;
    let key = key();

    let responses = futures::future::join_all(
        (0..5).map(|_| app.send(&chen, &note_id, &["history"], &recipient, None, &key)),
    )
    .await;

    let ids: std::collections::HashSet<&str> = responses
        .iter()
        .map(|r| {
            r["data"]["sendSecureMessage"]["message"]["id"]
                .as_str()
                .unwrap_or_else(|| panic!("{r}"))
        })
        .collect();
    assert_eq!(ids.len(), 1);
    let credits = app
        .gql(Some(&chen), "{ credits { balance } }", json!({}))
        .await;
    assert_eq!(credits["data"]["credits"]["balance"], 97);
    let id = ids.into_iter().next().unwrap().to_owned();
    app.wait_for_status(&chen, &id, "SENT").await;
    assert_eq!(app.sandbox_messages().await.len(), 1);
    let other = app
        .send(&chen, &note_id, &["medications"], &recipient, None, &key)
        .await;
    assert_eq!(error_code(&other), Some("CONFLICT"), "{other}");
}

#[tokio::test]
async fn short_of_credits_is_refused_unless_buying_at_send_time() {
    let app = spawn_app().await;
    let Practice { chen, note_id } = app.practice("clinic-1").await;
    let recipient = app.recipient_on(&chen, &["ARGUS"]).await;
    let patel = practitioner("dr-patel", "clinic-1");
    app.gql(Some(&patel), "{ me { id } }", json!({})).await;
    app.gql(
        Some(&chen),
        "mutation($key: String!) { transferCredits(input: {fromPractitionerId: \"dr-chen\", toPractitionerId: \"dr-patel\", credits: 99, idempotencyKey: $key}) { fromBalance } }",
        json!({"key": key()}),
    )
    .await;

    let refused = app
        .send(&chen, &note_id, &["history"], &recipient, None, &key())
        .await;
    assert_eq!(
        error_code(&refused),
        Some("INSUFFICIENT_CREDITS"),
        "{refused}"
    );
    assert_eq!(app.count_rows("messages").await, 0);

    let bought = app
        .gql(
            Some(&chen),
            SEND,
            json!({"input": {"noteId": note_id, "sectionKeys": ["history"], "recipientId": recipient, "idempotencyKey": key(), "topUpIfShort": true}}),
        )
        .await;
    assert_eq!(
        bought["data"]["sendSecureMessage"]["creditsRemaining"], 98,
        "1 + 100 bought − 3: {bought}"
    );
}

#[tokio::test]
async fn transient_provider_faults_are_retried_and_deliver_exactly_one_copy() {
    let app = spawn_app().await;
    let Practice { chen, note_id } = app.practice("clinic-1").await;
    let recipient = app.recipient_on(&chen, &["ARGUS"]).await;
    app.inject_fault("argus", "messages", "timeout", 1, json!({"holdSeconds": 3}))
        .await;
    app.inject_fault("argus", "messages", "server_error", 2, json!({}))
        .await;
    app.inject_fault(
        "argus",
        "messages",
        "rate_limited",
        1,
        json!({"retryAfterSeconds": 1}),
    )
    .await;

    let sent = app
        .send(
            &chen,
            &note_id,
            &["history"],
            &recipient,
            Some("ARGUS"),
            &key(),
        )
        .await;
    let id = sent["data"]["sendSecureMessage"]["message"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{sent}"))
        .to_owned();

    app.wait_for_status(&chen, &id, "SENT").await;
    assert_eq!(app.sandbox_messages().await.len(), 1);
}

#[tokio::test]
async fn a_message_the_provider_refuses_fails_and_is_refunded() {
    let app = spawn_app().await;
    let Practice { chen, note_id } = app.practice("clinic-1").await;

    for magic in [MAGIC_UNKNOWN_ENDPOINT, MAGIC_REJECTS_PAYLOAD] {
        let sent = app
            .send(&chen, &note_id, &["history"], magic, Some("ARGUS"), &key())
            .await;
        let id = sent["data"]["sendSecureMessage"]["message"]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("{sent}"))
            .to_owned();
        app.wait_for_status(&chen, &id, "FAILED").await;
        let message = app
            .gql(
                Some(&chen),
                "query($id: ID!) { message(id: $id) { failureReason refunded } }",
                json!({"id": id}),
            )
            .await;
        assert_eq!(message["data"]["message"]["refunded"], true, "{message}");
    }
    let credits = app
        .gql(
            Some(&chen),
            "{ credits { balance ledger(first: 10) { edges { node { kind } } } } }",
            json!({}),
        )
        .await;
    assert_eq!(credits["data"]["credits"]["balance"], 100, "{credits}");
}

#[tokio::test]
async fn another_group_sees_none_of_the_notes_or_messages() {
    let app = spawn_app().await;
    let Practice { chen, note_id } = app.practice("clinic-1").await;
    let recipient = app.recipient_on(&chen, &["ARGUS"]).await;
    let sent = app
        .send(&chen, &note_id, &["history"], &recipient, None, &key())
        .await;
    let id = sent["data"]["sendSecureMessage"]["message"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let outsider = practitioner("dr-chen", "clinic-2");

    let note = app
        .gql(
            Some(&outsider),
            "query($id: ID!) { clinicalNote(id: $id) { title } }",
            json!({"id": note_id}),
        )
        .await;
    let message = app
        .gql(
            Some(&outsider),
            "query($id: ID!) { message(id: $id) { status } }",
            json!({"id": id}),
        )
        .await;
    let list = app
        .gql(
            Some(&outsider),
            "{ messages { edges { node { id } } } clinicalNotes { edges { node { id } } } }",
            json!({}),
        )
        .await;

    assert_eq!(error_code(&note), Some("NOT_FOUND"));
    assert_eq!(error_code(&message), Some("NOT_FOUND"));
    assert_eq!(list["data"]["messages"]["edges"], json!([]));
    assert_eq!(list["data"]["clinicalNotes"]["edges"], json!([]));
}

#[tokio::test]
async fn clinical_content_is_not_readable_in_the_database_file() {
    let app = spawn_app().await;
    let Some(path) = app.sqlite_path.clone() else {
        return;
    };
    let Practice { chen, note_id } = app.practice("clinic-1").await;
    let recipient = app.recipient_on(&chen, &["ARGUS"]).await;
    app.send(
        &chen,
        &note_id,
        &["history", "private"],
        &recipient,
        None,
        &key(),
    )
    .await;

    let mut bytes = Vec::new();
    for suffix in ["", "-wal"] {
        if let Ok(content) = std::fs::read(format!("{}{suffix}", path.display())) {
            bytes.extend(content);
        }
    }
    let haystack = String::from_utf8_lossy(&bytes);
    for secret in ["SECRET-NOT-FOR-SHARING", "Aspirin", "O'Brien", "1961"] {
        assert!(!haystack.contains(secret), "{secret} is stored in clear");
    }
}

#[tokio::test]
async fn an_inbound_message_is_stored_for_its_addressee_acknowledged_after_and_costs_nothing() {
    let app = spawn_app().await;
    let Practice { chen, note_id: _ } = app.practice("clinic-1").await;
    let patel = practitioner("dr-patel", "clinic-1");
    app.link(&patel, "linkArgus", ARGUS_USER, ARGUS_PASSWORD)
        .await;
    let patel_hpii = valid_hpii("800361555000111");
    let set = app
        .gql(
            Some(&patel),
            "mutation($h: String!) { setMyHpii(hpii: $h) }",
            json!({"h": patel_hpii}),
        )
        .await;
    assert_eq!(set["data"]["setMyHpii"], true, "{set}");
    // The first acknowledgement fails: the message is listed again, and must be stored once.
    app.inject_fault("argus", "inbox", "server_error", 1, json!({}))
        .await;

    app.sandbox_control(
        reqwest::Method::POST,
        "/_sandbox/inbound",
        Some(json!({"provider": "argus", "account": ARGUS_USER, "recipientHpii": patel_hpii, "text": "Thanks | see attached ^ results"})),
    )
    .await;

    let query = "{ messages(direction: INBOUND) { edges { node { id status creditsCharged counterpartName } } } }";
    let inbound = eventually(Duration::from_secs(15), || async {
        let response = app.gql(Some(&patel), query, json!({})).await;
        let edges = response["data"]["messages"]["edges"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        (!edges.is_empty()).then_some(edges)
    })
    .await;
    assert_eq!(inbound.len(), 1);
    assert_eq!(inbound[0]["node"]["creditsCharged"], 0);
    // The sandbox's inbox empties only once the gateway has stored and acknowledged it.
    eventually(Duration::from_secs(15), || async {
        let listed = app
            .client
            .get(format!("{}/argus/v1/inbox", app.sandbox.base_url()))
            .basic_auth(ARGUS_USER, Some(ARGUS_PASSWORD))
            .send()
            .await
            .ok()?
            .json::<Value>()
            .await
            .ok()?;
        listed["messages"]
            .as_array()
            .is_some_and(Vec::is_empty)
            .then_some(())
    })
    .await;
    assert_eq!(
        app.gql(Some(&patel), query, json!({})).await["data"]["messages"]["edges"]
            .as_array()
            .unwrap()
            .len(),
        1,
        "stored once"
    );
    let mine = app.gql(Some(&chen), query, json!({})).await;
    assert_eq!(
        mine["data"]["messages"]["edges"],
        json!([]),
        "addressed to Dr Patel, not Dr Chen"
    );
    let id = inbound[0]["node"]["id"].as_str().unwrap();
    let read = app
        .gql(
            Some(&patel),
            "query($id: ID!) { message(id: $id) { sections { body } } }",
            json!({"id": id}),
        )
        .await;
    assert!(
        read.to_string().contains("Thanks | see attached ^ results"),
        "{read}"
    );
    let acknowledged = app
        .gql(
            Some(&patel),
            "mutation($id: ID!) { acknowledgeMessage(id: $id) { status } }",
            json!({"id": id}),
        )
        .await;
    assert_eq!(
        acknowledged["data"]["acknowledgeMessage"]["status"], "ACKNOWLEDGED",
        "{acknowledged}"
    );
    let credits = app
        .gql(Some(&patel), "{ credits { balance } }", json!({}))
        .await;
    assert_eq!(
        credits["data"]["credits"]["balance"], 0,
        "receiving is free"
    );
}

#[tokio::test]
async fn pushed_receipts_are_verified_and_forged_or_stale_ones_are_rejected() {
    use hmac::{Hmac, Mac};
    let app = spawn_app().await;
    let Practice { chen, note_id } = app.practice("clinic-1").await;
    let recipient = app.recipient_on(&chen, &["REFERRALNET"]).await;
    let sent = app
        .send(
            &chen,
            &note_id,
            &["history"],
            &recipient,
            Some("REFERRALNET"),
            &key(),
        )
        .await;
    let id = sent["data"]["sendSecureMessage"]["message"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{sent}"))
        .to_owned();
    app.wait_for_status(&chen, &id, "SENT").await;
    // The gateway registered its webhook with ReferralNet; read it (and its secret) as the provider would.
    let session: Value = app
        .client
        .post(format!(
            "{}/referralnet/api/sessions",
            app.sandbox.base_url()
        ))
        .json(&json!({"userId": RN_USER, "password": RN_PASSWORD}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = session["sessionToken"].as_str().unwrap().to_owned();
    let webhook = eventually(Duration::from_secs(10), || async {
        let response = app
            .client
            .get(format!(
                "{}/referralnet/api/webhook",
                app.sandbox.base_url()
            ))
            .bearer_auth(&token)
            .send()
            .await
            .ok()?;
        if !response.status().is_success() {
            return None;
        }
        response.json::<Value>().await.ok()
    })
    .await;
    let url = webhook["url"].as_str().unwrap().to_owned();
    let secret = webhook["secret"].as_str().unwrap().to_owned();
    assert!(url.starts_with(&app.base_url), "{url}");
    let body = json!({"receiptId": "RN-x", "messageId": id, "state": "ACKNOWLEDGED", "reason": null, "occurredAt": "2026-11-24T00:00:00Z"}).to_string();
    let sign = |timestamp: i64| {
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{timestamp}.{body}").as_bytes());
        let bytes = mac.finalize().into_bytes();
        format!(
            "sha256={}",
            bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
        )
    };
    let push = |timestamp: i64, signature: String| {
        app.client
            .post(&url)
            .header("X-RN-Timestamp", timestamp.to_string())
            .header("X-RN-Signature", signature)
            .header("Content-Type", "application/json")
            .body(body.clone())
            .send()
    };
    let now = chrono::Utc::now().timestamp();

    let forged = push(now, format!("sha256={}", "ab".repeat(32)))
        .await
        .unwrap();
    assert_eq!(forged.status(), 401);
    let stale = push(now - 3600, sign(now - 3600)).await.unwrap();
    assert_eq!(stale.status(), 401, "a replay of an old receipt is refused");
    assert_ne!(app.message_status(&chen, &id).await, "ACKNOWLEDGED");

    let genuine = push(now, sign(now)).await.unwrap();
    assert_eq!(genuine.status(), 204);
    assert_eq!(app.message_status(&chen, &id).await, "ACKNOWLEDGED");
    let again = push(now, sign(now)).await.unwrap();
    assert_eq!(again.status(), 204, "a duplicate is harmless");
    assert_eq!(app.message_status(&chen, &id).await, "ACKNOWLEDGED");
}

#[tokio::test]
async fn a_crash_after_the_provider_accepted_delivers_each_message_exactly_once_after_restart() {
    let app = spawn_app_with(Options {
        fail_after_send: true,
        ..Options::default()
    })
    .await;
    let Practice { chen, note_id } = app.practice("clinic-1").await;
    let recipient = app.recipient_on(&chen, &["ARGUS"]).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let sent = app
            .send(
                &chen,
                &note_id,
                &["history"],
                &recipient,
                Some("ARGUS"),
                &key(),
            )
            .await;
        ids.push(
            sent["data"]["sendSecureMessage"]["message"]["id"]
                .as_str()
                .unwrap_or_else(|| panic!("{sent}"))
                .to_owned(),
        );
    }
    // The provider accepted all three, but the gateway "crashed" before recording it.
    eventually(Duration::from_secs(15), || async {
        (app.sandbox_messages().await.len() == 3).then_some(())
    })
    .await;
    for id in &ids {
        assert_eq!(app.message_status(&chen, id).await, "QUEUED");
    }
    app.stop().await;

    let restarted = app
        .spawn_second_gateway_with(|settings| settings.messaging.fail_after_send = false)
        .await;
    // The stopped node's claim on each message (its lease, a few seconds) must run out before
    // the new node may take the message over, so allow for it on a loaded machine.
    for id in &ids {
        eventually(Duration::from_secs(45), || async {
            (restarted.message_status(&chen, id).await == "SENT").then_some(())
        })
        .await;
    }
    restarted.advance_sandbox_clock(20).await;
    for id in &ids {
        restarted.wait_for_status(&chen, id, "ACKNOWLEDGED").await;
    }
    assert_eq!(
        restarted.sandbox_messages().await.len(),
        3,
        "re-sent with the same ids: no second copies"
    );
    let credits = restarted
        .gql(Some(&chen), "{ credits { balance } }", json!({}))
        .await;
    assert_eq!(
        credits["data"]["credits"]["balance"], 91,
        "three sends, charged once each"
    );
}

#[tokio::test]
async fn a_retried_send_that_buys_at_send_time_buys_only_once() {
    let app = spawn_app().await;
    let Practice { chen, note_id } = app.practice("clinic-1").await;
    let recipient = app.recipient_on(&chen, &["ARGUS"]).await;
    let patel = practitioner("dr-patel", "clinic-1");
    app.gql(Some(&patel), "{ me { id } }", json!({})).await;
    app.gql(
        Some(&chen),
        "mutation($key: String!) { transferCredits(input: {fromPractitionerId: \"dr-chen\", toPractitionerId: \"dr-patel\", credits: 99, idempotencyKey: $key}) { fromBalance } }",
        json!({"key": key()}),
    )
    .await;
    let charges_before = app
        .sandbox_control(reqwest::Method::GET, "/_sandbox/charges", None)
        .await
        .as_array()
        .unwrap()
        .len();
    let send_key = key();
    let input = json!({"input": {"noteId": note_id, "sectionKeys": ["history"], "recipientId": recipient, "idempotencyKey": send_key, "topUpIfShort": true}});

    let responses =
        futures::future::join_all((0..4).map(|_| app.gql(Some(&chen), SEND, input.clone()))).await;

    let ids: std::collections::HashSet<&str> = responses
        .iter()
        .map(|r| {
            r["data"]["sendSecureMessage"]["message"]["id"]
                .as_str()
                .unwrap_or_else(|| panic!("{r}"))
        })
        .collect();
    assert_eq!(ids.len(), 1);
    let charges = app
        .sandbox_control(reqwest::Method::GET, "/_sandbox/charges", None)
        .await
        .as_array()
        .unwrap()
        .len();
    assert_eq!(
        charges - charges_before,
        1,
        "one pack bought for one message"
    );
    let credits = app
        .gql(Some(&chen), "{ credits { balance } }", json!({}))
        .await;
    assert_eq!(credits["data"]["credits"]["balance"], 98);
}

#[tokio::test]
async fn a_provider_that_is_down_degrades_the_search_with_a_warning() {
    let app = spawn_app().await;
    let Practice { chen, note_id: _ } = app.practice("clinic-1").await;
    app.inject_fault("referralnet", "providers", "server_error", 5, json!({}))
        .await;

    let result = app.search(&chen, "").await;

    let search = &result["data"]["searchPractitioners"];
    assert!(
        search["warnings"][0]
            .as_str()
            .unwrap_or_default()
            .contains("ReferralNet"),
        "{result}"
    );
    let edges = search["edges"].as_array().unwrap();
    assert!(!edges.is_empty(), "Argus still answered");
    assert!(
        edges
            .iter()
            .all(|edge| edge["node"]["providers"] == json!(["ARGUS"]))
    );
}

#[tokio::test]
async fn a_subscriber_sees_a_sent_message_move_to_acknowledged() {
    let app = spawn_app().await;
    let Practice { chen, note_id } = app.practice("clinic-1").await;
    let recipient = app.recipient_on(&chen, &["ARGUS"]).await;
    let mut subscription = crate::registration::Subscription::open_query(
        &app,
        json!({"Authorization": format!("Bearer {chen}")}),
        "subscription { messageStatusChanged { id status } }",
    )
    .await
    .unwrap();

    let sent = app
        .send(
            &chen,
            &note_id,
            &["history"],
            &recipient,
            Some("ARGUS"),
            &key(),
        )
        .await;
    let id = sent["data"]["sendSecureMessage"]["message"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{sent}"))
        .to_owned();

    let mut seen: Vec<String> = Vec::new();
    let mut hurried = false;
    while seen.last().map(String::as_str) != Some("ACKNOWLEDGED") {
        let change = subscription.next_data().await;
        assert_eq!(change["messageStatusChanged"]["id"], id.as_str());
        let status = change["messageStatusChanged"]["status"]
            .as_str()
            .unwrap()
            .to_owned();
        // Accepted: now hurry the sandbox's delivery and acknowledgement along. (If the send
        // committed before the subscription started, its first change seen is DELIVERED.)
        if !hurried && (status == "SENT" || status == "DELIVERED") {
            app.advance_sandbox_clock(30).await;
            hurried = true;
        }
        seen.push(status);
    }
    assert!(
        seen.len() >= 2,
        "at least one step before ACKNOWLEDGED: {seen:?}"
    );
}

#[tokio::test]
async fn without_a_provider_the_one_with_the_better_delivery_record_is_chosen() {
    let app = spawn_app().await;
    let Practice { chen, note_id } = app.practice("clinic-1").await;
    let on_both = app.recipient_on(&chen, &["ARGUS", "REFERRALNET"]).await;
    let first = app
        .send(&chen, &note_id, &["history"], &on_both, None, &key())
        .await;
    assert_eq!(
        first["data"]["sendSecureMessage"]["message"]["provider"], "ARGUS",
        "no record yet: Argus first"
    );
    // Argus now fails a message (refused outright, refunded).
    let failing = app
        .send(
            &chen,
            &note_id,
            &["history"],
            MAGIC_UNKNOWN_ENDPOINT,
            Some("ARGUS"),
            &key(),
        )
        .await;
    let failing_id = failing["data"]["sendSecureMessage"]["message"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.wait_for_status(&chen, &failing_id, "FAILED").await;

    let routed = app
        .send(&chen, &note_id, &["history"], &on_both, None, &key())
        .await;

    assert_eq!(
        routed["data"]["sendSecureMessage"]["message"]["provider"], "REFERRALNET",
        "{routed}"
    );
}

#[tokio::test]
async fn sending_without_an_hpii_is_bad_user_input_naming_set_my_hpii_and_charges_and_stores_nothing()
 {
    let app = spawn_app().await;
    let Practice { chen, note_id } = app.practice_without_hpii("clinic-1").await;
    let recipient = app.recipient_on(&chen, &["ARGUS"]).await;

    let refused = app
        .send(&chen, &note_id, &["history"], &recipient, None, &key())
        .await;

    assert_eq!(error_code(&refused), Some("BAD_USER_INPUT"), "{refused}");
    assert!(
        refused["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("setMyHpii"),
        "{refused}"
    );
    let credits = app
        .gql(Some(&chen), "{ credits { balance } }", json!({}))
        .await;
    assert_eq!(credits["data"]["credits"]["balance"], 100, "no debit");
    assert_eq!(app.count_rows("messages").await, 0);
    assert!(app.sandbox_messages().await.is_empty());
}

#[tokio::test]
async fn the_referral_names_the_sender_by_their_hpii_in_the_senders_prd_segment() {
    let app = spawn_app().await;
    let Practice { chen, note_id } = app.practice("clinic-1").await;
    let recipient = app.recipient_on(&chen, &["ARGUS"]).await;

    let sent = app
        .send(
            &chen,
            &note_id,
            &["history"],
            &recipient,
            Some("ARGUS"),
            &key(),
        )
        .await;
    assert!(sent["data"]["sendSecureMessage"].is_object(), "{sent}");

    let received = eventually(Duration::from_secs(15), || async {
        let received = app.sandbox_messages().await;
        (!received.is_empty()).then_some(received)
    })
    .await;
    let parsed = smd_gateway::domain::hl7::parse(received[0]["payload"].as_str().unwrap())
        .expect("the payload parses back");
    let sender = parsed
        .party(smd_gateway::domain::hl7::ROLE_REFERRING_PROVIDER)
        .expect("a PRD segment for the sender");
    assert_eq!(sender.hpii, chen_hpii());
    let addressee = parsed
        .party(smd_gateway::domain::hl7::ROLE_REFERRED_TO_PROVIDER)
        .expect("a PRD segment for the recipient");
    assert_eq!(addressee.hpii, recipient);
}

#[tokio::test]
async fn an_argus_directory_fault_is_provider_unavailable_not_unreachable_and_charges_and_stores_nothing()
 {
    let app = spawn_app().await;
    let Practice { chen, note_id } = app.practice("clinic-1").await;
    let on_both = app.recipient_on(&chen, &["ARGUS", "REFERRALNET"]).await;
    app.inject_fault("argus", "directory", "server_error", 1, json!({}))
        .await;
    let send_key = key();

    let refused = app
        .send(
            &chen,
            &note_id,
            &["history"],
            &on_both,
            Some("ARGUS"),
            &send_key,
        )
        .await;

    assert_eq!(
        error_code(&refused),
        Some("PROVIDER_UNAVAILABLE"),
        "a directory that did not answer is not a 'no': {refused}"
    );
    let credits = app
        .gql(Some(&chen), "{ credits { balance } }", json!({}))
        .await;
    assert_eq!(credits["data"]["credits"]["balance"], 100, "no debit");
    assert_eq!(app.count_rows("messages").await, 0);
    assert!(app.sandbox_messages().await.is_empty());

    // Retryable: once Argus answers again, the same request goes through, charged once.
    let retried = app
        .send(
            &chen,
            &note_id,
            &["history"],
            &on_both,
            Some("ARGUS"),
            &send_key,
        )
        .await;
    let payload = &retried["data"]["sendSecureMessage"];
    assert_eq!(payload["message"]["provider"], "ARGUS", "{retried}");
    assert_eq!(payload["creditsRemaining"], 97);
}

#[tokio::test]
async fn a_hanging_inbox_does_not_hold_up_sending() {
    let app = spawn_app_with(Options {
        provider_timeout_ms: 20_000,
        ..Options::default()
    })
    .await;
    // Every Argus inbox fetch now hangs for 15 s (the gateway waits up to 20 s).
    app.inject_fault("argus", "inbox", "timeout", 10, json!({"holdSeconds": 15}))
        .await;
    let Practice { chen, note_id } = app.practice("clinic-1").await;
    let recipient = app.recipient_on(&chen, &["ARGUS"]).await;

    let sent = app
        .send(
            &chen,
            &note_id,
            &["history"],
            &recipient,
            Some("ARGUS"),
            &key(),
        )
        .await;
    let id = sent["data"]["sendSecureMessage"]["message"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{sent}"))
        .to_owned();

    // Well before the hanging fetch could end, the outbox has handed the message over.
    eventually(Duration::from_secs(5), || async {
        (app.message_status(&chen, &id).await == "SENT").then_some(())
    })
    .await;
    assert_eq!(app.sandbox_messages().await.len(), 1);
}

#[tokio::test]
async fn referralnet_is_logged_into_once_per_session_however_many_sends_checks_and_searches() {
    const SESSIONS: &str = "/referralnet/api/sessions";
    const DISPATCH: &str = "/referralnet/api/dispatch";
    let app = spawn_app().await;
    let Practice { chen, note_id } = app.practice("clinic-1").await;
    // Linking checks the account with a fresh login each time (a password change must show).
    let after_linking = app.provider_requests("referralnet", SESSIONS).await;
    let recipient = app.recipient_on(&chen, &["REFERRALNET"]).await;

    let mut ids = Vec::new();
    for _ in 0..6 {
        let sent = app
            .send(
                &chen,
                &note_id,
                &["history"],
                &recipient,
                Some("REFERRALNET"),
                &key(),
            )
            .await;
        ids.push(
            sent["data"]["sendSecureMessage"]["message"]["id"]
                .as_str()
                .unwrap_or_else(|| panic!("{sent}"))
                .to_owned(),
        );
        app.search(&chen, "smith").await;
    }
    for id in &ids {
        eventually(Duration::from_secs(15), || async {
            (app.message_status(&chen, id).await != "QUEUED").then_some(())
        })
        .await;
    }

    // Six hand-overs, delivery checks, searches and the inbox poller's visits, all on the
    // session that linking started: no login per call (the sandbox's sessions last 15 minutes;
    // the gateway reuses one for 10).
    assert_eq!(
        app.provider_requests("referralnet", DISPATCH).await,
        6,
        "each message handed over once"
    );
    assert_eq!(
        app.provider_requests("referralnet", SESSIONS).await,
        after_linking,
        "no login after linking: every later call reused the session"
    );
    assert!(
        after_linking <= 2,
        "linking logged in {after_linking} times (its fresh account check, and at most one session)"
    );
}
