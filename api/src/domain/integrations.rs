//! Linking a practice's provider accounts, as the seed article describes: the first user of a
//! group links an existing account or registers a new one (which waits for the provider's
//! approval); then each practitioner links individually with the same credentials; a login can
//! be validated once the connection is `ACTIVE`; either link can be disconnected.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::crypto::SecretBox;
use crate::domain::audit::{AuditEntry, AuditOutcome, Principal, actions};
use crate::domain::types::{
    ConnectionStatus, Provider, ProviderCredentials, ProviderPassword, ProviderUsername,
    Registration, Role,
};
use crate::domain::{GatewayError, later, safe_word};
use crate::events::EventBus;
use crate::providers::{AccountState, ProviderError, Providers, Unavailability};
use crate::store::accounts::{
    AccountDeletion, AccountDeletionRule, AccountOrigin, AccountRow, CheckOutcome, InsertOutcome,
    LinkRow,
};
use crate::store::limits::{AttemptLimit, Reservation};
use crate::store::{Store, new_id};

/// A provider connection as one user sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct IntegrationView {
    /// Which provider.
    pub provider: Provider,
    /// The group account's status.
    pub status: ConnectionStatus,
    /// The caller's own link: the group status when linked, else `NOT_CONNECTED`.
    pub individual_status: ConnectionStatus,
    /// The group account's username (never the password).
    pub username: Option<String>,
    /// Whether the group account was linked or registered.
    pub origin: Option<AccountOrigin>,
    /// When the group account's status last changed.
    pub status_changed_at: Option<DateTime<Utc>>,
    /// When the caller linked individually.
    pub linked_at: Option<DateTime<Utc>>,
}

/// The answer to `validateLogin`.
#[derive(Debug, Clone)]
pub struct LoginValidation {
    /// Whether the provider accepted the stored credentials.
    pub valid: bool,
    /// When the provider was asked.
    pub checked_at: DateTime<Utc>,
    /// A sentence for the user.
    pub message: String,
}

/// Which link `disconnectProvider` removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectScope {
    /// The caller's own link.
    Individual,
    /// The group account and every practitioner's link to it.
    Group,
}

/// Tunables of the integration rules.
#[derive(Debug, Clone)]
pub struct IntegrationSettings {
    /// How often a waiting registration is checked with the provider.
    pub approval_poll_interval: Duration,
    /// The longest back-off between checks after provider failures.
    pub approval_poll_max_backoff: Duration,
    /// How long a node may hold a claimed approval check before another node may take it
    /// (longer than one provider call, short enough that a crashed node delays little).
    pub approval_check_lease: Duration,
    /// `validateLogin` calls allowed per user per minute.
    pub validate_login_per_minute: u32,
    /// Failed (or still running) link and registration attempts allowed per user per
    /// [`Self::failed_login_window`].
    pub failed_logins_per_user: u32,
    /// The same, per provider username, whoever tries it, gateway-wide.
    pub failed_logins_per_username: u32,
    /// The sliding window of the two limits above.
    pub failed_login_window: Duration,
}

/// The integration rules, over storage, the provider adapters and the event bus.
#[derive(Clone)]
pub struct IntegrationService {
    store: Store,
    providers: Providers,
    secrets: SecretBox,
    events: EventBus,
    settings: IntegrationSettings,
}

fn target(provider: Provider) -> String {
    format!("provider:{}", provider.code())
}

fn secret_context(group_id: &str, provider: Provider, username: &str) -> String {
    format!(
        "provider-password/{group_id}/{}/{username}",
        provider.code()
    )
}

/// Maps an adapter failure to what the user sees, keeping the provider's words out of it.
fn provider_failure(provider: Provider, error: &ProviderError) -> GatewayError {
    match error {
        ProviderError::InvalidCredentials => GatewayError::ProviderRejected(format!(
            "{provider} did not accept that username and password; check them and try again"
        )),
        ProviderError::Refused { code, .. } if code == "invalidPromoCode" => {
            GatewayError::ProviderRejected(format!(
                "{provider} did not accept the promo code; check it with whoever issued it and try again"
            ))
        }
        ProviderError::Refused { code, .. } => GatewayError::ProviderRejected(format!(
            "{provider} refused the request ({}); check the details and try again",
            safe_word(code)
        )),
        ProviderError::Duplicate => GatewayError::Conflict(format!(
            "that username is already registered with {provider}; choose another, or link the existing account with its password"
        )),
        ProviderError::Unavailable { retry_after, .. } => GatewayError::ProviderUnavailable {
            provider,
            retry_after: *retry_after,
        },
    }
}

