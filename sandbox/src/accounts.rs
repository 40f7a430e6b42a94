//! Provider accounts shared by both emulators: the demo accounts, registration (validation, promo
//! codes, duplicates), the seeded decision schedule, early decisions, and password checks.
//!
//! Each provider keeps its own [`AccountBook`]; the provider modules only translate their wire
//! words to and from this model.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::OnceLock;

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

use chrono::{DateTime, Duration, SubsecRound, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::provider::{Provider, ProviderErrorCode};

/// The promo code whose registrations are approved when their decision falls due.
pub(crate) const APPROVING_PROMO_CODE: &str = "SANDBOX-PROMO";
/// The promo code whose registrations are rejected when their decision falls due.
pub(crate) const REJECTING_PROMO_CODE: &str = "SANDBOX-REJECT";

/// The shortest wait, in sandbox seconds, between registering and the decision (3 days).
const SHORTEST_DECISION_DELAY_SECONDS: i64 = 3 * 24 * 60 * 60;
/// The longest wait, in sandbox seconds, between registering and the decision (4 days).
const LONGEST_DECISION_DELAY_SECONDS: i64 = 4 * 24 * 60 * 60;

/// The demo account every namespace starts with, per provider.
pub(crate) struct DemoAccount {
    pub(crate) username: &'static str,
    pub(crate) password: &'static str,
    pub(crate) practice_name: &'static str,
}

/// Demo account of Argus, documented in PROTOCOL.md.
pub(crate) const ARGUS_DEMO_ACCOUNT: DemoAccount = DemoAccount {
    username: "demo.argus",
    password: "argus-sandbox-pw",
    practice_name: "Sandbox Demo Medical Centre",
};

/// Demo account of ReferralNet, documented in PROTOCOL.md.
pub(crate) const REFERRALNET_DEMO_ACCOUNT: DemoAccount = DemoAccount {
    username: "demo.referralnet",
    password: "rn-sandbox-pw",
    practice_name: "Sandbox Demo Medical Centre",
};

/// How many PBKDF2-HMAC-SHA256 rounds a stored password hash takes.
const PASSWORD_HASH_ROUNDS: u32 = 20_000;

/// The prefix of a stored password hash: `pbkdf2-sha256$<rounds>$<salt>$<digest>` (base64).
const PASSWORD_HASH_SCHEME: &str = "pbkdf2-sha256";

/// A password, compared without an early exit and never printed.
///
/// A password set through the API or a scenario is held in clear in memory only. A state file
/// gets a salted PBKDF2 hash of it instead ([`Password::stored_hash`]); a password restored
/// from one is checked against the hash, and remembered in memory once a login matches it.
#[derive(Clone)]
pub(crate) struct Password {
    clear: OnceLock<String>,
    hash: OnceLock<StoredPasswordHash>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct StoredPasswordHash {
    rounds: u32,
    salt: Vec<u8>,
    digest: [u8; 32],
}

impl StoredPasswordHash {
    fn of(password: &str, rounds: u32, salt: Vec<u8>) -> StoredPasswordHash {
        let digest = pbkdf2_sha256(password.as_bytes(), &salt, rounds);
        StoredPasswordHash {
            rounds,
            salt,
            digest,
        }
    }

    fn to_text(&self) -> String {
        format!(
            "{PASSWORD_HASH_SCHEME}${}${}${}",
            self.rounds,
            STANDARD_NO_PAD.encode(&self.salt),
            STANDARD_NO_PAD.encode(self.digest)
        )
    }

    fn parse(text: &str) -> Option<StoredPasswordHash> {
        let mut parts = text.split('$');
        if parts.next()? != PASSWORD_HASH_SCHEME {
            return None;
        }
        let rounds: u32 = parts.next()?.parse().ok().filter(|rounds| *rounds > 0)?;
        let salt = STANDARD_NO_PAD.decode(parts.next()?).ok()?;
        let digest = STANDARD_NO_PAD
            .decode(parts.next()?)
            .ok()?
            .try_into()
            .ok()?;
        if parts.next().is_some() || salt.len() < 8 {
            return None;
        }
        Some(StoredPasswordHash {
            rounds,
            salt,
            digest,
        })
    }
}

/// PBKDF2 (RFC 8018) with HMAC-SHA256, one 32-byte block.
fn pbkdf2_sha256(password: &[u8], salt: &[u8], rounds: u32) -> [u8; 32] {
    let keyed = Hmac::<Sha256>::new_from_slice(password).expect("HMAC takes keys of any length");
    let mut first = keyed.clone();
    first.update(salt);
    first.update(&1_u32.to_be_bytes());
    let mut block: [u8; 32] = first.finalize().into_bytes().into();
    let mut result = block;
    for _ in 1..rounds {
        let mut round = keyed.clone();
        round.update(&block);
        block = round.finalize().into_bytes().into();
        for (result_byte, block_byte) in result.iter_mut().zip(block) {
            *result_byte ^= block_byte;
        }
    }
    result
}

/// Compares in time that depends only on the lengths.
fn constant_time_equal(expected: &[u8], candidate: &[u8]) -> bool {
    let longest = expected.len().max(candidate.len());
    let mut difference = u8::from(expected.len() != candidate.len());
    for index in 0..longest {
        let expected_byte = expected.get(index).copied().unwrap_or(0);
        let candidate_byte = candidate.get(index).copied().unwrap_or(0);
        difference |= expected_byte ^ candidate_byte;
    }
    std::hint::black_box(difference) == 0
}

impl Password {
    pub(crate) fn new(password: impl Into<String>) -> Password {
        Password {
            clear: OnceLock::from(password.into()),
            hash: OnceLock::new(),
        }
    }

    /// A password known only by its stored hash (from a state file); `None` when the text is
    /// not a hash this sandbox writes.
    pub(crate) fn from_stored_hash(text: &str) -> Option<Password> {
        Some(Password {
            clear: OnceLock::new(),
            hash: OnceLock::from(StoredPasswordHash::parse(text)?),
        })
    }

    /// The salted hash a state file keeps instead of the password, made once.
    pub(crate) fn stored_hash(&self) -> String {
        self.hash
            .get_or_init(|| {
                let clear = self.clear.get().expect("a password is clear or hashed");
                let mut salt = vec![0_u8; 16];
                rand::rngs::OsRng.fill_bytes(&mut salt);
                StoredPasswordHash::of(clear, PASSWORD_HASH_ROUNDS, salt)
            })
            .to_text()
    }

    /// Compares in time that depends only on the lengths, so a caller cannot learn a matching
    /// prefix from how long a wrong guess takes.
    pub(crate) fn matches(&self, candidate: &str) -> bool {
        if let Some(clear) = self.clear.get() {
            return constant_time_equal(clear.as_bytes(), candidate.as_bytes());
        }
        let Some(hash) = self.hash.get() else {
            return false;
        };
        let candidate_hash = StoredPasswordHash::of(candidate, hash.rounds, hash.salt.clone());
        let matched = constant_time_equal(&hash.digest, &candidate_hash.digest);
        if matched {
            // Later logins compare in clear instead of hashing again.
            let _ = self.clear.set(candidate.to_owned());
        }
        matched
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("Password(<redacted>)")
    }
}

/// Where an account stands, in Argus's words (ReferralNet translates them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub(crate) enum AccountStatus {
    Pending,
    Active,
    Rejected,
    /// Was active; the provider has stopped it (scenarios only). Its account read and messaging
    /// calls answer 403 `notAuthorised`.
    Suspended,
}

/// What the provider decides about a registration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Decision {
    Approve,
    Reject,
}

