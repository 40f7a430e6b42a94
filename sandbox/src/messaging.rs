//! Each namespace's messages: what accounts sent through Argus and ReferralNet (payload byte for
//! byte, with the delivery timeline fixed at acceptance), what directory practitioners sent to
//! accounts' inboxes, and ReferralNet accounts' webhook settings with the progress of pushes.
//!
//! A sent message's status is never stored: it is read off its timeline against the sandbox
//! clock, so advancing the clock moves every message along at once.

use std::collections::{BTreeSet, HashMap};
use std::ops::RangeInclusive;

use chrono::{DateTime, Duration, SubsecRound, Utc};
use rand::Rng;
use rand::distributions::Alphanumeric;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::directory::{DirectoryEntry, MagicBehaviour, UNDELIVERABLE_REASON};
use crate::hl7;
use crate::provider::Provider;
use crate::random::NamespaceRandom;

/// Sandbox seconds from acceptance to delivery (or failure).
const DELIVERY_DELAY_SECONDS: i64 = 5;
/// Sandbox seconds from acceptance to delivery for the Slow-Delivery recipient.
const SLOW_DELIVERY_DELAY_SECONDS: i64 = 60 * 60;
/// Sandbox seconds from delivery to the recipient's acknowledgement.
const ACKNOWLEDGEMENT_DELAY_SECONDS: i64 = 10;
/// How many random capitals and digits follow the prefix of a generated id.
const ID_RANDOM_CHARACTERS: usize = 20;
/// The clinical system every directory practitioner runs, as MSH-3 names it.
pub(crate) const PRACTITIONER_APPLICATION: &str = "SANDBOX-PMS";

/// A new id: `prefix` and random capitals and digits, drawn from the namespace's stream.
pub(crate) fn random_id(prefix: &str, random: &mut NamespaceRandom) -> String {
    let random: String = random
        .next_generator()
        .sample_iter(Alphanumeric)
        .map(char::from)
        .map(|character| character.to_ascii_uppercase())
        .take(ID_RANDOM_CHARACTERS)
        .collect();
    format!("{prefix}{random}")
}

/// Whether `id` is a valid client message id: 1 to 64 of `A-Z a-z 0-9 . _ : -`.
pub(crate) fn is_valid_client_message_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b"._:-".contains(&byte))
}

/// A whole-number query parameter: `default` when absent or empty; otherwise it must be a
/// number in `range`. The error says what is wrong, in the caller's words.
pub(crate) fn count_parameter(
    parameters: &HashMap<String, String>,
    name: &str,
    default: usize,
    range: RangeInclusive<usize>,
) -> Result<usize, String> {
    let text = match parameters.get(name).map(|value| value.trim()) {
        None | Some("") => return Ok(default),
        Some(text) => text,
    };
    let out_of_range = || {
        if *range.end() == usize::MAX {
            format!(
                "{name} must be a whole number of at least {}",
                range.start()
            )
        } else {
            format!(
                "{name} must be a whole number from {} to {}",
                range.start(),
                range.end()
            )
        }
    };
    match text.parse::<usize>() {
        Ok(value) if range.contains(&value) => Ok(value),
        _ => Err(out_of_range()),
    }
}

/// The letter of an inbound referral when the control call gives none.
pub(crate) const DEFAULT_REFERRAL_TEXT: &str =
    "Dear Doctor,\nThank you for seeing this patient for review.\nKind regards";

/// The synthetic patients inbound referrals are about: family, given, birth date, sex.
const SYNTHETIC_PATIENTS: [(&str, &str, &str, &str); 4] = [
    ("Citizen", "Jane", "19751103", "F"),
    ("Example", "John", "19620527", "M"),
    ("Sample", "Alex", "19800214", "U"),
    ("Testperson", "Sam", "20010930", "F"),
];

