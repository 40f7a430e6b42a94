//! Secure messaging: patients and clinical notes (sealed at rest), the practitioner directory
//! across providers, sending chosen note sections as an HL7 referral, and the outbox that
//! delivers and tracks messages.
//!
//! A send is one transaction: the 3-credit debit from the sender's own wallet and the `QUEUED`
//! message (its idempotency key unique per sender). The outbox worker hands queued messages to
//! the provider with the message id as the provider's client message id, so a retry after an
//! ambiguous timeout is recognised as a duplicate, never delivered twice. A message the provider
//! refuses outright is `FAILED` and its credits refunded in the same transaction.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

use crate::crypto::SecretBox;
use crate::domain::CallBudget;
use crate::domain::audit::{AuditEntry, AuditOutcome, Principal, actions as audit_actions};
use crate::domain::credits::{CREDITS_PER_MESSAGE, CreditService, IdempotencyKey};
use directory_cache::{DirectoryCache, LookupError};
use crate::domain::hl7;
use crate::domain::integrations::IntegrationService;
use crate::domain::types::{ConnectionStatus, Provider, Role};
use crate::domain::{GatewayError, later, safe_word};
use crate::providers::{DeliveryState, DirectoryEntry, OutboundMessage, ProviderError, Providers};
use crate::store::messaging::{Assignment, MessageRow, MessageUpdate, NoteRow, PatientRow};
use crate::store::users::HpiiChange;
use crate::store::{Store, new_id};

mod directory_cache;

/// Audit actions for messaging.
pub mod actions {
    /// A secure message was queued.
    pub const SEND_MESSAGE: &str = "SEND_MESSAGE";
    /// A message's content was read.
    pub const READ_MESSAGE: &str = "READ_MESSAGE";
    /// A clinical note was read.
    pub const READ_NOTE: &str = "READ_NOTE";
    /// A message was received and stored.
    pub const RECEIVE_MESSAGE: &str = "RECEIVE_MESSAGE";
    /// A failed message's credits were refunded.
    pub const REFUND_MESSAGE: &str = "REFUND_MESSAGE";
    /// A received message was taken from the practice's unassigned inbox (or a claim of one
    /// was refused because another claim won).
    pub const ASSIGN_MESSAGE: &str = "ASSIGN_MESSAGE";
}

/// How many due messages one outbox pass takes on.
pub const OUTBOX_BATCH: usize = 50;

/// How long a practice's directory pages are reused (aliases, paging, repeated sends to one
/// recipient). Directories change over days; a minute keeps them fresh enough.
const DIRECTORY_CACHE_TTL: Duration = Duration::from_secs(60);

/// Tunables.
#[derive(Debug, Clone)]
pub struct MessagingSettings {
    /// How long a node owns a message it is working on.
    pub outbox_lease: Duration,
    /// How often a sent message's delivery is checked.
    pub status_poll_interval: Duration,
    /// First retry delay after a transient provider fault (doubles, with jitter).
    pub retry_base: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// A message not accepted by the provider within this age fails (and is refunded).
    pub give_up_after: Duration,
    /// Provider order when a send names none and both reach the recipient.
    pub provider_preference: Vec<Provider>,
    /// The gateway's externally reachable base URL, for providers that push receipts.
    pub public_url: Option<String>,
    /// How far a pushed receipt's timestamp may be from now (replay window).
    pub webhook_tolerance: Duration,
    /// Test-only fault point: stop after the provider accepted, before recording it.
    pub fail_after_send: bool,
}

/// A patient, decrypted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Patient {
    /// Id.
    #[serde(skip)]
    pub id: String,
    /// Given name.
    pub given_name: String,
    /// Family name.
    pub family_name: String,
    /// Date of birth.
    pub date_of_birth: NaiveDate,
}

/// One section of a clinical note.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoteSection {
    /// Machine key, unique within the note (`[a-z0-9_-]`, 1–40).
    pub key: String,
    /// Title (1–200 characters).
    pub title: String,
    /// Text (up to 100,000 characters).
    pub body: String,
}

/// A clinical note, decrypted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClinicalNote {
    /// Id.
    #[serde(skip)]
    pub id: String,
    /// The patient.
    #[serde(skip)]
    pub patient_id: String,
    /// Title.
    pub title: String,
    /// Sections, in order.
    pub sections: Vec<NoteSection>,
    /// Created.
    #[serde(skip)]
    pub created_at: Option<DateTime<Utc>>,
}

/// A practitioner found in the directories, with the providers that reach them.
#[derive(Debug, Clone)]
pub struct PractitionerHit {
    /// The directory entry.
    pub entry: DirectoryEntry,
    /// Providers that reach them (only those the practice is active on).
    pub providers: Vec<Provider>,
}

/// A directory search's answer.
#[derive(Debug, Clone)]
pub struct SearchResult {
    /// This page.
    pub hits: Vec<PractitionerHit>,
    /// Whether more follow.
    pub has_next_page: bool,
    /// Providers that could not be asked.
    pub warnings: Vec<String>,
}

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

#[derive(Serialize, Deserialize)]
struct StoredPayload {
    hl7: String,
    section_keys: Vec<String>,
}

/// The messaging rules.
#[derive(Clone)]
pub struct MessagingService {
    store: Store,
    providers: Providers,
    secrets: SecretBox,
    credits: CreditService,
    integrations: IntegrationService,
    settings: MessagingSettings,
    directory: DirectoryCache,
}

fn clean_text(field: &str, raw: &str, max: usize) -> Result<String, GatewayError> {
    let trimmed = raw.trim();
    let length = trimmed.chars().count();
    if length == 0
        || length > max
        || trimmed
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\r' && c != '\t')
    {
        return Err(GatewayError::BadUserInput(format!(
            "{field} must be 1 to {max} characters without control characters"
        )));
    }
    Ok(trimmed.to_owned())
}

