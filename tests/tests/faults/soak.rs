//! Soak: a long upstream outage compressed into seconds. 40 simulated series every 10 ms
//! (4,000 events/s) with 100 ms windows produce 400 summaries/s, as many as 24,000 series
//! with 1-minute windows: the outbox (1 MiB cap) fills, compacts and evicts for the whole
//! run, and the journal (1 MiB cap) is trimmed behind snapshots (one sled flush every 2 s).
//! RSS is sampled every 250 ms: it grows while sled's log grows to its steady size (the
//! first ~20 s here), then must stay flat: the peak of the last quarter of the outage within
//! 10 % (+ 2 MiB) of the peak of the second quarter, 24 s earlier. Two leaks this caught:
//! every sled flush kept a 512 KiB log segment alive in the flushing thread's epoch bag
//! (+0.25 MB/s here, `Store::flush`), and a compaction pass in one sled batch left a 10 MB
//! step (`Outbox::compact` writes in batches now). Then the upstream comes back and the
//! backlog drains.
//! `EDGEWISE_FAULT_SCALE=N` runs N times longer (a 10-minute soak: N = 12).

use std::time::{Duration, Instant};

use edgewise_tests::rig::fault_scale;
use edgewise_tests::{Agent, Receiver, last_line_fields, wait_for};

/// Seconds of outage at scale 1: the first quarter is sled's warm-up.
const OUTAGE_S: u64 = 48;

fn field(log: &str, name: &str) -> Option<u64> {
    last_line_fields(log, "backlog_bytes=")
        .into_iter()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| v.parse().ok())
}

#[test]
fn a_long_outage_under_load_keeps_memory_flat_and_the_outbox_within_its_cap() {
    let dir = tempfile::tempdir().unwrap();
    let mut receiver = Receiver::start();
    receiver.set_unavailable();
    let toml = format!(
        r#"[agent]
id = "gw-soak"
data_dir = "{data}"
status_interval = "250ms"

[journal]
commit_interval = "5ms"
snapshot_interval = "2s"
tick_interval = "100ms"
max_bytes = "1 MiB"

[[sources]]
kind = "simulated"
devices = 10
metrics = ["temperature", "vibration", "pressure", "current"]
interval = "10ms"

[[rules]]
kind = "threshold"
name = "hot"
series = "pump-*/temperature"
above = 75.0
clear = 70.0

[summary]
window = "100ms"
allowed_lateness = "50ms"

[buffer]
max_bytes = "1 MiB"

[upstream]
kind = "http"
url = "{url}"
retry_initial = "20ms"
retry_max = "200ms"
"#,
        data = dir.path().join("data").display(),
        url = receiver.url(),
    );
    let mut agent = Agent::start(&toml, dir.path());

    let outage = Duration::from_secs(OUTAGE_S * fault_scale());
    let started = Instant::now();
    let mut samples: Vec<(f64, u64)> = Vec::new();
    let mut max_outbox = 0u64;
    while started.elapsed() < outage {
        agent.assert_running("during the outage");
        if let Some(rss) = agent.rss_kb() {
            samples.push((started.elapsed().as_secs_f64(), rss));
        }
        if let Some(bytes) = field(&agent.logs(), "outbox_bytes") {
            max_outbox = max_outbox.max(bytes);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let logs = agent.logs();
    let events = field(&logs, "events_in").unwrap_or(0);
    let evicted = field(&logs, "evicted").unwrap_or(0);
    let compacted = field(&logs, "compacted").unwrap_or(0);
    assert!(events > 10_000 * fault_scale(), "load: {events} events\n{logs}");
    assert!(evicted + compacted > 0, "the outbox filled and applied its policy\n{logs}");
    assert!(max_outbox <= 1024 * 1024 + 64 * 1024, "outbox {max_outbox} B over its cap");

    // Flat: the last quarter's peak within 10 % (+ 2 MiB of allocator noise) of the peak of
    // the second quarter, once sled's log has reached its steady size. A leak of 0.2 MB/s
    // (the epoch-bag leak above) grows the RSS by ~5 MB in those 24 s.
    let at = |from: f64, to: f64| {
        samples
            .iter()
            .filter(|(t, _)| *t >= from * outage.as_secs_f64() && *t < to * outage.as_secs_f64())
            .map(|(_, rss)| *rss)
            .max()
            .unwrap_or(0)
    };
    let (warm, late) = (at(0.25, 0.5), at(0.75, 1.0));
    eprintln!(
        "FIGURES fault=soak_outage duration_s={} events={events} evicted={evicted} \
         compacted={compacted} rss_kb_warm_peak={warm} rss_kb_late_peak={late} \
         outbox_peak_bytes={max_outbox} samples={}",
        outage.as_secs(),
        samples.len()
    );
    assert!(warm > 0 && late > 0, "RSS sampled: {samples:?}");
    assert!(
        late as f64 <= warm as f64 * 1.10 + 2048.0,
        "RSS grew during the outage: {warm} KiB → {late} KiB; samples {samples:?}"
    );

    // The upstream returns: the backlog drains, the agent still runs.
    receiver.set_up();
    wait_for(Duration::from_secs(60), "the backlog to drain", || {
        let logs = agent.logs();
        field(&logs, "outbox_summaries").is_some_and(|n| n < 200)
            && field(&logs, "sent").is_some_and(|n| n > 0)
    });
    agent.assert_running("after the drain");
}
