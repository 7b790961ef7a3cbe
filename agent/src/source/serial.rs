//! The serial source: a device on a UART or USB serial port that sends our firmware's frames
//! ([`sensors::frame`]) or plain JSON / CSV lines.
//!
//! ```text
//! device ──bytes──▶ SerialStream ──chunk──▶ Framer (pure) ──Outcome──┬─ Reading   ──Ingest──▶ journal
//!   ▲                  │                    SeqTracker +             ├─ Reject    ──metrics.reject + rate-limited log
//!   │ replug           │ EOF / EIO /        TickClock per device     ├─ Lost      ──metrics.lost_frames + rate-limited log
//!   └──── Backoff ◀────┘ open error                                  └─ Restarted ──metrics.device_restarted + rate-limited log
//! ```
//!
//! # Lifecycle
//!
//! `run` loops: open the device ([`open`]: baud, parity, data and stop bits from the config)
//! → read chunks until EOF or an I/O error → sleep a [`Backoff`] delay → open again, until
//! `cancel`. A USB unplug shows up as EIO (or EOF) on the open port and then as open errors
//! (the node is gone) until the device is back, so the agent survives unplug/replug without a
//! restart. Configure a stable path such as `/dev/serial/by-id/...`: it follows the device to
//! whatever `ttyUSBn` it gets. Transitions (opened, gone, cannot open) are logged once per
//! state change, not per retry. The backoff is reset by every successful open.
//!
//! # Framings
//!
//! - `frames`: bytes go through [`sensors::frame::Decoder`], which resynchronises at every
//!   0x00. Each good frame gives one event per `Good`/`Uncertain` reading; a `Fault` reading
//!   is counted as `sensor_fault` (with its series in the log) and gives no event. Frame
//!   errors are counted by cause (`frame_crc`, `frame_cobs`, `frame_oversize`, ...). The
//!   decoder is reset on every reopen, so a partial frame from before an unplug cannot glue
//!   itself to the first frame after it. At most [`MAX_DEVICES`] device ids are tracked per
//!   port; frames of further devices are rejected as `device_limit`.
//! - `json_lines` / `csv_lines`: lines up to [`MAX_LINE`] bytes; a longer line is one
//!   `line_too_long` reject and is skipped up to its newline. Empty lines are ignored.
//!
//! # Time
//!
//! Devices have no wall clock: a frame carries the device's uptime tick (`u32` ms, wraps after
//! ~49.7 days). A [`TickClock`] per device maps it to event time, so that readings the
//! device buffered and sent in a burst (after a USB hiccup, say) keep their real spacing
//! instead of all getting the time their chunk was read:
//!
//! ```text
//! extended  = previous extended + (tick − previous tick)   wrapping u32 difference
//! candidate = receive_ms − extended                        this frame's latency, plus a constant
//! offset    = min(candidate, offset + 1 ms per second of tick)
//! ts_ms     = extended + offset                            ≤ receive_ms, always
//! ```
//!
//! - The offset is a minimum filter: the frame with the least latency is the best anchor, and
//!   a delayed frame (or a delayed burst) cannot pull it up.
//! - It may rise by at most [`MAX_OFFSET_RISE_PPM`] of elapsed tick (1 ms per s). That follows
//!   a device crystal running slow (±50 ppm is 0.18 s an hour) and lets the anchor recover
//!   from a latency dip, but a burst delayed by `d` moves it by only `d / 1000`.
//! - A crystal running fast, or the gateway clock stepping back, lowers the candidate: the
//!   minimum follows at once, so a mapped time is never later than its receive time.
//! - Re-anchor (`offset = candidate`, `ts_ms = receive_ms`) on the first frame of a device,
//!   when its tick went backwards (a restart), and when the mapped time falls more than
//!   [`MAX_CLOCK_LAG_MS`] behind the receive time: the gateway clock stepped forward (NTP
//!   after boot on a Pi without RTC), the device stalled, or a restart that looked like a
//!   forward jump. A burst delayed by more than that bound therefore gets receive times.
//!
//! The error of the mapping is the least latency seen (a few ms at 115200 baud) plus the
//! device's sampling-to-send delay. Lines may carry their own timestamp (`ts`), else they get
//! the receive time.
//!
//! # Sequence tracking
//!
//! Per device id ([`SeqTracker`]): `seq == last + 1` (wrapping) is in order; a tick that went
//! backwards means the device restarted (counted in `device_restarts`, no loss counted: what
//! it did not send is unknown); a forward gap of `n` counts `n` `lost_frames`; a gap above
//! [`MAX_COUNTED_GAP`] is a `seq_jump` reject (counted once, tracking restarts from it); a
//! sequence that went backwards while the tick went forward is a `stale_frame` reject and is
//! dropped. Lost frames and restarts are device counters ([`Metrics::lost_frames`],
//! [`Metrics::device_restarted`]), not rejected input: nothing bad arrived.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use sensors::frame::{Decoder, Frame, FrameError};
use sensors::reading::Quality;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_serial::{SerialPortBuilderExt, SerialStream};
use tokio_util::sync::CancellationToken;

use super::backoff::Backoff;
use super::{RejectLog, SourceError, send_or_cancel};
use crate::config::{
    SerialDataBits, SerialFraming, SerialParity, SerialSourceConfig, SerialStopBits, TimestampUnit,
};
use crate::event::{Event, Ingest, now_ms};
use crate::metrics::Metrics;
use crate::recording::parse_timestamp;

/// The longest line (without its newline) of the line framings. Our JSON lines are under
/// 200 bytes; 4 KiB leaves room for long series names while bounding what a device spewing
/// bytes without newlines can make us buffer.
pub const MAX_LINE: usize = 4096;

/// The largest sequence gap counted as lost frames. A larger jump is not a plausible loss (at
/// 10 frames/s it would be more than a quarter hour of frames lost while still connected) but
/// a device bug or firmware change; counting it frame by frame would swamp the metric.
pub const MAX_COUNTED_GAP: u32 = 10_000;

