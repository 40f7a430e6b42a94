//! The practitioner directory across providers: searching every directory the practice is
//! active on, merging the answers by HPI-I, finding who reaches a recipient, and routing.

use std::collections::BTreeMap;

use super::MessagingService;
use super::directory_cache::LookupError;
use crate::domain::audit::Principal;
use crate::domain::types::{Provider, ProviderCredentials};
use crate::domain::{CallBudget, GatewayError};
use crate::providers::DirectoryEntry;

/// A practitioner found in the directories, with the providers that reach them.
#[derive(Debug, Clone)]
pub struct PractitionerHit {
    /// The directory entry.
    pub entry: DirectoryEntry,
    /// Providers that reach them (only those the practice is active on).
    pub providers: Vec<Provider>,
}

/// What the directories say about one recipient.
#[derive(Debug, Clone)]
pub(super) struct Reach {
    /// Their entry, from the first directory that lists them.
    pub entry: Option<DirectoryEntry>,
    /// The practice's providers whose directories list them.
    pub reaching: Vec<Provider>,
    /// Providers whose directory did not answer (with the provider's Retry-After, if any):
    /// whether they reach the recipient is unknown, which is not the same as "no".
    pub unanswered: Vec<(Provider, Option<std::time::Duration>)>,
}

/// A directory search's answer.
#[derive(Debug, Clone)]
pub struct SearchResult {
    /// This page.
    pub hits: Vec<PractitionerHit>,
    /// Whether more follow.
    pub has_next_page: bool,
    /// Providers that could not be asked.
    pub warnings: Vec<String>,
}

impl MessagingService {
    /// Providers the practice is `ACTIVE` on, with the group account's credentials.
    async fn active_providers(
        &self,
        principal: &Principal,
        only: Option<Provider>,
    ) -> Result<Vec<(Provider, ProviderCredentials)>, GatewayError> {
        let mut active = Vec::new();
        for provider in Provider::ALL {
            if only.is_some_and(|only| only != provider) {
                continue;
            }
            if let Some(credentials) = self
                .integrations
                .active_group_credentials(&principal.group_id, provider)
                .await?
            {
                active.push((provider, credentials));
            }
        }
        Ok(active)
    }

    /// Searches every directory the practice is active on and merges the answers by HPI-I.
    /// A provider that fails degrades the answer (with a warning) instead of failing it.
    pub async fn search(
        &self,
        principal: &Principal,
        query: &str,
        only: Option<Provider>,
        offset: u64,
        first: u64,
        budget: &CallBudget,
    ) -> Result<SearchResult, GatewayError> {
        let query = query.trim();
        if query.chars().count() > 100 {
            return Err(GatewayError::BadUserInput(
                "query is limited to 100 characters".into(),
            ));
        }
        if offset + first > 500 {
            return Err(GatewayError::BadUserInput(
                "narrow the search: only the first 500 results can be paged through".into(),
            ));
        }
        let active = self.active_providers(principal, only).await?;
        if active.is_empty() {
            return Err(GatewayError::IntegrationNotActive(
                "your practice has no ACTIVE Argus or ReferralNet account to search; link one under Integrations".into(),
            ));
        }
        let wanted = offset + first + 1;
        // Merged by HPI-I alone (providers may spell a name differently), sorted afterwards.
        let mut merged: BTreeMap<String, PractitionerHit> = BTreeMap::new();
        let mut warnings = Vec::new();
        for (provider, credentials) in &active {
            let adapter = self.providers.get(*provider);
            let mut fetched = 0;
            loop {
                let page = self
                    .directory
                    .page(
                        &principal.group_id,
                        *provider,
                        query,
                        fetched,
                        50,
                        || async {
                            if !budget.spend() {
                                return Err(LookupError::BudgetSpent);
                            }
                            adapter
                                .search_directory(credentials, query, fetched, 50)
                                .await
                                .map_err(LookupError::Provider)
                        },
                    )
                    .await;
                match page {
                    Ok(page) => {
                        let count = page.entries.len() as u64;
                        for entry in page.entries {
                            merged
                                .entry(entry.hpii.clone())
                                .or_insert_with(|| PractitionerHit {
                                    entry,
                                    providers: Vec::new(),
                                })
                                .providers
                                .push(*provider);
                        }
                        fetched += count;
                        if count < 50 || fetched >= page.total || fetched >= wanted {
                            break;
                        }
                    }
                    Err(LookupError::BudgetSpent) => {
                        return Err(GatewayError::BadUserInput(
                            "this request asks the provider directories too many times (aliases or deep paging); search once per request and page with `after`".into(),
                        ));
                    }
                    Err(LookupError::Provider(error)) => {
                        tracing::warn!(%provider, error = %error, "directory search failed");
                        warnings.push(format!("{provider} did not answer, so results reachable only through {provider} may be missing"));
                        break;
                    }
                }
            }
        }
        let mut all: Vec<PractitionerHit> = merged.into_values().collect();
        all.sort_by_cached_key(|hit| {
            (
                hit.entry.family_name.to_lowercase(),
                hit.entry.given_name.to_lowercase(),
                hit.entry.hpii.clone(),
            )
        });
        let has_next_page = all.len() as u64 > offset + first;
        let hits = all
            .into_iter()
            .skip(offset as usize)
            .take(first as usize)
            .collect();
        Ok(SearchResult {
            hits,
            has_next_page,
            warnings,
        })
    }

