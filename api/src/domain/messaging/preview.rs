//! The sharing preview: exactly what a send of the same input would transmit — recipient,
//! provider after routing, the chosen sections, the cost and whether a purchase would be
//! needed, and the HL7 text — composed by the same code as a send (`send.rs`'s `prepare` and
//! `Prepared::referral`). It charges nothing and stores nothing but one audit row, which names
//! the note, the recipient and the section count, never their content.

use chrono::Utc;

use super::{MessagingService, actions};
use crate::domain::GatewayError;
use crate::domain::audit::{AuditOutcome, Principal};
use crate::domain::credits::CREDITS_PER_MESSAGE;
use crate::domain::hl7;
use crate::domain::pricing::CreditPack;
use crate::domain::types::{Hpii, Provider};

/// A send's input without its idempotency key.
#[derive(Debug, Clone)]
pub struct PreviewRequest {
    /// The note.
    pub note_id: String,
    /// Which sections to share.
    pub section_keys: Vec<String>,
    /// The recipient's HPI-I.
    pub recipient_hpii: String,
    /// Through which provider (`None`: let the gateway choose).
    pub provider: Option<Provider>,
    /// Whether the send would buy credits if short (changes nothing here; shown back).
    pub top_up_if_short: bool,
    /// Preview as this practitioner (their `sub`), under the delegation they granted the caller.
    pub on_behalf_of: Option<String>,
}

/// What would leave the gateway.
#[derive(Debug, Clone)]
pub struct Preview {
    /// Whose message it would be (`sub`).
    pub sender_subject: String,
    /// Their name, as the referral carries it.
    pub sender_name: String,
    /// Their HPI-I, the referral's sender.
    pub sender_hpii: Hpii,
    /// The recipient's HPI-I.
    pub recipient_hpii: String,
    /// The recipient's name.
    pub recipient_name: String,
    /// The provider it would go through.
    pub provider: Provider,
    /// The note's sections that would be shared, in the note's order.
    pub sections: Vec<hl7::Section>,
    /// What the send costs.
    pub cost_credits: i64,
    /// The sender's balance now.
    pub balance: i64,
    /// Whether the balance is short of the cost (the send then needs `topUpIfShort`, or it is
    /// refused with `INSUFFICIENT_CREDITS`).
    pub buy_at_send_needed: bool,
    /// The pack a short send would buy.
    pub buy_at_send_pack: Option<CreditPack>,
    /// Whether the input asked to buy when short.
    pub top_up_if_short: bool,
    /// The referral's HL7 text (its control id and time are set again when it is sent).
    pub hl7: String,
}

/// The control id a preview's HL7 carries in place of the message id a send assigns.
pub const PREVIEW_CONTROL_ID: &str = "PREVIEW";

impl MessagingService {
    /// Composes what a send of `request` would transmit, with the same permissions as a send
    /// (a delegate needs a live grant). Charges nothing; stores one audit row.
    pub async fn preview(
        &self,
        principal: &Principal,
        request: PreviewRequest,
    ) -> Result<Preview, GatewayError> {
        let acting = self
            .acting(
                principal,
                request.on_behalf_of.as_deref(),
                actions::PREVIEW_MESSAGE,
                "preview secure messages",
            )
            .await?;
        let owner = &acting.owner;
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
        let hl7 = prepared.referral(owner, PREVIEW_CONTROL_ID, Utc::now());
        let wallet = self.credits.credits(owner, None).await?.wallet;
        let buy_at_send_needed = wallet.balance < CREDITS_PER_MESSAGE;
        let buy_at_send_pack = buy_at_send_needed.then(|| self.credits.buy_at_send_pack(&wallet));
        self.audit(
            acting
                .audit(
                    actions::PREVIEW_MESSAGE,
                    format!("note:{}", prepared.note.id),
                    AuditOutcome::Success,
                )
                .with_detail(format!(
                    "{} to {} ({} sections)",
                    prepared.provider.code(),
                    prepared.entry.hpii,
                    prepared.chosen.len()
                )),
        )
        .await;
        Ok(Preview {
            sender_subject: owner.subject.clone(),
            sender_name: owner.name.clone(),
            sender_hpii: prepared.sender_hpii,
            recipient_hpii: prepared.entry.hpii,
            recipient_name: prepared.recipient_name,
            provider: prepared.provider,
            sections: prepared.chosen,
            cost_credits: CREDITS_PER_MESSAGE,
            balance: wallet.balance,
            buy_at_send_needed,
            buy_at_send_pack,
            top_up_if_short: request.top_up_if_short,
            hl7,
        })
    }
}