fn practitioner_only(principal: &Principal, what: &str) -> Result<(), GatewayError> {
    if principal.role != Role::Practitioner {
        return Err(GatewayError::Forbidden(format!(
            "only practitioners can {what}; administrators cannot act on a practitioner's behalf"
        )));
    }
    Ok(())
}

impl MessagingService {
    /// Assembles the service.
    pub fn new(
        store: Store,
        providers: Providers,
        secrets: SecretBox,
        credits: CreditService,
        integrations: IntegrationService,
        settings: MessagingSettings,
    ) -> Self {
        Self {
            store,
            providers,
            secrets,
            credits,
            integrations,
            settings,
            directory: DirectoryCache::new(DIRECTORY_CACHE_TTL),
        }
    }

    /// Records a patient of the calling practitioner.
    pub async fn create_patient(
        &self,
        principal: &Principal,
        given_name: &str,
        family_name: &str,
        date_of_birth: &str,
    ) -> Result<Patient, GatewayError> {
        practitioner_only(principal, "record patients")?;
        let given_name = clean_text("givenName", given_name, 100)?;
        let family_name = clean_text("familyName", family_name, 100)?;
        let date_of_birth =
            NaiveDate::parse_from_str(date_of_birth.trim(), "%Y-%m-%d").map_err(|_| {
                GatewayError::BadUserInput("dateOfBirth must be an ISO date like 1984-07-21".into())
            })?;
        let today = Utc::now().date_naive();
        if date_of_birth > today
            || date_of_birth < NaiveDate::from_ymd_opt(1880, 1, 1).unwrap_or(date_of_birth)
        {
            return Err(GatewayError::BadUserInput(
                "dateOfBirth must be in the past (and after 1880)".into(),
            ));
        }
        let patient = Patient {
            id: new_id(),
            given_name,
            family_name,
            date_of_birth,
        };
        let sealed = self
            .secrets
            .seal(
                &serde_json::to_string(&patient).map_err(GatewayError::internal)?,
                &format!("patient/{}/{}", principal.group_id, patient.id),
            )
            .map_err(GatewayError::internal)?;
        self.store
            .insert_patient(&PatientRow {
                id: patient.id.clone(),
                group_id: principal.group_id.clone(),
                owner_user_id: principal.user_id.clone(),
                details_ciphertext: sealed,
                created_at: Utc::now(),
            })
            .await?;
        Ok(patient)
    }

    async fn patient(&self, principal: &Principal, id: &str) -> Result<Patient, GatewayError> {
        let row = self
            .store
            .find_patient(&principal.user_id, id)
            .await?
            .ok_or_else(|| GatewayError::NotFound(format!("you have no patient {id:?}")))?;
        let json = self
            .secrets
            .open(
                &row.details_ciphertext,
                &format!("patient/{}/{}", row.group_id, row.id),
            )
            .map_err(GatewayError::internal)?;
        let mut patient: Patient = serde_json::from_str(&json).map_err(GatewayError::internal)?;
        patient.id = row.id;
        Ok(patient)
    }

    /// Writes a clinical note for one of the practitioner's patients.
    pub async fn create_note(
        &self,
        principal: &Principal,
        patient_id: &str,
        title: &str,
        sections: Vec<NoteSection>,
    ) -> Result<ClinicalNote, GatewayError> {
        practitioner_only(principal, "write clinical notes")?;
        self.patient(principal, patient_id).await?;
        let title = clean_text("title", title, 200)?;
        if sections.is_empty() || sections.len() > 50 {
            return Err(GatewayError::BadUserInput(
                "sections: a note needs 1 to 50 sections".into(),
            ));
        }
        let mut keys = std::collections::HashSet::new();
        let mut clean = Vec::with_capacity(sections.len());
        let mut total = 0;
        for section in sections {
            let key = section.key.trim().to_owned();
            if key.is_empty()
                || key.len() > 40
                || !key
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
            {
                return Err(GatewayError::BadUserInput(format!(
                    "sections: key {key:?} must be 1 to 40 of a-z, 0-9, '_' or '-'"
                )));
            }
            if !keys.insert(key.clone()) {
                return Err(GatewayError::BadUserInput(format!(
                    "sections: key {key:?} appears twice"
                )));
            }
            let section_title = clean_text("sections.title", &section.title, 200)?;
            total += section.body.chars().count();
            clean.push(NoteSection {
                key,
                title: section_title,
                body: section.body,
            });
        }
        if total > 100_000 {
            return Err(GatewayError::BadUserInput(
                "sections: a note's text is limited to 100000 characters".into(),
            ));
        }
        let note = ClinicalNote {
            id: new_id(),
            patient_id: patient_id.to_owned(),
            title,
            sections: clean,
            created_at: Some(Utc::now()),
        };
        let sealed = self
            .secrets
            .seal(
                &serde_json::to_string(&note).map_err(GatewayError::internal)?,
                &format!("note/{}/{}", principal.group_id, note.id),
            )
            .map_err(GatewayError::internal)?;
        self.store
            .insert_note(&NoteRow {
                id: note.id.clone(),
                group_id: principal.group_id.clone(),
                owner_user_id: principal.user_id.clone(),
                patient_id: patient_id.to_owned(),
                content_ciphertext: sealed,
                created_at: Utc::now(),
            })
            .await?;
        Ok(note)
    }

    fn open_note(&self, row: &NoteRow) -> Result<ClinicalNote, GatewayError> {
        let json = self
            .secrets
            .open(
                &row.content_ciphertext,
                &format!("note/{}/{}", row.group_id, row.id),
            )
            .map_err(GatewayError::internal)?;
        let mut note: ClinicalNote = serde_json::from_str(&json).map_err(GatewayError::internal)?;
        note.id = row.id.clone();
        note.patient_id = row.patient_id.clone();
        note.created_at = Some(row.created_at);
        Ok(note)
    }

