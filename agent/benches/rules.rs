//! Cost of the rule engine per event (issue 3, "Quality and speed").
//!
//! Four groups, each reported by criterion in elements (events) per second:
//!
//! - `rule/<kind>`: [`Rules`] with one rule over 100 series (`all_of` with its two threshold
//!   members over 50 devices × 2 metrics), events round-robin over the series;
//! - `pack/<name>`: a realistic rule pack over 1,000 series (500 pumps × temperature and
//!   vibration): the `config/demo.toml` rules, and a 7-rule pump pack using every kind;
//! - `processor/<name>`: [`Processor::apply`] with rules and 60 s summaries over the same
//!   1,000 series, a journal tick after every round;
//! - `core/<name>`: the same, starting from the MQTT message: the series key rendered from
//!   the topic (`factory/line-1/pump-N/metric` through `{2}/{3}`), the JSON payload decoded
//!   (`{"value":…,"ts":…}`), the [`Event`] built as the MQTT source builds it, then
//!   [`Processor::apply`]: the "processing core" figure of issue 8 (decode + rules +
//!   summaries).
//!
//! # Method
//!
//! Each fixture is a prebuilt, deterministic journal: `warm` rounds that bring the state to
//! a steady state (full windows, anomaly detectors past warm-up, open episodes) followed by
//! `measured` rounds. The warm rounds are applied once, untimed; every measured pass starts
//! from a clone of that warmed state and times only the calls on the measured events
//! ([`Bencher::iter_custom`]): neither event construction nor the state clone nor its drop is
//! measured. A benchmark that needs more iterations than a pass holds starts a new pass, so
//! event time always moves forward as it does in the field.
//!
//! Signals are 1 Hz per series: a slow sine plus Gaussian noise and rare single-sample
//! spikes. One device in ten overheats (temperature ramps past 80 °C and vibration rises)
//! for one minute in every ~7, one in ten has a stuck sensor, one in ten drops out, on
//! staggered schedules: every state machine raises and clears while measured, and alert
//! records (with their rendered messages) are part of the cost.
//!
//! The timer kinds (`missing_data`, `all_of`) run on [`Rules::on_tick`]; every `rule/` and
//! `pack/` step calls `on_tick` with the event's receive time before `on_event`, as the
//! processor does, so all kinds are measured the same way.
//!
//! ```text
//! cargo bench -p edgewise --bench rules                 # everything, a few minutes
//! cargo bench -p edgewise --bench rules -- 'rule/'      # one group
//! ```

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Bencher, BenchmarkGroup, Criterion, Throughput, measurement::WallTime};
use edgewise::config::{self, Config, PayloadConfig};
use edgewise::event::{Entry, Event};
use edgewise::metrics::Metrics;
use edgewise::processor::Processor;
use edgewise::rules::{RuleConfig, Rules};
use edgewise::source::payload::{self, SeriesTemplate};

/// Event time of the first event: 2024-06-10T06:00:00Z.
const START_MS: i64 = 1_717_999_200_000;
/// Gateway receive time minus event time.
const RECEIVE_DELAY_MS: i64 = 5;
/// Every device's fault schedule repeats with this period (rounds, i.e. seconds)...
const FAULT_PERIOD: u64 = 400;
/// ...and a fault lasts this long within it.
const FAULT_ROUNDS: u64 = 60;

/// The single-rule benchmarks, one `[[rules]]` body each, over `pump-N/temperature`.
const SINGLE_RULES: &[(&str, &str)] = &[
    (
        "threshold",
        r#"kind = "threshold"
           name = "bearing-overheat"
           series = "pump-*/temperature"
           above = 80.0
           clear = 75.0
           for = "10s""#,
    ),
    (
        "rate_of_change",
        r#"kind = "rate_of_change"
           name = "bearing-heating-fast"
           series = "pump-*/temperature"
           max_rate = 5.0
           per = "1m"
           span = "2m"
           clear = 3.0
           direction = "rise""#,
    ),
    (
        "flatline",
        r#"kind = "flatline"
           name = "temperature-stuck"
           series = "pump-*/temperature"
           epsilon = 0.01
           for = "30s""#,
    ),
    (
        "missing_data",
        r#"kind = "missing_data"
           name = "pump-silent"
           series = "pump-*/#"
           timeout = "30s""#,
    ),
    (
        "window_mean_1m",
        r#"kind = "window"
           name = "temperature-mean"
           series = "pump-*/temperature"
           window = "1m"
           aggregate = "mean"
           above = 75.0
           clear = 70.0"#,
    ),
    (
        "window_mean_5m",
        r#"kind = "window"
           name = "temperature-mean"
           series = "pump-*/temperature"
           window = "5m"
           aggregate = "mean"
           above = 64.0
           clear = 61.0"#,
    ),
    (
        "anomaly",
        r#"kind = "anomaly"
           name = "temperature-anomaly"
           series = "pump-*/temperature"
           level = 0.8
           clear = 0.5
           detector = {}"#,
    ),
];

