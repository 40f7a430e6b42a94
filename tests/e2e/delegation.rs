//! Delegated sending and the sharing preview: a practitioner's grant lets another user of the
//! practice send (and preview, and read notes) on their behalf; without a live grant nothing
//! is sent, charged or read; the preview shows exactly what a send transmits and charges and
//! stores nothing but an audit row.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;
use crate::ws::WsClient;

const GRANT: &str = "mutation($d: ID!, $until: DateTime) { grantSendingDelegation(input: {delegateId: $d, until: $until}) { practitioner { id name } delegate { id name } until revokedAt status } }";
const REVOKE: &str = "mutation($d: ID!) { revokeSendingDelegation(delegateId: $d) { delegate { id } revokedAt status } }";
const DELEGATIONS: &str = "{ sendingDelegations { granted { delegate { id } status until } held { practitioner { id } status } } }";
const SEND: &str = "mutation($input: SendSecureMessageInput!) { sendSecureMessage(input: $input) { message { id status provider } creditsRemaining } }";
const PREVIEW: &str = "query($input: PreviewSecureMessageInput!) { previewSecureMessage(input: $input) { senderId senderName senderHpii recipientId recipientName provider sections { key title body } costCredits balance buyAtSendNeeded buyAtSendPack { id credits } topUpIfShort hl7 } }";
const NOTES: &str = "query($for: ID) { clinicalNotes(onBehalfOf: $for) { edges { node { id title sections { key title body } } } } }";
const NOTE: &str =
    "query($id: ID!, $for: ID) { clinicalNote(id: $id, onBehalfOf: $for) { id sections { key } } }";
const AUDIT: &str = "{ auditEvents(first: 100) { edges { node { actor onBehalfOf action target outcome detail occurredAt } } } }";

/// The text of the section that must never leave the practice.
const PRIVATE_TEXT: &str = "SECRET-NOT-FOR-SHARING";

fn key() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn chen_hpii() -> String {
    valid_hpii("800361444000001")
}

/// A practice with Dr Chen (linked to Argus, her HPI-I, 100 credits, a three-section note) and
/// an administrator, `manager`, who has signed in once.
struct Clinic {
    group: String,
    chen: String,
    admin: String,
    note_id: String,
    recipient: String,
}

impl Clinic {
    async fn open(app: &TestApp, group: &str) -> Clinic {
        let chen = practitioner("dr-chen", group);
        let linked = app
            .link(&chen, "linkArgus", ARGUS_USER, ARGUS_PASSWORD)
            .await;
        assert_eq!(
            linked["data"]["linkArgus"]["individualStatus"], "ACTIVE",
            "{linked}"
        );
        let set = app
            .gql(
                Some(&chen),
                "mutation($h: String!) { setMyHpii(hpii: $h) }",
                json!({"h": chen_hpii()}),
            )
            .await;
        assert!(set["errors"].is_null(), "{set}");
        app.gql(
            Some(&chen),
            "mutation { setPaymentMethod(input: {token: \"pm_sandbox_approve\"}) { last4 } }",
            json!({}),
        )
        .await;
        let bought = app
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
        let patient = app
            .gql(
                Some(&chen),
                "mutation { createPatient(input: {givenName: \"Ada\", familyName: \"O'Brien\", dateOfBirth: \"1961-03-04\"}) { id } }",
                json!({}),
            )
            .await;
        let note = app
            .gql(
                Some(&chen),
                "mutation($input: CreateClinicalNoteInput!) { createClinicalNote(input: $input) { id } }",
                json!({"input": {"patientId": patient["data"]["createPatient"]["id"], "title": "Chest pain review", "sections": [
                    {"key": "history", "title": "History", "body": "Chest pain on exertion | 3 weeks ^ worse ~ at night"},
                    {"key": "medications", "title": "Medications", "body": "Aspirin 100 mg daily"},
                    {"key": "private", "title": "Private notes", "body": PRIVATE_TEXT}
                ]}}),
            )
            .await;
        let note_id = note["data"]["createClinicalNote"]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("{note}"))
            .to_owned();
        let search = app
            .gql(
                Some(&chen),
                "{ searchPractitioners(query: \"\", first: 50, provider: ARGUS) { edges { node { id name providers } } } }",
                json!({}),
            )
            .await;
        let recipient = search["data"]["searchPractitioners"]["edges"]
            .as_array()
            .unwrap_or_else(|| panic!("{search}"))
            .iter()
            .find(|edge| {
                edge["node"]["providers"] == json!(["ARGUS"])
                    && !edge["node"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .contains("Test ")
            })
            .map(|edge| edge["node"]["id"].as_str().unwrap().to_owned())
            .unwrap_or_else(|| panic!("no Argus-only practitioner in {search}"));
        let admin = administrator("manager", group);
        let me = app.gql(Some(&admin), "{ me { id } }", json!({})).await;
        assert_eq!(me["data"]["me"]["id"], "manager", "{me}");
        Clinic {
            group: group.to_owned(),
            chen,
            admin,
            note_id,
            recipient,
        }
    }

