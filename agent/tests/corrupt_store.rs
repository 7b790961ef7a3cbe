//! A damaged store as a bad SD card or a crash leaves it, met by the real binary: the agent
//! starts within a deadline and keeps running (no crash loop under systemd), the old store
//! is moved to `<data>.corrupt-*` (kept, not deleted), and upstream receives a critical
//! `edgewise:store` alert and a `store_lost` gap. A store held by a running agent is not
//! damage: a second agent refuses to start with an error naming the lock and the directory,
//! and moves nothing. A lock left by a killed agent vanishes with it.

// `free_port` is unused: these agents run with the API off.
mod common;
use common::{LoggedAgent, run_command};
use sensors::record::{AlertState, Batch, Lane, Record, RecordBody, Severity};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long the agent may take to start, report the loss and deliver new summaries.
const DEADLINE: Duration = Duration::from_secs(30);
/// Summaries the first run delivers before it is stopped, so the store holds real data.
const SUMMARIES_BEFORE: usize = 20;
/// Summaries the restarted agent must deliver after the report: events flow again.
const SUMMARIES_AFTER: usize = 3;

/// A data directory, an upstream file and the config that ties them to a simulated source
/// with 200 ms windows that close 100 ms after their end, so summaries arrive every ~200 ms.
struct Rig {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Rig {
    fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            r#"[agent]
id = "corrupt-store-test"
data_dir = "{data}"
status_interval = "0s"

[journal]
tick_interval = "100ms"
commit_interval = "2ms"

[[sources]]
kind = "simulated"
name = "sim"
devices = 2
metrics = ["temperature"]
interval = "20ms"
faults = false

[summary]
window = "200ms"
allowed_lateness = "100ms"

[upstream]
kind = "file"
path = "{out}"

[upstream.batch]
max_age = "50ms"

[api]
listen = "off"
"#,
            data = dir.path().join("data").display(),
            out = dir.path().join("upstream.jsonl").display(),
        );
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, config).unwrap();
        Rig { dir, config: path }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn start(&self) -> Agent {
        LoggedAgent::spawn(run_command(&self.config))
    }

    /// Every record upstream received so far, in file order.
    fn received(&self) -> Vec<Record> {
        let Ok(text) = std::fs::read_to_string(self.dir.path().join("upstream.jsonl")) else {
            return Vec::new();
        };
        // The file forwarder writes whole lines (a failed write is truncated back).
        text.lines().flat_map(|line| serde_json::from_str::<Batch>(line).unwrap().records).collect()
    }

    /// Polls until the records received after the first `skip` satisfy `done`; returns
    /// them, or panics at the deadline.
    fn wait_for(
        &self,
        agent: &mut Agent,
        skip: usize,
        what: &str,
        done: impl Fn(&[Record]) -> bool,
    ) -> Vec<Record> {
        let start = Instant::now();
        loop {
            let records: Vec<Record> = self.received().into_iter().skip(skip).collect();
            if done(&records) {
                return records;
            }
            assert_running(agent, what);
            assert!(
                start.elapsed() < DEADLINE,
                "{what}: not within {DEADLINE:?}; got {records:#?}\nlog:\n{}",
                agent.log()
            );
            // A pause between attempts of a poll with a deadline, not a wait for a condition.
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The `data.corrupt-*` directories next to the data directory.
    fn quarantined(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("data.corrupt-"))
            .collect()
    }

    /// First run: the agent runs until upstream got [`SUMMARIES_BEFORE`] summaries, then
    /// stops on SIGTERM. Returns how many records upstream got.
    fn fill(&self) -> usize {
        let mut agent = self.start();
        self.wait_for(&mut agent, 0, "first run", |r| summaries(r) >= SUMMARIES_BEFORE);
        agent.terminate(DEADLINE);
        self.received().len()
    }
}

/// The agent binary with its stderr collected.
type Agent = LoggedAgent;

/// Panics with the log if the agent has exited.
fn assert_running(agent: &mut Agent, what: &str) {
    if let Some(status) = agent.child.0.try_wait().unwrap() {
        // Let the reader thread take the last lines.
        std::thread::sleep(Duration::from_millis(100));
        panic!("{what}: the agent exited with {status}; log:\n{}", agent.log());
    }
}

/// `(name, bytes)` of the files in `dir`.
fn files(dir: &Path) -> Vec<(String, u64)> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().unwrap().len()))
        .collect()
}

fn is_store_alert(record: &Record) -> bool {
    matches!(&record.body, RecordBody::Alert(a) if a.rule == "edgewise:store")
}

