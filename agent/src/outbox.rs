//! The outbox: records waiting for upstream, in lanes, under a byte cap, with policies for
//! long outages (TTL per lane, compaction of the summary backlog, eviction as the last resort).
//!
//! # Invariants
//!
//! - **One put per sequence number.** Every `seq < next_seq(lane)` was written once; a put
//!   below it returns `Ok(false)` and writes nothing. The processor replays the journal
//!   deterministically after a crash and produces the same records with the same seqs, so
//!   this fence is what makes its output exactly-once in the outbox. The record and the new
//!   `next_seq` change in one `apply_batch` of one tree, so they cannot disagree after a crash.
//! - **Stable ids.** A record's id is `record_id(agent, store epoch, lane, seq)`; a resend
//!   carries the same id, and a new store (new epoch) never reuses one.
//! - **In order.** A lane is read oldest first and deleted as a prefix (`remove_through`)
//!   after upstream acknowledged it.
//! - **Bounded, and no silent loss.** While the records of all lanes take more than
//!   `max_bytes` (keys + values), the oldest summaries are deleted and replaced by ONE gap
//!   record (reason `outbox_full`) at the key of the first evicted record, which says exactly
//!   which seqs were lost, which time and how many events they covered. Later evictions
//!   extend that gap. Alerts are evicted the same way only when no summary is left. Gap
//!   records themselves are never evicted. Every eviction is counted
//!   (`metrics.outbox_evicted`).
//! - **Every event is accounted for once.** A summary's events are in exactly one record
//!   upstream receives: the summary itself, a merged summary (its `count`), or a gap record
//!   (its `events`). Expiry, compaction and eviction each move events, never copy or drop
//!   them, so a backend can check `Σ summary.count + Σ gap.events` against what it expects.
//! - **A gap upstream may already hold is never extended past what it holds.** Upstream
//!   de-duplicates by id, so a grown copy of a gap it already received would be dropped,
//!   and the ack of the old copy would delete the grown one unseen. A gap handed out by
//!   [`Outbox::peek`] therefore grows only by seqs handed out in the same batch, and a gap
//!   found at open (an earlier run may have sent it) does not grow at all; a new gap starts
//!   at the first lost seq it may not cover. This costs at most one extra gap record per
//!   forwarder batch window of losses (and per restart). A gap never spans a record that
//!   stays in the lane: a kept record ends it.
//! - **A record upstream may hold is never merged.** Compaction only touches summaries
//!   above every seq handed out by [`Outbox::peek`] in this process and above every record
//!   present at open (an earlier run may have sent those), so a merged record never reuses
//!   the id of a record upstream got.
//! - **Nothing is lost on dead-lettering.** A record moved to `dead_letter` is written there
//!   before it is deleted from the lane: a crash in between leaves it in both trees (sent
//!   again, rejected again), never in neither.
//!
//! # Layout
//!
//! One sled tree, so that a record and its lane's high-water mark change atomically:
//!
//! ```text
//! tree "outbox"
//!   [lane tag u8][seq u64 BE]   -> [version u8 = 2][postcard(sensors::record::Record)]
//!   [0xFF][b'n'][lane tag u8]   -> next_seq u64 BE      (every seq < next_seq was written once)
//! tree "dead_letter"
//!   [lane tag u8][seq u64 BE]   -> [version u8 = 2][postcard(DeadLetter { reason, lane,
//!                                   at_ms, stored: the outbox value as it was })]
//! ```
//!
//! Lane tags are 0 (alerts) and 1 (summaries); big-endian seqs make sled's byte order the
//! sequence order, and the `0xFF` prefix sorts the high-water marks after every record.
//! Per-lane record counts and bytes are kept in memory, computed by one scan at open.
//!
//! # Lifecycle
//!
//! 1. **write**: the processor calls [`Outbox::put`] with its deterministic seq; then the
//!    long-outage policies run in this order: expiry (at most once per [`EXPIRY_INTERVAL`]),
//!    compaction (above the high-water mark), eviction (above the cap); waiters of
//!    [`Outbox::wait_for_records`] wake up.
//! 2. **read**: a forwarder calls [`Outbox::peek`] for the oldest records of a lane (alerts
//!    first) and sends them as one batch; the lane's expired records are dropped first, so
//!    nothing older than the TTL is sent.
//! 3. **ack**: upstream answers 2xx / PUBACK.
//! 4. **delete**: [`Outbox::remove_through`] deletes the lane prefix up to the batch's last
//!    seq; a batch rejected as malformed goes to [`Outbox::dead_letter`] instead.
//!
//! Durability comes from the journal writer's group commit (the store flush is db-wide), and
//! from the processor replaying the journal after its last snapshot: a put lost in a power
//! cut is simply made again.
//!
//! # Expiry (`buffer.alerts_ttl`, `buffer.summaries_ttl`)
//!
//! A record whose event time is older than its lane's TTL by the agent's clock is replaced
//! by a gap record with reason `expired` (same rules as eviction: one gap per run of lost
//! records, `events` = the sum of their counts), counted in `metrics.outbox_expired`. The
//! event time of a summary is the end of its window (all its events are older than the
//! TTL), of an alert its timestamp. A pass reads the lane from its oldest record and stops
//! at the first record that is wholly newer than the TTL, or after
//! [`EXPIRE_SCAN_RECORDS`]: records close roughly in time order, so the expired ones are at
//! the head. Time is untrusted: a gateway without a real-time clock stamps 1970 until NTP
//! sets the clock, and measured against such a stamp every record would expire the moment
//! the clock is set. Records stamped before [`TTL_CLOCK_FLOOR_MS`] therefore never expire
//! (the cap still bounds them), and nothing expires while the agent's own clock is before it.
//!
//! # Compaction (`buffer.compact_above`, `buffer.compact_to`)
//!
//! Above the high-water mark, a pass reads up to [`COMPACT_SCAN_RECORDS`] summaries and
//! merges those of one series and one coarse window (see `compact`) into one record with
//! exact statistics. Passes walk the lane from its oldest compactable record to the newest
//! with a cursor and then start over, so the oldest summaries are merged first and a lane
//! whose head holds nothing to merge does not stall compaction. A pass runs every
//! [`COMPACT_EVERY_PUTS`] puts while above the mark, and once more before evicting if the
//! last pass freed at least as many records, so that its cost stays bounded per put.
//! Windows of one series merge when they lie within [`COMPACT_SCAN_RECORDS`] records of each
//! other in the lane, i.e. for gateways with fewer series than that.
//!
//! What upstream sees: the merged record takes the seq, and so the id, of the first
//! record it replaces (never sent: see the invariants); the others are deleted and their
//! seqs are never used again. A lane therefore stays in increasing seq order with unique
//! ids, but its seqs are no longer dense: a seq that never arrives and is not covered by a
//! gap was merged into an earlier record of the same series, whose `windows` says how many
//! windows it holds. A backend checks completeness by events, not by seqs. Gap ranges
//! (`first_seq..=last_seq`) may likewise span seqs that were merged away; `records` counts
//! the records lost.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sensors::record::{Gap, Lane, Record, RecordBody, gap_id, record_id};

use crate::sentmark::MarkFile;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::compact::Planner;
use crate::config::BufferConfig;
use crate::event;
use crate::metrics::Metrics;
use crate::store::{Store, TREE_DEAD_LETTER, TREE_OUTBOX};

/// Version byte that leads every outbox and dead-letter value. 2: batch format 2 (summaries
/// carry `windows`, gaps `events`); a value of version 1 is undecodable and handled like any
/// corrupt value.
const VALUE_VERSION: u8 = 2;
/// First byte of the per-lane metadata keys; sorts after every lane tag.
const META_PREFIX: u8 = 0xFF;
/// Second byte of the `next_seq` key.
const META_NEXT_SEQ: u8 = b'n';
/// Length of a record key: lane tag + u64.
const RECORD_KEY_LEN: usize = 9;
/// The gap reason for records evicted at the byte cap.
pub const GAP_REASON_OUTBOX_FULL: &str = "outbox_full";
/// The gap reason for records older than their lane's TTL.
pub const GAP_REASON_EXPIRED: &str = "expired";
/// How often an ongoing loss (eviction, expiry) or compaction is logged: an outage of days
/// at the cap evicts on every put, and one line a minute (with the totals) says all there
/// is to say.
const LOSS_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// How often [`Outbox::put`] runs an expiry pass. Records expire by the second at the
/// finest (TTLs are hours or days in the field), and a pass costs at least one read.
pub const EXPIRY_INTERVAL: Duration = Duration::from_secs(1);
/// Most records one expiry pass reads: bounds the time the outbox lock is held (a few ms on
/// a Pi) when a long outage has left a large expired backlog; the next pass continues.
pub const EXPIRE_SCAN_RECORDS: usize = 4096;
/// Records stamped before 2020-01-01T00:00:00Z never expire, and nothing expires while the
/// agent's clock is before it: such a time comes from a clock that was never set (see the
/// module docs), not from a record that is really that old.
pub const TTL_CLOCK_FLOOR_MS: i64 = 1_577_836_800_000;
/// Most records one compaction pass reads, and so holds in memory (about 1 MiB of decoded
/// summaries at most): windows of one series merge when they lie this close in the lane,
/// which covers gateways of up to a few thousand series.
pub const COMPACT_SCAN_RECORDS: usize = 4096;
/// Most writes (removes and merged records) in one `apply_batch` of a compaction pass.
const COMPACT_BATCH_OPS: usize = 256;
/// Puts between two compaction passes while the outbox is above its high-water mark: with
/// [`COMPACT_SCAN_RECORDS`] reads per pass, compaction costs at most 32 reads per put.
pub const COMPACT_EVERY_PUTS: u64 = 128;

/// Errors of the outbox.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// A sled operation failed.
    #[error("outbox: {context}")]
    Sled {
        /// What the outbox was doing.
        context: &'static str,
        /// sled's report.
        #[source]
        source: sled::Error,
    },
    /// A value could not be encoded.
    #[error("outbox: cannot encode {what} {lane:?}/{seq}")]
    Encode {
        /// Record or dead letter.
        what: &'static str,
        /// Its lane.
        lane: Lane,
        /// Its seq.
        seq: u64,
        /// postcard's report.
        #[source]
        source: postcard::Error,
    },
}

impl OutboxError {
    /// Whether retrying the same operation later may succeed (I/O may be transient).
    pub fn is_retryable(&self) -> bool {
        matches!(self, OutboxError::Sled { source: sled::Error::Io(_), .. })
    }

    fn sled(context: &'static str) -> impl FnOnce(sled::Error) -> OutboxError {
        move |source| OutboxError::Sled { context, source }
    }
}

/// Counters of one lane.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LaneStats {
    /// Records waiting (gap records included).
    pub records: u64,
    /// Their bytes (keys + values).
    pub bytes: u64,
    /// Seq of the oldest waiting record.
    pub oldest_seq: Option<u64>,
    /// Event time of the oldest waiting record, ms since the Unix epoch: a summary's window
    /// start, an alert's timestamp, the earliest time a gap covers.
    pub oldest_ms: Option<i64>,
}

/// Counters of the whole outbox.
#[derive(Debug, Clone, Default)]
pub struct OutboxStats {
    /// The alerts lane.
    pub alerts: LaneStats,
    /// The summaries lane.
    pub summaries: LaneStats,
    /// Records in the dead-letter tree.
    pub dead_letter_records: u64,
    /// Records evicted at the byte cap since this process opened the outbox.
    pub evicted: u64,
    /// Records expired (older than their lane's TTL) since this process opened the outbox.
    pub expired: u64,
    /// Summaries merged away by compaction since this process opened the outbox.
    pub compacted_in: u64,
    /// Merged summaries compaction wrote instead.
    pub compacted_out: u64,
    /// The byte cap.
    pub max_bytes: u64,
}

impl OutboxStats {
    /// Bytes of all lanes.
    pub fn bytes(&self) -> u64 {
        self.alerts.bytes + self.summaries.bytes
    }

    /// Records of all lanes.
    pub fn records(&self) -> u64 {
        self.alerts.records + self.summaries.records
    }
}

/// What the dead-letter tree keeps of a rejected record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct DeadLetter {
    /// Why it was rejected (upstream's status and message, or why it did not decode).
    reason: String,
    /// Its lane.
    lane: Lane,
    /// When it was moved, ms since the Unix epoch.
    at_ms: i64,
    /// The outbox value as it was stored (version byte + postcard record), kept raw so that
    /// even a record that no longer decodes is preserved byte for byte.
    stored: Vec<u8>,
}

