//! Patients and clinical notes: recorded by a practitioner, sealed at rest, opened only for
//! their owner.

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

use super::{MessagingService, actions, practitioner_only};
use crate::domain::GatewayError;
use crate::domain::audit::{AuditOutcome, Principal};
use crate::store::messaging::{NoteRow, PatientRow};
use crate::store::new_id;

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

impl MessagingService {
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

    pub(super) async fn patient(
        &self,
        principal: &Principal,
        id: &str,
    ) -> Result<Patient, GatewayError> {
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

    pub(super) fn open_note(&self, row: &NoteRow) -> Result<ClinicalNote, GatewayError> {
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

    /// One of the practitioner's own notes (reading it is audited), or, with `on_behalf_of`,
    /// one of the practitioner's who granted the caller a live sending delegation (audited
    /// naming both).
    pub async fn note(
        &self,
        principal: &Principal,
        id: &str,
        on_behalf_of: Option<&str>,
    ) -> Result<ClinicalNote, GatewayError> {
        let acting = self
            .acting(
                principal,
                on_behalf_of,
                actions::READ_NOTE,
                "read clinical notes",
            )
            .await?;
        let row = self
            .store
            .find_note(&acting.owner.user_id, id)
            .await?
            .ok_or_else(|| {
                GatewayError::NotFound(match acting.on_behalf_of() {
                    Some(owner) => format!("{owner} has no clinical note {id:?}"),
                    None => format!("you have no clinical note {id:?}"),
                })
            })?;
        let note = self.open_note(&row)?;
        self.audit(acting.audit(
            actions::READ_NOTE,
            format!("note:{id}"),
            AuditOutcome::Success,
        ))
        .await;
        Ok(note)
    }

    /// The practitioner's notes, newest first; with `on_behalf_of`, those of the practitioner
    /// who granted the caller a live sending delegation (each such listing is audited).
    pub async fn notes(
        &self,
        principal: &Principal,
        after: Option<&str>,
        first: u64,
        on_behalf_of: Option<&str>,
    ) -> Result<Vec<ClinicalNote>, GatewayError> {
        let acting = self
            .acting(
                principal,
                on_behalf_of,
                actions::READ_NOTE,
                "read clinical notes",
            )
            .await?;
        let notes = self
            .store
            .list_notes(&acting.owner.user_id, after, first)
            .await?
            .iter()
            .map(|row| self.open_note(row))
            .collect::<Result<Vec<_>, _>>()?;
        if acting.delegated() {
            self.audit(
                acting
                    .audit(
                        actions::READ_NOTE,
                        format!("practitioner:{}", acting.owner.subject),
                        AuditOutcome::Success,
                    )
                    .with_detail("listed a page of their notes"),
            )
            .await;
        }
        Ok(notes)
    }
}
