//! Payload decoding and series templates: the pure half of the MQTT source.
//!
//! # Payloads
//!
//! Two formats (`config::PayloadFormat`):
//!
//! - `json`: an object with the value at a dotted path (`value`, `reading.temp`,
//!   `values.0` indexes an array) and optionally a timestamp at another path. The value must be
//!   a finite number; a numeric string (`"21.5"`) is accepted because many devices quote
//!   numbers, booleans are not. The timestamp is optional: when its field is absent (or
//!   `null`) the caller stamps the receive time. Numeric timestamps are seconds or
//!   milliseconds since the Unix epoch (`auto`: above 10^11 means ms, i.e. anything after
//!   1973 in ms and before 5138 in s), strings are RFC 3339 with `Z` or a numeric offset. A
//!   string without an offset is rejected rather than guessed as UTC: a local wall-clock time
//!   read as UTC would shift every reading by hours without anyone noticing.
//! - `number`: a bare ASCII number (`21.5`, surrounding whitespace allowed).
//!
//! Every failure maps to a stable `cause` string, the label of the `rejected` metric:
//! `not_utf8`, `invalid_json`, `missing_value`, `value_not_number`, `non_finite`,
//! `bad_timestamp`, `not_a_number`. Decoding never panics, whatever the bytes.
//!
//! # Series templates
//!
//! `{topic}` is the whole topic, `{N}` its N-th `/`-separated segment (0-based), anything else
//! is literal (`{{` and `}}` write braces). Parsing checks only the syntax: whether a segment
//! exists depends on the topic, so an out-of-range index is an error at render time, counted
//! as the cause `bad_series`.

use crate::config::{PayloadConfig, PayloadFormat, TimestampUnit};

/// A decoded payload.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decoded {
    /// Event time from the payload, ms since the Unix epoch; `None` when the payload has none.
    pub ts_ms: Option<i64>,
    /// The reading.
    pub value: f64,
}

/// Why a payload was rejected.
#[derive(thiserror::Error, Debug, Clone, PartialEq)]
pub enum PayloadError {
    /// The payload is not UTF-8 text.
    #[error("payload is not UTF-8 (invalid byte at offset {offset})")]
    NotUtf8 {
        /// Offset of the first invalid byte.
        offset: usize,
    },
    /// The payload is not JSON.
    #[error("payload is not valid JSON: {reason}")]
    InvalidJson {
        /// The parser's message (with line and column).
        reason: String,
    },
    /// The value path leads nowhere.
    #[error("payload has no value at `{path}`")]
    MissingValue {
        /// The configured value path.
        path: String,
    },
    /// The value is there but not a number.
    #[error("value at `{path}` is not a number (found {found})")]
    ValueNotNumber {
        /// The configured value path.
        path: String,
        /// The JSON type (or the string) found instead.
        found: String,
    },
    /// The value is NaN or infinite.
    #[error("value is not finite")]
    NonFinite,
    /// The timestamp is present but unusable.
    #[error("timestamp at `{path}` is invalid: {reason}")]
    BadTimestamp {
        /// The configured timestamp path.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A `number` payload that is not a number.
    #[error("payload `{text}` is not a number")]
    NotANumber {
        /// The start of the payload text.
        text: String,
    },
}

impl PayloadError {
    /// The stable label of this failure in the `rejected` metric.
    pub fn cause(&self) -> &'static str {
        match self {
            PayloadError::NotUtf8 { .. } => "not_utf8",
            PayloadError::InvalidJson { .. } => "invalid_json",
            PayloadError::MissingValue { .. } => "missing_value",
            PayloadError::ValueNotNumber { .. } => "value_not_number",
            PayloadError::NonFinite => "non_finite",
            PayloadError::BadTimestamp { .. } => "bad_timestamp",
            PayloadError::NotANumber { .. } => "not_a_number",
        }
    }
}

/// Longest excerpt of a payload quoted in an error (errors end up in logs).
const EXCERPT_CHARS: usize = 40;

