//! The one error type every service returns. Each kind maps to one `extensions.code` in the
//! GraphQL layer; only `Internal` carries a chain, and that chain is logged, never shown.

use std::time::Duration;

use crate::domain::types::Provider;

/// What went wrong, in terms a client can act on.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// No valid bearer token came with the request.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The caller is known but may not do this.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// The input broke a rule; the message names the field and the rule.
    #[error("bad user input: {0}")]
    BadUserInput(String),
    /// Nothing with that id exists in the caller's group.
    #[error("not found: {0}")]
    NotFound(String),
    /// The request contradicts what is already stored.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The caller's connection to the provider is not `ACTIVE` yet (or at all).
    #[error("integration not active: {0}")]
    IntegrationNotActive(String),
    /// The provider answered and said no (wrong credentials, bad promo code, …).
    #[error("provider rejected: {0}")]
    ProviderRejected(String),
    /// The provider did not answer usefully; nothing was stored.
    #[error("provider unavailable: {provider}")]
    ProviderUnavailable {
        /// Which provider failed.
        provider: Provider,
        /// When the provider asked us to come back, if it did.
        retry_after: Option<Duration>,
    },
    /// The caller asked too often.
    #[error("rate limited: {message}")]
    RateLimited {
        /// Person-readable explanation.
        message: String,
        /// How long until the next attempt is allowed.
        retry_after: Duration,
    },
    /// The card was declined; nothing was charged and no credits were added.
    #[error("payment declined: {0}")]
    PaymentDeclined(String),
    /// The payment gateway did not give a definitive answer; any charge will be reconciled
    /// with the same idempotency key, never taken twice.
    #[error("payment gateway unavailable")]
    PaymentUnavailable {
        /// When the gateway asked us to come back, if it did.
        retry_after: Option<Duration>,
    },
    /// The recipient is not on the chosen provider (or on none the practice uses).
    #[error("recipient not reachable: {0}")]
    RecipientNotReachable(String),
    /// The wallet does not hold enough credits.
    #[error("insufficient credits: {0}")]
    InsufficientCredits(String),
    /// A purchase would pass a monthly spending cap; nothing was charged.
    #[error("spending limit reached: {0}")]
    SpendingLimitReached(String),
    /// A fault of ours (database, bug). Logged with its chain; clients see a fixed message.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl GatewayError {
    /// Wraps any unexpected failure as an internal error.
    pub fn internal(error: impl Into<anyhow::Error>) -> Self {
        Self::Internal(error.into())
    }
}

impl From<crate::store::StoreError> for GatewayError {
    fn from(error: crate::store::StoreError) -> Self {
        Self::Internal(anyhow::Error::new(error))
    }
}
