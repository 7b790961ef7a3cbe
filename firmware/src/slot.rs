//! One sensor's schedule and the aggregation of its samples into reports (pure: no I/O; the
//! sensor and the time come in as parameters).
//!
//! A slot samples its sensor every [`SlotConfig::sample_period_ms`] and, after
//! [`SlotConfig::samples_per_report`] samples, turns the block into one report reading per
//! channel with that channel's [`Aggregate`]. See the crate docs for the quality rules.

use embedded_hal::delay::DelayNs;
use sensors::reading::{ChannelReading, FaultCode, Quality, Unit};
use sensors::sensor::MAX_CHANNELS;

use crate::Stats;
use crate::sensor::DynSensor;

/// How the samples of one channel in one block become its report value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Aggregate {
    /// The arithmetic mean (temperatures, voltages: smooths noise).
    Mean,
    /// The root mean square, `sqrt(Σx² / n)` (vibration: energy over the block).
    Rms,
    /// The largest value (peaks).
    Max,
    /// The smallest value.
    Min,
    /// The last value (counters, states).
    Last,
}

/// The schedule and aggregation of one sensor. `Copy` and `'static` data only, so a
/// firmware's configuration can be a `const`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotConfig {
    /// Milliseconds between two samples, 1 ..= [`MAX_PERIOD_MS`](crate::MAX_PERIOD_MS).
    pub sample_period_ms: u32,
    /// Samples aggregated into one report, at least 1 (1: every sample is reported).
    pub samples_per_report: u16,
    /// The aggregate of each sensor channel, by channel number; channels past the end use
    /// [`Aggregate::Mean`]. At most [`MAX_CHANNELS`] entries.
    pub aggregate: &'static [Aggregate],
    /// The frame channel of the sensor's channel 0; channel `c` goes out as
    /// `first_channel + c`. Each slot owns [`MAX_CHANNELS`] frame channels from here.
    pub first_channel: u8,
}

/// The running aggregate of one channel within the current block.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChannelBlock {
    /// Samples aggregated (good or uncertain, finite).
    count: u16,
    /// A sample was uncertain or faulted: the report is at best uncertain.
    degraded: bool,
    /// The fault code of the latest faulted sample.
    last_fault: Option<FaultCode>,
    /// Sums in f64: an f32 sum of 65 535 samples would lose the low digits of the mean.
    sum: f64,
    sum_sq: f64,
    max: f32,
    min: f32,
    last: f32,
}

impl ChannelBlock {
    const EMPTY: ChannelBlock = ChannelBlock {
        count: 0,
        degraded: false,
        last_fault: None,
        sum: 0.0,
        sum_sq: 0.0,
        max: f32::NEG_INFINITY,
        min: f32::INFINITY,
        last: 0.0,
    };

    /// Adds one sample. A non-finite value in a good or uncertain reading cannot be
    /// aggregated and counts as an [`FaultCode::InvalidData`] fault.
    pub(crate) fn add(&mut self, value: f32, quality: Quality) {
        let quality = match quality {
            Quality::Good | Quality::Uncertain if !value.is_finite() => {
                Quality::Fault(FaultCode::InvalidData)
            }
            q => q,
        };
        match quality {
            Quality::Fault(code) => {
                self.degraded = true;
                self.last_fault = Some(code);
            }
            Quality::Good | Quality::Uncertain => {
                self.degraded |= quality == Quality::Uncertain;
                self.count = self.count.saturating_add(1);
                let v = f64::from(value);
                self.sum += v;
                self.sum_sq += v * v;
                self.max = self.max.max(value);
                self.min = self.min.min(value);
                self.last = value;
            }
        }
    }

    /// The report of the block: a fault reading if no sample could be aggregated.
    pub(crate) fn report(&self, channel: u8, unit: Unit, aggregate: Aggregate) -> ChannelReading {
        if self.count == 0 {
            let code = self.last_fault.unwrap_or(FaultCode::InvalidData);
            return ChannelReading::fault(channel, unit, code);
        }
        let n = f64::from(self.count);
        let value = match aggregate {
            Aggregate::Mean => (self.sum / n) as f32,
            Aggregate::Rms => libm::sqrt(self.sum_sq / n) as f32,
            Aggregate::Max => self.max,
            Aggregate::Min => self.min,
            Aggregate::Last => self.last,
        };
        let quality = if self.degraded { Quality::Uncertain } else { Quality::Good };
        ChannelReading { channel, unit, value, quality }
    }
}

/// A slot's state: its configuration, when it samples next, and the open block.
#[derive(Debug, Clone)]
pub(crate) struct Slot {
    pub(crate) config: SlotConfig,
    /// The tick of the next sample (wrapping).
    pub(crate) next_due: u32,
    /// Samples taken in the open block.
    taken: u16,
    channels: [ChannelBlock; MAX_CHANNELS],
    /// The sensor must be (re-)initialised before its next read.
    needs_init: bool,
    /// An init was attempted since `start`; further attempts count as re-inits.
    init_tried: bool,
}

impl Slot {
    pub(crate) fn new(config: SlotConfig) -> Slot {
        Slot {
            config,
            next_due: 0,
            taken: 0,
            channels: [ChannelBlock::EMPTY; MAX_CHANNELS],
            needs_init: true,
            init_tried: false,
        }
    }

    /// Restarts the schedule at `now` with an empty block; the next init is a first one.
    pub(crate) fn restart(&mut self, now: u32) {
        self.next_due = now;
        self.taken = 0;
        self.channels = [ChannelBlock::EMPTY; MAX_CHANNELS];
        self.needs_init = true;
        self.init_tried = false;
    }

