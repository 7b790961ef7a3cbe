//! Recordings: sensor readings in a file, for `edgewise replay`, and the journal export that
//! writes them.
//!
//! A recording is the event half of a journal in a form people write by hand, export from a
//! historian or capture on a gateway:
//!
//! ```text
//! JSON lines   {"ts": 1718000000000, "series": "pump-1/temperature", "value": 71.5}
//!              {"timestamp": "2024-06-10T06:13:20.5Z", "series": "pump-1/temperature", "value": 72}
//! CSV          timestamp,series,value            (the header row is optional)
//!              2024-06-10T06:13:20Z,pump-1/temperature,71.5
//! CSV          timestamp,value                   (series from `--series NAME`)
//!              1718000000,71.5
//! ```
//!
//! - **Timestamps** are numbers or RFC 3339 strings with an offset, read as the MQTT payload
//!   decoder reads them ([`crate::source::payload`]): a number above 10^11 is milliseconds,
//!   below it seconds (`auto`); the JSON key `ts_ms` (or a CSV column of that name) is always
//!   milliseconds. JSON keys: `ts`, `timestamp` or `ts_ms`; `series`; `value` (a number or a
//!   numeric string). Other keys are ignored, so a line may carry units or notes.
//! - **CSV**: the first data line decides the layout. A header row is recognised because its
//!   first field is not a timestamp; its names (`timestamp`/`ts`/`time`/`ts_ms`, `series`/
//!   `topic`, `value`) place the columns, otherwise position does (3 columns: timestamp,
//!   series, value; 2 columns: timestamp, value). Fields may be double-quoted (`""` escapes a
//!   quote). Blank lines and lines starting with `#` are skipped in both formats.
//! - **Format** comes from the extension (`.jsonl`, `.ndjson`, `.json`, `.csv`), otherwise from
//!   the first non-blank byte (`{` is JSON lines).
//!
//! # Invariants
//!
//! - **Streaming.** [`RecordingReader`] holds one line at a time (at most [`MAX_LINE_BYTES`]);
//!   a recording of any size replays in constant memory.
//! - **A bad line never aborts.** It becomes [`Line::Bad`] with its line number and a reason,
//!   and reading goes on. Only what makes the whole file unreadable is a [`RecordingError`]:
//!   it cannot be opened or read, or its layout cannot be known (a two-column CSV and no
//!   series name, a header without a timestamp or value column).
//! - **File order is event order.** Readings come out in file order, unsorted: a recording is
//!   replayed as the gateway would have received it, late events included.
//!
//! # Journal export
//!
//! [`export_journal`] writes the events of a stopped agent's journal (ticks are left out:
//! replay makes its own) as JSON lines with millisecond timestamps, so that a capture from
//! the field replays on a laptop. The journal holds what has not been trimmed yet
//! (`journal.max_age` / `journal.max_bytes` behind the last snapshot).

use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::TimestampUnit;
use crate::event::Entry;
use crate::journal::{Journal, JournalError};
use crate::rules::SeriesPattern;
use crate::source::payload;
use crate::store::{Store, StoreError};

/// Longest line read from a recording. A reading is well under 200 bytes; 64 KiB leaves room
/// for JSON lines with extra fields while a file without line breaks (a binary picked by
/// mistake) cannot take the reader's memory.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// Numeric timestamps above this are milliseconds, below it seconds: the `auto` rule of the
/// payload decoder (10^11 s is the year 5138, 10^11 ms March 1973).
const AUTO_MS_THRESHOLD: f64 = 1e11;

/// Latest accepted timestamp, 9999-12-31T23:59:59.999Z, as in the payload decoder.
const MAX_TS_MS: i64 = 253_402_300_799_999;

/// The sled page cache of a store opened only to read the journal once: a sequential scan
/// gains nothing from a larger cache.
pub const EXPORT_CACHE_BYTES: u64 = 8 * 1024 * 1024;

/// Longest excerpt of a line quoted in a reason.
const EXCERPT_CHARS: usize = 40;

