//! Device frames: what a device sends over its serial line, and the codec for it.
//!
//! A [`Frame`] is one sampling round of one device: a version byte, the device id, a frame
//! sequence number, the device's uptime tick and up to [`MAX_CHANNELS`] channel readings.
//!
//! # Wire layout
//!
//! ```text
//! COBS( postcard(Frame) ‖ crc32_le ) ‖ 0x00
//!
//! postcard(Frame) = version:u8 ‖ device_id:varint ‖ seq:varint ‖ device_tick_ms:varint
//!                   ‖ len:varint ‖ len × ChannelReading
//! ChannelReading  = channel:u8 ‖ unit:varint ‖ value:f32_le ‖ quality:varint [‖ fault:varint]
//! crc32_le        = CRC-32C (Castagnoli, crc::CRC_32_ISCSI) of postcard(Frame), little-endian
//! ```
//!
//! The version byte is the first byte of the body, so a receiver reads it before it trusts the
//! rest of the layout: a frame of another version is rejected as
//! [`FrameError::UnsupportedVersion`] (after its CRC checked), never misread.
//!
//! Encoding takes two steps because postcard cannot stack its CRC and COBS flavors (the COBS
//! flavor needs `IndexMut` on the inner flavor): postcard into a stack scratch buffer, CRC
//! appended, then COBS into the caller's buffer and a 0x00 delimiter. Nothing allocates.
//!
//! # Sizes
//!
//! `heapless::Vec` 0.9 has no postcard `MaxSize` impl unless postcard's `heapless-v0_9`
//! feature is on (it is not: it would add a second heapless to the graph), and the orphan rule
//! forbids adding one here, so [`Frame`] implements `MaxSize` by hand from its fields' bounds:
//! `1 + 3 × 5 + 1 + 8 × 8 = 81` bytes of postcard. [`MAX_FRAME_SIZE`] adds the CRC, the COBS
//! overhead (one byte per started 254 bytes) and the delimiter: 87 bytes. A test encodes a
//! maximal frame and checks that it takes exactly that many bytes.
//!
//! # Decoding a byte stream
//!
//! [`Decoder`] takes bytes one at a time ([`Decoder::feed`]) or a slice at a time
//! ([`Decoder::push`], an iterator over the outcomes). It gathers bytes up to a 0x00 and then
//! decodes them with [`decode_frame`] (also usable on its own, e.g. behind a host codec that
//! already splits on 0x00). Rules:
//!
//! - A 0x00 with nothing before it is idle fill, not an error: it yields nothing. A sender that
//!   may have left a partial frame on the line (after a reset or replug) should send one 0x00
//!   first, so that its next frame does not get glued to the leftover bytes.
//! - Garbage before a 0x00 yields one error (usually [`FrameError::Cobs`] or
//!   [`FrameError::Crc`]); decoding resynchronises at that 0x00. Garbage that is *not*
//!   followed by a 0x00 merges with the next frame and costs that frame too.
//! - More than `MAX_FRAME_SIZE - 1` bytes without a 0x00 are dropped up to the next 0x00,
//!   which yields one [`FrameError::Oversize`]. The buffer never grows past
//!   [`MAX_FRAME_SIZE`].
//! - No input panics: every length is checked and every decode step returns an error.

use core::fmt;

use postcard::experimental::max_size::MaxSize;
use serde::{Deserialize, Serialize};

use crate::reading::ChannelReading;

/// Version of the frame format. Bump it for any change of a field (postcard is positional).
pub const FRAME_VERSION: u8 = 1;

/// The most channel readings one frame carries.
pub const MAX_CHANNELS: usize = 8;

/// Bytes of the CRC-32 trailer inside the COBS block.
const CRC_LEN: usize = 4;

/// The largest postcard body plus its CRC: what COBS encodes.
const MAX_BODY_SIZE: usize = Frame::POSTCARD_MAX_SIZE + CRC_LEN;

