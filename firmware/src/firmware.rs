//! [`Firmware`]: the schedule of all slots, framing, and the writer (see the crate docs).

use core::fmt;

use embedded_hal::delay::DelayNs;
use sensors::frame::{self, Frame, MAX_FRAME_SIZE};
use sensors::reading::ChannelReading;
use sensors::sensor::MAX_CHANNELS;

use crate::sensor::DynSensor;
use crate::slot::{Slot, SlotConfig};

/// The most slots (sensors) one firmware drives. Eight sensors of four channels fill 32 frame
/// channels, four full frames per round; the slot table stays under 2 KiB of RAM.
pub const MAX_SLOTS: usize = 8;

/// The longest sample period, one day. Longer periods make no sense for monitoring, and the
/// bound keeps every schedule distance far below 2^31 ms, where wrapping tick comparison
/// becomes ambiguous.
pub const MAX_PERIOD_MS: u32 = 86_400_000;

/// The most readings one poll can complete: every slot finishing a block at once.
const MAX_POLL_READINGS: usize = MAX_SLOTS * MAX_CHANNELS;

/// Counters of what the firmware did. They wrap at `u32::MAX` like the frame sequence.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Frames written completely.
    pub frames_sent: u32,
    /// Frames whose write failed (their seq is consumed: the receiver counts them as lost).
    pub frames_dropped: u32,
    /// Samples in which the sensor failed (init or read error, or a faulted channel).
    pub sensor_faults: u32,
    /// Init attempts after the one [`Firmware::start`] makes (retries and re-inits).
    pub reinits: u32,
    /// Samples not taken: the caller polled too late, or the slot has no sensor.
    pub samples_skipped: u32,
}

/// Why a configuration was refused by [`Firmware::new`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigError {
    /// No slot was configured: the firmware would never send anything.
    NoSlots,
    /// More than [`MAX_SLOTS`] slots.
    TooManySlots {
        /// Slots configured.
        count: usize,
    },
    /// A slot's `sample_period_ms` is 0.
    ZeroPeriod {
        /// The slot's index.
        slot: usize,
    },
    /// A slot's `sample_period_ms` exceeds [`MAX_PERIOD_MS`].
    PeriodTooLong {
        /// The slot's index.
        slot: usize,
        /// The configured period.
        period_ms: u32,
    },
    /// A slot's `samples_per_report` is 0.
    ZeroSamplesPerReport {
        /// The slot's index.
        slot: usize,
    },
    /// A slot lists more aggregates than a sensor has channels ([`MAX_CHANNELS`]).
    TooManyAggregates {
        /// The slot's index.
        slot: usize,
        /// Aggregates listed.
        count: usize,
    },
    /// A slot's channels would run past frame channel 255.
    ChannelOutOfRange {
        /// The slot's index.
        slot: usize,
        /// Its first channel.
        first_channel: u8,
    },
    /// Two slots' channel blocks overlap.
    ChannelCollision {
        /// The earlier slot.
        slot: usize,
        /// The later slot whose block overlaps it.
        other: usize,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ConfigError::NoSlots => f.write_str("no slot configured"),
            ConfigError::TooManySlots { count } => {
                write!(f, "{count} slots configured, at most {MAX_SLOTS} are supported")
            }
            ConfigError::ZeroPeriod { slot } => {
                write!(f, "slot {slot}: sample_period_ms must be at least 1")
            }
            ConfigError::PeriodTooLong { slot, period_ms } => write!(
                f,
                "slot {slot}: sample_period_ms {period_ms} exceeds the maximum of {MAX_PERIOD_MS}"
            ),
            ConfigError::ZeroSamplesPerReport { slot } => {
                write!(f, "slot {slot}: samples_per_report must be at least 1")
            }
            ConfigError::TooManyAggregates { slot, count } => write!(
                f,
                "slot {slot}: {count} aggregates listed, a sensor has at most {MAX_CHANNELS} channels"
            ),
            ConfigError::ChannelOutOfRange { slot, first_channel } => write!(
                f,
                "slot {slot}: channels {first_channel}..{} run past channel 255",
                usize::from(first_channel) + MAX_CHANNELS
            ),
            ConfigError::ChannelCollision { slot, other } => write!(
                f,
                "slots {slot} and {other} overlap: each slot owns {MAX_CHANNELS} channels from its first_channel"
            ),
        }
    }
}

