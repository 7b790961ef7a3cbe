//! The event journal: a write-ahead log of everything the processor consumes, with group
//! commit and a durable watermark.
//!
//! # Invariants
//!
//! - **Acknowledged means durable.** An MQTT QoS 1 message is acknowledged to the broker
//!   ([`Ack::send`]) only after the flush of the commit that holds it returned `Ok`. A flush
//!   error is retried with backoff; acks wait, and so do the sources (the ingest channel is
//!   bounded), so a failing disk turns into backpressure, never into a false ack.
//! - **The processor sees only durable entries**, in sequence order, in the batches the
//!   writer hands it after each commit. An entry written but lost in a power cut before its
//!   flush was therefore never processed, so reusing its sequence number after restart is
//!   harmless: no output was derived from it.
//! - **Sequence numbers are dense and increasing**, starting at 1, also across chunks: a
//!   chunk keyed `first` holding `n` entries holds exactly `first..first + n`, and the next
//!   chunk starts at `first + n` (but see Recovery for a corrupt last chunk). After a restart they continue after the last stored entry
//!   (the last chunk's last seq), or after the snapshot position if the journal was trimmed
//!   empty (so a replay `read_after(position)` never skips a new entry).
//! - **Sealed before flushed.** [`Journal::append`] only buffers an entry in memory;
//!   [`Journal::seal`] writes the buffer to sled as one chunk. A flush makes durable only what
//!   was sealed before it, so the writer seals right before each commit's flush. Unsealed
//!   entries are invisible to readers and vanish when the [`Journal`] is dropped, like
//!   unflushed ones in a power cut (they were neither acknowledged nor processed, so no
//!   snapshot position covers them and their seqs may be given again).
//! - **One appender.** [`run_writer`] owns the [`Journal`] (`append` takes `&mut self`);
//!   readers ([`JournalReader`]) are shared and only read and trim behind the snapshot.
//! - **Bounded.** [`JournalReader::trim`] removes a prefix of whole chunks that the last
//!   snapshot covers (their last seq <= the position), once their newest entry is older than
//!   `max_age` or while the journal is over `max_bytes`. A chunk holding an entry after the
//!   snapshot is never removed: it is replay input. A chunk's encoded entries are bounded by
//!   [`CHUNK_MAX_BYTES`] (a larger buffer is split into several chunks), and so is the
//!   in-memory buffer.
//! - **Redeliveries are dropped, not re-journaled.** The `dedup` tree remembers, per MQTT
//!   `(source, pkid)`, the hash of the last journaled message. A DUP message with the same
//!   hash is a redelivery of an already journaled message (its PUBACK was lost in a crash):
//!   it is acknowledged again but not appended. The key space is bounded (2^16 packet ids
//!   per source, 12 bytes per key), so the tree needs no trimming. The writer keeps the
//!   dedup keys of a commit in memory and writes them after sealing the commit's entries:
//!   sled recovers a prefix of its log, so a dedup key is never durable without the entry it
//!   vouches for (which would drop the broker's redelivery of a lost event).
//!
//! # Layout
//!
//! ```text
//! tree "journal"   key:   u64 BE seq of the chunk's FIRST entry   big-endian: byte order =
//!                                                                 numeric order
//!                  value: [version u8 = 2][postcard(Vec<event::Entry>)]
//!                         entries first, first + 1, ..., first + n - 1 (n >= 1)
//!                  value: [version u8 = 1][postcard(event::Entry)]
//!                         (older builds: one entry, key = its seq; read as a chunk of one,
//!                         no longer written)
//! tree "dedup"     key:   [source u16 BE][pkid u16 BE]
//!                  value: u64 BE hash of topic + payload
//! ```
//!
//! One key per group commit instead of one per entry: sled's memory and disk use grow with
//! the number of keys. The chunk that holds seq `s` is the last one keyed `<= s`.
//!
//! The journal's size (keys + values of the chunks in sled) is counted in memory, computed by
//! one scan at open: sled's `len()` is itself a full scan. Buffered entries are not counted
//! until sealed.
//!
//! # Lifecycle
//!
//! 1. **write**: sources send [`Ingest`]s; the writer appends them together with periodic
//!    [`Entry::Tick`]s into the journal's in-memory buffer (a buffer that would pass
//!    [`CHUNK_MAX_BYTES`] is written out as a chunk first).
//! 2. **commit**: at most every `commit_interval` (QoS 1 acks waiting) or after
//!    `commit_max_delay` (nothing waits) the writer seals the buffer (one chunk,
//!    sled `insert`), writes the commit's dedup keys, flushes the whole store once (group
//!    commit: under load thousands of entries share one key and one fsync; an idle agent
//!    commits once per tick), then sends the acks in receive order.
//! 3. **read**: the committed `(seq, Entry)` list goes to the processor over a bounded
//!    channel; awaiting that send is the backpressure from processor to sources. On restart
//!    the processor replays [`JournalReader::read_after`] its snapshot position instead
//!    (from the chunk holding `position + 1`, skipping its entries up to the position).
//! 4. **delete**: after a snapshot, [`JournalReader::trim`] drops the covered prefix of
//!    chunks that is older than `max_age` or over `max_bytes`.
//!
//! # Recovery
//!
//! On start nothing needs repair: unflushed chunks either survived (process crash: they
//! were in the OS page cache) or vanished (power cut) together with their dedup keys, and
//! neither was acknowledged nor processed. A value that no longer decodes is one `Err` item
//! of `read_after` (its entries are lost, reading goes on with the next chunk); the
//! processor logs and skips it. If the last chunk does not decode, `open` continues after
//! its key (or the snapshot position, if higher).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

use crate::config::JournalConfig;
use crate::event::{self, Ack, Entry, Ingest, Redelivery};
use crate::metrics::Metrics;
use crate::store::{Store, StoreError, TREE_DEDUP, TREE_JOURNAL};

/// Version byte of a chunk value (`[2][postcard(Vec<Entry>)]`); bump it when the envelope or
/// `Entry` changes incompatibly.
const CHUNK_VERSION: u8 = 2;

