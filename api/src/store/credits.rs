//! Wallets, the append-only ledger, purchases, payment methods and idempotency keys.
//!
//! Every balance change is one conditional `UPDATE wallets SET balance = balance ± n` plus one
//! ledger row carrying the balance after it, in the same write transaction. The database's
//! CHECK constraints refuse a negative balance even if code were wrong; the conditional update
//! (`… AND balance >= n`) makes a short balance a normal outcome rather than an error.
//!
//! Monthly spending caps are decided in the write transaction that records the purchase: it
//! locks the practice's `groups` row (`SELECT … FOR UPDATE` on PostgreSQL; SQLite's
//! `BEGIN IMMEDIATE` already serialises writers), then sums the month's pending and succeeded
//! purchases and compares. Every purchase of a practice takes that one lock, so concurrent
//! purchases are counted one after another and can never jointly pass a cap. Lock order: a
//! send's debit holds its wallet row before it may take the group row for an auto top-up, and
//! a purchase touches its wallet (`ensure_wallet`) before the group row, so the order is the
//! same everywhere.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect,
};

use super::entities::{
    groups, idempotency_keys, ledger_entries, payment_methods, purchases, spending_caps, users,
    wallets,
};
use super::{Store, StoreError, Transaction, from_millis, new_id, to_millis};
use crate::domain::audit::AuditEntry;
use crate::domain::types::Role;

/// The practice's stored card (the token sealed; only the masked form is ever shown).
#[derive(Debug, Clone)]
pub struct PaymentMethodRow {
    /// The payment gateway token, sealed by the data-encryption key.
    pub token_ciphertext: String,
    /// Card brand.
    pub brand: String,
    /// Last four digits.
    pub last4: String,
    /// Expiry month.
    pub exp_month: i32,
    /// Expiry year.
    pub exp_year: i32,
    /// When it was set.
    pub updated_at: DateTime<Utc>,
}

/// How a new card may be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CardWrite {
    /// Only if the practice has no card yet (a practitioner's first card).
    FirstOnly,
    /// Insert, or replace the card there is (administrators).
    Replace,
}

/// What [`Store::set_payment_method`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CardWritten {
    /// The card is stored.
    Stored,
    /// `FirstOnly`, and the practice already had a card: nothing changed.
    AlreadySet,
}

fn payment_method_from_model(model: payment_methods::Model) -> PaymentMethodRow {
    PaymentMethodRow {
        token_ciphertext: model.token_ciphertext,
        brand: model.brand,
        last4: model.last4,
        exp_month: model.exp_month,
        exp_year: model.exp_year,
        updated_at: from_millis(model.updated_at),
    }
}

/// A practitioner's wallet.
#[derive(Debug, Clone)]
pub struct WalletRow {
    /// The practitioner (internal user id).
    pub user_id: String,
    /// Credits available.
    pub balance: i64,
    /// Auto top-up switched on.
    pub auto_top_up_enabled: bool,
    /// Top up when a debit leaves the balance below this.
    pub threshold_credits: i64,
    /// The pack auto top-up buys.
    pub top_up_pack_id: Option<String>,
    /// A top-up purchase is under way.
    pub top_up_pending: bool,
    /// Consecutive declined top-ups.
    pub top_up_failures: i32,
    /// Why the last top-up failed.
    pub last_top_up_failure: Option<String>,
    /// When it failed.
    pub last_top_up_failure_at: Option<DateTime<Utc>>,
    /// Why auto top-up switched itself off.
    pub auto_top_up_disabled_reason: Option<String>,
}

/// One ledger entry.
#[derive(Debug, Clone)]
pub struct LedgerRow {
    /// Time-ordered id (the cursor).
    pub id: String,
    /// `PURCHASE`, `SEND_DEBIT`, `REFUND`, `TRANSFER_IN`, `TRANSFER_OUT`, `ADJUSTMENT`.
    pub kind: String,
    /// Signed change.
    pub credits: i64,
    /// Balance after the change.
    pub balance_after: i64,
    /// What caused it (purchase id, transfer id, message id).
    pub reference: String,
    /// When.
    pub created_at: DateTime<Utc>,
}

/// A purchase of credits.
#[derive(Debug, Clone)]
pub struct PurchaseRow {
    /// Id (also the payment gateway's idempotency key for its charge).
    pub id: String,
    /// The group.
    pub group_id: String,
    /// The practitioner whose wallet receives the credits.
    pub user_id: String,
    /// The pack bought.
    pub pack_id: String,
    /// Credits bought.
    pub credits: i64,
    /// Total charged, cents.
    pub amount_cents: i64,
    /// GST within it, cents.
    pub gst_cents: i64,
    /// `PENDING`, `SUCCEEDED`, `DECLINED`.
    pub status: String,
    /// `MANUAL`, `AUTO_TOP_UP`, `BUY_AT_SEND`.
    pub origin: String,
    /// The payment gateway's charge id.
    pub charge_id: Option<String>,
    /// Why it failed.
    pub failure_code: Option<String>,
    /// Who asked for it (`None` for automatic top-ups).
    pub requested_by_user_id: Option<String>,
    /// Their `sub`, for the audit trail.
    pub requested_by_subject: Option<String>,
    /// The client's idempotency key, completed when the purchase finishes (even by recovery).
    pub idempotency_key: Option<String>,
    /// The sealed card token this purchase charges (fixed when it is created, so replacing
    /// the practice's card never changes a charge already under way).
    pub token_ciphertext: Option<String>,
    /// Charge attempts so far.
    pub attempts: i32,
    /// When the recovery worker may drive it next.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
}