/// Latest accepted timestamp: 9999-12-31T23:59:59.999Z. Beyond it a sender is broken, and
/// keeping timestamps in four-digit years keeps every downstream formatter honest.
const MAX_TS_MS: i64 = 253_402_300_799_999;

/// Numeric timestamps above this are milliseconds in `auto` mode (10^11 s is year 5138,
/// 10^11 ms is March 1973).
const AUTO_MS_THRESHOLD: f64 = 1e11;

/// Decodes one payload according to `cfg`.
pub fn decode(cfg: &PayloadConfig, payload: &[u8]) -> Result<Decoded, PayloadError> {
    let text = std::str::from_utf8(payload)
        .map_err(|e| PayloadError::NotUtf8 { offset: e.valid_up_to() })?;
    match cfg.format {
        PayloadFormat::Number => decode_number(text),
        PayloadFormat::Json => decode_json(cfg, text),
    }
}

fn decode_number(text: &str) -> Result<Decoded, PayloadError> {
    let trimmed = text.trim_ascii();
    // `f64::from_str` also takes `inf` and `NaN`; they parse and then fail as non-finite,
    // which is the more useful message.
    let value: f64 =
        trimmed.parse().map_err(|_| PayloadError::NotANumber { text: excerpt(trimmed) })?;
    if !value.is_finite() {
        return Err(PayloadError::NonFinite);
    }
    Ok(Decoded { ts_ms: None, value })
}

fn decode_json(cfg: &PayloadConfig, text: &str) -> Result<Decoded, PayloadError> {
    match decode_json_flat(cfg, text) {
        Some(decoded) => Ok(decoded),
        None => decode_json_tree(cfg, text),
    }
}

/// The general path of [`decode_json`]: the whole document, then the dotted paths.
fn decode_json_tree(cfg: &PayloadConfig, text: &str) -> Result<Decoded, PayloadError> {
    let doc: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| PayloadError::InvalidJson { reason: e.to_string() })?;
    let value = match lookup(&doc, &cfg.value) {
        None | Some(serde_json::Value::Null) => {
            return Err(PayloadError::MissingValue { path: cfg.value.clone() });
        }
        Some(v) => number_of(v)
            .map_err(|found| PayloadError::ValueNotNumber { path: cfg.value.clone(), found })?,
    };
    if !value.is_finite() {
        return Err(PayloadError::NonFinite);
    }
    let ts_ms = match lookup(&doc, &cfg.timestamp) {
        None | Some(serde_json::Value::Null) => None,
        Some(ts) => Some(timestamp_of(ts, cfg.timestamp_unit).map_err(|reason| {
            PayloadError::BadTimestamp { path: cfg.timestamp.clone(), reason }
        })?),
    };
    Ok(Decoded { ts_ms, value })
}

