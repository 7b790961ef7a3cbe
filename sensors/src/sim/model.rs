//! The signal model: [`Shape`]s, fault episodes and the [`Simulator`] state machine.

use core::f64::consts::TAU;
use core::fmt;
use core::str::FromStr;
use std::format;
use std::string::String;
use std::vec::Vec;

use super::UnknownName;

/// Milliseconds in a day, for the daily cycle.
const DAY_MS: f64 = 86_400_000.0;
/// Mean time between random single-sample spikes of one series.
const SPIKE_MEAN_INTERVAL_S: f64 = 600.0;
/// Delay of the first random fault episode after the first step (a demo should show an
/// alert quickly).
const FIRST_FAULT_S: (i64, i64) = (20, 40);
/// Time between random fault episodes.
const FAULT_INTERVAL_S: (i64, i64) = (60, 180);
/// How long an excursion takes to reach its peak, and to come back.
const EXCURSION_RAMP_MS: i64 = 5_000;
/// Random schedule: a roll in 0..100 picks the episode. Below `EXCURSION_ROLL` an excursion,
/// then drift, stuck and noise burst up to their bounds, dropout for the rest. The bounds are
/// those of the agent's earlier simulator with the stuck share split, so a seed still gives
/// the same episodes except where a stuck value became a noise burst.
const EXCURSION_ROLL: u32 = 40;
/// See [`EXCURSION_ROLL`].
const DRIFT_ROLL: u32 = 65;
/// See [`EXCURSION_ROLL`].
const STUCK_ROLL: u32 = 77;
/// See [`EXCURSION_ROLL`].
const NOISE_BURST_ROLL: u32 = 85;

/// How many times a noise burst amplifies a series' noise: well outside the normal spread
/// (a detector sees it at once), yet the signal still shows through.
pub const NOISE_BURST_GAIN: f64 = 8.0;

/// The signal model of a metric; see the module docs for the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shape {
    /// `temperature`: a pump bearing, °C.
    Temperature,
    /// `vibration`: vibration velocity RMS, mm/s.
    Vibration,
    /// `pressure`: discharge pressure, bar.
    Pressure,
    /// `current`: motor current, A.
    Current,
    /// `humidity`: relative humidity, %.
    Humidity,
    /// Any other metric: 50 ± 10 daily, unitless.
    Generic,
    /// `ambient_temperature`: room air, °C (BME280).
    AmbientTemperature,
    /// `air_pressure`: barometric pressure, hPa (BME280).
    AirPressure,
    /// `vibration_rms`: vibration acceleration RMS, g (ADXL345).
    VibrationRms,
    /// `crest_factor`: peak over RMS of the vibration, ≥ 1 (ADXL345 peak = RMS × crest).
    CrestFactor,
    /// `load_current`: the load's supply current, mA (INA219).
    LoadCurrent,
    /// `bus_voltage`: the supply voltage, V (INA219).
    BusVoltage,
}

impl Shape {
    /// The shape of metric `metric`: the known names select their shape (see the module
    /// docs), every other name [`Shape::Generic`].
    pub fn of(metric: &str) -> Shape {
        match metric {
            "temperature" => Shape::Temperature,
            "vibration" => Shape::Vibration,
            "pressure" => Shape::Pressure,
            "current" => Shape::Current,
            "humidity" => Shape::Humidity,
            "ambient_temperature" => Shape::AmbientTemperature,
            "air_pressure" => Shape::AirPressure,
            "vibration_rms" => Shape::VibrationRms,
            "crest_factor" => Shape::CrestFactor,
            "load_current" => Shape::LoadCurrent,
            "bus_voltage" => Shape::BusVoltage,
            _ => Shape::Generic,
        }
    }