/// A practitioner of the group with their balance.
#[derive(Debug, Clone)]
pub struct PractitionerRow {
    /// Internal id.
    pub user_id: String,
    /// The token's `sub` (the API's practitioner id).
    pub subject: String,
    /// Display name.
    pub name: String,
    /// Credits (0 without a wallet).
    pub balance: i64,
}

/// What an idempotency key says about a request.
#[derive(Debug, Clone)]
pub enum KeyClaim {
    /// First use: go ahead.
    Fresh,
    /// Done before with the same input: replay this stored response.
    Completed(String),
    /// A request with this key is running right now.
    InProgress,
    /// Used before with different input.
    Mismatch,
}

/// An idempotency key and what it guards.
#[derive(Debug, Clone)]
pub struct KeyRequest<'a> {
    /// Keys are scoped to the group.
    pub group_id: &'a str,
    /// The client's key.
    pub key: &'a str,
    /// The operation (`purchaseCredits`, `transferCredits`, …).
    pub operation: &'a str,
    /// The request's input, canonically written: the same key with another input is a conflict.
    pub fingerprint: &'a str,
    /// How long the key is remembered.
    pub keep_until: DateTime<Utc>,
}

/// The value of `spending_caps.scope` for the practice's own cap. User ids are UUIDs, so it
/// never names a practitioner.
const PRACTICE_SCOPE: &str = "practice";

/// Whose monthly spending a cap limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapScope {
    /// One practitioner's purchases (for their wallet, whoever asked).
    Practitioner,
    /// Every purchase of the practice.
    Practice,
}

/// A cap a purchase would have passed. Nothing was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapBreach {
    /// Which cap.
    pub scope: CapScope,
    /// The cap, cents a month.
    pub limit_cents: i64,
    /// Pending and succeeded purchases since the period started, cents.
    pub spent_cents: i64,
    /// What the refused purchase would have cost, cents.
    pub attempted_cents: i64,
}

/// One cap and what its month has spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapStanding {
    /// The cap, cents a month (`None`: no cap).
    pub limit_cents: Option<i64>,
    /// Pending and succeeded purchases since the period started, cents.
    pub spent_cents: i64,
}

/// What [`Store::start_purchase`] did.
#[derive(Debug, Clone)]
pub enum PurchaseStart {
    /// The key claim (the purchase is stored only when it is fresh).
    Claimed(KeyClaim),
    /// A spending cap refused it: nothing stored, the key not used up.
    OverCap(CapBreach),
}

/// The result of a balance change. (It lives for one call, so the size of the top-up purchase
/// in one variant does not matter.)
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
pub enum DebitOutcome {
    /// Done; the new balance, and a top-up purchase the debit triggered (or the cap that
    /// refused the one it would have triggered).
    Debited {
        balance_after: i64,
        top_up: Option<PurchaseRow>,
        refused_top_up: Option<CapBreach>,
    },
    /// Not enough credits; nothing changed.
    Insufficient { balance: i64 },
}

impl Store {
    /// The group's payment method.
    pub async fn payment_method(
        &self,
        group_id: &str,
    ) -> Result<Option<PaymentMethodRow>, StoreError> {
        Ok(payment_methods::Entity::find_by_id(group_id.to_owned())
            .one(self.connection())
            .await?
            .map(payment_method_from_model))
    }

    /// Stores the group's payment method with its audit entry, in one write transaction.
    /// With [`CardWrite::FirstOnly`] it is a conditional insert (`ON CONFLICT DO NOTHING`):
    /// of any number of concurrent first cards exactly one is stored, and the others report
    /// [`CardWritten::AlreadySet`] with nothing changed and no audit entry written.
    pub async fn set_payment_method(
        &self,
        group_id: &str,
        user_id: &str,
        method: &PaymentMethodRow,
        rule: CardWrite,
        audit: &AuditEntry,
    ) -> Result<CardWritten, StoreError> {
        let txn = self.begin_write().await?;
        let mut conflict = OnConflict::column(payment_methods::Column::GroupId);
        let conflict = match rule {
            CardWrite::FirstOnly => conflict.do_nothing().to_owned(),
            CardWrite::Replace => conflict
                .update_columns([
                    payment_methods::Column::TokenCiphertext,
                    payment_methods::Column::Brand,
                    payment_methods::Column::Last4,
                    payment_methods::Column::ExpMonth,
                    payment_methods::Column::ExpYear,
                    payment_methods::Column::UpdatedByUserId,
                    payment_methods::Column::UpdatedAt,
                ])
                .to_owned(),
        };
        let written = payment_methods::Entity::insert(payment_methods::ActiveModel {
            group_id: Set(group_id.to_owned()),
            token_ciphertext: Set(method.token_ciphertext.clone()),
            brand: Set(method.brand.clone()),
            last4: Set(method.last4.clone()),
            exp_month: Set(method.exp_month),
            exp_year: Set(method.exp_year),
            updated_by_user_id: Set(user_id.to_owned()),
            updated_at: Set(to_millis(method.updated_at)),
        })
        .on_conflict(conflict)
        .exec_without_returning(&txn)
        .await?;
        if written == 0 {
            txn.rollback().await?;
            return Ok(CardWritten::AlreadySet);
        }
        self.insert_audit_in(&txn, audit).await?;
        txn.commit().await?;
        Ok(CardWritten::Stored)
    }