    /// Initialises the sensor; counts every attempt after the first as a re-init.
    pub(crate) fn init(
        &mut self,
        sensor: &mut dyn DynSensor,
        delay: &mut dyn DelayNs,
        stats: &mut Stats,
    ) -> Result<(), FaultCode> {
        if self.init_tried {
            stats.reinits = stats.reinits.wrapping_add(1);
        }
        self.init_tried = true;
        sensor.init(delay)?;
        self.needs_init = false;
        Ok(())
    }

    /// Takes one sample into the open block; returns the block's reports when it completes.
    ///
    /// A pending init runs first; if it fails, the sample is a fault with its code. A read
    /// error is a fault for every channel, and a bus error or timeout (the chip may have
    /// reset and lost its configuration) schedules a re-init. Channels that a successful read
    /// leaves out are faults with [`FaultCode::InvalidData`].
    pub(crate) fn sample(
        &mut self,
        sensor: &mut dyn DynSensor,
        delay: &mut dyn DelayNs,
        stats: &mut Stats,
    ) -> Option<Reports> {
        let units = sensor.channels();
        let n = units.len().min(MAX_CHANNELS);
        let outcome = if self.needs_init {
            self.init(sensor, delay, stats).and_then(|()| sensor.read(delay))
        } else {
            sensor.read(delay)
        };
        let mut faulted = false;
        match outcome {
            Ok(readings) => {
                for (c, block) in self.channels.iter_mut().enumerate().take(n) {
                    match readings.iter().find(|r| usize::from(r.channel) == c) {
                        Some(r) => {
                            block.add(r.value, r.quality);
                            faulted |= matches!(r.quality, Quality::Fault(_));
                        }
                        None => {
                            block.add(f32::NAN, Quality::Fault(FaultCode::InvalidData));
                            faulted = true;
                        }
                    }
                }
            }
            Err(code) => {
                for block in self.channels.iter_mut().take(n) {
                    block.add(f32::NAN, Quality::Fault(code));
                }
                faulted = true;
                if matches!(code, FaultCode::Bus | FaultCode::Timeout) {
                    self.needs_init = true;
                }
            }
        }
        if faulted {
            stats.sensor_faults = stats.sensor_faults.wrapping_add(1);
        }
        self.taken = self.taken.saturating_add(1);
        if self.taken < self.config.samples_per_report {
            return None;
        }
        let mut reports = Reports::new();
        for (c, (block, &unit)) in self.channels.iter().zip(units).enumerate().take(n) {
            let aggregate = self.config.aggregate.get(c).copied().unwrap_or(Aggregate::Mean);
            // c < MAX_CHANNELS and first_channel + MAX_CHANNELS <= 256 (checked in `new`).
            let channel = self.config.first_channel.wrapping_add(c as u8);
            // Cannot fail: at most MAX_CHANNELS channels are iterated.
            let _ = reports.push(block.report(channel, unit, aggregate));
        }
        self.taken = 0;
        self.channels = [ChannelBlock::EMPTY; MAX_CHANNELS];
        Some(reports)
    }
}

/// The reports of one completed block.
pub(crate) type Reports = heapless::Vec<ChannelReading, MAX_CHANNELS>;

#[cfg(test)]
mod tests {
    use super::*;

    fn block(samples: &[(f32, Quality)]) -> ChannelBlock {
        let mut b = ChannelBlock::EMPTY;
        for &(v, q) in samples {
            b.add(v, q);
        }
        b
    }

    #[test]
    fn good_samples_give_exact_aggregates() {
        let b = block(&[(3.0, Quality::Good), (4.0, Quality::Good), (-5.0, Quality::Good)]);
        let value = |a| b.report(9, Unit::G, a).value;
        assert_eq!(value(Aggregate::Mean), (2.0f64 / 3.0) as f32);
        assert_eq!(value(Aggregate::Rms), (50.0f64 / 3.0).sqrt() as f32);
        assert_eq!(value(Aggregate::Max), 4.0);
        assert_eq!(value(Aggregate::Min), -5.0);
        assert_eq!(value(Aggregate::Last), -5.0);
        assert_eq!(b.report(9, Unit::G, Aggregate::Mean).quality, Quality::Good);
        assert_eq!(b.report(9, Unit::G, Aggregate::Mean).channel, 9);
    }

    #[test]
    fn an_uncertain_or_faulted_sample_makes_the_report_uncertain() {
        let b = block(&[(1.0, Quality::Good), (3.0, Quality::Uncertain)]);
        let r = b.report(0, Unit::Volt, Aggregate::Mean);
        assert_eq!((r.value, r.quality), (2.0, Quality::Uncertain));
        let b = block(&[(1.0, Quality::Good), (f32::NAN, Quality::Fault(FaultCode::Bus))]);
        let r = b.report(0, Unit::Volt, Aggregate::Mean);
        assert_eq!((r.value, r.quality), (1.0, Quality::Uncertain));
    }

    #[test]
    fn a_block_without_a_usable_sample_reports_the_last_fault() {
        let b = block(&[
            (f32::NAN, Quality::Fault(FaultCode::Bus)),
            (f32::NAN, Quality::Fault(FaultCode::Timeout)),
        ]);
        let r = b.report(2, Unit::Watt, Aggregate::Max);
        assert_eq!(r.quality, Quality::Fault(FaultCode::Timeout));
        assert!(r.value.is_nan());
    }

    #[test]
    fn a_non_finite_good_value_is_invalid_data() {
        let b = block(&[(f32::INFINITY, Quality::Good)]);
        let r = b.report(0, Unit::Volt, Aggregate::Mean);
        assert_eq!(r.quality, Quality::Fault(FaultCode::InvalidData));
    }
}