/// Records waiting for upstream. Cheap to clone (an `Arc` inside).
#[derive(Clone, Debug)]
pub struct Outbox {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    tree: sled::Tree,
    dead: sled::Tree,
    agent: String,
    epoch: u64,
    max_bytes: u64,
    policies: Policies,
    metrics: Arc<Metrics>,
    /// Serialises every change so that the tree and the counters agree. Held only for
    /// sled calls (no await, no fsync).
    state: Mutex<State>,
    notify: Notify,
    /// What upstream acknowledged, outside sled (see [`crate::sentmark`]).
    sent_mark: Mutex<MarkFile>,
}

/// The long-outage policies of `[buffer]`, resolved.
#[derive(Debug, Clone, Default)]
struct Policies {
    /// TTL in ms, indexed by [`Lane::tag`].
    ttl_ms: [Option<i64>; 2],
    /// Compaction runs above this many bytes; `None`: off.
    compact_above: Option<u64>,
    /// `buffer.compact_to` in ms; `None`: the default of `compact::coarse_window_ms`.
    compact_to_ms: Option<u64>,
}

impl Policies {
    fn new(cfg: &BufferConfig) -> Policies {
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        Policies {
            ttl_ms: [cfg.alerts_ttl.map(ms), cfg.summaries_ttl.map(ms)],
            compact_above: cfg.compact_above.map(|p| p.of(cfg.max_bytes.bytes())),
            compact_to_ms: cfg.compact_to.map(|d| u64::try_from(d.as_millis()).unwrap_or(0)),
        }
    }

    fn ttl_ms(&self, lane: Lane) -> Option<i64> {
        self.ttl_ms[usize::from(lane.tag())]
    }
}

#[derive(Debug, Default)]
struct State {
    /// Indexed by [`Lane::tag`].
    lanes: [LaneState; 2],
    dead_letter_records: u64,
    evicted: u64,
    expired: u64,
    compacted_in: u64,
    compacted_out: u64,
    eviction_log: RateLimitedLog,
    expiry_log: RateLimitedLog,
    compaction_log: RateLimitedLog,
    /// When `put` last ran an expiry pass.
    last_expiry: Option<Instant>,
    /// Puts since the last compaction pass.
    puts_since_compaction: u64,
    /// Records the last compaction pass removed.
    last_compaction_removed: u64,
    /// Seq of the summaries lane where the next compaction pass starts (0: the oldest).
    compact_cursor: u64,
}

impl State {
    fn lane(&mut self, lane: Lane) -> &mut LaneState {
        &mut self.lanes[usize::from(lane.tag())]
    }

    fn total_bytes(&self) -> u64 {
        self.lanes.iter().map(|l| l.bytes).sum()
    }
}

/// Counts of something worth a log line, logged at most once per [`LOSS_LOG_INTERVAL`].
#[derive(Debug, Default)]
struct RateLimitedLog {
    unlogged: u64,
    last: Option<Instant>,
}

impl RateLimitedLog {
    /// Adds `n`; returns the count to log now, if a line is due.
    fn add(&mut self, n: u64) -> Option<u64> {
        self.unlogged += n;
        if self.unlogged == 0 || self.last.is_some_and(|at| at.elapsed() < LOSS_LOG_INTERVAL) {
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.unlogged))
    }
}

/// A gap record being written or extended by one pass.
#[derive(Debug)]
struct GapEdit {
    gap: Gap,
    /// Its bytes (key + value) as currently counted.
    size: u64,
    /// Created by this pass (at the key of a removed record).
    is_new: bool,
    changed: bool,
}

/// What a pass that drops records into gaps does with the next (non-gap) record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Replace it by (a share of) a gap record.
    Lose,
    /// Leave it; it ends the current gap.
    Keep,
    /// End the pass.
    Stop,
}

#[derive(Debug, Default, Clone)]
struct LaneState {
    next_seq: u64,
    records: u64,
    bytes: u64,
    oldest: Option<u64>,
    /// Event time of the oldest record (see [`LaneStats::oldest_ms`]).
    oldest_ms: Option<i64>,
    /// Highest seq returned by `peek` in this process: those records may be in flight.
    handed_out_through: Option<u64>,
    /// Key of the newest gap found at open: an earlier run may have sent those gaps, and
    /// upstream de-duplicates by id, so they are never extended.
    sealed_through: Option<u64>,
    /// Highest seq present at open: an earlier run may have sent those records, so they are
    /// never merged.
    frozen_through: Option<u64>,
}

impl LaneState {
    fn stats(&self) -> LaneStats {
        LaneStats {
            records: self.records,
            bytes: self.bytes,
            oldest_seq: self.oldest,
            oldest_ms: self.oldest_ms,
        }
    }
}

/// `(from, to)`: the event times a record covers, ms since the Unix epoch. A summary covers
/// its window `[start, start + window)`, an alert its timestamp, a gap what it says.
fn span(body: &RecordBody) -> Option<(i64, i64)> {
    match body {
        RecordBody::Summary(s) => {
            let window = i64::try_from(s.window_ms).unwrap_or(i64::MAX);
            Some((s.start_ms, s.start_ms.saturating_add(window)))
        }
        RecordBody::Alert(a) => Some((a.ts_ms, a.ts_ms)),
        RecordBody::Gap(g) => Some((g.from_ms?, g.to_ms?)),
    }
}

/// Gap reason of a store that sled rolled back to an older state (see [`crate::sentmark`]).
pub const GAP_REASON_ROLLED_BACK: &str = "store_rolled_back";

/// Writes the gap record of a rollback at `resume` (see [`Outbox::report_rollback`]).
fn write_rollback_gap(
    tree: &sled::Tree,
    state: &mut State,
    lane: Lane,
    next: u64,
    resume: u64,
    id: String,
) -> Result<(), OutboxError> {
    tracing::error!(
        lane = lane.as_str(),
        next_seq = next,
        acknowledged_through = resume - 1,
        "the store went back to an older state (damaged sled log?): upstream already holds \
         later records; continuing after them and reporting a store_rolled_back gap"
    );
    let gap = Gap {
        lane,
        first_seq: next,
        last_seq: resume - 1,
        records: 0,
        from_ms: None,
        to_ms: Some(crate::event::now_ms()),
        reason: GAP_REASON_ROLLED_BACK.to_string(),
        events: 0,
    };
    // The gap takes seq `resume`, which upstream has never seen.
    let record = Record { id, seq: resume, body: RecordBody::Gap(gap) };
    let value = encode_record(lane, &record)?;
    let mut batch = sled::Batch::default();
    batch.insert(&record_key(lane, resume), value.clone());
    batch.insert(&next_seq_key(lane), &(resume + 1).to_be_bytes());
    tree.apply_batch(batch).map_err(OutboxError::sled("report a rollback"))?;
    let lane_state = state.lane(lane);
    lane_state.records += 1;
    lane_state.bytes += (RECORD_KEY_LEN + value.len()) as u64;
    lane_state.oldest.get_or_insert(resume);
    lane_state.next_seq = resume + 1;
    Ok(())
}

/// The outbox's state, locked. Every outbox operation changes or reads sled under it, and sled
/// frees what it replaces (nodes, sealed log buffers) through crossbeam-epoch's thread-local
/// bags, handed on only after 64 entries: a thread that works the outbox now and then (tokio's
/// workers) hoarded them. Unlocking hands them on ([`crate::store::release_deferred`]), after
/// the mutex is released (BENCHMARKS.md, "Memory, session 8").
struct Locked<'a>(Option<MutexGuard<'a, State>>);

impl std::ops::Deref for Locked<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        self.0.as_ref().expect("locked until dropped")
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut State {
        self.0.as_mut().expect("locked until dropped")
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        drop(self.0.take());
        crate::store::release_deferred();
    }
}