    /// Removes the group's payment method with its audit entry. Returns the removed card, or
    /// `None` (and writes nothing) when there was none.
    pub async fn remove_payment_method(
        &self,
        group_id: &str,
        audit: &AuditEntry,
    ) -> Result<Option<PaymentMethodRow>, StoreError> {
        let txn = self.begin_write().await?;
        let Some(model) = payment_methods::Entity::find_by_id(group_id.to_owned())
            .one(&txn)
            .await?
        else {
            txn.rollback().await?;
            return Ok(None);
        };
        payment_methods::Entity::delete_by_id(group_id.to_owned())
            .exec(&txn)
            .await?;
        self.insert_audit_in(&txn, audit).await?;
        txn.commit().await?;
        Ok(Some(payment_method_from_model(model)))
    }

    /// A practitioner of the group by their `sub`.
    pub async fn find_practitioner(
        &self,
        group_id: &str,
        subject: &str,
    ) -> Result<Option<PractitionerRow>, StoreError> {
        let Some(person) = users::Entity::find()
            .filter(users::Column::GroupId.eq(group_id))
            .filter(users::Column::Subject.eq(subject))
            .filter(users::Column::Role.eq(Role::Practitioner.code()))
            .one(self.connection())
            .await?
        else {
            return Ok(None);
        };
        let balance = self.wallet(&person.id).await?.balance;
        Ok(Some(PractitionerRow {
            user_id: person.id,
            subject: person.subject,
            name: person.name,
            balance,
        }))
    }

    /// The group's practitioners with their balances, by name.
    pub async fn list_practitioners(
        &self,
        group_id: &str,
    ) -> Result<Vec<PractitionerRow>, StoreError> {
        let people = users::Entity::find()
            .filter(users::Column::GroupId.eq(group_id))
            .filter(users::Column::Role.eq(Role::Practitioner.code()))
            .order_by_asc(users::Column::Name)
            .all(self.connection())
            .await?;
        let balances = wallets::Entity::find()
            .filter(wallets::Column::GroupId.eq(group_id))
            .all(self.connection())
            .await?;
        Ok(people
            .into_iter()
            .map(|person| PractitionerRow {
                balance: balances
                    .iter()
                    .find(|wallet| wallet.user_id == person.id)
                    .map_or(0, |wallet| wallet.balance),
                user_id: person.id,
                subject: person.subject,
                name: person.name,
            })
            .collect())
    }

    /// A practitioner's wallet (an empty one if they never had credits).
    pub async fn wallet(&self, user_id: &str) -> Result<WalletRow, StoreError> {
        Ok(wallets::Entity::find_by_id(user_id.to_owned())
            .one(self.connection())
            .await?
            .map_or_else(|| empty_wallet(user_id), wallet_from_model))
    }

    /// Claims an idempotency key inside `txn`. On PostgreSQL a concurrent claim of the same
    /// key waits here for the first transaction and then sees its row.
    pub(crate) async fn claim_key(
        &self,
        txn: &Transaction,
        request: &KeyRequest<'_>,
    ) -> Result<KeyClaim, StoreError> {
        let now = Utc::now();
        // A key past its retention is forgotten (the client may reuse it).
        idempotency_keys::Entity::delete_many()
            .filter(idempotency_keys::Column::GroupId.eq(request.group_id))
            .filter(idempotency_keys::Column::Key.eq(request.key))
            .filter(idempotency_keys::Column::ExpiresAt.lt(to_millis(now)))
            .exec(&txn.0)
            .await?;
        let inserted = idempotency_keys::Entity::insert(idempotency_keys::ActiveModel {
            group_id: Set(request.group_id.to_owned()),
            key: Set(request.key.to_owned()),
            operation: Set(request.operation.to_owned()),
            fingerprint: Set(request.fingerprint.to_owned()),
            state: Set("IN_PROGRESS".to_owned()),
            response: Set(None),
            created_at: Set(to_millis(now)),
            expires_at: Set(to_millis(request.keep_until)),
        })
        .on_conflict(
            OnConflict::columns([
                idempotency_keys::Column::GroupId,
                idempotency_keys::Column::Key,
            ])
            .do_nothing()
            .to_owned(),
        )
        .exec_without_returning(&txn.0)
        .await?;
        if inserted == 1 {
            return Ok(KeyClaim::Fresh);
        }
        let existing = idempotency_keys::Entity::find_by_id((
            request.group_id.to_owned(),
            request.key.to_owned(),
        ))
        .one(&txn.0)
        .await?
        .ok_or_else(|| StoreError::Corrupt {
            table: "idempotency_keys",
            problem: "key vanished".into(),
        })?;
        if existing.operation != request.operation || existing.fingerprint != request.fingerprint {
            return Ok(KeyClaim::Mismatch);
        }
        Ok(match existing.response {
            Some(response) if existing.state == "COMPLETED" => KeyClaim::Completed(response),
            _ => KeyClaim::InProgress,
        })
    }

    /// Looks at a key without claiming it (for waiting on a request in progress).
    pub async fn peek_key(&self, request: &KeyRequest<'_>) -> Result<KeyClaim, StoreError> {
        let existing = idempotency_keys::Entity::find_by_id((
            request.group_id.to_owned(),
            request.key.to_owned(),
        ))
        .one(self.connection())
        .await?;
        Ok(match existing {
            None => KeyClaim::Fresh,
            Some(row)
                if row.operation != request.operation || row.fingerprint != request.fingerprint =>
            {
                KeyClaim::Mismatch
            }
            Some(row) => match row.response {
                Some(response) if row.state == "COMPLETED" => KeyClaim::Completed(response),
                _ => KeyClaim::InProgress,
            },
        })
    }

