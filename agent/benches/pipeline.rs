//! Cost of the ingest and forward path around the processor (issue 8, "Benchmarks").
//!
//! Four groups, each reported by criterion in elements (events or records) per second:
//!
//! - `payload/<kind>`: [`payload::decode`] of one MQTT payload: JSON with the value and a
//!   timestamp in ms since the epoch or as an RFC 3339 string, JSON without a timestamp, JSON
//!   with nested paths, and a bare number;
//! - `series_key/<case>`: [`SeriesTemplate::render`] of the series key of a message over
//!   1,000 distinct topics (`site-N/line-N/pump-N/metric`), and [`SeriesPattern::matches`]
//!   of those keys against the rule patterns of a pump pack (one pattern, or all four);
//! - `journal/append_commit_<n>`: [`Journal::append`] of `n` events and one
//!   [`Store::flush`] (the real sled fsync), i.e. one group commit of `n` events;
//! - `outbox/peek_<n>` and `outbox/peek_encode_<n>/<format>`: [`Outbox::peek`] of a batch of
//!   `n` summaries from an outbox holding 5,000, alone and followed by building the
//!   [`Batch`] and encoding it with [`wire::encode`] as JSON, JSON + zstd (the HTTP
//!   default) or the compact layout + zstd.
//!
//! # Method
//!
//! Every input is prebuilt and deterministic (a seeded [`fastrand::Rng`]); only the operation
//! under test is timed. `payload/` and `series_key/` time one decode or key per iteration,
//! cycling through 1,000 prebuilt payloads or topics so that neither the branch predictor
//! nor the cache sees one input only. `journal/` times whole commits ([`criterion::Bencher::iter_custom`]):
//! an iteration appends the next `n` prebuilt events (cycling through 10,000 over 1,000
//! series) and flushes; the throughput is per event, so a batch size's figure is
//! `commit time / n`. The store lives in a fresh temporary directory per batch size
//! ([`tempfile`], under `std::env::temp_dir`: the figure includes that disk's fsync; /tmp is
//! ext4 on the bench machine, not tmpfs), with the agent's default
//! 16 MiB sled cache. This is the writer's group commit without its channel, acks and
//! processor hand-off: [`edgewise::journal::run_writer`] is only reachable as a task that
//! owns its channels, so the benchmark drives the public `append` and `flush` it calls.
//! `outbox/` puts the 5,000 summaries untimed (default `[buffer]` policies, windows
//! closed in the last two hours so that the 7-day TTL keeps them); `peek` leaves the lane
//! unchanged, so every iteration reads the same oldest `n` records, as a forwarder retrying
//! a batch does.
//!
//! ```text
//! cargo bench -p edgewise --bench pipeline                  # everything, about 3 minutes
//! cargo bench -p edgewise --bench pipeline -- 'journal/'    # one group
//! ```

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkGroup, Criterion, Throughput, measurement::WallTime};
use edgewise::config::{BatchConfig, BufferConfig, PayloadConfig, PayloadFormat, TimestampUnit};
use edgewise::event::{Entry, Event};
use edgewise::journal::Journal;
use edgewise::metrics::Metrics;
use edgewise::outbox::Outbox;
use edgewise::rules::SeriesPattern;
use edgewise::source::payload::{self, SeriesTemplate};
use edgewise::store::Store;
use sensors::record::{BATCH_FORMAT_VERSION, Batch, Lane, RecordBody, Summary};
use sensors::wire::{self, Compression, Format};

/// Event time of the first event: 2024-06-10T06:00:00Z.
const START_MS: i64 = 1_717_999_200_000;
/// Distinct payloads and topics cycled through by the per-event benchmarks.
const INPUTS: usize = 1_000;
/// sled's page cache in the outbox benchmarks: 16 MiB, as when their figures in
/// BENCHMARKS.md were taken (the agent's default is 1 MiB since session 7).
const CACHE_CAPACITY: u64 = 16 << 20;
/// Summaries in the outbox of the `outbox/` group.
const OUTBOX_RECORDS: u64 = 5_000;

fn configure(group: &mut BenchmarkGroup<'_, WallTime>, elements: u64) {
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(elements));
}

/// Times `step` on one input per iteration, cycling through `inputs`.
fn bench_cycle<T>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    inputs: &[T],
    mut step: impl FnMut(&T),
) {
    group.bench_function(name, |b| {
        let mut i = 0;
        b.iter(|| {
            step(black_box(&inputs[i]));
            i += 1;
            if i == inputs.len() {
                i = 0;
            }
        })
    });
}

