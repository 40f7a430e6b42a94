//! Delegated sending: a practitioner lets another user of the practice send secure messages
//! on their behalf (`onBehalfOf` on `sendSecureMessage`, `previewSecureMessage`,
//! `clinicalNotes` and `clinicalNote`).

use async_graphql::{Context, Enum, ID, InputObject, Object, SimpleObject};
use chrono::{DateTime, Utc};

use super::error::ApiError;
use super::{principal, services};
use crate::domain::messaging::{
    Delegation as DomainDelegation, DelegationParty, DelegationStatus as DomainStatus,
};

/// Where a sending delegation stands.
#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
pub enum DelegationStatus {
    /// The delegate may send on the practitioner's behalf now.
    Live,
    /// The practitioner revoked it.
    Revoked,
    /// Its end date (`until`) has passed.
    Expired,
}

impl From<DomainStatus> for DelegationStatus {
    fn from(status: DomainStatus) -> Self {
        match status {
            DomainStatus::Live => Self::Live,
            DomainStatus::Revoked => Self::Revoked,
            DomainStatus::Expired => Self::Expired,
        }
    }
}

/// One side of a sending delegation.
#[derive(SimpleObject)]
pub struct DelegationUser {
    /// Their user id (the token's `sub`): what `onBehalfOf` and `delegateId` take.
    pub id: ID,
    /// Display name.
    pub name: String,
}

impl From<DelegationParty> for DelegationUser {
    fn from(party: DelegationParty) -> Self {
        Self {
            id: ID(party.subject),
            name: party.name,
        }
    }
}

/// A practitioner's grant to another user of the practice to send secure messages on their
/// behalf: the messages are the practitioner's (their HPI-I, their credits), and the audit
/// trail names both people.
#[derive(SimpleObject)]
pub struct SendingDelegation {
    /// The practitioner who granted it.
    pub practitioner: DelegationUser,
    /// The user who may send on their behalf.
    pub delegate: DelegationUser,
    /// When it was granted (or last renewed).
    pub granted_at: DateTime<Utc>,
    /// When it ends; null: until revoked.
    pub until: Option<DateTime<Utc>>,
    /// When it was revoked.
    pub revoked_at: Option<DateTime<Utc>>,
    /// Where it stands now.
    pub status: DelegationStatus,
}

impl From<DomainDelegation> for SendingDelegation {
    fn from(delegation: DomainDelegation) -> Self {
        Self {
            practitioner: delegation.practitioner.into(),
            delegate: delegation.delegate.into(),
            granted_at: delegation.granted_at,
            until: delegation.expires_at,
            revoked_at: delegation.revoked_at,
            status: delegation.status.into(),
        }
    }
}

/// The caller's sending delegations.
#[derive(SimpleObject)]
pub struct SendingDelegations {
    /// Those the caller granted (practitioners), newest first.
    pub granted: Vec<SendingDelegation>,
    /// Those the caller holds: the practitioners they may send for while `LIVE`.
    pub held: Vec<SendingDelegation>,
}

/// A new (or renewed) sending delegation.
#[derive(InputObject)]
pub struct GrantSendingDelegationInput {
    /// The user of your practice who may send on your behalf (their id, the token's `sub`;
    /// they must have signed in once).
    pub delegate_id: ID,
    /// When it ends (must be in the future); omit for "until I revoke it".
    pub until: Option<DateTime<Utc>>,
}

#[derive(Default)]
pub struct DelegationQuery;

#[Object]
impl DelegationQuery {
    /// The sending delegations you granted (practitioners) and those you hold.
    async fn sending_delegations(&self, ctx: &Context<'_>) -> Result<SendingDelegations, ApiError> {
        let principal = principal(ctx)?;
        let delegations = services(ctx).messaging.delegations(principal).await?;
        Ok(SendingDelegations {
            granted: delegations.granted.into_iter().map(Into::into).collect(),
            held: delegations.held.into_iter().map(Into::into).collect(),
        })
    }
}

#[derive(Default)]
pub struct DelegationMutation;

#[Object]
impl DelegationMutation {
    /// Lets another user of your practice (typically an administrator) send secure messages on
    /// your behalf, and read your clinical notes to choose what to send, until you revoke it
    /// or until `until`. Granting again renews it. Practitioners only; every use is audited
    /// naming both of you.
    async fn grant_sending_delegation(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "Who, and until when.")] input: GrantSendingDelegationInput,
    ) -> Result<SendingDelegation, ApiError> {
        let principal = principal(ctx)?;
        Ok(services(ctx)
            .messaging
            .grant_delegation(principal, &input.delegate_id, input.until)
            .await?
            .into())
    }

    /// Ends your sending delegation to a user. Once this answers, no send on your behalf by
    /// them can succeed; messages already sent stay sent. Revoking again changes nothing.
    async fn revoke_sending_delegation(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The delegate's user id.")] delegate_id: ID,
    ) -> Result<SendingDelegation, ApiError> {
        let principal = principal(ctx)?;
        Ok(services(ctx)
            .messaging
            .revoke_delegation(principal, &delegate_id)
            .await?
            .into())
    }
}
