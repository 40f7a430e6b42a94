//! Credits: the practice's card, one wallet per practitioner, purchases priced by size, an
//! exactly-once ledger, transfers, auto top-up and buy-at-send.
//!
//! Exactly once, step by step:
//! - Every spending or charging mutation carries an idempotency key (scoped to the group, kept
//!   24 hours). The key is claimed in the same transaction that records the work; the same key
//!   with the same input replays the first result, with other input it is a `CONFLICT`, and a
//!   concurrent duplicate waits for the first and then replays it.
//! - A purchase is recorded `PENDING` before the card is charged, and the charge carries the
//!   purchase id as the payment gateway's idempotency key. Whatever dies in between (network,
//!   process), the recovery worker charges again with the same key — the gateway replays rather
//!   than charging twice — and completes the ledger exactly once (`PENDING → SUCCEEDED` is a
//!   conditional update).
//! - Auto top-up is decided inside the debit's transaction with a `top_up_pending` flag, so
//!   concurrent debits crossing the threshold create exactly one purchase.
//!
//! Spending caps: administrators may cap what a practitioner's wallet, and the practice as a
//! whole, spends per calendar month (UTC), in cents. Pending and succeeded purchases count
//! (declined ones do not; credits moved by transfers and refunds are not spending). Every
//! purchase — manual, buy-at-send, auto top-up — is checked inside the transaction that records
//! it (see `store::credits`), before any card is charged; a refusal is
//! `SPENDING_LIMIT_REACHED`, charges nothing, keeps the idempotency key free and is audited.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::crypto::SecretBox;
use crate::domain::audit::{AuditEntry, AuditOutcome, Principal};
use crate::domain::pricing::{Catalogue, CreditPack};
use crate::domain::types::{PaymentToken, Role};
use crate::domain::{GatewayError, later};
use crate::providers::payments::{CardSummary, ChargeOutcome, ChargeRequest, PaymentGateway};
use crate::providers::{ProviderError, Unavailability};
use crate::store::credits::{
    CapBreach, CapScope, CapStanding, CardWrite, CardWritten, DebitOutcome, KeyClaim, KeyRequest,
    LedgerRow, PaymentMethodRow, PractitionerRow, PurchaseRow, PurchaseStart, WalletRow,
};
use crate::store::{Store, Transaction, new_id};

/// What sending one secure message costs.
pub const CREDITS_PER_MESSAGE: i64 = 3;

/// Audit action names for credits.
pub mod actions {
    /// The practice's card was set or replaced (or a practitioner's replacement refused).
    pub const SET_PAYMENT_METHOD: &str = "SET_PAYMENT_METHOD";
    /// The practice's card was removed (or a practitioner's attempt refused).
    pub const REMOVE_PAYMENT_METHOD: &str = "REMOVE_PAYMENT_METHOD";
    /// Credits were bought (manually, at send time, or by auto top-up).
    pub const PURCHASE_CREDITS: &str = "PURCHASE_CREDITS";
    /// Credits moved between practitioners.
    pub const TRANSFER_CREDITS: &str = "TRANSFER_CREDITS";
    /// Auto top-up settings changed.
    pub const SET_AUTO_TOP_UP: &str = "SET_AUTO_TOP_UP";
    /// A monthly spending cap was set or removed (or a non-administrator's attempt refused).
    pub const SET_SPENDING_CAP: &str = "SET_SPENDING_CAP";
}

/// The largest monthly cap an administrator may set: $1,000,000 in cents.
pub const MAX_MONTHLY_CAP_CENTS: i64 = 100_000_000;

/// The calendar month (UTC) `now` falls in: its first instant and the next month's.
pub fn spending_period(now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    use chrono::{Datelike, TimeZone};
    let start = |year: i32, month: u32| {
        Utc.with_ymd_and_hms(year, month, 1, 0, 0, 0)
            .single()
            .unwrap_or(DateTime::<Utc>::MIN_UTC)
    };
    let (year, month) = (now.year(), now.month());
    let next = if month == 12 {
        start(year + 1, 1)
    } else {
        start(year, month + 1)
    };
    (start(year, month), next)
}

/// Cents as dollars, `$1,234.05`.
pub fn dollars(cents: i64) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    let cents = cents.unsigned_abs();
    let whole = (cents / 100).to_string();
    let mut grouped = String::new();
    for (index, digit) in whole.chars().enumerate() {
        if index > 0 && (whole.len() - index).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    format!("{sign}${grouped}.{:02}", cents % 100)
}

/// One spending cap as a client sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpendingCapView {
    /// Whose spending.
    pub scope: CapScope,
    /// The cap and what this month has spent.
    pub standing: CapStanding,
    /// The month it counts: from…
    pub period_start: DateTime<Utc>,
    /// …to (exclusive).
    pub period_end: DateTime<Utc>,
}

impl SpendingCapView {
    /// What may still be spent this month (`None`: no cap).
    pub fn remaining_cents(&self) -> Option<i64> {
        self.standing
            .limit_cents
            .map(|limit| (limit - self.standing.spent_cents).max(0))
    }
}

/// The sentence a refused purchase answers with: the cap, what is left, who can raise it.
fn cap_refusal(breach: &CapBreach, whose: &str, period_end: DateTime<Utc>) -> String {
    let cap = match breach.scope {
        CapScope::Practitioner => format!("{whose}'s monthly spending cap"),
        CapScope::Practice => "your practice's monthly spending cap".to_owned(),
    };
    format!(
        "this purchase of {} would pass {cap} of {} ({} spent this month, {} left until {}); nothing was charged — an administrator of your practice can raise the cap with setSpendingCap",
        dollars(breach.attempted_cents),
        dollars(breach.limit_cents),
        dollars(breach.spent_cents),
        dollars((breach.limit_cents - breach.spent_cents).max(0)),
        period_end.format("%-d %B %Y 00:00 UTC"),
    )
}

/// What a send's debit did about auto top-up; hand it to [`CreditService::after_commit`].
/// (It lives for one call, so the size of the purchase in one variant does not matter.)
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
pub enum TopUp {
    /// Nothing to buy.
    None,
    /// A top-up purchase was recorded; it is charged once the transaction commits.
    Started(PurchaseRow),
    /// A top-up was due but a spending cap refused it (nothing recorded).
    Refused {
        /// Whose wallet.
        group_id: String,
        /// Whose wallet.
        user_id: String,
        /// The cap.
        breach: CapBreach,
    },
}