impl core::error::Error for ConfigError {}

/// Checks one configuration; the first problem found is returned.
fn validate(slots: &[SlotConfig]) -> Result<(), ConfigError> {
    if slots.is_empty() {
        return Err(ConfigError::NoSlots);
    }
    if slots.len() > MAX_SLOTS {
        return Err(ConfigError::TooManySlots { count: slots.len() });
    }
    for (slot, config) in slots.iter().enumerate() {
        let period_ms = config.sample_period_ms;
        if period_ms == 0 {
            return Err(ConfigError::ZeroPeriod { slot });
        }
        if period_ms > MAX_PERIOD_MS {
            return Err(ConfigError::PeriodTooLong { slot, period_ms });
        }
        if config.samples_per_report == 0 {
            return Err(ConfigError::ZeroSamplesPerReport { slot });
        }
        if config.aggregate.len() > MAX_CHANNELS {
            return Err(ConfigError::TooManyAggregates { slot, count: config.aggregate.len() });
        }
        let first_channel = config.first_channel;
        if usize::from(first_channel) + MAX_CHANNELS > 256 {
            return Err(ConfigError::ChannelOutOfRange { slot, first_channel });
        }
        for (other, later) in slots.iter().enumerate().skip(slot + 1) {
            if first_channel.abs_diff(later.first_channel) < MAX_CHANNELS as u8 {
                return Err(ConfigError::ChannelCollision { slot, other });
            }
        }
    }
    Ok(())
}

/// `at` has come at `now`, with ticks that wrap: `now` is at most 2^31 − 1 ms past `at`.
fn is_due(now: u32, at: u32) -> bool {
    now.wrapping_sub(at) < 1 << 31
}

/// The firmware core: samples sensors on schedule, aggregates, frames and writes (see the
/// crate docs). `W` is the serial line, e.g. a UART.
#[derive(Debug)]
pub struct Firmware<W> {
    device_id: u32,
    writer: W,
    slots: heapless::Vec<Slot, MAX_SLOTS>,
    /// The seq of the next frame.
    seq: u32,
    stats: Stats,
    /// `start` ran (else the first `poll` runs it).
    started: bool,
    /// A write failed: a 0x00 goes before the next frame, ending whatever part of the failed
    /// write reached the line.
    resync: bool,
}

impl<W: embedded_io::Write> Firmware<W> {
    /// A firmware for device `device_id` writing to `writer`, with one slot per sensor
    /// (`slots[i]` drives `sensors[i]` of [`start`](Self::start) and [`poll`](Self::poll)).
    /// Nothing is written until `start`.
    pub fn new(device_id: u32, writer: W, slots: &[SlotConfig]) -> Result<Self, ConfigError> {
        validate(slots)?;
        let mut table = heapless::Vec::new();
        for &config in slots {
            // Cannot fail: `validate` bounded the count by MAX_SLOTS.
            let _ = table.push(Slot::new(config));
        }
        Ok(Firmware {
            device_id,
            writer,
            slots: table,
            seq: 0,
            stats: Stats::default(),
            started: false,
            resync: false,
        })
    }

    /// Numbers frames from `seq` instead of 0 (e.g. a seq kept in retained RAM across a
    /// watchdog reset).
    pub fn with_first_seq(mut self, seq: u32) -> Self {
        self.seq = seq;
        self
    }

    /// Writes one 0x00 (ending any partial frame a reset left on the line), initialises every
    /// sensor, and schedules every slot's first sample at `now_ms`. A sensor whose init fails
    /// is initialised again before its next sample.
    pub fn start(
        &mut self,
        now_ms: u32,
        sensors: &mut [&mut dyn DynSensor],
        delay: &mut dyn DelayNs,
    ) {
        self.started = true;
        if !write_fully(&mut self.writer, &[0]) {
            self.resync = true;
        }
        for (i, slot) in self.slots.iter_mut().enumerate() {
            slot.restart(now_ms);
            if let Some(sensor) = sensors.get_mut(i) {
                // A failure leaves the slot marked for init before its next sample.
                let _ = slot.init(&mut **sensor, delay, &mut self.stats);
            }
        }
    }

