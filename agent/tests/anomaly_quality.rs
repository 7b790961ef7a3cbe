//! Detection quality of the anomaly detector on labeled recordings.
//!
//! The recordings are the simulator's fault-free pump signals made more realistic (sensor
//! quantization and a slow random wander on top of the white noise) with anomalies injected
//! at known times, one kind per recording: single-sample spikes, permanent level shifts,
//! noise bursts, stuck values, and slow drifts (which must *not* alarm). Everything is seeded,
//! so the figures are reproducible; `BENCHMARKS.md` quotes the table this test prints:
//!
//! ```sh
//! cargo test -p edgewise --release --test anomaly_quality -- --nocapture
//! ```
//!
//! The raise rule is the anomaly rule's with its defaults: raise when the score is at or above
//! `level = 0.8` for `for` (event time, continuously), clear when it falls below `clear = 0.5`.
//! A labeled anomaly is detected when a raise falls in its window (the anomaly's span plus a
//! grace period for the detector to notice); a raise outside every window is a false alarm.

use std::fmt::Write as _;
use std::time::Duration;

use edgewise::config::SimulatedSourceConfig;
use edgewise::rules::anomaly::{AnomalyParams, Detector};
use edgewise::source::sim::simulator;

const START_MS: i64 = 1_700_000_000_000;
const SECOND: i64 = 1000;
const MINUTE: i64 = 60 * SECOND;
const HOUR: i64 = 60 * MINUTE;

/// The anomaly rule's default level and clear level.
const LEVEL: f64 = 0.8;
const CLEAR: f64 = 0.5;

/// Per metric: the simulator's white noise σ (from its documentation) and a plausible sensor
/// resolution (DS18B20-style 1/16 °C, a 10 µm/s vibration sensor, a 16-bit pressure ADC...).
const METRICS: [(&str, f64, f64); 5] = [
    ("temperature", 0.3, 0.0625),
    ("vibration", 0.12, 0.01),
    ("pressure", 0.03, 0.005),
    ("current", 0.2, 0.05),
    ("humidity", 0.8, 0.1),
];

const SEEDS: [u64; 3] = [11, 12, 13];
const DEVICES: u32 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Spike,
    Shift,
    Variance,
    Stuck,
    Drift,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Spike => "spike (6–15 σ, 1 sample)",
            Kind::Shift => "level shift (3–8 σ, permanent)",
            Kind::Variance => "noise burst (σ ×2.2–4.1, 1–3 min)",
            Kind::Stuck => "stuck value (1–3 min)",
            Kind::Drift => "slow drift (10–20 σ over 30–60 min)",
        }
    }
}

/// One labeled anomaly: a raise in `[start_ms, until_ms]` detects it.
#[derive(Debug, Clone, Copy)]
struct Label {
    start_ms: i64,
    until_ms: i64,
}

#[derive(Debug)]
struct Recording {
    samples: Vec<(i64, f64)>,
    labels: Vec<Label>,
}

/// `hours` of fault-free simulator readings at 1 s, per series (`DEVICES` × `METRICS`), with
/// quantization and a slow AR(1) wander of half the noise σ (time constant 2 min) added.
fn clean(seed: u64, hours: i64) -> Vec<(f64, Vec<(i64, f64)>)> {
    let cfg = SimulatedSourceConfig {
        name: "sim".into(),
        devices: DEVICES,
        metrics: METRICS.iter().map(|m| m.0.to_string()).collect(),
        interval: Duration::from_secs(1),
        faults: false,
        seed,
    };
    let mut sim = simulator(&cfg);
    let mut rng = fastrand::Rng::with_seed(seed ^ 0x5eed);
    let count = (DEVICES as usize) * METRICS.len();
    let mut out: Vec<(f64, Vec<(i64, f64)>)> =
        (0..count).map(|i| (METRICS[i % METRICS.len()].1, Vec::new())).collect();
    let mut wander = vec![0.0; count];
    let phi = (-1.0f64 / 120.0).exp();
    for s in 0..hours * 3600 {
        let ts = START_MS + s * SECOND;
        for (i, reading) in sim.step(ts).into_iter().enumerate() {
            let (_, sigma, resolution) = METRICS[i % METRICS.len()];
            wander[i] =
                phi * wander[i] + (1.0 - phi * phi).sqrt() * 0.5 * sigma * gaussian(&mut rng);
            let value = ((reading.value + wander[i]) / resolution).round() * resolution;
            out[i].1.push((ts, value));
        }
    }
    out
}