/// Version byte of a one-entry value (`[1][postcard(Entry)]`, key = its seq) written by
/// builds before chunks. Still read, as a chunk of one; never written.
const ENTRY_VERSION_V1: u8 = 1;

/// Bound of a chunk's encoded entries (its value is this plus a few bytes of header): an
/// append that would pass it writes the buffer out as a chunk first. Only a single entry
/// larger than this makes a larger chunk (of one). Keeps chunk values and the appender's
/// buffer small while one chunk still holds thousands of typical entries.
pub const CHUNK_MAX_BYTES: usize = 64 * 1024;

/// Chunk removals per `apply_batch` while trimming: large enough to amortise sled's
/// per-batch cost, small enough that one batch does not hold megabytes of keys in memory.
const TRIM_BATCH: usize = 1024;

/// First delay before retrying a failed flush; doubles up to [`FLUSH_RETRY_MAX`]. Short,
/// because a transient error (EINTR-like, a momentarily full disk) usually clears fast.
const FLUSH_RETRY_MIN: Duration = Duration::from_millis(10);

/// Longest delay between flush retries: bounds both the log rate of a broken disk and the
/// latency of recovery once it works again.
const FLUSH_RETRY_MAX: Duration = Duration::from_secs(5);

/// Flush attempts (about 0.3 s with the backoff above) before the writer gives up and the
/// agent exits for its supervisor to restart it. sled 0.34 keeps the first write error (a
/// full disk: `StorageFull`) as the store's global error and returns it from every later
/// flush until the store is reopened: in-process retries cannot succeed, a restart can.
/// Nothing is lost by exiting: acks wait for a successful flush, so the broker redelivers
/// every unacknowledged QoS 1 message (measured: disk_full in RELIABILITY.md).
pub const FLUSH_ATTEMPTS: u32 = 6;

/// Floor of the tick interval: `tokio::time::interval` panics on zero, and ticks faster than
/// this would only burn fsyncs.
const MIN_TICK: Duration = Duration::from_millis(1);

/// Errors of the journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// A sled operation failed.
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
    /// A stored chunk (or old one-entry value) does not decode; readers skip it.
    #[error("journal: chunk at entry {seq} is corrupt: {reason}")]
    Corrupt {
        /// The sequence number of its first entry, its key (0 when the key itself is
        /// malformed).
        seq: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// The store failed (flush, snapshot).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The blocking flush task panicked or was cancelled.
    #[error("journal: the flush task failed")]
    Flusher {
        /// tokio's report.
        #[source]
        source: tokio::task::JoinError,
    },
    /// Flushes kept failing ([`FLUSH_ATTEMPTS`] in a row): the store needs a reopen.
    #[error(
        "journal: {attempts} flushes in a row failed (disk full or failing?); exiting so that \
         the supervisor reopens the store (nothing unacknowledged is lost)"
    )]
    FlushFailing {
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        #[source]
        source: StoreError,
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
            JournalError::Sled { source, .. } => matches!(source, sled::Error::Io(_)),
            JournalError::Store(e) => e.is_retryable(),
            _ => false,
        }
    }

    fn sled(context: &'static str) -> impl FnOnce(sled::Error) -> JournalError {
        move |source| JournalError::Sled { context, source }
    }
}

/// The appending half of the journal. Owned by [`run_writer`].
#[derive(Debug)]
pub struct Journal {
    tree: sled::Tree,
    last_seq: u64,
    bytes: Arc<AtomicU64>,
    /// The postcard encodings of the unsealed entries, back to back: seqs
    /// `last_seq - buffered + 1 ..= last_seq`. At most [`CHUNK_MAX_BYTES`] unless it holds a
    /// single larger entry.
    buffer: Vec<u8>,
    /// How many entries `buffer` holds.
    buffered: usize,
    /// Chunks closed by [`CHUNK_MAX_BYTES`] since the last seal, not yet written:
    /// `(first seq, value)`. They are written with the rest at the next seal, so that one
    /// commit's chunks and dedup keys reach sled together.
    closed: Vec<(u64, Vec<u8>)>,
}

impl Journal {
    /// Opens the journal tree of `store`, counting its bytes and finding the last sequence.
    pub fn open(store: &Store) -> Result<Journal, JournalError> {
        let tree = store.db().open_tree(TREE_JOURNAL).map_err(JournalError::sled("open tree"))?;
        let mut bytes = 0u64;
        for item in tree.iter() {
            let (key, value) = item.map_err(JournalError::sled("scan at open"))?;
            bytes += (key.len() + value.len()) as u64;
        }
        let last_entry = match tree.last().map_err(JournalError::sled("read last chunk"))? {
            Some((key, value)) => match decode_chunk(&key, &value) {
                Ok(chunk) => chunk.last(),
                Err(error) => {
                    // Its length is unknown: continue after its first entry (the snapshot
                    // position below covers whatever of it was processed).
                    tracing::warn!(%error, "the last journal chunk is corrupt");
                    decode_key(&key)?
                }
            },
            None => 0,
        };
        // A journal trimmed empty must not restart at 1 below the snapshot position: the
        // processor reads after that position and would never see the new entries.
        let snapshot_position = match store.load_snapshot() {
            Ok(snapshot) => snapshot.map_or(0, |(position, _)| position),
            Err(error) => {
                tracing::warn!(%error, "snapshot unreadable; journal continues after its last key");
                0
            }
        };
        let last_seq = last_entry.max(snapshot_position);
        tracing::debug!(last_seq, bytes, "journal opened");
        Ok(Journal {
            tree,
            last_seq,
            bytes: Arc::new(AtomicU64::new(bytes)),
            buffer: Vec::new(),
            buffered: 0,
            closed: Vec::new(),
        })
    }