/// A client's idempotency key: 8–128 letters, digits, `-`, `_`, `.` or `:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// Parses a key.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let valid = (8..=128).contains(&raw.len())
            && raw
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
        if !valid {
            return Err("idempotency key must be 8 to 128 letters, digits, '-', '_', '.' or ':' (a UUID is ideal)".into());
        }
        Ok(Self(raw.to_owned()))
    }

    /// The key.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A positive number of credits to move: 1 to 1,000,000.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreditAmount(i64);

impl CreditAmount {
    /// Parses an amount.
    pub fn parse(raw: i64) -> Result<Self, String> {
        if !(1..=1_000_000).contains(&raw) {
            return Err("credits must be a whole number from 1 to 1000000".into());
        }
        Ok(Self(raw))
    }

    /// The amount.
    pub fn get(self) -> i64 {
        self.0
    }
}

/// Tunables.
#[derive(Debug, Clone)]
pub struct CreditSettings {
    /// Packs and prices.
    pub catalogue: Catalogue,
    /// Consecutive declined top-ups before auto top-up switches itself off.
    pub disable_auto_top_up_after: i32,
    /// How long a purchase being charged belongs to the node charging it, before the recovery
    /// worker may take it over (longer than a charge with its retries).
    pub purchase_lease: Duration,
    /// How long idempotency keys are remembered.
    pub key_retention: Duration,
    /// How long a duplicate request waits for the first one with its key.
    pub duplicate_wait: Duration,
    /// Test-only fault point: stop right after a successful charge, before the ledger write.
    pub fail_after_charge: bool,
}

/// The answer to a purchase.
#[derive(Debug, Clone)]
pub struct PurchaseResult {
    /// The purchase.
    pub purchase: PurchaseRow,
    /// The practitioner's balance right after it.
    pub balance: i64,
}

/// The answer to a transfer.
#[derive(Debug, Clone)]
pub struct TransferResult {
    /// The transfer's id (both ledger entries reference it).
    pub transfer_id: String,
    /// Credits moved.
    pub credits: i64,
    /// The sender's balance after.
    pub from_balance: i64,
    /// The receiver's balance after.
    pub to_balance: i64,
}

/// A practitioner's credits.
#[derive(Debug, Clone)]
pub struct CreditsView {
    /// Whose.
    pub practitioner: PractitionerRow,
    /// The wallet and its auto top-up settings.
    pub wallet: WalletRow,
    /// The auto top-up pack, resolved.
    pub top_up_pack: Option<CreditPack>,
}

/// How a purchase's charge ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PurchaseOutcome {
    /// Charged and credited.
    Succeeded,
    /// The card was declined (or there was none); nothing credited.
    Declined,
    /// The payment gateway did not say; the purchase stays pending for the recovery worker.
    Unresolved,
}

/// Why credits moved: a committed ledger entry's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CreditMovement {
    /// A secure message's cost (debit).
    SendDebit,
    /// Credits given to a colleague (debit).
    TransferOut,
    /// Credits received from a colleague (credit).
    TransferIn,
    /// A completed purchase (credit).
    Purchase,
    /// A refused message's cost given back (credit).
    Refund,
}

impl CreditMovement {
    /// Whether the balance went down.
    pub fn is_debit(self) -> bool {
        matches!(self, Self::SendDebit | Self::TransferOut)
    }
}

/// Hears about purchases and ledger entries once they are committed (the metrics implement
/// it), so the credit rules need not know who counts.
pub trait CreditObserver: Send + Sync + 'static {
    /// A purchase's charge ended.
    fn purchase_finished(&self, outcome: PurchaseOutcome);
    /// A ledger entry of `credits` (positive) committed.
    fn credits_moved(&self, movement: CreditMovement, credits: i64);
}

/// The credit rules over storage and the payment gateway.
#[derive(Clone)]
pub struct CreditService {
    store: Store,
    payments: Arc<dyn PaymentGateway>,
    secrets: SecretBox,
    settings: Arc<CreditSettings>,
    observer: Option<Arc<dyn CreditObserver>>,
}

fn payment_unavailable(error: &ProviderError) -> GatewayError {
    let retry_after = match error {
        ProviderError::Unavailable { retry_after, .. } => *retry_after,
        _ => None,
    };
    GatewayError::PaymentUnavailable { retry_after }
}

impl CreditService {
    /// Assembles the service.
    pub fn new(
        store: Store,
        payments: Arc<dyn PaymentGateway>,
        secrets: SecretBox,
        settings: CreditSettings,
    ) -> Self {
        Self {
            store,
            payments,
            secrets,
            settings: Arc::new(settings),
            observer: None,
        }
    }

    /// Reports committed purchases and ledger entries to `observer` (metrics).
    pub fn observed_by(self, observer: Arc<dyn CreditObserver>) -> Self {
        Self {
            observer: Some(observer),
            ..self
        }
    }

    fn purchase_finished(&self, outcome: PurchaseOutcome) {
        if let Some(observer) = &self.observer {
            observer.purchase_finished(outcome);
        }
    }

    fn credits_moved(&self, movement: CreditMovement, credits: i64) {
        if let Some(observer) = &self.observer {
            observer.credits_moved(movement, credits);
        }
    }

    /// Records a refund that the caller's transaction (see [`Self::refund_in`]) committed.
    pub fn refund_committed(&self, credits: i64) {
        self.credits_moved(CreditMovement::Refund, credits);
    }

    /// The packs on offer.
    pub fn catalogue(&self) -> &Catalogue {
        &self.settings.catalogue
    }