/// Worst-case size of one encoded frame on the wire, the 0x00 delimiter included.
///
/// `cobs::max_encoding_length(81 + 4) + 1 = 87`. Buffers sized by it always suffice for
/// [`encode`], and [`Decoder`] treats anything longer as [`FrameError::Oversize`].
pub const MAX_FRAME_SIZE: usize = cobs::max_encoding_length(MAX_BODY_SIZE) + 1;

/// The longest COBS block (without its delimiter) that can be a frame.
const MAX_COBS_LEN: usize = MAX_FRAME_SIZE - 1;

/// CRC-32C (Castagnoli): better error detection than CRC-32/ISO-HDLC on short messages, and
/// hardware-accelerated on many MCUs and hosts. A `static`, so the 1 KiB table exists once.
static CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// One sampling round of one device.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Frame {
    /// Frame format version; [`FRAME_VERSION`] for frames this crate writes.
    pub version: u8,
    /// The device that sent the frame.
    pub device_id: u32,
    /// Frame sequence number; wraps at `u32::MAX`. Gaps mean lost frames.
    pub seq: u32,
    /// Device uptime in milliseconds when the frame was sampled. Devices have no clock: the
    /// receiver maps ticks to its own time. Wraps after about 49.7 days.
    pub device_tick_ms: u32,
    /// The readings of this round, at most [`MAX_CHANNELS`].
    pub readings: heapless::Vec<ChannelReading, MAX_CHANNELS>,
}

/// Computed by hand: postcard's impl for `heapless::Vec` 0.9 is behind a feature we do not
/// enable (see the module docs). Same formula as postcard's: length varint plus `N` elements.
impl MaxSize for Frame {
    const POSTCARD_MAX_SIZE: usize = u8::POSTCARD_MAX_SIZE
        + 3 * u32::POSTCARD_MAX_SIZE
        + varint_len(MAX_CHANNELS)
        + MAX_CHANNELS * ChannelReading::POSTCARD_MAX_SIZE;
}

/// Bytes of the postcard varint of `n` (7 bits per byte).
const fn varint_len(mut n: usize) -> usize {
    let mut len = 1;
    while n >= 0x80 {
        n >>= 7;
        len += 1;
    }
    len
}

impl Frame {
    /// A frame of the current version with no readings yet.
    pub fn new(device_id: u32, seq: u32, device_tick_ms: u32) -> Frame {
        Frame {
            version: FRAME_VERSION,
            device_id,
            seq,
            device_tick_ms,
            readings: heapless::Vec::new(),
        }
    }
}

/// Why a frame could not be encoded.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum EncodeError {
    /// The output buffer is too small; a buffer of [`MAX_FRAME_SIZE`] always suffices.
    BufferTooSmall {
        /// Bytes the encoded frame needs, delimiter included.
        needed: usize,
        /// Bytes the buffer had.
        available: usize,
    },
    /// postcard refused the frame (not expected: the scratch buffer is sized by `MaxSize`).
    Serialize(postcard::Error),
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncodeError::BufferTooSmall { needed, available } => {
                write!(f, "frame needs {needed} bytes, buffer has {available}")
            }
            EncodeError::Serialize(e) => write!(f, "frame could not be serialized: {e}"),
        }
    }
}

impl core::error::Error for EncodeError {}

/// Why received bytes are not a frame. Every variant means "count it and go on".
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum FrameError {
    /// More than `MAX_FRAME_SIZE - 1` bytes came without a 0x00; they were dropped.
    Oversize,
    /// The bytes are not valid COBS (a code byte points past the end, or a stray 0x00).
    Cobs,
    /// The CRC-32C does not match: the frame was corrupted on the line.
    Crc {
        /// The CRC carried in the frame's trailer.
        expected: u32,
        /// The CRC computed over the received body.
        actual: u32,
    },
    /// The CRC matched but postcard could not decode a [`Frame`] (e.g. more than
    /// [`MAX_CHANNELS`] readings, an unknown enum variant from a newer device).
    Decode(postcard::Error),
    /// The CRC matched but the version byte is not [`FRAME_VERSION`].
    UnsupportedVersion(u8),
    /// The block decodes to no body at all: four bytes or fewer, not even a CRC and a byte.
    Empty,
    /// The CRC matched and a frame decoded, but this many bytes followed it (an encoder bug).
    TrailingBytes(usize),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Oversize => {
                write!(f, "frame longer than {MAX_FRAME_SIZE} bytes, dropped to the next delimiter")
            }
            FrameError::Cobs => write!(f, "invalid COBS encoding"),
            FrameError::Crc { expected, actual } => {
                write!(f, "CRC mismatch: frame says {expected:#010x}, body has {actual:#010x}")
            }
            FrameError::Decode(e) => write!(f, "frame body does not decode: {e}"),
            FrameError::UnsupportedVersion(v) => {
                write!(f, "unsupported frame version {v} (expected {FRAME_VERSION})")
            }
            FrameError::Empty => write!(f, "frame too short to hold a body and its CRC"),
            FrameError::TrailingBytes(n) => write!(f, "{n} unexpected bytes after the frame body"),
        }
    }
}