    /// Appends `entry` to the in-memory buffer and returns its sequence number. Invisible to
    /// readers until [`Journal::seal`], NOT durable until the [`Store::flush`] after that.
    /// If the buffer would pass [`CHUNK_MAX_BYTES`], it is first written out as a chunk
    /// (sled insert, as `seal` does).
    pub fn append(&mut self, entry: &Entry) -> Result<u64, JournalError> {
        let seq = self.last_seq + 1;
        let encoded =
            postcard::to_allocvec(entry).map_err(|source| JournalError::Encode { seq, source })?;
        if self.buffered > 0 && self.buffer.len() + encoded.len() > CHUNK_MAX_BYTES {
            let chunk = self.close_chunk()?;
            self.closed.push(chunk);
        }
        self.buffer.extend_from_slice(&encoded);
        self.buffered += 1;
        self.last_seq = seq;
        Ok(seq)
    }

    /// Writes the buffered entries as one chunk (sled insert, keyed by the first one's seq;
    /// nothing when the buffer is empty). NOT durable until [`Store::flush`]: call it before
    /// every flush that should make the appended entries durable.
    pub fn seal(&mut self) -> Result<(), JournalError> {
        self.seal_with(None, &[])
    }

    /// [`Journal::seal`], writing `dedup_keys` (`(key, hash)`) to the `dedup` tree in the
    /// same sled transaction as the chunks: after a crash either both are in the store or
    /// neither, so a dedup key never outlives its event (a redelivery would be dropped) and
    /// an event never outlives its dedup key (its redelivery would be journaled twice).
    pub fn seal_with(
        &mut self,
        dedup: Option<&sled::Tree>,
        dedup_keys: &[([u8; 4], u64)],
    ) -> Result<(), JournalError> {
        if self.buffered > 0 {
            let chunk = self.close_chunk()?;
            self.closed.push(chunk);
        }
        if self.closed.is_empty() && dedup_keys.is_empty() {
            return Ok(());
        }
        let chunks = std::mem::take(&mut self.closed);
        let size: u64 = chunks.iter().map(|(_, value)| (8 + value.len()) as u64).sum();
        match dedup {
            Some(dedup) if !dedup_keys.is_empty() => {
                use sled::Transactional;
                (&self.tree, dedup)
                    .transaction(|(journal, dedup)| {
                        for (first, value) in &chunks {
                            journal.insert(&first.to_be_bytes(), value.as_slice())?;
                        }
                        for (key, hash) in dedup_keys {
                            dedup.insert(key, &hash.to_be_bytes())?;
                        }
                        Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
                    })
                    .map_err(|error| match error {
                        sled::transaction::TransactionError::Storage(source) => {
                            JournalError::Sled { context: "seal chunk with dedup keys", source }
                        }
                        sled::transaction::TransactionError::Abort(()) => {
                            unreachable!("the transaction never aborts")
                        }
                    })?;
            }
            _ => {
                let mut batch = sled::Batch::default();
                for (first, value) in chunks {
                    batch.insert(&first.to_be_bytes(), value);
                }
                self.tree.apply_batch(batch).map_err(JournalError::sled("seal chunk"))?;
            }
        }
        self.bytes.fetch_add(size, Ordering::Relaxed);
        Ok(())
    }

    /// Turns the buffer into a chunk value; empties the buffer.
    fn close_chunk(&mut self) -> Result<(u64, Vec<u8>), JournalError> {
        let first = self.last_seq + 1 - self.buffered as u64;
        // postcard encodes a Vec as its varint length followed by the elements.
        let mut value = postcard::to_extend(&(self.buffered as u64), vec![CHUNK_VERSION])
            .map_err(|source| JournalError::Encode { seq: first, source })?;
        value.extend_from_slice(&self.buffer);
        self.buffer.clear();
        self.buffered = 0;
        Ok((first, value))
    }

    /// The last appended sequence number (sealed or not); 0 when nothing was ever appended.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// A reader that shares this journal's byte counter.
    pub fn reader(&self) -> JournalReader {
        JournalReader { tree: self.tree.clone(), bytes: Arc::clone(&self.bytes) }
    }
}

/// One series' recent values from the journal ([`JournalReader::history`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct History {
    /// The series.
    pub series: String,
    /// `[ts_ms, value]`, oldest first (journal order: a late event stays where it arrived).
    pub points: Vec<(i64, f64)>,
    /// Journal entries looked at (a corrupt chunk counts as one).
    pub scanned: usize,
    /// Whether older entries were left unscanned (a limit was reached).
    pub truncated: bool,
}

/// The reading half: replay after a snapshot position, and trimming behind it.
#[derive(Clone, Debug)]
pub struct JournalReader {
    tree: sled::Tree,
    bytes: Arc<AtomicU64>,
}