/// Errors that make a recording (or an export) unusable as a whole.
#[derive(Debug, thiserror::Error)]
pub enum RecordingError {
    /// The recording cannot be opened.
    #[error("cannot open the recording {}: {source}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// The OS's report.
        #[source]
        source: io::Error,
    },
    /// Reading failed part-way.
    #[error("cannot read the recording {} after line {line}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The last line read completely.
        line: u64,
        /// The OS's report.
        #[source]
        source: io::Error,
    },
    /// A two-column CSV (timestamp, value) and no series name to give its readings.
    #[error(
        "{}: the CSV has the columns timestamp,value but no series; pass --series NAME",
        path.display()
    )]
    NoSeries {
        /// The file.
        path: PathBuf,
    },
    /// The CSV's first line cannot be read as a header or as data.
    #[error("{}:{line}: cannot tell the CSV columns from `{header}`: {reason}", path.display())]
    Layout {
        /// The file.
        path: PathBuf,
        /// Its line number.
        line: u64,
        /// The line (an excerpt).
        header: String,
        /// What is missing.
        reason: String,
    },
    /// `--from` / `--to` is neither RFC 3339 nor a duration.
    #[error("`{text}` is not a time: {reason}")]
    BadTime {
        /// The argument.
        text: String,
        /// Why.
        reason: String,
    },
    /// A series pattern of the export does not parse.
    #[error("`{pattern}` is not a series pattern: {reason}")]
    BadPattern {
        /// The argument.
        pattern: String,
        /// Why.
        reason: String,
    },
    /// The agent's data directory does not exist.
    #[error("there is no data directory at {} (check agent.data_dir or --data-dir)", dir.display())]
    NoDataDir {
        /// The directory.
        dir: PathBuf,
    },
    /// The agent holds the store.
    #[error(
        "the store in {} is locked by a running agent: stop the agent or copy the data dir \
         and pass the copy with --data-dir",
        dir.display()
    )]
    StoreLocked {
        /// The directory.
        dir: PathBuf,
    },
    /// The store could not be opened.
    #[error("cannot open the store in {}: {source}", dir.display())]
    Store {
        /// The directory.
        dir: PathBuf,
        /// The store's report.
        #[source]
        source: StoreError,
    },
    /// The journal could not be read.
    #[error("cannot read the journal: {0}")]
    Journal(#[source] JournalError),
    /// The output could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The output file.
        path: PathBuf,
        /// The OS's report.
        #[source]
        source: io::Error,
    },
}

impl RecordingError {
    /// Whether the user can fix this by changing the command line or the input file (exit
    /// status 2), rather than a failure while working (exit status 1).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            RecordingError::Open { .. }
                | RecordingError::Read { .. }
                | RecordingError::NoSeries { .. }
                | RecordingError::Layout { .. }
                | RecordingError::BadTime { .. }
                | RecordingError::BadPattern { .. }
                | RecordingError::NoDataDir { .. }
        )
    }
}

/// How a recording is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line.
    JsonLines,
    /// Comma-separated values.
    Csv,
}

impl Format {
    /// The format a file name implies, if it implies one.
    pub fn from_path(path: &Path) -> Option<Format> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "jsonl" | "ndjson" | "json" => Some(Format::JsonLines),
            "csv" => Some(Format::Csv),
            _ => None,
        }
    }

    /// The format of text starting with `head`: JSON lines if the first non-blank byte
    /// (after a UTF-8 byte-order mark) is `{`, CSV otherwise.
    pub fn sniff(head: &[u8]) -> Format {
        let head = head.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(head);
        match head.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'{') => Format::JsonLines,
            _ => Format::Csv,
        }
    }
}

/// One reading of a recording.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// Line number in the file (1-based).
    pub line: u64,
    /// Event time, ms since the Unix epoch.
    pub ts_ms: i64,
    /// The series key.
    pub series: String,
    /// The value (finite).
    pub value: f64,
}

/// A line that is not a reading.
#[derive(Debug, Clone, PartialEq)]
pub struct BadLine {
    /// Line number in the file (1-based).
    pub line: u64,
    /// What is wrong with it.
    pub reason: String,
}

/// What one data line of a recording holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Line {
    /// A reading.
    Reading(Reading),
    /// A line that could not be read; reading goes on after it.
    Bad(BadLine),
}

/// Where the fields of a CSV line are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CsvColumns {
    /// Fields per line.
    width: usize,
    ts: usize,
    /// `None`: the series comes from the reader's default series.
    series: Option<usize>,
    value: usize,
    /// The timestamp column is named `ts_ms`: numbers are milliseconds.
    ts_unit: TimestampUnit,
}

/// A streaming reader of a recording; see the module docs.
#[derive(Debug)]
pub struct RecordingReader<R> {
    inner: R,
    path: PathBuf,
    format: Format,
    default_series: Option<String>,
    /// CSV layout, known after the first data line.
    columns: Option<CsvColumns>,
    line: u64,
    bytes_read: u64,
    buf: Vec<u8>,
}

/// Opens a recording file. `format` overrides detection; `series` names the readings of a
/// recording that has no series (two-column CSV, JSON lines without `series`).
pub fn open(
    path: &Path,
    format: Option<Format>,
    series: Option<String>,
) -> Result<RecordingReader<BufReader<File>>, RecordingError> {
    let open_error = |source| RecordingError::Open { path: path.to_path_buf(), source };
    let file = File::open(path).map_err(open_error)?;
    let mut inner = BufReader::new(file);
    let format = match format.or_else(|| Format::from_path(path)) {
        Some(format) => format,
        // Peeks at the buffer; nothing is consumed.
        None => Format::sniff(inner.fill_buf().map_err(open_error)?),
    };
    Ok(RecordingReader::new(inner, path, format, series))
}

