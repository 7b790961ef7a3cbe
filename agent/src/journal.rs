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
//! - **Sequence numbers are dense and increasing**, starting at 1. After a restart they
//!   continue after the last stored key, or after the snapshot position if the journal was
//!   trimmed empty (so a replay `read_after(position)` never skips a new entry).
//! - **One appender.** [`run_writer`] owns the [`Journal`] (`append` takes `&mut self`);
//!   readers ([`JournalReader`]) are shared and only read and trim behind the snapshot.
//! - **Bounded.** [`JournalReader::trim`] removes a prefix of entries that the last snapshot
//!   covers, once they are older than `max_age` or while the journal is over `max_bytes`.
//!   Entries after the snapshot are never removed: they are the replay input.
//! - **Redeliveries are dropped, not re-journaled.** The `dedup` tree remembers, per MQTT
//!   `(source, pkid)`, the hash of the last journaled message. A DUP message with the same
//!   hash is a redelivery of an already journaled message (its PUBACK was lost in a crash):
//!   it is acknowledged again but not appended. The key space is bounded (2^16 packet ids
//!   per source, 12 bytes per key), so the tree needs no trimming.
//!
//! # Layout
//!
//! ```text
//! tree "journal"   key:   u64 BE seq (1, 2, 3, ...)      big-endian: byte order = numeric order
//!                  value: [version u8 = 1][postcard(event::Entry)]
//! tree "dedup"     key:   [source u16 BE][pkid u16 BE]
//!                  value: u64 BE hash of topic + payload
//! ```
//!
//! The journal's size (keys + values) is counted in memory, computed by one scan at open:
//! sled's `len()` is itself a full scan.
//!
//! # Lifecycle
//!
//! 1. **write**: sources send [`Ingest`]s; the writer appends them (sled `insert`, in memory
//!    and OS buffers only) together with periodic [`Entry::Tick`]s.
//! 2. **commit**: at most every `commit_interval` the writer flushes the whole store once
//!    (group commit: under load thousands of entries share one fsync; an idle agent
//!    commits at once), then sends the acks in receive order.
//! 3. **read**: the committed `(seq, Entry)` list goes to the processor over a bounded
//!    channel; awaiting that send is the backpressure from processor to sources. On restart
//!    the processor replays [`JournalReader::read_after`] its snapshot position instead.
//! 4. **delete**: after a snapshot, [`JournalReader::trim`] drops the covered prefix that is
//!    older than `max_age` or over `max_bytes`.
//!
//! # Recovery
//!
//! On start nothing needs repair: unflushed entries either survived (process crash: they
//! were in the OS page cache) or vanished (power cut) together with their dedup keys, and
//! neither was acknowledged nor processed. A value that no longer decodes is an `Err` item of
//! `read_after`; the processor logs and skips it.

use std::ops::Bound;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

use crate::config::JournalConfig;
use crate::event::{self, Ack, Entry, Ingest, Redelivery};
use crate::metrics::Metrics;
use crate::store::{Store, StoreError, TREE_DEDUP, TREE_JOURNAL};

/// Version byte that leads every journal value; bump it when the envelope or `Entry`
/// changes incompatibly.
const ENTRY_VERSION: u8 = 1;

