//! Clinical notes, the practitioner directory, and secure messages.

use async_graphql::{Context, Enum, ID, InputObject, Object, SimpleObject};
use chrono::{DateTime, NaiveDate, Utc};

use super::audit::PageInfo;
use super::error::ApiError;
use super::types::Provider;
use super::{principal, services};
use crate::domain::credits::IdempotencyKey;
use crate::domain::messaging::{
    Attention, ClinicalNote as DomainNote, NoteSection, PreviewRequest, SendRequest, flags_of,
    needs_attention,
};
use crate::domain::types::{
    AttentionReason as DomainReason, Direction, MessageId, MessageStatus as DomainStatus,
};
use crate::events::Event;
use crate::store::messaging::MessageRow;

/// A patient of the signed-in practitioner.
#[derive(SimpleObject)]
pub struct Patient {
    /// Patient id.
    pub id: ID,
    /// Given name.
    pub given_name: String,
    /// Family name.
    pub family_name: String,
    /// Date of birth.
    pub date_of_birth: NaiveDate,
}

/// One section of a clinical note.
#[derive(SimpleObject, InputObject, Clone)]
#[graphql(input_name = "NoteSectionInput")]
pub struct Section {
    /// Machine key, unique in the note (a-z, 0-9, `_`, `-`); pass in `sectionKeys` to share it.
    pub key: String,
    /// Title people read.
    pub title: String,
    /// The text.
    pub body: String,
}

/// A clinical note of the signed-in practitioner.
#[derive(SimpleObject)]
pub struct ClinicalNote {
    /// Note id.
    pub id: ID,
    /// The patient it is about.
    pub patient_id: ID,
    /// Title.
    pub title: String,
    /// Sections, in order.
    pub sections: Vec<Section>,
    /// When it was written.
    pub created_at: Option<DateTime<Utc>>,
}

impl From<DomainNote> for ClinicalNote {
    fn from(note: DomainNote) -> Self {
        Self {
            id: ID(note.id),
            patient_id: ID(note.patient_id),
            title: note.title,
            sections: note
                .sections
                .into_iter()
                .map(|section| Section {
                    key: section.key,
                    title: section.title,
                    body: section.body,
                })
                .collect(),
            created_at: note.created_at,
        }
    }
}

/// A page of clinical notes.
#[derive(SimpleObject)]
pub struct ClinicalNoteConnection {
    /// Notes with cursors.
    pub edges: Vec<ClinicalNoteEdge>,
    /// Where this page sits.
    pub page_info: PageInfo,
}

/// A note and its cursor.
#[derive(SimpleObject)]
pub struct ClinicalNoteEdge {
    /// Pass as `after` to continue.
    pub cursor: String,
    /// The note.
    pub node: ClinicalNote,
}

/// A practitioner in the providers' directories.
#[derive(SimpleObject)]
pub struct DirectoryPractitioner {
    /// Their HPI-I; pass as `recipientId`.
    pub id: ID,
    /// Display name.
    pub name: String,
    /// Specialty.
    pub specialty: String,
    /// Organisation.
    pub organisation: String,
    /// Suburb.
    pub suburb: String,
    /// State.
    pub state: String,
    /// Postcode.
    pub postcode: String,
    /// The providers (among those your practice is active on) that reach them.
    pub providers: Vec<Provider>,
}

/// A page of directory results.
#[derive(SimpleObject)]
pub struct PractitionerSearchConnection {
    /// Results with cursors.
    pub edges: Vec<PractitionerSearchEdge>,
    /// Where this page sits.
    pub page_info: PageInfo,
    /// Providers that could not be asked (the results may miss people only they reach).
    pub warnings: Vec<String>,
}

/// A directory result and its cursor.
#[derive(SimpleObject)]
pub struct PractitionerSearchEdge {
    /// Pass as `after` to continue.
    pub cursor: String,
    /// The practitioner.
    pub node: DirectoryPractitioner,
}

/// Where a secure message is.
#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
pub enum MessageStatus {
    /// Stored and waiting for the provider.
    Queued,
    /// The provider accepted it.
    Sent,
    /// It reached the recipient's endpoint.
    Delivered,
    /// The recipient's system acknowledged it (HL7 application acknowledgement).
    Acknowledged,
    /// It could not be delivered; see `failureReason`.
    Failed,
}

impl From<DomainStatus> for MessageStatus {
    fn from(status: DomainStatus) -> Self {
        match status {
            DomainStatus::Queued => Self::Queued,
            DomainStatus::Sent => Self::Sent,
            DomainStatus::Delivered => Self::Delivered,
            DomainStatus::Acknowledged => Self::Acknowledged,
            DomainStatus::Failed => Self::Failed,
        }
    }
}

impl From<MessageStatus> for DomainStatus {
    fn from(status: MessageStatus) -> Self {
        match status {
            MessageStatus::Queued => Self::Queued,
            MessageStatus::Sent => Self::Sent,
            MessageStatus::Delivered => Self::Delivered,
            MessageStatus::Acknowledged => Self::Acknowledged,
            MessageStatus::Failed => Self::Failed,
        }
    }
}

