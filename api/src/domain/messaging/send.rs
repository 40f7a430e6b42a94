//! Sending: a note's chosen sections become an HL7 referral, queued with its 3-credit debit in
//! one transaction; replays of an idempotency key answer with the same message. A delegate
//! sends with `on_behalf_of`: everything below then uses the practitioner's note, HPI-I,
//! connections and wallet, and the grant is decided again inside the debit's transaction.
//!
//! [`MessagingService::prepare`] is shared with the preview (`preview.rs`): what a preview
//! shows is what a send of the same input composes.

use chrono::{DateTime, Utc};

use super::directory::Reach;
use super::notes::{ClinicalNote, Patient};
use super::{MessagingService, StoredPayload, actions};
use crate::domain::GatewayError;
use crate::domain::audit::{AuditOutcome, Principal};
use crate::domain::credits::{CREDITS_PER_MESSAGE, IdempotencyKey};
use crate::domain::hl7;
use crate::domain::types::{ConnectionStatus, Direction, Hpii, MessageId, MessageStatus, Provider};
use crate::providers::DirectoryEntry;
use crate::store::messaging::{AttentionMarks, MessageRow};

/// What a practitioner (or their delegate) asks to send.
#[derive(Debug, Clone)]
pub struct SendRequest {
    /// The note.
    pub note_id: String,
    /// Which sections to share.
    pub section_keys: Vec<String>,
    /// The recipient's HPI-I.
    pub recipient_hpii: String,
    /// Through which provider (`None`: let the gateway choose).
    pub provider: Option<Provider>,
    /// Exactly-once key.
    pub idempotency_key: IdempotencyKey,
    /// Buy credits if short.
    pub top_up_if_short: bool,
    /// Send as this practitioner (their `sub`), under the delegation they granted the caller.
    pub on_behalf_of: Option<String>,
}

/// The answer to a send.
#[derive(Debug, Clone)]
pub struct SendResult {
    /// The queued (or replayed) message.
    pub message: MessageRow,
    /// Credits left after the debit.
    pub credits_remaining: i64,
}

/// Everything a send decides before it charges: the note's chosen sections, the recipient,
/// the provider, and the sender's identity.
pub(super) struct Prepared {
    pub note: ClinicalNote,
    pub patient: Patient,
    pub chosen: Vec<hl7::Section>,
    pub entry: DirectoryEntry,
    pub recipient_name: String,
    pub provider: Provider,
    pub sender_hpii: Hpii,
}

impl Prepared {
    /// The referral as it leaves the gateway, with its control id and time.
    pub fn referral(&self, sender: &Principal, control_id: &str, sent_at: DateTime<Utc>) -> String {
        hl7::build_referral(&hl7::Referral {
            control_id: control_id.to_owned(),
            sent_at,
            sending_application: "SMD Gateway".into(),
            sender: hl7::Party {
                hpii: self.sender_hpii.as_str().to_owned(),
                family_name: sender.name.clone(),
                given_name: String::new(),
                organisation: None,
            },
            recipient: hl7::Party {
                hpii: self.entry.hpii.clone(),
                family_name: self.entry.family_name.clone(),
                given_name: self.entry.given_name.clone(),
                organisation: Some(self.entry.organisation.clone()),
            },
            patient: hl7::PatientDetails {
                id: self.patient.id.clone(),
                family_name: self.patient.family_name.clone(),
                given_name: self.patient.given_name.clone(),
                date_of_birth: self.patient.date_of_birth,
            },
            note_title: self.note.title.clone(),
            sections: self.chosen.clone(),
        })
    }
}

