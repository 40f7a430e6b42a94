//! HPI-I ownership and the practice's unassigned inbox: one HPI-I per practitioner of a
//! practice, inbound mail nobody's HPI-I matches waiting unassigned (never handed to "the first
//! practitioner"), claiming it once, and administrators seeing envelopes but never content.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;
use crate::registration::Subscription;

const SET_HPII: &str = "mutation($h: String!) { setMyHpii(hpii: $h) }";
const UNASSIGNED: &str = "{ unassignedMessages(first: 50) { edges { node { id direction provider status counterpartId counterpartName addressedToHpii unassigned createdAt creditsCharged } } pageInfo { hasNextPage } } }";
const INBOUND: &str =
    "{ messages(direction: INBOUND) { edges { node { id unassigned counterpartName } } } }";
const ASSIGN: &str = "mutation($id: ID!, $to: ID) { assignMessage(id: $id, toPractitionerId: $to) { id unassigned direction } }";
const AUDIT: &str =
    "{ auditEvents(first: 100) { edges { node { actor action target outcome detail } } } }";

fn edges(response: &Value, field: &str) -> Vec<Value> {
    response["data"][field]["edges"]
        .as_array()
        .cloned()
        .unwrap_or_else(|| panic!("{field} failed: {response}"))
}

impl TestApp {
    /// Dr Chen links the practice to Argus first (the practitioner the old routing would have
    /// picked for unmatched mail); Dr Patel links second.
    async fn inbox_practice(&self, group: &str) -> (String, String) {
        let chen = practitioner("dr-chen", group);
        let patel = practitioner("dr-patel", group);
        for token in [&chen, &patel] {
            let linked = self
                .link(token, "linkArgus", ARGUS_USER, ARGUS_PASSWORD)
                .await;
            assert_eq!(
                linked["data"]["linkArgus"]["individualStatus"], "ACTIVE",
                "{linked}"
            );
        }
        (chen, patel)
    }

    /// A directory practitioner sends the practice's Argus account a referral.
    async fn send_inbound(&self, recipient_hpii: Option<&str>, text: &str) {
        let mut body = json!({"provider": "argus", "account": ARGUS_USER, "text": text});
        if let Some(hpii) = recipient_hpii {
            body["recipientHpii"] = json!(hpii);
        }
        self.sandbox_control(reqwest::Method::POST, "/_sandbox/inbound", Some(body))
            .await;
    }

    /// Waits until the practice's unassigned inbox holds `count` messages, as `token` sees it.
    async fn unassigned_eventually(&self, token: &str, count: usize) -> Vec<Value> {
        eventually(Duration::from_secs(15), || async {
            let listed = edges(
                &self.gql(Some(token), UNASSIGNED, json!({})).await,
                "unassignedMessages",
            );
            (listed.len() == count).then_some(listed)
        })
        .await
    }