/// Why a sent message needs its sender's attention.
#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
pub enum AttentionReason {
    /// The provider accepted it, but it has not reached the recipient's endpoint in time
    /// (by default 1 hour after `sentAt`).
    NotDelivered,
    /// It reached the recipient's endpoint, but their system has not acknowledged it in time
    /// (by default 48 hours after `deliveredAt`).
    NotAcknowledged,
    /// The provider accepted it but never delivered it (by default within 5 days of `sentAt`),
    /// so it is `FAILED`, and not refunded because the provider took it. Send it again.
    Expired,
}

impl From<DomainReason> for AttentionReason {
    fn from(reason: DomainReason) -> Self {
        match reason {
            DomainReason::NotDelivered => Self::NotDelivered,
            DomainReason::NotAcknowledged => Self::NotAcknowledged,
            DomainReason::Expired => Self::Expired,
        }
    }
}

/// Why a message needs attention, and since when.
#[derive(SimpleObject, Clone, Copy)]
pub struct MessageAttention {
    /// Why.
    pub reason: AttentionReason,
    /// When the gateway flagged it.
    pub since: DateTime<Utc>,
}

impl From<Attention> for MessageAttention {
    fn from(attention: Attention) -> Self {
        Self {
            reason: attention.reason.into(),
            since: attention.since,
        }
    }
}

/// Which way a message went.
#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
pub enum MessageDirection {
    /// Received by the practice.
    Inbound,
    /// Sent by the practitioner.
    Outbound,
}

impl From<Direction> for MessageDirection {
    fn from(direction: Direction) -> Self {
        match direction {
            Direction::Inbound => Self::Inbound,
            Direction::Outbound => Self::Outbound,
        }
    }
}

impl From<MessageDirection> for Direction {
    fn from(direction: MessageDirection) -> Self {
        match direction {
            MessageDirection::Inbound => Self::Inbound,
            MessageDirection::Outbound => Self::Outbound,
        }
    }
}

/// A secure message. Administrators see only its envelope (who, when, which provider): its
/// `sections` are `FORBIDDEN` to them.
#[derive(SimpleObject)]
#[graphql(complex)]
pub struct SecureMessage {
    /// Message id.
    pub id: ID,
    /// Sent or received.
    pub direction: MessageDirection,
    /// Through which provider.
    pub provider: Provider,
    /// Where it is.
    pub status: MessageStatus,
    /// The other practitioner's HPI-I.
    pub counterpart_id: ID,
    /// The other practitioner's name.
    pub counterpart_name: String,
    /// The note it was made from.
    pub note_id: Option<ID>,
    /// Why it failed.
    pub failure_reason: Option<String>,
    /// Credits it cost (3 for a send, 0 received).
    pub credits_charged: i64,
    /// Whether those credits were refunded.
    pub refunded: bool,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When the provider accepted it.
    pub sent_at: Option<DateTime<Utc>>,
    /// When it reached the recipient's endpoint.
    pub delivered_at: Option<DateTime<Utc>>,
    /// When the recipient's system acknowledged it.
    pub acknowledged_at: Option<DateTime<Utc>>,
    /// The HPI-I a received message was addressed to, when it named a valid one.
    pub addressed_to_hpii: Option<String>,
    /// Whether it waits in the practice's unassigned inbox (received for an HPI-I nobody in
    /// the practice holds); claim it with `assignMessage`.
    pub unassigned: bool,
    /// Set while a sent message needs your attention: not delivered in time, delivered but not
    /// acknowledged in time (each cleared when the message moves on), or expired (it stays).
    /// Null otherwise. On `messageNeedsAttention`, the flag being announced.
    pub needs_attention: Option<MessageAttention>,
    #[graphql(skip)]
    content: Option<Vec<Section>>,
}

#[async_graphql::ComplexObject]
impl SecureMessage {
    /// The shared sections: only on `message(id)`, whose reading is audited (null in lists).
    /// `FORBIDDEN` for administrators, who never see clinical content.
    async fn sections(&self, ctx: &Context<'_>) -> Result<Option<Vec<Section>>, ApiError> {
        if principal(ctx)?.role == crate::domain::types::Role::Administrator {
            return Err(ApiError::new(
                "FORBIDDEN",
                "administrators see a message's envelope (sender, time, provider), never its content",
            ));
        }
        Ok(self.content.clone())
    }
}

impl SecureMessage {
    fn from_row(row: MessageRow, content: Option<Vec<Section>>) -> Self {
        let attention = needs_attention(&row).map(MessageAttention::from);
        Self::with_attention(row, content, attention)
    }

    fn with_attention(
        row: MessageRow,
        content: Option<Vec<Section>>,
        needs_attention: Option<MessageAttention>,
    ) -> Self {
        Self {
            id: ID(row.id.into_string()),
            direction: row.direction.into(),
            provider: row.provider.into(),
            status: row.status.into(),
            counterpart_id: ID(row.counterpart_hpii),
            counterpart_name: row.counterpart_name,
            note_id: row.note_id.map(ID),
            failure_reason: row.failure_reason,
            credits_charged: row.credits_charged,
            refunded: row.refunded,
            created_at: row.created_at,
            sent_at: row.sent_at,
            delivered_at: row.delivered_at,
            acknowledged_at: row.acknowledged_at,
            addressed_to_hpii: row.addressed_hpii.map(|hpii| hpii.as_str().to_owned()),
            unassigned: row.owner_user_id.is_none(),
            needs_attention,
            content,
        }
    }
}

