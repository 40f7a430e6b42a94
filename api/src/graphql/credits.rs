//! Credits: packs, the practice's card, purchases, balances and ledgers, transfers, auto top-up.

use async_graphql::{Context, Enum, ID, InputObject, Object, SimpleObject};
use chrono::{DateTime, Utc};

use super::audit::PageInfo;
use super::error::ApiError;
use super::{principal, services};
use crate::domain::credits::{CreditAmount, CreditsView, IdempotencyKey, SpendingCapView};
use crate::domain::pricing::CreditPack as DomainPack;
use crate::domain::types::PaymentToken;
use crate::providers::payments::CardSummary;
use crate::store::credits::{CapScope, PurchaseRow};

/// Whose spending a cap limits.
#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
pub enum SpendingCapScope {
    /// Purchases for one practitioner's wallet (whoever makes them).
    Practitioner,
    /// Every purchase of the practice.
    Practice,
}

/// A monthly spending cap, in whole cents per calendar month (UTC, from the 1st 00:00).
/// Pending and succeeded purchases count towards it (manual, at send time and auto top-up);
/// declined ones do not. A purchase that would pass it is `SPENDING_LIMIT_REACHED` and charges
/// nothing. Administrators set it with `setSpendingCap`.
#[derive(SimpleObject)]
pub struct SpendingCap {
    /// A practitioner's cap or the practice's.
    pub scope: SpendingCapScope,
    /// The cap, cents a month; null when there is none.
    pub monthly_limit_cents: Option<i64>,
    /// Spent this month, cents (pending and succeeded purchases).
    pub spent_this_month_cents: i64,
    /// What may still be spent this month, cents; null when there is no cap.
    pub remaining_cents: Option<i64>,
    /// The month counted: its first instant (UTC).
    pub period_start: DateTime<Utc>,
    /// When the count starts again (the next month's first instant, UTC).
    pub period_end: DateTime<Utc>,
}

impl From<SpendingCapView> for SpendingCap {
    fn from(view: SpendingCapView) -> Self {
        Self {
            scope: match view.scope {
                CapScope::Practitioner => SpendingCapScope::Practitioner,
                CapScope::Practice => SpendingCapScope::Practice,
            },
            monthly_limit_cents: view.standing.limit_cents,
            spent_this_month_cents: view.standing.spent_cents,
            remaining_cents: view.remaining_cents(),
            period_start: view.period_start,
            period_end: view.period_end,
        }
    }
}

/// Sets or removes a monthly spending cap.
#[derive(InputObject)]
pub struct SetSpendingCapInput {
    /// The practitioner whose wallet's purchases to cap; omit for the practice's own cap.
    pub practitioner_id: Option<ID>,
    /// Whole cents a month (0 to 100000000, i.e. $1,000,000); 0 allows no purchases; null
    /// removes the cap.
    pub monthly_limit_cents: Option<i64>,
}

/// A pack of credits on offer. Prices are in whole Australian cents, GST included.
#[derive(SimpleObject, Clone)]
pub struct CreditPack {
    /// Pass as `packId`.
    pub id: ID,
    /// Credits in the pack.
    pub credits: i64,
    /// Price of the pack, cents, GST included.
    pub price_cents: i64,
    /// Price per credit, cents (falls with the purchase's size).
    pub cents_per_credit: i64,
    /// The GST within the price, cents.
    pub gst_cents: i64,
}

impl From<&DomainPack> for CreditPack {
    fn from(pack: &DomainPack) -> Self {
        Self {
            id: ID(pack.id.clone()),
            credits: pack.price.credits,
            price_cents: pack.price.total_cents,
            cents_per_credit: pack.price.cents_per_credit,
            gst_cents: pack.price.gst_cents,
        }
    }
}

/// The practice's card, masked.
#[derive(SimpleObject)]
pub struct PaymentMethod {
    /// Card brand.
    pub brand: String,
    /// Last four digits.
    pub last4: String,
    /// Expiry month.
    pub exp_month: i32,
    /// Expiry year.
    pub exp_year: i32,
    /// A display form such as `visa •••• 4242`.
    pub display: String,
}