impl Decision {
    fn resulting_status(self) -> AccountStatus {
        match self {
            Decision::Approve => AccountStatus::Active,
            Decision::Reject => AccountStatus::Rejected,
        }
    }
}

/// One account at one provider. A state file keeps it as it is, except the password, which it
/// keeps as a salted hash (see [`Password`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct Account {
    pub(crate) username: String,
    #[serde(rename = "passwordHash", with = "password_as_hash")]
    password: Password,
    pub(crate) practice_name: String,
    /// The provider's id for the registration (ReferralNet shows it as `enrolmentId`).
    #[serde(with = "uuid_as_text")]
    pub(crate) registration_id: Uuid,
    pub(crate) registered_at: DateTime<Utc>,
    /// When the scheduled decision falls due on the sandbox clock.
    pub(crate) decides_at: DateTime<Utc>,
    scheduled_decision: Decision,
    early_decision: Option<(Decision, DateTime<Utc>)>,
    /// From when the provider has suspended the account (scenarios only).
    #[serde(default)]
    suspended_since: Option<DateTime<Utc>>,
    /// Demo accounts exist from the start and are not listed as registrations.
    pub(crate) is_demo: bool,
    /// Order of creation, so listings are stable.
    sequence: u64,
}

/// Serialises a UUID as its hyphenated text.
mod uuid_as_text {
    use serde::{Deserialize, Deserializer, Serializer};
    use uuid::Uuid;