/// A page of messages.
#[derive(SimpleObject)]
pub struct SecureMessageConnection {
    /// Messages with cursors.
    pub edges: Vec<SecureMessageEdge>,
    /// Where this page sits.
    pub page_info: PageInfo,
}

/// A message and its cursor.
#[derive(SimpleObject)]
pub struct SecureMessageEdge {
    /// Pass as `after` to continue.
    pub cursor: String,
    /// The message.
    pub node: SecureMessage,
}

/// The result of `sendSecureMessage`.
#[derive(SimpleObject)]
pub struct SendSecureMessagePayload {
    /// The queued message (follow it with `message(id)` or `messages`).
    pub message: SecureMessage,
    /// The sender's credits after the 3-credit debit.
    pub credits_remaining: i64,
}

/// A new patient.
#[derive(InputObject)]
pub struct CreatePatientInput {
    /// Given name.
    pub given_name: String,
    /// Family name.
    pub family_name: String,
    /// Date of birth, ISO (`1984-07-21`).
    pub date_of_birth: String,
}

/// A new clinical note.
#[derive(InputObject)]
pub struct CreateClinicalNoteInput {
    /// One of your patients.
    pub patient_id: ID,
    /// Title.
    pub title: String,
    /// 1–50 sections with unique keys.
    pub sections: Vec<Section>,
}

/// What to send, to whom, how.
#[derive(InputObject)]
pub struct SendSecureMessageInput {
    /// The clinical note.
    pub note_id: ID,
    /// The sections of the note to share (only these leave the gateway).
    pub section_keys: Vec<String>,
    /// The recipient's id from `searchPractitioners` (their HPI-I).
    pub recipient_id: ID,
    /// The provider to send through; omit to let the gateway choose one both use.
    pub provider: Option<Provider>,
    /// A fresh key per message; retrying with it never sends or charges twice.
    pub idempotency_key: String,
    /// Buy credits (your auto top-up pack, or the smallest) if you have fewer than 3.
    pub top_up_if_short: Option<bool>,
    /// Send as this practitioner (their user id), who granted you a live sending delegation:
    /// their note, HPI-I and credits are used, the message is theirs, and the audit names
    /// you both. Without a live grant it is `FORBIDDEN`, and nothing is sent or charged.
    pub on_behalf_of: Option<ID>,
}

/// What `sendSecureMessage` would be given, without its idempotency key.
#[derive(InputObject)]
pub struct PreviewSecureMessageInput {
    /// The clinical note.
    pub note_id: ID,
    /// The sections of the note to share.
    pub section_keys: Vec<String>,
    /// The recipient's id from `searchPractitioners` (their HPI-I).
    pub recipient_id: ID,
    /// The provider to send through; omit to see which one the gateway would choose.
    pub provider: Option<Provider>,
    /// Whether the send would buy credits if short (shown back; the preview buys nothing).
    pub top_up_if_short: Option<bool>,
    /// Preview as this practitioner (their user id), under the live sending delegation they
    /// granted you.
    pub on_behalf_of: Option<ID>,
}

/// Exactly what a `sendSecureMessage` of the same input would transmit and cost. Nothing was
/// sent, charged or stored (one audit row records that a preview was made).
#[derive(SimpleObject)]
pub struct SecureMessagePreview {
    /// Whose message it would be (user id): you, or the practitioner named in `onBehalfOf`.
    pub sender_id: ID,
    /// The sender's name, as the referral carries it.
    pub sender_name: String,
    /// The sender's HPI-I (the referral's sending provider).
    pub sender_hpii: String,
    /// The recipient's HPI-I.
    pub recipient_id: ID,
    /// The recipient's name.
    pub recipient_name: String,
    /// The provider it would go through (after routing, when the input named none).
    pub provider: Provider,
    /// The sections that would leave the gateway, in the note's order.
    pub sections: Vec<Section>,
    /// What the send costs, in credits.
    pub cost_credits: i64,
    /// The sender's credit balance now.
    pub balance: i64,
    /// Whether the balance is short of the cost: the send then buys `buyAtSendPack` when
    /// `topUpIfShort` is true, and is `INSUFFICIENT_CREDITS` otherwise.
    pub buy_at_send_needed: bool,
    /// The pack a short send would buy (null when the balance covers the cost).
    pub buy_at_send_pack: Option<super::credits::CreditPack>,
    /// Whether the input asked to buy when short.
    pub top_up_if_short: bool,
    /// The HL7 v2 referral as it would leave. Its control id (MSH-10, RF1-6) reads `PREVIEW`
    /// and its time (MSH-7, RF1-7) is now, as a send sets both afresh. Every other segment (the
    /// PRD, PID, OBR and OBX segments) is exactly what is sent.
    pub hl7: String,
}

fn paging(first: Option<i32>, max: i32) -> Result<u64, ApiError> {
    let first = first.unwrap_or(20);
    if !(1..=max).contains(&first) {
        return Err(ApiError::bad_input(format!(
            "first must be between 1 and {max}"
        )));
    }
    Ok(first as u64)
}

