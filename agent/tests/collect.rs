//! `edgewise collect` as a backend developer meets it: the real binary on a free port, batches
//! in both formats and encodings, resends, garbage, a restart, and a real agent sending to it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sensors::record::{
    Alert, AlertState, BATCH_FORMAT_VERSION, Batch, Gap, Lane, Record, RecordBody, Severity,
    Summary, gap_id, record_id,
};
use sensors::wire::{Compression, Format};

/// Longest wait for anything in these tests.
const DEADLINE: Duration = Duration::from_secs(30);

/// A running `edgewise collect`; killed on drop, its log printed if the test fails.
struct Collect {
    child: Child,
    url: String,
    addr: String,
    log: PathBuf,
}

impl Collect {
    fn start(out: &Path, extra: &[&str]) -> Collect {
        let log = out.with_extension(format!("{}.log", fastrand::u32(..)));
        let mut child = Command::new(env!("CARGO_BIN_EXE_edgewise"))
            .args(["collect", "--listen", "127.0.0.1:0", "--out"])
            .arg(out)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(DEADLINE).expect("collect prints its URL");
        let url = line.trim().strip_prefix("listening on ").expect(&line).to_string();
        let addr = url.trim_start_matches("http://").split('/').next().unwrap().to_string();
        Collect { child, url, addr, log }
    }

    /// POSTs a body; returns the status and the response text.
    fn post(&self, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
        post(&self.addr, headers, body)
    }

    /// POSTs an encoded batch with the headers the agent would send.
    fn send(&self, batch: &Batch, format: Format, compression: Compression) -> (u16, String) {
        let body = sensors::wire::encode(batch, format, compression).unwrap();
        let mut headers = vec![("content-type", format.content_type())];
        if compression != Compression::None {
            headers.push(("content-encoding", compression.content_encoding()));
        }
        self.post(&headers, &body)
    }

    /// SIGTERM, then the exit status (within the deadline).
    fn stop(&mut self) -> ExitStatus {
        terminate(&mut self.child)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Collect {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- collect log -----\n{}", self.log());
        }
    }
}