    pub(super) fn serialize<S: Serializer>(id: &Uuid, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&id.hyphenated())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Uuid, D::Error> {
        let text = String::deserialize(deserializer)?;
        Uuid::parse_str(&text).map_err(serde::de::Error::custom)
    }
}

/// Serialises a [`Password`] as its stored hash, never in clear.
mod password_as_hash {
    use super::Password;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(
        password: &Password,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&password.stored_hash())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Password, D::Error> {
        let text = String::deserialize(deserializer)?;
        Password::from_stored_hash(&text).ok_or_else(|| {
            serde::de::Error::custom("passwordHash is not a pbkdf2-sha256 hash this sandbox wrote")
        })
    }
}

impl Account {
    /// The status at sandbox time `now`: a suspension stands while it lasts; then an early
    /// decision; otherwise the scheduled decision applies once the clock reaches it.
    pub(crate) fn status_at(&self, now: DateTime<Utc>) -> AccountStatus {
        if self.suspended_since.is_some_and(|since| since <= now) {
            return AccountStatus::Suspended;
        }
        match self.decision_at(now) {
            Some((decision, _)) => decision.resulting_status(),
            None => AccountStatus::Pending,
        }
    }

    /// When the account was decided, if it has been by sandbox time `now`.
    pub(crate) fn decided_at(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.decision_at(now).map(|(_, decided_at)| decided_at)
    }

    fn decision_at(&self, now: DateTime<Utc>) -> Option<(Decision, DateTime<Utc>)> {
        if let Some(early_decision) = self.early_decision {
            return Some(early_decision);
        }
        (now >= self.decides_at).then_some((self.scheduled_decision, self.decides_at))
    }

    /// Whether `candidate` is this account's password.
    pub(crate) fn password_matches(&self, candidate: &str) -> bool {
        self.password.matches(candidate)
    }
}

/// An account a scenario starts a namespace with.
#[derive(Debug)]
pub(crate) struct SeededAccount {
    pub(crate) username: String,
    pub(crate) password: Password,
    pub(crate) practice_name: String,
    pub(crate) registered_at: DateTime<Utc>,
    /// The decision and when it falls due (`decides_at` may already have passed).
    pub(crate) decision: Decision,
    pub(crate) decides_at: DateTime<Utc>,
    pub(crate) suspended_since: Option<DateTime<Utc>>,
}

/// Why a registration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RegistrationError {
    #[error("{0}")]
    BadParam(String),
    #[error("promo code is not valid: use {APPROVING_PROMO_CODE} or {REJECTING_PROMO_CODE}")]
    InvalidPromoCode,
    #[error("{0:?} is already taken")]
    Duplicate(String),
}