/// A short, safe word for the audit trail.
fn failure_detail(error: &ProviderError) -> String {
    match error {
        ProviderError::InvalidCredentials => "invalidCredentials".into(),
        ProviderError::Refused { code, .. } => code.chars().take(64).collect(),
        ProviderError::Duplicate => "duplicate".into(),
        ProviderError::Unavailable { .. } => "providerUnavailable".into(),
    }
}

fn status_from_state(state: AccountState) -> ConnectionStatus {
    match state {
        AccountState::Active => ConnectionStatus::Active,
        AccountState::Pending => ConnectionStatus::WaitingForApproval,
        AccountState::Rejected => ConnectionStatus::Rejected,
    }
}

impl IntegrationService {
    /// The bus this service announces changes on (other services publish on it too).
    pub fn events(&self) -> &EventBus {
        &self.events
    }

    /// Assembles the service.
    pub fn new(
        store: Store,
        providers: Providers,
        secrets: SecretBox,
        events: EventBus,
        settings: IntegrationSettings,
    ) -> Self {
        Self {
            store,
            providers,
            secrets,
            events,
            settings,
        }
    }

    /// Every provider's connection, as the caller sees it.
    pub async fn integrations(
        &self,
        principal: &Principal,
    ) -> Result<Vec<IntegrationView>, GatewayError> {
        let accounts = self.store.list_accounts(&principal.group_id).await?;
        let links = self.store.list_links(&principal.user_id).await?;
        Ok(Provider::ALL
            .into_iter()
            .map(|provider| {
                let account = accounts.iter().find(|account| account.provider == provider);
                let link = links.iter().find(|link| {
                    link.provider == provider
                        && account.is_some_and(|account| account.id == link.account_id)
                });
                view(provider, account, link)
            })
            .collect())
    }

    /// One provider's connection, as the caller sees it.
    pub async fn integration(
        &self,
        principal: &Principal,
        provider: Provider,
    ) -> Result<IntegrationView, GatewayError> {
        let account = self
            .store
            .find_account(&principal.group_id, provider)
            .await?;
        let link = self.store.find_link(&principal.user_id, provider).await?;
        Ok(view(provider, account.as_ref(), link.as_ref()))
    }

    /// "Use Existing Account": the group's first link checks the credentials with the provider
    /// and stores them; later practitioners must give the same credentials.
    pub async fn link_existing(
        &self,
        principal: &Principal,
        provider: Provider,
        credentials: ProviderCredentials,
    ) -> Result<IntegrationView, GatewayError> {
        let slots = self
            .reserve_login_attempt(principal, provider, &credentials.username)
            .await?;
        let result = self
            .link_existing_reserved(principal, provider, credentials)
            .await;
        self.settle_login_attempt(slots, &result).await;
        result
    }