    /// The metric name that selects this shape (`generic` for [`Shape::Generic`]).
    pub fn name(self) -> &'static str {
        match self {
            Shape::Temperature => "temperature",
            Shape::Vibration => "vibration",
            Shape::Pressure => "pressure",
            Shape::Current => "current",
            Shape::Humidity => "humidity",
            Shape::Generic => "generic",
            Shape::AmbientTemperature => "ambient_temperature",
            Shape::AirPressure => "air_pressure",
            Shape::VibrationRms => "vibration_rms",
            Shape::CrestFactor => "crest_factor",
            Shape::LoadCurrent => "load_current",
            Shape::BusVoltage => "bus_voltage",
        }
    }

    /// The standard deviation of the signal's white noise (outside noise bursts).
    pub fn noise_sigma(self) -> f64 {
        match self {
            Shape::Temperature => 0.3,
            Shape::Vibration => 0.12,
            Shape::Pressure => 0.03,
            Shape::Current => 0.2,
            Shape::Humidity => 0.8,
            Shape::Generic => 1.0,
            Shape::AmbientTemperature => 0.05,
            Shape::AirPressure => 0.02,
            Shape::VibrationRms => 0.005,
            Shape::CrestFactor => 0.05,
            Shape::LoadCurrent => 5.0,
            Shape::BusVoltage => 0.01,
        }
    }

    /// How far a drift episode has moved the signal by its end.
    pub fn drift_total(self) -> f64 {
        match self {
            Shape::Temperature => 15.0,
            Shape::Vibration => 6.0,
            Shape::Pressure => -1.5,
            Shape::Current => 6.0,
            Shape::Humidity => 25.0,
            Shape::Generic => 30.0,
            // A failing HVAC, a weather front, bearing wear, a battery running down.
            Shape::AmbientTemperature => 8.0,
            Shape::AirPressure => -20.0,
            Shape::VibrationRms => 0.6,
            Shape::CrestFactor => 1.5,
            Shape::LoadCurrent => 400.0,
            Shape::BusVoltage => -1.5,
        }
    }

    /// The size of an injected single-sample spike; random spikes are 0.75–1.25 times this.
    pub fn spike_size(self) -> f64 {
        match self {
            Shape::Temperature => 20.0,
            Shape::Vibration => 8.0,
            Shape::Pressure => 2.0,
            Shape::Current => 15.0,
            Shape::Humidity => 30.0,
            Shape::Generic => 40.0,
            Shape::AmbientTemperature => 10.0,
            Shape::AirPressure => 30.0,
            Shape::VibrationRms => 2.0,
            Shape::CrestFactor => 4.0,
            Shape::LoadCurrent => 1500.0,
            Shape::BusVoltage => 3.0,
        }
    }

    /// The peak of an excursion as `(lowest, span)`: random excursions draw from
    /// `lowest..lowest + span`, injected ones take the middle.
    fn excursion_peak(self) -> (f64, f64) {
        match self {
            Shape::Temperature => (84.0, 6.0),
            Shape::Vibration => (9.0, 3.0),
            Shape::Pressure => (6.0, 0.5),
            Shape::Current => (25.0, 5.0),
            Shape::Humidity => (92.0, 6.0),
            Shape::Generic => (100.0, 20.0),
            Shape::AmbientTemperature => (38.0, 4.0),
            Shape::AirPressure => (985.0, 5.0),
            Shape::VibrationRms => (1.2, 0.6),
            Shape::CrestFactor => (5.0, 1.0),
            Shape::LoadCurrent => (2000.0, 400.0),
            Shape::BusVoltage => (10.5, 0.5),
        }
    }

    /// Whether the random schedule's excursions pick this shape (something overheats or
    /// overloads).
    fn excursion_prone(self) -> bool {
        matches!(
            self,
            Shape::Temperature
                | Shape::AmbientTemperature
                | Shape::VibrationRms
                | Shape::LoadCurrent
        )
    }

    /// The fault-free level, given the daily (−1..1) and load (0..1) cycles.
    fn level(self, daily: f64, load: f64) -> f64 {
        let swing = load - 0.5;
        match self {
            Shape::Temperature => 45.0 + 3.0 * daily + 5.0 * swing,
            Shape::Vibration => 2.0 + 0.8 * swing,
            Shape::Pressure => 4.0 + 0.4 * swing,
            Shape::Current => 12.0 + 6.0 * swing,
            Shape::Humidity => 45.0 - 10.0 * daily,
            Shape::Generic => 50.0 + 10.0 * daily,
            Shape::AmbientTemperature => 22.0 + 3.0 * daily,
            Shape::AirPressure => 1013.25 + 1.5 * daily,
            Shape::VibrationRms => 0.2 + 0.14 * swing,
            Shape::CrestFactor => 2.0 + 0.4 * swing,
            Shape::LoadCurrent => 800.0 + 400.0 * swing,
            Shape::BusVoltage => 12.0 - 0.2 * swing,
        }
    }

    /// The bounds the fault-free signal stays within.
    fn bounds(self) -> (f64, f64) {
        match self {
            Shape::Vibration => (0.05, f64::INFINITY),
            Shape::Humidity => (0.0, 100.0),
            Shape::VibrationRms => (0.02, f64::INFINITY),
            Shape::CrestFactor => (1.0, f64::INFINITY),
            Shape::LoadCurrent | Shape::BusVoltage => (0.0, f64::INFINITY),
            _ => (f64::NEG_INFINITY, f64::INFINITY),
        }
    }

    /// The fault-free signal with standard normal `noise`.
    fn signal(self, daily: f64, load: f64, noise: f64) -> f64 {
        let (low, high) = self.bounds();
        (self.level(daily, load) + self.noise_sigma() * noise).clamp(low, high)
    }
}

/// A kind of fault; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// The value ramps to the shape's peak, holds, and ramps back.
    Excursion,
    /// One sample off by the shape's spike size.
    Spike,
    /// An offset growing linearly to the shape's drift total.
    Drift,
    /// The last value, repeated.
    Stuck,
    /// The whole device sends nothing.
    Dropout,
    /// The noise is amplified [`NOISE_BURST_GAIN`] times.
    NoiseBurst,
}

impl FaultKind {
    /// Every kind, in declaration order.
    pub const ALL: [FaultKind; 6] = [
        FaultKind::Excursion,
        FaultKind::Spike,
        FaultKind::Drift,
        FaultKind::Stuck,
        FaultKind::Dropout,
        FaultKind::NoiseBurst,
    ];

