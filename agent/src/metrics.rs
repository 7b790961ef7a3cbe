//! Counters shared by all stages. Plain atomics for the hot path; labelled counters in a
//! small map. The Prometheus endpoint (technician's view issue) renders these.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Process-wide counters and gauges.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Events accepted into the journal.
    pub events_in: AtomicU64,
    /// QoS 1 redeliveries recognised and dropped by the journal.
    pub redeliveries_dropped: AtomicU64,
    /// Group commits (fsyncs) of the journal.
    pub journal_commits: AtomicU64,
    /// Highest durable journal sequence.
    pub journal_durable_seq: AtomicU64,
    /// Events applied by the processor.
    pub events_processed: AtomicU64,
    /// Events older than their window's allowed lateness.
    pub late_events: AtomicU64,
    /// Events stamped too far in the future.
    pub future_events: AtomicU64,
    /// Alerts raised.
    pub alerts_raised: AtomicU64,
    /// Alerts cleared.
    pub alerts_cleared: AtomicU64,
    /// Summaries emitted.
    pub summaries: AtomicU64,
    /// Records evicted from the outbox because it was full.
    pub outbox_evicted: AtomicU64,
    /// Records delivered upstream.
    pub upstream_sent_records: AtomicU64,
    /// Batches delivered upstream.
    pub upstream_sent_batches: AtomicU64,
    /// Failed send attempts.
    pub upstream_failures: AtomicU64,
    /// Batches moved to the dead-letter tree.
    pub dead_lettered_batches: AtomicU64,
    /// 1 when the last upstream attempt succeeded.
    pub upstream_up: AtomicU64,
    /// Rejected input by `(source, cause)`.
    rejected: Mutex<BTreeMap<(String, &'static str), u64>>,
}

impl Metrics {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts one rejected input of `source` for `cause` and returns the new count.
    pub fn reject(&self, source: &str, cause: &'static str) -> u64 {
        let mut map = self.rejected.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry((source.to_string(), cause)).or_insert(0);
        *n += 1;
        *n
    }

    /// Rejected inputs by `(source, cause)`.
    pub fn rejected(&self) -> BTreeMap<(String, &'static str), u64> {
        self.rejected.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Total rejected inputs.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.lock().unwrap_or_else(|e| e.into_inner()).values().sum()
    }
}

/// Reads a counter.
pub fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}