/// `all_of` needs members: two thresholds on the two metrics of one pump.
const ALL_OF_RULES: &[&str] = &[
    r#"kind = "threshold"
       name = "bearing-overheat"
       series = "pump-*/temperature"
       above = 80.0
       clear = 75.0
       for = "10s""#,
    r#"kind = "threshold"
       name = "high-vibration"
       series = "pump-*/vibration"
       above = 7.1
       clear = 6.0
       for = "3s""#,
    r#"kind = "all_of"
       name = "bearing-failing"
       rules = ["bearing-overheat", "high-vibration"]
       within = "30s"
       severity = "critical""#,
];

/// The rules of `config/demo.toml`, inlined so the figure does not move when the demo does.
const DEMO_PACK: &str = r#"
[[rules]]
kind = "threshold"
name = "bearing-overheat"
series = "pump-*/temperature"
above = 80.0
clear = 75.0
for = "2s"
severity = "critical"
message = "{device} bearing at {value} °C ({state}; limit {threshold} °C)"

[[rules]]
kind = "threshold"
name = "high-vibration"
series = "pump-*/vibration"
above = 7.1
clear = 6.0
for = "3s"
severity = "warning"

[[rules]]
kind = "all_of"
name = "bearing-failing"
rules = ["bearing-overheat", "high-vibration"]
within = "30s"
severity = "critical"
message = "{device}: bearing hot and vibrating"

[[rules]]
kind = "flatline"
name = "sensor-stuck"
series = "pump-*/#"
epsilon = 0.001
for = "5s"
severity = "warning"
message = "{metric} of {device} stuck at {value}"
"#;

/// A pump pack with every kind: four rules see each event (plus the combined rule on
/// condition changes).
const PUMP_PACK: &str = r#"
[[rules]]
kind = "threshold"
name = "bearing-overheat"
series = "pump-*/temperature"
above = 80.0
clear = 75.0
for = "10s"
severity = "critical"
message = "{device} bearing at {value} °C (limit {threshold} °C)"

[[rules]]
kind = "rate_of_change"
name = "bearing-heating-fast"
series = "pump-*/temperature"
max_rate = 5.0
per = "1m"
span = "2m"
clear = 3.0
direction = "rise"

[[rules]]
kind = "flatline"
name = "sensor-stuck"
series = "pump-*/#"
epsilon = 0.001
for = "30s"

[[rules]]
kind = "missing_data"
name = "pump-silent"
series = "pump-*/#"
timeout = "30s"
min_interval = "10m"

[[rules]]
kind = "window"
name = "vibration-high"
series = "pump-*/vibration"
window = "1m"
aggregate = "mean"
above = 6.0
clear = 5.0

[[rules]]
kind = "anomaly"
name = "vibration-anomaly"
series = "pump-*/vibration"
level = 0.8
clear = 0.5
detector = {}

[[rules]]
kind = "all_of"
name = "bearing-failing"
rules = ["bearing-overheat", "vibration-high"]
within = "10m"
severity = "critical"
message = "{device}: bearing hot and vibrating"
"#;

/// Wraps a rule pack into a whole, validated configuration (the source is never started:
/// validation wants one).
fn config(rules: &str) -> Config {
    let text = format!(
        "[agent]\nid = \"bench\"\ndata_dir = \"./unused\"\n\n\
         [[sources]]\nkind = \"simulated\"\nname = \"sim\"\n\n\
         [upstream]\nkind = \"file\"\npath = \"-\"\n\n\
         [summary]\nwindow = \"60s\"\nallowed_lateness = \"5s\"\n\n\
         {rules}"
    );
    config::load_str("bench.toml", &text).unwrap_or_else(|e| panic!("{e}"))
}

fn rule(toml: &str) -> RuleConfig {
    toml::from_str(toml).unwrap_or_else(|e| panic!("{e}\n{toml}"))
}

