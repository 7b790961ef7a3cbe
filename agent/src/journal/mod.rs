//! The event journal: a write-ahead log of everything the processor consumes, with group
//! commit and a durable watermark.
//!
//! # Invariants
//!
//! - **Acknowledged means durable.** An MQTT QoS 1 message is acknowledged to the broker
//!   ([`Ack::send`]) only after the sync of the commit that holds it returned `Ok`. A sync
//!   error is retried with backoff; acks wait, and so do the sources (the ingest channel is
//!   bounded), so a failing disk turns into backpressure, never into a false ack.
//! - **The processor sees only durable entries**, in sequence order, in the batches the
//!   writer hands it after each commit. An entry written but lost in a power cut before its
//!   sync was therefore never processed, so reusing its sequence number after restart is
//!   harmless: no output was derived from it.
//! - **Sequence numbers are dense and increasing**, starting at 1, also across chunks: a
//!   chunk starting at `first` holding `n` entries holds exactly `first..first + n`, and the
//!   next chunk starts at `first + n`. After a restart they continue after the last stored
//!   entry, or after the snapshot position if that is higher (so a replay
//!   `read_after(position)` never skips a new entry).
//! - **Sealed before synced.** [`Journal::append`] only buffers an entry in memory;
//!   [`Journal::seal`] writes the buffer to the active segment file as one record. A sync
//!   ([`JournalSync::sync`], `fdatasync`) makes durable only what was sealed before it, so the
//!   writer seals right before each commit's sync. Unsealed entries are invisible to readers
//!   and vanish when the [`Journal`] is dropped, like unsynced ones in a power cut (they were
//!   neither acknowledged nor processed, so no snapshot position covers them and their seqs
//!   may be given again).
//! - **One appender.** [`run_writer`] owns the [`Journal`] (`append` takes `&mut self`);
//!   readers ([`JournalReader`]) are shared and only read and trim behind the snapshot.
//! - **Bounded.** [`JournalReader::trim`] deletes a prefix of whole segment files that the
//!   last snapshot covers (every entry before the next segment's first seq is <= the
//!   position), once their newest entry is older than `max_age` or while the journal is over
//!   `max_bytes`. The active (last) segment is never deleted: it takes the next appends. A
//!   segment is closed for appends once it reaches its size (`segment_bytes`, derived from
//!   `max_bytes`), so the journal holds at most `max_bytes` plus one segment plus what the
//!   snapshot does not yet cover. A chunk's encoded entries are bounded by
//!   [`CHUNK_MAX_BYTES`] (a larger buffer is split into several chunks), and so is the
//!   in-memory buffer.
//! - **Redeliveries are dropped, not re-journaled.** Each record carries the dedup keys of
//!   its QoS 1 messages: per MQTT `(source, pkid)` the hash of the message. A DUP message
//!   whose `(source, pkid)` was last journaled with the same hash is a redelivery of an
//!   already journaled message (its PUBACK was lost in a crash): it is acknowledged again
//!   but not appended. Key and entry are in one checksummed record, so after a crash either
//!   both survived or neither: a dedup key never outlives its event (which would drop the
//!   broker's redelivery of a lost event) and an event never outlives its key (its
//!   redelivery would be journaled twice). The keys live in memory (at most 2^16 per
//!   source), rebuilt at open from the segments on disk; a restart forgets the keys of
//!   segments trimmed before it, which only matters for a message the broker still
//!   redelivers after its segment aged out of the journal.
//!
//! # Layout
//!
//! Files in `<data_dir>/journal/` (see [`segment`] for the record format):
//!
//! ```text
//! 00000000000000000001.seg   records: [len][crc32][first seq][dedup keys][chunk]
//! 00000000000000012345.seg   chunk = [version u8 = 2][postcard(Vec<event::Entry>)]
//! ```
//!
//! One record per chunk, at most [`CHUNK_MAX_BYTES`] of entries, usually one per group
//! commit. The journal's size (the bytes of its segment files) is counted in memory, from
//! the scan at open.
//!
//! Builds before 0.2 kept the journal in the sled trees `journal` (key: u64 BE first seq,
//! value: the chunk above, or `[1][postcard(Entry)]` for one entry) and `dedup`. [`Journal::open`]
//! moves such a journal into a segment file once (written and synced before the trees are
//! cleared; a crash in between finds the segment and only clears the trees).
//!
//! Why files and not sled: a journal is written once, read once and deleted in order. In
//! sled every chunk also passed through its page cache and log, and the agent's memory grew
//! with sled's log (measured in BENCHMARKS.md: the journal was most of sled's traffic).
//!
//! # Lifecycle
//!
//! 1. **write**: sources send [`Ingest`]s; the writer appends them together with periodic
//!    [`Entry::Tick`]s into the journal's in-memory buffer (a buffer that would pass
//!    [`CHUNK_MAX_BYTES`] is closed as a chunk first).
//! 2. **commit**: at most every `commit_interval` (QoS 1 acks waiting) or after
//!    `commit_max_delay` (nothing waits) the writer seals the buffer (one `write` of the
//!    commit's records to the active segment), syncs it once (group commit: under load
//!    thousands of entries share one record and one fsync; an idle agent commits once per
//!    tick), then sends the acks in receive order.
//! 3. **read**: the committed `(seq, Entry)` list goes to the processor over a bounded
//!    channel; awaiting that send is the backpressure from processor to sources. On restart
//!    the processor replays [`JournalReader::read_after`] its snapshot position instead
//!    (from the segment holding `position + 1`, skipping entries up to the position).
//! 4. **delete**: after a snapshot, [`JournalReader::trim`] deletes the covered segments
//!    that are older than `max_age` or over `max_bytes`.
//!
//! # Recovery
//!
//! A power cut can tear the records written after the last sync, in the last segment only
//! (earlier segments were synced before the next one was started). [`Journal::open`] reads
//! every segment, checks every record's checksum and cuts the last segment after its last
//! whole record: what is cut was neither acknowledged nor processed. A bad record anywhere
//! else is damage (a failing card): the readable records before it stay, the rest of that
//! segment is reported as one `Err` item of `read_after` (the processor logs and skips it).

mod segment;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

use crate::config::JournalConfig;
use crate::event::{self, Ack, Entry, Ingest, Redelivery};
use crate::metrics::Metrics;
use crate::store::{Store, StoreError, TREE_DEDUP, TREE_JOURNAL};
use segment::{Next, SegmentReader};

/// Version byte of a chunk (`[2][postcard(Vec<Entry>)]`); bump it when the envelope or
/// `Entry` changes incompatibly.
const CHUNK_VERSION: u8 = 2;

/// Version byte of a one-entry value (`[1][postcard(Entry)]`, key = its seq) written to sled
/// by builds before chunks. Read by the migration only.
const ENTRY_VERSION_V1: u8 = 1;

/// Bound of a chunk's encoded entries (its record is this plus a small header): an append
/// that would pass it closes the buffer as a chunk first. Only a single entry larger than
/// this makes a larger chunk (of one). Keeps records and the appender's buffer small while
/// one chunk still holds thousands of typical entries.
pub const CHUNK_MAX_BYTES: usize = 64 * 1024;

/// The journal's directory inside the data directory.
pub const JOURNAL_DIR: &str = "journal";

/// Largest segment: trimming deletes whole segments, so this is the granularity of the byte
/// cap and of `max_age`; a few of them per `max_bytes` keeps the number of files small.
pub const SEGMENT_MAX_BYTES: u64 = 1024 * 1024;

/// Smallest segment, whatever `max_bytes` says: one segment per commit would be a file per
/// fsync.
pub const SEGMENT_MIN_BYTES: u64 = 64 * 1024;

/// The segment size for a journal capped at `max_bytes`: an eighth of it, within
/// [`SEGMENT_MIN_BYTES`]..=[`SEGMENT_MAX_BYTES`].
pub fn segment_bytes(cfg: &JournalConfig) -> u64 {
    (cfg.max_bytes.bytes() / 8).clamp(SEGMENT_MIN_BYTES, SEGMENT_MAX_BYTES)
}

/// First delay before retrying a failed sync; doubles up to [`FLUSH_RETRY_MAX`]. Short,
/// because a transient error (EINTR-like, a momentarily full disk) usually clears fast.
const FLUSH_RETRY_MIN: Duration = Duration::from_millis(10);

/// Longest delay between sync retries: bounds both the log rate of a broken disk and the
/// latency of recovery once it works again.
const FLUSH_RETRY_MAX: Duration = Duration::from_secs(5);

/// Sync attempts (about 0.3 s with the backoff above) before the writer gives up and the
/// agent exits for its supervisor to restart it. Retrying an fsync in-process is also
/// doubtful: after a failed fsync Linux may have dropped the dirty pages, so a later
/// "successful" fsync proves little; a restart re-reads what is really on disk. Nothing is
/// lost by exiting: acks wait for a successful sync, so the broker redelivers every
/// unacknowledged QoS 1 message (measured: disk_full in RELIABILITY.md).
pub const FLUSH_ATTEMPTS: u32 = 6;

/// Floor of the tick interval: `tokio::time::interval` panics on zero, and ticks faster than
/// this would only burn fsyncs.
const MIN_TICK: Duration = Duration::from_millis(1);

/// Errors of the journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// A file operation failed.
    #[error("journal: {context} {}", path.display())]
    Io {
        /// What the journal was doing.
        context: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS's report.
        #[source]
        source: io::Error,
    },
    /// A sled operation failed (migrating a journal of an older build).
    #[error("journal: {context}")]
    Sled {
        /// What the journal was doing.
        context: &'static str,
        /// sled's report.
        #[source]
        source: sled::Error,
    },
    /// An entry could not be encoded.
    #[error("journal: cannot encode entry {seq}")]
    Encode {
        /// The sequence number it was to get.
        seq: u64,
        /// postcard's report.
        #[source]
        source: postcard::Error,
    },
    /// A stored record does not decode; readers skip it.
    #[error("journal: record at entry {seq} is corrupt: {reason}")]
    Corrupt {
        /// The sequence number of its first entry (or the first one not readable).
        seq: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// The store failed (snapshot).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The blocking sync task panicked or was cancelled.
    #[error("journal: the sync task failed")]
    Flusher {
        /// tokio's report.
        #[source]
        source: tokio::task::JoinError,
    },
    /// Syncs kept failing ([`FLUSH_ATTEMPTS`] in a row).
    #[error(
        "journal: {attempts} syncs in a row failed (disk full or failing?); exiting so that \
         the supervisor restarts the agent (nothing unacknowledged is lost)"
    )]
    FlushFailing {
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        #[source]
        source: Box<JournalError>,
    },
    /// The processor stopped receiving while the writer was still running; the entries are
    /// durable and will be replayed on the next start.
    #[error("journal: the processor is gone ({entries} committed entries not handed over)")]
    ProcessorClosed {
        /// How many committed entries could not be handed over.
        entries: usize,
    },
}