/// Bytes read from the port at once: a few frames; the pty/USB driver buffers the rest.
const READ_CHUNK: usize = 1024;

/// Device ids tracked per port (sequence and clock state, a few dozen bytes each). An RS-485
/// segment holds at most 32 unit loads (247 Modbus addresses with 1/8-load transceivers), so
/// 256 is more than one port can carry; frames of a further device are `device_limit` rejects
/// rather than state that grows with whatever ids a faulty device invents.
pub const MAX_DEVICES: usize = 256;

/// How far a mapped device time may fall behind its receive time before the [`TickClock`]
/// re-anchors. Above any latency of a healthy link (ms) and a USB re-enumeration hiccup
/// (hundreds of ms), so bursts after those keep their spacing; well below what the processor's
/// lateness allowance tolerates, so a gateway clock step or a stalled device cannot make a
/// device's events late.
pub const MAX_CLOCK_LAG_MS: i64 = 2_000;

/// The fastest the [`TickClock`] offset may rise, in ppm of elapsed tick: 1000 ppm (1 ms per
/// s). Twenty times the ±50 ppm of a plain crystal, so a slow device is followed with room to
/// spare, yet a burst delayed by 500 ms moves the anchor by only 0.5 ms.
pub const MAX_OFFSET_RISE_PPM: i64 = 1_000;

/// What the pure decoding step produced for one chunk of bytes, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A reading for the journal: series, value and event time (ms).
    Reading {
        /// Series key.
        series: String,
        /// The value.
        value: f64,
        /// Event time, ms since the epoch.
        ts_ms: i64,
    },
    /// Input that gives no event: counted under `cause`.
    Reject {
        /// Metric label.
        cause: &'static str,
        /// What was wrong, for the log.
        reason: String,
    },
    /// `count` frames of a device never arrived.
    Lost {
        /// Device id.
        device: u32,
        /// Frames missing.
        count: u32,
    },
    /// A device restarted (its tick went backwards): counted and logged.
    Restarted {
        /// Device id.
        device: u32,
    },
}

/// One piece of a frame series template.
#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Text(String),
    Device,
    Channel,
    Unit,
}

/// `{device}`, `{channel}`, `{unit}` template for frame readings, parsed once.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesTemplate {
    pieces: Vec<Piece>,
}

impl SeriesTemplate {
    /// Parses `template`; an unknown or unclosed placeholder is an error.
    pub fn parse(template: &str) -> Result<SeriesTemplate, String> {
        let mut pieces = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                pieces.push(Piece::Text(rest[..open].to_string()));
            }
            let after = &rest[open + 1..];
            let close = after.find('}').ok_or_else(|| format!("unclosed `{{` in `{template}`"))?;
            pieces.push(match &after[..close] {
                "device" => Piece::Device,
                "channel" => Piece::Channel,
                "unit" => Piece::Unit,
                other => {
                    return Err(format!(
                        "unknown placeholder `{{{other}}}` in `{template}` (known: {{device}}, \
                         {{channel}}, {{unit}})"
                    ));
                }
            });
            rest = &after[close + 1..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_string()));
        }
        Ok(SeriesTemplate { pieces })
    }

    /// The series of one reading.
    pub fn render(&self, device: u32, channel: u8, unit: sensors::reading::Unit) -> String {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Device => out.push_str(&device.to_string()),
                Piece::Channel => out.push_str(&channel.to_string()),
                // A series segment must not split: `mm/s` becomes `mm_s`.
                Piece::Unit => {
                    out.extend(unit.symbol().chars().map(|c| if c == '/' { '_' } else { c }))
                }
            }
        }
        out
    }
}

/// Sequence state of one device.
#[derive(Debug, Clone, Copy)]
struct DeviceSeq {
    seq: u32,
    tick: u32,
}

/// Tracks frame sequence numbers per device (see the module docs for the rules).
#[derive(Debug, Default)]
pub struct SeqTracker {
    devices: BTreeMap<u32, DeviceSeq>,
}

/// What [`SeqTracker::observe`] decided about one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqVerdict {
    /// First frame of the device, or the expected next one.
    InOrder,
    /// The device restarted.
    Restarted,
    /// This many frames are missing before this one.
    Gap(u32),
    /// An implausible forward jump.
    Jump,
    /// Older than the last frame: a duplicate or reordered frame; drop it.
    Stale,
}

impl SeqTracker {
    /// Whether `device` has been seen.
    pub fn knows(&self, device: u32) -> bool {
        self.devices.contains_key(&device)
    }

    /// How many devices have been seen.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// Whether no device has been seen.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Records a frame's `seq` and `tick` for `device`.
    pub fn observe(&mut self, device: u32, seq: u32, tick: u32) -> SeqVerdict {
        let Some(last) = self.devices.get_mut(&device) else {
            self.devices.insert(device, DeviceSeq { seq, tick });
            return SeqVerdict::InOrder;
        };
        let expected = last.seq.wrapping_add(1);
        // In order first: the tick wraps after ~49.7 days, so an in-order frame may see it
        // go backwards.
        let verdict = if seq == expected {
            SeqVerdict::InOrder
        } else if tick < last.tick {
            SeqVerdict::Restarted
        } else {
            let gap = seq.wrapping_sub(expected);
            if gap >= 1 << 31 {
                return SeqVerdict::Stale;
            } else if gap > MAX_COUNTED_GAP {
                SeqVerdict::Jump
            } else {
                SeqVerdict::Gap(gap)
            }
        };
        *last = DeviceSeq { seq, tick };
        verdict
    }
}

/// Maps one device's uptime ticks to gateway time (the rule is in the module docs, § Time).
/// Pure: the receive time is passed in.
#[derive(Debug, Clone, Default)]
pub struct TickClock {
    anchor: Option<Anchor>,
}

