//! The simulated source: pumps with plausible signals and injected faults, for demos and
//! tests that need no hardware and no broker.
//!
//! Devices are `pump-1` ... `pump-N`; each configured metric becomes the series
//! `<device>/<metric>`. [`Simulator`] is a pure state machine: `step(now_ms)` returns the
//! readings for that instant and the only randomness is a `fastrand::Rng` seeded from the
//! configuration, so the same seed and the same sequence of `now_ms` give the same readings
//! (the task around it reads the clock; tests pass their own).
//!
//! Signals (per device, with its own phases):
//!
//! | metric        | shape                                                                 |
//! |---------------|-----------------------------------------------------------------------|
//! | `temperature` | 45 °C + 3 °C daily sine + ±2.5 °C slow load cycle + noise (σ 0.3)    |
//! | `vibration`   | 2 mm/s RMS + ±0.4 with load + noise (σ 0.12), never below 0.05        |
//! | `pressure`    | 4 bar + ±0.2 with load + noise (σ 0.03)                               |
//! | `current`     | 12 A + ±3 A with load + noise (σ 0.2)                                 |
//! | `humidity`    | 45 % − 10 % daily sine + noise (σ 0.8), within 0..100                 |
//! | other         | 50 + 10 daily sine + noise (σ 1)                                      |
//!
//! Faults (with `faults = true`), scheduled in time rather than per sample so they look the
//! same at any interval: the first episode starts 20–40 s after start and is a temperature
//! excursion (so the demo's threshold rule fires within a minute); then one episode every
//! 1–3 minutes on a random device:
//!
//! - *excursion* (40 %): temperature ramps to 84–90 °C in 5 s, holds, ramps back; above 80 °C
//!   for roughly 15–30 s;
//! - *drift* (25 %): one metric drifts away linearly for 2–5 minutes (bearing wear raises the
//!   vibration past 7 mm/s, a clogging filter lowers the pressure), then snaps back
//!   (recalibrated);
//! - *stuck* (20 %): one metric repeats its last value for 30–90 s;
//! - *dropout* (15 %): the device sends nothing for 20–60 s.
//!
//! Independently, each series has a single-sample spike about once per 10 minutes; spikes are
//! what `for` durations and hysteresis in rules are meant to ignore.

use std::f64::consts::TAU;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{SourceError, send_or_cancel};
use crate::config::SimulatedSourceConfig;
use crate::event::{Event, Ingest, now_ms};

/// Seconds in a day, for the daily cycle.
const DAY_S: f64 = 86_400.0;
/// Mean time between single-sample spikes of one series.
const SPIKE_MEAN_INTERVAL_S: f64 = 600.0;
/// Delay of the first fault episode after start (a demo should show an alert quickly).
const FIRST_FAULT_S: (i64, i64) = (20, 40);
/// Time between fault episodes.
const FAULT_INTERVAL_S: (i64, i64) = (60, 180);

/// One reading produced by [`Simulator::step`].
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// `<device>/<metric>`.
    pub series: String,
    /// The value.
    pub value: f64,
}

/// The signal model of a metric.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Shape {
    Temperature,
    Vibration,
    Pressure,
    Current,
    Humidity,
    Generic,
}

impl Shape {
    fn of(name: &str) -> Shape {
        match name {
            "temperature" => Shape::Temperature,
            "vibration" => Shape::Vibration,
            "pressure" => Shape::Pressure,
            "current" => Shape::Current,
            "humidity" => Shape::Humidity,
            _ => Shape::Generic,
        }
    }

    /// The fault-free signal at `t` seconds, given the daily (-1..1) and load (0..1) cycles.
    fn signal(self, daily: f64, load: f64, noise: f64) -> f64 {
        let swing = load - 0.5;
        match self {
            Shape::Temperature => 45.0 + 3.0 * daily + 5.0 * swing + 0.3 * noise,
            Shape::Vibration => (2.0 + 0.8 * swing + 0.12 * noise).max(0.05),
            Shape::Pressure => 4.0 + 0.4 * swing + 0.03 * noise,
            Shape::Current => 12.0 + 6.0 * swing + 0.2 * noise,
            Shape::Humidity => (45.0 - 10.0 * daily + 0.8 * noise).clamp(0.0, 100.0),
            Shape::Generic => 50.0 + 10.0 * daily + noise,
        }
    }