    /// The names [`FaultKind::name`] gives, in the order of [`FaultKind::ALL`].
    const NAMES: [&'static str; 6] =
        ["excursion", "spike", "drift", "stuck", "dropout", "noise_burst"];

    /// The lowercase name: `excursion`, `spike`, `drift`, `stuck`, `dropout`, `noise_burst`.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Excursion => "excursion",
            FaultKind::Spike => "spike",
            FaultKind::Drift => "drift",
            FaultKind::Stuck => "stuck",
            FaultKind::Dropout => "dropout",
            FaultKind::NoiseBurst => "noise_burst",
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FaultKind {
    type Err = UnknownName;

    fn from_str(s: &str) -> Result<FaultKind, UnknownName> {
        FaultKind::ALL
            .into_iter()
            .find(|kind| kind.name() == s)
            .ok_or_else(|| UnknownName::new("fault kind", s, &FaultKind::NAMES))
    }
}

/// What a [`Simulator`] simulates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimConfig {
    /// Seed of the random generator: the same seed gives the same readings.
    pub seed: u64,
    /// Device names, in order; a device is addressed by its index here.
    pub devices: Vec<String>,
    /// Metric names of every device, in order; each selects a [`Shape`] ([`Shape::of`]) and
    /// becomes the series `<device>/<metric>`.
    pub metrics: Vec<String>,
    /// Whether to schedule random faults (episodes and spikes); explicit injection works
    /// either way.
    pub faults: bool,
}

/// One reading produced by [`Simulator::step`].
#[derive(Debug, Clone, PartialEq)]
pub struct SimReading {
    /// Index of the device in [`SimConfig::devices`].
    pub device: usize,
    /// Index of the metric in [`SimConfig::metrics`].
    pub metric: usize,
    /// `<device>/<metric>`.
    pub series: String,
    /// The value.
    pub value: f64,
    /// The fault that shaped this value, if any (a spike on this sample, else the series'
    /// episode): ground truth for detector tests and the quality of simulated sensors.
    pub fault: Option<FaultKind>,
}

/// A fault episode on one series.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Episode {
    /// The value lerps towards `peak` along a trapezoid between `start_ms` and `end_ms`.
    Excursion { start_ms: i64, end_ms: i64, peak: f64 },
    /// An offset growing linearly to `total` at `end_ms`.
    Drift { start_ms: i64, end_ms: i64, total: f64 },
    /// The last value, repeated until `end_ms` (`None` until the first step freezes it).
    Stuck { end_ms: i64, value: Option<f64> },
    /// Noise amplified [`NOISE_BURST_GAIN`] times until `end_ms`.
    NoiseBurst { end_ms: i64 },
}

impl Episode {
    fn end_ms(&self) -> i64 {
        match *self {
            Episode::Excursion { end_ms, .. }
            | Episode::Drift { end_ms, .. }
            | Episode::Stuck { end_ms, .. }
            | Episode::NoiseBurst { end_ms } => end_ms,
        }
    }

    fn kind(&self) -> FaultKind {
        match self {
            Episode::Excursion { .. } => FaultKind::Excursion,
            Episode::Drift { .. } => FaultKind::Drift,
            Episode::Stuck { .. } => FaultKind::Stuck,
            Episode::NoiseBurst { .. } => FaultKind::NoiseBurst,
        }
    }
}

#[derive(Debug)]
struct Channel {
    series: String,
    shape: Shape,
    episode: Option<Episode>,
    /// The previous value (before any spike), which a stuck episode freezes.
    last: Option<f64>,
    /// An injected spike waiting for the next step.
    spike_pending: bool,
}

#[derive(Debug)]
struct Device {
    /// Phase of the daily cycle (in turns): devices in different spots of the plant.
    daily_phase: f64,
    /// Phase (radians) and period of the load cycle.
    load_phase: f64,
    load_period_s: f64,
    /// No readings before this time.
    dropout_until_ms: i64,
    channels: Vec<Channel>,
}

/// The deterministic signal generator; see the module docs.
#[derive(Debug)]
pub struct Simulator {
    rng: fastrand::Rng,
    devices: Vec<Device>,
    faults: bool,
    /// When the next random fault episode starts; `None` until the first step with faults.
    next_fault_ms: Option<i64>,
    /// Whether the first random episode (always an excursion, if possible) is still to come.
    first_fault: bool,
    /// Time of the previous step, for the spike probability.
    last_step_ms: Option<i64>,
}

impl Simulator {
    /// A simulator of `config`'s devices and metrics, seeded with `config.seed`.
    pub fn new(config: &SimConfig) -> Simulator {
        let mut rng = fastrand::Rng::with_seed(config.seed);
        let devices = config
            .devices
            .iter()
            .map(|device| Device {
                daily_phase: rng.f64() * 0.5,
                load_phase: rng.f64() * TAU,
                load_period_s: 1200.0 + rng.f64() * 1200.0,
                dropout_until_ms: i64::MIN,
                channels: config
                    .metrics
                    .iter()
                    .map(|metric| Channel {
                        series: format!("{device}/{metric}"),
                        shape: Shape::of(metric),
                        episode: None,
                        last: None,
                        spike_pending: false,
                    })
                    .collect(),
            })
            .collect();
        Simulator {
            rng,
            devices,
            faults: config.faults,
            next_fault_ms: None,
            first_fault: true,
            last_step_ms: None,
        }
    }