impl From<CardSummary> for PaymentMethod {
    fn from(card: CardSummary) -> Self {
        Self {
            display: format!("{} •••• {}", card.brand, card.last4),
            brand: card.brand,
            last4: card.last4,
            exp_month: card.exp_month,
            exp_year: card.exp_year,
        }
    }
}

/// A purchase of credits.
#[derive(SimpleObject)]
pub struct Purchase {
    /// Purchase id.
    pub id: ID,
    /// The pack bought.
    pub pack_id: String,
    /// Credits bought.
    pub credits: i64,
    /// Amount charged, cents, GST included.
    pub amount_cents: i64,
    /// GST within the amount, cents.
    pub gst_cents: i64,
    /// `PENDING` (payment being confirmed), `SUCCEEDED` or `DECLINED`.
    pub status: String,
    /// `MANUAL`, `AUTO_TOP_UP` or `BUY_AT_SEND`.
    pub origin: String,
    /// When it was made.
    pub created_at: DateTime<Utc>,
}

impl From<PurchaseRow> for Purchase {
    fn from(row: PurchaseRow) -> Self {
        Self {
            id: ID(row.id),
            pack_id: row.pack_id,
            credits: row.credits,
            amount_cents: row.amount_cents,
            gst_cents: row.gst_cents,
            status: row.status,
            origin: row.origin,
            created_at: row.created_at,
        }
    }
}

/// The result of `purchaseCredits`.
#[derive(SimpleObject)]
pub struct PurchaseCreditsPayload {
    /// The purchase.
    pub purchase: Purchase,
    /// The practitioner's balance right after it.
    pub balance: i64,
}

/// The result of `transferCredits`.
#[derive(SimpleObject)]
pub struct TransferCreditsPayload {
    /// The transfer's id (both ledger entries reference it).
    pub transfer_id: ID,
    /// Credits moved.
    pub credits: i64,
    /// The sender's balance after.
    pub from_balance: i64,
    /// The receiver's balance after.
    pub to_balance: i64,
}

/// A practitioner of the practice.
#[derive(SimpleObject)]
pub struct Practitioner {
    /// Their id (the token's `sub`); pass as `practitionerId`.
    pub id: ID,
    /// Display name.
    pub name: String,
    /// Credits; shown to administrators and to the practitioner themself, else null.
    pub balance: Option<i64>,
}

/// Auto top-up settings and state.
#[derive(SimpleObject)]
pub struct AutoTopUp {
    /// Whether it is on.
    pub enabled: bool,
    /// A debit that leaves fewer credits than this buys `pack`.
    pub threshold_credits: i64,
    /// The pack it buys.
    pub pack: Option<CreditPack>,
    /// Why the last top-up failed (cleared by the next success).
    pub last_failure: Option<String>,
    /// When it failed.
    pub last_failure_at: Option<DateTime<Utc>>,
    /// Declined top-ups in a row.
    pub consecutive_failures: i32,
    /// Why auto top-up switched itself off, if it did.
    pub disabled_reason: Option<String>,
}

/// One ledger entry.
#[derive(SimpleObject)]
pub struct LedgerEntry {
    /// Entry id.
    pub id: ID,
    /// `PURCHASE`, `SEND_DEBIT`, `REFUND`, `TRANSFER_IN`, `TRANSFER_OUT` or `ADJUSTMENT`.
    pub kind: String,
    /// Signed change in credits.
    pub credits: i64,
    /// Balance after this entry.
    pub balance_after: i64,
    /// What caused it (purchase, transfer or message id).
    pub reference: String,
    /// When.
    pub created_at: DateTime<Utc>,
}

/// A page of ledger entries (Relay cursor connection).
#[derive(SimpleObject)]
pub struct LedgerConnection {
    /// Entries on this page with cursors.
    pub edges: Vec<LedgerEdge>,
    /// Where this page sits.
    pub page_info: PageInfo,
}

