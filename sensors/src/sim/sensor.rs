//! Simulated sensors: [`SimulatedSensor`] implements [`Sensor`] on the signal model, with the
//! time from a shared [`SimClock`].

use core::fmt;
use core::str::FromStr;
use std::string::ToString;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::vec;

use embedded_hal::delay::DelayNs;

use super::UnknownName;
use super::model::{FaultKind, SimConfig, SimReading, Simulator};
use crate::reading::{ChannelReading, FaultCode, Quality, Unit};
use crate::sensor::{Readings, Sensor, SensorError};

/// The INA219's bus voltage range (32 V setting); the register cannot hold more.
const INA219_BUS_MAX_V: f64 = 32.0;

/// A shared millisecond clock for simulated sensors.
///
/// Cloning is cheap and every clone shows the same time: the caller keeps one clone and
/// moves the time; the sensors read it. Time only moves when the caller moves it.
#[derive(Debug, Clone, Default)]
pub struct SimClock(Arc<AtomicI64>);

impl SimClock {
    /// A clock showing `ms` (ms since the Unix epoch, or since any origin the caller likes:
    /// the daily cycle takes `ms` as UTC).
    pub fn new(ms: i64) -> SimClock {
        SimClock(Arc::new(AtomicI64::new(ms)))
    }

    /// Sets the time to `ms`.
    pub fn set(&self, ms: i64) {
        self.0.store(ms, Ordering::SeqCst);
    }

    /// Moves the time by `ms` (saturating at the ends of `i64`).
    pub fn advance(&self, ms: i64) {
        // The closure always returns Some, so the update cannot fail.
        let _ =
            self.0.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| Some(t.saturating_add(ms)));
    }

    /// The current time in ms.
    pub fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// What a [`SimulatedSensor`] imitates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SimKind {
    /// A BME280 in a room: channel 0 °C (ambient, about 22 with a daily swing of ±3),
    /// channel 1 %RH (about 45, opposite to the temperature), channel 2 hPa (about 1013).
    Environment,
    /// An ADXL345 on a pump, one block per read: channel 0 RMS g (0.13–0.27 with the load),
    /// channel 1 peak g (RMS × a crest factor of about 2, never below the RMS).
    Vibration,
    /// An INA219 on a pump's supply: channel 0 mA (600–1000 with the load), channel 1 V
    /// (about 12, sagging a little under load), channel 2 W, always V · mA / 1000 of the two
    /// readings (computed in f32 from the reported values).
    Power,
    /// A known signal for tests: one unitless channel whose value is the number of earlier
    /// successful reads (0, 1, 2, …; exact up to 2^24, where f32 runs out of integers). It
    /// never has random faults and only honours injected dropouts: reads fail and the count
    /// does not advance, so the next successful read continues where the last one stopped.
    Counter,
}

impl SimKind {
    /// Every kind, in declaration order.
    pub const ALL: [SimKind; 4] =
        [SimKind::Environment, SimKind::Vibration, SimKind::Power, SimKind::Counter];

    /// The names [`SimKind::name`] gives, in the order of [`SimKind::ALL`].
    const NAMES: [&'static str; 4] = ["environment", "vibration", "power", "counter"];

    /// The lowercase name: `environment`, `vibration`, `power`, `counter`.
    pub fn name(self) -> &'static str {
        match self {
            SimKind::Environment => "environment",
            SimKind::Vibration => "vibration",
            SimKind::Power => "power",
            SimKind::Counter => "counter",
        }
    }

    /// The unit of each channel, by channel number (the real chip's layout).
    pub fn channels(self) -> &'static [Unit] {
        match self {
            SimKind::Environment => &[Unit::Celsius, Unit::PercentRh, Unit::Hectopascal],
            SimKind::Vibration => &[Unit::G, Unit::G],
            SimKind::Power => &[Unit::Milliampere, Unit::Volt, Unit::Watt],
            SimKind::Counter => &[Unit::Unitless],
        }
    }

    /// The model's metrics behind the channels (derived channels have none of their own).
    fn metrics(self) -> &'static [&'static str] {
        match self {
            SimKind::Environment => &["ambient_temperature", "humidity", "air_pressure"],
            SimKind::Vibration => &["vibration_rms", "crest_factor"],
            SimKind::Power => &["load_current", "bus_voltage"],
            SimKind::Counter => &[],
        }
    }
}