    pub(crate) async fn complete_key(
        &self,
        connection: &impl ConnectionTrait,
        group_id: &str,
        key: &str,
        response: &str,
    ) -> Result<(), StoreError> {
        idempotency_keys::Entity::update_many()
            .col_expr(idempotency_keys::Column::State, Expr::value("COMPLETED"))
            .col_expr(idempotency_keys::Column::Response, Expr::value(response))
            .filter(idempotency_keys::Column::GroupId.eq(group_id))
            .filter(idempotency_keys::Column::Key.eq(key))
            .exec(connection)
            .await?;
        Ok(())
    }

    /// Records a new pending purchase, claiming its idempotency key in the same transaction,
    /// if it passes no spending cap for the period starting `period_start`. Returns the claim
    /// (the purchase is stored only when it is fresh), or the cap that refused it (then nothing
    /// is stored and the key stays free for a retry once the cap allows it).
    pub async fn start_purchase(
        &self,
        key: Option<&KeyRequest<'_>>,
        purchase: &PurchaseRow,
        period_start: DateTime<Utc>,
    ) -> Result<PurchaseStart, StoreError> {
        let txn = Transaction(self.begin_write().await?);
        if let Some(key) = key {
            let claim = self.claim_key(&txn, key).await?;
            if !matches!(claim, KeyClaim::Fresh) {
                txn.rollback().await?;
                return Ok(PurchaseStart::Claimed(claim));
            }
        }
        ensure_wallet(&txn.0, &purchase.user_id, &purchase.group_id).await?;
        if let Some(breach) = check_caps(
            &txn.0,
            &purchase.group_id,
            &purchase.user_id,
            purchase.amount_cents,
            period_start,
        )
        .await?
        {
            txn.rollback().await?;
            return Ok(PurchaseStart::OverCap(breach));
        }
        insert_purchase(&txn.0, purchase).await?;
        txn.commit().await?;
        Ok(PurchaseStart::Claimed(KeyClaim::Fresh))
    }

    /// Sets (or, with `None`, removes) a monthly cap in cents, for a practitioner
    /// (`Some(user_id)`) or the practice, with its audit event.
    pub async fn set_spending_cap(
        &self,
        group_id: &str,
        practitioner_user_id: Option<&str>,
        monthly_limit_cents: Option<i64>,
        updated_by_user_id: &str,
        audit: &AuditEntry,
    ) -> Result<(), StoreError> {
        let scope = practitioner_user_id.unwrap_or(PRACTICE_SCOPE);
        let txn = self.begin_write().await?;
        match monthly_limit_cents {
            Some(limit) => {
                spending_caps::Entity::insert(spending_caps::ActiveModel {
                    group_id: Set(group_id.to_owned()),
                    scope: Set(scope.to_owned()),
                    monthly_limit_cents: Set(limit),
                    updated_by_user_id: Set(updated_by_user_id.to_owned()),
                    updated_at: Set(to_millis(Utc::now())),
                })
                .on_conflict(
                    OnConflict::columns([
                        spending_caps::Column::GroupId,
                        spending_caps::Column::Scope,
                    ])
                    .update_columns([
                        spending_caps::Column::MonthlyLimitCents,
                        spending_caps::Column::UpdatedByUserId,
                        spending_caps::Column::UpdatedAt,
                    ])
                    .to_owned(),
                )
                .exec_without_returning(&txn)
                .await?;
            }
            None => {
                spending_caps::Entity::delete_many()
                    .filter(spending_caps::Column::GroupId.eq(group_id))
                    .filter(spending_caps::Column::Scope.eq(scope))
                    .exec(&txn)
                    .await?;
            }
        }
        self.insert_audit_in(&txn, audit).await?;
        txn.commit().await?;
        Ok(())
    }

    /// A practitioner's cap and the practice's, each with what it has spent since
    /// `period_start`.
    pub async fn spending_standing(
        &self,
        group_id: &str,
        user_id: &str,
        period_start: DateTime<Utc>,
    ) -> Result<(CapStanding, CapStanding), StoreError> {
        let (practitioner_limit, practice_limit) =
            cap_limits(self.connection(), group_id, user_id).await?;
        let practitioner = CapStanding {
            limit_cents: practitioner_limit,
            spent_cents: spent_since(self.connection(), group_id, Some(user_id), period_start)
                .await?,
        };
        let practice = CapStanding {
            limit_cents: practice_limit,
            spent_cents: spent_since(self.connection(), group_id, None, period_start).await?,
        };
        Ok((practitioner, practice))
    }

    /// Records that auto top-up was refused by a spending cap (shown as the last failure; it
    /// does not count towards switching auto top-up off), with its audit event.
    pub async fn note_top_up_refused(
        &self,
        user_id: &str,
        message: &str,
        audit: &AuditEntry,
    ) -> Result<(), StoreError> {
        let now = to_millis(Utc::now());
        let txn = self.begin_write().await?;
        wallets::Entity::update_many()
            .col_expr(wallets::Column::LastTopUpFailure, Expr::value(message))
            .col_expr(wallets::Column::LastTopUpFailureAt, Expr::value(now))
            .filter(wallets::Column::UserId.eq(user_id))
            .exec(&txn)
            .await?;
        self.insert_audit_in(&txn, audit).await?;
        txn.commit().await?;
        Ok(())
    }

    /// A purchase by id.
    pub async fn purchase(&self, purchase_id: &str) -> Result<Option<PurchaseRow>, StoreError> {
        Ok(purchases::Entity::find_by_id(purchase_id.to_owned())
            .one(self.connection())
            .await?
            .map(purchase_from_model))
    }