impl JournalError {
    /// Whether retrying the same operation later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            JournalError::Io { .. } => true,
            JournalError::Sled { source, .. } => matches!(source, sled::Error::Io(_)),
            JournalError::Store(e) => e.is_retryable(),
            _ => false,
        }
    }

    fn io(context: &'static str, path: &Path) -> impl FnOnce(io::Error) -> JournalError + use<> {
        let path = path.to_path_buf();
        move |source| JournalError::Io { context, path, source }
    }

    fn sled(context: &'static str) -> impl FnOnce(sled::Error) -> JournalError {
        move |source| JournalError::Sled { context, source }
    }
}

/// One segment file, as the journal knows it.
#[derive(Clone, Debug)]
struct Segment {
    /// The seq its first record starts at (its name).
    first: u64,
    path: PathBuf,
    /// Bytes of whole records: what readers read.
    len: u64,
    /// Entries in its readable records.
    entries: u64,
    /// The last entry's seq, if it holds any.
    last: Option<u64>,
    /// The newest receive time of its entries (`None`: no entries, or not decodable).
    newest_ms: Option<i64>,
    /// Why reading stops at `len` in a segment that is not the last one (damage).
    damaged: Option<String>,
}

/// What the appender and the readers share.
#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    segments: BTreeMap<u64, Segment>,
    /// Sum of the segments' `len`.
    bytes: u64,
    /// Files written since the last sync.
    unsynced: Vec<Arc<File>>,
    /// A segment was created since the last sync: the directory needs one too.
    dir_unsynced: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (every update is a few
        // assignments): go on with it.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A chunk closed by [`CHUNK_MAX_BYTES`] or by a seal, with what the index needs of it.
#[derive(Debug, Default)]
struct Buffer {
    /// The postcard encodings of the entries, back to back.
    encoded: Vec<u8>,
    entries: usize,
    newest_ms: Option<i64>,
    /// Dedup keys of the messages among the entries.
    keys: Vec<([u8; 4], u64)>,
}

/// The appending half of the journal. Owned by [`run_writer`].
#[derive(Debug)]
pub struct Journal {
    shared: Arc<Shared>,
    /// The last segment, open for appends (`None` until the first seal of a new journal).
    active: Option<Arc<File>>,
    segment_bytes: u64,
    last_seq: u64,
    /// The unsealed entries: seqs `last_seq - buffer.entries + 1 ..= last_seq`. At most
    /// [`CHUNK_MAX_BYTES`] unless it holds a single larger entry.
    buffer: Buffer,
    /// Chunks closed by [`CHUNK_MAX_BYTES`] since the last seal, not yet written:
    /// `(first seq, chunk)`. They are written with the rest at the next seal, in one write.
    closed: Vec<(u64, Buffer)>,
    /// Per `(source, pkid)` the hash of the message last journaled under it (sealed or
    /// not).
    dedup: HashMap<[u8; 4], u64>,
}

impl Journal {
    /// Opens the journal of `store` with [`SEGMENT_MAX_BYTES`] segments.
    pub fn open(store: &Store) -> Result<Journal, JournalError> {
        Journal::open_with(store, SEGMENT_MAX_BYTES)
    }

    /// Opens the journal in `store`'s directory: migrates a journal of an older build out of
    /// sled, reads every segment (checksums, dedup keys, the last seq, sizes), cuts a torn
    /// tail off the last one. New segments are started once the active one has
    /// `segment_bytes` ([`segment_bytes`]).
    pub fn open_with(store: &Store, segment_bytes: u64) -> Result<Journal, JournalError> {
        let dir = store.dir().join(JOURNAL_DIR);
        fs::create_dir_all(&dir).map_err(JournalError::io("create", &dir))?;
        // A journal trimmed empty must not restart at 1 below the snapshot position: the
        // processor reads after that position and would never see the new entries.
        let snapshot_position = match store.load_snapshot() {
            Ok(snapshot) => snapshot.map_or(0, |(position, _)| position),
            Err(error) => {
                tracing::warn!(%error, "snapshot unreadable; journal continues after its last entry");
                0
            }
        };
        let mut listed = segment::list(&dir).map_err(JournalError::io("list", &dir))?;
        if listed.is_empty() {
            if migrate_from_sled(store, &dir, snapshot_position)? {
                listed = segment::list(&dir).map_err(JournalError::io("list", &dir))?;
            }
        } else {
            clear_sled_journal(store)?;
        }
        let mut dedup = HashMap::new();
        let mut state = State::default();
        let count = listed.len();
        for (i, (first, path)) in listed.into_iter().enumerate() {
            let is_last = i + 1 == count;
            let segment = scan(first, path, is_last, &mut dedup)?;
            if is_last && segment.len == 0 {
                // Created, then nothing whole written to it: it would be named after a seq
                // that the next append may not have.
                fs::remove_file(&segment.path)
                    .map_err(JournalError::io("remove", &segment.path))?;
                continue;
            }
            state.bytes += segment.len;
            state.segments.insert(first, segment);
        }
        let last_entry = state.segments.values().filter_map(|s| s.last).max().unwrap_or(0);
        let last_seq = last_entry.max(snapshot_position);
        let active = match state.segments.values().next_back() {
            Some(segment) => Some(Arc::new(
                OpenOptions::new()
                    .append(true)
                    .open(&segment.path)
                    .map_err(JournalError::io("open for appending", &segment.path))?,
            )),
            None => None,
        };
        tracing::debug!(
            last_seq,
            bytes = state.bytes,
            segments = state.segments.len(),
            dedup_keys = dedup.len(),
            "journal opened"
        );
        Ok(Journal {
            shared: Arc::new(Shared { dir, state: Mutex::new(state) }),
            active,
            segment_bytes: segment_bytes.max(1),
            last_seq,
            buffer: Buffer::default(),
            closed: Vec::new(),
            dedup,
        })
    }

    /// Appends `entry` to the in-memory buffer and returns its sequence number. Invisible to
    /// readers until [`Journal::seal`], NOT durable until the [`JournalSync::sync`] after
    /// that. If the buffer would pass [`CHUNK_MAX_BYTES`], it is closed as a chunk first.
    pub fn append(&mut self, entry: &Entry) -> Result<u64, JournalError> {
        let seq = self.last_seq + 1;
        let before = self.buffer.encoded.len();
        postcard::to_io(entry, &mut self.buffer.encoded)
            .map_err(|source| JournalError::Encode { seq, source })?;
        let size = self.buffer.encoded.len() - before;
        if self.buffer.entries > 0 && before + size > CHUNK_MAX_BYTES {
            // Move the new encoding into a fresh buffer; close the old one without it.
            let encoded = self.buffer.encoded.split_off(before);
            let first = self.last_seq + 1 - self.buffer.entries as u64;
            let full = std::mem::replace(&mut self.buffer, Buffer { encoded, ..Buffer::default() });
            self.closed.push((first, full));
        }
        self.buffer.entries += 1;
        let time = entry_time_ms(entry);
        self.buffer.newest_ms = Some(self.buffer.newest_ms.map_or(time, |t| t.max(time)));
        self.last_seq = seq;
        Ok(seq)
    }

    /// Records that the entry appended last is the message `(source, pkid)` with `hash`:
    /// written with it, and answered by [`Journal::journaled_hash`] from now on.
    pub fn remember(&mut self, key: [u8; 4], hash: u64) {
        self.buffer.keys.push((key, hash));
        self.dedup.insert(key, hash);
    }

    /// The hash of the message last journaled (appended, sealed or not) under `key`.
    pub fn journaled_hash(&self, key: [u8; 4]) -> Option<u64> {
        self.dedup.get(&key).copied()
    }

    /// Writes the buffered entries to the active segment, one record per chunk, in one write
    /// (nothing when the buffer is empty); starts a new segment first when the active one
    /// is full. NOT durable until [`JournalSync::sync`]: call it before every sync that
    /// should make the appended entries durable.
    pub fn seal(&mut self) -> Result<(), JournalError> {
        if self.buffer.entries > 0 {
            let first = self.last_seq + 1 - self.buffer.entries as u64;
            self.closed.push((first, std::mem::take(&mut self.buffer)));
        }
        let Some(first) = self.closed.first().map(|(first, _)| *first) else {
            return Ok(());
        };
        let mut bytes = Vec::new();
        let mut entries = 0u64;
        let mut newest: Option<i64> = None;
        for (first, chunk) in &self.closed {
            let mut value = postcard::to_extend(&(chunk.entries as u64), vec![CHUNK_VERSION])
                .map_err(|source| JournalError::Encode { seq: *first, source })?;
            value.extend_from_slice(&chunk.encoded);
            segment::encode(&mut bytes, *first, &chunk.keys, &value);
            entries += chunk.entries as u64;
            newest = newest.max(chunk.newest_ms);
        }
        self.write(first, &bytes, entries, newest)?;
        self.closed.clear();
        Ok(())
    }

    /// Appends `bytes` (whole records, entries `first..`) to the active segment, or to a new
    /// one, and updates the index.
    fn write(
        &mut self,
        first: u64,
        bytes: &[u8],
        entries: u64,
        newest_ms: Option<i64>,
    ) -> Result<(), JournalError> {
        let shared = Arc::clone(&self.shared);
        let mut state = shared.lock();
        let full = state.segments.values().next_back().is_none_or(|s| s.len >= self.segment_bytes);
        if full || self.active.is_none() {
            let path = segment::path(&shared.dir, first);
            let file = OpenOptions::new()
                .append(true)
                .create_new(true)
                .open(&path)
                .map_err(JournalError::io("create segment", &path))?;
            let file = Arc::new(file);
            state.segments.insert(
                first,
                Segment {
                    first,
                    path,
                    len: 0,
                    entries: 0,
                    last: None,
                    newest_ms: None,
                    damaged: None,
                },
            );
            state.dir_unsynced = true;
            self.active = Some(file);
        }
        let file = self.active.clone().unwrap_or_else(|| unreachable!("set above"));
        let segment = state.segments.values_mut().next_back().unwrap_or_else(|| unreachable!());
        if let Err(error) = (&*file).write_all(bytes) {
            // Cut what part of it was written, so that a later write does not follow a torn
            // record (best effort: the writer stops on this error, and open cuts it anyway).
            let _ = file.set_len(segment.len);
            return Err(JournalError::Io {
                context: "write",
                path: segment.path.clone(),
                source: error,
            });
        }
        segment.len += bytes.len() as u64;
        segment.entries += entries;
        segment.last = Some(first + entries - 1);
        segment.newest_ms = segment.newest_ms.max(newest_ms);
        state.bytes += bytes.len() as u64;
        if !state.unsynced.iter().any(|f| Arc::ptr_eq(f, &file)) {
            state.unsynced.push(file);
        }
        Ok(())
    }

    /// Seals and syncs: a blocking convenience for tools and tests (the writer syncs off the
    /// runtime through [`Journal::syncer`]).
    pub fn commit(&mut self) -> Result<(), JournalError> {
        self.seal()?;
        self.syncer().sync()
    }

    /// The last appended sequence number (sealed or not); 0 when nothing was ever appended.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// A reader over this journal.
    pub fn reader(&self) -> JournalReader {
        JournalReader { shared: Arc::clone(&self.shared) }
    }

    /// A handle that makes the sealed entries durable, usable from a blocking task.
    pub fn syncer(&self) -> JournalSync {
        JournalSync { shared: Arc::clone(&self.shared) }
    }
}

/// Makes what [`Journal::seal`] wrote durable.
#[derive(Clone, Debug)]
pub struct JournalSync {
    shared: Arc<Shared>,
}

impl JournalSync {
    /// `fdatasync` of every segment written since the last sync, and of the directory if a
    /// segment was created. Blocking: call it from `spawn_blocking`. On failure the same
    /// files are synced again by the next call.
    pub fn sync(&self) -> Result<(), JournalError> {
        let (files, dir) = {
            let mut state = self.shared.lock();
            (std::mem::take(&mut state.unsynced), std::mem::take(&mut state.dir_unsynced))
        };
        let dir_path = &self.shared.dir;
        let synced = files
            .iter()
            .try_for_each(|file| file.sync_data().map_err(JournalError::io("sync", dir_path)))
            .and_then(|()| {
                if dir {
                    File::open(dir_path)
                        .and_then(|d| d.sync_all())
                        .map_err(JournalError::io("sync", dir_path))?;
                }
                Ok(())
            });
        if synced.is_err() {
            let mut state = self.shared.lock();
            let later = std::mem::replace(&mut state.unsynced, files);
            for file in later {
                if !state.unsynced.iter().any(|f| Arc::ptr_eq(f, &file)) {
                    state.unsynced.push(file);
                }
            }
            state.dir_unsynced |= dir;
        }
        synced
    }
}

/// One series' recent values from the journal ([`JournalReader::history`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct History {
    /// The series.
    pub series: String,
    /// `[ts_ms, value]`, oldest first (journal order: a late event stays where it arrived).
    pub points: Vec<(i64, f64)>,
    /// Journal entries looked at (a corrupt record counts as one).
    pub scanned: usize,
    /// Whether older entries were left unscanned (a limit was reached).
    pub truncated: bool,
}