/// A reading with two decimals, as devices send them.
fn reading(rng: &mut fastrand::Rng) -> f64 {
    (2000.0 + rng.f64() * 6000.0).round() / 100.0
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` of a time on 2024-06-10 (the only day the payloads use).
fn rfc3339(ts_ms: i64) -> String {
    let ms_of_day = (ts_ms - START_MS + 6 * 3_600_000).rem_euclid(86_400_000);
    let (h, m) = (ms_of_day / 3_600_000, ms_of_day / 60_000 % 60);
    let (s, ms) = (ms_of_day / 1000 % 60, ms_of_day % 1000);
    format!("2024-06-10T{h:02}:{m:02}:{s:02}.{ms:03}Z")
}

fn json_cfg(value: &str, timestamp: &str) -> PayloadConfig {
    PayloadConfig {
        format: PayloadFormat::Json,
        value: value.into(),
        timestamp: timestamp.into(),
        timestamp_unit: TimestampUnit::Auto,
    }
}

/// One MQTT payload decoded, per kind.
fn payloads(c: &mut Criterion) {
    let mut rng = fastrand::Rng::with_seed(3);
    let mut inputs = |make: &mut dyn FnMut(i64, f64) -> String| -> Vec<Vec<u8>> {
        (0..INPUTS as i64)
            .map(|i| make(START_MS + i * 1000 + rng.i64(0..1000), reading(&mut rng)).into_bytes())
            .collect()
    };
    let cases: Vec<(&str, PayloadConfig, Vec<Vec<u8>>)> = vec![
        (
            "json_ts_ms",
            PayloadConfig::default(),
            inputs(&mut |ts, v| format!(r#"{{"value":{v},"ts":{ts},"unit":"C"}}"#)),
        ),
        (
            "json_rfc3339",
            PayloadConfig::default(),
            inputs(&mut |ts, v| format!(r#"{{"value":{v},"ts":"{}","unit":"C"}}"#, rfc3339(ts))),
        ),
        (
            "json_no_ts",
            PayloadConfig::default(),
            inputs(&mut |_, v| format!(r#"{{"value":{v},"unit":"C"}}"#)),
        ),
        (
            "json_nested",
            json_cfg("data.readings.1.v", "meta.time"),
            inputs(&mut |ts, v| {
                format!(
                    r#"{{"meta":{{"device":"pump-7","time":{ts}}},"data":{{"readings":[{{"k":"rpm","v":1480}},{{"k":"temp","v":{v}}}]}}}}"#
                )
            }),
        ),
        (
            "number",
            PayloadConfig { format: PayloadFormat::Number, ..PayloadConfig::default() },
            inputs(&mut |_, v| format!("{v}\n")),
        ),
    ];
    let mut group = c.benchmark_group("payload");
    configure(&mut group, 1);
    for (kind, cfg, inputs) in &cases {
        for input in inputs {
            let decoded = payload::decode(cfg, input).unwrap_or_else(|e| panic!("{kind}: {e}"));
            assert_eq!(decoded.ts_ms.is_some(), !kind.ends_with("no_ts") && *kind != "number");
        }
        bench_cycle(&mut group, kind, inputs, |p| {
            black_box(payload::decode(cfg, p).ok());
        });
    }
    group.finish();
}

/// Series keys from topics, and rule patterns over series keys.
fn series_keys(c: &mut Criterion) {
    const METRICS: [&str; 4] = ["temperature", "vibration", "pressure", "flow"];
    // 5 sites × 5 lines × 10 pumps × 4 metrics = 1,000 topics.
    let topics: Vec<String> = (0..INPUTS)
        .map(|i| {
            let (pump, line, site) = (i / 4 % 10, i / 40 % 5, i / 200);
            format!(
                "site-{site}/line-{line}/pump-{}/{}",
                site * 100 + line * 10 + pump,
                METRICS[i % 4]
            )
        })
        .collect();
    assert_eq!(topics.iter().collect::<std::collections::HashSet<_>>().len(), INPUTS);
    let mut group = c.benchmark_group("series_key");
    configure(&mut group, 1);
    for (case, template) in [
        ("template_topic", "{topic}"),
        ("template_segments", "{2}/{3}"),
        ("template_literal_segments", "plant-{0}.{1}/{2}/{3}"),
    ] {
        let template = SeriesTemplate::parse(template).unwrap_or_else(|e| panic!("{e}"));
        bench_cycle(&mut group, case, &topics, |topic| {
            black_box(template.render(topic).ok());
        });
    }
    // Patterns match the keys of the `{2}/{3}` template (`pump-N/metric`).
    let template = SeriesTemplate::parse("{2}/{3}").unwrap_or_else(|e| panic!("{e}"));
    let series: Vec<String> = topics.iter().map(|t| template.render(t).unwrap()).collect();
    let pattern = |p: &str| SeriesPattern::parse(p).unwrap_or_else(|e| panic!("{e}"));
    let one = pattern("pump-*/temperature");
    bench_cycle(&mut group, "match_glob", &series, |s| {
        black_box(one.matches(s));
    });
    let pack: Vec<SeriesPattern> =
        ["pump-*/temperature", "pump-*/vibration", "pump-*/#", "+/pressure"].map(pattern).into();
    let matched: usize = series.iter().map(|s| pack.iter().filter(|p| p.matches(s)).count()).sum();
    // Every key matches `pump-*/#`; temperature, vibration and pressure keys one more.
    assert_eq!(matched, INPUTS + 3 * INPUTS / 4);
    bench_cycle(&mut group, "match_pack_4_patterns", &series, |s| {
        for p in &pack {
            black_box(p.matches(s));
        }
    });
    group.finish();
}

