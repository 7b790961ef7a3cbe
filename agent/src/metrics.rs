//! Counters shared by all stages. Plain atomics for the hot path; labelled counters in small
//! maps keyed by source name (bounded by the configuration): rejected input by cause, and
//! device counters (lost frames, restarts), which are not rejected input: nothing wrong
//! arrived, something never did. The Prometheus endpoint (technician's view issue) renders
//! these.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Process-wide counters and gauges.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Events accepted into the journal.
    pub events_in: AtomicU64,
    /// QoS 1 redeliveries recognised and dropped by the journal.
    pub redeliveries_dropped: AtomicU64,
    /// Group commits (fsyncs) of the journal.
    pub journal_commits: AtomicU64,
    /// Journal flushes that failed (each retry counts); `/readyz` is not ready while the
    /// last flush failed.
    pub journal_flush_failures: AtomicU64,
    /// 1 while the journal's last flush failed, 0 after a successful one.
    pub journal_flush_failing: AtomicU64,
    /// Wall-clock time (ms since the epoch) of the journal's last commit; 0 before the first.
    pub journal_last_commit_ms: AtomicU64,
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
    /// Records dropped from the outbox because they were older than their lane's TTL.
    pub outbox_expired: AtomicU64,
    /// Summaries merged away by backlog compaction (the records that went in).
    pub outbox_compacted_in: AtomicU64,
    /// Merged summaries written by backlog compaction (the records that came out).
    pub outbox_compacted_out: AtomicU64,
    /// Gauge: bytes waiting in the outbox (all lanes, keys + values).
    pub backlog_bytes: AtomicU64,
    /// Gauge: records waiting in the outbox (all lanes, gap records included).
    pub backlog_records: AtomicU64,
    /// Gauge: event time of the oldest waiting record (the head of each lane), ms since the
    /// Unix epoch; see [`Metrics::backlog_age_ms`].
    pub backlog_oldest_ms: OptionalTime,
    /// Records delivered upstream.
    pub upstream_sent_records: AtomicU64,
    /// Batches delivered upstream.
    pub upstream_sent_batches: AtomicU64,
    /// Failed send attempts.
    pub upstream_failures: AtomicU64,
    /// Time of each upstream send attempt, successful or not (request to answer).
    pub upstream_latency: Histogram,
    /// Batches moved to the dead-letter tree.
    pub dead_lettered_batches: AtomicU64,
    /// 1 when the last upstream attempt succeeded.
    pub upstream_up: AtomicU64,
    /// Stores that failed to open and were quarantined (moved aside, a fresh one started),
    /// counted when the loss is reported upstream.
    pub store_quarantines: AtomicU64,
    /// Outbox lanes found behind what upstream acknowledged at open (sled rolled the store
    /// back; see [`crate::sentmark`]).
    pub store_rollbacks: AtomicU64,
    /// Rejected input by `(source, cause)`.
    rejected: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// Device counters by source name: one entry per configured source that reported any,
    /// so the map is bounded by the configuration.
    devices: Mutex<BTreeMap<String, DeviceCounters>>,
    /// Records delivered upstream per second, recently: the drain time estimate.
    send_rate: Mutex<SendRate>,
    /// Gauge by source name: whether the source is connected (MQTT: between ConnAck and a
    /// connection error; serial: the port is open; simulated: always). Bounded by the
    /// configuration.
    connected: Mutex<BTreeMap<String, bool>>,
    /// Alert transitions by rule name: `(raised, cleared)`. Bounded by the number of rules
    /// (those of earlier configurations stay after a reload, like the other counters).
    alerts_by_rule: Mutex<BTreeMap<String, (u64, u64)>>,
}

/// Upper bounds of [`Histogram`]'s buckets, seconds: from a LAN round trip to a timeout.
pub const LATENCY_BUCKETS: [f64; 12] =
    [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// A latency histogram over atomics: a count per bucket of [`LATENCY_BUCKETS`] (plus one for
/// larger values), the sum in microseconds and the count.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let bucket =
            LATENCY_BUCKETS.iter().position(|b| seconds <= *b).unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// `(sum in seconds, count, [(upper bound, count in that bucket alone)])`, the last bucket
    /// with bound `+Inf`: what Prometheus' histogram encoding takes.
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let buckets = LATENCY_BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(&self.buckets)
            .map(|(bound, n)| (bound, n.load(Ordering::Relaxed)))
            .collect();
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        (sum, self.count.load(Ordering::Relaxed), buckets)
    }
}

