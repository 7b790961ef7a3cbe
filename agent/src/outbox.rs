//! The outbox: records waiting for upstream, in lanes, under a byte cap.
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
//!   which seqs were lost and which time they covered. Later evictions extend that gap.
//!   Alerts are evicted the same way only when no summary is left. Gap records themselves
//!   are never evicted. Every eviction is counted (`metrics.outbox_evicted`).
//! - **A gap is never extended past what the forwarder already holds.** If the gap record
//!   was handed out by [`Outbox::peek`] (it may be in flight), extending it to seqs the
//!   forwarder has not seen would let the pending ack delete the extension unseen; a new
//!   gap starts instead at the first such evicted seq.
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
//!   [lane tag u8][seq u64 BE]   -> [version u8 = 1][postcard(sensors::record::Record)]
//!   [0xFF][b'n'][lane tag u8]   -> next_seq u64 BE      (every seq < next_seq was written once)
//! tree "dead_letter"
//!   [lane tag u8][seq u64 BE]   -> [version u8 = 1][postcard(DeadLetter { reason, lane,
//!                                   at_ms, stored: the outbox value as it was })]
//! ```
//!
//! Lane tags are 0 (alerts) and 1 (summaries); big-endian seqs make sled's byte order the
//! sequence order, and the `0xFF` prefix sorts the high-water marks after every record.
//! Per-lane record counts and bytes are kept in memory, computed by one scan at open.
//!
//! # Lifecycle
//!
//! 1. **write**: the processor calls [`Outbox::put`] with its deterministic seq; the byte cap
//!    is enforced right there; waiters of [`Outbox::wait_for_records`] wake up.
//! 2. **read**: a forwarder calls [`Outbox::peek`] for the oldest records of a lane (alerts
//!    first) and sends them as one batch.
//! 3. **ack**: upstream answers 2xx / PUBACK.
//! 4. **delete**: [`Outbox::remove_through`] deletes the lane prefix up to the batch's last
//!    seq; a batch rejected as malformed goes to [`Outbox::dead_letter`] instead.
//!
//! Durability comes from the journal writer's group commit (the store flush is db-wide), and
//! from the processor replaying the journal after its last snapshot: a put lost in a power
//! cut is simply made again.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use sensors::record::{Gap, Lane, Record, RecordBody, record_id};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::config::BufferConfig;
use crate::event;
use crate::metrics::Metrics;
use crate::store::{Store, TREE_DEAD_LETTER, TREE_OUTBOX};

/// Version byte that leads every outbox and dead-letter value.
const VALUE_VERSION: u8 = 1;
/// First byte of the per-lane metadata keys; sorts after every lane tag.
const META_PREFIX: u8 = 0xFF;
/// Second byte of the `next_seq` key.
const META_NEXT_SEQ: u8 = b'n';
/// Length of a record key: lane tag + u64.
const RECORD_KEY_LEN: usize = 9;
/// The gap reason for records evicted at the byte cap.
pub const GAP_REASON_OUTBOX_FULL: &str = "outbox_full";
/// How often an ongoing eviction is logged: an outage of days at the cap evicts on every
/// put, and one line a minute (with the totals) says all there is to say.
const EVICTION_LOG_INTERVAL: Duration = Duration::from_secs(60);

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
    /// The byte cap.
    pub max_bytes: u64,
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
    metrics: Arc<Metrics>,
    /// Serialises every change so that the tree and the counters agree. Held only for
    /// sled calls (no await, no fsync).
    state: Mutex<State>,
    notify: Notify,
}

#[derive(Debug, Default)]
struct State {
    /// Indexed by [`Lane::tag`].
    lanes: [LaneState; 2],
    dead_letter_records: u64,
    evicted: u64,
    /// Evictions not yet logged, and when the last log line was written.
    unlogged_evictions: u64,
    last_eviction_log: Option<std::time::Instant>,
}

impl State {
    fn lane(&mut self, lane: Lane) -> &mut LaneState {
        &mut self.lanes[usize::from(lane.tag())]
    }

    fn total_bytes(&self) -> u64 {
        self.lanes.iter().map(|l| l.bytes).sum()
    }
}

/// A gap record being written or extended by one eviction.
#[derive(Debug)]
struct GapEdit {
    gap: Gap,
    /// Its bytes (key + value) as currently counted.
    size: u64,
    /// Created by this eviction (at the key of a removed record).
    is_new: bool,
    changed: bool,
}