/// The fast path of [`decode_json`] for the common shape: an object holding the value and the
/// timestamp as top-level fields (`{"value": 21.5, "ts": 1718000000123}`, paths without a
/// dot). It reads the object field by field, keeping only those two and skipping (but still
/// validating) the rest, instead of building the whole document as a `serde_json::Value`
/// tree (a map and a string per key: ~60 % of the decode time per event). `None` for any other
/// shape and for every error: the general path then decodes the payload again and gives the
/// error its usual words, so the two paths accept and reject exactly the same payloads.
fn decode_json_flat(cfg: &PayloadConfig, text: &str) -> Option<Decoded> {
    use serde::Deserializer as _;
    use serde::de::{MapAccess, SeqAccess, Visitor};

    /// Another field: read and checked as `serde_json::Value` would (`IgnoredAny` lets
    /// `1e400` through, which the document path rejects), but kept nowhere.
    struct Skip;

    impl<'de> serde::Deserialize<'de> for Skip {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(Skip)
        }
    }

    impl<'de> Visitor<'de> for Skip {
        type Value = Skip;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_bool<E>(self, _: bool) -> Result<Skip, E> {
            Ok(Skip)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Skip, E> {
            Ok(Skip)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Skip, E> {
            Ok(Skip)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Skip, E> {
            Ok(Skip)
        }
        fn visit_str<E>(self, _: &str) -> Result<Skip, E> {
            Ok(Skip)
        }
        fn visit_unit<E>(self) -> Result<Skip, E> {
            Ok(Skip)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Skip, A::Error> {
            while seq.next_element::<Skip>()?.is_some() {}
            Ok(Skip)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Skip, A::Error> {
            while map.next_entry::<Skip, Skip>()?.is_some() {}
            Ok(Skip)
        }
    }

    struct Fields<'c> {
        value: &'c str,
        timestamp: &'c str,
    }

    impl<'de> Visitor<'de> for Fields<'_> {
        type Value = (Option<serde_json::Value>, Option<serde_json::Value>);

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an object")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let (mut value, mut ts) = (None, None);
            // Borrowed keys: a key with escapes fails here and takes the general path.
            while let Some(key) = map.next_key::<&str>()? {
                // Later duplicates win, as in `serde_json::Value`'s map.
                if key == self.value {
                    value = Some(map.next_value()?);
                } else if key == self.timestamp {
                    ts = Some(map.next_value()?);
                } else {
                    map.next_value::<Skip>()?;
                }
            }
            Ok((value, ts))
        }
    }

    let flat = |path: &str| !path.is_empty() && !path.contains('.');
    if !flat(&cfg.value) || !flat(&cfg.timestamp) || cfg.value == cfg.timestamp {
        return None;
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let (value, ts) =
        de.deserialize_map(Fields { value: &cfg.value, timestamp: &cfg.timestamp }).ok()?;
    de.end().ok()?;
    let value = match value {
        None | Some(serde_json::Value::Null) => return None,
        Some(v) => number_of(&v).ok()?,
    };
    if !value.is_finite() {
        return None;
    }
    let ts_ms = match ts {
        None | Some(serde_json::Value::Null) => None,
        Some(ts) => Some(timestamp_of(&ts, cfg.timestamp_unit).ok()?),
    };
    Some(Decoded { ts_ms, value })
}

/// Follows a dotted path; an empty path is the document itself. A segment that is a number
/// indexes an array.
fn lookup<'a>(doc: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    if path.is_empty() {
        return Some(doc);
    }
    path.split('.').try_fold(doc, |node, segment| match node {
        serde_json::Value::Object(map) => map.get(segment),
        serde_json::Value::Array(items) => segment.parse::<usize>().ok().and_then(|i| items.get(i)),
        _ => None,
    })
}

/// The number in a JSON value, or a description of what was found instead.
fn number_of(v: &serde_json::Value) -> Result<f64, String> {
    match v {
        // `as_f64` is `Some` for every JSON number (u64/i64 are converted, maybe rounded).
        serde_json::Value::Number(n) => n.as_f64().ok_or_else(|| format!("number {n}")),
        serde_json::Value::String(s) => {
            s.trim_ascii().parse::<f64>().map_err(|_| format!("string \"{}\"", excerpt(s)))
        }
        serde_json::Value::Bool(b) => Err(format!("boolean {b}")),
        serde_json::Value::Null => Err("null".into()),
        serde_json::Value::Array(_) => Err("an array".into()),
        serde_json::Value::Object(_) => Err("an object".into()),
    }
}

/// A JSON timestamp in ms since the Unix epoch.
fn timestamp_of(v: &serde_json::Value, unit: TimestampUnit) -> Result<i64, String> {
    let number = match v {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) => match s.trim_ascii().parse::<f64>() {
            Ok(n) => Some(n),
            Err(_) => return parse_rfc3339_ms(s.trim_ascii()),
        },
        other => {
            return Err(format!("expected a number or an RFC 3339 string, found {}", kind(other)));
        }
    };
    let number = number.ok_or_else(|| "not representable as a number".to_string())?;
    if !number.is_finite() {
        return Err("not finite".into());
    }
    let ms = match unit {
        TimestampUnit::Ms => number,
        TimestampUnit::S => number * 1000.0,
        TimestampUnit::Auto if number.abs() > AUTO_MS_THRESHOLD => number,
        TimestampUnit::Auto => number * 1000.0,
    };
    check_range(ms.round())
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Accepts `[1970-01-01, 9999-12-31]` in ms; the float is already rounded.
fn check_range(ms: f64) -> Result<i64, String> {
    if (0.0..=MAX_TS_MS as f64).contains(&ms) {
        // In range, so the conversion is exact enough (f64 holds integers < 2^53 exactly).
        Ok(ms as i64)
    } else {
        Err(format!("{ms} ms is outside 1970..=9999"))
    }
}