    async fn link_existing_reserved(
        &self,
        principal: &Principal,
        provider: Provider,
        credentials: ProviderCredentials,
    ) -> Result<IntegrationView, GatewayError> {
        if let Some(account) = self
            .store
            .find_account(&principal.group_id, provider)
            .await?
        {
            return self
                .link_to_group_account(principal, &account, &credentials)
                .await;
        }
        self.refuse_username_of_another_practice(
            principal,
            provider,
            &credentials.username,
            actions::LINK_GROUP_ACCOUNT,
        )
        .await?;
        let state = match self
            .providers
            .get(provider)
            .account_state(&credentials)
            .await
        {
            Ok(state) => state,
            Err(error) => {
                return Err(self
                    .record_provider_failure(
                        principal,
                        provider,
                        actions::LINK_GROUP_ACCOUNT,
                        &error,
                    )
                    .await);
            }
        };
        if state == AccountState::Rejected {
            self.audit(
                AuditEntry::by(
                    principal,
                    actions::LINK_GROUP_ACCOUNT,
                    target(provider),
                    AuditOutcome::Failure,
                )
                .with_detail("accountRejected"),
            )
            .await;
            return Err(GatewayError::ProviderRejected(format!(
                "{provider} rejected this account's registration, so it cannot be linked; contact {provider} about the account"
            )));
        }
        let account = self.new_account(
            principal,
            provider,
            &credentials,
            status_from_state(state),
            AccountOrigin::Linked,
            None,
        )?;
        let link = self.individual_link_for(principal, &account);
        let audit = AuditEntry::by(
            principal,
            actions::LINK_GROUP_ACCOUNT,
            target(provider),
            AuditOutcome::Success,
        )
        .with_detail(account.status.code());
        match self
            .store
            .create_account(&account, link.as_ref(), &audit)
            .await?
        {
            InsertOutcome::Inserted(()) => {
                tracing::info!(group = %principal.group_id, %provider, status = account.status.code(), "group account linked");
                self.events
                    .integration_changed(&principal.group_id, provider);
                self.integration(principal, provider).await
            }
            // Someone in the group linked the same provider a moment ago: join their account.
            // Or another practice linked this username a moment ago (the unique index caught it).
            InsertOutcome::AlreadyExists => {
                match self
                    .store
                    .find_account(&principal.group_id, provider)
                    .await?
                {
                    Some(account) => {
                        self.link_to_group_account(principal, &account, &credentials)
                            .await
                    }
                    None => Err(self
                        .username_conflict(principal, provider, actions::LINK_GROUP_ACCOUNT)
                        .await),
                }
            }
        }
    }

    async fn link_to_group_account(
        &self,
        principal: &Principal,
        account: &AccountRow,
        credentials: &ProviderCredentials,
    ) -> Result<IntegrationView, GatewayError> {
        let provider = account.provider;
        if account.status == ConnectionStatus::Rejected {
            return Err(GatewayError::ProviderRejected(format!(
                "{provider} rejected your practice's registration; an administrator can disconnect it and link or register another account"
            )));
        }
        if !self.same_credentials(account, credentials)? {
            self.audit(
                AuditEntry::by(
                    principal,
                    actions::LINK_INDIVIDUAL,
                    target(provider),
                    AuditOutcome::Failure,
                )
                .with_detail("credentialsDifferFromGroupAccount"),
            )
            .await;
            return Err(GatewayError::BadUserInput(format!(
                "your practice's {provider} account uses the username {:?}; link with the same username and password as the group account (or ask an administrator to disconnect it first)",
                account.username
            )));
        }
        let Some(link) = self.individual_link_for(principal, account) else {
            // An administrator repeating the group link: nothing more to do.
            return self.integration(principal, provider).await;
        };
        let audit = AuditEntry::by(
            principal,
            actions::LINK_INDIVIDUAL,
            target(provider),
            AuditOutcome::Success,
        );
        // `AlreadyExists` means the caller is linked already (a retry or a double click).
        self.store
            .create_link(&principal.group_id, &link, &audit)
            .await?;
        self.events
            .integration_changed(&principal.group_id, provider);
        self.integration(principal, provider).await
    }

    /// "I do not have an existing account": registers with the provider using a promo code.
    /// The group account waits for approval; the approval watcher moves it on.
    pub async fn register(
        &self,
        principal: &Principal,
        provider: Provider,
        registration: Registration,
    ) -> Result<IntegrationView, GatewayError> {
        let slots = self
            .reserve_login_attempt(principal, provider, &registration.credentials.username)
            .await?;
        let result = self
            .register_reserved(principal, provider, registration)
            .await;
        self.settle_login_attempt(slots, &result).await;
        result
    }