/// What a directory practitioner's referral to an account says.
#[derive(Debug)]
pub(crate) struct InboundReferral<'a> {
    pub(crate) provider: Provider,
    pub(crate) sender: &'a DirectoryEntry,
    /// The account's practice, as MSH-6 names it.
    pub(crate) receiving_facility: &'a str,
    pub(crate) recipient_name: &'a str,
    pub(crate) recipient_hpii: Option<&'a str>,
    pub(crate) text: &'a str,
    pub(crate) sent_at: DateTime<Utc>,
}

/// The `REF^I12` text of an inbound referral, about a synthetic patient.
pub(crate) fn inbound_referral_payload(
    referral: &InboundReferral<'_>,
    random: &mut NamespaceRandom,
) -> String {
    let mut patient_random = random.next_generator();
    let (family_name, given_name, birth_date, sex) = *SYNTHETIC_PATIENTS
        .choose(&mut patient_random)
        .expect("there are synthetic patients");
    let record_number = format!("MRN{:07}", patient_random.gen_range(0..10_000_000));
    let control_id = random_id("SBX", random);
    let receiving_application = match referral.provider {
        Provider::Argus => "ARGUS",
        Provider::ReferralNet => "REFERRALNET",
    };
    let sender = referral.sender;
    hl7::referral(&hl7::Referral {
        control_id: &control_id,
        sent_at: referral.sent_at,
        sending_application: PRACTITIONER_APPLICATION,
        sending_facility: &sender.organisation,
        receiving_application,
        receiving_facility: referral.receiving_facility,
        sender: hl7::PractitionerParty {
            given_name: sender.given_name,
            family_name: sender.family_name,
            hpii: &sender.hpii,
            suburb: sender.suburb,
            state: sender.state,
            postcode: sender.postcode,
        },
        recipient_name: referral.recipient_name,
        recipient_hpii: referral.recipient_hpii,
        patient: hl7::SyntheticPatient {
            record_number: &record_number,
            given_name,
            family_name,
            birth_date,
            sex,
        },
        text: referral.text,
    })
}

/// A point on a sent message's way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Milestone {
    Delivered,
    Acknowledged,
    Failed,
}

/// Where a sent message stands, in neutral words; each provider names it its own way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DeliveryStatus {
    Accepted,
    Delivered,
    Acknowledged,
    Failed,
}

impl DeliveryStatus {
    /// The status in `provider`'s words: Argus ACCEPTED/DELIVERED/ACKNOWLEDGED/FAILED,
    /// ReferralNet QUEUED/DELIVERED/ACKNOWLEDGED/UNDELIVERABLE.
    pub(crate) fn word(self, provider: Provider) -> &'static str {
        match (self, provider) {
            (DeliveryStatus::Accepted, Provider::Argus) => "ACCEPTED",
            (DeliveryStatus::Accepted, Provider::ReferralNet) => "QUEUED",
            (DeliveryStatus::Delivered, _) => "DELIVERED",
            (DeliveryStatus::Acknowledged, _) => "ACKNOWLEDGED",
            (DeliveryStatus::Failed, Provider::Argus) => "FAILED",
            (DeliveryStatus::Failed, Provider::ReferralNet) => "UNDELIVERABLE",
        }
    }

    fn after(milestone: Milestone) -> DeliveryStatus {
        match milestone {
            Milestone::Delivered => DeliveryStatus::Delivered,
            Milestone::Acknowledged => DeliveryStatus::Acknowledged,
            Milestone::Failed => DeliveryStatus::Failed,
        }
    }
}

/// A message an account sent, accepted by its provider.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct SentMessage {
    pub(crate) provider: Provider,
    pub(crate) account: String,
    /// Argus `trackingId` or ReferralNet `receiptId`.
    pub(crate) id: String,
    /// Argus `clientMessageId` or ReferralNet `X-RN-Message-Id`.
    pub(crate) client_message_id: String,
    pub(crate) recipient_hpii: String,
    /// The recipient's organisation, which answers with the acknowledgement.
    recipient_organisation: String,
    /// The HL7 text exactly as received.
    pub(crate) payload: String,
    pub(crate) accepted_at: DateTime<Utc>,
    /// The milestones ahead, in order, each with when it is reached.
    timeline: Vec<(Milestone, DateTime<Utc>)>,
}