/// Sends SIGTERM and waits for the exit.
fn terminate(child: &mut Child) -> ExitStatus {
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(start.elapsed() < DEADLINE, "no exit within {DEADLINE:?} of SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A minimal HTTP/1.1 client: one request per connection.
fn post(addr: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut request = format!("POST /ingest HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
    stream.write_all(request.as_bytes()).unwrap();
    // The server may answer (413) and close before reading the whole body.
    let _ = stream.write_all(body);
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).expect(&response);
    let text = response.split_once("\r\n\r\n").map(|(_, t)| t.to_string()).unwrap_or_default();
    (status, text)
}

/// The records in the output file, in order.
fn written(out: &Path) -> Vec<Record> {
    let text = std::fs::read_to_string(out).unwrap_or_default();
    text.lines().map(|l| serde_json::from_str(l).expect(l)).collect()
}

fn summary(seq: u64) -> RecordBody {
    RecordBody::Summary(Summary {
        series: format!("pump-{}/temperature", seq % 3),
        start_ms: 1_764_064_800_000 + 10_000 * seq as i64,
        window_ms: 10_000,
        count: 50,
        min: 61.2,
        max: 64.9,
        mean: 63.118_333_333,
        stddev: 0.81,
        first: 61.2,
        last: 64.0,
        windows: 1,
    })
}

fn alert(seq: u64) -> RecordBody {
    RecordBody::Alert(Alert {
        rule: "hot".into(),
        series: "pump-1/temperature".into(),
        state: if seq.is_multiple_of(2) { AlertState::Cleared } else { AlertState::Raised },
        severity: Severity::Critical,
        ts_ms: 1_764_064_800_000 + seq as i64,
        value: 91.5,
        threshold: 90.0,
        message: "pump-1 hot".into(),
        labels: [("device".to_string(), "pump-1".to_string())].into(),
    })
}

/// A batch of agent `gw`, epoch 0xbeef; in the summaries lane `gap_at` is a gap record.
fn batch(lane: Lane, seqs: std::ops::RangeInclusive<u64>, gap_at: Option<u64>) -> Batch {
    let records = seqs
        .clone()
        .map(|seq| match (lane, gap_at) {
            (Lane::Summaries, Some(at)) if at == seq => Record {
                id: gap_id("gw", 0xbeef, lane, seq),
                seq,
                body: RecordBody::Gap(Gap {
                    lane,
                    first_seq: seq,
                    last_seq: seq,
                    records: 1,
                    from_ms: Some(1_764_064_800_000),
                    to_ms: Some(1_764_064_810_000),
                    reason: "outbox_full".into(),
                    events: 50,
                }),
            },
            (Lane::Summaries, _) => {
                Record { id: record_id("gw", 0xbeef, lane, seq), seq, body: summary(seq) }
            }
            (Lane::Alerts, _) => {
                Record { id: record_id("gw", 0xbeef, lane, seq), seq, body: alert(seq) }
            }
        })
        .collect();
    Batch {
        version: BATCH_FORMAT_VERSION,
        agent: "gw".into(),
        lane,
        first_seq: *seqs.start(),
        last_seq: *seqs.end(),
        records,
    }
}

#[test]
fn json_zstd_and_postcard_gzip_batches_are_written_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let mut collect = Collect::start(&out, &[]);
    let alerts = batch(Lane::Alerts, 1..=4, None);
    let summaries = batch(Lane::Summaries, 10..=29, Some(10));
    assert_eq!(collect.send(&alerts, Format::Json, Compression::Zstd).0, 200);
    let (status, text) = collect.send(&summaries, Format::Postcard, Compression::Gzip);
    assert_eq!((status, text.as_str()), (200, "ok: 20 new, 0 duplicate\n"));
    // Resent whole, and resent overlapping (the agent re-peeks after a lost acknowledgement).
    let (status, text) = collect.send(&alerts, Format::Postcard, Compression::None);
    assert_eq!((status, text.as_str()), (200, "ok: 0 new, 4 duplicate\n"));
    assert_eq!(collect.send(&summaries, Format::Json, Compression::Gzip).0, 200);
    let more = batch(Lane::Summaries, 20..=34, None);
    let (status, text) = collect.send(&more, Format::Postcard, Compression::Zstd);
    assert_eq!((status, text.as_str()), (200, "ok: 5 new, 10 duplicate\n"));

    let mut expected = alerts.records.clone();
    expected.extend(summaries.records.iter().cloned());
    expected.extend(more.records[10..].iter().cloned());
    assert_eq!(written(&out), expected);
    assert!(collect.stop().success());
    let log = collect.log();
    assert!(log.contains("json+zstd") && log.contains("postcard+gzip"), "{log}");
    assert!(log.contains("collect stopped") && log.contains("written=29"), "{log}");
}

#[test]
fn undecodable_unsupported_and_oversized_bodies_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let collect = Collect::start(&out, &["--max-body", "4 KiB"]);
    let json = [("content-type", "application/json")];
    let (status, text) = collect.post(&json, b"{\"version\": 2, \"agent\": ");
    assert_eq!(status, 400);
    assert!(text.contains("not a JSON batch") && text.contains("EOF"), "{text}");
    let (status, text) =
        collect.post(&[("content-type", Format::Postcard.content_type())], b"\x02garbage");
    assert_eq!(status, 400);
    assert!(text.contains("compact batch is malformed"), "{text}");
    let (status, text) = collect.post(&[("content-type", "text/plain")], b"hello");
    assert_eq!(status, 415);
    assert!(text.contains("text/plain"), "{text}");
    let (status, text) = collect.post(&[json[0], ("content-encoding", "br")], b"x");
    assert_eq!(status, 415);
    assert!(text.contains("br"), "{text}");
    let (status, text) = collect.post(&[json[0], ("content-encoding", "zstd")], b"not zstd");
    assert_eq!(status, 400);
    assert!(text.contains("not valid zstd"), "{text}");
    // Valid JSON, but the ids do not belong to the agent.
    let mut foreign = batch(Lane::Alerts, 1..=2, None);
    foreign.agent = "other".into();
    let (status, text) = collect.send(&foreign, Format::Json, Compression::None);
    assert_eq!(status, 400);
    assert!(text.contains("invalid batch") || text.contains("is not `other:"), "{text}");
    let (status, text) = collect.post(&json, &vec![b' '; 5000]);
    assert_eq!(status, 413);
    assert!(text.contains("4096"), "{text}");
    assert!(written(&out).is_empty());
    // The collector is still fine.
    assert_eq!(
        collect.send(&batch(Lane::Alerts, 1..=1, None), Format::Json, Compression::None).0,
        200
    );
    assert_eq!(written(&out).len(), 1);
}