    /// Turns the random fault schedule on or off. Turned on, the first episode comes 20–40 s
    /// after the next step (unless one was already scheduled); episodes in progress run on.
    pub fn set_random_faults(&mut self, on: bool) {
        self.faults = on;
    }

    /// Whether `device` is in a dropout at `now_ms` (false for an unknown device).
    pub fn is_dropped_out(&self, device: usize, now_ms: i64) -> bool {
        self.devices.get(device).is_some_and(|d| now_ms < d.dropout_until_ms)
    }

    /// The readings at `now_ms` (ms since the Unix epoch): one per metric of every device not
    /// in a dropout, in device then metric order. Call it with a non-decreasing clock; a clock
    /// that goes back is treated as no time passing for the spike probability.
    pub fn step(&mut self, now_ms: i64) -> Vec<SimReading> {
        let dt_s = self
            .last_step_ms
            .map_or(0.0, |last| now_ms.saturating_sub(last).max(0) as f64 / 1000.0);
        self.last_step_ms = Some(now_ms);
        if self.faults {
            self.schedule_faults(now_ms);
        }
        let spike_probability = (dt_s / SPIKE_MEAN_INTERVAL_S).min(1.0);
        // Reduced modulo the period before the sine: a raw epoch in seconds (1.7e9) loses
        // precision inside `sin`.
        let t_s = now_ms as f64 / 1000.0;
        let day_fraction = (now_ms.rem_euclid(86_400_000)) as f64 / DAY_MS;
        let mut out = Vec::with_capacity(self.devices.iter().map(|d| d.channels.len()).sum());
        for (device_index, device) in self.devices.iter_mut().enumerate() {
            if now_ms < device.dropout_until_ms {
                continue;
            }
            let daily = (TAU * day_fraction + device.daily_phase * TAU).sin();
            let load_angle = TAU * (t_s.rem_euclid(device.load_period_s) / device.load_period_s);
            let load = 0.5 + 0.5 * (load_angle + device.load_phase).sin();
            for (metric_index, channel) in device.channels.iter_mut().enumerate() {
                let noise = gaussian(&mut self.rng);
                let gain = match channel.episode {
                    Some(Episode::NoiseBurst { .. }) => NOISE_BURST_GAIN,
                    _ => 1.0,
                };
                let base = channel.shape.signal(daily, load, gain * noise);
                let mut fault = channel.episode.map(|e| e.kind());
                let mut value = match channel.episode {
                    Some(Episode::Excursion { start_ms, end_ms, peak }) => {
                        let envelope = trapezoid(now_ms, start_ms, end_ms, EXCURSION_RAMP_MS);
                        let target = peak + channel.shape.noise_sigma() * noise;
                        base + envelope * (target - base)
                    }
                    Some(Episode::Drift { start_ms, end_ms, total }) => {
                        let progress = now_ms.saturating_sub(start_ms) as f64
                            / end_ms.saturating_sub(start_ms) as f64;
                        base + total * progress.clamp(0.0, 1.0)
                    }
                    Some(Episode::Stuck { value: Some(v), .. }) => v,
                    Some(Episode::Stuck { end_ms, value: None }) => {
                        let frozen = channel.last.unwrap_or(base);
                        channel.episode = Some(Episode::Stuck { end_ms, value: Some(frozen) });
                        frozen
                    }
                    Some(Episode::NoiseBurst { .. }) | None => base,
                };
                // `last` is the value before any spike, so a stuck episode never freezes a
                // glitch.
                channel.last = Some(value);
                // No random spikes on a stuck series (it repeats), nor in a noise burst (where
                // one would not stand out); skipping the draw for both keeps a seed's random
                // sequence what it was before noise bursts took a share of stuck episodes.
                let quiet = matches!(
                    channel.episode,
                    Some(Episode::Stuck { .. } | Episode::NoiseBurst { .. })
                );
                if self.faults && !quiet && self.rng.f64() < spike_probability {
                    // Mostly upwards: sensors glitch high more often than low in practice
                    // (EMI on long cables), and a rule on `above` should see some.
                    let sign = if self.rng.f64() < 0.8 { 1.0 } else { -1.0 };
                    value += sign * channel.shape.spike_size() * (0.75 + 0.5 * self.rng.f64());
                    fault = Some(FaultKind::Spike);
                }
                if channel.spike_pending {
                    channel.spike_pending = false;
                    value += channel.shape.spike_size();
                    fault = Some(FaultKind::Spike);
                }
                if channel.episode.is_some_and(|e| now_ms >= e.end_ms()) {
                    channel.episode = None;
                }
                out.push(SimReading {
                    device: device_index,
                    metric: metric_index,
                    series: channel.series.clone(),
                    value,
                    fault,
                });
            }
        }
        out
    }