    /// Validates a token with the payment gateway and stores it for the practice.
    ///
    /// Administrators set or replace the card. A practitioner may set the first card only:
    /// once the practice has one, replacing it would change what every later purchase charges
    /// (and a bad card declines them all), so that is `FORBIDDEN`. A practitioner is refused
    /// before the payment gateway is asked when a card is already there, and the store decides
    /// again atomically (a conditional insert), so of two practitioners racing to set a first
    /// card exactly one succeeds and the other gets the same `FORBIDDEN` as if they had come
    /// a moment later.
    pub async fn set_payment_method(
        &self,
        principal: &Principal,
        token: PaymentToken,
    ) -> Result<CardSummary, GatewayError> {
        let rule = match principal.role {
            Role::Administrator => CardWrite::Replace,
            Role::Practitioner => CardWrite::FirstOnly,
        };
        if rule == CardWrite::FirstOnly
            && self
                .store
                .payment_method(&principal.group_id)
                .await?
                .is_some()
        {
            return Err(self.refuse_card_replacement(principal).await);
        }
        let card = match self.payments.describe(token.as_str()).await {
            Ok(card) => card,
            Err(ProviderError::Refused { .. }) => {
                return Err(GatewayError::BadUserInput(
                    "the payment gateway does not know that payment method token; check it and try again".into(),
                ));
            }
            Err(error) => {
                tracing::warn!(error = %error, "payment gateway unavailable while checking a payment method");
                return Err(payment_unavailable(&error));
            }
        };
        let sealed = self
            .secrets
            .seal(token.as_str(), &payment_context(&principal.group_id))
            .map_err(GatewayError::internal)?;
        let row = PaymentMethodRow {
            token_ciphertext: sealed,
            brand: card.brand.clone(),
            last4: card.last4.clone(),
            exp_month: card.exp_month,
            exp_year: card.exp_year,
            updated_at: Utc::now(),
        };
        let audit = AuditEntry::by(
            principal,
            actions::SET_PAYMENT_METHOD,
            format!("group:{}", principal.group_id),
            AuditOutcome::Success,
        )
        .with_detail(format!("{} ending {}", card.brand, card.last4));
        match self
            .store
            .set_payment_method(&principal.group_id, &principal.user_id, &row, rule, &audit)
            .await?
        {
            CardWritten::Stored => Ok(card),
            CardWritten::AlreadySet => Err(self.refuse_card_replacement(principal).await),
        }
    }

    /// Removes the practice's card (administrators only). Purchases already under way keep
    /// the card they were created with; auto top-ups then decline until a card is set again.
    pub async fn remove_payment_method(
        &self,
        principal: &Principal,
    ) -> Result<CardSummary, GatewayError> {
        let target = format!("group:{}", principal.group_id);
        if principal.role != Role::Administrator {
            self.audit_denied(principal, actions::REMOVE_PAYMENT_METHOD)
                .await;
            return Err(GatewayError::Forbidden(
                "only an administrator can remove the practice's card".into(),
            ));
        }
        let audit = AuditEntry::by(
            principal,
            actions::REMOVE_PAYMENT_METHOD,
            target,
            AuditOutcome::Success,
        );
        let Some(removed) = self
            .store
            .remove_payment_method(&principal.group_id, &audit)
            .await?
        else {
            return Err(GatewayError::NotFound(
                "your practice has no card to remove".into(),
            ));
        };
        Ok(CardSummary {
            brand: removed.brand,
            last4: removed.last4,
            exp_month: removed.exp_month,
            exp_year: removed.exp_year,
        })
    }

    /// Records a practitioner's refused card replacement and says who may do it.
    async fn refuse_card_replacement(&self, principal: &Principal) -> GatewayError {
        self.audit_denied(principal, actions::SET_PAYMENT_METHOD)
            .await;
        GatewayError::Forbidden(
            "your practice already has a card; only an administrator can replace it".into(),
        )
    }

    /// Records a refusal by rule. Failing to record it is logged; the caller is refused anyway.
    async fn audit_denied(&self, principal: &Principal, action: &str) {
        let entry = AuditEntry::by(
            principal,
            action,
            format!("group:{}", principal.group_id),
            AuditOutcome::Denied,
        )
        .with_detail("FORBIDDEN");
        if let Err(error) = self.store.insert_audit(&entry).await {
            tracing::error!(action, error = ?error, "could not record an audit event");
        }
    }

    /// The practice's card, masked.
    pub async fn payment_method(
        &self,
        principal: &Principal,
    ) -> Result<Option<CardSummary>, GatewayError> {
        Ok(self
            .store
            .payment_method(&principal.group_id)
            .await?
            .map(|row| CardSummary {
                brand: row.brand,
                last4: row.last4,
                exp_month: row.exp_month,
                exp_year: row.exp_year,
            }))
    }

    /// The group's practitioners with balances (balances only for administrators and the
    /// caller's own).
    pub async fn practitioners(
        &self,
        principal: &Principal,
    ) -> Result<Vec<(PractitionerRow, bool)>, GatewayError> {
        Ok(self
            .store
            .list_practitioners(&principal.group_id)
            .await?
            .into_iter()
            .map(|practitioner| {
                let may_see = principal.role == Role::Administrator
                    || practitioner.user_id == principal.user_id;
                (practitioner, may_see)
            })
            .collect())
    }

    /// Whose wallet a request is about: practitioners act on their own; administrators must
    /// name a practitioner of their group.
    async fn target(
        &self,
        principal: &Principal,
        practitioner_id: Option<&str>,
        verb: &str,
    ) -> Result<PractitionerRow, GatewayError> {
        match principal.role {
            Role::Practitioner => {
                if practitioner_id.is_some_and(|id| id != principal.subject) {
                    return Err(GatewayError::Forbidden(format!(
                        "practitioners can only {verb} their own credits; an administrator can act for others"
                    )));
                }
                self.store
                    .find_practitioner(&principal.group_id, &principal.subject)
                    .await?
                    .ok_or_else(|| {
                        GatewayError::internal(anyhow::anyhow!("provisioned practitioner missing"))
                    })
            }
            Role::Administrator => {
                let id = practitioner_id.ok_or_else(|| {
                    GatewayError::BadUserInput(
                        "practitionerId: administrators must name the practitioner".into(),
                    )
                })?;
                self.store
                    .find_practitioner(&principal.group_id, id)
                    .await?
                    .ok_or_else(|| {
                        GatewayError::NotFound(format!("no practitioner {id:?} in your practice"))
                    })
            }
        }
    }

    /// A practitioner's credits.
    pub async fn credits(
        &self,
        principal: &Principal,
        practitioner_id: Option<&str>,
    ) -> Result<CreditsView, GatewayError> {
        // Your own credits are one read: the token already says who you are.
        let own = principal.role == Role::Practitioner
            && practitioner_id.is_none_or(|id| id == principal.subject);
        let (practitioner, wallet) = if own {
            let wallet = self.store.wallet(&principal.user_id).await?;
            let practitioner = PractitionerRow {
                user_id: principal.user_id.clone(),
                subject: principal.subject.clone(),
                name: principal.name.clone(),
                balance: wallet.balance,
            };
            (practitioner, wallet)
        } else {
            let practitioner = self.target(principal, practitioner_id, "see").await?;
            let wallet = self.store.wallet(&practitioner.user_id).await?;
            (practitioner, wallet)
        };
        let top_up_pack = wallet
            .top_up_pack_id
            .as_deref()
            .and_then(|id| self.catalogue().find(id))
            .cloned();
        Ok(CreditsView {
            practitioner,
            wallet,
            top_up_pack,
        })
    }