    /// Samples every slot that is due at `now_ms`, writes the reports completed by it (in
    /// frames of at most [`frame::MAX_CHANNELS`] readings) and returns the tick at which the
    /// next sample is due: sleep until then and poll again.
    ///
    /// Calls [`start`](Self::start) first if it has not run. A slot that is more than one
    /// period late takes one sample now and skips the ones it missed (counted in
    /// [`Stats::samples_skipped`]) instead of sampling in a burst.
    pub fn poll(
        &mut self,
        now_ms: u32,
        sensors: &mut [&mut dyn DynSensor],
        delay: &mut dyn DelayNs,
    ) -> u32 {
        if !self.started {
            self.start(now_ms, sensors, delay);
        }
        let mut completed: heapless::Vec<ChannelReading, MAX_POLL_READINGS> = heapless::Vec::new();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if !is_due(now_ms, slot.next_due) {
                continue;
            }
            let period = slot.config.sample_period_ms;
            // late < 2^31 and period <= MAX_PERIOD_MS: no overflow in the sum below.
            let missed = now_ms.wrapping_sub(slot.next_due) / period;
            slot.next_due = slot.next_due.wrapping_add(period.wrapping_mul(missed + 1));
            self.stats.samples_skipped = self.stats.samples_skipped.wrapping_add(missed);
            let Some(sensor) = sensors.get_mut(i) else {
                self.stats.samples_skipped = self.stats.samples_skipped.wrapping_add(1);
                continue;
            };
            if let Some(reports) = slot.sample(&mut **sensor, delay, &mut self.stats) {
                // Cannot fail: each slot adds at most MAX_CHANNELS readings.
                let _ = completed.extend_from_slice(&reports);
            }
        }
        for chunk in completed.chunks(frame::MAX_CHANNELS) {
            self.send(now_ms, chunk);
        }
        self.next_due(now_ms)
    }

    /// The tick of the earliest next sample of any slot.
    fn next_due(&self, now_ms: u32) -> u32 {
        let wait =
            self.slots.iter().map(|slot| slot.next_due.wrapping_sub(now_ms)).min().unwrap_or(0);
        now_ms.wrapping_add(wait)
    }

    /// Frames `readings` (at most `frame::MAX_CHANNELS`) with the next seq and writes them.
    fn send(&mut self, now_ms: u32, readings: &[ChannelReading]) {
        let mut frame = Frame::new(self.device_id, self.seq, now_ms);
        self.seq = self.seq.wrapping_add(1);
        let mut buf = [0u8; MAX_FRAME_SIZE];
        let sent = frame.readings.extend_from_slice(readings).is_ok()
            && match frame::encode(&frame, &mut buf) {
                Ok(len) => self.write_frame(&buf[..len]),
                Err(_) => false,
            };
        if sent {
            self.stats.frames_sent = self.stats.frames_sent.wrapping_add(1);
        } else {
            self.stats.frames_dropped = self.stats.frames_dropped.wrapping_add(1);
            self.resync = true;
        }
    }

    /// Writes one encoded frame, after a 0x00 if an earlier write failed.
    fn write_frame(&mut self, bytes: &[u8]) -> bool {
        if self.resync && !write_fully(&mut self.writer, &[0]) {
            return false;
        }
        self.resync = false;
        write_fully(&mut self.writer, bytes)
    }

    /// What the firmware did so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The seq the next frame will carry.
    pub fn seq(&self) -> u32 {
        self.seq
    }

    /// The writer, e.g. to flush it or to check its state between polls.
    pub fn writer_mut(&mut self) -> &mut W {
        &mut self.writer
    }

    /// Gives the writer back.
    pub fn into_writer(self) -> W {
        self.writer
    }
}

/// `write_all` without its panic: embedded-io's `write_all` panics when `write` returns
/// `Ok(0)`; here that is a failed write like any error.
fn write_fully<W: embedded_io::Write>(writer: &mut W, mut bytes: &[u8]) -> bool {
    while !bytes.is_empty() {
        match writer.write(bytes) {
            Ok(0) | Err(_) => return false,
            Ok(n) => bytes = bytes.get(n..).unwrap_or_default(),
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_compares_across_the_wrap() {
        assert!(is_due(5, 5));
        assert!(is_due(3, u32::MAX - 2));
        assert!(!is_due(u32::MAX - 2, 3));
        assert!(!is_due(4, 5));
    }
}
