//! The README's examples, run in document order against a spawned gateway and sandbox, so an
//! example that stops working fails CI.
//!
//! The README says how to run each example in an HTML comment on the line(s) just before its
//! code block (invisible on GitHub). Several comments before one block run it several times.
//!
//! ```text
//! <!-- run: as=dr-chen expect=data.linkArgus.status=ACTIVE capture=note-id:data.createClinicalNote.id -->
//! <!-- run: as=dr-patel error=FORBIDDEN -->
//! <!-- run: as=dr-chen until=data.messages.edges.0.node.status=SENT|DELIVERED -->
//! <!-- run: curl -->
//! <!-- run: skip reason=what the example is for and why it cannot run -->
//! ```
//!
//! - `as=USER` runs a ```` ```graphql ```` block as a demo user of the practice `demo-practice`
//!   (`demo-admin`, `dr-chen`, `dr-patel`), with a token like the ones dev mode prints.
//! - `expect=PATH=VALUE` (repeatable): the answer's value at the dotted `PATH` (array items by
//!   index) is `VALUE` (JSON if it parses as a number, boolean or null, else a string; `A|B`
//!   accepts either; double quotes around a value with spaces). `expect=PATH` alone: present
//!   and not null. Without `error=`, the answer must have no errors.
//! - `error=CODE`: the first error's `extensions.code` is `CODE`.
//! - `until=PATH[=VALUE]`: the gateway works in the background, so ask again (every 100 ms,
//!   for up to 20 s) until this holds; then `expect` and `error` are checked.
//! - `capture=NAME:PATH`: keep a value of the answer; later blocks have the README placeholder
//!   `"<NAME with spaces for hyphens>"` replaced by it (`note-id` fills `"<note id>"`). A
//!   placeholder left unfilled fails the test.
//! - A `subscription` block is opened over graphql-transport-ws; its `expect` must be met by
//!   one of its events, awaited when the next `##` heading (or the end) is reached, so the
//!   blocks in between can make it happen.
//! - `curl` runs a ```` ```sh ```` block's curl commands against the test's sandbox in place of
//!   `localhost:8081` (the embedded sandbox's address in dev mode); each must answer 2xx.
//!   `-X`, `-H`, `-d BODY` and `--data-binary @FILE` (a repository file) are understood.
//! - `skip reason=…`: illustrative only; the reason says why.
//!
//! Every ```` ```graphql ```` block and every ```` ```sh ```` block that calls curl must carry
//! an annotation, so a new example cannot silently escape the test.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Value, json};
use smd_gateway::auth::{TokenRequest, mint_hs256};
use smd_gateway::dev::{DEMO_GROUP, DEMO_USERS};

use crate::helpers::*;
use crate::ws::WsClient;

const README: &str = include_str!("../../README.md");

/// How long background work (the outbox, the inbox poller, the approval watcher) may take.
const BACKGROUND_DEADLINE: Duration = Duration::from_secs(20);

/// A fenced code block and what its annotations ask for.
#[derive(Debug)]
struct Block {
    /// The line of the opening fence, 1-based.
    line: usize,
    language: String,
    text: String,
    runs: Vec<Run>,
}

#[derive(Debug)]
enum Item {
    Heading,
    Block(Block),
}

#[derive(Debug, PartialEq)]
enum Run {
    Skip,
    Curl,
    Graphql(GraphqlRun),
}

#[derive(Debug, Default, PartialEq)]
struct GraphqlRun {
    user: String,
    expects: Vec<Check>,
    until: Vec<Check>,
    error: Option<String>,
    captures: Vec<(String, String)>,
}

/// A value the answer must hold at a path; `None`: present and not null.
#[derive(Clone, Debug, PartialEq)]
struct Check {
    path: String,
    value: Option<String>,
}

impl Check {
    fn parse(text: &str) -> Check {
        match text.split_once('=') {
            Some((path, value)) => Check {
                path: path.to_owned(),
                value: Some(value.to_owned()),
            },
            None => Check {
                path: text.to_owned(),
                value: None,
            },
        }
    }

    fn holds(&self, answer: &Value) -> bool {
        let Some(actual) = lookup(answer, &self.path).filter(|value| !value.is_null()) else {
            return self.value.as_deref() == Some("null");
        };
        match &self.value {
            None => true,
            Some(expected) => expected.split('|').any(|alternative| {
                match serde_json::from_str::<Value>(alternative) {
                    Ok(parsed) if !parsed.is_string() => *actual == parsed,
                    _ => actual.as_str() == Some(alternative),
                }
            }),
        }
    }