    /// A wallet's ledger page, newest first.
    pub async fn ledger(
        &self,
        user_id: &str,
        after: Option<&str>,
        first: u64,
    ) -> Result<Vec<LedgerRow>, GatewayError> {
        Ok(self.store.ledger(user_id, after, first).await?)
    }

    /// Buys a pack for a practitioner, exactly once per idempotency key.
    pub async fn purchase(
        &self,
        principal: &Principal,
        pack_id: &str,
        key: IdempotencyKey,
        practitioner_id: Option<&str>,
    ) -> Result<PurchaseResult, GatewayError> {
        let pack = self.catalogue().find(pack_id).cloned().ok_or_else(|| {
            GatewayError::BadUserInput(format!(
                "packId: there is no pack {pack_id:?}; see creditPacks"
            ))
        })?;
        let target = self.target(principal, practitioner_id, "buy").await?;
        let Some(method) = self.store.payment_method(&principal.group_id).await? else {
            return Err(GatewayError::BadUserInput(
                "your practice has no payment method yet; set one with setPaymentMethod first"
                    .into(),
            ));
        };
        let fingerprint = format!("pack={};practitioner={}", pack.id, target.user_id);
        let keep_until = later(Utc::now(), self.settings.key_retention);
        let key_request = KeyRequest {
            group_id: &principal.group_id,
            key: key.as_str(),
            operation: "purchaseCredits",
            fingerprint: &fingerprint,
            keep_until,
        };
        let purchase = self.new_purchase(
            &principal.group_id,
            &target.user_id,
            &pack,
            "MANUAL",
            Some(principal),
            Some(key.as_str()),
            Some(method.token_ciphertext),
        );
        self.start_and_drive(
            principal,
            &target.subject,
            &target.name,
            &key_request,
            purchase,
        )
        .await
    }

    /// Records a purchase (checking the spending caps in the same transaction) and charges it,
    /// or replays or refuses it.
    async fn start_and_drive(
        &self,
        principal: &Principal,
        target_subject: &str,
        target_name: &str,
        key_request: &KeyRequest<'_>,
        purchase: PurchaseRow,
    ) -> Result<PurchaseResult, GatewayError> {
        let (period_start, period_end) = spending_period(purchase.created_at);
        match self
            .store
            .start_purchase(Some(key_request), &purchase, period_start)
            .await?
        {
            PurchaseStart::Claimed(KeyClaim::Fresh) => self.drive_purchase(purchase).await,
            PurchaseStart::Claimed(KeyClaim::Completed(response)) => {
                self.replay_purchase(&response).await
            }
            PurchaseStart::Claimed(KeyClaim::Mismatch) => Err(key_reused()),
            PurchaseStart::Claimed(KeyClaim::InProgress) => {
                let response = self.wait_for_key(key_request).await?;
                self.replay_purchase(&response).await
            }
            PurchaseStart::OverCap(breach) => {
                let audit = AuditEntry::by(
                    principal,
                    actions::PURCHASE_CREDITS,
                    format!("practitioner:{target_subject}"),
                    AuditOutcome::Denied,
                )
                .with_detail(cap_audit_detail(&purchase, &breach));
                if let Err(error) = self.store.insert_audit(&audit).await {
                    tracing::error!(error = ?error, "could not record an audit event");
                }
                Err(GatewayError::SpendingLimitReached(cap_refusal(
                    &breach,
                    target_name,
                    period_end,
                )))
            }
        }
    }

    /// A practitioner's and the practice's spending caps with this month's spending (the
    /// caller must already be allowed to see that practitioner's credits).
    pub async fn spending_caps(
        &self,
        group_id: &str,
        user_id: &str,
    ) -> Result<(SpendingCapView, SpendingCapView), GatewayError> {
        let (period_start, period_end) = spending_period(Utc::now());
        let (practitioner, practice) = self
            .store
            .spending_standing(group_id, user_id, period_start)
            .await?;
        let view = |scope, standing| SpendingCapView {
            scope,
            standing,
            period_start,
            period_end,
        };
        Ok((
            view(CapScope::Practitioner, practitioner),
            view(CapScope::Practice, practice),
        ))
    }

    /// Sets (or with `None` removes) a monthly spending cap in cents: a practitioner's when
    /// `practitioner_id` names one, else the practice's. Administrators only; anyone else is
    /// `FORBIDDEN` and the attempt is audited.
    pub async fn set_spending_cap(
        &self,
        principal: &Principal,
        practitioner_id: Option<&str>,
        monthly_limit_cents: Option<i64>,
    ) -> Result<SpendingCapView, GatewayError> {
        if principal.role != Role::Administrator {
            self.audit_denied(principal, actions::SET_SPENDING_CAP)
                .await;
            return Err(GatewayError::Forbidden(
                "only an administrator of your practice can set spending caps".into(),
            ));
        }
        if let Some(limit) = monthly_limit_cents
            && !(0..=MAX_MONTHLY_CAP_CENTS).contains(&limit)
        {
            return Err(GatewayError::BadUserInput(format!(
                "monthlyLimitCents must be from 0 to {MAX_MONTHLY_CAP_CENTS} (whole cents a month; null removes the cap)"
            )));
        }
        let practitioner = match practitioner_id {
            Some(id) => Some(
                self.store
                    .find_practitioner(&principal.group_id, id)
                    .await?
                    .ok_or_else(|| {
                        GatewayError::NotFound(format!("no practitioner {id:?} in your practice"))
                    })?,
            ),
            None => None,
        };
        let target = practitioner.as_ref().map_or_else(
            || format!("group:{}", principal.group_id),
            |practitioner| format!("practitioner:{}", practitioner.subject),
        );
        let audit = AuditEntry::by(
            principal,
            actions::SET_SPENDING_CAP,
            target,
            AuditOutcome::Success,
        )
        .with_detail(match monthly_limit_cents {
            Some(limit) => format!("{limit} cents a month"),
            None => "removed".to_owned(),
        });
        self.store
            .set_spending_cap(
                &principal.group_id,
                practitioner.as_ref().map(|row| row.user_id.as_str()),
                monthly_limit_cents,
                &principal.user_id,
                &audit,
            )
            .await?;
        // The practice's cap is read for any practitioner; the caller's own id will do.
        let user_id = practitioner
            .as_ref()
            .map_or(principal.user_id.as_str(), |row| row.user_id.as_str());
        let (practitioner_view, practice_view) =
            self.spending_caps(&principal.group_id, user_id).await?;
        Ok(if practitioner.is_some() {
            practitioner_view
        } else {
            practice_view
        })
    }