/// A sent message's progress at one sandbox moment.
#[derive(Clone, Debug)]
pub(crate) struct Progress {
    pub(crate) status: DeliveryStatus,
    pub(crate) delivered_at: Option<DateTime<Utc>>,
    pub(crate) acknowledged_at: Option<DateTime<Utc>>,
    /// When the status last changed (acceptance, until a milestone is reached).
    pub(crate) updated_at: DateTime<Utc>,
    pub(crate) failure_reason: Option<&'static str>,
}

impl SentMessage {
    /// The progress at sandbox time `now`.
    pub(crate) fn progress_at(&self, now: DateTime<Utc>) -> Progress {
        let mut progress = Progress {
            status: DeliveryStatus::Accepted,
            delivered_at: None,
            acknowledged_at: None,
            updated_at: self.accepted_at,
            failure_reason: None,
        };
        for (milestone, at) in self.reached_milestones(now) {
            progress.status = DeliveryStatus::after(*milestone);
            progress.updated_at = *at;
            match milestone {
                Milestone::Delivered => progress.delivered_at = Some(*at),
                Milestone::Acknowledged => progress.acknowledged_at = Some(*at),
                Milestone::Failed => progress.failure_reason = Some(UNDELIVERABLE_REASON),
            }
        }
        progress
    }

    fn reached_milestones(&self, now: DateTime<Utc>) -> &[(Milestone, DateTime<Utc>)] {
        let reached = self.timeline.iter().filter(|(_, at)| *at <= now).count();
        &self.timeline[..reached]
    }

    /// The recipient's `RRI^I12` acknowledgement, once it has been sent by sandbox time `now`.
    pub(crate) fn acknowledgement_at(&self, now: DateTime<Utc>) -> Option<String> {
        let acknowledged_at = self.progress_at(now).acknowledged_at?;
        let control_id = format!("ACK-{}", self.id);
        Some(hl7::acknowledgement(
            &self.payload,
            &hl7::Acknowledger {
                application: PRACTITIONER_APPLICATION,
                facility: &self.recipient_organisation,
                control_id: &control_id,
                acknowledged_at,
            },
        ))
    }
}

/// A message accepted for sending, before it is recorded.
#[derive(Debug)]
pub(crate) struct NewMessage<'a> {
    pub(crate) provider: Provider,
    pub(crate) account: &'a str,
    pub(crate) client_message_id: &'a str,
    pub(crate) recipient: &'a DirectoryEntry,
    pub(crate) payload: String,
}

/// A message a directory practitioner sent to an account, waiting in its inbox.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct InboxItem {
    /// Position in the namespace's inbox; cursors are made of it.
    pub(crate) sequence: u64,
    pub(crate) provider: Provider,
    pub(crate) account: String,
    /// Argus `inboxId` or ReferralNet `itemId`.
    pub(crate) id: String,
    pub(crate) sender_hpii: String,
    pub(crate) sender_name: String,
    pub(crate) received_at: DateTime<Utc>,
    pub(crate) payload: String,
    acknowledged: bool,
}

/// A message for an inbox, before it is recorded.
#[derive(Debug)]
pub(crate) struct NewInboxItem {
    pub(crate) provider: Provider,
    pub(crate) account: String,
    pub(crate) sender_hpii: String,
    pub(crate) sender_name: String,
    pub(crate) received_at: DateTime<Utc>,
    pub(crate) payload: String,
}

/// One page of an inbox.
#[derive(Debug)]
pub(crate) struct InboxPage<'a> {
    pub(crate) items: Vec<&'a InboxItem>,
    /// The cursor to ask for the next page with, when more items wait after this page.
    pub(crate) next_cursor: Option<String>,
}