impl<R: BufRead> RecordingReader<R> {
    /// A reader over `inner`; `path` names it in messages.
    pub fn new(
        inner: R,
        path: &Path,
        format: Format,
        default_series: Option<String>,
    ) -> RecordingReader<R> {
        RecordingReader {
            inner,
            path: path.to_path_buf(),
            format,
            default_series,
            columns: None,
            line: 0,
            bytes_read: 0,
            buf: Vec::with_capacity(256),
        }
    }

    /// The format being read.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Bytes consumed so far (for progress).
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// The next data line, `None` at the end of the file.
    pub fn next_line(&mut self) -> Result<Option<Line>, RecordingError> {
        loop {
            let Some(complete) = self.read_raw_line()? else { return Ok(None) };
            let line = self.line;
            if !complete {
                let reason = format!("longer than {MAX_LINE_BYTES} bytes");
                return Ok(Some(Line::Bad(BadLine { line, reason })));
            }
            let mut bytes = self.buf.as_slice();
            if line == 1 {
                bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
            }
            let text = match std::str::from_utf8(bytes) {
                Ok(text) => text.trim_ascii(),
                Err(e) => {
                    let reason = format!("not UTF-8 (invalid byte at column {})", e.valid_up_to());
                    return Ok(Some(Line::Bad(BadLine { line, reason })));
                }
            };
            if text.is_empty() || text.starts_with('#') {
                continue;
            }
            let parsed = match self.format {
                Format::JsonLines => parse_json_line(text, self.default_series.as_deref(), None)
                    .map_err(|e| e.reason),
                Format::Csv => match self.columns {
                    Some(columns) => self.parse_csv_line(columns, text),
                    None => {
                        let columns = self.csv_layout(text)?;
                        self.columns = Some(columns.0);
                        if columns.1 {
                            continue; // a header row
                        }
                        self.parse_csv_line(columns.0, text)
                    }
                },
            };
            return Ok(Some(match parsed {
                Ok((ts_ms, series, value)) => Line::Reading(Reading { line, ts_ms, series, value }),
                Err(reason) => Line::Bad(BadLine { line, reason }),
            }));
        }
    }

    /// Reads one line into `buf` without its line break: `Some(true)` complete, `Some(false)`
    /// longer than [`MAX_LINE_BYTES`] (the rest is skipped), `None` at the end of the file.
    fn read_raw_line(&mut self) -> Result<Option<bool>, RecordingError> {
        self.buf.clear();
        let mut complete = true;
        let mut any = false;
        loop {
            let available = match self.inner.fill_buf() {
                Ok(available) => available,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    let (path, line) = (self.path.clone(), self.line);
                    return Err(RecordingError::Read { path, line, source });
                }
            };
            if available.is_empty() {
                if !any {
                    return Ok(None);
                }
                break;
            }
            any = true;
            let (chunk, used, done) = match available.iter().position(|&b| b == b'\n') {
                Some(i) => (&available[..i], i + 1, true),
                None => (available, available.len(), false),
            };
            if complete && self.buf.len() + chunk.len() <= MAX_LINE_BYTES {
                self.buf.extend_from_slice(chunk);
            } else {
                complete = false;
                self.buf.clear();
            }
            self.inner.consume(used);
            self.bytes_read += used as u64;
            if done {
                break;
            }
        }
        self.line += 1;
        Ok(Some(complete))
    }

    /// The CSV layout from its first data line, and whether that line is a header.
    fn csv_layout(&self, text: &str) -> Result<(CsvColumns, bool), RecordingError> {
        let fields = split_csv(text);
        let layout_error = |reason: String| RecordingError::Layout {
            path: self.path.clone(),
            line: self.line,
            header: excerpt(text),
            reason,
        };
        let is_header = parse_timestamp(&fields[0], TimestampUnit::Auto).is_err();
        let mut columns = match fields.len() {
            2 => {
                CsvColumns { width: 2, ts: 0, series: None, value: 1, ts_unit: TimestampUnit::Auto }
            }
            3 => CsvColumns {
                width: 3,
                ts: 0,
                series: Some(1),
                value: 2,
                ts_unit: TimestampUnit::Auto,
            },
            n if !is_header => {
                return Err(layout_error(format!(
                    "{n} fields; expected timestamp,series,value or timestamp,value"
                )));
            }
            n => {
                CsvColumns { width: n, ts: 0, series: None, value: 0, ts_unit: TimestampUnit::Auto }
            }
        };
        if is_header {
            let find = |names: &[&str]| {
                fields.iter().position(|f| names.iter().any(|n| f.trim().eq_ignore_ascii_case(n)))
            };
            let ts = find(&["timestamp", "ts", "time", "datetime", "ts_ms"]);
            let series = find(&["series", "topic", "key"]);
            let value = find(&["value", "val", "reading"]);
            match (ts, value) {
                (Some(ts), Some(value)) => {
                    columns.ts = ts;
                    columns.value = value;
                    columns.series = series;
                }
                // Unrecognised names: position decides, as for a file without a header.
                _ if matches!(fields.len(), 2 | 3) => {}
                _ => {
                    return Err(layout_error(
                        "a header needs a timestamp and a value column \
                         (timestamp/ts/time/ts_ms, series, value)"
                            .into(),
                    ));
                }
            }
            if fields[columns.ts].trim().eq_ignore_ascii_case("ts_ms") {
                columns.ts_unit = TimestampUnit::Ms;
            }
        }
        if columns.series.is_none() && self.default_series.is_none() {
            return Err(RecordingError::NoSeries { path: self.path.clone() });
        }
        Ok((columns, is_header))
    }

    fn parse_csv_line(&self, c: CsvColumns, text: &str) -> Result<(i64, String, f64), String> {
        let fields = split_csv(text);
        if fields.len() != c.width {
            return Err(format!("{} fields, expected {}", fields.len(), c.width));
        }
        let ts_ms = parse_timestamp(&fields[c.ts], c.ts_unit)?;
        let series = match c.series {
            Some(i) if !fields[i].trim().is_empty() => fields[i].trim().to_string(),
            Some(_) => return Err("empty series".into()),
            // Checked when the layout was made.
            None => self.default_series.clone().unwrap_or_default(),
        };
        let raw = fields[c.value].trim();
        let value: f64 =
            raw.parse().map_err(|_| format!("value `{}` is not a number", excerpt(raw)))?;
        finite(value).map(|value| (ts_ms, series, value))
    }
}

