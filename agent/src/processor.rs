//! The processor: applies journal entries, in journal order, to the [`rules`] and the
//! [`summary`] windows, and numbers the records they produce.
//!
//! # Invariants
//!
//! - **Deterministic.** The output is a function of (snapshot, entries after it) and nothing
//!   else: no clock is read in [`Processor::apply`] (time comes from event timestamps,
//!   receive times and journal ticks), every map is a `BTreeMap` or a
//!   [`SeriesMap`](crate::series_map::SeriesMap) (hashed, but encoded and scanned for output
//!   in key order), and floating point runs the same operations in the same order. Replaying
//!   the same entries from the same snapshot gives byte-identical records with the same
//!   sequence numbers.
//! - **Sequence numbers live in the state.** Each lane (alerts, summaries) has a counter in
//!   the processor state; the first record of a lane is seq 1. A restarted processor resumes
//!   from the snapshot's counters and regenerates, during replay, exactly the records (and
//!   seqs) the crashed run produced after that snapshot. The outbox ignores a seq it already
//!   holds, so replay never duplicates a record and never loses one the crash cut off.
//! - **Exactly once per entry.** [`Processor::position`] is the last applied journal seq;
//!   [`Processor::apply`] ignores an entry at or below it, so overlapping replay and live
//!   batches are harmless.
//! - **Snapshot after outputs.** The task writes a batch's records to the outbox before it
//!   saves a snapshot covering that batch, and one database-wide flush makes both durable:
//!   a durable snapshot never covers records that are not.
//!
//! # Snapshot layout
//!
//! ```text
//! [SNAPSHOT_VERSION: u8] postcard(State {
//!     position: u64,            last applied journal seq
//!     last_alert_seq: u64,      last seq used in the alerts lane (0 = none)
//!     last_summary_seq: u64,    last seq used in the summaries lane (0 = none)
//!     rules: RulesState,        rule → series → episode + kind state (timers included)
//!     windows: WindowsState,    clock + series → open windows
//!     late: Dropped,            late events not yet reported in a gap (version 3)
//!     future: Dropped,          future events not yet reported in a gap (version 3)
//! })
//! ```
//!
//! Version 2 snapshots (without the two tallies) are still read.
//!
//! # Events that no summary counts
//!
//! A late event (its window already closed) and a future event (stamped beyond
//! `max_future`) are valid readings that no summary will count. So that a backend can still
//! account for every event it was sent, the processor tallies them and reports each tally
//! as a gap record in the summaries lane (reason [`GAP_REASON_LATE`] or
//! [`GAP_REASON_FUTURE`], `events` = how many, `from_ms`/`to_ms` = their timestamps, no
//! records lost: `records` and the seqs are 0). A tally is reported at the next clock tick or
//! window close, so a burst of redeliveries after an outage becomes one gap, not one per
//! event; it is in the snapshot until then.
//!
//! The compiled rules and the window parameters come from the configuration at every start,
//! so a snapshot survives rule edits (see [`rules`] and [`summary`] for how state adapts).
//!
//! # Lifecycle of the task ([`run`])
//!
//! load snapshot → restore (or start fresh if it cannot be decoded) → replay the journal
//! after the snapshot's position → apply live batches → every `journal.snapshot_interval`:
//! save snapshot, flush, trim the journal → on channel close: final snapshot and flush.
//! Open windows are not force-closed at shutdown: they are in the snapshot and close after
//! the restart, as if the agent had never stopped.
//!
//! [`rules`]: crate::rules
//! [`summary`]: crate::summary

use std::sync::Arc;
use std::time::Duration;

use sensors::record::{AlertState, Gap, Lane, RecordBody};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, error, info, warn};

use crate::config::Config;
use crate::event::{self, Entry};
use crate::journal::{JournalError, JournalReader};
use crate::metrics::{self, Metrics};
use crate::outbox::{Outbox, OutboxError};
use crate::readmodel::ReadModel;
use crate::rules::{RuleError, Rules, RulesState, ScoreSample};
use crate::store::{Store, StoreError};
use crate::summary::{Admission, SummaryError, Windows, WindowsState};

/// Version byte leading a snapshot. Bump it when [`State`] changes shape: postcard is
/// positional, so an old reader cannot skip new fields.
pub const SNAPSHOT_VERSION: u8 = 3;
/// The previous version, still read: [`State`] without the tallies of dropped events.
const SNAPSHOT_VERSION_2: u8 = 2;

/// Gap reason for events that arrived after their window closed.
pub const GAP_REASON_LATE: &str = "late";
/// Gap reason for events stamped too far in the future.
pub const GAP_REASON_FUTURE: &str = "future";

/// Events no summary counts, waiting to be reported in a gap record.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Dropped {
    events: u64,
    from_ms: i64,
    to_ms: i64,
}

impl Dropped {
    fn add(&mut self, ts_ms: i64) {
        if self.events == 0 {
            (self.from_ms, self.to_ms) = (ts_ms, ts_ms);
        } else {
            self.from_ms = self.from_ms.min(ts_ms);
            self.to_ms = self.to_ms.max(ts_ms);
        }
        self.events += 1;
    }

    /// The gap reporting this tally (if it holds any events), which empties it.
    fn take_gap(&mut self, reason: &str) -> Option<Gap> {
        if self.events == 0 {
            return None;
        }
        let tally = std::mem::take(self);
        Some(Gap {
            lane: Lane::Summaries,
            first_seq: 0,
            last_seq: 0,
            records: 0,
            from_ms: Some(tally.from_ms),
            to_ms: Some(tally.to_ms),
            reason: reason.to_string(),
            events: tally.events,
        })
    }
}

/// Shortest time between two snapshots, whatever `journal.snapshot_interval` says: each
/// snapshot costs a database-wide fsync, and SD-card wear grows with fsyncs.
pub const MIN_SNAPSHOT_INTERVAL: Duration = Duration::from_secs(1);

/// Errors of the processor.
#[derive(Debug, thiserror::Error)]
pub enum ProcessorError {
    /// A rule in the configuration is invalid.
    #[error(transparent)]
    Rules(#[from] RuleError),
    /// The `[summary]` configuration is invalid.
    #[error(transparent)]
    Summary(#[from] SummaryError),
    /// A snapshot is empty (not even a version byte).
    #[error("the processor snapshot is empty")]
    SnapshotEmpty,
    /// A snapshot was written by another version of the state.
    #[error("the processor snapshot has version {found}, this agent reads version {expected}")]
    SnapshotVersion {
        /// The snapshot's version byte.
        found: u8,
        /// [`SNAPSHOT_VERSION`].
        expected: u8,
    },
    /// A snapshot's body does not decode.
    #[error("the processor snapshot does not decode")]
    SnapshotDecode(#[source] postcard::Error),
    /// A snapshot has bytes after its state (truncated or overwritten value).
    #[error("the processor snapshot has {extra} unexpected trailing bytes")]
    SnapshotTrailing {
        /// How many bytes follow the state.
        extra: usize,
    },
    /// The store failed to load, save or flush a snapshot.
    #[error("processor: cannot {action} the snapshot")]
    Store {
        /// What the processor was doing.
        action: &'static str,
        /// The store's report.
        #[source]
        source: StoreError,
    },
    /// The journal could not be read.
    #[error("processor: cannot read the journal")]
    Journal(#[source] JournalError),
    /// A record could not be written to the outbox.
    #[error("processor: cannot write record {seq} of lane {} to the outbox", lane.as_str())]
    Outbox {
        /// The record's lane.
        lane: Lane,
        /// The record's seq.
        seq: u64,
        /// The outbox's report.
        #[source]
        source: OutboxError,
    },
    /// A blocking task (replay, flush) panicked or was cancelled.
    #[error("processor: the blocking {task} task failed")]
    Task {
        /// Which task.
        task: &'static str,
        /// tokio's report.
        #[source]
        source: tokio::task::JoinError,
    },
}

impl ProcessorError {
    /// Whether the error is about the snapshot's bytes (the caller may start fresh) rather
    /// than the configuration (which a fresh start does not fix).
    pub fn is_snapshot_error(&self) -> bool {
        matches!(
            self,
            ProcessorError::SnapshotEmpty
                | ProcessorError::SnapshotVersion { .. }
                | ProcessorError::SnapshotDecode(_)
                | ProcessorError::SnapshotTrailing { .. }
        )
    }
}

/// One record produced by the processor, numbered in its lane.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// The lane the record goes to.
    pub lane: Lane,
    /// Its sequence number in the lane (1, 2, ...).
    pub seq: u64,
    /// The record.
    pub body: RecordBody,
}

/// A read-only view of the processor for status pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProcessorStats {
    /// Last applied journal seq (0 = none).
    pub position: u64,
    /// Open summary windows over all series.
    pub open_windows: usize,
    /// Raised, not yet cleared alerts.
    pub active_alerts: usize,
    /// Series holding state (an open window or a pending/active rule).
    pub series: usize,
}

/// The snapshotted state, owned (for decoding).
#[derive(Deserialize)]
struct State {
    position: u64,
    last_alert_seq: u64,
    last_summary_seq: u64,
    rules: RulesState,
    windows: WindowsState,
    late: Dropped,
    future: Dropped,
}

/// A version 2 snapshot: [`State`] without the tallies.
#[derive(Deserialize)]
struct StateV2 {
    position: u64,
    last_alert_seq: u64,
    last_summary_seq: u64,
    rules: RulesState,
    windows: WindowsState,
}

/// The snapshotted state, borrowed (for encoding without a copy). Field order and types must
/// match [`State`]: postcard encodes `&T` as `T`, positionally.
#[derive(Serialize)]
struct StateRef<'a> {
    position: u64,
    last_alert_seq: u64,
    last_summary_seq: u64,
    rules: &'a RulesState,
    windows: &'a WindowsState,
    late: &'a Dropped,
    future: &'a Dropped,
}

/// All rule and window state, and the lane counters. See the module docs.
#[derive(Debug, Clone)]
pub struct Processor {
    position: u64,
    last_alert_seq: u64,
    last_summary_seq: u64,
    rules: Rules,
    windows: Windows,
    late: Dropped,
    future: Dropped,
    /// Source names by index, to label rejected events in metrics.
    source_names: Vec<String>,
}

impl Processor {
    /// A processor with empty state at journal position 0.
    pub fn new(config: &Config) -> Result<Processor, ProcessorError> {
        Ok(Processor {
            position: 0,
            last_alert_seq: 0,
            last_summary_seq: 0,
            rules: Rules::new(&config.rules)?,
            windows: Windows::new(&config.summary)?,
            late: Dropped::default(),
            future: Dropped::default(),
            source_names: source_names(config),
        })
    }

