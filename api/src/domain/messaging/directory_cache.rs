//! A practice's recent directory pages, kept briefly in memory so a search repeated by aliases,
//! by paging back and forth or by many users of one practice asks the provider once. Concurrent
//! askers of one page wait for the first one's answer instead of each calling the provider. A
//! failed lookup is not kept: the next asker tries again. Entries are per practice (the provider
//! answers with the practice's own credentials) and per node.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;

use crate::domain::types::Provider;
use crate::providers::{DirectoryPage, ProviderError};

/// Keeps at most this many pages per node; past it, expired pages go first, then everything.
const MAX_PAGES: usize = 5_000;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PageKey {
    group_id: String,
    provider: Provider,
    query: String,
    offset: u64,
    limit: u64,
}

#[derive(Debug)]
struct Slot {
    created: Instant,
    page: OnceCell<DirectoryPage>,
}

/// Why a page could not be had.
#[derive(Debug)]
pub(crate) enum LookupError {
    /// The provider failed; nothing was cached.
    Provider(ProviderError),
    /// The operation spent its directory allowance.
    BudgetSpent,
}

/// The cache. Cloning shares it.
#[derive(Debug, Clone)]
pub(crate) struct DirectoryCache {
    ttl: Duration,
    pages: Arc<Mutex<HashMap<PageKey, Arc<Slot>>>>,
}

impl DirectoryCache {
    pub(crate) fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            pages: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The page, from the cache when fresh, else from `fetch` (run by one asker at a time).
    pub(crate) async fn page<F, Fut>(
        &self,
        group_id: &str,
        provider: Provider,
        query: &str,
        offset: u64,
        limit: u64,
        fetch: F,
    ) -> Result<DirectoryPage, LookupError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<DirectoryPage, LookupError>>,
    {
        let key = PageKey {
            group_id: group_id.to_owned(),
            provider,
            query: query.to_lowercase(),
            offset,
            limit,
        };
        let slot = {
            let mut pages = self
                .pages
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let now = Instant::now();
            let fresh = pages
                .get(&key)
                .filter(|slot| now.duration_since(slot.created) < self.ttl)
                .cloned();
            match fresh {
                Some(slot) => slot,
                None => {
                    if pages.len() >= MAX_PAGES {
                        let ttl = self.ttl;
                        pages.retain(|_, slot| now.duration_since(slot.created) < ttl);
                        if pages.len() >= MAX_PAGES {
                            pages.clear();
                        }
                    }
                    let slot = Arc::new(Slot {
                        created: now,
                        page: OnceCell::new(),
                    });
                    pages.insert(key, slot.clone());
                    slot
                }
            }
        };
        slot.page.get_or_try_init(fetch).await.cloned()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn page(total: u64) -> DirectoryPage {
        DirectoryPage {
            entries: Vec::new(),
            total,
        }
    }

    #[tokio::test]
    async fn thirty_concurrent_askers_of_one_page_cause_one_provider_call() {
        let cache = DirectoryCache::new(Duration::from_secs(60));
        let calls = Arc::new(AtomicUsize::new(0));
        let askers = (0..30).map(|_| {
            let cache = cache.clone();
            let calls = calls.clone();
            async move {
                cache
                    .page("g1", Provider::Argus, "Cardiology", 0, 50, || async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::task::yield_now().await;
                        Ok(page(7))
                    })
                    .await
            }
        });
        let answers = futures::future::join_all(askers).await;
        assert!(
            answers
                .iter()
                .all(|answer| answer.as_ref().unwrap().total == 7)
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_failed_lookup_is_not_kept_and_practices_do_not_share_pages() {
        let cache = DirectoryCache::new(Duration::from_secs(60));
        let failed = cache
            .page("g1", Provider::Argus, "x", 0, 50, || async {
                Err(LookupError::BudgetSpent)
            })
            .await;
        assert!(failed.is_err());
        let retried = cache
            .page("g1", Provider::Argus, "x", 0, 50, || async { Ok(page(1)) })
            .await;
        assert_eq!(retried.unwrap().total, 1);
        let other_practice = cache
            .page("g2", Provider::Argus, "x", 0, 50, || async { Ok(page(2)) })
            .await;
        assert_eq!(other_practice.unwrap().total, 2);
    }

    #[tokio::test]
    async fn an_expired_page_is_fetched_again() {
        let cache = DirectoryCache::new(Duration::ZERO);
        for expected in [1, 2] {
            let answer = cache
                .page("g1", Provider::Argus, "x", 0, 50, || async move {
                    Ok(page(expected))
                })
                .await;
            assert_eq!(answer.unwrap().total, expected);
        }
    }
}