/// The reading half: replay after a snapshot position, and trimming behind it.
#[derive(Clone, Debug)]
pub struct JournalReader {
    shared: Arc<Shared>,
}

impl JournalReader {
    /// Entries with seq > `after`, in order: from the segment that holds `after + 1`,
    /// skipping its entries up to `after`, then every later segment. A record that does not
    /// decode, or the damaged rest of a segment, is one `Err` item (the caller logs and skips
    /// it); iteration goes on after it. Sealed entries only.
    pub fn read_after(
        &self,
        after: u64,
    ) -> impl Iterator<Item = Result<(u64, Entry), JournalError>> + use<> {
        let segments = match after.checked_add(1) {
            // Nothing follows u64::MAX.
            None => VecDeque::new(),
            Some(next) => {
                let state = self.shared.lock();
                let start =
                    state.segments.range(..=next).next_back().map_or(0, |(first, _)| *first);
                state.segments.range(start..).map(|(_, s)| s.clone()).collect()
            }
        };
        Entries { after, segments, reading: None, queue: Vec::new().into_iter() }
    }

    /// The last values of `series` still in the journal, oldest first: scans back from the
    /// newest entry over at most `max_scan` entries and keeps at most `max_points` values
    /// (the newest). Corrupt records count as one entry each. Bounded work for the API's
    /// history view; `truncated` tells that the scan stopped before the journal's start.
    pub fn history(
        &self,
        series: &str,
        max_scan: usize,
        max_points: usize,
    ) -> Result<History, JournalError> {
        let segments: Vec<Segment> = self.shared.lock().segments.values().cloned().collect();
        let mut points = Vec::new();
        let mut scanned = 0;
        let mut truncated = false;
        'segments: for segment in segments.into_iter().rev() {
            // A segment's records can only be read forwards: collect its entries' matches
            // (`Some` for a point of this series), then walk them backwards.
            let mut items: Vec<Option<(i64, f64)>> = Vec::new();
            let Some(mut reader) = SegmentReader::open(&segment.path, segment.len)
                .map_err(JournalError::io("read", &segment.path))?
            else {
                continue;
            };
            loop {
                match reader.next().map_err(JournalError::io("read", &segment.path))? {
                    Next::Record { body, .. } => match decode_chunk(body.first(), body.chunk()) {
                        Ok(chunk) => items.extend(chunk.entries.into_iter().map(|e| match e {
                            Entry::Event(event) if event.series == series => {
                                Some((event.ts_ms, event.value))
                            }
                            _ => None,
                        })),
                        Err(_) => items.push(None),
                    },
                    Next::End => break,
                    Next::Bad(_) => {
                        items.push(None);
                        break;
                    }
                }
            }
            if segment.damaged.is_some() {
                items.push(None);
            }
            for item in items.into_iter().rev() {
                if scanned == max_scan || points.len() == max_points {
                    truncated = true;
                    break 'segments;
                }
                scanned += 1;
                points.extend(item);
            }
        }
        points.reverse();
        Ok(History { series: series.to_string(), points, scanned, truncated })
    }

    /// Deletes whole segments, oldest first, that the snapshot covers (every entry before
    /// the next segment's first seq is <= `snapshot_position`), while their newest entry is
    /// older than `cfg.max_age` (by `Event.received_ms` / `Tick.now_ms` against `now_ms`)
    /// or the journal is over `cfg.max_bytes`. Stops at the first segment that is neither,
    /// or that may hold an entry after the snapshot, and never deletes the last (active)
    /// segment, so the journal stays one contiguous range and the replay input stays.
    /// Returns how many entries were removed.
    ///
    /// The receive time, not the event time, ages an entry: event times come from devices
    /// and may be anything. A damaged segment behind the snapshot is deleted too (it can
    /// never be replayed and would otherwise stop trimming for good).
    pub fn trim(
        &self,
        snapshot_position: u64,
        cfg: &JournalConfig,
        now_ms: i64,
    ) -> Result<u64, JournalError> {
        let max_age_ms = i64::try_from(cfg.max_age.as_millis()).unwrap_or(i64::MAX);
        let cutoff = now_ms.saturating_sub(max_age_ms);
        let max_bytes = cfg.max_bytes.bytes();
        let mut state = self.shared.lock();
        let firsts: Vec<u64> = state.segments.keys().copied().collect();
        let mut removed = 0u64;
        for pair in firsts.windows(2) {
            let (first, next) = (pair[0], pair[1]);
            if next - 1 > snapshot_position {
                break;
            }
            let segment = &state.segments[&first];
            let expired = segment.newest_ms.is_none_or(|newest| newest < cutoff);
            if !expired && state.bytes <= max_bytes {
                break;
            }
            match fs::remove_file(&segment.path) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(JournalError::Io {
                        context: "delete",
                        path: segment.path.clone(),
                        source,
                    });
                }
            }
            if let Some(reason) = &segment.damaged {
                tracing::warn!(path = %segment.path.display(), %reason, "deleted a damaged journal segment behind the snapshot");
            }
            removed += segment.entries;
            state.bytes -= segment.len;
            state.segments.remove(&first);
        }
        drop(state);
        if removed > 0 {
            tracing::debug!(removed, bytes = self.bytes(), "journal trimmed");
        }
        Ok(removed)
    }

    /// Bytes of the journal's segment files (whole records), as counted since open.
    pub fn bytes(&self) -> u64 {
        self.shared.lock().bytes
    }

    /// The journal's segment files, oldest first.
    pub fn segment_paths(&self) -> Vec<PathBuf> {
        self.shared.lock().segments.values().map(|s| s.path.clone()).collect()
    }
}

/// The iterator of [`JournalReader::read_after`].
struct Entries {
    after: u64,
    segments: VecDeque<Segment>,
    /// The segment being read.
    reading: Option<(Segment, SegmentReader)>,
    /// Decoded entries of the current record not yet returned.
    queue: std::vec::IntoIter<Result<(u64, Entry), JournalError>>,
}

impl Iterator for Entries {
    type Item = Result<(u64, Entry), JournalError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(item) = self.queue.next() {
                return Some(item);
            }
            let Some((segment, reader)) = &mut self.reading else {
                let segment = self.segments.pop_front()?;
                match SegmentReader::open(&segment.path, segment.len) {
                    Ok(Some(reader)) => self.reading = Some((segment, reader)),
                    // Trimmed since: it was behind every snapshot.
                    Ok(None) => {}
                    Err(source) => {
                        return Some(Err(JournalError::Io {
                            context: "read",
                            path: segment.path,
                            source,
                        }));
                    }
                }
                continue;
            };
            let found = match reader.next() {
                Ok(found) => found,
                Err(source) => {
                    let path = segment.path.clone();
                    self.reading = None;
                    return Some(Err(JournalError::Io { context: "read", path, source }));
                }
            };
            match found {
                Next::Record { body, .. } => {
                    self.queue = entries_after(body.first(), body.chunk(), self.after).into_iter();
                }
                Next::End => {
                    let damaged = segment.damaged.take().map(|reason| {
                        let seq = segment.last.map_or(segment.first, |last| last + 1);
                        JournalError::Corrupt { seq, reason }
                    });
                    self.reading = None;
                    if let Some(error) = damaged {
                        return Some(Err(error));
                    }
                }
                Next::Bad(reason) => {
                    // Changed on disk since it was scanned: report it, go on with the next.
                    let seq = segment.first;
                    self.reading = None;
                    return Some(Err(JournalError::Corrupt { seq, reason }));
                }
            }
        }
    }
}

