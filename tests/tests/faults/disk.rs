//! Disk full: the agent's data directory lives on a small tmpfs (`mount -t tmpfs -o size=..`,
//! which needs root or CAP_SYS_ADMIN), which a ballast file fills while readings arrive over
//! MQTT at QoS 1. The journal's flushes fail; by design the agent then stops acknowledging
//! and processing (an ack is sent only after a successful flush, and the processor only sees
//! durable entries). sled 0.34 keeps a failed write as the store's error until it is
//! reopened, so after `FLUSH_ATTEMPTS` failed flushes the agent exits with a failure and a
//! reason, for its supervisor to restart it. The test plays systemd (`Restart=on-failure`)
//! and asserts:
//!
//! - while the disk is full, every start stops again with a failure status and says why,
//!   and the healthy store is never quarantined (a full disk is not corruption);
//! - no false acks: what the agent never made durable the broker redelivers (persistent
//!   session), so once the ballast is deleted and the agent restarted, every event the
//!   broker acknowledged to the publisher is accounted for exactly once after
//!   de-duplication: in a summary, or in a `late` gap record (redeliveries arrive after
//!   their window closed), and the outbox drains.
//!
//! Where mounting is not permitted (no root), the same test runs the disk-full policy the
//! agent applies to its outbox instead: a small `[buffer] max_bytes` during an upstream
//! outage, where the oldest summaries are evicted into gap records (counted in `/metrics`),
//! and every event is accounted for exactly once in a summary or a gap. It always runs and
//! asserts; the `FIGURES` line says which variant ran (`mode=tmpfs` or `mode=outbox_cap`).
//! `EDGEWISE_DISK_FULL_NO_MOUNT=1` runs that variant where mounting works too.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use edgewise_tests::api::{self, metric, readiness};
use edgewise_tests::rig::{Rounds, account, assert_clean_stream};
use edgewise_tests::{
    Agent, AgentConfig, Deadline, Mosquitto, Reading, Received, Receiver, compare_alerts,
    expected_summaries, expected_threshold_alerts, free_port, now_ms, wait_for, wait_until,
};

/// Size of the tmpfs holding the data directory.
const FS_SIZE: &str = "16m";
/// Series published every round.
const SERIES: usize = 10;
/// One round of readings every this long.
const ROUND: Duration = Duration::from_millis(100);
/// The series the threshold rule watches; it runs hot for 10 rounds in every 20.
const HOT: &str = "s/disk/0";
/// Longest wait for a condition of the test.
const TIMEOUT: Duration = Duration::from_secs(20);
/// How long the disk stays full while readings keep arriving.
const FULL_FOR: Duration = Duration::from_secs(3);

/// A tmpfs mounted for the test; unmounted (lazily, should something still hold it) on drop.
struct TmpfsMount {
    path: PathBuf,
}

impl TmpfsMount {
    /// Mounts a tmpfs of `size` at `path`, or says why it cannot.
    fn mount(path: &Path, size: &str) -> Result<TmpfsMount, String> {
        std::fs::create_dir_all(path).map_err(|e| format!("mkdir {}: {e}", path.display()))?;
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "mount -t tmpfs failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Ok(TmpfsMount { path: path.to_path_buf() })
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let ok = Command::new("umount").arg(&self.path).status().is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// Writes `path` until the filesystem is full; returns the bytes written.
fn fill(path: &Path) -> u64 {
    let mut file = std::fs::File::create(path).expect("create the ballast");
    let chunk = vec![0xa5u8; 64 * 1024];
    let mut written = 0u64;
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
            Err(e) => panic!("writing the ballast: {e}"),
        }
    }
    // The last partial blocks: byte by byte is too slow, halve the chunk instead.
    let mut size = chunk.len() / 2;
    while size > 0 {
        match file.write(&chunk[..size]) {
            Ok(n) if n > 0 => written += n as u64,
            _ => size /= 2,
        }
    }
    let _ = file.sync_all();
    written
}