fn page_info<T>(
    edges: &[T],
    cursor: impl Fn(&T) -> String,
    has_next_page: bool,
    after: bool,
) -> PageInfo {
    PageInfo {
        has_next_page,
        has_previous_page: after,
        start_cursor: edges.first().map(&cursor),
        end_cursor: edges.last().map(&cursor),
    }
}

/// A page of messages read with one more than `first` (to learn whether another page follows).
fn message_connection(
    mut rows: Vec<MessageRow>,
    first: u64,
    after: bool,
) -> SecureMessageConnection {
    let has_next_page = rows.len() as u64 > first;
    rows.truncate(first as usize);
    let edges: Vec<SecureMessageEdge> = rows
        .into_iter()
        .map(|row| SecureMessageEdge {
            cursor: row.id.to_string(),
            node: SecureMessage::from_row(row, None),
        })
        .collect();
    let page_info = page_info(&edges, |edge| edge.cursor.clone(), has_next_page, after);
    SecureMessageConnection { edges, page_info }
}

#[derive(Default)]
pub struct MessagingQuery;

#[Object]
impl MessagingQuery {
    /// Your clinical notes, newest first.
    #[graphql(complexity = "first.unwrap_or(20).clamp(1, 50) as usize * child_complexity + 1")]
    async fn clinical_notes(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "How many (1–50, default 20).")] first: Option<i32>,
        #[graphql(desc = "Continue after this cursor.")] after: Option<String>,
        #[graphql(
            desc = "Read this practitioner's notes (their user id), under the live sending delegation they granted you; each read is audited naming you both."
        )]
        on_behalf_of: Option<ID>,
    ) -> Result<ClinicalNoteConnection, ApiError> {
        let principal = principal(ctx)?;
        let first = paging(first, 50)?;
        let mut notes = services(ctx)
            .messaging
            .notes(
                principal,
                after.as_deref(),
                first + 1,
                on_behalf_of.as_ref().map(|id| id.as_str()),
            )
            .await?;
        let has_next_page = notes.len() as u64 > first;
        notes.truncate(first as usize);
        let edges: Vec<ClinicalNoteEdge> = notes
            .into_iter()
            .map(|note| ClinicalNoteEdge {
                cursor: note.id.clone(),
                node: note.into(),
            })
            .collect();
        let page_info = page_info(
            &edges,
            |edge| edge.cursor.clone(),
            has_next_page,
            after.is_some(),
        );
        Ok(ClinicalNoteConnection { edges, page_info })
    }

    /// One of your clinical notes (reading it is audited).
    async fn clinical_note(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "Note id.")] id: ID,
        #[graphql(
            desc = "Read a note of this practitioner (their user id), under the live sending delegation they granted you; audited naming you both."
        )]
        on_behalf_of: Option<ID>,
    ) -> Result<ClinicalNote, ApiError> {
        let principal = principal(ctx)?;
        Ok(services(ctx)
            .messaging
            .note(principal, &id, on_behalf_of.as_ref().map(|id| id.as_str()))
            .await?
            .into())
    }

    /// Exactly what `sendSecureMessage` with the same input would send — recipient, provider
    /// after routing, the chosen sections, the cost, whether credits would be bought, and the
    /// HL7 text — without sending, charging or storing anything but an audit row. The same
    /// permissions as a send apply (administrators need `onBehalfOf` and a live grant).
    async fn preview_secure_message(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "A send's input without its idempotency key.")]
        input: PreviewSecureMessageInput,
    ) -> Result<SecureMessagePreview, ApiError> {
        let principal = principal(ctx)?;
        let preview = services(ctx)
            .messaging
            .preview(
                principal,
                PreviewRequest {
                    note_id: input.note_id.to_string(),
                    section_keys: input.section_keys,
                    recipient_hpii: input.recipient_id.to_string(),
                    provider: input.provider.map(Into::into),
                    top_up_if_short: input.top_up_if_short.unwrap_or(false),
                    on_behalf_of: input.on_behalf_of.map(|id| id.to_string()),
                },
            )
            .await?;
        Ok(SecureMessagePreview {
            sender_id: ID(preview.sender_subject),
            sender_name: preview.sender_name,
            sender_hpii: preview.sender_hpii.as_str().to_owned(),
            recipient_id: ID(preview.recipient_hpii),
            recipient_name: preview.recipient_name,
            provider: preview.provider.into(),
            sections: preview
                .sections
                .into_iter()
                .map(|section| Section {
                    key: section.key,
                    title: section.title,
                    body: section.body,
                })
                .collect(),
            cost_credits: preview.cost_credits,
            balance: preview.balance,
            buy_at_send_needed: preview.buy_at_send_needed,
            buy_at_send_pack: preview
                .buy_at_send_pack
                .as_ref()
                .map(super::credits::CreditPack::from),
            top_up_if_short: preview.top_up_if_short,
            hl7: preview.hl7,
        })
    }

    /// Searches the directories of every provider your practice is ACTIVE on and merges them
    /// by HPI-I; `providers` on each result says who reaches them.
    #[graphql(complexity = "first.unwrap_or(20).clamp(1, 50) as usize * child_complexity + 1")]
    async fn search_practitioners(
        &self,
        ctx: &Context<'_>,
        #[graphql(
            desc = "Words to match in name, specialty, organisation, suburb, state, postcode or HPI-I."
        )]
        query: String,
        #[graphql(desc = "Only this provider's directory.")] provider: Option<Provider>,
        #[graphql(desc = "How many (1–50, default 20).")] first: Option<i32>,
        #[graphql(desc = "Continue after this cursor.")] after: Option<String>,
    ) -> Result<PractitionerSearchConnection, ApiError> {
        let principal = principal(ctx)?;
        let first = paging(first, 50)?;
        let offset = match &after {
            Some(cursor) => {
                cursor
                    .parse::<u64>()
                    .map_err(|_| ApiError::bad_input("after is not a cursor from this search"))?
                    + 1
            }
            None => 0,
        };
        let result = services(ctx)
            .messaging
            .search(
                principal,
                &query,
                provider.map(Into::into),
                offset,
                first,
                ctx.data_opt::<crate::domain::CallBudget>()
                    .unwrap_or(&crate::domain::CallBudget::new(0)),
            )
            .await?;
        let edges: Vec<PractitionerSearchEdge> = result
            .hits
            .into_iter()
            .enumerate()
            .map(|(index, hit)| PractitionerSearchEdge {
                cursor: (offset + index as u64).to_string(),
                node: DirectoryPractitioner {
                    id: ID(hit.entry.hpii),
                    name: format!("Dr {} {}", hit.entry.given_name, hit.entry.family_name),
                    specialty: hit.entry.specialty,
                    organisation: hit.entry.organisation,
                    suburb: hit.entry.suburb,
                    state: hit.entry.state,
                    postcode: hit.entry.postcode,
                    providers: hit.providers.into_iter().map(Into::into).collect(),
                },
            })
            .collect();
        let page_info = page_info(
            &edges,
            |edge| edge.cursor.clone(),
            result.has_next_page,
            after.is_some(),
        );
        Ok(PractitionerSearchConnection {
            edges,
            page_info,
            warnings: result.warnings,
        })
    }

    /// Your secure messages, newest first.
    #[graphql(complexity = "first.unwrap_or(20).clamp(1, 100) as usize * child_complexity + 1")]
    async fn messages(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "Only sent or only received.")] direction: Option<MessageDirection>,
        #[graphql(desc = "Only in this status.")] status: Option<MessageStatus>,
        #[graphql(
            desc = "true: only sent messages that need your attention now (see `needsAttention`); false: only those that do not."
        )]
        needs_attention: Option<bool>,
        #[graphql(desc = "How many (1–100, default 20).")] first: Option<i32>,
        #[graphql(desc = "Continue after this cursor.")] after: Option<String>,
    ) -> Result<SecureMessageConnection, ApiError> {
        let principal = principal(ctx)?;
        let first = paging(first, 100)?;
        let rows = services(ctx)
            .messaging
            .messages(
                principal,
                direction.map(Into::into),
                status.map(Into::into),
                needs_attention,
                after.as_deref(),
                first + 1,
            )
            .await?;
        Ok(message_connection(rows, first, after.is_some()))
    }

    /// Your practice's unassigned inbox, newest first: received messages addressed to an HPI-I
    /// nobody in the practice holds (or to none). Practitioners and administrators see the
    /// envelopes; practitioners read one with `message(id)` and take it with `assignMessage`.
    #[graphql(complexity = "first.unwrap_or(20).clamp(1, 100) as usize * child_complexity + 1")]
    async fn unassigned_messages(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "How many (1–100, default 20).")] first: Option<i32>,
        #[graphql(desc = "Continue after this cursor.")] after: Option<String>,
    ) -> Result<SecureMessageConnection, ApiError> {
        let principal = principal(ctx)?;
        let first = paging(first, 100)?;
        let rows = services(ctx)
            .messaging
            .unassigned_messages(principal, after.as_deref(), first + 1)
            .await?;
        Ok(message_connection(rows, first, after.is_some()))
    }

    /// One of your messages, or one waiting in your practice's unassigned inbox, with its
    /// shared sections (practitioners only; reading content is audited).
    async fn message(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "Message id.")] id: ID,
    ) -> Result<SecureMessage, ApiError> {
        let principal = principal(ctx)?;
        let (row, sections) = services(ctx).messaging.message(principal, &id).await?;
        let sections = sections
            .into_iter()
            .map(|section| Section {
                key: section.key,
                title: section.title,
                body: section.body,
            })
            .collect();
        Ok(SecureMessage::from_row(row, Some(sections)))
    }
}