impl fmt::Display for SimKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SimKind {
    type Err = UnknownName;

    fn from_str(s: &str) -> Result<SimKind, UnknownName> {
        SimKind::ALL
            .into_iter()
            .find(|kind| kind.name() == s)
            .ok_or_else(|| UnknownName::new("simulated sensor kind", s, &SimKind::NAMES))
    }
}

/// Why a simulated sensor could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimError {
    /// The device does not answer: a dropout episode.
    Timeout,
}

impl SensorError for SimError {
    fn fault_code(&self) -> FaultCode {
        match self {
            SimError::Timeout => FaultCode::Timeout,
        }
    }
}

impl fmt::Display for SimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SimError::Timeout => f.write_str("the simulated sensor did not answer (dropout)"),
        }
    }
}

impl std::error::Error for SimError {}

/// Where a simulated sensor's values come from.
#[derive(Debug)]
enum Source {
    /// The signal model: one device with the kind's metrics, turned into the chip's channels.
    Model(Simulator, Chip),
    /// [`SimKind::Counter`].
    Counter { count: u32, dropout_until_ms: i64 },
}

/// The chip whose channels a model-backed sensor reports.
#[derive(Debug, Clone, Copy)]
enum Chip {
    Bme280,
    Adxl345,
    Ina219,
}

/// A sensor that imitates a real chip with the signal model (see [`SimKind`] for the
/// channels and the module docs for the signals and faults).
///
/// Values depend only on the seed and the sequence of clock times at which it is read. The
/// quality is [`Quality::Good`], or [`Quality::Uncertain`] on a channel in a noise burst. A
/// dropout makes [`Sensor::init`] and [`Sensor::read`] fail with [`SimError::Timeout`].
///
/// # Channels
///
/// The layout depends on the kind, so [`Sensor::CHANNELS`] (a constant of the type) is only
/// the counter's one [`Unit::Unitless`] channel; [`Sensor::channels`] is overridden with the
/// kind's layout, and [`read_or_fault`](crate::sensor::read_or_fault) gives one fault reading
/// per channel of the kind:
///
/// ```
/// # use sensors::sensor::read_or_fault;
/// # use sensors::sim::{FaultKind, SimClock, SimKind, SimulatedSensor};
/// # struct NoDelay;
/// # impl embedded_hal::delay::DelayNs for NoDelay { fn delay_ns(&mut self, _: u32) {} }
/// let clock = SimClock::new(0);
/// let mut sensor = SimulatedSensor::new(SimKind::Power, 1, clock.clone());
/// sensor.inject(FaultKind::Dropout, 5_000);
/// assert_eq!(read_or_fault(&mut sensor, &mut NoDelay).len(), 3);
/// ```
#[derive(Debug)]
pub struct SimulatedSensor {
    kind: SimKind,
    clock: SimClock,
    source: Source,
}

impl SimulatedSensor {
    /// A sensor of `kind` seeded with `seed`, reading the time from `clock`; random faults are
    /// off (turn them on with [`SimulatedSensor::with_random_faults`]).
    pub fn new(kind: SimKind, seed: u64, clock: SimClock) -> SimulatedSensor {
        let model = |chip| {
            let sim = Simulator::new(&SimConfig {
                seed,
                devices: vec![kind.name().to_string()],
                metrics: kind.metrics().iter().map(|m| m.to_string()).collect(),
                faults: false,
            });
            Source::Model(sim, chip)
        };
        let source = match kind {
            SimKind::Environment => model(Chip::Bme280),
            SimKind::Vibration => model(Chip::Adxl345),
            SimKind::Power => model(Chip::Ina219),
            SimKind::Counter => Source::Counter { count: 0, dropout_until_ms: i64::MIN },
        };
        SimulatedSensor { kind, clock, source }
    }