impl MessagingService {
    /// Queues a note's chosen sections for a recipient, debiting 3 credits in the same
    /// transaction; replays of the idempotency key return the same message, charged once.
    pub async fn send(
        &self,
        principal: &Principal,
        request: SendRequest,
    ) -> Result<SendResult, GatewayError> {
        let acting = self
            .acting(
                principal,
                request.on_behalf_of.as_deref(),
                actions::SEND_MESSAGE,
                "send secure messages",
            )
            .await?;
        let owner = &acting.owner;
        let fingerprint_sections = request.section_keys.join(",");
        if let Some(existing) = self
            .store
            .find_message_by_key(&owner.user_id, request.idempotency_key.as_str())
            .await?
        {
            return self
                .replay_send(owner, existing, &request, &fingerprint_sections)
                .await;
        }
        let prepared = self
            .prepare(
                owner,
                acting.delegated(),
                &request.note_id,
                &request.section_keys,
                &request.recipient_hpii,
                request.provider,
            )
            .await?;
        let provider = prepared.provider;
        let message_id = MessageId::generate();
        let payload = prepared.referral(owner, message_id.as_str(), Utc::now());
        let stored = StoredPayload {
            hl7: payload,
            section_keys: request.section_keys.clone(),
        };
        let sealed = self
            .secrets
            .seal(
                &serde_json::to_string(&stored).map_err(GatewayError::internal)?,
                &format!("message/{}/{message_id}", owner.group_id),
            )
            .map_err(GatewayError::internal)?;
        let now = Utc::now();
        let row = MessageRow {
            id: message_id.clone(),
            group_id: owner.group_id.clone(),
            owner_user_id: Some(owner.user_id.clone()),
            direction: Direction::Outbound,
            provider,
            status: MessageStatus::Queued,
            counterpart_hpii: prepared.entry.hpii.clone(),
            counterpart_name: prepared.recipient_name.clone(),
            note_id: Some(prepared.note.id.clone()),
            payload_ciphertext: sealed,
            idempotency_key: Some(request.idempotency_key.as_str().to_owned()),
            provider_reference: None,
            failure_reason: None,
            credits_charged: CREDITS_PER_MESSAGE,
            refunded: false,
            ambiguous: false,
            attempts: 0,
            next_attempt_at: Some(now),
            created_at: now,
            sent_at: None,
            delivered_at: None,
            acknowledged_at: None,
            addressed_hpii: None,
            attention: AttentionMarks::default(),
        };
        let mut bought = false;
        loop {
            // Everything the transaction needs is read before it opens: a pool read while
            // holding the write transaction could wait on the very connections it blocks.
            let card = self.credits.card_for_top_up(&owner.group_id).await?;
            let txn = self.store.begin_credit_transaction().await?;
            // A delegated send is decided here, on the grant held by this transaction: a
            // revoke that committed first is seen, and one that comes later waits for this
            // transaction, so no send commits after its revoke.
            if let Err(refusal) = self.delegation_holds_in(&txn, &acting).await? {
                txn.rollback().await?;
                return Err(self
                    .record_refusal(&acting, actions::SEND_MESSAGE, refusal)
                    .await);
            }
            match self
                .credits
                .debit_send_in(&txn, owner, message_id.as_str(), card)
                .await?
            {
                Ok((balance, top_up)) => {
                    if let Err(error) = self.store.insert_message_in(&txn, &row).await {
                        txn.rollback().await?;
                        // A concurrent duplicate with the same key won: answer with its message.
                        if let Some(existing) = self
                            .store
                            .find_message_by_key(&owner.user_id, request.idempotency_key.as_str())
                            .await?
                        {
                            return self
                                .replay_send(owner, existing, &request, &fingerprint_sections)
                                .await;
                        }
                        return Err(error.into());
                    }
                    let audit = acting
                        .audit(
                            actions::SEND_MESSAGE,
                            format!("message:{message_id}"),
                            AuditOutcome::Success,
                        )
                        .with_detail(format!(
                            "{} to {} ({} sections)",
                            provider.code(),
                            prepared.entry.hpii,
                            request.section_keys.len()
                        ));
                    self.store.audit_in(&txn, &audit).await?;
                    txn.commit().await?;
                    self.outbox_wake.notify_one();
                    self.events.message_changed(&row.group_id, row.id.as_str());
                    self.credits.after_commit(top_up);
                    return Ok(SendResult {
                        message: row,
                        credits_remaining: balance,
                    });
                }
                Err(balance) => {
                    txn.rollback().await?;
                    if !request.top_up_if_short || bought {
                        let whose = if acting.delegated() {
                            format!("{} has", owner.subject)
                        } else {
                            "you have".to_owned()
                        };
                        return Err(GatewayError::InsufficientCredits(format!(
                            "{whose} {balance} credits and sending costs {CREDITS_PER_MESSAGE}; buy credits, or send with topUpIfShort"
                        )));
                    }
                    self.credits
                        .buy_for_send(owner, request.idempotency_key.as_str())
                        .await?;
                    bought = true;
                }
            }
        }
    }

