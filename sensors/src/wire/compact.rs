//! The compact binary layout (`application/x-edgewise-batch`); the layout is drawn in the
//! parent module's docs, which this file implements field by field.
//!
//! Encoding writes the records into one buffer while it fills the string table, then puts
//! header, table and records together. Decoding reads through a bounds-checked [`Reader`]
//! that never panics and never allocates more than the remaining input justifies.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::string::{String, ToString};
use std::vec::Vec;

use super::{MAX_DECODED_BYTES, WireError, derived_id, epoch_of};
use crate::record::{
    Alert, AlertState, BATCH_FORMAT_VERSION, Batch, Gap, Lane, Record, RecordBody, Severity,
    Summary,
};

/// The one version the compact layout exists for.
const VERSION: u8 = BATCH_FORMAT_VERSION;

/// `head` kinds, in `RecordBody` order.
const KIND_ALERT: u8 = 0;
const KIND_SUMMARY: u8 = 1;
const KIND_GAP: u8 = 2;
/// `head` bit: the record's id is not the derived one and follows.
const HEAD_EXPLICIT_ID: u8 = 0x80;

/// Summary flags.
const S_WINDOW_MS: u8 = 0x01;
const S_WINDOWS: u8 = 0x02;
const S_MAX_IS_MIN: u8 = 0x04;
const S_MEAN_IS_MIN: u8 = 0x08;
const S_FIRST_IS_MIN: u8 = 0x10;
const S_FIRST_IS_MAX: u8 = 0x20;
const S_LAST_IS_MIN: u8 = 0x40;
const S_LAST_IS_MAX: u8 = 0x80;

/// Alert bits.
const A_CLEARED: u8 = 0x01;
const A_SEVERITY_SHIFT: u8 = 1;

/// Gap flags.
const G_FROM: u8 = 0x01;
const G_TO: u8 = 0x02;

/// `num` tags: 0..=5 decimal places, then f32 and f64.
const NUM_MAX_DECIMALS: u8 = 5;
const NUM_F32: u8 = 6;
const NUM_F64: u8 = 7;
/// Powers of ten that are exact in an f64, for the decimal `num`s (both directions use the
/// table, so encoder and decoder compute the same quotient).
const POW10: [f64; NUM_MAX_DECIMALS as usize + 1] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5];
/// Decimal mantissas stay below 2^53, where every integer is exact in an f64.
const MAX_MANTISSA: f64 = 9_007_199_254_740_992.0;

/// What the decoder charges per record against [`MAX_DECODED_BYTES`], on top of its strings:
/// about the size of a record in memory, and less than its JSON, so that any batch whose
/// JSON is within the limit decodes from the compact layout too.
const RECORD_COST: usize = 128;
/// The fewest bytes a record takes (head, seq, then a summary's flags, series, start, count,
/// min, stddev): bounds the capacity reserved for a claimed record count.
const MIN_RECORD_BYTES: usize = 8;