/// What a device's sensors are doing in a round.
#[derive(Clone, Copy)]
enum Fault {
    None,
    /// Seconds into an overheating episode.
    Overheat(u64),
    /// Stuck since this round.
    Stuck(u64),
    Dropout,
}

fn fault(device: u64, round: u64) -> Fault {
    let into = (round + device * 37) % FAULT_PERIOD;
    if into >= FAULT_ROUNDS {
        return Fault::None;
    }
    match device % 10 {
        3 => Fault::Overheat(into),
        5 => Fault::Stuck(round.saturating_sub(into)),
        7 => Fault::Dropout,
        _ => Fault::None,
    }
}

/// Deterministic 1 Hz signals of `devices` pumps, `metrics` of them each.
struct Signals {
    rng: fastrand::Rng,
}

impl Signals {
    fn new() -> Self {
        Self { rng: fastrand::Rng::with_seed(7) }
    }

    /// A standard normal sample (Box–Muller).
    fn gauss(&mut self) -> f64 {
        let u = 1.0 - self.rng.f64();
        let v = self.rng.f64();
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    fn temperature_trend(device: u64, round: u64) -> f64 {
        let phase = std::f64::consts::TAU * round as f64 / 600.0 + device as f64;
        55.0 + (device % 7) as f64 + 4.0 * phase.sin()
    }

    /// The reading of `metric` of `device` in `round`, `None` while it drops out.
    fn value(&mut self, device: u64, metric: &str, round: u64) -> Option<f64> {
        let fault = fault(device, round);
        let spike = if self.rng.u32(..1000) < 2 { 4.0 } else { 0.0 };
        match (metric, fault) {
            (_, Fault::Dropout) => None,
            ("temperature", Fault::Stuck(since)) => {
                Some((Self::temperature_trend(device, since) * 10.0).round() / 10.0)
            }
            ("temperature", f) => {
                let ramp = match f {
                    Fault::Overheat(s) => 30.0 * (s as f64 / 20.0).min(1.0),
                    _ => 0.0,
                };
                Some(
                    Self::temperature_trend(device, round)
                        + ramp
                        + 0.3 * self.gauss()
                        + spike * 4.0,
                )
            }
            (_, Fault::Stuck(_)) => Some(2.5),
            (_, f) => {
                let ramp = match f {
                    Fault::Overheat(s) => 6.0 * (s as f64 / 10.0).min(1.0),
                    _ => 0.0,
                };
                Some((2.5 + ramp + 0.3 * self.gauss() + spike).max(0.0))
            }
        }
    }

    /// `rounds` rounds of events round-robin over `devices × metrics` series, 1 s apart per
    /// series, spread evenly over each second.
    fn events(&mut self, devices: u64, metrics: &[&str], rounds: u64) -> Vec<Event> {
        let series: Vec<(u64, &str, String)> = (0..devices)
            .flat_map(|d| metrics.iter().map(move |&m| (d, m, format!("pump-{d}/{m}"))))
            .collect();
        let step_ms = 1000 / series.len() as i64;
        let mut events = Vec::with_capacity(series.len() * rounds as usize);
        for round in 0..rounds {
            for (i, (device, metric, key)) in series.iter().enumerate() {
                let Some(value) = self.value(*device, metric, round) else { continue };
                let ts_ms = START_MS + round as i64 * 1000 + i as i64 * step_ms;
                events.push(Event {
                    series: key.clone(),
                    ts_ms,
                    value,
                    received_ms: ts_ms + RECEIVE_DELAY_MS,
                    source: 0,
                });
            }
        }
        events
    }
}

/// A warmed-up state and the entries to measure on it.
struct Fixture<S, T> {
    warm: S,
    measured: Vec<T>,
}

impl<S: Clone, T> Fixture<S, T> {
    /// Times `step` over `iters` measured entries, starting a new pass from a clone of the
    /// warm state whenever the entries run out. Only the steps are timed.
    fn run(&self, iters: u64, mut step: impl FnMut(&mut S, usize, &T)) -> Duration {
        let mut total = Duration::ZERO;
        let mut left = iters;
        while left > 0 {
            let mut state = self.warm.clone();
            let n = left.min(self.measured.len() as u64) as usize;
            let start = Instant::now();
            for (i, entry) in self.measured[..n].iter().enumerate() {
                step(&mut state, i, black_box(entry));
            }
            total += start.elapsed();
            left -= n as u64;
            drop(black_box(state));
        }
        total
    }
}

/// One event through a rule set, as the processor drives it: timers first, then the event.
fn rules_step(rules: &mut Rules, event: &Event, out: &mut Vec<sensors::record::Alert>) {
    out.clear();
    rules.on_tick(event.received_ms, out);
    rules.on_event(event, out);
    black_box(&*out);
}

fn rules_fixture(
    configs: &[RuleConfig],
    mut events: Vec<Event>,
    warm: usize,
) -> Fixture<Rules, Event> {
    let mut rules = Rules::new(configs).unwrap_or_else(|e| panic!("{e}"));
    let measured = events.split_off(warm);
    let mut out = Vec::new();
    for event in &events {
        rules_step(&mut rules, event, &mut out);
    }
    // The signals must make the rule raise and clear while measured, or the figure would
    // be that of an idle rule.
    let mut check = rules.clone();
    let mut alerts = 0;
    for event in &measured {
        rules_step(&mut check, event, &mut out);
        alerts += out.len();
    }
    assert!(
        alerts > 0,
        "{:?} raise nothing on the measured events",
        configs.iter().map(RuleConfig::name).collect::<Vec<_>>()
    );
    Fixture { warm: rules, measured }
}

fn bench_rules(b: &mut Bencher<'_>, fixture: &Fixture<Rules, Event>) {
    let mut out = Vec::new();
    b.iter_custom(|iters| fixture.run(iters, |rules, _, event| rules_step(rules, event, &mut out)));
}

fn configure(group: &mut BenchmarkGroup<'_, WallTime>) {
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(1));
}

