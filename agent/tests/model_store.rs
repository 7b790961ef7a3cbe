//! Model-based tests of the journal and the outbox (issue 7): random sequences of operations
//! run against real sled stores in temp dirs and against a small in-memory model written
//! from the modules' documentation, compared after every step.
//!
//! - `the_journal_matches_its_model`: append, seal, flush (seal + flush), read, snapshot,
//!   trim, clean restart and crash restart against a map of chunks (first seq -> entries),
//!   the segment files they were written to and the unsealed buffer. The journal's files
//!   hold whatever was sealed (written) when the copy is taken, so a crash there loses at
//!   most the unsealed buffer; the model still accepts any state since the last flush.
//! - `the_outbox_matches_its_model`: put (fresh and stale seqs, bursts over the byte cap),
//!   peek, ack, dead-letter, expire, flush, clean restart (also with a lowered cap) and crash
//!   restart against a map per lane, under three buffer configurations (cap only; cap and
//!   TTLs; cap, TTL and compaction). Every invariant of the outbox module docs is asserted.
//!
//! A crash is simulated by copying the store directory while the store is open (what a
//! `kill -9` leaves: whatever sled wrote so far, nothing it still buffers), then dropping the
//! store and opening the copy. sled recovers a prefix of its log, so an unflushed suffix may
//! be lost, never reordered, corrupted or with holes:
//!
//! - the journal must hold exactly its state after one of the operations since the last
//!   flush, and continue after every seq that was flushed. A seq that was appended but lost
//!   unflushed may be given again to another entry: the `journal` docs allow it (such an
//!   entry was never acknowledged nor processed), so only flushed seqs are held to "never
//!   reused for other content";
//! - the outbox writes one sled batch per lane and policy within one operation, so a crash
//!   may also stop inside one (the put's record kept, its eviction lost; a dead letter in
//!   both trees, as its docs say). Such a state is matched to the model by what no batch
//!   splits (high-water marks, dead letters, events) and then held to every invariant.
//!
//! A clean restart (every handle dropped: sled flushes on the last drop) keeps everything
//! but the journal's unsealed buffer (which the `journal` docs say is lost on drop).
//!
//! Observation uses the public API (`read_after`, `last_seq`, `peek`, `stats`, `next_seq`)
//! and, to see the outbox without handing records out (which `peek` does), the `outbox`
//! and `dead_letter` trees read through `Store::db` and decoded by the layout documented in
//! `outbox` (`[lane][seq BE] -> [2][postcard(Record)]`).
//!
//! 96 cases of each property by default: about 10 s for the file in a debug build.
//! For a longer run set `EDGEWISE_MODEL_CASES` to the number of cases of each property:
//!
//! ```text
//! EDGEWISE_MODEL_CASES=2000 cargo test -p edgewise --test model_store
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use edgewise::config::{BufferConfig, ByteSize, JournalConfig, Percent};
use edgewise::event::{self, Entry, Event};
use edgewise::journal::{CHUNK_MAX_BYTES, Journal, JournalReader};
use edgewise::metrics::Metrics;
use edgewise::outbox::{
    GAP_REASON_EXPIRED, GAP_REASON_OUTBOX_FULL, Outbox, OutboxStats, TTL_CLOCK_FLOOR_MS,
};
use edgewise::store::{Store, TREE_DEAD_LETTER, TREE_OUTBOX};
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use sensors::record::{
    Alert, AlertState, Gap, Lane, Record, RecordBody, Severity, Summary, gap_id, record_id,
};

/// sled cache of the test stores; they hold kilobytes.
const CACHE: u64 = 1024 * 1024;

/// Version byte of outbox values (see the `outbox` module docs).
const OUTBOX_VALUE_VERSION: u8 = 2;

/// Version byte of journal chunks (see the `journal` module docs).
const JOURNAL_VALUE_VERSION: u8 = 2;

/// Segment size of the journal under test: a few chunks each, so that trims delete files.
const SEGMENT_BYTES: u64 = 256;

/// Cases of each property: `EDGEWISE_MODEL_CASES` or `default`.
fn cases(default: u32) -> u32 {
    match std::env::var("EDGEWISE_MODEL_CASES") {
        Ok(text) => text.trim().parse().unwrap_or_else(|_| {
            panic!("EDGEWISE_MODEL_CASES must be a number of cases, not {text:?}")
        }),
        Err(_) => default,
    }
}