/// Encodes a batch of format version 2.
pub(super) fn encode(batch: &Batch) -> Result<Vec<u8>, WireError> {
    if batch.version != VERSION {
        return Err(WireError::UnsupportedVersion { version: batch.version });
    }
    let epoch = batch.records.iter().find_map(|r| epoch_of(&batch.agent, batch.lane, &r.id));
    let epoch = epoch.unwrap_or(0);
    let mut table = Table::default();
    // Summaries are ~40 bytes each in this layout; strings are mostly in the table.
    let mut body = Writer(Vec::with_capacity(batch.records.len() * 48));
    let mut state = Deltas::new(batch.first_seq);
    for record in &batch.records {
        let derived = derived_id(&batch.agent, epoch, batch.lane, record.seq, &record.body);
        let explicit = record.id != derived;
        let kind = match &record.body {
            RecordBody::Alert(_) => KIND_ALERT,
            RecordBody::Summary(_) => KIND_SUMMARY,
            RecordBody::Gap(_) => KIND_GAP,
        };
        body.u8(kind | if explicit { HEAD_EXPLICIT_ID } else { 0 });
        body.zigzag(record.seq.wrapping_sub(state.next_seq) as i64);
        state.next_seq = record.seq.wrapping_add(1);
        if explicit {
            body.str(&record.id);
        }
        match &record.body {
            RecordBody::Summary(s) => encode_summary(s, &mut body, &mut table, &mut state),
            RecordBody::Alert(a) => encode_alert(a, &mut body, &mut table, &mut state),
            RecordBody::Gap(g) => encode_gap(g, record.seq, &mut body, &mut table, &mut state),
        }
    }
    let strings: usize = table.strings.iter().map(|s| s.len() + 2).sum();
    let mut out = Writer(Vec::with_capacity(32 + batch.agent.len() + strings + body.0.len()));
    out.u8(VERSION);
    out.str(&batch.agent);
    out.u8(batch.lane.tag());
    out.varint(epoch);
    out.varint(batch.first_seq);
    out.varint(batch.last_seq);
    out.varint(table.strings.len() as u64);
    for s in &table.strings {
        out.str(s);
    }
    out.varint(batch.records.len() as u64);
    out.0.extend_from_slice(&body.0);
    Ok(out.0)
}

fn encode_summary<'a>(s: &'a Summary, out: &mut Writer, table: &mut Table<'a>, state: &mut Deltas) {
    let same = |a: f64, b: f64| a.to_bits() == b.to_bits();
    let mut flags = 0;
    if s.window_ms != state.window_ms {
        flags |= S_WINDOW_MS;
    }
    if s.windows != 1 {
        flags |= S_WINDOWS;
    }
    if same(s.max, s.min) {
        flags |= S_MAX_IS_MIN;
    }
    if same(s.mean, s.min) {
        flags |= S_MEAN_IS_MIN;
    }
    if same(s.first, s.min) {
        flags |= S_FIRST_IS_MIN;
    } else if same(s.first, s.max) {
        flags |= S_FIRST_IS_MAX;
    }
    if same(s.last, s.min) {
        flags |= S_LAST_IS_MIN;
    } else if same(s.last, s.max) {
        flags |= S_LAST_IS_MAX;
    }
    out.u8(flags);
    out.varint(table.index(&s.series));
    out.zigzag(s.start_ms.wrapping_sub(state.time_ms));
    state.time_ms = s.start_ms;
    if flags & S_WINDOW_MS != 0 {
        out.varint(s.window_ms);
        state.window_ms = s.window_ms;
    }
    out.varint(s.count);
    out.num(s.min);
    if flags & S_MAX_IS_MIN == 0 {
        out.num(s.max);
    }
    if flags & S_MEAN_IS_MIN == 0 {
        out.num(s.mean);
    }
    out.num(s.stddev);
    if flags & (S_FIRST_IS_MIN | S_FIRST_IS_MAX) == 0 {
        out.num(s.first);
    }
    if flags & (S_LAST_IS_MIN | S_LAST_IS_MAX) == 0 {
        out.num(s.last);
    }
    if flags & S_WINDOWS != 0 {
        out.varint(u64::from(s.windows));
    }
}

fn encode_alert<'a>(a: &'a Alert, out: &mut Writer, table: &mut Table<'a>, state: &mut Deltas) {
    out.varint(table.index(&a.rule));
    out.varint(table.index(&a.series));
    let cleared = match a.state {
        AlertState::Raised => 0,
        AlertState::Cleared => A_CLEARED,
    };
    let severity = match a.severity {
        Severity::Info => 0,
        Severity::Warning => 1,
        Severity::Critical => 2,
    };
    out.u8(cleared | severity << A_SEVERITY_SHIFT);
    out.zigzag(a.ts_ms.wrapping_sub(state.time_ms));
    state.time_ms = a.ts_ms;
    out.num(a.value);
    out.num(a.threshold);
    out.varint(table.index(&a.message));
    out.varint(a.labels.len() as u64);
    for (key, value) in &a.labels {
        out.varint(table.index(key));
        out.varint(table.index(value));
    }
}