/// A store in a fresh temporary directory (removed when the directory is dropped).
fn open_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::Builder::new()
        .prefix("edgewise-bench-")
        .tempdir()
        .unwrap_or_else(|e| panic!("temporary directory: {e}"));
    let (store, _) = Store::open(&dir.path().join("store"), CACHE_CAPACITY)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.path().display()));
    (dir, store)
}

/// Journal append and group commit, per batch size.
fn journal(c: &mut Criterion) {
    let mut rng = fastrand::Rng::with_seed(5);
    let entries: Vec<Entry> = (0..10_000i64)
        .map(|i| {
            let ts_ms = START_MS + i;
            Entry::Event(Event {
                series: format!("pump-{}/temperature", i % 1000),
                ts_ms,
                value: reading(&mut rng),
                received_ms: ts_ms + 5,
                source: 0,
            })
        })
        .collect();
    let mut group = c.benchmark_group("journal");
    for n in [1usize, 10, 100, 1000] {
        configure(&mut group, n as u64);
        let (dir, store) = open_store();
        let mut journal = Journal::open(&store).unwrap_or_else(|e| panic!("{e}"));
        let mut next = 0;
        group.bench_function(format!("append_commit_{n}"), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    for _ in 0..n {
                        black_box(journal.append(&entries[next]).unwrap());
                        next = (next + 1) % entries.len();
                    }
                    journal.commit().unwrap();
                }
                start.elapsed()
            })
        });
        drop(journal);
        drop(store);
        drop(dir);
    }
    group.finish();
}

/// Outbox peek of a forwarder batch, alone and encoded.
fn outbox(c: &mut Criterion) {
    let (dir, store) = open_store();
    let outbox =
        Outbox::open(&store, "bench", &BufferConfig::default(), Arc::new(Metrics::default()))
            .unwrap_or_else(|e| panic!("{e}"));
    // 1,000 series × 5 one-minute windows, closed within the last two hours.
    let window_ms = 60_000;
    let now_ms = edgewise::event::now_ms();
    let first_start = (now_ms - 2 * 3_600_000).div_euclid(window_ms) * window_ms;
    let mut rng = fastrand::Rng::with_seed(9);
    for seq in 0..OUTBOX_RECORDS {
        let (series, window) = (seq % 1000, seq / 1000);
        let (a, b) = (reading(&mut rng), reading(&mut rng));
        let summary = Summary {
            series: format!("pump-{series}/temperature"),
            start_ms: first_start + window as i64 * window_ms,
            window_ms: window_ms as u64,
            count: 60,
            min: a.min(b),
            max: a.max(b),
            mean: ((a + b) * 50.0).round() / 100.0,
            stddev: (rng.f64() * 300.0).round() / 100.0,
            first: a,
            last: b,
            windows: 1,
        };
        let stored = outbox.put(Lane::Summaries, seq, RecordBody::Summary(summary));
        assert!(stored.unwrap_or_else(|e| panic!("{e}")));
    }
    let max_bytes = BatchConfig::default().max_bytes.0;
    let mut group = c.benchmark_group("outbox");
    for n in [100usize, 500] {
        configure(&mut group, n as u64);
        let peek = || {
            let records = outbox.peek(Lane::Summaries, n, max_bytes).unwrap();
            assert_eq!(records.len(), n);
            records
        };
        group.bench_function(format!("peek_{n}"), |b| b.iter(|| black_box(peek())));
        for (name, format, compression) in [
            ("json", Format::Json, Compression::None),
            ("json_zstd", Format::Json, Compression::Zstd),
            ("postcard_zstd", Format::Postcard, Compression::Zstd),
        ] {
            group.bench_function(format!("peek_encode_{n}/{name}"), |b| {
                b.iter(|| {
                    let records = peek();
                    let batch = Batch {
                        version: BATCH_FORMAT_VERSION,
                        agent: "bench".to_string(),
                        lane: Lane::Summaries,
                        first_seq: records[0].seq,
                        last_seq: records[n - 1].seq,
                        records,
                    };
                    black_box(wire::encode(&batch, format, compression).unwrap())
                })
            });
        }
    }
    group.finish();
    drop(outbox);
    drop(store);
    drop(dir);
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    payloads(&mut c);
    series_keys(&mut c);
    journal(&mut c);
    outbox(&mut c);
    c.final_summary();
}
