//! The upstream wire format: how a [`Batch`] travels from an agent to a backend, and the
//! decoder backends use (feature `codec`).
//!
//! A body is one batch in one of two [`Format`]s, optionally compressed ([`Compression`]):
//!
//! | Format | `Content-Type` | What it is |
//! |---|---|---|
//! | [`Format::Json`] | `application/json` | the [`Batch`] as serde JSON, self-describing |
//! | [`Format::Postcard`] | `application/x-edgewise-batch` | the compact binary layout below |
//!
//! | Compression | `Content-Encoding` | Magic bytes |
//! |---|---|---|
//! | [`Compression::None`] | `identity` (or no header) | none |
//! | [`Compression::Zstd`] | `zstd` (level 3) | `28 B5 2F FD` |
//! | [`Compression::Gzip`] | `gzip` | `1F 8B` |
//!
//! Over HTTP the headers name format and compression ([`decode`]); over transports without
//! headers (MQTT) [`decode_sniffed`] recognises them from the bytes: the compression by its
//! magic, then JSON by a `{` (after optional whitespace), anything else as the compact layout
//! (whose first byte, the version, is never `{` or whitespace).
//!
//! # The compact layout (`application/x-edgewise-batch`)
//!
//! Built from postcard's primitives: `varint` is an unsigned LEB128 integer (7 bits per byte,
//! low bits first, at most 10 bytes), `zigzag` a signed one mapped to unsigned (0, -1, 1, -2 →
//! 0, 1, 2, 3), `str` a varint byte length and UTF-8. What repeats in a JSON batch is sent
//! once: the agent id and store epoch (record ids are rebuilt from `(agent, epoch, lane,
//! seq)`), every other string in a table that records refer to by index, sequence numbers
//! and times as differences from the previous record.
//!
//! ```text
//! batch   = version:u8 (= 2)  agent:str  lane:u8 (0 alerts, 1 summaries)  epoch:varint
//!           first_seq:varint  last_seq:varint
//!           strings:varint str*                   each distinct string once, in first-use order
//!           records:varint record*                nothing may follow
//! record  = head:u8  seq:zigzag  [id:str]  body
//!           head   bits 0-1: 0 alert, 1 summary, 2 gap; bit 7: the id is not the derived one
//!                  and follows as `id` (the derived id is record_id(agent, epoch, lane, seq),
//!                  or gap_id(..) for a gap); other bits 0
//!           seq    seq - (previous seq + 1), the first record's previous seq being first_seq - 1
//! summary = flags:u8  series:idx  start_ms:time  [window_ms:varint]  count:varint
//!           min:num  [max:num]  [mean:num]  stddev:num  [first:num]  [last:num]  [windows:varint]
//!           flags  0x01 window_ms follows (else: that of the previous summary, 0 for the first)
//!                  0x02 windows follows (else 1)
//!                  0x04 max = min   0x08 mean = min
//!                  0x10 first = min   0x20 first = max   0x40 last = min   0x80 last = max
//!                  (equal bit for bit; an omitted value takes the value it equals)
//! alert   = rule:idx  series:idx  bits:u8  ts_ms:time  value:num  threshold:num  message:idx
//!           labels:varint (key:idx value:idx)*    keys in ascending order, no duplicates
//!           bits   bit 0: cleared (else raised); bits 1-2: severity 0 info, 1 warning,
//!                  2 critical; other bits 0
//! gap     = lane:u8  first_seq:zigzag (- record seq)  span:varint (last_seq - first_seq)
//!           records:varint  flags:u8 (0x01 from_ms follows, 0x02 to_ms follows)
//!           [from_ms:time]  [to_ms:time]  reason:idx  events:varint
//! idx     = varint index into the string table
//! time    = zigzag difference to the previous time in the batch (start_ms, ts_ms, from_ms,
//!           to_ms in record order, starting from 0)
//! num     = varint n; tag = n & 7:
//!           0..=5  the decimal m / 10^tag, m = zigzag-decoded n >> 3 (|m| < 2^53): 61.2 is
//!                  m = 612, tag 1, two bytes
//!           6      an f32 follows (4 bytes, little-endian): exact for readings of devices
//!           7      an f64 follows (8 bytes, little-endian): anything else, NaN included
//! ```
//!
//! Every value decodes to the same bits it was encoded from, so a batch survives the compact
//! layout unchanged (a property test checks it), and records whose ids are not the derived
//! ones still round-trip (they carry their id). The layout exists for format version 2 only:
//! encoding a batch of another version is refused, and a decoder refuses a version byte it
//! does not know with [`WireError::UnsupportedVersion`]. A new version may change anything
//! after the version byte.
//!
//! # Limits
//!
//! A decoder must survive hostile bodies: decompression stops at [`MAX_DECODED_BYTES`] (a
//! zip bomb is an error, not an out-of-memory kill), and the compact decoder charges every
//! record and every string it materialises against the same budget, so a batch of a few KiB
//! that refers to one long string a million times is refused too. Lengths and counts are
//! checked against the bytes that remain before anything is allocated.
//!
//! # Verification
//!
//! [`decode`] and [`decode_sniffed`] return only batches that pass [`verify`]: a known
//! version, at least one record, records in strictly increasing `seq` order spanning exactly
//! `first_seq..=last_seq`, and every record id equal to `record_id(agent, epoch, lane, seq)`
//! (`gap_id` for gaps) with one store epoch for the whole batch. Receivers de-duplicate by
//! that id.
//!
//! # A backend's ingest
//!
//! ```
//! use sensors::record::RecordBody;
//! use sensors::wire::{self, WireError};
//!
//! /// One POSTed body: its bytes and two headers. Answer 200 on `Ok`; on `Err`, 415 if
//! /// `e.is_unsupported_media_type()`, 413 if `e.is_too_large()`, else 400 with `e`'s text.
//! fn ingest(body: &[u8], content_type: &str, encoding: Option<&str>) -> Result<(), WireError> {
//!     let batch = wire::decode(body, content_type, encoding)?; // decompress, parse, verify
//!     for record in &batch.records {
//!         // Skip `record.id` if it was stored before; store it otherwise.
//!         match &record.body {
//!             RecordBody::Summary(s) => println!("{} {} mean {}", record.id, s.series, s.mean),
//!             RecordBody::Alert(a) => println!("{} {} {:?}", record.id, a.rule, a.state),
//!             RecordBody::Gap(g) => println!("{} {} records lost", record.id, g.records),
//!         }
//!     }
//!     Ok(())
//! }
//!
//! let error = ingest(b"{}", "text/csv", None).unwrap_err();
//! assert!(error.is_unsupported_media_type());
//! ```