#[derive(Debug, Clone, Copy)]
struct Anchor {
    /// The last tick seen.
    tick: u32,
    /// The tick extended past its wraps, ms since this anchor's first tick plus that tick.
    extended: i64,
    /// Receive time minus extended tick, µs: the slow rise is 1 µs per tick ms, so it needs
    /// µs to add up over frames a few ms apart.
    offset_us: i64,
}

impl TickClock {
    /// The event time (ms since the epoch) of a frame with `tick` received at `received_ms`;
    /// never later than `received_ms`.
    pub fn map(&mut self, tick: u32, received_ms: i64) -> i64 {
        let Some(anchor) = &mut self.anchor else {
            self.anchor = Some(Anchor::new(tick, received_ms));
            return received_ms;
        };
        // Signed wrapping difference: a wrap is a small step forward, a restart a step back.
        let step = i64::from(tick.wrapping_sub(anchor.tick) as i32);
        if step < 0 {
            *anchor = Anchor::new(tick, received_ms);
            return received_ms;
        }
        anchor.tick = tick;
        anchor.extended += step;
        let candidate_us = received_ms.saturating_sub(anchor.extended).saturating_mul(1000);
        let rise_us = step * MAX_OFFSET_RISE_PPM / 1000;
        anchor.offset_us = candidate_us.min(anchor.offset_us.saturating_add(rise_us));
        // The candidate is a whole number of ms, so flooring keeps ts <= received_ms.
        let ts_ms = anchor.extended.saturating_add(anchor.offset_us.div_euclid(1000));
        if received_ms.saturating_sub(ts_ms) > MAX_CLOCK_LAG_MS {
            *anchor = Anchor::new(tick, received_ms);
            return received_ms;
        }
        ts_ms
    }
}

impl Anchor {
    fn new(tick: u32, received_ms: i64) -> Anchor {
        let extended = i64::from(tick);
        Anchor {
            tick,
            extended,
            offset_us: received_ms.saturating_sub(extended).saturating_mul(1000),
        }
    }
}

/// Splits bytes into lines of at most [`MAX_LINE`] bytes.
#[derive(Debug, Default)]
pub struct LineSplitter {
    buf: Vec<u8>,
    /// The current line outgrew the cap: drop bytes up to the next newline.
    dropping: bool,
}

impl LineSplitter {
    /// Forgets a partial line (after a reopen).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.dropping = false;
    }

    /// Takes bytes; calls `line` with every completed line (`Err(())` for an overlong one).
    pub fn push(&mut self, bytes: &[u8], mut line: impl FnMut(Result<&[u8], ()>)) {
        for &b in bytes {
            if b == b'\n' {
                if self.dropping {
                    line(Err(()));
                } else {
                    let text = self.buf.strip_suffix(b"\r").unwrap_or(&self.buf);
                    line(Ok(text));
                }
                self.reset();
            } else if !self.dropping {
                if self.buf.len() >= MAX_LINE {
                    self.buf.clear();
                    self.dropping = true;
                } else {
                    self.buf.push(b);
                }
            }
        }
    }
}

/// Turns byte chunks into [`Outcome`]s. Pure: receive time is passed in.
#[derive(Debug)]
pub struct Framer {
    kind: FramerKind,
}

#[derive(Debug)]
enum FramerKind {
    Frames {
        decoder: Decoder,
        seq: SeqTracker,
        clocks: BTreeMap<u32, TickClock>,
        template: SeriesTemplate,
    },
    Json {
        lines: LineSplitter,
        default_series: String,
    },
    Csv {
        lines: LineSplitter,
        default_series: String,
    },
}

impl Framer {
    /// A framer for `config`; a frame series template it cannot parse is an error.
    pub fn new(config: &SerialSourceConfig) -> Result<Framer, String> {
        let kind = match config.framing {
            SerialFraming::Frames => FramerKind::Frames {
                decoder: Decoder::new(),
                seq: SeqTracker::default(),
                clocks: BTreeMap::new(),
                template: SeriesTemplate::parse(&config.series)?,
            },
            SerialFraming::JsonLines => FramerKind::Json {
                lines: LineSplitter::default(),
                default_series: config.series.clone(),
            },
            SerialFraming::CsvLines => FramerKind::Csv {
                lines: LineSplitter::default(),
                default_series: config.series.clone(),
            },
        };
        Ok(Framer { kind })
    }

    /// Forgets partial input (the device was reopened). Sequence and clock state are kept:
    /// lost frames across an unplug are still lost frames, and the device's tick went on.
    pub fn reset(&mut self) {
        match &mut self.kind {
            FramerKind::Frames { decoder, .. } => decoder.reset(),
            FramerKind::Json { lines, .. } | FramerKind::Csv { lines, .. } => lines.reset(),
        }
    }

    /// Decodes a chunk received at `received_ms`, appending to `out`.
    pub fn push(&mut self, bytes: &[u8], received_ms: i64, out: &mut Vec<Outcome>) {
        match &mut self.kind {
            FramerKind::Frames { decoder, seq, clocks, template } => {
                for result in decoder.push(bytes) {
                    match result {
                        Ok(frame) => {
                            frame_outcomes(&frame, seq, clocks, template, received_ms, out)
                        }
                        Err(e) => out.push(Outcome::Reject {
                            cause: frame_cause(&e),
                            reason: e.to_string(),
                        }),
                    }
                }
            }
            FramerKind::Json { lines, default_series } => lines.push(bytes, |line| {
                out.extend(line_outcome(line, |l| parse_json_line(l, default_series, received_ms)));
            }),
            FramerKind::Csv { lines, default_series } => lines.push(bytes, |line| {
                out.extend(line_outcome(line, |l| parse_csv_line(l, default_series, received_ms)));
            }),
        }
    }
}