    /// A processor continuing from a [`Processor::snapshot`].
    pub fn restore(config: &Config, snapshot: &[u8]) -> Result<Processor, ProcessorError> {
        let (&version, body) = snapshot.split_first().ok_or(ProcessorError::SnapshotEmpty)?;
        let (state, rest): (State, &[u8]) = match version {
            SNAPSHOT_VERSION => {
                postcard::take_from_bytes(body).map_err(ProcessorError::SnapshotDecode)?
            }
            SNAPSHOT_VERSION_2 => {
                let (old, rest): (StateV2, &[u8]) =
                    postcard::take_from_bytes(body).map_err(ProcessorError::SnapshotDecode)?;
                let state = State {
                    position: old.position,
                    last_alert_seq: old.last_alert_seq,
                    last_summary_seq: old.last_summary_seq,
                    rules: old.rules,
                    windows: old.windows,
                    late: Dropped::default(),
                    future: Dropped::default(),
                };
                (state, rest)
            }
            found => {
                return Err(ProcessorError::SnapshotVersion { found, expected: SNAPSHOT_VERSION });
            }
        };
        if !rest.is_empty() {
            return Err(ProcessorError::SnapshotTrailing { extra: rest.len() });
        }
        Ok(Processor {
            position: state.position,
            last_alert_seq: state.last_alert_seq,
            last_summary_seq: state.last_summary_seq,
            rules: Rules::restore(&config.rules, state.rules)?,
            windows: Windows::restore(&config.summary, state.windows)?,
            late: state.late,
            future: state.future,
            source_names: source_names(config),
        })
    }

    /// The state as bytes: [`SNAPSHOT_VERSION`] + postcard. Equal states give equal bytes.
    pub fn snapshot(&self) -> Vec<u8> {
        let state = StateRef {
            position: self.position,
            last_alert_seq: self.last_alert_seq,
            last_summary_seq: self.last_summary_seq,
            rules: self.rules.state(),
            windows: self.windows.state(),
            late: &self.late,
            future: &self.future,
        };
        let mut bytes = vec![SNAPSHOT_VERSION];
        // postcard fails only on unknown-length sequences or a full buffer; the state has
        // neither (maps know their length, the Vec grows).
        let body = postcard::to_stdvec(&state)
            .expect("postcard encodes the processor state: no unknown-length sequences");
        bytes.extend_from_slice(&body);
        bytes
    }

    /// The last applied journal seq (0 = none).
    pub fn position(&self) -> u64 {
        self.position
    }

    /// The last seq used in `lane` (0 = none).
    pub fn last_seq(&self, lane: Lane) -> u64 {
        match lane {
            Lane::Alerts => self.last_alert_seq,
            Lane::Summaries => self.last_summary_seq,
        }
    }

    /// Makes the next seq of `lane` larger than `last_seq`. For a processor that had to start
    /// fresh (its snapshot was lost) next to an outbox that still knows the old seqs: reusing
    /// them would make the outbox ignore new records, and upstream drop them as duplicates.
    pub fn skip_seqs_through(&mut self, lane: Lane, last_seq: u64) {
        let counter = match lane {
            Lane::Alerts => &mut self.last_alert_seq,
            Lane::Summaries => &mut self.last_summary_seq,
        };
        *counter = (*counter).max(last_seq);
    }

    /// Applies one entry (ignored if `seq <= position`). Pushes the records it produces to
    /// `out`, numbered from the processor's lane counters, and counts metrics
    /// (`events_processed`, `alerts_raised`/`alerts_cleared`, `summaries`, `late_events`,
    /// `future_events`, and non-finite values as rejected input of the event's source).
    ///
    /// Within one entry, summaries come first (the windows the entry's time closed), then the
    /// gaps reporting late and future events (at ticks and window closes), then alerts in
    /// rule order.
    pub fn apply(&mut self, seq: u64, entry: &Entry, metrics: &Metrics, out: &mut Vec<Output>) {
        if seq <= self.position {
            return;
        }
        self.position = seq;
        let mut summaries = Vec::new();
        let mut alerts = Vec::new();
        let admission = match entry {
            Entry::Tick { now_ms } => {
                self.windows.advance(*now_ms, &mut summaries);
                None
            }
            Entry::Event(event) => {
                Metrics::add(&metrics.events_processed, 1);
                Some((event, self.windows.on_event(event, &mut summaries)))
            }
        };
        // The rules' timers run on the same clock as the windows (ticks and receive times):
        // what fell due before this entry fires before the entry's event is applied.
        if let Some(clock) = self.windows.state().clock() {
            self.rules.on_tick(clock, &mut alerts);
        }
        if let Some((event, admission)) = admission {
            match admission {
                Admission::Accepted => self.rules.on_event(event, &mut alerts),
                // A late event missed its window but is still a valid reading: the rules,
                // which have no windows, see it.
                Admission::Late => {
                    Metrics::add(&metrics.late_events, 1);
                    self.late.add(event.ts_ms);
                    self.rules.on_event(event, &mut alerts);
                }
                Admission::Future => {
                    Metrics::add(&metrics.future_events, 1);
                    self.future.add(event.ts_ms);
                }
                Admission::NotFinite => {
                    let source = self
                        .source_names
                        .get(usize::from(event.source))
                        .map_or("unknown", String::as_str);
                    metrics.reject(source, "non_finite_value");
                }
            }
        }
        // Dropped events are reported with the clock's ticks and window closes.
        let report_dropped = matches!(entry, Entry::Tick { .. }) || !summaries.is_empty();
        for summary in summaries {
            Metrics::add(&metrics.summaries, 1);
            self.last_summary_seq += 1;
            out.push(Output {
                lane: Lane::Summaries,
                seq: self.last_summary_seq,
                body: RecordBody::Summary(summary),
            });
        }
        if report_dropped {
            let late = self.late.take_gap(GAP_REASON_LATE);
            let future = self.future.take_gap(GAP_REASON_FUTURE);
            for gap in late.into_iter().chain(future) {
                self.last_summary_seq += 1;
                out.push(Output {
                    lane: Lane::Summaries,
                    seq: self.last_summary_seq,
                    body: RecordBody::Gap(gap),
                });
            }
        }
        for alert in alerts {
            match alert.state {
                AlertState::Raised => Metrics::add(&metrics.alerts_raised, 1),
                AlertState::Cleared => Metrics::add(&metrics.alerts_cleared, 1),
            }
            metrics.alert_transition(&alert.rule, alert.state == AlertState::Raised);
            self.last_alert_seq += 1;
            out.push(Output {
                lane: Lane::Alerts,
                seq: self.last_alert_seq,
                body: RecordBody::Alert(alert),
            });
        }
    }