/// A ReferralNet account's webhook.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Webhook {
    pub(crate) url: String,
    pub(crate) secret: String,
}

/// What the sandbox POSTs to a webhook when a dispatch reaches a state.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct DispatchEvent {
    pub(crate) receipt_id: String,
    pub(crate) message_id: String,
    pub(crate) state: &'static str,
    pub(crate) reason: Option<&'static str>,
    pub(crate) occurred_at: DateTime<Utc>,
}

/// A push to make: one event for one account's webhook.
#[derive(Clone, Debug)]
pub(crate) struct PushJob {
    pub(crate) account: String,
    pub(crate) webhook: Webhook,
    pub(crate) event: DispatchEvent,
}

/// The messages of one namespace. A state file keeps all of it (webhook secrets included: the
/// sandbox signs pushes with them) except the lookup indexes, which are rebuilt on load.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct MessageStore {
    sent: Vec<SentMessage>,
    /// (provider, account, client message id) → index in `sent`.
    #[serde(skip)]
    by_client_message_id: HashMap<(Provider, String, String), usize>,
    /// Tracking or receipt id → index in `sent`.
    #[serde(skip)]
    by_id: HashMap<String, usize>,
    /// For each ReferralNet dispatch: how many of its milestones have been pushed (or passed
    /// with no webhook set).
    pushed_milestones: HashMap<usize, usize>,
    /// ReferralNet dispatches with milestones still to push.
    unpushed: BTreeSet<usize>,
    inbox: Vec<InboxItem>,
    #[serde(skip)]
    inbox_by_id: HashMap<String, usize>,
    /// ReferralNet account → its webhook URL.
    webhook_urls: HashMap<String, String>,
    /// ReferralNet account → its signing secret, kept once made.
    webhook_secrets: HashMap<String, String>,
}

impl MessageStore {
    /// Rebuilds the lookup indexes after loading; refuses a store whose ids repeat.
    pub(crate) fn rebuild_indexes(&mut self) -> Result<(), String> {
        self.by_client_message_id.clear();
        self.by_id.clear();
        self.inbox_by_id.clear();
        for (index, message) in self.sent.iter().enumerate() {
            let key = (
                message.provider,
                message.account.clone(),
                message.client_message_id.clone(),
            );
            if self.by_client_message_id.insert(key, index).is_some()
                || self.by_id.insert(message.id.clone(), index).is_some()
            {
                return Err(format!("sent message {} is there twice", message.id));
            }
        }
        for (index, item) in self.inbox.iter().enumerate() {
            if self.inbox_by_id.insert(item.id.clone(), index).is_some() {
                return Err(format!("inbox item {} is there twice", item.id));
            }
        }
        if let Some(index) = self
            .unpushed
            .iter()
            .chain(self.pushed_milestones.keys())
            .find(|index| **index >= self.sent.len())
        {
            return Err(format!(
                "push progress names sent message {index}, which is not there"
            ));
        }
        Ok(())
    }

    /// The message this account already sent with this client message id.
    pub(crate) fn find_sent_by_client_message_id(
        &self,
        provider: Provider,
        account: &str,
        client_message_id: &str,
    ) -> Option<&SentMessage> {
        let key = (provider, account.to_owned(), client_message_id.to_owned());
        self.by_client_message_id
            .get(&key)
            .map(|index| &self.sent[*index])
    }