fn proptest_config(default_cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases: cases(default_cases),
        // A failure is kept as a named #[test] in this file, not in a regressions file.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Opens the store in `dir`, waiting out the file lock of a just-dropped handle (sled's
/// I/O threads may hold it for a moment after the last handle is gone).
fn open_store(dir: &Path) -> Store {
    match Store::open_after_drop(dir, CACHE, Duration::from_secs(10)) {
        Ok((store, report)) => {
            assert!(report.quarantined.is_none(), "a test store was quarantined: {report:?}");
            store
        }
        Err(error) => panic!("cannot open {}: {error}", dir.display()),
    }
}

/// Copies the directory tree `from` to `to` (which must not exist): the files of an open
/// store as a crash would leave them.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// The store directories of one case: a crash moves on to a copy.
struct Dirs {
    tmp: tempfile::TempDir,
    generation: u32,
}

impl Dirs {
    fn new() -> Dirs {
        Dirs { tmp: tempfile::tempdir().unwrap(), generation: 0 }
    }

    fn current(&self) -> PathBuf {
        self.tmp.path().join(format!("db-{}", self.generation))
    }

    /// Copies the current (open) store to the next directory and returns it.
    fn crash_copy(&mut self) -> PathBuf {
        let from = self.current();
        self.generation += 1;
        let to = self.current();
        copy_tree(&from, &to);
        to
    }
}

// ---------------------------------------------------------------------------------------
// Journal
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum JournalOp {
    /// `append`: buffered, invisible until sealed.
    Append(Entry),
    /// `seal`: the buffer becomes one chunk (not yet durable).
    Seal,
    /// `seal`, then the journal sync, as the writer commits.
    Flush,
    /// `read_after(last_seq + 1 - back)`, saturating.
    ReadAfter { back: u8 },
    /// `save_snapshot` at a position between the current snapshot and the last sealed seq.
    Snapshot { permille: u16 },
    /// `trim` behind the snapshot with `max_age`, a byte cap of `bytes_percent` of the
    /// journal's current bytes, at `now_ms`.
    Trim { max_age_ms: u32, bytes_percent: u8, now_ms: i64 },
    /// Drop every handle (sled flushes on the last drop, the unsealed buffer is lost) and
    /// reopen the same directory.
    Restart,
    /// Copy the directory while the store is open, drop it, open the copy.
    CrashRestart,
}

fn entry() -> impl Strategy<Value = Entry> {
    prop_oneof![
        3 => (0usize..3, 0i64..100_000, -50i32..50, 0i64..100_000, 0u16..3).prop_map(
            |(series, ts_ms, value, received_ms, source)| {
                Entry::Event(Event {
                    series: ["pump-1/temp", "pump-2/flow", "tank/level"][series].into(),
                    ts_ms,
                    value: f64::from(value) / 4.0,
                    received_ms,
                    source,
                })
            }
        ),
        1 => (0i64..100_000).prop_map(|now_ms| Entry::Tick { now_ms }),
    ]
}

fn journal_op() -> impl Strategy<Value = JournalOp> {
    prop_oneof![
        10 => entry().prop_map(JournalOp::Append),
        2 => Just(JournalOp::Seal),
        2 => Just(JournalOp::Flush),
        // Near the end often; farther back starts inside or at the edge of older chunks.
        2 => prop_oneof![0u8..4, 0u8..40].prop_map(|back| JournalOp::ReadAfter { back }),
        // At the last seq often: a journal trimmed empty must continue after the snapshot.
        2 => prop_oneof![Just(1000u16), 0u16..=1000]
            .prop_map(|permille| JournalOp::Snapshot { permille }),
        2 => (0u32..120_000, prop_oneof![Just(0u8), 0u8..130], 0i64..200_000).prop_map(
            |(max_age_ms, bytes_percent, now_ms)| {
                JournalOp::Trim { max_age_ms, bytes_percent, now_ms }
            }
        ),
        1 => Just(JournalOp::Restart),
        1 => Just(JournalOp::CrashRestart),
    ]
}

/// What the journal should hold: written from the `journal` module docs.
#[derive(Debug, Clone, PartialEq)]
struct JournalModel {
    /// Sealed chunks by the seq of their first entry.
    chunks: BTreeMap<u64, Vec<Entry>>,
    /// Segment files by the seq of their first chunk: the firsts of their chunks.
    segments: BTreeMap<u64, Vec<u64>>,
    /// Chunks closed by `CHUNK_MAX_BYTES`, written at the next seal.
    closed: Vec<(u64, Vec<Entry>)>,
    /// Appended, not sealed: seqs `last_seq - buffer.len() + 1 ..= last_seq`.
    buffer: Vec<Entry>,
    last_seq: u64,
    snapshot: Option<u64>,
}

/// What the public API shows of the journal: sealed entries only.
#[derive(Debug, Clone, PartialEq)]
struct JournalView {
    entries: BTreeMap<u64, Entry>,
    last_seq: u64,
    snapshot: Option<u64>,
}

impl JournalModel {
    fn entries(&self) -> BTreeMap<u64, Entry> {
        self.chunks
            .iter()
            .flat_map(|(first, entries)| (*first..).zip(entries.iter().cloned()))
            .collect()
    }

    fn view(&self) -> JournalView {
        JournalView { entries: self.entries(), last_seq: self.last_seq, snapshot: self.snapshot }
    }

    fn bytes(&self) -> u64 {
        self.chunks.values().map(|entries| chunk_size(entries)).sum()
    }

    /// `append`: a buffer whose encoded entries would pass `CHUNK_MAX_BYTES` is sealed
    /// first.
    fn append(&mut self, entry: &Entry) -> u64 {
        let encoded = |e: &Entry| postcard::to_allocvec(e).unwrap().len();
        let buffered: usize = self.buffer.iter().map(encoded).sum();
        if !self.buffer.is_empty() && buffered + encoded(entry) > CHUNK_MAX_BYTES {
            let first = self.last_seq + 1 - self.buffer.len() as u64;
            self.closed.push((first, std::mem::take(&mut self.buffer)));
        }
        self.buffer.push(entry.clone());
        self.last_seq += 1;
        self.last_seq
    }

    /// `seal`: the closed chunks and the buffer go to the last segment, or to a new one
    /// (named by the seal's first seq) when there is none or the last has `SEGMENT_BYTES`.
    fn seal(&mut self) {
        if !self.buffer.is_empty() {
            let first = self.last_seq + 1 - self.buffer.len() as u64;
            self.closed.push((first, std::mem::take(&mut self.buffer)));
        }
        let Some(&(first, _)) = self.closed.first() else { return };
        let full = self.segments.values().next_back().is_none_or(|chunks| {
            chunks.iter().map(|c| chunk_size(&self.chunks[c])).sum::<u64>() >= SEGMENT_BYTES
        });
        if full {
            self.segments.insert(first, Vec::new());
        }
        let segment = self.segments.values_mut().next_back().unwrap();
        for (first, entries) in self.closed.drain(..) {
            segment.push(first);
            self.chunks.insert(first, entries);
        }
    }

    /// `trim` as documented: whole segments but the last, oldest first, whose entries are
    /// all <= the snapshot position (the next segment starts after it), while their newest
    /// entry is older than the cutoff or while the journal is over its byte cap; stops at
    /// the first that is neither. Returns the entries removed.
    fn trim(&mut self, position: u64, cfg: &JournalConfig, now_ms: i64) -> u64 {
        let max_age_ms = i64::try_from(cfg.max_age.as_millis()).unwrap();
        let cutoff = now_ms.saturating_sub(max_age_ms);
        let mut bytes = self.bytes();
        let firsts: Vec<u64> = self.segments.keys().copied().collect();
        let mut removed = 0;
        for pair in firsts.windows(2) {
            if pair[1] - 1 > position {
                break;
            }
            let chunks = &self.segments[&pair[0]];
            let newest = chunks
                .iter()
                .flat_map(|c| &self.chunks[c])
                .map(|entry| match entry {
                    Entry::Event(event) => event.received_ms,
                    Entry::Tick { now_ms } => *now_ms,
                })
                .max()
                .unwrap();
            if newest >= cutoff && bytes <= cfg.max_bytes.bytes() {
                break;
            }
            for first in self.segments.remove(&pair[0]).unwrap() {
                let entries = self.chunks.remove(&first).unwrap();
                bytes -= chunk_size(&entries);
                removed += entries.len() as u64;
            }
        }
        removed
    }

    /// Dropping the journal loses the unsealed buffer.
    fn drop_buffer(&mut self) {
        self.buffer.clear();
        self.closed.clear();
        self.last_seq = self.last_seq_at_open();
    }

    /// The `last_seq` the journal continues after when opened over this content.
    fn last_seq_at_open(&self) -> u64 {
        let last = match self.chunks.last_key_value() {
            Some((first, entries)) => first + entries.len() as u64 - 1,
            None => 0,
        };
        last.max(self.snapshot.unwrap_or(0))
    }
}

/// Record header (length, crc32) + body header (first seq, key count) + version byte +
/// postcard of the chunk's entries.
fn chunk_size(entries: &[Entry]) -> u64 {
    debug_assert_eq!(JOURNAL_VALUE_VERSION, 2, "one version byte");
    (8 + 12 + 1 + postcard::to_allocvec(entries).unwrap().len()) as u64
}

/// The journal under test and its store.
struct JournalRig {
    dirs: Dirs,
    store: Store,
    journal: Journal,
    reader: JournalReader,
}

impl JournalRig {
    fn open(dirs: Dirs) -> JournalRig {
        let store = open_store(&dirs.current());
        let journal = Journal::open_with(&store, SEGMENT_BYTES).unwrap();
        let reader = journal.reader();
        JournalRig { dirs, store, journal, reader }
    }

    fn restart(self) -> JournalRig {
        let JournalRig { dirs, store, journal, reader } = self;
        drop((reader, journal, store));
        JournalRig::open(dirs)
    }

    fn crash_restart(self) -> JournalRig {
        let JournalRig { mut dirs, store, journal, reader } = self;
        dirs.crash_copy();
        // The original directory is left behind with its lock released; the copy goes on.
        drop((reader, journal, store));
        JournalRig::open(dirs)
    }

    /// What the journal holds, through its public API.
    fn observe(&self) -> Result<JournalView, TestCaseError> {
        let mut entries = BTreeMap::new();
        let mut previous = None;
        for item in self.reader.read_after(0) {
            let (seq, entry) = item.map_err(|e| TestCaseError::fail(format!("read: {e}")))?;
            if let Some(previous) = previous {
                // Dense and increasing: a trim removes a prefix, a crash loses a suffix.
                prop_assert_eq!(seq, previous + 1, "a hole or a reordering after seq {}", previous);
            }
            previous = Some(seq);
            entries.insert(seq, entry);
        }
        let snapshot = self.store.load_snapshot().unwrap().map(|(position, _)| position);
        Ok(JournalView { entries, last_seq: self.journal.last_seq(), snapshot })
    }
}

/// Runs one sequence of journal operations against the model; `Err` on the first
/// disagreement.
fn run_journal(ops: &[JournalOp]) -> Result<(), TestCaseError> {
    let mut rig = JournalRig::open(Dirs::new());
    let mut model = JournalModel {
        chunks: BTreeMap::new(),
        segments: BTreeMap::new(),
        closed: Vec::new(),
        buffer: Vec::new(),
        last_seq: 0,
        snapshot: None,
    };
    // States since the last flush, oldest (the flushed one) first: a crash recovers one.
    let mut since_flush = vec![model.clone()];
    // Every (seq, entry) made durable by a flush: a seq is never reused for other content.
    let mut durable: BTreeMap<u64, Entry> = BTreeMap::new();
    for (step, op) in ops.iter().enumerate() {
        match op {
            JournalOp::Append(entry) => {
                let seq = rig.journal.append(entry).unwrap();
                prop_assert_eq!(seq, model.append(entry), "step {}: seqs are dense", step);
                if let Some(old) = durable.get(&seq) {
                    prop_assert_eq!(old, entry, "step {}: durable seq {} reused", step, seq);
                }
            }
            JournalOp::Seal => {
                rig.journal.seal().unwrap();
                model.seal();
            }
            JournalOp::Flush => {
                rig.journal.commit().unwrap();
                model.seal();
                durable.extend(model.entries());
                since_flush.clear();
            }
            JournalOp::ReadAfter { back } => {
                let after = (model.last_seq + 1).saturating_sub(u64::from(*back));
                let got: Vec<(u64, Entry)> =
                    rig.reader.read_after(after).map(Result::unwrap).collect();
                let want: Vec<(u64, Entry)> =
                    model.entries().split_off(&(after + 1)).into_iter().collect();
                prop_assert_eq!(got, want, "step {}: read_after({})", step, after);
            }
            JournalOp::Snapshot { permille } => {
                // The processor only sees committed entries: its snapshots never cover an
                // unsealed one.
                let sealed = model.last_seq - model.buffer.len() as u64;
                let floor = model.snapshot.unwrap_or(0);
                let span = sealed - floor.min(sealed);
                let position = floor + span * u64::from(*permille) / 1000;
                rig.store.save_snapshot(position, b"processor state").unwrap();
                model.snapshot = Some(position);
            }
            JournalOp::Trim { max_age_ms, bytes_percent, now_ms } => {
                let cfg = JournalConfig {
                    max_age: Duration::from_millis(u64::from(*max_age_ms)),
                    max_bytes: ByteSize(model.bytes() * u64::from(*bytes_percent) / 100),
                    ..JournalConfig::default()
                };
                let position = model.snapshot.unwrap_or(0);
                let removed = rig.reader.trim(position, &cfg, *now_ms).unwrap();
                let want = model.trim(position, &cfg, *now_ms);
                prop_assert_eq!(removed, want, "step {}: trim({}) removed", step, position);
            }
            JournalOp::Restart => {
                rig = rig.restart();
                let sealed = model.buffer.is_empty();
                model.drop_buffer();
                if sealed {
                    prop_assert_eq!(
                        model.last_seq_at_open(),
                        model.last_seq,
                        "step {}: the journal would not continue after its last seq",
                        step
                    );
                }
                // sled flushes when the last handle is dropped (see `store`).
                durable.extend(model.entries());
                since_flush.clear();
            }
            JournalOp::CrashRestart => {
                let durable_last = durable.keys().next_back().copied().unwrap_or(0);
                rig = rig.crash_restart();
                let recovered = rig.observe()?;
                let found = since_flush.iter().rposition(|state| {
                    state.entries() == recovered.entries && state.snapshot == recovered.snapshot
                });
                let Some(index) = found else {
                    return Err(TestCaseError::fail(format!(
                        "step {step}: after a crash the journal holds {:?} (snapshot {:?}), \
                         which is none of the {} states since the last flush",
                        recovered.entries.keys().collect::<Vec<_>>(),
                        recovered.snapshot,
                        since_flush.len()
                    )));
                };
                model = since_flush[index].clone();
                model.drop_buffer();
                prop_assert!(
                    model.last_seq >= durable_last,
                    "step {}: after a crash the journal continues at {} below durable seq {}",
                    step,
                    model.last_seq,
                    durable_last
                );
                since_flush.clear();
            }
        }
        // Compare after every step.
        let seen = rig.observe()?;
        prop_assert_eq!(&seen, &model.view(), "step {}: {:?}", step, op);
        prop_assert_eq!(rig.reader.bytes(), model.bytes(), "step {}: byte counter", step);
        since_flush.push(model.clone());
    }
    // The counter agrees with a rescan at open.
    let bytes = rig.reader.bytes();
    let rig = rig.restart();
    prop_assert_eq!(rig.reader.bytes(), bytes, "the byte counter differs from a rescan");
    Ok(())
}

proptest! {
    #![proptest_config(proptest_config(96))]

    /// The journal behaves like a map of dense, increasing seqs to entries, stored in chunks
    /// sealed before each flush, trimmed as a prefix of whole chunks behind the snapshot,
    /// continuing after its last seq (or the snapshot) at open, and losing at most an
    /// unflushed suffix in a crash (and the unsealed buffer on any restart).
    #[test]
    fn the_journal_matches_its_model(ops in proptest::collection::vec(journal_op(), 1..80)) {
        run_journal(&ops)?;
    }
}

// ---------------------------------------------------------------------------------------
// Outbox
// ---------------------------------------------------------------------------------------

const AGENT: &str = "gw-model";

/// Summaries whose window ended more than this long ago expire (in the TTL modes).
const SUMMARIES_TTL: Duration = Duration::from_secs(60);
/// Alerts expire after this (in the TTL modes): only an `Expire` op far ahead reaches it.
const ALERTS_TTL: Duration = Duration::from_secs(3_600);

/// The long-outage policies in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Eviction at the byte cap only.
    CapOnly,
    /// Cap, and TTLs on both lanes.
    Ttl,
    /// Cap, a summaries TTL, and compaction above half the cap into 10 s windows.
    Compact,
}

