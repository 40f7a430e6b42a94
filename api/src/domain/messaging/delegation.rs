//! Delegated sending. A practitioner grants another user of their practice (typically an
//! administrator) the right to send secure messages on their behalf, until revoked or until a
//! date. The delegate then sends, previews and reads the practitioner's notes with
//! `onBehalfOf`: the message is the practitioner's (their note, HPI-I and wallet, their
//! messages list), and every audit row names both people (actor: the delegate; on behalf of:
//! the practitioner).
//!
//! Whether a grant is live is [`refusal`], a pure function of the stored row and the time. A
//! send asks it twice: early, before any directory call or purchase, and again inside the write
//! transaction that debits the wallet, on the row locked there, so a revoke that committed
//! first always wins (see `Store::delegation_in`).

use chrono::{DateTime, Utc};

use super::{MessagingService, actions};
use crate::domain::GatewayError;
use crate::domain::audit::{AuditEntry, AuditOutcome, Principal};
use crate::domain::types::Role;
use crate::store::Transaction;
use crate::store::delegations::DelegationRow;
use crate::store::users::UserRow;

/// Where a delegation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DelegationStatus {
    /// The delegate may act for the practitioner now.
    Live,
    /// The practitioner revoked it.
    Revoked,
    /// Its end date has passed.
    Expired,
}

/// Why a delegate may not act for a practitioner now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No grant between these two people (or no such practitioner in the practice).
    NoGrant,
    /// The grant was revoked.
    Revoked,
    /// The grant ended at this time.
    Expired(DateTime<Utc>),
}

/// The rule: a grant counts while it is neither revoked nor past its end.
pub fn refusal(row: Option<&DelegationRow>, now: DateTime<Utc>) -> Option<Refusal> {
    let Some(row) = row else {
        return Some(Refusal::NoGrant);
    };
    if row.revoked_at.is_some() {
        return Some(Refusal::Revoked);
    }
    match row.expires_at {
        Some(end) if end <= now => Some(Refusal::Expired(end)),
        _ => None,
    }
}

fn status(row: &DelegationRow, now: DateTime<Utc>) -> DelegationStatus {
    match refusal(Some(row), now) {
        None => DelegationStatus::Live,
        Some(Refusal::Revoked) => DelegationStatus::Revoked,
        Some(Refusal::Expired(_) | Refusal::NoGrant) => DelegationStatus::Expired,
    }
}

/// One side of a delegation, as people see it.
#[derive(Debug, Clone)]
pub struct DelegationParty {
    /// Their `sub` (the id `onBehalfOf` and `delegateId` take).
    pub subject: String,
    /// Display name.
    pub name: String,
}

/// A delegation, as people see it.
#[derive(Debug, Clone)]
pub struct Delegation {
    /// Who granted it.
    pub practitioner: DelegationParty,
    /// Who holds it.
    pub delegate: DelegationParty,
    /// When it was (last) granted.
    pub granted_at: DateTime<Utc>,
    /// When it ends (`None`: until revoked).
    pub expires_at: Option<DateTime<Utc>>,
    /// When it was revoked.
    pub revoked_at: Option<DateTime<Utc>>,
    /// Where it stands now.
    pub status: DelegationStatus,
}

/// What a user granted and what they hold.
#[derive(Debug, Clone, Default)]
pub struct Delegations {
    /// Granted by the caller (practitioners).
    pub granted: Vec<Delegation>,
    /// Held by the caller.
    pub held: Vec<Delegation>,
}

/// Whom a messaging operation acts as: the caller for themselves, or a delegate for the
/// practitioner whose live grant they hold.
#[derive(Debug, Clone)]
pub(crate) struct Acting {
    /// The caller.
    pub actor: Principal,
    /// Whose note, HPI-I, connections and wallet are used (the caller when not delegated).
    pub owner: Principal,
    delegated: bool,
}

impl Acting {
    /// The caller acting for themselves.
    pub fn own(principal: &Principal) -> Self {
        Self {
            actor: principal.clone(),
            owner: principal.clone(),
            delegated: false,
        }
    }