    async fn register_reserved(
        &self,
        principal: &Principal,
        provider: Provider,
        registration: Registration,
    ) -> Result<IntegrationView, GatewayError> {
        if let Some(account) = self
            .store
            .find_account(&principal.group_id, provider)
            .await?
        {
            if account.origin == AccountOrigin::Registered
                && self.same_credentials(&account, &registration.credentials)?
            {
                // The same registration again (a retry after a lost response): answer as before.
                return self.integration(principal, provider).await;
            }
            return Err(GatewayError::Conflict(format!(
                "your practice already has a {provider} account ({}); disconnect it before registering a new one",
                account.status.code()
            )));
        }
        self.refuse_username_of_another_practice(
            principal,
            provider,
            &registration.credentials.username,
            actions::REGISTER_ACCOUNT,
        )
        .await?;
        let adapter = self.providers.get(provider);
        let state = match adapter.register(&registration).await {
            Ok(state) => state,
            // Registered before but the answer was lost? Then the password we hold opens it.
            Err(ProviderError::Duplicate) => {
                match adapter.account_state(&registration.credentials).await {
                    Ok(state) => state,
                    Err(ProviderError::InvalidCredentials) => {
                        return Err(self
                            .record_provider_failure(
                                principal,
                                provider,
                                actions::REGISTER_ACCOUNT,
                                &ProviderError::Duplicate,
                            )
                            .await);
                    }
                    Err(error) => {
                        return Err(self
                            .record_provider_failure(
                                principal,
                                provider,
                                actions::REGISTER_ACCOUNT,
                                &error,
                            )
                            .await);
                    }
                }
            }
            Err(error) => {
                return Err(self
                    .record_provider_failure(principal, provider, actions::REGISTER_ACCOUNT, &error)
                    .await);
            }
        };
        let account = self.new_account(
            principal,
            provider,
            &registration.credentials,
            status_from_state(state),
            AccountOrigin::Registered,
            Some(&registration),
        )?;
        let link = self.individual_link_for(principal, &account);
        let audit = AuditEntry::by(
            principal,
            actions::REGISTER_ACCOUNT,
            target(provider),
            AuditOutcome::Success,
        )
        .with_detail(account.status.code());
        match self
            .store
            .create_account(&account, link.as_ref(), &audit)
            .await?
        {
            InsertOutcome::Inserted(()) => {
                tracing::info!(group = %principal.group_id, %provider, status = account.status.code(), "provider account registered");
                self.events
                    .integration_changed(&principal.group_id, provider);
                self.integration(principal, provider).await
            }
            // A double click: the other request stored the same registration first.
            InsertOutcome::AlreadyExists => match self
                .store
                .find_account(&principal.group_id, provider)
                .await?
            {
                Some(existing)
                    if existing.origin == AccountOrigin::Registered
                        && self.same_credentials(&existing, &registration.credentials)? =>
                {
                    self.integration(principal, provider).await
                }
                Some(_) => Err(GatewayError::Conflict(format!(
                    "another user of your practice set up {provider} at the same moment; reload the integrations to see it"
                ))),
                None => Err(self
                    .username_conflict(principal, provider, actions::REGISTER_ACCOUNT)
                    .await),
            },
        }
    }

    /// "Validate Login": re-checks the stored credentials with the provider now.
    pub async fn validate_login(
        &self,
        principal: &Principal,
        provider: Provider,
    ) -> Result<LoginValidation, GatewayError> {
        // Reserved before anything else and never given back: every check counts.
        let limit = AttemptLimit {
            bucket: format!("validate-login:user:{}", principal.user_id),
            max: self.settings.validate_login_per_minute,
            window: Duration::from_secs(60),
        };
        if let Reservation::Full { retry_after, .. } =
            self.store.reserve_attempts(&[limit], Utc::now()).await?
        {
            return Err(GatewayError::RateLimited {
                message: format!(
                    "login validation is limited to {} checks a minute; try again in {} seconds",
                    self.settings.validate_login_per_minute,
                    retry_after.as_secs()
                ),
                retry_after,
            });
        }
        let current = self.integration(principal, provider).await?;
        let own_status = match principal.role {
            Role::Practitioner => current.individual_status,
            Role::Administrator => current.status,
        };
        if own_status != ConnectionStatus::Active {
            self.audit(
                AuditEntry::by(
                    principal,
                    actions::VALIDATE_LOGIN,
                    target(provider),
                    AuditOutcome::Denied,
                )
                .with_detail(own_status.code()),
            )
            .await;
            let message = match own_status {
                ConnectionStatus::NotConnected
                    if current.status == ConnectionStatus::NotConnected =>
                {
                    format!(
                        "your practice has no {provider} account yet; link or register one first"
                    )
                }
                ConnectionStatus::NotConnected => {
                    format!(
                        "link your own {provider} account (Use Existing Account) before validating the login"
                    )
                }
                ConnectionStatus::WaitingForApproval => format!(
                    "the {provider} account is waiting for {provider}'s approval; the login can be validated once it is ACTIVE"
                ),
                _ => format!(
                    "{provider} rejected this account's registration; there is no login to validate"
                ),
            };
            return Err(GatewayError::IntegrationNotActive(message));
        }
        let account = self
            .store
            .find_account(&principal.group_id, provider)
            .await?
            .ok_or_else(|| {
                GatewayError::internal(anyhow::anyhow!("active integration without an account"))
            })?;
        let credentials = self.stored_credentials(&account)?;
        let checked_at = Utc::now();
        let result = self
            .providers
            .get(provider)
            .account_state(&credentials)
            .await;
        let (validation, outcome, detail) = match result {
            Ok(_) => (
                LoginValidation {
                    valid: true,
                    checked_at,
                    message: format!("{provider} accepted the stored username and password"),
                },
                AuditOutcome::Success,
                "valid".to_owned(),
            ),
            Err(ProviderError::InvalidCredentials) => (
                LoginValidation {
                    valid: false,
                    checked_at,
                    message: format!(
                        "{provider} no longer accepts the stored password for {}; disconnect and link again with the current password",
                        account.username
                    ),
                },
                AuditOutcome::Failure,
                "invalidCredentials".to_owned(),
            ),
            Err(error) => {
                return Err(self
                    .record_provider_failure(principal, provider, actions::VALIDATE_LOGIN, &error)
                    .await);
            }
        };
        self.audit(
            AuditEntry::by(
                principal,
                actions::VALIDATE_LOGIN,
                target(provider),
                outcome,
            )
            .with_detail(detail),
        )
        .await;
        Ok(validation)
    }

