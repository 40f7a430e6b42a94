//! Request rate limits: token buckets kept in this node's memory, one per key (a user, a client
//! address). Per node on purpose: a shared bucket would cost a database round trip on every
//! request, which is the very load these limits protect against; with N nodes behind a load
//! balancer a client gets at most N times the rate. Limits that must hold exactly across nodes
//! (failed logins, login validations) live in the database instead (`store::limits`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Keys are spread over this many locks so concurrent requests rarely wait on each other.
const SHARDS: usize = 16;
/// A shard forgets buckets that have refilled completely once it holds this many keys.
const PRUNE_AT: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Token buckets of one size and refill rate, keyed by anything hashable as a string.
#[derive(Debug)]
pub struct TokenBuckets {
    per_second: f64,
    burst: f64,
    shards: Vec<Mutex<HashMap<String, Bucket>>>,
}

impl TokenBuckets {
    /// Buckets holding `burst` tokens, refilled at `per_second`.
    pub fn new(per_second: u32, burst: u32) -> Self {
        Self {
            per_second: f64::from(per_second.max(1)),
            burst: f64::from(burst.max(1)),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    /// Takes one token from `key`'s bucket, or says how long until one is there.
    pub fn take(&self, key: &str) -> Result<(), Duration> {
        self.take_at(key, Instant::now())
    }

    fn take_at(&self, key: &str, now: Instant) -> Result<(), Duration> {
        // A stable hash of the key picks its shard (the shard's map hashes it properly).
        let shard = key.bytes().fold(0usize, |hash, byte| {
            hash.wrapping_mul(31).wrapping_add(usize::from(byte))
        }) % SHARDS;
        let mut buckets = self.shards[shard]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() >= PRUNE_AT {
            let (per_second, burst) = (self.per_second, self.burst);
            buckets.retain(|_, bucket| {
                bucket.tokens + now.duration_since(bucket.updated).as_secs_f64() * per_second
                    < burst
            });
        }
        let bucket = buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: self.burst,
            updated: now,
        });
        let refilled = now.duration_since(bucket.updated).as_secs_f64() * self.per_second;
        bucket.tokens = (bucket.tokens + refilled).min(self.burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - bucket.tokens) / self.per_second;
            Err(Duration::from_secs_f64(wait))
        }
    }
}

/// Whole seconds to tell a client to wait (at least 1, rounded up).
pub fn retry_after_seconds(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_bucket_allows_its_burst_then_refuses_until_it_refills() {
        let buckets = TokenBuckets::new(2, 3);
        let start = Instant::now();
        for _ in 0..3 {
            assert!(buckets.take_at("user:a", start).is_ok());
        }
        let wait = buckets.take_at("user:a", start).unwrap_err();
        assert_eq!(retry_after_seconds(wait), 1);
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-9);
        // Other keys have their own bucket.
        assert!(buckets.take_at("user:b", start).is_ok());
        // Half a second later one token is back, and only one.
        let later = start + Duration::from_millis(500);
        assert!(buckets.take_at("user:a", later).is_ok());
        assert!(buckets.take_at("user:a", later).is_err());
    }

    #[test]
    fn a_bucket_never_holds_more_than_its_burst() {
        let buckets = TokenBuckets::new(100, 2);
        let start = Instant::now();
        assert!(buckets.take_at("k", start).is_ok());
        let much_later = start + Duration::from_secs(3600);
        assert!(buckets.take_at("k", much_later).is_ok());
        assert!(buckets.take_at("k", much_later).is_ok());
        assert!(buckets.take_at("k", much_later).is_err());
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_seconds(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_seconds(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_seconds(Duration::from_millis(2001)), 3);
    }
}