    /// Which of the practice's active providers reach a recipient, and their directory entry.
    pub(super) async fn reach(
        &self,
        principal: &Principal,
        hpii: &str,
    ) -> Result<Reach, GatewayError> {
        let mut found = None;
        let mut reach = Vec::new();
        let mut unanswered = Vec::new();
        for (provider, credentials) in self.active_providers(principal, None).await? {
            let adapter = self.providers.get(provider);
            let page = self
                .directory
                .page(&principal.group_id, provider, hpii, 0, 50, || async {
                    adapter
                        .search_directory(&credentials, hpii, 0, 50)
                        .await
                        .map_err(LookupError::Provider)
                })
                .await;
            match page {
                Ok(page) => {
                    if let Some(entry) = page.entries.into_iter().find(|entry| entry.hpii == hpii) {
                        reach.push(provider);
                        found.get_or_insert(entry);
                    }
                }
                Err(LookupError::Provider(error)) => {
                    tracing::warn!(%provider, error = %error, "directory lookup before a send failed");
                    unanswered.push((provider, error.retry_after()));
                }
                Err(LookupError::BudgetSpent) => unanswered.push((provider, None)),
            }
        }
        Ok(Reach {
            entry: found,
            reaching: reach,
            unanswered,
        })
    }

    /// Chooses a provider both parties use: the configured preference order when there is
    /// one, else the provider with the better delivery record over the practice's last 50
    /// messages on it (fewer `FAILED`; Argus on a tie).
    pub(super) async fn route(
        &self,
        group_id: &str,
        reach: &[Provider],
        own_active: &[Provider],
    ) -> Result<Option<Provider>, GatewayError> {
        let candidates: Vec<Provider> = Provider::ALL
            .into_iter()
            .filter(|provider| reach.contains(provider) && own_active.contains(provider))
            .collect();
        if !self.settings.provider_preference.is_empty() {
            return Ok(self
                .settings
                .provider_preference
                .iter()
                .copied()
                .find(|provider| candidates.contains(provider)));
        }
        let mut best: Option<(Provider, f64)> = None;
        for provider in candidates {
            let (failed, total) = self.store.recent_outcomes(group_id, provider, 50).await?;
            let failure_rate = if total == 0 {
                0.0
            } else {
                failed as f64 / total as f64
            };
            if best.is_none_or(|(_, rate)| failure_rate < rate) {
                best = Some((provider, failure_rate));
            }
        }
        Ok(best.map(|(provider, _)| provider))
    }
}