    /// How far a drift episode moves the signal by its end.
    fn drift_total(self) -> f64 {
        match self {
            Shape::Temperature => 15.0,
            Shape::Vibration => 6.0,
            Shape::Pressure => -1.5,
            Shape::Current => 6.0,
            Shape::Humidity => 25.0,
            Shape::Generic => 30.0,
        }
    }

    /// Size of a single-sample spike.
    fn spike(self) -> f64 {
        match self {
            Shape::Temperature => 20.0,
            Shape::Vibration => 8.0,
            Shape::Pressure => 2.0,
            Shape::Current => 15.0,
            Shape::Humidity => 30.0,
            Shape::Generic => 40.0,
        }
    }
}

/// A fault episode on one series.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Episode {
    /// Temperature lerps towards `peak` along a trapezoid between `start_ms` and `end_ms`.
    Excursion { start_ms: i64, end_ms: i64, peak: f64 },
    /// An offset growing linearly to `total` at `end_ms`.
    Drift { start_ms: i64, end_ms: i64, total: f64 },
    /// The last value, repeated until `end_ms`.
    Stuck { end_ms: i64, value: Option<f64> },
}

impl Episode {
    fn end_ms(&self) -> i64 {
        match *self {
            Episode::Excursion { end_ms, .. }
            | Episode::Drift { end_ms, .. }
            | Episode::Stuck { end_ms, .. } => end_ms,
        }
    }
}

#[derive(Debug)]
struct Channel {
    series: String,
    shape: Shape,
    episode: Option<Episode>,
    last: Option<f64>,
}

#[derive(Debug)]
struct Device {
    /// Phase of the daily cycle (radians): devices in different spots of the plant.
    daily_phase: f64,
    /// Phase and period of the load cycle.
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
    /// When the next fault episode starts; `None` until the first step.
    next_fault_ms: Option<i64>,
    /// Whether the first (always an excursion, if possible) episode is still to come.
    first_fault: bool,
    /// Time of the previous step, for the spike probability.
    last_step_ms: Option<i64>,
}

impl Simulator {
    /// A simulator for `cfg`'s devices and metrics, seeded with `cfg.seed`.
    pub fn new(cfg: &SimulatedSourceConfig) -> Self {
        let mut rng = fastrand::Rng::with_seed(cfg.seed);
        let devices = (1..=cfg.devices)
            .map(|n| Device {
                daily_phase: rng.f64() * 0.5,
                load_phase: rng.f64() * TAU,
                load_period_s: 1200.0 + rng.f64() * 1200.0,
                dropout_until_ms: i64::MIN,
                channels: cfg
                    .metrics
                    .iter()
                    .map(|metric| Channel {
                        series: format!("pump-{n}/{metric}"),
                        shape: Shape::of(metric),
                        episode: None,
                        last: None,
                    })
                    .collect(),
            })
            .collect();
        Self {
            rng,
            devices,
            faults: cfg.faults,
            next_fault_ms: None,
            first_fault: true,
            last_step_ms: None,
        }
    }