fn encode_gap<'a>(
    g: &'a Gap,
    seq: u64,
    out: &mut Writer,
    table: &mut Table<'a>,
    state: &mut Deltas,
) {
    out.u8(g.lane.tag());
    out.zigzag(g.first_seq.wrapping_sub(seq) as i64);
    out.varint(g.last_seq.wrapping_sub(g.first_seq));
    out.varint(g.records);
    let flags =
        if g.from_ms.is_some() { G_FROM } else { 0 } | if g.to_ms.is_some() { G_TO } else { 0 };
    out.u8(flags);
    for time in [g.from_ms, g.to_ms].into_iter().flatten() {
        out.zigzag(time.wrapping_sub(state.time_ms));
        state.time_ms = time;
    }
    out.varint(table.index(&g.reason));
    out.varint(g.events);
}

/// Decodes a compact batch (not verified).
pub(super) fn decode(bytes: &[u8]) -> Result<Batch, WireError> {
    let mut r = Reader { bytes, pos: 0, budget: MAX_DECODED_BYTES };
    let version = r.u8()?;
    if version != VERSION {
        return Err(WireError::UnsupportedVersion { version });
    }
    let agent = r.str()?;
    r.charge(agent.len())?;
    let agent = agent.to_string();
    let lane = r.lane()?;
    let epoch = r.varint()?;
    let first_seq = r.varint()?;
    let last_seq = r.varint()?;
    let count = r.count(1)?;
    let mut strings = Vec::with_capacity(count);
    for _ in 0..count {
        strings.push(r.str()?);
    }
    let table = Strings(strings);
    let count = r.count(MIN_RECORD_BYTES)?;
    let mut records = Vec::with_capacity(count);
    let mut state = Deltas::new(first_seq);
    for _ in 0..count {
        r.charge(RECORD_COST)?;
        let at = r.pos;
        let head = r.u8()?;
        let seq = state.next_seq.wrapping_add(r.zigzag()? as u64);
        state.next_seq = seq.wrapping_add(1);
        let explicit = match head & !HEAD_EXPLICIT_ID {
            KIND_ALERT | KIND_SUMMARY | KIND_GAP => head & HEAD_EXPLICIT_ID != 0,
            _ => return Err(r.error_at(at, std::format!("unknown record head {head:#04x}"))),
        };
        let id = if explicit { Some(r.owned_str()?) } else { None };
        let body = match head & !HEAD_EXPLICIT_ID {
            KIND_ALERT => RecordBody::Alert(decode_alert(&mut r, &table, &mut state)?),
            KIND_SUMMARY => RecordBody::Summary(decode_summary(&mut r, &table, &mut state)?),
            _ => RecordBody::Gap(decode_gap(&mut r, seq, &table, &mut state)?),
        };
        let id = match id {
            Some(id) => id,
            None => derived_id(&agent, epoch, lane, seq, &body),
        };
        records.push(Record { id, seq, body });
    }
    if r.pos != bytes.len() {
        return Err(r.error(std::format!("{} bytes follow the last record", bytes.len() - r.pos)));
    }
    Ok(Batch { version, agent, lane, first_seq, last_seq, records })
}