/// One rule over 100 series, per kind.
fn per_rule(c: &mut Criterion) {
    // 6 min of warm-up fills a 5 min window; 10 min measured cover 1.5 fault periods.
    let (warm_rounds, measured_rounds) = (360, 600);
    let mut group = c.benchmark_group("rule");
    configure(&mut group);
    for (kind, body) in SINGLE_RULES {
        let events = Signals::new().events(100, &["temperature"], warm_rounds + measured_rounds);
        let warm =
            events.iter().take_while(|e| e.ts_ms < START_MS + warm_rounds as i64 * 1000).count();
        let fixture = rules_fixture(&[rule(body)], events, warm);
        group.bench_function(*kind, |b| bench_rules(b, &fixture));
    }
    let configs: Vec<RuleConfig> = ALL_OF_RULES.iter().map(|r| rule(r)).collect();
    let events =
        Signals::new().events(50, &["temperature", "vibration"], warm_rounds + measured_rounds);
    let warm = events.iter().take_while(|e| e.ts_ms < START_MS + warm_rounds as i64 * 1000).count();
    let fixture = rules_fixture(&configs, events, warm);
    group.bench_function("all_of_with_2_thresholds", |b| bench_rules(b, &fixture));
    group.finish();
}

/// The pump events of the pack and processor benchmarks: 500 pumps × 2 metrics = 1,000
/// series; 3 min of warm-up (rate span 2 m, window 1 m, anomaly warm-up 30 events), 5 min
/// measured.
fn pump_events() -> (Vec<Event>, usize) {
    let (warm_rounds, measured_rounds) = (180, 300);
    let events =
        Signals::new().events(500, &["temperature", "vibration"], warm_rounds + measured_rounds);
    let warm = events.iter().take_while(|e| e.ts_ms < START_MS + warm_rounds as i64 * 1000).count();
    (events, warm)
}

/// Realistic packs over 1,000 series.
fn packs(c: &mut Criterion) {
    let (events, warm) = pump_events();
    let mut group = c.benchmark_group("pack");
    configure(&mut group);
    for (name, pack) in [("demo_4_rules", DEMO_PACK), ("pump_7_rules", PUMP_PACK)] {
        let fixture = rules_fixture(&config(pack).rules, events.clone(), warm);
        group.bench_function(name, |b| bench_rules(b, &fixture));
    }
    group.finish();
}

/// The journal of the processor: the events with a tick at the end of every second.
fn journal(events: Vec<Event>) -> Vec<Entry> {
    let mut entries = Vec::with_capacity(events.len() + events.len() / 500);
    let mut second = None;
    for event in events {
        let this = (event.ts_ms - START_MS) / 1000;
        if second.is_some_and(|s| s != this) {
            entries.push(Entry::Tick { now_ms: START_MS + this * 1000 + RECEIVE_DELAY_MS });
        }
        second = Some(this);
        entries.push(Entry::Event(event));
    }
    entries
}

