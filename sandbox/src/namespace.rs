//! Namespaces: which namespace a request belongs to (path prefix `/ns/{name}/…`, else the
//! `X-Sandbox-Namespace` header, else `default`), the registry of every namespace's state, and
//! the extractor handlers use to reach the state of theirs.
//!
//! The path prefix is stripped before routing, so the provider and control routers never see it.
//! A namespace's state sits behind its own std mutex; handlers reach it only through
//! [`CurrentNamespace::with_state`], whose closure cannot await, so the lock is never held
//! across an await.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use axum::Json;
use axum::Router;
use axum::extract::{FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tower::ServiceExt;

use chrono::{DateTime, SubsecRound, Utc};

use crate::SandboxConfig;
use crate::accounts::{
    ARGUS_DEMO_ACCOUNT, Account, AccountBook, DecisionSeed, NewRegistration,
    REFERRALNET_DEMO_ACCOUNT, RegistrationError,
};
use crate::clock::SandboxClock;
use crate::directory::Directory;
use crate::faults::{FaultQueue, FaultRoute, TriggeredFault};
use crate::messaging::{
    DEFAULT_REFERRAL_TEXT, InboundReferral, InboxItem, MessageStore, NewInboxItem,
    inbound_referral_payload,
};
use crate::payments::PaymentBook;
use crate::provider::{Provider, Service};
use crate::random::NamespaceRandom;
use crate::referralnet::SessionBook;
use crate::scenario::Scenario;
use crate::schedule::{AccountChange, Schedule, ScheduledAction};

/// The header naming the namespace when the path has no `/ns/{name}` prefix.
pub(crate) const NAMESPACE_HEADER: &str = "x-sandbox-namespace";

/// The namespace of requests that name none.
pub(crate) const DEFAULT_NAMESPACE: &str = "default";

/// The path prefix that names a namespace, followed by the name.
const NAMESPACE_PATH_PREFIX: &str = "/ns/";

/// A namespace name: 1 to 64 of `a-z`, `0-9`, `_` and `-`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct NamespaceName(String);

impl NamespaceName {
    pub(crate) fn parse(name: &str) -> Result<NamespaceName, String> {
        let is_valid = (1..=64).contains(&name.len())
            && name.bytes().all(|byte| {
                byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'_' || byte == b'-'
            });
        if is_valid {
            Ok(NamespaceName(name.to_owned()))
        } else {
            Err(format!(
                "invalid namespace name {name:?}: use 1 to 64 of a-z, 0-9, '_' and '-'"
            ))
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

/// Everything one namespace holds. The directory is not here: it is the same in every
/// namespace, so the sandbox holds it once.
#[derive(Debug)]
pub(crate) struct NamespaceState {
    pub(crate) name: NamespaceName,
    pub(crate) config: SandboxConfig,
    pub(crate) clock: SandboxClock,
    pub(crate) argus_accounts: AccountBook,
    pub(crate) referralnet_accounts: AccountBook,
    pub(crate) referralnet_sessions: SessionBook,
    pub(crate) faults: FaultQueue,
    pub(crate) payments: PaymentBook,
    pub(crate) messages: MessageStore,
    pub(crate) requests: crate::requests::RequestLog,
    /// Where ids, tokens and secrets come from (seeded by a scenario's `seed`).
    pub(crate) random: NamespaceRandom,
    /// The seed registration decision times are drawn from.
    pub(crate) sandbox_seed: u64,
    /// Events waiting for the clock (from a scenario).
    pub(crate) schedule: Schedule,
    /// The scenario the namespace started from, which a reset goes back to.
    pub(crate) scenario: Option<Arc<Scenario>>,
}

/// Why an inbound referral could not be delivered.
#[derive(Debug)]
pub(crate) enum InboundError {
    /// The sender is not a directory practitioner the provider reaches.
    Sender(String),
    /// The account does not exist at the provider.
    Account(String),
}

/// A referral a directory practitioner sends to an account (control API or scenario).
#[derive(Debug)]
pub(crate) struct InboundRequest<'a> {
    pub(crate) provider: Provider,
    pub(crate) account: &'a str,
    pub(crate) from_hpii: Option<&'a str>,
    pub(crate) recipient_hpii: Option<&'a str>,
    pub(crate) recipient_name: Option<&'a str>,
    pub(crate) text: Option<&'a str>,
}

impl NamespaceState {
    /// A fresh namespace: demo accounts only, clock at real now and the configured speed.
    pub(crate) fn new(name: NamespaceName, config: SandboxConfig) -> NamespaceState {
        let clock = SandboxClock::starting_now(config.clock_speed);
        let now = clock.now();
        NamespaceState {
            name,
            config,
            clock,
            argus_accounts: AccountBook::with_demo_account(&ARGUS_DEMO_ACCOUNT, now),
            referralnet_accounts: AccountBook::with_demo_account(&REFERRALNET_DEMO_ACCOUNT, now),
            referralnet_sessions: SessionBook::default(),
            faults: FaultQueue::default(),
            payments: PaymentBook::default(),
            messages: MessageStore::default(),
            requests: crate::requests::RequestLog::default(),
            random: NamespaceRandom::from_entropy(),
            sandbox_seed: config.seed,
            schedule: Schedule::default(),
            scenario: None,
        }
    }

    /// A namespace as `scenario` starts it (checked against the sandbox already).
    pub(crate) fn from_scenario(
        name: NamespaceName,
        config: SandboxConfig,
        scenario: Arc<Scenario>,
    ) -> NamespaceState {
        let seeded = scenario.seed_namespace(name.as_str(), &config);
        NamespaceState {
            clock: seeded.clock,
            argus_accounts: seeded.argus_accounts,
            referralnet_accounts: seeded.referralnet_accounts,
            faults: seeded.faults,
            random: seeded.random,
            sandbox_seed: seeded.sandbox_seed,
            schedule: seeded.schedule,
            scenario: Some(scenario),
            ..NamespaceState::new(name, config)
        }
    }

    /// Puts the namespace back to how it was when first used: its scenario's start, if it
    /// started from one.
    pub(crate) fn reset(&mut self) {
        *self = match self.scenario.take() {
            Some(scenario) => {
                NamespaceState::from_scenario(self.name.clone(), self.config, scenario)
            }
            None => NamespaceState::new(self.name.clone(), self.config),
        };
    }

    /// The accounts of one provider.
    pub(crate) fn accounts(&self, provider: Provider) -> &AccountBook {
        match provider {
            Provider::Argus => &self.argus_accounts,
            Provider::ReferralNet => &self.referralnet_accounts,
        }
    }

    /// The accounts of one provider, to change.
    pub(crate) fn accounts_mut(&mut self, provider: Provider) -> &mut AccountBook {
        match provider {
            Provider::Argus => &mut self.argus_accounts,
            Provider::ReferralNet => &mut self.referralnet_accounts,
        }
    }

    /// Registers a new account with `provider` at the current sandbox time.
    pub(crate) fn register(
        &mut self,
        provider: Provider,
        registration: NewRegistration,
    ) -> Result<Account, RegistrationError> {
        let now = self.clock.now();
        let seed = DecisionSeed {
            sandbox_seed: self.sandbox_seed,
            namespace: self.name.as_str(),
            provider,
        };
        let accounts = match provider {
            Provider::Argus => &mut self.argus_accounts,
            Provider::ReferralNet => &mut self.referralnet_accounts,
        };
        accounts.register(registration, &seed, now).cloned()
    }

    /// A directory practitioner sends a `REF^I12` referral to an account's inbox, received at
    /// sandbox time `at`.
    pub(crate) fn deliver_inbound(
        &mut self,
        directory: &Directory,
        request: &InboundRequest<'_>,
        at: DateTime<Utc>,
    ) -> Result<InboxItem, InboundError> {
        let provider = request.provider;
        let sender = match request.from_hpii {
            Some(hpii) => directory
                .find(hpii.trim())
                .filter(|entry| entry.reachable_on(provider))
                .ok_or_else(|| {
                    InboundError::Sender(format!(
                        "fromHpii {hpii:?} is not a practitioner {} reaches",
                        provider.as_str()
                    ))
                })?,
            None => directory.first_ordinary_on(provider).ok_or_else(|| {
                InboundError::Sender(format!(
                    "the directory has no ordinary practitioner on {}; give fromHpii",
                    provider.as_str()
                ))
            })?,
        };
        let account = self
            .accounts(provider)
            .get(request.account)
            .ok_or_else(|| {
                InboundError::Account(format!(
                    "no {} account {:?}",
                    provider.as_str(),
                    request.account
                ))
            })?;
        let practice_name = account.practice_name.clone();
        let account_name = account.username.clone();
        let at = at.trunc_subsecs(0);
        let payload = inbound_referral_payload(
            &InboundReferral {
                provider,
                sender,
                receiving_facility: &practice_name,
                recipient_name: request.recipient_name.unwrap_or(&practice_name),
                recipient_hpii: request.recipient_hpii,
                text: request.text.unwrap_or(DEFAULT_REFERRAL_TEXT),
                sent_at: at,
            },
            &mut self.random,
        );
        let item = self.messages.deliver_to_inbox(
            NewInboxItem {
                provider,
                account: account_name,
                sender_hpii: sender.hpii.clone(),
                sender_name: sender.display_name(),
                received_at: at,
                payload,
            },
            &mut self.random,
        );
        Ok(item.clone())
    }

    /// Fires every scheduled event the clock has passed, in time order, each as of its own
    /// time.
    pub(crate) fn run_due_events(&mut self, directory: &Directory) {
        let now = self.clock.now();
        while let Some(event) = self.schedule.take_due(now) {
            let outcome = match &event.action {
                ScheduledAction::Account {
                    provider,
                    username,
                    change,
                } => {
                    let accounts = self.accounts_mut(*provider);
                    match change.decision() {
                        Some(decision) => accounts
                            .decide_early(username, decision, event.at)
                            .map(|_| ())
                            .map_err(|error| error.to_string()),
                        None => accounts.set_suspended(
                            username,
                            *change == AccountChange::Suspend,
                            event.at,
                        ),
                    }
                }
                ScheduledAction::Inbound {
                    provider,
                    account,
                    from_hpii,
                    recipient_hpii,
                    recipient_name,
                    text,
                } => {
                    let request = InboundRequest {
                        provider: *provider,
                        account,
                        from_hpii: from_hpii.as_deref(),
                        recipient_hpii: recipient_hpii.as_deref(),
                        recipient_name: recipient_name.as_deref(),
                        text: text.as_deref(),
                    };
                    self.deliver_inbound(directory, &request, event.at)
                        .map(|_| ())
                        .map_err(|error| match error {
                            InboundError::Sender(message) | InboundError::Account(message) => {
                                message
                            }
                        })
                }
                ScheduledAction::Fault { fault } => {
                    self.faults.add(fault.clone());
                    Ok(())
                }
            };
            let outcome = match outcome {
                Ok(()) => "done".to_owned(),
                Err(reason) => {
                    tracing::warn!(namespace = self.name.as_str(), %reason, "a scheduled event did nothing");
                    format!("nothing happened: {reason}")
                }
            };
            self.schedule.record(event, outcome);
        }
    }
}

/// The application state: every namespace, created on first use.
#[derive(Clone, Debug)]
pub(crate) struct SandboxState {
    registry: Arc<NamespaceRegistry>,
}

#[derive(Debug)]
struct NamespaceRegistry {
    config: SandboxConfig,
    directory: Arc<Directory>,
    namespaces: Mutex<HashMap<NamespaceName, Arc<Mutex<NamespaceState>>>>,
    webhook_ticker_started: AtomicBool,
    /// Counts the times any namespace was reached, so the state file is written only after
    /// something may have changed.
    changes: Arc<AtomicU64>,
}

/// A reference to the sandbox's state that does not keep it alive, for background tasks that
/// should end with the sandbox.
#[derive(Clone, Debug)]
pub(crate) struct WeakSandboxState(Weak<NamespaceRegistry>);

impl WeakSandboxState {
    /// The state, while the sandbox still exists.
    pub(crate) fn upgrade(&self) -> Option<SandboxState> {
        self.0.upgrade().map(|registry| SandboxState { registry })
    }

    /// Whether the sandbox still exists.
    pub(crate) fn is_alive(&self) -> bool {
        self.0.strong_count() > 0
    }
}

impl SandboxState {
    /// The state of a new sandbox, its directory generated from the seed.
    pub(crate) fn new(config: SandboxConfig) -> SandboxState {
        let directory = Directory::generate(config.seed, config.directory_size);
        SandboxState::with_directory(config, directory)
    }

    /// The state of a new sandbox with this directory (the generated one and any scenario's
    /// extra entries).
    pub(crate) fn with_directory(config: SandboxConfig, directory: Directory) -> SandboxState {
        SandboxState {
            registry: Arc::new(NamespaceRegistry {
                config,
                directory: Arc::new(directory),
                namespaces: Mutex::new(HashMap::new()),
                webhook_ticker_started: AtomicBool::new(false),
                changes: Arc::new(AtomicU64::new(0)),
            }),
        }
    }

    /// How many times namespaces have been reached so far (any change comes with one).
    pub(crate) fn change_count(&self) -> u64 {
        self.registry.changes.load(Ordering::Acquire)
    }

    /// Puts a namespace in place, replacing any of that name.
    pub(crate) fn install_namespace(&self, state: NamespaceState) {
        let name = state.name.clone();
        lock(&self.registry.namespaces).insert(name, Arc::new(Mutex::new(state)));
    }

    /// How the sandbox was set up.
    pub(crate) fn config(&self) -> SandboxConfig {
        self.registry.config
    }

    pub(crate) fn downgrade(&self) -> WeakSandboxState {
        WeakSandboxState(Arc::downgrade(&self.registry))
    }

    /// Starts the task that pushes webhooks, once per sandbox, when there is a tokio runtime to
    /// run it on; otherwise it is started by the first request.
    pub(crate) fn ensure_webhook_ticker(&self) {
        if self.registry.webhook_ticker_started.load(Ordering::Acquire) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if !self
            .registry
            .webhook_ticker_started
            .swap(true, Ordering::AcqRel)
        {
            // The ticker holds the state weakly and ends with it; nobody needs to join it.
            drop(crate::webhooks::spawn_ticker(&runtime, self.downgrade()));
        }
    }

    /// Runs `visit` on every namespace in turn, each locked only while it is visited.
    pub(crate) fn for_each_namespace(&self, mut visit: impl FnMut(&str, &mut NamespaceState)) {
        let namespaces: Vec<(NamespaceName, Arc<Mutex<NamespaceState>>)> =
            lock(&self.registry.namespaces)
                .iter()
                .map(|(name, state)| (name.clone(), Arc::clone(state)))
                .collect();
        for (name, state) in namespaces {
            visit(name.as_str(), &mut lock(&state));
        }
    }

    fn namespace(&self, name: &NamespaceName) -> Arc<Mutex<NamespaceState>> {
        let mut namespaces = lock(&self.registry.namespaces);
        namespaces
            .entry(name.clone())
            .or_insert_with(|| {
                tracing::info!(namespace = name.as_str(), "namespace created");
                Arc::new(Mutex::new(NamespaceState::new(
                    name.clone(),
                    self.registry.config,
                )))
            })
            .clone()
    }
}

/// Locks a mutex, carrying on after a panic elsewhere: every change to namespace state is
/// made whole or not at all, so a poisoned lock still guards consistent state.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The namespace of the request being handled.
#[derive(Debug)]
pub(crate) struct CurrentNamespace {
    name: NamespaceName,
    state: Arc<Mutex<NamespaceState>>,
    directory: Arc<Directory>,
    allow_private_webhooks: bool,
    config: SandboxConfig,
    changes: Arc<AtomicU64>,
}

impl CurrentNamespace {
    pub(crate) fn name(&self) -> &str {
        self.name.as_str()
    }

    /// The practitioner directory (the same in every namespace).
    pub(crate) fn directory(&self) -> &Directory {
        &self.directory
    }

    /// Whether webhooks may go to non-public addresses (`--allow-private-webhooks`).
    pub(crate) fn allows_private_webhooks(&self) -> bool {
        self.allow_private_webhooks
    }

    /// Runs `change` with the namespace locked, after firing the scheduled events the clock
    /// has passed. The closure is synchronous on purpose.
    pub(crate) fn with_state<R>(&self, change: impl FnOnce(&mut NamespaceState) -> R) -> R {
        let mut state = lock(&self.state);
        self.changes.fetch_add(1, Ordering::AcqRel);
        if state.schedule.has_due(state.clock.now()) {
            state.run_due_events(&self.directory);
        }
        change(&mut state)
    }

    /// The sandbox's configuration.
    pub(crate) fn config(&self) -> SandboxConfig {
        self.config
    }

    /// Uses up one hit of the oldest fault waiting for this call to a provider or the payment
    /// gateway, if any.
    pub(crate) fn take_fault(
        &self,
        service: impl Into<Service>,
        route: FaultRoute,
    ) -> Option<TriggeredFault> {
        let service = service.into();
        self.with_state(|state| {
            let now = state.clock.now();
            state.faults.take_matching(service, route, now)
        })
    }
}

impl FromRequestParts<SandboxState> for CurrentNamespace {
    type Rejection = Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &SandboxState,
    ) -> Result<CurrentNamespace, Infallible> {
        let name = parts
            .extensions
            .get::<NamespaceName>()
            .cloned()
            .unwrap_or_else(|| NamespaceName(DEFAULT_NAMESPACE.to_owned()));
        state.ensure_webhook_ticker();
        let namespace_state = state.namespace(&name);
        Ok(CurrentNamespace {
            name,
            state: namespace_state,
            directory: Arc::clone(&state.registry.directory),
            allow_private_webhooks: state.registry.config.allow_private_webhooks,
            config: state.registry.config,
            changes: Arc::clone(&state.registry.changes),
        })
    }
}

/// Wraps `inner` so every request is assigned its namespace, and has any `/ns/{name}` prefix
/// stripped, before `inner` routes it.
pub(crate) fn with_namespace_routing(inner: Router) -> Router {
    let assign_then_route = tower::service_fn(move |request: Request| {
        let inner = inner.clone();
        async move {
            match assign_namespace(request) {
                Ok(request) => inner.oneshot(request).await,
                Err(rejection) => Ok::<Response, Infallible>(rejection.into_response()),
            }
        }
    });
    Router::new().fallback_service(assign_then_route)
}

/// Works out the request's namespace, records it as an extension and strips the path prefix.
fn assign_namespace(mut request: Request) -> Result<Request, InvalidNamespace> {
    let uri = request.uri().clone();
    let path = uri.path().to_owned();
    let name = match split_namespace_prefix(&path) {
        Some((name, remaining_path)) => {
            let name = NamespaceName::parse(name).map_err(InvalidNamespace)?;
            *request.uri_mut() = replace_path(uri, remaining_path)?;
            name
        }
        None => match request.headers().get(NAMESPACE_HEADER) {
            Some(value) => {
                let value = value
                    .to_str()
                    .map_err(|_| InvalidNamespace("invalid namespace name: not text".to_owned()))?;
                NamespaceName::parse(value).map_err(InvalidNamespace)?
            }
            None => NamespaceName(DEFAULT_NAMESPACE.to_owned()),
        },
    };
    tracing::debug!(
        namespace = name.as_str(),
        method = %request.method(),
        path = request.uri().path(),
        "request"
    );
    request.extensions_mut().insert(name);
    Ok(request)
}

/// Splits `/ns/{name}/rest` into the name and `/rest` (`/` when nothing follows the name).
fn split_namespace_prefix(path: &str) -> Option<(&str, &str)> {
    let after_prefix = path.strip_prefix(NAMESPACE_PATH_PREFIX)?;
    match after_prefix.find('/') {
        Some(slash) => Some((&after_prefix[..slash], &after_prefix[slash..])),
        None => Some((after_prefix, "/")),
    }
}

fn replace_path(uri: Uri, path: &str) -> Result<Uri, InvalidNamespace> {
    let path_and_query = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_owned(),
    };
    let mut parts = uri.into_parts();
    parts.path_and_query = Some(
        path_and_query
            .parse()
            .map_err(|_| InvalidNamespace("invalid request path".to_owned()))?,
    );
    Uri::from_parts(parts).map_err(|_| InvalidNamespace("invalid request path".to_owned()))
}

/// A request whose namespace cannot be worked out; answered 400 `{"error":"…"}`.
#[derive(Debug)]
struct InvalidNamespace(String);

impl IntoResponse for InvalidNamespace {
    fn into_response(self) -> Response {
        (StatusCode::BAD_REQUEST, Json(json!({ "error": self.0 }))).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_namespace_prefix_is_split_from_the_rest_of_the_path() {
        assert_eq!(
            split_namespace_prefix("/ns/team-a/argus/v1/account"),
            Some(("team-a", "/argus/v1/account"))
        );
        assert_eq!(split_namespace_prefix("/ns/team-a"), Some(("team-a", "/")));
        assert_eq!(split_namespace_prefix("/ns/"), Some(("", "/")));
        assert_eq!(split_namespace_prefix("/argus/v1/account"), None);
        assert_eq!(split_namespace_prefix("/nsx/argus"), None);
    }

    #[test]
    fn namespace_names_are_short_lowercase_words() {
        assert!(NamespaceName::parse("ci_run-42").is_ok());
        for invalid in ["", "Team", "a b", "a/b", "%41", &"x".repeat(65)] {
            assert!(
                NamespaceName::parse(invalid).is_err(),
                "{invalid:?} was accepted"
            );
        }
    }
}