/// A ledger entry and its cursor.
#[derive(SimpleObject)]
pub struct LedgerEdge {
    /// Pass as `after` to continue.
    pub cursor: String,
    /// The entry.
    pub node: LedgerEntry,
}

/// A practitioner's credits.
pub struct Credits(CreditsView);

/// A practitioner's credits: balance, auto top-up and ledger.
#[Object]
impl Credits {
    /// Whose credits these are (the practitioner's id).
    async fn practitioner_id(&self) -> ID {
        ID(self.0.practitioner.subject.clone())
    }

    /// Credits available now.
    async fn balance(&self) -> i64 {
        self.0.wallet.balance
    }

    /// This practitioner's monthly spending cap and what is left of it.
    async fn spending_cap(&self, ctx: &Context<'_>) -> Result<SpendingCap, ApiError> {
        let principal = principal(ctx)?;
        let (practitioner, _) = services(ctx)
            .credits
            .spending_caps(&principal.group_id, &self.0.practitioner.user_id)
            .await?;
        Ok(practitioner.into())
    }

    /// The practice's monthly spending cap (all practitioners together) and what is left of it.
    async fn practice_spending_cap(&self, ctx: &Context<'_>) -> Result<SpendingCap, ApiError> {
        let principal = principal(ctx)?;
        let (_, practice) = services(ctx)
            .credits
            .spending_caps(&principal.group_id, &self.0.practitioner.user_id)
            .await?;
        Ok(practice.into())
    }

    /// Auto top-up settings and state.
    async fn auto_top_up(&self) -> AutoTopUp {
        let wallet = &self.0.wallet;
        AutoTopUp {
            enabled: wallet.auto_top_up_enabled,
            threshold_credits: wallet.threshold_credits,
            pack: self.0.top_up_pack.as_ref().map(CreditPack::from),
            last_failure: wallet.last_top_up_failure.clone(),
            last_failure_at: wallet.last_top_up_failure_at,
            consecutive_failures: wallet.top_up_failures,
            disabled_reason: wallet.auto_top_up_disabled_reason.clone(),
        }
    }

    /// Every change to the balance, newest first.
    #[graphql(complexity = "first.unwrap_or(20).clamp(1, 100) as usize * child_complexity + 1")]
    async fn ledger(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "How many entries (1–100, default 20).")] first: Option<i32>,
        #[graphql(desc = "Continue after this cursor (`pageInfo.endCursor`).")] after: Option<
            String,
        >,
    ) -> Result<LedgerConnection, ApiError> {
        let first = first.unwrap_or(20);
        if !(1..=100).contains(&first) {
            return Err(ApiError::bad_input("first must be between 1 and 100"));
        }
        let rows = services(ctx)
            .credits
            .ledger(
                &self.0.practitioner.user_id,
                after.as_deref(),
                first as u64 + 1,
            )
            .await?;
        let has_next_page = rows.len() > first as usize;
        let edges: Vec<LedgerEdge> = rows
            .into_iter()
            .take(first as usize)
            .map(|row| LedgerEdge {
                cursor: row.id.clone(),
                node: LedgerEntry {
                    id: ID(row.id),
                    kind: row.kind,
                    credits: row.credits,
                    balance_after: row.balance_after,
                    reference: row.reference,
                    created_at: row.created_at,
                },
            })
            .collect();
        let page_info = PageInfo {
            has_next_page,
            has_previous_page: after.is_some(),
            start_cursor: edges.first().map(|edge| edge.cursor.clone()),
            end_cursor: edges.last().map(|edge| edge.cursor.clone()),
        };
        Ok(LedgerConnection { edges, page_info })
    }
}

/// Sets the practice's card.
#[derive(InputObject)]
pub struct SetPaymentMethodInput {
    /// A payment-method token from the payment gateway, `pm_` and 1–64 letters, digits or `_`
    /// (the sandbox's cards are `pm_sandbox_approve`, `pm_sandbox_decline` and
    /// `pm_sandbox_flaky`). Stored encrypted; only a masked form is shown.
    pub token: String,
}