#[derive(Debug, Default, Clone)]
struct LaneState {
    next_seq: u64,
    records: u64,
    bytes: u64,
    oldest: Option<u64>,
    /// Highest seq returned by `peek` in this process: those records may be in flight.
    handed_out_through: Option<u64>,
}

impl LaneState {
    fn stats(&self) -> LaneStats {
        LaneStats { records: self.records, bytes: self.bytes, oldest_seq: self.oldest }
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
        let mut state = State::default();
        let mut stored_next = [0u64; 2];
        for item in tree.iter() {
            let (key, value) = item.map_err(OutboxError::sled("scan at open"))?;
            if let Some((lane, seq)) = decode_record_key(&key) {
                let lane_state = state.lane(lane);
                lane_state.records += 1;
                lane_state.bytes += (key.len() + value.len()) as u64;
                lane_state.oldest.get_or_insert(seq);
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
                metrics,
                state: Mutex::new(State::default()),
                notify: Notify::new(),
            }),
        };
        {
            let mut guard = outbox.lock();
            *guard = state;
            outbox.enforce_cap(&mut guard)?;
            tracing::debug!(
                alerts = guard.lanes[0].records,
                summaries = guard.lanes[1].records,
                bytes = guard.total_bytes(),
                "outbox opened"
            );
        }
        Ok(outbox)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the tree half-written (each change is
        // one apply_batch), so the state is still usable.
        self.inner.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The next seq the lane expects; 0 for a new lane.
    pub fn next_seq(&self, lane: Lane) -> u64 {
        self.lock().lane(lane).next_seq
    }

    /// Writes the record with id `record_id(agent, epoch, lane, seq)` and `next_seq = seq + 1`
    /// in one `apply_batch`. A seq below `next_seq` was written by an earlier run (the
    /// processor replays deterministically after a crash): returns `Ok(false)` and writes
    /// nothing. Then enforces the byte cap (see the module doc) and wakes
    /// [`Outbox::wait_for_records`].
    pub fn put(&self, lane: Lane, seq: u64, body: RecordBody) -> Result<bool, OutboxError> {
        let inner = &self.inner;
        let mut state = self.lock();
        if seq < state.lane(lane).next_seq {
            return Ok(false);
        }
        let record = Record { id: record_id(&inner.agent, inner.epoch, lane, seq), seq, body };
        let value = encode_record(lane, &record)?;
        let size = (RECORD_KEY_LEN + value.len()) as u64;
        let mut batch = sled::Batch::default();
        batch.insert(&record_key(lane, seq), value);
        batch.insert(&next_seq_key(lane), &(seq + 1).to_be_bytes());
        inner.tree.apply_batch(batch).map_err(OutboxError::sled("put"))?;
        let lane_state = state.lane(lane);
        lane_state.records += 1;
        lane_state.bytes += size;
        lane_state.next_seq = seq + 1;
        lane_state.oldest.get_or_insert(seq);
        let capped = self.enforce_cap(&mut state);
        drop(state);
        // Wake the forwarders even if the cap could not be enforced: the record is stored.
        inner.notify.notify_waiters();
        capped.map(|()| true)
    }

    /// The oldest records of `lane`: at most `max_records` and `max_bytes` (keys + values),
    /// but at least one if the lane is not empty, so an oversized record cannot block it.
    /// A record that no longer decodes is moved to the dead-letter tree and skipped.
    pub fn peek(
        &self,
        lane: Lane,
        max_records: usize,
        max_bytes: u64,
    ) -> Result<Vec<Record>, OutboxError> {
        let mut state = self.lock();
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
        let oldest = self.oldest_seq(lane)?;
        let lane_state = state.lane(lane);
        lane_state.records -= removed;
        lane_state.bytes -= bytes;
        lane_state.oldest = oldest;
        Ok(())
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
        self.move_to_dead_letter(&mut state, lane, &seqs, reason)
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
        let oldest = self.oldest_seq(lane)?;
        state.dead_letter_records += new_dead;
        let lane_state = state.lane(lane);
        lane_state.records -= moved;
        lane_state.bytes -= bytes;
        lane_state.oldest = oldest;
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

    fn oldest_seq(&self, lane: Lane) -> Result<Option<u64>, OutboxError> {
        match self.inner.tree.scan_prefix([lane.tag()]).next() {
            Some(item) => {
                let (key, _) = item.map_err(OutboxError::sled("read oldest"))?;
                Ok(decode_record_key(&key).map(|(_, seq)| seq))
            }
            None => Ok(None),
        }
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
        if state.unlogged_evictions > 0
            && state.last_eviction_log.is_none_or(|at| at.elapsed() >= EVICTION_LOG_INTERVAL)
        {
            tracing::warn!(
                evicted = state.unlogged_evictions,
                evicted_total = state.evicted,
                bytes = state.total_bytes(),
                max_bytes = self.inner.max_bytes,
                "outbox full: oldest records replaced by gap records"
            );
            state.unlogged_evictions = 0;
            state.last_eviction_log = Some(std::time::Instant::now());
        }
        Ok(())
    }

    /// Evicts the oldest non-gap records of `lane` (one `apply_batch`) until the outbox fits.
    fn evict(&self, state: &mut State, lane: Lane) -> Result<(), OutboxError> {
        let inner = &self.inner;
        let handed_out = state.lane(lane).handed_out_through;
        let total_before = state.total_bytes();
        // Only this lane changes, so the lane's new byte count follows from the total.
        let mut total = total_before;
        let mut gaps: BTreeMap<u64, GapEdit> = BTreeMap::new();
        let mut current_gap: Option<u64> = None;
        let mut removed: Vec<u64> = Vec::new();
        for item in inner.tree.scan_prefix([lane.tag()]) {
            if total <= inner.max_bytes {
                break;
            }
            let (key, value) = item.map_err(OutboxError::sled("scan for eviction"))?;
            let Some((_, seq)) = decode_record_key(&key) else { continue };
            let size = (key.len() + value.len()) as u64;
            let time = match decode_record(&value) {
                Ok(Record { body: RecordBody::Gap(gap), .. }) => {
                    // Gaps are never evicted; ours may absorb the evictions that follow it.
                    current_gap = (gap.reason == GAP_REASON_OUTBOX_FULL).then_some(seq);
                    if current_gap.is_some() {
                        gaps.insert(seq, GapEdit { gap, size, is_new: false, changed: false });
                    }
                    continue;
                }
                Ok(Record { body: RecordBody::Summary(s), .. }) => Some(s.start_ms),
                Ok(Record { body: RecordBody::Alert(a), .. }) => Some(a.ts_ms),
                // An undecodable record is evicted like any other, its time unknown.
                Err(_) => None,
            };
            removed.push(seq);
            total -= size;
            // Extending a handed-out gap is safe only with seqs that were handed out too:
            // otherwise the ack of the old gap would delete the news of this loss unseen.
            let gap_seq = match current_gap
                .filter(|&gap_seq| handed_out.is_none_or(|h| gap_seq > h || seq <= h))
            {
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
                        reason: GAP_REASON_OUTBOX_FULL.to_string(),
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
            edit.changed = true;
            let new_size =
                (RECORD_KEY_LEN + self.encode_gap(lane, gap_seq, &edit.gap)?.len()) as u64;
            total = total - edit.size + new_size;
            edit.size = new_size;
        }
        if removed.is_empty() {
            return Ok(());
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
        inner.tree.apply_batch(batch).map_err(OutboxError::sled("evict"))?;

        let evicted = removed.len() as u64;
        let lane_state = state.lane(lane);
        lane_state.bytes = lane_state.bytes + total - total_before;
        lane_state.records = lane_state.records - evicted + new_gaps;
        // The oldest key still holds a record (a gap now, or an older gap): `oldest` stays.
        state.evicted += evicted;
        state.unlogged_evictions += evicted;
        Metrics::add(&inner.metrics.outbox_evicted, evicted);
        Ok(())
    }

    fn encode_gap(&self, lane: Lane, seq: u64, gap: &Gap) -> Result<Vec<u8>, OutboxError> {
        let record = Record {
            id: record_id(&self.inner.agent, self.inner.epoch, lane, seq),
            seq,
            body: RecordBody::Gap(gap.clone()),
        };
        encode_record(lane, &record)
    }
}

/// Makes `gap` cover the evicted record `seq` with event time `time`.
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
