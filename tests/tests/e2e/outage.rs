//! A long outage against the outbox's policies: the upstream is away while a small outbox
//! (64 KiB) fills past its high-water mark, its oldest records outlive the summaries TTL and
//! a burst of one-off series pushes it to its cap. When the upstream returns, every published
//! event must be accounted for exactly once: in a summary's `count` (one 1 s window, or a
//! coarse 10 s window merged by compaction) or in a gap record's `events` (expired or
//! evicted); merged summaries must hold the exact statistics of what they merged; every alert
//! must arrive.
//!
//! The phases, all while the receiver refuses connections:
//!
//! 1. **burst**: 700 series with one reading each, 700 summaries that cannot be merged (one
//!    window per series) and take more than the cap: the oldest are evicted (`outbox_full`);
//! 2. **steady**: 40 series, five readings a second each, for 12 s: above the high-water mark
//!    compaction merges their 1 s windows into 10 s windows; the threshold rule on one of
//!    them raises and clears alerts; the burst's survivors pass the 10 s TTL and expire;
//! 3. the last windows close, the receiver comes back, the backlog drains (paced).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use edgewise_tests::{
    Agent, AgentConfig, Mosquitto, Publisher, QoS, Reading, Received, Receiver, compare_alerts,
    expected_summaries, expected_threshold_alerts, now_ms, wait_until, window_start,
};
use sensors::record::{Gap, Lane, Summary};

/// Longest wait for the backlog to drain once the upstream is back.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// The configured coarse window of compaction.
const COMPACT_TO_MS: i64 = 10_000;
const BURST_SERIES: usize = 700;
const STEADY_SERIES: usize = 40;
/// Rounds of the steady phase, one every 200 ms.
const STEADY_ROUNDS: usize = 60;

/// Strictly increasing payload timestamps 300 ms ahead of the wall clock.
struct Stamps {
    last: i64,
}

impl Stamps {
    fn next(&mut self) -> i64 {
        self.last = (now_ms() + 300).max(self.last + 1);
        self.last
    }
}

fn publish(publisher: &Publisher, readings: &[Reading]) {
    publisher.publish_all(QoS::AtLeastOnce, readings.iter().map(Reading::message));
}

/// `|a - b|` small against the magnitudes involved.
fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * (1.0 + a.abs().max(b.abs()))
}

/// The value of `key=<number>` in every status line of `logs` that has it as a number.
fn status_numbers(logs: &str, key: &str) -> Vec<u64> {
    let prefix = format!("{key}=");
    logs.lines()
        .filter(|l| l.contains(" status ") || l.contains(" final status "))
        .filter_map(|l| l.split_whitespace().find_map(|f| f.strip_prefix(prefix.as_str())))
        .filter_map(|v| v.parse().ok())
        .collect()
}

