//! The ledger record: a request's facts, typed as the record prints them (text, counts, flags
//! and USD amounts), written once per request as one filter-state value,
//! `wasm.tollgate.ledger`, holding the JSON object's members ([`encode`]) that the shipped
//! access logs splice at the start of their line. `envoy/ledger.schema.json` is the line's
//! schema.

use std::borrow::Cow;
use std::fmt::Write as _;

/// The version of the record's shape ([`encode`] writes it first).
pub const LEDGER_VERSION: u32 = 1;

/// One fact of the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fact {
    Text(String),
    /// A token count, a step number.
    Count(u64),
    Flag(bool),
    /// A USD amount as a decimal (`0.000123`: micro-USD, rounded half-up).
    Usd(String),
}

impl Fact {
    /// The fact as text, unquoted (how the native tests read a record).
    pub fn plain(&self) -> Cow<'_, str> {
        match self {
            Fact::Text(s) | Fact::Usd(s) => Cow::Borrowed(s),
            Fact::Count(n) => Cow::Owned(n.to_string()),
            Fact::Flag(b) => Cow::Borrowed(if *b { "true" } else { "false" }),
        }
    }
}

impl From<String> for Fact {
    fn from(s: String) -> Fact {
        Fact::Text(s)
    }
}

impl From<&str> for Fact {
    fn from(s: &str) -> Fact {
        Fact::Text(s.to_string())
    }
}

/// A request's record: (filter state name, fact) pairs, in the order they are written.
pub type Record = Vec<(&'static str, Fact)>;

/// The record's name for a fact (its name less `tollgate.`).
fn ledger_name(name: &str) -> &str {
    name.strip_prefix("tollgate.").unwrap_or(name)
}

/// The record as one JSON object's members, each followed by a comma (`"ledger_version":1,
/// "tenant":"team-a",…,`): spliced at the start of a JSON access-log line, typed (counts are
/// numbers, flags booleans), absent facts absent. A USD amount that is not a plain decimal
/// (never produced) is written as a string rather than break the line.
pub fn encode(record: &Record) -> String {
    let mut out = String::with_capacity(64 + record.len() * 24);
    let _ = write!(out, "\"ledger_version\":{LEDGER_VERSION},");
    for (name, fact) in record {
        push_string(&mut out, ledger_name(name));
        out.push(':');
        match fact {
            Fact::Text(s) => push_string(&mut out, s),
            Fact::Count(n) => {
                let _ = write!(out, "{n}");
            }
            Fact::Flag(b) => out.push_str(if *b { "true" } else { "false" }),
            Fact::Usd(s) if is_decimal(s) => out.push_str(s),
            Fact::Usd(s) => push_string(&mut out, s),
        }
        out.push(',');
    }
    out
}

/// `123`, `0.000123`: digits, at most one inner dot (a valid JSON number).
fn is_decimal(s: &str) -> bool {
    let (int, frac) = s.split_once('.').unwrap_or((s, "1"));
    let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    digits(int) && digits(frac) && (int == "0" || !int.starts_with('0'))
}

/// A JSON string: quotes, backslashes and control characters escaped.
fn push_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_is_typed_json_members() {
        let record: Record = vec![
            ("tollgate.tenant", Fact::from("team \"a\"\n")),
            ("tollgate.stream", Fact::Flag(true)),
            ("tollgate.input_tokens", Fact::Count(18)),
            ("tollgate.llm_cost_usd", Fact::Usd("0.000123".into())),
            ("tollgate.conversation_cost_usd", Fact::Usd("1e9".into())),
        ];
        let line = format!("{{{}\"status\":200}}", encode(&record));
        let parsed: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        assert_eq!(parsed["ledger_version"], 1);
        assert_eq!(parsed["tenant"], "team \"a\"\n");
        assert_eq!(parsed["stream"], true);
        assert_eq!(parsed["input_tokens"], 18);
        assert_eq!(parsed["llm_cost_usd"], 0.000123);
        assert_eq!(
            parsed["conversation_cost_usd"], "1e9",
            "not a plain decimal: a string"
        );
        assert_eq!(parsed["status"], 200);
        assert_eq!(Fact::Count(7).plain(), "7");
        assert_eq!(Fact::Flag(false).plain(), "false");
    }

    proptest::proptest! {
        /// Whatever a client sends as a path, an id or a model name, the line stays one JSON
        /// object and says exactly what was sent.
        #[test]
        fn arbitrary_text_round_trips(text in ".*", count in proptest::num::u64::ANY) {
            let record: Record = vec![
                ("tollgate.path", Fact::Text(text.clone())),
                ("tollgate.input_tokens", Fact::Count(count)),
            ];
            let line = format!("{{{}\"x\":0}}", encode(&record));
            let parsed: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            proptest::prop_assert_eq!(parsed["path"].as_str(), Some(text.as_str()));
            proptest::prop_assert_eq!(parsed["input_tokens"].as_u64(), Some(count));
        }
    }

    #[test]
    fn any_text_keeps_the_line_valid_json() {
        let nasty: String = (0u8..=127)
            .map(char::from)
            .chain("é\u{2028}😀".chars())
            .collect();
        let record: Record = vec![("tollgate.user", Fact::Text(nasty.clone()))];
        let line = format!("{{{}\"x\":0}}", encode(&record));
        let parsed: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        assert_eq!(parsed["user"], nasty.as_str());
        for bad in ["", ".5", "5.", "01", "1.2.3", "-1", "1e3"] {
            assert!(!is_decimal(bad), "{bad}");
        }
        for good in ["0", "0.5", "12.000001", "100"] {
            assert!(is_decimal(good), "{good}");
        }
    }
}