#[derive(Default)]
pub struct MessagingMutation;

#[Object]
impl MessagingMutation {
    /// Records a patient (practitioners only; details are encrypted at rest).
    async fn create_patient(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The patient's details.")] input: CreatePatientInput,
    ) -> Result<Patient, ApiError> {
        let principal = principal(ctx)?;
        let patient = services(ctx)
            .messaging
            .create_patient(
                principal,
                &input.given_name,
                &input.family_name,
                &input.date_of_birth,
            )
            .await?;
        Ok(Patient {
            id: ID(patient.id),
            given_name: patient.given_name,
            family_name: patient.family_name,
            date_of_birth: patient.date_of_birth,
        })
    }

    /// Writes a clinical note for one of your patients (encrypted at rest).
    async fn create_clinical_note(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The note.")] input: CreateClinicalNoteInput,
    ) -> Result<ClinicalNote, ApiError> {
        let principal = principal(ctx)?;
        let sections = input
            .sections
            .into_iter()
            .map(|section| NoteSection {
                key: section.key,
                title: section.title,
                body: section.body,
            })
            .collect();
        Ok(services(ctx)
            .messaging
            .create_note(principal, &input.patient_id, &input.title, sections)
            .await?
            .into())
    }

    /// Records your HPI-I: it identifies you in the referrals you send, and routes messages
    /// addressed to you into your inbox. An HPI-I belongs to one practitioner of a practice,
    /// so one a colleague holds is `CONFLICT`; setting the one you have again changes nothing.
    async fn set_my_hpii(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "Your 16-digit HPI-I.")] hpii: String,
    ) -> Result<bool, ApiError> {
        let principal = principal(ctx)?;
        services(ctx)
            .messaging
            .set_my_hpii(principal, &hpii)
            .await?;
        Ok(true)
    }

    /// Takes a message from your practice's unassigned inbox: it becomes yours (or the named
    /// colleague's) and appears among their received messages (`messages`, direction INBOUND).
    /// When several people claim one message at once exactly one succeeds; the others get
    /// `CONFLICT`.
    async fn assign_message(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "Message id from `unassignedMessages`.")] id: ID,
        #[graphql(
            desc = "Give it to this practitioner of your practice instead of yourself (their id from `practitioners`); administrators must name one."
        )]
        to_practitioner_id: Option<ID>,
    ) -> Result<SecureMessage, ApiError> {
        let principal = principal(ctx)?;
        let row = services(ctx)
            .messaging
            .assign_message(
                principal,
                &id,
                to_practitioner_id.as_ref().map(|id| id.as_str()),
            )
            .await?;
        Ok(SecureMessage::from_row(row, None))
    }

    /// Acknowledges a received message (you have read and accepted it).
    async fn acknowledge_message(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "Message id.")] id: ID,
    ) -> Result<SecureMessage, ApiError> {
        let principal = principal(ctx)?;
        let row = services(ctx).messaging.acknowledge(principal, &id).await?;
        Ok(SecureMessage::from_row(row, None))
    }

    /// Sends the chosen sections of a clinical note as a secure message (3 credits from your
    /// own balance, in the same transaction that queues it). Practitioners, or a user sending
    /// on a practitioner's behalf (`onBehalfOf`) under the live delegation they granted.
    async fn send_secure_message(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "What to send, to whom, how.")] input: SendSecureMessageInput,
    ) -> Result<SendSecureMessagePayload, ApiError> {
        let principal = principal(ctx)?;
        let idempotency_key = IdempotencyKey::parse(&input.idempotency_key)
            .map_err(|problem| ApiError::bad_input(format!("idempotencyKey: {problem}")))?;
        let result = services(ctx)
            .messaging
            .send(
                principal,
                SendRequest {
                    note_id: input.note_id.to_string(),
                    section_keys: input.section_keys,
                    recipient_hpii: input.recipient_id.to_string(),
                    provider: input.provider.map(Into::into),
                    idempotency_key,
                    top_up_if_short: input.top_up_if_short.unwrap_or(false),
                    on_behalf_of: input.on_behalf_of.map(|id| id.to_string()),
                },
            )
            .await?;
        Ok(SendSecureMessagePayload {
            message: SecureMessage::from_row(result.message, None),
            credits_remaining: result.credits_remaining,
        })
    }
}

