//! GraphQL mirrors of the domain's enums (the domain stays free of async-graphql).

use async_graphql::Enum;

use crate::domain::integrations::DisconnectScope as DomainScope;
use crate::domain::types::{
    ConnectionStatus as DomainStatus, Provider as DomainProvider, Role as DomainRole,
};
use crate::store::accounts::AccountOrigin as DomainOrigin;

/// An SMD provider. Sender and receiver must use the same one.
#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
pub enum Provider {
    /// Argus (Telstra Health).
    #[graphql(name = "ARGUS")]
    Argus,
    /// ReferralNet.
    #[graphql(name = "REFERRALNET")]
    ReferralNet,
}

impl From<Provider> for DomainProvider {
    fn from(provider: Provider) -> Self {
        match provider {
            Provider::Argus => DomainProvider::Argus,
            Provider::ReferralNet => DomainProvider::ReferralNet,
        }
    }
}

impl From<DomainProvider> for Provider {
    fn from(provider: DomainProvider) -> Self {
        match provider {
            DomainProvider::Argus => Provider::Argus,
            DomainProvider::ReferralNet => Provider::ReferralNet,
        }
    }
}

/// What a user may do, from the token's `role` claim.
#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// Can send secure messages.
    Practitioner,
    /// Manages the practice; cannot send secure messages.
    Administrator,
}

impl From<DomainRole> for Role {
    fn from(role: DomainRole) -> Self {
        match role {
            DomainRole::Practitioner => Role::Practitioner,
            DomainRole::Administrator => Role::Administrator,
        }
    }
}

/// The state of a connection to a provider.
#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
pub enum ConnectionStatus {
    /// Nothing linked.
    NotConnected,
    /// Registered; the provider has not approved it yet (Argus: typically 3–4 days).
    WaitingForApproval,
    /// Ready to use.
    Active,
    /// The provider turned the registration down.
    Rejected,
}

impl From<DomainStatus> for ConnectionStatus {
    fn from(status: DomainStatus) -> Self {
        match status {
            DomainStatus::NotConnected => ConnectionStatus::NotConnected,
            DomainStatus::WaitingForApproval => ConnectionStatus::WaitingForApproval,
            DomainStatus::Active => ConnectionStatus::Active,
            DomainStatus::Rejected => ConnectionStatus::Rejected,
        }
    }
}

/// How the group's provider account was set up.
#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
pub enum AccountOrigin {
    /// An existing provider account was linked with its username and password.
    Linked,
    /// A new account was registered through the gateway with a promo code.
    Registered,
}

impl From<DomainOrigin> for AccountOrigin {
    fn from(origin: DomainOrigin) -> Self {
        match origin {
            DomainOrigin::Linked => AccountOrigin::Linked,
            DomainOrigin::Registered => AccountOrigin::Registered,
        }
    }
}

/// Which link `disconnectProvider` removes.
#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
pub enum DisconnectScope {
    /// Only the caller's own link (practitioners' default).
    Individual,
    /// The practice's account and every practitioner's link to it (administrators' default;
    /// a practitioner only as the account's sole linked practitioner).
    Group,
}

impl From<DisconnectScope> for DomainScope {
    fn from(scope: DisconnectScope) -> Self {
        match scope {
            DisconnectScope::Individual => DomainScope::Individual,
            DisconnectScope::Group => DomainScope::Group,
        }
    }
}
