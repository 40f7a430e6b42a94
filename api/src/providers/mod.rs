//! Provider adapters: one per SMD provider, all behind [`ProviderClient`]. The only module that
//! knows reqwest. Every call has a timeout; every failure is classified into a
//! [`ProviderError`] whose text is for logs, never for clients.

mod argus;
mod http;
pub mod payments;
mod referralnet;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

pub use argus::ArgusClient;
pub use referralnet::ReferralNetClient;

use crate::domain::types::{Provider, ProviderCredentials, Registration};

/// An account's state as the provider reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountState {
    /// Usable.
    Active,
    /// Registered, not yet decided.
    Pending,
    /// Registration turned down.
    Rejected,
}

/// Why a provider call did not give an answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    /// The provider does not accept this username and password.
    #[error("invalid credentials")]
    InvalidCredentials,
    /// The provider understood and refused (`badParam`, `invalidPromoCode`, …).
    #[error("refused with {code}")]
    Refused {
        /// The provider's error word (ATS 5822 vocabulary).
        code: String,
        /// The provider's explanation (logged, not shown).
        message: String,
    },
    /// The username is already registered.
    #[error("username already registered")]
    Duplicate,
    /// No usable answer: 5xx, 429, timeout, connection failure or malformed body.
    #[error("unavailable ({kind:?}): {reason}")]
    Unavailable {
        /// Which way the call failed to answer; decisions branch on this.
        kind: Unavailability,
        /// What happened, for logs only: never decide on its wording.
        reason: String,
        /// When the provider asked us to come back, if it said.
        retry_after: Option<Duration>,
    },
}

/// Why a call got no usable answer. The classifier in `http.rs` knows which case it is when the
/// call fails, so nothing downstream has to read an error's text to find out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailability {
    /// No answer within the timeout: the request may have been acted on.
    Timeout,
    /// No connection could be made: the request never reached the provider.
    ConnectFailed,
    /// The connection broke after it was made: the request may have been acted on.
    Transport,
    /// An answer that could not be read (bad JSON, an unknown state word, bad encoding): the
    /// provider may have acted on the request.
    MalformedReply,
    /// A 5xx, or an answer the provider should never give (a fresh session refused).
    ServerError,
    /// 429: the provider asked us to slow down.
    RateLimited,
}

/// Every way a provider call can fail, as one kind: what the outbox decides retries and refunds
/// on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderFailure {
    /// No answer in time.
    Timeout,
    /// Could not connect.
    ConnectFailed,
    /// The connection broke.
    Transport,
    /// An unreadable answer.
    MalformedReply,
    /// 5xx or a misbehaving answer.
    ServerError,
    /// 429.
    RateLimited,
    /// The provider understood and refused: permanent.
    Refused,
    /// The provider does not accept the account's login.
    BadCredentials,
    /// The provider says it has this already.
    Duplicate,
}

impl ProviderFailure {
    /// Whether the provider may have acted on the request although we never learnt the
    /// answer (so a give-up must not refund blindly).
    pub fn may_have_been_accepted(self) -> bool {
        match self {
            ProviderFailure::Timeout
            | ProviderFailure::Transport
            | ProviderFailure::MalformedReply => true,
            ProviderFailure::ConnectFailed
            | ProviderFailure::ServerError
            | ProviderFailure::RateLimited
            | ProviderFailure::Refused
            | ProviderFailure::BadCredentials
            | ProviderFailure::Duplicate => false,
        }
    }
}

impl ProviderError {
    /// The kind of failure.
    pub fn failure(&self) -> ProviderFailure {
        match self {
            ProviderError::InvalidCredentials => ProviderFailure::BadCredentials,
            ProviderError::Refused { .. } => ProviderFailure::Refused,
            ProviderError::Duplicate => ProviderFailure::Duplicate,
            ProviderError::Unavailable { kind, .. } => match kind {
                Unavailability::Timeout => ProviderFailure::Timeout,
                Unavailability::ConnectFailed => ProviderFailure::ConnectFailed,
                Unavailability::Transport => ProviderFailure::Transport,
                Unavailability::MalformedReply => ProviderFailure::MalformedReply,
                Unavailability::ServerError => ProviderFailure::ServerError,
                Unavailability::RateLimited => ProviderFailure::RateLimited,
            },
        }
    }