    /// Marks a pending purchase paid and credits the wallet, in one transaction. Returns the
    /// balance after, or `None` if the purchase was no longer pending (already completed by
    /// another worker: the credits were added exactly once).
    pub async fn complete_purchase(
        &self,
        purchase: &PurchaseRow,
        charge_id: &str,
        audit: &AuditEntry,
    ) -> Result<Option<i64>, StoreError> {
        let now = to_millis(Utc::now());
        let txn = self.begin_write().await?;
        let updated = purchases::Entity::update_many()
            .col_expr(purchases::Column::Status, Expr::value("SUCCEEDED"))
            .col_expr(purchases::Column::ChargeId, Expr::value(charge_id))
            .col_expr(purchases::Column::CompletedAt, Expr::value(now))
            .col_expr(
                purchases::Column::NextAttemptAt,
                Expr::value(Option::<i64>::None),
            )
            .filter(purchases::Column::Id.eq(purchase.id.as_str()))
            .filter(purchases::Column::Status.eq("PENDING"))
            .exec(&txn)
            .await?
            .rows_affected;
        if updated != 1 {
            txn.rollback().await?;
            return Ok(None);
        }
        let mut wallet_update = wallets::Entity::update_many()
            .col_expr(
                wallets::Column::Balance,
                Expr::col(wallets::Column::Balance).add(purchase.credits),
            )
            .col_expr(wallets::Column::UpdatedAt, Expr::value(now));
        if purchase.origin == "AUTO_TOP_UP" {
            wallet_update = wallet_update
                .col_expr(wallets::Column::TopUpPending, Expr::value(false))
                .col_expr(wallets::Column::TopUpFailures, Expr::value(0))
                .col_expr(
                    wallets::Column::LastTopUpFailure,
                    Expr::value(Option::<String>::None),
                )
                .col_expr(
                    wallets::Column::LastTopUpFailureAt,
                    Expr::value(Option::<i64>::None),
                );
        }
        wallet_update
            .filter(wallets::Column::UserId.eq(purchase.user_id.as_str()))
            .exec(&txn)
            .await?;
        let balance_after = current_balance(&txn, &purchase.user_id).await?;
        insert_ledger(
            &txn,
            &purchase.group_id,
            &purchase.user_id,
            "PURCHASE",
            purchase.credits,
            balance_after,
            &purchase.id,
        )
        .await?;
        if let Some(key) = &purchase.idempotency_key {
            let response =
                serde_json::json!({"purchaseId": purchase.id, "balanceAfter": balance_after})
                    .to_string();
            self.complete_key(&txn, &purchase.group_id, key, &response)
                .await?;
        }
        self.insert_audit_in(&txn, audit).await?;
        txn.commit().await?;
        Ok(Some(balance_after))
    }

    /// Marks a pending purchase declined. For an automatic top-up it also counts the failure
    /// and, after `disable_after` consecutive declines, switches auto top-up off with a reason.
    pub async fn decline_purchase(
        &self,
        purchase: &PurchaseRow,
        code: &str,
        charge_id: Option<&str>,
        failure_message: &str,
        disable_after: i32,
        audit: &AuditEntry,
    ) -> Result<bool, StoreError> {
        let now = to_millis(Utc::now());
        let txn = self.begin_write().await?;
        let updated = purchases::Entity::update_many()
            .col_expr(purchases::Column::Status, Expr::value("DECLINED"))
            .col_expr(purchases::Column::FailureCode, Expr::value(code))
            .col_expr(
                purchases::Column::ChargeId,
                Expr::value(charge_id.map(str::to_owned)),
            )
            .col_expr(purchases::Column::CompletedAt, Expr::value(now))
            .col_expr(
                purchases::Column::NextAttemptAt,
                Expr::value(Option::<i64>::None),
            )
            .filter(purchases::Column::Id.eq(purchase.id.as_str()))
            .filter(purchases::Column::Status.eq("PENDING"))
            .exec(&txn)
            .await?
            .rows_affected;
        if updated != 1 {
            txn.rollback().await?;
            return Ok(false);
        }
        if purchase.origin == "AUTO_TOP_UP" {
            wallets::Entity::update_many()
                .col_expr(wallets::Column::TopUpPending, Expr::value(false))
                .col_expr(
                    wallets::Column::TopUpFailures,
                    Expr::col(wallets::Column::TopUpFailures).add(1),
                )
                .col_expr(
                    wallets::Column::LastTopUpFailure,
                    Expr::value(failure_message),
                )
                .col_expr(wallets::Column::LastTopUpFailureAt, Expr::value(now))
                .col_expr(wallets::Column::UpdatedAt, Expr::value(now))
                .filter(wallets::Column::UserId.eq(purchase.user_id.as_str()))
                .exec(&txn)
                .await?;
            let reason = format!(
                "auto top-up switched itself off after {disable_after} declined payments in a row; update the payment method and switch it on again"
            );
            wallets::Entity::update_many()
                .col_expr(wallets::Column::AutoTopUpEnabled, Expr::value(false))
                .col_expr(
                    wallets::Column::AutoTopUpDisabledReason,
                    Expr::value(reason),
                )
                .filter(wallets::Column::UserId.eq(purchase.user_id.as_str()))
                .filter(wallets::Column::TopUpFailures.gte(disable_after))
                .filter(wallets::Column::AutoTopUpEnabled.eq(true))
                .exec(&txn)
                .await?;
        }
        if let Some(key) = &purchase.idempotency_key {
            let response =
                serde_json::json!({"purchaseId": purchase.id, "declined": true}).to_string();
            self.complete_key(&txn, &purchase.group_id, key, &response)
                .await?;
        }
        self.insert_audit_in(&txn, audit).await?;
        txn.commit().await?;
        Ok(true)
    }

