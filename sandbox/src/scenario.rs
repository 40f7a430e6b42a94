//! Scenarios: a TOML file that seeds one namespace — its clock, seed, accounts in any state,
//! extra directory entries, and events at given sandbox times (registration decisions,
//! suspensions, inbound referrals, faults). The format is documented in
//! `sandbox/scenarios/README.md`; the shipped examples sit beside it.
//!
//! [`Scenario::parse`] checks everything that can be checked from the text alone, and every
//! refusal names the line and column, the field, and what is expected. What depends on the
//! sandbox (the directory) is checked by [`Scenario::check_against`]. A checked scenario seeds
//! a namespace without failing ([`Scenario::seed_namespace`]), so a sandbox never starts half
//! seeded.

use std::collections::HashSet;
use std::fmt;
use std::path::Path;

use chrono::{DateTime, Duration, SubsecRound, Utc};
use serde::Deserialize;
use toml::Spanned;

use crate::SandboxConfig;
use crate::accounts::{
    ARGUS_DEMO_ACCOUNT, AccountBook, Decision, DecisionSeed, Password, REFERRALNET_DEMO_ACCOUNT,
    SeededAccount,
};
use crate::clock::{SandboxClock, validate_clock_speed};
use crate::directory::{Directory, ExtraEntry, HPII_PREFIX, luhn_valid};
use crate::faults::{Fault, FaultAnswer, FaultKind, FaultQueue, FaultRoute, FaultWindow};
use crate::namespace::NamespaceName;
use crate::provider::{Provider, Service};
use crate::random::NamespaceRandom;
use crate::schedule::{AccountChange, Schedule, ScheduledAction, ScheduledEvent};

/// A scenario file that cannot be used: where, and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScenarioError {
    /// The file (or `request body`) the scenario came from.
    pub source: String,
    /// 1-based line and column of the offending value, when known.
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// What is wrong and what is expected.
    pub message: String,
}

impl fmt::Display for ScenarioError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(line), Some(column)) => write!(
                formatter,
                "{}: line {line}, column {column}: {}",
                self.source, self.message
            ),
            (Some(line), None) => {
                write!(formatter, "{}: line {line}: {}", self.source, self.message)
            }
            _ => write!(formatter, "{}: {}", self.source, self.message),
        }
    }
}

impl std::error::Error for ScenarioError {}

/// A sandbox time in a scenario: an RFC 3339 time, or an offset from the clock's start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ScenarioTime {
    At(DateTime<Utc>),
    After(Duration),
}

impl ScenarioTime {
    fn resolve(self, start: DateTime<Utc>) -> DateTime<Utc> {
        match self {
            ScenarioTime::At(at) => at,
            ScenarioTime::After(offset) => start + offset,
        }
    }
}

const TIME_EXPECTED: &str = "expected an RFC 3339 time with an offset (2030-01-01T09:00:00Z) or \
     an offset from the clock's start such as \"+90s\", \"+2h30m\" or \"+4d\" (units d, h, m, s)";

impl TryFrom<toml::Value> for ScenarioTime {
    type Error = String;

    fn try_from(value: toml::Value) -> Result<ScenarioTime, String> {
        let text = match value {
            toml::Value::String(text) => text,
            toml::Value::Datetime(datetime) => datetime.to_string(),
            other => return Err(format!("got {}: {TIME_EXPECTED}", other.type_str())),
        };
        let text = text.trim();
        if let Some(offset) = text.strip_prefix('+') {
            return parse_offset(offset)
                .map(ScenarioTime::After)
                .ok_or_else(|| format!("{text:?} is not an offset: {TIME_EXPECTED}"));
        }
        DateTime::parse_from_rfc3339(text)
            .map(|at| ScenarioTime::At(at.with_timezone(&Utc)))
            .map_err(|_| format!("{text:?} is not a time: {TIME_EXPECTED}"))
    }
}

/// `4d`, `2h30m`, `90s`, `0s`: whole numbers each followed by d, h, m or s, largest first.
fn parse_offset(text: &str) -> Option<Duration> {
    if text.is_empty() {
        return None;
    }
    let mut total = Duration::zero();
    let mut digits = String::new();
    let mut last_unit_seconds = i64::MAX;
    for character in text.chars() {
        if character.is_ascii_digit() {
            digits.push(character);
            continue;
        }
        let unit_seconds = match character {
            'd' => 86_400,
            'h' => 3_600,
            'm' => 60,
            's' => 1,
            _ => return None,
        };
        if digits.is_empty() || unit_seconds >= last_unit_seconds {
            return None;
        }
        last_unit_seconds = unit_seconds;
        let amount: i64 = digits.parse().ok()?;
        digits.clear();
        total = total.checked_add(&Duration::try_seconds(amount.checked_mul(unit_seconds)?)?)?;
    }
    // Digits left without a unit.
    digits.is_empty().then_some(total)
}