    /// Whether the caller acts for someone else.
    pub fn delegated(&self) -> bool {
        self.delegated
    }

    /// The practitioner acted for, when delegated.
    pub fn on_behalf_of(&self) -> Option<&str> {
        self.delegated.then_some(self.owner.subject.as_str())
    }

    /// An audit event by the caller, naming the practitioner when delegated.
    pub fn audit(&self, action: &str, target: String, outcome: AuditOutcome) -> AuditEntry {
        AuditEntry::by(&self.actor, action, target, outcome).on_behalf_of(self.on_behalf_of())
    }
}

fn refused(practitioner: &str, refusal: Refusal) -> GatewayError {
    GatewayError::Forbidden(match refusal {
        Refusal::NoGrant => format!(
            "you hold no sending delegation from {practitioner:?} in your practice; that practitioner must grant you one (grantSendingDelegation)"
        ),
        Refusal::Revoked => {
            format!("{practitioner:?} revoked your sending delegation; ask them to grant it again")
        }
        Refusal::Expired(end) => format!(
            "your sending delegation from {practitioner:?} ended at {}; ask them to grant it again",
            end.to_rfc3339()
        ),
    })
}

fn refusal_detail(refusal: Refusal) -> &'static str {
    match refusal {
        Refusal::NoGrant => "no sending delegation",
        Refusal::Revoked => "sending delegation revoked",
        Refusal::Expired(_) => "sending delegation expired",
    }
}

fn party(user: Option<UserRow>, fallback_id: &str) -> DelegationParty {
    match user {
        Some(user) => DelegationParty {
            subject: user.subject,
            name: user.name,
        },
        None => DelegationParty {
            subject: fallback_id.to_owned(),
            name: String::new(),
        },
    }
}

impl MessagingService {
    /// Resolves whom an operation acts as. Without `on_behalf_of` (or naming oneself) the
    /// caller must be a practitioner, as before delegation existed. With it, the named user
    /// must be a practitioner of the caller's practice who granted the caller a live
    /// delegation; a refusal is audited (`action`, `DENIED`) and `Forbidden`.
    pub(crate) async fn acting(
        &self,
        principal: &Principal,
        on_behalf_of: Option<&str>,
        action: &str,
        what: &str,
    ) -> Result<Acting, GatewayError> {
        let subject = match on_behalf_of.map(str::trim) {
            Some(subject) if subject != principal.subject => subject,
            _ => {
                if principal.role != Role::Practitioner {
                    return Err(GatewayError::Forbidden(format!(
                        "only practitioners can {what} in their own name; an administrator does it on a practitioner's behalf (onBehalfOf), with a sending delegation that practitioner granted them"
                    )));
                }
                return Ok(Acting::own(principal));
            }
        };
        let practitioner = self
            .store
            .user_by_subject(&principal.group_id, subject)
            .await?
            .filter(|user| user.role == Role::Practitioner);
        let row = match &practitioner {
            Some(practitioner) => {
                self.store
                    .find_delegation(&practitioner.id, &principal.user_id)
                    .await?
            }
            None => None,
        };
        let refusal = refusal(row.as_ref(), chrono::Utc::now());
        match (practitioner, refusal) {
            (Some(practitioner), None) => Ok(Acting {
                actor: principal.clone(),
                owner: Principal {
                    user_id: practitioner.id,
                    subject: practitioner.subject,
                    group_id: principal.group_id.clone(),
                    role: Role::Practitioner,
                    name: practitioner.name,
                    request_id: principal.request_id.clone(),
                    expires_at: principal.expires_at,
                },
                delegated: true,
            }),
            (_, refusal) => {
                let refusal = refusal.unwrap_or(Refusal::NoGrant);
                self.audit(
                    AuditEntry::by(
                        principal,
                        action,
                        format!("practitioner:{subject}"),
                        AuditOutcome::Denied,
                    )
                    .on_behalf_of(Some(subject))
                    .with_detail(refusal_detail(refusal)),
                )
                .await;
                Err(refused(subject, refusal))
            }
        }
    }