/// Reads one segment at open: its records' checksums, entries and dedup keys (into
/// `dedup`, later records winning). A bad record ends the readable part; in the last
/// segment it is a torn write and the file is cut there, elsewhere it is damage, kept on
/// disk and reported by readers.
fn scan(
    first: u64,
    path: PathBuf,
    is_last: bool,
    dedup: &mut HashMap<[u8; 4], u64>,
) -> Result<Segment, JournalError> {
    let size = fs::metadata(&path).map_err(JournalError::io("read", &path))?.len();
    let mut segment =
        Segment { first, path, len: 0, entries: 0, last: None, newest_ms: None, damaged: None };
    let Some(mut reader) = SegmentReader::open(&segment.path, size)
        .map_err(JournalError::io("read", &segment.path))?
    else {
        return Ok(segment);
    };
    loop {
        match reader.next().map_err(JournalError::io("read", &segment.path))? {
            Next::Record { body, len } => {
                dedup.extend(body.keys());
                segment.len += len;
                match decode_chunk(body.first(), body.chunk()) {
                    Ok(chunk) => {
                        segment.entries += chunk.entries.len() as u64;
                        segment.last = segment.last.max(Some(chunk.last()));
                        let newest = chunk.entries.iter().map(entry_time_ms).max();
                        segment.newest_ms = segment.newest_ms.max(newest);
                    }
                    Err(error) => {
                        // Its seqs must not be given again: count them from the chunk's
                        // length prefix if that much is readable, else from its first seq.
                        let n = match body.chunk().split_first() {
                            Some((_, rest)) => {
                                postcard::take_from_bytes::<u64>(rest).map_or(1, |(n, _)| n.max(1))
                            }
                            None => 0,
                        };
                        if n > 0 {
                            let last = body.first().saturating_add(n - 1);
                            segment.last = segment.last.max(Some(last));
                        }
                        tracing::warn!(%error, "a journal record does not decode");
                    }
                }
            }
            Next::End => break,
            Next::Bad(reason) if is_last => {
                tracing::warn!(
                    path = %segment.path.display(),
                    offset = segment.len,
                    cut = size - segment.len,
                    %reason,
                    "cutting the journal's torn tail (written, never synced: not acknowledged, not processed)"
                );
                let file = OpenOptions::new()
                    .write(true)
                    .open(&segment.path)
                    .map_err(JournalError::io("open to cut", &segment.path))?;
                file.set_len(segment.len).map_err(JournalError::io("cut", &segment.path))?;
                file.sync_all().map_err(JournalError::io("sync", &segment.path))?;
                break;
            }
            Next::Bad(reason) => {
                tracing::error!(
                    path = %segment.path.display(),
                    offset = segment.len,
                    %reason,
                    "a journal segment is damaged; the rest of it is skipped"
                );
                segment.damaged = Some(reason);
                break;
            }
        }
    }
    Ok(segment)
}

/// Moves a journal of an older build out of sled's `journal` and `dedup` trees into one
/// segment. Returns whether it wrote one.
fn migrate_from_sled(
    store: &Store,
    dir: &Path,
    snapshot_position: u64,
) -> Result<bool, JournalError> {
    let tree = store.db().open_tree(TREE_JOURNAL).map_err(JournalError::sled("open tree"))?;
    let dedup = store.db().open_tree(TREE_DEDUP).map_err(JournalError::sled("open dedup"))?;
    if tree.is_empty() && dedup.is_empty() {
        return Ok(false);
    }
    let mut keys = Vec::new();
    for item in dedup.iter() {
        let (key, hash) = item.map_err(JournalError::sled("read dedup"))?;
        if let (Ok(key), Ok(hash)) =
            (<[u8; 4]>::try_from(key.as_ref()), <[u8; 8]>::try_from(hash.as_ref()))
        {
            keys.push((key, u64::from_be_bytes(hash)));
        }
    }
    let mut bytes = Vec::new();
    let mut first_seq = None;
    let mut chunks = 0usize;
    for item in tree.iter() {
        let (key, value) = item.map_err(JournalError::sled("read"))?;
        let chunk = match decode_sled_value(&key, &value) {
            Ok(chunk) => chunk,
            Err(error) => {
                tracing::warn!(%error, "skipping a journal chunk that does not decode while moving it out of sled");
                continue;
            }
        };
        let value = postcard::to_extend(&chunk.entries, vec![CHUNK_VERSION])
            .map_err(|source| JournalError::Encode { seq: chunk.first, source })?;
        if first_seq.is_none() {
            first_seq = Some(chunk.first);
            // The keys first: their entries are durable already, and later records win.
            segment::encode(&mut bytes, chunk.first, &keys, b"");
        }
        segment::encode(&mut bytes, chunk.first, &[], &value);
        chunks += 1;
    }
    let first = match first_seq {
        Some(first) => first,
        None => {
            let first = snapshot_position + 1;
            segment::encode(&mut bytes, first, &keys, b"");
            first
        }
    };
    let path = segment::path(dir, first);
    let tmp = path.with_extension("tmp");
    let written = File::create(&tmp)
        .and_then(|mut file| {
            file.write_all(&bytes)?;
            file.sync_all()
        })
        .and_then(|()| fs::rename(&tmp, &path))
        .and_then(|()| File::open(dir)?.sync_all());
    written.map_err(JournalError::io("write the migrated journal", &path))?;
    tracing::info!(
        chunks,
        dedup_keys = keys.len(),
        path = %path.display(),
        "moved the journal out of sled into a segment file"
    );
    clear_sled_journal(store)?;
    Ok(true)
}

/// Empties the sled trees of the old journal (after a migration, also one that crashed
/// after writing the segment).
fn clear_sled_journal(store: &Store) -> Result<(), JournalError> {
    let mut cleared = false;
    for name in [TREE_JOURNAL, TREE_DEDUP] {
        let tree = store.db().open_tree(name).map_err(JournalError::sled("open tree"))?;
        if !tree.is_empty() {
            tree.clear().map_err(JournalError::sled("clear the old journal"))?;
            cleared = true;
        }
    }
    if cleared {
        store.flush()?;
    }
    Ok(())
}
/// The group-commit writer task, the journal's only appender.
///
/// - Receives a batch with `recv_many` (up to `cfg.commit_max_entries`). For each
///   [`Ingest`]: a DUP redelivery whose `(source, pkid)` was journaled with the
///   same hash is not appended but still acknowledged after this commit
///   (`metrics.redeliveries_dropped`); otherwise the event is appended as
///   [`Entry::Event`] (`metrics.events_in`) and, for QoS 1 messages, its dedup key goes
///   into the same record ([`Journal::remember`]; a redelivery later in the same commit
///   sees it too).
/// - Appends [`Entry::Tick`] every `cfg.tick_interval`, also when idle.
/// - Commits at least `cfg.commit_interval` apart, and when no acknowledgement waits, only
///   once the oldest pending item is `cfg.commit_max_delay` old (`Pending::due`): a QoS 0,
///   serial or idle load costs a few fsyncs per second, not one per `commit_interval`.
///   A commit seals the appended entries (one record), then syncs them (one
///   [`JournalSync::sync`] in `spawn_blocking`); on success sends the acks in receive order, updates `journal_durable_seq` and
///   `journal_commits`, and hands the committed entries to `to_processor` (awaited: this is
///   the backpressure). A sync error is logged and retried with backoff; nothing is acked
///   before a successful sync.
/// - Returns after a final commit once `rx` is closed and drained; dropping `to_processor`
///   then tells the processor to finish.
///
/// There is no cancellation arm on purpose: the writer stops when every source has stopped
/// (the channel closes), so the events those sources accepted are always committed first.
pub async fn run_writer(
    journal: Journal,
    cfg: JournalConfig,
    rx: mpsc::Receiver<Ingest>,
    to_processor: mpsc::Sender<Vec<(u64, Entry)>>,
    metrics: Arc<Metrics>,
) -> Result<(), JournalError> {
    let syncer = journal.syncer();
    run_writer_with(journal, cfg, rx, to_processor, metrics, move || syncer.sync()).await
}

/// What the writer has appended (or dropped) since the last commit.
#[derive(Debug, Default)]
struct Pending {
    /// Entries for the processor, in sequence order.
    entries: Vec<(u64, Entry)>,
    /// Acks in receive order.
    acks: Vec<Ack>,
    /// Ingests and ticks taken in; a commit is due when this is non-zero.
    items: usize,
    /// When the first of `items` was taken in.
    since: Option<Instant>,
}

impl Pending {
    fn take_in(&mut self) {
        self.items += 1;
        self.since.get_or_insert_with(Instant::now);
    }

    /// When the pending items must be committed: `commit_interval` after the last commit if
    /// an acknowledgement waits for it (QoS 1), else `commit_max_delay` after the oldest item
    /// came in (and never sooner than `commit_interval` after the last commit).
    fn due(&self, last_commit: Option<Instant>, cfg: &JournalConfig) -> Instant {
        let spaced = last_commit.map_or_else(Instant::now, |at| at + cfg.commit_interval);
        if !self.acks.is_empty() {
            return spaced;
        }
        let oldest = self.since.unwrap_or_else(Instant::now);
        spaced.max(oldest + cfg.commit_max_delay)
    }
}

/// Most messages the writer takes from its channel at once.
const RECEIVE_RUN: usize = 256;

/// [`run_writer`] with the sync injected, so tests can make it fail.
async fn run_writer_with<F>(
    mut journal: Journal,
    cfg: JournalConfig,
    mut rx: mpsc::Receiver<Ingest>,
    to_processor: mpsc::Sender<Vec<(u64, Entry)>>,
    metrics: Arc<Metrics>,
    flush: F,
) -> Result<(), JournalError>
where
    F: Fn() -> Result<(), JournalError> + Clone + Send + 'static,
{
    let max_items = cfg.commit_max_entries.max(1);
    let tick_every = cfg.tick_interval.max(MIN_TICK);
    // The first tick comes one interval after start, not at once: the processor gets its
    // first clock reading from the first event or tick, both equally fresh.
    let mut ticks = tokio::time::interval_at(Instant::now() + tick_every, tick_every);
    // After a long flush stall one tick is enough; a burst of catch-up ticks says nothing new.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut pending = Pending::default();
    // Received in runs of at most RECEIVE_RUN (a commit still gathers up to `max_items`): a
    // buffer of `commit_max_entries` items (4,096 x ~150 B) stayed allocated for good.
    let mut buf = Vec::with_capacity(RECEIVE_RUN.min(max_items));
    let mut last_commit: Option<Instant> = None;
    let mut open = true;

    loop {
        let due = pending.due(last_commit, &cfg);
        if pending.items > 0 && (!open || pending.items >= max_items || Instant::now() >= due) {
            commit(&flush, &mut journal, &mut pending, &to_processor, &metrics).await?;
            last_commit = Some(Instant::now());
            continue;
        }
        if !open {
            // Closed, drained and committed.
            return Ok(());
        }
        tokio::select! {
            received = rx.recv_many(&mut buf, (max_items - pending.items).min(RECEIVE_RUN)) => {
                if received == 0 {
                    open = false;
                }
                for ingest in buf.drain(..) {
                    accept(&mut journal, ingest, &mut pending, &metrics)?;
                }
            }
            _ = ticks.tick() => {
                let entry = Entry::Tick { now_ms: event::now_ms() };
                let seq = journal.append(&entry)?;
                pending.entries.push((seq, entry));
                pending.take_in();
            }
            _ = tokio::time::sleep_until(due), if pending.items > 0 => {}
        }
    }
}

/// Takes one ingest into the pending commit.
fn accept(
    journal: &mut Journal,
    ingest: Ingest,
    pending: &mut Pending,
    metrics: &Metrics,
) -> Result<(), JournalError> {
    let Ingest { event, ack, redelivery } = ingest;
    pending.take_in();
    if let Some(redelivery) = redelivery
        && redelivery.dup
        && journal.journaled_hash(dedup_key(&redelivery)) == Some(redelivery.hash)
    {
        // Already journaled (maybe in this very commit): ack again after this commit's
        // flush, because the original may not be durable yet.
        Metrics::add(&metrics.redeliveries_dropped, 1);
        pending.acks.extend(ack);
        return Ok(());
    }
    if let Some(event) = event {
        let entry = Entry::Event(event);
        let seq = journal.append(&entry)?;
        pending.entries.push((seq, entry));
        Metrics::add(&metrics.events_in, 1);
        if let Some(redelivery) = redelivery {
            // In the same record as the entry: see the module docs.
            journal.remember(dedup_key(&redelivery), redelivery.hash);
        }
    }
    pending.acks.extend(ack);
    Ok(())
}

