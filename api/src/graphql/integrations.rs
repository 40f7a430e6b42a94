//! Settings › Integrations: link, register, validate, disconnect, and watch provider accounts.

use std::collections::VecDeque;

use async_graphql::{Context, InputObject, Object, SimpleObject, Subscription};
use chrono::{DateTime, Utc};
use futures::Stream;

use super::error::ApiError;
use super::types::{AccountOrigin, ConnectionStatus, DisconnectScope, Provider};
use super::{principal, services};
use crate::domain::audit::Principal;
use crate::domain::integrations::{
    IntegrationService, IntegrationView, LoginValidation as DomainValidation,
};
use crate::domain::types::{
    ContactEmail, PracticeName, PromoCode, Provider as DomainProvider, ProviderCredentials,
    ProviderPassword, ProviderUsername, Registration, Role as DomainRole,
};
use crate::events::Event;

/// A provider connection: the practice's account and the caller's own link to it.
#[derive(SimpleObject, Clone, PartialEq)]
pub struct Integration {
    /// Which provider.
    pub provider: Provider,
    /// The practice's (group) account status.
    pub status: ConnectionStatus,
    /// The caller's own link: the group status once linked, `NOT_CONNECTED` before.
    pub individual_status: ConnectionStatus,
    /// The provider username of the practice's account (the password is never returned).
    pub username: Option<String>,
    /// Whether the practice's account was linked or registered.
    pub origin: Option<AccountOrigin>,
    /// When the practice's account status last changed.
    pub status_changed_at: Option<DateTime<Utc>>,
    /// When the caller linked individually.
    pub linked_at: Option<DateTime<Utc>>,
    /// Whether `validateLogin` is available to the caller now (their connection is `ACTIVE`).
    pub can_validate_login: bool,
}

impl Integration {
    fn for_caller(view: IntegrationView, role: DomainRole) -> Self {
        let own = match role {
            DomainRole::Practitioner => view.individual_status,
            DomainRole::Administrator => view.status,
        };
        Self {
            provider: view.provider.into(),
            status: view.status.into(),
            individual_status: view.individual_status.into(),
            username: view.username,
            origin: view.origin.map(Into::into),
            status_changed_at: view.status_changed_at,
            linked_at: view.linked_at,
            can_validate_login: own == crate::domain::types::ConnectionStatus::Active,
        }
    }
}

/// The result of checking stored credentials with the provider.
#[derive(SimpleObject)]
pub struct LoginValidation {
    /// Whether the provider accepted the stored username and password.
    pub valid: bool,
    /// When the provider was asked.
    pub checked_at: DateTime<Utc>,
    /// A sentence to show the user.
    pub message: String,
}

impl From<DomainValidation> for LoginValidation {
    fn from(validation: DomainValidation) -> Self {
        Self {
            valid: validation.valid,
            checked_at: validation.checked_at,
            message: validation.message,
        }
    }
}

/// An existing provider account's login.
#[derive(InputObject)]
pub struct LinkAccountInput {
    /// The provider username (3–64 letters, digits, `.`, `_`, `-`).
    pub username: String,
    /// The provider password (8–256 characters). Stored encrypted; never returned or logged.
    pub password: String,
}

/// A new provider registration.
#[derive(InputObject)]
pub struct RegisterProviderAccountInput {
    /// Which provider to register with.
    pub provider: Provider,
    /// The promotional code obtained from support (sandbox: `SANDBOX-PROMO` or `SANDBOX-REJECT`).
    pub promo_code: String,
    /// The username to create.
    pub username: String,
    /// The password to set (8–256 characters). Stored encrypted; never returned or logged.
    pub password: String,
    /// The practice's name as the provider should know it.
    pub practice_name: String,
    /// Where the provider can contact the practice about the registration.
    pub contact_email: String,
}

fn field<T>(name: &str, parsed: Result<T, String>) -> Result<T, ApiError> {
    parsed.map_err(|problem| ApiError::bad_input(format!("{name}: {problem}")))
}

fn credentials(username: &str, password: &str) -> Result<ProviderCredentials, ApiError> {
    Ok(ProviderCredentials {
        username: field("username", ProviderUsername::parse(username))?,
        password: field("password", ProviderPassword::parse(password))?,
    })
}

async fn link(
    ctx: &Context<'_>,
    provider: DomainProvider,
    input: LinkAccountInput,
) -> Result<Integration, ApiError> {
    let principal = principal(ctx)?;
    let credentials = credentials(&input.username, &input.password)?;
    let view = services(ctx)
        .integrations
        .link_existing(principal, provider, credentials)
        .await?;
    Ok(Integration::for_caller(view, principal.role))
}

#[derive(Default)]
pub struct IntegrationQuery;

#[Object]
impl IntegrationQuery {
    /// Every provider's connection for the caller's practice, with the caller's own link.
    async fn integrations(&self, ctx: &Context<'_>) -> Result<Vec<Integration>, ApiError> {
        let principal = principal(ctx)?;
        let views = services(ctx).integrations.integrations(principal).await?;
        Ok(views
            .into_iter()
            .map(|view| Integration::for_caller(view, principal.role))
            .collect())
    }

    /// One provider's connection.
    async fn integration(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "Which provider.")] provider: Provider,
    ) -> Result<Integration, ApiError> {
        let principal = principal(ctx)?;
        let view = services(ctx)
            .integrations
            .integration(principal, provider.into())
            .await?;
        Ok(Integration::for_caller(view, principal.role))
    }
}