mod compact;

use std::borrow::Cow;
use std::boxed::Box;
use std::fmt;
use std::io::{Read, Write};
use std::string::{String, ToString};
use std::vec::Vec;

use serde::{Deserialize, Serialize};

use crate::record::{BATCH_FORMAT_VERSION, Batch, Lane, RecordBody, gap_id, record_id};

/// Largest decompressed body, and the budget of the compact decoder (strings it
/// materialises plus a fixed cost per record): 64 MiB. An agent's batches are
/// 256 KiB by default (`upstream.batch.max_bytes`), so this leaves room for any sane
/// configuration while a backend decoding many bodies at once stays within memory.
pub const MAX_DECODED_BYTES: usize = 64 << 20;

/// zstd level: 3 is zstd's default and measured best ratio per CPU second (dependency notes
/// §7.2: 8.75× at ~700 MB/s on x86, several times slower on a Pi).
pub const ZSTD_LEVEL: i32 = 3;

/// Oldest batch format version the decoders accept: version 1 JSON (no `Summary.windows`,
/// no `Gap.events`) still decodes, with their defaults.
pub const OLDEST_SUPPORTED_VERSION: u8 = 1;

/// How a batch is serialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// serde JSON of [`Batch`]: `application/json`.
    #[default]
    Json,
    /// The compact binary layout of the module docs: `application/x-edgewise-batch`.
    Postcard,
}

impl Format {
    /// Both formats.
    pub const ALL: [Format; 2] = [Format::Json, Format::Postcard];

    /// The `Content-Type` of a body in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Postcard => "application/x-edgewise-batch",
        }
    }

    /// The format of a `Content-Type`, ignoring case, surrounding whitespace and parameters
    /// (`application/json; charset=utf-8` is JSON); `None` for any other type.
    pub fn from_content_type(content_type: &str) -> Option<Format> {
        let media = content_type.split(';').next().unwrap_or("").trim();
        Format::ALL.into_iter().find(|f| media.eq_ignore_ascii_case(f.content_type()))
    }

    /// `json` or `postcard`, as in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Postcard => "postcard",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a serialised batch is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Compression {
    /// Sent as is.
    #[default]
    None,
    /// zstd at [`ZSTD_LEVEL`].
    Zstd,
    /// gzip (deflate) at flate2's default level.
    Gzip,
}

