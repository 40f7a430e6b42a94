//! Values with rules, parsed once at the edge (parse, don't validate). A value of one of these
//! types is valid by construction; the `parse` error text is shown to users as is.

use std::fmt;

/// The SMD providers the gateway speaks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Provider {
    /// Argus (Telstra Health).
    Argus,
    /// ReferralNet.
    ReferralNet,
}

impl Provider {
    /// Every provider, in display order.
    pub const ALL: [Provider; 2] = [Provider::Argus, Provider::ReferralNet];

    /// The stable storage code.
    pub fn code(self) -> &'static str {
        match self {
            Provider::Argus => "ARGUS",
            Provider::ReferralNet => "REFERRALNET",
        }
    }

    /// Parses a storage code.
    pub fn from_code(code: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|provider| provider.code() == code)
    }

    /// The name people know it by.
    pub fn display_name(self) -> &'static str {
        match self {
            Provider::Argus => "Argus",
            Provider::ReferralNet => "ReferralNet",
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.display_name())
    }
}

/// What a user may do in their group; comes from the verified token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Sees patients, sends secure messages.
    Practitioner,
    /// Manages the practice; cannot send secure messages.
    Administrator,
}

impl Role {
    /// The claim and storage code.
    pub fn code(self) -> &'static str {
        match self {
            Role::Practitioner => "practitioner",
            Role::Administrator => "administrator",
        }
    }

    /// Parses the `role` claim.
    pub fn from_code(code: &str) -> Option<Self> {
        match code {
            "practitioner" => Some(Role::Practitioner),
            "administrator" => Some(Role::Administrator),
            _ => None,
        }
    }
}

/// The state of a connection to a provider, for the group or for one practitioner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionStatus {
    /// Nothing linked.
    NotConnected,
    /// Registered with the provider, which has not decided yet.
    WaitingForApproval,
    /// Usable.
    Active,
    /// The provider turned the registration down.
    Rejected,
}

impl ConnectionStatus {
    /// The stable storage code.
    pub fn code(self) -> &'static str {
        match self {
            ConnectionStatus::NotConnected => "NOT_CONNECTED",
            ConnectionStatus::WaitingForApproval => "WAITING_FOR_APPROVAL",
            ConnectionStatus::Active => "ACTIVE",
            ConnectionStatus::Rejected => "REJECTED",
        }
    }

    /// Parses a storage code.
    pub fn from_code(code: &str) -> Option<Self> {
        [
            ConnectionStatus::NotConnected,
            ConnectionStatus::WaitingForApproval,
            ConnectionStatus::Active,
            ConnectionStatus::Rejected,
        ]
        .into_iter()
        .find(|status| status.code() == code)
    }
}

/// A provider login name: 3–64 characters of letters, digits, `.`, `_` or `-`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderUsername(String);

impl ProviderUsername {
    /// Parses a username typed by a user (surrounding spaces are dropped).
    pub fn parse(raw: &str) -> Result<Self, String> {
        let trimmed = raw.trim();
        if trimmed.len() < 3 || trimmed.len() > 64 {
            return Err("username must be 3 to 64 characters long".into());
        }
        if !trimmed
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err("username may contain only letters, digits, '.', '_' and '-'".into());
        }
        Ok(Self(trimmed.to_owned()))
    }

    /// The username as the provider expects it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A provider password. Its `Debug` never shows the secret, so it cannot end up in a log.
#[derive(Clone, PartialEq, Eq)]
pub struct ProviderPassword(String);

impl ProviderPassword {
    /// Parses a password: 8–256 characters, kept exactly as typed.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let length = raw.chars().count();
        if length < 8 {
            return Err("password must be at least 8 characters long".into());
        }
        if length > 256 {
            return Err("password must be at most 256 characters long".into());
        }
        Ok(Self(raw.to_owned()))
    }

    /// The secret itself; only adapters and the cipher call this.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Compares two passwords in time independent of where they differ.
    pub fn matches(&self, other: &ProviderPassword) -> bool {
        use subtle::ConstantTimeEq;
        self.0.len() == other.0.len() && bool::from(self.0.as_bytes().ct_eq(other.0.as_bytes()))
    }
}

impl fmt::Debug for ProviderPassword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ProviderPassword(<redacted>)")
    }
}

/// A username and password for one provider account.
#[derive(Debug, Clone)]
pub struct ProviderCredentials {
    /// The login name.
    pub username: ProviderUsername,
    /// The secret.
    pub password: ProviderPassword,
}

