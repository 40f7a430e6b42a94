//! HL7 v2 text (ER7) for the messages the gateway sends and receives through Secure Message
//! Delivery providers: it builds the outgoing referral, parses what comes back (inbound
//! referrals and application acknowledgements), and owns the escaping rules that keep free text
//! from breaking the message structure. Pure string work: no I/O, no frameworks.
//!
//! # The referral we send (AS 4700.6 / `REF^I12` style, HL7 v2.4)
//!
//! Segments are joined by `\r`, in this order (`<…>` marks a value that goes through
//! [`escape`]; every free text value does, so `|^~\&` and line breaks never split a field):
//!
//! ```text
//! MSH|^~\&|<sending application>|<sender organisation, or "SMD Gateway">|<recipient HPI-I>|<recipient organisation, or empty>|<sent at: yyyyMMddHHmmss+0000>||REF^I12^REF_I12|<control id>|P|2.4|||AL|AL|AUS|UNICODE UTF-8
//! RF1|A^Active^HL70283|||||<control id>|<sent at: yyyyMMdd>
//! PRD|RP|<sender family>^<sender given>|<sender organisation>||||<sender HPI-I>^^^AUSHIC^NPI
//! PRD|RT|<recipient family>^<recipient given>|<recipient organisation>||||<recipient HPI-I>^^^AUSHIC^NPI
//! PID|1||<patient id>^^^SMD-GW^MR||<patient family>^<patient given>||<date of birth: yyyyMMdd>
//! OBR|1|||NOTE^<note title>^SMD-GW
//! OBX|<1, 2, …>|FT|<section key>^<section title>^SMD-GW||<section body>||||||F
//! ```
//!
//! - MSH-15 and MSH-16 are both `AL`: we want the provider's accept acknowledgement *and* the
//!   recipient system's application acknowledgement (`RRI^I12`), which is what moves a message
//!   to `ACKNOWLEDGED`. MSH-18 declares UTF-8 because names and notes are not limited to ASCII.
//! - RF1-6 (originating referral identifier) repeats the control id; RF1-7 (effective date) is
//!   the day it was sent, in UTC.
//! - PRD-1 is the role: `RP` (referring provider, the sender) or `RT` (referred-to provider,
//!   the recipient). PRD-2 is the name (XPN: family ^ given), PRD-3 component 1 the
//!   organisation (empty when there is none), PRD-7 the identifier: the HPI-I, assigning
//!   authority `AUSHIC`, identifier type `NPI`.
//! - One OBR carries the note's title in OBR-4 (universal service identifier); the `REF_I12`
//!   structure only allows OBX inside an OBR group, and the title needs a home.
//! - One OBX per chosen section, in the order given, as formatted text (`FT`): OBX-3 carries the
//!   section key and title with our coding system `SMD-GW`, OBX-5 the body, OBX-11 `F` (final).
//!
//! # Escaping
//!
//! `|` `^` `~` `\` `&` become `\F\` `\S\` `\R\` `\E\` `\T\`. A line feed becomes `\.br\`, the
//! formatted-text line break receiving systems render. A carriage return becomes the hex escape
//! `\X0D\`, so `\r\n` is sent as `\X0D\\.br\`: the line still breaks where the author broke
//! it, and the text comes back byte for byte (mapping CR, LF and CRLF all to `\.br\` could not
//! be undone). [`unescape`] also reads any other hex escape (`\X0D0A\`), drops the highlight
//! markers `\H\` and `\N\`, and keeps anything it does not know as literal text.

use chrono::{DateTime, NaiveDate, Utc};

/// The only field separator we read or write.
const FIELD_SEPARATOR: char = '|';
/// The encoding characters (component, repetition, escape, subcomponent) we read or write.
const ENCODING_CHARACTERS: &str = "^~\\&";
/// MSH-4 when the sender names no organisation.
const DEFAULT_SENDING_FACILITY: &str = "SMD Gateway";
/// Our coding system and assigning authority in OBX-3 and PID-3.
const GATEWAY_CODING_SYSTEM: &str = "SMD-GW";
/// PRD-1 role of the referring provider (the sender).
pub const ROLE_REFERRING_PROVIDER: &str = "RP";
/// PRD-1 role of the referred-to provider (the recipient).
pub const ROLE_REFERRED_TO_PROVIDER: &str = "RT";

/// A practitioner on either end of a referral.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Party {
    /// The practitioner's HPI-I number.
    pub hpii: String,
    /// Family name.
    pub family_name: String,
    /// Given name.
    pub given_name: String,
    /// The practice or organisation they work for, when known.
    pub organisation: Option<String>,
}