#[derive(Default)]
pub struct MessagingSubscription;

#[async_graphql::Subscription]
impl MessagingSubscription {
    /// Emits your messages whenever their status changes (QUEUED → SENT → DELIVERED →
    /// ACKNOWLEDGED, or FAILED).
    async fn message_status_changed(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "Only this message (default: all of yours).")] id: Option<ID>,
    ) -> Result<impl futures::Stream<Item = SecureMessage> + use<>, ApiError> {
        let watch = MessageWatch::start(ctx, id.map(|id| id.to_string()), false).await?;
        Ok(watch.into_stream())
    }

    /// Emits each secure message received for you.
    async fn message_received(
        &self,
        ctx: &Context<'_>,
    ) -> Result<impl futures::Stream<Item = SecureMessage> + use<>, ApiError> {
        let watch = MessageWatch::start(ctx, None, true).await?;
        Ok(watch.into_stream())
    }

    /// Emits your sent messages as the gateway flags them: not delivered in time, not
    /// acknowledged in time, or expired. Each flag is emitted once (with `needsAttention`
    /// set to it), from when you subscribe; messages flagged earlier are in `messages` with
    /// `needsAttention` true. Practitioners only, since only the sender sees their messages
    /// (never anyone of another practice).
    async fn message_needs_attention(
        &self,
        ctx: &Context<'_>,
    ) -> Result<impl futures::Stream<Item = SecureMessage> + use<>, ApiError> {
        let watch = AttentionWatch::start(ctx).await?;
        Ok(futures::stream::unfold(watch, |mut watch| async move {
            let next = watch.next().await?;
            Some((next, watch))
        }))
    }
}