fn summaries(records: &[Record]) -> usize {
    records.iter().filter(|r| matches!(r.body, RecordBody::Summary(_))).count()
}

/// Deterministic garbage (a fixed LCG: the same bytes every run).
fn garbage(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..len)
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 24) as u8
        })
        .collect()
}

/// Overwrites the middle half of `path` with garbage.
fn smash_middle(path: &Path) {
    let size = std::fs::metadata(path).unwrap().len();
    let len = size / 2;
    assert!(len > 0, "{} is empty", path.display());
    let mut file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.seek(SeekFrom::Start(size / 2 - len / 2)).unwrap();
    file.write_all(&garbage(len as usize)).unwrap();
    file.sync_all().unwrap();
}

/// Restarts the agent on the damaged store and asserts the recovery: within the deadline it
/// reports the loss upstream, the damaged store is kept under `data.corrupt-*`, and new
/// summaries flow while the agent keeps running. Returns the running agent.
fn assert_recovers(rig: &Rig, before: usize, damaged_file: &str) -> Agent {
    let start = Instant::now();
    let mut agent = rig.start();
    let after = rig.wait_for(&mut agent, before, "the loss report", |r| {
        r.iter().any(|r| matches!(&r.body, RecordBody::Alert(a) if a.rule == "edgewise:store"))
            && r.iter().any(|r| matches!(&r.body, RecordBody::Gap(g) if g.reason == "store_lost"))
    });
    let reported_in = start.elapsed();

    let quarantined = rig.quarantined();
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    let moved_to = &quarantined[0];
    assert!(moved_to.join(damaged_file).is_file(), "the damaged bytes are kept");

    let alert = after
        .iter()
        .find_map(|r| match &r.body {
            RecordBody::Alert(a) if a.rule == "edgewise:store" => Some((r, a)),
            _ => None,
        })
        .unwrap();
    assert_eq!(alert.0.seq, 0);
    assert_eq!(alert.1.state, AlertState::Raised);
    assert_eq!(alert.1.severity, Severity::Critical);
    let moved = moved_to.display().to_string();
    assert!(alert.1.message.contains(&moved), "{} does not name {moved}", alert.1.message);
    let gap = after
        .iter()
        .find_map(|r| match &r.body {
            RecordBody::Gap(g) if g.reason == "store_lost" => Some((r, g)),
            _ => None,
        })
        .unwrap();
    assert_eq!((gap.0.seq, gap.1.lane), (0, Lane::Summaries));
    assert_eq!(gap.1.to_ms, Some(alert.1.ts_ms));
    // The fresh store has a new epoch: the report's ids are not those of the first run.
    let old_ids: Vec<String> = rig.received()[..before].iter().map(|r| r.id.clone()).collect();
    assert!(!old_ids.contains(&alert.0.id) && !old_ids.contains(&gap.0.id));

    // Events flow again and the agent keeps running (polled in `wait_for`).
    rig.wait_for(&mut agent, before, "summaries after the report", |r| {
        summaries(r) >= SUMMARIES_AFTER
    });
    eprintln!("{damaged_file}: reported {reported_in:?} after the restart");
    agent
}

/// Restarts the agent on a store that sled recovers silently (see the two tests below):
/// sled opens it as an older, consistent store with the same epoch. The agent starts, keeps
/// running and delivers new summaries; the sent mark (`agent/src/sentmark.rs`) tells it that
/// upstream already holds later seqs, so it reports a `store_rolled_back` gap and numbers
/// its new records after them: no new record reuses the id of a different record upstream
/// received (upstream would drop it as a duplicate: a silent loss).
fn assert_rollback_reported(rig: &Rig, before: usize, case: &str) {
    let start = Instant::now();
    let mut agent = rig.start();
    let after = rig.wait_for(&mut agent, before, "summaries after the restart", |r| {
        summaries(r) >= SUMMARIES_AFTER
    });
    let flowing_in = start.elapsed();
    assert_running(&mut agent, case);
    agent.terminate(DEADLINE);
    let old = &rig.received()[..before];
    let reused: Vec<&Record> =
        after.iter().filter(|r| old.iter().any(|o| o.id == r.id && o.body != r.body)).collect();
    let rolled_back: Vec<_> = after
        .iter()
        .filter_map(|r| match &r.body {
            RecordBody::Gap(g) if g.reason == "store_rolled_back" => Some((r.seq, g)),
            _ => None,
        })
        .collect();
    eprintln!(
        "{case}: summaries flowing {flowing_in:?} after the restart; quarantined: {:?}; \
         rollback gaps: {rolled_back:?}; {} of {} new records reuse an id upstream holds",
        rig.quarantined(),
        reused.len(),
        after.len()
    );
    assert!(rig.quarantined().is_empty(), "{case}: sled opened it, nothing to quarantine");
    assert!(reused.is_empty(), "{case}: new records under ids upstream holds: {reused:#?}");
    let old_last = old.iter().filter(|r| r.id.contains(":summaries:")).map(|r| r.seq).max();
    let (gap_seq, gap) = rolled_back.first().copied().unwrap_or_else(|| {
        panic!("{case}: no store_rolled_back gap; upstream held through {old_last:?}")
    });
    assert_eq!(gap.lane, Lane::Summaries);
    assert!(Some(gap.last_seq) >= old_last && gap_seq > gap.last_seq, "{case}: {gap:?}");
}