fn decode_summary(
    r: &mut Reader<'_>,
    table: &Strings<'_>,
    state: &mut Deltas,
) -> Result<Summary, WireError> {
    let flags = r.u8()?;
    if flags & (S_FIRST_IS_MIN | S_FIRST_IS_MAX) == S_FIRST_IS_MIN | S_FIRST_IS_MAX
        || flags & (S_LAST_IS_MIN | S_LAST_IS_MAX) == S_LAST_IS_MIN | S_LAST_IS_MAX
    {
        return Err(r.error(std::format!("summary flags {flags:#04x} contradict each other")));
    }
    let series = r.string(table)?;
    let start_ms = state.time_ms.wrapping_add(r.zigzag()?);
    state.time_ms = start_ms;
    if flags & S_WINDOW_MS != 0 {
        state.window_ms = r.varint()?;
    }
    let count = r.varint()?;
    let min = r.num()?;
    let max = if flags & S_MAX_IS_MIN != 0 { min } else { r.num()? };
    let mean = if flags & S_MEAN_IS_MIN != 0 { min } else { r.num()? };
    let stddev = r.num()?;
    let pick = |is_min: u8, is_max: u8, r: &mut Reader<'_>| {
        if flags & is_min != 0 {
            Ok(min)
        } else if flags & is_max != 0 {
            Ok(max)
        } else {
            r.num()
        }
    };
    let first = pick(S_FIRST_IS_MIN, S_FIRST_IS_MAX, r)?;
    let last = pick(S_LAST_IS_MIN, S_LAST_IS_MAX, r)?;
    let windows = if flags & S_WINDOWS != 0 {
        let windows = r.varint()?;
        u32::try_from(windows)
            .map_err(|_| r.error(std::format!("windows {windows} exceeds a u32")))?
    } else {
        1
    };
    Ok(Summary {
        series,
        start_ms,
        window_ms: state.window_ms,
        count,
        min,
        max,
        mean,
        stddev,
        first,
        last,
        windows,
    })
}

fn decode_alert(
    r: &mut Reader<'_>,
    table: &Strings<'_>,
    state: &mut Deltas,
) -> Result<Alert, WireError> {
    let rule = r.string(table)?;
    let series = r.string(table)?;
    let bits = r.u8()?;
    let transition = if bits & A_CLEARED != 0 { AlertState::Cleared } else { AlertState::Raised };
    let severity = match bits >> A_SEVERITY_SHIFT {
        0 => Severity::Info,
        1 => Severity::Warning,
        2 => Severity::Critical,
        _ => return Err(r.error(std::format!("unknown alert bits {bits:#04x}"))),
    };
    let ts_ms = state.time_ms.wrapping_add(r.zigzag()?);
    state.time_ms = ts_ms;
    let value = r.num()?;
    let threshold = r.num()?;
    let message = r.string(table)?;
    let mut labels = BTreeMap::new();
    for _ in 0..r.count(2)? {
        let key = r.string(table)?;
        let value = r.string(table)?;
        if labels.last_key_value().is_some_and(|(last, _)| last >= &key) {
            return Err(r.error(std::format!("label {key:?} is out of order or repeated")));
        }
        labels.insert(key, value);
    }
    Ok(Alert {
        rule,
        series,
        state: transition,
        severity,
        ts_ms,
        value,
        threshold,
        message,
        labels,
    })
}

fn decode_gap(
    r: &mut Reader<'_>,
    seq: u64,
    table: &Strings<'_>,
    state: &mut Deltas,
) -> Result<Gap, WireError> {
    let lane = r.lane()?;
    let first_seq = seq.wrapping_add(r.zigzag()? as u64);
    let last_seq = first_seq.wrapping_add(r.varint()?);
    let records = r.varint()?;
    let flags = r.u8()?;
    if flags & !(G_FROM | G_TO) != 0 {
        return Err(r.error(std::format!("unknown gap flags {flags:#04x}")));
    }
    let mut time = |present: bool, r: &mut Reader<'_>| -> Result<Option<i64>, WireError> {
        if !present {
            return Ok(None);
        }
        state.time_ms = state.time_ms.wrapping_add(r.zigzag()?);
        Ok(Some(state.time_ms))
    };
    let from_ms = time(flags & G_FROM != 0, r)?;
    let to_ms = time(flags & G_TO != 0, r)?;
    let reason = r.string(table)?;
    let events = r.varint()?;
    Ok(Gap { lane, first_seq, last_seq, records, from_ms, to_ms, reason, events })
}