    /// Checks a send's input and decides what it would transmit, as `owner` (the
    /// practitioner whose note, connections and HPI-I are used): the note's chosen sections,
    /// the recipient's directory entry, the provider (after routing) and the sender's HPI-I.
    /// Charges and stores nothing.
    pub(super) async fn prepare(
        &self,
        owner: &Principal,
        delegated: bool,
        note_id: &str,
        section_keys: &[String],
        recipient_hpii: &str,
        requested_provider: Option<Provider>,
    ) -> Result<Prepared, GatewayError> {
        let note_row = self
            .store
            .find_note(&owner.user_id, note_id)
            .await?
            .ok_or_else(|| {
                GatewayError::NotFound(if delegated {
                    format!("{} has no clinical note {note_id:?}", owner.subject)
                } else {
                    format!("you have no clinical note {note_id:?}")
                })
            })?;
        let note = self.open_note(&note_row)?;
        if section_keys.is_empty() {
            return Err(GatewayError::BadUserInput(
                "sectionKeys: choose at least one section to share".into(),
            ));
        }
        let unknown: Vec<&str> = section_keys
            .iter()
            .filter(|key| !note.sections.iter().any(|section| &section.key == *key))
            .map(String::as_str)
            .collect();
        if !unknown.is_empty() {
            let known: Vec<&str> = note
                .sections
                .iter()
                .map(|section| section.key.as_str())
                .collect();
            return Err(GatewayError::BadUserInput(format!(
                "sectionKeys: the note has no section {}; its sections are {}",
                unknown.join(", "),
                known.join(", ")
            )));
        }
        if Hpii::parse(recipient_hpii).is_err() {
            return Err(GatewayError::BadUserInput(
                "recipientId must be a 16-digit HPI-I from searchPractitioners".into(),
            ));
        }
        // The sender's own connections.
        let integrations = self.integrations.integrations(owner).await?;
        let own_active: Vec<Provider> = integrations
            .iter()
            .filter(|view| view.individual_status == ConnectionStatus::Active)
            .map(|view| view.provider)
            .collect();
        if let Some(provider) = requested_provider
            && !own_active.contains(&provider)
        {
            return Err(GatewayError::IntegrationNotActive(if delegated {
                format!(
                    "{}'s {provider} connection is not ACTIVE; they must link their own {provider} account (Use Existing Account) first",
                    owner.subject
                )
            } else {
                format!(
                    "your {provider} connection is not ACTIVE; link your own {provider} account (Use Existing Account) first"
                )
            }));
        }
        if own_active.is_empty() {
            return Err(GatewayError::IntegrationNotActive(if delegated {
                format!(
                    "{} has no ACTIVE Argus or ReferralNet connection; they must link their own account under Integrations",
                    owner.subject
                )
            } else {
                "you have no ACTIVE Argus or ReferralNet connection; link your own account under Integrations".into()
            }));
        }
        // The sender's identity in the referral: required, and checked before any directory
        // call or charge.
        let Some(sender_hpii) = self.my_hpii(owner).await? else {
            return Err(GatewayError::BadUserInput(if delegated {
                format!(
                    "{} has not set an HPI-I, which identifies them as the sender in the referral; they must set it first (setMyHpii)",
                    owner.subject
                )
            } else {
                "set your HPI-I before sending: it identifies you as the sender in the referral (mutation { setMyHpii(hpii: \"<your 16-digit HPI-I>\") })".into()
            }));
        };
        let Reach {
            entry,
            reaching: reach,
            unanswered,
        } = self.reach(owner, recipient_hpii).await?;
        // A directory that did not answer says nothing about the recipient: that is a
        // transient fault to retry, never "not reachable".
        let unavailable = |provider: Provider| {
            let retry_after = unanswered
                .iter()
                .find(|(unanswered, _)| *unanswered == provider)
                .and_then(|(_, retry_after)| *retry_after);
            GatewayError::ProviderUnavailable {
                provider,
                retry_after,
            }
        };
        let unanswered_among = |providers: &[Provider]| {
            unanswered
                .iter()
                .map(|(provider, _)| *provider)
                .find(|provider| providers.contains(provider))
        };
        if let Some(provider) = requested_provider
            && !reach.contains(&provider)
            && unanswered_among(&[provider]).is_some()
        {
            return Err(unavailable(provider));
        }
        let Some(entry) = entry else {
            if let Some(provider) = unanswered_among(&own_active) {
                return Err(unavailable(provider));
            }
            return Err(GatewayError::RecipientNotReachable(format!(
                "no practitioner with HPI-I {} is listed on the providers your practice uses",
                recipient_hpii
            )));
        };
        let name = format!("Dr {} {}", entry.given_name, entry.family_name);
        let provider = match requested_provider {
            Some(provider) if reach.contains(&provider) => provider,
            Some(provider) => {
                let others: Vec<&str> = reach.iter().map(|p| p.display_name()).collect();
                return Err(GatewayError::RecipientNotReachable(format!(
                    "{name} is not on {provider}; they are reachable through {}",
                    if others.is_empty() {
                        "none of your providers".to_owned()
                    } else {
                        others.join(" and ")
                    }
                )));
            }
            None => match self.route(&owner.group_id, &reach, &own_active).await? {
                Some(provider) => provider,
                None => {
                    if let Some(provider) = unanswered_among(&own_active) {
                        return Err(unavailable(provider));
                    }
                    let others: Vec<&str> = reach.iter().map(|p| p.display_name()).collect();
                    return Err(GatewayError::RecipientNotReachable(format!(
                        "{name} is reachable only through {}, which you are not connected to",
                        others.join(" and ")
                    )));
                }
            },
        };
        let patient = self.patient(owner, &note.patient_id).await?;
        let chosen: Vec<hl7::Section> = note
            .sections
            .iter()
            .filter(|section| section_keys.contains(&section.key))
            .map(|section| hl7::Section {
                key: section.key.clone(),
                title: section.title.clone(),
                body: section.body.clone(),
            })
            .collect();
        Ok(Prepared {
            note,
            patient,
            chosen,
            entry,
            recipient_name: name,
            provider,
            sender_hpii,
        })
    }

    async fn replay_send(
        &self,
        principal: &Principal,
        existing: MessageRow,
        request: &SendRequest,
        fingerprint_sections: &str,
    ) -> Result<SendResult, GatewayError> {
        let payload = self.open_payload(&existing)?;
        let same = existing.note_id.as_deref() == Some(request.note_id.as_str())
            && existing.counterpart_hpii == request.recipient_hpii
            && payload.section_keys.join(",") == fingerprint_sections
            && request
                .provider
                .is_none_or(|provider| provider == existing.provider);
        if !same {
            return Err(GatewayError::Conflict(
                "this idempotency key was already used for a different message; use a new key for a new message".into(),
            ));
        }
        let balance = self.credits.credits(principal, None).await?.wallet.balance;
        Ok(SendResult {
            message: existing,
            credits_remaining: balance,
        })
    }
}