impl<R: BufRead> Iterator for RecordingReader<R> {
    type Item = Result<Line, RecordingError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_line().transpose()
    }
}

/// The keys of a JSON line; anything else on the line is ignored.
#[derive(Deserialize)]
struct JsonLine {
    ts: Option<serde_json::Value>,
    timestamp: Option<serde_json::Value>,
    ts_ms: Option<serde_json::Value>,
    series: Option<String>,
    value: Option<serde_json::Value>,
}

/// Why a JSON line was refused: a metric cause (`invalid_json`, `missing_value`, ...) and a
/// reason for people.
#[derive(Debug, Clone, PartialEq)]
pub struct LineError {
    /// Short, stable cause for counters.
    pub cause: &'static str,
    /// What is wrong, for logs and reports.
    pub reason: String,
}

fn line_error(cause: &'static str) -> impl FnOnce(String) -> LineError {
    move |reason| LineError { cause, reason }
}

/// Parses one JSON line `{"ts": ..., "series": "...", "value": 1.5}` (also `timestamp` or
/// `ts_ms`; the value may be a numeric string): the one JSON-lines reader of recordings and
/// of the serial source. `default_series` names lines without a series; `default_ts` stamps
/// lines without a timestamp (the serial source's receive time) — without it such a line is
/// refused, as a recording must carry its event time.
pub fn parse_json_line(
    text: &str,
    default_series: Option<&str>,
    default_ts: Option<i64>,
) -> Result<(i64, String, f64), LineError> {
    let line: JsonLine = serde_json::from_str(text)
        .map_err(|e| format!("not a JSON object: {e}"))
        .map_err(line_error("invalid_json"))?;
    let ts_ms = match (&line.ts_ms, &line.ts, &line.timestamp, default_ts) {
        (Some(ts), _, _, _) => json_timestamp(ts, TimestampUnit::Ms),
        (None, Some(ts), _, _) | (None, None, Some(ts), _) => {
            json_timestamp(ts, TimestampUnit::Auto)
        }
        (None, None, None, Some(ts)) => Ok(ts),
        (None, None, None, None) => Err("no timestamp (`ts`, `timestamp` or `ts_ms`)".into()),
    }
    .map_err(line_error("invalid_timestamp"))?;
    let series = match (line.series, default_series) {
        (Some(series), _) if !series.is_empty() => series,
        (Some(_), _) => return Err(line_error("invalid_series")("empty series".into())),
        (None, Some(series)) => series.to_string(),
        (None, None) => {
            return Err(line_error("invalid_series")("no `series` (or pass --series NAME)".into()));
        }
    };
    let value = match line.value {
        Some(serde_json::Value::Number(n)) => n
            .as_f64()
            .ok_or_else(|| line_error("invalid_value")("value is not representable".into()))?,
        Some(serde_json::Value::String(s)) => s.trim().parse::<f64>().map_err(|_| {
            line_error("invalid_value")(format!("value \"{}\" is not a number", excerpt(&s)))
        })?,
        None | Some(serde_json::Value::Null) => {
            return Err(line_error("missing_value")("no `value`".into()));
        }
        Some(other) => {
            return Err(line_error("invalid_value")(format!(
                "value {} is not a number",
                excerpt(&other.to_string())
            )));
        }
    };
    finite(value).map(|value| (ts_ms, series, value)).map_err(line_error("non_finite"))
}

