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
    #[error("unavailable: {reason}")]
    Unavailable {
        /// What happened, for logs.
        reason: String,
        /// When the provider asked us to come back, if it said.
        retry_after: Option<Duration>,
    },
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