impl JournalReader {
    /// Entries with seq > `after`, in order: from the chunk that holds `after + 1` (the last
    /// one keyed `<= after + 1`), skipping its entries up to `after`, then every later chunk.
    /// A chunk that does not decode is one `Err` item (the caller logs and skips it);
    /// iteration goes on with the next chunk. Sealed entries only.
    pub fn read_after(
        &self,
        after: u64,
    ) -> impl Iterator<Item = Result<(u64, Entry), JournalError>> + '_ {
        let (chunks, error) = match after.checked_add(1) {
            // Nothing follows u64::MAX.
            None => (None, None),
            Some(next) => match self.tree.range(..=next.to_be_bytes()).next_back() {
                Some(Ok((key, _))) => (Some(self.tree.range(key..)), None),
                None => (Some(self.tree.iter()), None),
                Some(Err(source)) => {
                    (None, Some(JournalError::Sled { context: "find the first chunk", source }))
                }
            },
        };
        error
            .into_iter()
            .map(Err)
            .chain(chunks.into_iter().flatten().flat_map(move |item| entries_after(item, after)))
    }

    /// The last values of `series` still in the journal, oldest first: scans back from the
    /// newest entry over at most `max_scan` entries and keeps at most `max_points` values
    /// (the newest). Corrupt chunks are skipped. Bounded work for the API's history view;
    /// `truncated` tells that the scan stopped before the journal's start.
    pub fn history(
        &self,
        series: &str,
        max_scan: usize,
        max_points: usize,
    ) -> Result<History, JournalError> {
        let mut points = Vec::new();
        let mut scanned = 0;
        let mut truncated = false;
        'chunks: for item in self.tree.iter().rev() {
            if scanned == max_scan || points.len() == max_points {
                truncated = true;
                break;
            }
            let (key, value) = item.map_err(JournalError::sled("read history"))?;
            let Ok(chunk) = decode_chunk(&key, &value) else {
                scanned += 1;
                continue;
            };
            for entry in chunk.entries.into_iter().rev() {
                if scanned == max_scan || points.len() == max_points {
                    truncated = true;
                    break 'chunks;
                }
                scanned += 1;
                if let Entry::Event(event) = entry
                    && event.series == series
                {
                    points.push((event.ts_ms, event.value));
                }
            }
        }
        points.reverse();
        Ok(History { series: series.to_string(), points, scanned, truncated })
    }

    /// Removes whole chunks whose last seq is <= `snapshot_position`, oldest first, while
    /// their newest entry is older than `cfg.max_age` (by `Event.received_ms` /
    /// `Tick.now_ms` against `now_ms`) or the journal is over `cfg.max_bytes`. Stops at the
    /// first chunk that is neither, or that holds an entry after the snapshot, so the journal
    /// stays one contiguous range and the replay input stays. Returns how many entries were
    /// removed.
    ///
    /// The receive time, not the event time, ages an entry: event times come from devices
    /// and may be anything. A corrupt chunk behind the snapshot is removed (it can never be
    /// replayed and would otherwise stop trimming for good); its length is known from the
    /// next chunk's key, so a corrupt last chunk stays (it may hold replay input).
    pub fn trim(
        &self,
        snapshot_position: u64,
        cfg: &JournalConfig,
        now_ms: i64,
    ) -> Result<u64, JournalError> {
        let max_age_ms = i64::try_from(cfg.max_age.as_millis()).unwrap_or(i64::MAX);
        let cutoff = now_ms.saturating_sub(max_age_ms);
        let max_bytes = cfg.max_bytes.bytes();
        let mut bytes = self.bytes();
        let mut removed = 0u64;
        let mut batch = sled::Batch::default();
        let mut batch_len = 0usize;
        let mut batch_entries = 0u64;
        let mut batch_bytes = 0u64;
        let mut chunks = self.tree.iter().peekable();
        while let Some(item) = chunks.next() {
            let (key, value) = item.map_err(JournalError::sled("scan for trim"))?;
            let size = (key.len() + value.len()) as u64;
            let (entries, expired) = match decode_chunk(&key, &value) {
                Ok(chunk) if chunk.last() > snapshot_position => break,
                Ok(chunk) => {
                    let newest = chunk.entries.iter().map(entry_time_ms).max();
                    (chunk.entries.len() as u64, newest.is_none_or(|newest| newest < cutoff))
                }
                Err(error) => {
                    let next = match chunks.peek() {
                        Some(Ok((next, _))) => Some(next.as_ref()),
                        _ => None,
                    };
                    match corrupt_chunk_len(&key, &value, next, snapshot_position) {
                        Some(entries) => {
                            tracing::warn!(
                                %error,
                                "removing a corrupt journal chunk behind the snapshot"
                            );
                            (entries, true)
                        }
                        None => break,
                    }
                }
            };
            if !expired && bytes <= max_bytes {
                break;
            }
            batch.remove(key);
            bytes = bytes.saturating_sub(size);
            batch_len += 1;
            batch_entries += entries;
            batch_bytes += size;
            if batch_len == TRIM_BATCH {
                self.apply_trim(std::mem::take(&mut batch), batch_bytes)?;
                removed += batch_entries;
                batch_len = 0;
                batch_entries = 0;
                batch_bytes = 0;
            }
        }
        if batch_len > 0 {
            self.apply_trim(batch, batch_bytes)?;
            removed += batch_entries;
        }
        if removed > 0 {
            tracing::debug!(removed, bytes = self.bytes(), "journal trimmed");
        }
        Ok(removed)
    }

    fn apply_trim(&self, batch: sled::Batch, bytes: u64) -> Result<(), JournalError> {
        self.tree.apply_batch(batch).map_err(JournalError::sled("trim"))?;
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
        Ok(())
    }

    /// Bytes of the journal (keys + values), as counted since open.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// The group-commit writer task, the journal's only appender.