/// The running references that fields are sent relative to.
struct Deltas {
    /// The seq a record has when its `seq` field is 0: the previous one's plus one.
    next_seq: u64,
    /// The previous time field (0 before the first).
    time_ms: i64,
    /// The previous summary's window length (0 before the first).
    window_ms: u64,
}

impl Deltas {
    fn new(first_seq: u64) -> Deltas {
        Deltas { next_seq: first_seq, time_ms: 0, window_ms: 0 }
    }
}

/// The encoder's string table: each distinct string once, in order of first use.
#[derive(Default)]
struct Table<'a> {
    strings: Vec<&'a str>,
    index: HashMap<&'a str, u64>,
}

impl<'a> Table<'a> {
    fn index(&mut self, s: &'a str) -> u64 {
        let next = self.strings.len() as u64;
        *self.index.entry(s).or_insert_with(|| {
            self.strings.push(s);
            next
        })
    }
}

/// The decoder's string table, borrowed from the input.
struct Strings<'a>(Vec<&'a str>);

/// Appends postcard primitives.
pub(super) struct Writer(pub(super) Vec<u8>);

impl Writer {
    fn u8(&mut self, value: u8) {
        self.0.push(value);
    }

    fn varint(&mut self, mut value: u64) {
        while value >= 0x80 {
            self.0.push(value as u8 | 0x80);
            value >>= 7;
        }
        self.0.push(value as u8);
    }

    fn zigzag(&mut self, value: i64) {
        self.varint(((value << 1) ^ (value >> 63)) as u64);
    }

    fn str(&mut self, s: &str) {
        self.varint(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
    }

    /// The shortest of: a decimal with up to five places, an f32, an f64; each decodes to
    /// the same bits.
    pub(super) fn num(&mut self, value: f64) {
        match decimal(value) {
            Some(n) if varint_len(n) <= 5 => self.varint(n),
            _ if f64::from(value as f32).to_bits() == value.to_bits() => {
                self.u8(NUM_F32);
                self.0.extend_from_slice(&(value as f32).to_le_bytes());
            }
            Some(n) => self.varint(n),
            None => {
                self.u8(NUM_F64);
                self.0.extend_from_slice(&value.to_le_bytes());
            }
        }
    }
}

/// `value` as a decimal `num`, `(zigzag(m) << 3) | places`, if some mantissa `m` and up to
/// five places give back exactly its bits.
fn decimal(value: f64) -> Option<u64> {
    if !value.is_finite() {
        return None;
    }
    for places in 0..=NUM_MAX_DECIMALS {
        let mantissa = (value * POW10[usize::from(places)]).round();
        if mantissa.abs() >= MAX_MANTISSA {
            return None;
        }
        let mantissa = mantissa as i64;
        if from_decimal(mantissa, places).to_bits() == value.to_bits() {
            let zigzag = ((mantissa << 1) ^ (mantissa >> 63)) as u64;
            return Some(zigzag << 3 | u64::from(places));
        }
    }
    None
}

/// The f64 nearest to `mantissa / 10^places` (IEEE division of two exact values).
fn from_decimal(mantissa: i64, places: u8) -> f64 {
    mantissa as f64 / POW10[usize::from(places)]
}

fn varint_len(value: u64) -> usize {
    (64 - value.leading_zeros() as usize).max(1).div_ceil(7)
}

/// Reads postcard primitives; every read is bounds-checked.
pub(super) struct Reader<'a> {
    pub(super) bytes: &'a [u8],
    pub(super) pos: usize,
    /// What may still be materialised (strings, records) before the batch is too large.
    pub(super) budget: usize,
}

impl<'a> Reader<'a> {
    fn error(&self, reason: String) -> WireError {
        self.error_at(self.pos, reason)
    }