/// A point in time that may be unknown, as an atomic (`i64::MIN` stands for none).
#[derive(Debug)]
pub struct OptionalTime(AtomicI64);

impl Default for OptionalTime {
    fn default() -> Self {
        OptionalTime(AtomicI64::new(i64::MIN))
    }
}

impl OptionalTime {
    /// Stores `time` (ms since the Unix epoch) or none.
    pub fn set(&self, time: Option<i64>) {
        self.0.store(time.unwrap_or(i64::MIN), Ordering::Relaxed);
    }

    /// The stored time, if any.
    pub fn get(&self) -> Option<i64> {
        Some(self.0.load(Ordering::Relaxed)).filter(|t| *t != i64::MIN)
    }
}

/// How many one-second buckets [`SendRate`] keeps: long enough to smooth out the batch
/// rhythm (a batch per `max_age`, pauses of pacing), short enough that the drain estimate
/// follows an upstream that slows down or recovers within seconds.
pub const SEND_RATE_SPAN_S: u64 = 10;

/// Records delivered per second over the last [`SEND_RATE_SPAN_S`] seconds, in fixed
/// one-second buckets (bounded memory, O(1) per delivery).
#[derive(Debug, Clone)]
pub struct SendRate {
    since: Instant,
    /// `(second since `since`, records)`, indexed by that second modulo the span.
    buckets: [(u64, u64); SEND_RATE_SPAN_S as usize],
}

impl Default for SendRate {
    fn default() -> Self {
        SendRate::new(Instant::now())
    }
}