/// Buys a pack.
#[derive(InputObject)]
pub struct PurchaseCreditsInput {
    /// The pack (see `creditPacks`).
    pub pack_id: ID,
    /// A fresh key per purchase (a UUID); retrying with the same key never charges twice.
    pub idempotency_key: String,
    /// Whose wallet: omit (or your own id) as a practitioner; required for administrators.
    pub practitioner_id: Option<ID>,
}

/// Moves credits.
#[derive(InputObject)]
pub struct TransferCreditsInput {
    /// From whom (practitioners: only themself).
    pub from_practitioner_id: ID,
    /// To whom (a practitioner of the same practice).
    pub to_practitioner_id: ID,
    /// How many (1–1000000).
    pub credits: i64,
    /// A fresh key per transfer; retrying with the same key never moves credits twice.
    pub idempotency_key: String,
}

/// Auto top-up settings.
#[derive(InputObject)]
pub struct SetAutoTopUpInput {
    /// Switch it on or off.
    pub enabled: bool,
    /// Top up when a debit leaves fewer credits than this (default 10).
    pub threshold_credits: Option<i64>,
    /// The pack to buy (default: the smallest).
    pub pack_id: Option<ID>,
    /// Whose wallet: omit as a practitioner; required for administrators.
    pub practitioner_id: Option<ID>,
}

fn key(raw: &str) -> Result<IdempotencyKey, ApiError> {
    IdempotencyKey::parse(raw)
        .map_err(|problem| ApiError::bad_input(format!("idempotencyKey: {problem}")))
}

#[derive(Default)]
pub struct CreditsQuery;

#[Object]
impl CreditsQuery {
    /// The packs on offer, smallest first.
    async fn credit_packs(&self, ctx: &Context<'_>) -> Result<Vec<CreditPack>, ApiError> {
        principal(ctx)?;
        Ok(services(ctx)
            .credits
            .catalogue()
            .packs()
            .iter()
            .map(CreditPack::from)
            .collect())
    }

    /// A practitioner's credits: your own as a practitioner; any of the practice's as an
    /// administrator (then `practitionerId` is required).
    async fn credits(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "Whose credits; omit for your own.")] practitioner_id: Option<ID>,
    ) -> Result<Credits, ApiError> {
        let principal = principal(ctx)?;
        let view = services(ctx)
            .credits
            .credits(principal, practitioner_id.as_ref().map(|id| id.as_str()))
            .await?;
        Ok(Credits(view))
    }

    /// The practice's monthly spending cap (all practitioners together) and what is left of
    /// it this month; anyone of the practice may see it.
    async fn practice_spending_cap(&self, ctx: &Context<'_>) -> Result<SpendingCap, ApiError> {
        let principal = principal(ctx)?;
        let (_, practice) = services(ctx)
            .credits
            .spending_caps(&principal.group_id, &principal.user_id)
            .await?;
        Ok(practice.into())
    }

    /// The practice's practitioners (balances for administrators, and your own).
    async fn practitioners(&self, ctx: &Context<'_>) -> Result<Vec<Practitioner>, ApiError> {
        let principal = principal(ctx)?;
        let rows = services(ctx).credits.practitioners(principal).await?;
        Ok(rows
            .into_iter()
            .map(|(row, may_see)| Practitioner {
                id: ID(row.subject),
                name: row.name,
                balance: may_see.then_some(row.balance),
            })
            .collect())
    }

    /// The practice's card, masked (null until one is set).
    async fn payment_method(&self, ctx: &Context<'_>) -> Result<Option<PaymentMethod>, ApiError> {
        let principal = principal(ctx)?;
        Ok(services(ctx)
            .credits
            .payment_method(principal)
            .await?
            .map(PaymentMethod::from))
    }
}

#[derive(Default)]
pub struct CreditsMutation;