impl Compression {
    /// All compressions.
    pub const ALL: [Compression; 3] = [Compression::None, Compression::Zstd, Compression::Gzip];

    /// The `Content-Encoding` token: `identity`, `zstd` or `gzip`.
    pub fn content_encoding(self) -> &'static str {
        match self {
            Compression::None => "identity",
            Compression::Zstd => "zstd",
            Compression::Gzip => "gzip",
        }
    }

    /// The compression of a `Content-Encoding` value, ignoring case and whitespace:
    /// `identity` (or empty), `zstd`, `gzip` (or `x-gzip`); `None` for anything else,
    /// stacked encodings included.
    pub fn from_content_encoding(encoding: &str) -> Option<Compression> {
        let encoding = encoding.trim();
        if encoding.is_empty() || encoding.eq_ignore_ascii_case("identity") {
            Some(Compression::None)
        } else if encoding.eq_ignore_ascii_case("zstd") {
            Some(Compression::Zstd)
        } else if encoding.eq_ignore_ascii_case("gzip") || encoding.eq_ignore_ascii_case("x-gzip") {
            Some(Compression::Gzip)
        } else {
            None
        }
    }

    /// The compression whose magic bytes start `bytes`; `None` for uncompressed data.
    pub fn sniff(bytes: &[u8]) -> Compression {
        if bytes.starts_with(&[0x28, 0xB5, 0x2F, 0xFD]) {
            Compression::Zstd
        } else if bytes.starts_with(&[0x1F, 0x8B]) {
            Compression::Gzip
        } else {
            Compression::None
        }
    }

    /// `none`, `zstd` or `gzip`, as in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zstd => "zstd",
            Compression::Gzip => "gzip",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a batch cannot be encoded, decoded or accepted.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The `Content-Type` is neither JSON nor the compact layout (HTTP 415).
    #[error(
        "unsupported content type {content_type:?}: expected application/json or \
         application/x-edgewise-batch"
    )]
    UnsupportedContentType {
        /// The header as received.
        content_type: String,
    },
    /// The `Content-Encoding` is not identity, zstd or gzip (HTTP 415).
    #[error("unsupported content encoding {encoding:?}: expected identity, zstd or gzip")]
    UnsupportedEncoding {
        /// The header as received.
        encoding: String,
    },
    /// The body decompresses (or decodes) to more than the limit (HTTP 413).
    #[error("batch is larger than {limit} bytes decoded")]
    TooLarge {
        /// [`MAX_DECODED_BYTES`].
        limit: usize,
    },
    /// The compressed stream is corrupt or truncated.
    #[error("body is not valid {compression}")]
    Decompress {
        /// The compression that failed.
        compression: Compression,
        /// The decompressor's report.
        #[source]
        source: std::io::Error,
    },
    /// Compressing failed (only when memory runs out).
    #[error("cannot compress with {compression}")]
    Compress {
        /// The compression that failed.
        compression: Compression,
        /// The compressor's report.
        #[source]
        source: std::io::Error,
    },
    /// The body is not a JSON batch.
    #[error("body is not a JSON batch")]
    Json {
        /// serde_json's report, with line and column.
        #[source]
        source: serde_json::Error,
    },
    /// The body is not a valid compact batch.
    #[error("compact batch is malformed at byte {offset}: {reason}")]
    Compact {
        /// Offset into the decompressed body.
        offset: usize,
        /// What is wrong there.
        reason: String,
    },
    /// The batch has a format version this decoder does not know (or, when encoding, one
    /// the compact layout does not exist for).
    #[error(
        "batch format version {version} is not supported (this decoder knows \
         {OLDEST_SUPPORTED_VERSION} to {BATCH_FORMAT_VERSION})"
    )]
    UnsupportedVersion {
        /// The version found.
        version: u8,
    },
    /// The batch decoded but breaks a rule of the format (ids, sequence numbers).
    #[error("invalid batch: {reason}")]
    Invalid {
        /// The first rule broken.
        reason: String,
    },
}

impl WireError {
    /// Whether the body's type or encoding is unknown (HTTP 415) rather than its content bad.
    pub fn is_unsupported_media_type(&self) -> bool {
        matches!(
            self,
            WireError::UnsupportedContentType { .. } | WireError::UnsupportedEncoding { .. }
        )
    }