/// A promotional code for a new provider registration: 3–64 visible ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromoCode(String);

impl PromoCode {
    /// Parses a promo code (surrounding spaces dropped, case kept).
    pub fn parse(raw: &str) -> Result<Self, String> {
        let trimmed = raw.trim();
        if trimmed.len() < 3 || trimmed.len() > 64 || !trimmed.chars().all(|c| c.is_ascii_graphic())
        {
            return Err(
                "promo code must be 3 to 64 letters, digits or symbols without spaces".into(),
            );
        }
        Ok(Self(trimmed.to_owned()))
    }

    /// The code as typed.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A payment-method token from the payment gateway: `pm_` and 1–64 ASCII letters, digits or
/// `_` (the sandbox's `pm_sandbox_approve`, or a real gateway's `pm_1Nq…`). The token becomes
/// a path segment of the gateway's API, so nothing that could change a URL's meaning (`/`, `?`,
/// `#`, `%`, `.`, spaces) can be part of one; it is refused here, before any network call.
#[derive(Clone, PartialEq, Eq)]
pub struct PaymentToken(String);

impl PaymentToken {
    /// The longest part after `pm_`.
    const MAX_BODY: usize = 64;

    /// Parses a token exactly as given (no trimming: a token with spaces is not a token).
    pub fn parse(raw: &str) -> Result<Self, String> {
        let valid = raw.strip_prefix("pm_").is_some_and(|body| {
            (1..=Self::MAX_BODY).contains(&body.len())
                && body.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        });
        if !valid {
            return Err(
                "payment method token must be pm_ followed by 1 to 64 letters, digits or _, e.g. pm_sandbox_approve"
                    .into(),
            );
        }
        Ok(Self(raw.to_owned()))
    }

    /// The token.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for PaymentToken {
    /// Only the start: a token is a credential for charging the practice's card.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: String = self.0.chars().take(6).collect();
        write!(f, "PaymentToken({shown}…)")
    }
}

/// The practice's name as registered with a provider: 2–200 characters, no control characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PracticeName(String);