impl core::error::Error for FrameError {}

/// Encodes `frame` into `out` (see the module docs for the layout) and returns the number of
/// bytes written, the 0x00 delimiter included. `out` of [`MAX_FRAME_SIZE`] bytes always fits.
///
/// The frame's `version` is written as it is, so tests can produce other versions.
pub fn encode(frame: &Frame, out: &mut [u8]) -> Result<usize, EncodeError> {
    let mut body = [0u8; MAX_BODY_SIZE];
    let n = postcard::to_slice(frame, &mut body[..Frame::POSTCARD_MAX_SIZE])
        .map_err(EncodeError::Serialize)?
        .len();
    let crc = CRC.checksum(&body[..n]);
    body[n..n + CRC_LEN].copy_from_slice(&crc.to_le_bytes());
    let raw = &body[..n + CRC_LEN];
    // Exact for frames: COBS adds one byte per started 254 bytes, and a body is below 254.
    let needed = cobs::max_encoding_length(raw.len()) + 1;
    let too_small = EncodeError::BufferTooSmall { needed, available: out.len() };
    let written = cobs::try_encode(raw, out).map_err(|_| too_small.clone())?;
    match out.get_mut(written) {
        Some(delimiter) => *delimiter = 0,
        None => return Err(too_small),
    }
    Ok(written + 1)
}

/// Decodes one COBS block, given *without* its 0x00 delimiter, into a frame.
///
/// Checks in order: length ([`FrameError::Empty`], [`FrameError::Oversize`]), COBS, CRC,
/// version, postcard, trailing bytes. Never panics.
pub fn decode_frame(block: &[u8]) -> Result<Frame, FrameError> {
    if block.is_empty() {
        return Err(FrameError::Empty);
    }
    if block.len() > MAX_COBS_LEN {
        return Err(FrameError::Oversize);
    }
    let mut scratch = [0u8; MAX_COBS_LEN];
    let scratch = &mut scratch[..block.len()];
    scratch.copy_from_slice(block);
    let n = cobs::decode_in_place(scratch).map_err(|_| FrameError::Cobs)?;
    let decoded = scratch.get(..n).ok_or(FrameError::Cobs)?;
    if decoded.len() <= CRC_LEN {
        return Err(FrameError::Empty);
    }
    let (body, trailer) = decoded.split_at(decoded.len() - CRC_LEN);
    let expected = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
    let actual = CRC.checksum(body);
    if expected != actual {
        return Err(FrameError::Crc { expected, actual });
    }
    if body[0] != FRAME_VERSION {
        return Err(FrameError::UnsupportedVersion(body[0]));
    }
    let (frame, rest) = postcard::take_from_bytes::<Frame>(body).map_err(FrameError::Decode)?;
    if !rest.is_empty() {
        return Err(FrameError::TrailingBytes(rest.len()));
    }
    Ok(frame)
}

/// A streaming frame decoder for a byte stream that may carry garbage (see the module docs).
///
/// Holds at most `MAX_FRAME_SIZE - 1` bytes; no allocation.
#[derive(Debug, Clone, Default)]
pub struct Decoder {
    /// The COBS block gathered since the last 0x00.
    buf: heapless::Vec<u8, MAX_COBS_LEN>,
    /// The current block outgrew `buf`: drop bytes up to the next 0x00.
    dropping: bool,
}

