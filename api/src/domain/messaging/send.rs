//! Sending: a note's chosen sections become an HL7 referral, queued with its 3-credit debit in
//! one transaction; replays of an idempotency key answer with the same message.

use chrono::Utc;

use super::directory::Reach;
use super::{MessagingService, StoredPayload, actions, practitioner_only};
use crate::domain::GatewayError;
use crate::domain::audit::{AuditEntry, AuditOutcome, Principal};
use crate::domain::credits::{CREDITS_PER_MESSAGE, IdempotencyKey};
use crate::domain::hl7;
use crate::domain::types::{ConnectionStatus, Direction, Hpii, MessageId, MessageStatus, Provider};
use crate::store::messaging::MessageRow;

/// What a practitioner asks to send.
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
}

/// The answer to a send.
#[derive(Debug, Clone)]
pub struct SendResult {
    /// The queued (or replayed) message.
    pub message: MessageRow,
    /// Credits left after the debit.
    pub credits_remaining: i64,
}

impl MessagingService {
    /// Queues a note's chosen sections for a recipient, debiting 3 credits in the same
    /// transaction; replays of the idempotency key return the same message, charged once.
    pub async fn send(
        &self,
        principal: &Principal,
        request: SendRequest,
    ) -> Result<SendResult, GatewayError> {
        practitioner_only(principal, "send secure messages")?;
        let fingerprint_sections = request.section_keys.join(",");
        if let Some(existing) = self
            .store
            .find_message_by_key(&principal.user_id, request.idempotency_key.as_str())
            .await?
        {
            return self
                .replay_send(principal, existing, &request, &fingerprint_sections)
                .await;
        }
        let note_row = self
            .store
            .find_note(&principal.user_id, &request.note_id)
            .await?
            .ok_or_else(|| {
                GatewayError::NotFound(format!("you have no clinical note {:?}", request.note_id))
            })?;
        let note = self.open_note(&note_row)?;
        if request.section_keys.is_empty() {
            return Err(GatewayError::BadUserInput(
                "sectionKeys: choose at least one section to share".into(),
            ));
        }
        let unknown: Vec<&str> = request
            .section_keys
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
        if Hpii::parse(&request.recipient_hpii).is_err() {
            return Err(GatewayError::BadUserInput(
                "recipientId must be a 16-digit HPI-I from searchPractitioners".into(),
            ));
        }
        // The caller's own connections.
        let integrations = self.integrations.integrations(principal).await?;
        let own_active: Vec<Provider> = integrations
            .iter()
            .filter(|view| view.individual_status == ConnectionStatus::Active)
            .map(|view| view.provider)
            .collect();
        if let Some(provider) = request.provider
            && !own_active.contains(&provider)
        {
            return Err(GatewayError::IntegrationNotActive(format!(
                "your {provider} connection is not ACTIVE; link your own {provider} account (Use Existing Account) first"
            )));
        }
        if own_active.is_empty() {
            return Err(GatewayError::IntegrationNotActive(
                "you have no ACTIVE Argus or ReferralNet connection; link your own account under Integrations".into(),
            ));
        }
        // The sender's identity in the referral: required, and checked before any directory
        // call or charge.
        let Some(sender_hpii) = self.my_hpii(principal).await? else {
            return Err(GatewayError::BadUserInput(
                "set your HPI-I before sending: it identifies you as the sender in the referral (mutation { setMyHpii(hpii: \"<your 16-digit HPI-I>\") })".into(),
            ));
        };
        let Reach {
            entry,
            reaching: reach,
            unanswered,
        } = self.reach(principal, &request.recipient_hpii).await?;
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
        if let Some(provider) = request.provider
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
                request.recipient_hpii
            )));
        };
        let name = format!("Dr {} {}", entry.given_name, entry.family_name);
        let provider = match request.provider {
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
            None => match self.route(&principal.group_id, &reach, &own_active).await? {
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
        let patient = self.patient(principal, &note.patient_id).await?;
        let message_id = MessageId::generate();
        let chosen: Vec<hl7::Section> = note
            .sections
            .iter()
            .filter(|section| request.section_keys.contains(&section.key))
            .map(|section| hl7::Section {
                key: section.key.clone(),
                title: section.title.clone(),
                body: section.body.clone(),
            })
            .collect();
        let payload = hl7::build_referral(&hl7::Referral {
            control_id: message_id.to_string(),
            sent_at: Utc::now(),
            sending_application: "SMD Gateway".into(),
            sender: hl7::Party {
                hpii: sender_hpii.as_str().to_owned(),
                family_name: principal.name.clone(),
                given_name: String::new(),
                organisation: None,
            },
            recipient: hl7::Party {
                hpii: entry.hpii.clone(),
                family_name: entry.family_name.clone(),
                given_name: entry.given_name.clone(),
                organisation: Some(entry.organisation.clone()),
            },
            patient: hl7::PatientDetails {
                id: patient.id.clone(),
                family_name: patient.family_name.clone(),
                given_name: patient.given_name.clone(),
                date_of_birth: patient.date_of_birth,
            },
            note_title: note.title.clone(),
            sections: chosen,
        });
        let stored = StoredPayload {
            hl7: payload,
            section_keys: request.section_keys.clone(),
        };
        let sealed = self
            .secrets
            .seal(
                &serde_json::to_string(&stored).map_err(GatewayError::internal)?,
                &format!("message/{}/{message_id}", principal.group_id),
            )
            .map_err(GatewayError::internal)?;
        let now = Utc::now();
        let row = MessageRow {
            id: message_id.clone(),
            group_id: principal.group_id.clone(),
            owner_user_id: Some(principal.user_id.clone()),
            direction: Direction::Outbound,
            provider,
            status: MessageStatus::Queued,
            counterpart_hpii: entry.hpii.clone(),
            counterpart_name: name,
            note_id: Some(note.id.clone()),
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
        };
        let mut bought = false;
        loop {
            // Everything the transaction needs is read before it opens: a pool read while
            // holding the write transaction could wait on the very connections it blocks.
            let card = self.credits.card_for_top_up(&principal.group_id).await?;
            let txn = self.store.begin_credit_transaction().await?;
            match self
                .credits
                .debit_send_in(&txn, principal, message_id.as_str(), card)
                .await?
            {
                Ok((balance, top_up)) => {
                    if let Err(error) = self.store.insert_message_in(&txn, &row).await {
                        txn.rollback().await?;
                        // A concurrent duplicate with the same key won: answer with its message.
                        if let Some(existing) = self
                            .store
                            .find_message_by_key(
                                &principal.user_id,
                                request.idempotency_key.as_str(),
                            )
                            .await?
                        {
                            return self
                                .replay_send(principal, existing, &request, &fingerprint_sections)
                                .await;
                        }
                        return Err(error.into());
                    }
                    let audit = AuditEntry::by(
                        principal,
                        actions::SEND_MESSAGE,
                        format!("message:{message_id}"),
                        AuditOutcome::Success,
                    )
                    .with_detail(format!(
                        "{} to {} ({} sections)",
                        provider.code(),
                        entry.hpii,
                        request.section_keys.len()
                    ));
                    self.store.audit_in(&txn, &audit).await?;
                    txn.commit().await?;
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
                        return Err(GatewayError::InsufficientCredits(format!(
                            "you have {balance} credits and sending costs {CREDITS_PER_MESSAGE}; buy credits, or send with topUpIfShort"
                        )));
                    }
                    self.credits
                        .buy_for_send(principal, request.idempotency_key.as_str())
                        .await?;
                    bought = true;
                }
            }
        }
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