    /// Waits until the provider's inbox is empty: the gateway stored and acknowledged everything.
    async fn argus_inbox_drained(&self) {
        eventually(Duration::from_secs(15), || async {
            let listed = self
                .client
                .get(format!("{}/argus/v1/inbox", self.sandbox.base_url()))
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
    }

    async fn audit_events(&self, admin: &str) -> Vec<Value> {
        edges(
            &self.gql(Some(admin), AUDIT, json!({})).await,
            "auditEvents",
        )
        .into_iter()
        .map(|edge| edge["node"].clone())
        .collect()
    }
}

#[tokio::test]
async fn a_practitioner_cannot_take_a_colleagues_hpii_and_the_colleague_still_receives_their_mail()
{
    let app = spawn_app().await;
    let (chen, patel) = app.inbox_practice("clinic-1").await;
    let admin = administrator("manager", "clinic-1");
    let patel_hpii = valid_hpii("800361555000111");
    let chen_hpii = valid_hpii("800361555000222");
    let set = app
        .gql(Some(&patel), SET_HPII, json!({"h": patel_hpii}))
        .await;
    assert_eq!(set["data"]["setMyHpii"], true, "{set}");
    let set = app
        .gql(Some(&chen), SET_HPII, json!({"h": chen_hpii}))
        .await;
    assert_eq!(set["data"]["setMyHpii"], true, "{set}");

    let taken = app
        .gql(Some(&chen), SET_HPII, json!({"h": patel_hpii}))
        .await;

    assert_eq!(error_code(&taken), Some("CONFLICT"), "{taken}");
    let message = taken["errors"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("already held by another practitioner"),
        "{message}"
    );
    assert!(
        !message.contains("patel") && !message.contains("dr-patel"),
        "the holder is not named: {message}"
    );
    // Nothing changed: each keeps their own HPI-I.
    let me = app.gql(Some(&chen), "{ me { hpii } }", json!({})).await;
    assert_eq!(me["data"]["me"]["hpii"], chen_hpii.as_str(), "{me}");
    let me = app.gql(Some(&patel), "{ me { hpii } }", json!({})).await;
    assert_eq!(me["data"]["me"]["hpii"], patel_hpii.as_str(), "{me}");

    // Mail for Dr Patel still reaches Dr Patel, and only Dr Patel.
    app.send_inbound(Some(&patel_hpii), "Results for Dr Patel")
        .await;
    let received = eventually(Duration::from_secs(15), || async {
        let listed = edges(&app.gql(Some(&patel), INBOUND, json!({})).await, "messages");
        (!listed.is_empty()).then_some(listed)
    })
    .await;
    assert_eq!(received.len(), 1);
    assert_eq!(received[0]["node"]["unassigned"], false);
    assert_eq!(
        edges(&app.gql(Some(&chen), INBOUND, json!({})).await, "messages"),
        Vec::<Value>::new(),
        "the would-be taker receives nothing"
    );
    assert!(app.unassigned_eventually(&patel, 0).await.is_empty());

    // The refusal is audited, without clinical content.
    let events = app.audit_events(&admin).await;
    let hpii_events: Vec<&Value> = events
        .iter()
        .filter(|event| event["action"] == "SET_HPII")
        .collect();
    assert_eq!(hpii_events.len(), 3, "{hpii_events:#?}");
    assert!(hpii_events.iter().any(|event| event["actor"] == "dr-chen"
        && event["outcome"] == "DENIED"
        && event["target"] == "practitioner:dr-chen"));
    assert!(
        !serde_json::to_string(&events)
            .unwrap()
            .contains("Results for Dr Patel"),
        "no clinical content in the audit trail"
    );
}

#[tokio::test]
async fn setting_the_same_hpii_again_succeeds_and_changing_it_frees_the_old_one_with_each_change_audited()
 {
    let app = spawn_app().await;
    let (chen, patel) = app.inbox_practice("clinic-1").await;
    let admin = administrator("manager", "clinic-1");
    let first = valid_hpii("800361555000333");
    let second = valid_hpii("800361555000444");

    for _ in 0..2 {
        let set = app.gql(Some(&patel), SET_HPII, json!({"h": first})).await;
        assert_eq!(set["data"]["setMyHpii"], true, "idempotent: {set}");
    }
    let changed = app.gql(Some(&patel), SET_HPII, json!({"h": second})).await;
    assert_eq!(changed["data"]["setMyHpii"], true, "{changed}");
    let freed = app.gql(Some(&chen), SET_HPII, json!({"h": first})).await;
    assert_eq!(
        freed["data"]["setMyHpii"], true,
        "the old one is free: {freed}"
    );
    let bad = app
        .gql(Some(&chen), SET_HPII, json!({"h": "8003610000000001"}))
        .await;
    assert_eq!(
        error_code(&bad),
        Some("BAD_USER_INPUT"),
        "check digit: {bad}"
    );
    let by_admin = app.gql(Some(&admin), SET_HPII, json!({"h": second})).await;
    assert_eq!(error_code(&by_admin), Some("FORBIDDEN"), "{by_admin}");

    let details: Vec<(String, String)> = app
        .audit_events(&admin)
        .await
        .into_iter()
        .filter(|event| event["action"] == "SET_HPII")
        .map(|event| {
            (
                event["actor"].as_str().unwrap().to_owned(),
                event["detail"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    // Newest first; the repeated set wrote nothing, so it is not an event.
    assert_eq!(
        details,
        vec![
            ("dr-chen".to_owned(), format!("set {first}")),
            (
                "dr-patel".to_owned(),
                format!("changed from {first} to {second}")
            ),
            ("dr-patel".to_owned(), format!("set {first}")),
        ]
    );
    let me = app.gql(Some(&chen), "{ me { hpii } }", json!({})).await;
    assert_eq!(me["data"]["me"]["hpii"], first.as_str(), "{me}");
}

#[tokio::test]
async fn mail_for_an_hpii_nobody_holds_waits_unassigned_for_free_and_goes_to_no_practitioner() {
    let app = spawn_app().await;
    let (chen, patel) = app.inbox_practice("clinic-1").await;
    let nobodys = valid_hpii("800361555000555");
    // The first acknowledgement fails, so the provider lists the messages again: each must
    // still be stored once.
    app.inject_fault("argus", "inbox", "server_error", 1, json!({}))
        .await;

    app.send_inbound(Some(&nobodys), "For a locum who left")
        .await;
    app.send_inbound(None, "Addressed to the practice").await;

    let waiting = app.unassigned_eventually(&patel, 2).await;
    app.argus_inbox_drained().await;
    let waiting_again = app.unassigned_eventually(&chen, 2).await;
    assert_eq!(
        waiting, waiting_again,
        "stored once, seen alike by every practitioner"
    );
    for edge in &waiting {
        let node = &edge["node"];
        assert_eq!(node["unassigned"], true);
        assert_eq!(node["direction"], "INBOUND");
        assert_eq!(node["provider"], "ARGUS");
        assert_eq!(node["creditsCharged"], 0);
    }
    let addressed: Vec<&Value> = waiting
        .iter()
        .map(|edge| &edge["node"]["addressedToHpii"])
        .collect();
    assert!(addressed.contains(&&json!(nobodys)), "{addressed:?}");
    assert!(addressed.contains(&&Value::Null), "{addressed:?}");
    // Not handed to the first practitioner linked (Dr Chen), nor to anyone else.
    for token in [&chen, &patel] {
        assert_eq!(
            edges(&app.gql(Some(token), INBOUND, json!({})).await, "messages"),
            Vec::<Value>::new()
        );
    }
    assert_eq!(app.count_rows("messages").await, 2);
    assert_eq!(
        app.count_rows("ledger_entries").await,
        0,
        "receiving is free"
    );
}

#[tokio::test]
async fn a_practitioner_reads_and_claims_an_unassigned_message_which_then_is_theirs_alone() {
    let app = spawn_app().await;
    let (chen, patel) = app.inbox_practice("clinic-1").await;
    let admin = administrator("manager", "clinic-1");
    let patel_hpii = valid_hpii("800361555000111");
    app.gql(Some(&patel), SET_HPII, json!({"h": patel_hpii}))
        .await;
    let mut received = Subscription::open_query(
        &app,
        json!({"Authorization": format!("Bearer {patel}")}),
        "subscription { messageReceived { id unassigned } }",
    )
    .await
    .unwrap();
    // A message addressed to Dr Patel first proves the subscription is listening.
    app.send_inbound(Some(&patel_hpii), "Addressed to Dr Patel")
        .await;
    let direct = received.next_data().await;
    assert_eq!(direct["messageReceived"]["unassigned"], false, "{direct}");
    app.send_inbound(None, "Nobody's referral text").await;
    let waiting = app.unassigned_eventually(&patel, 1).await;
    let id = waiting[0]["node"]["id"].as_str().unwrap().to_owned();

    let read = app
        .gql(
            Some(&patel),
            "query($id: ID!) { message(id: $id) { unassigned sections { body } } }",
            json!({"id": id}),
        )
        .await;
    assert!(
        read.to_string().contains("Nobody's referral text"),
        "{read}"
    );
    assert_eq!(read["data"]["message"]["unassigned"], true);
    let acknowledge_first = app
        .gql(
            Some(&patel),
            "mutation($id: ID!) { acknowledgeMessage(id: $id) { status } }",
            json!({"id": id}),
        )
        .await;
    assert_eq!(
        error_code(&acknowledge_first),
        Some("NOT_FOUND"),
        "claim before acknowledging: {acknowledge_first}"
    );

    let claimed = app.gql(Some(&patel), ASSIGN, json!({"id": id})).await;
    assert_eq!(
        claimed["data"]["assignMessage"]["unassigned"], false,
        "{claimed}"
    );
    let again = app.gql(Some(&chen), ASSIGN, json!({"id": id})).await;
    assert_eq!(error_code(&again), Some("CONFLICT"), "{again}");
    assert!(
        again["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("already assigned")
    );

    let notified = received.next_data().await;
    assert_eq!(notified["messageReceived"]["id"], id.as_str(), "{notified}");
    let mine = edges(&app.gql(Some(&patel), INBOUND, json!({})).await, "messages");
    assert!(mine.iter().any(|edge| edge["node"]["id"] == id.as_str()));
    assert_eq!(
        edges(&app.gql(Some(&chen), INBOUND, json!({})).await, "messages"),
        Vec::<Value>::new(),
        "the losing claimant holds nothing"
    );
    assert!(app.unassigned_eventually(&chen, 0).await.is_empty());
    let denied_read = app
        .gql(
            Some(&chen),
            "query($id: ID!) { message(id: $id) { id } }",
            json!({"id": id}),
        )
        .await;
    assert_eq!(
        error_code(&denied_read),
        Some("NOT_FOUND"),
        "now Dr Patel's alone"
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

    let events = app.audit_events(&admin).await;
    let target = format!("message:{id}");
    let about: Vec<(&str, &str, &str)> = events
        .iter()
        .filter(|event| event["target"] == target.as_str())
        .map(|event| {
            (
                event["action"].as_str().unwrap(),
                event["actor"].as_str().unwrap(),
                event["outcome"].as_str().unwrap(),
            )
        })
        .collect();
    assert!(
        about.contains(&("READ_MESSAGE", "dr-patel", "SUCCESS")),
        "{about:?}"
    );
    assert!(
        about.contains(&("ASSIGN_MESSAGE", "dr-patel", "SUCCESS")),
        "{about:?}"
    );
    assert!(
        about.contains(&("ASSIGN_MESSAGE", "dr-chen", "DENIED")),
        "{about:?}"
    );
    assert!(
        !serde_json::to_string(&events)
            .unwrap()
            .contains("Nobody's referral text")
    );
}

#[tokio::test]
async fn an_administrator_sees_the_unassigned_envelope_and_hands_it_on_but_never_sees_its_content()
{
    let app = spawn_app().await;
    let (_chen, patel) = app.inbox_practice("clinic-1").await;
    let admin = administrator("manager", "clinic-1");
    let secret = "Confidential biopsy result";
    app.send_inbound(None, secret).await;

    let envelope = app.unassigned_eventually(&admin, 1).await;
    let node = &envelope[0]["node"];
    let id = node["id"].as_str().unwrap().to_owned();
    assert!(
        node["counterpartName"]
            .as_str()
            .is_some_and(|name| !name.is_empty())
    );
    assert!(
        node["counterpartId"]
            .as_str()
            .is_some_and(|hpii| hpii.len() == 16)
    );
    assert!(node["createdAt"].is_string());
    assert_eq!(node["provider"], "ARGUS");

    let with_content = app
        .gql(
            Some(&admin),
            "{ unassignedMessages { edges { node { id sections { title body } } } } }",
            json!({}),
        )
        .await;
    assert_eq!(
        error_code(&with_content),
        Some("FORBIDDEN"),
        "{with_content}"
    );
    assert!(!with_content.to_string().contains(secret));
    let read = app
        .gql(
            Some(&admin),
            "query($id: ID!) { message(id: $id) { sections { body } } }",
            json!({"id": id}),
        )
        .await;
    assert_eq!(error_code(&read), Some("FORBIDDEN"), "{read}");
    assert!(!read.to_string().contains(secret));

    let to_self = app.gql(Some(&admin), ASSIGN, json!({"id": id})).await;
    assert_eq!(error_code(&to_self), Some("BAD_USER_INPUT"), "{to_self}");
    let to_nobody = app
        .gql(Some(&admin), ASSIGN, json!({"id": id, "to": "manager"}))
        .await;
    assert_eq!(
        error_code(&to_nobody),
        Some("NOT_FOUND"),
        "only practitioners: {to_nobody}"
    );
    let handed = app
        .gql(Some(&admin), ASSIGN, json!({"id": id, "to": "dr-patel"}))
        .await;
    assert_eq!(
        handed["data"]["assignMessage"]["unassigned"], false,
        "{handed}"
    );
    assert!(!handed.to_string().contains(secret));
    let patels = edges(&app.gql(Some(&patel), INBOUND, json!({})).await, "messages");
    assert_eq!(patels.len(), 1);
    assert_eq!(patels[0]["node"]["id"], id.as_str());
    let reads: Vec<Value> = app
        .audit_events(&admin)
        .await
        .into_iter()
        .filter(|event| event["action"] == "READ_MESSAGE")
        .collect();
    assert_eq!(reads, Vec::<Value>::new(), "nobody read the content");
}

#[tokio::test]
async fn another_practice_sees_none_of_the_unassigned_inbox_and_cannot_claim_or_read_it() {
    let app = spawn_app().await;
    let (chen, patel) = app.inbox_practice("clinic-1").await;
    let patel_hpii = valid_hpii("800361555000111");
    app.gql(Some(&patel), SET_HPII, json!({"h": patel_hpii}))
        .await;
    app.send_inbound(None, "Clinic one only").await;
    let waiting = app.unassigned_eventually(&chen, 1).await;
    let id = waiting[0]["node"]["id"].as_str().unwrap().to_owned();
    let outsider = practitioner("dr-other", "clinic-2");
    let outside_admin = administrator("other-manager", "clinic-2");

    for token in [&outsider, &outside_admin] {
        assert_eq!(
            edges(
                &app.gql(Some(token), UNASSIGNED, json!({})).await,
                "unassignedMessages"
            ),
            Vec::<Value>::new()
        );
    }
    let read = app
        .gql(
            Some(&outsider),
            "query($id: ID!) { message(id: $id) { sections { body } } }",
            json!({"id": id}),
        )
        .await;
    assert_eq!(error_code(&read), Some("NOT_FOUND"), "{read}");
    let claim = app.gql(Some(&outsider), ASSIGN, json!({"id": id})).await;
    assert_eq!(error_code(&claim), Some("NOT_FOUND"), "{claim}");
    let handed = app
        .gql(
            Some(&outside_admin),
            ASSIGN,
            json!({"id": id, "to": "dr-other"}),
        )
        .await;
    assert_eq!(error_code(&handed), Some("NOT_FOUND"), "{handed}");
    // Uniqueness is per practice: another practice's practitioner may hold the same HPI-I.
    let same = app
        .gql(Some(&outsider), SET_HPII, json!({"h": patel_hpii}))
        .await;
    assert_eq!(same["data"]["setMyHpii"], true, "{same}");

    assert_eq!(
        app.unassigned_eventually(&chen, 1).await,
        waiting,
        "still waiting in clinic-1"
    );
    assert!(!read.to_string().contains("Clinic one only"));
    let outside_audit = app.audit_events(&outside_admin).await;
    assert!(
        outside_audit
            .iter()
            .all(|event| event["action"] != "ASSIGN_MESSAGE" && event["action"] != "READ_MESSAGE"),
        "{outside_audit:#?}"
    );
}

#[tokio::test]
async fn forty_practitioners_claiming_one_hpii_at_once_give_exactly_one_holder_and_39_conflicts() {
    let app = spawn_app().await;
    let hpii = valid_hpii("800361555000666");
    let tokens: Vec<String> = (0..40)
        .map(|n| practitioner(&format!("dr-{n:02}"), "clinic-1"))
        .collect();
    // Provision everyone first, so the race is about the HPI-I alone.
    for token in &tokens {
        let me = app.gql(Some(token), "{ me { id } }", json!({})).await;
        assert!(me["data"]["me"]["id"].is_string(), "{me}");
    }

    let answers = futures::future::join_all(
        tokens
            .iter()
            .map(|token| app.gql(Some(token), SET_HPII, json!({"h": hpii}))),
    )
    .await;

    let successes = answers
        .iter()
        .filter(|answer| answer["data"]["setMyHpii"] == true)
        .count();
    let conflicts = answers
        .iter()
        .filter(|answer| error_code(answer) == Some("CONFLICT"))
        .count();
    assert_eq!((successes, conflicts), (1, 39), "{answers:#?}");
    let mut holders = 0;
    for token in &tokens {
        let me = app.gql(Some(token), "{ me { hpii } }", json!({})).await;
        if me["data"]["me"]["hpii"] == hpii.as_str() {
            holders += 1;
        } else {
            assert_eq!(me["data"]["me"]["hpii"], Value::Null, "{me}");
        }
    }
    assert_eq!(holders, 1, "exactly one practitioner holds it");
}

#[tokio::test]
async fn forty_practitioners_claiming_one_unassigned_message_at_once_give_exactly_one_owner() {
    let app = spawn_app().await;
    let (chen, _patel) = app.inbox_practice("clinic-1").await;
    let admin = administrator("manager", "clinic-1");
    app.send_inbound(None, "Whoever is free").await;
    let id = app.unassigned_eventually(&chen, 1).await[0]["node"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let tokens: Vec<String> = (0..40)
        .map(|n| practitioner(&format!("dr-{n:02}"), "clinic-1"))
        .collect();
    for token in &tokens {
        app.gql(Some(token), "{ me { id } }", json!({})).await;
    }

    let answers = futures::future::join_all(
        tokens
            .iter()
            .map(|token| app.gql(Some(token), ASSIGN, json!({"id": id}))),
    )
    .await;

    let winners: Vec<usize> = answers
        .iter()
        .enumerate()
        .filter(|(_, answer)| answer["data"]["assignMessage"]["id"] == id.as_str())
        .map(|(index, _)| index)
        .collect();
    let conflicts = answers
        .iter()
        .filter(|answer| error_code(answer) == Some("CONFLICT"))
        .count();
    assert_eq!((winners.len(), conflicts), (1, 39), "{answers:#?}");
    for (index, token) in tokens.iter().enumerate() {
        let held = edges(&app.gql(Some(token), INBOUND, json!({})).await, "messages").len();
        assert_eq!(held, usize::from(index == winners[0]), "dr-{index:02}");
    }
    assert!(app.unassigned_eventually(&chen, 0).await.is_empty());
    let assigned = app
        .audit_events(&admin)
        .await
        .into_iter()
        .filter(|event| event["action"] == "ASSIGN_MESSAGE")
        .map(|event| event["outcome"].as_str().unwrap().to_owned())
        .collect::<Vec<_>>();
    assert_eq!(assigned.iter().filter(|o| *o == "SUCCESS").count(), 1);
    assert_eq!(assigned.iter().filter(|o| *o == "DENIED").count(), 39);
}