/// sled 0.34 wrote no snapshot file (`snap.*`) in these runs: its whole state is replayed
/// from the log in `db` at open, and a message that fails its CRC ends the replay as a torn
/// write would. Garbage in the log therefore opens as an older, consistent store (no error
/// at open nor later): the agent does not crash-loop, and reports the rollback.
#[test]
fn garbage_over_the_middle_of_the_data_file_is_reported_as_a_rollback() {
    let rig = Rig::new();
    let before = rig.fill();
    eprintln!("store files: {:?}", files(&rig.data()));
    smash_middle(&rig.data().join("db"));
    assert_rollback_reported(&rig, before, "garbage in db");
}

/// The same for a log cut short: sled takes the cut for a torn write.
#[test]
fn a_data_file_truncated_to_half_is_reported_as_a_rollback() {
    let rig = Rig::new();
    let before = rig.fill();
    let db = rig.data().join("db");
    let size = std::fs::metadata(&db).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&db).unwrap().set_len(size / 2).unwrap();
    assert_rollback_reported(&rig, before, "db truncated");
}

#[test]
fn garbage_in_conf_quarantines_the_store() {
    let rig = Rig::new();
    let before = rig.fill();
    let conf = rig.data().join("conf");
    let size = std::fs::metadata(&conf).unwrap().len() as usize;
    std::fs::write(&conf, garbage(size)).unwrap();
    let mut agent = assert_recovers(&rig, before, "conf");

    // Reported once: a restart on the fresh store is an ordinary start.
    agent.terminate(DEADLINE);
    let before = rig.received().len();
    let mut agent = rig.start();
    let after = rig.wait_for(&mut agent, before, "a clean restart", |r| summaries(r) >= 2);
    assert!(!after.iter().any(is_store_alert), "{after:#?}");
    assert_eq!(rig.quarantined().len(), 1);
    agent.terminate(DEADLINE);
}

#[test]
fn a_second_agent_on_a_store_in_use_fails_naming_the_lock_and_moves_nothing() {
    let rig = Rig::new();
    let mut first = rig.start();
    rig.wait_for(&mut first, 0, "first agent", |r| summaries(r) >= 1);

    let mut second = rig.start();
    let status = second.wait_exit(DEADLINE);
    assert!(!status.success(), "{status}");
    let log = second.log();
    let data = rig.data().display().to_string();
    assert!(log.contains("locked by another process"), "{log}");
    assert!(log.contains(&data), "the error names {data}: {log}");
    assert!(rig.quarantined().is_empty(), "a store in use is never moved");

    // The first agent is unharmed and still delivers.
    let before = rig.received().len();
    rig.wait_for(&mut first, before, "first agent after the refusal", |r| summaries(r) >= 2);
    first.terminate(DEADLINE);
}

#[test]
fn the_lock_of_a_killed_agent_does_not_stop_the_next_start() {
    let rig = Rig::new();
    let mut agent = rig.start();
    rig.wait_for(&mut agent, 0, "first run", |r| summaries(r) >= SUMMARIES_BEFORE);
    // SIGKILL: no shutdown path, the lock file stays; its flock died with the process.
    agent.child.0.kill().unwrap();
    agent.wait_exit(DEADLINE);

    let before = rig.received().len();
    let mut agent = rig.start();
    let after = rig.wait_for(&mut agent, before, "restart", |r| summaries(r) >= 2);
    assert!(rig.quarantined().is_empty());
    assert!(!after.iter().any(is_store_alert), "{after:#?}");
    agent.terminate(DEADLINE);
}