fn buffer_config(mode: Mode, cap: u64) -> BufferConfig {
    let base = BufferConfig::without_policies(ByteSize(cap));
    match mode {
        Mode::CapOnly => base,
        Mode::Ttl => BufferConfig {
            summaries_ttl: Some(SUMMARIES_TTL),
            alerts_ttl: Some(ALERTS_TTL),
            ..base
        },
        Mode::Compact => BufferConfig {
            summaries_ttl: Some(SUMMARIES_TTL),
            compact_above: Some(Percent(50.0)),
            compact_to: Some(Duration::from_secs(10)),
            ..base
        },
    }
}

#[derive(Debug, Clone)]
enum OutboxOp {
    /// A put at `next_seq + skip` of a summary (of series `series`, window `age_s` seconds
    /// old, `count` events) or an alert (`age_s` old, a message of `len` bytes).
    Put {
        alert: bool,
        skip: u8,
        series: u8,
        age_s: u16,
        count: u8,
        len: u8,
    },
    /// `count` summaries in a row: pushes the outbox over its cap (and its compaction mark).
    Burst {
        count: u8,
        series: u8,
        age_s: u16,
    },
    /// A put below `next_seq` (a replay after a crash): refused, nothing written.
    Stale {
        alert: bool,
        back: u8,
    },
    /// `peek(lane, max, max_bytes)`.
    Peek {
        alert: bool,
        max: u8,
        max_bytes: Option<u16>,
    },
    /// `remove_through` the last seq of the lane's last peek (what the forwarder does).
    AckPeeked {
        alert: bool,
    },
    /// `remove_through(oldest + ahead)`.
    RemoveThrough {
        alert: bool,
        ahead: u8,
    },
    /// `dead_letter` the first `n` records of the lane's last peek.
    DeadLetter {
        alert: bool,
        n: u8,
    },
    /// `expire(now + ahead_s)`.
    Expire {
        ahead_s: u16,
    },
    Flush,
    /// Drop everything and reopen, with the cap at `cap_percent` of the first one.
    Restart {
        cap_percent: u8,
    },
    /// Copy the directory while open, drop, open the copy.
    CrashRestart,
}