impl Decoder {
    /// A decoder waiting for the start of a frame.
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Forgets a partial frame (e.g. after the serial device was reopened).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.dropping = false;
    }

    /// Takes one byte. Returns `None` while a frame is incomplete (and for idle 0x00 fill),
    /// and the outcome of the block at each 0x00 that ends one.
    pub fn feed(&mut self, byte: u8) -> Option<Result<Frame, FrameError>> {
        if byte == 0 {
            if self.dropping {
                self.reset();
                return Some(Err(FrameError::Oversize));
            }
            if self.buf.is_empty() {
                return None;
            }
            let outcome = decode_frame(&self.buf);
            self.buf.clear();
            return Some(outcome);
        }
        if !self.dropping && self.buf.push(byte).is_err() {
            self.buf.clear();
            self.dropping = true;
        }
        None
    }

    /// Takes a slice of bytes and yields the outcome of every frame it completes, in order.
    ///
    /// Lazy: bytes are consumed as the iterator is advanced, so drain it before the next call.
    pub fn push<'a>(
        &'a mut self,
        bytes: &'a [u8],
    ) -> impl Iterator<Item = Result<Frame, FrameError>> + 'a {
        bytes.iter().filter_map(move |&b| self.feed(b))
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use std::vec;
    use std::vec::Vec;

    use super::*;
    use crate::reading::{FaultCode, Quality, Unit};

    const UNITS: [Unit; 9] = [
        Unit::Celsius,
        Unit::PercentRh,
        Unit::Hectopascal,
        Unit::MillimetrePerSecond,
        Unit::G,
        Unit::Milliampere,
        Unit::Volt,
        Unit::Watt,
        Unit::Unitless,
    ];
    const FAULTS: [FaultCode; 4] =
        [FaultCode::Bus, FaultCode::WrongDevice, FaultCode::InvalidData, FaultCode::Timeout];

    /// Knuth's MMIX LCG: deterministic, dependency-free randomness for property loops.
    struct Lcg(u64);

    impl Lcg {
        fn next_u32(&mut self) -> u32 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (self.0 >> 32) as u32
        }
        fn below(&mut self, n: u32) -> u32 {
            self.next_u32() % n
        }
        fn frame(&mut self) -> Frame {
            let mut frame = Frame::new(self.next_u32(), self.next_u32(), self.next_u32());
            // Small values too, so short varints are exercised.
            if self.below(2) == 0 {
                frame.device_id = self.below(200);
                frame.seq = self.below(20_000);
            }
            for _ in 0..self.below(MAX_CHANNELS as u32 + 1) {
                let quality = match self.below(3) {
                    0 => Quality::Good,
                    1 => Quality::Uncertain,
                    _ => Quality::Fault(FAULTS[self.below(4) as usize]),
                };
                frame
                    .readings
                    .push(ChannelReading {
                        channel: self.below(256) as u8,
                        unit: UNITS[self.below(9) as usize],
                        value: f32::from_bits(self.next_u32()),
                        quality,
                    })
                    .unwrap();
            }
            frame
        }
        fn garbage(&mut self, max_len: u32) -> Vec<u8> {
            (0..self.below(max_len + 1)).map(|_| self.next_u32() as u8).collect()
        }
    }

    /// Frames compare by the bits of their values: random values and fault readings are NaN.
    fn assert_same(a: &Frame, b: &Frame) {
        let bits = |f: &Frame| {
            f.readings
                .iter()
                .map(|r| (r.channel, r.unit, r.value.to_bits(), r.quality))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            (a.version, a.device_id, a.seq, a.device_tick_ms),
            (b.version, b.device_id, b.seq, b.device_tick_ms)
        );
        assert_eq!(bits(a), bits(b));
    }

    fn encoded(frame: &Frame) -> Vec<u8> {
        let mut out = [0u8; MAX_FRAME_SIZE];
        let n = encode(frame, &mut out).unwrap();
        out[..n].to_vec()
    }

    /// A wire frame around an arbitrary body, to test what the decoder does after the CRC.
    fn seal(body: &[u8]) -> Vec<u8> {
        let mut raw = body.to_vec();
        raw.extend_from_slice(&CRC.checksum(body).to_le_bytes());
        let mut out = vec![0u8; cobs::max_encoding_length(raw.len()) + 1];
        let n = cobs::encode(&raw, &mut out);
        out.truncate(n);
        out.push(0);
        out
    }

    fn decode_all(decoder: &mut Decoder, bytes: &[u8]) -> Vec<Result<Frame, FrameError>> {
        decoder.push(bytes).collect()
    }

    fn golden_frame() -> Frame {
        let mut frame = Frame::new(42, 300, 1_000_000);
        frame.readings.push(ChannelReading::good(0, Unit::Celsius, 21.5)).unwrap();
        frame.readings.push(ChannelReading::fault(1, Unit::PercentRh, FaultCode::Timeout)).unwrap();
        frame
            .readings
            .push(ChannelReading {
                channel: 2,
                unit: Unit::Hectopascal,
                value: 1013.25,
                quality: Quality::Uncertain,
            })
            .unwrap();
        frame
    }

    /// Written by hand from the postcard spec; CRC-32C and COBS computed independently.
    const GOLDEN_BODY: [u8; 30] = [
        0x01, // version
        0x2A, // device_id 42
        0xAC, 0x02, // seq 300
        0xC0, 0x84, 0x3D, // device_tick_ms 1_000_000
        0x03, // 3 readings
        0x00, 0x00, 0x00, 0x00, 0xAC, 0x41, 0x00, // ch 0, Celsius, 21.5, Good
        0x01, 0x01, 0x00, 0x00, 0xC0, 0x7F, 0x02, 0x03, // ch 1, %RH, NaN, Fault(Timeout)
        0x02, 0x02, 0x00, 0x50, 0x7D, 0x44, 0x01, // ch 2, hPa, 1013.25, Uncertain
    ];
    const GOLDEN_WIRE: [u8; 36] = [
        0x09, 0x01, 0x2A, 0xAC, 0x02, 0xC0, 0x84, 0x3D, 0x03, 0x01, 0x01, 0x01, 0x03, 0xAC, 0x41,
        0x03, 0x01, 0x01, 0x01, 0x07, 0xC0, 0x7F, 0x02, 0x03, 0x02, 0x02, 0x09, 0x50, 0x7D, 0x44,
        0x01, 0x08, 0x46, 0xAC, 0x37, 0x00,
    ];

    fn maximal_frame() -> Frame {
        let mut frame = Frame::new(u32::MAX, u32::MAX, u32::MAX);
        for ch in 0..MAX_CHANNELS as u8 {
            frame
                .readings
                .push(ChannelReading::fault(ch, Unit::Unitless, FaultCode::Timeout))
                .unwrap();
        }
        frame
    }

    #[test]
    fn max_sizes_match_the_hand_computed_bounds() {
        assert_eq!(ChannelReading::POSTCARD_MAX_SIZE, 8);
        assert_eq!(Frame::POSTCARD_MAX_SIZE, 1 + 3 * 5 + 1 + 8 * 8);
        assert_eq!(MAX_FRAME_SIZE, 81 + 4 + 1 + 1);
        assert_eq!(varint_len(0), 1);
        assert_eq!(varint_len(127), 1);
        assert_eq!(varint_len(128), 2);
    }

    #[test]
    fn a_maximal_frame_takes_exactly_max_frame_size() {
        let frame = maximal_frame();
        let mut body = [0u8; 128];
        let body_len = postcard::to_slice(&frame, &mut body).unwrap().len();
        assert_eq!(body_len, Frame::POSTCARD_MAX_SIZE, "the bound is reached, so it is tight");
        let wire = encoded(&frame);
        assert_eq!(wire.len(), MAX_FRAME_SIZE);
        assert_same(&decode_frame(&wire[..wire.len() - 1]).unwrap(), &frame);
    }

    #[test]
    fn random_frames_never_exceed_max_frame_size() {
        let mut rng = Lcg(7);
        for _ in 0..2_000 {
            assert!(encoded(&rng.frame()).len() <= MAX_FRAME_SIZE);
        }
    }

    #[test]
    fn the_crc_is_crc32c_castagnoli() {
        fn bitwise_crc32c(data: &[u8]) -> u32 {
            let mut crc = !0u32;
            for &b in data {
                crc ^= u32::from(b);
                for _ in 0..8 {
                    crc = if crc & 1 == 1 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
                }
            }
            !crc
        }
        assert_eq!(CRC.checksum(b"123456789"), 0xE306_9283);
        assert_eq!(CRC.checksum(&GOLDEN_BODY), bitwise_crc32c(&GOLDEN_BODY));
    }

    #[test]
    fn the_golden_frame_has_the_pinned_wire_bytes() {
        let frame = golden_frame();
        let mut body = [0u8; 64];
        assert_eq!(postcard::to_slice(&frame, &mut body).unwrap(), &GOLDEN_BODY[..]);
        assert_eq!(encoded(&frame), GOLDEN_WIRE);
        let decoded = decode_frame(&GOLDEN_WIRE[..GOLDEN_WIRE.len() - 1]).unwrap();
        assert_same(&decoded, &frame);
    }

    #[test]
    fn every_reading_variant_has_pinned_bytes() {
        // channel 7, value 1.0 (0x3F800000): the unit and quality bytes are what is pinned.
        let reading = |unit, quality| ChannelReading { channel: 7, unit, value: 1.0, quality };
        let one = [0x00, 0x00, 0x80, 0x3F];
        for (index, unit) in UNITS.into_iter().enumerate() {
            let mut buf = [0u8; 16];
            let bytes = postcard::to_slice(&reading(unit, Quality::Good), &mut buf).unwrap();
            let mut want = vec![0x07, index as u8];
            want.extend_from_slice(&one);
            want.push(0x00);
            assert_eq!(bytes, &want[..], "{unit:?}");
        }
        let qualities: [(Quality, &[u8]); 6] = [
            (Quality::Good, &[0x00]),
            (Quality::Uncertain, &[0x01]),
            (Quality::Fault(FaultCode::Bus), &[0x02, 0x00]),
            (Quality::Fault(FaultCode::WrongDevice), &[0x02, 0x01]),
            (Quality::Fault(FaultCode::InvalidData), &[0x02, 0x02]),
            (Quality::Fault(FaultCode::Timeout), &[0x02, 0x03]),
        ];
        for (quality, tail) in qualities {
            let mut buf = [0u8; 16];
            let bytes = postcard::to_slice(&reading(Unit::Volt, quality), &mut buf).unwrap();
            let mut want = vec![0x07, 0x06];
            want.extend_from_slice(&one);
            want.extend_from_slice(tail);
            assert_eq!(bytes, &want[..], "{quality:?}");
        }
    }

    #[test]
    fn random_frames_round_trip_through_the_stream_decoder() {
        let mut rng = Lcg(1);
        let mut decoder = Decoder::new();
        for _ in 0..2_000 {
            let frame = rng.frame();
            let out = decode_all(&mut decoder, &encoded(&frame));
            assert_eq!(out.len(), 1);
            assert_same(out[0].as_ref().unwrap(), &frame);
        }
    }

    #[test]
    fn frames_survive_garbage_that_ends_in_a_delimiter() {
        let mut rng = Lcg(2);
        let mut stream = Vec::new();
        let mut frames = Vec::new();
        for _ in 0..500 {
            let mut garbage = rng.garbage(60);
            if !garbage.is_empty() {
                garbage.push(0);
            }
            stream.extend_from_slice(&garbage);
            let frame = rng.frame();
            stream.extend_from_slice(&encoded(&frame));
            frames.push(frame);
        }
        let mut decoder = Decoder::new();
        let good: Vec<Frame> =
            decode_all(&mut decoder, &stream).into_iter().filter_map(Result::ok).collect();
        assert_eq!(good.len(), frames.len());
        for (got, want) in good.iter().zip(&frames) {
            assert_same(got, want);
        }
    }

    #[test]
    fn garbage_without_a_delimiter_costs_only_the_next_frame() {
        let frame = golden_frame();
        let mut stream = vec![0x13, 0x37, 0xFF];
        stream.extend_from_slice(&GOLDEN_WIRE);
        stream.extend_from_slice(&GOLDEN_WIRE);
        let out = decode_all(&mut Decoder::new(), &stream);
        assert_eq!(out.len(), 2);
        assert!(out[0].is_err());
        assert_same(out[1].as_ref().unwrap(), &frame);
    }

    #[test]
    fn a_corrupted_data_byte_is_a_crc_error_with_both_values() {
        let mut wire = GOLDEN_WIRE;
        wire[13] ^= 0x01; // 0xAC of 21.5: a data byte, not a COBS code byte
        let out = decode_all(&mut Decoder::new(), &wire);
        let expected = CRC.checksum(&GOLDEN_BODY);
        match &out[..] {
            [Err(FrameError::Crc { expected: e, actual })] => {
                assert_eq!(*e, expected);
                assert_ne!(*actual, expected);
            }
            other => panic!("expected one CRC error, got {other:?}"),
        }
    }

    #[test]
    fn any_corrupted_byte_is_rejected_and_the_next_frame_decodes() {
        let frame = golden_frame();
        let mut decoder = Decoder::new();
        for i in 0..GOLDEN_WIRE.len() - 1 {
            for flip in [0x01u8, 0x80, 0xFF] {
                let mut wire = GOLDEN_WIRE;
                wire[i] ^= flip;
                let mut stream = wire.to_vec();
                // A byte flipped to 0x00 splits the block; the leading 0x00 below then
                // re-aligns, as a sender's leading delimiter would.
                stream.push(0);
                stream.extend_from_slice(&GOLDEN_WIRE);
                let out = decode_all(&mut decoder, &stream);
                let (last, before) = out.split_last().unwrap();
                assert!(before.iter().all(Result::is_err), "byte {i} ^ {flip:#x}: {before:?}");
                assert!(!before.is_empty(), "byte {i} ^ {flip:#x} went unnoticed");
                assert_same(last.as_ref().unwrap(), &frame);
            }
        }
    }

    #[test]
    fn a_truncated_frame_is_an_error_then_decoding_resyncs() {
        let frame = golden_frame();
        let mut stream = GOLDEN_WIRE[..20].to_vec();
        stream.push(0);
        stream.extend_from_slice(&GOLDEN_WIRE);
        let out = decode_all(&mut Decoder::new(), &stream);
        assert_eq!(out.len(), 2);
        assert!(out[0].is_err());
        assert_same(out[1].as_ref().unwrap(), &frame);
        assert_eq!(decode_frame(&GOLDEN_WIRE[..3]), Err(FrameError::Cobs));
    }

    #[test]
    fn an_oversize_block_is_dropped_to_the_next_delimiter() {
        let frame = golden_frame();
        let mut stream = vec![0x55; 500];
        stream.push(0);
        stream.extend_from_slice(&GOLDEN_WIRE);
        let out = decode_all(&mut Decoder::new(), &stream);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0], Err(FrameError::Oversize));
        assert_same(out[1].as_ref().unwrap(), &frame);
        assert_eq!(decode_frame(&[0x55; MAX_FRAME_SIZE]), Err(FrameError::Oversize));
    }

    #[test]
    fn a_block_of_exactly_the_limit_is_not_oversize() {
        let mut decoder = Decoder::new();
        let mut stream = vec![0x55; MAX_FRAME_SIZE - 1];
        stream.push(0);
        assert_ne!(decode_all(&mut decoder, &stream), [Err(FrameError::Oversize)]);
        let mut stream = vec![0x55; MAX_FRAME_SIZE];
        stream.push(0);
        assert_eq!(decode_all(&mut decoder, &stream), [Err(FrameError::Oversize)]);
    }

    #[test]
    fn idle_delimiters_yield_nothing() {
        let mut stream = vec![0, 0, 0];
        stream.extend_from_slice(&GOLDEN_WIRE);
        stream.extend_from_slice(&[0, 0]);
        let out = decode_all(&mut Decoder::new(), &stream);
        assert_eq!(out.len(), 1);
        assert!(out[0].is_ok());
    }

    #[test]
    fn too_short_blocks_are_empty() {
        assert_eq!(decode_frame(&[]), Err(FrameError::Empty));
        assert_eq!(decode_frame(&[0x01]), Err(FrameError::Empty));
        assert_eq!(decode_frame(&[0x05, 1, 2, 3, 4]), Err(FrameError::Empty));
    }

    #[test]
    fn another_version_is_rejected_after_its_crc_checks() {
        let mut frame = golden_frame();
        frame.version = 2;
        let wire = encoded(&frame);
        assert_eq!(decode_frame(&wire[..wire.len() - 1]), Err(FrameError::UnsupportedVersion(2)));
    }

    #[test]
    fn more_readings_than_max_channels_are_a_decode_error() {
        let mut body = vec![FRAME_VERSION, 1, 2, 3, MAX_CHANNELS as u8 + 1];
        for ch in 0..=MAX_CHANNELS as u8 {
            body.extend_from_slice(&[ch, 0x00, 0x00, 0x00, 0x80, 0x3F, 0x00]);
        }
        let wire = seal(&body);
        assert!(matches!(decode_frame(&wire[..wire.len() - 1]), Err(FrameError::Decode(_))));
    }

    #[test]
    fn an_unknown_unit_is_a_decode_error() {
        let body = [FRAME_VERSION, 1, 2, 3, 1, 0, 9, 0, 0, 0x80, 0x3F, 0];
        let wire = seal(&body);
        assert!(matches!(decode_frame(&wire[..wire.len() - 1]), Err(FrameError::Decode(_))));
    }

    #[test]
    fn bytes_after_the_body_are_rejected() {
        let mut body = GOLDEN_BODY.to_vec();
        body.extend_from_slice(&[0xAA, 0xBB]);
        let wire = seal(&body);
        assert_eq!(decode_frame(&wire[..wire.len() - 1]), Err(FrameError::TrailingBytes(2)));
    }

    #[test]
    fn random_garbage_never_panics_and_decodes_nothing() {
        let mut rng = Lcg(3);
        let mut decoder = Decoder::new();
        let mut outcomes = 0;
        for _ in 0..200 {
            let garbage = rng.garbage(2_000);
            for outcome in decoder.push(&garbage) {
                outcomes += 1;
                assert!(outcome.is_err(), "garbage decoded as {outcome:?}");
            }
            let _ = decode_frame(&garbage);
            // Dense in valid-looking COBS: no zeros, so every block is a candidate.
            let block: Vec<u8> = garbage.iter().map(|b| b | 1).take(MAX_COBS_LEN).collect();
            let _ = decode_frame(&block);
        }
        assert!(outcomes > 100);
    }

    #[test]
    fn encode_reports_a_small_buffer_with_the_needed_size() {
        let frame = golden_frame();
        for size in 0..GOLDEN_WIRE.len() {
            let mut out = vec![0u8; size];
            assert_eq!(
                encode(&frame, &mut out),
                Err(EncodeError::BufferTooSmall { needed: GOLDEN_WIRE.len(), available: size })
            );
        }
        let mut out = [0u8; GOLDEN_WIRE.len()];
        assert_eq!(encode(&frame, &mut out), Ok(GOLDEN_WIRE.len()));
        assert_eq!(out, GOLDEN_WIRE);
    }

    #[test]
    fn errors_read_as_sentences() {
        use std::string::ToString;
        let crc = FrameError::Crc { expected: 1, actual: 0xABCD };
        assert_eq!(crc.to_string(), "CRC mismatch: frame says 0x00000001, body has 0x0000abcd");
        assert_eq!(
            FrameError::UnsupportedVersion(9).to_string(),
            "unsupported frame version 9 (expected 1)"
        );
        assert_eq!(
            FrameError::Oversize.to_string(),
            "frame longer than 87 bytes, dropped to the next delimiter"
        );
        let small = EncodeError::BufferTooSmall { needed: 36, available: 10 };
        assert_eq!(small.to_string(), "frame needs 36 bytes, buffer has 10");
    }
}