/// Follows the subscriber's flags: wakes on the practice's `MessageNeedsAttention` events (from
/// any node, see `crate::events`) or a resync, re-reads the caller's own flags from the
/// database and yields each new one. No timer re-reads the database.
struct AttentionWatch {
    events: crate::events::Subscriber,
    /// Whether the first read (for flags made before listening began) has been done.
    looked: bool,
    service: crate::domain::messaging::MessagingService,
    principal: crate::domain::audit::Principal,
    /// Flags at or after this time are read (it trails the newest seen, for late commits).
    since: DateTime<Utc>,
    /// Flags already yielded, with their times (forgotten once they fall behind `since`).
    seen: std::collections::HashMap<(MessageId, DomainReason), DateTime<Utc>>,
    pending: std::collections::VecDeque<SecureMessage>,
}

/// How far behind the newest flag seen the re-read starts: a flag stamped earlier but
/// committed later (another node) is still found.
const ATTENTION_OVERLAP: chrono::TimeDelta = chrono::TimeDelta::seconds(30);

impl AttentionWatch {
    async fn start(ctx: &Context<'_>) -> Result<Self, ApiError> {
        let principal = principal(ctx)?.clone();
        if principal.role != crate::domain::types::Role::Practitioner {
            return Err(ApiError::new(
                "FORBIDDEN",
                "only practitioners send secure messages, so only they are told when one needs attention",
            ));
        }
        let services = services(ctx).clone();
        let since = ctx
            .data_opt::<SubscribedAt>()
            .map_or_else(Utc::now, |asked| asked.0);
        Ok(Self {
            // Listening starts before the first read, so a flag committed in between is heard.
            events: services.events.subscribe(),
            looked: false,
            service: services.messaging,
            principal,
            since,
            seen: std::collections::HashMap::new(),
            pending: std::collections::VecDeque::new(),
        })
    }

    async fn next(&mut self) -> Option<SecureMessage> {
        loop {
            if !self.principal.is_honoured_at(Utc::now()) {
                return None;
            }
            if let Some(message) = self.pending.pop_front() {
                return Some(message);
            }
            // The first look needs no wake-up: a flag made between the request to subscribe
            // and now is already news.
            if self.looked {
                let event = tokio::select! {
                    event = self.events.next_for(&self.principal.group_id) => event?,
                    () = super::token_expiry(&self.principal) => return None,
                };
                match event {
                    Event::MessageNeedsAttention { .. } | Event::Resync => {}
                    Event::MessageChanged { .. } | Event::IntegrationChanged { .. } => continue,
                }
            }
            self.looked = true;
            let Ok(rows) = self
                .service
                .flagged_since(&self.principal, self.since, 100)
                .await
            else {
                continue;
            };
            let mut fresh: Vec<(Attention, MessageRow)> = Vec::new();
            for row in rows {
                for flag in flags_of(&row) {
                    if flag.since >= self.since
                        && self
                            .seen
                            .insert((row.id.clone(), flag.reason), flag.since)
                            .is_none()
                    {
                        fresh.push((flag, row.clone()));
                    }
                }
            }
            fresh.sort_by_key(|(flag, _)| (flag.since, flag.reason));
            if let Some((newest, _)) = fresh.last() {
                let since = newest.since - ATTENTION_OVERLAP;
                if since > self.since {
                    self.since = since;
                    let horizon = self.since;
                    self.seen.retain(|_, at| *at >= horizon);
                }
            }
            for (flag, row) in fresh {
                self.pending
                    .push_back(SecureMessage::with_attention(row, None, Some(flag.into())));
            }
        }
    }
}

/// When the transport received the client's request to subscribe.
pub(crate) struct SubscribedAt(pub chrono::DateTime<Utc>);

/// Waits for change notifications (see `crate::events`) and yields the subscriber's messages
/// whose state changed. A notification names a message; the watch re-reads that one message
/// through the caller's own scope (so another practitioner's or practice's message is never
/// shown), and after a resync re-reads the caller's latest messages. No timer re-reads the
/// database: an idle subscription costs nothing.
struct MessageWatch {
    events: crate::events::Subscriber,
    reads: SharedReads,
    service: crate::domain::messaging::MessagingService,
    principal: crate::domain::audit::Principal,
    only: Option<String>,
    received_only: bool,
    seen: std::collections::HashMap<MessageId, DomainStatus>,
    pending: std::collections::VecDeque<MessageRow>,
}

impl MessageWatch {
    async fn start(
        ctx: &Context<'_>,
        only: Option<String>,
        received_only: bool,
    ) -> Result<Self, ApiError> {
        let principal = principal(ctx)?.clone();
        let services = services(ctx).clone();
        // Listening starts before the first read, so a change committed in between is heard.
        let events = services.events.subscribe();
        let rows = services
            .messaging
            .messages(&principal, None, None, None, None, 100)
            .await?;
        // Messages created after the client asked to subscribe are news even if they exist by
        // the time this first read runs (their event may have gone by before listening began):
        // the subscriber gets them first instead of losing them to the starting picture.
        let asked = ctx.data_opt::<SubscribedAt>().map(|asked| asked.0);
        let (news, known): (Vec<MessageRow>, Vec<MessageRow>) = rows
            .into_iter()
            .partition(|row| asked.is_some_and(|asked| row.created_at >= asked));
        let mut watch = Self {
            events,
            reads: ctx.data_unchecked::<SharedReads>().clone(),
            service: services.messaging,
            principal,
            only,
            received_only,
            seen: known.into_iter().map(|row| (row.id, row.status)).collect(),
            pending: std::collections::VecDeque::new(),
        };
        watch.consider(news);
        Ok(watch)
    }