/// Removals per `apply_batch` while trimming: large enough to amortise sled's per-batch cost,
/// small enough that one batch does not hold megabytes of keys in memory.
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
    /// A stored entry does not decode; readers skip it.
    #[error("journal: entry {seq} is corrupt: {reason}")]
    Corrupt {
        /// Its sequence number (0 when the key itself is malformed).
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
        let last_key = match tree.last().map_err(JournalError::sled("read last entry"))? {
            Some((key, _)) => decode_key(&key)?,
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
        let last_seq = last_key.max(snapshot_position);
        tracing::debug!(last_seq, bytes, "journal opened");
        Ok(Journal { tree, last_seq, bytes: Arc::new(AtomicU64::new(bytes)) })
    }

    /// Appends `entry` (sled insert) and returns its sequence number. NOT durable until
    /// [`Store::flush`].
    pub fn append(&mut self, entry: &Entry) -> Result<u64, JournalError> {
        let seq = self.last_seq + 1;
        let value = encode_entry(seq, entry)?;
        let size = (8 + value.len()) as u64;
        self.tree.insert(seq.to_be_bytes(), value).map_err(JournalError::sled("append"))?;
        self.bytes.fetch_add(size, Ordering::Relaxed);
        self.last_seq = seq;
        Ok(seq)
    }

    /// The last appended sequence number; 0 when nothing was ever appended.
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
    /// Journal entries looked at.
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
    /// Entries with seq > `after`, in order. A corrupt value is an `Err` item (the caller
    /// logs and skips it); iteration goes on after it.
    pub fn read_after(
        &self,
        after: u64,
    ) -> impl Iterator<Item = Result<(u64, Entry), JournalError>> + '_ {
        let range: (Bound<[u8; 8]>, Bound<[u8; 8]>) =
            (Bound::Excluded(after.to_be_bytes()), Bound::Unbounded);
        self.tree.range(range).map(|item| {
            let (key, value) = item.map_err(JournalError::sled("read"))?;
            let seq = decode_key(&key)?;
            Ok((seq, decode_entry(seq, &value)?))
        })
    }

    /// The last values of `series` still in the journal, oldest first: scans back from the
    /// newest entry over at most `max_scan` entries and keeps at most `max_points` values
    /// (the newest). Corrupt entries are skipped. Bounded work for the API's history view;
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
        for item in self.tree.iter().rev() {
            if scanned == max_scan || points.len() == max_points {
                truncated = true;
                break;
            }
            scanned += 1;
            let (key, value) = item.map_err(JournalError::sled("read history"))?;
            if let Ok(Entry::Event(event)) =
                decode_key(&key).and_then(|seq| decode_entry(seq, &value))
                && event.series == series
            {
                points.push((event.ts_ms, event.value));
            }
        }
        points.reverse();
        Ok(History { series: series.to_string(), points, scanned, truncated })
    }

    /// Removes entries with seq <= `snapshot_position`, oldest first, while they are older
    /// than `cfg.max_age` (by `Event.received_ms` / `Tick.now_ms` against `now_ms`) or the
    /// journal is over `cfg.max_bytes`. Stops at the first entry that is neither, so the
    /// journal stays one contiguous range. Entries after the snapshot are never removed.
    /// Returns how many were removed.
    ///
    /// The receive time, not the event time, ages an entry: event times come from devices
    /// and may be anything. A corrupt entry behind the snapshot is removed (it can never be
    /// replayed and would otherwise stop trimming for good).
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
        let mut batch_bytes = 0u64;
        for item in self.tree.range(..=snapshot_position.to_be_bytes()) {
            let (key, value) = item.map_err(JournalError::sled("scan for trim"))?;
            let size = (key.len() + value.len()) as u64;
            let expired = match decode_key(&key).and_then(|seq| decode_entry(seq, &value)) {
                Ok(entry) => entry_time_ms(&entry) < cutoff,
                Err(error) => {
                    tracing::warn!(%error, "removing a corrupt journal entry behind the snapshot");
                    true
                }
            };
            if !expired && bytes <= max_bytes {
                break;
            }
            batch.remove(key);
            bytes = bytes.saturating_sub(size);
            batch_len += 1;
            batch_bytes += size;
            if batch_len == TRIM_BATCH {
                self.apply_trim(std::mem::take(&mut batch), batch_bytes)?;
                removed += batch_len as u64;
                batch_len = 0;
                batch_bytes = 0;
            }
        }
        if batch_len > 0 {
            self.apply_trim(batch, batch_bytes)?;
            removed += batch_len as u64;
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
///   written so that it becomes durable in the same commit.
/// - Appends [`Entry::Tick`] every `cfg.tick_interval`, also when idle.
/// - Commits (one [`Store::flush`] in `spawn_blocking`) at least `cfg.commit_interval` apart;
///   on success sends the acks in receive order, updates `journal_durable_seq` and
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
        let due = last_commit.map_or_else(Instant::now, |at| at + cfg.commit_interval);
        if pending.items > 0 && (!open || pending.items >= max_items || Instant::now() >= due) {
            commit(&flush, &journal, &mut pending, &to_processor, &metrics).await?;
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
                pending.items += 1;
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
    pending.items += 1;
    if let Some(redelivery) = redelivery
        && redelivery.dup
        && dedup
            .get(dedup_key(&redelivery))
            .map_err(JournalError::sled("read dedup"))?
            .is_some_and(|hash| hash.as_ref() == redelivery.hash.to_be_bytes())
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
        // Written after the event: sled recovers a prefix of its log, so a dedup key can
        // never be durable without the entry it vouches for (which would drop the broker's
        // redelivery of a lost event).
        dedup
            .insert(dedup_key(&redelivery), &redelivery.hash.to_be_bytes())
            .map_err(JournalError::sled("write dedup"))?;
    }
    pending.acks.extend(ack);
    Ok(())
}