    /// One of the practitioner's own notes (reading it is audited).
    pub async fn note(
        &self,
        principal: &Principal,
        id: &str,
    ) -> Result<ClinicalNote, GatewayError> {
        practitioner_only(principal, "read clinical notes")?;
        let row = self
            .store
            .find_note(&principal.user_id, id)
            .await?
            .ok_or_else(|| GatewayError::NotFound(format!("you have no clinical note {id:?}")))?;
        let note = self.open_note(&row)?;
        self.audit(AuditEntry::by(
            principal,
            actions::READ_NOTE,
            format!("note:{id}"),
            AuditOutcome::Success,
        ))
        .await;
        Ok(note)
    }

    /// The practitioner's notes, newest first.
    pub async fn notes(
        &self,
        principal: &Principal,
        after: Option<&str>,
        first: u64,
    ) -> Result<Vec<ClinicalNote>, GatewayError> {
        practitioner_only(principal, "read clinical notes")?;
        self.store
            .list_notes(&principal.user_id, after, first)
            .await?
            .iter()
            .map(|row| self.open_note(row))
            .collect()
    }

    /// Providers the practice is `ACTIVE` on, with the group account's credentials.
    async fn active_providers(
        &self,
        principal: &Principal,
        only: Option<Provider>,
    ) -> Result<Vec<(Provider, crate::domain::types::ProviderCredentials)>, GatewayError> {
        let mut active = Vec::new();
        for provider in Provider::ALL {
            if only.is_some_and(|only| only != provider) {
                continue;
            }
            if let Some(credentials) = self
                .integrations
                .active_group_credentials(&principal.group_id, provider)
                .await?
            {
                active.push((provider, credentials));
            }
        }
        Ok(active)
    }

    /// Searches every directory the practice is active on and merges the answers by HPI-I.
    /// A provider that fails degrades the answer (with a warning) instead of failing it.
    pub async fn search(
        &self,
        principal: &Principal,
        query: &str,
        only: Option<Provider>,
        offset: u64,
        first: u64,
        budget: &CallBudget,
    ) -> Result<SearchResult, GatewayError> {
        let query = query.trim();
        if query.chars().count() > 100 {
            return Err(GatewayError::BadUserInput(
                "query is limited to 100 characters".into(),
            ));
        }
        if offset + first > 500 {
            return Err(GatewayError::BadUserInput(
                "narrow the search: only the first 500 results can be paged through".into(),
            ));
        }
        let active = self.active_providers(principal, only).await?;
        if active.is_empty() {
            return Err(GatewayError::IntegrationNotActive(
                "your practice has no ACTIVE Argus or ReferralNet account to search; link one under Integrations".into(),
            ));
        }
        let wanted = offset + first + 1;
        // Merged by HPI-I alone (providers may spell a name differently), sorted afterwards.
        let mut merged: BTreeMap<String, PractitionerHit> = BTreeMap::new();
        let mut warnings = Vec::new();
        for (provider, credentials) in &active {
            let adapter = self.providers.get(*provider);
            let mut fetched = 0;
            loop {
                let page = self
                    .directory
                    .page(
                        &principal.group_id,
                        *provider,
                        query,
                        fetched,
                        50,
                        || async {
                            if !budget.spend() {
                                return Err(LookupError::BudgetSpent);
                            }
                            adapter
                                .search_directory(credentials, query, fetched, 50)
                                .await
                                .map_err(LookupError::Provider)
                        },
                    )
                    .await;
                match page {
                    Ok(page) => {
                        let count = page.entries.len() as u64;
                        for entry in page.entries {
                            merged
                                .entry(entry.hpii.clone())
                                .or_insert_with(|| PractitionerHit {
                                    entry,
                                    providers: Vec::new(),
                                })
                                .providers
                                .push(*provider);
                        }
                        fetched += count;
                        if count < 50 || fetched >= page.total || fetched >= wanted {
                            break;
                        }
                    }
                    Err(LookupError::BudgetSpent) => {
                        return Err(GatewayError::BadUserInput(
                            "this request asks the provider directories too many times (aliases or deep paging); search once per request and page with `after`".into(),
                        ));
                    }
                    Err(LookupError::Provider(error)) => {
                        tracing::warn!(%provider, error = %error, "directory search failed");
                        warnings.push(format!("{provider} did not answer, so results reachable only through {provider} may be missing"));
                        break;
                    }
                }
            }
        }
        let mut all: Vec<PractitionerHit> = merged.into_values().collect();
        all.sort_by_cached_key(|hit| {
            (
                hit.entry.family_name.to_lowercase(),
                hit.entry.given_name.to_lowercase(),
                hit.entry.hpii.clone(),
            )
        });
        let has_next_page = all.len() as u64 > offset + first;
        let hits = all
            .into_iter()
            .skip(offset as usize)
            .take(first as usize)
            .collect();
        Ok(SearchResult {
            hits,
            has_next_page,
            warnings,
        })
    }

    /// Which of the practice's active providers reach a recipient, and their directory entry.
    async fn reach(
        &self,
        principal: &Principal,
        hpii: &str,
    ) -> Result<(Option<DirectoryEntry>, Vec<Provider>, Vec<String>), GatewayError> {
        let mut found = None;
        let mut reach = Vec::new();
        let mut unanswered = Vec::new();
        for (provider, credentials) in self.active_providers(principal, None).await? {
            let adapter = self.providers.get(provider);
            let page = self
                .directory
                .page(&principal.group_id, provider, hpii, 0, 50, || async {
                    adapter
                        .search_directory(&credentials, hpii, 0, 50)
                        .await
                        .map_err(LookupError::Provider)
                })
                .await;
            match page {
                Ok(page) => {
                    if let Some(entry) = page.entries.into_iter().find(|entry| entry.hpii == hpii) {
                        reach.push(provider);
                        found.get_or_insert(entry);
                    }
                }
                Err(_) => unanswered.push(provider.display_name().to_owned()),
            }
        }
        Ok((found, reach, unanswered))
    }