    fn into_stream(self) -> impl futures::Stream<Item = SecureMessage> {
        futures::stream::unfold(self, |mut watch| async move {
            let next = watch.next().await?;
            Some((next, watch))
        })
    }

    async fn next(&mut self) -> Option<SecureMessage> {
        loop {
            if !self.principal.is_honoured_at(Utc::now()) {
                return None;
            }
            if let Some(row) = self.pending.pop_front() {
                return Some(SecureMessage::from_row(row, None));
            }
            let event = tokio::select! {
                event = self.events.next_for(&self.principal.group_id) => event?,
                () = super::token_expiry(&self.principal) => return None,
            };
            let rows = match event {
                Event::MessageChanged { message_id, .. } => {
                    if self.only.as_ref().is_some_and(|only| *only != message_id) {
                        continue;
                    }
                    let number = self.events.last_number();
                    self.reads
                        .own_message(&self.service, &self.principal, number, &message_id)
                        .await
                        .into_iter()
                        .collect()
                }
                Event::Resync => {
                    let direction = self.received_only.then_some(Direction::Inbound);
                    match self
                        .service
                        .messages(&self.principal, direction, None, None, None, 100)
                        .await
                    {
                        Ok(rows) => rows,
                        Err(_) => continue,
                    }
                }
                Event::IntegrationChanged { .. } | Event::MessageNeedsAttention { .. } => continue,
            };
            self.consider(rows);
        }
    }

    /// Queues, oldest first, each row that is news to the subscriber.
    fn consider(&mut self, rows: Vec<MessageRow>) {
        for row in rows.into_iter().rev() {
            if self
                .only
                .as_ref()
                .is_some_and(|only| only != row.id.as_str())
            {
                continue;
            }
            if self.received_only && row.direction != Direction::Inbound {
                continue;
            }
            let changed = match self.seen.get(&row.id) {
                None => true,
                Some(status) => !self.received_only && *status != row.status,
            };
            if changed {
                self.seen.insert(row.id.clone(), row.status);
                self.pending.push_back(row);
            }
        }
    }
}

/// What identifies one shared re-read: the delivery that woke the subscribers, whose scope the
/// read is made in (user, group, whether a practitioner) and which message.
type ReadKey = (u64, String, String, bool, String);

type ReadFuture = futures::future::BoxFuture<'static, Option<MessageRow>>;
type SharedRead = futures::future::Shared<ReadFuture>;
type ReadsInFlight = std::collections::HashMap<ReadKey, futures::future::WeakShared<ReadFuture>>;

/// Re-reads of one message shared by the subscriptions one delivery woke: a practitioner's many
/// subscriptions (tabs, devices, or a thousand in a benchmark) read the message once per change
/// instead of once each. A read is shared only by subscribers woken by the same delivery and
/// starts after it, so none is handed a state older than the change that woke it; it is made
/// in the subscriber's own scope like any other.
#[derive(Clone, Default)]
pub(crate) struct SharedReads(std::sync::Arc<std::sync::Mutex<ReadsInFlight>>);

/// Forgets a shared read when it ends (finished, or dropped by every subscriber).
struct ForgetRead(SharedReads, ReadKey);

impl Drop for ForgetRead {
    fn drop(&mut self) {
        self.0.lock().remove(&self.1);
    }
}

impl SharedReads {
    fn lock(&self) -> std::sync::MutexGuard<'_, ReadsInFlight> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The caller's message `id` as of delivery `number` or later (`None`: not theirs, or the
    /// read failed; the next event reads again).
    async fn own_message(
        &self,
        service: &crate::domain::messaging::MessagingService,
        principal: &crate::domain::audit::Principal,
        number: u64,
        id: &str,
    ) -> Option<MessageRow> {
        use futures::FutureExt;
        let key: ReadKey = (
            number,
            principal.user_id.clone(),
            principal.group_id.clone(),
            principal.role == crate::domain::types::Role::Practitioner,
            id.to_owned(),
        );
        let read: SharedRead = {
            let mut reads = self.lock();
            match reads
                .get(&key)
                .and_then(futures::future::WeakShared::upgrade)
            {
                Some(read) => read,
                None => {
                    let forget = ForgetRead(self.clone(), key.clone());
                    let (service, principal, id) =
                        (service.clone(), principal.clone(), id.to_owned());
                    let read = async move {
                        let _forget = forget;
                        match service.own_message(&principal, &id).await {
                            Ok(row) => row,
                            Err(error) => {
                                tracing::warn!(error = ?error, "subscription re-read failed; the next change reads again");
                                None
                            }
                        }
                    }
                    .boxed()
                    .shared();
                    if let Some(weak) = read.downgrade() {
                        reads.insert(key, weak);
                    }
                    read
                }
            }
        };
        read.await
    }
}