    fn error_at(&self, offset: usize, reason: String) -> WireError {
        WireError::Compact { offset, reason }
    }

    fn charge(&mut self, bytes: usize) -> Result<(), WireError> {
        self.budget = self
            .budget
            .checked_sub(bytes)
            .ok_or(WireError::TooLarge { limit: MAX_DECODED_BYTES })?;
        Ok(())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let rest = &self.bytes[self.pos..];
        if rest.len() < n {
            return Err(self.error(std::format!(
                "{n} bytes needed, {} left: the batch is truncated",
                rest.len()
            )));
        }
        self.pos += n;
        Ok(&rest[..n])
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }

    fn varint(&mut self) -> Result<u64, WireError> {
        let start = self.pos;
        let mut value: u64 = 0;
        for i in 0..10 {
            let byte = self.u8()?;
            // The tenth byte holds bit 63 only.
            if i == 9 && byte > 1 {
                break;
            }
            value |= u64::from(byte & 0x7F) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(self.error_at(start, "varint longer than a u64".to_string()))
    }

    fn zigzag(&mut self) -> Result<i64, WireError> {
        let n = self.varint()?;
        Ok((n >> 1) as i64 ^ -((n & 1) as i64))
    }

    /// A count of items of at least `min_bytes` each: more than the remaining bytes hold is
    /// an error before anything is allocated.
    fn count(&mut self, min_bytes: usize) -> Result<usize, WireError> {
        let at = self.pos;
        let count = self.varint()?;
        let left = self.bytes.len() - self.pos;
        match usize::try_from(count) {
            Ok(count) if count <= left / min_bytes => Ok(count),
            _ => Err(self.error_at(at, std::format!("{count} items cannot fit in {left} bytes"))),
        }
    }

    fn str(&mut self) -> Result<&'a str, WireError> {
        let at = self.pos;
        let len = self.varint()?;
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        let bytes = self.take(len)?;
        core::str::from_utf8(bytes)
            .map_err(|e| self.error_at(at, std::format!("string is not UTF-8: {e}")))
    }

    fn owned_str(&mut self) -> Result<String, WireError> {
        let s = self.str()?;
        self.charge(s.len())?;
        Ok(s.to_string())
    }

    /// A string of the table, materialised (and charged).
    fn string(&mut self, table: &Strings<'_>) -> Result<String, WireError> {
        let at = self.pos;
        let index = self.varint()?;
        let s = usize::try_from(index).ok().and_then(|i| table.0.get(i)).ok_or_else(|| {
            self.error_at(
                at,
                std::format!("string index {index} beyond a table of {}", table.0.len()),
            )
        })?;
        self.charge(s.len())?;
        Ok(s.to_string())
    }

    fn lane(&mut self) -> Result<Lane, WireError> {
        let tag = self.u8()?;
        Lane::from_tag(tag).ok_or_else(|| self.error(std::format!("unknown lane tag {tag}")))
    }

    pub(super) fn num(&mut self) -> Result<f64, WireError> {
        let at = self.pos;
        let n = self.varint()?;
        match (n & 7) as u8 {
            NUM_F32 if n == u64::from(NUM_F32) => {
                let bytes = self.take(4)?;
                Ok(f64::from(f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])))
            }
            NUM_F64 if n == u64::from(NUM_F64) => {
                let mut raw = [0; 8];
                raw.copy_from_slice(self.take(8)?);
                Ok(f64::from_le_bytes(raw))
            }
            NUM_F32 | NUM_F64 => Err(self.error_at(at, std::format!("malformed number tag {n}"))),
            places => {
                let zigzag = n >> 3;
                let mantissa = (zigzag >> 1) as i64 ^ -((zigzag & 1) as i64);
                if mantissa.unsigned_abs() >= 1 << 53 {
                    return Err(self.error_at(at, "decimal mantissa beyond 2^53".to_string()));
                }
                Ok(from_decimal(mantissa, places))
            }
        }
    }
}