    async fn wait_for_key(&self, request: &KeyRequest<'_>) -> Result<String, GatewayError> {
        let deadline = tokio::time::Instant::now() + self.settings.duplicate_wait;
        loop {
            match self.store.peek_key(request).await? {
                KeyClaim::Completed(response) => return Ok(response),
                KeyClaim::Mismatch => return Err(key_reused()),
                KeyClaim::Fresh | KeyClaim::InProgress => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(GatewayError::Conflict(
                    "a request with this idempotency key is still being processed; retry in a few seconds with the same key".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn replay_purchase(&self, response: &str) -> Result<PurchaseResult, GatewayError> {
        let value: serde_json::Value =
            serde_json::from_str(response).map_err(GatewayError::internal)?;
        let purchase_id = value["purchaseId"].as_str().unwrap_or_default();
        let purchase = self.store.purchase(purchase_id).await?.ok_or_else(|| {
            GatewayError::internal(anyhow::anyhow!("replayed purchase {purchase_id} missing"))
        })?;
        if value["declined"].as_bool() == Some(true) {
            return Err(declined(
                purchase.failure_code.as_deref().unwrap_or("card_declined"),
            ));
        }
        let balance = value["balanceAfter"].as_i64().unwrap_or_default();
        Ok(PurchaseResult { purchase, balance })
    }

    // Who receives the credits, what, why, who asked, under which key, with which card: all
    // part of the row.
    #[allow(clippy::too_many_arguments)]
    fn new_purchase(
        &self,
        group_id: &str,
        user_id: &str,
        pack: &CreditPack,
        origin: &str,
        requested_by: Option<&Principal>,
        key: Option<&str>,
        token_ciphertext: Option<String>,
    ) -> PurchaseRow {
        let now = Utc::now();
        PurchaseRow {
            id: new_id(),
            group_id: group_id.to_owned(),
            user_id: user_id.to_owned(),
            pack_id: pack.id.clone(),
            credits: pack.price.credits,
            amount_cents: pack.price.total_cents,
            gst_cents: pack.price.gst_cents,
            status: "PENDING".into(),
            origin: origin.into(),
            charge_id: None,
            failure_code: None,
            requested_by_user_id: requested_by.map(|principal| principal.user_id.clone()),
            requested_by_subject: requested_by.map(|principal| principal.subject.clone()),
            idempotency_key: key.map(str::to_owned),
            token_ciphertext,
            attempts: 0,
            // The recovery worker leaves it alone while this request drives it.
            next_attempt_at: Some(later(now, self.settings.purchase_lease)),
            created_at: now,
        }
    }

    /// Charges a pending purchase and records the outcome. Transient gateway failures are
    /// retried here a few times with the same key; if the outcome is still unknown the
    /// purchase stays pending for the recovery worker.
    async fn drive_purchase(&self, purchase: PurchaseRow) -> Result<PurchaseResult, GatewayError> {
        let sealed_token = match &purchase.token_ciphertext {
            Some(sealed) => sealed.clone(),
            None => match self.store.payment_method(&purchase.group_id).await? {
                Some(method) => method.token_ciphertext,
                None => {
                    self.record_decline(&purchase, "no_payment_method", None)
                        .await?;
                    self.purchase_finished(PurchaseOutcome::Declined);
                    return Err(declined("no_payment_method"));
                }
            },
        };
        let token = self
            .secrets
            .open(&sealed_token, &payment_context(&purchase.group_id))
            .map_err(GatewayError::internal)?;
        let description = format!("{} SMD Gateway credits", purchase.credits);
        let request = ChargeRequest {
            token: &token,
            amount_cents: purchase.amount_cents,
            idempotency_key: &purchase.id,
            description: &description,
        };
        let mut last_error = None;
        for attempt in 0..3u32 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(150 * u64::from(attempt))).await;
            }
            match self.payments.charge(&request).await {
                Ok(ChargeOutcome::Succeeded { charge_id }) => {
                    if self.settings.fail_after_charge {
                        return Err(GatewayError::internal(anyhow::anyhow!(
                            "test fault point: stopped after the charge"
                        )));
                    }
                    let audit = purchase_audit(&purchase, AuditOutcome::Success, &charge_id);
                    let balance = match self
                        .store
                        .complete_purchase(&purchase, &charge_id, &audit)
                        .await?
                    {
                        Some(balance) => {
                            self.purchase_finished(PurchaseOutcome::Succeeded);
                            self.credits_moved(CreditMovement::Purchase, purchase.credits);
                            balance
                        }
                        // Completed meanwhile by another node or request: counted there.
                        None => self.store.wallet(&purchase.user_id).await?.balance,
                    };
                    let purchase = self.store.purchase(&purchase.id).await?.unwrap_or(purchase);
                    return Ok(PurchaseResult { purchase, balance });
                }
                Ok(ChargeOutcome::Declined { charge_id, code }) => {
                    self.record_decline(&purchase, &code, charge_id.as_deref())
                        .await?;
                    self.purchase_finished(PurchaseOutcome::Declined);
                    return Err(declined(&code));
                }
                Err(ProviderError::Refused { code, .. }) => {
                    self.record_decline(&purchase, &code, None).await?;
                    self.purchase_finished(PurchaseOutcome::Declined);
                    return Err(declined(&code));
                }
                Err(error) => {
                    tracing::warn!(purchase = %purchase.id, attempt, error = %error, "charge outcome unknown; retrying with the same key");
                    last_error = Some(error);
                }
            }
        }
        let error = last_error.unwrap_or(ProviderError::Unavailable {
            kind: Unavailability::ServerError,
            reason: "no attempt".into(),
            retry_after: None,
        });
        self.purchase_finished(PurchaseOutcome::Unresolved);
        Err(payment_unavailable(&error))
    }

    async fn record_decline(
        &self,
        purchase: &PurchaseRow,
        code: &str,
        charge_id: Option<&str>,
    ) -> Result<(), GatewayError> {
        let code: String = code
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .take(64)
            .collect();
        let message = format!(
            "the card was declined ({code}) on {}",
            Utc::now().format("%Y-%m-%d %H:%M UTC")
        );
        let audit = purchase_audit(purchase, AuditOutcome::Failure, &code);
        self.store
            .decline_purchase(
                purchase,
                &code,
                charge_id,
                &message,
                self.settings.disable_auto_top_up_after,
                &audit,
            )
            .await?;
        Ok(())
    }

    /// One pass of the recovery worker: drives purchases left pending by a crash, a lost
    /// answer or a payment gateway outage. Returns how many it drove.
    pub async fn recover_pending_purchases(
        &self,
        now: DateTime<Utc>,
    ) -> Result<usize, GatewayError> {
        let due = self.store.due_pending_purchases(now, 20).await?;
        let mut driven = 0;
        for purchase in due {
            let lease_until = later(now, self.settings.purchase_lease);
            if !self.store.claim_purchase(&purchase, lease_until).await? {
                continue;
            }
            driven += 1;
            let purchase = PurchaseRow {
                next_attempt_at: Some(lease_until),
                ..purchase
            };
            match self.drive_purchase(purchase.clone()).await {
                Ok(_) => tracing::info!(purchase = %purchase.id, "pending purchase completed"),
                Err(GatewayError::PaymentDeclined(_)) => {
                    tracing::info!(purchase = %purchase.id, "pending purchase declined")
                }
                Err(error) => {
                    tracing::warn!(purchase = %purchase.id, error = ?error, "pending purchase still unresolved")
                }
            }
        }
        Ok(driven)
    }

    /// Debits one message's cost inside the caller's transaction (so the message and its
    /// debit commit together). `Ok(Err(balance))` when short. Call [`Self::after_commit`]
    /// with the returned top-up once the transaction has committed.
    pub async fn debit_send_in(
        &self,
        txn: &Transaction,
        principal: &Principal,
        reference: &str,
        card: Option<String>,
    ) -> Result<Result<(i64, TopUp), i64>, GatewayError> {
        let (period_start, _) = spending_period(Utc::now());
        let outcome = self
            .store
            .debit_in(
                txn,
                &principal.group_id,
                &principal.user_id,
                CREDITS_PER_MESSAGE,
                "SEND_DEBIT",
                reference,
                period_start,
                |wallet| self.decide_top_up(&principal.group_id, wallet, card),
            )
            .await?;
        Ok(match outcome {
            DebitOutcome::Insufficient { balance } => Err(balance),
            DebitOutcome::Debited {
                balance_after,
                top_up,
                refused_top_up,
            } => {
                let top_up = match (top_up, refused_top_up) {
                    (Some(purchase), _) => TopUp::Started(purchase),
                    (None, Some(breach)) => TopUp::Refused {
                        group_id: principal.group_id.clone(),
                        user_id: principal.user_id.clone(),
                        breach,
                    },
                    (None, None) => TopUp::None,
                };
                Ok((balance_after, top_up))
            }
        })
    }

    /// The practice's sealed card token, to hand to [`Self::debit_send_in`]. Read it before
    /// opening the transaction: reading through the pool while holding a write transaction
    /// would wait on a second connection that the transaction itself may be blocking.
    pub async fn card_for_top_up(&self, group_id: &str) -> Result<Option<String>, GatewayError> {
        Ok(self
            .store
            .payment_method(group_id)
            .await?
            .map(|method| method.token_ciphertext))
    }

    /// Call once the transaction of a [`Self::debit_send_in`] has committed: records the
    /// debit and starts the top-up it triggered, if any (or records that a cap refused it).
    pub fn after_commit(&self, top_up: TopUp) {
        self.credits_moved(CreditMovement::SendDebit, CREDITS_PER_MESSAGE);
        match top_up {
            TopUp::None => {}
            TopUp::Started(purchase) => self.start_top_up(purchase),
            TopUp::Refused {
                group_id,
                user_id,
                breach,
            } => {
                let service = self.clone();
                tokio::spawn(async move {
                    service
                        .note_top_up_refused(&group_id, &user_id, &breach)
                        .await;
                });
            }
        }
    }

    /// Shows a cap's refusal of auto top-up as the wallet's last failure, and audits it.
    async fn note_top_up_refused(&self, group_id: &str, user_id: &str, breach: &CapBreach) {
        let (_, period_end) = spending_period(Utc::now());
        // The wallet's failure column holds 256 characters: a shorter sentence than a request's.
        let cap = match breach.scope {
            CapScope::Practitioner => "this practitioner's",
            CapScope::Practice => "the practice's",
        };
        let message: String = format!(
            "auto top-up refused by {cap} monthly spending cap of {}: {} spent this month, {} left until {}; an administrator can raise it with setSpendingCap",
            dollars(breach.limit_cents),
            dollars(breach.spent_cents),
            dollars((breach.limit_cents - breach.spent_cents).max(0)),
            period_end.format("%-d %B %Y"),
        )
        .chars()
        .take(256)
        .collect();
        let mut audit = AuditEntry::by_gateway(
            group_id,
            actions::PURCHASE_CREDITS,
            format!("wallet:{user_id}"),
            AuditOutcome::Denied,
        )
        .with_detail(format!(
            "SPENDING_LIMIT_REACHED: AUTO_TOP_UP {} cents; {} cap {} cents, {} spent this month",
            breach.attempted_cents,
            scope_word(breach.scope),
            breach.limit_cents,
            breach.spent_cents
        ));
        audit.actor_user_id = None;
        if let Err(error) = self
            .store
            .note_top_up_refused(user_id, &message, &audit)
            .await
        {
            tracing::error!(error = ?error, "could not record a refused auto top-up");
        }
    }

    /// Buys the auto top-up pack (or the smallest) for a send that is short — once per
    /// message reference.
    pub async fn buy_for_send(
        &self,
        principal: &Principal,
        reference: &str,
    ) -> Result<(), GatewayError> {
        self.buy_at_send(principal, reference).await
    }

    /// The pack a send short of credits buys for this wallet: its auto top-up pack, or the
    /// smallest (what `sendSecureMessage` with `topUpIfShort` buys, and what a preview shows).
    pub fn buy_at_send_pack(&self, wallet: &WalletRow) -> CreditPack {
        wallet
            .top_up_pack_id
            .as_deref()
            .and_then(|id| self.catalogue().find(id))
            .unwrap_or_else(|| self.catalogue().smallest())
            .clone()
    }

    /// Gives a message's credits back inside the caller's transaction.
    pub async fn refund_in(
        &self,
        txn: &Transaction,
        group_id: &str,
        user_id: &str,
        credits: i64,
        reference: &str,
    ) -> Result<i64, GatewayError> {
        Ok(self
            .store
            .credit_in(txn, group_id, user_id, credits, "REFUND", reference)
            .await?)
    }

    /// The auto top-up rule, applied to the wallet as the debit left it.
    fn decide_top_up(
        &self,
        group_id: &str,
        wallet: &WalletRow,
        card: Option<String>,
    ) -> Option<PurchaseRow> {
        if !wallet.auto_top_up_enabled
            || wallet.top_up_pending
            || wallet.balance >= wallet.threshold_credits
        {
            return None;
        }
        let pack = wallet
            .top_up_pack_id
            .as_deref()
            .and_then(|id| self.catalogue().find(id))
            .unwrap_or_else(|| self.catalogue().smallest())
            .clone();
        Some(self.new_purchase(
            group_id,
            &wallet.user_id,
            &pack,
            "AUTO_TOP_UP",
            None,
            None,
            card,
        ))
    }

    /// Charges a top-up in the background; the recovery worker finishes it if this node dies.
    fn start_top_up(&self, purchase: PurchaseRow) {
        let service = self.clone();
        tokio::spawn(async move {
            let id = purchase.id.clone();
            match service.drive_purchase(purchase).await {
                Ok(result) => {
                    tracing::info!(purchase = %id, balance = result.balance, "auto top-up completed")
                }
                Err(error) => {
                    tracing::warn!(purchase = %id, error = ?error, "auto top-up did not complete")
                }
            }
        });
    }

    async fn buy_at_send(
        &self,
        principal: &Principal,
        reference: &str,
    ) -> Result<(), GatewayError> {
        let wallet = self.store.wallet(&principal.user_id).await?;
        let pack = self.buy_at_send_pack(&wallet);
        // One purchase per (practitioner, send): the same send retried, or sent twice at once,
        // finds this key and does not buy again.
        let digest = {
            use sha2::Digest;
            let hash =
                sha2::Sha256::digest(format!("{}:{reference}", principal.user_id).as_bytes());
            hash.iter()
                .take(16)
                .map(|byte| format!("{byte:02x}"))
                .collect::<String>()
        };
        let key = IdempotencyKey::parse(&format!("buy-at-send:{digest}"))
            .map_err(|problem| GatewayError::internal(anyhow::anyhow!(problem)))?;
        self.purchase_as(principal, &pack, key, "BUY_AT_SEND")
            .await
            .map(|_| ())
    }

    async fn purchase_as(
        &self,
        principal: &Principal,
        pack: &CreditPack,
        key: IdempotencyKey,
        origin: &str,
    ) -> Result<PurchaseResult, GatewayError> {
        let Some(method) = self.store.payment_method(&principal.group_id).await? else {
            return Err(GatewayError::InsufficientCredits(
                "not enough credits, and your practice has no payment method to buy more at send time".into(),
            ));
        };
        let fingerprint = format!("pack={};practitioner={}", pack.id, principal.user_id);
        let key_request = KeyRequest {
            group_id: &principal.group_id,
            key: key.as_str(),
            operation: "buyAtSend",
            fingerprint: &fingerprint,
            keep_until: later(Utc::now(), self.settings.key_retention),
        };
        let purchase = self.new_purchase(
            &principal.group_id,
            &principal.user_id,
            pack,
            origin,
            Some(principal),
            Some(key.as_str()),
            Some(method.token_ciphertext),
        );
        self.start_and_drive(
            principal,
            &principal.subject,
            &principal.name,
            &key_request,
            purchase,
        )
        .await
    }

    /// Moves credits between two practitioners of the group, both ledger entries in one
    /// transaction, exactly once per idempotency key.
    pub async fn transfer(
        &self,
        principal: &Principal,
        from_id: &str,
        to_id: &str,
        credits: CreditAmount,
        key: IdempotencyKey,
    ) -> Result<TransferResult, GatewayError> {
        let from = self.target(principal, Some(from_id), "transfer").await?;
        let to = self
            .store
            .find_practitioner(&principal.group_id, to_id)
            .await?
            .ok_or_else(|| {
                GatewayError::NotFound(format!("no practitioner {to_id:?} in your practice"))
            })?;
        if from.user_id == to.user_id {
            return Err(GatewayError::BadUserInput(
                "toPractitionerId: cannot transfer credits to the same practitioner".into(),
            ));
        }
        let fingerprint = format!(
            "from={};to={};credits={}",
            from.user_id,
            to.user_id,
            credits.get()
        );
        let key_request = KeyRequest {
            group_id: &principal.group_id,
            key: key.as_str(),
            operation: "transferCredits",
            fingerprint: &fingerprint,
            keep_until: later(Utc::now(), self.settings.key_retention),
        };
        let transfer_id = new_id();
        let txn = self.store.begin_credit_transaction().await?;
        match self.store.claim_key(&txn, &key_request).await? {
            KeyClaim::Fresh => {}
            claim => {
                txn.rollback().await?;
                let response = match claim {
                    KeyClaim::Completed(response) => response,
                    KeyClaim::Mismatch => return Err(key_reused()),
                    _ => self.wait_for_key(&key_request).await?,
                };
                return replay_transfer(&response);
            }
        }
        // Touch the two wallets in a fixed order so concurrent opposite transfers cannot
        // deadlock on PostgreSQL.
        let (debit_first, amount) = (from.user_id < to.user_id, credits.get());
        let mut to_balance = None;
        if !debit_first {
            to_balance = Some(
                self.store
                    .credit_in(
                        &txn,
                        &principal.group_id,
                        &to.user_id,
                        amount,
                        "TRANSFER_IN",
                        &transfer_id,
                    )
                    .await?,
            );
        }
        let from_balance = match self
            .store
            .debit_in(
                &txn,
                &principal.group_id,
                &from.user_id,
                amount,
                "TRANSFER_OUT",
                &transfer_id,
                Utc::now(),
                |_| None,
            )
            .await?
        {
            DebitOutcome::Debited { balance_after, .. } => balance_after,
            DebitOutcome::Insufficient { balance } => {
                // Nothing happened, so the key is not used up: the same request can be
                // retried once the balance allows it.
                txn.rollback().await?;
                return Err(GatewayError::InsufficientCredits(format!(
                    "{} has {balance} credits, fewer than the {amount} to transfer",
                    from.name
                )));
            }
        };
        let to_balance = match to_balance {
            Some(balance) => balance,
            None => {
                self.store
                    .credit_in(
                        &txn,
                        &principal.group_id,
                        &to.user_id,
                        amount,
                        "TRANSFER_IN",
                        &transfer_id,
                    )
                    .await?
            }
        };
        let result = TransferResult {
            transfer_id: transfer_id.clone(),
            credits: amount,
            from_balance,
            to_balance,
        };
        let response = serde_json::json!({
            "transferId": transfer_id, "credits": amount, "fromBalance": from_balance, "toBalance": to_balance
        })
        .to_string();
        self.store
            .complete_key_in(&txn, &principal.group_id, key.as_str(), &response)
            .await?;
        let audit = AuditEntry::by(
            principal,
            actions::TRANSFER_CREDITS,
            format!("practitioner:{}", to.subject),
            AuditOutcome::Success,
        )
        .with_detail(format!(
            "{amount} credits from {} ({transfer_id})",
            from.subject
        ));
        self.store.audit_in(&txn, &audit).await?;
        txn.commit().await?;
        self.credits_moved(CreditMovement::TransferOut, amount);
        self.credits_moved(CreditMovement::TransferIn, amount);
        Ok(result)
    }

    /// Changes a practitioner's auto top-up.
    pub async fn set_auto_top_up(
        &self,
        principal: &Principal,
        practitioner_id: Option<&str>,
        enabled: bool,
        threshold_credits: Option<i64>,
        pack_id: Option<&str>,
    ) -> Result<CreditsView, GatewayError> {
        let target = self.target(principal, practitioner_id, "configure").await?;
        let threshold = threshold_credits.unwrap_or(10);
        if !(0..=100_000).contains(&threshold) {
            return Err(GatewayError::BadUserInput(
                "thresholdCredits must be from 0 to 100000".into(),
            ));
        }
        let pack = match pack_id {
            Some(id) => Some(
                self.catalogue()
                    .find(id)
                    .ok_or_else(|| {
                        GatewayError::BadUserInput(format!(
                            "packId: there is no pack {id:?}; see creditPacks"
                        ))
                    })?
                    .id
                    .clone(),
            ),
            None if enabled => Some(self.catalogue().smallest().id.clone()),
            None => None,
        };
        let audit = AuditEntry::by(
            principal,
            actions::SET_AUTO_TOP_UP,
            format!("practitioner:{}", target.subject),
            AuditOutcome::Success,
        )
        .with_detail(format!(
            "enabled={enabled} threshold={threshold} pack={}",
            pack.as_deref().unwrap_or("none")
        ));
        self.store
            .set_auto_top_up(
                &principal.group_id,
                &target.user_id,
                enabled,
                threshold,
                pack.as_deref(),
                &audit,
            )
            .await?;
        self.credits(
            principal,
            Some(&target.subject)
                .filter(|_| principal.role == Role::Administrator)
                .map(String::as_str),
        )
        .await
    }
}

fn scope_word(scope: CapScope) -> &'static str {
    match scope {
        CapScope::Practitioner => "practitioner",
        CapScope::Practice => "practice",
    }
}

fn cap_audit_detail(purchase: &PurchaseRow, breach: &CapBreach) -> String {
    format!(
        "SPENDING_LIMIT_REACHED: {} {} credits, {} cents; {} cap {} cents, {} spent this month",
        purchase.origin,
        purchase.credits,
        purchase.amount_cents,
        scope_word(breach.scope),
        breach.limit_cents,
        breach.spent_cents
    )
}

fn payment_context(group_id: &str) -> String {
    format!("payment-method/{group_id}")
}

fn purchase_audit(purchase: &PurchaseRow, outcome: AuditOutcome, detail: &str) -> AuditEntry {
    let mut entry = AuditEntry::by_gateway(
        &purchase.group_id,
        actions::PURCHASE_CREDITS,
        format!("purchase:{}", purchase.id),
        outcome,
    )
    .with_detail(format!(
        "{} {} credits, {} cents: {detail}",
        purchase.origin, purchase.credits, purchase.amount_cents
    ));
    // A purchase someone asked for is theirs in the trail; a top-up is the gateway's.
    entry.actor_user_id = purchase.requested_by_user_id.clone();
    if let Some(subject) = &purchase.requested_by_subject {
        entry.actor_subject = subject.clone();
    }
    entry
}

fn declined(code: &str) -> GatewayError {
    GatewayError::PaymentDeclined(format!(
        "the payment was declined ({code}) and no credits were added; update the practice's payment method or try again"
    ))
}

fn key_reused() -> GatewayError {
    GatewayError::Conflict("this idempotency key was already used for a different request; use a new key for a new request".into())
}

fn replay_transfer(response: &str) -> Result<TransferResult, GatewayError> {
    let value: serde_json::Value =
        serde_json::from_str(response).map_err(GatewayError::internal)?;
    Ok(TransferResult {
        transfer_id: value["transferId"].as_str().unwrap_or_default().to_owned(),
        credits: value["credits"].as_i64().unwrap_or_default(),
        from_balance: value["fromBalance"].as_i64().unwrap_or_default(),
        to_balance: value["toBalance"].as_i64().unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_keys_are_checked() {
        assert!(IdempotencyKey::parse("3f2b6c1e-0000-4000-8000-000000000001").is_ok());
        assert!(IdempotencyKey::parse("short").is_err());
        assert!(IdempotencyKey::parse("has spaces in it").is_err());
        assert!(IdempotencyKey::parse(&"k".repeat(129)).is_err());
    }

    #[test]
    fn the_spending_period_is_the_calendar_month_in_utc() {
        use chrono::TimeZone;
        let at = |y, m, d, h| Utc.with_ymd_and_hms(y, m, d, h, 0, 0).unwrap();
        assert_eq!(
            spending_period(at(2026, 12, 2, 0)),
            (at(2026, 12, 1, 0), at(2027, 1, 1, 0))
        );
        assert_eq!(
            spending_period(at(2027, 1, 1, 0)),
            (at(2027, 1, 1, 0), at(2027, 2, 1, 0))
        );
        assert_eq!(
            spending_period(at(2028, 2, 29, 23)),
            (at(2028, 2, 1, 0), at(2028, 3, 1, 0))
        );
    }

    #[test]
    fn a_cap_refusal_says_the_cap_what_is_left_and_who_can_raise_it() {
        use chrono::TimeZone;
        assert_eq!(dollars(0), "$0.00");
        assert_eq!(dollars(2_200), "$22.00");
        assert_eq!(dollars(123_456_705), "$1,234,567.05");
        let breach = CapBreach {
            scope: CapScope::Practitioner,
            limit_cents: 5_000,
            spent_cents: 4_400,
            attempted_cents: 2_200,
        };
        let message = cap_refusal(
            &breach,
            "Dr Raj Patel",
            Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).unwrap(),
        );
        assert_eq!(
            message,
            "this purchase of $22.00 would pass Dr Raj Patel's monthly spending cap of $50.00 ($44.00 spent this month, $6.00 left until 1 January 2027 00:00 UTC); nothing was charged — an administrator of your practice can raise the cap with setSpendingCap"
        );
    }

    #[test]
    fn credit_amounts_are_positive_and_bounded() {
        assert!(CreditAmount::parse(1).is_ok());
        assert!(CreditAmount::parse(0).is_err());
        assert!(CreditAmount::parse(-3).is_err());
        assert!(CreditAmount::parse(1_000_001).is_err());
    }
}