    /// Starts (or stops) recording the anomaly rules' scores, one [`ScoreSample`] per scored
    /// event, for `edgewise replay --scores`. Off by default; costs nothing while off.
    pub fn record_scores(&mut self, on: bool) {
        self.rules.record_scores(on);
    }

    /// The scores recorded since the last call, in processing order.
    pub fn take_scores(&mut self) -> Vec<ScoreSample> {
        self.rules.take_scores()
    }

    /// Adopts a new configuration's rules and summary settings (hot reload), keeping the
    /// state of rules that still exist with the same kind and of open windows. The position
    /// and lane counters are unchanged. On error the processor is left as it was.
    pub fn reconfigure(&mut self, config: &Config) -> Result<(), ProcessorError> {
        let mut rules = Rules::restore(&config.rules, self.rules.state().clone())?;
        let windows = Windows::restore(&config.summary, self.windows.state().clone())?;
        rules.record_scores(self.rules.is_recording());
        (self.rules, self.windows) = (rules, windows);
        self.source_names = source_names(config);
        Ok(())
    }

    /// Hot reload with warm-up: adopts `config` like [`Processor::reconfigure`], and for every
    /// rule in `warm` (new or changed) takes the baselines that `warmed` (the new rule set run
    /// over the journal's retained history, see [`warm_up`]) built, keeping the alert episodes
    /// that are up. Unchanged rules keep their state as it is.
    pub fn reconfigure_warm(
        &mut self,
        config: &Config,
        warm: &[String],
        warmed: &RulesState,
    ) -> Result<(), ProcessorError> {
        let mut state = self.rules.state().clone();
        for rule in warm {
            state.adopt_warmed(rule, warmed);
        }
        let mut rules = Rules::restore(&config.rules, state)?;
        let windows = Windows::restore(&config.summary, self.windows.state().clone())?;
        rules.record_scores(self.rules.is_recording());
        (self.rules, self.windows) = (rules, windows);
        self.source_names = source_names(config);
        Ok(())
    }