    /// Pending purchases whose next attempt is due (crash recovery, retries after outages).
    pub async fn due_pending_purchases(
        &self,
        now: DateTime<Utc>,
        limit: u64,
    ) -> Result<Vec<PurchaseRow>, StoreError> {
        Ok(purchases::Entity::find()
            .filter(purchases::Column::Status.eq("PENDING"))
            .filter(purchases::Column::NextAttemptAt.lte(to_millis(now)))
            .order_by_asc(purchases::Column::NextAttemptAt)
            .limit(limit)
            .all(self.connection())
            .await?
            .into_iter()
            .map(purchase_from_model)
            .collect())
    }

    /// Claims a pending purchase for this node until `lease_until` (compare-and-set on
    /// `next_attempt_at`, as for approval checks) and counts the attempt.
    pub async fn claim_purchase(
        &self,
        purchase: &PurchaseRow,
        lease_until: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let txn = self.begin_write().await?;
        let mut update = purchases::Entity::update_many()
            .col_expr(
                purchases::Column::NextAttemptAt,
                Expr::value(to_millis(lease_until)),
            )
            .col_expr(
                purchases::Column::Attempts,
                Expr::col(purchases::Column::Attempts).add(1),
            )
            .filter(purchases::Column::Id.eq(purchase.id.as_str()))
            .filter(purchases::Column::Status.eq("PENDING"));
        update = match purchase.next_attempt_at {
            Some(expected) => {
                update.filter(purchases::Column::NextAttemptAt.eq(to_millis(expected)))
            }
            None => update.filter(purchases::Column::NextAttemptAt.is_null()),
        };
        let claimed = update.exec(&txn).await?.rows_affected == 1;
        txn.commit().await?;
        Ok(claimed)
    }

    /// Debits a wallet inside a write transaction the caller owns (so a message and its debit
    /// commit together). `decide_top_up` sees the wallet after the debit and may return a
    /// pending top-up purchase to record in the same transaction — unless it would pass a
    /// spending cap for the period starting `cap_period_start`, in which case it is not
    /// recorded and the cap is returned.
    // The transaction, whose wallet, how much, why, and the top-up rule are all needed here.
    #[allow(clippy::too_many_arguments)]
    pub async fn debit_in(
        &self,
        txn: &Transaction,
        group_id: &str,
        user_id: &str,
        credits: i64,
        kind: &str,
        reference: &str,
        cap_period_start: DateTime<Utc>,
        decide_top_up: impl FnOnce(&WalletRow) -> Option<PurchaseRow>,
    ) -> Result<DebitOutcome, StoreError> {
        ensure_wallet(&txn.0, user_id, group_id).await?;
        let debited = wallets::Entity::update_many()
            .col_expr(
                wallets::Column::Balance,
                Expr::col(wallets::Column::Balance).sub(credits),
            )
            .col_expr(
                wallets::Column::UpdatedAt,
                Expr::value(to_millis(Utc::now())),
            )
            .filter(wallets::Column::UserId.eq(user_id))
            .filter(wallets::Column::Balance.gte(credits))
            .exec(&txn.0)
            .await?
            .rows_affected;
        let wallet = wallets::Entity::find_by_id(user_id.to_owned())
            .one(&txn.0)
            .await?
            .map_or_else(|| empty_wallet(user_id), wallet_from_model);
        if debited != 1 {
            return Ok(DebitOutcome::Insufficient {
                balance: wallet.balance,
            });
        }
        insert_ledger(
            &txn.0,
            group_id,
            user_id,
            kind,
            -credits,
            wallet.balance,
            reference,
        )
        .await?;
        let mut top_up = decide_top_up(&wallet);
        let mut refused_top_up = None;
        if let Some(purchase) = &top_up {
            refused_top_up = check_caps(
                &txn.0,
                group_id,
                user_id,
                purchase.amount_cents,
                cap_period_start,
            )
            .await?;
        }
        if refused_top_up.is_some() {
            top_up = None;
        }
        if let Some(purchase) = &top_up {
            wallets::Entity::update_many()
                .col_expr(wallets::Column::TopUpPending, Expr::value(true))
                .filter(wallets::Column::UserId.eq(user_id))
                .exec(&txn.0)
                .await?;
            insert_purchase(&txn.0, purchase).await?;
        }
        Ok(DebitOutcome::Debited {
            balance_after: wallet.balance,
            top_up,
            refused_top_up,
        })
    }

    /// Credits a wallet inside the caller's transaction (refunds).
    pub async fn credit_in(
        &self,
        txn: &Transaction,
        group_id: &str,
        user_id: &str,
        credits: i64,
        kind: &str,
        reference: &str,
    ) -> Result<i64, StoreError> {
        ensure_wallet(&txn.0, user_id, group_id).await?;
        wallets::Entity::update_many()
            .col_expr(
                wallets::Column::Balance,
                Expr::col(wallets::Column::Balance).add(credits),
            )
            .col_expr(
                wallets::Column::UpdatedAt,
                Expr::value(to_millis(Utc::now())),
            )
            .filter(wallets::Column::UserId.eq(user_id))
            .exec(&txn.0)
            .await?;
        let balance_after = current_balance(&txn.0, user_id).await?;
        insert_ledger(
            &txn.0,
            group_id,
            user_id,
            kind,
            credits,
            balance_after,
            reference,
        )
        .await?;
        Ok(balance_after)
    }