impl RegistrationError {
    /// The standard error word for this refusal.
    pub(crate) fn provider_error_code(&self) -> ProviderErrorCode {
        match self {
            RegistrationError::BadParam(_) => ProviderErrorCode::BadParam,
            RegistrationError::InvalidPromoCode => ProviderErrorCode::InvalidPromoCode,
            RegistrationError::Duplicate(_) => ProviderErrorCode::Duplicate,
        }
    }
}

/// Why an early decision could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum EarlyDecisionError {
    #[error("no registration {0:?}")]
    UnknownAccount(String),
    #[error("registration {0:?} is already decided")]
    AlreadyDecided(String),
}

/// The wire names of the registration fields, so error messages use the caller's words.
pub(crate) struct RegistrationFieldNames {
    pub(crate) username: &'static str,
    pub(crate) password: &'static str,
    pub(crate) promo_code: &'static str,
    pub(crate) practice_name: &'static str,
    pub(crate) contact_email: &'static str,
}

/// A registration as it arrived, every field optional.
#[derive(Debug, Default)]
pub(crate) struct RegistrationForm {
    pub(crate) username: Option<String>,
    pub(crate) password: Option<String>,
    pub(crate) promo_code: Option<String>,
    pub(crate) practice_name: Option<String>,
    pub(crate) contact_email: Option<String>,
}

/// A registration whose fields passed every rule.
#[derive(Debug)]
pub(crate) struct NewRegistration {
    username: String,
    password: Password,
    decision: Decision,
    practice_name: String,
}

impl NewRegistration {
    /// Checks the form: every field present and not blank, username of 3–64 letters, digits,
    /// `.`, `_` or `-`, password of at least 8 characters, email with an `@`, and a known promo
    /// code (checked last, so a form with a bad field says which field first).
    pub(crate) fn parse(
        form: RegistrationForm,
        field_names: &RegistrationFieldNames,
    ) -> Result<NewRegistration, RegistrationError> {
        let username = required(form.username, field_names.username)?;
        let password = required(form.password, field_names.password)?;
        let promo_code = required(form.promo_code, field_names.promo_code)?;
        let practice_name = required(form.practice_name, field_names.practice_name)?;
        let contact_email = required(form.contact_email, field_names.contact_email)?;

        let username_is_valid = (3..=64).contains(&username.len())
            && username
                .chars()
                .all(|character| character.is_ascii_alphanumeric() || ".-_".contains(character));
        if !username_is_valid {
            return Err(RegistrationError::BadParam(format!(
                "{} must be 3 to 64 letters, digits, '.', '_' or '-'",
                field_names.username
            )));
        }
        if password.chars().count() < 8 {
            return Err(RegistrationError::BadParam(format!(
                "{} must be at least 8 characters",
                field_names.password
            )));
        }
        if !contact_email.contains('@') {
            return Err(RegistrationError::BadParam(format!(
                "{} must be an email address",
                field_names.contact_email
            )));
        }
        let decision = match promo_code.trim() {
            APPROVING_PROMO_CODE => Decision::Approve,
            REJECTING_PROMO_CODE => Decision::Reject,
            _ => return Err(RegistrationError::InvalidPromoCode),
        };
        Ok(NewRegistration {
            username,
            password: Password::new(password),
            decision,
            practice_name: practice_name.trim().to_owned(),
        })
    }
}

fn required(value: Option<String>, field_name: &str) -> Result<String, RegistrationError> {
    match value {
        Some(value) if !value.trim().is_empty() => Ok(value),
        _ => Err(RegistrationError::BadParam(format!(
            "{field_name} is required"
        ))),
    }
}