    /// Read-only view for status.
    pub fn stats(&self) -> ProcessorStats {
        let windows = self.windows.state();
        let rules = self.rules.state();
        let mut series: Vec<&str> = windows.series().chain(rules.series()).collect();
        series.sort_unstable();
        series.dedup();
        ProcessorStats {
            position: self.position,
            open_windows: windows.open_windows(),
            active_alerts: rules.active_alerts(),
            series: series.len(),
        }
    }
}

fn source_names(config: &Config) -> Vec<String> {
    config.sources.iter().map(|s| s.name().to_string()).collect()
}

/// The names of the rules in `new` that are not in `old` or are configured differently.
pub fn changed_rules(old: &Config, new: &Config) -> Vec<String> {
    new.rules
        .iter()
        .filter(|rule| {
            !old.rules
                .iter()
                .any(|o| o.name() == rule.name() && format!("{o:?}") == format!("{rule:?}"))
        })
        .map(|rule| rule.name().to_string())
        .collect()
}

/// Runs the whole new rule set, from fresh state, over the journal's retained history up to
/// `through` and returns its state; the alerts it would have raised are discarded (they are
/// history, not news). The processor then adopts the state of the changed rules only.
pub fn warm_up(
    config: &Config,
    reader: &JournalReader,
    through: u64,
) -> Result<(RulesState, u64), ProcessorError> {
    let mut rules = Rules::new(&config.rules)?;
    let mut discard = Vec::new();
    let mut clock = i64::MIN;
    let mut applied = 0;
    for item in reader.read_after(0) {
        let (seq, entry) = match item {
            Ok(item) => item,
            // A damaged entry only makes the warm-up a little shorter.
            Err(_) => continue,
        };
        if seq > through {
            break;
        }
        match &entry {
            Entry::Event(event) => {
                clock = clock.max(event.received_ms);
                rules.on_tick(clock, &mut discard);
                rules.on_event(event, &mut discard);
            }
            Entry::Tick { now_ms } => {
                clock = clock.max(*now_ms);
                rules.on_tick(clock, &mut discard);
            }
        }
        discard.clear();
        applied += 1;
    }
    Ok((rules.state().clone(), applied))
}

/// The processor task, sole owner of the [`Processor`]. See the module docs for its
/// lifecycle; it returns when `rx` closes (after a final snapshot and flush) or on a storage
/// error it cannot work around.
///
/// The start-up replay stops at `replay_through`, the journal's last sequence when it was
/// opened (everything the store recovered). Later entries come through `rx` only after the
/// writer's flush: replaying them straight from the journal could apply an entry that a power
/// cut then takes away, and the broker's redelivery would produce different output.
pub async fn run(
    config: Arc<Config>,
    store: Store,
    reader: JournalReader,
    outbox: Outbox,
    mut rx: mpsc::Receiver<Vec<(u64, Entry)>>,
    metrics: Arc<Metrics>,
    replay_through: u64,
    mut reload: watch::Receiver<Arc<Config>>,
    readmodel: Arc<ReadModel>,
) -> Result<(), ProcessorError> {
    let mut config = config;
    let (mut processor, lost) = load(&config, &store)?;
    readmodel.publish_config(&config);
    if lost {
        // The journal behind the lost snapshot may have been trimmed, so replay cannot
        // regenerate the old records: continue numbering after what the outbox has seen
        // rather than reuse seqs (the outbox would ignore the new records, upstream would
        // drop them as duplicates). A few records may then arrive twice under new seqs.
        for lane in Lane::ALL {
            processor.skip_seqs_through(lane, outbox.next_seq(lane).saturating_sub(1));
        }
    }
    if !lost {
        // sled holds the outbox; the snapshot file and the journal are outside it. A sled that
        // opened an older state (see `crate::sentmark`) lost records that the snapshot says
        // were made, and flushed (a snapshot is saved only after sled is flushed): the replay
        // starts after them and cannot make them again. Say so with a gap, and number on
        // after it and after whatever upstream acknowledged.
        let acked = outbox.sent_mark();
        for lane in Lane::ALL {
            let made = processor.last_seq(lane);
            let next = outbox.next_seq(lane);
            if made > 0 && next <= made {
                let after = (made + 1).max(acked.next(lane));
                let at = outbox
                    .report_rollback(lane, next, after)
                    .map_err(|source| ProcessorError::Outbox { lane, seq: after, source })?;
                warn!(
                    lane = lane.as_str(),
                    lost_from = next,
                    lost_to = made,
                    gap = at,
                    "the store went back to an older state: records the snapshot covers are \
                     gone from the outbox (reported upstream as a store_rolled_back gap)"
                );
                processor.skip_seqs_through(lane, at);
            }
        }
    }
    let restored_at = processor.position();

    // Replay reads the journal and writes the outbox for as long as the journal is: off the runtime.
    let replay = {
        let (reader, outbox, metrics) = (reader.clone(), outbox.clone(), Arc::clone(&metrics));
        let readmodel = Arc::clone(&readmodel);
        tokio::task::spawn_blocking(move || {
            let until = replay_through.saturating_add(1);
            let sinks = (&outbox, &*readmodel);
            let replayed = catch_up(&mut processor, &reader, sinks, &metrics, until)?;
            Ok::<_, ProcessorError>((processor, replayed))
        })
    };
    let (mut processor, replayed) =
        replay.await.map_err(|source| ProcessorError::Task { task: "replay", source })??;
    info!(
        from = restored_at,
        to = processor.position(),
        replayed,
        "processor replayed the journal"
    );
    // Replay regenerates every record the journal's durable entries produced, upstream's
    // included: a processor still behind what upstream acknowledged means the snapshot and
    // the journal went back too (see `crate::sentmark`). The outbox then continues after the acknowledged
    // seqs with a gap record, and the processor after the outbox.
    let acked = outbox.sent_mark();
    for lane in Lane::ALL {
        let first_unused = processor.last_seq(lane) + 1;
        let acked_next = acked.next(lane);
        if first_unused < acked_next {
            outbox
                .report_rollback(lane, first_unused, acked_next)
                .map_err(|source| ProcessorError::Outbox { lane, seq: acked_next, source })?;
        }
    }
    // Number new records after what the outbox holds, or it would ignore them.
    for lane in Lane::ALL {
        let outbox_last = outbox.next_seq(lane).saturating_sub(1);
        if processor.last_seq(lane) < outbox_last {
            warn!(
                lane = lane.as_str(),
                from = processor.last_seq(lane),
                to = outbox_last,
                "the outbox is ahead of the processor: skipping to its seqs"
            );
            processor.skip_seqs_through(lane, outbox_last);
        }
    }

    let period = config.journal.snapshot_interval.max(MIN_SNAPSHOT_INTERVAL);
    let mut timer = tokio::time::interval_at(Instant::now() + period, period);
    timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut snapshotted = restored_at;
    let mut drops = DropReport::default();
    let mut out = Vec::new();
    let mut reloads_open = true;
    loop {
        tokio::select! {
            changed = reload.changed(), if reloads_open => {
                if changed.is_err() {
                    reloads_open = false;
                    continue;
                }
                let new = reload.borrow_and_update().clone();
                let warm = changed_rules(&config, &new);
                let through = processor.position();
                let warmed = {
                    let (new, reader) = (Arc::clone(&new), reader.clone());
                    tokio::task::spawn_blocking(move || warm_up(&new, &reader, through))
                        .await
                        .map_err(|source| ProcessorError::Task { task: "warm-up", source })?
                };
                match warmed.and_then(|(state, entries)| {
                    processor.reconfigure_warm(&new, &warm, &state).map(|()| entries)
                }) {
                    Ok(entries) => {
                        info!(
                            rules = new.rules.len(),
                            warmed = ?warm,
                            history_entries = entries,
                            "new rules are live; new and changed rules were warmed up on the \
                             journal's history"
                        );
                        readmodel.publish_config(&new);
                        config = new;
                        // Snapshot at once: a replay after a crash then starts from the new
                        // rules instead of applying them to entries the old rules processed.
                        if save(&processor, &store).await.is_ok() {
                            snapshotted = processor.position();
                        }
                    }
                    Err(error) => error!(%error, "cannot apply the reloaded rules; the old rules stay"),
                }
            }
            batch = rx.recv() => {
                let Some(batch) = batch else { break };
                // Entries already applied (a catch-up read them) are skipped; the rest are
                // published once for the whole batch: one read-model lock per batch.
                let fresh = batch.partition_point(|(seq, _)| *seq <= processor.position());
                for &(seq, ref entry) in &batch[fresh..] {
                    if seq > processor.position() + 1 {
                        // Entries before a committed one are committed too: read what the
                        // channel skipped (it cannot, by the journal's contract, but a gap
                        // would silently shift every later record).
                        warn!(
                            position = processor.position(),
                            next = seq,
                            "gap in the processor's input; reading it from the journal"
                        );
                        catch_up(&mut processor, &reader, (&outbox, &readmodel), &metrics, seq)?;
                    }
                    processor.apply(seq, entry, &metrics, &mut out);
                    write((&outbox, &readmodel), &mut out)?;
                }
                readmodel.publish_applied(batch[fresh..].iter().map(|(seq, entry)| (*seq, entry)));
            }
            _ = timer.tick() => {
                drops.log(&metrics);
                if processor.position() != snapshotted {
                    match save(&processor, &store).await {
                        Ok(()) => {
                            snapshotted = processor.position();
                            trim(&reader, &config, snapshotted).await;
                        }
                        // The journal keeps everything after the last good snapshot: a failed
                        // snapshot only lengthens the next replay. Try again next period.
                        Err(error) => error!(%error, "cannot snapshot the processor state"),
                    }
                }
            }
        }
    }
    drops.log(&metrics);
    save(&processor, &store).await?;
    let stats = processor.stats();
    info!(
        position = stats.position,
        open_windows = stats.open_windows,
        active_alerts = stats.active_alerts,
        "processor stopped; open windows continue after the restart"
    );
    Ok(())
}

/// Restores the processor from the store's snapshot, or a fresh one if there is none or it
/// cannot be read. The flag tells that a snapshot existed but was lost. A configuration error
/// is returned: a fresh start would not fix it.
fn load(config: &Config, store: &Store) -> Result<(Processor, bool), ProcessorError> {
    let snapshot = match store.load_snapshot() {
        Ok(snapshot) => snapshot,
        // A damaged snapshot value: start over rather than crash-loop under systemd.
        Err(source @ StoreError::Corrupt { .. }) => {
            error!(error = %source, "the processor snapshot is unreadable; starting fresh");
            return Ok((Processor::new(config)?, true));
        }
        Err(source) => return Err(ProcessorError::Store { action: "load", source }),
    };
    // No snapshot: a first start, or a crash before the first snapshot. The journal is only
    // trimmed behind a snapshot, so it is complete and replay regenerates every record.
    let Some((position, bytes)) = snapshot else {
        return Ok((Processor::new(config)?, false));
    };
    match Processor::restore(config, &bytes) {
        Ok(processor) => {
            if processor.position() != position {
                warn!(
                    stored = position,
                    state = processor.position(),
                    "snapshot positions disagree; trusting the state's"
                );
            }
            info!(position = processor.position(), "processor state restored");
            Ok((processor, false))
        }
        Err(e) if e.is_snapshot_error() => {
            error!(
                error = %e,
                position,
                "the processor snapshot does not decode; starting fresh and replaying what is \
                 left of the journal"
            );
            Ok((Processor::new(config)?, true))
        }
        Err(e) => Err(e),
    }
}

/// Applies journal entries after the processor's position and before `until`, writing
/// their records to the outbox. Corrupt entries are logged, counted and skipped. Returns
/// how many entries were applied.
fn catch_up(
    processor: &mut Processor,
    reader: &JournalReader,
    sinks: (&Outbox, &ReadModel),
    metrics: &Metrics,
    until: u64,
) -> Result<u64, ProcessorError> {
    let mut out = Vec::new();
    let mut applied = 0;
    for item in reader.read_after(processor.position()) {
        match item {
            Ok((seq, _)) if seq >= until => break,
            Ok((seq, entry)) => {
                processor.apply(seq, &entry, metrics, &mut out);
                sinks.1.publish_applied([(seq, &entry)]);
                write(sinks, &mut out)?;
                applied += 1;
            }
            Err(error @ JournalError::Corrupt { .. }) => {
                metrics.reject("journal", "corrupt_entry");
                error!(%error, "skipping a corrupt journal entry");
            }
            Err(error) => return Err(ProcessorError::Journal(error)),
        }
    }
    Ok(applied)
}

/// Outputs kept allocated between entries by [`write`]: a window close at 10,000 series
/// makes 10,000 records at once (~3.5 MB of `Output`s); keeping that capacity would hold it
/// for good.
const OUT_RETAINED: usize = 256;

/// Records put into the outbox in one sled batch by [`write`]: a window close at 10,000
/// series writes 40 batches instead of 10,000 puts; the outbox's cap is enforced after each.
const PUT_BATCH: usize = 256;

/// Writes and drains `out`: consecutive records of one lane in batches of [`PUT_BATCH`]. A
/// seq the outbox already holds was written by the run that crashed after it; replay
/// regenerated the same record, so skipping it is right.
fn write(
    (outbox, readmodel): (&Outbox, &ReadModel),
    out: &mut Vec<Output>,
) -> Result<(), ProcessorError> {
    let mut outputs = out.drain(..).peekable();
    while let Some(first) = outputs.next() {
        let (lane, first_seq) = (first.lane, first.seq);
        let mut batch = Vec::with_capacity(PUT_BATCH.min(1 + outputs.len()));
        batch.push((first.seq, first.body));
        while batch.len() < PUT_BATCH
            && let Some(next) = outputs.next_if(|next| next.lane == lane)
        {
            batch.push((next.seq, next.body));
        }
        for (_, body) in &batch {
            if let RecordBody::Alert(alert) = body {
                readmodel.publish_alert(alert);
            }
        }
        let offered = batch.len();
        let written = outbox.put_many(lane, batch).map_err(|source| ProcessorError::Outbox {
            lane,
            seq: first_seq,
            source,
        })?;
        if written < offered {
            debug!(
                lane = lane.as_str(),
                first_seq,
                skipped = offered - written,
                "records already in the outbox"
            );
        }
    }
    drop(outputs);
    out.shrink_to(OUT_RETAINED);
    Ok(())
}

/// Saves the snapshot (off the runtime: it fsyncs). [`Store::save_snapshot`] flushes sled
/// first, which makes the outbox records the snapshot covers durable.
async fn save(processor: &Processor, store: &Store) -> Result<(), ProcessorError> {
    let position = processor.position();
    let bytes = processor.snapshot();
    let store = store.clone();
    tokio::task::spawn_blocking(move || {
        store
            .save_snapshot(position, &bytes)
            .map_err(|source| ProcessorError::Store { action: "save", source })
    })
    .await
    .map_err(|source| ProcessorError::Task { task: "snapshot", source })??;
    debug!(position, "processor snapshot saved");
    Ok(())
}

/// Trims the journal behind a durable snapshot; a failure only leaves the journal longer.
async fn trim(reader: &JournalReader, config: &Arc<Config>, position: u64) {
    let (reader, config) = (reader.clone(), Arc::clone(config));
    let trimmed = tokio::task::spawn_blocking(move || {
        reader.trim(position, &config.journal, event::now_ms())
    })
    .await;
    match trimmed {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => warn!(%error, "cannot trim the journal"),
        Err(error) => warn!(%error, "the journal trim task failed"),
    }
}

/// Logs late and future events once per snapshot period at most (the counters hold the
/// exact numbers; the log only says that it happens, and how much).
#[derive(Debug, Default)]
struct DropReport {
    late: u64,
    future: u64,
}

impl DropReport {
    fn log(&mut self, metrics: &Metrics) {
        let (late, future) =
            (metrics::get(&metrics.late_events), metrics::get(&metrics.future_events));
        if late > self.late {
            warn!(
                new = late - self.late,
                total = late,
                "late events: their windows had closed, they were not summarised"
            );
        }
        if future > self.future {
            warn!(
                new = future - self.future,
                total = future,
                "events stamped too far in the future were rejected (check the device clocks)"
            );
        }
        (self.late, self.future) = (late, future);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use sensors::record::{Alert, Summary};

    use super::*;
    use crate::event::Event;
    use crate::metrics::get;

    const CONFIG: &str = r#"
        [agent]
        id = "gw"

        [upstream]
        kind = "file"
        path = "/dev/null"

        [summary]
        window = "1s"
        allowed_lateness = "500ms"
        max_future = "2s"

        [[rules]]
        kind = "threshold"
        name = "hot"
        series = "pump-*/temperature"
        above = 50.0
        clear = 40.0
        for = "300ms"

        [[rules]]
        kind = "threshold"
        name = "cold"
        series = "+/temperature"
        below = 10.0
    "#;

    fn config() -> Config {
        Config::from_toml(CONFIG).unwrap()
    }

    fn ev(series: &str, ts_ms: i64, value: f64, received_ms: i64) -> Entry {
        Entry::Event(Event { series: series.into(), ts_ms, value, received_ms, source: 0 })
    }

    /// Applies `entries` numbered from `first_seq` and returns the outputs.
    fn apply_all(
        processor: &mut Processor,
        first_seq: u64,
        entries: &[Entry],
        metrics: &Metrics,
    ) -> Vec<Output> {
        let mut out = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            processor.apply(first_seq + i as u64, entry, metrics, &mut out);
        }
        out
    }

