//! Just enough HL7 v2 (ER7 text) for the sandbox: recognising a payload's header and reading
//! its control id, escaping text, and building the two messages the sandbox writes itself — the
//! inbound referral (`REF^I12`) a directory practitioner sends, and the application
//! acknowledgement (`RRI^I12`) a recipient's system answers a delivered message with.
//!
//! Segments end with `\r`. Field separator `|`, components `^`, repetitions `~`, escape `\`,
//! subcomponents `&`.

use chrono::{DateTime, Utc};

/// What every payload must start with: an MSH segment with the standard encoding characters.
pub(crate) const HEADER_START: &str = "MSH|^~\\&|";

/// Whether `payload` starts like an HL7 v2 message.
pub(crate) fn looks_like_hl7(payload: &str) -> bool {
    payload.starts_with(HEADER_START)
}

/// `text` with the HL7 delimiters escaped (`|` `\F\`, `^` `\S\`, `~` `\R\`, `\` `\E\`, `&`
/// `\T\`) and each line break (`\r\n`, `\n` or `\r`) written as `\.br\`.
pub(crate) fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    let mut characters = text.chars().peekable();
    while let Some(character) = characters.next() {
        match character {
            '|' => escaped.push_str("\\F\\"),
            '^' => escaped.push_str("\\S\\"),
            '~' => escaped.push_str("\\R\\"),
            '\\' => escaped.push_str("\\E\\"),
            '&' => escaped.push_str("\\T\\"),
            '\r' => {
                if characters.peek() == Some(&'\n') {
                    characters.next();
                }
                escaped.push_str("\\.br\\");
            }
            '\n' => escaped.push_str("\\.br\\"),
            other => escaped.push(other),
        }
    }
    escaped
}

/// An HL7 timestamp (DTM) in UTC: `YYYYMMDDHHMMSS+0000`.
pub(crate) fn timestamp(at: DateTime<Utc>) -> String {
    at.format("%Y%m%d%H%M%S+0000").to_string()
}

/// The fields of the MSH segment as written (`fields[n]` is MSH-(n+1) for n ≥ 2: index 0 is
/// `MSH`, index 1 the encoding characters).
fn header_fields(payload: &str) -> Vec<&str> {
    let first_segment = payload.split(['\r', '\n']).next().unwrap_or_default();
    first_segment.split('|').collect()
}

/// MSH-`number` of `payload` as written (still escaped), or empty when absent.
fn header_field(payload: &str, number: usize) -> &str {
    header_fields(payload)
        .get(number - 1)
        .copied()
        .unwrap_or_default()
}

/// The message control id (MSH-10) of `payload`, as written; empty when it has none.
pub(crate) fn control_id(payload: &str) -> &str {
    header_field(payload, 10)
}

/// A practitioner as a PRD segment names them.
#[derive(Debug)]
pub(crate) struct PractitionerParty<'a> {
    pub(crate) given_name: &'a str,
    pub(crate) family_name: &'a str,
    pub(crate) hpii: &'a str,
    pub(crate) suburb: &'a str,
    pub(crate) state: &'a str,
    pub(crate) postcode: &'a str,
}

/// The synthetic patient of an inbound referral.
#[derive(Debug)]
pub(crate) struct SyntheticPatient<'a> {
    pub(crate) record_number: &'a str,
    pub(crate) given_name: &'a str,
    pub(crate) family_name: &'a str,
    /// `YYYYMMDD`.
    pub(crate) birth_date: &'a str,
    /// `F`, `M` or `U`.
    pub(crate) sex: &'a str,
}