/// The outcome of one line: `None` for an empty line.
fn line_outcome(
    line: Result<&[u8], ()>,
    parse: impl FnOnce(&str) -> Result<Outcome, (&'static str, String)>,
) -> Option<Outcome> {
    let result = match line {
        Err(()) => Err(("line_too_long", format!("line longer than {MAX_LINE} bytes"))),
        Ok(bytes) => match std::str::from_utf8(bytes) {
            Err(e) => Err(("invalid_utf8", e.to_string())),
            Ok(text) if text.trim().is_empty() => return None,
            Ok(text) => parse(text.trim()),
        },
    };
    Some(result.unwrap_or_else(|(cause, reason)| Outcome::Reject { cause, reason }))
}

/// `{"series": "...", "value": 1.5, "ts": ms | s | "RFC 3339"}`; `series` and `ts` optional.
/// The same reader as recordings ([`crate::recording::parse_json_line`]), so a line captured
/// from a device replays as it was read.
fn parse_json_line(
    line: &str,
    default_series: &str,
    received_ms: i64,
) -> Result<Outcome, (&'static str, String)> {
    let (ts_ms, series, value) =
        crate::recording::parse_json_line(line, Some(default_series), Some(received_ms))
            .map_err(|e| (e.cause, e.reason))?;
    reading(series, value, ts_ms)
}

/// `value`, `series,value` or `timestamp,series,value` (no quoting: series names have no commas).
fn parse_csv_line(
    line: &str,
    default_series: &str,
    received_ms: i64,
) -> Result<Outcome, (&'static str, String)> {
    let fields: Vec<&str> = line.split(',').map(str::trim).collect();
    let (ts_ms, series, value) = match fields.as_slice() {
        [value] => (received_ms, default_series, *value),
        [series, value] => (received_ms, *series, *value),
        [ts, series, value] => (timestamp(ts)?, *series, *value),
        _ => return Err(("csv_fields", format!("{} fields, expected 1 to 3", fields.len()))),
    };
    if series.is_empty() {
        return Err(("invalid_series", "empty series".into()));
    }
    let value: f64 =
        value.parse().map_err(|_| ("invalid_value", format!("value `{value}` is not a number")))?;
    reading(series.to_string(), value, ts_ms)
}

fn timestamp(text: &str) -> Result<i64, (&'static str, String)> {
    parse_timestamp(text, TimestampUnit::Auto).map_err(|e| ("invalid_timestamp", e))
}

fn reading(series: String, value: f64, ts_ms: i64) -> Result<Outcome, (&'static str, String)> {
    if !value.is_finite() {
        return Err(("non_finite", format!("value of `{series}` is not finite")));
    }
    Ok(Outcome::Reading { series, value, ts_ms })
}

/// The outcomes of one decoded frame: sequence verdict first, then its readings.
fn frame_outcomes(
    frame: &Frame,
    seq: &mut SeqTracker,
    clocks: &mut BTreeMap<u32, TickClock>,
    template: &SeriesTemplate,
    received_ms: i64,
    out: &mut Vec<Outcome>,
) {
    let device = frame.device_id;
    if !seq.knows(device) && seq.len() >= MAX_DEVICES {
        out.push(Outcome::Reject {
            cause: "device_limit",
            reason: format!("device {device}: already tracking {MAX_DEVICES} devices"),
        });
        return;
    }
    match seq.observe(device, frame.seq, frame.device_tick_ms) {
        SeqVerdict::InOrder => {}
        SeqVerdict::Restarted => out.push(Outcome::Restarted { device }),
        SeqVerdict::Gap(count) => out.push(Outcome::Lost { device, count }),
        SeqVerdict::Jump => out.push(Outcome::Reject {
            cause: "seq_jump",
            reason: format!("device {device} jumped to seq {}", frame.seq),
        }),
        SeqVerdict::Stale => {
            out.push(Outcome::Reject {
                cause: "stale_frame",
                reason: format!("device {device} sent old seq {}", frame.seq),
            });
            return;
        }
    }
    let ts_ms = clocks.entry(device).or_default().map(frame.device_tick_ms, received_ms);
    for r in &frame.readings {
        let series = template.render(device, r.channel, r.unit);
        match r.quality {
            Quality::Good | Quality::Uncertain => {
                let value = f64::from(r.value);
                out.push(
                    reading(series, value, ts_ms)
                        .unwrap_or_else(|(cause, reason)| Outcome::Reject { cause, reason }),
                );
            }
            Quality::Fault(code) => out.push(Outcome::Reject {
                cause: "sensor_fault",
                reason: format!("`{series}`: sensor fault {code:?}"),
            }),
        }
    }
}

/// The metric label of a frame error.
fn frame_cause(e: &FrameError) -> &'static str {
    match e {
        FrameError::Oversize => "frame_oversize",
        FrameError::Cobs => "frame_cobs",
        FrameError::Crc { .. } => "frame_crc",
        FrameError::Decode(_) => "frame_decode",
        FrameError::UnsupportedVersion(_) => "frame_version",
        FrameError::Empty => "frame_empty",
        FrameError::TrailingBytes(_) => "frame_trailing",
        _ => "frame_other",
    }
}

/// The port settings of `config`: path, baud rate, parity, data and stop bits (no flow
/// control, as the builder's default).
pub fn builder(config: &SerialSourceConfig) -> tokio_serial::SerialPortBuilder {
    tokio_serial::new(config.path.display().to_string(), config.baud)
        .parity(parity(config.parity))
        .data_bits(data_bits(config.data_bits))
        .stop_bits(stop_bits(config.stop_bits))
}

/// Opens the device of `config` with its [`builder`] settings.
pub fn open(config: &SerialSourceConfig) -> tokio_serial::Result<SerialStream> {
    builder(config).open_native_async()
}

fn parity(parity: SerialParity) -> tokio_serial::Parity {
    match parity {
        SerialParity::None => tokio_serial::Parity::None,
        SerialParity::Even => tokio_serial::Parity::Even,
        SerialParity::Odd => tokio_serial::Parity::Odd,
    }
}