    fn alert(output: &Output) -> &Alert {
        match &output.body {
            RecordBody::Alert(a) => a,
            other => panic!("not an alert: {other:?}"),
        }
    }

    fn summary(output: &Output) -> &Summary {
        match &output.body {
            RecordBody::Summary(s) => s,
            other => panic!("not a summary: {other:?}"),
        }
    }

    #[test]
    fn records_are_numbered_per_lane_from_one() {
        let metrics = Metrics::default();
        let mut processor = Processor::new(&config()).unwrap();
        let entries = [
            ev("pump-1/temperature", 1_000, 60.0, 1_000),
            ev("pump-1/temperature", 1_300, 61.0, 1_300), // held 300 ms: raised
            ev("pump-2/temperature", 1_400, 5.0, 1_400),  // cold: raised at once
            Entry::Tick { now_ms: 2_500 },                // closes [1000, 2000) of both
            ev("pump-1/temperature", 2_600, 30.0, 2_600), // cleared
        ];
        let out = apply_all(&mut processor, 1, &entries, &metrics);
        let lanes: Vec<_> = out.iter().map(|o| (o.lane, o.seq)).collect();
        assert_eq!(
            lanes,
            vec![
                (Lane::Alerts, 1),
                (Lane::Alerts, 2),
                (Lane::Summaries, 1),
                (Lane::Summaries, 2),
                (Lane::Alerts, 3),
            ]
        );
        assert_eq!((alert(&out[0]).rule.as_str(), alert(&out[0]).ts_ms), ("hot", 1_300));
        assert_eq!(alert(&out[1]).rule, "cold");
        assert_eq!(alert(&out[4]).state, AlertState::Cleared);
        let s = summary(&out[2]);
        assert_eq!(
            (s.series.as_str(), s.start_ms, s.count, s.mean),
            ("pump-1/temperature", 1_000, 2, 60.5)
        );
        assert_eq!(summary(&out[3]).series, "pump-2/temperature");
        assert_eq!(processor.position(), 5);
        assert_eq!((processor.last_seq(Lane::Alerts), processor.last_seq(Lane::Summaries)), (3, 2));
    }

    #[test]
    fn entries_at_or_below_the_position_are_ignored() {
        let metrics = Metrics::default();
        let mut processor = Processor::new(&config()).unwrap();
        let mut out = Vec::new();
        processor.apply(7, &ev("pump-1/temperature", 1_000, 5.0, 1_000), &metrics, &mut out);
        let before = processor.snapshot();
        processor.apply(7, &ev("pump-1/temperature", 1_000, 5.0, 1_000), &metrics, &mut out);
        processor.apply(3, &ev("pump-1/temperature", 1_000, 99.0, 1_000), &metrics, &mut out);
        assert_eq!(processor.snapshot(), before);
        assert_eq!(out.len(), 1, "only the first cold alert: {out:?}");
        assert_eq!(get(&metrics.events_processed), 1);
    }

    #[test]
    fn metrics_count_events_alerts_summaries_late_future_and_bad_values() {
        let metrics = Metrics::default();
        let mut processor = Processor::new(&config()).unwrap();
        let entries = [
            ev("pump-1/temperature", 1_000, 5.0, 1_000), // cold raised
            ev("pump-1/temperature", 1_100, 20.0, 1_100), // cold cleared
            Entry::Tick { now_ms: 3_000 },               // closes [1000, 2000)
            ev("pump-1/temperature", 1_900, 20.0, 3_000), // late
            ev("pump-1/temperature", 5_001, 20.0, 3_000), // future: more than 2 s ahead
            ev("pump-1/temperature", 5_000, f64::NAN, 3_000),
        ];
        let out = apply_all(&mut processor, 1, &entries, &metrics);
        assert_eq!(out.len(), 3);
        assert_eq!(get(&metrics.events_processed), 5);
        assert_eq!(get(&metrics.alerts_raised), 1);
        assert_eq!(get(&metrics.alerts_cleared), 1);
        assert_eq!(get(&metrics.summaries), 1);
        assert_eq!(get(&metrics.late_events), 1);
        assert_eq!(get(&metrics.future_events), 1);
        assert_eq!(metrics.rejected_total(), 1);
        assert_eq!(
            processor.stats().open_windows,
            0,
            "neither late nor rejected events open windows"
        );
    }

    #[test]
    fn future_events_do_not_reach_the_rules_but_late_events_do() {
        let metrics = Metrics::default();
        let mut processor = Processor::new(&config()).unwrap();
        let entries = [
            Entry::Tick { now_ms: 10_000 },
            ev("pump-1/temperature", 99_000, 1.0, 10_000),
            ev("pump-1/temperature", 1_000, 1.0, 10_000),
        ];
        let out = apply_all(&mut processor, 1, &entries, &metrics);
        assert_eq!(out.len(), 1);
        assert_eq!(alert(&out[0]).ts_ms, 1_000);
    }