    /// A send's input for the history and medications, on Dr Chen's behalf when `for_chen`.
    fn input(&self, key: &str, for_chen: bool) -> Value {
        let mut input = json!({"noteId": self.note_id, "sectionKeys": ["history", "medications"], "recipientId": self.recipient, "idempotencyKey": key});
        if for_chen {
            input["onBehalfOf"] = json!("dr-chen");
        }
        input
    }

    /// The same input without the idempotency key (what a preview takes).
    fn preview_input(&self, for_chen: bool) -> Value {
        let mut input = self.input("unused", for_chen);
        input.as_object_mut().unwrap().remove("idempotencyKey");
        input
    }
}

impl TestApp {
    async fn own_balance(&self, token: &str) -> i64 {
        let answer = self
            .gql(Some(token), "{ credits { balance } }", json!({}))
            .await;
        answer["data"]["credits"]["balance"]
            .as_i64()
            .unwrap_or_else(|| panic!("{answer}"))
    }

    async fn delegation_audit(&self, admin: &str) -> Vec<Value> {
        let answer = self.gql(Some(admin), AUDIT, json!({})).await;
        answer["data"]["auditEvents"]["edges"]
            .as_array()
            .unwrap_or_else(|| panic!("{answer}"))
            .iter()
            .map(|edge| edge["node"].clone())
            .collect()
    }

    async fn grant_to(&self, token: &str, delegate: &str, until: Option<String>) -> Value {
        self.gql(Some(token), GRANT, json!({"d": delegate, "until": until}))
            .await
    }

    async fn received_by_providers(&self) -> Vec<Value> {
        self.sandbox_control(reqwest::Method::GET, "/_sandbox/messages", None)
            .await
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

fn events<'a>(trail: &'a [Value], action: &str, outcome: &str) -> Vec<&'a Value> {
    trail
        .iter()
        .filter(|event| event["action"] == action && event["outcome"] == outcome)
        .collect()
}