    /// Turns the random fault schedule on or off (the counter has none). The first episode
    /// comes 20–40 s after the next read and is an excursion of channel 0 (a hot room, a
    /// vibrating bearing, a stalling load); then one every 1–3 minutes.
    pub fn with_random_faults(mut self, on: bool) -> Self {
        if let Source::Model(sim, _) = &mut self.source {
            sim.set_random_faults(on);
        }
        self
    }

    /// What this sensor imitates.
    pub fn kind(&self) -> SimKind {
        self.kind
    }

    /// The unit of each channel for this sensor's kind ([`SimKind::channels`]).
    pub fn channels(&self) -> &'static [Unit] {
        self.kind.channels()
    }

    /// Starts a fault of `kind` at the clock's current time, lasting `duration_ms`
    /// (≤ 0: nothing, except for a spike).
    ///
    /// Excursion, spike and drift act on channel 0 (and the channels derived from it: the
    /// peak g, the power); stuck and noise burst on every channel; a dropout on the whole
    /// device. See [`Simulator::inject`] for each kind. The counter only honours dropouts.
    pub fn inject(&mut self, kind: FaultKind, duration_ms: i64) {
        let now_ms = self.clock.now_ms();
        match &mut self.source {
            Source::Model(sim, _) => {
                let metrics = match kind {
                    FaultKind::Excursion | FaultKind::Spike | FaultKind::Drift => 1,
                    FaultKind::Dropout => 1,
                    FaultKind::Stuck | FaultKind::NoiseBurst => self.kind.metrics().len(),
                };
                for metric in 0..metrics {
                    sim.inject(0, metric, kind, now_ms, duration_ms);
                }
            }
            Source::Counter { dropout_until_ms, .. } => {
                let end_ms = now_ms.saturating_add(duration_ms);
                if kind == FaultKind::Dropout && end_ms > now_ms {
                    *dropout_until_ms = (*dropout_until_ms).max(end_ms);
                }
            }
        }
    }

    fn dropped_out(&self, now_ms: i64) -> bool {
        match &self.source {
            Source::Model(sim, _) => sim.is_dropped_out(0, now_ms),
            Source::Counter { dropout_until_ms, .. } => now_ms < *dropout_until_ms,
        }
    }
}

/// The value and quality of metric `index` in one step's readings.
fn metric(readings: &[SimReading], index: usize) -> Result<(f64, Quality), SimError> {
    // Every metric of a device that is not in a dropout is present; a missing one can only
    // mean that the device did not answer.
    let reading = readings.get(index).ok_or(SimError::Timeout)?;
    let quality = match reading.fault {
        Some(FaultKind::NoiseBurst) => Quality::Uncertain,
        _ => Quality::Good,
    };
    Ok((reading.value, quality))
}

/// The worse of two qualities (for a derived channel).
fn worse(a: Quality, b: Quality) -> Quality {
    if a == Quality::Good { b } else { a }
}

impl Sensor for SimulatedSensor {
    type Error = SimError;

    /// One unitless channel: the layout depends on the kind, see [`Sensor::channels`].
    const CHANNELS: &'static [Unit] = &[Unit::Unitless];