impl SendRate {
    /// An empty meter that starts measuring at `now`.
    pub fn new(now: Instant) -> SendRate {
        SendRate { since: now, buckets: [(u64::MAX, 0); SEND_RATE_SPAN_S as usize] }
    }

    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.since).as_secs()
    }

    /// Counts `records` delivered at `now`.
    pub fn add(&mut self, records: u64, now: Instant) {
        let second = self.second(now);
        let bucket = &mut self.buckets[(second % SEND_RATE_SPAN_S) as usize];
        if bucket.0 != second {
            *bucket = (second, 0);
        }
        bucket.1 += records;
    }

    /// Records per second over the span (or since the start, if that is shorter).
    pub fn per_second(&self, now: Instant) -> f64 {
        let second = self.second(now);
        let records: u64 = self
            .buckets
            .iter()
            .filter(|(s, _)| *s != u64::MAX && *s <= second && second - *s < SEND_RATE_SPAN_S)
            .map(|(_, n)| n)
            .sum();
        let elapsed = now.saturating_duration_since(self.since);
        // The span covers the current partial second and the full seconds before it.
        let into_second = elapsed - Duration::from_secs(second);
        let span = Duration::from_secs(SEND_RATE_SPAN_S - 1) + into_second;
        let secs = span.min(elapsed).as_secs_f64();
        if secs > 0.0 { records as f64 / secs } else { 0.0 }
    }
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
    /// The upstream in one word: `up` (the last send worked), `idle` (nothing failed yet,
    /// nothing sent yet either) or `down`. For the status line and systemd's `STATUS=`.
    pub fn upstream_state(&self) -> &'static str {
        if get(&self.upstream_up) == 1 {
            "up"
        } else if get(&self.upstream_failures) == 0 {
            "idle"
        } else {
            "down"
        }
    }

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

    /// Counts `records` delivered upstream at `now` (for the drain time estimate).
    pub fn record_sent(&self, records: u64, now: Instant) {
        self.send_rate.lock().unwrap_or_else(|e| e.into_inner()).add(records, now);
    }

    /// Records delivered per second recently (see [`SendRate`]).
    pub fn send_rate(&self, now: Instant) -> f64 {
        self.send_rate.lock().unwrap_or_else(|e| e.into_inner()).per_second(now)
    }

    /// Age of the oldest waiting record at `now_ms` (0 for an event time in the future);
    /// `None` when the outbox is empty.
    pub fn backlog_age_ms(&self, now_ms: i64) -> Option<u64> {
        let oldest = self.backlog_oldest_ms.get()?;
        Some(u64::try_from(now_ms.saturating_sub(oldest)).unwrap_or(0))
    }

    /// Estimated seconds until the backlog is sent: waiting records over the recent send
    /// rate, rounded up; `Some(0)` when nothing waits, `None` when nothing was sent lately
    /// (the upstream is down: no estimate is honest then).
    pub fn drain_eta_s(&self, now: Instant) -> Option<u64> {
        let records = get(&self.backlog_records);
        if records == 0 {
            return Some(0);
        }
        let rate = self.send_rate(now);
        (rate > 0.0).then(|| (records as f64 / rate).ceil() as u64)
    }

    /// Sets the `connected` gauge of `source`.
    pub fn set_connected(&self, source: &str, connected: bool) {
        let mut map = self.connected.lock().unwrap_or_else(|e| e.into_inner());
        match map.get_mut(source) {
            Some(value) => *value = connected,
            None => {
                map.insert(source.to_string(), connected);
            }
        }
    }

    /// The `connected` gauge by source (sources that never reported are absent).
    pub fn connected(&self) -> BTreeMap<String, bool> {
        self.connected.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Counts one alert transition of `rule` (`raised` or cleared).
    pub fn alert_transition(&self, rule: &str, raised: bool) {
        let mut map = self.alerts_by_rule.lock().unwrap_or_else(|e| e.into_inner());
        let entry = match map.get_mut(rule) {
            Some(entry) => entry,
            None => map.entry(rule.to_string()).or_default(),
        };
        if raised {
            entry.0 += 1;
        } else {
            entry.1 += 1;
        }
    }

    /// Alert transitions by rule: `(raised, cleared)`.
    pub fn alerts_by_rule(&self) -> BTreeMap<String, (u64, u64)> {
        self.alerts_by_rule.lock().unwrap_or_else(|e| e.into_inner()).clone()
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

    #[test]
    fn the_send_rate_covers_the_last_ten_seconds() {
        let t0 = Instant::now();
        let mut rate = SendRate::new(t0);
        assert_eq!(rate.per_second(t0), 0.0);
        rate.add(100, t0 + Duration::from_millis(500));
        assert_eq!(rate.per_second(t0 + Duration::from_secs(1)), 100.0, "100 in the first second");
        rate.add(100, t0 + Duration::from_millis(1_500));
        let at = t0 + Duration::from_secs(4);
        assert_eq!(rate.per_second(at), 50.0, "200 in 4 s");
        // Once they are more than ten seconds old, the deliveries no longer count.
        assert_eq!(rate.per_second(t0 + Duration::from_secs(12)), 0.0);
        rate.add(90, t0 + Duration::from_millis(20_500));
        // 90 records in the nine full seconds before the current one, which just began.
        assert_eq!(rate.per_second(t0 + Duration::from_secs(21)), 10.0);
    }

    #[test]
    fn the_drain_estimate_divides_the_backlog_by_the_send_rate() {
        let m = Metrics::default();
        assert_eq!(m.drain_eta_s(Instant::now()), Some(0), "nothing waits");
        m.backlog_records.store(1_000, Ordering::Relaxed);
        assert_eq!(m.drain_eta_s(Instant::now()), None, "nothing sent: no estimate");
        let now = Instant::now();
        m.record_sent(500, now);
        let eta = m.drain_eta_s(now + Duration::from_millis(500)).unwrap();
        assert!((1..=2).contains(&eta), "500 records in at most 0.5 s: {eta}");
        m.backlog_oldest_ms.set(Some(1_000));
        assert_eq!(m.backlog_age_ms(61_000), Some(60_000));
        m.backlog_oldest_ms.set(None);
        assert_eq!(m.backlog_age_ms(61_000), None);
    }
}