/// An account status a scenario may give.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum AccountStatusWord {
    #[serde(alias = "approved")]
    Active,
    Pending,
    #[serde(alias = "declined")]
    Rejected,
    Suspended,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScenarioFile {
    description: Option<String>,
    namespace: Option<Spanned<String>>,
    seed: Option<u64>,
    clock: Option<ClockTable>,
    #[serde(default)]
    accounts: Vec<Spanned<AccountTable>>,
    #[serde(default)]
    directory: Vec<Spanned<DirectoryTable>>,
    #[serde(default)]
    decisions: Vec<Spanned<DecisionTable>>,
    #[serde(default)]
    inbound: Vec<Spanned<InboundTable>>,
    #[serde(default)]
    faults: Vec<Spanned<FaultTable>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClockTable {
    start: Option<Spanned<ScenarioTimeField>>,
    speed: Option<Spanned<f64>>,
}

/// A time field, parsed from a string or a TOML date-time.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(try_from = "toml::Value")]
struct ScenarioTimeField(ScenarioTime);

impl TryFrom<toml::Value> for ScenarioTimeField {
    type Error = String;

    fn try_from(value: toml::Value) -> Result<ScenarioTimeField, String> {
        ScenarioTime::try_from(value).map(ScenarioTimeField)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountTable {
    provider: Provider,
    username: Spanned<String>,
    password: Spanned<String>,
    practice_name: Spanned<String>,
    status: AccountStatusWord,
    registered_at: Option<ScenarioTimeField>,
    decision: Option<Spanned<Decision>>,
    decides_at: Option<Spanned<ScenarioTimeField>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DirectoryTable {
    hpii: Spanned<String>,
    given_name: Spanned<String>,
    family_name: Spanned<String>,
    specialty: Spanned<String>,
    organisation: Spanned<String>,
    suburb: Spanned<String>,
    state: Spanned<String>,
    postcode: Spanned<String>,
    providers: Spanned<Vec<Provider>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DecisionTable {
    provider: Provider,
    username: Spanned<String>,
    decision: AccountChange,
    at: ScenarioTimeField,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InboundTable {
    provider: Provider,
    account: Spanned<String>,
    at: Option<ScenarioTimeField>,
    from_hpii: Option<Spanned<String>>,
    recipient_hpii: Option<Spanned<String>>,
    recipient_name: Option<String>,
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultTable {
    provider: Service,
    route: Spanned<FaultRoute>,
    kind: FaultKind,
    count: Option<Spanned<u32>>,
    at: Option<Spanned<ScenarioTimeField>>,
    from: Option<Spanned<ScenarioTimeField>>,
    until: Option<Spanned<ScenarioTimeField>>,
    status: Option<u16>,
    retry_after_seconds: Option<u64>,
    hold_seconds: Option<u64>,
}

/// An account as the scenario gives it, checked.
#[derive(Clone, Debug)]
struct ScenarioAccount {
    provider: Provider,
    username: String,
    password: String,
    practice_name: String,
    status: AccountStatusWord,
    registered_at: Option<ScenarioTime>,
    decision: Decision,
    decides_at: Option<ScenarioTime>,
}

#[derive(Clone, Debug)]
struct ScenarioInbound {
    line: usize,
    at: ScenarioTime,
    provider: Provider,
    account: String,
    from_hpii: Option<String>,
    recipient_hpii: Option<String>,
    recipient_name: Option<String>,
    text: Option<String>,
}

#[derive(Clone, Debug)]
enum ScenarioFaultTiming {
    /// The next `count` calls from `at` on.
    Counted {
        count: u32,
        at: Option<ScenarioTime>,
    },
    /// Every call while the clock is in `[from, until)`.
    Window {
        from: Option<ScenarioTime>,
        until: ScenarioTime,
    },
}

#[derive(Clone, Debug)]
struct ScenarioFault {
    provider: Service,
    route: FaultRoute,
    answer: FaultAnswer,
    timing: ScenarioFaultTiming,
}

#[derive(Clone, Debug)]
struct ScenarioDecision {
    at: ScenarioTime,
    provider: Provider,
    username: String,
    change: AccountChange,
}

/// A checked scenario, ready to seed a namespace.
#[derive(Clone, Debug)]
pub struct Scenario {
    source: String,
    description: Option<String>,
    namespace: Option<NamespaceName>,
    seed: Option<u64>,
    start: Option<DateTime<Utc>>,
    speed: Option<f64>,
    accounts: Vec<ScenarioAccount>,
    directory: Vec<(usize, ExtraEntry)>,
    decisions: Vec<ScenarioDecision>,
    inbound: Vec<ScenarioInbound>,
    faults: Vec<ScenarioFault>,
}

/// Turns byte offsets into the line and column an error names.
struct Locator<'a> {
    source: &'a str,
    text: &'a str,
}

impl Locator<'_> {
    fn line_and_column(&self, offset: usize) -> (usize, usize) {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before
            .rfind('\n')
            .map_or(before.chars().count(), |newline| {
                before[newline + 1..].chars().count()
            })
            + 1;
        (line, column)
    }

    fn error_at(&self, span: std::ops::Range<usize>, message: impl Into<String>) -> ScenarioError {
        let (line, column) = self.line_and_column(span.start);
        ScenarioError {
            source: self.source.to_owned(),
            line: Some(line),
            column: Some(column),
            message: message.into(),
        }
    }

    fn line_of(&self, span: std::ops::Range<usize>) -> usize {
        self.line_and_column(span.start).0
    }
}

/// Checks a username like the providers' registration does: 3 to 64 letters, digits, `.`, `_`
/// or `-`.
fn is_valid_username(username: &str) -> bool {
    (3..=64).contains(&username.len())
        && username
            .chars()
            .all(|character| character.is_ascii_alphanumeric() || ".-_".contains(character))
}

fn is_valid_hpii(hpii: &str) -> bool {
    hpii.len() == 16 && hpii.starts_with(HPII_PREFIX) && luhn_valid(hpii)
}

const HPII_EXPECTED: &str =
    "expected 16 digits starting 800361 whose last digit is the Luhn check digit";

impl Scenario {
    /// Reads and checks a scenario file.
    pub fn from_file(path: &Path) -> Result<Scenario, ScenarioError> {
        let source = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|error| ScenarioError {
            source: source.clone(),
            line: None,
            column: None,
            message: format!("cannot read the file: {error}"),
        })?;
        Scenario::parse(&text, &source)
    }

    /// Checks a scenario's text; `source` names it in errors (a path, or `request body`).
    pub fn parse(text: &str, source: &str) -> Result<Scenario, ScenarioError> {
        let locator = Locator { source, text };
        let file: ScenarioFile = toml::from_str(text).map_err(|error| {
            let message = error.message().trim_end().to_owned();
            match error.span() {
                Some(span) => locator.error_at(span, message),
                None => ScenarioError {
                    source: source.to_owned(),
                    line: None,
                    column: None,
                    message,
                },
            }
        })?;

        let namespace = file
            .namespace
            .map(|name| {
                NamespaceName::parse(name.get_ref()).map_err(|message| {
                    locator.error_at(name.span(), format!("namespace: {message}"))
                })
            })
            .transpose()?;
        let (start, speed) = match file.clock {
            None => (None, None),
            Some(clock) => {
                let start = clock
                    .start
                    .map(|start| match start.get_ref().0 {
                        ScenarioTime::At(at) => Ok(at),
                        ScenarioTime::After(_) => Err(locator.error_at(
                            start.span(),
                            "clock.start must be a time such as 2030-01-01T09:00:00Z, not an offset",
                        )),
                    })
                    .transpose()?;
                let speed = clock
                    .speed
                    .map(|speed| {
                        let value = *speed.get_ref();
                        if value == 0.0 {
                            Ok(0.0)
                        } else {
                            validate_clock_speed(value).map_err(|error| {
                                locator.error_at(
                                    speed.span(),
                                    format!("clock.speed: {error}, or 0 for a clock that moves only when set or advanced"),
                                )
                            })
                        }
                    })
                    .transpose()?;
                (start, speed)
            }
        };

        let accounts = check_accounts(&locator, file.accounts)?;
        let directory = check_directory(&locator, file.directory)?;
        let decisions = file
            .decisions
            .into_iter()
            .map(|decision| {
                let decision = decision.into_inner();
                if !is_valid_username(decision.username.get_ref()) {
                    return Err(locator.error_at(
                        decision.username.span(),
                        "decisions.username: expected 3 to 64 letters, digits, '.', '_' or '-'",
                    ));
                }
                Ok(ScenarioDecision {
                    at: decision.at.0,
                    provider: decision.provider,
                    username: decision.username.into_inner(),
                    change: decision.decision,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let inbound = check_inbound(&locator, file.inbound, &accounts)?;
        let faults = check_faults(&locator, file.faults)?;

        Ok(Scenario {
            source: source.to_owned(),
            description: file.description,
            namespace,
            seed: file.seed,
            start,
            speed,
            accounts,
            directory,
            decisions,
            inbound,
            faults,
        })
    }

    /// Where the scenario came from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The scenario's `description`.
    pub fn description(&self) -> Option<&str> {
        self.description.as_deref()
    }

    /// The namespace the scenario seeds (`namespace`, else `default`).
    pub fn namespace(&self) -> &str {
        self.namespace
            .as_ref()
            .map_or(crate::namespace::DEFAULT_NAMESPACE, NamespaceName::as_str)
    }

    /// The `namespace` the file names, if it names one.
    pub(crate) fn named_namespace(&self) -> Option<&str> {
        self.namespace.as_ref().map(NamespaceName::as_str)
    }

    pub(crate) fn namespace_name(&self) -> NamespaceName {
        NamespaceName::parse(self.namespace()).expect("checked when parsed")
    }

    /// The scenario's `seed`: its namespace then replays exactly.
    pub fn seed(&self) -> Option<u64> {
        self.seed
    }

    /// The extra directory entries, to add to the sandbox's directory when it is made.
    pub(crate) fn extra_directory_entries(&self) -> &[(usize, ExtraEntry)] {
        &self.directory
    }

    fn error_at_line(&self, line: usize, message: String) -> ScenarioError {
        ScenarioError {
            source: self.source.clone(),
            line: Some(line),
            column: None,
            message,
        }
    }

    /// Checks what depends on the sandbox: every extra directory entry is in `directory` as
    /// given (so it was added when the sandbox was made), and every `from_hpii` is a directory
    /// entry its provider reaches.
    pub(crate) fn check_against(&self, directory: &Directory) -> Result<(), ScenarioError> {
        for (line, extra) in &self.directory {
            if !directory.holds_extra(extra) {
                return Err(self.error_at_line(
                    *line,
                    format!(
                        "directory: HPI-I {} is not in this sandbox's directory as given; \
                         directory entries are shared by every namespace and can only be added \
                         when the sandbox starts (smd-sandbox --scenario)",
                        extra.hpii
                    ),
                ));
            }
        }
        for inbound in &self.inbound {
            if let Some(hpii) = &inbound.from_hpii {
                let reachable = directory
                    .find(hpii)
                    .is_some_and(|entry| entry.reachable_on(inbound.provider));
                if !reachable {
                    return Err(self.error_at_line(
                        inbound.line,
                        format!(
                            "inbound.from_hpii: {hpii} is not a directory practitioner {} reaches",
                            inbound.provider.as_str()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The clock, accounts, faults, random stream and schedule of a namespace starting this
    /// scenario now. Cannot fail: everything was checked.
    pub(crate) fn seed_namespace(
        &self,
        namespace: &str,
        config: &SandboxConfig,
    ) -> SeededNamespace {
        let start = self.start.unwrap_or_else(Utc::now).trunc_subsecs(0);
        let clock = SandboxClock::starting_at(start, self.speed.unwrap_or(config.clock_speed));
        let mut random = match self.seed {
            Some(seed) => NamespaceRandom::seeded(seed, namespace),
            None => NamespaceRandom::from_entropy(),
        };
        let sandbox_seed = self.seed.unwrap_or(config.seed);
        let mut argus_accounts = AccountBook::with_demo_account(&ARGUS_DEMO_ACCOUNT, start);
        let mut referralnet_accounts =
            AccountBook::with_demo_account(&REFERRALNET_DEMO_ACCOUNT, start);
        for account in &self.accounts {
            let decision_seed = DecisionSeed {
                sandbox_seed,
                namespace,
                provider: account.provider,
            };
            let book = match account.provider {
                Provider::Argus => &mut argus_accounts,
                Provider::ReferralNet => &mut referralnet_accounts,
            };
            book.insert_seeded(
                seeded_account(account, start, &decision_seed),
                &decision_seed,
            );
        }

        let mut faults = FaultQueue::default();
        let mut events = Vec::new();
        for fault in &self.faults {
            match fault.timing {
                ScenarioFaultTiming::Counted { count, at } => {
                    let queued = Fault::queued(
                        fault.provider,
                        fault.route,
                        fault.answer,
                        count,
                        &mut random,
                    );
                    match at.map(|at| at.resolve(start)) {
                        Some(at) if at > start => events.push(ScheduledEvent {
                            at,
                            action: ScheduledAction::Fault { fault: queued },
                        }),
                        _ => faults.add(queued),
                    }
                }
                ScenarioFaultTiming::Window { from, until } => {
                    faults.add_window(FaultWindow::new(
                        fault.provider,
                        fault.route,
                        fault.answer,
                        (
                            from.map_or(start, |from| from.resolve(start)),
                            until.resolve(start),
                        ),
                        &mut random,
                    ));
                }
            }
        }
        for decision in &self.decisions {
            events.push(ScheduledEvent {
                at: decision.at.resolve(start).trunc_subsecs(0),
                action: ScheduledAction::Account {
                    provider: decision.provider,
                    username: decision.username.clone(),
                    change: decision.change,
                },
            });
        }
        for inbound in &self.inbound {
            events.push(ScheduledEvent {
                at: inbound.at.resolve(start).trunc_subsecs(0),
                action: ScheduledAction::Inbound {
                    provider: inbound.provider,
                    account: inbound.account.clone(),
                    from_hpii: inbound.from_hpii.clone(),
                    recipient_hpii: inbound.recipient_hpii.clone(),
                    recipient_name: inbound.recipient_name.clone(),
                    text: inbound.text.clone(),
                },
            });
        }
        SeededNamespace {
            clock,
            random,
            sandbox_seed,
            argus_accounts,
            referralnet_accounts,
            faults,
            schedule: Schedule::of(events),
        }
    }
}

/// What a scenario gives a new namespace.
pub(crate) struct SeededNamespace {
    pub(crate) clock: SandboxClock,
    pub(crate) random: NamespaceRandom,
    /// The seed registration decisions are drawn from.
    pub(crate) sandbox_seed: u64,
    pub(crate) argus_accounts: AccountBook,
    pub(crate) referralnet_accounts: AccountBook,
    pub(crate) faults: FaultQueue,
    pub(crate) schedule: Schedule,
}

/// How long before the clock's start an account given as already decided registered, and how
/// long its decision took (like the demo accounts).
const SETTLED_ACCOUNT_AGE_DAYS: i64 = 30;
const SETTLED_ACCOUNT_DECISION_DAYS: i64 = 3;

fn seeded_account(
    account: &ScenarioAccount,
    start: DateTime<Utc>,
    seed: &DecisionSeed<'_>,
) -> SeededAccount {
    let password = Password::new(account.password.clone());
    let settled_registration = || {
        account
            .registered_at
            .map_or(start - Duration::days(SETTLED_ACCOUNT_AGE_DAYS), |at| {
                at.resolve(start)
            })
    };
    let (registered_at, decision, decides_at, suspended_since) = match account.status {
        AccountStatusWord::Pending => {
            let registered_at = account.registered_at.map_or(start, |at| at.resolve(start));
            let decides_at = account.decides_at.map_or_else(
                || registered_at + seed.decision_delay(&account.username),
                |at| at.resolve(start),
            );
            (registered_at, account.decision, decides_at, None)
        }
        AccountStatusWord::Active | AccountStatusWord::Rejected | AccountStatusWord::Suspended => {
            let registered_at = settled_registration();
            let decides_at = (registered_at + Duration::days(SETTLED_ACCOUNT_DECISION_DAYS))
                .min(start)
                .max(registered_at);
            let decision = if account.status == AccountStatusWord::Rejected {
                Decision::Reject
            } else {
                Decision::Approve
            };
            let suspended_since = (account.status == AccountStatusWord::Suspended).then_some(start);
            (registered_at, decision, decides_at, suspended_since)
        }
    };
    SeededAccount {
        username: account.username.clone(),
        password,
        practice_name: account.practice_name.clone(),
        registered_at,
        decision,
        decides_at,
        suspended_since,
    }
}

fn non_blank(
    locator: &Locator<'_>,
    field: &str,
    value: Spanned<String>,
) -> Result<String, ScenarioError> {
    if value.get_ref().trim().is_empty() {
        return Err(locator.error_at(value.span(), format!("{field}: must not be blank")));
    }
    Ok(value.into_inner().trim().to_owned())
}

fn check_accounts(
    locator: &Locator<'_>,
    tables: Vec<Spanned<AccountTable>>,
) -> Result<Vec<ScenarioAccount>, ScenarioError> {
    let mut seen = HashSet::new();
    let mut accounts = Vec::with_capacity(tables.len());
    for table in tables {
        let table = table.into_inner();
        if !is_valid_username(table.username.get_ref()) {
            return Err(locator.error_at(
                table.username.span(),
                "accounts.username: expected 3 to 64 letters, digits, '.', '_' or '-'",
            ));
        }
        if !seen.insert((table.provider, table.username.get_ref().clone())) {
            return Err(locator.error_at(
                table.username.span(),
                format!(
                    "accounts.username: {:?} is already an account of {} in this scenario",
                    table.username.get_ref(),
                    table.provider.as_str()
                ),
            ));
        }
        if table.password.get_ref().chars().count() < 8 {
            return Err(locator.error_at(
                table.password.span(),
                "accounts.password: expected at least 8 characters",
            ));
        }
        let pending = table.status == AccountStatusWord::Pending;
        if let (false, Some(decision)) = (pending, &table.decision) {
            return Err(locator.error_at(
                decision.span(),
                "accounts.decision: only for status = \"pending\" (the decision still to come)",
            ));
        }
        if let (false, Some(decides_at)) = (pending, &table.decides_at) {
            return Err(locator.error_at(
                decides_at.span(),
                "accounts.decides_at: only for status = \"pending\" (when the decision comes)",
            ));
        }
        let practice_name = non_blank(locator, "accounts.practice_name", table.practice_name)?;
        accounts.push(ScenarioAccount {
            provider: table.provider,
            username: table.username.into_inner(),
            password: table.password.into_inner(),
            practice_name,
            status: table.status,
            registered_at: table.registered_at.map(|at| at.0),
            decision: table
                .decision
                .map_or(Decision::Approve, Spanned::into_inner),
            decides_at: table.decides_at.map(|at| at.into_inner().0),
        });
    }
    Ok(accounts)
}

fn check_directory(
    locator: &Locator<'_>,
    tables: Vec<Spanned<DirectoryTable>>,
) -> Result<Vec<(usize, ExtraEntry)>, ScenarioError> {
    let mut seen = HashSet::new();
    let mut entries = Vec::with_capacity(tables.len());
    for table in tables {
        let line = locator.line_of(table.span());
        let table = table.into_inner();
        let hpii = table.hpii.get_ref().trim().to_owned();
        if !is_valid_hpii(&hpii) {
            return Err(locator.error_at(
                table.hpii.span(),
                format!("directory.hpii: {HPII_EXPECTED}"),
            ));
        }
        if !seen.insert(hpii.clone()) {
            return Err(locator.error_at(
                table.hpii.span(),
                format!("directory.hpii: {hpii} is already in this scenario's directory"),
            ));
        }
        let providers = table.providers.get_ref();
        if providers.is_empty() {
            return Err(locator.error_at(
                table.providers.span(),
                "directory.providers: expected one or both of \"argus\" and \"referralnet\"",
            ));
        }
        let on_argus = providers.contains(&Provider::Argus);
        let on_referralnet = providers.contains(&Provider::ReferralNet);
        entries.push((
            line,
            ExtraEntry {
                hpii,
                given_name: non_blank(locator, "directory.given_name", table.given_name)?,
                family_name: non_blank(locator, "directory.family_name", table.family_name)?,
                specialty: non_blank(locator, "directory.specialty", table.specialty)?,
                organisation: non_blank(locator, "directory.organisation", table.organisation)?,
                suburb: non_blank(locator, "directory.suburb", table.suburb)?,
                state: non_blank(locator, "directory.state", table.state)?,
                postcode: non_blank(locator, "directory.postcode", table.postcode)?,
                on_argus,
                on_referralnet,
            },
        ));
    }
    Ok(entries)
}

fn check_inbound(
    locator: &Locator<'_>,
    tables: Vec<Spanned<InboundTable>>,
    accounts: &[ScenarioAccount],
) -> Result<Vec<ScenarioInbound>, ScenarioError> {
    let mut inbound = Vec::with_capacity(tables.len());
    for table in tables {
        let line = locator.line_of(table.span());
        let table = table.into_inner();
        let demo_username = match table.provider {
            Provider::Argus => ARGUS_DEMO_ACCOUNT.username,
            Provider::ReferralNet => REFERRALNET_DEMO_ACCOUNT.username,
        };
        let account = table.account.get_ref();
        let known = account == demo_username
            || accounts
                .iter()
                .any(|seeded| seeded.provider == table.provider && &seeded.username == account);
        if !known {
            return Err(locator.error_at(
                table.account.span(),
                format!(
                    "inbound.account: {account:?} is neither {demo_username:?} nor an [[accounts]] entry of {}",
                    table.provider.as_str()
                ),
            ));
        }
        for hpii in [&table.from_hpii, &table.recipient_hpii]
            .into_iter()
            .flatten()
        {
            if !is_valid_hpii(hpii.get_ref().trim()) {
                return Err(locator.error_at(hpii.span(), format!("inbound: {HPII_EXPECTED}")));
            }
        }
        inbound.push(ScenarioInbound {
            line,
            at: table
                .at
                .map_or(ScenarioTime::After(Duration::zero()), |at| at.0),
            provider: table.provider,
            account: table.account.into_inner(),
            from_hpii: table
                .from_hpii
                .map(|hpii| hpii.into_inner().trim().to_owned()),
            recipient_hpii: table
                .recipient_hpii
                .map(|hpii| hpii.into_inner().trim().to_owned()),
            recipient_name: table.recipient_name,
            text: table.text,
        });
    }
    Ok(inbound)
}

fn check_faults(
    locator: &Locator<'_>,
    tables: Vec<Spanned<FaultTable>>,
) -> Result<Vec<ScenarioFault>, ScenarioError> {
    let mut faults = Vec::with_capacity(tables.len());
    for table in tables {
        let span = table.span();
        let table = table.into_inner();
        crate::faults::check_route(table.provider, *table.route.get_ref()).map_err(|message| {
            locator.error_at(table.route.span(), format!("faults.route: {message}"))
        })?;
        let answer = FaultAnswer::check(
            table.kind,
            table.status,
            table.retry_after_seconds,
            table.hold_seconds,
        )
        .map_err(|message| locator.error_at(span.clone(), format!("faults: {message}")))?;
        let timing = match (table.count, table.until) {
            (Some(count), None) => {
                if let Some(from) = table.from {
                    return Err(locator.error_at(
                        from.span(),
                        "faults.from: only with until (a window); a counted fault starts at `at`",
                    ));
                }
                if *count.get_ref() == 0 {
                    return Err(locator.error_at(count.span(), "faults.count: expected at least 1"));
                }
                ScenarioFaultTiming::Counted {
                    count: count.into_inner(),
                    at: table.at.map(|at| at.into_inner().0),
                }
            }
            (None, Some(until)) => {
                if let Some(at) = table.at {
                    return Err(locator.error_at(
                        at.span(),
                        "faults.at: only with count; a window runs from `from` to `until`",
                    ));
                }
                let from = table.from.map(|from| from.into_inner().0);
                let until_time = until.get_ref().0;
                let empty = match (
                    from.unwrap_or(ScenarioTime::After(Duration::zero())),
                    until_time,
                ) {
                    (ScenarioTime::After(from), ScenarioTime::After(until)) => until <= from,
                    (ScenarioTime::At(from), ScenarioTime::At(until)) => until <= from,
                    _ => false,
                };
                if empty {
                    return Err(locator.error_at(
                        until.span(),
                        "faults.until: expected a time after `from` (the clock's start when from is left out)",
                    ));
                }
                ScenarioFaultTiming::Window {
                    from,
                    until: until_time,
                }
            }
            (Some(count), Some(_)) => {
                return Err(locator.error_at(
                    count.span(),
                    "faults: give either count (the next N calls) or until (every call from `from` to `until`), not both",
                ));
            }
            (None, None) => {
                return Err(locator.error_at(
                    span,
                    "faults: expected count (the next N calls, from `at`) or until (every call from `from` to `until`)",
                ));
            }
        };
        faults.push(ScenarioFault {
            provider: table.provider,
            route: table.route.into_inner(),
            answer,
            timing,
        });
    }
    Ok(faults)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn error_of(text: &str) -> ScenarioError {
        Scenario::parse(text, "test.toml").unwrap_err()
    }

    #[test]
    fn offsets_are_whole_units_largest_first() {
        assert_eq!(parse_offset("90s"), Some(Duration::seconds(90)));
        assert_eq!(
            parse_offset("1d2h3m4s"),
            Some(Duration::seconds(86_400 + 7_200 + 180 + 4))
        );
        assert_eq!(parse_offset("0s"), Some(Duration::zero()));
        for invalid in [
            "",
            "5",
            "s",
            "1h1d",
            "1x",
            "1.5h",
            "-1h",
            "1h h",
            "99999999999999999d",
        ] {
            assert_eq!(parse_offset(invalid), None, "{invalid:?} was accepted");
        }
    }

    #[test]
    fn a_minimal_scenario_is_just_a_namespace() {
        let scenario = Scenario::parse("", "empty.toml").unwrap();
        assert_eq!(scenario.namespace(), "default");
        assert_eq!(scenario.seed(), None);
    }

    #[test]
    fn times_may_be_toml_date_times_strings_or_offsets() {
        let scenario = Scenario::parse(
            r#"
[clock]
start = 2030-01-01T09:00:00Z
speed = 0

[[inbound]]
provider = "argus"
account = "demo.argus"
at = "+1h"

[[inbound]]
provider = "argus"
account = "demo.argus"
at = "2030-01-02T00:00:00+10:00"
"#,
            "times.toml",
        )
        .unwrap();
        let start = Utc.with_ymd_and_hms(2030, 1, 1, 9, 0, 0).unwrap();
        assert_eq!(scenario.start, Some(start));
        assert_eq!(scenario.speed, Some(0.0));
        assert_eq!(
            scenario.inbound[0].at.resolve(start),
            start + Duration::hours(1)
        );
        assert_eq!(
            scenario.inbound[1].at.resolve(start),
            Utc.with_ymd_and_hms(2030, 1, 1, 14, 0, 0).unwrap()
        );
    }

    #[test]
    fn errors_name_the_line_the_field_and_what_is_expected() {
        let cases: &[(&str, usize, &str)] = &[
            ("seed = 1\nspeling = 2\n", 2, "unknown field `speling`"),
            (
                "[clock]\nstart = \"tomorrow\"\n",
                2,
                "expected an RFC 3339 time",
            ),
            (
                "[clock]\nstart = \"+1d\"\n",
                2,
                "clock.start must be a time",
            ),
            ("[clock]\nspeed = -2.0\n", 2, "clock.speed"),
            ("namespace = \"Team A\"\n", 1, "namespace"),
            (
                "[[accounts]]\nprovider = \"argus\"\nusername = \"x\"\npassword = \"long-enough\"\npractice_name = \"P\"\nstatus = \"active\"\n",
                3,
                "accounts.username: expected 3 to 64",
            ),
            (
                "[[accounts]]\nprovider = \"argos\"\n",
                2,
                "unknown variant `argos`",
            ),
            (
                "[[accounts]]\nprovider = \"argus\"\nusername = \"new.user\"\npassword = \"short\"\npractice_name = \"P\"\nstatus = \"active\"\n",
                4,
                "accounts.password: expected at least 8",
            ),
            (
                "[[accounts]]\nprovider = \"argus\"\nusername = \"new.user\"\npassword = \"long-enough\"\npractice_name = \"P\"\nstatus = \"frozen\"\n",
                6,
                "unknown variant `frozen`",
            ),
            (
                "[[accounts]]\nprovider = \"argus\"\nusername = \"new.user\"\npassword = \"long-enough\"\npractice_name = \"P\"\nstatus = \"active\"\ndecides_at = \"+1d\"\n",
                7,
                "only for status = \"pending\"",
            ),
            (
                "[[inbound]]\nprovider = \"argus\"\naccount = \"nobody\"\n",
                3,
                "neither \"demo.argus\" nor an [[accounts]] entry",
            ),
            (
                "[[inbound]]\nprovider = \"argus\"\naccount = \"demo.argus\"\nfrom_hpii = \"8003610000000007\"\n",
                4,
                "Luhn",
            ),
            (
                "[[faults]]\nprovider = \"argus\"\nroute = \"sessions\"\nkind = \"server_error\"\ncount = 1\n",
                3,
                "argus has no route \"sessions\"",
            ),
            (
                "[[faults]]\nprovider = \"argus\"\nroute = \"*\"\nkind = \"server_error\"\n",
                1,
                "expected count",
            ),
            (
                "[[faults]]\nprovider = \"argus\"\nroute = \"*\"\nkind = \"server_error\"\nfrom = \"+2h\"\nuntil = \"+1h\"\n",
                6,
                "faults.until: expected a time after",
            ),
            (
                "[[directory]]\nhpii = \"8003610000000006\"\ngiven_name = \"Ann\"\nfamily_name = \"Lee\"\nspecialty = \"Cardiology\"\norganisation = \"Heart\"\nsuburb = \" \"\nstate = \"NSW\"\npostcode = \"2000\"\nproviders = [\"argus\"]\n",
                7,
                "directory.suburb: must not be blank",
            ),
        ];
        for (text, line, words) in cases {
            let error = error_of(text);
            assert_eq!(error.line, Some(*line), "{text:?} → {error}");
            assert!(error.message.contains(words), "{text:?} → {error}");
            assert!(error.to_string().starts_with("test.toml: line "), "{error}");
        }
    }

    #[test]
    fn a_seeded_namespace_has_its_accounts_in_the_states_given() {
        let scenario = Scenario::parse(
            r#"
seed = 5
[clock]
start = "2030-01-01T00:00:00Z"
speed = 0

[[accounts]]
provider = "argus"
username = "active.clinic"
password = "long-enough"
practice_name = "Active Clinic"
status = "active"

[[accounts]]
provider = "referralnet"
username = "waiting.clinic"
password = "long-enough"
practice_name = "Waiting Clinic"
status = "pending"
decision = "reject"
decides_at = "+2d"

[[accounts]]
provider = "argus"
username = "stopped.clinic"
password = "long-enough"
practice_name = "Stopped Clinic"
status = "suspended"
"#,
            "states.toml",
        )
        .unwrap();
        let seeded = scenario.seed_namespace("default", &SandboxConfig::default());
        let now = seeded.clock.now();
        assert_eq!(now, Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).unwrap());
        let status =
            |book: &AccountBook, username: &str, at| book.get(username).unwrap().status_at(at);
        use crate::accounts::AccountStatus;
        assert_eq!(
            status(&seeded.argus_accounts, "active.clinic", now),
            AccountStatus::Active
        );
        assert_eq!(
            status(&seeded.argus_accounts, "stopped.clinic", now),
            AccountStatus::Suspended
        );
        assert_eq!(
            status(&seeded.argus_accounts, "demo.argus", now),
            AccountStatus::Active
        );
        assert_eq!(
            status(
                &seeded.referralnet_accounts,
                "waiting.clinic",
                now + Duration::days(2) - Duration::seconds(1)
            ),
            AccountStatus::Pending
        );
        assert_eq!(
            status(
                &seeded.referralnet_accounts,
                "waiting.clinic",
                now + Duration::days(2)
            ),
            AccountStatus::Rejected
        );
        assert!(
            seeded
                .argus_accounts
                .get("active.clinic")
                .unwrap()
                .password_matches("long-enough")
        );
        assert!(
            !seeded
                .argus_accounts
                .get("active.clinic")
                .unwrap()
                .password_matches("wrong-one!")
        );
        assert!(seeded.referralnet_accounts.get("active.clinic").is_none());
    }
}