/// What makes a registration's random draws repeatable: the same sandbox seed, namespace,
/// provider and username always give the same decision time and registration id.
pub(crate) struct DecisionSeed<'a> {
    pub(crate) sandbox_seed: u64,
    pub(crate) namespace: &'a str,
    pub(crate) provider: Provider,
}

impl DecisionSeed<'_> {
    /// The seeded wait between registering `username` and its decision: what an API
    /// registration draws, so a scenario's pending account without a time gets the same.
    pub(crate) fn decision_delay(&self, username: &str) -> Duration {
        let mut random = self.random_number_generator(username);
        Duration::seconds(
            random.gen_range(SHORTEST_DECISION_DELAY_SECONDS..=LONGEST_DECISION_DELAY_SECONDS),
        )
    }

    fn random_number_generator(&self, username: &str) -> StdRng {
        // FNV-1a, written out so the seed does not depend on the standard library's hasher,
        // which may change between Rust releases.
        const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
        const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
        let mut hash = FNV_OFFSET_BASIS;
        let parts: [&[u8]; 4] = [
            &self.sandbox_seed.to_le_bytes(),
            self.namespace.as_bytes(),
            self.provider.as_str().as_bytes(),
            username.as_bytes(),
        ];
        for part in parts {
            // 0xff never occurs in UTF-8, so it separates the parts unambiguously.
            for byte in part.iter().chain(std::iter::once(&0xff)) {
                hash ^= u64::from(*byte);
                hash = hash.wrapping_mul(FNV_PRIME);
            }
        }
        StdRng::seed_from_u64(hash)
    }
}

/// The accounts of one provider in one namespace, keyed by username.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct AccountBook {
    accounts: BTreeMap<String, Account>,
    next_sequence: u64,
}

impl AccountBook {
    /// A book holding only the provider's demo account, active since well before `now`.
    pub(crate) fn with_demo_account(demo: &DemoAccount, now: DateTime<Utc>) -> AccountBook {
        let registered_at = now.trunc_subsecs(0) - Duration::days(30);
        let mut book = AccountBook::default();
        book.insert(Account {
            username: demo.username.to_owned(),
            password: Password::new(demo.password),
            practice_name: demo.practice_name.to_owned(),
            registration_id: Uuid::nil(),
            registered_at,
            decides_at: registered_at + Duration::days(3),
            scheduled_decision: Decision::Approve,
            early_decision: None,
            suspended_since: None,
            is_demo: true,
            sequence: 0,
        });
        book
    }

    fn insert(&mut self, mut account: Account) {
        account.sequence = self.next_sequence;
        self.next_sequence += 1;
        self.accounts.insert(account.username.clone(), account);
    }

    /// The account with this username and password, whatever its status.
    pub(crate) fn authenticate(&self, username: &str, password: &str) -> Option<&Account> {
        match self.accounts.get(username) {
            Some(account) if account.password_matches(password) => Some(account),
            Some(_) => None,
            None => {
                // Compare anyway, so an unknown username takes as long as a wrong password.
                Password::new("unknown-user-placeholder").matches(password);
                None
            }
        }
    }

    /// The account with this username.
    pub(crate) fn get(&self, username: &str) -> Option<&Account> {
        self.accounts.get(username)
    }