/// The patient a referral is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatientDetails {
    /// The patient's identifier in the sending system (medical record number).
    pub id: String,
    /// Family name.
    pub family_name: String,
    /// Given name.
    pub given_name: String,
    /// Date of birth.
    pub date_of_birth: NaiveDate,
}

/// One section of a clinical note, as shared in a referral.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// Stable machine key of the section (for example `history`).
    pub key: String,
    /// Title people read.
    pub title: String,
    /// The section's text, line breaks included.
    pub body: String,
}

/// Everything needed to build an outgoing `REF^I12` referral.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Referral {
    /// MSH-10 message control id; also the referral id in RF1-6. Acknowledgements quote it.
    pub control_id: String,
    /// When the message was created.
    pub sent_at: DateTime<Utc>,
    /// MSH-3 sending application.
    pub sending_application: String,
    /// The referring practitioner.
    pub sender: Party,
    /// The practitioner referred to.
    pub recipient: Party,
    /// The patient.
    pub patient: PatientDetails,
    /// Title of the clinical note the sections come from.
    pub note_title: String,
    /// The sections the sender chose to share, in the order they appear.
    pub sections: Vec<Section>,
}

/// Why a text is not an HL7 v2 message we can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Hl7Error {
    /// Nothing but whitespace and segment separators.
    #[error("empty message")]
    Empty,
    /// The first segment is not the message header.
    #[error("first segment must be MSH, found {found:?}")]
    MissingHeader {
        /// The name (or start) of the segment found instead.
        found: String,
    },
    /// The character after `MSH` is not `|`.
    #[error("field separator must be '|', found {found:?}")]
    WrongFieldSeparator {
        /// What followed `MSH` (empty when nothing did).
        found: String,
    },
    /// MSH-2 is not `^~\&`.
    #[error("encoding characters must be \"^~\\&\", found {found:?}")]
    WrongEncodingCharacters {
        /// The encoding characters found.
        found: String,
    },
    /// A line does not start with a three-character segment name.
    #[error("segment {position} has no valid name")]
    MalformedSegment {
        /// 1-based position of the segment in the message.
        position: usize,
    },
    /// A segment the message must contain is absent.
    #[error("missing {segment} segment")]
    MissingSegment {
        /// The segment name.
        segment: &'static str,
    },
    /// A field the message must fill is absent or empty.
    #[error("missing {segment}-{field}")]
    MissingField {
        /// The segment name.
        segment: &'static str,
        /// The HL7 field number.
        field: usize,
    },
}

/// A parsed HL7 v2 message: its segments in order, the first being MSH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    segments: Vec<Segment>,
}

/// One segment of a message, fields still escaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// The three-character segment name (`MSH`, `PID`, `OBX`, …).
    pub name: String,
    /// The fields, raw (still escaped); `fields[0]` is field 1. For MSH, field 1 is the field
    /// separator itself (`|`) and field 2 the encoding characters, as HL7 numbers them.
    pub fields: Vec<String>,
}

/// An application (or accept) acknowledgement, read from its MSH and MSA segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acknowledgement {
    /// MSA-1: `AA`, `AE`, `AR` (application) or `CA`, `CE`, `CR` (accept).
    pub code: String,
    /// MSA-2: the control id of the message being acknowledged.
    pub acknowledged_control_id: String,
    /// MSH-9 message code and trigger event, for example `RRI^I12`.
    pub message_type: String,
}

/// Builds the `REF^I12` referral described in the module documentation, segments joined by
/// `\r`. Only `referral.sections` appear, each as one OBX, in order.
pub fn build_referral(referral: &Referral) -> String {
    let sent_at = referral.sent_at.format("%Y%m%d%H%M%S+0000").to_string();
    let sent_on = referral.sent_at.format("%Y%m%d").to_string();
    let control_id = escape(&referral.control_id);

    let header = [
        "MSH",
        ENCODING_CHARACTERS,
        &escape(&referral.sending_application),
        &escape(
            referral
                .sender
                .organisation
                .as_deref()
                .unwrap_or(DEFAULT_SENDING_FACILITY),
        ),
        &escape(&referral.recipient.hpii),
        &escape(referral.recipient.organisation.as_deref().unwrap_or("")),
        &sent_at,
        "",
        "REF^I12^REF_I12",
        &control_id,
        "P",
        "2.4",
        "",
        "",
        "AL",
        "AL",
        "AUS",
        "UNICODE UTF-8",
    ]
    .join("|");
    let referral_information = [
        "RF1",
        "A^Active^HL70283",
        "",
        "",
        "",
        "",
        &control_id,
        &sent_on,
    ]
    .join("|");
    let patient = &referral.patient;
    let patient_identification = [
        "PID",
        "1",
        "",
        &format!("{}^^^{GATEWAY_CODING_SYSTEM}^MR", escape(&patient.id)),
        "",
        &format!(
            "{}^{}",
            escape(&patient.family_name),
            escape(&patient.given_name)
        ),
        "",
        &patient.date_of_birth.format("%Y%m%d").to_string(),
    ]
    .join("|");

    let mut segments = vec![
        header,
        referral_information,
        provider_segment(ROLE_REFERRING_PROVIDER, &referral.sender),
        provider_segment(ROLE_REFERRED_TO_PROVIDER, &referral.recipient),
        patient_identification,
        format!(
            "OBR|1|||NOTE^{}^{GATEWAY_CODING_SYSTEM}",
            escape(&referral.note_title)
        ),
    ];
    segments.extend(
        referral
            .sections
            .iter()
            .enumerate()
            .map(|(index, section)| observation_segment(index + 1, section)),
    );
    segments.join("\r")
}