/// Parses `YYYY-MM-DD(T|t| )HH:MM:SS[.fraction](Z|z|+HH:MM|-HH:MM)` into ms since the epoch.
///
/// Written by hand because `humantime::parse_rfc3339_weak` only knows `Z`/`+00:00` and reads
/// an absent offset as UTC. Leap seconds (`:60`) are folded into the next second, as RFC 3339
/// suggests for systems without leap-second tables. Shared with the recording reader.
pub fn parse_rfc3339_ms(s: &str) -> Result<i64, String> {
    let bad = || format!("`{}` is not an RFC 3339 timestamp", excerpt(s));
    let b = s.as_bytes();
    if b.len() < 20 {
        return Err(bad());
    }
    let num = |range: std::ops::Range<usize>| -> Result<i64, String> {
        let digits = &b[range];
        if digits.iter().all(u8::is_ascii_digit) {
            Ok(digits.iter().fold(0i64, |acc, d| acc * 10 + i64::from(d - b'0')))
        } else {
            Err(bad())
        }
    };
    if b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return Err(bad());
    }
    if b[13] != b':' || b[16] != b':' {
        return Err(bad());
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return Err(format!("`{}` has no such date", excerpt(s)));
    }
    if hour > 23 || minute > 59 || second > 60 {
        return Err(format!("`{}` has no such time of day", excerpt(s)));
    }
    // Fraction: any number of digits, kept to the millisecond (truncated).
    let mut i = 19;
    let mut frac_ms = 0i64;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            if i - start < 3 {
                frac_ms = frac_ms * 10 + i64::from(b[i] - b'0');
            }
            i += 1;
        }
        let digits = i - start;
        if digits == 0 {
            return Err(bad());
        }
        for _ in digits..3 {
            frac_ms *= 10;
        }
    }
    let offset_s = match &b[i..] {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let (oh, om) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            if oh > 23 || om > 59 {
                return Err(format!("`{}` has an invalid UTC offset", excerpt(s)));
            }
            let offset = oh * 3600 + om * 60;
            if *sign == b'-' { -offset } else { offset }
        }
        [] => return Err(format!("`{}` has no UTC offset (add `Z` or `+HH:MM`)", excerpt(s))),
        _ => return Err(bad()),
    };
    let days = days_from_civil(year, month, day);
    let local_s = days * 86_400 + hour * 3600 + minute * 60 + second;
    check_range(((local_s - offset_s) * 1000 + frac_ms) as f64)
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
pub(crate) fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The first characters of `s`, for error messages.
fn excerpt(s: &str) -> String {
    let mut chars = s.chars();
    let head: String = chars.by_ref().take(EXCERPT_CHARS).collect();
    if chars.next().is_some() { format!("{head}…") } else { head }
}

/// A parsed series template; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesTemplate {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Topic,
    Segment(usize),
}