    /// Records an accepted message at sandbox time `now`; its timeline follows the recipient.
    pub(crate) fn accept(
        &mut self,
        message: NewMessage<'_>,
        now: DateTime<Utc>,
        random: &mut NamespaceRandom,
    ) -> &SentMessage {
        let accepted_at = now.trunc_subsecs(0);
        let delivery_delay = match message.recipient.magic {
            Some(MagicBehaviour::SlowDelivery) => SLOW_DELIVERY_DELAY_SECONDS,
            _ => DELIVERY_DELAY_SECONDS,
        };
        let delivered_at = accepted_at + Duration::seconds(delivery_delay);
        let acknowledged_at = delivered_at + Duration::seconds(ACKNOWLEDGEMENT_DELAY_SECONDS);
        let timeline = match message.recipient.magic {
            Some(MagicBehaviour::Undeliverable) => vec![(Milestone::Failed, delivered_at)],
            Some(MagicBehaviour::NeverAcknowledges) => vec![(Milestone::Delivered, delivered_at)],
            _ => vec![
                (Milestone::Delivered, delivered_at),
                (Milestone::Acknowledged, acknowledged_at),
            ],
        };
        let id_prefix = match message.provider {
            Provider::Argus => "AT-",
            Provider::ReferralNet => "RN-",
        };
        let sent = SentMessage {
            provider: message.provider,
            account: message.account.to_owned(),
            id: random_id(id_prefix, random),
            client_message_id: message.client_message_id.to_owned(),
            recipient_hpii: message.recipient.hpii.clone(),
            recipient_organisation: message.recipient.organisation.clone(),
            payload: message.payload,
            accepted_at,
            timeline,
        };
        let index = self.sent.len();
        self.by_client_message_id.insert(
            (
                sent.provider,
                sent.account.clone(),
                sent.client_message_id.clone(),
            ),
            index,
        );
        self.by_id.insert(sent.id.clone(), index);
        if sent.provider == Provider::ReferralNet {
            self.pushed_milestones.insert(index, 0);
            self.unpushed.insert(index);
        }
        self.sent.push(sent);
        &self.sent[index]
    }

    /// The message with this tracking or receipt id, if this account of this provider sent it.
    pub(crate) fn find_sent(
        &self,
        provider: Provider,
        account: &str,
        id: &str,
    ) -> Option<&SentMessage> {
        let message = &self.sent[*self.by_id.get(id)?];
        (message.provider == provider && message.account == account).then_some(message)
    }

    /// Every accepted message, oldest first.
    pub(crate) fn sent(&self) -> &[SentMessage] {
        &self.sent
    }

    /// Puts a message in an account's inbox.
    pub(crate) fn deliver_to_inbox(
        &mut self,
        item: NewInboxItem,
        random: &mut NamespaceRandom,
    ) -> &InboxItem {
        let index = self.inbox.len();
        let id_prefix = match item.provider {
            Provider::Argus => "AIN-",
            Provider::ReferralNet => "RNI-",
        };
        let item = InboxItem {
            sequence: index as u64 + 1,
            provider: item.provider,
            account: item.account,
            id: random_id(id_prefix, random),
            sender_hpii: item.sender_hpii,
            sender_name: item.sender_name,
            received_at: item.received_at.trunc_subsecs(0),
            payload: item.payload,
            acknowledged: false,
        };
        self.inbox_by_id.insert(item.id.clone(), index);
        self.inbox.push(item);
        &self.inbox[index]
    }

    /// Up to `limit` unacknowledged items of the account, oldest first, after `after` (a cursor
    /// from an earlier page). `None` when the cursor is not one the sandbox gives.
    pub(crate) fn inbox_page(
        &self,
        provider: Provider,
        account: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Option<InboxPage<'_>> {
        let after_sequence = match after {
            None | Some("") => 0,
            Some(cursor) => cursor.parse::<u64>().ok()?,
        };
        let mut waiting = self.inbox.iter().filter(|item| {
            item.provider == provider
                && item.account == account
                && !item.acknowledged
                && item.sequence > after_sequence
        });
        let items: Vec<&InboxItem> = waiting.by_ref().take(limit).collect();
        let more_waiting = waiting.next().is_some();
        let next_cursor = match items.last() {
            Some(last) if more_waiting => Some(last.sequence.to_string()),
            _ => None,
        };
        Some(InboxPage { items, next_cursor })
    }