    /// When the provider asked us to come back, if it said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::Unavailable { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// One practitioner as a provider's directory lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryEntry {
    /// HPI-I (16 digits).
    pub hpii: String,
    /// Given name.
    pub given_name: String,
    /// Family name.
    pub family_name: String,
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
}

/// A page of directory results.
#[derive(Debug, Clone)]
pub struct DirectoryPage {
    /// The entries, in the provider's order (family, given, HPI-I).
    pub entries: Vec<DirectoryEntry>,
    /// How many match in all.
    pub total: u64,
}

/// A message to hand to a provider.
#[derive(Debug, Clone)]
pub struct OutboundMessage<'a> {
    /// Our id for it; providers treat a repeat as the same message (idempotent retries).
    pub client_message_id: &'a str,
    /// The recipient's HPI-I.
    pub recipient_hpii: &'a str,
    /// The HL7 v2 text.
    pub payload: &'a str,
}

/// Where a sent message is, as the provider reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryState {
    /// Accepted, not yet delivered.
    Accepted,
    /// Reached the recipient's endpoint.
    Delivered,
    /// The recipient's system acknowledged it (HL7 application acknowledgement).
    Acknowledged,
    /// The provider gave up; the reason is the provider's.
    Failed(String),
}

/// A message waiting in the practice's provider inbox.
#[derive(Debug, Clone)]
pub struct InboxItem {
    /// The provider's id for it (acknowledge with this).
    pub id: String,
    /// The sender's HPI-I.
    pub sender_hpii: String,
    /// The sender's name.
    pub sender_name: String,
    /// The HL7 v2 text.
    pub payload: String,
}

/// What the gateway needs from every SMD provider.
#[async_trait]
pub trait ProviderClient: Send + Sync + 'static {
    /// Which provider this adapter speaks to.
    fn provider(&self) -> Provider;

    /// Checks the credentials and returns the account's state.
    async fn account_state(
        &self,
        credentials: &ProviderCredentials,
    ) -> Result<AccountState, ProviderError>;

    /// Registers a new account with a promo code; returns its initial state.
    async fn register(&self, registration: &Registration) -> Result<AccountState, ProviderError>;

    /// Searches the provider's directory (`offset` and `limit` in entries; `limit` ≤ 50).
    async fn search_directory(
        &self,
        credentials: &ProviderCredentials,
        query: &str,
        offset: u64,
        limit: u64,
    ) -> Result<DirectoryPage, ProviderError>;

    /// Hands a message to the provider; returns the provider's reference for tracking it.
    /// `Refused` is permanent (the provider will never accept it); `Unavailable` is not.
    async fn send(
        &self,
        credentials: &ProviderCredentials,
        message: &OutboundMessage<'_>,
    ) -> Result<String, ProviderError>;

    /// Asks where a sent message is.
    async fn delivery_state(
        &self,
        credentials: &ProviderCredentials,
        reference: &str,
    ) -> Result<DeliveryState, ProviderError>;

    /// Messages waiting in the account's inbox (not yet acknowledged), oldest first.
    async fn fetch_inbox(
        &self,
        credentials: &ProviderCredentials,
    ) -> Result<Vec<InboxItem>, ProviderError>;

    /// Tells the provider a message is safely stored (it will not be listed again).
    async fn acknowledge_inbox(
        &self,
        credentials: &ProviderCredentials,
        id: &str,
    ) -> Result<(), ProviderError>;

    /// Asks the provider to push delivery receipts to `url`; returns the signing secret, or
    /// `None` for a provider that does not push (the gateway then relies on polling).
    async fn register_webhook(
        &self,
        _credentials: &ProviderCredentials,
        _url: &str,
    ) -> Result<Option<String>, ProviderError> {
        Ok(None)
    }
}

/// Who a call goes to: the `provider` label of provider-call metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Upstream {
    /// Argus.
    Argus,
    /// ReferralNet.
    ReferralNet,
    /// The payment gateway.
    Payments,
}