    /// The decision that counts for a delegated write: the grant read and held inside the
    /// caller's write transaction. `Err(Forbidden)` (nothing audited yet: the caller rolls back
    /// and then records the refusal with [`Self::record_refusal`]).
    pub(crate) async fn delegation_holds_in(
        &self,
        txn: &Transaction,
        acting: &Acting,
    ) -> Result<Result<(), Refusal>, GatewayError> {
        if !acting.delegated() {
            return Ok(Ok(()));
        }
        let row = self
            .store
            .delegation_in(txn, &acting.owner.user_id, &acting.actor.user_id)
            .await?;
        Ok(match refusal(row.as_ref(), chrono::Utc::now()) {
            None => Ok(()),
            Some(refusal) => Err(refusal),
        })
    }

    /// Audits a refusal found inside a transaction (after it rolled back) and makes the error.
    pub(crate) async fn record_refusal(
        &self,
        acting: &Acting,
        action: &str,
        refusal: Refusal,
    ) -> GatewayError {
        self.audit(
            acting
                .audit(
                    action,
                    format!("practitioner:{}", acting.owner.subject),
                    AuditOutcome::Denied,
                )
                .with_detail(refusal_detail(refusal)),
        )
        .await;
        refused(&acting.owner.subject, refusal)
    }

    /// Grants `delegate` (a user of the caller's practice, by `sub`) the right to send on the
    /// calling practitioner's behalf, until revoked or until `until`. Granting again renews it.
    pub async fn grant_delegation(
        &self,
        principal: &Principal,
        delegate: &str,
        until: Option<DateTime<Utc>>,
    ) -> Result<Delegation, GatewayError> {
        let delegate = delegate.trim();
        if principal.role != Role::Practitioner {
            self.audit(
                AuditEntry::by(
                    principal,
                    actions::GRANT_SENDING_DELEGATION,
                    format!("delegate:{delegate}"),
                    AuditOutcome::Denied,
                )
                .with_detail("only practitioners grant"),
            )
            .await;
            return Err(GatewayError::Forbidden(
                "only practitioners grant sending delegations (a delegation lends their own HPI-I and credits)".into(),
            ));
        }
        if delegate == principal.subject {
            return Err(GatewayError::Forbidden(
                "you cannot grant a sending delegation to yourself: you already send in your own name; name the colleague who should send for you".into(),
            ));
        }
        let now = Utc::now();
        if let Some(until) = until
            && until <= now
        {
            return Err(GatewayError::BadUserInput(format!(
                "until must be in the future (it is now {}); leave it out for a delegation that lasts until you revoke it",
                now.to_rfc3339()
            )));
        }
        let Some(delegate_user) = self
            .store
            .user_by_subject(&principal.group_id, delegate)
            .await?
        else {
            return Err(GatewayError::NotFound(format!(
                "no user {delegate:?} in your practice; they must sign in to the gateway once before they can be named"
            )));
        };
        let audit = AuditEntry::by(
            principal,
            actions::GRANT_SENDING_DELEGATION,
            format!("delegate:{}", delegate_user.subject),
            AuditOutcome::Success,
        )
        .with_detail(match until {
            Some(until) => format!("until {}", until.to_rfc3339()),
            None => "until revoked".to_owned(),
        });
        let row = self
            .store
            .grant_delegation(
                &principal.group_id,
                &principal.user_id,
                &delegate_user.id,
                until,
                &audit,
            )
            .await?;
        self.view(row, now).await
    }