#[Object]
impl CreditsMutation {
    /// Sets the practice's card after checking the token with the payment gateway.
    /// Administrators set or replace it; a practitioner may set the first card only (when the
    /// practice has none) — replacing it is `FORBIDDEN` for them. A malformed token is
    /// `BAD_USER_INPUT` before the payment gateway is asked.
    async fn set_payment_method(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The payment-method token.")] input: SetPaymentMethodInput,
    ) -> Result<PaymentMethod, ApiError> {
        let principal = principal(ctx)?;
        let token = PaymentToken::parse(&input.token)
            .map_err(|problem| ApiError::bad_input(format!("token: {problem}")))?;
        Ok(services(ctx)
            .credits
            .set_payment_method(principal, token)
            .await?
            .into())
    }

    /// Removes the practice's card and returns it, masked (administrators only; others get
    /// `FORBIDDEN`, and `NOT_FOUND` when there is no card). Purchases then need a new card;
    /// auto top-ups decline until one is set.
    async fn remove_payment_method(&self, ctx: &Context<'_>) -> Result<PaymentMethod, ApiError> {
        let principal = principal(ctx)?;
        Ok(services(ctx)
            .credits
            .remove_payment_method(principal)
            .await?
            .into())
    }

    /// Buys a pack with the practice's card. Exactly once per idempotency key: a retry returns
    /// the first result; declined → `PAYMENT_DECLINED` and no credits.
    async fn purchase_credits(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "What to buy, for whom, and the idempotency key.")]
        input: PurchaseCreditsInput,
    ) -> Result<PurchaseCreditsPayload, ApiError> {
        let principal = principal(ctx)?;
        let key = key(&input.idempotency_key)?;
        let result = services(ctx)
            .credits
            .purchase(
                principal,
                &input.pack_id,
                key,
                input.practitioner_id.as_ref().map(|id| id.as_str()),
            )
            .await?;
        Ok(PurchaseCreditsPayload {
            purchase: result.purchase.into(),
            balance: result.balance,
        })
    }

    /// Moves credits between two practitioners of the practice (both ledger entries at once).
    async fn transfer_credits(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "From, to, how many, and the idempotency key.")]
        input: TransferCreditsInput,
    ) -> Result<TransferCreditsPayload, ApiError> {
        let principal = principal(ctx)?;
        let credits = CreditAmount::parse(input.credits)
            .map_err(|problem| ApiError::bad_input(format!("credits: {problem}")))?;
        let key = key(&input.idempotency_key)?;
        let result = services(ctx)
            .credits
            .transfer(
                principal,
                &input.from_practitioner_id,
                &input.to_practitioner_id,
                credits,
                key,
            )
            .await?;
        Ok(TransferCreditsPayload {
            transfer_id: ID(result.transfer_id),
            credits: result.credits,
            from_balance: result.from_balance,
            to_balance: result.to_balance,
        })
    }

    /// Sets or removes a monthly spending cap, in cents: a practitioner's (`practitionerId`) or
    /// the practice's. Administrators only (others get `FORBIDDEN`, audited). Purchases that
    /// would pass a cap are then `SPENDING_LIMIT_REACHED`; lowering a cap below what the month
    /// has spent refuses further purchases until the next month.
    async fn set_spending_cap(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "Whose cap and how much.")] input: SetSpendingCapInput,
    ) -> Result<SpendingCap, ApiError> {
        let principal = principal(ctx)?;
        Ok(services(ctx)
            .credits
            .set_spending_cap(
                principal,
                input.practitioner_id.as_ref().map(|id| id.as_str()),
                input.monthly_limit_cents,
            )
            .await?
            .into())
    }

    /// Configures auto top-up for a practitioner.
    async fn set_auto_top_up(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The settings.")] input: SetAutoTopUpInput,
    ) -> Result<Credits, ApiError> {
        let principal = principal(ctx)?;
        let view = services(ctx)
            .credits
            .set_auto_top_up(
                principal,
                input.practitioner_id.as_ref().map(|id| id.as_str()),
                input.enabled,
                input.threshold_credits,
                input.pack_id.as_ref().map(|id| id.as_str()),
            )
            .await?;
        Ok(Credits(view))
    }
}