impl SeriesTemplate {
    /// Parses a template such as `{topic}` or `{1}/{3}`.
    pub fn parse(t: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = t.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|&(_, c)| c) == Some('{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek().map(|&(_, c)| c) == Some('}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let rest = &t[at + 1..];
                    let Some(end) = rest.find('}') else {
                        return Err(format!("unclosed `{{` at offset {at} in `{t}`"));
                    };
                    let name = &rest[..end];
                    let part = match name {
                        "topic" => Part::Topic,
                        n if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
                            Part::Segment(n.parse().map_err(|_| {
                                format!("segment index `{n}` in `{t}` is too large")
                            })?)
                        }
                        other => {
                            return Err(format!(
                                "unknown placeholder `{{{other}}}` in `{t}`; use `{{topic}}` or \
                                 a segment number such as `{{0}}`"
                            ));
                        }
                    };
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(part);
                    // Skip the placeholder's characters and the closing brace.
                    for _ in 0..name.chars().count() + 1 {
                        chars.next();
                    }
                }
                '}' => return Err(format!("unmatched `}}` at offset {at} in `{t}`")),
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        if parts.is_empty() {
            return Err("the series template is empty".into());
        }
        Ok(Self { parts })
    }

    /// The series key of a message on `topic`.
    pub fn render(&self, topic: &str) -> Result<String, String> {
        let mut out = String::with_capacity(topic.len() + 8);
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Topic => out.push_str(topic),
                Part::Segment(i) => match segment(topic, *i) {
                    Some(segment) => out.push_str(segment),
                    None => {
                        return Err(format!(
                            "topic `{topic}` has no segment {i} (it has {})",
                            topic.split('/').count()
                        ));
                    }
                },
            }
        }
        Ok(out)
    }
}