/// Everything an inbound referral says.
#[derive(Debug)]
pub(crate) struct Referral<'a> {
    pub(crate) control_id: &'a str,
    pub(crate) sent_at: DateTime<Utc>,
    pub(crate) sending_application: &'a str,
    pub(crate) sending_facility: &'a str,
    pub(crate) receiving_application: &'a str,
    pub(crate) receiving_facility: &'a str,
    pub(crate) sender: PractitionerParty<'a>,
    /// The recipient's name as free text.
    pub(crate) recipient_name: &'a str,
    /// The recipient's HPI-I, when known.
    pub(crate) recipient_hpii: Option<&'a str>,
    pub(crate) patient: SyntheticPatient<'a>,
    /// The letter, line breaks and all.
    pub(crate) text: &'a str,
}

/// The identifier of a practitioner in PRD-7: the HPI-I, assigned by the HI Service.
fn practitioner_identifier(hpii: &str) -> String {
    format!("{}^^^AUSHICPR^NPII", escape(hpii))
}

/// A `REF^I12` referral: MSH, RF1, PRD for the sender (`RP`) and recipient (`RT`), PID, OBR, and
/// the text in one formatted-text OBX.
pub(crate) fn referral(referral: &Referral<'_>) -> String {
    let sent_at = timestamp(referral.sent_at);
    let sender = &referral.sender;
    let segments = [
        format!(
            "MSH|^~\\&|{}|{}|{}|{}|{sent_at}||REF^I12^REF_I12|{}|P|2.4|||AL|NE|AUS",
            escape(referral.sending_application),
            escape(referral.sending_facility),
            escape(referral.receiving_application),
            escape(referral.receiving_facility),
            escape(referral.control_id),
        ),
        format!(
            "RF1|P^Pending^HL70283|R^Routine^HL70280|MED^Medical^HL70281|||{}^SANDBOX",
            escape(referral.control_id)
        ),
        format!(
            "PRD|RP|{}^{}^^^Dr|^^{}^{}^{}^AUS||||{}",
            escape(sender.family_name),
            escape(sender.given_name),
            escape(sender.suburb),
            escape(sender.state),
            escape(sender.postcode),
            practitioner_identifier(sender.hpii),
        ),
        format!(
            "PRD|RT|{}|||||{}",
            escape(referral.recipient_name),
            referral
                .recipient_hpii
                .map(practitioner_identifier)
                .unwrap_or_default(),
        ),
        format!(
            "PID|1||{}^^^SANDBOX^MR||{}^{}||{}|{}",
            escape(referral.patient.record_number),
            escape(referral.patient.family_name),
            escape(referral.patient.given_name),
            escape(referral.patient.birth_date),
            escape(referral.patient.sex),
        ),
        format!("OBR|1|||REF^Referral letter^SANDBOX|||{sent_at}"),
        format!(
            "OBX|1|FT|REF^Referral letter^SANDBOX||{}||||||F",
            escape(referral.text)
        ),
    ];
    segments_to_message(&segments)
}

/// Who acknowledges a delivered message.
#[derive(Debug)]
pub(crate) struct Acknowledger<'a> {
    pub(crate) application: &'a str,
    pub(crate) facility: &'a str,
    pub(crate) control_id: &'a str,
    pub(crate) acknowledged_at: DateTime<Utc>,
}

/// The `RRI^I12` application acknowledgement of `original`: MSH addressed back to the original
/// sender (MSH-3 and MSH-4 copied as written), and `MSA|AA|` quoting the original control id.
pub(crate) fn acknowledgement(original: &str, acknowledger: &Acknowledger<'_>) -> String {
    let segments = [
        format!(
            "MSH|^~\\&|{}|{}|{}|{}|{}||RRI^I12^RRI_I12|{}|P|2.4|||NE|NE|AUS",
            escape(acknowledger.application),
            escape(acknowledger.facility),
            header_field(original, 3),
            header_field(original, 4),
            timestamp(acknowledger.acknowledged_at),
            escape(acknowledger.control_id),
        ),
        format!("MSA|AA|{}", control_id(original)),
    ];
    segments_to_message(&segments)
}