    fn describe(&self) -> String {
        match &self.value {
            Some(value) => format!("{} = {value}", self.path),
            None => format!("{} present", self.path),
        }
    }
}

/// The value at a dotted path (`data.edges.0.node.id`).
fn lookup<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(value, |current, segment| {
        match (current, segment.parse::<usize>()) {
            (Value::Array(items), Ok(index)) => items.get(index),
            (Value::Object(fields), _) => fields.get(segment),
            _ => None,
        }
    })
}

/// Splits on whitespace, keeping quoted text together (quotes removed), like a shell without
/// escapes; `#` at the start of a word comments out the rest of the line.
fn words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current: Option<String> = None;
    let mut quote: Option<char> = None;
    let mut characters = text.chars().peekable();
    while let Some(character) = characters.next() {
        match (quote, character) {
            (Some(open), c) if c == open => quote = None,
            (Some(_), c) => current.get_or_insert_with(String::new).push(c),
            (None, '\'' | '"') => {
                quote = Some(character);
                current.get_or_insert_with(String::new);
            }
            (None, '\\') if characters.peek() == Some(&'\n') => {}
            (None, '#') if current.is_none() => {
                while characters.peek().is_some_and(|c| *c != '\n') {
                    characters.next();
                }
            }
            (None, c) if c.is_whitespace() => words.extend(current.take()),
            (None, c) => current.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(current);
    words
}

fn parse_annotation(line: usize, body: &str) -> Run {
    let body = body.trim();
    if body == "curl" {
        return Run::Curl;
    }
    if let Some(reason) = body.strip_prefix("skip") {
        assert!(
            reason.trim().starts_with("reason=") && reason.trim().len() > "reason=".len(),
            "README.md line {line}: a skipped example must say why (`skip reason=…`)"
        );
        return Run::Skip;
    }
    let mut run = GraphqlRun::default();
    for word in words(body) {
        let (key, value) = word.split_once('=').unwrap_or_else(|| {
            panic!("README.md line {line}: `{word}` is not key=value in the run annotation")
        });
        match key {
            "as" => run.user = value.to_owned(),
            "expect" => run.expects.push(Check::parse(value)),
            "until" => run.until.push(Check::parse(value)),
            "error" => run.error = Some(value.to_owned()),
            "capture" => {
                let (name, path) = value.split_once(':').unwrap_or_else(|| {
                    panic!("README.md line {line}: capture wants NAME:PATH, not `{value}`")
                });
                run.captures.push((name.to_owned(), path.to_owned()));
            }
            other => panic!("README.md line {line}: unknown run annotation key `{other}`"),
        }
    }
    assert!(
        DEMO_USERS
            .iter()
            .any(|(subject, _, _)| *subject == run.user),
        "README.md line {line}: `as=` must name a demo user (demo-admin, dr-chen, dr-patel), not {:?}",
        run.user
    );
    Run::Graphql(run)
}

/// The README's headings and fenced blocks in order, with their annotations.
fn parse_readme(readme: &str) -> Vec<Item> {
    let lines: Vec<&str> = readme.lines().collect();
    let mut items = Vec::new();
    let mut pending: Vec<(usize, Run)> = Vec::new();
    let mut index = 0;
    while index < lines.len() {
        let line = lines[index];
        let number = index + 1;
        if let Some(annotation) = line
            .trim()
            .strip_prefix("<!-- run")
            .and_then(|rest| rest.strip_suffix("-->"))
        {
            let annotation = annotation.strip_prefix(':').unwrap_or(annotation);
            pending.push((number, parse_annotation(number, annotation)));
            index += 1;
            continue;
        }
        if let Some(language) = line.strip_prefix("```") {
            let start = index;
            index += 1;
            let mut text = String::new();
            while index < lines.len() && !lines[index].starts_with("```") {
                text.push_str(lines[index]);
                text.push('\n');
                index += 1;
            }
            index += 1;
            items.push(Item::Block(Block {
                line: start + 1,
                language: language.trim().to_owned(),
                text,
                runs: pending.drain(..).map(|(_, run)| run).collect(),
            }));
            continue;
        }
        if let Some((annotated, _)) = pending.first() {
            panic!(
                "README.md line {annotated}: a run annotation must be followed directly by a code block"
            );
        }
        if line.starts_with("## ") {
            items.push(Item::Heading);
        }
        index += 1;
    }
    items
}

/// Whether the test insists that a block says how it runs.
fn must_be_annotated(block: &Block) -> bool {
    block.language == "graphql"
        || (block.language == "sh" && block.text.trim_start().starts_with("curl "))
}

#[test]
fn every_graphql_and_curl_example_in_the_readme_says_how_it_runs() {
    let items = parse_readme(README);
    let blocks: Vec<&Block> = items
        .iter()
        .filter_map(|item| match item {
            Item::Block(block) => Some(block),
            Item::Heading => None,
        })
        .collect();
    let silent: Vec<usize> = blocks
        .iter()
        .filter(|block| must_be_annotated(block) && block.runs.is_empty())
        .map(|block| block.line)
        .collect();
    assert!(
        silent.is_empty(),
        "README.md blocks at lines {silent:?} need a `<!-- run: … -->` comment before them \
         (or `<!-- run: skip reason=… -->`); see tests/e2e/readme.rs"
    );
    for block in &blocks {
        for run in &block.runs {
            match run {
                Run::Curl => assert!(
                    block.language == "sh",
                    "README.md line {}: `run: curl` is for ```sh blocks",
                    block.line
                ),
                Run::Graphql(_) => assert!(
                    block.language == "graphql",
                    "README.md line {}: `run: as=…` is for ```graphql blocks",
                    block.line
                ),
                Run::Skip => {}
            }
        }
    }
    assert!(
        blocks
            .iter()
            .filter(|block| block.runs.iter().any(|run| matches!(run, Run::Graphql(_))))
            .count()
            >= 10,
        "the walkthroughs lost their runnable examples"
    );
}

#[test]
fn annotations_parse_into_checks_captures_and_users() {
    let run = parse_annotation(
        1,
        r#" as=dr-chen expect=data.a.0.b=ACTIVE|DONE expect="data.name=Dr Mei Chen" until=data.x capture=note-id:data.n.id "#,
    );
    let Run::Graphql(run) = run else {
        panic!("{run:?}")
    };
    assert_eq!(run.user, "dr-chen");
    assert!(run.expects[0].holds(&json!({"data": {"a": [{"b": "DONE"}]}})));
    assert!(!run.expects[0].holds(&json!({"data": {"a": [{"b": "QUEUED"}]}})));
    assert!(run.expects[1].holds(&json!({"data": {"name": "Dr Mei Chen"}})));
    assert!(!run.until[0].holds(&json!({"data": {"x": null}})));
    assert_eq!(
        run.captures,
        [("note-id".to_owned(), "data.n.id".to_owned())]
    );
    assert!(Check::parse("data.balance=500").holds(&json!({"data": {"balance": 500}})));
    assert!(!Check::parse("data.balance=500").holds(&json!({"data": {"balance": "500"}})));
    assert_eq!(parse_annotation(1, " curl "), Run::Curl);
    assert_eq!(
        words("curl -X POST x \\\n -d '{\"a\": 1}' # comment"),
        ["curl", "-X", "POST", "x", "-d", "{\"a\": 1}"]
    );
}

#[test]
fn every_hpii_in_the_readme_has_a_valid_check_digit_and_magic_ones_exist_in_the_sandbox() {
    use smd_sandbox::directory::{
        MAGIC_NEVER_ACKNOWLEDGES, MAGIC_REJECTS_PAYLOAD, MAGIC_SLOW_DELIVERY, MAGIC_UNDELIVERABLE,
        MAGIC_UNKNOWN_ENDPOINT,
    };
    let magic = [
        MAGIC_UNKNOWN_ENDPOINT,
        MAGIC_REJECTS_PAYLOAD,
        MAGIC_UNDELIVERABLE,
        MAGIC_NEVER_ACKNOWLEDGES,
        MAGIC_SLOW_DELIVERY,
    ];
    let mut found = 0;
    for (index, line) in README.lines().enumerate() {
        let numbers = line
            .split(|c: char| !c.is_ascii_digit())
            // The bare prefix `800361` is how the README explains the format.
            .filter(|digits| digits.starts_with("800361") && *digits != "800361");
        for number in numbers {
            found += 1;
            assert!(
                smd_gateway::domain::types::Hpii::parse(number).is_ok(),
                "README.md line {}: {number} is not a valid HPI-I (16 digits, Luhn check digit)",
                index + 1
            );
            assert!(
                !number.starts_with("80036199999") || magic.contains(&number),
                "README.md line {}: {number} is not one of the sandbox's magic recipients {magic:?}",
                index + 1
            );
        }
    }
    assert!(
        magic.iter().all(|number| README.contains(number)),
        "the README lists every magic recipient"
    );
    assert!(found >= 8, "found only {found} HPI-Is in the README");
}

/// A subscription opened by a block, waiting for its expected event.
struct OpenSubscription {
    line: usize,
    client: WsClient,
    id: String,
    expects: Vec<Check>,
}

/// The walk through the README: the app, the demo users' tokens and the captured values.
struct Walk {
    app: TestApp,
    tokens: HashMap<String, String>,
    captures: HashMap<String, String>,
    subscriptions: Vec<OpenSubscription>,
}

impl Walk {
    async fn start() -> Walk {
        // The alerts walkthrough waits for a message to be late; two seconds stand in for the
        // default hour.
        let app = spawn_app_configured(Options::default(), |settings| {
            settings.messaging.undelivered_alert_after_seconds = 2;
            settings.messaging.attention_check_interval_ms = Some(200);
        })
        .await;
        // What dev mode does at start-up: the demo practice and its users exist.
        smd_gateway::dev::seed_demo_practice(&app.store)
            .await
            .expect("demo practice seeded");
        let tokens = DEMO_USERS
            .iter()
            .map(|(subject, role, name)| {
                let token = mint_hs256(
                    SECRET,
                    ISSUER,
                    AUDIENCE,
                    &TokenRequest {
                        subject: (*subject).to_owned(),
                        group_id: DEMO_GROUP.to_owned(),
                        role: *role,
                        name: Some((*name).to_owned()),
                        ttl_seconds: 600,
                    },
                )
                .expect("demo token");
                ((*subject).to_owned(), token)
            })
            .collect();
        Walk {
            app,
            tokens,
            captures: HashMap::new(),
            subscriptions: Vec::new(),
        }
    }

    /// The block's text with every captured placeholder filled in.
    fn filled(&self, block: &Block) -> String {
        let mut text = block.text.clone();
        for (name, value) in &self.captures {
            text = text.replace(
                &format!("\"<{}>\"", name.replace('-', " ")),
                &format!("{value:?}"),
            );
        }
        if let Some(start) = text.find("\"<") {
            let placeholder: String = text[start..].chars().take_while(|c| *c != '\n').collect();
            panic!(
                "README.md line {}: nothing captured fills the placeholder in `{placeholder}` \
                 (add `capture=NAME:PATH` to an earlier block)",
                block.line
            );
        }
        text
    }

    async fn run(&mut self, block: &Block, run: &Run) {
        match run {
            Run::Skip => {}
            Run::Curl => self.curl(block).await,
            Run::Graphql(graphql) if block.text.trim_start().starts_with("subscription") => {
                self.subscribe(block, graphql).await;
            }
            Run::Graphql(graphql) => self.graphql(block, graphql).await,
        }
    }

    async fn graphql(&mut self, block: &Block, run: &GraphqlRun) {
        let query = self.filled(block);
        let token = self.tokens[&run.user].clone();
        let deadline = tokio::time::Instant::now() + BACKGROUND_DEADLINE;
        let answer = loop {
            let answer = self.app.gql(Some(&token), &query, json!({})).await;
            if run.until.iter().all(|check| check.holds(&answer)) {
                break answer;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "README.md line {} (as {}): still not {} after {BACKGROUND_DEADLINE:?}; last answer:\n{answer:#}",
                block.line,
                run.user,
                describe(&run.until),
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        match (&run.error, error_code(&answer)) {
            (Some(wanted), Some(code)) if wanted == code => {}
            (Some(wanted), _) => panic!(
                "README.md line {} (as {}): expected the error {wanted}; the answer was:\n{answer:#}",
                block.line, run.user
            ),
            (None, None) => {}
            (None, Some(_)) => panic!(
                "README.md line {} (as {}): expected no errors; the answer was:\n{answer:#}",
                block.line, run.user
            ),
        }
        let failed: Vec<&Check> = run
            .expects
            .iter()
            .filter(|check| !check.holds(&answer))
            .collect();
        assert!(
            failed.is_empty(),
            "README.md line {} (as {}): expected {}; the answer was:\n{answer:#}",
            block.line,
            run.user,
            failed
                .iter()
                .map(|check| check.describe())
                .collect::<Vec<_>>()
                .join(", "),
        );
        for (name, path) in &run.captures {
            let value = match lookup(&answer, path) {
                Some(Value::String(text)) => text.clone(),
                Some(value) if !value.is_null() => value.to_string(),
                _ => panic!(
                    "README.md line {} (as {}): nothing at {path} to capture as {name}; the answer was:\n{answer:#}",
                    block.line, run.user
                ),
            };
            self.captures.insert(name.clone(), value);
        }
    }

    async fn subscribe(&mut self, block: &Block, run: &GraphqlRun) {
        assert!(
            run.until.is_empty() && run.error.is_none() && run.captures.is_empty(),
            "README.md line {}: a subscription takes `as=` and `expect=` only",
            block.line
        );
        let query = self.filled(block);
        let mut client = WsClient::ready(&self.app, &self.tokens[&run.user]).await;
        let id = format!("readme-{}", block.line);
        client.subscribe(&id, &query).await;
        self.subscriptions.push(OpenSubscription {
            line: block.line,
            client,
            id,
            expects: run.expects.clone(),
        });
    }

    /// Waits for every open subscription's expected event, then closes them.
    async fn await_subscriptions(&mut self) {
        for mut subscription in self.subscriptions.drain(..) {
            let deadline = tokio::time::Instant::now() + BACKGROUND_DEADLINE;
            let mut seen = Vec::new();
            loop {
                let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
                let next = tokio::time::timeout(
                    remaining.min(Duration::from_secs(10)),
                    subscription.client.result_of(&subscription.id),
                )
                .await;
                match next {
                    Ok(message) => {
                        assert!(
                            message["type"] == "next" && error_code(&message["payload"]).is_none(),
                            "README.md line {}: the subscription failed:\n{message:#}",
                            subscription.line,
                        );
                        if subscription
                            .expects
                            .iter()
                            .all(|check| check.holds(&message["payload"]))
                        {
                            break;
                        }
                        seen.push(message);
                    }
                    Err(_) if tokio::time::Instant::now() < deadline => {}
                    Err(_) => panic!(
                        "README.md line {}: the subscription never showed {} within {BACKGROUND_DEADLINE:?}; it sent:\n{:#}",
                        subscription.line,
                        describe(&subscription.expects),
                        Value::Array(seen),
                    ),
                }
            }
        }
    }

    async fn curl(&mut self, block: &Block) {
        let words = words(&block.text);
        let commands = words
            .split(|word| word == "curl")
            .filter(|command| !command.is_empty());
        for command in commands {
            let mut method = None;
            let mut body = None;
            let mut url = None;
            let mut arguments = command.iter();
            while let Some(word) = arguments.next() {
                match word.as_str() {
                    "-X" => method = arguments.next().cloned(),
                    "-d" => body = arguments.next().cloned(),
                    // `--data-binary @FILE`: a file of the repository, as curl run from its root.
                    "--data-binary" => {
                        let file = arguments
                            .next()
                            .and_then(|argument| argument.strip_prefix('@'))
                            .unwrap_or_else(|| {
                                panic!("README.md line {}: --data-binary takes @FILE", block.line)
                            });
                        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
                        body = Some(std::fs::read_to_string(&path).unwrap_or_else(|error| {
                            panic!("README.md line {}: {}: {error}", block.line, path.display())
                        }));
                    }
                    "-H" => {
                        arguments.next();
                    }
                    other => {
                        let path = other
                            .trim_start_matches("http://")
                            .strip_prefix("localhost:8081")
                            .unwrap_or_else(|| {
                                panic!(
                                    "README.md line {}: curl examples call the dev sandbox at localhost:8081, not `{other}`",
                                    block.line
                                )
                            });
                        url = Some(format!("{}{path}", self.app.sandbox.base_url()));
                    }
                }
            }
            let url = url
                .unwrap_or_else(|| panic!("README.md line {}: a curl without a URL", block.line));
            let method =
                method.unwrap_or_else(|| if body.is_some() { "POST" } else { "GET" }.to_owned());
            let mut request = self
                .app
                .client
                .request(method.parse().expect("an HTTP method"), &url);
            if let Some(body) = &body {
                request = request
                    .header("content-type", "application/json")
                    .body(body.clone());
            }
            let response = request.send().await.expect("sandbox answers");
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            assert!(
                status.is_success(),
                "README.md line {}: `curl -X {method} {url}` answered {status}: {text}",
                block.line
            );
        }
    }
}

fn describe(checks: &[Check]) -> String {
    checks
        .iter()
        .map(Check::describe)
        .collect::<Vec<_>>()
        .join(", ")
}

#[tokio::test]
async fn the_readme_walkthroughs_run_as_written() {
    let items = parse_readme(README);
    let mut walk = Walk::start().await;
    for item in &items {
        match item {
            Item::Heading => walk.await_subscriptions().await,
            Item::Block(block) => {
                for run in &block.runs {
                    walk.run(block, run).await;
                }
            }
        }
    }
    walk.await_subscriptions().await;
}