/// Segment `i` (from 0) of a `/`-separated topic: `topic.split('/').nth(i)` without the
/// searcher that `split` sets up per call (the series key is rendered for every message).
fn segment(topic: &str, i: usize) -> Option<&str> {
    let mut start = 0;
    let mut n = 0;
    for (pos, b) in topic.bytes().enumerate() {
        if b == b'/' {
            if n == i {
                return topic.get(start..pos);
            }
            n += 1;
            start = pos + 1;
        }
    }
    if n == i { topic.get(start..) } else { None }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// JSON payloads around the flat shape: the value and the timestamp (numbers, numeric and
    /// RFC 3339 strings, null, booleans, nested values), other fields, duplicates, escaped
    /// keys, broken syntax and other top-level types.
    fn payloads() -> impl Strategy<Value = String> {
        let scalar = prop_oneof![
            any::<f64>().prop_map(|v| format!("{v}")),
            (-1e6f64..1e6).prop_map(|v| format!("{v}")),
            (0i64..MAX_TS_MS / 1000 * 2).prop_map(|v| v.to_string()),
            Just("null".to_string()),
            Just("true".to_string()),
            Just("\"21.5\"".to_string()),
            Just("\"2024-06-10T06:00:00.123+02:00\"".to_string()),
            Just("\"2024-13-10T06:00:00Z\"".to_string()),
            Just("1e400".to_string()),
            Just("[1, 2]".to_string()),
            Just("{\"value\": 3}".to_string()),
            Just("\"x\\u0041\"".to_string()),
        ];
        let key = prop_oneof![
            Just("value"),
            Just("ts"),
            Just("unit"),
            Just("va\\u006cue"),
            Just("t\\u0073"),
            Just(""),
        ];
        let object = prop::collection::vec((key, scalar.clone()), 0..5).prop_map(|fields| {
            let body: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\": {v}")).collect();
            format!("{{{}}}", body.join(", "))
        });
        prop_oneof![
            4 => object.clone(),
            1 => object.prop_map(|o| format!("{o} x")),
            1 => object_truncated(),
            1 => scalar,
        ]
    }

    fn object_truncated() -> impl Strategy<Value = String> {
        (-1e3f64..1e3, 1usize..20).prop_map(|(v, cut)| {
            let full = format!("{{\"value\": {v}, \"ts\": 1718000000123}}");
            full[..cut.min(full.len() - 1)].to_string()
        })
    }

    proptest! {
        /// The fast path decodes exactly what the general path decodes, and leaves
        /// everything else (errors included) to it.
        #[test]
        fn flat_fast_path_agrees_with_the_document_path(
            text in payloads(),
            unit in prop_oneof![Just(TimestampUnit::Auto), Just(TimestampUnit::Ms), Just(TimestampUnit::S)],
        ) {
            let cfg = json("value", "ts", unit);
            let tree = decode_json_tree(&cfg, &text);
            match decode_json_flat(&cfg, &text) {
                Some(fast) => prop_assert_eq!(Ok(fast), tree, "fast path on {}", text),
                // Only an escaped key may make a decodable payload miss the fast path.
                None => prop_assert!(
                    tree.is_err() || text.contains(r#"va\u006cue""#) || text.contains(r#"t\u0073""#),
                    "missed {}",
                    text
                ),
            }
        }
    }

    proptest! {
        #[test]
        fn segments_are_those_of_split(topic in "[a/é+#]{0,12}", i in 0usize..6) {
            prop_assert_eq!(segment(&topic, i), topic.split('/').nth(i));
        }
    }

    #[test]
    fn flat_payloads_take_the_fast_path() {
        let cfg = json("value", "ts", TimestampUnit::Auto);
        let text = r#"{"device": "pump-3", "value": 21.5, "ts": 1718000000123, "tags": [1, {}]}"#;
        let expected = Decoded { ts_ms: Some(1_718_000_000_123), value: 21.5 };
        assert_eq!(decode_json_flat(&cfg, text), Some(expected));
        assert_eq!(decode(&cfg, text.as_bytes()), Ok(expected));
        let nested = json("data.value", "ts", TimestampUnit::Auto);
        assert_eq!(decode_json_flat(&nested, r#"{"data": {"value": 1}}"#), None);
    }

    fn json(value: &str, timestamp: &str, unit: TimestampUnit) -> PayloadConfig {
        PayloadConfig {
            format: PayloadFormat::Json,
            value: value.into(),
            timestamp: timestamp.into(),
            timestamp_unit: unit,
        }
    }

    fn number_cfg() -> PayloadConfig {
        PayloadConfig { format: PayloadFormat::Number, ..PayloadConfig::default() }
    }

    #[test]
    fn json_payloads_decode_to_value_and_timestamp() {
        let cfg = PayloadConfig::default();
        let cases: &[(&str, Decoded)] = &[
            (r#"{"value": 21.5}"#, Decoded { ts_ms: None, value: 21.5 }),
            (r#"{"value": -3}"#, Decoded { ts_ms: None, value: -3.0 }),
            (r#"{"value": "7.25"}"#, Decoded { ts_ms: None, value: 7.25 }),
            (r#"{"value": " 8 "}"#, Decoded { ts_ms: None, value: 8.0 }),
            (r#"{"value": 1, "ts": null}"#, Decoded { ts_ms: None, value: 1.0 }),
            // auto: seconds (fractions kept to the ms) ...
            (
                r#"{"value": 1, "ts": 1700000000}"#,
                Decoded { ts_ms: Some(1_700_000_000_000), value: 1.0 },
            ),
            (
                r#"{"value": 1, "ts": 1700000000.25}"#,
                Decoded { ts_ms: Some(1_700_000_000_250), value: 1.0 },
            ),
            // ... and milliseconds, told apart by magnitude.
            (
                r#"{"value": 1, "ts": 1700000000123}"#,
                Decoded { ts_ms: Some(1_700_000_000_123), value: 1.0 },
            ),
            (
                r#"{"value": 1, "ts": "1700000000"}"#,
                Decoded { ts_ms: Some(1_700_000_000_000), value: 1.0 },
            ),
            (
                r#"{"value": 1, "ts": "2023-11-14T22:13:20Z"}"#,
                Decoded { ts_ms: Some(1_700_000_000_000), value: 1.0 },
            ),
            (
                r#"{"value": 1, "ts": "2023-11-14T22:13:20.123456Z"}"#,
                Decoded { ts_ms: Some(1_700_000_000_123), value: 1.0 },
            ),
            (
                r#"{"value": 1, "ts": "2023-11-15T00:13:20.5+02:00"}"#,
                Decoded { ts_ms: Some(1_700_000_000_500), value: 1.0 },
            ),
            (
                r#"{"value": 1, "ts": "2023-11-14 17:43:20-04:30"}"#,
                Decoded { ts_ms: Some(1_700_000_000_000), value: 1.0 },
            ),
        ];
        for (payload, expected) in cases {
            assert_eq!(decode(&cfg, payload.as_bytes()), Ok(*expected), "payload {payload}");
        }
    }

    #[test]
    fn fixed_timestamp_units_override_the_magnitude_guess() {
        let ms = json("value", "ts", TimestampUnit::Ms);
        assert_eq!(decode(&ms, br#"{"value":1,"ts":5000}"#).unwrap().ts_ms, Some(5000));
        let s = json("value", "ts", TimestampUnit::S);
        assert_eq!(
            decode(&s, br#"{"value":1,"ts":1700000000123}"#),
            Err(PayloadError::BadTimestamp {
                path: "ts".into(),
                reason: "1700000000123000 ms is outside 1970..=9999".into()
            })
        );
        assert_eq!(decode(&s, br#"{"value":1,"ts":1.5}"#).unwrap().ts_ms, Some(1500));
    }

    #[test]
    fn nested_paths_and_array_indexes_are_followed() {
        let cfg = json("data.readings.1.v", "meta.time", TimestampUnit::Auto);
        let payload = br#"{"data":{"readings":[{"v":1},{"v":2.5}]},"meta":{"time":1700000000}}"#;
        assert_eq!(
            decode(&cfg, payload),
            Ok(Decoded { ts_ms: Some(1_700_000_000_000), value: 2.5 })
        );
        let root = json("", "ts", TimestampUnit::Auto);
        assert_eq!(decode(&root, b"42"), Ok(Decoded { ts_ms: None, value: 42.0 }));
    }

    #[test]
    fn every_failure_has_its_cause() {
        let cfg = PayloadConfig::default();
        let cases: &[(&[u8], &str)] = &[
            (b"\xff\xfe{", "not_utf8"),
            (b"{\"value\": 1", "invalid_json"),
            (b"", "invalid_json"),
            (b"{\"value\": 1e400}", "invalid_json"),
            (b"{\"temp\": 1}", "missing_value"),
            (b"{\"value\": null}", "missing_value"),
            (b"[1, 2]", "missing_value"),
            (b"{\"value\": true}", "value_not_number"),
            (b"{\"value\": \"warm\"}", "value_not_number"),
            (b"{\"value\": {\"x\": 1}}", "value_not_number"),
            (b"{\"value\": [1]}", "value_not_number"),
            (b"{\"value\": \"NaN\"}", "non_finite"),
            (b"{\"value\": \"-inf\"}", "non_finite"),
            (b"{\"value\": 1, \"ts\": \"yesterday\"}", "bad_timestamp"),
            (b"{\"value\": 1, \"ts\": true}", "bad_timestamp"),
            (b"{\"value\": 1, \"ts\": -5}", "bad_timestamp"),
            (b"{\"value\": 1, \"ts\": 1e300}", "bad_timestamp"),
            (b"{\"value\": 1, \"ts\": \"2023-11-14T22:13:20\"}", "bad_timestamp"),
            (b"{\"value\": 1, \"ts\": \"2023-02-29T22:13:20Z\"}", "bad_timestamp"),
            (b"{\"value\": 1, \"ts\": \"2023-11-14T25:13:20Z\"}", "bad_timestamp"),
            (b"{\"value\": 1, \"ts\": \"2023-11-14T22:13:20.Z\"}", "bad_timestamp"),
            (b"{\"value\": 1, \"ts\": \"2023-11-14T22:13:20+2:00\"}", "bad_timestamp"),
            (b"{\"value\": 1, \"ts\": \"2023-11-14T22:13:20+02:00x\"}", "bad_timestamp"),
            (b"{\"value\": 1, \"ts\": \"\xc3\xa9023-11-14T22:13:20Z\"}", "bad_timestamp"),
        ];
        for (payload, cause) in cases {
            let got = decode(&cfg, payload);
            assert_eq!(
                got.as_ref().map_err(PayloadError::cause),
                Err(*cause),
                "payload {:?}",
                String::from_utf8_lossy(payload)
            );
        }
    }

    #[test]
    fn bare_numbers_decode_and_reject_garbage() {
        let cfg = number_cfg();
        assert_eq!(decode(&cfg, b" 21.5\n"), Ok(Decoded { ts_ms: None, value: 21.5 }));
        assert_eq!(decode(&cfg, b"-1e3"), Ok(Decoded { ts_ms: None, value: -1000.0 }));
        let cause = |p: &[u8]| decode(&cfg, p).map_err(|e| e.cause());
        assert_eq!(cause(b"21,5"), Err("not_a_number"));
        assert_eq!(cause(b""), Err("not_a_number"));
        assert_eq!(cause(b"{\"value\":1}"), Err("not_a_number"));
        assert_eq!(cause(b"NaN"), Err("non_finite"));
        assert_eq!(cause(b"inf"), Err("non_finite"));
        assert_eq!(cause(b"\x80"), Err("not_utf8"));
    }

    #[test]
    fn leap_years_and_leap_seconds_are_handled() {
        assert_eq!(parse_rfc3339_ms("2024-02-29T00:00:00Z"), Ok(1_709_164_800_000));
        assert_eq!(parse_rfc3339_ms("2016-12-31T23:59:60Z"), Ok(1_483_228_800_000));
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z"), Ok(0));
        assert!(parse_rfc3339_ms("1970-01-01T00:00:00+00:01").is_err());
        assert!(parse_rfc3339_ms("2000-02-30T00:00:00Z").is_err());
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics() {
        let mut rng = fastrand::Rng::with_seed(11);
        let configs = [PayloadConfig::default(), number_cfg()];
        let alphabet = b"{}[]\":,.-+eE0123456789 tsvalueTZnul\xff\xc3";
        for _ in 0..5_000 {
            let len = rng.usize(0..40);
            let bytes: Vec<u8> = (0..len).map(|_| alphabet[rng.usize(..alphabet.len())]).collect();
            for cfg in &configs {
                let _ = decode(cfg, &bytes);
            }
            if let Ok(s) = std::str::from_utf8(&bytes) {
                let _ = parse_rfc3339_ms(s);
            }
        }
    }

    #[test]
    fn timestamp_strings_of_any_shape_never_panic() {
        let mut rng = fastrand::Rng::with_seed(5);
        let template = "2023-11-14T22:13:20.123+02:00";
        for _ in 0..5_000 {
            let mut s: Vec<char> = template.chars().collect();
            for _ in 0..rng.usize(1..4) {
                let i = rng.usize(..s.len());
                s[i] = ['9', '0', '-', ':', 'Z', '+', '.', 'é', ' '][rng.usize(..9)];
            }
            let cut = rng.usize(..=s.len());
            let s: String = s[..cut].iter().collect();
            let _ = parse_rfc3339_ms(&s);
        }
    }

    #[test]
    fn templates_render_topic_segments_and_literals() {
        let topic = "site/a/pump-3/temperature";
        let render = |t: &str| SeriesTemplate::parse(t).unwrap().render(topic);
        assert_eq!(render("{topic}"), Ok(topic.to_string()));
        assert_eq!(render("{2}/{3}"), Ok("pump-3/temperature".to_string()));
        assert_eq!(render("{0}-{2}.{3}"), Ok("site-pump-3.temperature".to_string()));
        assert_eq!(render("plant/{2}"), Ok("plant/pump-3".to_string()));
        assert_eq!(render("{{x}}{1}"), Ok("{x}a".to_string()));
        assert_eq!(render("fixed"), Ok("fixed".to_string()));
        assert!(render("{4}").unwrap_err().contains("no segment 4"));
    }

    #[test]
    fn template_syntax_errors_are_reported_at_parse_time() {
        for bad in ["", "{", "{topic", "{name}", "{-1}", "{}", "a}b", "{99999999999999999999999}"] {
            assert!(SeriesTemplate::parse(bad).is_err(), "`{bad}` should not parse");
        }
        // Whether a segment exists depends on the topic, so large indexes parse.
        assert!(SeriesTemplate::parse("{12}").is_ok());
    }

    #[test]
    fn templates_with_multibyte_text_parse() {
        let t = SeriesTemplate::parse("größe/{1}/°C").unwrap();
        assert_eq!(t.render("a/b"), Ok("größe/b/°C".to_string()));
    }
}