fn outbox_op() -> impl Strategy<Value = OutboxOp> {
    prop_oneof![
        10 => (
            any::<bool>(),
            prop_oneof![4 => Just(0u8), 1 => 1u8..3],
            0u8..3,
            0u16..200,
            1u8..6,
            0u8..120,
        )
            .prop_map(|(alert, skip, series, age_s, count, len)| {
                OutboxOp::Put { alert, skip, series, age_s, count, len }
            }),
        2 => (5u8..40, 0u8..3, 0u16..200)
            .prop_map(|(count, series, age_s)| OutboxOp::Burst { count, series, age_s }),
        1 => (any::<bool>(), 1u8..4).prop_map(|(alert, back)| OutboxOp::Stale { alert, back }),
        4 => (any::<bool>(), 1u8..6, proptest::option::of(0u16..800))
            .prop_map(|(alert, max, max_bytes)| OutboxOp::Peek { alert, max, max_bytes }),
        2 => any::<bool>().prop_map(|alert| OutboxOp::AckPeeked { alert }),
        1 => (any::<bool>(), 0u8..4)
            .prop_map(|(alert, ahead)| OutboxOp::RemoveThrough { alert, ahead }),
        1 => (any::<bool>(), 1u8..3).prop_map(|(alert, n)| OutboxOp::DeadLetter { alert, n }),
        // Now, soon, and past the alerts' TTL.
        2 => prop_oneof![Just(0u16), 0u16..200, 3_000u16..4_000]
            .prop_map(|ahead_s| OutboxOp::Expire { ahead_s }),
        2 => Just(OutboxOp::Flush),
        // Mostly the same cap; sometimes a lowered one, which the open enforces.
        1 => prop_oneof![3 => Just(100u8), 1 => 40u8..100]
            .prop_map(|cap_percent| OutboxOp::Restart { cap_percent }),
        1 => Just(OutboxOp::CrashRestart),
    ]
}

fn lane_of(alert: bool) -> Lane {
    if alert { Lane::Alerts } else { Lane::Summaries }
}

fn tag(lane: Lane) -> usize {
    usize::from(lane.tag())
}

fn summary(series: u8, start_ms: i64, count: u64) -> RecordBody {
    let count_f = count as f64;
    RecordBody::Summary(Summary {
        series: format!("pump-{series}/temp"),
        start_ms,
        window_ms: 1_000,
        count,
        min: 1.0,
        max: count_f,
        mean: (count_f + 1.0) / 2.0,
        stddev: ((count * count - 1) as f64 / 12.0).sqrt(),
        first: 1.0,
        last: count_f,
        windows: 1,
    })
}

fn alert(series: u8, ts_ms: i64, len: u8) -> RecordBody {
    RecordBody::Alert(Alert {
        rule: "hot".into(),
        series: format!("pump-{series}/temp"),
        state: AlertState::Raised,
        severity: Severity::Critical,
        ts_ms,
        value: 99.0,
        threshold: 90.0,
        message: "x".repeat(usize::from(len)),
        labels: BTreeMap::new(),
    })
}

/// Events a record accounts for: a summary's count, a gap's events, none for an alert.
fn events_of(body: &RecordBody) -> u64 {
    match body {
        RecordBody::Summary(s) => s.count,
        RecordBody::Gap(g) => g.events,
        RecordBody::Alert(_) => 0,
    }
}

fn gap_of(body: &RecordBody) -> Option<&Gap> {
    match body {
        RecordBody::Gap(gap) => Some(gap),
        _ => None,
    }
}

/// `(from, to)`: the event times a record covers, as the `outbox` docs define them.
fn span(body: &RecordBody) -> Option<(i64, i64)> {
    match body {
        RecordBody::Summary(s) => Some((s.start_ms, s.start_ms + s.window_ms as i64)),
        RecordBody::Alert(a) => Some((a.ts_ms, a.ts_ms)),
        RecordBody::Gap(g) => Some((g.from_ms?, g.to_ms?)),
    }
}

/// The time a gap records for a lost record: a summary's window start, an alert's time.
fn loss_time(body: &RecordBody) -> i64 {
    match body {
        RecordBody::Summary(s) => s.start_ms,
        RecordBody::Alert(a) => a.ts_ms,
        RecordBody::Gap(_) => unreachable!("gaps are never lost"),
    }
}

/// Whether an expiry pass at `now_ms` with `ttl` loses this record (module docs, Expiry).
fn expirable(body: &RecordBody, ttl: Duration, now_ms: i64) -> bool {
    let cutoff = now_ms - ttl.as_millis() as i64;
    let set = |ms: i64| ms >= TTL_CLOCK_FLOOR_MS;
    matches!(span(body), Some((from, to)) if set(now_ms) && to <= cutoff && set(from))
}

/// Whether an expiry pass at `now_ms` stops at this record (wholly newer than the cutoff).
fn stops_expiry(body: &RecordBody, ttl: Duration, now_ms: i64) -> bool {
    let cutoff = now_ms - ttl.as_millis() as i64;
    matches!(span(body), Some((from, _)) if from > cutoff)
}

fn ttl_of(mode: Mode, lane: Lane) -> Option<Duration> {
    match (mode, lane) {
        (Mode::CapOnly, _) | (Mode::Compact, Lane::Alerts) => None,
        (Mode::Ttl, Lane::Alerts) => Some(ALERTS_TTL),
        (_, Lane::Summaries) => Some(SUMMARIES_TTL),
    }
}

/// One stored record: seq, record, bytes (key + value).
type Stored = (u64, Record, u64);

/// The outbox as stored, read from the sled trees by the documented layout.
#[derive(Debug, Clone, PartialEq)]
struct OutboxView {
    lanes: [Vec<Stored>; 2],
    /// `next_seq` keys per lane.
    next_seq_keys: [Option<u64>; 2],
    /// Keys of the dead-letter tree: `(lane tag, seq)`.
    dead_letters: BTreeSet<(u8, u64)>,
}

impl OutboxView {
    fn read(store: &Store) -> Result<OutboxView, TestCaseError> {
        let tree = store.db().open_tree(TREE_OUTBOX).unwrap();
        let mut view = OutboxView {
            lanes: [Vec::new(), Vec::new()],
            next_seq_keys: [None; 2],
            dead_letters: BTreeSet::new(),
        };
        for item in tree.iter() {
            let (key, value) = item.unwrap();
            match key.as_ref() {
                [0xFF, b'n', lane_tag] => {
                    let lane = Lane::from_tag(*lane_tag).expect("a known lane");
                    let bytes: [u8; 8] = value.as_ref().try_into().unwrap();
                    view.next_seq_keys[tag(lane)] = Some(u64::from_be_bytes(bytes));
                }
                [lane_tag, seq @ ..] if seq.len() == 8 => {
                    let lane = Lane::from_tag(*lane_tag).expect("a known lane");
                    let seq = u64::from_be_bytes(seq.try_into().unwrap());
                    prop_assert_eq!(value.first(), Some(&OUTBOX_VALUE_VERSION));
                    let record: Record = postcard::from_bytes(&value[1..])
                        .map_err(|e| TestCaseError::fail(format!("{lane:?}/{seq}: {e}")))?;
                    prop_assert_eq!(record.seq, seq, "the key and the record disagree");
                    let size = (key.len() + value.len()) as u64;
                    view.lanes[tag(lane)].push((seq, record, size));
                }
                other => return Err(TestCaseError::fail(format!("unknown outbox key {other:?}"))),
            }
        }
        let dead = store.db().open_tree(TREE_DEAD_LETTER).unwrap();
        for key in dead.iter().keys() {
            let key = key.unwrap();
            prop_assert_eq!(key.len(), 9, "a dead-letter key is [lane][seq BE]");
            view.dead_letters.insert((key[0], u64::from_be_bytes(key[1..].try_into().unwrap())));
        }
        Ok(view)
    }