    /// Removes the caller's own link, or the group account with every link to it.
    pub async fn disconnect(
        &self,
        principal: &Principal,
        provider: Provider,
        scope: Option<DisconnectScope>,
    ) -> Result<IntegrationView, GatewayError> {
        let scope = scope.unwrap_or(match principal.role {
            Role::Practitioner => DisconnectScope::Individual,
            Role::Administrator => DisconnectScope::Group,
        });
        match scope {
            DisconnectScope::Individual => {
                if principal.role == Role::Administrator {
                    return Err(GatewayError::BadUserInput(
                        "administrators have no individual link; use scope GROUP to disconnect the practice's account".into(),
                    ));
                }
                let audit = AuditEntry::by(
                    principal,
                    actions::DISCONNECT_INDIVIDUAL,
                    target(provider),
                    AuditOutcome::Success,
                );
                if !self
                    .store
                    .delete_link(&principal.user_id, provider, &audit)
                    .await?
                {
                    return Err(GatewayError::NotFound(format!(
                        "you have no individual {provider} link to disconnect"
                    )));
                }
            }
            DisconnectScope::Group => {
                // Administrators disconnect the practice; a practitioner only their own solo
                // practice's account (they are its one linked practitioner). The store decides
                // in the transaction that deletes, so a colleague linking meanwhile is counted.
                let rule = match principal.role {
                    Role::Administrator => AccountDeletionRule::Anyone,
                    Role::Practitioner => AccountDeletionRule::SoleLinkedUser(&principal.user_id),
                };
                let audit = AuditEntry::by(
                    principal,
                    actions::DISCONNECT_GROUP_ACCOUNT,
                    target(provider),
                    AuditOutcome::Success,
                );
                match self
                    .store
                    .delete_account(&principal.group_id, provider, rule, &audit)
                    .await?
                {
                    AccountDeletion::Deleted => {}
                    AccountDeletion::NoAccount => {
                        return Err(GatewayError::NotFound(format!(
                            "your practice has no {provider} account to disconnect"
                        )));
                    }
                    AccountDeletion::NotSoleLinkedUser => {
                        self.audit(
                            AuditEntry::by(
                                principal,
                                actions::DISCONNECT_GROUP_ACCOUNT,
                                target(provider),
                                AuditOutcome::Denied,
                            )
                            .with_detail("FORBIDDEN: not the sole linked practitioner"),
                        )
                        .await;
                        return Err(GatewayError::Forbidden(format!(
                            "an administrator must disconnect your practice's {provider} account: a practitioner may do it only as its sole linked practitioner (you can remove your own link with scope INDIVIDUAL)"
                        )));
                    }
                }
            }
        }
        self.events
            .integration_changed(&principal.group_id, provider);
        self.integration(principal, provider).await
    }