    /// The readings at `now_ms` (ms since the Unix epoch); call it once per interval with a
    /// non-decreasing clock.
    pub fn step(&mut self, now_ms: i64) -> Vec<Reading> {
        let dt_s = self.last_step_ms.map_or(0.0, |last| (now_ms - last).max(0) as f64 / 1000.0);
        self.last_step_ms = Some(now_ms);
        if self.faults {
            self.schedule_faults(now_ms);
        }
        let spike_probability = (dt_s / SPIKE_MEAN_INTERVAL_S).min(1.0);
        // Reduced modulo the period before the sine: a raw epoch in seconds (1.7e9) loses
        // precision inside `sin`.
        let t_s = now_ms as f64 / 1000.0;
        let day_fraction = (now_ms.rem_euclid(86_400_000)) as f64 / (DAY_S * 1000.0);
        let mut out = Vec::new();
        for device in &mut self.devices {
            if now_ms < device.dropout_until_ms {
                continue;
            }
            let daily = (TAU * day_fraction + device.daily_phase * TAU).sin();
            let load_angle = TAU * (t_s.rem_euclid(device.load_period_s) / device.load_period_s);
            let load = 0.5 + 0.5 * (load_angle + device.load_phase).sin();
            for channel in &mut device.channels {
                let noise = gaussian(&mut self.rng);
                let base = channel.shape.signal(daily, load, noise);
                let mut value = match channel.episode {
                    Some(Episode::Excursion { start_ms, end_ms, peak }) => {
                        let envelope = trapezoid(now_ms, start_ms, end_ms, 5_000);
                        base + envelope * (peak + 0.3 * noise - base)
                    }
                    Some(Episode::Drift { start_ms, end_ms, total }) => {
                        let progress = (now_ms - start_ms) as f64 / (end_ms - start_ms) as f64;
                        base + total * progress.clamp(0.0, 1.0)
                    }
                    Some(Episode::Stuck { value: Some(v), .. }) => v,
                    Some(Episode::Stuck { end_ms, value: None }) => {
                        let frozen = channel.last.unwrap_or(base);
                        channel.episode = Some(Episode::Stuck { end_ms, value: Some(frozen) });
                        frozen
                    }
                    None => base,
                };
                // `last` is the value before any spike, so a stuck episode never freezes a
                // glitch.
                channel.last = Some(value);
                let stuck = matches!(channel.episode, Some(Episode::Stuck { .. }));
                if self.faults && !stuck && self.rng.f64() < spike_probability {
                    // Mostly upwards: sensors glitch high more often than low in practice
                    // (EMI on long cables), and a rule on `above` should see some.
                    let sign = if self.rng.f64() < 0.8 { 1.0 } else { -1.0 };
                    value += sign * channel.shape.spike() * (0.75 + 0.5 * self.rng.f64());
                }
                if channel.episode.is_some_and(|e| now_ms >= e.end_ms()) {
                    channel.episode = None;
                }
                out.push(Reading { series: channel.series.clone(), value });
            }
        }
        out
    }

    fn schedule_faults(&mut self, now_ms: i64) {
        let next = *self
            .next_fault_ms
            .get_or_insert_with(|| now_ms + 1000 * self.rng.i64(FIRST_FAULT_S.0..=FIRST_FAULT_S.1));
        if now_ms < next || self.devices.is_empty() {
            return;
        }
        self.inject(now_ms);
        self.first_fault = false;
        self.next_fault_ms =
            Some(now_ms + 1000 * self.rng.i64(FAULT_INTERVAL_S.0..=FAULT_INTERVAL_S.1));
    }

    /// Starts one fault episode on a random device.
    fn inject(&mut self, now_ms: i64) {
        let rng = &mut self.rng;
        let device_count = self.devices.len();
        let device = &mut self.devices[rng.usize(..device_count)];
        let roll = rng.u32(0..100);
        let temperature = device.channels.iter().position(|c| c.shape == Shape::Temperature);
        let wants_excursion = self.first_fault || roll < 40;
        if device.channels.is_empty() || (roll >= 85 && !self.first_fault) {
            device.dropout_until_ms = now_ms + 1000 * rng.i64(20..=60);
            return;
        }
        let (index, episode) = match temperature {
            Some(index) if wants_excursion => (
                index,
                Episode::Excursion {
                    start_ms: now_ms,
                    end_ms: now_ms + 1000 * rng.i64(25..=40),
                    peak: 84.0 + 6.0 * rng.f64(),
                },
            ),
            _ if roll < 65 || self.first_fault => {
                let index = rng.usize(..device.channels.len());
                let total = device.channels[index].shape.drift_total();
                let end_ms = now_ms + 1000 * rng.i64(120..=300);
                (index, Episode::Drift { start_ms: now_ms, end_ms, total })
            }
            _ => {
                let index = rng.usize(..device.channels.len());
                (index, Episode::Stuck { end_ms: now_ms + 1000 * rng.i64(30..=90), value: None })
            }
        };
        device.channels[index].episode = Some(episode);
    }
}

/// 0 → 1 over `ramp_ms` after `start`, 1, then 1 → 0 over `ramp_ms` before `end`.
fn trapezoid(now: i64, start: i64, end: i64, ramp_ms: i64) -> f64 {
    let up = (now - start) as f64 / ramp_ms as f64;
    let down = (end - now) as f64 / ramp_ms as f64;
    up.min(down).clamp(0.0, 1.0)
}

/// A standard normal sample (Box–Muller); `1 - f64()` keeps the logarithm's argument in (0, 1].
fn gaussian(rng: &mut fastrand::Rng) -> f64 {
    let u1 = 1.0 - rng.f64();
    let u2 = rng.f64();
    (-2.0 * u1.ln()).sqrt() * (TAU * u2).cos()
}