    /// Completes an idempotency key inside the caller's transaction.
    pub async fn complete_key_in(
        &self,
        txn: &Transaction,
        group_id: &str,
        key: &str,
        response: &str,
    ) -> Result<(), StoreError> {
        self.complete_key(&txn.0, group_id, key, response).await
    }

    /// Appends an audit event inside the caller's transaction.
    pub async fn audit_in(&self, txn: &Transaction, entry: &AuditEntry) -> Result<(), StoreError> {
        self.insert_audit_in(&txn.0, entry).await
    }

    /// Opens a write transaction for a caller that composes several changes.
    pub async fn begin_credit_transaction(&self) -> Result<Transaction, StoreError> {
        Ok(Transaction(self.begin_write().await?))
    }

    /// Changes a practitioner's auto top-up settings. Switching it on clears earlier failures.
    pub async fn set_auto_top_up(
        &self,
        group_id: &str,
        user_id: &str,
        enabled: bool,
        threshold_credits: i64,
        pack_id: Option<&str>,
        audit: &AuditEntry,
    ) -> Result<(), StoreError> {
        let txn = self.begin_write().await?;
        ensure_wallet(&txn, user_id, group_id).await?;
        let mut update = wallets::Entity::update_many()
            .col_expr(wallets::Column::AutoTopUpEnabled, Expr::value(enabled))
            .col_expr(
                wallets::Column::ThresholdCredits,
                Expr::value(threshold_credits),
            )
            .col_expr(
                wallets::Column::TopUpPackId,
                Expr::value(pack_id.map(str::to_owned)),
            )
            .col_expr(
                wallets::Column::UpdatedAt,
                Expr::value(to_millis(Utc::now())),
            );
        if enabled {
            update = update
                .col_expr(wallets::Column::TopUpFailures, Expr::value(0))
                .col_expr(
                    wallets::Column::AutoTopUpDisabledReason,
                    Expr::value(Option::<String>::None),
                );
        }
        update
            .filter(wallets::Column::UserId.eq(user_id))
            .exec(&txn)
            .await?;
        self.insert_audit_in(&txn, audit).await?;
        txn.commit().await?;
        Ok(())
    }

    /// A wallet's ledger, newest first, strictly older than `before_id` when given.
    pub async fn ledger(
        &self,
        user_id: &str,
        before_id: Option<&str>,
        limit: u64,
    ) -> Result<Vec<LedgerRow>, StoreError> {
        let mut query =
            ledger_entries::Entity::find().filter(ledger_entries::Column::UserId.eq(user_id));
        if let Some(before_id) = before_id {
            query = query.filter(ledger_entries::Column::Id.lt(before_id));
        }
        Ok(query
            .order_by_desc(ledger_entries::Column::Id)
            .limit(limit)
            .all(self.connection())
            .await?
            .into_iter()
            .map(|model| LedgerRow {
                id: model.id,
                kind: model.kind,
                credits: model.credits,
                balance_after: model.balance_after,
                reference: model.reference,
                created_at: from_millis(model.created_at),
            })
            .collect())
    }
}

/// The practitioner's and the practice's monthly limits, if set.
async fn cap_limits(
    connection: &impl ConnectionTrait,
    group_id: &str,
    user_id: &str,
) -> Result<(Option<i64>, Option<i64>), StoreError> {
    let caps = spending_caps::Entity::find()
        .filter(spending_caps::Column::GroupId.eq(group_id))
        .filter(spending_caps::Column::Scope.is_in([user_id, PRACTICE_SCOPE]))
        .all(connection)
        .await?;
    let limit = |scope: &str| {
        caps.iter()
            .find(|cap| cap.scope == scope)
            .map(|cap| cap.monthly_limit_cents)
    };
    Ok((limit(user_id), limit(PRACTICE_SCOPE)))
}

/// Cents of the group's (or one practitioner's) pending and succeeded purchases created at or
/// after `since`. Summed here rather than by `SUM()`, whose type differs between the backends
/// (PostgreSQL answers NUMERIC for BIGINT); a month holds few purchases.
async fn spent_since(
    connection: &impl ConnectionTrait,
    group_id: &str,
    user_id: Option<&str>,
    since: DateTime<Utc>,
) -> Result<i64, StoreError> {
    let mut query = purchases::Entity::find()
        .select_only()
        .column(purchases::Column::AmountCents)
        .filter(purchases::Column::GroupId.eq(group_id))
        .filter(purchases::Column::CreatedAt.gte(to_millis(since)))
        .filter(purchases::Column::Status.is_in(["PENDING", "SUCCEEDED"]));
    if let Some(user_id) = user_id {
        query = query.filter(purchases::Column::UserId.eq(user_id));
    }
    let amounts: Vec<i64> = query.into_tuple().all(connection).await?;
    Ok(amounts.into_iter().sum())
}

/// Inside a write transaction: locks the practice's row (every purchase of the practice queues
/// here on PostgreSQL), then checks a purchase of `amount_cents` for `user_id` against the
/// practitioner's cap and the practice's. The breach with the least room left, if any.
async fn check_caps(
    connection: &impl ConnectionTrait,
    group_id: &str,
    user_id: &str,
    amount_cents: i64,
    since: DateTime<Utc>,
) -> Result<Option<CapBreach>, StoreError> {
    groups::Entity::find_by_id(group_id.to_owned())
        .lock_exclusive()
        .one(connection)
        .await?;
    let (practitioner_limit, practice_limit) = cap_limits(connection, group_id, user_id).await?;
    let mut breaches = Vec::new();
    for (scope, limit, spender) in [
        (CapScope::Practitioner, practitioner_limit, Some(user_id)),
        (CapScope::Practice, practice_limit, None),
    ] {
        let Some(limit_cents) = limit else {
            continue;
        };
        let spent_cents = spent_since(connection, group_id, spender, since).await?;
        if spent_cents.saturating_add(amount_cents) > limit_cents {
            breaches.push(CapBreach {
                scope,
                limit_cents,
                spent_cents,
                attempted_cents: amount_cents,
            });
        }
    }
    Ok(breaches
        .into_iter()
        .min_by_key(|breach| breach.limit_cents - breach.spent_cents))
}