    #[test]
    fn late_and_future_events_are_reported_in_gaps_at_the_next_tick_across_a_restart() {
        let metrics = Metrics::default();
        let mut processor = Processor::new(&config()).unwrap();
        let entries = [
            Entry::Tick { now_ms: 100_000 },
            ev("x/other", 2_000, 1.0, 100_000),
            ev("x/other", 1_000, 1.0, 100_000),
            ev("x/other", 900_000, 1.0, 100_000),
        ];
        let out = apply_all(&mut processor, 1, &entries, &metrics);
        assert!(out.is_empty(), "reported at the next tick, not per event: {out:?}");
        // The tallies are in the snapshot.
        let mut processor = Processor::restore(&config(), &processor.snapshot()).unwrap();
        let out = apply_all(&mut processor, 5, &[Entry::Tick { now_ms: 100_100 }], &metrics);
        let gaps: Vec<(u64, &Gap)> = out
            .iter()
            .map(|o| match &o.body {
                RecordBody::Gap(g) if o.lane == Lane::Summaries => (o.seq, g),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(gaps.len(), 2, "{gaps:?}");
        let (late, future) = (gaps[0].1, gaps[1].1);
        assert_eq!(
            (late.reason.as_str(), late.events, late.from_ms, late.to_ms, late.records),
            (GAP_REASON_LATE, 2, Some(1_000), Some(2_000), 0)
        );
        assert_eq!(
            (future.reason.as_str(), future.events, future.from_ms, future.to_ms),
            (GAP_REASON_FUTURE, 1, Some(900_000), Some(900_000))
        );
        assert_eq!((gaps[0].0, gaps[1].0), (1, 2), "numbered in the summaries lane");
        let out = apply_all(&mut processor, 6, &[Entry::Tick { now_ms: 100_200 }], &metrics);
        assert!(out.is_empty(), "reported once: {out:?}");
    }

    #[test]
    fn version_2_snapshots_are_still_read() {
        let metrics = Metrics::default();
        let mut processor = Processor::new(&config()).unwrap();
        apply_all(&mut processor, 1, &[ev("pump-1/temperature", 1_000, 60.0, 1_000)], &metrics);
        let current = processor.snapshot();
        // Version 2 is version 3 without the two empty tallies (three zero varints each).
        assert_eq!(current[current.len() - 6..], [0; 6]);
        let mut v2 = current[..current.len() - 6].to_vec();
        v2[0] = 2;
        let restored = Processor::restore(&config(), &v2).unwrap();
        assert_eq!(restored.snapshot(), current);
    }

    #[test]
    fn stats_count_open_windows_active_alerts_and_series() {
        let metrics = Metrics::default();
        let mut processor = Processor::new(&config()).unwrap();
        assert_eq!(processor.stats(), ProcessorStats::default());
        let entries = [
            ev("pump-1/temperature", 1_000, 5.0, 1_000),
            ev("pump-1/temperature", 2_000, 5.0, 2_000),
            ev("pump-2/temperature", 2_000, 60.0, 2_000),
            ev("fan/temperature", 2_000, 20.0, 2_000),
        ];
        apply_all(&mut processor, 1, &entries, &metrics);
        assert_eq!(
            processor.stats(),
            ProcessorStats { position: 4, open_windows: 4, active_alerts: 1, series: 3 }
        );
    }

    #[test]
    fn snapshots_restore_to_identical_bytes() {
        let metrics = Metrics::default();
        let mut processor = Processor::new(&config()).unwrap();
        apply_all(
            &mut processor,
            1,
            &[ev("pump-1/temperature", 1_000, 60.0, 1_000), ev("x/temperature", 1_000, 0.5, 1_000)],
            &metrics,
        );
        let bytes = processor.snapshot();
        assert_eq!(bytes[0], SNAPSHOT_VERSION);
        let restored = Processor::restore(&config(), &bytes).unwrap();
        assert_eq!(restored.snapshot(), bytes);
        assert_eq!(restored.stats(), processor.stats());
    }

    #[test]
    fn damaged_snapshots_are_refused_as_snapshot_errors() {
        let metrics = Metrics::default();
        let mut processor = Processor::new(&config()).unwrap();
        apply_all(&mut processor, 1, &[ev("pump-1/temperature", 1_000, 60.0, 1_000)], &metrics);
        let good = processor.snapshot();
        let mut trailing = good.clone();
        trailing.push(0);
        let mut version = good.clone();
        version[0] = SNAPSHOT_VERSION + 1;
        let cases: [(&[u8], &str); 4] = [
            (&[], "empty"),
            (&version, "version"),
            (&good[..good.len() - 3], "truncated"),
            (&trailing, "trailing"),
        ];
        for (bytes, case) in cases {
            let err = Processor::restore(&config(), bytes).unwrap_err();
            assert!(err.is_snapshot_error(), "{case}: {err}");
        }
    }

    #[test]
    fn an_invalid_configuration_is_not_a_snapshot_error() {
        let snapshot = Processor::new(&config()).unwrap().snapshot();
        let mut bad = config();
        let crate::config::RuleConfig::Threshold(rule) = &mut bad.rules[0] else {
            panic!("the first rule of CONFIG is a threshold rule");
        };
        rule.clear = Some(99.0);
        let err = Processor::restore(&bad, &snapshot).unwrap_err();
        assert!(matches!(err, ProcessorError::Rules(_)) && !err.is_snapshot_error(), "{err}");
        assert!(Processor::new(&bad).is_err());
    }

    #[test]
    fn skipping_seqs_continues_numbering_after_the_given_seq() {
        let metrics = Metrics::default();
        let mut processor = Processor::new(&config()).unwrap();
        processor.skip_seqs_through(Lane::Alerts, 41);
        processor.skip_seqs_through(Lane::Alerts, 7);
        let out = apply_all(&mut processor, 1, &[ev("a/temperature", 1, 1.0, 1)], &metrics);
        assert_eq!((out[0].lane, out[0].seq), (Lane::Alerts, 42));
    }

    /// [`write`] puts runs of one lane in batches, keeps each lane in seq order across the
    /// batches and lanes it interleaves, publishes the alerts, and skips what a replay offers
    /// again.
    #[test]
    fn write_puts_interleaved_lanes_in_batches_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::from_toml(CONFIG).unwrap();
        let (store, _) = Store::open(dir.path(), 1 << 20).unwrap();
        let outbox =
            Outbox::open(&store, "gw", &config.buffer, Arc::new(Metrics::default())).unwrap();
        let readmodel = ReadModel::default();
        let summaries = (1..=2 * PUT_BATCH as u64 + 10).map(|seq| Output {
            lane: Lane::Summaries,
            seq,
            body: RecordBody::Summary(Summary {
                series: format!("pump-{seq}/temperature"),
                start_ms: 60_000,
                window_ms: 60_000,
                count: 1,
                min: seq as f64,
                max: seq as f64,
                mean: seq as f64,
                stddev: 0.0,
                first: seq as f64,
                last: seq as f64,
                windows: 1,
            }),
        });
        let alert = |seq: u64| Output {
            lane: Lane::Alerts,
            seq,
            body: RecordBody::Alert(Alert {
                rule: "hot".into(),
                series: format!("pump-{seq}/temperature"),
                state: AlertState::Raised,
                severity: sensors::record::Severity::Critical,
                ts_ms: 1_000,
                value: 99.0,
                threshold: 90.0,
                message: String::new(),
                labels: Default::default(),
            }),
        };
        let mut outputs = Vec::new();
        for summary in summaries {
            if matches!(summary.seq, 100 | 300 | 400) {
                outputs.push(alert(
                    outputs.iter().filter(|o: &&Output| o.lane == Lane::Alerts).count() as u64 + 1,
                ));
            }
            outputs.push(summary);
        }
        let mut out = outputs.clone();
        write((&outbox, &readmodel), &mut out).unwrap();
        assert!(out.is_empty());
        let seqs = |lane| -> Vec<u64> {
            outbox.peek(lane, 10_000, u64::MAX).unwrap().iter().map(|r| r.seq).collect()
        };
        assert_eq!(seqs(Lane::Summaries), (1..=2 * PUT_BATCH as u64 + 10).collect::<Vec<_>>());
        assert_eq!(seqs(Lane::Alerts), vec![1, 2, 3]);
        assert_eq!(readmodel.alerts().active.len(), 3);

        // A replay offers the same records again: nothing new, no error.
        let mut again = outputs;
        write((&outbox, &readmodel), &mut again).unwrap();
        assert_eq!(outbox.stats().summaries.records, 2 * PUT_BATCH as u64 + 10);
        assert_eq!(outbox.stats().alerts.records, 3);
    }

    mod task {
        //! The [`run`] task against a real store, journal and outbox in a temp dir.

        use std::sync::Arc;
        use std::time::Duration;

        use sensors::record::{Lane, RecordBody};
        use tokio::sync::{mpsc, watch};

        use super::{CONFIG, ev};
        use crate::config::Config;
        use crate::event::Entry;
        use crate::journal::Journal;
        use crate::metrics::Metrics;
        use crate::outbox::Outbox;
        use crate::processor::{Processor, run};
        use crate::store::Store;

        /// One run of the agent's storage: store, journal and outbox of `dir`.
        struct Storage {
            store: Store,
            journal: Journal,
            outbox: Outbox,
        }

        fn open(dir: &std::path::Path, config: &Config) -> Storage {
            let (store, _) = Store::open(dir, 1 << 20).unwrap();
            let journal = Journal::open(&store).unwrap();
            let metrics = Arc::new(Metrics::default());
            let outbox = Outbox::open(&store, "gw", &config.buffer, metrics).unwrap();
            Storage { store, journal, outbox }
        }

        /// Events of three series, 400 ms apart, crossing the `hot` and `cold` levels.
        fn entries(n: i64) -> Vec<Entry> {
            (0..n)
                .map(|i| {
                    let series = format!("pump-{}/temperature", i % 3);
                    ev(&series, 1_000 + i * 400, (i % 7 * 15) as f64, 1_000 + i * 400)
                })
                .collect()
        }

        /// A rate-of-change rule added by a hot reload, run over `history` then one jump.
        fn rate_alerts_after_reload(warm: bool) -> usize {
            let dir = tempfile::tempdir().unwrap();
            let old = Config::from_toml(CONFIG).unwrap();
            let new = Config::from_toml(&format!(
                "{CONFIG}\n[[rules]]\nkind = \"rate_of_change\"\nname = \"heating-fast\"\n\
                 series = \"+/temperature\"\nmax_rate = 5.0\nper = \"1s\"\nspan = \"2s\"\n"
            ))
            .unwrap();
            let mut storage = open(dir.path(), &old);
            let metrics = Metrics::default();
            let mut processor = Processor::new(&old).unwrap();
            let mut out = Vec::new();
            // 20 s of a steady 20 °C: the history the journal retains.
            for i in 0..20 {
                let entry = ev("pump-1/temperature", 1_000 + i * 1_000, 20.0, 1_000 + i * 1_000);
                let seq = storage.journal.append(&entry).unwrap();
                processor.apply(seq, &entry, &metrics, &mut out);
            }
            storage.journal.seal().unwrap();
            let changed = super::super::changed_rules(&old, &new);
            assert_eq!(changed, vec!["heating-fast".to_string()], "only the new rule warms up");
            if warm {
                let reader = storage.journal.reader();
                let (state, entries) =
                    super::super::warm_up(&new, &reader, processor.position()).unwrap();
                assert_eq!(entries, 20);
                processor.reconfigure_warm(&new, &changed, &state).unwrap();
            } else {
                processor.reconfigure(&new).unwrap();
            }
            out.clear();
            // +12 °C in 2 s: 6 °C/s against the history, above the 5 °C/s limit.
            let jump = ev("pump-1/temperature", 22_000, 32.0, 22_000);
            let seq = storage.journal.append(&jump).unwrap();
            processor.apply(seq, &jump, &metrics, &mut out);
            out.iter()
                .filter(|o| matches!(&o.body, RecordBody::Alert(a) if a.rule == "heating-fast"))
                .count()
        }

        #[test]
        fn a_rule_added_by_reload_is_warmed_up_on_the_journal_history() {
            assert_eq!(rate_alerts_after_reload(true), 1, "the warmed rule sees the jump at once");
            assert_eq!(
                rate_alerts_after_reload(false),
                0,
                "without warm-up the new rule has no baseline (so the test above means something)"
            );
        }

        /// Every record of the outbox as `(lane, seq, body)`.
        fn records(outbox: &Outbox) -> Vec<(Lane, u64, RecordBody)> {
            Lane::ALL
                .into_iter()
                .flat_map(|lane| {
                    let records = outbox.peek(lane, usize::MAX, u64::MAX).unwrap();
                    records.into_iter().map(move |r| (lane, r.seq, r.body))
                })
                .collect()
        }

        /// What an uninterrupted processor makes of `entries`, in the same order.
        fn uninterrupted(config: &Config, entries: &[Entry]) -> Vec<(Lane, u64, RecordBody)> {
            let mut processor = Processor::new(config).unwrap();
            let mut out = Vec::new();
            for (i, entry) in entries.iter().enumerate() {
                processor.apply(i as u64 + 1, entry, &Metrics::default(), &mut out);
            }
            let mut records: Vec<_> = out.into_iter().map(|o| (o.lane, o.seq, o.body)).collect();
            records.sort_by_key(|(lane, seq, _)| (*lane, *seq));
            records
        }

        async fn run_once(
            config: &Arc<Config>,
            storage: &Storage,
            batches: Vec<Vec<(u64, Entry)>>,
        ) {
            let (tx, rx) = mpsc::channel(batches.len().max(1));
            for batch in batches {
                tx.send(batch).await.unwrap();
            }
            drop(tx);
            let metrics = Arc::new(Metrics::default());
            let (store, reader) = (storage.store.clone(), storage.journal.reader());
            let (_reload_tx, reload_rx) = watch::channel(config.clone());
            run(
                config.clone(),
                store,
                reader,
                storage.outbox.clone(),
                rx,
                metrics,
                u64::MAX,
                reload_rx,
                Arc::default(),
            )
            .await
            .unwrap();
        }

        #[tokio::test]
        async fn a_restart_replays_the_journal_and_continues_like_an_uninterrupted_run() {
            let dir = tempfile::tempdir().unwrap();
            let config = Arc::new(Config::from_toml(CONFIG).unwrap());
            let all = entries(40);

            let mut first = open(dir.path(), &config);
            for entry in &all[..20] {
                first.journal.append(entry).unwrap();
            }
            first.journal.commit().unwrap();
            run_once(&config, &first, Vec::new()).await;
            assert_eq!(first.store.load_snapshot().unwrap().map(|s| s.0), Some(20));
            drop(first);

            let mut second = open(dir.path(), &config);
            let mut live = Vec::new();
            for entry in &all[20..] {
                live.push((second.journal.append(entry).unwrap(), entry.clone()));
            }
            second.journal.commit().unwrap();
            // The channel skips 21..=23 (read from the journal) and repeats itself.
            run_once(&config, &second, vec![live[3..].to_vec(), live.clone()]).await;
            assert_eq!(second.store.load_snapshot().unwrap().map(|s| s.0), Some(40));

            let expected = uninterrupted(&config, &all);
            assert!(expected.iter().any(|r| r.0 == Lane::Alerts));
            assert!(expected.iter().any(|r| r.0 == Lane::Summaries));
            assert_eq!(records(&second.outbox), expected);
        }

        #[tokio::test]
        async fn a_replay_over_records_already_in_the_outbox_adds_nothing() {
            let dir = tempfile::tempdir().unwrap();
            let config = Arc::new(Config::from_toml(CONFIG).unwrap());
            let mut storage = open(dir.path(), &config);
            for entry in &entries(30) {
                storage.journal.append(entry).unwrap();
            }
            storage.journal.seal().unwrap();
            run_once(&config, &storage, Vec::new()).await;
            let before = records(&storage.outbox);
            // A crash before the snapshot: the next run replays everything again.
            storage.store.save_snapshot(0, &Processor::new(&config).unwrap().snapshot()).unwrap();
            run_once(&config, &storage, Vec::new()).await;
            assert_eq!(records(&storage.outbox), before);
        }

        #[tokio::test]
        async fn a_corrupt_snapshot_starts_fresh_without_reusing_outbox_seqs() {
            let dir = tempfile::tempdir().unwrap();
            let config = Arc::new(Config::from_toml(CONFIG).unwrap());
            let mut storage = open(dir.path(), &config);
            for entry in &entries(30) {
                storage.journal.append(entry).unwrap();
            }
            storage.journal.seal().unwrap();
            run_once(&config, &storage, Vec::new()).await;
            let before = records(&storage.outbox);
            let last_alert = before.iter().filter(|r| r.0 == Lane::Alerts).map(|r| r.1).max();
            storage.store.save_snapshot(30, b"\x01not postcard").unwrap();
            run_once(&config, &storage, Vec::new()).await;
            let after = records(&storage.outbox);
            assert!(after.len() > before.len(), "the replay produced new records");
            let first_new_alert = after
                .iter()
                .filter(|r| r.0 == Lane::Alerts && !before.contains(r))
                .map(|r| r.1)
                .min();
            assert!(first_new_alert > last_alert, "{first_new_alert:?} vs {last_alert:?}");
            assert_eq!(storage.store.load_snapshot().unwrap().map(|s| s.0), Some(30));
        }

        #[tokio::test(start_paused = true)]
        async fn snapshots_are_taken_periodically_and_the_journal_is_trimmed_behind_them() {
            let dir = tempfile::tempdir().unwrap();
            let mut config = Config::from_toml(CONFIG).unwrap();
            config.journal.snapshot_interval = Duration::from_secs(1);
            config.journal.max_age = Duration::from_secs(60);
            let config = Arc::new(config);
            let mut storage = open(dir.path(), &config);
            // One segment per seal: the first (1..=10) can go once covered, the second (11,
            // read by the start-up replay) is the active one and stays.
            storage.journal = Journal::open_with(&storage.store, 1).unwrap();
            // Received in 1970: far older than max_age, so trimmed once covered.
            let mut batch = Vec::new();
            for entry in &entries(10) {
                batch.push((storage.journal.append(entry).unwrap(), entry.clone()));
            }
            storage.journal.seal().unwrap();
            storage.journal.append(&Entry::Tick { now_ms: 9_000 }).unwrap();
            storage.journal.commit().unwrap();
            let (tx, rx) = mpsc::channel(1);
            let metrics = Arc::new(Metrics::default());
            let (store, reader) = (storage.store.clone(), storage.journal.reader());
            let task = tokio::spawn(run(
                config.clone(),
                store,
                reader,
                storage.outbox.clone(),
                rx,
                metrics,
                u64::MAX,
                watch::channel(config.clone()).1,
                Arc::default(),
            ));
            tx.send(batch).await.unwrap();
            let mut snapshotted = false;
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let position = storage.store.load_snapshot().unwrap().map(|s| s.0);
                let left: Vec<u64> =
                    storage.journal.reader().read_after(0).map(|e| e.unwrap().0).collect();
                if position == Some(11) && left == [11] {
                    snapshotted = true;
                    break;
                }
            }
            assert!(snapshotted, "no periodic snapshot and trim within 10 s of virtual time");
            assert!(!task.is_finished(), "the task runs until its channel closes");
            drop(tx);
            task.await.unwrap().unwrap();
        }
    }