/// Runs a simulated source until `cancel`: one reading per series every `cfg.interval`,
/// stamped with the gateway clock, without acks.
pub(crate) async fn run(
    index: u16,
    cfg: &SimulatedSourceConfig,
    ingest: mpsc::Sender<Ingest>,
    cancel: CancellationToken,
) -> Result<(), SourceError> {
    if cfg.interval.is_zero() {
        return Err(SourceError::InvalidConfig {
            name: cfg.name.clone(),
            reason: "`interval` must be longer than 0 s".into(),
        });
    }
    let mut simulator = Simulator::new(cfg);
    let mut ticker = tokio::time::interval(cfg.interval);
    // After backpressure, carry on at the normal pace instead of bursting to catch up.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(
        source = %cfg.name,
        devices = cfg.devices,
        metrics = ?cfg.metrics,
        interval = ?cfg.interval,
        faults = cfg.faults,
        "simulated source started"
    );
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let now = now_ms();
        for reading in simulator.step(now) {
            let event = Event {
                series: reading.series,
                ts_ms: now,
                value: reading.value,
                received_ms: now,
                source: index,
            };
            let message = Ingest { event: Some(event), ack: None, redelivery: None };
            if !send_or_cancel(&ingest, message, &cancel, &cfg.name).await? {
                tracing::info!(source = %cfg.name, "simulated source stopped");
                return Ok(());
            }
        }
    }
    tracing::info!(source = %cfg.name, "simulated source stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use super::*;

    const START_MS: i64 = 1_700_000_000_000;

    fn config(seed: u64, faults: bool, metrics: &[&str]) -> SimulatedSourceConfig {
        SimulatedSourceConfig {
            name: "sim".into(),
            devices: 3,
            metrics: metrics.iter().map(|m| m.to_string()).collect(),
            interval: Duration::from_secs(1),
            faults,
            seed,
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
    fn series_are_named_device_slash_metric() {
        let mut sim = Simulator::new(&config(1, false, &["temperature", "flow"]));
        let names: Vec<String> = sim.step(START_MS).into_iter().map(|r| r.series).collect();
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
    }

    #[test]
    fn without_faults_every_signal_stays_plausible_and_complete() {
        let metrics = ["temperature", "vibration", "pressure", "current", "humidity", "other"];
        let mut sim = Simulator::new(&config(3, false, &metrics));
        let ranges: HashMap<&str, (f64, f64)> = [
            ("temperature", (35.0, 55.0)),
            ("vibration", (0.05, 3.5)),
            ("pressure", (3.5, 4.5)),
            ("current", (7.0, 17.0)),
            ("humidity", (25.0, 65.0)),
            ("other", (30.0, 70.0)),
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
    fn every_fault_kind_shows_up_within_an_hour_for_several_seeds() {
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
    fn spikes_are_single_samples() {
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

    #[tokio::test]
    async fn the_task_sends_events_without_acks_and_stops_on_cancel() {
        let mut cfg = config(1, true, &["temperature"]);
        cfg.interval = Duration::from_millis(10);
        let (tx, mut rx) = mpsc::channel(16);
        let cancel = CancellationToken::new();
        let task = tokio::spawn({
            let cancel = cancel.clone();
            async move { run(4, &cfg, tx, cancel).await }
        });
        let deadline = Duration::from_secs(5);
        for _ in 0..6 {
            let ingest = tokio::time::timeout(deadline, rx.recv()).await.unwrap().unwrap();
            let event = ingest.event.unwrap();
            assert!(ingest.ack.is_none() && ingest.redelivery.is_none());
            assert_eq!(event.source, 4);
            assert_eq!(event.ts_ms, event.received_ms);
            assert!(event.series.starts_with("pump-") && event.series.ends_with("/temperature"));
        }
        cancel.cancel();
        let result = tokio::time::timeout(deadline, task).await.unwrap().unwrap();
        assert!(result.is_ok());
    }

    #[tokio::test]
    async fn a_zero_interval_is_rejected() {
        let mut cfg = config(1, true, &["temperature"]);
        cfg.interval = Duration::ZERO;
        let (tx, _rx) = mpsc::channel(1);
        let result = run(0, &cfg, tx, CancellationToken::new()).await;
        assert!(matches!(result, Err(SourceError::InvalidConfig { .. })));
    }
}