    /// Whether the body is too large once decompressed (HTTP 413).
    pub fn is_too_large(&self) -> bool {
        matches!(self, WireError::TooLarge { .. })
    }

    fn invalid(reason: impl Into<String>) -> WireError {
        WireError::Invalid { reason: reason.into() }
    }
}

/// Serialises `batch` in `format` and compresses it.
///
/// The batch is not verified (a sender's batches are valid by construction; [`verify`] is
/// cheap enough to call first where in doubt). The compact layout exists for format version
/// 2 only: another version is [`WireError::UnsupportedVersion`].
pub fn encode(
    batch: &Batch,
    format: Format,
    compression: Compression,
) -> Result<Vec<u8>, WireError> {
    let plain = match format {
        Format::Json => serde_json::to_vec(batch).map_err(|source| WireError::Json { source })?,
        Format::Postcard => compact::encode(batch)?,
    };
    match compression {
        Compression::None => Ok(plain),
        _ => compress(&plain, compression),
    }
}

/// Compresses `data` (a serialised batch) for the given `Content-Encoding`.
///
/// Separate from [`encode`] so that a sender can serialise on its own thread and compress on
/// a blocking pool.
pub fn compress(data: &[u8], compression: Compression) -> Result<Vec<u8>, WireError> {
    let failed = |source| WireError::Compress { compression, source };
    match compression {
        Compression::None => Ok(data.to_vec()),
        Compression::Zstd => zstd::bulk::compress(data, ZSTD_LEVEL).map_err(failed),
        Compression::Gzip => {
            let mut encoder = flate2::write::GzEncoder::new(
                Vec::with_capacity(data.len() / 4),
                flate2::Compression::default(),
            );
            encoder.write_all(data).map_err(failed)?;
            encoder.finish().map_err(failed)
        }
    }
}

/// Undoes `compression`, stopping with [`WireError::TooLarge`] beyond [`MAX_DECODED_BYTES`].
pub fn decompress(data: &[u8], compression: Compression) -> Result<Cow<'_, [u8]>, WireError> {
    let too_large = WireError::TooLarge { limit: MAX_DECODED_BYTES };
    let failed = |source| WireError::Decompress { compression, source };
    let reader: Box<dyn Read + '_> = match compression {
        Compression::None if data.len() > MAX_DECODED_BYTES => return Err(too_large),
        Compression::None => return Ok(Cow::Borrowed(data)),
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::with_buffer(data).map_err(failed)?)
        }
        // Concatenated gzip members are one stream (RFC 1952 §2.2), as `gzip -d` reads them.
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(data)),
    };
    // One byte more than allowed tells "exactly the limit" from "beyond it". The vector
    // grows as the data arrives: a small body never reserves the limit.
    let mut out = Vec::new();
    reader.take(MAX_DECODED_BYTES as u64 + 1).read_to_end(&mut out).map_err(failed)?;
    if out.len() > MAX_DECODED_BYTES {
        return Err(too_large);
    }
    Ok(Cow::Owned(out))
}

/// Decodes and verifies one body as a receiver gets it over HTTP: `content_type` names the
/// format (parameters ignored), `content_encoding` the compression (`None` when the header
/// is absent).
pub fn decode(
    bytes: &[u8],
    content_type: &str,
    content_encoding: Option<&str>,
) -> Result<Batch, WireError> {
    let batch = decode_unverified(bytes, content_type, content_encoding)?;
    verify(&batch)?;
    Ok(batch)
}

/// [`decode`] without [`verify`]: for tools that inspect batches a receiver refused (a
/// dead-lettered batch, a test receiver that reports every rule a batch breaks). Receivers
/// use [`decode`]. The version is still checked where the layout depends on it (compact).
pub fn decode_unverified(
    bytes: &[u8],
    content_type: &str,
    content_encoding: Option<&str>,
) -> Result<Batch, WireError> {
    let format = Format::from_content_type(content_type).ok_or_else(|| {
        WireError::UnsupportedContentType { content_type: content_type.to_string() }
    })?;
    let compression = match content_encoding {
        None => Compression::None,
        Some(encoding) => Compression::from_content_encoding(encoding)
            .ok_or_else(|| WireError::UnsupportedEncoding { encoding: encoding.to_string() })?,
    };
    let plain = decompress(bytes, compression)?;
    parse(&plain, format)
}