#[test]
fn a_full_disk_stops_the_agent_without_losing_duplicating_or_quarantining_anything() {
    let dir = tempfile::Builder::new().prefix("edgewise-faults-").tempdir().unwrap();
    let fs_path = dir.path().join("fs");
    let mount = match std::env::var_os("EDGEWISE_DISK_FULL_NO_MOUNT") {
        Some(_) => Err("EDGEWISE_DISK_FULL_NO_MOUNT is set".to_string()),
        None => TmpfsMount::mount(&fs_path, FS_SIZE),
    };
    let mount = match mount {
        Ok(m) => m,
        Err(why) => {
            eprintln!("disk full: {why}; running the outbox-cap variant instead");
            return outbox_cap_variant(dir.path());
        }
    };
    let broker = Mosquitto::start();
    let receiver = Receiver::start();
    let api_port = free_port();
    let mut config =
        AgentConfig::new("gw-diskfull", fs_path.join("data"), broker.port(), &receiver.url());
    config.threshold_rule("hot", HOT, 50.0, 40.0);
    config.extra.push_str(&format!("\n[api]\nlisten = \"127.0.0.1:{api_port}\"\n"));
    let agent_dir = dir.path().join("agent");
    let mut agent = Agent::start(&config.toml(), &agent_dir);
    let client_id = config.client_id();
    let subscribed =
        wait_until(TIMEOUT, || broker.has_subscriber(&client_id) || !agent.is_running());
    agent.assert_running("the agent stopped during start-up");
    assert!(subscribed, "{client_id} did not subscribe; broker log:\n{}", broker.log());
    let mut load = Rounds::new(broker.port(), "diskfull-pub", "s/disk", SERIES);

    // Healthy: readings flow, the journal commits.
    load.run_for(Duration::from_millis(1_500), ROUND);
    wait_for(TIMEOUT, "a first delivery", || receiver.unique_count() > 0);
    let (status, ok, reason) = readiness(api_port, "journal").expect("/readyz");
    assert!(ok, "journal not ready before the disk fills: {status} {reason}");

    // Full: the ballast takes every free byte; readings keep arriving. What the agent gets
    // wrong is collected in `problems` and asserted after the FIGURES line, so that a run
    // reports its figures and every problem at once.
    let mut problems: Vec<String> = Vec::new();
    let ballast = fs_path.join("ballast");
    let filled_at = Instant::now();
    let ballast_bytes = fill(&ballast);
    load.round();
    // The journal's flushes fail; after `FLUSH_ATTEMPTS` of them the agent exits for its
    // supervisor (sled keeps a write error until the store is reopened). Readings keep
    // arriving: the broker holds them for the persistent session.
    let mut exits = 0;
    let exited = wait_until(TIMEOUT, || {
        load.round();
        !agent.is_running()
    });
    if exited {
        exits += 1;
        check_exit(&mut agent, &mut problems);
    } else {
        problems.push(format!(
            "still running {TIMEOUT:?} after the disk filled: /readyz journal {:?}, flush              failures {:?}",
            readiness(api_port, "journal"),
            metric(api_port, "edgewise_journal_flush_failures_total"),
        ));
    }
    // What systemd does (Restart=on-failure): start it again, on the still full disk. The
    // store is healthy: it must be kept as it is (a quarantine would throw it away), and the
    // agent must stop again with a reason rather than run without a journal.
    let mut restarts = 0;
    let full_until = Deadline::after(FULL_FOR);
    while !full_until.passed() {
        if !agent.is_running() {
            agent.restart();
            restarts += 1;
            if wait_until(TIMEOUT, || {
                load.round();
                !agent.is_running()
            }) {
                exits += 1;
                check_exit(&mut agent, &mut problems);
            }
        }
        load.round();
        std::thread::sleep(ROUND);
    }
    let full_time = filled_at.elapsed();
    let quarantined = quarantined(&fs_path);
    if !quarantined.is_empty() {
        problems.push(format!("a healthy store was quarantined on a full disk: {quarantined:?}"));
    }

    // Recovery: the ballast goes; the supervisor's next restart opens the same store.
    std::fs::remove_file(&ballast).expect("delete the ballast");
    let freed_at = Instant::now();
    if agent.is_running() {
        // Started before the ballast went and not stopped yet: let it fail or recover.
        let _ = wait_until(TIMEOUT, || {
            !agent.is_running() || readiness(api_port, "journal").is_some_and(|(_, ok, _)| ok)
        });
    }
    if !agent.is_running() {
        agent.restart();
        restarts += 1;
    }
    wait_for(TIMEOUT, "the journal ready once the disk has room", || {
        readiness(api_port, "journal").is_some_and(|(_, ok, _)| ok)
    });
    let recovered_in = freed_at.elapsed();
    load.run_for(Duration::from_millis(1_000), ROUND);

    let published = load.readings.len() as u64;
    let last_ts = load.last_ts;
    assert!(wait_until(Duration::from_secs(10), || now_ms() > last_ts + 1_000 + 500 + 200));
    // After a restart, the broker's redeliveries of what the agent never acknowledged come
    // long after their windows closed: the agent counts them in `late` gap records.
    let late_gaps = |r: &Received| -> u64 {
        r.gaps().iter().filter(|g| g.reason == "late").map(|g| g.events).sum()
    };
    let drained = wait_until(TIMEOUT, || {
        let arrived = receiver.with(|r| r.summary_count_total() + late_gaps(r) >= published);
        arrived && metric(api_port, "edgewise_outbox_records") == Some(0.0)
    });
    let late_counted = metric(api_port, "edgewise_late_events_total").unwrap_or(0.0) as u64;
    assert!(drained, "published {published}; {}", receiver.describe());
    agent.assert_running("after the disk was freed");
    let status = agent.terminate();
    assert!(status.success(), "SIGTERM should stop the agent cleanly, got {status}");
    drop(agent);
    drop(mount);

    let expected = expected_summaries(&load.readings, 1_000);
    assert_clean_stream(&receiver);
    let (duplicates_raw, lost, duplicated, late) = receiver.with(|r| {
        let gaps = r.gaps();
        assert!(gaps.iter().all(|g| g.reason == "late" && g.records == 0), "gaps: {gaps:?}");
        let late = late_gaps(r);
        // /metrics counts the last start's late events; an earlier start may have had some.
        assert!(late >= late_counted, "{late} late events in gaps, {late_counted} in /metrics");
        let accounting = account(&expected, &r.summaries());
        (r.duplicates, accounting.lost.saturating_sub(late), accounting.duplicated, late)
    });
    eprintln!(
        "disk full: {published} events; ballast {ballast_bytes} B; full for {full_time:?}, \
         {exits} exits and {restarts} restarts; journal ready {recovered_in:?} after the \
         ballast went; {late} late events; {}",
        receiver.describe()
    );
    eprintln!(
        "FIGURES fault=disk_full mode=tmpfs runs=1 events={published} lost={lost} \
         duplicates_raw={duplicates_raw} duplicates_after_dedup={duplicated} exits={exits} \
         restarts={restarts} late={late}"
    );
    assert_eq!((lost, duplicated), (0, 0), "lost / duplicated events after dedup");
    assert!(problems.is_empty(), "the agent under a full disk: {problems:#?}");
}