/// A PRD segment for one party, in the layout of the module documentation.
fn provider_segment(role: &str, party: &Party) -> String {
    [
        "PRD",
        role,
        &format!(
            "{}^{}",
            escape(&party.family_name),
            escape(&party.given_name)
        ),
        &escape(party.organisation.as_deref().unwrap_or("")),
        "",
        "",
        "",
        &format!("{}^^^AUSHIC^NPI", escape(&party.hpii)),
    ]
    .join("|")
}

/// An OBX segment carrying one section as formatted text.
fn observation_segment(set_id: usize, section: &Section) -> String {
    [
        "OBX",
        &set_id.to_string(),
        "FT",
        &format!(
            "{}^{}^{GATEWAY_CODING_SYSTEM}",
            escape(&section.key),
            escape(&section.title)
        ),
        "",
        &escape(&section.body),
        "",
        "",
        "",
        "",
        "",
        "F",
    ]
    .join("|")
}

/// Escapes free text for use inside a field, component or subcomponent: the delimiters become
/// `\F\ \S\ \R\ \E\ \T\`, a line feed `\.br\` and a carriage return `\X0D\`. The result holds
/// none of `| ^ ~ & \r \n`, and [`unescape`] gives the original back exactly.
pub fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for character in text.chars() {
        match character {
            '|' => escaped.push_str("\\F\\"),
            '^' => escaped.push_str("\\S\\"),
            '~' => escaped.push_str("\\R\\"),
            '\\' => escaped.push_str("\\E\\"),
            '&' => escaped.push_str("\\T\\"),
            '\n' => escaped.push_str("\\.br\\"),
            '\r' => escaped.push_str("\\X0D\\"),
            other => escaped.push(other),
        }
    }
    escaped
}

/// Turns escaped field text back into plain text: the inverse of [`escape`]. It also decodes
/// any hex escape (`\X0D0A\` → CRLF, bytes read as UTF-8), drops the highlight markers `\H\`
/// and `\N\`, and leaves sequences it does not know, and lone backslashes, as they are.
pub fn unescape(text: &str) -> String {
    let mut plain = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('\\') {
        plain.push_str(&rest[..start]);
        let after_opening = &rest[start + 1..];
        let Some(length) = after_opening.find('\\') else {
            // No closing backslash: the rest is literal text.
            plain.push('\\');
            rest = after_opening;
            break;
        };
        match decode_escape_sequence(&after_opening[..length]) {
            Some(decoded) => {
                plain.push_str(&decoded);
                rest = &after_opening[length + 1..];
            }
            None => {
                // Unknown sequence: keep the backslash and read on from the next character, so
                // that its closing backslash may still open a sequence we do know.
                plain.push('\\');
                rest = after_opening;
            }
        }
    }
    plain.push_str(rest);
    plain
}

/// What an escape sequence (the text between its backslashes) stands for, if we know it.
fn decode_escape_sequence(sequence: &str) -> Option<String> {
    let decoded = match sequence {
        "F" => "|",
        "S" => "^",
        "R" => "~",
        "E" => "\\",
        "T" => "&",
        ".br" => "\n",
        "H" | "N" => "",
        _ => return decode_hex_sequence(sequence),
    };
    Some(decoded.to_owned())
}