///
/// - Receives a batch with `recv_many` (up to `cfg.commit_max_entries`). For each
///   [`Ingest`]: a DUP redelivery whose `(source, pkid)` is in the `dedup` tree with the
///   same hash is not appended but still acknowledged after this commit
///   (`metrics.redeliveries_dropped`); otherwise the event is appended as
///   [`Entry::Event`] (`metrics.events_in`) and, for QoS 1 messages, the dedup key is
///   kept for this commit (a redelivery later in the same commit sees it too).
/// - Appends [`Entry::Tick`] every `cfg.tick_interval`, also when idle.
/// - Commits at least `cfg.commit_interval` apart, and when no acknowledgement waits, only
///   once the oldest pending item is `cfg.commit_max_delay` old (`Pending::due`): a QoS 0,
///   serial or idle load costs a few fsyncs per second, not one per `commit_interval`.
///   A commit seals the appended entries (one chunk),
///   writes the commit's dedup keys after them, then flushes (one [`Store::flush`] in
///   `spawn_blocking`); on success sends the acks in receive order, updates `journal_durable_seq` and
///   `journal_commits`, and hands the committed entries to `to_processor` (awaited: this is
///   the backpressure). A flush error is logged and retried with backoff; nothing is acked
///   before a successful flush.
/// - Returns after a final commit once `rx` is closed and drained; dropping `to_processor`
///   then tells the processor to finish.
///
/// There is no cancellation arm on purpose: the writer stops when every source has stopped
/// (the channel closes), so the events those sources accepted are always committed first.
pub async fn run_writer(
    journal: Journal,
    store: Store,
    cfg: JournalConfig,
    rx: mpsc::Receiver<Ingest>,
    to_processor: mpsc::Sender<Vec<(u64, Entry)>>,
    metrics: Arc<Metrics>,
) -> Result<(), JournalError> {
    let flusher = store.clone();
    run_writer_with(journal, store, cfg, rx, to_processor, metrics, move || flusher.flush()).await
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
    /// Dedup keys of the messages journaled in this commit and their hashes, written after
    /// the commit's entries are sealed.
    dedup: BTreeMap<[u8; 4], u64>,
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

/// [`run_writer`] with the flush injected, so tests can make it fail.
async fn run_writer_with<F>(
    mut journal: Journal,
    store: Store,
    cfg: JournalConfig,
    mut rx: mpsc::Receiver<Ingest>,
    to_processor: mpsc::Sender<Vec<(u64, Entry)>>,
    metrics: Arc<Metrics>,
    flush: F,
) -> Result<(), JournalError>
where
    F: Fn() -> Result<(), StoreError> + Clone + Send + 'static,
{
    let dedup = store.db().open_tree(TREE_DEDUP).map_err(JournalError::sled("open dedup tree"))?;
    let max_items = cfg.commit_max_entries.max(1);
    let tick_every = cfg.tick_interval.max(MIN_TICK);
    // The first tick comes one interval after start, not at once: the processor gets its
    // first clock reading from the first event or tick, both equally fresh.
    let mut ticks = tokio::time::interval_at(Instant::now() + tick_every, tick_every);
    // After a long flush stall one tick is enough; a burst of catch-up ticks says nothing new.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut pending = Pending::default();
    let mut buf = Vec::with_capacity(max_items);
    let mut last_commit: Option<Instant> = None;
    let mut open = true;

    loop {
        let due = pending.due(last_commit, &cfg);
        if pending.items > 0 && (!open || pending.items >= max_items || Instant::now() >= due) {
            commit(&flush, &mut journal, &dedup, &mut pending, &to_processor, &metrics).await?;
            last_commit = Some(Instant::now());
            continue;
        }
        if !open {
            // Closed, drained and committed.
            return Ok(());
        }
        tokio::select! {
            received = rx.recv_many(&mut buf, max_items - pending.items) => {
                if received == 0 {
                    open = false;
                }
                for ingest in buf.drain(..) {
                    accept(&mut journal, &dedup, ingest, &mut pending, &metrics)?;
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
    dedup: &sled::Tree,
    ingest: Ingest,
    pending: &mut Pending,
    metrics: &Metrics,
) -> Result<(), JournalError> {
    let Ingest { event, ack, redelivery } = ingest;
    pending.take_in();
    if let Some(redelivery) = redelivery
        && redelivery.dup
        && journaled_hash(dedup, &pending.dedup, &redelivery)? == Some(redelivery.hash)
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
    }
    if let Some(redelivery) = redelivery {
        // Written at commit, in the seal's transaction: see `Journal::seal_with`.
        pending.dedup.insert(dedup_key(&redelivery), redelivery.hash);
    }
    pending.acks.extend(ack);
    Ok(())
}

/// The hash of the message last journaled under `redelivery`'s `(source, pkid)`: from this
/// commit if it has one, else from the `dedup` tree.
fn journaled_hash(
    dedup: &sled::Tree,
    pending: &BTreeMap<[u8; 4], u64>,
    redelivery: &Redelivery,
) -> Result<Option<u64>, JournalError> {
    let key = dedup_key(redelivery);
    if let Some(hash) = pending.get(&key) {
        return Ok(Some(*hash));
    }
    let stored = dedup.get(key).map_err(JournalError::sled("read dedup"))?;
    Ok(stored.and_then(|hash| <[u8; 8]>::try_from(hash.as_ref()).ok()).map(u64::from_be_bytes))
}

/// Seals the appended entries and writes the dedup keys, flushes (retrying until it works),
/// then acks and hands the entries over.
async fn commit<F>(
    flush: &F,
    journal: &mut Journal,
    dedup: &sled::Tree,
    pending: &mut Pending,
    to_processor: &mpsc::Sender<Vec<(u64, Entry)>>,
    metrics: &Metrics,
) -> Result<(), JournalError>
where
    F: Fn() -> Result<(), StoreError> + Clone + Send + 'static,
{
    let dedup_keys: Vec<([u8; 4], u64)> = std::mem::take(&mut pending.dedup).into_iter().collect();
    journal.seal_with(Some(dedup), &dedup_keys)?;
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
                    return Err(JournalError::FlushFailing { attempts, source: error });
                }
                tracing::error!(
                    %error,
                    retry_in = ?delay,
                    waiting_acks = pending.acks.len(),
                    "journal flush failed; acks wait for a successful flush"
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

/// One decoded journal value: entries `first ..= last()`, never empty.
struct Chunk {
    first: u64,
    entries: Vec<Entry>,
}

impl Chunk {
    fn last(&self) -> u64 {
        self.first + (self.entries.len() as u64 - 1)
    }
}

/// Decodes a journal value: a chunk (version 2) or an old one-entry value (version 1).
fn decode_chunk(key: &[u8], value: &[u8]) -> Result<Chunk, JournalError> {
    let first = decode_key(key)?;
    let corrupt = |reason: String| JournalError::Corrupt { seq: first, reason };
    let entries = match value.split_first() {
        Some((&CHUNK_VERSION, body)) => {
            postcard::from_bytes::<Vec<Entry>>(body).map_err(|e| corrupt(e.to_string()))?
        }
        Some((&ENTRY_VERSION_V1, body)) => {
            vec![postcard::from_bytes(body).map_err(|e| corrupt(e.to_string()))?]
        }
        Some((version, _)) => return Err(corrupt(format!("unknown version {version}"))),
        None => return Err(corrupt("empty value".into())),
    };
    if entries.is_empty() {
        return Err(corrupt("a chunk without entries".into()));
    }
    if first.checked_add(entries.len() as u64 - 1).is_none() {
        return Err(corrupt(format!("{} entries run past the last seq", entries.len())));
    }
    Ok(Chunk { first, entries })
}

/// The entries of one chunk with seq > `after`, in order, or the chunk's error.
fn entries_after(
    item: sled::Result<(sled::IVec, sled::IVec)>,
    after: u64,
) -> Vec<Result<(u64, Entry), JournalError>> {
    let (key, value) = match item {
        Ok(item) => item,
        Err(source) => return vec![Err(JournalError::Sled { context: "read", source })],
    };
    match decode_chunk(&key, &value) {
        Ok(Chunk { first, entries }) => entries
            .into_iter()
            .enumerate()
            .map(|(i, entry)| (first + i as u64, entry))
            .filter(|(seq, _)| *seq > after)
            .map(Ok)
            .collect(),
        // A corrupt old one-entry value at or before `after` holds nothing after it.
        Err(_)
            if value.first() == Some(&ENTRY_VERSION_V1)
                && decode_key(&key).is_ok_and(|seq| seq <= after) =>
        {
            Vec::new()
        }
        Err(error) => vec![Err(error)],
    }
}

/// How many entries a corrupt chunk held if all of them are provably at or before
/// `position`: an old one-entry value by its key, a chunk by the key of the `next` one (its
/// entries end right before it). `None`: it may hold later entries, keep it.
fn corrupt_chunk_len(key: &[u8], value: &[u8], next: Option<&[u8]>, position: u64) -> Option<u64> {
    let Ok(first) = decode_key(key) else {
        // A malformed key (never written by the journal) in the covered range: garbage.
        return (key <= position.to_be_bytes().as_slice()).then_some(1);
    };
    if first > position {
        return None;
    }
    if value.first() == Some(&ENTRY_VERSION_V1) {
        return Some(1);
    }
    let next = decode_key(next?).ok()?;
    (next > first && next - 1 <= position).then(|| next - first)
}

fn decode_key(key: &[u8]) -> Result<u64, JournalError> {
    let array: [u8; 8] = key.try_into().map_err(|_| JournalError::Corrupt {
        seq: 0,
        reason: format!("key of {} bytes instead of 8", key.len()),
    })?;
    Ok(u64::from_be_bytes(array))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ByteSize;
    use crate::event::Event;
    use rumqttc::{Publish, QoS};
    use std::sync::atomic::AtomicUsize;

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
        store.flush().unwrap();
        drop((journal, store));

        let store = open_store(&tmp);
        let mut journal = Journal::open(&store).unwrap();
        assert_eq!(journal.last_seq(), 5);
        assert_eq!(journal.reader().bytes(), bytes);
        assert_eq!(journal.append(&Entry::Tick { now_ms: 1 }).unwrap(), 6);
    }

    #[test]
    fn a_journal_trimmed_empty_continues_after_the_snapshot_position() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open_store(&tmp);
        let mut journal = Journal::open(&store).unwrap();
        for _ in 0..3 {
            journal.append(&Entry::Tick { now_ms: 0 }).unwrap();
        }
        journal.seal().unwrap();
        store.save_snapshot(3, b"state").unwrap();
        let cfg = JournalConfig::default();
        assert_eq!(journal.reader().trim(3, &cfg, i64::MAX).unwrap(), 3);
        assert_eq!(journal.reader().bytes(), 0);
        store.flush().unwrap();
        drop((journal, store));

        let store = open_store(&tmp);
        let mut journal = Journal::open(&store).unwrap();
        assert_eq!(journal.last_seq(), 3);
        assert_eq!(journal.append(&Entry::Tick { now_ms: 1 }).unwrap(), 4);
    }

    #[test]
    fn a_corrupt_value_is_an_error_item_and_reading_goes_on() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open_store(&tmp);
        let mut journal = Journal::open(&store).unwrap();
        journal.append(&Entry::Tick { now_ms: 1 }).unwrap();
        journal.seal().unwrap();
        // A chunk of 2..=3, then one of 4..=5.
        for now_ms in 2..=5 {
            journal.append(&Entry::Tick { now_ms }).unwrap();
            if now_ms % 2 == 1 {
                journal.seal().unwrap();
            }
        }
        let tree = store.db().open_tree(TREE_JOURNAL).unwrap();
        tree.insert(2u64.to_be_bytes(), &[9u8, 9, 9]).unwrap();
        let reader = journal.reader();
        let items: Vec<_> = reader.read_after(0).collect();
        assert_eq!(items.len(), 4, "{items:?}");
        assert!(matches!(items[1], Err(JournalError::Corrupt { seq: 2, .. })), "{:?}", items[1]);
        assert_eq!(items[2].as_ref().unwrap(), &(4, Entry::Tick { now_ms: 4 }));
        // From inside the corrupt chunk: its error, then the next chunk.
        let items: Vec<_> = reader.read_after(2).collect();
        assert!(matches!(items[0], Err(JournalError::Corrupt { seq: 2, .. })), "{:?}", items[0]);
        assert_eq!(items.len(), 3);
        let history = reader.history("pump-1/temp", 100, 100).unwrap();
        assert_eq!(history.scanned, 4, "2 ticks, the corrupt chunk, 1 tick");
        // Behind the snapshot, its length is known from the next chunk's key: it goes.
        let cfg = JournalConfig { max_age: Duration::ZERO, ..JournalConfig::default() };
        assert_eq!(reader.trim(2, &cfg, i64::MAX).unwrap(), 1, "chunk 2..=3 holds 3");
        assert_eq!(reader.trim(3, &cfg, i64::MAX).unwrap(), 2);
        assert_eq!(reader.read_after(0).next().unwrap().unwrap().0, 4);
        // A corrupt last chunk may hold replay input: it stays, and open continues after its
        // key.
        tree.insert(4u64.to_be_bytes(), &[2u8, 9, 9]).unwrap();
        assert_eq!(reader.trim(10, &cfg, i64::MAX).unwrap(), 0);
        assert_eq!(Journal::open(&store).unwrap().last_seq(), 4);
    }

    #[test]
    fn trim_removes_old_entries_but_never_after_the_snapshot() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open_store(&tmp);
        let mut journal = Journal::open(&store).unwrap();
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
        let rescanned = Journal::open(&store).unwrap().reader().bytes();
        assert_eq!(reader.bytes(), rescanned, "the counter matches a scan");
    }

    #[test]
    fn trim_enforces_the_byte_cap_oldest_first() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open_store(&tmp);
        let mut journal = Journal::open(&store).unwrap();
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

    /// A flush that fails `failures` times, then flushes the store and records the last
    /// journal seq it made durable.
    #[derive(Clone)]
    struct FlakyFlush {
        store: Store,
        failures: usize,
        attempts: Arc<AtomicUsize>,
        durable_seq: Arc<AtomicU64>,
    }

    impl FlakyFlush {
        fn new(store: &Store, failures: usize) -> Self {
            FlakyFlush {
                store: store.clone(),
                failures,
                attempts: Arc::default(),
                durable_seq: Arc::default(),
            }
        }

        fn flush(&self) -> Result<(), StoreError> {
            if self.attempts.fetch_add(1, Ordering::SeqCst) < self.failures {
                return Err(StoreError::Corrupt { what: "test", reason: "injected".into() });
            }
            let tree = self.store.db().open_tree(TREE_JOURNAL).unwrap();
            let last =
                tree.last().unwrap().map_or(0, |(k, v)| decode_chunk(&k, &v).unwrap().last());
            self.store.flush()?;
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
            let flaky = failures.map(|n| FlakyFlush::new(&store, n));
            let (s, m) = (store.clone(), Arc::clone(&metrics));
            let writer = match flaky.clone() {
                Some(flush) => {
                    tokio::spawn(run_writer_with(journal, s, cfg, rx, to_processor, m, move || {
                        flush.flush()
                    }))
                }
                None => tokio::spawn(run_writer(journal, s, cfg, rx, to_processor, m)),
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
        run_writer(journal, store, writer_cfg(), rx, to_processor, Arc::clone(&metrics))
            .await
            .unwrap();
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
        let tree = store.db().open_tree(TREE_JOURNAL).unwrap();
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
        assert_eq!(tree.len(), 2, "one chunk per commit");
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

    /// Writes `entry` under `seq` as builds before chunks did: `[1][postcard(Entry)]`.
    fn write_v1(store: &Store, seq: u64, entry: &Entry) {
        let tree = store.db().open_tree(TREE_JOURNAL).unwrap();
        let value = postcard::to_extend(entry, vec![ENTRY_VERSION_V1]).unwrap();
        tree.insert(seq.to_be_bytes(), value).unwrap();
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
        let tree = store.db().open_tree(TREE_JOURNAL).unwrap();
        let (key, value) = tree.first().unwrap().unwrap();
        assert_eq!(tree.len(), 1);
        assert_eq!(key.as_ref(), 1u64.to_be_bytes());
        // 300 entries: a two-byte varint length.
        let expected = postcard::to_extend(&entries, vec![CHUNK_VERSION]).unwrap();
        assert_eq!(value.as_ref(), expected.as_slice());
        assert_eq!(journal.reader().bytes(), (8 + expected.len()) as u64);
    }

    #[test]
    fn read_after_starts_inside_a_chunk_or_at_its_boundaries() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open_store(&tmp);
        let mut journal = Journal::open(&store).unwrap();
        // Chunks 1..=3, 4..=6, 7..=7, 8..=10.
        for seq in 1..=10u64 {
            journal.append(&Entry::Tick { now_ms: seq as i64 }).unwrap();
            if [3, 6, 7].contains(&seq) {
                journal.seal().unwrap();
            }
        }
        journal.seal().unwrap();
        let reader = journal.reader();
        assert_eq!(store.db().open_tree(TREE_JOURNAL).unwrap().len(), 4);
        for after in 0..=11 {
            assert_eq!(seqs(&reader, after), (after + 1..=10).collect::<Vec<_>>(), "after {after}");
        }
        assert_eq!(reader.read_after(u64::MAX).count(), 0);
        let all: Vec<_> = reader.read_after(5).map(Result::unwrap).collect();
        assert_eq!(all[0], (6, Entry::Tick { now_ms: 6 }), "seq and entry stay paired");
        // After a trim the first chunk starts later; reading before it starts there.
        let cfg = JournalConfig { max_age: Duration::ZERO, ..JournalConfig::default() };
        assert_eq!(reader.trim(3, &cfg, i64::MAX).unwrap(), 3);
        assert_eq!(seqs(&reader, 0), (4..=10).collect::<Vec<_>>());
        assert_eq!(seqs(&reader, 2), (4..=10).collect::<Vec<_>>());
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
            let mut journal = Journal::open(&store).unwrap();
            // Chunks 1..=3, 4..=6, 7..=9, all long expired.
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
            assert_eq!(reader.trim(9, cfg, 1_000_000).unwrap(), 3);
            assert_eq!(reader.bytes(), 0);
        }
        // By age, a chunk goes only when its newest entry is old, wherever that entry is.
        let tmp = tempfile::tempdir().unwrap();
        let store = open_store(&tmp);
        let mut journal = Journal::open(&store).unwrap();
        journal.append(&Entry::Event(event(1.0, 1_000))).unwrap();
        journal.append(&Entry::Tick { now_ms: 999_500 }).unwrap();
        journal.append(&Entry::Event(event(3.0, 1_000))).unwrap();
        journal.seal().unwrap();
        assert_eq!(journal.reader().trim(3, &by_age, 1_000_000).unwrap(), 0);
        assert_eq!(journal.reader().trim(3, &by_age, 1_000_501).unwrap(), 3);
    }

    #[test]
    fn old_one_entry_values_are_read_as_chunks_of_one() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open_store(&tmp);
        // An older build journaled 1..=3, one key each.
        for seq in 1..=3u64 {
            write_v1(&store, seq, &Entry::Event(event(seq as f64, 1_000)));
        }
        let mut journal = Journal::open(&store).unwrap();
        assert_eq!(journal.last_seq(), 3, "open continues after the last old entry");
        // This build appends chunks 4..=5 and 6.
        assert_eq!(journal.append(&Entry::Event(event(4.0, 2_000))).unwrap(), 4);
        journal.append(&Entry::Tick { now_ms: 2_000 }).unwrap();
        journal.seal().unwrap();
        journal.append(&Entry::Event(event(6.0, 9_000))).unwrap();
        journal.seal().unwrap();
        let reader = journal.reader();
        for after in 0..=6 {
            assert_eq!(seqs(&reader, after), (after + 1..=6).collect::<Vec<_>>(), "after {after}");
        }
        let all: Vec<_> = reader.read_after(0).map(Result::unwrap).collect();
        assert_eq!(all[1], (2, Entry::Event(event(2.0, 1_000))));
        let history = reader.history("pump-1/temp", 100, 100).unwrap();
        assert_eq!(
            history.points.iter().map(|p| p.1).collect::<Vec<_>>(),
            [1.0, 2.0, 3.0, 4.0, 6.0]
        );
        assert_eq!((history.scanned, history.truncated), (6, false));
        let newest = reader.history("pump-1/temp", 4, 100).unwrap();
        assert_eq!(newest.points.iter().map(|p| p.1).collect::<Vec<_>>(), [3.0, 4.0, 6.0]);
        assert_eq!((newest.scanned, newest.truncated), (4, true));
        drop(journal);
        assert_eq!(Journal::open(&store).unwrap().last_seq(), 6);
        // Trim: the old entries one by one, then whole chunks, never past the snapshot.
        let cfg = JournalConfig { max_age: Duration::from_secs(5), ..JournalConfig::default() };
        assert_eq!(reader.trim(2, &cfg, 10_000).unwrap(), 2);
        assert_eq!(reader.trim(4, &cfg, 10_000).unwrap(), 1, "chunk 4..=5 holds 5");
        assert_eq!(reader.trim(6, &cfg, 10_000).unwrap(), 2, "6 is fresh");
        assert_eq!(seqs(&reader, 0), vec![6]);
        assert_eq!(Journal::open(&store).unwrap().reader().bytes(), reader.bytes());
        // Only old values, the last one corrupt: open still continues after it.
        write_v1(&store, 7, &Entry::Tick { now_ms: 1 });
        store.db().open_tree(TREE_JOURNAL).unwrap().insert(8u64.to_be_bytes(), &[1u8]).unwrap();
        assert_eq!(Journal::open(&store).unwrap().last_seq(), 8);
        let items: Vec<_> = reader.read_after(7).collect();
        assert!(matches!(items[..], [Err(JournalError::Corrupt { seq: 8, .. })]), "{items:?}");
        assert_eq!(reader.read_after(8).count(), 0, "a corrupt old value before the start");
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
        let tree = store.db().open_tree(TREE_JOURNAL).unwrap();
        let chunks = tree.len();
        assert!((4..=6).contains(&chunks), "{chunks} chunks for {encoded} bytes");
        for item in tree.iter() {
            let (_, value) = item.unwrap();
            assert!(value.len() <= CHUNK_MAX_BYTES + 8, "a chunk of {} bytes", value.len());
        }
        let reader = journal.reader();
        assert_eq!(seqs(&reader, 0), (1..=n).collect::<Vec<_>>());
        assert_eq!(reader.read_after(n - 1).next().unwrap().unwrap(), (n, entry(n)));
        let bytes: u64 =
            tree.iter().map(|i| i.unwrap()).map(|(k, v)| (k.len() + v.len()) as u64).sum();
        assert_eq!(reader.bytes(), bytes);
        drop(journal);
        assert_eq!(Journal::open(&store).unwrap().last_seq(), n);
        // A single entry over the bound is a chunk of its own.
        let mut journal = Journal::open(&store).unwrap();
        journal.append(&Entry::Tick { now_ms: 1 }).unwrap();
        let huge = Entry::Event(Event { series: "y".repeat(CHUNK_MAX_BYTES), ..event(1.0, 1) });
        assert_eq!(journal.append(&huge).unwrap(), n + 2);
        journal.seal().unwrap();
        assert_eq!(tree.len(), chunks + 2);
        assert_eq!(seqs(&journal.reader(), n), vec![n + 1, n + 2]);
    }

    #[test]
    fn dedup_keys_are_written_in_the_same_transaction_as_their_entries() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open_store(&tmp);
        let mut journal = Journal::open(&store).unwrap();
        let dedup = store.db().open_tree(TREE_DEDUP).unwrap();
        let tree = store.db().open_tree(TREE_JOURNAL).unwrap();
        let metrics = Metrics::default();
        let mut pending = Pending::default();
        let (ack_tx, _acks) = mpsc::unbounded_channel();
        let redelivery = |dup| Some(Redelivery { source: 1, pkid: 7, hash: 5, dup });
        let first = ingest(1.0, &ack_tx, 7, redelivery(false));
        accept(&mut journal, &dedup, first, &mut pending, &metrics).unwrap();
        assert!(tree.is_empty() && dedup.is_empty(), "nothing in sled before the commit");
        // A redelivery before the commit is recognised from the pending keys.
        let again = ingest(1.0, &ack_tx, 7, redelivery(true));
        accept(&mut journal, &dedup, again, &mut pending, &metrics).unwrap();
        assert_eq!(metrics.redeliveries_dropped.load(Ordering::Relaxed), 1);
        assert_eq!(pending.entries.len(), 1);
        // At commit: the chunk and the dedup keys in one transaction.
        let keys: Vec<([u8; 4], u64)> = std::mem::take(&mut pending.dedup).into_iter().collect();
        journal.seal_with(Some(&dedup), &keys).unwrap();
        assert_eq!(tree.len(), 1);
        assert_eq!(dedup.get([0, 1, 0, 7]).unwrap().unwrap().as_ref(), 5u64.to_be_bytes());
        let (key, value) = tree.first().unwrap().unwrap();
        let chunk = decode_chunk(&key, &value).unwrap();
        assert_eq!(chunk.entries.len(), 1, "the redelivery was not journaled");
    }
}