    /// Acknowledges an inbox item of the account; false when it has no such item.
    /// Acknowledging twice is fine.
    pub(crate) fn acknowledge_inbox_item(
        &mut self,
        provider: Provider,
        account: &str,
        id: &str,
    ) -> bool {
        let Some(index) = self.inbox_by_id.get(id) else {
            return false;
        };
        let item = &mut self.inbox[*index];
        if item.provider != provider || item.account != account {
            return false;
        }
        item.acknowledged = true;
        true
    }

    /// Sets a ReferralNet account's webhook URL, making its secret on first use.
    pub(crate) fn set_webhook(
        &mut self,
        account: &str,
        url: String,
        random: &mut NamespaceRandom,
    ) -> Webhook {
        self.webhook_urls.insert(account.to_owned(), url);
        self.webhook_secrets
            .entry(account.to_owned())
            .or_insert_with(|| random_secret(random));
        self.webhook(account).expect("just set")
    }

    /// A ReferralNet account's webhook, if set.
    pub(crate) fn webhook(&self, account: &str) -> Option<Webhook> {
        webhook_of(&self.webhook_urls, &self.webhook_secrets, account)
    }

    /// Removes a ReferralNet account's webhook URL (the secret is kept for the next one).
    pub(crate) fn remove_webhook(&mut self, account: &str) {
        self.webhook_urls.remove(account);
    }

    /// The pushes due by sandbox time `now`: for every ReferralNet dispatch, each milestone
    /// reached since the last call, in order, for the account's webhook as it is now. A
    /// milestone reached while the account has no webhook is passed over for good.
    pub(crate) fn take_due_pushes(&mut self, now: DateTime<Utc>) -> Vec<PushJob> {
        let mut jobs = Vec::new();
        let mut finished = Vec::new();
        for index in &self.unpushed {
            let message = &self.sent[*index];
            let pushed = self.pushed_milestones.entry(*index).or_default();
            let reached = message.reached_milestones(now);
            if reached.len() > *pushed {
                if let Some(webhook) =
                    webhook_of(&self.webhook_urls, &self.webhook_secrets, &message.account)
                {
                    for (milestone, at) in &reached[*pushed..] {
                        let status = DeliveryStatus::after(*milestone);
                        jobs.push(PushJob {
                            account: message.account.clone(),
                            webhook: webhook.clone(),
                            event: DispatchEvent {
                                receipt_id: message.id.clone(),
                                message_id: message.client_message_id.clone(),
                                state: status.word(Provider::ReferralNet),
                                reason: (*milestone == Milestone::Failed)
                                    .then_some(UNDELIVERABLE_REASON),
                                occurred_at: *at,
                            },
                        });
                    }
                }
                *pushed = reached.len();
            }
            if *pushed == message.timeline.len() {
                finished.push(*index);
            }
        }
        for index in finished {
            self.unpushed.remove(&index);
            self.pushed_milestones.remove(&index);
        }
        jobs
    }
}

fn webhook_of(
    urls: &HashMap<String, String>,
    secrets: &HashMap<String, String>,
    account: &str,
) -> Option<Webhook> {
    Some(Webhook {
        url: urls.get(account)?.clone(),
        secret: secrets.get(account)?.clone(),
    })
}