/// The referral's segments after the header (MSH) and the referral segment (RF1), which carry
/// the control id and the time a send sets afresh.
fn segments_after_header(hl7: &str) -> Vec<String> {
    hl7.split('\r')
        .filter(|segment| !segment.is_empty())
        .filter(|segment| !segment.starts_with("MSH|") && !segment.starts_with("RF1|"))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn a_delegate_sends_as_the_practitioner_who_granted_it_and_the_audit_names_both() {
    let app = spawn_app().await;
    let clinic = Clinic::open(&app, "clinic-1").await;
    let mut chens_subscription = crate::registration::Subscription::open_query(
        &app,
        json!({"Authorization": format!("Bearer {}", clinic.chen)}),
        "subscription { messageStatusChanged { id status } }",
    )
    .await
    .unwrap();

    let granted = app.grant_to(&clinic.chen, "manager", None).await;
    let delegation = &granted["data"]["grantSendingDelegation"];
    assert_eq!(delegation["status"], "LIVE", "{granted}");
    assert_eq!(delegation["practitioner"]["id"], "dr-chen");
    assert_eq!(delegation["delegate"]["id"], "manager");
    assert!(delegation["until"].is_null(), "until revoked");
    let held = app.gql(Some(&clinic.admin), DELEGATIONS, json!({})).await;
    assert_eq!(
        held["data"]["sendingDelegations"]["held"],
        json!([{"practitioner": {"id": "dr-chen"}, "status": "LIVE"}]),
        "{held}"
    );

    let key = key();
    let sent = app
        .gql(
            Some(&clinic.admin),
            SEND,
            json!({"input": clinic.input(&key, true)}),
        )
        .await;
    let payload = &sent["data"]["sendSecureMessage"];
    assert_eq!(payload["message"]["status"], "QUEUED", "{sent}");
    assert_eq!(payload["creditsRemaining"], 97, "Dr Chen's wallet pays");
    let id = payload["message"]["id"].as_str().unwrap().to_owned();

    // The same delegated send retried: the same message, charged once.
    let retried = app
        .gql(
            Some(&clinic.admin),
            SEND,
            json!({"input": clinic.input(&key, true)}),
        )
        .await;
    assert_eq!(
        retried["data"]["sendSecureMessage"]["message"]["id"],
        id.as_str(),
        "{retried}"
    );
    assert_eq!(app.count_rows("messages").await, 1);
    assert_eq!(app.own_balance(&clinic.chen).await, 97);

    // It is Dr Chen's message: in her list, and in her subscription.
    let listed = app
        .gql(
            Some(&clinic.chen),
            "{ messages(direction: OUTBOUND) { edges { node { id } } } }",
            json!({}),
        )
        .await;
    assert_eq!(
        listed["data"]["messages"]["edges"][0]["node"]["id"],
        id.as_str(),
        "{listed}"
    );
    let change = chens_subscription.next_data().await;
    assert_eq!(change["messageStatusChanged"]["id"], id.as_str());

    // It leaves as hers: her HPI-I and name in the sender's PRD segment.
    let received = eventually(Duration::from_secs(15), || async {
        let received = app.received_by_providers().await;
        (!received.is_empty()).then_some(received)
    })
    .await;
    assert_eq!(received.len(), 1, "one copy for a send and its retry");
    let parsed = smd_gateway::domain::hl7::parse(received[0]["payload"].as_str().unwrap())
        .expect("the payload parses back");
    let sender = parsed
        .party(smd_gateway::domain::hl7::ROLE_REFERRING_PROVIDER)
        .expect("a PRD segment for the sender");
    assert_eq!(sender.hpii, chen_hpii());
    assert_eq!(sender.family_name, "dr-chen name");

    // The trail names both people; the administrator paid nothing and holds no wallet.
    let trail = app.delegation_audit(&clinic.admin).await;
    let sends = events(&trail, "SEND_MESSAGE", "SUCCESS");
    assert_eq!(sends.len(), 1, "{trail:?}");
    assert_eq!(sends[0]["actor"], "manager");
    assert_eq!(sends[0]["onBehalfOf"], "dr-chen");
    assert_eq!(sends[0]["target"], format!("message:{id}"));
    let grants = events(&trail, "GRANT_SENDING_DELEGATION", "SUCCESS");
    assert_eq!(grants.len(), 1);
    assert_eq!(grants[0]["actor"], "dr-chen");
    assert_eq!(grants[0]["target"], "delegate:manager");
    assert!(
        trail.iter().all(|event| {
            !event.to_string().contains("Chest pain") && !event.to_string().contains(PRIVATE_TEXT)
        }),
        "no clinical content in the trail"
    );
    let admins_credits = app
        .gql(
            Some(&clinic.admin),
            "{ practitioners { id balance } }",
            json!({}),
        )
        .await;
    assert_eq!(
        admins_credits["data"]["practitioners"],
        json!([{"id": "dr-chen", "balance": 97}]),
        "only Dr Chen has a wallet, and it paid once: {admins_credits}"
    );
}

#[tokio::test]
async fn without_a_live_grant_nobody_sends_previews_or_reads_for_a_practitioner_and_nothing_is_charged()
 {
    let app = spawn_app().await;
    let clinic = Clinic::open(&app, "clinic-1").await;
    let patel = practitioner("dr-patel", "clinic-1");
    app.gql(Some(&patel), "{ me { id } }", json!({})).await;

    // Without any grant: the administrator, and a colleague practitioner.
    for token in [&clinic.admin, &patel] {
        let sent = app
            .gql(
                Some(token),
                SEND,
                json!({"input": clinic.input(&key(), true)}),
            )
            .await;
        assert_eq!(error_code(&sent), Some("FORBIDDEN"), "{sent}");
        let preview = app
            .gql(
                Some(token),
                PREVIEW,
                json!({"input": clinic.preview_input(true)}),
            )
            .await;
        assert_eq!(error_code(&preview), Some("FORBIDDEN"), "{preview}");
        let notes = app.gql(Some(token), NOTES, json!({"for": "dr-chen"})).await;
        assert_eq!(error_code(&notes), Some("FORBIDDEN"), "{notes}");
        assert!(notes["data"].is_null() || notes["data"]["clinicalNotes"].is_null());
    }
    // An administrator sending in their own name, as before delegation existed.
    let own = app
        .gql(
            Some(&clinic.admin),
            SEND,
            json!({"input": clinic.input(&key(), false)}),
        )
        .await;
    assert_eq!(error_code(&own), Some("FORBIDDEN"), "{own}");
    // Grants only come from practitioners, never to oneself, never into the past.
    let by_admin = app.grant_to(&clinic.admin, "dr-patel", None).await;
    assert_eq!(error_code(&by_admin), Some("FORBIDDEN"), "{by_admin}");
    let to_self = app.grant_to(&clinic.chen, "dr-chen", None).await;
    assert_eq!(error_code(&to_self), Some("FORBIDDEN"), "{to_self}");
    let past = app
        .grant_to(
            &clinic.chen,
            "manager",
            Some((chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339()),
        )
        .await;
    assert_eq!(error_code(&past), Some("BAD_USER_INPUT"), "{past}");
    let stranger = app.grant_to(&clinic.chen, "nobody-here", None).await;
    assert_eq!(error_code(&stranger), Some("NOT_FOUND"), "{stranger}");
    assert_eq!(app.count_rows("sending_delegations").await, 0);

    // Revoked: the grant worked, then stops working.
    let granted = app.grant_to(&clinic.chen, "manager", None).await;
    assert_eq!(
        granted["data"]["grantSendingDelegation"]["status"], "LIVE",
        "{granted}"
    );
    let first = app
        .gql(
            Some(&clinic.admin),
            SEND,
            json!({"input": clinic.input(&key(), true)}),
        )
        .await;
    assert_eq!(
        first["data"]["sendSecureMessage"]["creditsRemaining"], 97,
        "{first}"
    );
    let revoked = app
        .gql(Some(&clinic.chen), REVOKE, json!({"d": "manager"}))
        .await;
    assert_eq!(
        revoked["data"]["revokeSendingDelegation"]["status"], "REVOKED",
        "{revoked}"
    );
    let after_revoke = app
        .gql(
            Some(&clinic.admin),
            SEND,
            json!({"input": clinic.input(&key(), true)}),
        )
        .await;
    assert_eq!(
        error_code(&after_revoke),
        Some("FORBIDDEN"),
        "{after_revoke}"
    );
    assert!(
        after_revoke["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("revoked"),
        "{after_revoke}"
    );

    // Expired: granted again until tomorrow, then that moment passes.
    let tomorrow = (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339();
    let renewed = app.grant_to(&clinic.chen, "manager", Some(tomorrow)).await;
    assert_eq!(
        renewed["data"]["grantSendingDelegation"]["status"], "LIVE",
        "{renewed}"
    );
    let notes = app
        .gql(Some(&clinic.admin), NOTES, json!({"for": "dr-chen"}))
        .await;
    assert_eq!(
        notes["data"]["clinicalNotes"]["edges"][0]["node"]["id"],
        clinic.note_id.as_str(),
        "{notes}"
    );
    let expired = app
        .store
        .set_delegation_expiry_for_tests(
            &clinic.group,
            chrono::Utc::now() - chrono::Duration::minutes(1),
        )
        .await
        .unwrap();
    assert_eq!(expired, 1);
    let after_expiry = app
        .gql(
            Some(&clinic.admin),
            SEND,
            json!({"input": clinic.input(&key(), true)}),
        )
        .await;
    assert_eq!(
        error_code(&after_expiry),
        Some("FORBIDDEN"),
        "{after_expiry}"
    );
    let note_after_expiry = app
        .gql(
            Some(&clinic.admin),
            NOTE,
            json!({"id": clinic.note_id, "for": "dr-chen"}),
        )
        .await;
    assert_eq!(
        error_code(&note_after_expiry),
        Some("FORBIDDEN"),
        "{note_after_expiry}"
    );
    let listed = app.gql(Some(&clinic.chen), DELEGATIONS, json!({})).await;
    assert_eq!(
        listed["data"]["sendingDelegations"]["granted"][0]["status"], "EXPIRED",
        "{listed}"
    );

    // Of all that, only the one send under a live grant was sent and charged.
    assert_eq!(app.count_rows("messages").await, 1);
    assert_eq!(app.own_balance(&clinic.chen).await, 97);
    let trail = app.delegation_audit(&clinic.admin).await;
    assert_eq!(events(&trail, "SEND_MESSAGE", "SUCCESS").len(), 1);
    let denied_sends = events(&trail, "SEND_MESSAGE", "DENIED");
    // The administrator and Dr Patel without a grant, after the revoke, after the expiry.
    assert_eq!(denied_sends.len(), 4, "{denied_sends:?}");
    assert!(
        denied_sends
            .iter()
            .all(|event| event["onBehalfOf"] == "dr-chen"),
        "{denied_sends:?}"
    );
    assert_eq!(events(&trail, "PREVIEW_MESSAGE", "DENIED").len(), 2);
    assert_eq!(
        events(&trail, "GRANT_SENDING_DELEGATION", "DENIED").len(),
        1
    );
    let reads = events(&trail, "READ_NOTE", "SUCCESS");
    assert_eq!(reads.len(), 1, "the one listing under the live grant");
    assert_eq!(reads[0]["actor"], "manager");
    assert_eq!(reads[0]["onBehalfOf"], "dr-chen");
}

#[tokio::test]
async fn sends_racing_a_revoke_are_counted_and_none_commits_after_the_revoke() {
    let app = spawn_app().await;
    let clinic = Clinic::open(&app, "clinic-1").await;
    let granted = app.grant_to(&clinic.chen, "manager", None).await;
    assert_eq!(
        granted["data"]["grantSendingDelegation"]["status"], "LIVE",
        "{granted}"
    );
    // One send first, so the recipient's directory entry is cached and the racing sends reach
    // their transaction quickly.
    let warm = app
        .gql(
            Some(&clinic.admin),
            SEND,
            json!({"input": clinic.input(&key(), true)}),
        )
        .await;
    assert_eq!(
        warm["data"]["sendSecureMessage"]["creditsRemaining"], 97,
        "{warm}"
    );
    // Four sends over WebSocket connections and twelve over HTTP, all at once; the revoke goes
    // out as soon as the first two of them have answered, so the rest race it.
    let mut sockets = Vec::new();
    for _ in 0..4 {
        sockets.push(WsClient::ready(&app, &clinic.admin).await);
    }
    let answered = std::sync::atomic::AtomicUsize::new(0);
    let progress = tokio::sync::Notify::new();
    let finished = |answer: Value| {
        answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        progress.notify_waiters();
        answer
    };
    let over_http = (0..12).map(|_| {
        let input = clinic.input(&key(), true);
        let app = &app;
        let admin = clinic.admin.clone();
        let finished = &finished;
        async move { finished(app.gql(Some(&admin), SEND, json!({"input": input})).await) }
    });
    let over_ws = sockets.iter_mut().map(|socket| {
        let input = clinic.input(&key(), true);
        let finished = &finished;
        async move { finished(socket.run(SEND, json!({"input": input})).await) }
    });
    let revoke = async {
        while answered.load(std::sync::atomic::Ordering::SeqCst) < 2 {
            let notified = progress.notified();
            if answered.load(std::sync::atomic::Ordering::SeqCst) >= 2 {
                break;
            }
            notified.await;
        }
        app.gql(Some(&clinic.chen), REVOKE, json!({"d": "manager"}))
            .await
    };
    let (http_answers, ws_answers, revoked) = tokio::join!(
        futures::future::join_all(over_http),
        futures::future::join_all(over_ws),
        revoke
    );
    assert_eq!(
        revoked["data"]["revokeSendingDelegation"]["status"], "REVOKED",
        "{revoked}"
    );
    let answers: Vec<Value> = http_answers.into_iter().chain(ws_answers).collect();
    let sent = answers
        .iter()
        .filter(|answer| answer["data"]["sendSecureMessage"]["message"]["id"].is_string())
        .count();
    let refused = answers
        .iter()
        .filter(|answer| error_code(answer) == Some("FORBIDDEN"))
        .count();
    assert_eq!(
        sent + refused,
        16,
        "every answer is a send or FORBIDDEN: {answers:?}"
    );
    eprintln!("sends racing the revoke: {sent} sent, {refused} refused");

    // What got through was stored and charged exactly once each, and nothing else.
    assert!(
        sent >= 2,
        "the revoke went out after two sends answered: {answers:?}"
    );
    assert_eq!(app.count_rows("messages").await, 1 + sent as i64);
    assert_eq!(app.own_balance(&clinic.chen).await, 97 - 3 * sent as i64);
    // Every send that committed did so before the revoke did.
    let trail = app.delegation_audit(&clinic.admin).await;
    let revokes = events(&trail, "REVOKE_SENDING_DELEGATION", "SUCCESS");
    assert_eq!(revokes.len(), 1);
    let revoked_at = revokes[0]["occurredAt"].as_str().unwrap().to_owned();
    let committed = events(&trail, "SEND_MESSAGE", "SUCCESS");
    assert_eq!(committed.len(), 1 + sent);
    for send in &committed {
        let at =
            chrono::DateTime::parse_from_rfc3339(send["occurredAt"].as_str().unwrap()).unwrap();
        assert!(
            at <= chrono::DateTime::parse_from_rfc3339(&revoked_at).unwrap(),
            "a send committed after the revoke: {send} vs {revoked_at}"
        );
    }
    assert_eq!(events(&trail, "SEND_MESSAGE", "DENIED").len(), refused);

    // And after the revoke answered, nothing more goes through, over either transport.
    let later = app
        .gql(
            Some(&clinic.admin),
            SEND,
            json!({"input": clinic.input(&key(), true)}),
        )
        .await;
    assert_eq!(error_code(&later), Some("FORBIDDEN"), "{later}");
    let later_ws = sockets[0]
        .run(SEND, json!({"input": clinic.input(&key(), true)}))
        .await;
    assert_eq!(error_code(&later_ws), Some("FORBIDDEN"), "{later_ws}");
    assert_eq!(app.count_rows("messages").await, 1 + sent as i64);
    assert_eq!(app.own_balance(&clinic.chen).await, 97 - 3 * sent as i64);
}

#[tokio::test]
async fn a_delegate_of_one_practice_cannot_act_for_a_practitioner_of_another() {
    let app = spawn_app().await;
    // Both practices have a dr-chen and a manager: the same ids, different people. (Practice
    // A has no provider account: the demo Argus account serves practice B.)
    let b = Clinic::open(&app, "clinic-b").await;
    let a = Clinic {
        group: "clinic-a".into(),
        chen: practitioner("dr-chen", "clinic-a"),
        admin: administrator("manager", "clinic-a"),
        note_id: String::new(),
        recipient: String::new(),
    };
    for token in [&a.chen, &a.admin] {
        let me = app.gql(Some(token), "{ me { id } }", json!({})).await;
        assert!(me["errors"].is_null(), "{me}");
    }
    let granted = app.grant_to(&b.chen, "manager", None).await;
    assert_eq!(
        granted["data"]["grantSendingDelegation"]["status"], "LIVE",
        "{granted}"
    );

    // Practice A's manager names dr-chen: that is practice A's Dr Chen, who granted nothing.
    let sent = app
        .gql(
            Some(&a.admin),
            SEND,
            json!({"input": b.input(&key(), true)}),
        )
        .await;
    assert_eq!(error_code(&sent), Some("FORBIDDEN"), "{sent}");
    let preview = app
        .gql(
            Some(&a.admin),
            PREVIEW,
            json!({"input": b.preview_input(true)}),
        )
        .await;
    assert_eq!(error_code(&preview), Some("FORBIDDEN"), "{preview}");
    let note = app
        .gql(
            Some(&a.admin),
            NOTE,
            json!({"id": b.note_id, "for": "dr-chen"}),
        )
        .await;
    assert_eq!(error_code(&note), Some("FORBIDDEN"), "{note}");
    let held = app.gql(Some(&a.admin), DELEGATIONS, json!({})).await;
    assert_eq!(
        held["data"]["sendingDelegations"]["held"],
        json!([]),
        "{held}"
    );
    // Practice A's Dr Chen cannot grant to practice B's people either: her "manager" is A's.
    let to_other = app.grant_to(&a.chen, "dr-patel-of-b", None).await;
    assert_eq!(error_code(&to_other), Some("NOT_FOUND"), "{to_other}");

    // Nothing was sent or charged in either practice; practice B's grant still works there.
    assert_eq!(app.count_rows("messages").await, 0);
    assert_eq!(app.own_balance(&a.chen).await, 0);
    assert_eq!(app.own_balance(&b.chen).await, 100);
    let in_b = app
        .gql(
            Some(&b.admin),
            SEND,
            json!({"input": b.input(&key(), true)}),
        )
        .await;
    assert_eq!(
        in_b["data"]["sendSecureMessage"]["creditsRemaining"], 97,
        "{in_b}"
    );
    assert_eq!(app.own_balance(&a.chen).await, 0);
    assert_eq!(app.count_rows("messages").await, 1);
    let a_trail = app.delegation_audit(&a.admin).await;
    assert_eq!(events(&a_trail, "SEND_MESSAGE", "SUCCESS").len(), 0);
    assert_eq!(events(&a_trail, "SEND_MESSAGE", "DENIED").len(), 1);
    let b_trail = app.delegation_audit(&b.admin).await;
    let b_sends = events(&b_trail, "SEND_MESSAGE", "SUCCESS");
    assert_eq!(b_sends.len(), 1);
    assert_eq!(b_sends[0]["actor"], "manager");
    assert_eq!(b_sends[0]["onBehalfOf"], "dr-chen");
}

#[tokio::test]
async fn a_preview_shows_exactly_what_a_send_transmits_and_charges_and_stores_nothing() {
    let app = spawn_app().await;
    let clinic = Clinic::open(&app, "clinic-1").await;
    let ledger_before = app.count_rows("ledger_entries").await;
    let audit_before = app.count_rows("audit_events").await;
    let sends_before = app.provider_requests("argus", "/argus/v1/messages").await;

    let answer = app
        .gql(
            Some(&clinic.chen),
            PREVIEW,
            json!({"input": clinic.preview_input(false)}),
        )
        .await;
    let preview = &answer["data"]["previewSecureMessage"];
    assert_eq!(preview["senderId"], "dr-chen", "{answer}");
    assert_eq!(preview["senderHpii"], chen_hpii());
    assert_eq!(preview["recipientId"], clinic.recipient.as_str());
    assert_eq!(
        preview["provider"], "ARGUS",
        "routed to the one that reaches them"
    );
    assert_eq!(
        preview["sections"],
        json!([
            {"key": "history", "title": "History", "body": "Chest pain on exertion | 3 weeks ^ worse ~ at night"},
            {"key": "medications", "title": "Medications", "body": "Aspirin 100 mg daily"}
        ])
    );
    assert_eq!(preview["costCredits"], 3);
    assert_eq!(preview["balance"], 100);
    assert_eq!(preview["buyAtSendNeeded"], false);
    assert!(preview["buyAtSendPack"].is_null());
    let previewed_hl7 = preview["hl7"].as_str().unwrap().to_owned();
    assert!(!previewed_hl7.contains(PRIVATE_TEXT));

    // Nothing charged, stored or sent; one audit row, without clinical content.
    assert_eq!(app.count_rows("messages").await, 0);
    assert_eq!(app.count_rows("ledger_entries").await, ledger_before);
    assert_eq!(app.count_rows("audit_events").await, audit_before + 1);
    assert_eq!(
        app.provider_requests("argus", "/argus/v1/messages").await,
        sends_before
    );
    assert_eq!(app.own_balance(&clinic.chen).await, 100);
    let trail = app.delegation_audit(&clinic.admin).await;
    let previews = events(&trail, "PREVIEW_MESSAGE", "SUCCESS");
    assert_eq!(previews.len(), 1);
    assert_eq!(previews[0]["actor"], "dr-chen");
    assert!(previews[0]["onBehalfOf"].is_null());
    let row = previews[0].to_string();
    assert!(!row.contains("Chest pain") && !row.contains("Aspirin") && !row.contains("O'Brien"));

    // A send of the same input transmits exactly the previewed segments.
    let sent = app
        .gql(
            Some(&clinic.chen),
            SEND,
            json!({"input": clinic.input(&key(), false)}),
        )
        .await;
    assert_eq!(
        sent["data"]["sendSecureMessage"]["message"]["provider"], "ARGUS",
        "{sent}"
    );
    let received = eventually(Duration::from_secs(15), || async {
        let received = app.received_by_providers().await;
        (!received.is_empty()).then_some(received)
    })
    .await;
    let transmitted = received[0]["payload"].as_str().unwrap();
    assert_eq!(
        segments_after_header(transmitted),
        segments_after_header(&previewed_hl7)
    );
    let transmitted_sections: Vec<String> = smd_gateway::domain::hl7::parse(transmitted)
        .unwrap()
        .referral_sections()
        .into_iter()
        .map(|section| section.key)
        .collect();
    assert_eq!(transmitted_sections, ["history", "medications"]);
}

#[tokio::test]
async fn previewing_needs_the_same_grant_as_sending_says_when_credits_would_be_bought_and_the_send_buys_them_for_the_practitioner()
 {
    let app = spawn_app().await;
    let clinic = Clinic::open(&app, "clinic-1").await;

    let own = app
        .gql(
            Some(&clinic.admin),
            PREVIEW,
            json!({"input": clinic.preview_input(false)}),
        )
        .await;
    assert_eq!(error_code(&own), Some("FORBIDDEN"), "{own}");
    app.grant_to(&clinic.chen, "manager", None).await;
    // Dr Chen gives all but one credit to a colleague, so a send would have to buy.
    app.gql(
        Some(&practitioner("dr-patel", "clinic-1")),
        "{ me { id } }",
        json!({}),
    )
    .await;
    let transfer = app
        .gql(
            Some(&clinic.chen),
            "mutation($key: String!) { transferCredits(input: {fromPractitionerId: \"dr-chen\", toPractitionerId: \"dr-patel\", credits: 99, idempotencyKey: $key}) { fromBalance } }",
            json!({"key": key()}),
        )
        .await;
    assert_eq!(
        transfer["data"]["transferCredits"]["fromBalance"], 1,
        "{transfer}"
    );
    let mut input = clinic.preview_input(true);
    input["topUpIfShort"] = json!(true);
    let answer = app
        .gql(Some(&clinic.admin), PREVIEW, json!({"input": input}))
        .await;
    let preview = &answer["data"]["previewSecureMessage"];
    assert_eq!(preview["senderId"], "dr-chen", "{answer}");
    assert_eq!(preview["senderName"], "dr-chen name");
    assert_eq!(preview["balance"], 1);
    assert_eq!(preview["buyAtSendNeeded"], true);
    assert_eq!(
        preview["buyAtSendPack"],
        json!({"id": "pack-100", "credits": 100})
    );
    assert_eq!(preview["topUpIfShort"], true);

    // The preview bought nothing and stored nothing.
    assert_eq!(app.own_balance(&clinic.chen).await, 1);
    assert_eq!(app.count_rows("messages").await, 0);
    assert_eq!(app.count_rows("purchases").await, 1, "only the first pack");
    let trail = app.delegation_audit(&clinic.admin).await;
    let previews = events(&trail, "PREVIEW_MESSAGE", "SUCCESS");
    assert_eq!(previews.len(), 1);
    assert_eq!(previews[0]["actor"], "manager");
    assert_eq!(previews[0]["onBehalfOf"], "dr-chen");
    assert_eq!(events(&trail, "PREVIEW_MESSAGE", "DENIED").len(), 0);

    // The send it previewed follows Dr Chen's wallet rules: short without topUpIfShort...
    let short = app
        .gql(
            Some(&clinic.admin),
            SEND,
            json!({"input": clinic.input(&key(), true)}),
        )
        .await;
    assert_eq!(error_code(&short), Some("INSUFFICIENT_CREDITS"), "{short}");
    assert_eq!(app.count_rows("messages").await, 0);
    assert_eq!(app.count_rows("purchases").await, 1);
    // ...and with it, buys the previewed pack for her and pays from it.
    let mut topped = clinic.input(&key(), true);
    topped["topUpIfShort"] = json!(true);
    let bought = app
        .gql(Some(&clinic.admin), SEND, json!({"input": topped}))
        .await;
    assert_eq!(
        bought["data"]["sendSecureMessage"]["creditsRemaining"],
        1 + 100 - 3,
        "{bought}"
    );
    assert_eq!(app.own_balance(&clinic.chen).await, 98);
    assert_eq!(app.count_rows("purchases").await, 2);
    assert_eq!(app.count_rows("messages").await, 1);
}

/// Collects what a test's log subscriber writes.
#[derive(Clone, Default)]
struct CapturedLog(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLog {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Everything the gateway logs from now on, at every level, in every test of this binary.
/// A process-wide subscriber, because a thread-scoped one misses events whose callsites other
/// tests' threads registered first (tracing caches each callsite's interest). The sandbox
/// stands for the provider: its own logs are not the gateway's.
fn gateway_log() -> &'static CapturedLog {
    static LOG: std::sync::OnceLock<CapturedLog> = std::sync::OnceLock::new();
    LOG.get_or_init(|| {
        let captured = CapturedLog::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_ansi(false)
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "info,smd_gateway=trace,smd_sandbox=off",
            ))
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber)
            .expect("no other test installs a global subscriber");
        captured
    })
}

#[tokio::test]
async fn previews_and_delegated_sends_and_reads_write_no_clinical_content_to_the_logs() {
    let captured = gateway_log();
    let app = spawn_app().await;
    let clinic = Clinic::open(&app, "clinic-1").await;
    app.grant_to(&clinic.chen, "manager", None).await;
    let preview = app
        .gql(
            Some(&clinic.admin),
            PREVIEW,
            json!({"input": clinic.preview_input(true)}),
        )
        .await;
    assert!(
        preview["data"]["previewSecureMessage"]["hl7"].is_string(),
        "{preview}"
    );
    let notes = app
        .gql(Some(&clinic.admin), NOTES, json!({"for": "dr-chen"}))
        .await;
    assert!(notes["errors"].is_null(), "{notes}");
    let sent = app
        .gql(
            Some(&clinic.admin),
            SEND,
            json!({"input": clinic.input(&key(), true)}),
        )
        .await;
    assert!(sent["errors"].is_null(), "{sent}");
    eventually(Duration::from_secs(15), || async {
        (!app.received_by_providers().await.is_empty()).then_some(())
    })
    .await;

    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        log.contains("graphql operation finished"),
        "the capture sees the gateway's log lines"
    );
    for clinical in [
        "Chest pain",
        "Aspirin",
        PRIVATE_TEXT,
        "O'Brien",
        "O\\'Brien",
        "1961",
    ] {
        assert!(!log.contains(clinical), "{clinical:?} reached the log");
    }
}