    /// A random journal: events of a few series around a moving gateway clock (some late,
    /// some ahead, a few NaN) and ticks that move the clock on.
    fn journal() -> impl Strategy<Value = Vec<Entry>> {
        let step = prop_oneof![
            3 => (0usize..4, -2_500i64..2_500, 0u32..100, 0i64..400, any::<bool>()),
            1 => (4usize..5, 0i64..1, 0u32..1, 0i64..3_000, any::<bool>()),
        ];
        prop::collection::vec(step, 1..200).prop_map(|steps| {
            let series = ["pump-1/temperature", "pump-2/temperature", "fan/temperature", "a/b"];
            let mut now = 1_700_000_000_000i64;
            steps
                .into_iter()
                .map(|(kind, offset, value, advance, nan)| {
                    now += advance;
                    if kind == 4 {
                        Entry::Tick { now_ms: now }
                    } else {
                        let value = if nan && value == 0 { f64::NAN } else { f64::from(value) };
                        ev(series[kind], now + offset, value, now)
                    }
                })
                .collect()
        })
    }

    /// A random rule pack of every kind, appended to [`CONFIG`]: levels, durations and
    /// `min_interval`s vary so that raises, suppressions, timers and combinations all occur
    /// on the journals of [`journal`].
    fn rule_pack() -> impl Strategy<Value = Config> {
        (
            (0u64..3, 200u64..4_000, 0u64..2_000, 300u64..3_000),
            (1u32..40, 0.5f64..20.0, 0u64..2),
            prop_oneof![Just("mean"), Just("min"), Just("max"), Just("count"), Just("stddev")],
        )
            .prop_map(
                |((interval, timeout, within, window), (rate, epsilon, direction), aggregate)| {
                    let min_interval = ["0s", "700ms", "3s"][interval as usize];
                    let direction = ["rise", "either"][direction as usize];
                    let pack = format!(
                        r##"
                    [[rules]]
                    kind = "rate_of_change"
                    name = "jump"
                    series = "+/temperature"
                    max_rate = {rate}
                    per = "1s"
                    span = "2s"
                    direction = "{direction}"
                    min_interval = "{min_interval}"

                    [[rules]]
                    kind = "flatline"
                    name = "stuck"
                    series = "#"
                    epsilon = {epsilon}
                    for = "1s"

                    [[rules]]
                    kind = "missing_data"
                    name = "silent"
                    series = "#"
                    timeout = "{timeout}ms"
                    min_interval = "{min_interval}"

                    [[rules]]
                    kind = "window"
                    name = "busy"
                    series = "+/temperature"
                    window = "{window}ms"
                    aggregate = "{aggregate}"
                    above = 30.0
                    clear = 20.0

                    [[rules]]
                    kind = "anomaly"
                    name = "odd"
                    series = "pump-*/temperature"
                    level = 0.2
                    clear = 0.1
                    detector = {{ warmup = 5 }}

                    [[rules]]
                    kind = "all_of"
                    name = "hot-and-jumping"
                    rules = ["hot", "jump", "busy"]
                    within = "{within}ms"
                    min_interval = "{min_interval}"

                    [[rules]]
                    kind = "any_of"
                    name = "sensor-trouble"
                    rules = ["silent", "stuck"]
                    within = "{within}ms"
                    "##
                    );
                    let config = format!("{CONFIG}\n{pack}");
                    Config::from_toml(&config).unwrap_or_else(|e| panic!("{e}\n{config}"))
                },
            )
    }