/// A webhook signing secret: `whsec_` and 32 random letters and digits.
fn random_secret(random: &mut NamespaceRandom) -> String {
    let random: String = random
        .next_generator()
        .sample_iter(Alphanumeric)
        .map(char::from)
        .take(32)
        .collect();
    format!("whsec_{random}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::{
        Directory, MAGIC_NEVER_ACKNOWLEDGES, MAGIC_SLOW_DELIVERY, MAGIC_UNDELIVERABLE,
    };
    use chrono::TimeZone;

    const PAYLOAD: &str =
        "MSH|^~\\&|GW|Practice|ARGUS|Clinic|20300101000000||REF^I12^REF_I12|C-1|P|2.4\r";

    fn start() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).unwrap()
    }

    fn send(
        store: &mut MessageStore,
        directory: &Directory,
        provider: Provider,
        hpii: &str,
        client_message_id: &str,
    ) -> String {
        let recipient = directory.find(hpii).unwrap();
        store
            .accept(
                NewMessage {
                    provider,
                    account: "demo",
                    client_message_id,
                    recipient,
                    payload: PAYLOAD.to_owned(),
                },
                start(),
                &mut NamespaceRandom::from_entropy(),
            )
            .id
            .clone()
    }

    #[test]
    fn a_message_is_delivered_after_five_seconds_and_acknowledged_ten_seconds_later() {
        let directory = Directory::generate(1, 50);
        let ordinary = directory.first_ordinary_on(Provider::Argus).unwrap();
        let mut store = MessageStore::default();
        let id = send(
            &mut store,
            &directory,
            Provider::Argus,
            &ordinary.hpii,
            "m1",
        );
        let message = store.find_sent(Provider::Argus, "demo", &id).unwrap();
        let at = |seconds| start() + Duration::seconds(seconds);

        assert_eq!(message.progress_at(at(4)).status, DeliveryStatus::Accepted);
        assert_eq!(message.progress_at(at(5)).status, DeliveryStatus::Delivered);
        assert_eq!(message.acknowledgement_at(at(14)), None);
        let progress = message.progress_at(at(15));
        assert_eq!(progress.status, DeliveryStatus::Acknowledged);
        assert_eq!(progress.delivered_at, Some(at(5)));
        assert_eq!(progress.updated_at, at(15));
        let acknowledgement = message.acknowledgement_at(at(15)).unwrap();
        assert!(acknowledgement.contains("\rMSA|AA|C-1\r"));
        assert!(
            store
                .find_sent(Provider::ReferralNet, "demo", &id)
                .is_none()
        );
        assert!(store.find_sent(Provider::Argus, "other", &id).is_none());
    }

    #[test]
    fn magic_recipients_fail_stay_unacknowledged_or_arrive_an_hour_late() {
        let directory = Directory::generate(1, 50);
        let mut store = MessageStore::default();
        let undeliverable = send(
            &mut store,
            &directory,
            Provider::Argus,
            MAGIC_UNDELIVERABLE,
            "a",
        );
        let silent = send(
            &mut store,
            &directory,
            Provider::Argus,
            MAGIC_NEVER_ACKNOWLEDGES,
            "b",
        );
        let slow = send(
            &mut store,
            &directory,
            Provider::Argus,
            MAGIC_SLOW_DELIVERY,
            "c",
        );
        let much_later = start() + Duration::days(1);
        let progress = |id: &str, at| {
            store
                .find_sent(Provider::Argus, "demo", id)
                .unwrap()
                .progress_at(at)
        };

        let failed = progress(&undeliverable, much_later);
        assert_eq!(failed.status, DeliveryStatus::Failed);
        assert_eq!(failed.failure_reason, Some(UNDELIVERABLE_REASON));
        assert_eq!(failed.delivered_at, None);
        assert_eq!(
            progress(&silent, much_later).status,
            DeliveryStatus::Delivered
        );
        let an_hour = start() + Duration::seconds(3600);
        assert_eq!(
            progress(&slow, an_hour - Duration::seconds(1)).status,
            DeliveryStatus::Accepted
        );
        assert_eq!(progress(&slow, an_hour).status, DeliveryStatus::Delivered);
    }

    #[test]
    fn pushes_come_once_per_milestone_in_order_and_only_with_a_webhook() {
        let directory = Directory::generate(1, 50);
        let ordinary = directory.first_ordinary_on(Provider::ReferralNet).unwrap();
        let mut store = MessageStore::default();
        let first = send(
            &mut store,
            &directory,
            Provider::ReferralNet,
            &ordinary.hpii,
            "m1",
        );
        assert!(
            store
                .take_due_pushes(start() + Duration::seconds(6))
                .is_empty()
        );

        store.set_webhook(
            "demo",
            "http://127.0.0.1:9/hook".to_owned(),
            &mut NamespaceRandom::from_entropy(),
        );
        let second = send(
            &mut store,
            &directory,
            Provider::ReferralNet,
            &ordinary.hpii,
            "m2",
        );
        let jobs = store.take_due_pushes(start() + Duration::seconds(20));
        let pushed: Vec<(&str, &str)> = jobs
            .iter()
            .map(|job| (job.event.receipt_id.as_str(), job.event.state))
            .collect();
        assert_eq!(
            pushed,
            [
                (first.as_str(), "ACKNOWLEDGED"),
                (second.as_str(), "DELIVERED"),
                (second.as_str(), "ACKNOWLEDGED")
            ]
        );
        assert!(
            store
                .take_due_pushes(start() + Duration::days(1))
                .is_empty()
        );
    }

    #[test]
    fn an_inbox_pages_with_cursors_and_hides_acknowledged_items() {
        let mut store = MessageStore::default();
        let ids: Vec<String> = (0..3)
            .map(|number| {
                store
                    .deliver_to_inbox(
                        NewInboxItem {
                            provider: Provider::Argus,
                            account: "demo".to_owned(),
                            sender_hpii: "8003610000000000".to_owned(),
                            sender_name: "Dr Test".to_owned(),
                            received_at: start(),
                            payload: format!("MSH|^~\\&|{number}"),
                        },
                        &mut NamespaceRandom::from_entropy(),
                    )
                    .id
                    .clone()
            })
            .collect();

        let page = store.inbox_page(Provider::Argus, "demo", None, 2).unwrap();
        assert_eq!(page.items.len(), 2);
        let cursor = page.next_cursor.unwrap();
        let rest = store
            .inbox_page(Provider::Argus, "demo", Some(&cursor), 2)
            .unwrap();
        assert_eq!(rest.items[0].id, ids[2]);
        assert_eq!(rest.next_cursor, None);

        assert!(store.acknowledge_inbox_item(Provider::Argus, "demo", &ids[0]));
        assert!(store.acknowledge_inbox_item(Provider::Argus, "demo", &ids[0]));
        assert!(!store.acknowledge_inbox_item(Provider::ReferralNet, "demo", &ids[1]));
        let page = store.inbox_page(Provider::Argus, "demo", None, 50).unwrap();
        assert_eq!(
            page.items.iter().map(|item| &item.id).collect::<Vec<_>>(),
            [&ids[1], &ids[2]]
        );
        assert!(
            store
                .inbox_page(Provider::Argus, "demo", Some("not-a-cursor"), 2)
                .is_none()
        );
        assert!(
            store
                .inbox_page(Provider::Argus, "other", None, 2)
                .unwrap()
                .items
                .is_empty()
        );
    }

    #[test]
    fn a_webhook_secret_is_kept_when_the_url_changes() {
        let mut store = MessageStore::default();
        let mut random = NamespaceRandom::from_entropy();
        let first = store.set_webhook("demo", "http://a.example/hook".to_owned(), &mut random);
        let second = store.set_webhook("demo", "http://b.example/hook".to_owned(), &mut random);
        assert!(first.secret.starts_with("whsec_"));
        assert_eq!(first.secret, second.secret);
        assert_eq!(second.url, "http://b.example/hook");
        store.remove_webhook("demo");
        assert!(store.webhook("demo").is_none());
    }

    #[test]
    fn client_message_ids_are_short_words() {
        assert!(is_valid_client_message_id("gw:2030-01-01_msg.1"));
        for invalid in ["", "has space", "slash/", &"x".repeat(65)] {
            assert!(!is_valid_client_message_id(invalid), "{invalid:?}");
        }
    }
}