/// Checks how the agent stopped on a full disk: with a failure status (so that systemd's
/// `Restart=on-failure` restarts it) and the reason in its last start's log.
fn check_exit(agent: &mut edgewise_tests::Agent, problems: &mut Vec<String>) {
    let status = agent.exit_status();
    if status.is_none_or(|s| s.success()) {
        problems.push(format!("stopped on a full disk with {status:?}, not a failure"));
    }
    let logs = agent.logs();
    let last = logs.rsplit("=== start ").next().unwrap_or_default();
    // Whichever stage met the full disk first (the journal's append or flush, the processor's
    // outbox write) names it, or the store could not be opened.
    let explained = ["No space left on device", "kept as it is"].iter().any(|r| last.contains(r));
    if !explained {
        problems.push(format!("stopped without saying why: {:?}", error_lines(&logs)));
    }
}

/// Quarantined stores (`data.corrupt-*`) under `fs`.
fn quarantined(fs: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(fs)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().contains(".corrupt-"))
                .collect()
        })
        .unwrap_or_default()
}

/// The agent's own error lines (not sled's), the last few.
fn error_lines(logs: &str) -> Vec<String> {
    let lines: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("ERROR edgewise") || l.contains("WARN edgewise"))
        .collect();
    let mut last: Vec<String> = Vec::new();
    for line in lines.iter().rev() {
        let text = line.split_once("Z ").map_or(*line, |(_, t)| t).to_string();
        if !last.contains(&text) {
            last.push(text);
        }
        if last.len() == 4 {
            break;
        }
    }
    last
}