    /// One pass of the approval watcher: asks the providers about every waiting registration
    /// whose check is due, and records what they say. Returns how many accounts it checked.
    pub async fn check_due_registrations(&self, now: DateTime<Utc>) -> Result<usize, GatewayError> {
        use futures::StreamExt;
        let due = self.store.due_waiting_accounts(now, 50).await?;
        // A few at a time, so one slow provider does not hold up the other's approvals.
        let results: Vec<Result<bool, GatewayError>> = futures::stream::iter(due)
            .map(|account| async move {
                let lease_until = later(now, self.settings.approval_check_lease);
                if !self.store.claim_check(&account, lease_until).await? {
                    return Ok(false); // another node has it
                }
                self.check_one_registration(&account, now, lease_until)
                    .await?;
                Ok(true)
            })
            .buffer_unordered(8)
            .collect()
            .await;
        let mut checked = 0;
        for result in results {
            if result? {
                checked += 1;
            }
        }
        Ok(checked)
    }

    async fn check_one_registration(
        &self,
        account: &AccountRow,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> Result<(), GatewayError> {
        let provider = account.provider;
        let interval = self.settings.approval_poll_interval;
        let result = match self.stored_credentials(account) {
            Ok(credentials) => {
                self.providers
                    .get(provider)
                    .account_state(&credentials)
                    .await
            }
            Err(error) => {
                tracing::error!(account = %account.id, error = ?error, "stored credentials unreadable");
                // Not the provider's fault, but like an outage it is retried later.
                Err(ProviderError::Unavailable {
                    kind: Unavailability::ServerError,
                    reason: "stored credentials unreadable".into(),
                    retry_after: None,
                })
            }
        };
        let outcome = match result {
            Ok(AccountState::Pending) => CheckOutcome::StillWaiting {
                next_check_at: later(now, interval),
            },
            Ok(state) => CheckOutcome::Decided(status_from_state(state)),
            Err(error) => {
                let backoff = backoff_delay(
                    interval,
                    self.settings.approval_poll_max_backoff,
                    account.check_failures + 1,
                );
                let backoff = match &error {
                    ProviderError::Unavailable {
                        retry_after: Some(after),
                        ..
                    } => backoff.max((*after).min(self.settings.approval_poll_max_backoff)),
                    _ => backoff,
                };
                tracing::warn!(account = %account.id, %provider, failures = account.check_failures + 1, error = %error, "approval check failed; backing off for {backoff:?}");
                CheckOutcome::Failed {
                    next_check_at: later(now, backoff),
                }
            }
        };
        let audit = match outcome {
            CheckOutcome::Decided(status) => Some(
                AuditEntry::by_gateway(
                    &account.group_id,
                    actions::REGISTRATION_DECIDED,
                    target(provider),
                    AuditOutcome::Success,
                )
                .with_detail(status.code()),
            ),
            _ => None,
        };
        let changed = self
            .store
            .finish_check(account, outcome, now, lease_until, audit.as_ref())
            .await?;
        if changed && let CheckOutcome::Decided(status) = outcome {
            tracing::info!(group = %account.group_id, %provider, status = status.code(), "registration decided");
            self.events.integration_changed(&account.group_id, provider);
        }
        Ok(())
    }

    fn new_account(
        &self,
        principal: &Principal,
        provider: Provider,
        credentials: &ProviderCredentials,
        status: ConnectionStatus,
        origin: AccountOrigin,
        registration: Option<&Registration>,
    ) -> Result<AccountRow, GatewayError> {
        let now = Utc::now();
        let username = credentials.username.as_str();
        let password_ciphertext = self
            .secrets
            .seal(
                credentials.password.expose(),
                &secret_context(&principal.group_id, provider, username),
            )
            .map_err(GatewayError::internal)?;
        Ok(AccountRow {
            id: new_id(),
            group_id: principal.group_id.clone(),
            provider,
            username: username.to_owned(),
            password_ciphertext,
            status,
            origin,
            practice_name: registration.map(|r| r.practice_name.as_str().to_owned()),
            contact_email: registration.map(|r| r.contact_email.as_str().to_owned()),
            created_by_user_id: principal.user_id.clone(),
            created_at: now,
            status_changed_at: now,
            last_checked_at: Some(now),
            webhook_secret_ciphertext: None,
            next_check_at: (status == ConnectionStatus::WaitingForApproval)
                .then(|| later(now, self.settings.approval_poll_interval)),
            check_failures: 0,
        })
    }

    /// Practitioners get their own link along with the group account; administrators do not
    /// send, so they have none.
    fn individual_link_for(&self, principal: &Principal, account: &AccountRow) -> Option<LinkRow> {
        (principal.role == Role::Practitioner).then(|| LinkRow {
            id: new_id(),
            user_id: principal.user_id.clone(),
            provider: account.provider,
            account_id: account.id.clone(),
            created_at: Utc::now(),
        })
    }

    /// The group account's credentials for a provider, when the account is `ACTIVE`.
    pub(crate) async fn active_group_credentials(
        &self,
        group_id: &str,
        provider: Provider,
    ) -> Result<Option<ProviderCredentials>, GatewayError> {
        match self.store.find_account(group_id, provider).await? {
            Some(account) if account.status == ConnectionStatus::Active => {
                Ok(Some(self.stored_credentials(&account)?))
            }
            _ => Ok(None),
        }
    }

    fn stored_credentials(
        &self,
        account: &AccountRow,
    ) -> Result<ProviderCredentials, GatewayError> {
        let password = self
            .secrets
            .open(
                &account.password_ciphertext,
                &secret_context(&account.group_id, account.provider, &account.username),
            )
            .map_err(GatewayError::internal)?;
        Ok(ProviderCredentials {
            username: ProviderUsername::parse(&account.username).map_err(|problem| {
                GatewayError::internal(anyhow::anyhow!("stored username: {problem}"))
            })?,
            password: ProviderPassword::parse(&password).map_err(|problem| {
                GatewayError::internal(anyhow::anyhow!("stored password: {problem}"))
            })?,
        })
    }

    fn same_credentials(
        &self,
        account: &AccountRow,
        credentials: &ProviderCredentials,
    ) -> Result<bool, GatewayError> {
        let stored = self.stored_credentials(account)?;
        // Evaluate both comparisons so the answer's timing does not say which part differed.
        let same_username = stored.username.as_str() == credentials.username.as_str();
        let same_password = stored.password.matches(&credentials.password);
        Ok(same_username & same_password)
    }

    async fn record_provider_failure(
        &self,
        principal: &Principal,
        provider: Provider,
        action: &str,
        error: &ProviderError,
    ) -> GatewayError {
        if let ProviderError::Unavailable { reason, .. } = error {
            tracing::warn!(%provider, action, reason = %reason, "provider unavailable");
        }
        self.audit(
            AuditEntry::by(principal, action, target(provider), AuditOutcome::Failure)
                .with_detail(failure_detail(error)),
        )
        .await;
        provider_failure(provider, error)
    }

    /// Reserves a slot for a link or registration attempt in two sliding windows, before
    /// anything is checked: the caller's own (password guessing from one login) and the
    /// provider username's, gateway-wide (guessing one account's password from many logins).
    /// Slots are given back when the attempt turns out not to be a failed login.
    async fn reserve_login_attempt(
        &self,
        principal: &Principal,
        provider: Provider,
        username: &ProviderUsername,
    ) -> Result<Vec<String>, GatewayError> {
        let window = self.settings.failed_login_window;
        let limits = [
            AttemptLimit {
                bucket: format!("login-failures:user:{}", principal.user_id),
                max: self.settings.failed_logins_per_user,
                window,
            },
            AttemptLimit {
                bucket: format!(
                    "login-failures:username:{}:{}",
                    provider.code(),
                    username.as_str().to_lowercase()
                ),
                max: self.settings.failed_logins_per_username,
                window,
            },
        ];
        match self.store.reserve_attempts(&limits, Utc::now()).await? {
            Reservation::Reserved(slots) => Ok(slots),
            Reservation::Full {
                limit_index,
                retry_after,
            } => {
                let minutes = retry_after.as_secs().div_ceil(60);
                let whose = if limit_index == 0 {
                    "from your login"
                } else {
                    "for this provider username"
                };
                self.audit(
                    AuditEntry::by(
                        principal,
                        actions::LINK_GROUP_ACCOUNT,
                        target(provider),
                        AuditOutcome::Denied,
                    )
                    .with_detail("tooManyFailedAttempts"),
                )
                .await;
                Err(GatewayError::RateLimited {
                    message: format!(
                        "too many failed attempts to link or register the {provider} account {whose}; check the username and password and try again in {minutes} minutes"
                    ),
                    retry_after,
                })
            }
        }
    }

    /// Only failed logins keep their slot: a success, a provider outage or our own fault gives
    /// it back.
    async fn settle_login_attempt(
        &self,
        slots: Vec<String>,
        result: &Result<IntegrationView, GatewayError>,
    ) {
        let failed_login = matches!(
            result,
            Err(GatewayError::ProviderRejected(_)
                | GatewayError::BadUserInput(_)
                | GatewayError::Conflict(_))
        );
        if !failed_login && let Err(error) = self.store.release_attempts(&slots).await {
            tracing::error!(error = ?error, "could not release attempt slots");
        }
    }

    /// A provider account belongs to one practice. Decided before any provider call, and
    /// without naming the practice that holds it.
    async fn refuse_username_of_another_practice(
        &self,
        principal: &Principal,
        provider: Provider,
        username: &ProviderUsername,
        action: &str,
    ) -> Result<(), GatewayError> {
        if self
            .store
            .username_held_by_another_group(&principal.group_id, provider, username.as_str())
            .await?
        {
            return Err(self.username_conflict(principal, provider, action).await);
        }
        Ok(())
    }

    async fn username_conflict(
        &self,
        principal: &Principal,
        provider: Provider,
        action: &str,
    ) -> GatewayError {
        self.audit(
            AuditEntry::by(principal, action, target(provider), AuditOutcome::Denied)
                .with_detail("accountLinkedToAnotherPractice"),
        )
        .await;
        GatewayError::Conflict(format!(
            "this {provider} account is linked to another practice; a provider account serves one practice, so use your practice's own account or register a new one"
        ))
    }

    /// Records an audit event that stands alone. Failing to record it is logged, not hidden,
    /// but does not turn the user's answer into an error.
    async fn audit(&self, entry: AuditEntry) {
        if let Err(error) = self.store.insert_audit(&entry).await {
            tracing::error!(action = %entry.action, error = ?error, "could not record an audit event");
        }
    }
}

fn view(
    provider: Provider,
    account: Option<&AccountRow>,
    link: Option<&LinkRow>,
) -> IntegrationView {
    let status = account.map_or(ConnectionStatus::NotConnected, |account| account.status);
    IntegrationView {
        provider,
        status,
        individual_status: if link.is_some() {
            status
        } else {
            ConnectionStatus::NotConnected
        },
        username: account.map(|account| account.username.clone()),
        origin: account.map(|account| account.origin),
        status_changed_at: account.map(|account| account.status_changed_at),
        linked_at: link.map(|link| link.created_at),
    }
}

/// `interval × 2^(failures-1)`, capped at `max`.
fn backoff_delay(interval: Duration, max: Duration, failures: u32) -> Duration {
    let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(20));
    interval.saturating_mul(factor).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_per_failure_up_to_the_cap() {
        let interval = Duration::from_secs(2);
        let max = Duration::from_secs(60);
        assert_eq!(backoff_delay(interval, max, 1), Duration::from_secs(2));
        assert_eq!(backoff_delay(interval, max, 2), Duration::from_secs(4));
        assert_eq!(backoff_delay(interval, max, 4), Duration::from_secs(16));
        assert_eq!(backoff_delay(interval, max, 30), max);
    }

    #[test]
    fn provider_failures_never_carry_the_providers_text() {
        let error = provider_failure(
            Provider::Argus,
            &ProviderError::Refused {
                code: "badParam".into(),
                message: "SECRET internal detail".into(),
            },
        );
        assert!(!format!("{error:?}").contains("SECRET"));
        assert!(matches!(
            provider_failure(
                Provider::Argus,
                &ProviderError::Unavailable {
                    kind: Unavailability::ServerError,
                    reason: "x".into(),
                    retry_after: None
                }
            ),
            GatewayError::ProviderUnavailable { .. }
        ));
    }
}
