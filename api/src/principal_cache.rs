//! Verified principals, remembered by their bearer token until the token stops being honoured.
//! A token's claims cannot change (its signature covers them), so the principal one token
//! verified to is the same on every request: caching it skips the signature check and the
//! database read that provisions the user, and an expired token is refused the moment its
//! `exp` (plus leeway) passes because every hit checks it. Per node, in memory.

use std::collections::HashMap;
use std::sync::Mutex;

use chrono::{DateTime, Utc};

use crate::domain::audit::Principal;

const SHARDS: usize = 16;
/// Tokens remembered per shard; past it, expired ones go first, then the whole shard.
const PER_SHARD: usize = 4_096;

/// The cache. Shared by the HTTP and WebSocket paths of one node.
#[derive(Debug)]
pub(crate) struct PrincipalCache {
    shards: Vec<Mutex<HashMap<String, Principal>>>,
}

impl Default for PrincipalCache {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

fn shard_of(token: &str) -> usize {
    // The signature's last bytes are as good as random.
    token.bytes().rev().take(8).fold(0usize, |hash, byte| {
        hash.wrapping_mul(31).wrapping_add(usize::from(byte))
    }) % SHARDS
}

impl PrincipalCache {
    /// The principal `token` verified to, if it is still honoured at `now`.
    pub(crate) fn get(&self, token: &str, now: DateTime<Utc>) -> Option<Principal> {
        let mut shard = self.shards[shard_of(token)]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match shard.get(token) {
            Some(principal) if principal.is_honoured_at(now) => Some(principal.clone()),
            Some(_) => {
                shard.remove(token);
                None
            }
            None => None,
        }
    }

    /// Remembers what `token` verified to.
    pub(crate) fn insert(&self, token: &str, principal: &Principal, now: DateTime<Utc>) {
        let mut shard = self.shards[shard_of(token)]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if shard.len() >= PER_SHARD {
            shard.retain(|_, principal| principal.is_honoured_at(now));
            if shard.len() >= PER_SHARD {
                shard.clear();
            }
        }
        shard.insert(token.to_owned(), principal.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::types::Role;

    fn principal(expires_at: DateTime<Utc>) -> Principal {
        Principal {
            user_id: "u1".into(),
            subject: "dr-chen".into(),
            group_id: "clinic-1".into(),
            role: Role::Practitioner,
            name: "Dr Chen".into(),
            request_id: "r1".into(),
            expires_at,
        }
    }

    #[test]
    fn a_cached_principal_is_refused_the_moment_its_token_expires() {
        let cache = PrincipalCache::default();
        let now = Utc::now();
        let expires = now + chrono::Duration::seconds(10);
        cache.insert("token-a", &principal(expires), now);
        assert!(cache.get("token-a", now).is_some());
        assert!(
            cache
                .get("token-a", expires - chrono::Duration::milliseconds(1))
                .is_some()
        );
        assert!(cache.get("token-a", expires).is_none());
        // And it is gone, not merely hidden.
        assert!(cache.get("token-a", now).is_none());
    }

    #[test]
    fn only_the_exact_token_hits() {
        let cache = PrincipalCache::default();
        let now = Utc::now();
        cache.insert("token-a", &principal(now + chrono::Duration::hours(1)), now);
        assert!(cache.get("token-b", now).is_none());
        assert!(cache.get("token-", now).is_none());
    }

    #[test]
    fn a_full_shard_makes_room() {
        let cache = PrincipalCache::default();
        let now = Utc::now();
        let live = principal(now + chrono::Duration::hours(1));
        for index in 0..(SHARDS * PER_SHARD * 2) {
            cache.insert(&format!("token-{index}"), &live, now);
        }
        let total: usize = cache
            .shards
            .iter()
            .map(|shard| shard.lock().unwrap().len())
            .sum();
        assert!(total <= SHARDS * PER_SHARD);
    }
}