fn data_bits(bits: SerialDataBits) -> tokio_serial::DataBits {
    match bits {
        SerialDataBits::Five => tokio_serial::DataBits::Five,
        SerialDataBits::Six => tokio_serial::DataBits::Six,
        SerialDataBits::Seven => tokio_serial::DataBits::Seven,
        SerialDataBits::Eight => tokio_serial::DataBits::Eight,
    }
}

fn stop_bits(bits: SerialStopBits) -> tokio_serial::StopBits {
    match bits {
        SerialStopBits::One => tokio_serial::StopBits::One,
        SerialStopBits::Two => tokio_serial::StopBits::Two,
    }
}

/// Reads the serial device until `cancel`.
pub async fn run(
    index: u16,
    config: &SerialSourceConfig,
    ingest: mpsc::Sender<Ingest>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) -> Result<(), SourceError> {
    let invalid = |reason: String| SourceError::InvalidConfig { name: config.name.clone(), reason };
    if config.baud == 0 {
        return Err(invalid("baud must be above 0".into()));
    }
    let framer = Framer::new(config).map_err(invalid)?;
    let mut port = Port {
        index,
        config,
        ingest,
        metrics,
        framer,
        reject_log: RejectLog::default(),
        outcomes: Vec::new(),
    };
    port.run(&cancel).await
}

struct Port<'a> {
    index: u16,
    config: &'a SerialSourceConfig,
    ingest: mpsc::Sender<Ingest>,
    metrics: Arc<Metrics>,
    framer: Framer,
    reject_log: RejectLog,
    outcomes: Vec<Outcome>,
}