#[derive(Default)]
pub struct IntegrationMutation;

#[Object]
impl IntegrationMutation {
    /// Links an existing Argus account. The first link in a practice checks the credentials
    /// with Argus and becomes the practice's account; practitioners also get their own link.
    /// Later practitioners link individually with the same username and password.
    async fn link_argus(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The Argus username and password.")] input: LinkAccountInput,
    ) -> Result<Integration, ApiError> {
        link(ctx, DomainProvider::Argus, input).await
    }

    /// Links an existing ReferralNet account; same rules as `linkArgus`.
    async fn link_referral_net(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The ReferralNet username and password.")] input: LinkAccountInput,
    ) -> Result<Integration, ApiError> {
        link(ctx, DomainProvider::ReferralNet, input).await
    }

    /// Registers a new provider account with a promo code. The practice's status becomes
    /// `WAITING_FOR_APPROVAL` until the provider decides (subscribe to
    /// `integrationStatusChanged`); a practitioner registering is linked individually too.
    async fn register_provider_account(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The registration details.")] input: RegisterProviderAccountInput,
    ) -> Result<Integration, ApiError> {
        let principal = principal(ctx)?;
        let registration = Registration {
            credentials: credentials(&input.username, &input.password)?,
            promo_code: field("promoCode", PromoCode::parse(&input.promo_code))?,
            practice_name: field("practiceName", PracticeName::parse(&input.practice_name))?,
            contact_email: field("contactEmail", ContactEmail::parse(&input.contact_email))?,
        };
        let view = services(ctx)
            .integrations
            .register(principal, input.provider.into(), registration)
            .await?;
        Ok(Integration::for_caller(view, principal.role))
    }

    /// Checks the stored credentials with the provider now. Only once the caller's connection
    /// is `ACTIVE`; limited to a few checks a minute per user.
    async fn validate_login(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "Which provider's login to check.")] provider: Provider,
    ) -> Result<LoginValidation, ApiError> {
        let principal = principal(ctx)?;
        Ok(services(ctx)
            .integrations
            .validate_login(principal, provider.into())
            .await?
            .into())
    }

    /// Disconnects a provider: the caller's own link, or the practice's account with every
    /// practitioner's link to it. The practice's account is for administrators; a practitioner
    /// may remove it only as its sole linked practitioner (a solo practice), else `FORBIDDEN`.
    /// Returns the connection as it is afterwards.
    async fn disconnect_provider(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "Which provider.")] provider: Provider,
        #[graphql(
            desc = "What to remove; default `INDIVIDUAL` for practitioners, `GROUP` for administrators."
        )]
        scope: Option<DisconnectScope>,
    ) -> Result<Integration, ApiError> {
        let principal = principal(ctx)?;
        let view = services(ctx)
            .integrations
            .disconnect(principal, provider.into(), scope.map(Into::into))
            .await?;
        Ok(Integration::for_caller(view, principal.role))
    }
}

#[derive(Default)]
pub struct IntegrationSubscription;

#[Subscription]
impl IntegrationSubscription {
    /// Emits a provider connection whenever its status (or the caller's own link) changes —
    /// for example when the provider approves a registration.
    async fn integration_status_changed(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "Only this provider (default: all).")] provider: Option<Provider>,
    ) -> Result<impl Stream<Item = Integration> + use<>, ApiError> {
        let principal = principal(ctx)?.clone();
        let services = services(ctx).clone();
        // Listening starts before the first read, so a change committed in between is heard.
        let events = services.events.subscribe();
        let last = services.integrations.integrations(&principal).await?;
        let watch = Watch {
            events,
            service: services.integrations,
            principal,
            only: provider.map(Into::into),
            last,
            pending: VecDeque::new(),
        };
        Ok(futures::stream::unfold(watch, |mut watch| async move {
            let next = watch.next().await?;
            Some((next, watch))
        }))
    }
}

struct Watch {
    events: crate::events::Subscriber,
    service: IntegrationService,
    principal: Principal,
    only: Option<DomainProvider>,
    last: Vec<IntegrationView>,
    pending: VecDeque<IntegrationView>,
}

impl Watch {
    /// Waits for a change of this group's connections (or a resync), re-reads, and yields
    /// each connection that differs from what the subscriber last saw. Nothing runs between
    /// events: no timer re-reads the database.
    async fn next(&mut self) -> Option<Integration> {
        loop {
            if !self.principal.is_honoured_at(Utc::now()) {
                return None; // the token expired: the client reconnects with a fresh one
            }
            if let Some(view) = self.pending.pop_front() {
                return Some(Integration::for_caller(view, self.principal.role));
            }
            tokio::select! {
                event = self.events.next_for(&self.principal.group_id) => match event? {
                    Event::IntegrationChanged { .. } | Event::Resync => {}
                    Event::MessageChanged { .. } | Event::MessageNeedsAttention { .. } => continue,
                },
                () = super::token_expiry(&self.principal) => return None,
            }
            let current = match self.service.integrations(&self.principal).await {
                Ok(current) => current,
                Err(error) => {
                    tracing::warn!(error = ?error, "subscription re-read failed; waiting for the next change");
                    continue;
                }
            };
            for view in &current {
                let wanted = self.only.is_none_or(|only| only == view.provider);
                let changed = !self.last.iter().any(|seen| {
                    seen.provider == view.provider
                        && seen.status == view.status
                        && seen.individual_status == view.individual_status
                });
                if wanted && changed {
                    self.pending.push_back(view.clone());
                }
            }
            self.last = current;
        }
    }
}