    /// Records a pending registration made at sandbox time `now`, its decision scheduled a
    /// seeded 3–4 days later.
    pub(crate) fn register(
        &mut self,
        registration: NewRegistration,
        seed: &DecisionSeed<'_>,
        now: DateTime<Utc>,
    ) -> Result<&Account, RegistrationError> {
        if self.accounts.contains_key(&registration.username) {
            return Err(RegistrationError::Duplicate(registration.username));
        }
        let mut random = seed.random_number_generator(&registration.username);
        let delay_seconds =
            random.gen_range(SHORTEST_DECISION_DELAY_SECONDS..=LONGEST_DECISION_DELAY_SECONDS);
        let registration_id = uuid::Builder::from_random_bytes(random.r#gen()).into_uuid();
        let registered_at = now.trunc_subsecs(0);
        let username = registration.username.clone();
        self.insert(Account {
            username: registration.username,
            password: registration.password,
            practice_name: registration.practice_name,
            registration_id,
            registered_at,
            decides_at: registered_at + Duration::seconds(delay_seconds),
            scheduled_decision: registration.decision,
            early_decision: None,
            suspended_since: None,
            is_demo: false,
            sequence: 0,
        });
        Ok(&self.accounts[&username])
    }

    /// Adds (or, for a demo account's username, replaces) an account from a scenario; its
    /// registration id is drawn like an API registration's.
    pub(crate) fn insert_seeded(&mut self, account: SeededAccount, seed: &DecisionSeed<'_>) {
        // The same draws as an API registration: the delay (the scenario gave its own), then
        // the id.
        let mut random = seed.random_number_generator(&account.username);
        let _delay_seconds: i64 =
            random.gen_range(SHORTEST_DECISION_DELAY_SECONDS..=LONGEST_DECISION_DELAY_SECONDS);
        let registration_id = uuid::Builder::from_random_bytes(random.r#gen()).into_uuid();
        let is_demo = self
            .accounts
            .get(&account.username)
            .is_some_and(|existing| existing.is_demo);
        self.insert(Account {
            username: account.username,
            password: account.password,
            practice_name: account.practice_name,
            registration_id: if is_demo {
                Uuid::nil()
            } else {
                registration_id
            },
            registered_at: account.registered_at.trunc_subsecs(0),
            decides_at: account.decides_at.trunc_subsecs(0),
            scheduled_decision: account.decision,
            early_decision: None,
            suspended_since: account.suspended_since.map(|since| since.trunc_subsecs(0)),
            is_demo,
            sequence: 0,
        });
    }

    /// Suspends an active account from sandbox time `at`, or lifts its suspension.
    pub(crate) fn set_suspended(
        &mut self,
        username: &str,
        suspended: bool,
        at: DateTime<Utc>,
    ) -> Result<(), String> {
        let account = self
            .accounts
            .get_mut(username)
            .ok_or_else(|| format!("no account {username:?}"))?;
        match (suspended, account.status_at(at)) {
            (true, AccountStatus::Active) => {
                account.suspended_since = Some(at.trunc_subsecs(0));
                Ok(())
            }
            (false, AccountStatus::Suspended) => {
                account.suspended_since = None;
                Ok(())
            }
            (true, status) => Err(format!(
                "{username:?} is {status:?}, not ACTIVE, so it cannot be suspended"
            )),
            (false, status) => Err(format!("{username:?} is {status:?}, not SUSPENDED")),
        }
    }

    /// Decides a pending account now instead of when its decision falls due.
    pub(crate) fn decide_early(
        &mut self,
        username: &str,
        decision: Decision,
        now: DateTime<Utc>,
    ) -> Result<&Account, EarlyDecisionError> {
        let account = self
            .accounts
            .get_mut(username)
            .ok_or_else(|| EarlyDecisionError::UnknownAccount(username.to_owned()))?;
        if account.status_at(now) != AccountStatus::Pending {
            return Err(EarlyDecisionError::AlreadyDecided(username.to_owned()));
        }
        account.early_decision = Some((decision, now.trunc_subsecs(0)));
        Ok(account)
    }

    /// Registrations made through the API (not demo accounts), oldest first.
    pub(crate) fn registrations(&self) -> Vec<&Account> {
        let mut registrations: Vec<&Account> = self
            .accounts
            .values()
            .filter(|account| !account.is_demo)
            .collect();
        registrations.sort_by_key(|account| account.sequence);
        registrations
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    const FIELD_NAMES: RegistrationFieldNames = RegistrationFieldNames {
        username: "username",
        password: "password",
        promo_code: "promoCode",
        practice_name: "practiceName",
        contact_email: "contactEmail",
    };

    fn form(username: &str, promo_code: &str) -> RegistrationForm {
        RegistrationForm {
            username: Some(username.to_owned()),
            password: Some("long-enough".to_owned()),
            promo_code: Some(promo_code.to_owned()),
            practice_name: Some("Example Clinic".to_owned()),
            contact_email: Some("front@example.test".to_owned()),
        }
    }

    fn seed(sandbox_seed: u64) -> DecisionSeed<'static> {
        DecisionSeed {
            sandbox_seed,
            namespace: "default",
            provider: Provider::Argus,
        }
    }

    #[test]
    fn passwords_match_only_exactly() {
        let password = Password::new("secret-password");
        assert!(password.matches("secret-password"));
        assert!(!password.matches("secret-passwort"));
        assert!(!password.matches("secret-password-and-more"));
        assert!(!password.matches("secret"));
        assert!(!password.matches(""));
        assert_eq!(format!("{password:?}"), "Password(<redacted>)");
    }

    #[test]
    fn a_registration_is_pending_until_its_decision_falls_due() {
        let now = Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).unwrap();
        let mut book = AccountBook::default();
        let registration = NewRegistration::parse(form("new.user", "SANDBOX-PROMO"), &FIELD_NAMES);
        let account = book
            .register(registration.unwrap(), &seed(42), now)
            .unwrap();
        let delay = account.decides_at - account.registered_at;
        assert!(delay >= Duration::days(3) && delay <= Duration::days(4));
        assert_eq!(
            account.status_at(account.decides_at - Duration::seconds(1)),
            AccountStatus::Pending
        );
        assert_eq!(account.status_at(account.decides_at), AccountStatus::Active);
        assert_eq!(
            account.decided_at(account.decides_at),
            Some(account.decides_at)
        );
    }

    #[test]
    fn the_same_seed_draws_the_same_decision_time_and_another_seed_does_not() {
        let now = Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).unwrap();
        let decides_at = |sandbox_seed| {
            let mut book = AccountBook::default();
            let registration =
                NewRegistration::parse(form("new.user", "SANDBOX-PROMO"), &FIELD_NAMES).unwrap();
            book.register(registration, &seed(sandbox_seed), now)
                .unwrap()
                .decides_at
        };
        assert_eq!(decides_at(7), decides_at(7));
        assert_ne!(decides_at(7), decides_at(8));
    }

