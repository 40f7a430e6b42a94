//! The product's rules, free of frameworks: the values users hand us (parsed once into types
//! that cannot hold bad data), the errors users can see, and the services that apply the seed
//! article's flow. Nothing here knows async-graphql, sea-orm or reqwest.

pub mod audit;
pub mod credits;
pub mod error;
pub mod hl7;
pub mod integrations;
pub mod messaging;
pub mod pricing;
pub mod types;

pub use error::GatewayError;

/// `now + delay`, saturating at the end of time instead of panicking on an absurd delay (a
/// provider's huge `Retry-After`, a misconfigured interval).
pub(crate) fn later(
    now: chrono::DateTime<chrono::Utc>,
    delay: std::time::Duration,
) -> chrono::DateTime<chrono::Utc> {
    chrono::Duration::from_std(delay)
        .ok()
        .and_then(|delay| now.checked_add_signed(delay))
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC)
}

/// `now - delay`, saturating at the beginning of time.
pub(crate) fn earlier(
    now: chrono::DateTime<chrono::Utc>,
    delay: std::time::Duration,
) -> chrono::DateTime<chrono::Utc> {
    chrono::Duration::from_std(delay)
        .ok()
        .and_then(|delay| now.checked_sub_signed(delay))
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC)
}

/// A provider's error word reduced to at most 32 ASCII letters and digits, safe to show.
pub(crate) fn safe_word(word: &str) -> String {
    word.chars()
        .filter(char::is_ascii_alphanumeric)
        .take(32)
        .collect()
}

/// How many calls to a provider's directory one client operation may still cause. Aliases and
/// paging cannot multiply provider traffic past it; answers served from the practice's cache of
/// recent pages cost nothing.
#[derive(Debug)]
pub struct CallBudget(std::sync::atomic::AtomicU32);

impl CallBudget {
    /// A budget of `calls`.
    pub fn new(calls: u32) -> Self {
        Self(std::sync::atomic::AtomicU32::new(calls))
    }

    /// Takes one call from the budget; `false` when it is spent.
    pub fn spend(&self) -> bool {
        use std::sync::atomic::Ordering;
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                left.checked_sub(1)
            })
            .is_ok()
    }
}