    fn channels(&self) -> &'static [Unit] {
        self.kind.channels()
    }

    /// Succeeds unless the device is in a dropout (a silent device does not answer its
    /// identity check either).
    fn init(&mut self, _delay: &mut impl DelayNs) -> Result<(), SimError> {
        if self.dropped_out(self.clock.now_ms()) { Err(SimError::Timeout) } else { Ok(()) }
    }

    fn read(&mut self, _delay: &mut impl DelayNs) -> Result<Readings, SimError> {
        let now_ms = self.clock.now_ms();
        let (sim, chip) = match &mut self.source {
            Source::Model(sim, chip) => (sim, *chip),
            Source::Counter { count, dropout_until_ms } => {
                if now_ms < *dropout_until_ms {
                    return Err(SimError::Timeout);
                }
                let value = *count as f32;
                *count = count.saturating_add(1);
                return Ok(Readings::from_iter([ChannelReading::good(0, Unit::Unitless, value)]));
            }
        };
        let step = sim.step(now_ms);
        if step.is_empty() {
            return Err(SimError::Timeout);
        }
        let readings = match chip {
            Chip::Bme280 => {
                let (celsius, q_t) = metric(&step, 0)?;
                let (rh, q_h) = metric(&step, 1)?;
                let (hpa, q_p) = metric(&step, 2)?;
                // The BME280's compensation clamps humidity to 0..100 %RH.
                let rh = rh.clamp(0.0, 100.0);
                Readings::from_iter([
                    ChannelReading {
                        channel: 0,
                        unit: Unit::Celsius,
                        value: celsius as f32,
                        quality: q_t,
                    },
                    ChannelReading {
                        channel: 1,
                        unit: Unit::PercentRh,
                        value: rh as f32,
                        quality: q_h,
                    },
                    ChannelReading {
                        channel: 2,
                        unit: Unit::Hectopascal,
                        value: hpa as f32,
                        quality: q_p,
                    },
                ])
            }
            Chip::Adxl345 => {
                let (rms, q_rms) = metric(&step, 0)?;
                let (crest, q_crest) = metric(&step, 1)?;
                // A spike or drift can push the RMS down: it is a magnitude, never below 0;
                // the crest factor of any signal is at least 1, so the peak is never below
                // the RMS.
                let rms = rms.max(0.0);
                // (The faults stay far below the chip's 16 g range, so nothing clips.)
                let peak = rms * crest.max(1.0);
                let quality = worse(q_rms, q_crest);
                Readings::from_iter([
                    ChannelReading { channel: 0, unit: Unit::G, value: rms as f32, quality: q_rms },
                    ChannelReading { channel: 1, unit: Unit::G, value: peak as f32, quality },
                ])
            }
            Chip::Ina219 => {
                let (milliamps, q_i) = metric(&step, 0)?;
                let (volts, q_v) = metric(&step, 1)?;
                let milliamps = milliamps as f32;
                let volts = volts.clamp(0.0, INA219_BUS_MAX_V) as f32;
                let watts = volts * milliamps / 1000.0;
                Readings::from_iter([
                    ChannelReading {
                        channel: 0,
                        unit: Unit::Milliampere,
                        value: milliamps,
                        quality: q_i,
                    },
                    ChannelReading { channel: 1, unit: Unit::Volt, value: volts, quality: q_v },
                    ChannelReading {
                        channel: 2,
                        unit: Unit::Watt,
                        value: watts,
                        quality: worse(q_i, q_v),
                    },
                ])
            }
        };
        Ok(readings)
    }
}

#[cfg(test)]
mod tests {
    use std::string::ToString;
    use std::vec::Vec;

    use super::*;
    use crate::sensor::{fault_readings, read_or_fault};

    const START_MS: i64 = 1_700_000_000_000;

    struct NoDelay;

    impl DelayNs for NoDelay {
        fn delay_ns(&mut self, _ns: u32) {}
    }

    fn sensor(kind: SimKind, seed: u64) -> (SimulatedSensor, SimClock) {
        let clock = SimClock::new(START_MS);
        (SimulatedSensor::new(kind, seed, clock.clone()), clock)
    }

    /// `count` reads, `step_ms` apart, starting at the clock's time.
    fn reads(
        sensor: &mut SimulatedSensor,
        clock: &SimClock,
        count: usize,
        step_ms: i64,
    ) -> Vec<Result<Readings, SimError>> {
        (0..count)
            .map(|_| {
                let result = sensor.read(&mut NoDelay);
                clock.advance(step_ms);
                result
            })
            .collect()
    }