    #[test]
    fn bad_fields_are_named_in_the_callers_words() {
        let mut missing_email = form("new.user", "SANDBOX-PROMO");
        missing_email.contact_email = Some("   ".to_owned());
        assert_eq!(
            NewRegistration::parse(missing_email, &FIELD_NAMES).unwrap_err(),
            RegistrationError::BadParam("contactEmail is required".to_owned())
        );
        assert!(matches!(
            NewRegistration::parse(form("no spaces allowed", "SANDBOX-PROMO"), &FIELD_NAMES),
            Err(RegistrationError::BadParam(_))
        ));
        assert_eq!(
            NewRegistration::parse(form("new.user", "FREE-MONEY"), &FIELD_NAMES).unwrap_err(),
            RegistrationError::InvalidPromoCode
        );
    }

    #[test]
    fn an_early_decision_stands_and_cannot_be_made_twice() {
        let now = Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).unwrap();
        let mut book = AccountBook::default();
        let registration =
            NewRegistration::parse(form("new.user", "SANDBOX-PROMO"), &FIELD_NAMES).unwrap();
        book.register(registration, &seed(42), now).unwrap();
        let account = book
            .decide_early("new.user", Decision::Reject, now)
            .unwrap();
        assert_eq!(
            account.status_at(now + Duration::days(10)),
            AccountStatus::Rejected
        );
        assert_eq!(
            book.decide_early("new.user", Decision::Approve, now)
                .unwrap_err(),
            EarlyDecisionError::AlreadyDecided("new.user".to_owned())
        );
    }
}