impl Outbox {
    /// Opens the outbox trees of `store`, counting records and bytes per lane, and enforces
    /// the byte cap at once (it may have been lowered since the last run).
    pub fn open(
        store: &Store,
        agent_id: &str,
        cfg: &BufferConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Outbox, OutboxError> {
        let db = store.db();
        let tree = db.open_tree(TREE_OUTBOX).map_err(OutboxError::sled("open tree"))?;
        let dead =
            db.open_tree(TREE_DEAD_LETTER).map_err(OutboxError::sled("open dead letters"))?;
        let mut state = State { puts_since_compaction: COMPACT_EVERY_PUTS, ..State::default() };
        let mut stored_next = [0u64; 2];
        for item in tree.iter() {
            let (key, value) = item.map_err(OutboxError::sled("scan at open"))?;
            if let Some((lane, seq)) = decode_record_key(&key) {
                let decoded = decode_record(&value);
                let lane_state = state.lane(lane);
                if matches!(decoded, Ok(Record { body: RecordBody::Gap(_), .. })) {
                    lane_state.sealed_through = Some(seq);
                }
                if lane_state.oldest.is_none() {
                    lane_state.oldest = Some(seq);
                    lane_state.oldest_ms = decoded.ok().and_then(|r| span(&r.body)).map(|s| s.0);
                }
                lane_state.records += 1;
                lane_state.bytes += (key.len() + value.len()) as u64;
                lane_state.frozen_through = Some(seq);
                // Keys come in order, so the last record of a lane sets the floor.
                lane_state.next_seq = lane_state.next_seq.max(seq + 1);
            } else if let [META_PREFIX, META_NEXT_SEQ, tag] = key.as_ref()
                && let Some(lane) = Lane::from_tag(*tag)
                && let Ok(bytes) = <[u8; 8]>::try_from(value.as_ref())
            {
                stored_next[usize::from(lane.tag())] = u64::from_be_bytes(bytes);
            } else {
                tracing::warn!(key = ?key.as_ref(), "ignoring an unknown key in the outbox");
            }
        }
        for (lane_state, stored) in state.lanes.iter_mut().zip(stored_next) {
            lane_state.next_seq = lane_state.next_seq.max(stored);
        }
        let sent_mark = MarkFile::open(store.dir(), store.epoch());
        let mut dead_letter_records = 0;
        for item in dead.iter().keys() {
            item.map_err(OutboxError::sled("scan dead letters"))?;
            dead_letter_records += 1;
        }
        state.dead_letter_records = dead_letter_records;
        let outbox = Outbox {
            inner: Arc::new(Inner {
                tree,
                dead,
                agent: agent_id.to_string(),
                epoch: store.epoch(),
                max_bytes: cfg.max_bytes.bytes(),
                policies: Policies::new(cfg),
                metrics,
                state: Mutex::new(State::default()),
                notify: Notify::new(),
                sent_mark: Mutex::new(sent_mark),
            }),
        };
        {
            let mut guard = outbox.lock();
            *guard = state;
            let capped = outbox.enforce_cap(&mut guard);
            outbox.publish(&guard);
            capped?;
            tracing::debug!(
                alerts = guard.lanes[0].records,
                summaries = guard.lanes[1].records,
                bytes = guard.total_bytes(),
                "outbox opened"
            );
        }
        Ok(outbox)
    }

    fn lock(&self) -> Locked<'_> {
        // A panic while holding the lock cannot leave the tree half-written (each change is
        // one apply_batch), so the state is still usable.
        Locked(Some(self.inner.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())))
    }

    /// What upstream acknowledged, as far as the sent mark knows (see [`crate::sentmark`]).
    pub fn sent_mark(&self) -> crate::sentmark::SentMark {
        self.inner.sent_mark.lock().unwrap_or_else(|p| p.into_inner()).mark()
    }

    /// Seqs `first_unused..acked_next` of `lane` are lost and must not be used again: the
    /// outbox (sled) went back to an older state than the processor snapshot, which covers
    /// records up to `acked_next - 1`, or the processor, after its replay, is below what
    /// upstream acknowledged (`acked_next` = the sent mark), so the replay could not
    /// regenerate the records upstream holds, and new records would reuse their ids
    /// (upstream would drop them as duplicates). The lane continues after them: a gap record
    /// (reason [`GAP_REASON_ROLLED_BACK`], seqs `first_unused..acked_next` skipped, `records` and
    /// `events` 0 because what the store held after the state it went back to is unknown,
    /// `to_ms` when) takes the first seq that upstream has never seen. Counts
    /// `store_rollbacks`. Returns the gap's seq: the processor continues after it.
    ///
    /// A power cut before a flush is not a rollback: the journal entries behind every record
    /// upstream got were durable (the processor only sees committed entries), so the replay
    /// regenerates those records with their seqs and the processor reaches the mark.
    pub fn report_rollback(
        &self,
        lane: Lane,
        first_unused: u64,
        acked_next: u64,
    ) -> Result<u64, OutboxError> {
        let mut state = self.lock();
        let at = acked_next.max(state.lane(lane).next_seq);
        let id = gap_id(&self.inner.agent, self.inner.epoch, lane, at);
        write_rollback_gap(&self.inner.tree, &mut state, lane, first_unused, at, id)?;
        Metrics::add(&self.inner.metrics.store_rollbacks, 1);
        self.publish(&state);
        drop(state);
        self.inner.notify.notify_waiters();
        Ok(at)
    }

    /// The next seq the lane expects; 0 for a new lane.
    pub fn next_seq(&self, lane: Lane) -> u64 {
        self.lock().lane(lane).next_seq
    }

    /// Writes the record with id `record_id(agent, epoch, lane, seq)` (`gap_id` for a gap:
    /// every gap has a `:gap` id, which the compact wire format relies on) and
    /// `next_seq = seq + 1`
    /// in one `apply_batch`. A seq below `next_seq` was written by an earlier run (the
    /// processor replays deterministically after a crash): returns `Ok(false)` and writes
    /// nothing. Then runs the long-outage policies (expiry when due, compaction above the
    /// mark, eviction above the cap; see the module doc) and wakes
    /// [`Outbox::wait_for_records`].
    pub fn put(&self, lane: Lane, seq: u64, body: RecordBody) -> Result<bool, OutboxError> {
        self.put_many(lane, [(seq, body)]).map(|written| written == 1)
    }

    /// [`Outbox::put`] for several records of one lane, in increasing seq order, in ONE
    /// `apply_batch` with one `next_seq` (a window close puts thousands of summaries: one
    /// sled write each, and a `next_seq` rewrite each, made sled's log and cache churn);
    /// then the policies, once. Seqs below `next_seq` are skipped (written by an earlier
    /// run). Returns how many were written. Callers keep batches small (the cap is enforced
    /// after the batch).
    pub fn put_many(
        &self,
        lane: Lane,
        records: impl IntoIterator<Item = (u64, RecordBody)>,
    ) -> Result<usize, OutboxError> {
        let inner = &self.inner;
        let mut state = self.lock();
        let mut next_seq = state.lane(lane).next_seq;
        let mut batch = sled::Batch::default();
        let (mut written, mut size) = (0usize, 0u64);
        let mut oldest = None;
        for (seq, body) in records {
            if seq < next_seq {
                continue;
            }
            let id = match body {
                RecordBody::Gap(_) => gap_id(&inner.agent, inner.epoch, lane, seq),
                _ => record_id(&inner.agent, inner.epoch, lane, seq),
            };
            let record = Record { id, seq, body };
            let value = encode_record(lane, &record)?;
            size += (RECORD_KEY_LEN + value.len()) as u64;
            batch.insert(&record_key(lane, seq), value);
            if oldest.is_none() {
                oldest = Some((seq, span(&record.body).map(|s| s.0)));
            }
            next_seq = seq + 1;
            written += 1;
        }
        if written == 0 {
            return Ok(0);
        }
        batch.insert(&next_seq_key(lane), &next_seq.to_be_bytes());
        inner.tree.apply_batch(batch).map_err(OutboxError::sled("put"))?;
        let lane_state = state.lane(lane);
        lane_state.records += written as u64;
        lane_state.bytes += size;
        lane_state.next_seq = next_seq;
        if lane_state.oldest.is_none() {
            let (seq, ms) = oldest.expect("set with the first written record");
            lane_state.oldest = Some(seq);
            lane_state.oldest_ms = ms;
        }
        state.puts_since_compaction = state.puts_since_compaction.saturating_add(written as u64);
        let policed = self.police(&mut state);
        self.publish(&state);
        drop(state);
        // Wake the forwarders even if a policy failed: the records are stored.
        inner.notify.notify_waiters();
        policed.map(|()| written)
    }

    /// The policies a put runs: expiry (when due), compaction (above the mark), eviction
    /// (above the cap), in this order: what is expired need not be merged, and what can be
    /// merged need not be lost.
    fn police(&self, state: &mut State) -> Result<(), OutboxError> {
        let policies = &self.inner.policies;
        if policies.ttl_ms.iter().any(Option::is_some)
            && state.last_expiry.is_none_or(|at| at.elapsed() >= EXPIRY_INTERVAL)
        {
            state.last_expiry = Some(Instant::now());
            let now_ms = event::now_ms();
            for lane in Lane::ALL {
                self.expire_lane(state, lane, now_ms)?;
            }
        }
        if let Some(above) = policies.compact_above {
            let total = state.total_bytes();
            let due = state.puts_since_compaction >= COMPACT_EVERY_PUTS
                || (total > self.inner.max_bytes
                    && state.last_compaction_removed >= COMPACT_EVERY_PUTS);
            if total > above && due {
                state.puts_since_compaction = 0;
                state.last_compaction_removed = self.compact(state)?;
            }
        }
        self.enforce_cap(state)
    }

    /// The oldest records of `lane`: at most `max_records` and `max_bytes` (keys + values),
    /// but at least one if the lane is not empty, so an oversized record cannot block it.
    /// Records older than the lane's TTL are dropped into a gap record first. A record that
    /// no longer decodes is moved to the dead-letter tree and skipped.
    pub fn peek(
        &self,
        lane: Lane,
        max_records: usize,
        max_bytes: u64,
    ) -> Result<Vec<Record>, OutboxError> {
        let mut state = self.lock();
        let expired = self.expire_lane(&mut state, lane, event::now_ms());
        if expired.is_err() {
            self.publish(&state);
        }
        expired?;
        let max_records = max_records.max(1);
        let mut records = Vec::new();
        let mut bytes = 0u64;
        let mut corrupt = Vec::new();
        for item in self.inner.tree.scan_prefix([lane.tag()]) {
            if records.len() >= max_records {
                break;
            }
            let (key, value) = item.map_err(OutboxError::sled("peek"))?;
            let size = (key.len() + value.len()) as u64;
            if !records.is_empty() && bytes + size > max_bytes {
                break;
            }
            match decode_record(&value) {
                Ok(record) => {
                    bytes += size;
                    records.push(record);
                }
                Err(reason) => {
                    if let Some((_, seq)) = decode_record_key(&key) {
                        tracing::warn!(lane = lane.as_str(), seq, %reason, "undecodable outbox record moved to dead letters");
                        corrupt.push((seq, format!("undecodable: {reason}")));
                    }
                }
            }
        }
        for (seq, reason) in corrupt {
            self.move_to_dead_letter(&mut state, lane, &[seq], &reason)?;
        }
        if let Some(last) = records.last() {
            let lane_state = state.lane(lane);
            lane_state.handed_out_through =
                Some(lane_state.handed_out_through.map_or(last.seq, |h| h.max(last.seq)));
        }
        self.publish(&state);
        Ok(records)
    }

    /// Deletes the records of `lane` with seq <= `through` (upstream acknowledged them).
    pub fn remove_through(&self, lane: Lane, through: u64) -> Result<(), OutboxError> {
        let mut state = self.lock();
        let tree = &self.inner.tree;
        let mut batch = sled::Batch::default();
        let mut removed = 0u64;
        let mut bytes = 0u64;
        for item in tree.range(record_key(lane, 0)..=record_key(lane, through)) {
            let (key, value) = item.map_err(OutboxError::sled("scan for remove"))?;
            bytes += (key.len() + value.len()) as u64;
            removed += 1;
            batch.remove(key);
        }
        if removed == 0 {
            return Ok(());
        }
        tree.apply_batch(batch).map_err(OutboxError::sled("remove"))?;
        let lane_state = state.lane(lane);
        lane_state.records -= removed;
        lane_state.bytes -= bytes;
        // Upstream holds the lane through `through` (never past what was written).
        let acknowledged = through.min(lane_state.next_seq.saturating_sub(1));
        let refreshed = self.refresh_oldest(&mut state, lane);
        self.publish(&state);
        drop(state);
        let mut mark = self.inner.sent_mark.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(error) = mark.acknowledged(lane, acknowledged) {
            // A safety net only (it detects a rolled-back store): the delivery stands.
            tracing::warn!(%error, "cannot write the sent mark");
        }
        refreshed
    }

    /// Moves these records to the dead-letter tree (with `reason`) and removes them from the
    /// lane. Records no longer in the lane are skipped.
    pub fn dead_letter(
        &self,
        lane: Lane,
        records: &[Record],
        reason: &str,
    ) -> Result<(), OutboxError> {
        let mut state = self.lock();
        let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
        let moved = self.move_to_dead_letter(&mut state, lane, &seqs, reason);
        self.publish(&state);
        moved
    }

    fn move_to_dead_letter(
        &self,
        state: &mut State,
        lane: Lane,
        seqs: &[u64],
        reason: &str,
    ) -> Result<(), OutboxError> {
        let inner = &self.inner;
        let at_ms = event::now_ms();
        let mut dead_batch = sled::Batch::default();
        let mut lane_batch = sled::Batch::default();
        let (mut moved, mut new_dead, mut bytes) = (0u64, 0u64, 0u64);
        for &seq in seqs {
            let key = record_key(lane, seq);
            let Some(stored) =
                inner.tree.get(key).map_err(OutboxError::sled("read for dead letter"))?
            else {
                continue;
            };
            let letter =
                DeadLetter { reason: reason.to_string(), lane, at_ms, stored: stored.to_vec() };
            let value = postcard::to_extend(&letter, vec![VALUE_VERSION])
                .map_err(|source| OutboxError::Encode { what: "dead letter", lane, seq, source })?;
            if !inner.dead.contains_key(key).map_err(OutboxError::sled("read dead letters"))? {
                new_dead += 1;
            }
            dead_batch.insert(&key, value);
            lane_batch.remove(&key);
            moved += 1;
            bytes += (key.len() + stored.len()) as u64;
        }
        if moved == 0 {
            return Ok(());
        }
        // Dead letters first: a crash between the two batches duplicates, never loses.
        inner.dead.apply_batch(dead_batch).map_err(OutboxError::sled("write dead letters"))?;
        inner.tree.apply_batch(lane_batch).map_err(OutboxError::sled("remove dead letters"))?;
        state.dead_letter_records += new_dead;
        let lane_state = state.lane(lane);
        lane_state.records -= moved;
        lane_state.bytes -= bytes;
        self.refresh_oldest(state, lane)?;
        tracing::warn!(
            lane = lane.as_str(),
            records = moved,
            reason,
            "records moved to dead letters"
        );
        Ok(())
    }

    /// Counters of every lane and of the dead letters.
    pub fn stats(&self) -> OutboxStats {
        let state = self.lock();
        OutboxStats {
            alerts: state.lanes[usize::from(Lane::Alerts.tag())].stats(),
            summaries: state.lanes[usize::from(Lane::Summaries.tag())].stats(),
            dead_letter_records: state.dead_letter_records,
            evicted: state.evicted,
            expired: state.expired,
            compacted_in: state.compacted_in,
            compacted_out: state.compacted_out,
            max_bytes: self.inner.max_bytes,
        }
    }

    /// Resolves at once if any lane has records, else when [`Outbox::put`] adds one.
    pub async fn wait_for_records(&self) {
        loop {
            let notified = self.inner.notify.notified();
            tokio::pin!(notified);
            // Registered before the check, so a put between the check and the await is not
            // missed (notify_waiters only wakes registered waiters).
            notified.as_mut().enable();
            if self.lock().lanes.iter().any(|l| l.records > 0) {
                return;
            }
            notified.await;
        }
    }

    /// Drops the records of every lane older than the lane's TTL at `now_ms` (ms since the
    /// Unix epoch) into `expired` gap records: one bounded pass per lane (see the module
    /// doc). Returns how many records expired. [`Outbox::put`] and [`Outbox::peek`] run it
    /// on their own; this is for callers that want it at a time of their choosing.
    pub fn expire(&self, now_ms: i64) -> Result<u64, OutboxError> {
        let mut state = self.lock();
        let mut expired = 0;
        let mut result = Ok(());
        for lane in Lane::ALL {
            match self.expire_lane(&mut state, lane, now_ms) {
                Ok(n) => expired += n,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        self.publish(&state);
        result.map(|()| expired)
    }

    /// Re-reads the oldest record of `lane` for the counters.
    fn refresh_oldest(&self, state: &mut State, lane: Lane) -> Result<(), OutboxError> {
        let head = match self.inner.tree.scan_prefix([lane.tag()]).next() {
            Some(item) => Some(item.map_err(OutboxError::sled("read oldest"))?),
            None => None,
        };
        let lane_state = state.lane(lane);
        match head {
            Some((key, value)) => {
                lane_state.oldest = decode_record_key(&key).map(|(_, seq)| seq);
                lane_state.oldest_ms =
                    decode_record(&value).ok().and_then(|r| span(&r.body)).map(|s| s.0);
            }
            None => (lane_state.oldest, lane_state.oldest_ms) = (None, None),
        }
        Ok(())
    }

    /// Sets the backlog gauges of the metrics from the counters.
    fn publish(&self, state: &State) {
        let metrics = &self.inner.metrics;
        let records = state.lanes.iter().map(|l| l.records).sum();
        metrics.backlog_bytes.store(state.total_bytes(), std::sync::atomic::Ordering::Relaxed);
        metrics.backlog_records.store(records, std::sync::atomic::Ordering::Relaxed);
        metrics.backlog_oldest_ms.set(state.lanes.iter().filter_map(|l| l.oldest_ms).min());
    }

    /// One expiry pass over `lane` (see the module doc); returns how many records expired.
    fn expire_lane(&self, state: &mut State, lane: Lane, now_ms: i64) -> Result<u64, OutboxError> {
        let Some(ttl_ms) = self.inner.policies.ttl_ms(lane) else { return Ok(0) };
        if now_ms < TTL_CLOCK_FLOOR_MS {
            return Ok(0);
        }
        let cutoff = now_ms.saturating_sub(ttl_ms);
        let expired = self.drop_into_gaps(
            state,
            lane,
            GAP_REASON_EXPIRED,
            EXPIRE_SCAN_RECORDS,
            |body, _| match body.and_then(span) {
                Some((from, to)) if to <= cutoff && from >= TTL_CLOCK_FLOOR_MS => Fate::Lose,
                // Wholly newer than the cutoff: what follows closed later still.
                Some((from, _)) if from > cutoff => Fate::Stop,
                // Partly old, stamped by an unset clock, or undecodable (peek dead-letters it).
                _ => Fate::Keep,
            },
        )?;
        if expired > 0 {
            state.expired += expired;
            Metrics::add(&self.inner.metrics.outbox_expired, expired);
            if let Some(n) = state.expiry_log.add(expired) {
                tracing::warn!(
                    lane = lane.as_str(),
                    expired = n,
                    expired_total = state.expired,
                    ttl_ms,
                    "records older than their TTL replaced by gap records"
                );
            }
        }
        Ok(expired)
    }

    /// One compaction pass over the summaries lane (see the module doc); returns how many
    /// records it removed (merged records are written in place of their first).
    fn compact(&self, state: &mut State) -> Result<u64, OutboxError> {
        let inner = &self.inner;
        let lane = Lane::Summaries;
        let lane_state = state.lane(lane);
        // Never a record upstream may hold: see the invariants.
        let floor = lane_state
            .handed_out_through
            .max(lane_state.frozen_through)
            .map_or(0, |seq| seq.saturating_add(1));
        let start = state.compact_cursor.max(floor);
        let mut planner = Planner::new(inner.policies.compact_to_ms);
        let mut scanned = 0usize;
        let mut last = None;
        let mut rest = inner.tree.range(record_key(lane, start)..=record_key(lane, u64::MAX));
        let mut reached_end = true;
        loop {
            if scanned == COMPACT_SCAN_RECORDS {
                reached_end = false;
                break;
            }
            let Some(item) = rest.next() else { break };
            let (key, value) = item.map_err(OutboxError::sled("scan for compaction"))?;
            let Some((_, seq)) = decode_record_key(&key) else { continue };
            scanned += 1;
            last = Some(seq);
            if let Ok(Record { body: RecordBody::Summary(summary), .. }) = decode_record(&value) {
                planner.offer(seq, summary, (key.len() + value.len()) as u64);
            }
        }
        state.compact_cursor = match last {
            Some(seq) if !reached_end => seq.saturating_add(1),
            _ => 0,
        };
        let merges = planner.merges();
        if merges.is_empty() {
            return Ok(0);
        }
        // One `apply_batch` per run of merges of at most COMPACT_BATCH_OPS writes, not one for
        // the whole pass: sled copies a node on every write of a batch and frees the copies
        // only after the batch, so a pass of 4,096 records in one batch made a 10 MB peak,
        // which stayed in the RSS (BENCHMARKS.md, "Memory, session 8"). A merge is never split.
        let (mut removed, mut records_in, mut bytes_in, mut bytes_out) = (0u64, 0u64, 0u64, 0u64);
        let mut applied = Ok(());
        let mut rest = merges.as_slice();
        while !rest.is_empty() {
            let mut ops = 0;
            let take = rest
                .iter()
                .take_while(|merge| {
                    ops += merge.seqs.len();
                    ops <= COMPACT_BATCH_OPS
                })
                .count()
                .max(1);
            let (run, after) = rest.split_at(take);
            rest = after;
            match self.write_merges(lane, run) {
                Ok(written) => {
                    bytes_out += written;
                    bytes_in += run.iter().map(|m| m.bytes).sum::<u64>();
                    records_in += run.iter().map(|m| m.seqs.len() as u64).sum::<u64>();
                    removed += run.iter().map(|m| m.seqs.len() as u64 - 1).sum::<u64>();
                }
                Err(error) => {
                    applied = Err(error);
                    break;
                }
            }
        }
        let lane_state = state.lane(lane);
        lane_state.records -= removed;
        lane_state.bytes = lane_state.bytes + bytes_out - bytes_in;
        if merges.iter().any(|m| Some(m.seqs[0]) == lane_state.oldest) {
            self.refresh_oldest(state, lane)?;
        }
        applied?;
        let records_out = merges.len() as u64;
        state.compacted_in += records_in;
        state.compacted_out += records_out;
        Metrics::add(&inner.metrics.outbox_compacted_in, records_in);
        Metrics::add(&inner.metrics.outbox_compacted_out, records_out);
        if let Some(n) = state.compaction_log.add(records_in) {
            tracing::info!(
                merged = n,
                merged_total = state.compacted_in,
                written_total = state.compacted_out,
                bytes = state.total_bytes(),
                max_bytes = inner.max_bytes,
                "outbox above its high-water mark: oldest summaries merged into coarser windows"
            );
        }
        Ok(removed)
    }

    /// Writes `run` (merges of the summary lane) in one `apply_batch`: each merged summary at
    /// the key of its first record, the others removed. Returns the bytes written.
    fn write_merges(&self, lane: Lane, run: &[crate::compact::Merge]) -> Result<u64, OutboxError> {
        let inner = &self.inner;
        let mut batch = sled::Batch::default();
        let mut bytes_out = 0;
        for merge in run {
            let first = merge.seqs[0];
            let record = Record {
                id: record_id(&inner.agent, inner.epoch, lane, first),
                seq: first,
                body: RecordBody::Summary(merge.summary.clone()),
            };
            let value = encode_record(lane, &record)?;
            bytes_out += (RECORD_KEY_LEN + value.len()) as u64;
            for &seq in &merge.seqs[1..] {
                batch.remove(&record_key(lane, seq));
            }
            batch.insert(&record_key(lane, first), value);
        }
        inner.tree.apply_batch(batch).map_err(OutboxError::sled("compact"))?;
        Ok(bytes_out)
    }

    /// Evicts summaries, then alerts, until the records fit `max_bytes` or only gap records
    /// are left.
    fn enforce_cap(&self, state: &mut State) -> Result<(), OutboxError> {
        for lane in [Lane::Summaries, Lane::Alerts] {
            if state.total_bytes() <= self.inner.max_bytes {
                break;
            }
            self.evict(state, lane)?;
        }
        Ok(())
    }

    /// Evicts the oldest non-gap records of `lane` (one `apply_batch`) until the outbox fits.
    fn evict(&self, state: &mut State, lane: Lane) -> Result<(), OutboxError> {
        let max = self.inner.max_bytes;
        let evicted =
            self.drop_into_gaps(state, lane, GAP_REASON_OUTBOX_FULL, usize::MAX, |_, total| {
                if total <= max { Fate::Stop } else { Fate::Lose }
            })?;
        if evicted > 0 {
            state.evicted += evicted;
            Metrics::add(&self.inner.metrics.outbox_evicted, evicted);
            if let Some(n) = state.eviction_log.add(evicted) {
                tracing::warn!(
                    evicted = n,
                    evicted_total = state.evicted,
                    bytes = state.total_bytes(),
                    max_bytes = max,
                    "outbox full: oldest records replaced by gap records"
                );
            }
        }
        Ok(())
    }

    /// Reads `lane` from its oldest record (at most `max_scan` records) and replaces the
    /// records `fate` loses by gap records with `reason`, in one `apply_batch`: a lost record
    /// extends the current gap of that reason when the rules of the module doc allow it, and
    /// starts a new gap at its own key otherwise. `fate` sees each non-gap record (`None`
    /// when it does not decode) and the outbox's bytes at that point. Returns how many
    /// records were lost.
    fn drop_into_gaps(
        &self,
        state: &mut State,
        lane: Lane,
        reason: &'static str,
        max_scan: usize,
        mut fate: impl FnMut(Option<&RecordBody>, u64) -> Fate,
    ) -> Result<u64, OutboxError> {
        let inner = &self.inner;
        let handed_out = state.lane(lane).handed_out_through;
        let sealed = state.lane(lane).sealed_through;
        let total_before = state.total_bytes();
        // Only this lane changes, so the lane's new byte count follows from the total.
        let mut total = total_before;
        let mut gaps: BTreeMap<u64, GapEdit> = BTreeMap::new();
        let mut current_gap: Option<u64> = None;
        let mut removed: Vec<u64> = Vec::new();
        for item in inner.tree.scan_prefix([lane.tag()]).take(max_scan) {
            let (key, value) = item.map_err(OutboxError::sled("scan for gaps"))?;
            let Some((_, seq)) = decode_record_key(&key) else { continue };
            let size = (key.len() + value.len()) as u64;
            let decoded = decode_record(&value).ok();
            if let Some(Record { body: RecordBody::Gap(gap), .. }) = &decoded {
                // Gaps are never lost; one of ours may absorb the losses that follow it.
                current_gap = (gap.reason == reason).then_some(seq);
                if current_gap.is_some() {
                    gaps.entry(seq).or_insert_with(|| GapEdit {
                        gap: gap.clone(),
                        size,
                        is_new: false,
                        changed: false,
                    });
                }
                continue;
            }
            match fate(decoded.as_ref().map(|r| &r.body), total) {
                Fate::Stop => break,
                Fate::Keep => {
                    current_gap = None;
                    continue;
                }
                Fate::Lose => {}
            }
            let (time, events) = match &decoded {
                Some(Record { body: RecordBody::Summary(s), .. }) => (Some(s.start_ms), s.count),
                Some(Record { body: RecordBody::Alert(a), .. }) => (Some(a.ts_ms), 0),
                // An undecodable record is lost like any other, its time unknown.
                _ => (None, 0),
            };
            removed.push(seq);
            total -= size;
            // Upstream de-duplicates by id, so a gap it may already hold must not grow: a
            // handed-out gap grows only by seqs handed out with it (they arrive in the same
            // batch), and a gap from an earlier run not at all.
            let gap_seq = match current_gap.filter(|&gap_seq| {
                sealed.is_none_or(|s| gap_seq > s)
                    && handed_out.is_none_or(|h| gap_seq > h || seq <= h)
            }) {
                Some(gap_seq) => gap_seq,
                None => {
                    // A new gap takes the key (and so the id) of the first record it covers.
                    let gap = Gap {
                        lane,
                        first_seq: seq,
                        last_seq: seq,
                        records: 0,
                        from_ms: None,
                        to_ms: None,
                        reason: reason.to_string(),
                        events: 0,
                    };
                    gaps.insert(seq, GapEdit { gap, size: 0, is_new: true, changed: false });
                    current_gap = Some(seq);
                    seq
                }
            };
            let Some(edit) = gaps.get_mut(&gap_seq) else {
                unreachable!("the current gap was inserted above")
            };
            extend_gap(&mut edit.gap, seq, time);
            edit.gap.events += events;
            edit.changed = true;
            let new_size =
                (RECORD_KEY_LEN + self.encode_gap(lane, gap_seq, &edit.gap)?.len()) as u64;
            total = total - edit.size + new_size;
            edit.size = new_size;
        }
        if removed.is_empty() {
            return Ok(0);
        }

        let mut batch = sled::Batch::default();
        for &seq in &removed {
            batch.remove(&record_key(lane, seq));
        }
        // After the removals: a new gap reuses the key of the record it replaces, and sled's
        // Batch keeps the last write per key.
        let mut new_gaps = 0u64;
        for (&gap_seq, edit) in gaps.iter().filter(|(_, edit)| edit.changed) {
            batch.insert(&record_key(lane, gap_seq), self.encode_gap(lane, gap_seq, &edit.gap)?);
            new_gaps += u64::from(edit.is_new);
        }
        inner.tree.apply_batch(batch).map_err(OutboxError::sled("replace by gaps"))?;

        let lost = removed.len() as u64;
        let lane_state = state.lane(lane);
        lane_state.bytes = lane_state.bytes + total - total_before;
        lane_state.records = lane_state.records - lost + new_gaps;
        // The oldest key still holds a record (a gap now, or an older gap), but its time may
        // have changed.
        self.refresh_oldest(state, lane)?;
        Ok(lost)
    }

    fn encode_gap(&self, lane: Lane, seq: u64, gap: &Gap) -> Result<Vec<u8>, OutboxError> {
        let record = Record {
            id: gap_id(&self.inner.agent, self.inner.epoch, lane, seq),
            seq,
            body: RecordBody::Gap(gap.clone()),
        };
        encode_record(lane, &record)
    }
}

/// Makes `gap` cover the lost record `seq` with event time `time`.
fn extend_gap(gap: &mut Gap, seq: u64, time: Option<i64>) {
    gap.first_seq = gap.first_seq.min(seq);
    gap.last_seq = gap.last_seq.max(seq);
    gap.records += 1;
    if let Some(time) = time {
        gap.from_ms = Some(gap.from_ms.map_or(time, |t| t.min(time)));
        gap.to_ms = Some(gap.to_ms.map_or(time, |t| t.max(time)));
    }
}

fn record_key(lane: Lane, seq: u64) -> [u8; RECORD_KEY_LEN] {
    let mut key = [0u8; RECORD_KEY_LEN];
    key[0] = lane.tag();
    key[1..].copy_from_slice(&seq.to_be_bytes());
    key
}

fn next_seq_key(lane: Lane) -> [u8; 3] {
    [META_PREFIX, META_NEXT_SEQ, lane.tag()]
}

fn decode_record_key(key: &[u8]) -> Option<(Lane, u64)> {
    let (&tag, seq) = key.split_first()?;
    let lane = Lane::from_tag(tag)?;
    let seq: [u8; 8] = seq.try_into().ok()?;
    Some((lane, u64::from_be_bytes(seq)))
}

fn encode_record(lane: Lane, record: &Record) -> Result<Vec<u8>, OutboxError> {
    postcard::to_extend(record, vec![VALUE_VERSION]).map_err(|source| OutboxError::Encode {
        what: "record",
        lane,
        seq: record.seq,
        source,
    })
}

fn decode_record(value: &[u8]) -> Result<Record, String> {
    match value.split_first() {
        Some((&VALUE_VERSION, body)) => postcard::from_bytes(body).map_err(|e| e.to_string()),
        Some((version, _)) => Err(format!("unknown version {version}")),
        None => Err("empty value".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ByteSize;
    use proptest::prelude::*;
    use sensors::record::{Alert, AlertState, Severity, Summary};
    use std::sync::atomic::Ordering;

    const AGENT: &str = "gw";
    const BIG: u64 = 64 * 1024 * 1024;

    /// An outbox that only evicts at `max_bytes` (no TTL, no compaction).
    fn open(dir: &tempfile::TempDir, max_bytes: u64) -> (Store, Outbox, Arc<Metrics>) {
        open_with(dir, &BufferConfig::without_policies(ByteSize(max_bytes)))
    }

    fn open_with(dir: &tempfile::TempDir, cfg: &BufferConfig) -> (Store, Outbox, Arc<Metrics>) {
        let store = reopen_store(dir);
        let metrics = Arc::new(Metrics::default());
        let outbox = Outbox::open(&store, AGENT, cfg, Arc::clone(&metrics)).unwrap();
        (store, outbox, metrics)
    }

    /// Opens the store, waiting out the file lock of a just-dropped handle: sled's I/O
    /// threads may still hold the file for a moment after the last handle is dropped.
    fn reopen_store(dir: &tempfile::TempDir) -> Store {
        let db = dir.path().join("db");
        Store::open_after_drop(&db, 1024 * 1024, Duration::from_secs(10)).unwrap().0
    }

    fn summary(start_ms: i64) -> RecordBody {
        RecordBody::Summary(Summary {
            series: "pump-1/temp".into(),
            start_ms,
            window_ms: 1_000,
            count: 3,
            min: 1.0,
            max: 3.0,
            mean: 2.0,
            stddev: 0.8,
            first: 1.0,
            last: 3.0,
            windows: 1,
        })
    }

    fn alert(ts_ms: i64, message_len: usize) -> RecordBody {
        RecordBody::Alert(Alert {
            rule: "hot".into(),
            series: "pump-1/temp".into(),
            state: AlertState::Raised,
            severity: Severity::Critical,
            ts_ms,
            value: 99.0,
            threshold: 90.0,
            message: "x".repeat(message_len),
            labels: Default::default(),
        })
    }

    /// Bytes a record takes in the outbox (key + value).
    fn size(store: &Store, lane: Lane, seq: u64, body: &RecordBody) -> u64 {
        let id = match body {
            RecordBody::Gap(_) => gap_id(AGENT, store.epoch(), lane, seq),
            _ => record_id(AGENT, store.epoch(), lane, seq),
        };
        let record = Record { id, seq, body: body.clone() };
        (RECORD_KEY_LEN + encode_record(lane, &record).unwrap().len()) as u64
    }

    /// Every record of the lane, read from the tree (unlike `peek`, hands nothing out).
    fn all(outbox: &Outbox, lane: Lane) -> Vec<Record> {
        outbox
            .inner
            .tree
            .scan_prefix([lane.tag()])
            .values()
            .map(|value| decode_record(&value.unwrap()).unwrap())
            .collect()
    }

    fn seqs(records: &[Record]) -> Vec<u64> {
        records.iter().map(|r| r.seq).collect()
    }

    fn gap_of(record: &Record) -> Option<&Gap> {
        match &record.body {
            RecordBody::Gap(gap) => Some(gap),
            _ => None,
        }
    }

    #[test]
    fn a_rollback_continues_the_lane_after_what_upstream_acknowledged_with_a_gap() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, outbox, _) = open(&tmp, BIG);
        for seq in 0..5 {
            assert!(outbox.put(Lane::Summaries, seq, summary(seq as i64)).unwrap());
        }
        // An acknowledgement past the last record does not raise the mark past it.
        outbox.remove_through(Lane::Summaries, 99).unwrap();
        assert_eq!(outbox.sent_mark().next(Lane::Summaries), 5);
        drop((outbox, store));
        // Upstream acknowledged through seq 9 before the store went back to seq 5 (what sled
        // does with a damaged log), as far as the mark knows. Opening changes nothing: the
        // processor decides after its replay.
        let (store, outbox, metrics) = open(&tmp, BIG);
        let mut file = crate::sentmark::MarkFile::open(store.dir(), store.epoch());
        file.acknowledged(Lane::Summaries, 9).unwrap();
        drop((outbox, store));
        let (store, outbox, metrics_after) = open(&tmp, BIG);
        drop(metrics);
        assert_eq!(outbox.next_seq(Lane::Summaries), 5);
        assert_eq!(outbox.sent_mark().next(Lane::Summaries), 10);
        assert_eq!(crate::metrics::get(&metrics_after.store_rollbacks), 0);
        assert_eq!(outbox.report_rollback(Lane::Summaries, 5, 10).unwrap(), 10);
        assert_eq!(crate::metrics::get(&metrics_after.store_rollbacks), 1);
        assert_eq!(outbox.next_seq(Lane::Summaries), 11, "continues after the gap");
        assert_eq!(outbox.next_seq(Lane::Alerts), 0, "the other lane is untouched");
        let lane = all(&outbox, Lane::Summaries);
        assert_eq!(seqs(&lane), vec![10]);
        assert_eq!(lane[0].id, gap_id(AGENT, store.epoch(), Lane::Summaries, 10));
        let gap = gap_of(&lane[0]).expect("a gap");
        assert_eq!(
            (gap.reason.as_str(), gap.first_seq, gap.last_seq, gap.records, gap.events),
            (GAP_REASON_ROLLED_BACK, 5, 9, 0, 0)
        );
        assert!(!outbox.put(Lane::Summaries, 7, summary(7)).unwrap(), "skipped seqs stay unused");
        assert!(outbox.put(Lane::Summaries, 11, summary(11)).unwrap());
    }

    #[test]
    fn a_gap_put_by_the_processor_gets_a_gap_id() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, outbox, _) = open(&tmp, BIG);
        let gap = Gap {
            lane: Lane::Summaries,
            first_seq: 0,
            last_seq: 0,
            records: 0,
            from_ms: Some(1),
            to_ms: Some(2),
            reason: "late".into(),
            events: 3,
        };
        assert!(outbox.put(Lane::Summaries, 0, summary(0)).unwrap());
        assert!(outbox.put(Lane::Summaries, 1, RecordBody::Gap(gap)).unwrap());
        let lane = all(&outbox, Lane::Summaries);
        assert_eq!(lane[0].id, record_id(AGENT, store.epoch(), Lane::Summaries, 0));
        assert_eq!(lane[1].id, gap_id(AGENT, store.epoch(), Lane::Summaries, 1));
    }

    #[test]
    fn records_are_peeked_in_order_and_removed_as_a_prefix() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, outbox, _) = open(&tmp, BIG);
        assert_eq!(outbox.next_seq(Lane::Alerts), 0);
        for seq in 0..4 {
            assert!(outbox.put(Lane::Alerts, seq, alert(seq as i64, 3)).unwrap());
        }
        for seq in 0..3 {
            assert!(outbox.put(Lane::Summaries, seq, summary(seq as i64)).unwrap());
        }
        let peeked = outbox.peek(Lane::Alerts, 2, u64::MAX).unwrap();
        assert_eq!(seqs(&peeked), vec![0, 1]);
        assert_eq!(peeked[1].id, record_id(AGENT, store.epoch(), Lane::Alerts, 1));
        assert_eq!(peeked[1].body, alert(1, 3));
        // A byte limit below one record still yields one record.
        assert_eq!(seqs(&outbox.peek(Lane::Summaries, 10, 1).unwrap()), vec![0]);
        let two = size(&store, Lane::Summaries, 0, &summary(0)) * 2;
        assert_eq!(seqs(&outbox.peek(Lane::Summaries, 10, two).unwrap()), vec![0, 1]);

        outbox.remove_through(Lane::Alerts, 1).unwrap();
        assert_eq!(seqs(&all(&outbox, Lane::Alerts)), vec![2, 3]);
        assert_eq!(seqs(&all(&outbox, Lane::Summaries)), vec![0, 1, 2]);
        let stats = outbox.stats();
        assert_eq!(stats.alerts.records, 2);
        assert_eq!(stats.alerts.oldest_seq, Some(2));
        assert_eq!(
            stats.alerts.bytes,
            size(&store, Lane::Alerts, 2, &alert(2, 3))
                + size(&store, Lane::Alerts, 3, &alert(3, 3))
        );
        assert_eq!(stats.summaries.records, 3);
        outbox.remove_through(Lane::Alerts, 99).unwrap();
        assert_eq!(outbox.stats().alerts, LaneStats::default());
        assert_eq!(outbox.next_seq(Lane::Alerts), 4, "removal does not rewind the lane");
    }

    #[test]
    fn a_put_of_an_old_seq_is_refused_after_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, outbox, _) = open(&tmp, BIG);
        assert!(outbox.put(Lane::Summaries, 0, summary(0)).unwrap());
        assert!(outbox.put(Lane::Summaries, 1, summary(1)).unwrap());
        outbox.remove_through(Lane::Summaries, 1).unwrap();
        store.flush().unwrap();
        drop((outbox, store));

        let (_store, outbox, _) = open(&tmp, BIG);
        assert_eq!(outbox.next_seq(Lane::Summaries), 2);
        // The processor replays after a crash and produces seq 1 again: fenced off.
        assert!(!outbox.put(Lane::Summaries, 1, summary(1)).unwrap());
        assert!(all(&outbox, Lane::Summaries).is_empty());
        assert!(outbox.put(Lane::Summaries, 2, summary(2)).unwrap());
        assert_eq!(seqs(&all(&outbox, Lane::Summaries)), vec![2]);
    }

    #[test]
    fn put_many_writes_a_batch_skips_what_an_earlier_run_wrote_and_survives_a_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, outbox, _) = open(&tmp, BIG);
        assert!(outbox.put(Lane::Summaries, 0, summary(0)).unwrap());
        assert!(outbox.put(Lane::Summaries, 1, summary(1)).unwrap());
        // A replay after a crash offers 0..=1 again with new ones: only 2..=4 are written.
        let written =
            outbox.put_many(Lane::Summaries, (0..5).map(|seq| (seq, summary(seq as i64)))).unwrap();
        assert_eq!(written, 3);
        assert_eq!(outbox.next_seq(Lane::Summaries), 5);
        assert_eq!(outbox.stats().summaries.records, 5);
        assert_eq!(outbox.put_many(Lane::Summaries, [(3, summary(3))]).unwrap(), 0);
        let stored = all(&outbox, Lane::Summaries);
        assert_eq!(seqs(&stored), vec![0, 1, 2, 3, 4]);
        assert_eq!(stored[4].body, summary(4));
        store.flush().unwrap();
        drop((outbox, store));

        let (_store, outbox, _) = open(&tmp, BIG);
        assert_eq!(outbox.next_seq(Lane::Summaries), 5, "next_seq written with the batch");
        assert_eq!(outbox.stats().summaries.records, 5);
        assert_eq!(seqs(&all(&outbox, Lane::Summaries)), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn counters_are_right_after_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, outbox, _) = open(&tmp, BIG);
        for seq in 0..5 {
            outbox.put(Lane::Alerts, seq, alert(seq as i64, seq as usize)).unwrap();
            outbox.put(Lane::Summaries, seq, summary(seq as i64)).unwrap();
        }
        outbox.remove_through(Lane::Summaries, 1).unwrap();
        let rejected = outbox.peek(Lane::Alerts, 1, u64::MAX).unwrap();
        outbox.dead_letter(Lane::Alerts, &rejected, "400 Bad Request").unwrap();
        let before = outbox.stats();
        assert_eq!(before.dead_letter_records, 1);
        assert_eq!(before.alerts.oldest_seq, Some(1));
        store.flush().unwrap();
        drop((outbox, store));

        let (_store, outbox, _) = open(&tmp, BIG);
        let after = outbox.stats();
        assert_eq!(after.alerts, before.alerts);
        assert_eq!(after.summaries, before.summaries);
        assert_eq!(after.dead_letter_records, 1);
        assert_eq!(outbox.next_seq(Lane::Alerts), 5);
        assert_eq!(outbox.next_seq(Lane::Summaries), 5);
    }

    #[test]
    fn dead_lettered_records_leave_the_lane_with_their_reason() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, outbox, _) = open(&tmp, BIG);
        for seq in 0..3 {
            outbox.put(Lane::Alerts, seq, alert(0, 1)).unwrap();
        }
        let batch = outbox.peek(Lane::Alerts, 2, u64::MAX).unwrap();
        outbox.dead_letter(Lane::Alerts, &batch, "422 unknown field").unwrap();
        assert_eq!(seqs(&all(&outbox, Lane::Alerts)), vec![2]);
        let dead = store.db().open_tree(TREE_DEAD_LETTER).unwrap();
        let value = dead.get(record_key(Lane::Alerts, 1)).unwrap().unwrap();
        let letter: DeadLetter = postcard::from_bytes(&value[1..]).unwrap();
        assert_eq!(letter.reason, "422 unknown field");
        assert_eq!(decode_record(&letter.stored).unwrap(), batch[1]);
        // Dead-lettering again (a retry after a crash) neither fails nor double counts.
        outbox.dead_letter(Lane::Alerts, &batch, "422 unknown field").unwrap();
        assert_eq!(outbox.stats().dead_letter_records, 2);
    }

    #[test]
    fn eviction_at_the_cap_replaces_the_oldest_summaries_by_one_gap_and_keeps_alerts() {
        let tmp = tempfile::tempdir().unwrap();
        let probe = tempfile::tempdir().unwrap();
        let (probe_store, _, _) = open(&probe, BIG);
        // Room for both alerts and about four summaries.
        let cap = 2 * size(&probe_store, Lane::Alerts, 0, &alert(0, 20))
            + 4 * size(&probe_store, Lane::Summaries, 0, &summary(0))
            + 8;
        drop(probe_store);
        let (_store, outbox, metrics) = open(&tmp, cap);
        outbox.put(Lane::Alerts, 0, alert(5, 20)).unwrap();
        outbox.put(Lane::Alerts, 1, alert(6, 20)).unwrap();
        for seq in 0..10u64 {
            outbox.put(Lane::Summaries, seq, summary(seq as i64 * 1_000)).unwrap();
        }

        assert_eq!(seqs(&all(&outbox, Lane::Alerts)), vec![0, 1], "alerts survive");
        let lane = all(&outbox, Lane::Summaries);
        let gap = gap_of(&lane[0]).expect("the oldest summary record is a gap");
        assert_eq!(lane[0].seq, 0, "the gap sits at the key of the first evicted record");
        assert_eq!(lane[0].id, gap_id(AGENT, _store.epoch(), Lane::Summaries, 0));
        let kept = seqs(&lane[1..]);
        assert!(lane[1..].iter().all(|r| gap_of(r).is_none()), "one gap only");
        // The gap covers exactly the seqs that are gone, in order.
        assert_eq!(gap.first_seq, 0);
        assert_eq!(gap.last_seq + 1, kept[0]);
        assert_eq!(kept, (kept[0]..10).collect::<Vec<_>>());
        assert_eq!(gap.records, kept[0]);
        assert_eq!(gap.from_ms, Some(0));
        assert_eq!(gap.to_ms, Some(gap.last_seq as i64 * 1_000));
        assert_eq!(gap.reason, GAP_REASON_OUTBOX_FULL);
        assert_eq!(gap.lane, Lane::Summaries);

        let stats = outbox.stats();
        assert!(stats.alerts.bytes + stats.summaries.bytes <= cap);
        assert_eq!(stats.evicted, gap.records);
        assert_eq!(metrics.outbox_evicted.load(Ordering::Relaxed), gap.records);
        assert_eq!(stats.summaries.records, lane.len() as u64);
        let counted: u64 =
            lane.iter().map(|r| size(&_store, Lane::Summaries, r.seq, &r.body)).sum();
        assert_eq!(stats.summaries.bytes, counted);
    }

    #[test]
    fn alerts_are_evicted_only_when_no_summary_is_left() {
        let tmp = tempfile::tempdir().unwrap();
        let probe = tempfile::tempdir().unwrap();
        let (probe_store, _, _) = open(&probe, BIG);
        // Three alerts and a gap fit, three alerts and a summary do not.
        let one_gap = RecordBody::Gap(Gap {
            lane: Lane::Summaries,
            first_seq: 0,
            last_seq: 0,
            records: 1,
            from_ms: Some(0),
            to_ms: Some(0),
            reason: GAP_REASON_OUTBOX_FULL.into(),
            events: 0,
        });
        let gap_size = size(&probe_store, Lane::Summaries, 0, &one_gap);
        let summary_size = size(&probe_store, Lane::Summaries, 0, &summary(0));
        assert!(gap_size < summary_size);
        let cap = 3 * size(&probe_store, Lane::Alerts, 0, &alert(0, 40)) + gap_size;
        drop(probe_store);
        let (_store, outbox, _) = open(&tmp, cap);
        outbox.put(Lane::Summaries, 0, summary(0)).unwrap();
        for seq in 0..3 {
            outbox.put(Lane::Alerts, seq, alert(seq as i64, 40)).unwrap();
        }
        // Over the cap: the summary goes first, all alerts stay.
        assert_eq!(seqs(&all(&outbox, Lane::Alerts)), vec![0, 1, 2]);
        let summaries = all(&outbox, Lane::Summaries);
        assert_eq!(summaries.len(), 1);
        assert_eq!(gap_of(&summaries[0]).map(|g| g.records), Some(1));
        // More alerts: now the oldest alerts go, reported by an alert-lane gap.
        for seq in 3..6 {
            outbox.put(Lane::Alerts, seq, alert(seq as i64, 40)).unwrap();
        }
        let alerts = all(&outbox, Lane::Alerts);
        let gap = gap_of(&alerts[0]).expect("an alert gap");
        assert_eq!((gap.first_seq, gap.lane), (0, Lane::Alerts));
        assert_eq!(gap.last_seq + 1, alerts[1].seq);
        assert_eq!(seqs(&alerts[1..]), (alerts[1].seq..6).collect::<Vec<_>>());
    }

    #[test]
    fn a_handed_out_gap_is_not_extended_past_what_was_handed_out() {
        let tmp = tempfile::tempdir().unwrap();
        let probe = tempfile::tempdir().unwrap();
        let (probe_store, _, _) = open(&probe, BIG);
        let cap = 3 * size(&probe_store, Lane::Summaries, 0, &summary(0));
        drop(probe_store);
        let (_store, outbox, _) = open(&tmp, cap);
        for seq in 0..5 {
            outbox.put(Lane::Summaries, seq, summary(0)).unwrap();
        }
        let in_flight = outbox.peek(Lane::Summaries, 1, u64::MAX).unwrap();
        let first_gap = gap_of(&in_flight[0]).unwrap().clone();
        for seq in 5..10 {
            outbox.put(Lane::Summaries, seq, summary(0)).unwrap();
        }
        let lane = all(&outbox, Lane::Summaries);
        assert_eq!(gap_of(&lane[0]), Some(&first_gap), "the gap in flight is unchanged");
        let second = gap_of(&lane[1]).expect("a second gap covers the later evictions");
        assert_eq!(lane[1].seq, first_gap.last_seq + 1);
        assert_eq!(second.first_seq, first_gap.last_seq + 1);
        // Acknowledging the first gap leaves the second one to report its loss.
        outbox.remove_through(Lane::Summaries, in_flight[0].seq).unwrap();
        assert!(gap_of(&all(&outbox, Lane::Summaries)[0]).is_some());
    }

    #[test]
    fn a_gap_from_an_earlier_run_is_not_extended() {
        let tmp = tempfile::tempdir().unwrap();
        let probe = tempfile::tempdir().unwrap();
        let (probe_store, _, _) = open(&probe, BIG);
        let cap = 3 * size(&probe_store, Lane::Summaries, 0, &summary(0));
        drop(probe_store);
        let (store, outbox, _) = open(&tmp, cap);
        for seq in 0..5 {
            outbox.put(Lane::Summaries, seq, summary(0)).unwrap();
        }
        let old_gap = gap_of(&all(&outbox, Lane::Summaries)[0]).unwrap().clone();
        store.flush().unwrap();
        drop((outbox, store));

        let (_store, outbox, _) = open(&tmp, cap);
        for seq in 5..10 {
            outbox.put(Lane::Summaries, seq, summary(0)).unwrap();
        }
        let lane = all(&outbox, Lane::Summaries);
        assert_eq!(gap_of(&lane[0]), Some(&old_gap));
        let new_gap = gap_of(&lane[1]).expect("the evictions of this run get their own gap");
        assert_eq!(new_gap.first_seq, old_gap.last_seq + 1);
    }

    #[tokio::test]
    async fn waiting_for_records_ends_when_a_record_is_put() {
        let tmp = tempfile::tempdir().unwrap();
        let (_store, outbox, _) = open(&tmp, BIG);
        let waiter = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.wait_for_records().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        outbox.put(Lane::Alerts, 0, alert(0, 1)).unwrap();
        tokio::time::timeout(Duration::from_secs(10), waiter).await.unwrap().unwrap();
        // With records waiting it resolves at once.
        tokio::time::timeout(Duration::from_secs(10), outbox.wait_for_records()).await.unwrap();
    }

    #[derive(Debug, Clone)]
    enum Op {
        Put { summary: bool, back: u8, len: u8 },
        Peek { summary: bool, max: u8 },
        RemoveThrough { summary: bool, ahead: u8 },
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (any::<bool>(), prop_oneof![3 => Just(0u8), 1 => 1u8..4], 0u8..60)
                .prop_map(|(summary, back, len)| Op::Put { summary, back, len }),
            2 => (any::<bool>(), 1u8..6).prop_map(|(summary, max)| Op::Peek { summary, max }),
            2 => (any::<bool>(), 0u8..4)
                .prop_map(|(summary, ahead)| Op::RemoveThrough { summary, ahead }),
            1 => Just(Op::Reopen),
        ]
    }

    fn lane_of(summary: bool) -> Lane {
        if summary { Lane::Summaries } else { Lane::Alerts }
    }

    fn body(lane: Lane, seq: u64, len: u8) -> RecordBody {
        match lane {
            Lane::Alerts => alert(seq as i64, usize::from(len)),
            Lane::Summaries => summary(seq as i64),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Without eviction the outbox behaves like a map of lanes to ordered records.
        #[test]
        fn the_outbox_matches_a_btreemap_model(ops in proptest::collection::vec(op(), 1..40)) {
            let tmp = tempfile::tempdir().unwrap();
            let (mut store, mut outbox, _) = open(&tmp, BIG);
            let mut model: BTreeMap<(Lane, u64), RecordBody> = BTreeMap::new();
            let mut next = [0u64; 2];
            for op in ops {
                match op {
                    Op::Put { summary, back, len } => {
                        let lane = lane_of(summary);
                        let n = &mut next[usize::from(lane.tag())];
                        let seq = n.saturating_sub(u64::from(back));
                        let fresh = seq >= *n;
                        let body = body(lane, seq, len);
                        prop_assert_eq!(outbox.put(lane, seq, body.clone()).unwrap(), fresh);
                        if fresh {
                            model.insert((lane, seq), body);
                            *n = seq + 1;
                        }
                    }
                    Op::Peek { summary, max } => {
                        let lane = lane_of(summary);
                        let got = outbox.peek(lane, usize::from(max), u64::MAX).unwrap();
                        let want: Vec<(u64, RecordBody)> = model
                            .range((lane, 0)..=(lane, u64::MAX))
                            .take(usize::from(max))
                            .map(|((_, seq), body)| (*seq, body.clone()))
                            .collect();
                        let got: Vec<(u64, RecordBody)> =
                            got.into_iter().map(|r| (r.seq, r.body)).collect();
                        prop_assert_eq!(got, want);
                    }
                    Op::RemoveThrough { summary, ahead } => {
                        let lane = lane_of(summary);
                        let oldest = model.range((lane, 0)..=(lane, u64::MAX)).next().map(|(k, _)| k.1);
                        let through = oldest.unwrap_or(0) + u64::from(ahead);
                        outbox.remove_through(lane, through).unwrap();
                        model.retain(|(l, seq), _| *l != lane || *seq > through);
                    }
                    Op::Reopen => {
                        drop(outbox);
                        drop(store);
                        (store, outbox, _) = open(&tmp, BIG);
                    }
                }
                let stats = outbox.stats();
                for (lane, lane_stats) in [(Lane::Alerts, &stats.alerts), (Lane::Summaries, &stats.summaries)] {
                    let records: Vec<_> = model.range((lane, 0)..=(lane, u64::MAX)).collect();
                    let bytes: u64 = records.iter().map(|((l, seq), b)| size(&store, *l, *seq, b)).sum();
                    prop_assert_eq!(lane_stats.records, records.len() as u64);
                    prop_assert_eq!(lane_stats.bytes, bytes);
                    prop_assert_eq!(lane_stats.oldest_seq, records.first().map(|((_, s), _)| *s));
                    prop_assert_eq!(outbox.next_seq(lane), next[usize::from(lane.tag())]);
                }
            }
        }

        /// At a small cap every seq ever put is either still there or inside exactly one gap,
        /// the cap holds unless only gaps are left, and alerts go only after all summaries.
        #[test]
        fn eviction_accounts_for_every_record(
            cap in 400u64..3000,
            ops in proptest::collection::vec(op(), 1..60),
        ) {
            let tmp = tempfile::tempdir().unwrap();
            let (mut store, mut outbox, _) = open(&tmp, cap);
            let mut next = [0u64; 2];
            for op in ops {
                let alerts_evicted_before = evicted_in(&outbox, Lane::Alerts);
                match op {
                    Op::Put { summary, len, .. } => {
                        let lane = lane_of(summary);
                        let seq = next[usize::from(lane.tag())];
                        prop_assert!(outbox.put(lane, seq, body(lane, seq, len)).unwrap());
                        next[usize::from(lane.tag())] = seq + 1;
                    }
                    Op::Peek { summary, max } => {
                        outbox.peek(lane_of(summary), usize::from(max), u64::MAX).unwrap();
                    }
                    // No removals here: they would take records out of the accounting.
                    Op::RemoveThrough { .. } => {}
                    Op::Reopen => {
                        drop(outbox);
                        drop(store);
                        (store, outbox, _) = open(&tmp, cap);
                    }
                }
                let mut only_gaps = true;
                let mut total = 0;
                for lane in Lane::ALL {
                    let records = all(&outbox, lane);
                    let mut covered = Vec::new();
                    for record in &records {
                        total += size(&store, lane, record.seq, &record.body);
                        match gap_of(record) {
                            Some(gap) => {
                                prop_assert_eq!(gap.first_seq, record.seq);
                                prop_assert_eq!(gap.records, gap.last_seq - gap.first_seq + 1);
                                covered.extend(gap.first_seq..=gap.last_seq);
                            }
                            None => {
                                only_gaps = false;
                                covered.push(record.seq);
                            }
                        }
                    }
                    let everything: Vec<u64> = (0..next[usize::from(lane.tag())]).collect();
                    prop_assert_eq!(covered, everything, "lane {:?}", lane);
                }
                let stats = outbox.stats();
                prop_assert_eq!(stats.alerts.bytes + stats.summaries.bytes, total);
                prop_assert!(total <= cap || only_gaps, "{} > {}", total, cap);
                if evicted_in(&outbox, Lane::Alerts) > alerts_evicted_before {
                    let summaries = all(&outbox, Lane::Summaries);
                    prop_assert!(summaries.iter().all(|r| gap_of(r).is_some()));
                }
            }
        }
    }

    fn evicted_in(outbox: &Outbox, lane: Lane) -> u64 {
        all(outbox, lane).iter().filter_map(gap_of).map(|g| g.records).sum()
    }

    /// A 1 s summary of `series` with `count` events of value 1, 2, ...
    fn summary_of(series: &str, start_ms: i64, count: u64) -> RecordBody {
        RecordBody::Summary(summary_fields(series, start_ms, count))
    }

    fn summary_fields(series: &str, start_ms: i64, count: u64) -> Summary {
        Summary {
            series: series.into(),
            start_ms,
            window_ms: 1_000,
            count,
            min: 1.0,
            max: count as f64,
            mean: (count as f64 + 1.0) / 2.0,
            stddev: ((count * count - 1) as f64 / 12.0).sqrt(),
            first: 1.0,
            last: count as f64,
            windows: 1,
        }
    }

    fn summary_in(record: &Record) -> &Summary {
        match &record.body {
            RecordBody::Summary(s) => s,
            other => panic!("not a summary: {other:?}"),
        }
    }

    /// Events a record accounts for: a summary's count, a gap's events.
    fn events_of(record: &Record) -> u64 {
        match &record.body {
            RecordBody::Summary(s) => s.count,
            RecordBody::Gap(g) => g.events,
            RecordBody::Alert(_) => 0,
        }
    }

    fn with_ttl(summaries: Option<u64>, alerts: Option<u64>) -> BufferConfig {
        BufferConfig {
            summaries_ttl: summaries.map(Duration::from_secs),
            alerts_ttl: alerts.map(Duration::from_secs),
            ..BufferConfig::without_policies(ByteSize(BIG))
        }
    }

    fn compacting(max_bytes: u64, compact_to: Duration) -> BufferConfig {
        BufferConfig {
            compact_above: Some(crate::config::Percent(50.0)),
            compact_to: Some(compact_to),
            ..BufferConfig::without_policies(ByteSize(max_bytes))
        }
    }

    /// Puts the summaries of `windows` 1 s windows of `series` series (`s-0`, ...) from
    /// 1,000,000 ms on, `events` events each, in closing order from seq 0.
    fn put_windows(outbox: &Outbox, windows: i64, series: usize, events: u64) {
        let mut seq = 0;
        for w in 0..windows {
            for s in 0..series {
                let body = summary_of(&format!("s-{s}"), 1_000_000 + w * 1_000, events);
                outbox.put(Lane::Summaries, seq, body).unwrap();
                seq += 1;
            }
        }
    }

    /// Bytes counted per lane agree with the tree.
    fn assert_counters_match(store: &Store, outbox: &Outbox) {
        let stats = outbox.stats();
        for (lane, lane_stats) in
            [(Lane::Alerts, &stats.alerts), (Lane::Summaries, &stats.summaries)]
        {
            let records = all(outbox, lane);
            let bytes: u64 = records.iter().map(|r| size(store, lane, r.seq, &r.body)).sum();
            assert_eq!(lane_stats.records, records.len() as u64, "{lane:?}");
            assert_eq!(lane_stats.bytes, bytes, "{lane:?}");
            assert_eq!(lane_stats.oldest_seq, records.first().map(|r| r.seq), "{lane:?}");
            let oldest_ms = records.first().and_then(|r| span(&r.body)).map(|s| s.0);
            assert_eq!(lane_stats.oldest_ms, oldest_ms, "{lane:?}");
        }
    }

    #[test]
    fn records_older_than_the_ttl_become_expired_gaps_that_carry_their_events() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, outbox, metrics) = open_with(&tmp, &with_ttl(Some(60), None));
        let base = event::now_ms();
        // Alerts have no TTL here: an old alert stays.
        outbox.put(Lane::Alerts, 0, alert(base - 3_600_000, 5)).unwrap();
        let partly_old = RecordBody::Summary(Summary {
            window_ms: 20_000,
            ..summary_fields("p", base - 70_000, 1)
        });
        let bodies = [
            summary_of("a", base - 121_000, 3),
            summary_of("b", base - 91_000, 4),
            // Its window began before the cutoff but ends after it: it stays, and ends the gap.
            partly_old,
            summary_of("c", base - 81_000, 5),
            // Wholly newer than the cutoff: the pass stops here...
            summary_of("d", base - 30_000, 6),
            // ... so this old one behind it waits for a later pass.
            summary_of("e", base - 100_000, 7),
        ];
        for (seq, body) in bodies.iter().enumerate() {
            outbox.put(Lane::Summaries, seq as u64, body.clone()).unwrap();
        }
        outbox.expire(event::now_ms()).unwrap();

        let lane = all(&outbox, Lane::Summaries);
        assert_eq!(seqs(&lane), vec![0, 2, 3, 4, 5]);
        let first = gap_of(&lane[0]).expect("the two oldest are one gap");
        assert_eq!(first.reason, GAP_REASON_EXPIRED);
        assert_eq!((first.first_seq, first.last_seq, first.records), (0, 1, 2));
        assert_eq!(first.events, 3 + 4, "the gap carries the events of what it replaced");
        assert_eq!((first.from_ms, first.to_ms), (Some(base - 121_000), Some(base - 91_000)));
        assert_eq!(lane[0].id, gap_id(AGENT, store.epoch(), Lane::Summaries, 0));
        assert!(gap_of(&lane[1]).is_none(), "the partly old window stays");
        let second = gap_of(&lane[2]).expect("a kept record ends a gap; a new one follows");
        assert_eq!((second.first_seq, second.records, second.events), (3, 1, 5));
        assert!(gap_of(&lane[3]).is_none() && gap_of(&lane[4]).is_none());
        assert_eq!(seqs(&all(&outbox, Lane::Alerts)), vec![0]);
        assert_eq!(outbox.stats().expired, 3);
        assert_eq!(metrics.outbox_expired.load(Ordering::Relaxed), 3);
        assert_counters_match(&store, &outbox);
    }

    #[test]
    fn alerts_expire_with_an_alerts_ttl_and_peek_sends_the_gap_instead() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, outbox, _) = open_with(&tmp, &with_ttl(None, Some(3_600)));
        let base = event::now_ms();
        outbox.put(Lane::Alerts, 0, alert(base - 7_200_000, 5)).unwrap();
        outbox.put(Lane::Alerts, 1, alert(base - 10_000, 5)).unwrap();
        // Summaries have no TTL here.
        outbox.put(Lane::Summaries, 0, summary_of("a", base - 86_400_000, 1)).unwrap();
        let peeked = outbox.peek(Lane::Alerts, 10, u64::MAX).unwrap();
        assert_eq!(seqs(&peeked), vec![0, 1]);
        let gap = gap_of(&peeked[0]).expect("peek expires first");
        assert_eq!(
            (gap.reason.as_str(), gap.lane, gap.events),
            (GAP_REASON_EXPIRED, Lane::Alerts, 0)
        );
        assert!(gap_of(&peeked[1]).is_none());
        assert!(gap_of(&all(&outbox, Lane::Summaries)[0]).is_none());
        assert_counters_match(&store, &outbox);
    }

    #[test]
    fn records_stamped_by_an_unset_clock_never_expire_and_nothing_expires_before_2020() {
        let tmp = tempfile::tempdir().unwrap();
        let (_store, outbox, _) = open_with(&tmp, &with_ttl(Some(60), None));
        // A gateway without RTC stamped these in 1970.
        outbox.put(Lane::Summaries, 0, summary_of("a", 5_000, 1)).unwrap();
        assert_eq!(outbox.expire(event::now_ms()).unwrap(), 0);
        let base = event::now_ms();
        outbox.put(Lane::Summaries, 1, summary_of("a", base - 600_000, 1)).unwrap();
        // The agent's own clock is unset: no expiry at all.
        assert_eq!(outbox.expire(100_000).unwrap(), 0);
        assert!(all(&outbox, Lane::Summaries).iter().all(|r| gap_of(r).is_none()));
    }

    #[test]
    fn an_expired_gap_that_was_handed_out_or_found_at_open_is_not_extended() {
        let tmp = tempfile::tempdir().unwrap();
        let old = |outbox: &Outbox, seq: u64| {
            let start = event::now_ms() - 600_000 + seq as i64 * 1_000;
            outbox.put(Lane::Summaries, seq, summary_of("a", start, 2)).unwrap();
            outbox.expire(event::now_ms()).unwrap();
        };
        let (store, outbox, _) = open_with(&tmp, &with_ttl(Some(60), None));
        old(&outbox, 0);
        old(&outbox, 1);
        let in_flight = outbox.peek(Lane::Summaries, 1, u64::MAX).unwrap();
        let first = gap_of(&in_flight[0]).unwrap().clone();
        assert_eq!((first.first_seq, first.last_seq, first.events), (0, 1, 4));
        old(&outbox, 2);
        let lane = all(&outbox, Lane::Summaries);
        assert_eq!(gap_of(&lane[0]), Some(&first), "the gap in flight is unchanged");
        assert_eq!(gap_of(&lane[1]).map(|g| (g.first_seq, g.events)), Some((2, 2)));
        store.flush().unwrap();
        drop((outbox, store));

        let (_store, outbox, _) = open_with(&tmp, &with_ttl(Some(60), None));
        old(&outbox, 3);
        let lane = all(&outbox, Lane::Summaries);
        assert_eq!(seqs(&lane), vec![0, 2, 3], "the gap of the earlier run is sealed");
        assert_eq!(gap_of(&lane[1]).map(|g| g.last_seq), Some(2));
        assert_eq!(gap_of(&lane[2]).map(|g| (g.first_seq, g.events)), Some((3, 2)));
    }

    #[test]
    fn compaction_merges_each_series_into_coarse_windows_at_the_seq_of_its_first_record() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, outbox, metrics) = open_with(&tmp, &compacting(BIG, Duration::from_secs(10)));
        // Three series, twelve 1 s windows each, in closing order; an alert in between.
        let mut seq = 0;
        let mut put_bodies = Vec::new();
        for w in 0..12i64 {
            for series in ["a", "b", "c"] {
                let body = summary_fields(series, 1_000_000 + w * 1_000, w as u64 + 1);
                outbox.put(Lane::Summaries, seq, RecordBody::Summary(body.clone())).unwrap();
                put_bodies.push(body);
                seq += 1;
            }
        }
        outbox.put(Lane::Alerts, 0, alert(0, 3)).unwrap();
        let removed = outbox.compact(&mut outbox.lock()).unwrap();

        assert_eq!(removed, 36 - 6);
        let lane = all(&outbox, Lane::Summaries);
        assert_eq!(seqs(&lane), vec![0, 1, 2, 30, 31, 32], "merged records keep the first seq");
        for (i, record) in lane.iter().enumerate() {
            assert_eq!(record.id, record_id(AGENT, store.epoch(), Lane::Summaries, record.seq));
            let s = summary_in(record);
            let members: Vec<Summary> = put_bodies
                .iter()
                .filter(|m| m.series == s.series && m.start_ms / 10_000 * 10_000 == s.start_ms)
                .cloned()
                .collect();
            let expected = crate::compact::merge(&members, s.start_ms, 10_000).unwrap();
            assert_eq!(s, &expected);
            let (start, windows) = if i < 3 { (1_000_000, 10) } else { (1_010_000, 2) };
            assert_eq!((s.start_ms, s.window_ms, s.windows), (start, 10_000, windows));
        }
        let total: u64 = lane.iter().map(events_of).sum();
        assert_eq!(total, 3 * (1..=12).sum::<u64>(), "every event is still there once");
        let stats = outbox.stats();
        assert_eq!((stats.compacted_in, stats.compacted_out), (36, 6));
        assert_eq!(metrics.outbox_compacted_in.load(Ordering::Relaxed), 36);
        assert_eq!(metrics.outbox_compacted_out.load(Ordering::Relaxed), 6);
        assert_eq!(seqs(&all(&outbox, Lane::Alerts)), vec![0], "alerts are never merged");
        assert_counters_match(&store, &outbox);
        // A second pass finds nothing more to merge.
        assert_eq!(outbox.compact(&mut outbox.lock()).unwrap(), 0);
    }

    /// A pass that merges more records than one `apply_batch` takes ([`COMPACT_BATCH_OPS`])
    /// writes them in several batches, never splitting a merge: the result is the same as in
    /// one, and survives a reopen.
    #[test]
    fn a_large_compaction_pass_is_written_in_several_batches_with_the_same_result() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, outbox, _) = open_with(&tmp, &compacting(BIG, Duration::from_secs(100)));
        // Five series, 200 windows of 1 s each: ten merges of 100 records, 1,000 removes.
        put_windows(&outbox, 200, 5, 3);
        const { assert!(1_000 > 3 * COMPACT_BATCH_OPS, "the pass needs several batches") };
        let removed = outbox.compact(&mut outbox.lock()).unwrap();
        assert_eq!(removed, 1_000 - 10);
        let lane = all(&outbox, Lane::Summaries);
        assert_eq!(seqs(&lane), vec![0, 1, 2, 3, 4, 500, 501, 502, 503, 504]);
        assert_eq!(lane.iter().map(events_of).sum::<u64>(), 1_000 * 3);
        assert!(lane.iter().all(|r| summary_in(r).windows == 100));
        assert_eq!((outbox.stats().compacted_in, outbox.stats().compacted_out), (1_000, 10));
        assert_counters_match(&store, &outbox);
        store.flush().unwrap();
        drop((outbox, store));

        let (store, outbox, _) = open_with(&tmp, &compacting(BIG, Duration::from_secs(100)));
        assert_eq!(seqs(&all(&outbox, Lane::Summaries)).len(), 10);
        assert_counters_match(&store, &outbox);
    }

    #[test]
    fn compaction_leaves_handed_out_records_and_those_of_an_earlier_run_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = compacting(BIG, Duration::from_secs(10));
        let (store, outbox, _) = open_with(&tmp, &cfg);
        // a at even seqs, b at odd ones, all in one coarse window.
        for seq in 0..8u64 {
            let series = if seq % 2 == 0 { "a" } else { "b" };
            outbox
                .put(Lane::Summaries, seq, summary_of(series, seq as i64 / 2 * 1_000, 1))
                .unwrap();
        }
        let in_flight = outbox.peek(Lane::Summaries, 3, u64::MAX).unwrap();
        outbox.compact(&mut outbox.lock()).unwrap();
        let lane = all(&outbox, Lane::Summaries);
        assert_eq!(seqs(&lane), vec![0, 1, 2, 3, 4]);
        assert_eq!(&lane[..3], &in_flight[..], "handed-out records are untouched");
        assert_eq!((summary_in(&lane[3]).series.as_str(), summary_in(&lane[3]).windows), ("b", 3));
        assert_eq!((summary_in(&lane[4]).series.as_str(), summary_in(&lane[4]).windows), ("a", 2));
        store.flush().unwrap();
        drop((outbox, store));

        let (_store, outbox, _) = open_with(&tmp, &cfg);
        for seq in 8..12u64 {
            let series = if seq % 2 == 0 { "a" } else { "b" };
            outbox
                .put(Lane::Summaries, seq, summary_of(series, seq as i64 / 2 * 1_000, 1))
                .unwrap();
        }
        outbox.compact(&mut outbox.lock()).unwrap();
        let lane = all(&outbox, Lane::Summaries);
        assert_eq!(seqs(&lane), vec![0, 1, 2, 3, 4, 8, 9], "records of the earlier run stay");
        assert_eq!(summary_in(&lane[4]).windows, 2);
        assert_eq!((summary_in(&lane[5]).series.as_str(), summary_in(&lane[5]).windows), ("a", 2));
    }

    #[test]
    fn puts_above_the_mark_compact_the_backlog_instead_of_evicting_it() {
        let tmp = tempfile::tempdir().unwrap();
        let probe = tempfile::tempdir().unwrap();
        let (probe_store, _, _) = open(&probe, BIG);
        let one = size(&probe_store, Lane::Summaries, 1_000, &summary_of("s-0", 1_000_000, 9));
        drop(probe_store);
        // Room for 400 summaries; 1200 arrive, 300 windows of four series.
        let cap = 400 * one;
        let (store, outbox, metrics) = open_with(&tmp, &compacting(cap, Duration::from_secs(10)));
        put_windows(&outbox, 300, 4, 9);
        let stats = outbox.stats();
        assert_eq!(stats.evicted, 0, "compaction kept the outbox under its cap");
        assert!(stats.summaries.bytes <= cap);
        assert!(stats.compacted_in > 1_000, "{stats:?}");
        assert_eq!(metrics.outbox_evicted.load(Ordering::Relaxed), 0);
        let lane = all(&outbox, Lane::Summaries);
        assert!(lane.iter().all(|r| gap_of(r).is_none()));
        assert_eq!(lane.iter().map(events_of).sum::<u64>(), 1_200 * 9);
        let windows: u32 = lane.iter().map(|r| summary_in(r).windows).sum();
        assert_eq!(windows, 1_200);
        assert_counters_match(&store, &outbox);
    }

    #[derive(Debug, Clone)]
    enum PolicyOp {
        Put { series: u8, age_s: u16, count: u8 },
        Peek { max: u8 },
        Ack,
        Expire,
        Compact,
        Reopen,
    }

    fn policy_op() -> impl Strategy<Value = PolicyOp> {
        prop_oneof![
            8 => (0u8..3, 0u16..200, 1u8..5)
                .prop_map(|(series, age_s, count)| PolicyOp::Put { series, age_s, count }),
            2 => (1u8..6).prop_map(|max| PolicyOp::Peek { max }),
            1 => Just(PolicyOp::Ack),
            1 => Just(PolicyOp::Expire),
            2 => Just(PolicyOp::Compact),
            1 => Just(PolicyOp::Reopen),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Under expiry, compaction and eviction together, every event put is in exactly one
        /// place: a waiting summary, a waiting gap, or a batch upstream acknowledged; a
        /// handed-out summary is never changed; ids follow seqs; the counters match the tree.
        #[test]
        fn every_event_stays_accounted_for_under_every_policy(
            cap in 2_000u64..12_000,
            ops in proptest::collection::vec(policy_op(), 1..80),
        ) {
            let tmp = tempfile::tempdir().unwrap();
            let cfg = BufferConfig {
                summaries_ttl: Some(Duration::from_secs(60)),
                ..compacting(cap, Duration::from_secs(10))
            };
            let (mut store, mut outbox, _) = open_with(&tmp, &cfg);
            let base_s = event::now_ms() / 1_000;
            let (mut next, mut put_events, mut acked_events) = (0u64, 0u64, 0u64);
            let mut peeked: BTreeMap<u64, RecordBody> = BTreeMap::new();
            for op in ops {
                match op {
                    PolicyOp::Put { series, age_s, count } => {
                        let start = (base_s - i64::from(age_s)) * 1_000;
                        let body = summary_of(&format!("s{series}"), start, u64::from(count));
                        prop_assert!(outbox.put(Lane::Summaries, next, body).unwrap());
                        next += 1;
                        put_events += u64::from(count);
                    }
                    PolicyOp::Peek { max } => {
                        for r in outbox.peek(Lane::Summaries, usize::from(max), u64::MAX).unwrap() {
                            peeked.insert(r.seq, r.body);
                        }
                    }
                    PolicyOp::Ack => {
                        if let Some(&through) = peeked.keys().next_back() {
                            let acked = all(&outbox, Lane::Summaries);
                            acked_events += acked.iter().filter(|r| r.seq <= through).map(events_of).sum::<u64>();
                            outbox.remove_through(Lane::Summaries, through).unwrap();
                            peeked.clear();
                        }
                    }
                    PolicyOp::Expire => {
                        outbox.expire(event::now_ms()).unwrap();
                    }
                    PolicyOp::Compact => {
                        outbox.compact(&mut outbox.lock()).unwrap();
                    }
                    PolicyOp::Reopen => {
                        drop(outbox);
                        drop(store);
                        (store, outbox, _) = open_with(&tmp, &cfg);
                        // In flight before the restart: still never merged.
                    }
                }
                let lane = all(&outbox, Lane::Summaries);
                let waiting: u64 = lane.iter().map(events_of).sum();
                prop_assert_eq!(waiting + acked_events, put_events, "events lost or doubled");
                for record in &lane {
                    let id = match &record.body {
                        RecordBody::Gap(_) => gap_id(AGENT, store.epoch(), Lane::Summaries, record.seq),
                        _ => record_id(AGENT, store.epoch(), Lane::Summaries, record.seq),
                    };
                    prop_assert_eq!(&record.id, &id);
                    if let (Some(sent), RecordBody::Summary(_)) = (peeked.get(&record.seq), &record.body) {
                        prop_assert_eq!(&record.body, sent, "a handed-out summary changed");
                    }
                }
                let stats = outbox.stats();
                let bytes: u64 = lane.iter().map(|r| size(&store, Lane::Summaries, r.seq, &r.body)).sum();
                prop_assert_eq!(stats.summaries.bytes, bytes);
                prop_assert_eq!(stats.summaries.records, lane.len() as u64);
                let only_gaps = lane.iter().all(|r| gap_of(r).is_some());
                prop_assert!(bytes <= cap || only_gaps, "{} > {}", bytes, cap);
            }
        }
    }
}