async fn ensure_wallet(
    connection: &impl ConnectionTrait,
    user_id: &str,
    group_id: &str,
) -> Result<(), StoreError> {
    wallets::Entity::insert(wallets::ActiveModel {
        user_id: Set(user_id.to_owned()),
        group_id: Set(group_id.to_owned()),
        balance: Set(0),
        auto_top_up_enabled: Set(false),
        threshold_credits: Set(10),
        top_up_pack_id: Set(None),
        top_up_pending: Set(false),
        top_up_failures: Set(0),
        last_top_up_failure: Set(None),
        last_top_up_failure_at: Set(None),
        auto_top_up_disabled_reason: Set(None),
        updated_at: Set(to_millis(Utc::now())),
    })
    .on_conflict(
        OnConflict::column(wallets::Column::UserId)
            .do_nothing()
            .to_owned(),
    )
    .exec_without_returning(connection)
    .await?;
    Ok(())
}

async fn current_balance(
    connection: &impl ConnectionTrait,
    user_id: &str,
) -> Result<i64, StoreError> {
    Ok(wallets::Entity::find_by_id(user_id.to_owned())
        .one(connection)
        .await?
        .map_or(0, |wallet| wallet.balance))
}

async fn insert_ledger(
    connection: &impl ConnectionTrait,
    group_id: &str,
    user_id: &str,
    kind: &str,
    credits: i64,
    balance_after: i64,
    reference: &str,
) -> Result<(), StoreError> {
    ledger_entries::Entity::insert(ledger_entries::ActiveModel {
        id: Set(new_id()),
        group_id: Set(group_id.to_owned()),
        user_id: Set(user_id.to_owned()),
        kind: Set(kind.to_owned()),
        credits: Set(credits),
        balance_after: Set(balance_after),
        reference: Set(reference.to_owned()),
        created_at: Set(to_millis(Utc::now())),
    })
    .exec_without_returning(connection)
    .await?;
    Ok(())
}

async fn insert_purchase(
    connection: &impl ConnectionTrait,
    purchase: &PurchaseRow,
) -> Result<(), StoreError> {
    purchases::Entity::insert(purchases::ActiveModel {
        id: Set(purchase.id.clone()),
        group_id: Set(purchase.group_id.clone()),
        user_id: Set(purchase.user_id.clone()),
        pack_id: Set(purchase.pack_id.clone()),
        credits: Set(purchase.credits),
        amount_cents: Set(purchase.amount_cents),
        gst_cents: Set(purchase.gst_cents),
        status: Set(purchase.status.clone()),
        origin: Set(purchase.origin.clone()),
        charge_id: Set(purchase.charge_id.clone()),
        failure_code: Set(purchase.failure_code.clone()),
        requested_by_user_id: Set(purchase.requested_by_user_id.clone()),
        requested_by_subject: Set(purchase.requested_by_subject.clone()),
        idempotency_key: Set(purchase.idempotency_key.clone()),
        token_ciphertext: Set(purchase.token_ciphertext.clone()),
        attempts: Set(purchase.attempts),
        next_attempt_at: Set(purchase.next_attempt_at.map(to_millis)),
        created_at: Set(to_millis(purchase.created_at)),
        completed_at: Set(None),
    })
    .exec_without_returning(connection)
    .await?;
    Ok(())
}

fn empty_wallet(user_id: &str) -> WalletRow {
    WalletRow {
        user_id: user_id.to_owned(),
        balance: 0,
        auto_top_up_enabled: false,
        threshold_credits: 10,
        top_up_pack_id: None,
        top_up_pending: false,
        top_up_failures: 0,
        last_top_up_failure: None,
        last_top_up_failure_at: None,
        auto_top_up_disabled_reason: None,
    }
}

fn wallet_from_model(model: wallets::Model) -> WalletRow {
    WalletRow {
        user_id: model.user_id,
        balance: model.balance,
        auto_top_up_enabled: model.auto_top_up_enabled,
        threshold_credits: model.threshold_credits,
        top_up_pack_id: model.top_up_pack_id,
        top_up_pending: model.top_up_pending,
        top_up_failures: model.top_up_failures,
        last_top_up_failure: model.last_top_up_failure,
        last_top_up_failure_at: model.last_top_up_failure_at.map(from_millis),
        auto_top_up_disabled_reason: model.auto_top_up_disabled_reason,
    }
}

fn purchase_from_model(model: purchases::Model) -> PurchaseRow {
    PurchaseRow {
        id: model.id,
        group_id: model.group_id,
        user_id: model.user_id,
        pack_id: model.pack_id,
        credits: model.credits,
        amount_cents: model.amount_cents,
        gst_cents: model.gst_cents,
        status: model.status,
        origin: model.origin,
        charge_id: model.charge_id,
        failure_code: model.failure_code,
        requested_by_user_id: model.requested_by_user_id,
        requested_by_subject: model.requested_by_subject,
        idempotency_key: model.idempotency_key,
        token_ciphertext: model.token_ciphertext,
        attempts: model.attempts,
        next_attempt_at: model.next_attempt_at.map(from_millis),
        created_at: from_millis(model.created_at),
    }
}