/// Seals the appended entries, syncs them (retrying a few times), then acks and hands the
/// entries over.
async fn commit<F>(
    flush: &F,
    journal: &mut Journal,
    pending: &mut Pending,
    to_processor: &mpsc::Sender<Vec<(u64, Entry)>>,
    metrics: &Metrics,
) -> Result<(), JournalError>
where
    F: Fn() -> Result<(), JournalError> + Clone + Send + 'static,
{
    journal.seal()?;
    let mut delay = FLUSH_RETRY_MIN;
    let mut attempts = 0;
    loop {
        attempts += 1;
        match tokio::task::spawn_blocking(flush.clone()).await {
            Ok(Ok(())) => {
                metrics.journal_flush_failing.store(0, Ordering::Relaxed);
                break;
            }
            Ok(Err(error)) => {
                Metrics::add(&metrics.journal_flush_failures, 1);
                metrics.journal_flush_failing.store(1, Ordering::Relaxed);
                if attempts >= FLUSH_ATTEMPTS {
                    return Err(JournalError::FlushFailing { attempts, source: Box::new(error) });
                }
                tracing::error!(
                    %error,
                    retry_in = ?delay,
                    waiting_acks = pending.acks.len(),
                    "journal sync failed; acks wait for a successful sync"
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(FLUSH_RETRY_MAX);
            }
            Err(source) => return Err(JournalError::Flusher { source }),
        }
    }
    for ack in pending.acks.drain(..) {
        ack.send();
    }
    pending.items = 0;
    pending.since = None;
    metrics.journal_durable_seq.store(journal.last_seq(), Ordering::Relaxed);
    Metrics::add(&metrics.journal_commits, 1);
    let now = u64::try_from(crate::event::now_ms()).unwrap_or(0);
    metrics.journal_last_commit_ms.store(now, Ordering::Relaxed);
    if !pending.entries.is_empty() {
        let entries = std::mem::take(&mut pending.entries);
        to_processor
            .send(entries)
            .await
            .map_err(|unsent| JournalError::ProcessorClosed { entries: unsent.0.len() })?;
    }
    Ok(())
}

fn dedup_key(redelivery: &Redelivery) -> [u8; 4] {
    let [s0, s1] = redelivery.source.to_be_bytes();
    let [p0, p1] = redelivery.pkid.to_be_bytes();
    [s0, s1, p0, p1]
}

/// The time that ages an entry for trimming.
fn entry_time_ms(entry: &Entry) -> i64 {
    match entry {
        Entry::Event(event) => event.received_ms,
        Entry::Tick { now_ms } => *now_ms,
    }
}

/// One decoded chunk: entries `first ..= last()`.
struct Chunk {
    first: u64,
    entries: Vec<Entry>,
}

impl Chunk {
    fn last(&self) -> u64 {
        self.first + (self.entries.len() as u64).saturating_sub(1)
    }
}

/// Decodes a chunk (version 2) starting at `first`; an empty chunk (a record of keys only)
/// has no entries.
fn decode_chunk(first: u64, value: &[u8]) -> Result<Chunk, JournalError> {
    let corrupt = |reason: String| JournalError::Corrupt { seq: first, reason };
    let entries = match value.split_first() {
        None => Vec::new(),
        Some((&CHUNK_VERSION, body)) => {
            postcard::from_bytes::<Vec<Entry>>(body).map_err(|e| corrupt(e.to_string()))?
        }
        Some((version, _)) => return Err(corrupt(format!("unknown version {version}"))),
    };
    if first.checked_add(entries.len() as u64).is_none() {
        return Err(corrupt(format!("{} entries run past the last seq", entries.len())));
    }
    Ok(Chunk { first, entries })
}

/// Decodes a sled value of an older build: a chunk (version 2) or a one-entry value
/// (version 1), keyed by its first seq.
fn decode_sled_value(key: &[u8], value: &[u8]) -> Result<Chunk, JournalError> {
    let first = u64::from_be_bytes(key.try_into().map_err(|_| JournalError::Corrupt {
        seq: 0,
        reason: format!("key of {} bytes instead of 8", key.len()),
    })?);
    let chunk = match value.split_first() {
        Some((&ENTRY_VERSION_V1, body)) => Chunk {
            first,
            entries: vec![
                postcard::from_bytes(body)
                    .map_err(|e| JournalError::Corrupt { seq: first, reason: e.to_string() })?,
            ],
        },
        _ => decode_chunk(first, value)?,
    };
    if chunk.entries.is_empty() {
        return Err(JournalError::Corrupt { seq: first, reason: "a chunk without entries".into() });
    }
    Ok(chunk)
}

/// The entries of one chunk with seq > `after`, in order, or the chunk's error. A chunk
/// entirely at or before `after` is not decoded (its length is the varint up front).
fn entries_after(first: u64, value: &[u8], after: u64) -> Vec<Result<(u64, Entry), JournalError>> {
    if let Some((&CHUNK_VERSION, body)) = value.split_first()
        && let Ok((n, _)) = postcard::take_from_bytes::<u64>(body)
        && first.saturating_add(n) <= after.saturating_add(1)
    {
        return Vec::new();
    }
    match decode_chunk(first, value) {
        Ok(Chunk { first, entries }) => entries
            .into_iter()
            .enumerate()
            .map(|(i, entry)| (first + i as u64, entry))
            .filter(|(seq, _)| *seq > after)
            .map(Ok)
            .collect(),
        Err(error) => vec![Err(error)],
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ByteSize;
    use crate::event::Event;
    use rumqttc::{Publish, QoS};
    use std::sync::atomic::{AtomicU64, AtomicUsize};

    /// Every wait in these tests ends by this deadline instead of hanging.
    const DEADLINE: Duration = Duration::from_secs(10);

    fn open_store(dir: &tempfile::TempDir) -> Store {
        Store::open(&dir.path().join("db"), 1024 * 1024).unwrap().0
    }

    fn event(value: f64, received_ms: i64) -> Event {
        Event { series: "pump-1/temp".into(), ts_ms: received_ms, value, received_ms, source: 0 }
    }

    /// Writer settings for tests: fast commits, no ticks unless a test asks for them.
    fn writer_cfg() -> JournalConfig {
        JournalConfig {
            commit_interval: Duration::from_millis(1),
            tick_interval: Duration::from_secs(3600),
            ..JournalConfig::default()
        }
    }

    fn ingest(
        value: f64,
        acks: &mpsc::UnboundedSender<Publish>,
        pkid: u16,
        redelivery: Option<Redelivery>,
    ) -> Ingest {
        let mut publish = Publish::new("t", QoS::AtLeastOnce, vec![]);
        publish.pkid = pkid;
        Ingest {
            event: Some(event(value, 1_000)),
            ack: Some(Ack::new(acks.clone(), publish)),
            redelivery,
        }
    }

    fn values(entries: &[(u64, Entry)]) -> Vec<f64> {
        entries
            .iter()
            .filter_map(|(_, e)| match e {
                Entry::Event(ev) => Some(ev.value),
                Entry::Tick { .. } => None,
            })
            .collect()
    }

    async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(DEADLINE, fut).await.unwrap_or_else(|_| panic!("timed out: {what}"))
    }

    #[test]
    fn appended_entries_read_back_in_order_after_a_position() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open_store(&tmp);
        let mut journal = Journal::open(&store).unwrap();
        assert_eq!(journal.last_seq(), 0);
        assert_eq!(journal.append(&Entry::Event(event(1.0, 10))).unwrap(), 1);
        assert_eq!(journal.append(&Entry::Tick { now_ms: 20 }).unwrap(), 2);
        assert_eq!(journal.append(&Entry::Event(event(3.0, 30))).unwrap(), 3);
        let reader = journal.reader();
        assert_eq!(reader.read_after(0).count(), 0, "unsealed entries are not visible");
        journal.seal().unwrap();
        let all: Vec<_> = reader.read_after(0).map(Result::unwrap).collect();
        assert_eq!(
            all,
            vec![
                (1, Entry::Event(event(1.0, 10))),
                (2, Entry::Tick { now_ms: 20 }),
                (3, Entry::Event(event(3.0, 30)))
            ]
        );
        let tail: Vec<u64> = reader.read_after(2).map(|r| r.unwrap().0).collect();
        assert_eq!(tail, vec![3]);
        assert_eq!(reader.read_after(u64::MAX).count(), 0);
    }

    #[test]
    fn history_lists_the_newest_values_of_one_series_within_its_limits() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open_store(&tmp);
        let mut journal = Journal::open(&store).unwrap();
        for i in 0..10 {
            journal.append(&Entry::Event(event(i as f64, 1_000 + i))).unwrap();
            let other = Event { series: "pump-2/temp".into(), ..event(-1.0, 1_000 + i) };
            journal.append(&Entry::Event(other)).unwrap();
            journal.append(&Entry::Tick { now_ms: 1_000 + i }).unwrap();
            // Chunks of 3, 6, 9, ... entries: the scan crosses chunk boundaries.
            if i % 2 == 1 {
                journal.seal().unwrap();
            }
        }
        let reader = journal.reader();
        let all = reader.history("pump-1/temp", 1_000, 100).unwrap();
        assert_eq!(
            all.points.iter().map(|p| p.1).collect::<Vec<_>>(),
            [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
        );
        assert_eq!((all.scanned, all.truncated), (30, false));
        let newest = reader.history("pump-1/temp", 1_000, 3).unwrap();
        assert_eq!(newest.points, [(1_007, 7.0), (1_008, 8.0), (1_009, 9.0)]);
        assert!(newest.truncated);
        let scan_limited = reader.history("pump-1/temp", 6, 100).unwrap();
        assert_eq!((scan_limited.points.len(), scan_limited.scanned), (2, 6));
        assert!(reader.history("nope", 1_000, 100).unwrap().points.is_empty());
    }

    #[test]
    fn sequence_numbers_and_bytes_continue_after_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open_store(&tmp);
        let mut journal = Journal::open(&store).unwrap();
        for i in 0..5 {
            journal.append(&Entry::Event(event(f64::from(i), 10))).unwrap();
        }
        assert_eq!(journal.reader().bytes(), 0, "buffered entries are not counted");
        journal.seal().unwrap();
        let bytes = journal.reader().bytes();
        assert!(bytes > 0);
        journal.syncer().sync().unwrap();
        drop((journal, store));

        let store = open_store(&tmp);
        let mut journal = Journal::open(&store).unwrap();
        assert_eq!(journal.last_seq(), 5);
        assert_eq!(journal.reader().bytes(), bytes);
        assert_eq!(journal.append(&Entry::Tick { now_ms: 1 }).unwrap(), 6);
    }

    #[test]
    fn a_journal_behind_the_snapshot_position_continues_after_it() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open_store(&tmp);
        let mut journal = Journal::open(&store).unwrap();
        for _ in 0..3 {
            journal.append(&Entry::Tick { now_ms: 0 }).unwrap();
        }
        journal.commit().unwrap();
        store.save_snapshot(5, b"state").unwrap();
        drop(journal);
        let mut journal = Journal::open(&store).unwrap();
        assert_eq!(journal.last_seq(), 5);
        assert_eq!(journal.append(&Entry::Tick { now_ms: 1 }).unwrap(), 6);
        journal.seal().unwrap();
        assert_eq!(seqs(&journal.reader(), 3), vec![6]);
    }

    /// A record as the tests see it: `(first seq, dedup keys, entries)`.
    type RecordView = (u64, Vec<([u8; 4], u64)>, usize);

    /// The records of the journal's segment files.
    fn records(store: &Store) -> Vec<RecordView> {
        let dir = store.dir().join(JOURNAL_DIR);
        let mut found = Vec::new();
        for (_, path) in segment::list(&dir).unwrap() {
            let len = fs::metadata(&path).unwrap().len();
            let mut reader = SegmentReader::open(&path, len).unwrap().unwrap();
            loop {
                match reader.next().unwrap() {
                    Next::Record { body, .. } => {
                        let entries = decode_chunk(body.first(), body.chunk()).unwrap().entries;
                        found.push((body.first(), body.keys().collect(), entries.len()));
                    }
                    Next::End => break,
                    Next::Bad(reason) => panic!("{}: {reason}", path.display()),
                }
            }
        }
        found
    }

    fn segment_files(store: &Store) -> Vec<PathBuf> {
        segment::list(&store.dir().join(JOURNAL_DIR)).unwrap().into_iter().map(|(_, p)| p).collect()
    }

    /// Commits ticks 1..=3 to a fresh journal of `store` and closes it; returns its one
    /// segment file and the journal's bytes.
    fn three_ticks(store: &Store) -> (PathBuf, u64) {
        let mut journal = Journal::open(store).unwrap();
        for now_ms in 1..=3 {
            journal.append(&Entry::Tick { now_ms }).unwrap();
        }
        journal.commit().unwrap();
        let bytes = journal.reader().bytes();
        drop(journal);
        (segment_files(store).pop().unwrap(), bytes)
    }

    #[test]
    fn a_torn_tail_is_cut_at_open_and_appends_go_on_after_it() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open_store(&tmp);
        // A power cut in the middle of the next record: half of it, or zeroes.
        let (path, bytes) = three_ticks(&store);
        let mut torn = Vec::new();
        segment::encode(
            &mut torn,
            4,
            &[],
            &postcard::to_extend(&vec![Entry::Tick { now_ms: 4 }], vec![CHUNK_VERSION]).unwrap(),
        );
        for tail in [&torn[..torn.len() / 2], &[0u8; 100][..]] {
            let mut file = OpenOptions::new().append(true).open(&path).unwrap();
            file.write_all(tail).unwrap();
            drop(file);
            let mut journal = Journal::open(&store).unwrap();
            assert_eq!(fs::metadata(&path).unwrap().len(), bytes, "the tail was cut");
            assert_eq!((journal.last_seq(), journal.reader().bytes()), (3, bytes));
            assert_eq!(journal.append(&Entry::Tick { now_ms: 9 }).unwrap(), 4);
            journal.commit().unwrap();
            assert_eq!(seqs(&journal.reader(), 0), vec![1, 2, 3, 4]);
            drop(journal);
            // Back to the three entries for the next tail.
            OpenOptions::new().write(true).open(&path).unwrap().set_len(bytes).unwrap();
        }
    }

    #[test]
    fn the_seqs_of_a_last_record_that_does_not_decode_are_not_given_again() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open_store(&tmp);
        let (path, _) = three_ticks(&store);
        // A whole record (its checksum matches) of a version this build does not know,
        // holding two entries (4 and 5) by its length prefix.
        let mut record = Vec::new();
        segment::encode(&mut record, 4, &[], &[9, 2, 0xAA, 0xBB]);
        OpenOptions::new().append(true).open(&path).unwrap().write_all(&record).unwrap();
        let mut journal = Journal::open(&store).unwrap();
        assert_eq!(journal.last_seq(), 5);
        let items: Vec<_> = journal.reader().read_after(3).collect();
        assert!(matches!(items[..], [Err(JournalError::Corrupt { seq: 4, .. })]), "{items:?}");
        assert_eq!(journal.append(&Entry::Tick { now_ms: 6 }).unwrap(), 6);
    }

    #[test]
    fn a_damaged_segment_is_an_error_item_and_reading_goes_on() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open_store(&tmp);
        // One segment per seal: 1..=2, 3..=4, 5..=6.
        let mut journal = Journal::open_with(&store, 1).unwrap();
        for now_ms in 1..=6 {
            journal.append(&Entry::Tick { now_ms }).unwrap();
            if now_ms % 2 == 0 {
                journal.seal().unwrap();
            }
        }
        journal.syncer().sync().unwrap();
        drop(journal);
        let files = segment_files(&store);
        assert_eq!(files.len(), 3);
        let mut bytes = fs::read(&files[1]).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xFF;
        fs::write(&files[1], &bytes).unwrap();

        let journal = Journal::open_with(&store, 1).unwrap();
        let reader = journal.reader();
        let items: Vec<_> = reader.read_after(0).collect();
        assert_eq!(items.len(), 5, "{items:?}");
        assert!(matches!(items[2], Err(JournalError::Corrupt { seq: 3, .. })), "{:?}", items[2]);
        assert_eq!(items[3].as_ref().unwrap(), &(5, Entry::Tick { now_ms: 5 }));
        // From inside the damaged segment: its error, then the next segment.
        let items: Vec<_> = reader.read_after(3).collect();
        assert!(matches!(items[0], Err(JournalError::Corrupt { .. })), "{:?}", items[0]);
        assert_eq!(items.len(), 3);
        let history = reader.history("pump-1/temp", 100, 100).unwrap();
        assert_eq!(history.scanned, 5, "2 ticks, the damaged segment, 2 ticks");
        // The last segment is where new entries go: open continues after it.
        assert_eq!(journal.last_seq(), 6);
        // Behind the snapshot the damaged segment goes like any other.
        let cfg = JournalConfig { max_age: Duration::ZERO, ..JournalConfig::default() };
        assert_eq!(reader.trim(4, &cfg, i64::MAX).unwrap(), 2, "1..=2, and none readable of 3..=4");
        assert_eq!(seqs(&reader, 0), vec![5, 6]);
        assert_eq!(segment_files(&store).len(), 1);
    }

    #[test]
    fn trim_removes_old_entries_but_never_after_the_snapshot() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open_store(&tmp);
        // One segment per seal.
        let mut journal = Journal::open_with(&store, 1).unwrap();
        // Entries received at 1 s, 2 s, ... 10 s.
        for i in 1..=10 {
            journal.append(&Entry::Event(event(f64::from(i), i64::from(i) * 1_000))).unwrap();
            journal.seal().unwrap();
        }
        let reader = journal.reader();
        let before = reader.bytes();
        let cfg = JournalConfig { max_age: Duration::from_secs(5), ..JournalConfig::default() };
        // At 12 s, entries received before 7 s are too old, but the snapshot covers only 4.
        assert_eq!(reader.trim(4, &cfg, 12_000).unwrap(), 4);
        let left: Vec<u64> = reader.read_after(0).map(|r| r.unwrap().0).collect();
        assert_eq!(left, (5..=10).collect::<Vec<_>>());
        // With the snapshot at 10, only the entries older than 7 s go.
        assert_eq!(reader.trim(10, &cfg, 12_000).unwrap(), 2);
        let left: Vec<u64> = reader.read_after(0).map(|r| r.unwrap().0).collect();
        assert_eq!(left, (7..=10).collect::<Vec<_>>());
        assert!(reader.bytes() < before);
        assert_eq!(segment_files(&store).len(), 4, "the files went");
        drop(journal);
        let rescanned = Journal::open(&store).unwrap().reader().bytes();
        assert_eq!(reader.bytes(), rescanned, "the counter matches a scan");
    }

    #[test]
    fn trim_enforces_the_byte_cap_oldest_first() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open_store(&tmp);
        let mut journal = Journal::open_with(&store, 1).unwrap();
        for i in 1..=10 {
            journal.append(&Entry::Event(event(f64::from(i), 1_000))).unwrap();
            journal.seal().unwrap();
        }
        let reader = journal.reader();
        let entry_size = reader.bytes() / 10;
        let cfg = JournalConfig {
            max_bytes: ByteSize(entry_size * 3),
            max_age: Duration::from_secs(3600),
            ..JournalConfig::default()
        };
        assert_eq!(reader.trim(8, &cfg, 2_000).unwrap(), 7);
        let left: Vec<u64> = reader.read_after(0).map(|r| r.unwrap().0).collect();
        assert_eq!(left, vec![8, 9, 10]);
        assert_eq!(reader.bytes(), entry_size * 3);
        // At the cap, not over it: nothing more goes.
        assert_eq!(reader.trim(10, &cfg, 2_000).unwrap(), 0);
    }

    /// A sync that fails `failures` times, then syncs the journal and records the last
    /// journal seq it made durable.
    #[derive(Clone)]
    struct FlakyFlush {
        sync: JournalSync,
        reader: JournalReader,
        failures: usize,
        attempts: Arc<AtomicUsize>,
        durable_seq: Arc<AtomicU64>,
    }

    impl FlakyFlush {
        fn new(journal: &Journal, failures: usize) -> Self {
            FlakyFlush {
                sync: journal.syncer(),
                reader: journal.reader(),
                failures,
                attempts: Arc::default(),
                durable_seq: Arc::default(),
            }
        }

        fn flush(&self) -> Result<(), JournalError> {
            if self.attempts.fetch_add(1, Ordering::SeqCst) < self.failures {
                return Err(JournalError::Corrupt { seq: 0, reason: "injected".into() });
            }
            let last = self.reader.read_after(0).last().map_or(0, |item| item.unwrap().0);
            self.sync.sync()?;
            self.durable_seq.store(last, Ordering::SeqCst);
            Ok(())
        }
    }

    /// A writer task over a fresh store, with both ends of its channels.
    struct WriterRig {
        store: Store,
        metrics: Arc<Metrics>,
        tx: mpsc::Sender<Ingest>,
        processor: mpsc::Receiver<Vec<(u64, Entry)>>,
        ack_tx: mpsc::UnboundedSender<Publish>,
        acks: mpsc::UnboundedReceiver<Publish>,
        writer: tokio::task::JoinHandle<Result<(), JournalError>>,
        _tmp: tempfile::TempDir,
    }

    impl WriterRig {
        /// [`run_writer`] with `cfg`.
        fn start(cfg: JournalConfig) -> WriterRig {
            Self::spawn(cfg, None).0
        }

        /// [`run_writer_with`] a flush that fails `failures` times before it works.
        fn start_flaky(cfg: JournalConfig, failures: usize) -> (WriterRig, FlakyFlush) {
            let (rig, flaky) = Self::spawn(cfg, Some(failures));
            (rig, flaky.unwrap())
        }

        fn spawn(cfg: JournalConfig, failures: Option<usize>) -> (WriterRig, Option<FlakyFlush>) {
            let tmp = tempfile::tempdir().unwrap();
            let store = open_store(&tmp);
            let journal = Journal::open(&store).unwrap();
            let metrics = Arc::new(Metrics::default());
            let (tx, rx) = mpsc::channel(16);
            let (to_processor, processor) = mpsc::channel(16);
            let (ack_tx, acks) = mpsc::unbounded_channel();
            let flaky = failures.map(|n| FlakyFlush::new(&journal, n));
            let m = Arc::clone(&metrics);
            let writer = match flaky.clone() {
                Some(flush) => {
                    tokio::spawn(run_writer_with(journal, cfg, rx, to_processor, m, move || {
                        flush.flush()
                    }))
                }
                None => tokio::spawn(run_writer(journal, cfg, rx, to_processor, m)),
            };
            let rig = WriterRig { store, metrics, tx, processor, ack_tx, acks, writer, _tmp: tmp };
            (rig, flaky)
        }
    }

    #[tokio::test]
    async fn the_writer_acks_only_after_a_successful_flush_and_in_order() {
        let (rig, flaky) = WriterRig::start_flaky(writer_cfg(), 2);
        let WriterRig { metrics, tx, mut processor, ack_tx, mut acks, writer, .. } = rig;
        for pkid in 1..=3 {
            tx.send(ingest(f64::from(pkid), &ack_tx, pkid, None)).await.unwrap();
        }
        for expected in 1..=3u16 {
            let publish = within("ack", acks.recv()).await.unwrap();
            assert_eq!(publish.pkid, expected, "acks come in receive order");
            // The event with this pkid got seq == pkid; it is durable before its ack.
            assert!(flaky.durable_seq.load(Ordering::SeqCst) >= u64::from(expected));
            assert!(flaky.attempts.load(Ordering::SeqCst) >= 3, "two failed flushes come first");
        }
        let mut handed = Vec::new();
        while handed.len() < 3 {
            handed.extend(within("entries", processor.recv()).await.unwrap());
        }
        assert_eq!(handed.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(values(&handed), vec![1.0, 2.0, 3.0]);
        assert_eq!(metrics.events_in.load(Ordering::Relaxed), 3);
        assert_eq!(metrics.journal_durable_seq.load(Ordering::Relaxed), 3);
        assert_eq!(metrics.journal_flush_failures.load(Ordering::Relaxed), 2);
        assert_eq!(metrics.journal_flush_failing.load(Ordering::Relaxed), 0, "healed");
        assert!(metrics.journal_last_commit_ms.load(Ordering::Relaxed) > 0);
        drop(tx);
        within("writer exit", writer).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_flush_that_keeps_failing_stops_the_writer_without_acking() {
        let (rig, broken) = WriterRig::start_flaky(writer_cfg(), usize::MAX);
        let WriterRig { metrics, tx, mut processor, ack_tx, mut acks, writer, _tmp, .. } = rig;
        tx.send(ingest(1.0, &ack_tx, 1, None)).await.unwrap();
        let result = within("writer exit", writer).await.unwrap();
        assert!(
            matches!(result, Err(JournalError::FlushFailing { attempts: FLUSH_ATTEMPTS, .. })),
            "{result:?}"
        );
        assert_eq!(broken.attempts.load(Ordering::SeqCst), FLUSH_ATTEMPTS as usize);
        assert!(acks.try_recv().is_err(), "nothing acknowledged");
        assert!(processor.try_recv().is_err(), "nothing processed");
        assert_eq!(metrics.journal_flush_failing.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn the_writer_drops_a_redelivery_with_the_same_hash_but_journals_a_new_message() {
        let rig = WriterRig::start(writer_cfg());
        let WriterRig { store, metrics, tx, mut processor, ack_tx, mut acks, writer, _tmp } = rig;
        let redelivery = |hash, dup| Some(Redelivery { source: 2, pkid: 7, hash, dup });
        tx.send(ingest(1.0, &ack_tx, 7, redelivery(99, false))).await.unwrap();
        assert_eq!(within("first ack", acks.recv()).await.unwrap().pkid, 7);
        // The broker redelivers the same message (its PUBACK was lost).
        tx.send(ingest(1.0, &ack_tx, 7, redelivery(99, true))).await.unwrap();
        assert_eq!(within("redelivery ack", acks.recv()).await.unwrap().pkid, 7);
        // A new message that happens to reuse the packet id, with the DUP flag set.
        tx.send(ingest(2.0, &ack_tx, 7, redelivery(100, true))).await.unwrap();
        assert_eq!(within("new message ack", acks.recv()).await.unwrap().pkid, 7);
        drop(tx);
        within("writer exit", writer).await.unwrap().unwrap();

        let mut handed = Vec::new();
        while let Some(batch) = processor.recv().await {
            handed.extend(batch);
        }
        assert_eq!(values(&handed), vec![1.0, 2.0]);
        assert_eq!(metrics.redeliveries_dropped.load(Ordering::Relaxed), 1);
        assert_eq!(metrics.events_in.load(Ordering::Relaxed), 2);
        let journaled: Vec<_> =
            Journal::open(&store).unwrap().reader().read_after(0).map(Result::unwrap).collect();
        assert_eq!(values(&journaled), vec![1.0, 2.0]);
    }

    #[tokio::test]
    async fn a_redelivery_in_the_same_batch_as_its_original_is_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open_store(&tmp);
        let journal = Journal::open(&store).unwrap();
        let metrics = Arc::new(Metrics::default());
        let (tx, rx) = mpsc::channel(16);
        let (to_processor, mut processor) = mpsc::channel(16);
        let (ack_tx, mut acks) = mpsc::unbounded_channel();
        let redelivery = |dup| Some(Redelivery { source: 0, pkid: 1, hash: 5, dup });
        // Queued before the writer starts, so one recv_many takes both.
        tx.send(ingest(1.0, &ack_tx, 1, redelivery(false))).await.unwrap();
        tx.send(ingest(1.0, &ack_tx, 1, redelivery(true))).await.unwrap();
        drop(tx);
        run_writer(journal, writer_cfg(), rx, to_processor, Arc::clone(&metrics)).await.unwrap();
        assert_eq!(values(&processor.recv().await.unwrap()), vec![1.0]);
        assert!(processor.recv().await.is_none());
        assert_eq!(acks.recv().await.unwrap().pkid, 1);
        assert_eq!(acks.recv().await.unwrap().pkid, 1);
        assert_eq!(metrics.journal_commits.load(Ordering::Relaxed), 1, "one group commit");
    }

    #[tokio::test]
    async fn the_writer_commits_and_exits_when_its_input_closes() {
        let cfg = JournalConfig { commit_interval: Duration::from_secs(3600), ..writer_cfg() };
        let rig = WriterRig::start(cfg);
        let WriterRig { store, metrics, tx, mut processor, ack_tx, mut acks, writer, _tmp } = rig;
        // The first commit happens at once (nothing was committed before) ...
        tx.send(ingest(1.0, &ack_tx, 1, None)).await.unwrap();
        assert_eq!(within("first ack", acks.recv()).await.unwrap().pkid, 1);
        // ... the second would wait an hour, but closing the input commits it now.
        tx.send(ingest(2.0, &ack_tx, 2, None)).await.unwrap();
        drop(tx);
        within("writer exit", writer).await.unwrap().unwrap();
        assert_eq!(acks.recv().await.unwrap().pkid, 2);
        let mut handed = Vec::new();
        while let Some(batch) = processor.recv().await {
            handed.extend(batch);
        }
        assert_eq!(values(&handed), vec![1.0, 2.0]);
        assert_eq!(metrics.journal_commits.load(Ordering::Relaxed), 2);
        assert_eq!(records(&store).len(), 2, "one record per commit");
    }

    #[tokio::test]
    async fn entries_nobody_acks_wait_for_commit_max_delay_and_an_ack_commits_them_at_once() {
        let cfg = JournalConfig { commit_max_delay: Duration::from_secs(3600), ..writer_cfg() };
        let rig = WriterRig::start(cfg);
        let WriterRig { metrics, tx, mut processor, ack_tx, mut acks, writer, _tmp, .. } = rig;
        // A QoS 0 event: taken in, but not committed (it may wait an hour).
        let unacked = Ingest { event: Some(event(1.0, 1_000)), ack: None, redelivery: None };
        tx.send(unacked).await.unwrap();
        let deadline = Instant::now() + DEADLINE;
        while metrics.events_in.load(Ordering::Relaxed) < 1 {
            assert!(Instant::now() < deadline, "the writer never took the event in");
            tokio::task::yield_now().await;
        }
        // A QoS 1 event: its ack must not wait, so it commits both in one fsync.
        tx.send(ingest(2.0, &ack_tx, 2, None)).await.unwrap();
        assert_eq!(within("ack", acks.recv()).await.unwrap().pkid, 2);
        assert_eq!(values(&within("batch", processor.recv()).await.unwrap()), vec![1.0, 2.0]);
        assert_eq!(metrics.journal_commits.load(Ordering::Relaxed), 1, "one commit for both");
        drop(tx);
        within("writer exit", writer).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn an_idle_writer_journals_ticks() {
        let cfg = JournalConfig { tick_interval: Duration::from_millis(20), ..writer_cfg() };
        let before = event::now_ms();
        let WriterRig { tx, mut processor, writer, _tmp, .. } = WriterRig::start(cfg);
        let mut ticks = Vec::new();
        while ticks.len() < 2 {
            for (seq, entry) in within("ticks", processor.recv()).await.unwrap() {
                let Entry::Tick { now_ms } = entry else { panic!("only ticks: {entry:?}") };
                assert!(now_ms >= before);
                ticks.push(seq);
            }
        }
        assert_eq!(&ticks[..2], &[1, 2]);
        drop(tx);
        within("writer exit", writer).await.unwrap().unwrap();
    }

    fn seqs(reader: &JournalReader, after: u64) -> Vec<u64> {
        reader.read_after(after).map(|r| r.unwrap().0).collect()
    }

    #[test]
    fn a_chunk_is_the_postcard_encoding_of_its_entries() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open_store(&tmp);
        let mut journal = Journal::open(&store).unwrap();
        let entries: Vec<Entry> =
            (0..300).map(|i| Entry::Event(event(f64::from(i), i64::from(i)))).collect();
        for entry in &entries {
            journal.append(entry).unwrap();
        }
        journal.seal().unwrap();
        // 300 entries: a two-byte varint length.
        let chunk = postcard::to_extend(&entries, vec![CHUNK_VERSION]).unwrap();
        let mut expected = Vec::new();
        segment::encode(&mut expected, 1, &[], &chunk);
        let files = segment_files(&store);
        assert_eq!(files.len(), 1);
        assert_eq!(fs::read(&files[0]).unwrap(), expected, "one record: header, then the chunk");
        assert_eq!(journal.reader().bytes(), expected.len() as u64);
    }

    #[test]
    fn read_after_starts_inside_a_chunk_or_at_its_boundaries() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open_store(&tmp);
        // Two seals per segment.
        let mut journal = Journal::open_with(&store, 40).unwrap();
        // Chunks 1..=3, 4..=6, 7..=7, 8..=10.
        for seq in 1..=10u64 {
            journal.append(&Entry::Tick { now_ms: seq as i64 }).unwrap();
            if [3, 6, 7].contains(&seq) {
                journal.seal().unwrap();
            }
        }
        journal.seal().unwrap();
        let reader = journal.reader();
        assert_eq!(records(&store).len(), 4);
        assert_eq!(segment_files(&store).len(), 2);
        for after in 0..=11 {
            assert_eq!(seqs(&reader, after), (after + 1..=10).collect::<Vec<_>>(), "after {after}");
        }
        assert_eq!(reader.read_after(u64::MAX).count(), 0);
        let all: Vec<_> = reader.read_after(5).map(Result::unwrap).collect();
        assert_eq!(all[0], (6, Entry::Tick { now_ms: 6 }), "seq and entry stay paired");
        // After a trim the first segment starts later; reading before it starts there.
        let cfg = JournalConfig { max_age: Duration::ZERO, ..JournalConfig::default() };
        assert_eq!(reader.trim(6, &cfg, i64::MAX).unwrap(), 6);
        assert_eq!(seqs(&reader, 0), (7..=10).collect::<Vec<_>>());
        assert_eq!(seqs(&reader, 2), (7..=10).collect::<Vec<_>>());
    }

    #[test]
    fn trim_never_removes_the_chunk_that_holds_the_entry_after_the_snapshot() {
        let by_age = JournalConfig { max_age: Duration::from_secs(1), ..JournalConfig::default() };
        let by_bytes = JournalConfig {
            max_bytes: ByteSize(0),
            max_age: Duration::from_secs(3600),
            ..JournalConfig::default()
        };
        for cfg in [&by_age, &by_bytes] {
            let tmp = tempfile::tempdir().unwrap();
            let store = open_store(&tmp);
            let mut journal = Journal::open_with(&store, 1).unwrap();
            // Segments 1..=3, 4..=6, 7..=9, all long expired.
            for seq in 1..=9u64 {
                journal.append(&Entry::Event(event(seq as f64, 1_000))).unwrap();
                if seq % 3 == 0 {
                    journal.seal().unwrap();
                }
            }
            let reader = journal.reader();
            // Snapshot at 4 or 5: chunk 4..=6 holds 5 or 6, the replay input.
            assert_eq!(reader.trim(4, cfg, 1_000_000).unwrap(), 3);
            assert_eq!(reader.trim(5, cfg, 1_000_000).unwrap(), 0);
            assert_eq!(seqs(&reader, 4), vec![5, 6, 7, 8, 9]);
            assert_eq!(seqs(&reader, 5), vec![6, 7, 8, 9]);
            assert_eq!(reader.trim(6, cfg, 1_000_000).unwrap(), 3);
            assert_eq!(seqs(&reader, 0), vec![7, 8, 9]);
            assert_eq!(reader.trim(8, cfg, 1_000_000).unwrap(), 0);
            assert_eq!(seqs(&reader, 8), vec![9]);
            assert_eq!(reader.trim(9, cfg, 1_000_000).unwrap(), 0, "the active segment stays");
            assert_eq!(seqs(&reader, 0), vec![7, 8, 9]);
        }
        // By age, a chunk goes only when its newest entry is old, wherever that entry is.
        let tmp = tempfile::tempdir().unwrap();
        let store = open_store(&tmp);
        let mut journal = Journal::open_with(&store, 1).unwrap();
        journal.append(&Entry::Event(event(1.0, 1_000))).unwrap();
        journal.append(&Entry::Tick { now_ms: 999_500 }).unwrap();
        journal.append(&Entry::Event(event(3.0, 1_000))).unwrap();
        journal.seal().unwrap();
        journal.append(&Entry::Tick { now_ms: 2_000_000 }).unwrap();
        journal.seal().unwrap();
        assert_eq!(journal.reader().trim(3, &by_age, 1_000_000).unwrap(), 0);
        assert_eq!(journal.reader().trim(3, &by_age, 1_000_501).unwrap(), 3);
    }

    #[test]
    fn a_journal_of_an_older_build_moves_out_of_sled_once() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open_store(&tmp);
        // An older build journaled 1..=2 one key each (v1), then the chunk 3..=4, and kept a
        // dedup key in its own tree.
        let tree = store.db().open_tree(TREE_JOURNAL).unwrap();
        for seq in 1..=2u64 {
            let value = postcard::to_extend(
                &Entry::Event(event(seq as f64, 1_000)),
                vec![ENTRY_VERSION_V1],
            )
            .unwrap();
            tree.insert(seq.to_be_bytes(), value).unwrap();
        }
        let chunk = vec![Entry::Event(event(3.0, 2_000)), Entry::Tick { now_ms: 2_000 }];
        tree.insert(3u64.to_be_bytes(), postcard::to_extend(&chunk, vec![CHUNK_VERSION]).unwrap())
            .unwrap();
        let dedup = store.db().open_tree(TREE_DEDUP).unwrap();
        dedup.insert([0, 1, 0, 7], &5u64.to_be_bytes()).unwrap();
        store.flush().unwrap();

        let mut journal = Journal::open(&store).unwrap();
        assert_eq!(journal.last_seq(), 4, "open continues after the last old entry");
        assert_eq!(journal.journaled_hash([0, 1, 0, 7]), Some(5), "the dedup key came along");
        assert!(tree.is_empty() && dedup.is_empty(), "sled no longer holds the journal");
        let all: Vec<_> = journal.reader().read_after(0).map(Result::unwrap).collect();
        assert_eq!(all.len(), 4);
        assert_eq!(all[1], (2, Entry::Event(event(2.0, 1_000))));
        assert_eq!(all[3], (4, Entry::Tick { now_ms: 2_000 }));
        assert_eq!(journal.append(&Entry::Tick { now_ms: 3_000 }).unwrap(), 5);
        journal.commit().unwrap();
        drop(journal);
        // Once: a second open reads the segments (and the key) as they are.
        let journal = Journal::open(&store).unwrap();
        assert_eq!(seqs(&journal.reader(), 0), vec![1, 2, 3, 4, 5]);
        assert_eq!(journal.journaled_hash([0, 1, 0, 7]), Some(5));
        assert_eq!(segment_files(&store).len(), 1);
    }

    #[test]
    fn a_large_seal_is_split_into_bounded_chunks() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open_store(&tmp);
        let mut journal = Journal::open(&store).unwrap();
        let entry = |i: u64| {
            let series = format!("site-{}/pump-{i}/temperature", "x".repeat(40));
            Entry::Event(Event { series, ..event(i as f64, i as i64) })
        };
        let mut encoded = 0;
        let mut n = 0;
        while encoded < 4 * CHUNK_MAX_BYTES {
            n += 1;
            encoded += postcard::to_allocvec(&entry(n)).unwrap().len();
            assert_eq!(journal.append(&entry(n)).unwrap(), n);
        }
        journal.seal().unwrap();
        let chunks = records(&store).len();
        assert!((4..=6).contains(&chunks), "{chunks} chunks for {encoded} bytes");
        let sizes = chunk_sizes(&store);
        assert!(sizes.iter().all(|&size| size <= CHUNK_MAX_BYTES + 3), "chunks of {sizes:?} bytes");
        let reader = journal.reader();
        assert_eq!(seqs(&reader, 0), (1..=n).collect::<Vec<_>>());
        assert_eq!(reader.read_after(n - 1).next().unwrap().unwrap(), (n, entry(n)));
        let bytes: u64 = segment_files(&store).iter().map(|p| fs::metadata(p).unwrap().len()).sum();
        assert_eq!(reader.bytes(), bytes);
        drop(journal);
        assert_eq!(Journal::open(&store).unwrap().last_seq(), n);
        // A single entry over the bound is a chunk of its own.
        let mut journal = Journal::open(&store).unwrap();
        journal.append(&Entry::Tick { now_ms: 1 }).unwrap();
        let huge = Entry::Event(Event { series: "y".repeat(CHUNK_MAX_BYTES), ..event(1.0, 1) });
        assert_eq!(journal.append(&huge).unwrap(), n + 2);
        journal.seal().unwrap();
        assert_eq!(records(&store).len(), chunks + 2);
        assert_eq!(seqs(&journal.reader(), n), vec![n + 1, n + 2]);
    }

    /// The encoded size of every chunk in the journal's files.
    fn chunk_sizes(store: &Store) -> Vec<usize> {
        let mut sizes = Vec::new();
        for path in segment_files(store) {
            let len = fs::metadata(&path).unwrap().len();
            let mut reader = SegmentReader::open(&path, len).unwrap().unwrap();
            while let Next::Record { body, .. } = reader.next().unwrap() {
                sizes.push(body.chunk().len());
            }
        }
        sizes
    }

    #[test]
    fn dedup_keys_are_written_in_the_record_of_their_entry() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open_store(&tmp);
        let mut journal = Journal::open(&store).unwrap();
        let metrics = Metrics::default();
        let mut pending = Pending::default();
        let (ack_tx, _acks) = mpsc::unbounded_channel();
        let redelivery = |dup| Some(Redelivery { source: 1, pkid: 7, hash: 5, dup });
        let first = ingest(1.0, &ack_tx, 7, redelivery(false));
        accept(&mut journal, first, &mut pending, &metrics).unwrap();
        assert!(records(&store).is_empty(), "nothing on disk before the commit");
        // A redelivery before the commit is recognised from the journal's keys.
        let again = ingest(1.0, &ack_tx, 7, redelivery(true));
        accept(&mut journal, again, &mut pending, &metrics).unwrap();
        assert_eq!(metrics.redeliveries_dropped.load(Ordering::Relaxed), 1);
        assert_eq!(pending.entries.len(), 1);
        // At commit: the entry and its key in one record.
        journal.commit().unwrap();
        assert_eq!(records(&store), vec![(1, vec![([0, 1, 0, 7], 5)], 1)]);
        drop(journal);
        let journal = Journal::open(&store).unwrap();
        assert_eq!(journal.journaled_hash([0, 1, 0, 7]), Some(5), "rebuilt at open");
        assert_eq!(journal.journaled_hash([0, 1, 0, 8]), None);
    }
}