impl PracticeName {
    /// Parses a practice name.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let trimmed = raw.trim();
        let length = trimmed.chars().count();
        if !(2..=200).contains(&length) || trimmed.chars().any(char::is_control) {
            return Err(
                "practice name must be 2 to 200 characters without control characters".into(),
            );
        }
        Ok(Self(trimmed.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An email address the provider can reach the practice at (a pragmatic check: one `@`, a dot
/// in the domain, no spaces, at most 254 characters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContactEmail(String);

impl ContactEmail {
    /// Parses an email address.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let trimmed = raw.trim();
        let valid = trimmed.len() <= 254
            && !trimmed.chars().any(|c| c.is_whitespace() || c.is_control())
            && match trimmed.split_once('@') {
                Some((local, domain)) => {
                    !local.is_empty()
                        && !domain.contains('@')
                        && domain.contains('.')
                        && !domain.starts_with('.')
                        && !domain.ends_with('.')
                }
                None => false,
            };
        if !valid {
            return Err("contact email must be an address like reception@example.com.au".into());
        }
        Ok(Self(trimmed.to_owned()))
    }

    /// The address.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A Healthcare Provider Identifier for an individual (HPI-I): 16 digits starting `800361`
/// with a valid Luhn check digit. [`Hpii::parse`] is the one way to make one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hpii(String);

impl Hpii {
    /// Parses an HPI-I (surrounding spaces are dropped).
    pub fn parse(raw: &str) -> Result<Self, String> {
        let value = raw.trim();
        if !hpii_check_digit_holds(value) {
            return Err("an HPI-I is 16 digits starting 800361 with a valid check digit".into());
        }
        Ok(Self(value.to_owned()))
    }

    /// The 16 digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Hpii {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn hpii_check_digit_holds(value: &str) -> bool {
    if value.len() != 16
        || !value.starts_with("800361")
        || !value.bytes().all(|b| b.is_ascii_digit())
    {
        return false;
    }
    let sum: u32 = value
        .bytes()
        .rev()
        .enumerate()
        .map(|(index, byte)| {
            let digit = u32::from(byte - b'0');
            if index % 2 == 1 {
                let doubled = digit * 2;
                if doubled > 9 { doubled - 9 } else { doubled }
            } else {
                digit
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// A secure message's id (a UUID v7, so ids sort by creation). It is also the provider-side
/// client message id, which makes provider retries idempotent.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(String);

impl MessageId {
    /// A fresh id.
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7().to_string())
    }

    /// An id as stored or as a client names it (looked up, never trusted to exist).
    pub fn from_stored(value: String) -> Self {
        Self(value)
    }

    /// The id's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id's text, owned.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a secure message is. Outbound: `Queued` → `Sent` → `Delivered` → `Acknowledged`, or
/// `Failed`. Inbound messages arrive `Delivered` and become `Acknowledged` when read and accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageStatus {
    /// Stored and waiting for the provider.
    Queued,
    /// The provider accepted it.
    Sent,
    /// It reached the recipient's endpoint (or, inbound, the practice).
    Delivered,
    /// The recipient's system acknowledged it.
    Acknowledged,
    /// It could not be delivered.
    Failed,
}

impl MessageStatus {
    /// Every status.
    pub const ALL: [MessageStatus; 5] = [
        MessageStatus::Queued,
        MessageStatus::Sent,
        MessageStatus::Delivered,
        MessageStatus::Acknowledged,
        MessageStatus::Failed,
    ];

    /// The stable storage code.
    pub fn code(self) -> &'static str {
        match self {
            MessageStatus::Queued => "QUEUED",
            MessageStatus::Sent => "SENT",
            MessageStatus::Delivered => "DELIVERED",
            MessageStatus::Acknowledged => "ACKNOWLEDGED",
            MessageStatus::Failed => "FAILED",
        }
    }

    /// Parses a storage code.
    pub fn from_code(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.code() == code)
    }
}

impl fmt::Display for MessageStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// Why a sent message needs its sender's attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AttentionReason {
    /// The provider accepted it, but it has not reached the recipient's endpoint in time.
    NotDelivered,
    /// It reached the recipient's endpoint, but their system has not acknowledged it in time.
    NotAcknowledged,
    /// The provider accepted it but never delivered it: it is `FAILED` (not refunded).
    Expired,
}

impl AttentionReason {
    /// Every reason.
    pub const ALL: [AttentionReason; 3] = [
        AttentionReason::NotDelivered,
        AttentionReason::NotAcknowledged,
        AttentionReason::Expired,
    ];

    /// The stable code (audit details).
    pub fn code(self) -> &'static str {
        match self {
            AttentionReason::NotDelivered => "NOT_DELIVERED",
            AttentionReason::NotAcknowledged => "NOT_ACKNOWLEDGED",
            AttentionReason::Expired => "EXPIRED",
        }
    }
}

/// Which way a secure message went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Received by the practice.
    Inbound,
    /// Sent by a practitioner of the practice.
    Outbound,
}

impl Direction {
    /// Both directions.
    pub const ALL: [Direction; 2] = [Direction::Inbound, Direction::Outbound];

    /// The stable storage code.
    pub fn code(self) -> &'static str {
        match self {
            Direction::Inbound => "INBOUND",
            Direction::Outbound => "OUTBOUND",
        }
    }

    /// Parses a storage code.
    pub fn from_code(code: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|direction| direction.code() == code)
    }
}

/// Everything a provider needs to register a new account.
#[derive(Debug, Clone)]
pub struct Registration {
    /// The login to create.
    pub credentials: ProviderCredentials,
    /// The promo code the practice was given.
    pub promo_code: PromoCode,
    /// The practice's name.
    pub practice_name: PracticeName,
    /// Where the provider can reach the practice.
    pub contact_email: ContactEmail,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payment_tokens_follow_a_strict_grammar() {
        let longest = format!("pm_{}", "a".repeat(64));
        for valid in [
            "pm_sandbox_approve",
            "pm_sandbox_decline",
            "pm_sandbox_flaky",
            "pm_1NqX9zLkdIwHu7ix",
            "pm_x",
            longest.as_str(),
        ] {
            assert_eq!(
                PaymentToken::parse(valid).map(|token| token.as_str().to_owned()),
                Ok(valid.to_owned())
            );
        }
        let too_long = format!("pm_{}", "a".repeat(65));
        for invalid in [
            "",
            "pm_",
            "sandbox_approve",
            "PM_sandbox_approve",
            "pm_sandbox_approve#frag",
            "pm_sandbox_approve?x=1",
            "pm_%2e%2e",
            "pm_../charges",
            "pm_sandbox/approve",
            "pm_sandbox approve",
            " pm_sandbox_approve",
            "pm_sandbox_approve ",
            "pm_sandbox-approve",
            "pm_sandbox.approve",
            "pm_sandbox_appröve",
            "pm_sandbox\n",
            "pm_sandbox\u{0}",
            too_long.as_str(),
        ] {
            assert!(PaymentToken::parse(invalid).is_err(), "{invalid:?}");
        }
    }