    /// Starts a fault of `kind` on metric `metric` of device `device` at `now_ms`, lasting
    /// `duration_ms`; it replaces an episode in progress on that series. Draws nothing from
    /// the random generator (see the module docs).
    ///
    /// - [`FaultKind::Dropout`] silences the whole device (`metric` is not used);
    /// - [`FaultKind::Spike`] adds the shape's spike size to the series' next reading
    ///   (`duration_ms` is not used);
    /// - an excursion heads for the middle of the shape's peak range, a drift moves by the
    ///   shape's drift total, a noise burst amplifies the noise [`NOISE_BURST_GAIN`] times.
    ///
    /// Unknown indices and a `duration_ms` ≤ 0 (except for spikes) change nothing.
    pub fn inject(
        &mut self,
        device: usize,
        metric: usize,
        kind: FaultKind,
        now_ms: i64,
        duration_ms: i64,
    ) {
        let Some(device) = self.devices.get_mut(device) else {
            return;
        };
        let end_ms = now_ms.saturating_add(duration_ms);
        if kind == FaultKind::Dropout {
            if end_ms > now_ms {
                device.dropout_until_ms = device.dropout_until_ms.max(end_ms);
            }
            return;
        }
        let Some(channel) = device.channels.get_mut(metric) else {
            return;
        };
        let start_ms = now_ms;
        let episode = match kind {
            FaultKind::Spike => {
                channel.spike_pending = true;
                return;
            }
            _ if end_ms <= start_ms => return,
            FaultKind::Excursion => {
                let (lowest, span) = channel.shape.excursion_peak();
                Episode::Excursion { start_ms, end_ms, peak: lowest + span / 2.0 }
            }
            FaultKind::Drift => {
                Episode::Drift { start_ms, end_ms, total: channel.shape.drift_total() }
            }
            FaultKind::Stuck => Episode::Stuck { end_ms, value: None },
            FaultKind::NoiseBurst => Episode::NoiseBurst { end_ms },
            FaultKind::Dropout => return,
        };
        channel.episode = Some(episode);
    }

    fn schedule_faults(&mut self, now_ms: i64) {
        let next = *self.next_fault_ms.get_or_insert_with(|| {
            now_ms.saturating_add(1000 * self.rng.i64(FIRST_FAULT_S.0..=FIRST_FAULT_S.1))
        });
        if now_ms < next || self.devices.is_empty() {
            return;
        }
        self.inject_random(now_ms);
        self.first_fault = false;
        self.next_fault_ms = Some(
            now_ms.saturating_add(1000 * self.rng.i64(FAULT_INTERVAL_S.0..=FAULT_INTERVAL_S.1)),
        );
    }

    /// Starts one random fault episode on a random device (the random schedule's shares are
    /// in the module docs).
    fn inject_random(&mut self, now_ms: i64) {
        let rng = &mut self.rng;
        let device_count = self.devices.len();
        let device = &mut self.devices[rng.usize(..device_count)];
        let roll = rng.u32(0..100);
        let prone = device.channels.iter().position(|c| c.shape.excursion_prone());
        let wants_excursion = self.first_fault || roll < EXCURSION_ROLL;
        if device.channels.is_empty() || (roll >= NOISE_BURST_ROLL && !self.first_fault) {
            device.dropout_until_ms = now_ms.saturating_add(1000 * rng.i64(20..=60));
            return;
        }
        let (index, episode) = match prone {
            Some(index) if wants_excursion => {
                let end_ms = now_ms.saturating_add(1000 * rng.i64(25..=40));
                let (lowest, span) = device.channels[index].shape.excursion_peak();
                let peak = lowest + span * rng.f64();
                (index, Episode::Excursion { start_ms: now_ms, end_ms, peak })
            }
            _ if roll < DRIFT_ROLL || self.first_fault => {
                let index = rng.usize(..device.channels.len());
                let total = device.channels[index].shape.drift_total();
                let end_ms = now_ms.saturating_add(1000 * rng.i64(120..=300));
                (index, Episode::Drift { start_ms: now_ms, end_ms, total })
            }
            _ => {
                let index = rng.usize(..device.channels.len());
                let end_ms = now_ms.saturating_add(1000 * rng.i64(30..=90));
                if roll < STUCK_ROLL {
                    (index, Episode::Stuck { end_ms, value: None })
                } else {
                    (index, Episode::NoiseBurst { end_ms })
                }
            }
        };
        device.channels[index].episode = Some(episode);
    }
}

/// 0 → 1 over `ramp_ms` after `start`, 1, then 1 → 0 over `ramp_ms` before `end`.
fn trapezoid(now: i64, start: i64, end: i64, ramp_ms: i64) -> f64 {
    let up = now.saturating_sub(start) as f64 / ramp_ms as f64;
    let down = end.saturating_sub(now) as f64 / ramp_ms as f64;
    up.min(down).clamp(0.0, 1.0)
}