/// The variant without a mount (see the module docs): a 16 KiB outbox during an upstream
/// outage, with compaction off so that the cap evicts the oldest summaries into gap records.
fn outbox_cap_variant(dir: &Path) {
    let broker = Mosquitto::start();
    let mut receiver = Receiver::start();
    let api_port = free_port();
    let mut config =
        AgentConfig::new("gw-outboxcap", dir.join("agent/data"), broker.port(), &receiver.url());
    config.threshold_rule("hot", HOT, 50.0, 40.0);
    config.buffer_max_bytes = Some("16 KiB".into());
    config.buffer_extra = "compact_above = \"off\"\n".into();
    config.extra.push_str(&format!("\n[api]\nlisten = \"127.0.0.1:{api_port}\"\n"));
    receiver.refuse_connections();
    let mut agent = Agent::start(&config.toml(), &dir.join("agent"));
    let client_id = config.client_id();
    let subscribed =
        wait_until(TIMEOUT, || broker.has_subscriber(&client_id) || !agent.is_running());
    agent.assert_running("the agent stopped during start-up");
    assert!(subscribed, "{client_id} did not subscribe; broker log:\n{}", broker.log());
    let mut load = Rounds::new(broker.port(), "outboxcap-pub", "s/disk", SERIES);
    // Many one-off series fill the outbox fast: one summary per series and window.
    let started = Instant::now();
    let deadline = Deadline::after(TIMEOUT);
    while metric(api_port, "edgewise_outbox_evicted_total").is_none_or(|n| n == 0.0) {
        assert!(!deadline.passed(), "nothing evicted within {TIMEOUT:?}");
        agent.assert_running("while the outbox fills");
        let round_started = Instant::now();
        load.round();
        let burst: Vec<Reading> = (0..30)
            .map(|i| Reading::new(format!("s/burst/{}/{i}", load.round), load.next_ts(), i as f64))
            .collect();
        load.publish(burst);
        std::thread::sleep(ROUND.saturating_sub(round_started.elapsed()));
    }
    load.run_for(Duration::from_millis(500), ROUND);
    let full_time = started.elapsed();
    match readiness(api_port, "journal") {
        Some((_, true, _)) => {}
        other => panic!("the journal is fine, yet: {other:?}"),
    }
    let (status, body) = api::get(api_port, "/readyz").expect("/readyz");
    assert!(status == 503 && body.contains("down"), "/readyz during the outage: {status} {body}");

    receiver.set_up();
    let published = load.readings.len() as u64;
    let last_ts = load.last_ts;
    assert!(wait_until(Duration::from_secs(10), || now_ms() > last_ts + 1_000 + 500 + 200));
    let alerts =
        expected_threshold_alerts(load.readings.iter().filter(|r| r.series == HOT), 50.0, 40.0);
    let accounted =
        |r: &Received| r.summary_count_total() + r.gaps().iter().map(|g| g.events).sum::<u64>();
    let drained = wait_until(TIMEOUT, || {
        let arrived =
            receiver.with(|r| accounted(r) >= published && r.alerts().len() >= alerts.len());
        arrived && metric(api_port, "edgewise_outbox_records") == Some(0.0)
    });
    assert!(drained, "published {published}; {}", receiver.describe());
    agent.assert_running("after the outage");
    let evicted = metric(api_port, "edgewise_outbox_evicted_total").unwrap_or(0.0) as u64;
    let status = agent.terminate();
    assert!(status.success(), "SIGTERM should stop the agent cleanly, got {status}");

    let expected = expected_summaries(&load.readings, 1_000);
    let (duplicates_raw, lost, duplicated, gap_records) = receiver.with(|r| {
        assert!(r.protocol_errors.is_empty(), "wire-format errors: {:?}", r.protocol_errors);
        assert!(r.conflicts.is_empty(), "same id, different content: {:?}", r.conflicts);
        assert!(r.holes().is_empty(), "holes: {:?}", r.holes());
        let gaps = r.gaps();
        assert!(!gaps.is_empty(), "the cap was exceeded but no gap record arrived");
        for g in &gaps {
            assert_eq!(g.reason, "outbox_full", "{g:?}");
            assert!(g.events >= 1 && g.records >= 1, "{g:?}");
        }
        let gap_records: u64 = gaps.iter().map(|g| g.records).sum();
        // Every summary that arrived is exact: eviction removes whole records.
        for s in r.summaries() {
            let e = &expected[&(s.series.clone(), s.start_ms)];
            assert!(e.diff(s).is_empty(), "{} @ {}: {:?}", s.series, s.start_ms, e.diff(s));
        }
        let duplicated = account(&expected, &r.summaries()).duplicated;
        let problems = compare_alerts(&alerts, &r.alerts());
        assert!(problems.is_empty(), "alerts differ (alerts are never evicted): {problems:#?}");
        let lost = published.saturating_sub(accounted(r));
        assert_eq!(accounted(r), published, "every event once: {}", r.describe());
        (r.duplicates, lost, duplicated, gap_records)
    });
    assert_eq!(gap_records, evicted, "gap records vs the evicted counter in /metrics");
    eprintln!(
        "outbox cap: {published} events; the cap evicted after {full_time:?}; {evicted} \
         records evicted into gaps; {}",
        receiver.describe()
    );
    eprintln!(
        "FIGURES fault=disk_full mode=outbox_cap runs=1 events={published} lost={lost} \
         duplicates_raw={duplicates_raw} duplicates_after_dedup={duplicated} \
         evicted_records={evicted}"
    );
    assert_eq!((lost, duplicated), (0, 0), "lost / duplicated events after dedup");
}