impl Port<'_> {
    async fn run(&mut self, cancel: &CancellationToken) -> Result<(), SourceError> {
        let name = self.config.name.clone();
        let path = self.config.path.display().to_string();
        let mut backoff = Backoff::new(self.config.reconnect_min, self.config.reconnect_max);
        // Whether the device is known to be away (gone, or not openable): its open errors are
        // then logged once, not on every retry.
        let mut down = false;
        let mut buf = [0u8; READ_CHUNK];
        while !cancel.is_cancelled() {
            match open(self.config) {
                Ok(mut stream) => {
                    tracing::info!(source = %name, %path, "serial device opened");
                    self.metrics.set_connected(&name, true);
                    backoff.reset();
                    self.framer.reset();
                    loop {
                        let read = tokio::select! {
                            biased;
                            _ = cancel.cancelled() => return Ok(()),
                            read = stream.read(&mut buf) => read,
                        };
                        let n = match read {
                            Ok(0) => {
                                tracing::warn!(source = %name, %path, "serial device gone (end of file)");
                                break;
                            }
                            Ok(n) => n,
                            Err(e) => {
                                tracing::warn!(source = %name, %path, error = %e, "serial device gone");
                                break;
                            }
                        };
                        if !self.on_bytes(n, &buf, cancel).await? {
                            return Ok(());
                        }
                    }
                    self.metrics.set_connected(&name, false);
                    down = true;
                }
                Err(e) => {
                    self.metrics.set_connected(&name, false);
                    if !down {
                        tracing::warn!(source = %name, %path, error = %e, "cannot open the serial device; retrying");
                    } else {
                        tracing::debug!(source = %name, %path, error = %e, "serial device still unavailable");
                    }
                    down = true;
                }
            }
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
        Ok(())
    }

    /// Decodes `buf[..n]` and hands the readings to the journal. `Ok(false)`: cancelled.
    async fn on_bytes(
        &mut self,
        n: usize,
        buf: &[u8],
        cancel: &CancellationToken,
    ) -> Result<bool, SourceError> {
        let received_ms = now_ms();
        let mut outcomes = std::mem::take(&mut self.outcomes);
        self.framer.push(&buf[..n], received_ms, &mut outcomes);
        let name = &self.config.name;
        for outcome in outcomes.drain(..) {
            match outcome {
                Outcome::Reading { series, value, ts_ms } => {
                    let event = Event { series, ts_ms, value, received_ms, source: self.index };
                    let message = Ingest { event: Some(event), ack: None, redelivery: None };
                    if !send_or_cancel(&self.ingest, message, cancel, name).await? {
                        return Ok(false);
                    }
                }
                Outcome::Reject { cause, reason } => {
                    self.metrics.reject(name, cause);
                    if let Some(suppressed) = self.reject_log.admit(cause, Instant::now()) {
                        tracing::warn!(source = %name, cause, suppressed, %reason, "rejected serial input");
                    }
                }
                Outcome::Lost { device, count } => {
                    self.metrics.lost_frames(name, u64::from(count));
                    if let Some(suppressed) = self.reject_log.admit("lost_frames", Instant::now()) {
                        tracing::warn!(source = %name, device, count, suppressed, "frames lost");
                    }
                }
                Outcome::Restarted { device } => {
                    self.metrics.device_restarted(name);
                    if let Some(suppressed) =
                        self.reject_log.admit("device_restart", Instant::now())
                    {
                        tracing::info!(
                            source = %name,
                            device,
                            suppressed,
                            "device restarted (its tick went back)"
                        );
                    }
                }
            }
        }
        self.outcomes = outcomes;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sensors::reading::{ChannelReading, FaultCode, Unit};

    fn config(framing: SerialFraming, series: &str) -> SerialSourceConfig {
        let toml = format!(
            "[agent]\nid = \"gw\"\n[upstream]\nkind = \"file\"\npath = \"-\"\n[[sources]]\n\
             kind = \"serial\"\npath = \"/dev/null\"\nseries = \"{series}\"\n"
        );
        let config = crate::config::Config::from_toml(&toml).unwrap();
        match &config.sources[0] {
            crate::config::SourceConfig::Serial(c) => SerialSourceConfig { framing, ..c.clone() },
            other => panic!("not serial: {other:?}"),
        }
    }

    fn push(framer: &mut Framer, bytes: &[u8]) -> Vec<Outcome> {
        let mut out = Vec::new();
        framer.push(bytes, 1_000, &mut out);
        out
    }

    fn causes(outcomes: &[Outcome]) -> Vec<&'static str> {
        outcomes
            .iter()
            .filter_map(|o| match o {
                Outcome::Reject { cause, .. } => Some(*cause),
                _ => None,
            })
            .collect()
    }

    fn reading_at(series: &str, value: f64, ts_ms: i64) -> Outcome {
        Outcome::Reading { series: series.into(), value, ts_ms }
    }

    #[test]
    fn json_lines_take_series_value_and_any_timestamp_form() {
        let mut f = Framer::new(&config(SerialFraming::JsonLines, "default")).unwrap();
        let out = push(
            &mut f,
            b"{\"series\":\"a\",\"value\":1.5}\n{\"series\":\"b\",\"value\":2,\"ts\":1700000000000}\r\n\
              {\"value\":3,\"ts\":1700000000}\n{\"series\":\"c\",\"value\":4,\"ts\":\"2023-11-14T22:13:20Z\"}\n",
        );
        assert_eq!(
            out,
            vec![
                reading_at("a", 1.5, 1_000),
                reading_at("b", 2.0, 1_700_000_000_000),
                reading_at("default", 3.0, 1_700_000_000_000),
                reading_at("c", 4.0, 1_700_000_000_000),
            ]
        );
    }

    #[test]
    fn bad_lines_are_counted_by_cause_and_do_not_stop_the_next() {
        let mut f = Framer::new(&config(SerialFraming::JsonLines, "d")).unwrap();
        let out = push(
            &mut f,
            b"nope\n{\"series\":\"a\"}\n{\"value\":\"x\"}\n{\"value\":1,\"ts\":true}\n\n\xff\n{\"value\":7}\n",
        );
        assert_eq!(
            causes(&out),
            vec![
                "invalid_json",
                "missing_value",
                "invalid_value",
                "invalid_timestamp",
                "invalid_utf8"
            ]
        );
        assert_eq!(out.last(), Some(&reading_at("d", 7.0, 1_000)));
    }

    #[test]
    fn a_line_longer_than_the_cap_is_one_reject_up_to_its_newline() {
        let mut f = Framer::new(&config(SerialFraming::CsvLines, "d")).unwrap();
        let long = vec![b'x'; MAX_LINE * 3];
        let mut out = push(&mut f, &long);
        assert!(out.is_empty());
        out = push(&mut f, b"more\na,2\n");
        assert_eq!(
            out,
            vec![
                Outcome::Reject {
                    cause: "line_too_long",
                    reason: format!("line longer than {MAX_LINE} bytes")
                },
                reading_at("a", 2.0, 1_000),
            ]
        );
        // A line of exactly the cap is fine.
        let mut exact = b"a,".to_vec();
        exact.resize(MAX_LINE - 1, b'0');
        exact.extend_from_slice(b"1\n");
        assert_eq!(push(&mut f, &exact), vec![reading_at("a", 1.0, 1_000)]);
    }

    #[test]
    fn csv_lines_have_one_two_or_three_fields() {
        let mut f = Framer::new(&config(SerialFraming::CsvLines, "d")).unwrap();
        let out = push(&mut f, b"1.5\na, 2\n1700000000000,b,3\n1,2,3,4\nx,y,z\n,4\na,NaN\n");
        assert_eq!(
            out[..3],
            [
                reading_at("d", 1.5, 1_000),
                reading_at("a", 2.0, 1_000),
                reading_at("b", 3.0, 1_700_000_000_000),
            ]
        );
        assert_eq!(
            causes(&out),
            vec!["csv_fields", "invalid_timestamp", "invalid_series", "non_finite"]
        );
    }

    fn frame(device: u32, seq: u32, tick: u32, readings: &[ChannelReading]) -> Vec<u8> {
        let mut f = Frame::new(device, seq, tick);
        for r in readings {
            f.readings.push(*r).unwrap();
        }
        let mut buf = [0u8; sensors::frame::MAX_FRAME_SIZE];
        let n = sensors::frame::encode(&f, &mut buf).unwrap();
        buf[..n].to_vec()
    }

    #[test]
    fn frames_give_one_reading_per_good_channel_and_count_faults() {
        let mut f =
            Framer::new(&config(SerialFraming::Frames, "dev-{device}/{channel}/{unit}")).unwrap();
        let mut uncertain = ChannelReading::good(1, Unit::PercentRh, 40.0);
        uncertain.quality = Quality::Uncertain;
        let bytes = frame(
            7,
            1,
            100,
            &[
                ChannelReading::good(0, Unit::Celsius, 21.5),
                uncertain,
                ChannelReading::fault(2, Unit::Hectopascal, FaultCode::Bus),
            ],
        );
        let out = push(&mut f, &bytes);
        assert_eq!(
            out[..2],
            [reading_at("dev-7/0/degC", 21.5, 1_000), reading_at("dev-7/1/%RH", 40.0, 1_000),]
        );
        assert_eq!(causes(&out), vec!["sensor_fault"]);
    }

    #[test]
    fn garbage_between_frames_is_counted_and_costs_no_good_frame() {
        let mut f = Framer::new(&config(SerialFraming::Frames, "{device}/{channel}")).unwrap();
        let mut bytes = frame(1, 1, 10, &[ChannelReading::good(0, Unit::Volt, 1.0)]);
        bytes.extend_from_slice(b"garbage\0");
        bytes.extend(frame(1, 2, 20, &[ChannelReading::good(0, Unit::Volt, 2.0)]));
        let mut corrupt = frame(1, 3, 30, &[ChannelReading::good(0, Unit::Volt, 3.0)]);
        corrupt[3] ^= 0x10;
        bytes.extend(corrupt);
        bytes.extend(frame(1, 4, 40, &[ChannelReading::good(0, Unit::Volt, 4.0)]));
        // Fed byte by byte: chunk boundaries must not matter.
        let mut out = Vec::new();
        for b in &bytes {
            f.push(std::slice::from_ref(b), 1_000, &mut out);
        }
        let values: Vec<f64> = out
            .iter()
            .filter_map(|o| match o {
                Outcome::Reading { value, .. } => Some(*value),
                _ => None,
            })
            .collect();
        assert_eq!(values, vec![1.0, 2.0, 4.0]);
        assert_eq!(causes(&out).len(), 2, "{out:?}");
        assert!(out.contains(&Outcome::Lost { device: 1, count: 1 }), "the corrupt frame is lost");
    }

    #[test]
    fn sequence_gaps_restarts_jumps_and_stale_frames_are_told_apart() {
        let mut s = SeqTracker::default();
        assert_eq!(s.observe(1, 10, 1_000), SeqVerdict::InOrder);
        assert_eq!(s.observe(1, 11, 1_100), SeqVerdict::InOrder);
        assert_eq!(s.observe(1, 14, 1_400), SeqVerdict::Gap(2));
        assert_eq!(s.observe(1, 12, 1_500), SeqVerdict::Stale);
        assert_eq!(s.observe(1, 15, 1_600), SeqVerdict::InOrder, "a stale frame leaves the state");
        assert_eq!(s.observe(1, 0, 5), SeqVerdict::Restarted);
        assert_eq!(s.observe(1, 1 + MAX_COUNTED_GAP + 1, 9), SeqVerdict::Jump);
        // Another device has its own sequence; seq and tick wrap.
        assert_eq!(s.observe(2, u32::MAX, u32::MAX), SeqVerdict::InOrder);
        assert_eq!(s.observe(2, 0, 3), SeqVerdict::InOrder);
    }

    #[test]
    fn series_templates_reject_unknown_placeholders() {
        let t = SeriesTemplate::parse("dev-{device}/{channel}").unwrap();
        assert_eq!(t.render(3, 1, Unit::Watt), "dev-3/1");
        assert!(SeriesTemplate::parse("{topic}").unwrap_err().contains("unknown placeholder"));
        assert!(SeriesTemplate::parse("x{device").unwrap_err().contains("unclosed"));
    }

    #[test]
    fn a_unit_with_a_slash_does_not_add_a_series_segment() {
        let template = SeriesTemplate::parse("dev-{device}/{unit}").unwrap();
        let series = template.render(7, 0, sensors::reading::Unit::MillimetrePerSecond);
        assert_eq!(series, "dev-7/mm_s");
    }

    /// A fixed gateway time in ms, so tests read as offsets from it.
    const R0: i64 = 1_700_000_000_000;

    /// Maps `(tick, received_ms)` pairs, checking the invariant that holds for every frame.
    fn map_all(clock: &mut TickClock, frames: &[(u32, i64)]) -> Vec<i64> {
        frames
            .iter()
            .map(|&(tick, received)| {
                let ts = clock.map(tick, received);
                assert!(ts <= received, "tick {tick}: ts {ts} after receive time {received}");
                assert!(received - ts <= MAX_CLOCK_LAG_MS, "tick {tick}: {ts} vs {received}");
                ts
            })
            .collect()
    }

    /// Latency jitter: 5 to 15 ms, the minimum 5 ms once every 11 frames, first at `k = 8`.
    fn latency(k: i64) -> i64 {
        5 + (k + 3) * 7 % 11
    }

    #[test]
    fn a_steady_stream_is_mapped_by_tick_plus_the_least_latency_offset() {
        let mut clock = TickClock::default();
        // Constant latency: exactly tick + offset.
        let frames: Vec<(u32, i64)> =
            (0..100).map(|k| (5_000 + 100 * k as u32, R0 + 100 * k + 8)).collect();
        let ts = map_all(&mut clock, &frames);
        assert!(ts.iter().enumerate().all(|(k, &t)| t == R0 + 100 * k as i64 + 8), "{ts:?}");

        // Jitter: after the first least-latency frame, the anchor is that frame's latency, plus
        // at most the slow rise (0.1 ms per 100 ms frame) since the last such frame.
        let mut clock = TickClock::default();
        let frames: Vec<(u32, i64)> =
            (0..1_000).map(|k| (5_000 + 100 * k as u32, R0 + 100 * k + latency(k))).collect();
        let ts = map_all(&mut clock, &frames);
        for (k, &t) in ts.iter().enumerate().skip(8) {
            let error = t - (R0 + 100 * k as i64 + 5);
            assert!((0..=1).contains(&error), "frame {k}: off by {error} ms");
        }
    }

    #[test]
    fn a_delayed_burst_keeps_the_spacing_of_its_ticks() {
        let mut clock = TickClock::default();
        let steady: Vec<(u32, i64)> = (0..50).map(|k| (100 * k as u32, R0 + 100 * k + 5)).collect();
        map_all(&mut clock, &steady);
        // Frames 50..60 sent at their time but held up: they all arrive 500 ms after the last.
        let arrival = R0 + 100 * 59 + 500;
        let burst: Vec<(u32, i64)> = (50..60).map(|k| (100 * k as u32, arrival)).collect();
        let ts = map_all(&mut clock, &burst);
        for (i, &t) in ts.iter().enumerate() {
            let k = 50 + i as i64;
            // The offset rose by 0.1 ms per frame at most: within 1 ms of the real time.
            let error = t - (R0 + 100 * k + 5);
            assert!((0..=1).contains(&error), "frame {k}: off by {error} ms: {ts:?}");
        }
        for pair in ts.windows(2) {
            assert!((100..=101).contains(&(pair[1] - pair[0])), "{ts:?}");
        }
        // The next timely frame is back on the least-latency anchor.
        assert_eq!(clock.map(6_000, R0 + 6_005), R0 + 6_005);
    }

    #[test]
    fn a_slow_or_fast_crystal_is_followed_for_an_hour() {
        for ppm in [-50, 50] {
            let mut clock = TickClock::default();
            // A frame every 100 ms of gateway time for an hour; the device's tick runs off by
            // `ppm` (0.18 s after the hour).
            let frames: Vec<(u32, i64)> = (0..36_000)
                .map(|k: i64| {
                    let tick = 100 * k * (1_000_000 + ppm) / 1_000_000;
                    (tick as u32, R0 + 100 * k + latency(k))
                })
                .collect();
            assert!((frames[35_999].0 as i64 - 3_599_900).abs() >= 179, "the drift is real");
            let ts = map_all(&mut clock, &frames);
            for (k, &t) in ts.iter().enumerate().skip(8) {
                let error = t - (R0 + 100 * k as i64 + 5);
                assert!((-1..=2).contains(&error), "{ppm} ppm, frame {k}: off by {error} ms");
            }
        }
    }

    #[test]
    fn a_restart_re_anchors_at_the_receive_time() {
        let mut clock = TickClock::default();
        let before: Vec<(u32, i64)> =
            (0..10).map(|k| (1_000_000 + 100 * k as u32, R0 + 100 * k + 5)).collect();
        map_all(&mut clock, &before);
        // The device restarts: its tick starts over; the first frame comes 3 s later.
        let restart = R0 + 4_000;
        let ts = map_all(&mut clock, &[(40, restart), (140, restart + 100), (240, restart + 250)]);
        assert_eq!(ts, vec![restart, restart + 100, restart + 200], "spaced by ticks again");

        // A restart soon after boot: the tick goes back only a little, and the first frame
        // after it comes 200 ms after the last one before.
        let mut clock = TickClock::default();
        map_all(&mut clock, &[(1_400, R0 + 5), (1_500, R0 + 105)]);
        assert_eq!(map_all(&mut clock, &[(40, R0 + 305)]), vec![R0 + 305]);
    }

    #[test]
    fn a_tick_that_wraps_keeps_counting_forward() {
        let mut clock = TickClock::default();
        let start = u32::MAX - 250;
        let tick = |k: i64| start.wrapping_add(100 * k as u32);
        map_all(&mut clock, &[(tick(0), R0 + 7), (tick(1), R0 + 107), (tick(2), R0 + 207)]);
        assert!(tick(3) < tick(2), "the tick wraps next");
        // The frames across the wrap arrive together, 300 ms late: spaced by their ticks, not
        // re-anchored as if the device had restarted.
        let arrival = R0 + 607;
        let ts = map_all(&mut clock, &[(tick(3), arrival), (tick(4), arrival), (tick(5), arrival)]);
        assert_eq!(ts, vec![R0 + 307, R0 + 407, R0 + 507]);
    }

    #[test]
    fn gateway_clock_steps_and_stalls_re_anchor_within_the_bound() {
        let mut clock = TickClock::default();
        map_all(&mut clock, &[(0, R0 + 5), (100, R0 + 105)]);
        // The gateway clock steps back 10 s: followed at once, never in the future.
        let back = R0 - 10_000;
        assert_eq!(map_all(&mut clock, &[(200, back + 205)]), vec![back + 205]);
        assert_eq!(map_all(&mut clock, &[(300, back + 305)]), vec![back + 305]);
        // It steps forward an hour (NTP after boot): re-anchored, not an hour late.
        let ahead = back + 3_600_000;
        assert_eq!(map_all(&mut clock, &[(400, ahead + 405)]), vec![ahead + 405]);
        assert_eq!(map_all(&mut clock, &[(500, ahead + 505)]), vec![ahead + 505]);
        // The device stalls 5 s and sends what it had: beyond the bound, receive times.
        let late = ahead + 505 + 100 + 5_000;
        let ts = map_all(&mut clock, &[(600, late), (700, late)]);
        assert_eq!(ts, vec![late, late]);
    }

    #[test]
    fn mapped_time_never_passes_receive_time_whatever_the_input() {
        // xorshift: arbitrary ticks (forward, backward, wrapping) and latencies.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut clock = TickClock::default();
        let (mut tick, mut received) = (0u32, R0);
        for _ in 0..100_000 {
            let r = next();
            tick = match r % 10 {
                0 => r as u32,
                1 => tick.wrapping_sub((r >> 8) as u32 % 1_000),
                _ => tick.wrapping_add((r >> 8) as u32 % 1_000),
            };
            received += ((r >> 40) % 2_000) as i64 - 200;
            map_all(&mut clock, &[(tick, received)]);
        }
    }

    #[test]
    fn frames_read_in_one_chunk_keep_the_spacing_of_their_ticks() {
        let mut f = Framer::new(&config(SerialFraming::Frames, "{device}")).unwrap();
        let volts = |v| [ChannelReading::good(0, Unit::Volt, v)];
        let mut out = Vec::new();
        f.push(&frame(4, 1, 1_000, &volts(1.0)), R0, &mut out);
        let mut burst = frame(4, 2, 1_100, &volts(2.0));
        burst.extend(frame(4, 3, 1_200, &volts(3.0)));
        burst.extend(frame(4, 4, 1_300, &volts(4.0)));
        f.push(&burst, R0 + 800, &mut out);
        assert_eq!(
            out,
            vec![
                reading_at("4", 1.0, R0),
                reading_at("4", 2.0, R0 + 100),
                reading_at("4", 3.0, R0 + 200),
                reading_at("4", 4.0, R0 + 300),
            ]
        );
    }

    #[test]
    fn frames_of_more_devices_than_the_cap_are_rejected() {
        let mut f = Framer::new(&config(SerialFraming::Frames, "{device}")).unwrap();
        let volts = [ChannelReading::good(0, Unit::Volt, 1.0)];
        let mut bytes = Vec::new();
        for device in 0..=MAX_DEVICES as u32 {
            bytes.extend(frame(device, 1, 10, &volts));
        }
        bytes.extend(frame(0, 2, 20, &volts));
        let out = push(&mut f, &bytes);
        assert_eq!(causes(&out), vec!["device_limit"]);
        let readings = out.iter().filter(|o| matches!(o, Outcome::Reading { .. })).count();
        assert_eq!(readings, MAX_DEVICES + 1, "known devices still get through");
    }
}