/// Which endpoint of an upstream a call is for: a small fixed set, so metrics stay bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    /// Account state (the credential check).
    Account,
    /// Registration or enrolment with a promo code.
    Registrations,
    /// Directory search.
    Directory,
    /// Handing a message over.
    Send,
    /// A sent message's delivery state.
    Status,
    /// Listing the inbox.
    Inbox,
    /// Acknowledging an inbox message.
    Ack,
    /// ReferralNet's session login.
    Session,
    /// Registering the receipt webhook.
    Webhook,
    /// Charging a card.
    Charge,
    /// Looking up a card.
    PaymentMethod,
}

/// How a call ended, as far as the transport and the status code tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallOutcome {
    /// A 1xx–3xx answer.
    Ok,
    /// A 4xx other than 429: the upstream understood and refused (wrong password, a decline…).
    Refused,
    /// 429.
    RateLimited,
    /// 5xx.
    ServerError,
    /// No answer within the timeout.
    Timeout,
    /// No connection.
    ConnectFailed,
    /// Any other transport failure.
    TransportError,
}

/// Hears about every upstream call the dispatcher makes (the metrics implement it), so the
/// adapters need not know who counts.
pub trait CallObserver: Send + Sync + 'static {
    /// One call finished.
    fn call_finished(
        &self,
        upstream: Upstream,
        route: Route,
        outcome: CallOutcome,
        elapsed: Duration,
    );
}

/// Where and how to reach the providers.
#[derive(Debug, Clone)]
pub struct ProviderEndpoints {
    /// Argus base URL (without the `/argus/v1` path).
    pub argus_base_url: String,
    /// ReferralNet base URL (without the `/referralnet/api` path).
    pub referralnet_base_url: String,
    /// Whole-request timeout for every provider call.
    pub request_timeout: Duration,
}

/// The adapters in use, one per provider.
#[derive(Clone)]
pub struct Providers {
    argus: Arc<dyn ProviderClient>,
    referralnet: Arc<dyn ProviderClient>,
}

impl Providers {
    /// Real HTTP adapters for the given endpoints, each call reported to `observer`.
    pub fn http(
        endpoints: &ProviderEndpoints,
        observer: Arc<dyn CallObserver>,
    ) -> anyhow::Result<Self> {
        let client = http::build_client(endpoints.request_timeout)?;
        Ok(Self {
            argus: Arc::new(
                ArgusClient::new(client.clone(), &endpoints.argus_base_url)
                    .observed_by(observer.clone()),
            ),
            referralnet: Arc::new(
                ReferralNetClient::new(client, &endpoints.referralnet_base_url)
                    .observed_by(observer),
            ),
        })
    }

    /// The adapter for one provider.
    pub fn get(&self, provider: Provider) -> &dyn ProviderClient {
        match provider {
            Provider::Argus => self.argus.as_ref(),
            Provider::ReferralNet => self.referralnet.as_ref(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_timeout_a_broken_connection_or_an_unreadable_reply_may_hide_an_acceptance() {
        let unavailable = |kind| ProviderError::Unavailable {
            kind,
            reason: "the wording here must not matter".into(),
            retry_after: None,
        };
        let cases = [
            (
                unavailable(Unavailability::Timeout),
                ProviderFailure::Timeout,
                true,
            ),
            (
                unavailable(Unavailability::Transport),
                ProviderFailure::Transport,
                true,
            ),
            (
                unavailable(Unavailability::MalformedReply),
                ProviderFailure::MalformedReply,
                true,
            ),
            (
                unavailable(Unavailability::ConnectFailed),
                ProviderFailure::ConnectFailed,
                false,
            ),
            (
                unavailable(Unavailability::ServerError),
                ProviderFailure::ServerError,
                false,
            ),
            (
                unavailable(Unavailability::RateLimited),
                ProviderFailure::RateLimited,
                false,
            ),
            (
                ProviderError::Refused {
                    code: "badParam".into(),
                    message: "timed out".into(),
                },
                ProviderFailure::Refused,
                false,
            ),
            (
                ProviderError::InvalidCredentials,
                ProviderFailure::BadCredentials,
                false,
            ),
            (ProviderError::Duplicate, ProviderFailure::Duplicate, false),
        ];
        for (error, kind, may_have_been_accepted) in cases {
            assert_eq!(error.failure(), kind, "{error:?}");
            assert_eq!(
                kind.may_have_been_accepted(),
                may_have_been_accepted,
                "{kind:?}"
            );
        }
    }
}