/// A processor with `pack` warmed up on `warm`, and the journal seq of the first measured
/// entry.
fn processor_fixture<T>(
    pack: &str,
    warm: &[Entry],
    measured: Vec<T>,
    metrics: &Metrics,
) -> (Fixture<Processor, T>, u64) {
    let mut processor = Processor::new(&config(pack)).unwrap_or_else(|e| panic!("{e}"));
    let mut out = Vec::new();
    for (i, entry) in warm.iter().enumerate() {
        out.clear();
        processor.apply(i as u64 + 1, entry, metrics, &mut out);
    }
    (Fixture { warm: processor, measured }, warm.len() as u64 + 1)
}

/// The whole processor (rules + summaries) over 1,000 series.
fn processor(c: &mut Criterion) {
    let (mut events, warm) = pump_events();
    let measured = journal(events.split_off(warm));
    let warm = journal(events);
    let metrics = Metrics::default();
    let mut group = c.benchmark_group("processor");
    configure(&mut group);
    for (name, pack) in [
        ("summaries_only", ""),
        ("demo_4_rules_and_summaries", DEMO_PACK),
        ("pump_7_rules_and_summaries", PUMP_PACK),
    ] {
        let (fixture, first_seq) = processor_fixture(pack, &warm, measured.clone(), &metrics);
        let mut out = Vec::new();
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                fixture.run(iters, |processor, i, entry| {
                    out.clear();
                    processor.apply(first_seq + i as u64, entry, &metrics, &mut out);
                    black_box(&out);
                })
            })
        });
    }
    group.finish();
}

/// What reaches the processing core: an MQTT message, or the journal's tick.
#[derive(Clone)]
enum Input {
    Message { topic: String, payload: Vec<u8>, received_ms: i64 },
    Tick(Entry),
}

/// The journal's entries as they arrived: each event as its MQTT topic and JSON payload.
fn messages(entries: Vec<Entry>) -> Vec<Input> {
    entries
        .into_iter()
        .map(|entry| match entry {
            Entry::Event(e) => Input::Message {
                topic: format!("factory/line-1/{}", e.series),
                payload: format!(r#"{{"value":{},"ts":{}}}"#, e.value, e.ts_ms).into_bytes(),
                received_ms: e.received_ms,
            },
            tick => Input::Tick(tick),
        })
        .collect()
}

/// One message through the core, as the MQTT source and the processor take it.
fn message_entry(template: &SeriesTemplate, payload_cfg: &PayloadConfig, input: &Input) -> Entry {
    match input {
        Input::Message { topic, payload, received_ms } => {
            let series = template.render(topic).unwrap_or_else(|e| panic!("{e}"));
            let decoded = payload::decode(payload_cfg, payload).unwrap_or_else(|e| panic!("{e}"));
            Entry::Event(Event {
                series,
                ts_ms: decoded.ts_ms.unwrap_or(*received_ms),
                value: decoded.value,
                received_ms: *received_ms,
                source: 0,
            })
        }
        Input::Tick(tick) => tick.clone(),
    }
}

/// Decode + rules + summaries over 1,000 series, from the MQTT message on.
fn core(c: &mut Criterion) {
    let (mut events, warm) = pump_events();
    let measured_entries = journal(events.split_off(warm));
    let measured = messages(measured_entries.clone());
    let warm = journal(events);
    let template = SeriesTemplate::parse("{2}/{3}").unwrap_or_else(|e| panic!("{e}"));
    let payload_cfg = PayloadConfig::default();
    // The decoded messages are the events themselves: the figure is of the same work.
    for (input, entry) in measured.iter().zip(&measured_entries) {
        assert_eq!(&message_entry(&template, &payload_cfg, input), entry);
    }
    let metrics = Metrics::default();
    let mut group = c.benchmark_group("core");
    configure(&mut group);
    for (name, pack) in [
        ("decode_demo_4_rules_and_summaries", DEMO_PACK),
        ("decode_pump_7_rules_and_summaries", PUMP_PACK),
    ] {
        let (fixture, first_seq) = processor_fixture(pack, &warm, measured.clone(), &metrics);
        let mut out = Vec::new();
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                fixture.run(iters, |processor, i, input| {
                    let entry = message_entry(&template, &payload_cfg, input);
                    out.clear();
                    processor.apply(first_seq + i as u64, &entry, &metrics, &mut out);
                    black_box(&out);
                })
            })
        });
    }
    group.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    per_rule(&mut c);
    packs(&mut c);
    processor(&mut c);
    core(&mut c);
    c.final_summary();
}