    /// Chooses a provider both parties use: the configured preference order when there is
    /// one, else the provider with the better delivery record over the practice's last 50
    /// messages on it (fewer `FAILED`; Argus on a tie).
    async fn route(
        &self,
        group_id: &str,
        reach: &[Provider],
        own_active: &[Provider],
    ) -> Result<Option<Provider>, GatewayError> {
        let candidates: Vec<Provider> = Provider::ALL
            .into_iter()
            .filter(|provider| reach.contains(provider) && own_active.contains(provider))
            .collect();
        if !self.settings.provider_preference.is_empty() {
            return Ok(self
                .settings
                .provider_preference
                .iter()
                .copied()
                .find(|provider| candidates.contains(provider)));
        }
        let mut best: Option<(Provider, f64)> = None;
        for provider in candidates {
            let (failed, total) = self
                .store
                .recent_outcomes(group_id, provider.code(), 50)
                .await?;
            let failure_rate = if total == 0 {
                0.0
            } else {
                failed as f64 / total as f64
            };
            if best.is_none_or(|(_, rate)| failure_rate < rate) {
                best = Some((provider, failure_rate));
            }
        }
        Ok(best.map(|(provider, _)| provider))
    }

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
        if !crate::domain::types::is_valid_hpii(&request.recipient_hpii) {
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
        let (entry, reach, unanswered) = self.reach(principal, &request.recipient_hpii).await?;
        let Some(entry) = entry else {
            if !unanswered.is_empty() {
                return Err(GatewayError::ProviderUnavailable {
                    provider: Provider::from_code(&unanswered[0].to_uppercase())
                        .unwrap_or(Provider::Argus),
                    retry_after: None,
                });
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
            None => self
                .route(&principal.group_id, &reach, &own_active)
                .await?
                .ok_or_else(|| {
                    let others: Vec<&str> = reach.iter().map(|p| p.display_name()).collect();
                    GatewayError::RecipientNotReachable(format!(
                        "{name} is reachable only through {}, which you are not connected to",
                        others.join(" and ")
                    ))
                })?,
        };
        let patient = self.patient(principal, &note.patient_id).await?;
        let message_id = new_id();
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
            control_id: message_id.clone(),
            sent_at: Utc::now(),
            sending_application: "SMD Gateway".into(),
            sender: hl7::Party {
                hpii: String::new(),
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
            direction: "OUTBOUND".into(),
            provider: provider.code().into(),
            status: "QUEUED".into(),
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
                .debit_send_in(&txn, principal, &message_id, card)
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
                .is_none_or(|provider| provider.code() == existing.provider);
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

    fn open_payload(&self, row: &MessageRow) -> Result<StoredPayload, GatewayError> {
        let json = self
            .secrets
            .open(
                &row.payload_ciphertext,
                &format!("message/{}/{}", row.group_id, row.id),
            )
            .map_err(GatewayError::internal)?;
        serde_json::from_str(&json).map_err(GatewayError::internal)
    }

    /// A practitioner's messages, newest first.
    pub async fn messages(
        &self,
        principal: &Principal,
        direction: Option<&str>,
        status: Option<&str>,
        after: Option<&str>,
        first: u64,
    ) -> Result<Vec<MessageRow>, GatewayError> {
        practitioner_only(principal, "read secure messages")?;
        Ok(self
            .store
            .list_messages(&principal.user_id, direction, status, after, first)
            .await?)
    }

    /// One message with its content (reading content is audited).
    pub async fn message(
        &self,
        principal: &Principal,
        id: &str,
    ) -> Result<(MessageRow, Vec<hl7::Section>), GatewayError> {
        practitioner_only(principal, "read secure messages")?;
        // Practitioners may also read what waits in their practice's unassigned inbox, to
        // decide who should take it.
        let row = match self.store.find_message(&principal.user_id, id).await? {
            Some(row) => row,
            None => self
                .store
                .find_unassigned_message(&principal.group_id, id)
                .await?
                .ok_or_else(|| GatewayError::NotFound(format!("you have no message {id:?}")))?,
        };
        let payload = self.open_payload(&row)?;
        let sections = hl7::parse(&payload.hl7)
            .map(|message| message.referral_sections())
            .unwrap_or_default();
        let mut audit = AuditEntry::by(
            principal,
            actions::READ_MESSAGE,
            format!("message:{id}"),
            AuditOutcome::Success,
        );
        if row.owner_user_id.is_none() {
            audit = audit.with_detail("unassigned");
        }
        self.audit(audit).await;
        Ok((row, sections))
    }

    /// One pass of the outbox: sends queued messages and tracks sent ones. Returns how many
    /// messages it worked on.
    pub async fn process_outbox(&self, now: DateTime<Utc>) -> Result<usize, GatewayError> {
        use futures::StreamExt;
        let due = self.store.due_messages(now, OUTBOX_BATCH as u64).await?;
        let results: Vec<Result<bool, GatewayError>> = futures::stream::iter(due)
            .map(|message| async move {
                // Timed from the claim itself: a late claim in a long pass must not start
                // with a lease that has already run out.
                let lease_until = later(Utc::now(), self.settings.outbox_lease);
                if !self.store.claim_message(&message, lease_until).await? {
                    return Ok(false);
                }
                let message = MessageRow {
                    next_attempt_at: Some(lease_until),
                    attempts: message.attempts + 1,
                    ..message
                };
                self.work_on(&message, now).await?;
                Ok(true)
            })
            .buffer_unordered(8)
            .collect()
            .await;
        let mut worked = 0;
        for result in results {
            match result {
                Ok(true) => worked += 1,
                Ok(false) => {}
                Err(error) => {
                    tracing::error!(error = ?error, "outbox step failed; it will be retried")
                }
            }
        }
        Ok(worked)
    }

    async fn work_on(&self, message: &MessageRow, now: DateTime<Utc>) -> Result<(), GatewayError> {
        let provider = Provider::from_code(&message.provider).ok_or_else(|| {
            GatewayError::internal(anyhow::anyhow!("unknown provider {}", message.provider))
        })?;
        let Some(credentials) = self
            .integrations
            .active_group_credentials(&message.group_id, provider)
            .await?
        else {
            // The account was disconnected or is no longer active: keep the message and look
            // again later; a queued one the provider never saw fails and is refunded in time.
            if message.status == "QUEUED" && self.too_old(message, now) {
                return self
                    .give_up(
                        message,
                        &format!("your practice's {provider} connection is no longer active"),
                    )
                    .await;
            }
            let update = MessageUpdate {
                next_attempt_at: Some(Some(later(now, self.settings.retry_max))),
                ..MessageUpdate::default()
            };
            self.store
                .update_message(&message.id, &message.status, &update)
                .await?;
            return Ok(());
        };
        let adapter = self.providers.get(provider);
        if message.status == "QUEUED" {
            let payload = self.open_payload(message)?;
            let result = adapter
                .send(
                    &credentials,
                    &OutboundMessage {
                        client_message_id: &message.id,
                        recipient_hpii: &message.counterpart_hpii,
                        payload: &payload.hl7,
                    },
                )
                .await;
            match result {
                Ok(_) if self.settings.fail_after_send => {
                    return Err(GatewayError::internal(anyhow::anyhow!(
                        "test fault point: stopped after the provider accepted"
                    )));
                }
                Ok(reference) => {
                    let update = MessageUpdate {
                        status: Some("SENT".into()),
                        provider_reference: Some(reference),
                        sent_at: Some(now),
                        next_attempt_at: Some(Some(later(now, self.settings.status_poll_interval))),
                        ..MessageUpdate::default()
                    };
                    self.store
                        .update_message(&message.id, "QUEUED", &update)
                        .await?;
                }
                Err(ProviderError::Refused { code, .. }) => {
                    self.fail_and_refund(
                        message,
                        &format!("{provider} refused the message ({})", safe_word(&code)),
                    )
                    .await?;
                }
                Err(ProviderError::InvalidCredentials) if self.too_old(message, now) => {
                    self.give_up(
                        message,
                        &format!("{provider} no longer accepts the practice's login"),
                    )
                    .await?;
                }
                Err(ProviderError::InvalidCredentials) => {
                    self.retry_later(message, now, None, false).await?;
                }
                Err(error @ (ProviderError::Unavailable { .. } | ProviderError::Duplicate)) => {
                    let retry_after = match &error {
                        ProviderError::Unavailable { retry_after, .. } => *retry_after,
                        _ => None,
                    };
                    // A timeout, a broken connection or an unreadable reply may hide an
                    // acceptance; a clean 5xx or 429 does not.
                    let ambiguous = matches!(&error, ProviderError::Unavailable { reason, .. }
                        if reason == "timed out" || reason.starts_with("transport error") || reason.starts_with("malformed"));
                    if self.too_old(message, now) {
                        let message = MessageRow {
                            ambiguous: message.ambiguous || ambiguous,
                            ..message.clone()
                        };
                        self.give_up(
                            &message,
                            &format!("{provider} did not accept the message in time"),
                        )
                        .await?;
                    } else {
                        tracing::warn!(message = %message.id, %provider, error = %error, "send failed; will retry");
                        self.retry_later(message, now, retry_after, ambiguous)
                            .await?;
                    }
                }
            }
            return Ok(());
        }
        let Some(reference) = message.provider_reference.as_deref() else {
            return Err(GatewayError::internal(anyhow::anyhow!(
                "sent message without a provider reference"
            )));
        };
        if self.too_old(message, now) {
            // Sent long ago and never acknowledged (some recipients never are): stop asking.
            let update = MessageUpdate {
                next_attempt_at: Some(None),
                ..MessageUpdate::default()
            };
            self.store
                .update_message(&message.id, &message.status, &update)
                .await?;
            return Ok(());
        }
        let update = match adapter.delivery_state(&credentials, reference).await {
            Ok(state) => delivery_update(
                message,
                &state,
                now,
                later(now, self.settings.status_poll_interval),
                provider,
            ),
            Err(error) => {
                tracing::warn!(message = %message.id, error = %error, "delivery status check failed; will retry");
                MessageUpdate {
                    next_attempt_at: Some(Some(later(now, self.backoff(message.attempts, None)))),
                    ..MessageUpdate::default()
                }
            }
        };
        self.store
            .update_message(&message.id, &message.status, &update)
            .await?;
        Ok(())
    }

    fn backoff(&self, attempts: i32, retry_after: Option<Duration>) -> Duration {
        use rand::Rng;
        let exponent = u32::try_from(attempts.saturating_sub(1))
            .unwrap_or(0)
            .min(16);
        let base = self
            .settings
            .retry_base
            .saturating_mul(2u32.saturating_pow(exponent))
            .min(self.settings.retry_max);
        // Up to 25% jitter so many messages failing together do not retry together.
        let jitter = base.mul_f64(rand::thread_rng().gen_range(0.0..0.25));
        (base + jitter).max(retry_after.unwrap_or_default().min(self.settings.retry_max))
    }

    fn too_old(&self, message: &MessageRow, now: DateTime<Utc>) -> bool {
        (now - message.created_at).to_std().unwrap_or_default() > self.settings.give_up_after
    }

    /// Gives up on a message the provider has not (knowingly) accepted. If an attempt may have
    /// reached the provider unseen, the credits are not refunded blindly: the message fails
    /// with a reason that says so.
    async fn give_up(&self, message: &MessageRow, reason: &str) -> Result<(), GatewayError> {
        if message.ambiguous {
            let update = MessageUpdate {
                status: Some("FAILED".into()),
                failure_reason: Some(format!(
                    "{reason}; an earlier attempt may have reached the provider, so the credits were not refunded automatically — contact support"
                )),
                next_attempt_at: Some(None),
                ..MessageUpdate::default()
            };
            self.store
                .update_message(&message.id, "QUEUED", &update)
                .await?;
            return Ok(());
        }
        self.fail_and_refund(message, reason).await
    }

    async fn retry_later(
        &self,
        message: &MessageRow,
        now: DateTime<Utc>,
        retry_after: Option<Duration>,
        ambiguous: bool,
    ) -> Result<(), GatewayError> {
        let update = MessageUpdate {
            next_attempt_at: Some(Some(later(
                now,
                self.backoff(message.attempts, retry_after),
            ))),
            ambiguous,
            ..MessageUpdate::default()
        };
        self.store
            .update_message(&message.id, "QUEUED", &update)
            .await?;
        Ok(())
    }

    /// The provider never accepted the message: it fails and its credits come back, together.
    async fn fail_and_refund(
        &self,
        message: &MessageRow,
        reason: &str,
    ) -> Result<(), GatewayError> {
        // Only received messages can be unassigned; an outbound one always has its sender.
        let sender = message.owner_user_id.as_deref().ok_or_else(|| {
            GatewayError::internal(anyhow::anyhow!(
                "outbound message {} has no sender",
                message.id
            ))
        })?;
        let txn = self.store.begin_credit_transaction().await?;
        let update = MessageUpdate {
            status: Some("FAILED".into()),
            failure_reason: Some(reason.to_owned()),
            next_attempt_at: Some(None),
            refunded: true,
            ..MessageUpdate::default()
        };
        if !self
            .store
            .update_message_in_transaction(&txn, &message.id, "QUEUED", &update)
            .await?
        {
            txn.rollback().await?;
            return Ok(());
        }
        self.credits
            .refund_in(
                &txn,
                &message.group_id,
                sender,
                message.credits_charged,
                &message.id,
            )
            .await?;
        let mut audit = AuditEntry::by_gateway(
            &message.group_id,
            actions::REFUND_MESSAGE,
            format!("message:{}", message.id),
            AuditOutcome::Success,
        )
        .with_detail(format!("{} credits: {reason}", message.credits_charged));
        audit.actor_user_id = None;
        self.store.audit_in(&txn, &audit).await?;
        txn.commit().await?;
        Ok(())
    }

    /// Records the calling practitioner's HPI-I (their identity in referrals they send, and
    /// how inbound messages addressed to them find them). An HPI-I belongs to at most one
    /// practitioner of a practice: the store's unique index decides between concurrent claims,
    /// so exactly one wins and the others get `Conflict`. Setting the HPI-I one already has
    /// changes nothing and succeeds. Every set, change and refused claim is audited.
    pub async fn set_my_hpii(&self, principal: &Principal, hpii: &str) -> Result<(), GatewayError> {
        practitioner_only(principal, "have an HPI-I")?;
        let hpii = hpii.trim();
        if !crate::domain::types::is_valid_hpii(hpii) {
            return Err(GatewayError::BadUserInput(
                "hpii must be 16 digits starting 800361 with a valid check digit".into(),
            ));
        }
        let audit = |change: &HpiiChange| {
            let (outcome, detail) = match change {
                HpiiChange::Set { previous: None } => {
                    (AuditOutcome::Success, format!("set {hpii}"))
                }
                HpiiChange::Set {
                    previous: Some(previous),
                } => (
                    AuditOutcome::Success,
                    format!("changed from {previous} to {hpii}"),
                ),
                HpiiChange::HeldByAnother | HpiiChange::Unchanged => (
                    AuditOutcome::Denied,
                    format!("{hpii} is held by another user of the practice"),
                ),
            };
            AuditEntry::by(
                principal,
                audit_actions::SET_HPII,
                format!("practitioner:{}", principal.subject),
                outcome,
            )
            .with_detail(detail)
        };
        match self
            .store
            .set_user_hpii(&principal.user_id, hpii, audit)
            .await?
        {
            // The other holder is not named: an administrator can find them in the audit trail.
            HpiiChange::HeldByAnother => Err(GatewayError::Conflict(
                "this HPI-I is already held by another practitioner of your practice; check the number, or ask an administrator (the audit trail shows who set it)".into(),
            )),
            HpiiChange::Unchanged | HpiiChange::Set { .. } => Ok(()),
        }
    }

    /// The caller's HPI-I, if they set one.
    pub async fn my_hpii(&self, principal: &Principal) -> Result<Option<String>, GatewayError> {
        Ok(self
            .store
            .user_by_id(&principal.user_id)
            .await?
            .and_then(|user| user.hpii))
    }

    /// The practice's unassigned inbox (received messages whose HPI-I nobody holds), newest
    /// first. Envelopes only: the content stays sealed until a practitioner reads one with
    /// [`Self::message`]. Practitioners and administrators of the practice may list it.
    pub async fn unassigned_messages(
        &self,
        principal: &Principal,
        after: Option<&str>,
        first: u64,
    ) -> Result<Vec<MessageRow>, GatewayError> {
        Ok(self
            .store
            .list_unassigned_messages(&principal.group_id, after, first)
            .await?)
    }

    /// Takes a message from the practice's unassigned inbox and gives it to a practitioner:
    /// the caller, or the colleague named by `to_practitioner` (their `sub`). Administrators
    /// may hand messages on (triage from the envelope) but must name the practitioner, since
    /// they hold no inbox. Of concurrent claims exactly one wins; the others get `Conflict`.
    pub async fn assign_message(
        &self,
        principal: &Principal,
        id: &str,
        to_practitioner: Option<&str>,
    ) -> Result<MessageRow, GatewayError> {
        let assignee = match (principal.role, to_practitioner) {
            (Role::Administrator, None) => {
                return Err(GatewayError::BadUserInput(
                    "toPractitionerId: administrators must name the practitioner who takes the message".into(),
                ));
            }
            (Role::Practitioner, None) => principal.subject.as_str(),
            (_, Some(subject)) => subject.trim(),
        };
        let assignee = self
            .store
            .find_practitioner(&principal.group_id, assignee)
            .await?
            .ok_or_else(|| {
                GatewayError::NotFound(format!("no practitioner {assignee:?} in your practice"))
            })?;
        let audit = AuditEntry::by(
            principal,
            actions::ASSIGN_MESSAGE,
            format!("message:{id}"),
            AuditOutcome::Success,
        )
        .with_detail(format!("to practitioner:{}", assignee.subject));
        match self
            .store
            .assign_message(&principal.group_id, id, &assignee.user_id, &audit)
            .await?
        {
            Assignment::Assigned => {}
            Assignment::AlreadyAssigned => {
                let mut refused = audit;
                refused.outcome = AuditOutcome::Denied;
                refused.detail = Some("already assigned".into());
                self.audit(refused).await;
                return Err(GatewayError::Conflict(
                    "this message is already assigned: someone took it from the unassigned inbox first".into(),
                ));
            }
            Assignment::NotFound => {
                return Err(GatewayError::NotFound(format!(
                    "your practice has no received message {id:?}"
                )));
            }
        }
        self.store
            .find_message(&assignee.user_id, id)
            .await?
            .ok_or_else(|| {
                GatewayError::internal(anyhow::anyhow!("assigned message {id} vanished"))
            })
    }

    /// Marks a received message as acknowledged by its practitioner.
    pub async fn acknowledge(
        &self,
        principal: &Principal,
        id: &str,
    ) -> Result<MessageRow, GatewayError> {
        practitioner_only(principal, "acknowledge secure messages")?;
        let row = self
            .store
            .find_message(&principal.user_id, id)
            .await?
            .ok_or_else(|| GatewayError::NotFound(format!("you have no message {id:?}")))?;
        if row.direction != "INBOUND" {
            return Err(GatewayError::BadUserInput(
                "only received messages can be acknowledged".into(),
            ));
        }
        let update = MessageUpdate {
            status: Some("ACKNOWLEDGED".into()),
            acknowledged_at: Some(Utc::now()),
            ..MessageUpdate::default()
        };
        self.store
            .update_message(&row.id, "DELIVERED", &update)
            .await?;
        Ok(self
            .store
            .find_message(&principal.user_id, id)
            .await?
            .unwrap_or(row))
    }

    /// One pass of the inbox poller: for every ACTIVE account, fetch waiting messages, store
    /// each for its addressee, and only then acknowledge it to the provider. A duplicate (already
    /// stored) is acknowledged again and dropped. Receiving costs nothing.
    pub async fn poll_inboxes(&self) -> Result<usize, GatewayError> {
        let mut received = 0;
        for account in self.store.active_accounts().await? {
            let Some(credentials) = self
                .integrations
                .active_group_credentials(&account.group_id, account.provider)
                .await?
            else {
                continue;
            };
            self.ensure_webhook(&account, &credentials).await;
            let adapter = self.providers.get(account.provider);
            let items = match adapter.fetch_inbox(&credentials).await {
                Ok(items) => items,
                Err(error) => {
                    tracing::warn!(provider = %account.provider, error = %error, "inbox fetch failed; will retry");
                    continue;
                }
            };
            for item in items {
                let parsed = hl7::parse(&item.payload).ok();
                let addressed_hpii = parsed
                    .as_ref()
                    .and_then(|message| message.party(hl7::ROLE_REFERRED_TO_PROVIDER))
                    .map(|party| party.hpii);
                // Only a well-formed HPI-I can be anyone's; anything else is kept as "no HPI-I".
                let addressed_hpii =
                    addressed_hpii.filter(|hpii| crate::domain::types::is_valid_hpii(hpii));
                // The practitioner of this practice who holds the HPI-I, or nobody: then it
                // waits in the practice's unassigned inbox for a practitioner to claim it.
                let owner = match &addressed_hpii {
                    Some(hpii) => self
                        .store
                        .practitioner_by_hpii(&account.group_id, hpii)
                        .await?
                        .map(|user| user.id),
                    None => None,
                };
                let id = new_id();
                let stored = StoredPayload {
                    hl7: item.payload.clone(),
                    section_keys: Vec::new(),
                };
                let sealed = self
                    .secrets
                    .seal(
                        &serde_json::to_string(&stored).map_err(GatewayError::internal)?,
                        &format!("message/{}/{id}", account.group_id),
                    )
                    .map_err(GatewayError::internal)?;
                let now = Utc::now();
                let row = MessageRow {
                    id: id.clone(),
                    group_id: account.group_id.clone(),
                    owner_user_id: owner,
                    direction: "INBOUND".into(),
                    provider: account.provider.code().into(),
                    status: "DELIVERED".into(),
                    counterpart_hpii: item.sender_hpii.chars().take(16).collect(),
                    counterpart_name: item.sender_name.chars().take(256).collect(),
                    note_id: None,
                    payload_ciphertext: sealed,
                    idempotency_key: None,
                    provider_reference: Some(item.id.clone()),
                    failure_reason: None,
                    credits_charged: 0,
                    refunded: false,
                    ambiguous: false,
                    attempts: 0,
                    next_attempt_at: None,
                    created_at: now,
                    sent_at: None,
                    delivered_at: Some(now),
                    acknowledged_at: None,
                    addressed_hpii,
                };
                let audit = AuditEntry::by_gateway(
                    &account.group_id,
                    actions::RECEIVE_MESSAGE,
                    format!("message:{id}"),
                    AuditOutcome::Success,
                )
                .with_detail(format!(
                    "{} from {}{}",
                    account.provider.code(),
                    row.counterpart_hpii,
                    if row.owner_user_id.is_none() {
                        "; unassigned"
                    } else {
                        ""
                    }
                ));
                // Stored (or stored before) first; only then may the provider forget it.
                let is_new = self.store.insert_inbound_message(&row, &audit).await?;
                if let Err(error) = adapter.acknowledge_inbox(&credentials, &item.id).await {
                    tracing::warn!(provider = %account.provider, error = %error, "inbox acknowledgement failed; the duplicate will be dropped next time");
                }
                if is_new {
                    received += 1;
                }
            }
        }
        Ok(received)
    }

    /// Makes sure an ACTIVE account of a provider that pushes receipts pushes them to us.
    async fn ensure_webhook(
        &self,
        account: &crate::store::accounts::AccountRow,
        credentials: &crate::domain::types::ProviderCredentials,
    ) {
        let Some(public_url) = &self.settings.public_url else {
            return;
        };
        if account.webhook_secret_ciphertext.is_some() {
            return;
        }
        let url = format!(
            "{}/webhooks/{}/{}",
            public_url.trim_end_matches('/'),
            account.provider.code().to_lowercase(),
            account.id
        );
        match self
            .providers
            .get(account.provider)
            .register_webhook(credentials, &url)
            .await
        {
            Ok(Some(secret)) => match self
                .secrets
                .seal(&secret, &format!("webhook/{}", account.id))
            {
                Ok(sealed) => {
                    if let Err(error) = self.store.set_webhook_secret(&account.id, &sealed).await {
                        tracing::warn!(error = ?error, "could not store a webhook secret");
                    }
                }
                Err(error) => tracing::error!(error = ?error, "could not seal a webhook secret"),
            },
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(provider = %account.provider, error = %error, "webhook registration failed; polling continues")
            }
        }
    }

    /// A delivery receipt pushed by a provider. The signature (HMAC-SHA256 of
    /// `"<timestamp>.<body>"` with the account's secret) and the timestamp (within the replay
    /// window) are checked before anything in the body is believed.
    pub async fn receive_receipt(
        &self,
        account_id: &str,
        timestamp: Option<&str>,
        signature: Option<&str>,
        body: &[u8],
    ) -> Result<(), GatewayError> {
        use hmac::{Hmac, Mac};
        let refused = || {
            GatewayError::Unauthenticated(
                "the receipt's signature or timestamp is not valid".into(),
            )
        };
        let account = self
            .store
            .account_by_id(account_id)
            .await?
            .ok_or_else(refused)?;
        let sealed = account
            .webhook_secret_ciphertext
            .as_deref()
            .ok_or_else(refused)?;
        let secret = self
            .secrets
            .open(sealed, &format!("webhook/{}", account.id))
            .map_err(GatewayError::internal)?;
        let timestamp = timestamp.ok_or_else(refused)?;
        let sent_at: i64 = timestamp.parse().map_err(|_| refused())?;
        if (Utc::now().timestamp() - sent_at).unsigned_abs()
            > self.settings.webhook_tolerance.as_secs()
        {
            return Err(refused());
        }
        let signature = signature
            .and_then(|value| value.strip_prefix("sha256="))
            .ok_or_else(refused)?;
        let expected = decode_hex(signature).ok_or_else(refused)?;
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes())
            .map_err(GatewayError::internal)?;
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        mac.verify_slice(&expected).map_err(|_| refused())?;

        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Receipt {
            message_id: String,
            state: String,
            reason: Option<String>,
        }
        let receipt: Receipt = serde_json::from_slice(body).map_err(|_| {
            GatewayError::BadUserInput("the receipt is not the expected JSON".into())
        })?;
        let Some(message) = self.store.message_by_id(&receipt.message_id).await? else {
            return Ok(());
        };
        let ours = message.group_id == account.group_id
            && message.provider == account.provider.code()
            && message.direction == "OUTBOUND";
        // Not ours, not sent yet (polling will see it), or already final: nothing to change.
        if !ours || !matches!(message.status.as_str(), "SENT" | "DELIVERED") {
            return Ok(());
        }
        let state = match receipt.state.as_str() {
            "DELIVERED" => DeliveryState::Delivered,
            "ACKNOWLEDGED" => DeliveryState::Acknowledged,
            "UNDELIVERABLE" => {
                DeliveryState::Failed(receipt.reason.unwrap_or_else(|| "undeliverable".into()))
            }
            _ => return Ok(()),
        };
        let now = Utc::now();
        let update = delivery_update(
            &message,
            &state,
            now,
            later(now, self.settings.status_poll_interval),
            account.provider,
        );
        self.store
            .update_message(&message.id, &message.status, &update)
            .await?;
        Ok(())
    }

    async fn audit(&self, entry: AuditEntry) {
        if let Err(error) = self.store.insert_audit(&entry).await {
            tracing::error!(action = %entry.action, error = ?error, "could not record an audit event");
        }
    }
}

/// What a provider's delivery state means for a message in its current status. Transitions
/// only move forward, so duplicate and out-of-order receipts change nothing.
fn delivery_update(
    message: &MessageRow,
    state: &DeliveryState,
    now: DateTime<Utc>,
    next_poll: DateTime<Utc>,
    provider: Provider,
) -> MessageUpdate {
    let poll_again = Some(Some(next_poll));
    match state {
        DeliveryState::Accepted => MessageUpdate {
            next_attempt_at: poll_again,
            ..MessageUpdate::default()
        },
        DeliveryState::Delivered if message.status == "SENT" => MessageUpdate {
            status: Some("DELIVERED".into()),
            delivered_at: Some(now),
            next_attempt_at: poll_again,
            ..MessageUpdate::default()
        },
        DeliveryState::Delivered => MessageUpdate {
            next_attempt_at: poll_again,
            ..MessageUpdate::default()
        },
        DeliveryState::Acknowledged => MessageUpdate {
            status: Some("ACKNOWLEDGED".into()),
            delivered_at: message.delivered_at.or(Some(now)),
            acknowledged_at: Some(now),
            next_attempt_at: Some(None),
            ..MessageUpdate::default()
        },
        // A delivered message cannot fail afterwards; the provider's words stay in the log.
        DeliveryState::Failed(reason) if message.status == "SENT" => {
            tracing::info!(message = %message.id, %provider, reason = %reason, "provider reports the message undeliverable");
            MessageUpdate {
                status: Some("FAILED".into()),
                failure_reason: Some(format!(
                    "{provider} could not deliver the message to the recipient's endpoint"
                )),
                next_attempt_at: Some(None),
                ..MessageUpdate::default()
            }
        }
        DeliveryState::Failed(_) => MessageUpdate {
            next_attempt_at: poll_again,
            ..MessageUpdate::default()
        },
    }
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|index| u8::from_str_radix(text.get(index..index + 2)?, 16).ok())
        .collect()
}