    fn lane(&self, lane: Lane) -> &[Stored] {
        &self.lanes[tag(lane)]
    }

    fn bytes(&self) -> u64 {
        self.lanes.iter().flatten().map(|(_, _, size)| size).sum()
    }

    fn only_gaps(&self, lane: Lane) -> bool {
        self.lane(lane).iter().all(|(_, r, _)| gap_of(&r.body).is_some())
    }

    /// The non-gap record at `seq`, if any.
    fn kept(&self, lane: Lane, seq: u64) -> Option<&RecordBody> {
        self.lane(lane)
            .iter()
            .find(|(s, r, _)| *s == seq && gap_of(&r.body).is_none())
            .map(|(_, r, _)| &r.body)
    }

    /// Records lost into gaps of `reason` in this lane (the sum of their `records`).
    fn lost(&self, lane: Lane, reason: &str) -> u64 {
        self.lane(lane)
            .iter()
            .filter_map(|(_, r, _)| gap_of(&r.body))
            .filter(|g| g.reason == reason)
            .map(|g| g.records)
            .sum()
    }

    /// The gap of `reason` whose range holds `seq`.
    fn gap_holding(&self, lane: Lane, seq: u64, reason: &str) -> bool {
        self.lane(lane)
            .iter()
            .filter_map(|(_, r, _)| gap_of(&r.body))
            .any(|g| g.reason == reason && g.first_seq <= seq && seq <= g.last_seq)
    }
}

/// What the outbox should account for, per lane: written from the `outbox` module docs.
#[derive(Debug, Clone, PartialEq)]
struct OutboxModel {
    next_seq: [u64; 2],
    /// Records put and not yet acknowledged or dead-lettered: each is still waiting, inside
    /// exactly one gap, or (compaction) merged into an earlier summary.
    live: [BTreeMap<u64, RecordBody>; 2],
    /// Events of every put.
    put_events: [u64; 2],
    /// Events of the records acknowledged or dead-lettered (they left the outbox).
    gone_events: [u64; 2],
}

/// What upstream may hold in this process: it changes the rules for merging and gaps.
#[derive(Debug, Default)]
struct Session {
    /// Highest seq handed out by `peek` in this process, per lane.
    handed_out: [Option<u64>; 2],
    /// Records handed out in this process, as first handed out, per lane and seq.
    sent: [BTreeMap<u64, RecordBody>; 2],
    /// Records present at open (an earlier run may have sent them), per lane and seq.
    at_open: [BTreeMap<u64, RecordBody>; 2],
    /// The last batch `peek` returned, per lane.
    last_peek: [Vec<Record>; 2],
}

impl Session {
    fn opened(view: &OutboxView) -> Session {
        let mut session = Session::default();
        for lane in Lane::ALL {
            session.at_open[tag(lane)] =
                view.lane(lane).iter().map(|(s, r, _)| (*s, r.body.clone())).collect();
        }
        session
    }
}

/// The outbox under test.
struct OutboxRig {
    dirs: Dirs,
    mode: Mode,
    cap: u64,
    store: Store,
    outbox: Outbox,
    epoch: u64,
}

impl OutboxRig {
    /// Opens the store and reads it raw, then opens the outbox over it.
    fn open(dirs: Dirs, mode: Mode, cap: u64) -> (OutboxRig, OutboxView) {
        let store = open_store(&dirs.current());
        let before = OutboxView::read(&store).unwrap();
        let metrics = Arc::new(Metrics::default());
        let outbox = Outbox::open(&store, AGENT, &buffer_config(mode, cap), metrics).unwrap();
        let epoch = store.epoch();
        (OutboxRig { dirs, mode, cap, store, outbox, epoch }, before)
    }

    fn restart(self, cap: u64) -> (OutboxRig, OutboxView) {
        let OutboxRig { dirs, mode, store, outbox, epoch, .. } = self;
        drop((outbox, store));
        let (rig, before) = OutboxRig::open(dirs, mode, cap);
        assert_eq!(rig.epoch, epoch, "the store epoch changed");
        (rig, before)
    }

    fn crash_restart(self) -> (OutboxRig, OutboxView) {
        let OutboxRig { mut dirs, mode, cap, store, outbox, epoch } = self;
        dirs.crash_copy();
        drop((outbox, store));
        let (rig, before) = OutboxRig::open(dirs, mode, cap);
        assert_eq!(rig.epoch, epoch, "the store epoch changed");
        (rig, before)
    }
}

/// What an operation may do to the stored records, for the checks after it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Effect {
    /// A put: policies ran (expiry when due at the real clock, compaction, eviction).
    Put,
    /// Nothing may change (a refused put, a flush).
    Nothing,
    /// A peek of one lane: expiry of that lane at the real clock.
    Peek(Lane),
    /// An expiry pass over every lane at this time.
    Expire(i64),
    /// Records left one lane (ack, dead letter): no policy ran.
    Removal,
    /// The outbox was opened: the cap was enforced.
    Open,
}

/// Puts a record and updates the model; checks the fence.
fn put(
    rig: &OutboxRig,
    model: &mut OutboxModel,
    lane: Lane,
    seq: u64,
    body: RecordBody,
) -> Result<(), TestCaseError> {
    prop_assert!(seq >= model.next_seq[tag(lane)]);
    let stored = rig.outbox.put(lane, seq, body.clone()).unwrap();
    prop_assert!(stored, "a fresh put of {:?}/{} was refused", lane, seq);
    model.next_seq[tag(lane)] = seq + 1;
    model.put_events[tag(lane)] += events_of(&body);
    model.live[tag(lane)].insert(seq, body);
    Ok(())
}

/// Takes the records of `lane` in `pre` that `leaves` selects out of the model: their events
/// are gone, and so are the seqs they stand for.
fn remove_from_model(
    model: &mut OutboxModel,
    pre: &OutboxView,
    lane: Lane,
    leaves: impl Fn(u64) -> bool,
) {
    for (seq, record, _) in pre.lane(lane).iter().filter(|(seq, _, _)| leaves(*seq)) {
        model.gone_events[tag(lane)] += events_of(&record.body);
        let live = &mut model.live[tag(lane)];
        match gap_of(&record.body) {
            Some(gap) => live.retain(|s, _| !(gap.first_seq..=gap.last_seq).contains(s)),
            None => {
                live.remove(seq);
            }
        }
    }
}