fn segments_to_message(segments: &[String]) -> String {
    let mut message = String::new();
    for segment in segments {
        message.push_str(segment);
        message.push('\r');
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn sample_referral_text() -> &'static str {
        "Dear Dr Smith,\nPlease see Ms A|B ^ C~D & E\\F.\r\nThanks"
    }

    #[test]
    fn delimiters_and_line_breaks_are_escaped() {
        assert_eq!(
            escape(sample_referral_text()),
            "Dear Dr Smith,\\.br\\Please see Ms A\\F\\B \\S\\ C\\R\\D \\T\\ E\\E\\F.\\.br\\Thanks"
        );
        assert_eq!(escape("a\rb"), "a\\.br\\b");
        assert_eq!(escape("plain"), "plain");
    }

    #[test]
    fn the_control_id_is_read_from_msh_10() {
        let payload =
            "MSH|^~\\&|APP|FAC|RAPP|RFAC|20300101000000||REF^I12^REF_I12|CTRL-123|P|2.4\rPID|1\r";
        assert!(looks_like_hl7(payload));
        assert_eq!(control_id(payload), "CTRL-123");
        assert_eq!(control_id("MSH|^~\\&|APP"), "");
        assert!(!looks_like_hl7("MSH|^~\\|APP"));
    }

    #[test]
    fn a_referral_has_its_segments_in_order_and_its_text_escaped() {
        let sent_at = Utc.with_ymd_and_hms(2030, 1, 2, 3, 4, 5).unwrap();
        let message = referral(&Referral {
            control_id: "SBX1",
            sent_at,
            sending_application: "SANDBOX-PMS",
            sending_facility: "Carlton Medical Centre",
            receiving_application: "ARGUS",
            receiving_facility: "Smith & Jones",
            sender: PractitionerParty {
                given_name: "Mei",
                family_name: "O'Brien",
                hpii: "8003619999900019",
                suburb: "Carlton",
                state: "VIC",
                postcode: "3053",
            },
            recipient_name: "Dr Recipient",
            recipient_hpii: None,
            patient: SyntheticPatient {
                record_number: "MRN1",
                given_name: "Alex",
                family_name: "Sample",
                birth_date: "19800101",
                sex: "U",
            },
            text: sample_referral_text(),
        });
        let segments: Vec<&str> = message.trim_end_matches('\r').split('\r').collect();
        let names: Vec<&str> = segments.iter().map(|segment| &segment[..3]).collect();
        assert_eq!(names, ["MSH", "RF1", "PRD", "PRD", "PID", "OBR", "OBX"]);
        assert!(
            segments[0].contains("|Smith \\T\\ Jones|20300102030405+0000||REF^I12^REF_I12|SBX1|")
        );
        assert!(segments[2].starts_with("PRD|RP|O'Brien^Mei^^^Dr|"));
        assert!(segments[2].ends_with("|8003619999900019^^^AUSHICPR^NPII"));
        assert_eq!(segments[3], "PRD|RT|Dr Recipient|||||");
        assert!(segments[6].contains(&escape(sample_referral_text())));
        assert!(!segments[6].contains('\n'));
    }

    #[test]
    fn an_acknowledgement_quotes_the_original_control_id() {
        let original = "MSH|^~\\&|GATEWAY|Harbourside|ARGUS|Carlton|20300101000000||REF^I12^REF_I12|GW-42|P|2.4\r";
        let acknowledged_at = Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 15).unwrap();
        let message = acknowledgement(
            original,
            &Acknowledger {
                application: "RECIPIENT-PMS",
                facility: "Carlton Medical Centre",
                control_id: "ACK-1",
                acknowledged_at,
            },
        );
        assert_eq!(
            message,
            "MSH|^~\\&|RECIPIENT-PMS|Carlton Medical Centre|GATEWAY|Harbourside|20300101000015+0000||RRI^I12^RRI_I12|ACK-1|P|2.4|||NE|NE|AUS\rMSA|AA|GW-42\r"
        );
    }
}