fn json_timestamp(v: &serde_json::Value, unit: TimestampUnit) -> Result<i64, String> {
    match v {
        serde_json::Value::Number(n) => {
            numeric_timestamp(n.as_f64().ok_or("timestamp is not representable")?, unit)
        }
        serde_json::Value::String(s) => parse_timestamp(s, unit),
        other => Err(format!(
            "timestamp {} is neither a number nor a string",
            excerpt(&other.to_string())
        )),
    }
}

fn finite(value: f64) -> Result<f64, String> {
    if value.is_finite() { Ok(value) } else { Err("value is not finite".into()) }
}

/// Parses a timestamp: a number (ms or s, see the module docs; `unit` may force ms or s) or
/// an RFC 3339 string with an offset. Ms since the Unix epoch, within 1970..=9999.
pub fn parse_timestamp(text: &str, unit: TimestampUnit) -> Result<i64, String> {
    let text = text.trim();
    match text.parse::<f64>() {
        Ok(n) => numeric_timestamp(n, unit),
        Err(_) => rfc3339_ms(text),
    }
}

fn numeric_timestamp(n: f64, unit: TimestampUnit) -> Result<i64, String> {
    if !n.is_finite() {
        return Err("timestamp is not finite".into());
    }
    let ms = match unit {
        TimestampUnit::Ms => n,
        TimestampUnit::S => n * 1000.0,
        TimestampUnit::Auto if n.abs() > AUTO_MS_THRESHOLD => n,
        TimestampUnit::Auto => n * 1000.0,
    }
    .round();
    if (0.0..=MAX_TS_MS as f64).contains(&ms) {
        // In range, so exact: f64 holds integers below 2^53.
        Ok(ms as i64)
    } else {
        Err(format!("timestamp {n} is outside 1970..=9999"))
    }
}

/// An RFC 3339 string in ms since the epoch, by the payload decoder's rules (an offset is
/// required: a local time read as UTC would shift every reading).
///
/// The decoder exposes only [`payload::decode`], so the string goes through it inside a
/// two-key JSON document: one parser for the agent and for replay, at the cost of a small
/// JSON parse per RFC 3339 timestamp. A `pub fn` for timestamps in `payload` would remove it.
fn rfc3339_ms(text: &str) -> Result<i64, String> {
    payload::parse_rfc3339_ms(text)
}

/// Splits a CSV line; double-quoted fields may hold commas, `""` is a quote.
fn split_csv(line: &str) -> Vec<String> {
    let mut fields = Vec::with_capacity(3);
    let mut field = String::new();
    let mut chars = line.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            '"' if quoted => quoted = false,
            '"' if field.trim().is_empty() => {
                field.clear();
                quoted = true;
            }
            ',' if !quoted => fields.push(std::mem::take(&mut field)),
            c => field.push(c),
        }
    }
    fields.push(field);
    fields
}

/// The first characters of `s`, for messages.
fn excerpt(s: &str) -> String {
    let mut chars = s.chars();
    let head: String = chars.by_ref().take(EXCERPT_CHARS).collect();
    if chars.next().is_some() { format!("{head}…") } else { head }
}

/// One line of a JSON-lines recording as [`write_reading`] writes it.
#[derive(Serialize)]
struct JsonReading<'a> {
    /// `ts_ms`, not `ts`: the reader takes `ts` as seconds or milliseconds by its size, so a
    /// time before 1973 (a gateway that booted at 1970) would read back as seconds.
    ts_ms: i64,
    series: &'a str,
    value: f64,
}

/// Writes one reading as a JSON line with a millisecond timestamp.
pub fn write_reading(out: &mut impl Write, ts_ms: i64, series: &str, value: f64) -> io::Result<()> {
    serde_json::to_writer(&mut *out, &JsonReading { ts_ms, series, value })?;
    out.write_all(b"\n")
}

/// Parses a time bound of `journal export`: RFC 3339 (with an offset), or a duration such as
/// `2h` or `90m` meaning that long before `now_ms`.
pub fn parse_time(text: &str, now_ms: i64) -> Result<i64, RecordingError> {
    let bad = |reason: String| RecordingError::BadTime { text: text.to_string(), reason };
    let trimmed = text.trim().trim_end_matches(" ago");
    if let Ok(ago) = humantime::parse_duration(trimmed) {
        let ago = i64::try_from(ago.as_millis()).map_err(|_| bad("too long ago".into()))?;
        return Ok(now_ms.saturating_sub(ago));
    }
    if trimmed.parse::<f64>().is_ok() {
        return Err(bad("a bare number is ambiguous; write `2h` or an RFC 3339 time".into()));
    }
    rfc3339_ms(trimmed).map_err(|reason| {
        bad(format!(
            "{reason} (expected RFC 3339 like 2024-06-10T06:00:00Z, or a duration ago like 2h)"
        ))
    })
}