/// Runs one sequence of outbox operations against the model; `Err` on the first
/// disagreement.
fn run_outbox(mode: Mode, first_cap: u64, ops: &[OutboxOp]) -> Result<(), TestCaseError> {
    let base_s = event::now_ms() / 1_000;
    let time = |age_s: u16| (base_s - i64::from(age_s)) * 1_000;
    // A burst is a run of puts, each checked on its own.
    let ops: Vec<OutboxOp> = ops
        .iter()
        .flat_map(|op| match *op {
            OutboxOp::Burst { count, series, age_s } => (0..count)
                .map(|i| OutboxOp::Put {
                    alert: false,
                    skip: 0,
                    series,
                    age_s: age_s.saturating_sub(u16::from(i)),
                    count: 1 + i % 4,
                    len: 0,
                })
                .collect(),
            ref other => vec![other.clone()],
        })
        .collect();

    let (mut rig, _) = OutboxRig::open(Dirs::new(), mode, first_cap);
    let mut model = OutboxModel {
        next_seq: [0; 2],
        live: [BTreeMap::new(), BTreeMap::new()],
        put_events: [0; 2],
        gone_events: [0; 2],
    };
    let mut view = OutboxView::read(&rig.store)?;
    let mut session = Session::opened(&view);
    let mut since_flush = vec![(view.clone(), model.clone())];
    let mut stats = rig.outbox.stats();
    for (step, op) in ops.iter().enumerate() {
        let mut pre = view.clone();
        let mut mid_op = None;
        let t_lo = event::now_ms();
        let effect = match *op {
            OutboxOp::Put { alert: is_alert, skip, series, age_s, count, len } => {
                let lane = lane_of(is_alert);
                let seq = model.next_seq[tag(lane)] + u64::from(skip);
                let body = if is_alert {
                    alert(series, time(age_s), len)
                } else {
                    summary(series, time(age_s), u64::from(count))
                };
                put(&rig, &mut model, lane, seq, body.clone())?;
                // A crash may keep the put's batch and lose the policies' batches after it.
                let mut put_only = pre.clone();
                let record = Record { id: record_id(AGENT, rig.epoch, lane, seq), seq, body };
                let mut value = vec![OUTBOX_VALUE_VERSION];
                value.extend(postcard::to_allocvec(&record).unwrap());
                put_only.lanes[tag(lane)].push((seq, record, (9 + value.len()) as u64));
                put_only.next_seq_keys[tag(lane)] = Some(seq + 1);
                mid_op = Some((put_only, model.clone()));
                Effect::Put
            }
            OutboxOp::Burst { .. } => unreachable!("bursts were expanded"),
            OutboxOp::Stale { alert: is_alert, back } => {
                let lane = lane_of(is_alert);
                let next = model.next_seq[tag(lane)];
                if next > 0 {
                    let seq = next.saturating_sub(u64::from(back));
                    let stored = rig.outbox.put(lane, seq, summary(9, time(0), 1)).unwrap();
                    prop_assert!(!stored, "step {}: a put below next_seq was stored", step);
                }
                Effect::Nothing
            }
            OutboxOp::Peek { alert: is_alert, max, max_bytes } => {
                let lane = lane_of(is_alert);
                let limit = max_bytes.map_or(u64::MAX, u64::from);
                let batch = rig.outbox.peek(lane, usize::from(max), limit).unwrap();
                // The batch is the head of the lane as stored after the peek's expiry.
                let after = OutboxView::read(&rig.store)?;
                let mut want = Vec::new();
                let mut bytes = 0;
                for (_, record, size) in after.lane(lane) {
                    if want.len() >= usize::from(max).max(1)
                        || (!want.is_empty() && bytes + size > limit)
                    {
                        break;
                    }
                    bytes += size;
                    want.push(record.clone());
                }
                prop_assert_eq!(
                    &batch,
                    &want,
                    "step {}: peek({:?}, {}, {})",
                    step,
                    lane,
                    max,
                    limit
                );
                if let Some(last) = batch.last() {
                    let handed = &mut session.handed_out[tag(lane)];
                    *handed = Some(handed.map_or(last.seq, |h| h.max(last.seq)));
                }
                for record in &batch {
                    session.sent[tag(lane)].entry(record.seq).or_insert(record.body.clone());
                }
                session.last_peek[tag(lane)] = batch;
                Effect::Peek(lane)
            }
            OutboxOp::AckPeeked { alert: is_alert } => {
                let lane = lane_of(is_alert);
                match session.last_peek[tag(lane)].last().map(|r| r.seq) {
                    Some(through) => {
                        rig.outbox.remove_through(lane, through).unwrap();
                        remove_from_model(&mut model, &pre, lane, |s| s <= through);
                        model.live[tag(lane)].retain(|s, _| *s > through);
                        pre.lanes[tag(lane)].retain(|(s, _, _)| *s > through);
                        Effect::Removal
                    }
                    None => Effect::Nothing,
                }
            }
            OutboxOp::RemoveThrough { alert: is_alert, ahead } => {
                let lane = lane_of(is_alert);
                let oldest = pre.lane(lane).first().map_or(0, |(s, _, _)| *s);
                let through = oldest + u64::from(ahead);
                rig.outbox.remove_through(lane, through).unwrap();
                remove_from_model(&mut model, &pre, lane, |s| s <= through);
                model.live[tag(lane)].retain(|s, _| *s > through);
                pre.lanes[tag(lane)].retain(|(s, _, _)| *s > through);
                Effect::Removal
            }
            OutboxOp::DeadLetter { alert: is_alert, n } => {
                let lane = lane_of(is_alert);
                let batch: Vec<Record> =
                    session.last_peek[tag(lane)].iter().take(usize::from(n)).cloned().collect();
                let seqs: BTreeSet<u64> = batch.iter().map(|r| r.seq).collect();
                rig.outbox.dead_letter(lane, &batch, "422 rejected by the model").unwrap();
                let moved: Vec<(u8, u64)> = pre
                    .lane(lane)
                    .iter()
                    .filter(|(s, _, _)| seqs.contains(s))
                    .map(|(s, _, _)| (lane.tag(), *s))
                    .collect();
                // The dead letters are written first: a crash in between leaves the records
                // in both trees (module docs), the model as before.
                let mut in_both = pre.clone();
                in_both.dead_letters.extend(moved.iter().copied());
                mid_op = Some((in_both, model.clone()));
                remove_from_model(&mut model, &pre, lane, |s| seqs.contains(&s));
                pre.lanes[tag(lane)].retain(|(s, _, _)| !seqs.contains(s));
                pre.dead_letters.extend(moved);
                Effect::Removal
            }
            OutboxOp::Expire { ahead_s } => {
                let now = event::now_ms() + i64::from(ahead_s) * 1_000;
                let expired = rig.outbox.expire(now).unwrap();
                let after = OutboxView::read(&rig.store)?;
                let lost: u64 = Lane::ALL
                    .iter()
                    .map(|&l| after.lost(l, GAP_REASON_EXPIRED) - pre.lost(l, GAP_REASON_EXPIRED))
                    .sum();
                prop_assert_eq!(expired, lost, "step {}: expire() returned", step);
                Effect::Expire(now)
            }
            OutboxOp::Flush => {
                rig.store.flush().unwrap();
                since_flush.clear();
                Effect::Nothing
            }
            OutboxOp::Restart { cap_percent } => {
                let cap = (first_cap * u64::from(cap_percent) / 100).max(1);
                let (reopened, before) = rig.restart(cap);
                rig = reopened;
                // sled flushes on the last drop (see `store`): everything is still there.
                prop_assert_eq!(&before, &pre, "step {}: a clean restart lost something", step);
                since_flush.clear();
                pre = before;
                Effect::Open
            }
            OutboxOp::CrashRestart => {
                let (reopened, before) = rig.crash_restart();
                rig = reopened;
                // An op writes one batch per lane and policy; a crash may keep any prefix
                // of them. Such a state is never observed between ops, so the model is found
                // by what the batches cannot split: the lanes' high-water marks, the dead
                // letters and the events (each batch moves events, never drops them). The
                // checks after the open then hold the state to every invariant.
                let waiting = |v: &OutboxView, lane: Lane| -> u64 {
                    v.lane(lane).iter().map(|(_, r, _)| events_of(&r.body)).sum()
                };
                let found = since_flush.iter().rposition(|(v, _)| *v == before).or_else(|| {
                    since_flush.iter().rposition(|(v, m)| {
                        v.next_seq_keys == before.next_seq_keys
                            && v.dead_letters == before.dead_letters
                            && Lane::ALL.iter().all(|&l| {
                                waiting(&before, l) + m.gone_events[tag(l)] == m.put_events[tag(l)]
                            })
                    })
                });
                let Some(index) = found else {
                    return Err(TestCaseError::fail(format!(
                        "step {step}: after a crash the outbox holds {before:?}, which is none \
                         of the {} states (after an op, or after a put's own batch) since \
                         the last flush",
                        since_flush.len()
                    )));
                };
                model = since_flush[index].1.clone();
                since_flush.clear();
                pre = before;
                Effect::Open
            }
        };
        let t_hi = event::now_ms();
        view = OutboxView::read(&rig.store)?;
        if effect == Effect::Open {
            // What an earlier run may have sent: the records stored before the open (a gap
            // the open's own eviction writes is new, and may grow).
            session = Session::opened(&pre);
        }
        let counters = (stats.evicted, stats.expired);
        stats = rig.outbox.stats();
        let ctx = Check { rig: &rig, model: &model, session: &session, pre: &pre, post: &view };
        ctx.all(effect, counters, &stats, (t_lo, t_hi))
            .map_err(|e| TestCaseError::fail(format!("step {step} ({op:?}): {e}")))?;
        since_flush.extend(mid_op);
        since_flush.push((view.clone(), model.clone()));
    }
    Ok(())
}