/// A standard normal sample (Box–Muller); `1 - f64()` keeps the logarithm's argument in (0, 1].
fn gaussian(rng: &mut fastrand::Rng) -> f64 {
    let u1 = 1.0 - rng.f64();
    let u2 = rng.f64();
    (-2.0 * u1.ln()).sqrt() * (TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::string::ToString;
    use std::vec;

    use super::*;

    const START_MS: i64 = 1_700_000_000_000;

    fn config(seed: u64, faults: bool, metrics: &[&str]) -> SimConfig {
        SimConfig {
            seed,
            devices: (1..=3).map(|n| format!("pump-{n}")).collect(),
            metrics: metrics.iter().map(|m| m.to_string()).collect(),
            faults,
        }
    }

    /// `seconds` steps at 1 s: per series, the value at each second (`None` = no reading).
    fn series_over(sim: &mut Simulator, seconds: i64) -> HashMap<String, Vec<Option<f64>>> {
        let mut by_series: HashMap<String, Vec<Option<f64>>> = HashMap::new();
        for s in 0..seconds {
            for v in by_series.values_mut() {
                v.push(None);
            }
            for r in sim.step(START_MS + s * 1000) {
                let column =
                    by_series.entry(r.series).or_insert_with(|| vec![None; s as usize + 1]);
                *column.last_mut().unwrap() = Some(r.value);
            }
        }
        by_series
    }

    fn longest_run(values: &[Option<f64>], pred: impl Fn(Option<f64>) -> bool) -> usize {
        let (mut best, mut run) = (0, 0);
        for &v in values {
            run = if pred(v) { run + 1 } else { 0 };
            best = best.max(run);
        }
        best
    }

    /// The value of series `series` in `readings`.
    fn value_of(readings: &[SimReading], series: &str) -> Option<f64> {
        readings.iter().find(|r| r.series == series).map(|r| r.value)
    }

    /// The standard deviation of the first differences of `values` (a spread that ignores
    /// the slow cycles).
    fn diff_spread(values: &[f64]) -> f64 {
        let diffs: Vec<f64> = values.windows(2).map(|w| w[1] - w[0]).collect();
        let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
        (diffs.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / diffs.len() as f64).sqrt()
    }

    #[test]
    fn the_same_seed_gives_the_same_readings() {
        let cfg = config(7, true, &["temperature", "vibration", "pressure"]);
        let (mut a, mut b) = (Simulator::new(&cfg), Simulator::new(&cfg));
        for s in 0..1_800 {
            assert_eq!(a.step(START_MS + s * 1000), b.step(START_MS + s * 1000));
        }
        let mut c = Simulator::new(&config(8, true, &["temperature", "vibration", "pressure"]));
        let mut a = Simulator::new(&cfg);
        assert_ne!(a.step(START_MS), c.step(START_MS));
    }

    #[test]
    fn readings_are_named_device_slash_metric_and_indexed_in_order() {
        let mut sim = Simulator::new(&config(1, false, &["temperature", "flow"]));
        let readings = sim.step(START_MS);
        let names: Vec<&str> = readings.iter().map(|r| r.series.as_str()).collect();
        assert_eq!(
            names,
            [
                "pump-1/temperature",
                "pump-1/flow",
                "pump-2/temperature",
                "pump-2/flow",
                "pump-3/temperature",
                "pump-3/flow"
            ]
        );
        let indices: Vec<(usize, usize)> = readings.iter().map(|r| (r.device, r.metric)).collect();
        assert_eq!(indices, [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]);
        assert!(readings.iter().all(|r| r.fault.is_none()));
    }

    #[test]
    fn without_faults_every_signal_stays_plausible_and_complete() {
        let metrics = [
            "temperature",
            "vibration",
            "pressure",
            "current",
            "humidity",
            "other",
            "ambient_temperature",
            "air_pressure",
            "vibration_rms",
            "crest_factor",
            "load_current",
            "bus_voltage",
        ];
        let mut sim = Simulator::new(&config(3, false, &metrics));
        let ranges: HashMap<&str, (f64, f64)> = [
            ("temperature", (35.0, 55.0)),
            ("vibration", (0.05, 3.5)),
            ("pressure", (3.5, 4.5)),
            ("current", (7.0, 17.0)),
            ("humidity", (25.0, 65.0)),
            ("other", (30.0, 70.0)),
            ("ambient_temperature", (18.0, 26.0)),
            ("air_pressure", (1010.0, 1016.5)),
            ("vibration_rms", (0.1, 0.3)),
            ("crest_factor", (1.5, 2.5)),
            ("load_current", (550.0, 1050.0)),
            ("bus_voltage", (11.8, 12.2)),
        ]
        .into();
        for (series, values) in series_over(&mut sim, 3_600) {
            let metric = series.split('/').nth(1).unwrap();
            let (lo, hi) = ranges[metric];
            for v in &values {
                let v = v.expect("no dropouts without faults");
                assert!((lo..=hi).contains(&v), "{series} = {v} outside {lo}..={hi}");
            }
            let distinct = values.windows(2).filter(|w| w[0] != w[1]).count();
            assert!(distinct > 3_000, "{series} looks stuck without faults");
        }
    }

    #[test]
    fn a_temperature_excursion_above_80_lasts_about_20_seconds_within_the_first_minute() {
        let mut sim = Simulator::new(&config(1, true, &["temperature", "vibration"]));
        let series = series_over(&mut sim, 60);
        let longest = series
            .iter()
            .filter(|(name, _)| name.ends_with("/temperature"))
            .map(|(_, v)| longest_run(v, |x| x.is_some_and(|x| x > 80.0)))
            .max()
            .unwrap();
        assert!(longest >= 12, "longest run above 80 °C is {longest} s");
    }

    #[test]
    fn every_random_fault_kind_shows_up_within_an_hour_for_several_seeds() {
        for seed in [1, 2, 3, 4] {
            let mut sim = Simulator::new(&config(seed, true, &["temperature", "vibration"]));
            let series = series_over(&mut sim, 3_600);
            let excursions = series
                .iter()
                .filter(|(n, _)| n.ends_with("/temperature"))
                .map(|(_, v)| longest_run(v, |x| x.is_some_and(|x| x > 80.0)))
                .filter(|&run| run >= 12)
                .count();
            let dropout = series.values().map(|v| longest_run(v, |x| x.is_none())).max().unwrap();
            let stuck = series
                .values()
                .map(|v| {
                    let mut best = 0;
                    let mut run = 0;
                    for w in v.windows(2) {
                        run = if w[0].is_some() && w[0] == w[1] { run + 1 } else { 0 };
                        best = best.max(run);
                    }
                    best
                })
                .max()
                .unwrap();
            let drifted_vibration = series
                .iter()
                .filter(|(n, _)| n.ends_with("/vibration"))
                .any(|(_, v)| longest_run(v, |x| x.is_some_and(|x| x > 5.0)) >= 30);
            let drifted = drifted_vibration
                || series.iter().filter(|(n, _)| n.ends_with("/temperature")).any(|(_, v)| {
                    longest_run(v, |x| x.is_some_and(|x| x > 55.0 && x < 80.0)) >= 30
                });
            assert!(excursions >= 1, "seed {seed}: no excursion");
            assert!(dropout >= 20, "seed {seed}: longest dropout {dropout} s");
            assert!(stuck >= 25, "seed {seed}: longest stuck run {stuck} s");
            assert!(drifted, "seed {seed}: no drift episode");
        }
    }

    #[test]
    fn the_random_schedule_labels_its_episodes_including_noise_bursts() {
        let mut kinds = std::collections::HashSet::new();
        for seed in 1..=8 {
            let mut sim = Simulator::new(&config(seed, true, &["temperature", "vibration"]));
            for s in 0..3_600 {
                kinds.extend(sim.step(START_MS + s * 1000).iter().filter_map(|r| r.fault));
            }
        }
        for kind in [
            FaultKind::Excursion,
            FaultKind::Spike,
            FaultKind::Drift,
            FaultKind::Stuck,
            FaultKind::NoiseBurst,
        ] {
            assert!(kinds.contains(&kind), "no {kind} in 8 simulated hours");
        }
    }

    #[test]
    fn random_spikes_are_single_samples() {
        let mut sim = Simulator::new(&config(5, true, &["pressure"]));
        let series = series_over(&mut sim, 3_600);
        // Pressure only drifts downwards, so a reading above 5 bar can only be a spike.
        let spikes: usize =
            series.values().map(|v| v.iter().filter(|x| x.is_some_and(|x| x > 5.0)).count()).sum();
        let longest: usize =
            series.values().map(|v| longest_run(v, |x| x.is_some_and(|x| x > 5.0))).max().unwrap();
        assert!(spikes >= 3, "only {spikes} spikes in an hour on 3 series");
        assert_eq!(longest, 1);
    }

    /// A simulator with `kind` injected on pump-2's first metric at `inject_at` s for
    /// `duration_s`, and a twin without: per second, (faulty, clean) values of that series.
    fn with_twin(
        metric: &str,
        kind: FaultKind,
        inject_at: i64,
        duration_s: i64,
        seconds: i64,
    ) -> Vec<(Option<f64>, f64)> {
        let cfg = config(9, false, &[metric, "humidity"]);
        let (mut faulty, mut clean) = (Simulator::new(&cfg), Simulator::new(&cfg));
        let series = format!("pump-2/{metric}");
        (0..seconds)
            .map(|s| {
                let now = START_MS + s * 1000;
                if s == inject_at {
                    faulty.inject(1, 0, kind, now, duration_s * 1000);
                }
                let (f, c) = (faulty.step(now), clean.step(now));
                // Other series never notice.
                for r in c.iter().filter(|r| r.series != series && r.device != 1) {
                    assert_eq!(value_of(&f, &r.series), Some(r.value), "{kind}: {}", r.series);
                }
                (value_of(&f, &series), value_of(&c, &series).unwrap())
            })
            .collect()
    }

    #[test]
    fn an_injected_spike_moves_exactly_the_next_sample() {
        let values = with_twin("temperature", FaultKind::Spike, 10, 0, 20);
        for (s, &(faulty, clean)) in values.iter().enumerate() {
            let expected = if s == 10 { clean + Shape::Temperature.spike_size() } else { clean };
            assert_eq!(faulty, Some(expected), "second {s}");
        }
    }

    #[test]
    fn an_injected_drift_grows_linearly_to_its_total_and_snaps_back() {
        let values = with_twin("pressure", FaultKind::Drift, 10, 100, 130);
        let total = Shape::Pressure.drift_total();
        for (s, &(faulty, clean)) in values.iter().enumerate() {
            let offset = faulty.unwrap() - clean;
            let expected = match s {
                10..=110 => total * (s - 10) as f64 / 100.0,
                _ => 0.0,
            };
            assert!((offset - expected).abs() < 1e-9, "second {s}: offset {offset}");
        }
    }

    #[test]
    fn an_injected_stuck_value_repeats_the_last_value_until_the_end() {
        let values = with_twin("vibration", FaultKind::Stuck, 10, 30, 50);
        let before = values[9].0.unwrap();
        for (s, &(faulty, clean)) in values.iter().enumerate() {
            match s {
                10..=40 => assert_eq!(faulty, Some(before), "second {s}"),
                _ => assert_eq!(faulty, Some(clean), "second {s}"),
            }
        }
    }

    #[test]
    fn an_injected_excursion_holds_near_the_peak_and_returns() {
        let values = with_twin("temperature", FaultKind::Excursion, 10, 30, 50);
        let (lowest, span) = Shape::Temperature.excursion_peak();
        let peak = lowest + span / 2.0;
        for (s, &(faulty, clean)) in values.iter().enumerate() {
            let faulty = faulty.unwrap();
            match s {
                15..=35 => assert!((faulty - peak).abs() < 2.0, "second {s}: {faulty}"),
                0..=10 | 40.. => assert_eq!(faulty, clean, "second {s}"),
                _ => assert!(faulty > clean, "second {s}: ramping"),
            }
        }
    }

    #[test]
    fn an_injected_dropout_silences_the_whole_device_for_its_duration() {
        let cfg = config(2, false, &["temperature", "vibration"]);
        let mut sim = Simulator::new(&cfg);
        sim.inject(0, 1, FaultKind::Dropout, START_MS, 20_000);
        for s in 0..30 {
            let now = START_MS + s * 1000;
            let readings = sim.step(now);
            let silent = s < 20;
            assert_eq!(sim.is_dropped_out(0, now), silent);
            assert_eq!(readings.iter().any(|r| r.device == 0), !silent, "second {s}");
            assert_eq!(readings.iter().filter(|r| r.device != 0).count(), 4);
        }
    }

    #[test]
    fn an_injected_noise_burst_amplifies_the_spread_and_is_labelled() {
        let values = with_twin("current", FaultKind::NoiseBurst, 100, 200, 300);
        let burst: Vec<f64> = values[100..=300 - 1].iter().map(|v| v.0.unwrap()).collect();
        let calm: Vec<f64> = values[..100].iter().map(|v| v.0.unwrap()).collect();
        let ratio = diff_spread(&burst) / diff_spread(&calm);
        assert!((5.0..12.0).contains(&ratio), "spread ratio {ratio}");

        let mut sim = Simulator::new(&config(9, false, &["current"]));
        sim.inject(0, 0, FaultKind::NoiseBurst, START_MS, 5_000);
        let labels: Vec<Option<FaultKind>> =
            (0..7).map(|s| sim.step(START_MS + s * 1000)[0].fault).collect();
        let burst = Some(FaultKind::NoiseBurst);
        assert_eq!(labels, [burst, burst, burst, burst, burst, burst, None]);
    }

    #[test]
    fn injection_draws_nothing_from_the_random_generator() {
        // With random faults on, the injected twin still shows the same random episodes.
        let cfg = config(4, true, &["temperature", "vibration"]);
        let (mut faulty, mut clean) = (Simulator::new(&cfg), Simulator::new(&cfg));
        faulty.inject(0, 0, FaultKind::Spike, START_MS, 0);
        faulty.inject(0, 1, FaultKind::Drift, START_MS, 1_000);
        for s in 0..600 {
            let now = START_MS + s * 1000;
            let (f, c) = (faulty.step(now), clean.step(now));
            if s > 1 {
                assert_eq!(f, c, "second {s}");
            }
        }
    }

    #[test]
    fn bad_injections_change_nothing() {
        let cfg = config(6, false, &["temperature"]);
        let (mut faulty, mut clean) = (Simulator::new(&cfg), Simulator::new(&cfg));
        faulty.inject(7, 0, FaultKind::Drift, START_MS, 10_000);
        faulty.inject(0, 7, FaultKind::Stuck, START_MS, 10_000);
        faulty.inject(0, 0, FaultKind::Drift, START_MS, 0);
        faulty.inject(0, 0, FaultKind::Dropout, START_MS, -5);
        faulty.inject(0, 0, FaultKind::Excursion, i64::MAX, i64::MAX);
        for s in 0..20 {
            let now = START_MS + s * 1000;
            assert_eq!(faulty.step(now), clean.step(now));
        }
        // Extreme clocks do not panic.
        faulty.step(i64::MIN);
        faulty.step(i64::MAX);
    }

    #[test]
    fn fault_kinds_parse_and_print_their_lowercase_names() {
        for kind in FaultKind::ALL {
            assert_eq!(kind.to_string().parse::<FaultKind>(), Ok(kind));
        }
        assert_eq!("noise_burst".parse::<FaultKind>(), Ok(FaultKind::NoiseBurst));
        let error = "Spike".parse::<FaultKind>().unwrap_err();
        assert_eq!(
            error.to_string(),
            "unknown fault kind `Spike`; expected one of: excursion, spike, drift, stuck, \
             dropout, noise_burst"
        );
    }

    #[test]
    fn shape_names_round_trip() {
        for metric in ["temperature", "vibration", "bus_voltage", "crest_factor", "generic"] {
            assert_eq!(Shape::of(metric).name(), metric);
        }
        assert_eq!(Shape::of("flow"), Shape::Generic);
    }
}