/// Flushes (retrying until it works), then acks and hands the entries over.
async fn commit<F>(
    flush: &F,
    journal: &Journal,
    pending: &mut Pending,
    to_processor: &mpsc::Sender<Vec<(u64, Entry)>>,
    metrics: &Metrics,
) -> Result<(), JournalError>
where
    F: Fn() -> Result<(), StoreError> + Clone + Send + 'static,
{
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

fn encode_entry(seq: u64, entry: &Entry) -> Result<Vec<u8>, JournalError> {
    postcard::to_extend(entry, vec![ENTRY_VERSION])
        .map_err(|source| JournalError::Encode { seq, source })
}

fn decode_entry(seq: u64, value: &[u8]) -> Result<Entry, JournalError> {
    match value.split_first() {
        Some((&ENTRY_VERSION, body)) => postcard::from_bytes(body)
            .map_err(|e| JournalError::Corrupt { seq, reason: e.to_string() }),
        Some((version, _)) => {
            Err(JournalError::Corrupt { seq, reason: format!("unknown version {version}") })
        }
        None => Err(JournalError::Corrupt { seq, reason: "empty value".into() }),
    }
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
        journal.append(&Entry::Tick { now_ms: 2 }).unwrap();
        journal.append(&Entry::Tick { now_ms: 3 }).unwrap();
        let tree = store.db().open_tree(TREE_JOURNAL).unwrap();
        tree.insert(2u64.to_be_bytes(), &[9u8, 9, 9]).unwrap();
        let items: Vec<_> = journal.reader().read_after(0).collect();
        assert_eq!(items.len(), 3);
        assert!(matches!(items[1], Err(JournalError::Corrupt { seq: 2, .. })), "{:?}", items[1]);
        assert_eq!(items[2].as_ref().unwrap(), &(3, Entry::Tick { now_ms: 3 }));
    }

    #[test]
    fn trim_removes_old_entries_but_never_after_the_snapshot() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open_store(&tmp);
        let mut journal = Journal::open(&store).unwrap();
        // Entries received at 1 s, 2 s, ... 10 s.
        for i in 1..=10 {
            journal.append(&Entry::Event(event(f64::from(i), i64::from(i) * 1_000))).unwrap();
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
            let last = tree.last().unwrap().map_or(0, |(k, _)| decode_key(&k).unwrap());
            self.store.flush()?;
            self.durable_seq.store(last, Ordering::SeqCst);
            Ok(())
        }
    }

    #[tokio::test]
    async fn the_writer_acks_only_after_a_successful_flush_and_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open_store(&tmp);
        let journal = Journal::open(&store).unwrap();
        let metrics = Arc::new(Metrics::default());
        let (tx, rx) = mpsc::channel(16);
        let (to_processor, mut processor) = mpsc::channel(16);
        let (ack_tx, mut acks) = mpsc::unbounded_channel();
        let flaky = FlakyFlush::new(&store, 2);
        let flush = flaky.clone();
        let writer = tokio::spawn(run_writer_with(
            journal,
            store,
            writer_cfg(),
            rx,
            to_processor,
            Arc::clone(&metrics),
            move || flush.flush(),
        ));
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
        let tmp = tempfile::tempdir().unwrap();
        let store = open_store(&tmp);
        let journal = Journal::open(&store).unwrap();
        let metrics = Arc::new(Metrics::default());
        let (tx, rx) = mpsc::channel(16);
        let (to_processor, mut processor) = mpsc::channel(16);
        let (ack_tx, mut acks) = mpsc::unbounded_channel();
        let broken = FlakyFlush::new(&store, usize::MAX);
        let flush = broken.clone();
        let writer = tokio::spawn(run_writer_with(
            journal,
            store,
            writer_cfg(),
            rx,
            to_processor,
            Arc::clone(&metrics),
            move || flush.flush(),
        ));
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
        let tmp = tempfile::tempdir().unwrap();
        let store = open_store(&tmp);
        let journal = Journal::open(&store).unwrap();
        let metrics = Arc::new(Metrics::default());
        let (tx, rx) = mpsc::channel(16);
        let (to_processor, mut processor) = mpsc::channel(16);
        let (ack_tx, mut acks) = mpsc::unbounded_channel();
        let writer = tokio::spawn(run_writer(
            journal,
            store.clone(),
            writer_cfg(),
            rx,
            to_processor,
            Arc::clone(&metrics),
        ));
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
        let tmp = tempfile::tempdir().unwrap();
        let store = open_store(&tmp);
        let journal = Journal::open(&store).unwrap();
        let metrics = Arc::new(Metrics::default());
        let (tx, rx) = mpsc::channel(16);
        let (to_processor, mut processor) = mpsc::channel(16);
        let (ack_tx, mut acks) = mpsc::unbounded_channel();
        let cfg = JournalConfig { commit_interval: Duration::from_secs(3600), ..writer_cfg() };
        let writer =
            tokio::spawn(run_writer(journal, store, cfg, rx, to_processor, Arc::clone(&metrics)));
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
    }

    #[tokio::test]
    async fn an_idle_writer_journals_ticks() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open_store(&tmp);
        let journal = Journal::open(&store).unwrap();
        let metrics = Arc::new(Metrics::default());
        let (tx, rx) = mpsc::channel::<Ingest>(16);
        let (to_processor, mut processor) = mpsc::channel(16);
        let cfg = JournalConfig { tick_interval: Duration::from_millis(20), ..writer_cfg() };
        let before = event::now_ms();
        let writer =
            tokio::spawn(run_writer(journal, store, cfg, rx, to_processor, Arc::clone(&metrics)));
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
}
