//! Counters shared by all stages. Plain atomics for the hot path; labelled counters in small
//! maps keyed by source name (bounded by the configuration): rejected input by cause, and
//! device counters (lost frames, restarts), which are not rejected input: nothing wrong
//! arrived, something never did. The Prometheus endpoint (technician's view issue) renders
//! these.

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
    /// Device counters by source name: one entry per configured source that reported any,
    /// so the map is bounded by the configuration.
    devices: Mutex<BTreeMap<String, DeviceCounters>>,
}

/// What the devices behind one source (a serial port) did that is not rejected input: frames
/// a device numbered but that never arrived, and device restarts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceCounters {
    /// Frames missing from a device's sequence (corrupted on the line, or never sent).
    pub lost_frames: u64,
    /// Times a device restarted (its tick went backwards).
    pub device_restarts: u64,
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

    /// Counts `n` frames of a device behind `source` that never arrived.
    pub fn lost_frames(&self, source: &str, n: u64) {
        self.device_counters(source, |c| c.lost_frames += n);
    }

    /// Counts one restart of a device behind `source`.
    pub fn device_restarted(&self, source: &str) {
        self.device_counters(source, |c| c.device_restarts += 1);
    }

    /// Device counters by source.
    pub fn devices(&self) -> BTreeMap<String, DeviceCounters> {
        self.devices.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Lost frames of all sources.
    pub fn lost_frames_total(&self) -> u64 {
        let map = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        map.values().map(|c| c.lost_frames).sum()
    }

    fn device_counters(&self, source: &str, update: impl FnOnce(&mut DeviceCounters)) {
        let mut map = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        match map.get_mut(source) {
            Some(counters) => update(counters),
            None => update(map.entry(source.to_string()).or_default()),
        }
    }
}

/// Reads a counter.
pub fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_frames_and_restarts_are_counted_per_source_apart_from_rejects() {
        let m = Metrics::default();
        m.lost_frames("rs485", 3);
        m.lost_frames("rs485", 2);
        m.device_restarted("rs485");
        m.lost_frames("usb", 1);
        m.reject("usb", "frame_crc");
        let devices = m.devices();
        assert_eq!(devices["rs485"], DeviceCounters { lost_frames: 5, device_restarts: 1 });
        assert_eq!(devices["usb"], DeviceCounters { lost_frames: 1, device_restarts: 0 });
        assert_eq!(m.lost_frames_total(), 6);
        assert_eq!(m.rejected_total(), 1, "lost frames are not rejected input");
    }
}