#[test]
fn a_restarted_collector_does_not_write_a_resent_batch_twice() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let summaries = batch(Lane::Summaries, 1..=10, Some(3));
    let mut collect = Collect::start(&out, &[]);
    assert_eq!(collect.send(&summaries, Format::Postcard, Compression::Zstd).0, 200);
    assert!(collect.stop().success());
    let collect = Collect::start(&out, &[]);
    let (status, text) = collect.send(&summaries, Format::Json, Compression::Zstd);
    assert_eq!((status, text.as_str()), (200, "ok: 0 new, 10 duplicate\n"));
    assert_eq!(written(&out), summaries.records);
}

#[test]
fn an_agent_sends_its_records_to_collect() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let mut collect = Collect::start(&out, &[]);
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"[agent]
id = "gw-collect"
data_dir = {data:?}
status_interval = "1s"
shutdown_timeout = "2s"

[journal]
commit_interval = "2ms"
tick_interval = "100ms"

[[sources]]
kind = "simulated"
devices = 2
metrics = ["temperature", "vibration"]
interval = "20ms"

# Fires at once on every pump: the alerts lane gets traffic too.
[[rules]]
kind = "threshold"
name = "always"
series = "pump-*/temperature"
above = -1000.0
clear = -1001.0

[summary]
window = "1s"
allowed_lateness = "200ms"

[upstream]
kind = "http"
url = {url:?}
format = "postcard"
compression = "zstd"
retry_initial = "20ms"
retry_max = "200ms"

[upstream.batch]
max_age = "50ms"
"#,
            data = dir.path().join("data").display().to_string(),
            url = collect.url,
        ),
    )
    .unwrap();
    let agent_log = dir.path().join("agent.log");
    let mut agent = Command::new(env!("CARGO_BIN_EXE_edgewise"))
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&agent_log).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let kinds = |records: &[Record]| {
        let summaries = records.iter().filter(|r| matches!(r.body, RecordBody::Summary(_))).count();
        let alerts = records.iter().filter(|r| matches!(r.body, RecordBody::Alert(_))).count();
        (summaries, alerts)
    };
    loop {
        let (summaries, alerts) = kinds(&written(&out));
        if summaries >= 8 && alerts >= 2 {
            break;
        }
        if start.elapsed() > DEADLINE {
            let _ = agent.kill();
            panic!(
                "{summaries} summaries, {alerts} alerts within {DEADLINE:?}; agent log:\n{}",
                std::fs::read_to_string(&agent_log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(terminate(&mut agent).success());
    assert!(collect.stop().success());

    let records = written(&out);
    let mut ids: Vec<&str> = records.iter().map(|r| r.id.as_str()).collect();
    ids.sort_unstable();
    let before = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), before, "a record id was written twice");
    for record in &records {
        assert!(record.id.starts_with("gw-collect:"), "{}", record.id);
    }
    let log = collect.log();
    assert!(log.contains("postcard+zstd"), "{log}");
    assert!(!log.contains("batch refused"), "{log}");
}