#[test]
fn a_long_outage_compacts_expires_and_evicts_yet_accounts_for_every_event_once() {
    let dir = tempfile::Builder::new().prefix("edgewise-e2e-").tempdir().unwrap();
    let broker = Mosquitto::start();
    let mut receiver = Receiver::start();
    let mut config =
        AgentConfig::new("gw-long", dir.path().join("agent/data"), broker.port(), &receiver.url());
    // Small batches: the records a failing forwarder keeps handing out are never merged, and
    // the head batch must not cover the whole (small) outbox.
    config.batch_max_records = 50;
    config.threshold_rule("hot", "s/pump/00", 50.0, 40.0);
    // `extra` continues the `[upstream.batch]` table, then opens `[buffer]`.
    config.extra = "drain_rate = 500\n\n[buffer]\nmax_bytes = \"64 KiB\"\n\
                    compact_above = \"50%\"\ncompact_to = \"10s\"\nsummaries_ttl = \"10s\"\n"
        .to_string()
        + &config.extra;
    receiver.refuse_connections();
    let agent_dir = dir.path().join("agent");
    let mut agent = Agent::start(&config.toml(), &agent_dir);
    let client_id = config.client_id();
    let subscribed = wait_until(Duration::from_secs(20), || {
        broker.has_subscriber(&client_id) || !agent.is_running()
    });
    agent.assert_running("the agent stopped during start-up");
    assert!(subscribed, "{client_id} did not subscribe; broker log:\n{}", broker.log());
    let publisher = Publisher::connect(broker.port(), "long-pub");
    let mut stamps = Stamps { last: 0 };
    let mut readings: Vec<Reading> = Vec::new();

    // 1. The burst: one reading for each of 700 series.
    let burst: Vec<Reading> = (0..BURST_SERIES)
        .map(|i| Reading::new(format!("s/burst/{i:03}"), stamps.next(), (i % 50) as f64))
        .collect();
    publish(&publisher, &burst);
    readings.extend(burst);

    // 2. The steady phase: 40 series every 200 ms for 12 s; s/pump/00 runs hot twice.
    let started = Instant::now();
    for round in 0..STEADY_ROUNDS {
        let round_start = Instant::now();
        let batch: Vec<Reading> = (0..STEADY_SERIES)
            .map(|s| {
                let value = match (s, round) {
                    (0, 10..=14 | 35..=39) => 90.0 + round as f64,
                    _ => 10.0 + ((round * 7 + s * 3) % 23) as f64 + s as f64 / 8.0,
                };
                Reading::new(format!("s/pump/{s:02}"), stamps.next(), value)
            })
            .collect();
        publish(&publisher, &batch);
        readings.extend(batch);
        std::thread::sleep(Duration::from_millis(200).saturating_sub(round_start.elapsed()));
    }
    // Every window closes (end + 500 ms lateness, 300 ms lead) while nobody listens.
    let closed = stamps.last + 1_000 + 500 + 300;
    assert!(wait_until(Duration::from_secs(10), || now_ms() > closed));
    agent.assert_running("during the outage");
    let outage_logs = agent.logs();
    eprintln!("outage phases took {:?}", started.elapsed());

    // 3. The upstream returns.
    let up_at = Instant::now();
    receiver.set_up();
    let published = readings.len() as u64;
    let accounted =
        |r: &Received| r.summary_count_total() + r.gaps().iter().map(|g| g.events).sum::<u64>();
    let alerts =
        expected_threshold_alerts(readings.iter().filter(|r| r.series == "s/pump/00"), 50.0, 40.0);
    assert_eq!(alerts.len(), 4, "the input is meant to run hot twice: {alerts:?}");
    let drained = wait_until(DRAIN_TIMEOUT, || {
        receiver.with(|r| accounted(r) >= published && r.alerts().len() >= alerts.len())
    });
    assert!(drained, "published {published}; {}", receiver.describe());
    let drain_time = up_at.elapsed();

    let fine = expected_summaries(&readings, 1_000);
    let coarse = expected_summaries(&readings, COMPACT_TO_MS);
    receiver.with(|r| {
        assert!(r.protocol_errors.is_empty(), "wire-format errors: {:?}", r.protocol_errors);
        assert!(r.conflicts.is_empty(), "same id, different content: {:?}", r.conflicts);
        assert!(r.order_violations.is_empty(), "out of order: {:?}", r.order_violations);
        assert_eq!(accounted(r), published, "every event once: {}", r.describe());

        // Both kinds of loss happened, and say what they lost.
        let gaps = r.gaps();
        let by_reason = |reason: &str| -> Vec<&Gap> {
            gaps.iter().copied().filter(|g| g.reason == reason).collect()
        };
        let (expired, evicted) = (by_reason("expired"), by_reason("outbox_full"));
        assert_eq!(expired.len() + evicted.len(), gaps.len(), "unknown reasons: {gaps:?}");
        for g in &gaps {
            assert_eq!(g.lane, Lane::Summaries, "only summaries may be lost: {g:?}");
            assert!(g.events >= 1 && g.records >= 1, "{g:?}");
        }
        let sum = |gs: &[&Gap]| {
            (gs.iter().map(|g| g.records).sum::<u64>(), gs.iter().map(|g| g.events).sum::<u64>())
        };
        let (expired_records, expired_events) = sum(&expired);
        let (evicted_records, evicted_events) = sum(&evicted);
        assert!(expired_records > 0, "the outage outlived the TTL but nothing expired");
        assert!(evicted_records > 0, "the burst exceeded the cap but nothing was evicted");

        // Raw summaries are exact per 1 s window; merged ones are 10 s windows.
        let summaries = r.summaries();
        let (merged, raw): (Vec<&Summary>, Vec<&Summary>) =
            summaries.iter().copied().partition(|s| s.windows > 1);
        assert!(!merged.is_empty(), "compaction never merged anything: {}", r.describe());
        for s in &raw {
            assert_eq!(s.window_ms, 1_000, "{s:?}");
            let e = &fine[&(s.series.clone(), s.start_ms)];
            assert!(e.diff(s).is_empty(), "{} @ {}: {:?}", s.series, s.start_ms, e.diff(s));
        }
        for s in &merged {
            assert_eq!((s.window_ms, s.start_ms % COMPACT_TO_MS), (10_000, 0), "{s:?}");
            assert!(s.series.starts_with("s/pump/"), "burst series cannot merge: {s:?}");
        }

        // Per series and coarse window: what arrived adds up to the events (never more), and
        // where nothing of it was lost the statistics of the union are exact. Where one merged
        // record holds all windows that did not arrive raw, it is exact on its own, first
        // and last included.
        let mut buckets: BTreeMap<(String, i64), Vec<&Summary>> = BTreeMap::new();
        for s in &summaries {
            let key = (s.series.clone(), window_start(s.start_ms, COMPACT_TO_MS));
            buckets.entry(key).or_default().push(s);
        }
        let (mut exact_merges, mut complete_buckets) = (0, 0);
        for (key, got) in &buckets {
            let want = &coarse[key];
            let count: u64 = got.iter().map(|s| s.count).sum();
            assert!(count <= want.count, "{key:?}: {count} events > {}", want.count);
            if count < want.count {
                continue; // some of it is in a gap
            }
            complete_buckets += 1;
            let values: f64 = got.iter().map(|s| s.count as f64 * s.mean).sum();
            let squares: f64 =
                got.iter().map(|s| s.count as f64 * (s.stddev * s.stddev + s.mean * s.mean)).sum();
            assert!(close(values, want.sum), "{key:?}: Σ {values} != {}", want.sum);
            assert!(close(squares, want.sum_sq), "{key:?}: Σ² {squares} != {}", want.sum_sq);
            let min = got.iter().map(|s| s.min).fold(f64::INFINITY, f64::min);
            let max = got.iter().map(|s| s.max).fold(f64::NEG_INFINITY, f64::max);
            assert_eq!((min, max), (want.min, want.max), "{key:?}");
            let merged_here: Vec<&&Summary> = got.iter().filter(|s| s.windows > 1).collect();
            if let [only] = merged_here.as_slice() {
                let raw_starts: BTreeSet<i64> =
                    got.iter().filter(|s| s.windows == 1).map(|s| s.start_ms).collect();
                let rest: Vec<Reading> = readings
                    .iter()
                    .filter(|x| x.series == key.0)
                    .filter(|x| window_start(x.ts_ms, COMPACT_TO_MS) == key.1)
                    .filter(|x| !raw_starts.contains(&window_start(x.ts_ms, 1_000)))
                    .cloned()
                    .collect();
                let windows: BTreeSet<i64> =
                    rest.iter().map(|x| window_start(x.ts_ms, 1_000)).collect();
                let e = &expected_summaries(&rest, COMPACT_TO_MS)[key];
                assert!(e.diff(only).is_empty(), "{key:?}: {:?} in {only:?}", e.diff(only));
                assert_eq!(only.windows as usize, windows.len(), "{key:?}: {only:?}");
                exact_merges += 1;
            }
        }
        assert!(exact_merges > 0, "no merged summary could be checked exactly");

        let problems = compare_alerts(&alerts, &r.alerts());
        assert!(problems.is_empty(), "alerts differ: {problems:#?}");

        let merged_windows: u64 = merged.iter().map(|s| u64::from(s.windows)).sum();
        eprintln!(
            "long outage: {published} events; {} raw summaries, {} merged summaries holding \
             {merged_windows} windows ({exact_merges} checked exactly, {complete_buckets} \
             complete series x 10 s); expired {expired_records} records / {expired_events} \
             events in {} gap(s); evicted {evicted_records} records / {evicted_events} events \
             in {} gap(s); {} alerts; drained in {drain_time:?} ({} batches)",
            raw.len(),
            merged.len(),
            expired.len(),
            evicted.len(),
            r.alerts().len(),
            r.batches.len(),
        );
    });

    // The status line showed the backlog during the outage: above the high-water mark, the
    // age of the oldest record growing past the TTL, and no drain estimate while nothing
    // could be sent.
    let backlog = status_numbers(&outage_logs, "backlog_bytes");
    assert!(backlog.iter().any(|b| *b > 32 * 1024), "backlog_bytes: {backlog:?}");
    let ages = status_numbers(&outage_logs, "oldest_age_s");
    assert!(ages.iter().any(|a| *a >= 10), "oldest_age_s: {ages:?}");
    let statuses = outage_logs
        .lines()
        .filter(|l| l.contains("backlog_bytes=") && !l.contains("backlog_bytes=0 "));
    let with_estimate: Vec<&str> = statuses.filter(|l| !l.contains("drain_eta_s=-")).collect();
    assert!(with_estimate.is_empty(), "an estimate while the upstream is down: {with_estimate:?}");
    let status = agent.terminate();
    assert!(status.success(), "SIGTERM should stop the agent cleanly, got {status}");
    let logs = agent.logs();
    eprintln!(
        "agent counters: compacted {:?} (records in), expired {:?}, evicted {:?}",
        status_numbers(&logs, "compacted").last(),
        status_numbers(&logs, "expired").last(),
        status_numbers(&logs, "evicted").last(),
    );
    if std::env::var_os("EDGEWISE_E2E_KEEP").is_some() {
        let path = dir.keep();
        let _ = std::fs::write(path.join("mosquitto.log"), broker.log());
        eprintln!("kept {}", path.display());
    }
}