    /// Revokes the calling practitioner's delegation to `delegate`. Once this returns, no send
    /// on their behalf by that delegate can succeed (sends already committed stay sent).
    /// Revoking one already revoked changes nothing; one never granted is `NotFound`.
    pub async fn revoke_delegation(
        &self,
        principal: &Principal,
        delegate: &str,
    ) -> Result<Delegation, GatewayError> {
        let delegate = delegate.trim();
        if principal.role != Role::Practitioner {
            return Err(GatewayError::Forbidden(
                "only the practitioner who granted a sending delegation can revoke it".into(),
            ));
        }
        let not_found = || {
            GatewayError::NotFound(format!(
                "you have not granted a sending delegation to {delegate:?}"
            ))
        };
        let delegate_user = self
            .store
            .user_by_subject(&principal.group_id, delegate)
            .await?
            .ok_or_else(not_found)?;
        let audit = AuditEntry::by(
            principal,
            actions::REVOKE_SENDING_DELEGATION,
            format!("delegate:{}", delegate_user.subject),
            AuditOutcome::Success,
        );
        let row = self
            .store
            .revoke_delegation(&principal.user_id, &delegate_user.id, &audit)
            .await?
            .ok_or_else(not_found)?;
        self.view(row, Utc::now()).await
    }

    /// What the caller granted (practitioners) and what they hold, newest first.
    pub async fn delegations(&self, principal: &Principal) -> Result<Delegations, GatewayError> {
        let now = Utc::now();
        let mut delegations = Delegations::default();
        if principal.role == Role::Practitioner {
            for row in self
                .store
                .delegations_granted_by(&principal.user_id)
                .await?
            {
                delegations.granted.push(self.view(row, now).await?);
            }
        }
        for row in self.store.delegations_held_by(&principal.user_id).await? {
            delegations.held.push(self.view(row, now).await?);
        }
        Ok(delegations)
    }

    async fn view(
        &self,
        row: DelegationRow,
        now: DateTime<Utc>,
    ) -> Result<Delegation, GatewayError> {
        let practitioner = self.store.user_by_id(&row.practitioner_user_id).await?;
        let delegate = self.store.user_by_id(&row.delegate_user_id).await?;
        Ok(Delegation {
            practitioner: party(practitioner, &row.practitioner_user_id),
            delegate: party(delegate, &row.delegate_user_id),
            granted_at: row.granted_at,
            expires_at: row.expires_at,
            revoked_at: row.revoked_at,
            status: status(&row, now),
        })
    }
}

#[cfg(test)]
mod tests {
    use chrono::{Duration, TimeZone};

    use super::*;

    fn row(expires_at: Option<DateTime<Utc>>, revoked_at: Option<DateTime<Utc>>) -> DelegationRow {
        DelegationRow {
            id: "d".into(),
            group_id: "g".into(),
            practitioner_user_id: "p".into(),
            delegate_user_id: "a".into(),
            granted_at: Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap(),
            expires_at,
            revoked_at,
        }
    }

    #[test]
    fn a_grant_counts_only_while_neither_revoked_nor_past_its_end() {
        let now = Utc.with_ymd_and_hms(2026, 12, 2, 12, 0, 0).unwrap();
        let later = now + Duration::hours(1);
        let earlier = now - Duration::hours(1);
        let cases: [(Option<DelegationRow>, Option<Refusal>, &str); 7] = [
            (None, Some(Refusal::NoGrant), "no grant"),
            (Some(row(None, None)), None, "until revoked"),
            (Some(row(Some(later), None)), None, "ends later"),
            (
                Some(row(Some(now), None)),
                Some(Refusal::Expired(now)),
                "ends exactly now",
            ),
            (
                Some(row(Some(earlier), None)),
                Some(Refusal::Expired(earlier)),
                "ended",
            ),
            (
                Some(row(None, Some(earlier))),
                Some(Refusal::Revoked),
                "revoked",
            ),
            (
                Some(row(Some(earlier), Some(earlier))),
                Some(Refusal::Revoked),
                "revoked and ended: revoked is what the person did",
            ),
        ];
        for (row, expected, case) in cases {
            assert_eq!(refusal(row.as_ref(), now), expected, "{case}");
        }
    }

    #[test]
    fn refusals_say_what_to_do_and_are_forbidden() {
        for refusal in [
            Refusal::NoGrant,
            Refusal::Revoked,
            Refusal::Expired(Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap()),
        ] {
            match refused("dr-chen", refusal) {
                GatewayError::Forbidden(message) => {
                    assert!(message.contains("dr-chen"), "{message}");
                    assert!(message.contains("grant"), "{message}");
                }
                other => panic!("{other:?}"),
            }
        }
    }
}