/// Which events `journal export` writes.
#[derive(Debug, Clone, Default)]
pub struct ExportFilter {
    /// Earliest event time, inclusive (ms).
    pub from_ms: Option<i64>,
    /// Latest event time, exclusive (ms).
    pub to_ms: Option<i64>,
    /// Only series matching this pattern.
    pub series: Option<SeriesPattern>,
}

impl ExportFilter {
    /// Whether an event of `series` at `ts_ms` is exported.
    pub fn admits(&self, series: &str, ts_ms: i64) -> bool {
        self.from_ms.is_none_or(|from| ts_ms >= from)
            && self.to_ms.is_none_or(|to| ts_ms < to)
            && self.series.as_ref().is_none_or(|p| p.matches(series))
    }

    /// Parses `--series PATTERN` into the filter.
    pub fn with_series(mut self, pattern: &str) -> Result<ExportFilter, RecordingError> {
        let parsed = SeriesPattern::parse(pattern).map_err(|reason| {
            RecordingError::BadPattern { pattern: pattern.to_string(), reason }
        })?;
        self.series = Some(parsed);
        Ok(self)
    }
}

/// What [`export_journal`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExportReport {
    /// Events written.
    pub exported: u64,
    /// Events in the journal (written or filtered out).
    pub journal_events: u64,
    /// Ticks in the journal (never written).
    pub journal_ticks: u64,
    /// Journal chunks (or old one-entry values) that did not decode (logged and skipped);
    /// one chunk may have held many entries.
    pub corrupt: u64,
    /// Earliest and latest event time written (ms).
    pub span_ms: Option<(i64, i64)>,
}

/// Writes the journal's events in `data_dir` that pass `filter` to `out` as JSON lines, in
/// journal order. `out_path` names the output in errors. Fails with
/// [`RecordingError::StoreLocked`] while an agent runs on the directory: sled allows one
/// process per store.
pub fn export_journal(
    data_dir: &Path,
    filter: &ExportFilter,
    out: &mut impl Write,
    out_path: &Path,
) -> Result<ExportReport, RecordingError> {
    // Store::open creates a store where there is none; an export must not leave an empty
    // store behind a typo.
    if !data_dir.is_dir() {
        return Err(RecordingError::NoDataDir { dir: data_dir.to_path_buf() });
    }
    let dir = data_dir.to_path_buf();
    let store = match Store::open(data_dir, EXPORT_CACHE_BYTES) {
        Ok((store, _)) => store,
        Err(StoreError::Locked { .. }) => return Err(RecordingError::StoreLocked { dir }),
        Err(source) => return Err(RecordingError::Store { dir, source }),
    };
    let journal = Journal::open(&store).map_err(RecordingError::Journal)?;
    let reader = journal.reader();
    let write_error = |source| RecordingError::Write { path: out_path.to_path_buf(), source };
    let mut report = ExportReport::default();
    for item in reader.read_after(0) {
        let event = match item {
            Ok((_, Entry::Event(event))) => event,
            Ok((_, Entry::Tick { .. })) => {
                report.journal_ticks += 1;
                continue;
            }
            Err(error @ JournalError::Corrupt { .. }) => {
                tracing::warn!(%error, "skipping a journal entry that does not decode");
                report.corrupt += 1;
                continue;
            }
            Err(error) => return Err(RecordingError::Journal(error)),
        };
        report.journal_events += 1;
        if !filter.admits(&event.series, event.ts_ms) {
            continue;
        }
        write_reading(out, event.ts_ms, &event.series, event.value).map_err(write_error)?;
        report.exported += 1;
        report.span_ms = Some(match report.span_ms {
            None => (event.ts_ms, event.ts_ms),
            Some((lo, hi)) => (lo.min(event.ts_ms), hi.max(event.ts_ms)),
        });
    }
    out.flush().map_err(write_error)?;
    Ok(report)
}