fn gaussian(rng: &mut fastrand::Rng) -> f64 {
    let u1 = 1.0 - rng.f64();
    let u2 = rng.f64();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn sign(rng: &mut fastrand::Rng) -> f64 {
    if rng.bool() { 1.0 } else { -1.0 }
}

/// Injects anomalies of `kind` into one clean series with noise `sigma`: the first 10 min
/// after the start are left alone (warm-up and settling), then one anomaly every 10–15 min
/// (drifts: one after the other, with 10 min of rest between).
fn inject(kind: Kind, sigma: f64, clean: &[(i64, f64)], rng: &mut fastrand::Rng) -> Recording {
    let mut samples = clean.to_vec();
    let mut labels = Vec::new();
    let end = samples.len();
    let mut at = 600 + rng.usize(0..300);
    let mut offset = 0.0;
    while at < end {
        let start_ms = samples[at].0;
        let next = match kind {
            Kind::Spike => {
                samples[at].1 += sign(rng) * (6.0 + 9.0 * rng.f64()) * sigma;
                labels.push(Label { start_ms, until_ms: start_ms + 10 * SECOND });
                at + 600 + rng.usize(0..300)
            }
            Kind::Shift => {
                offset += sign(rng) * (3.0 + 5.0 * rng.f64()) * sigma;
                labels.push(Label { start_ms, until_ms: start_ms + 5 * MINUTE });
                let next = at + 600 + rng.usize(0..300);
                for s in &mut samples[at..next.min(end)] {
                    s.1 += offset;
                }
                next
            }
            Kind::Variance => {
                let len = 60 + rng.usize(0..120);
                let extra = (2.0 + 2.0 * rng.f64()) * sigma;
                for s in &mut samples[at..(at + len).min(end)] {
                    s.1 += extra * gaussian(rng);
                }
                labels.push(Label { start_ms, until_ms: start_ms + (len as i64 + 30) * SECOND });
                at + 600 + rng.usize(0..300)
            }
            Kind::Stuck => {
                let len = 60 + rng.usize(0..120);
                let held = samples[at - 1].1;
                for s in &mut samples[at..(at + len).min(end)] {
                    s.1 = held;
                }
                labels.push(Label { start_ms, until_ms: start_ms + (len as i64 + 30) * SECOND });
                at + 600 + rng.usize(0..300)
            }
            Kind::Drift => {
                let len = 1800 + rng.usize(0..1800);
                let total = sign(rng) * (10.0 + 10.0 * rng.f64()) * sigma;
                for (i, s) in samples[at..].iter_mut().enumerate() {
                    s.1 += offset + total * (i as f64 / len as f64).min(1.0);
                }
                offset += total;
                labels.push(Label { start_ms, until_ms: start_ms + len as i64 * SECOND });
                at + len + 600
            }
        };
        // Later shifts and drifts build on the earlier ones; for drifts the loop above
        // already applied `offset` to the rest of the recording.
        if kind == Kind::Drift {
            offset = 0.0;
        }
        at = next;
    }
    Recording { samples, labels }
}

/// The raise times of the rule `score >= LEVEL for hold`, clear below `CLEAR`.
fn raises(params: &AnomalyParams, samples: &[(i64, f64)], hold: Duration) -> Vec<i64> {
    let hold_ms = hold.as_millis() as i64;
    let mut detector = Detector::new(params);
    let mut pending: Option<i64> = None;
    let mut active = false;
    let mut out = Vec::new();
    for &(ts, value) in samples {
        let score = detector.update(params, ts, value);
        if active {
            active = score >= CLEAR;
            continue;
        }
        if score >= LEVEL {
            let since = *pending.get_or_insert(ts);
            if ts - since >= hold_ms {
                out.push(ts);
                active = true;
                pending = None;
            }
        } else {
            pending = None;
        }
    }
    out
}

#[derive(Debug, Default)]
struct Tally {
    labels: usize,
    detected: usize,
    raises: usize,
    true_raises: usize,
    delays_s: Vec<f64>,
    hours: f64,
}

impl Tally {
    fn add(&mut self, recording: &Recording, raised: &[i64]) {
        let span = recording.samples.last().unwrap().0 - recording.samples[0].0;
        self.hours += span as f64 / HOUR as f64;
        self.labels += recording.labels.len();
        self.raises += raised.len();
        self.true_raises += raised
            .iter()
            .filter(|&&t| recording.labels.iter().any(|l| (l.start_ms..=l.until_ms).contains(&t)))
            .count();
        for label in &recording.labels {
            if let Some(&t) =
                raised.iter().find(|&&t| (label.start_ms..=label.until_ms).contains(&t))
            {
                self.detected += 1;
                self.delays_s.push((t - label.start_ms) as f64 / 1000.0);
            }
        }
    }

    fn recall(&self) -> f64 {
        self.detected as f64 / self.labels.max(1) as f64
    }

    fn precision(&self) -> f64 {
        if self.raises == 0 { 1.0 } else { self.true_raises as f64 / self.raises as f64 }
    }

    fn false_per_hour(&self) -> f64 {
        (self.raises - self.true_raises) as f64 / self.hours
    }

    /// The delay quantile in whole seconds, "–" when nothing was detected.
    fn delay(&self, quantile: f64) -> String {
        let mut d = self.delays_s.clone();
        if d.is_empty() {
            return "–".into();
        }
        d.sort_by(f64::total_cmp);
        format!("{:.0}", d[((d.len() - 1) as f64 * quantile).round() as usize])
    }
}

struct Results {
    by_kind: Vec<(Kind, Tally)>,
    clean: Tally,
}

fn measure(params: &AnomalyParams, hold: Duration) -> Results {
    let kinds = [Kind::Spike, Kind::Shift, Kind::Variance, Kind::Stuck, Kind::Drift];
    let mut by_kind: Vec<(Kind, Tally)> = kinds.iter().map(|&k| (k, Tally::default())).collect();
    let mut clean_tally = Tally::default();
    for seed in SEEDS {
        let series = clean(seed, 4);
        let mut rng = fastrand::Rng::with_seed(seed);
        for (sigma, samples) in &series {
            let plain = Recording { samples: samples.clone(), labels: Vec::new() };
            clean_tally.add(&plain, &raises(params, samples, hold));
            for (kind, tally) in &mut by_kind {
                let recording = inject(*kind, *sigma, samples, &mut rng);
                tally.add(&recording, &raises(params, &recording.samples, hold));
            }
        }
    }
    Results { by_kind, clean: clean_tally }
}

fn table(results: &Results, hold: Duration) -> String {
    let mut out = String::new();
    let hold = humantime::format_duration(hold);
    let _ = writeln!(out, "\nraise: score >= {LEVEL} for {hold}; clear: score < {CLEAR}\n");
    let _ = writeln!(
        out,
        "| anomaly | labeled | recall | precision | delay median s | delay p90 s | false raises / series-hour |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    for (kind, t) in &results.by_kind {
        if *kind == Kind::Drift {
            let _ = writeln!(
                out,
                "| {} | {} | {:.3} raised (want 0) | – | – | – | {:.3} |",
                kind.name(),
                t.labels,
                t.recall(),
                t.raises as f64 / t.hours,
            );
        } else {
            let _ = writeln!(
                out,
                "| {} | {} | {:.3} | {:.3} | {} | {} | {:.3} |",
                kind.name(),
                t.labels,
                t.recall(),
                t.precision(),
                t.delay(0.5),
                t.delay(0.9),
                t.false_per_hour(),
            );
        }
    }
    let c = &results.clean;
    let _ = writeln!(
        out,
        "| none (clean, {:.0} series-hours) | 0 | – | – | – | – | {:.3} |",
        c.hours,
        c.false_per_hour()
    );
    out
}

#[test]
fn detection_quality_meets_the_floors_on_labeled_recordings() {
    let params = AnomalyParams::default();
    let immediate = measure(&params, Duration::ZERO);
    println!("{}", table(&immediate, Duration::ZERO));
    let held = measure(&params, Duration::from_secs(5));
    println!("{}", table(&held, Duration::from_secs(5)));

    let get = |k: Kind| &immediate.by_kind.iter().find(|(kind, _)| *kind == k).unwrap().1;
    assert!(get(Kind::Spike).recall() >= 0.9, "spike recall {}", get(Kind::Spike).recall());
    assert!(get(Kind::Shift).recall() >= 0.9, "shift recall {}", get(Kind::Shift).recall());
    assert!(get(Kind::Variance).recall() >= 0.8);
    assert!(get(Kind::Stuck).recall() >= 0.9);
    assert!(get(Kind::Drift).raises as f64 / get(Kind::Drift).hours < 0.1);
    assert!(immediate.clean.false_per_hour() < 0.1, "{}", immediate.clean.false_per_hour());
}