    #[test]
    fn the_generated_rule_packs_raise_and_clear_every_kind() {
        use proptest::strategy::ValueTree;
        use proptest::test_runner::TestRunner;

        let mut runner = TestRunner::deterministic();
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..64 {
            let config = rule_pack().new_tree(&mut runner).unwrap().current();
            let entries = journal().new_tree(&mut runner).unwrap().current();
            let mut processor = Processor::new(&config).unwrap();
            for output in apply_all(&mut processor, 1, &entries, &Metrics::default()) {
                if let RecordBody::Alert(a) = output.body {
                    seen.insert((a.rule, a.state == AlertState::Raised));
                }
            }
        }
        for rule in
            ["hot", "jump", "stuck", "silent", "busy", "odd", "hot-and-jumping", "sensor-trouble"]
        {
            for raised in [true, false] {
                assert!(seen.contains(&(rule.to_string(), raised)), "{rule} {raised}: {seen:?}");
            }
        }
    }

    proptest! {
        /// Snapshot at `split`, keep running to `crash`, die, restore and replay from the
        /// snapshot: the records are exactly those of an uninterrupted run, same seqs, and
        /// the records the crashed run produced after the snapshot are regenerated
        /// identically (so the outbox's "already have this seq" is always right).
        #[test]
        fn snapshot_restore_and_replay_match_an_uninterrupted_run(
            entries in journal(),
            split in 0.0f64..1.0,
            crash in 0.0f64..1.0,
            pack in rule_pack(),
        ) {
            let n = entries.len();
            let split = (split * n as f64) as usize;
            let crash = split + (crash * (n - split) as f64) as usize;
            let metrics = Metrics::default();
            let config = || pack.clone();

            let mut reference = Processor::new(&config()).unwrap();
            let expected = apply_all(&mut reference, 1, &entries, &metrics);

            let mut first = Processor::new(&config()).unwrap();
            let mut before = apply_all(&mut first, 1, &entries[..split], &metrics);
            let snapshot = first.snapshot();
            let lost = apply_all(&mut first, split as u64 + 1, &entries[split..crash], &metrics);

            let mut restored = Processor::restore(&config(), &snapshot).unwrap();
            prop_assert_eq!(restored.position(), split as u64);
            // Replay the whole journal: entries up to the position are ignored.
            let after = apply_all(&mut restored, 1, &entries, &metrics);
            prop_assert_eq!(after.get(..lost.len()), Some(&lost[..]));
            before.extend(after);
            prop_assert_eq!(&before, &expected);
            prop_assert_eq!(restored.snapshot(), reference.snapshot());
        }
    }
}