    fn values(readings: &[Result<Readings, SimError>], channel: usize) -> Vec<f32> {
        readings.iter().map(|r| r.as_ref().unwrap()[channel].value).collect()
    }

    #[test]
    fn the_clock_is_shared_by_its_clones() {
        let clock = SimClock::new(5);
        let other = clock.clone();
        other.advance(10);
        assert_eq!(clock.now_ms(), 15);
        clock.set(-3);
        assert_eq!(other.now_ms(), -3);
        clock.set(i64::MAX);
        clock.advance(1);
        assert_eq!(other.now_ms(), i64::MAX);
    }

    #[test]
    fn the_same_seed_and_times_give_the_same_readings() {
        for kind in SimKind::ALL {
            let (mut a, clock_a) = sensor(kind, 3);
            let (mut b, clock_b) = sensor(kind, 3);
            let (a, b) = (reads(&mut a, &clock_a, 200, 1_000), reads(&mut b, &clock_b, 200, 1_000));
            assert_eq!(a, b, "{kind}");
        }
        let (mut a, clock_a) = sensor(SimKind::Environment, 3);
        let (mut c, clock_c) = sensor(SimKind::Environment, 4);
        assert_ne!(reads(&mut a, &clock_a, 5, 1_000), reads(&mut c, &clock_c, 5, 1_000));
    }

    #[test]
    fn every_kind_reports_its_chips_channel_layout() {
        for kind in SimKind::ALL {
            let (mut s, _clock) = sensor(kind, 1);
            s.init(&mut NoDelay).unwrap();
            let readings = s.read(&mut NoDelay).unwrap();
            let units: Vec<Unit> = readings.iter().map(|r| r.unit).collect();
            let channels: Vec<u8> = readings.iter().map(|r| r.channel).collect();
            assert_eq!(units, kind.channels(), "{kind}");
            assert_eq!(channels, (0..kind.channels().len() as u8).collect::<Vec<_>>(), "{kind}");
            assert!(readings.iter().all(|r| r.quality == Quality::Good), "{kind}");
            assert_eq!(s.channels(), kind.channels());
        }
    }