/// Decodes `Xhhhh…` (an even number of hex digits) into text.
fn decode_hex_sequence(sequence: &str) -> Option<String> {
    let digits = sequence.strip_prefix('X')?;
    if digits.is_empty() || digits.len() % 2 != 0 || !digits.is_ascii() {
        return None;
    }
    let bytes = (0..digits.len())
        .step_by(2)
        .map(|index| u8::from_str_radix(&digits[index..index + 2], 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// Parses ER7 text into segments. Segments may be separated by `\r`, `\n` or `\r\n` (blank
/// lines are ignored); the first must be MSH with field separator `|` and encoding characters
/// `^~\&`, and every segment must start with a three-character name.
pub fn parse(text: &str) -> Result<Message, Hl7Error> {
    let mut lines = text
        .split(['\r', '\n'])
        .filter(|line| !line.trim().is_empty());
    let header = lines.next().ok_or(Hl7Error::Empty)?;
    let mut segments = vec![parse_header(header)?];
    for (index, line) in lines.enumerate() {
        segments.push(parse_segment(line, index + 2)?);
    }
    Ok(Message { segments })
}

/// Parses the MSH segment, checking its delimiters.
fn parse_header(line: &str) -> Result<Segment, Hl7Error> {
    let Some(after_name) = line.strip_prefix("MSH") else {
        return Err(Hl7Error::MissingHeader {
            found: line.chars().take(3).collect(),
        });
    };
    let Some(after_separator) = after_name.strip_prefix(FIELD_SEPARATOR) else {
        return Err(Hl7Error::WrongFieldSeparator {
            found: after_name.chars().take(1).collect(),
        });
    };
    let mut fields: Vec<String> = after_separator
        .split(FIELD_SEPARATOR)
        .map(str::to_owned)
        .collect();
    if fields[0] != ENCODING_CHARACTERS {
        return Err(Hl7Error::WrongEncodingCharacters {
            found: fields.swap_remove(0),
        });
    }
    fields.insert(0, FIELD_SEPARATOR.to_string());
    Ok(Segment {
        name: "MSH".to_owned(),
        fields,
    })
}

/// Parses any segment after the header.
fn parse_segment(line: &str, position: usize) -> Result<Segment, Hl7Error> {
    let mut parts = line.split(FIELD_SEPARATOR);
    let name = parts.next().unwrap_or_default();
    let valid_name = name.len() == 3
        && name
            .chars()
            .all(|character| character.is_ascii_uppercase() || character.is_ascii_digit());
    if !valid_name {
        return Err(Hl7Error::MalformedSegment { position });
    }
    Ok(Segment {
        name: name.to_owned(),
        fields: parts.map(str::to_owned).collect(),
    })
}

impl Message {
    /// Every segment, in message order (MSH first).
    pub fn all_segments(&self) -> &[Segment] {
        &self.segments
    }

    /// The segments with this name, in message order.
    pub fn segments(&self, name: &str) -> impl Iterator<Item = &Segment> {
        self.segments
            .iter()
            .filter(move |segment| segment.name == name)
    }

    /// The first segment with this name.
    fn first_segment(&self, name: &str) -> Option<&Segment> {
        self.segments(name).next()
    }

    /// The MSH segment; `parse` guarantees there is one, first.
    fn header(&self) -> &Segment {
        &self.segments[0]
    }

    /// MSH-9 message code and trigger event, for example `REF^I12` (the message structure in
    /// the third component is left out); `None` when MSH-9 is empty.
    pub fn message_type(&self) -> Option<String> {
        let code = non_empty(self.header().component(9, 1))?;
        Some(match non_empty(self.header().component(9, 2)) {
            Some(trigger_event) => format!("{code}^{trigger_event}"),
            None => code,
        })
    }

    /// MSH-10 message control id, unescaped; `None` when empty.
    pub fn control_id(&self) -> Option<String> {
        non_empty(self.header().field(10).map(unescape))
    }

    /// The OBX segments as note sections, in message order: key and title from OBX-3
    /// components 1 and 2, body from OBX-5, all unescaped.
    pub fn referral_sections(&self) -> Vec<Section> {
        self.segments("OBX")
            .map(|observation| Section {
                key: observation.component(3, 1).unwrap_or_default(),
                title: observation.component(3, 2).unwrap_or_default(),
                body: observation.field(5).map(unescape).unwrap_or_default(),
            })
            .collect()
    }

    /// The note title from OBR-4 component 2 of the first OBR, unescaped; `None` when empty.
    pub fn note_title(&self) -> Option<String> {
        non_empty(self.first_segment("OBR")?.component(4, 2))
    }

    /// The practitioner of the first PRD whose PRD-1 role is `role`: [`ROLE_REFERRING_PROVIDER`]
    /// (`RP`, the sender) or [`ROLE_REFERRED_TO_PROVIDER`] (`RT`, the recipient). `None` when
    /// there is no such PRD or it carries no HPI-I in PRD-7.
    pub fn party(&self, role: &str) -> Option<Party> {
        let provider = self
            .segments("PRD")
            .find(|provider| provider.component(1, 1).as_deref() == Some(role))?;
        Some(Party {
            hpii: non_empty(provider.component(7, 1))?,
            family_name: provider.component(2, 1).unwrap_or_default(),
            given_name: provider.component(2, 2).unwrap_or_default(),
            organisation: non_empty(provider.component(3, 1)),
        })
    }

    /// The patient of the first PID: id from PID-3, name from PID-5, date of birth from the
    /// first eight digits of PID-7. `None` when there is no PID, no id or no readable date.
    pub fn patient(&self) -> Option<PatientDetails> {
        let identification = self.first_segment("PID")?;
        let birth = identification.field(7)?;
        let date_of_birth = NaiveDate::parse_from_str(birth.get(..8)?, "%Y%m%d").ok()?;
        Some(PatientDetails {
            id: non_empty(identification.component(3, 1))?,
            family_name: identification.component(5, 1).unwrap_or_default(),
            given_name: identification.component(5, 2).unwrap_or_default(),
            date_of_birth,
        })
    }
}

impl Segment {
    /// Field `index` in HL7 numbering (from 1), raw: for MSH, field 1 is `|` itself, so
    /// `field(9)` is the message type and `field(10)` the control id. `None` past the last
    /// field (and for 0); an empty field is `Some("")`.
    pub fn field(&self, index: usize) -> Option<&str> {
        self.fields.get(index.checked_sub(1)?).map(String::as_str)
    }

    /// Component `component` (from 1) of the first repetition of field `field`, unescaped.
    /// `None` when the field or component is absent. MSH-1 and MSH-2 are delimiters, not
    /// data: their only component is the raw field.
    pub fn component(&self, field: usize, component: usize) -> Option<String> {
        let raw = self.field(field)?;
        if self.name == "MSH" && field <= 2 {
            return (component == 1).then(|| raw.to_owned());
        }
        let first_repetition = raw.split('~').next().unwrap_or_default();
        first_repetition
            .split('^')
            .nth(component.checked_sub(1)?)
            .map(unescape)
    }
}

/// Reads an acknowledgement: the code from MSA-1, the acknowledged control id from MSA-2 and
/// the message type from MSH-9 (see [`Message::message_type`]); all three must be filled.
pub fn parse_acknowledgement(text: &str) -> Result<Acknowledgement, Hl7Error> {
    let message = parse(text)?;
    let acknowledgment = message
        .first_segment("MSA")
        .ok_or(Hl7Error::MissingSegment { segment: "MSA" })?;
    let required = |field: usize| {
        non_empty(acknowledgment.component(field, 1)).ok_or(Hl7Error::MissingField {
            segment: "MSA",
            field,
        })
    };
    Ok(Acknowledgement {
        code: required(1)?,
        acknowledged_control_id: required(2)?,
        message_type: message.message_type().ok_or(Hl7Error::MissingField {
            segment: "MSH",
            field: 9,
        })?,
    })
}

/// `None` for an absent or empty value.
fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|value| !value.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    const HOSTILE: &str = "pipe | caret ^ tilde ~ backslash \\ amp & \\F\\ cr\rlf\ncrlf\r\n\
                           é 🙂 end\\";

    fn party(hpii: &str, family: &str, given: &str, organisation: Option<&str>) -> Party {
        Party {
            hpii: hpii.to_owned(),
            family_name: family.to_owned(),
            given_name: given.to_owned(),
            organisation: organisation.map(str::to_owned),
        }
    }

    fn section(key: &str, title: &str, body: &str) -> Section {
        Section {
            key: key.to_owned(),
            title: title.to_owned(),
            body: body.to_owned(),
        }
    }

    fn sample_referral(sections: Vec<Section>) -> Referral {
        Referral {
            control_id: "CTRL-1".to_owned(),
            sent_at: Utc.with_ymd_and_hms(2026, 11, 24, 9, 5, 7).unwrap(),
            sending_application: "SMD-GW".to_owned(),
            sender: party(
                "8003610000000001",
                "O'Brien|Smith^Jr",
                "Zoë~\\Ann&",
                Some("Clinic | North & \"East\"\r\n🙂"),
            ),
            recipient: party("8003610000000019", "Nguyen", "Minh\nAnh", None),
            patient: PatientDetails {
                id: "MRN|42^x".to_owned(),
                family_name: "Pátient&Co".to_owned(),
                given_name: "Al~ex\\".to_owned(),
                date_of_birth: NaiveDate::from_ymd_opt(1980, 2, 29).unwrap(),
            },
            note_title: "Consult ^ note".to_owned(),
            sections,
        }
    }

    #[test]
    fn a_referral_with_hostile_text_round_trips_exactly() {
        let sections = vec![
            section("history|^~\\&", "History\r\n of é 🙂", HOSTILE),
            section(
                "plan",
                "Plan",
                "line one\nline two\rline three\r\nline four",
            ),
            section("empty", "", ""),
        ];
        let referral = sample_referral(sections.clone());

        let text = build_referral(&referral);
        let message = parse(&text).expect("a built referral parses");

        assert_eq!(message.referral_sections(), sections);
        assert_eq!(message.party("RP"), Some(referral.sender.clone()));
        assert_eq!(message.party("RT"), Some(referral.recipient.clone()));
        assert_eq!(message.patient(), Some(referral.patient.clone()));
        assert_eq!(message.note_title(), Some(referral.note_title.clone()));
        assert_eq!(message.control_id().as_deref(), Some("CTRL-1"));
        assert_eq!(message.message_type().as_deref(), Some("REF^I12"));
        // Hostile text must not have added segments or fields: the structure is fixed.
        assert_eq!(message.all_segments().len(), 6 + sections.len());
        assert_eq!(text.matches('\r').count(), 5 + sections.len());
        assert!(!text.contains('\n'));
        for observation in message.segments("OBX") {
            assert_eq!(observation.fields.len(), 11);
        }
    }

    #[test]
    fn only_the_given_sections_appear_in_order() {
        let referral = sample_referral(vec![
            section("plan", "Plan", "Review in two weeks"),
            section("medications", "Medications", "Aspirin 100 mg"),
        ]);

        let message = parse(&build_referral(&referral)).unwrap();

        let observations: Vec<&Segment> = message.segments("OBX").collect();
        assert_eq!(observations.len(), 2);
        assert_eq!(observations[0].field(1), Some("1"));
        assert_eq!(observations[0].field(3), Some("plan^Plan^SMD-GW"));
        assert_eq!(observations[1].field(1), Some("2"));
        assert_eq!(
            observations[1].field(3),
            Some("medications^Medications^SMD-GW")
        );
        let keys: Vec<String> = message
            .referral_sections()
            .into_iter()
            .map(|section| section.key)
            .collect();
        assert_eq!(keys, ["plan", "medications"]);
        assert!(!build_referral(&referral).contains("history"));
    }

    #[test]
    fn a_referral_without_sections_has_no_observations() {
        let message = parse(&build_referral(&sample_referral(Vec::new()))).unwrap();

        assert_eq!(message.segments("OBX").count(), 0);
        assert!(message.referral_sections().is_empty());
    }

    #[test]
    fn referral_segments_come_in_the_documented_order() {
        let referral = sample_referral(vec![
            section("a", "A", "first"),
            section("b", "B", "second"),
        ]);

        let message = parse(&build_referral(&referral)).unwrap();

        let names: Vec<&str> = message
            .all_segments()
            .iter()
            .map(|segment| segment.name.as_str())
            .collect();
        assert_eq!(
            names,
            ["MSH", "RF1", "PRD", "PRD", "PID", "OBR", "OBX", "OBX"]
        );
        let roles: Vec<Option<&str>> = message.segments("PRD").map(|prd| prd.field(1)).collect();
        assert_eq!(roles, [Some("RP"), Some("RT")]);
    }

    #[test]
    fn referral_segments_follow_the_documented_layout() {
        let mut referral = sample_referral(vec![section("plan", "Plan", "Rest\nFluids")]);
        referral.sender = party("8003610000000001", "Smith", "Jane", Some("North Clinic"));
        referral.patient.id = "MRN42".to_owned();
        referral.patient.family_name = "Citizen".to_owned();
        referral.patient.given_name = "John".to_owned();

        let text = build_referral(&referral);

        let lines: Vec<&str> = text.split('\r').collect();
        assert_eq!(
            lines,
            [
                "MSH|^~\\&|SMD-GW|North Clinic|8003610000000019||20261124090507+0000||\
                 REF^I12^REF_I12|CTRL-1|P|2.4|||AL|AL|AUS|UNICODE UTF-8",
                "RF1|A^Active^HL70283|||||CTRL-1|20261124",
                "PRD|RP|Smith^Jane|North Clinic||||8003610000000001^^^AUSHIC^NPI",
                "PRD|RT|Nguyen^Minh\\.br\\Anh|||||8003610000000019^^^AUSHIC^NPI",
                "PID|1||MRN42^^^SMD-GW^MR||Citizen^John||19800229",
                "OBR|1|||NOTE^Consult \\S\\ note^SMD-GW",
                "OBX|1|FT|plan^Plan^SMD-GW||Rest\\.br\\Fluids||||||F",
            ]
        );
    }

    #[test]
    fn a_sender_without_organisation_is_sent_as_the_gateway() {
        let mut referral = sample_referral(Vec::new());
        referral.sender.organisation = None;

        let message = parse(&build_referral(&referral)).unwrap();

        let header = message.all_segments()[0].clone();
        assert_eq!(header.field(4), Some("SMD Gateway"));
        assert_eq!(header.field(6), Some(""));
        assert_eq!(message.party("RP").unwrap().organisation, None);
    }

    #[test]
    fn escape_maps_each_delimiter_and_line_break_to_its_sequence() {
        let cases = [
            ("", ""),
            ("plain text é 🙂", "plain text é 🙂"),
            ("|", "\\F\\"),
            ("^", "\\S\\"),
            ("~", "\\R\\"),
            ("\\", "\\E\\"),
            ("&", "\\T\\"),
            ("\n", "\\.br\\"),
            ("\r", "\\X0D\\"),
            ("\r\n", "\\X0D\\\\.br\\"),
            ("a|b^c~d\\e&f", "a\\F\\b\\S\\c\\R\\d\\E\\e\\T\\f"),
            ("\\F\\", "\\E\\F\\E\\"),
            ("\\.br\\", "\\E\\.br\\E\\"),
        ];
        for (plain, escaped) in cases {
            assert_eq!(escape(plain), escaped, "escape({plain:?})");
            assert_eq!(unescape(escaped), plain, "unescape({escaped:?})");
        }
    }

    #[test]
    fn unescape_inverts_escape_for_every_printable_ascii_character() {
        let printable: Vec<char> = (' '..='~').collect();
        for &character in &printable {
            for text in [
                character.to_string(),
                format!("a{character}b"),
                format!("{character}{character}\\{character}"),
            ] {
                let escaped = escape(&text);
                assert!(
                    !escaped.contains(['|', '^', '~', '&', '\r', '\n']),
                    "escape({text:?}) leaves a delimiter: {escaped:?}"
                );
                assert_eq!(unescape(&escaped), text, "round trip of {text:?}");
            }
        }
        let everything: String = printable.iter().collect();
        assert_eq!(unescape(&escape(&everything)), everything);
        let with_breaks = format!("{everything}\r\n{everything}\n\r{everything}\r");
        assert_eq!(unescape(&escape(&with_breaks)), with_breaks);
    }

    #[test]
    fn unescape_reads_hex_and_highlights_and_keeps_what_it_does_not_know() {
        let cases = [
            ("a\\X0D0A\\b", "a\r\nb"),
            ("\\X0d0a\\", "\r\n"),
            ("\\XC3A9\\", "é"),
            ("\\H\\bold\\N\\", "bold"),
            ("\\Zcustom\\", "\\Zcustom\\"),
            ("\\X0\\", "\\X0\\"),
            ("\\Xzz\\", "\\Xzz\\"),
            ("lone \\ backslash", "lone \\ backslash"),
            ("trailing\\", "trailing\\"),
            ("\\\\", "\\\\"),
            ("C:\\dir\\F\\", "C:\\dir|"),
        ];
        for (escaped, plain) in cases {
            assert_eq!(unescape(escaped), plain, "unescape({escaped:?})");
        }
    }

    #[test]
    fn parse_rejects_empty_input() {
        for text in ["", "\r", "\r\n\n", "   "] {
            assert_eq!(parse(text), Err(Hl7Error::Empty), "{text:?}");
        }
    }

    #[test]
    fn parse_rejects_a_first_segment_that_is_not_msh() {
        let error = parse("PID|1||42\rMSH|^~\\&|APP").unwrap_err();

        assert_eq!(
            error,
            Hl7Error::MissingHeader {
                found: "PID".to_owned()
            }
        );
        assert_eq!(
            error.to_string(),
            "first segment must be MSH, found \"PID\""
        );
    }

    #[test]
    fn parse_rejects_wrong_delimiters() {
        assert_eq!(
            parse("MSH#^~\\&#APP").unwrap_err(),
            Hl7Error::WrongFieldSeparator {
                found: "#".to_owned()
            }
        );
        assert_eq!(
            parse("MSH").unwrap_err(),
            Hl7Error::WrongFieldSeparator {
                found: String::new()
            }
        );
        for encoding in ["^~\\", "^~\\&#", "!~\\&", ""] {
            assert_eq!(
                parse(&format!("MSH|{encoding}|APP|ORG")).unwrap_err(),
                Hl7Error::WrongEncodingCharacters {
                    found: encoding.to_owned()
                },
                "{encoding:?}"
            );
        }
    }

    #[test]
    fn parse_rejects_a_segment_without_a_valid_name() {
        assert_eq!(
            parse("MSH|^~\\&|APP\rPID|1\rnot a segment").unwrap_err(),
            Hl7Error::MalformedSegment { position: 3 }
        );
    }

    #[test]
    fn parse_accepts_line_feed_and_crlf_separators() {
        let expected = parse("MSH|^~\\&|APP|ORG|||20261124||ADT^A01|C1|P|2.4\rPID|1||42").unwrap();
        for separator in ["\n", "\r\n", "\r\r", "\n\n"] {
            let text = format!(
                "MSH|^~\\&|APP|ORG|||20261124||ADT^A01|C1|P|2.4{separator}PID|1||42{separator}"
            );
            assert_eq!(parse(&text).unwrap(), expected, "{separator:?}");
        }
        assert_eq!(expected.all_segments().len(), 2);
    }

    #[test]
    fn msh_fields_are_numbered_from_the_field_separator() {
        let message =
            parse("MSH|^~\\&|APP|ORG|RECV|RORG|20261124||REF^I12^REF_I12|CTRL\\F\\9|P|2.4")
                .unwrap();
        let header = &message.all_segments()[0];

        assert_eq!(header.field(0), None);
        assert_eq!(header.field(1), Some("|"));
        assert_eq!(header.field(2), Some("^~\\&"));
        assert_eq!(header.component(2, 1).as_deref(), Some("^~\\&"));
        assert_eq!(header.field(3), Some("APP"));
        assert_eq!(header.field(9), Some("REF^I12^REF_I12"));
        assert_eq!(header.component(9, 3).as_deref(), Some("REF_I12"));
        assert_eq!(header.component(9, 4), None);
        assert_eq!(header.field(10), Some("CTRL\\F\\9"));
        assert_eq!(header.field(13), None);
        assert_eq!(message.message_type().as_deref(), Some("REF^I12"));
        assert_eq!(message.control_id().as_deref(), Some("CTRL|9"));
    }

    #[test]
    fn a_header_without_type_or_control_id_reports_none() {
        let message = parse("MSH|^~\\&|APP").unwrap();

        assert_eq!(message.message_type(), None);
        assert_eq!(message.control_id(), None);
        assert_eq!(message.party("RP"), None);
        assert_eq!(message.patient(), None);
    }

    #[test]
    fn parse_acknowledgement_reads_the_code_and_the_acknowledged_control_id() {
        let text = "MSH|^~\\&|RECV|ORG|SMD-GW||20261124120000+0000||RRI^I12^RRI_I12|ACK123|P|2.4\r\
                    MSA|AA|CTRL-1";

        let acknowledgement = parse_acknowledgement(text).unwrap();

        assert_eq!(
            acknowledgement,
            Acknowledgement {
                code: "AA".to_owned(),
                acknowledged_control_id: "CTRL-1".to_owned(),
                message_type: "RRI^I12".to_owned(),
            }
        );
    }

    #[test]
    fn parse_acknowledgement_rejects_a_message_without_msa() {
        let text = "MSH|^~\\&|RECV|ORG|SMD-GW||20261124120000+0000||RRI^I12|ACK123|P|2.4";

        let error = parse_acknowledgement(text).unwrap_err();

        assert_eq!(error, Hl7Error::MissingSegment { segment: "MSA" });
        assert_eq!(error.to_string(), "missing MSA segment");
    }

    #[test]
    fn parse_acknowledgement_rejects_an_empty_acknowledged_control_id() {
        let text = "MSH|^~\\&|RECV|ORG|||20261124||ACK^I12|A1|P|2.4\nMSA|AE|";

        assert_eq!(
            parse_acknowledgement(text).unwrap_err(),
            Hl7Error::MissingField {
                segment: "MSA",
                field: 2
            }
        );
    }

    #[test]
    fn error_messages_are_lowercase_without_a_trailing_period() {
        let errors = [
            Hl7Error::Empty,
            Hl7Error::MissingHeader {
                found: "PID".to_owned(),
            },
            Hl7Error::WrongFieldSeparator {
                found: "#".to_owned(),
            },
            Hl7Error::WrongEncodingCharacters {
                found: "^~".to_owned(),
            },
            Hl7Error::MalformedSegment { position: 2 },
            Hl7Error::MissingSegment { segment: "MSA" },
            Hl7Error::MissingField {
                segment: "MSA",
                field: 2,
            },
        ];
        for error in errors {
            let message = error.to_string();
            assert!(message.starts_with(|c: char| c.is_lowercase()), "{message}");
            assert!(!message.ends_with('.'), "{message}");
        }
    }
}
