//! An outage into the reference receiver: the agent sends compact binary batches
//! (postcard + zstd) to `edgewise collect`, which is not running while events arrive. The
//! outbox compacts the backlog; then the collector starts, the backlog drains, and the
//! collector's output file must account for every published event exactly once (summary
//! counts plus gap events), with merged summaries among them. A second collector started on the
//! same file after the agent resends must not write anything twice.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use edgewise_tests::{
    Agent, AgentConfig, Mosquitto, Publisher, QoS, Reading, edgewise_bin, free_port, now_ms,
    port_open, wait_for, wait_until,
};
use sensors::record::{Record, RecordBody};

const TIMEOUT: Duration = Duration::from_secs(60);

/// `edgewise collect` on `port`, writing `out`; killed on drop.
struct Collector(Child);

impl Collector {
    fn start(port: u16, out: &Path, log: &Path) -> Collector {
        let log = std::fs::File::create(log).unwrap();
        let child = Command::new(edgewise_bin())
            .args(["collect", "--listen", &format!("127.0.0.1:{port}"), "--out"])
            .arg(out)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn edgewise collect");
        wait_for(TIMEOUT, "the collector to listen", || port_open(port));
        Collector(child)
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The records in the collector's output file.
fn written(out: &Path) -> Vec<Record> {
    let text = std::fs::read_to_string(out).unwrap_or_default();
    text.lines().map(|l| serde_json::from_str(l).expect("a record per line")).collect()
}

/// Events accounted for by `records`: summary counts plus gap events.
fn accounted(records: &[Record]) -> u64 {
    records
        .iter()
        .map(|r| match &r.body {
            RecordBody::Summary(s) => s.count,
            RecordBody::Gap(g) => g.events,
            RecordBody::Alert(_) => 0,
        })
        .sum()
}

#[test]
fn an_outage_into_edgewise_collect_accounts_for_every_event_in_its_output() {
    let dir = tempfile::Builder::new().prefix("edgewise-e2e-").tempdir().unwrap();
    let broker = Mosquitto::start();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/ingest");
    let mut config =
        AgentConfig::new("gw-collect", dir.path().join("agent/data"), broker.port(), &url);
    config.format = "postcard".into();
    config.batch_max_records = 50;
    config.buffer_max_bytes = Some("64 KiB".into());
    config.buffer_extra = "compact_above = \"5%\"\ncompact_to = \"5s\"\n".into();
    let mut agent = Agent::start(&config.toml(), &dir.path().join("agent"));
    let client_id = config.client_id();
    let subscribed = wait_until(Duration::from_secs(20), || {
        broker.has_subscriber(&client_id) || !agent.is_running()
    });
    assert!(subscribed, "{client_id} did not subscribe; broker log:\n{}", broker.log());

    // 20 series, four readings a second each, for 11 s; nobody listens upstream. Compaction
    // runs every `COMPACT_EVERY_PUTS` (128) records put while above the mark, and the
    // forwarder holds the first batch: 11 s (~220 summaries) leaves room for two runs.
    let publisher = Publisher::connect(broker.port(), "collect-pub");
    let mut published = 0u64;
    let mut last_ts = 0;
    for round in 0..44 {
        let ts = (now_ms() + 300).max(last_ts + 1);
        last_ts = ts;
        let readings: Vec<Reading> = (0..20)
            .map(|s| Reading::new(format!("s/m{s:02}"), ts, (round * 3 + s) as f64 / 4.0))
            .collect();
        publisher.publish_all(QoS::AtLeastOnce, readings.iter().map(Reading::message));
        published += readings.len() as u64;
        std::thread::sleep(Duration::from_millis(250));
    }
    // Every window closes (end + 500 ms lateness) while the upstream is away.
    let closed = last_ts + 1_000 + 500;
    assert!(wait_until(Duration::from_secs(10), || now_ms() > closed));
    agent.assert_running("during the outage");

    let out = dir.path().join("records.jsonl");
    let collector = Collector::start(port, &out, &dir.path().join("collect1.log"));
    let drained = wait_until(TIMEOUT, || accounted(&written(&out)) >= published);
    let records = written(&out);
    assert!(drained, "published {published}, accounted {}", accounted(&records));
    assert_eq!(accounted(&records), published, "every event once, in a summary or a gap");
    let ids: BTreeSet<&str> = records.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids.len(), records.len(), "no record written twice");
    let merged = records
        .iter()
        .filter(|r| matches!(&r.body, RecordBody::Summary(s) if s.windows > 1))
        .count();
    assert!(merged > 0, "the backlog was compacted: {records:#?}");

    // The agent restarts and the collector restarts on the same file: nothing is written twice.
    drop(collector);
    agent.terminate();
    agent.restart();
    let collector = Collector::start(port, &out, &dir.path().join("collect2.log"));
    let reading = Reading::new("s/m00", now_ms() + 300, 1.0);
    publisher.publish_all(QoS::AtLeastOnce, [reading.message()]);
    let later = wait_until(TIMEOUT, || accounted(&written(&out)) > published);
    assert!(later, "the reading after the restart arrives");
    let records = written(&out);
    let ids: BTreeSet<&str> = records.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids.len(), records.len(), "no record written twice across restarts");
    assert_eq!(accounted(&records), published + 1);
    drop(collector);
}