/// The checks after one step.
struct Check<'a> {
    rig: &'a OutboxRig,
    model: &'a OutboxModel,
    session: &'a Session,
    pre: &'a OutboxView,
    post: &'a OutboxView,
}

impl Check<'_> {
    fn all(
        &self,
        effect: Effect,
        (evicted_before, expired_before): (u64, u64),
        stats: &OutboxStats,
        (t_lo, t_hi): (i64, i64),
    ) -> Result<(), TestCaseError> {
        let (rig, post, pre) = (self.rig, self.post, self.pre);
        self.counters(stats)?;
        for lane in Lane::ALL {
            prop_assert_eq!(rig.outbox.next_seq(lane), self.model.next_seq[tag(lane)]);
            let next = self.model.next_seq[tag(lane)];
            prop_assert_eq!(post.next_seq_keys[tag(lane)], (next > 0).then_some(next));
            self.ids_and_gaps(lane)?;
            let waiting: u64 = post.lane(lane).iter().map(|(_, r, _)| events_of(&r.body)).sum();
            prop_assert_eq!(
                waiting + self.model.gone_events[tag(lane)],
                self.model.put_events[tag(lane)],
                "{:?}: events waiting + gone != events put",
                lane
            );
            if rig.mode == Mode::Compact && lane == Lane::Summaries {
                self.merged_summaries()?;
            } else {
                self.coverage(lane)?;
            }
            self.upstream_may_hold(lane)?;
        }

        let (lost_full, lost_expired) = Lane::ALL.iter().fold((0, 0), |(f, e), &l| {
            (
                f + post.lost(l, GAP_REASON_OUTBOX_FULL) as i64
                    - pre.lost(l, GAP_REASON_OUTBOX_FULL) as i64,
                e + post.lost(l, GAP_REASON_EXPIRED) as i64
                    - pre.lost(l, GAP_REASON_EXPIRED) as i64,
            )
        });
        let evicted = stats.evicted as i64;
        let expired = stats.expired as i64;
        match effect {
            Effect::Nothing => {
                prop_assert_eq!(post, pre, "nothing was to change");
                prop_assert_eq!((evicted, expired), (evicted_before as i64, expired_before as i64));
            }
            Effect::Removal => {
                prop_assert_eq!(post, pre, "exactly the removed records leave");
                prop_assert_eq!((evicted, expired), (evicted_before as i64, expired_before as i64));
            }
            Effect::Open => {
                prop_assert_eq!((evicted, expired), (lost_full, 0), "counters after open");
                prop_assert_eq!(lost_expired, 0, "open expires nothing");
            }
            Effect::Put | Effect::Peek(_) | Effect::Expire(_) => {
                prop_assert_eq!(evicted - evicted_before as i64, lost_full, "evicted counter");
                prop_assert_eq!(expired - expired_before as i64, lost_expired, "expired counter");
            }
        }
        if let Effect::Peek(lane) = effect {
            let other = if lane == Lane::Alerts { Lane::Summaries } else { Lane::Alerts };
            prop_assert_eq!(post.lane(other), pre.lane(other), "a peek changed the other lane");
            prop_assert_eq!(lost_full, 0, "a peek evicted");
        }
        if let Effect::Expire(_) = effect {
            prop_assert_eq!(lost_full, 0, "an expiry pass evicted");
        }

        // Bounded: after a put or an open the records fit, unless only gaps are left; alerts
        // are evicted only when no summary is left; eviction takes the oldest first.
        if matches!(effect, Effect::Put | Effect::Open) {
            prop_assert!(
                post.bytes() <= rig.cap
                    || (post.only_gaps(Lane::Alerts) && post.only_gaps(Lane::Summaries)),
                "{} bytes over the cap of {} with records left",
                post.bytes(),
                rig.cap
            );
            if post.lost(Lane::Alerts, GAP_REASON_OUTBOX_FULL)
                > pre.lost(Lane::Alerts, GAP_REASON_OUTBOX_FULL)
            {
                prop_assert!(post.only_gaps(Lane::Summaries), "alerts evicted before summaries");
            }
            for lane in Lane::ALL {
                self.oldest_evicted_first(lane)?;
            }
        }

        // Expiry loses only records older than the TTL, and a pass leaves none before the
        // first record wholly newer than the cutoff.
        let latest = match effect {
            Effect::Expire(now) => Some(now),
            Effect::Put | Effect::Peek(_) => Some(t_hi),
            _ => None,
        };
        for lane in Lane::ALL {
            let newly_expired: Vec<&RecordBody> = pre
                .lane(lane)
                .iter()
                .filter(|(s, r, _)| {
                    gap_of(&r.body).is_none()
                        && post.kept(lane, *s).is_none()
                        && post.gap_holding(lane, *s, GAP_REASON_EXPIRED)
                })
                .map(|(_, r, _)| &r.body)
                .collect();
            if newly_expired.is_empty() {
                continue;
            }
            let (Some(ttl), Some(latest)) = (ttl_of(rig.mode, lane), latest) else {
                return Err(TestCaseError::fail(format!("{lane:?}: records expired unexpectedly")));
            };
            for body in newly_expired {
                prop_assert!(expirable(body, ttl, latest), "{:?} expired too early", body);
            }
        }
        let pass = match effect {
            Effect::Expire(now) => Some((now, Lane::ALL.to_vec())),
            Effect::Peek(lane) => Some((t_lo, vec![lane])),
            _ => None,
        };
        if let Some((at, lanes)) = pass {
            for lane in lanes {
                let Some(ttl) = ttl_of(rig.mode, lane) else { continue };
                for (seq, record, _) in post.lane(lane) {
                    if gap_of(&record.body).is_some() {
                        continue;
                    }
                    prop_assert!(
                        !expirable(&record.body, ttl, at),
                        "{:?}/{} outlived an expiry pass at {}",
                        lane,
                        seq,
                        at
                    );
                    if stops_expiry(&record.body, ttl, at) {
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// `stats()` agrees with the stored trees.
    fn counters(&self, stats: &OutboxStats) -> Result<(), TestCaseError> {
        for (lane, lane_stats) in
            [(Lane::Alerts, &stats.alerts), (Lane::Summaries, &stats.summaries)]
        {
            let records = self.post.lane(lane);
            prop_assert_eq!(lane_stats.records, records.len() as u64, "{:?} records", lane);
            let bytes: u64 = records.iter().map(|(_, _, size)| size).sum();
            prop_assert_eq!(lane_stats.bytes, bytes, "{:?} bytes", lane);
            prop_assert_eq!(lane_stats.oldest_seq, records.first().map(|(s, _, _)| *s));
            let oldest_ms = records.first().and_then(|(_, r, _)| span(&r.body)).map(|s| s.0);
            prop_assert_eq!(lane_stats.oldest_ms, oldest_ms, "{:?} oldest_ms", lane);
        }
        prop_assert_eq!(stats.dead_letter_records, self.post.dead_letters.len() as u64);
        prop_assert_eq!(stats.max_bytes, self.rig.cap);
        prop_assert_eq!(stats.bytes(), self.post.bytes());
        Ok(())
    }

    /// Stable ids; gaps well formed, in their lane, never spanning a record that stays.
    fn ids_and_gaps(&self, lane: Lane) -> Result<(), TestCaseError> {
        let epoch = self.rig.epoch;
        let mut covered_through: Option<u64> = None;
        for (seq, record, _) in self.post.lane(lane) {
            if let Some(through) = covered_through {
                prop_assert!(*seq > through, "{:?}/{} lies inside the gap before it", lane, seq);
            }
            match gap_of(&record.body) {
                Some(gap) => {
                    prop_assert_eq!(&record.id, &gap_id(AGENT, epoch, lane, *seq));
                    prop_assert_eq!(gap.lane, lane);
                    prop_assert_eq!(gap.first_seq, *seq, "a gap sits at its first seq");
                    prop_assert!(gap.first_seq <= gap.last_seq && gap.records >= 1, "{:?}", gap);
                    prop_assert!(
                        gap.reason == GAP_REASON_OUTBOX_FULL || gap.reason == GAP_REASON_EXPIRED,
                        "reason {}",
                        gap.reason
                    );
                    covered_through = Some(gap.last_seq);
                }
                None => {
                    prop_assert_eq!(&record.id, &record_id(AGENT, epoch, lane, *seq));
                    covered_through = Some(*seq);
                }
            }
        }
        Ok(())
    }

    /// Without compaction: every live seq is waiting unchanged or inside exactly one gap,
    /// and each gap says exactly what it covers.
    fn coverage(&self, lane: Lane) -> Result<(), TestCaseError> {
        let live = &self.model.live[tag(lane)];
        let mut accounted = BTreeSet::new();
        for (seq, record, _) in self.post.lane(lane) {
            match gap_of(&record.body) {
                None => {
                    prop_assert_eq!(
                        Some(&record.body),
                        live.get(seq),
                        "{:?}/{} waiting",
                        lane,
                        seq
                    );
                    accounted.insert(*seq);
                }
                Some(gap) => {
                    let covered: Vec<(&u64, &RecordBody)> =
                        live.range(gap.first_seq..=gap.last_seq).collect();
                    prop_assert_eq!(gap.records, covered.len() as u64, "{:?} records", gap);
                    let events: u64 = covered.iter().map(|(_, b)| events_of(b)).sum();
                    prop_assert_eq!(gap.events, events, "{:?} events", gap);
                    let from = covered.iter().map(|(_, b)| loss_time(b)).min();
                    let to = covered.iter().map(|(_, b)| loss_time(b)).max();
                    prop_assert_eq!((gap.from_ms, gap.to_ms), (from, to), "{:?} times", gap);
                    prop_assert!(
                        live.contains_key(&gap.first_seq) && live.contains_key(&gap.last_seq)
                    );
                    accounted.extend(covered.iter().map(|(s, _)| **s));
                }
            }
        }
        let missing: Vec<&u64> = live.keys().filter(|s| !accounted.contains(s)).collect();
        prop_assert!(
            missing.is_empty(),
            "{:?} seqs {:?} are neither waiting nor in a gap",
            lane,
            missing
        );
        Ok(())
    }

    /// With compaction, summaries: an unmerged summary is the one put at its seq; a merged
    /// one sits at the seq of a summary of its series; gaps start and end at live seqs.
    fn merged_summaries(&self) -> Result<(), TestCaseError> {
        let live = &self.model.live[tag(Lane::Summaries)];
        for (seq, record, _) in self.post.lane(Lane::Summaries) {
            let put = live.get(seq);
            match &record.body {
                RecordBody::Summary(s) if s.windows == 1 => {
                    prop_assert_eq!(Some(&record.body), put, "summaries/{}", seq);
                }
                RecordBody::Summary(merged) => {
                    let Some(RecordBody::Summary(first)) = put else {
                        return Err(TestCaseError::fail(format!(
                            "merged summary at dead seq {seq}"
                        )));
                    };
                    prop_assert_eq!(&merged.series, &first.series, "merged across series");
                }
                RecordBody::Gap(gap) => {
                    prop_assert!(
                        live.contains_key(&gap.first_seq) && live.contains_key(&gap.last_seq)
                    );
                }
                RecordBody::Alert(_) => {
                    return Err(TestCaseError::fail("an alert among summaries"));
                }
            }
        }
        Ok(())
    }

    /// A record upstream may hold (handed out in this process, or present at open) is never
    /// merged or changed; a gap found at open never grows; a handed-out gap grows only by
    /// seqs that were handed out too.
    fn upstream_may_hold(&self, lane: Lane) -> Result<(), TestCaseError> {
        let post = self.post;
        let live = &self.model.live[tag(lane)];
        let handed_out = self.session.handed_out[tag(lane)];
        let guarded = self.session.at_open[tag(lane)]
            .iter()
            .map(|(s, b)| (s, b, true))
            .chain(self.session.sent[tag(lane)].iter().map(|(s, b)| (s, b, false)));
        for (seq, held, at_open) in guarded {
            let now = post.lane(lane).iter().find(|(s, _, _)| s == seq).map(|(_, r, _)| &r.body);
            match (gap_of(held), now) {
                (None, Some(body)) if gap_of(body).is_none() => {
                    prop_assert_eq!(
                        body,
                        held,
                        "{:?}/{} changed after upstream may have got it",
                        lane,
                        seq
                    );
                }
                (None, _) => {
                    let in_gap = post.gap_holding(lane, *seq, GAP_REASON_OUTBOX_FULL)
                        || post.gap_holding(lane, *seq, GAP_REASON_EXPIRED);
                    prop_assert!(
                        in_gap || !live.contains_key(seq),
                        "{:?}/{} vanished (merged?) after upstream may have got it",
                        lane,
                        seq
                    );
                }
                (Some(old), Some(RecordBody::Gap(gap))) => {
                    if at_open {
                        prop_assert_eq!(gap, old, "{:?}: a gap found at open changed", lane);
                    } else {
                        let limit = old.last_seq.max(handed_out.unwrap_or(0));
                        prop_assert!(
                            gap.first_seq == old.first_seq
                                && gap.last_seq <= limit
                                && gap.records >= old.records,
                            "{:?}: handed-out gap {:?} grew to {:?} past {}",
                            lane,
                            old,
                            gap,
                            limit
                        );
                    }
                }
                (Some(_), Some(other)) => {
                    return Err(TestCaseError::fail(format!(
                        "gap {lane:?}/{seq} became {other:?}"
                    )));
                }
                (Some(_), None) => {}
            }
        }
        Ok(())
    }

    /// Eviction loses a lane's oldest records first: no record older than an evicted one
    /// is left.
    fn oldest_evicted_first(&self, lane: Lane) -> Result<(), TestCaseError> {
        let (pre, post) = (self.pre, self.post);
        let evicted = pre.lane(lane).iter().filter(|(s, r, _)| {
            gap_of(&r.body).is_none()
                && post.kept(lane, *s).is_none()
                && post.gap_holding(lane, *s, GAP_REASON_OUTBOX_FULL)
        });
        let Some(newest) = evicted.map(|(s, _, _)| *s).max() else { return Ok(()) };
        for (seq, record, _) in pre.lane(lane) {
            if *seq < newest && gap_of(&record.body).is_none() {
                prop_assert!(
                    post.kept(lane, *seq).is_none(),
                    "{:?}/{} kept while the newer {} was evicted",
                    lane,
                    seq,
                    newest
                );
            }
        }
        Ok(())
    }
}

fn mode() -> impl Strategy<Value = Mode> {
    prop_oneof![Just(Mode::CapOnly), Just(Mode::Ttl), Just(Mode::Compact)]
}

proptest! {
    #![proptest_config(proptest_config(96))]

    /// The outbox keeps, per lane, the records put and not acknowledged, in seq order, each
    /// waiting unchanged or accounted for in exactly one gap; under the cap after every put;
    /// with counters that agree with what is stored; losing at most an unflushed suffix in a
    /// crash.
    #[test]
    fn the_outbox_matches_its_model(
        mode in mode(),
        cap in 1_200u64..6_000,
        ops in proptest::collection::vec(outbox_op(), 1..50),
    ) {
        run_outbox(mode, cap, &ops)?;
    }
}