/// Decodes and verifies a body without headers (an MQTT payload): the compression from its
/// magic bytes, then JSON if the first non-whitespace byte is `{`, else the compact layout.
/// Returns what was detected too.
pub fn decode_sniffed(bytes: &[u8]) -> Result<(Batch, Format, Compression), WireError> {
    let compression = Compression::sniff(bytes);
    let plain = decompress(bytes, compression)?;
    let first = plain.iter().find(|b| !b.is_ascii_whitespace());
    let format = if first == Some(&b'{') { Format::Json } else { Format::Postcard };
    let batch = parse(&plain, format)?;
    verify(&batch)?;
    Ok((batch, format, compression))
}

/// Parses an uncompressed body; no verification.
fn parse(plain: &[u8], format: Format) -> Result<Batch, WireError> {
    match format {
        Format::Json => serde_json::from_slice(plain).map_err(|source| WireError::Json { source }),
        Format::Postcard => compact::decode(plain),
    }
}

/// Checks the rules of the format that a decoder cannot see in the types: a supported
/// version; at least one record; `seq` strictly increasing from `first_seq` to `last_seq`
/// (the first and last record's); every id `record_id(agent, epoch, lane, seq)`, or
/// `gap_id(..)` for a gap record, with the same store epoch throughout; a gap's own range in
/// order. Returns the first problem.
pub fn verify(batch: &Batch) -> Result<(), WireError> {
    if !(OLDEST_SUPPORTED_VERSION..=BATCH_FORMAT_VERSION).contains(&batch.version) {
        return Err(WireError::UnsupportedVersion { version: batch.version });
    }
    let (Some(first), Some(last)) = (batch.records.first(), batch.records.last()) else {
        return Err(WireError::invalid("the batch has no records"));
    };
    if first.seq != batch.first_seq || last.seq != batch.last_seq {
        return Err(WireError::invalid(std::format!(
            "the batch says seq {}..={} but its records span {}..={}",
            batch.first_seq,
            batch.last_seq,
            first.seq,
            last.seq
        )));
    }
    let epoch = epoch_of(&batch.agent, batch.lane, &first.id).ok_or_else(|| {
        WireError::invalid(std::format!(
            "record id {:?} is not `{}:<epoch hex>:{}:<seq>`",
            first.id,
            batch.agent,
            batch.lane.as_str()
        ))
    })?;
    let mut previous: Option<u64> = None;
    for record in &batch.records {
        if previous.is_some_and(|p| record.seq <= p) {
            return Err(WireError::invalid(std::format!(
                "seq {} follows seq {} in one batch",
                record.seq,
                previous.unwrap_or_default()
            )));
        }
        previous = Some(record.seq);
        let expected = derived_id(&batch.agent, epoch, batch.lane, record.seq, &record.body);
        if record.id != expected {
            return Err(WireError::invalid(std::format!(
                "record id {:?} should be {expected:?}",
                record.id
            )));
        }
        if let RecordBody::Gap(gap) = &record.body
            && gap.first_seq > gap.last_seq
        {
            return Err(WireError::invalid(std::format!(
                "gap {:?} covers seq {}..={}, an empty range",
                record.id,
                gap.first_seq,
                gap.last_seq
            )));
        }
    }
    Ok(())
}

/// The store epoch in a record id of `agent` and `lane`: `<agent>:<epoch hex>:<lane>:...`.
/// `None` when the id does not have that shape.
pub fn epoch_of(agent: &str, lane: Lane, id: &str) -> Option<u64> {
    let rest = id.strip_prefix(agent)?.strip_prefix(':')?;
    let (epoch, rest) = rest.split_once(':')?;
    rest.strip_prefix(lane.as_str())?.strip_prefix(':')?;
    // `{:x}` writes lowercase digits without leading zeros; anything else is not an epoch
    // the agent wrote (and would not round-trip through `record_id`).
    if epoch.is_empty() || epoch.len() > 16 || !epoch.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(epoch, 16).ok()
}

/// The id a record of this body has: `gap_id` for a gap, `record_id` otherwise.
pub(crate) fn derived_id(
    agent: &str,
    epoch: u64,
    lane: Lane,
    seq: u64,
    body: &RecordBody,
) -> String {
    match body {
        RecordBody::Gap(_) => gap_id(agent, epoch, lane, seq),
        _ => record_id(agent, epoch, lane, seq),
    }
}

#[cfg(test)]
mod tests;
