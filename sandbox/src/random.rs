//! Where a namespace's random draws come from (ids, session tokens, webhook secrets, synthetic
//! patients, fault ids).
//!
//! A namespace seeded by a scenario draws from a stream fixed by (seed, namespace), so the same
//! requests in the same order get byte-identical answers run after run. Every other namespace
//! draws from a key taken from the operating system: a public sandbox must not hand out session
//! tokens anyone could work out from a published seed.
//!
//! Each draw takes a fresh `StdRng` seeded with SHA-256(key, counter) and moves the counter on,
//! so the stream's position is two plain values that a state file can keep.

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

/// The random stream of one namespace.
#[derive(Clone)]
pub(crate) struct NamespaceRandom {
    key: [u8; 32],
    /// Draws made so far.
    counter: u64,
    /// The seed the key was made from; `None` for a key from the operating system.
    seed: Option<u64>,
}

impl std::fmt::Debug for NamespaceRandom {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key of an unseeded stream predicts its tokens: never print it.
        formatter
            .debug_struct("NamespaceRandom")
            .field("seed", &self.seed)
            .field("counter", &self.counter)
            .finish_non_exhaustive()
    }
}

impl NamespaceRandom {
    /// A stream fixed by `seed` and the namespace's name.
    pub(crate) fn seeded(seed: u64, namespace: &str) -> NamespaceRandom {
        let mut hash = Sha256::new();
        hash.update(b"smd-sandbox namespace stream\xff");
        hash.update(seed.to_le_bytes());
        hash.update(namespace.as_bytes());
        NamespaceRandom {
            key: hash.finalize().into(),
            counter: 0,
            seed: Some(seed),
        }
    }

    /// A stream nobody can predict.
    pub(crate) fn from_entropy() -> NamespaceRandom {
        let mut key = [0_u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        NamespaceRandom {
            key,
            counter: 0,
            seed: None,
        }
    }

    /// A seeded stream continued from `counter` draws (a restored state), or a fresh
    /// unpredictable one when there is no seed.
    pub(crate) fn resumed(seed: Option<u64>, namespace: &str, counter: u64) -> NamespaceRandom {
        match seed {
            Some(seed) => NamespaceRandom {
                counter,
                ..NamespaceRandom::seeded(seed, namespace)
            },
            None => NamespaceRandom::from_entropy(),
        }
    }

    /// The seed of a seeded stream.
    pub(crate) fn seed(&self) -> Option<u64> {
        self.seed
    }

    /// How many draws have been made.
    pub(crate) fn counter(&self) -> u64 {
        self.counter
    }

    /// A generator for one draw (an id, a token, a patient), the next in the stream.
    pub(crate) fn next_generator(&mut self) -> StdRng {
        let mut hash = Sha256::new();
        hash.update(self.key);
        hash.update(self.counter.to_le_bytes());
        self.counter += 1;
        StdRng::from_seed(hash.finalize().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    fn draws(random: &mut NamespaceRandom) -> Vec<u64> {
        (0..3).map(|_| random.next_generator().r#gen()).collect()
    }

    #[test]
    fn a_seeded_stream_repeats_and_another_seed_or_namespace_does_not() {
        let first = draws(&mut NamespaceRandom::seeded(7, "default"));
        assert_eq!(first, draws(&mut NamespaceRandom::seeded(7, "default")));
        assert_ne!(first, draws(&mut NamespaceRandom::seeded(8, "default")));
        assert_ne!(first, draws(&mut NamespaceRandom::seeded(7, "team-a")));
    }

    #[test]
    fn a_resumed_stream_continues_where_it_stopped() {
        let mut whole = NamespaceRandom::seeded(7, "default");
        let all = draws(&mut whole);
        let mut first_part = NamespaceRandom::seeded(7, "default");
        first_part.next_generator();
        let mut resumed = NamespaceRandom::resumed(Some(7), "default", first_part.counter());
        let rest: Vec<u64> = (0..2).map(|_| resumed.next_generator().r#gen()).collect();
        assert_eq!(rest, all[1..]);
    }

    #[test]
    fn unseeded_streams_differ_and_never_print_their_key() {
        let mut one = NamespaceRandom::from_entropy();
        let mut other = NamespaceRandom::from_entropy();
        assert_ne!(draws(&mut one), draws(&mut other));
        let printed = format!("{one:?}");
        assert!(printed.contains("seed: None"), "{printed}");
        assert!(!printed.contains("key"), "{printed}");
    }
}