    #[test]
    fn without_faults_values_stay_plausible_over_a_simulated_day() {
        for seed in [1, 2] {
            for kind in [SimKind::Environment, SimKind::Vibration, SimKind::Power] {
                let (mut s, clock) = sensor(kind, seed);
                for read in reads(&mut s, &clock, 8_640, 10_000) {
                    let r = read.unwrap();
                    let v: Vec<f32> = r.iter().map(|c| c.value).collect();
                    assert!(r.iter().all(|c| c.quality == Quality::Good), "{kind}: {r:?}");
                    match kind {
                        SimKind::Environment => {
                            assert!((18.0..=26.5).contains(&v[0]), "°C {}", v[0]);
                            assert!((25.0..=65.0).contains(&v[1]), "%RH {}", v[1]);
                            assert!((1008.0..=1018.0).contains(&v[2]), "hPa {}", v[2]);
                        }
                        SimKind::Vibration => {
                            assert!((0.1..=0.3).contains(&v[0]), "RMS {} g", v[0]);
                            assert!(v[1] >= v[0] && v[1] <= 1.0, "peak {} g, RMS {}", v[1], v[0]);
                        }
                        _ => {
                            assert!((550.0..=1050.0).contains(&v[0]), "{} mA", v[0]);
                            assert!((11.8..=12.2).contains(&v[1]), "{} V", v[1]);
                            assert!((6.0..=13.0).contains(&v[2]), "{} W", v[2]);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn power_is_volts_times_milliamps_over_1000_even_under_faults() {
        let (mut s, clock) = sensor(SimKind::Power, 5);
        let mut s_faulty = SimulatedSensor::new(SimKind::Power, 5, clock.clone());
        s_faulty = s_faulty.with_random_faults(true);
        for _ in 0..3_600 {
            for sensor in [&mut s, &mut s_faulty] {
                if let Ok(r) = sensor.read(&mut NoDelay) {
                    assert_eq!(r[2].value, r[1].value * r[0].value / 1000.0, "{r:?}");
                }
            }
            clock.advance(1_000);
        }
    }

    #[test]
    fn the_counter_counts_successful_reads_and_pauses_in_a_dropout() {
        let (mut s, clock) = sensor(SimKind::Counter, 1);
        let mut seen = Vec::new();
        for second in 0..20 {
            if second == 5 {
                s.inject(FaultKind::Dropout, 3_000);
                // The counter ignores every other fault.
                for kind in FaultKind::ALL.into_iter().filter(|&k| k != FaultKind::Dropout) {
                    s.inject(kind, 60_000);
                }
            }
            seen.push(s.read(&mut NoDelay).ok().map(|r| (r[0].value, r[0].quality)));
            clock.advance(1_000);
        }
        let mut expected: Vec<Option<(f32, Quality)>> =
            (0..5).map(|n| Some((n as f32, Quality::Good))).collect();
        expected.extend([None, None, None]);
        expected.extend((5..17).map(|n| Some((n as f32, Quality::Good))));
        assert_eq!(seen, expected);
    }

    #[test]
    fn an_injected_dropout_fails_init_and_read_with_a_timeout() {
        for kind in SimKind::ALL {
            let (mut s, clock) = sensor(kind, 2);
            s.read(&mut NoDelay).unwrap();
            s.inject(FaultKind::Dropout, 2_000);
            assert_eq!(s.init(&mut NoDelay), Err(SimError::Timeout), "{kind}");
            let error = s.read(&mut NoDelay).unwrap_err();
            assert_eq!(error, SimError::Timeout);
            assert_eq!(error.fault_code(), FaultCode::Timeout);
            // Per channel of the kind, through `channels()`.
            let faults = fault_readings(s.channels(), error.fault_code());
            assert_eq!(faults.len(), kind.channels().len(), "{kind}");
            // Through the generic `read_or_fault`: the same, one per channel of the kind.
            let generic = read_or_fault(&mut s, &mut NoDelay);
            let layout = |r: &Readings| -> Vec<_> {
                r.iter().map(|r| (r.channel, r.unit, r.quality)).collect()
            };
            assert_eq!(layout(&generic), layout(&faults), "{kind}");
            clock.advance(2_000);
            assert_eq!(s.init(&mut NoDelay), Ok(()), "{kind}");
            assert!(s.read(&mut NoDelay).is_ok(), "{kind}");
        }
    }

    /// Readings of a sensor with `kind` injected after 10 reads (1 s apart) for `duration_ms`,
    /// and of its twin without.
    fn with_twin(
        sim_kind: SimKind,
        kind: FaultKind,
        duration_ms: i64,
        count: usize,
    ) -> Vec<(Readings, Readings)> {
        let clock = SimClock::new(START_MS);
        let mut faulty = SimulatedSensor::new(sim_kind, 8, clock.clone());
        let mut clean = SimulatedSensor::new(sim_kind, 8, clock.clone());
        (0..count)
            .map(|i| {
                if i == 10 {
                    faulty.inject(kind, duration_ms);
                }
                let pair = (faulty.read(&mut NoDelay).unwrap(), clean.read(&mut NoDelay).unwrap());
                clock.advance(1_000);
                pair
            })
            .collect()
    }

    #[test]
    fn an_injected_spike_moves_one_sample_of_channel_0() {
        let pairs = with_twin(SimKind::Environment, FaultKind::Spike, 0, 20);
        for (i, (faulty, clean)) in pairs.iter().enumerate() {
            let offset = faulty[0].value - clean[0].value;
            if i == 10 {
                assert!((offset - 10.0).abs() < 1e-3, "read {i}: {offset}");
            } else {
                assert_eq!(faulty, clean, "read {i}");
            }
            assert_eq!(faulty[1..], clean[1..]);
        }
    }

    #[test]
    fn an_injected_drift_moves_channel_0_by_its_total_and_derived_channels_follow() {
        let pairs = with_twin(SimKind::Power, FaultKind::Drift, 20_000, 40);
        let (faulty, clean) = &pairs[30];
        assert!((faulty[0].value - clean[0].value - 400.0).abs() < 1e-2);
        assert_eq!(faulty[1], clean[1]);
        assert!(faulty[2].value > clean[2].value + 4.0, "power follows the current");
        assert_eq!(pairs[31].0, pairs[31].1, "snapped back after the drift");
    }

    #[test]
    fn an_injected_stuck_fault_freezes_every_channel() {
        let pairs = with_twin(SimKind::Vibration, FaultKind::Stuck, 10_000, 30);
        let frozen = &pairs[9].0;
        for (i, (faulty, clean)) in pairs.iter().enumerate() {
            match i {
                10..=20 => assert_eq!(faulty, frozen, "read {i}"),
                _ => assert_eq!(faulty, clean, "read {i}"),
            }
        }
    }

    #[test]
    fn an_injected_excursion_heats_the_room() {
        let pairs = with_twin(SimKind::Environment, FaultKind::Excursion, 30_000, 50);
        for (faulty, clean) in &pairs[16..=34] {
            assert!((38.0..=42.0).contains(&faulty[0].value), "{}", faulty[0].value);
            assert_eq!(faulty[1..], clean[1..]);
        }
        assert_eq!(pairs[45].0, pairs[45].1);
    }

    #[test]
    fn an_injected_noise_burst_widens_the_spread_and_marks_readings_uncertain() {
        let pairs = with_twin(SimKind::Environment, FaultKind::NoiseBurst, 100_000, 210);
        let spread = |pairs: &[(Readings, Readings)], faulty: bool| -> f64 {
            let v: Vec<f64> = pairs
                .iter()
                .map(|(f, c)| f64::from(if faulty { f[2].value } else { c[2].value }))
                .collect();
            let d: Vec<f64> = v.windows(2).map(|w| w[1] - w[0]).collect();
            let mean = d.iter().sum::<f64>() / d.len() as f64;
            (d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / d.len() as f64).sqrt()
        };
        let ratio = spread(&pairs[10..=110], true) / spread(&pairs[10..=110], false);
        assert!((5.0..12.0).contains(&ratio), "hPa spread ratio {ratio}");
        for (i, (faulty, _)) in pairs.iter().enumerate() {
            let expected = if (10..=110).contains(&i) { Quality::Uncertain } else { Quality::Good };
            assert!(faulty.iter().all(|r| r.quality == expected), "read {i}: {faulty:?}");
        }
    }

    #[test]
    fn random_faults_start_with_an_excursion_of_channel_0_within_40_seconds() {
        let (s, clock) = sensor(SimKind::Vibration, 1);
        let mut s = s.with_random_faults(true);
        let rms = values(&reads(&mut s, &clock, 60, 1_000), 0);
        assert!(rms.iter().any(|&g| g > 1.0), "no excursion: {rms:?}");
        assert!(rms[..20].iter().all(|&g| g < 0.5), "an excursion before 20 s: {rms:?}");
        let (mut quiet, clock) = sensor(SimKind::Vibration, 1);
        let rms = values(&reads(&mut quiet, &clock, 600, 1_000), 0);
        assert!(rms.iter().all(|&g| g < 0.5), "random faults are off by default");
    }

    #[test]
    fn kinds_parse_and_print_their_lowercase_names() {
        for kind in SimKind::ALL {
            assert_eq!(kind.to_string().parse::<SimKind>(), Ok(kind));
        }
        let error = "bme280".parse::<SimKind>().unwrap_err();
        assert_eq!(error.name(), "bme280");
        assert_eq!(
            error.to_string(),
            "unknown simulated sensor kind `bme280`; expected one of: environment, vibration, \
             power, counter"
        );
        assert_eq!(SimError::Timeout.to_string(), "the simulated sensor did not answer (dropout)");
    }
}