    #[test]
    fn a_payment_tokens_debug_form_shows_only_its_start() {
        let token = PaymentToken::parse("pm_sandbox_approve").unwrap();
        assert_eq!(format!("{token:?}"), "PaymentToken(pm_san…)");
    }

    #[test]
    fn usernames_are_trimmed_and_restricted_to_safe_characters() {
        assert_eq!(
            ProviderUsername::parse("  demo.argus ").unwrap().as_str(),
            "demo.argus"
        );
        assert!(ProviderUsername::parse("ab").is_err());
        assert!(ProviderUsername::parse("bad name").is_err());
        assert!(ProviderUsername::parse("drop;table").is_err());
    }

    #[test]
    fn a_password_never_shows_in_debug_output() {
        let password = ProviderPassword::parse("argus-sandbox-pw").unwrap();
        assert!(!format!("{password:?}").contains("argus"));
        assert!(ProviderPassword::parse("short").is_err());
    }

    #[test]
    fn passwords_match_only_when_equal() {
        let a = ProviderPassword::parse("argus-sandbox-pw").unwrap();
        assert!(a.matches(&ProviderPassword::parse("argus-sandbox-pw").unwrap()));
        assert!(!a.matches(&ProviderPassword::parse("argus-sandbox-px").unwrap()));
        assert!(!a.matches(&ProviderPassword::parse("argus-sandbox-pw2").unwrap()));
    }

    #[test]
    fn contact_emails_need_a_domain_with_a_dot() {
        assert!(ContactEmail::parse("reception@clinic.com.au").is_ok());
        assert!(ContactEmail::parse("reception@clinic").is_err());
        assert!(ContactEmail::parse("reception clinic.com.au").is_err());
        assert!(ContactEmail::parse("a@b@c.com").is_err());
    }

    #[test]
    fn hpii_numbers_need_the_prefix_sixteen_digits_and_a_luhn_check_digit() {
        // 800361000000000 + check digit: digits sum (Luhn) must be a multiple of 10.
        let valid = (0..10)
            .map(|d| format!("800361000000000{d}"))
            .find(|candidate| Hpii::parse(candidate).is_ok());
        let valid = valid.expect("exactly one check digit works");
        assert_eq!(valid.len(), 16);
        let wrong_digit = format!("{}{}", &valid[..15], (valid.as_bytes()[15] - b'0' + 1) % 10);
        for refused in [
            wrong_digit.as_str(),
            "800360000000000000",
            "80036100000000a0",
            "",
            "8003610000000006 1",
        ] {
            assert!(Hpii::parse(refused).is_err(), "{refused:?}");
        }
    }

    #[test]
    fn an_hpii_round_trips_through_its_text_and_drops_surrounding_spaces() {
        let hpii = Hpii::parse(" 8003610000000006 ").unwrap();
        assert_eq!(hpii.as_str(), "8003610000000006");
        assert_eq!(Hpii::parse(&hpii.to_string()), Ok(hpii));
    }

    #[test]
    fn message_statuses_and_directions_round_trip_and_unknown_codes_do_not_parse() {
        for status in MessageStatus::ALL {
            assert_eq!(MessageStatus::from_code(status.code()), Some(status));
        }
        for direction in Direction::ALL {
            assert_eq!(Direction::from_code(direction.code()), Some(direction));
        }
        for unknown in ["", "queued", "RECEIVED", "READ", "FAILED "] {
            assert_eq!(MessageStatus::from_code(unknown), None, "{unknown:?}");
        }
        assert_eq!(Direction::from_code("SIDEWAYS"), None);
    }

    #[test]
    fn codes_round_trip() {
        for provider in Provider::ALL {
            assert_eq!(Provider::from_code(provider.code()), Some(provider));
        }
        assert_eq!(
            ConnectionStatus::from_code("WAITING_FOR_APPROVAL"),
            Some(ConnectionStatus::WaitingForApproval)
        );
        assert_eq!(Role::from_code("administrator"), Some(Role::Administrator));
        assert_eq!(Role::from_code("root"), None);
    }
}