/// A millisecond time as RFC 3339 UTC with milliseconds (`2024-06-10T06:13:20.500Z`).
pub fn format_ms(ms: i64) -> String {
    let magnitude = Duration::from_millis(ms.unsigned_abs());
    let time = if ms >= 0 {
        std::time::UNIX_EPOCH.checked_add(magnitude)
    } else {
        std::time::UNIX_EPOCH.checked_sub(magnitude)
    };
    match time {
        Some(time) => humantime::format_rfc3339_millis(time).to_string(),
        None => format!("{ms}ms"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(
        text: &str,
        format: Format,
        series: Option<&str>,
    ) -> Result<Vec<Line>, RecordingError> {
        let reader = RecordingReader::new(
            text.as_bytes(),
            Path::new("test"),
            format,
            series.map(str::to_string),
        );
        reader.collect()
    }

    fn reading(line: u64, ts_ms: i64, series: &str, value: f64) -> Line {
        Line::Reading(Reading { line, ts_ms, series: series.into(), value })
    }

    fn bad_lines(lines: &[Line]) -> Vec<(u64, String)> {
        lines
            .iter()
            .filter_map(|l| match l {
                Line::Bad(b) => Some((b.line, b.reason.clone())),
                Line::Reading(_) => None,
            })
            .collect()
    }

    #[test]
    fn json_lines_accept_seconds_milliseconds_and_rfc3339_under_three_keys() {
        let text = concat!(
            "{\"ts\": 1718000000, \"series\": \"a/t\", \"value\": 1.5}\n",
            "{\"timestamp\": \"2024-06-10T06:13:20.5Z\", \"series\": \"a/t\", \"value\": \"2\"}\n",
            "\n# a comment\n",
            "{\"ts_ms\": 1718000001000, \"series\": \"b/t\", \"value\": -3, \"unit\": \"C\"}\n",
            "{\"ts_ms\": 5, \"series\": \"b/t\", \"value\": 0}",
        );
        let lines = read_all(text, Format::JsonLines, None).unwrap();
        assert_eq!(
            lines,
            vec![
                reading(1, 1_718_000_000_000, "a/t", 1.5),
                reading(2, 1_718_000_000_500, "a/t", 2.0),
                reading(5, 1_718_000_001_000, "b/t", -3.0),
                reading(6, 5, "b/t", 0.0),
            ]
        );
    }

    #[test]
    fn bad_json_lines_are_reported_with_their_line_and_reading_goes_on() {
        let text = concat!(
            "{\"ts\": 1, \"series\": \"a\", \"value\": 1}\n",
            "not json\n",
            "{\"series\": \"a\", \"value\": 1}\n",
            "{\"ts\": \"2024-06-10 06:13:20.5\", \"series\": \"a\", \"value\": 1}\n",
            "{\"ts\": 1, \"value\": 1}\n",
            "{\"ts\": 1, \"series\": \"a\", \"value\": true}\n",
            "{\"ts\": 2, \"series\": \"a\", \"value\": 2}\n",
        );
        let lines = read_all(text, Format::JsonLines, None).unwrap();
        assert_eq!(lines.first(), Some(&reading(1, 1_000, "a", 1.0)));
        assert_eq!(lines.last(), Some(&reading(7, 2_000, "a", 2.0)));
        let bad = bad_lines(&lines);
        assert_eq!(bad.iter().map(|b| b.0).collect::<Vec<_>>(), [2, 3, 4, 5, 6]);
        assert!(bad[0].1.contains("not a JSON object"), "{}", bad[0].1);
        assert!(bad[1].1.contains("no timestamp"), "{}", bad[1].1);
        assert!(bad[2].1.contains("UTC offset"), "{}", bad[2].1);
        assert!(bad[3].1.contains("series"), "{}", bad[3].1);
        assert!(bad[4].1.contains("not a number"), "{}", bad[4].1);
    }

    #[test]
    fn the_default_series_names_json_lines_without_one() {
        let lines = read_all("{\"ts\": 1, \"value\": 1}", Format::JsonLines, Some("x/y")).unwrap();
        assert_eq!(lines, vec![reading(1, 1_000, "x/y", 1.0)]);
    }

    #[test]
    fn csv_with_a_header_places_columns_by_name() {
        let text = "value,ts_ms,series\n1.5,1000,\"a,b\"\n2.5,2000,c\n";
        let lines = read_all(text, Format::Csv, None).unwrap();
        assert_eq!(lines, vec![reading(2, 1_000, "a,b", 1.5), reading(3, 2_000, "c", 2.5)]);
    }

    #[test]
    fn csv_without_a_header_is_timestamp_series_value_or_timestamp_value() {
        let three = "2024-06-10T06:13:20Z,a/t,1\n1718000001,a/t,2\n";
        assert_eq!(
            read_all(three, Format::Csv, None).unwrap(),
            vec![
                reading(1, 1_718_000_000_000, "a/t", 1.0),
                reading(2, 1_718_000_001_000, "a/t", 2.0)
            ]
        );
        let two = "\u{feff}timestamp,value\r\n1718000000000,7\r\n";
        assert_eq!(
            read_all(two, Format::Csv, Some("s")).unwrap(),
            vec![reading(2, 1_718_000_000_000, "s", 7.0)]
        );
    }

    #[test]
    fn a_two_column_csv_without_a_series_name_is_refused_as_a_whole() {
        let err = read_all("1,2\n3,4\n", Format::Csv, None).unwrap_err();
        assert!(matches!(err, RecordingError::NoSeries { .. }), "{err}");
        assert!(err.is_usage());
        let err = read_all("a;b;c;d\n", Format::Csv, None).unwrap_err();
        assert!(matches!(err, RecordingError::Layout { .. }), "{err}");
    }

    #[test]
    fn bad_csv_lines_name_the_problem() {
        let text = "1,a,1\n2,a\nx,a,1\n3,a,NaN\n4,,1\n5,a,oops\n6,a,6\n";
        let lines = read_all(text, Format::Csv, None).unwrap();
        assert_eq!(lines.first(), Some(&reading(1, 1_000, "a", 1.0)));
        assert_eq!(lines.last(), Some(&reading(7, 6_000, "a", 6.0)));
        let bad = bad_lines(&lines);
        assert_eq!(bad.iter().map(|b| b.0).collect::<Vec<_>>(), [2, 3, 4, 5, 6]);
        assert!(bad[0].1.contains("2 fields, expected 3"), "{}", bad[0].1);
        assert!(bad[1].1.contains("RFC 3339"), "{}", bad[1].1);
        assert!(bad[2].1.contains("not finite"), "{}", bad[2].1);
        assert!(bad[3].1.contains("empty series"), "{}", bad[3].1);
        assert!(bad[4].1.contains("not a number"), "{}", bad[4].1);
    }

    #[test]
    fn an_overlong_line_is_one_bad_line_and_the_next_line_reads() {
        let text = format!("{}\n1,a,1\n", "x".repeat(MAX_LINE_BYTES + 10));
        let reader = RecordingReader::new(
            std::io::BufReader::with_capacity(1024, text.as_bytes()),
            Path::new("t"),
            Format::Csv,
            None,
        );
        let lines: Vec<Line> = reader.collect::<Result<_, _>>().unwrap();
        assert!(matches!(&lines[0], Line::Bad(b) if b.line == 1 && b.reason.contains("longer")));
        assert_eq!(lines[1], reading(2, 1_000, "a", 1.0));
    }

    #[test]
    fn bytes_read_reaches_the_file_size() {
        let text = "1,a,1\n2,a,2";
        let mut reader = RecordingReader::new(text.as_bytes(), Path::new("t"), Format::Csv, None);
        while reader.next_line().unwrap().is_some() {}
        assert_eq!(reader.bytes_read(), text.len() as u64);
    }

    #[test]
    fn format_comes_from_the_extension_or_the_first_byte() {
        assert_eq!(Format::from_path(Path::new("a.JSONL")), Some(Format::JsonLines));
        assert_eq!(Format::from_path(Path::new("a.csv")), Some(Format::Csv));
        assert_eq!(Format::from_path(Path::new("a.txt")), None);
        assert_eq!(Format::sniff(b"\xEF\xBB\xBF \n{\"ts\":1}"), Format::JsonLines);
        assert_eq!(Format::sniff(b"timestamp,value"), Format::Csv);
    }

    #[test]
    fn written_readings_read_back_identically() {
        let mut out = Vec::new();
        write_reading(&mut out, 1_718_000_000_123, "pump \"1\"/t", 0.1).unwrap();
        write_reading(&mut out, 1_718_000_000_124, "p/t", -2.5e-7).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            read_all(&text, Format::JsonLines, None).unwrap(),
            vec![
                reading(1, 1_718_000_000_123, "pump \"1\"/t", 0.1),
                reading(2, 1_718_000_000_124, "p/t", -2.5e-7)
            ]
        );
    }

    #[test]
    fn time_bounds_are_rfc3339_or_a_duration_ago() {
        let now = 1_718_000_000_000;
        assert_eq!(parse_time("2h", now).unwrap(), now - 7_200_000);
        assert_eq!(parse_time("90m ago", now).unwrap(), now - 5_400_000);
        assert_eq!(parse_time("2024-06-10T08:13:20+02:00", now).unwrap(), 1_718_000_000_000);
        assert!(parse_time("12", now).is_err());
        assert!(parse_time("yesterday", now).unwrap_err().is_usage());
    }

    #[test]
    fn the_export_filter_is_a_half_open_time_range_and_a_pattern() {
        let filter = ExportFilter { from_ms: Some(10), to_ms: Some(20), series: None }
            .with_series("pump-*/temperature")
            .unwrap();
        assert!(filter.admits("pump-1/temperature", 10));
        assert!(!filter.admits("pump-1/temperature", 20));
        assert!(!filter.admits("pump-1/temperature", 9));
        assert!(!filter.admits("pump-1/vibration", 15));
    }

    #[test]
    fn milliseconds_format_as_rfc3339_utc() {
        assert_eq!(format_ms(1_718_000_000_500), "2024-06-10T06:13:20.500Z");
        assert_eq!(format_ms(0), "1970-01-01T00:00:00.000Z");
    }
}
