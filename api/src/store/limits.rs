//! Attempt limits kept in the database, so every gateway node on one database shares them.
//!
//! A limit is a sliding window: at most `max` slots of one bucket (a user, a provider username)
//! created within `window`. A slot is *reserved before the work it limits*, in one write
//! transaction that first upserts the bucket's row (the row lock queues concurrent reservers of
//! that bucket on PostgreSQL; SQLite's `BEGIN IMMEDIATE` queues every writer), then counts the
//! live slots and inserts one only when there is room. Counting rows written after the work
//! instead (as the audit trail is) lets 40 parallel requests all see "9 so far" and all go ahead.
//! A limit on *failures* releases the slot when the attempt succeeds.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::OnConflict;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder,
    QuerySelect,
};

use super::entities::{attempt_buckets, attempt_slots};
use super::{Store, StoreError, from_millis, new_id, to_millis};

/// One window to reserve a slot in.
#[derive(Debug, Clone)]
pub struct AttemptLimit {
    /// What is limited, e.g. `login-failures:user:<id>`.
    pub bucket: String,
    /// Slots allowed within the window.
    pub max: u32,
    /// The window's length.
    pub window: Duration,
}

/// The answer to a reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reservation {
    /// One slot in every bucket asked for; release them with [`Store::release_attempts`] if the
    /// attempt turns out not to count.
    Reserved(Vec<String>),
    /// The bucket at this index of the request is full until `retry_after` has passed.
    Full {
        /// Index into the limits asked for.
        limit_index: usize,
        /// When the oldest slot of that bucket leaves the window.
        retry_after: Duration,
    },
}

impl Store {
    /// Reserves one slot in every bucket, all or none, atomically.
    pub async fn reserve_attempts(
        &self,
        limits: &[AttemptLimit],
        now: DateTime<Utc>,
    ) -> Result<Reservation, StoreError> {
        // Lock buckets in one order so two reservations over the same buckets cannot deadlock.
        let mut order: Vec<usize> = (0..limits.len()).collect();
        order.sort_by(|a, b| limits[*a].bucket.cmp(&limits[*b].bucket));
        let txn = self.begin_write().await?;
        let now_ms = to_millis(now);
        let mut slots = Vec::with_capacity(limits.len());
        for index in order {
            let limit = &limits[index];
            attempt_buckets::Entity::insert(attempt_buckets::ActiveModel {
                bucket: Set(limit.bucket.clone()),
                touched_at: Set(now_ms),
            })
            .on_conflict(
                OnConflict::column(attempt_buckets::Column::Bucket)
                    .update_column(attempt_buckets::Column::TouchedAt)
                    .to_owned(),
            )
            .exec_without_returning(&txn)
            .await?;
            let window_start =
                now_ms.saturating_sub(i64::try_from(limit.window.as_millis()).unwrap_or(i64::MAX));
            // Slots that left the window are no longer needed by anyone.
            attempt_slots::Entity::delete_many()
                .filter(attempt_slots::Column::Bucket.eq(limit.bucket.as_str()))
                .filter(attempt_slots::Column::CreatedAt.lte(window_start))
                .exec(&txn)
                .await?;
            let live = attempt_slots::Entity::find()
                .filter(attempt_slots::Column::Bucket.eq(limit.bucket.as_str()))
                .count(&txn)
                .await?;
            if live >= u64::from(limit.max) {
                let oldest = attempt_slots::Entity::find()
                    .filter(attempt_slots::Column::Bucket.eq(limit.bucket.as_str()))
                    .order_by_asc(attempt_slots::Column::CreatedAt)
                    .limit(1)
                    .one(&txn)
                    .await?
                    .map_or(now, |slot| from_millis(slot.created_at));
                txn.rollback().await?;
                let frees_at = oldest
                    + chrono::Duration::from_std(limit.window).unwrap_or(chrono::Duration::MAX);
                let retry_after = (frees_at - now).to_std().unwrap_or(Duration::ZERO);
                return Ok(Reservation::Full {
                    limit_index: index,
                    retry_after: retry_after.max(Duration::from_secs(1)),
                });
            }
            let id = new_id();
            attempt_slots::Entity::insert(attempt_slots::ActiveModel {
                id: Set(id.clone()),
                bucket: Set(limit.bucket.clone()),
                created_at: Set(now_ms),
            })
            .exec_without_returning(&txn)
            .await?;
            slots.push(id);
        }
        txn.commit().await?;
        Ok(Reservation::Reserved(slots))
    }

    /// Gives reserved slots back (the attempt succeeded and only failures count).
    pub async fn release_attempts(&self, slots: &[String]) -> Result<(), StoreError> {
        if slots.is_empty() {
            return Ok(());
        }
        attempt_slots::Entity::delete_many()
            .filter(attempt_slots::Column::Id.is_in(slots.iter().map(String::as_str)))
            .exec(self.connection())
            .await?;
        self.flushed().await?;
        Ok(())
    }
}
