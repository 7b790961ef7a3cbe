//! Forwarding: reads the outbox in lane order and sends batches upstream until they are
//! acknowledged.
//!
//! ```text
//! outbox ──peek(lane, max_records, max_bytes)──▶ Batch ──Sink::send──▶ http (POST) | file (JSON line)
//!   ▲                                                        │
//!   ├── remove_through(lane, last_seq) ◀──── acknowledged ───┤
//!   ├── dead_letter(lane, records, why) ◀── rejected (4xx) ──┤
//!   └── (records stay; sleep backoff) ◀──── retryable ───────┘
//! ```
//!
//! # Invariants
//!
//! - **A record leaves the outbox only after the sink acknowledged it** (HTTP 2xx, a synced
//!   file line) or rejected it for good (then it moves to the dead-letter tree). A crash
//!   between the acknowledgement and `remove_through` resends the batch; its records keep
//!   their ids, so receivers deduplicate. Delivery is at least once; the effect exactly once.
//! - **Alerts go first, always.** The alerts lane is checked before *every* batch, also
//!   between the batches of a summary backlog and between the retries of a failed summary
//!   batch, so an alert waits for at most one in-flight send.
//! - **A lane never blocks on a bad batch.** A rejection dead-letters the batch and the next
//!   one goes; only "not now" answers (network errors, timeouts, 408, 429, 5xx) are retried,
//!   and they are retried forever: the outbox's byte cap, not the forwarder, bounds an outage.
//! - **A retry re-peeks.** While we back off, the outbox may have evicted the head of the
//!   summaries lane into a gap record; the retry sends what the lane holds now. Record ids
//!   are stable, so a receiver that already saw some of them deduplicates.
//! - **Batches of one lane leave in sequence order**, one at a time: there is a single task
//!   and no pipelining, so `remove_through(last_seq)` never skips an unacknowledged record.
//!
//! # Batching
//!
//! A batch holds at most `batch.max_records` records and `batch.max_bytes` bytes (as the
//! outbox measures them). Alerts leave at once. Summaries may linger up to `batch.max_age`
//! to fill a batch, counted from when the lane was last seen empty or the previous summary
//! batch left, so that no record waits longer than `max_age` plus one send; a lane that
//! already holds a full batch, and a batch being retried, never linger.
//!
//! # Pacing
//!
//! With `batch.drain_rate` set, summary batches hold at most one second's worth of records
//! and the next summary batch leaves no earlier than `records / drain_rate` after the
//! previous one started, so a backlog drains at that pace after an outage. The forwarder
//! still peeks one batch at a time, so memory stays bounded however large the backlog.
//! Alerts are never paced and still go first: the wait polls the alerts lane like a linger.
//! Every delivery feeds the send rate in [`Metrics`], from which the status line estimates
//! the drain time of the backlog.
//!
//! # Lifecycle
//!
//! [`run`] builds the [`Sink`] (refusing a bad URL or an unwritable file at start) and
//! loops until `cancel`. Cancellation is observed only between sends: an in-flight send
//! finishes (the topology bounds it with `agent.shutdown_timeout`), a backoff sleep or a
//! linger ends at once. Records not yet sent stay durable in the outbox for the next start.
//!
//! Upstream state changes are logged once each (`upstream is down` at warn, `upstream is up
//! again` with the outage's length and failure count at info); single retries only at debug.
//! `metrics.upstream_up` follows the last attempt.

pub(crate) mod file;
pub(crate) mod http;
pub(crate) mod mqtt;
pub(crate) mod tls;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sensors::record::{BATCH_FORMAT_VERSION, Batch, Lane, Record};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{BatchConfig, Config, UpstreamConfig};
use crate::metrics::Metrics;
use crate::outbox::{LaneStats, Outbox, OutboxError};
use crate::source::backoff::Backoff;

/// First retry delay of the file sink (it has no retry settings): a full disk or a missing
/// mount is cleared by a person, so there is no point in retrying faster than this.
const FILE_RETRY_INITIAL: Duration = Duration::from_millis(500);

/// Longest retry delay of the file sink: once the disk is fixed, output resumes within this.
const FILE_RETRY_MAX: Duration = Duration::from_secs(10);

/// How often a lingering summary batch re-checks the outbox: bounds how long an alert that
/// arrives meanwhile waits (alerts must leave within milliseconds), at the cost of a cheap
/// `stats()` call per tick, and only while summaries linger.
const LINGER_POLL: Duration = Duration::from_millis(10);

/// Why the forwarder cannot run (send failures are not errors: they are retried or
/// dead-lettered).
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// `upstream.url` is not an absolute http(s) URL.
    #[error("upstream url `{url}` is invalid: {reason}")]
    InvalidUrl {
        /// The configured URL.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `agent.id` cannot be sent in an HTTP header.
    #[error("agent id {id:?} cannot be sent in an HTTP header: {reason}")]
    AgentId {
        /// The configured id.
        id: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The HTTP client could not be built (TLS setup).
    #[error("cannot build the HTTP client")]
    HttpClient {
        /// reqwest's report.
        #[source]
        source: reqwest::Error,
    },
    /// `[upstream.tls]` cannot be used (files, keys, names, no trusted roots).
    #[error("upstream TLS: {0}")]
    Tls(#[from] tls::TlsError),
    /// An upstream setting cannot be used: a secret that cannot be read, a bad topic.
    #[error("{key}: {reason}")]
    Setting {
        /// The key, e.g. `upstream.password_env`.
        key: String,
        /// What is wrong (never a secret's value).
        reason: String,
    },
    /// The file sink's file cannot be created or opened for appending.
    #[error("cannot open upstream file {path}")]
    OpenFile {
        /// The configured path.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The outbox failed; the records are unchanged and are sent after a restart.
    #[error("outbox {action} on lane {lane:?} failed")]
    Outbox {
        /// `peek`, `remove_through` or `dead_letter`.
        action: &'static str,
        /// The lane.
        lane: Lane,
        /// The outbox's report.
        #[source]
        source: OutboxError,
    },
}

/// How one send failed, classified for the retry loop.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Not now: network errors, timeouts, HTTP 408, 429 and 5xx, a full disk. The batch
    /// stays in the outbox and is sent again after a backoff.
    #[error("upstream unavailable: {reason}")]
    Retryable {
        /// What happened, for logs.
        reason: String,
        /// The receiver's `Retry-After`, uncapped (the loop caps it at `retry_max`).
        retry_after: Option<Duration>,
    },
    /// Never: the receiver refused this batch (a 4xx other than 408/429). Resending it would
    /// block the lane forever, so it goes to the dead-letter tree.
    #[error("upstream rejected the batch with HTTP {status}: {body}")]
    Rejected {
        /// The HTTP status.
        status: u16,
        /// The start of the response body.
        body: String,
    },
    /// The batch cannot be serialised; no receiver could ever accept it.
    #[error("batch cannot be encoded: {reason}")]
    Unencodable {
        /// The encoder's report.
        reason: String,
    },
}

impl SendError {
    /// Whether sending the same records later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, SendError::Retryable { .. })
    }
}

/// Where batches go: the configured upstream. An enum rather than a trait object because
/// the set is closed (config decides) and the sends are `async`.
#[derive(Debug)]
pub(crate) enum Sink {
    /// `kind = "http"`.
    Http(http::HttpSink),
    /// `kind = "file"`.
    File(file::FileSink),
    /// `kind = "mqtt"`.
    Mqtt(mqtt::MqttSink),
}

impl Sink {
    /// Builds the sink of `[upstream]`.
    pub(crate) fn new(config: &Config) -> Result<Self, ForwardError> {
        Ok(match &config.upstream {
            UpstreamConfig::Http(c) => Sink::Http(http::HttpSink::new(c, &config.agent.id)?),
            UpstreamConfig::File(c) => Sink::File(file::FileSink::new(c)?),
            UpstreamConfig::Mqtt(c) => Sink::Mqtt(mqtt::MqttSink::new(c, &config.agent.id)?),
        })
    }

    /// Sends one batch; `Ok` means acknowledged.
    pub(crate) async fn send(&self, batch: &Batch) -> Result<(), SendError> {
        match self {
            Sink::Http(sink) => sink.send(batch).await,
            Sink::File(sink) => sink.send(batch).await,
            Sink::Mqtt(sink) => sink.send(batch).await,
        }
    }
}

/// `<agent>/<lane>/<first_seq>-<last_seq>`: the same records give the same key, so a
/// receiver can drop a whole resent batch before parsing it.
pub fn idempotency_key(batch: &Batch) -> String {
    format!("{}/{}/{}-{}", batch.agent, batch.lane.as_str(), batch.first_seq, batch.last_seq)
}

/// Sends outbox records upstream until `cancel`; then finishes the in-flight send and returns
/// (the caller bounds that with the shutdown deadline).
pub async fn run(
    config: Arc<Config>,
    outbox: Outbox,
    metrics: Arc<Metrics>,
    cancel: tokio_util::sync::CancellationToken,
) -> Result<(), ForwardError> {
    let sink = Sink::new(&config)?;
    Forwarder::new(&config, outbox, metrics, sink).run(cancel).await
}

/// An ongoing outage, for the "up again" log line.
#[derive(Debug)]
struct Outage {
    since: Instant,
    failures: u64,
}

/// The send loop's state.
#[derive(Debug)]
struct Forwarder {
    outbox: Outbox,
    metrics: Arc<Metrics>,
    sink: Sink,
    agent: String,
    batch: BatchConfig,
    backoff: Backoff,
    /// Caps a receiver's `Retry-After`.
    retry_max: Duration,
    /// Start of the current summary linger (see the module docs); `None` while the lane is
    /// empty.
    linger_since: Option<Instant>,
    /// The last send failed and is being retried: no lingering before the retry.
    retrying: bool,
    outage: Option<Outage>,
    /// No summary batch leaves before this (see "Pacing" in the module docs).
    paced_until: Option<Instant>,
}

impl Forwarder {
    fn new(config: &Config, outbox: Outbox, metrics: Arc<Metrics>, sink: Sink) -> Self {
        let (retry_initial, retry_max) = match &config.upstream {
            UpstreamConfig::Http(c) => (c.retry_initial, c.retry_max),
            UpstreamConfig::File(_) => (FILE_RETRY_INITIAL, FILE_RETRY_MAX),
            UpstreamConfig::Mqtt(c) => (c.retry_initial, c.retry_max),
        };
        Self {
            outbox,
            metrics,
            sink,
            agent: config.agent.id.clone(),
            batch: config.upstream.batch().clone(),
            backoff: Backoff::new(retry_initial, retry_max),
            retry_max,
            linger_since: None,
            retrying: false,
            outage: None,
            paced_until: None,
        }
    }

    /// Most records in a batch of `lane`: `batch.max_records`, and for paced summaries at
    /// most one second's worth, so that a paced drain sends small batches evenly.
    fn max_records(&self, lane: Lane) -> usize {
        let max = self.batch.max_records.max(1);
        match (lane, self.batch.drain_rate) {
            (Lane::Summaries, Some(rate)) if rate.is_finite() && rate > 0.0 => {
                max.min((rate.ceil() as usize).max(1))
            }
            _ => max,
        }
    }

    /// A summary batch of `records` left at `started`: the next one waits for the pace.
    fn pace(&mut self, started: Instant, records: usize) {
        if let Some(rate) = self.batch.drain_rate.filter(|r| r.is_finite() && *r > 0.0) {
            // At most a day: a rate that low is a typo, and the clock must not overflow.
            let spacing = Duration::try_from_secs_f64(records as f64 / rate)
                .map_or(Duration::from_secs(86_400), |d| d.min(Duration::from_secs(86_400)));
            self.paced_until = Some(started + spacing);
        }
    }

    async fn run(mut self, cancel: CancellationToken) -> Result<(), ForwardError> {
        while let Some(lane) = self.next_lane(&cancel).await {
            let peeked_at = Instant::now();
            let records = self
                .outbox
                .peek(lane, self.max_records(lane), self.batch.max_bytes.bytes())
                .map_err(|source| ForwardError::Outbox { action: "peek", lane, source })?;
            let Some(batch) = self.batch_of(lane, records) else {
                // The lane emptied between `stats` and `peek` (eviction); look again, but
                // not in a hot loop should the two ever disagree for longer.
                if sleep_or_cancel(LINGER_POLL, &cancel).await {
                    continue;
                }
                break;
            };
            let sent_at = Instant::now();
            let sent = self.sink.send(&batch).await;
            self.metrics.upstream_latency.observe(sent_at.elapsed());
            match sent {
                Ok(()) => {
                    self.delivered(&batch)?;
                    if lane == Lane::Summaries {
                        self.pace(peeked_at, batch.records.len());
                    }
                }
                Err(error) if error.is_retryable() => {
                    let delay = self.failed(&batch, &error);
                    if !sleep_or_cancel(delay, &cancel).await {
                        break;
                    }
                    continue;
                }
                Err(error) => self.dead_letter(&batch, &error)?,
            }
            self.retrying = false;
            if lane == Lane::Summaries {
                self.linger_since = Some(peeked_at);
            }
        }
        Ok(())
    }

    /// Waits until a lane is due and returns it (alerts first); `None` once cancelled.
    async fn next_lane(&mut self, cancel: &CancellationToken) -> Option<Lane> {
        loop {
            if cancel.is_cancelled() {
                return None;
            }
            let stats = self.outbox.stats();
            if stats.alerts.records > 0 {
                return Some(Lane::Alerts);
            }
            if stats.summaries.records == 0 {
                self.linger_since = None;
                tokio::select! {
                    () = cancel.cancelled() => return None,
                    () = self.outbox.wait_for_records() => continue,
                }
            }
            let now = Instant::now();
            if let Some(until) = self.paced_until.filter(|until| now < *until) {
                // Paced: wait, but look at the alerts lane every poll.
                if !sleep_or_cancel(LINGER_POLL.min(until - now), cancel).await {
                    return None;
                }
                continue;
            }
            let deadline = *self.linger_since.get_or_insert(now) + self.batch.max_age;
            if self.retrying || now >= deadline || self.is_full(&stats.summaries) {
                return Some(Lane::Summaries);
            }
            // Poll rather than wait for new records: an alert must interrupt the linger, and
            // a full lane must end it, whichever comes first.
            if !sleep_or_cancel(LINGER_POLL.min(deadline - now), cancel).await {
                return None;
            }
        }
    }

    /// Whether a lane already holds at least one full batch.
    fn is_full(&self, lane: &LaneStats) -> bool {
        lane.records >= self.batch.max_records.max(1) as u64
            || lane.bytes >= self.batch.max_bytes.bytes()
    }

    /// The batch of peeked records; `None` if there are none.
    fn batch_of(&self, lane: Lane, records: Vec<Record>) -> Option<Batch> {
        let first_seq = records.first()?.seq;
        let last_seq = records.last()?.seq;
        Some(Batch {
            version: BATCH_FORMAT_VERSION,
            agent: self.agent.clone(),
            lane,
            first_seq,
            last_seq,
            records,
        })
    }

    /// The receiver acknowledged `batch`: remove it from the outbox.
    fn delivered(&mut self, batch: &Batch) -> Result<(), ForwardError> {
        self.outbox.remove_through(batch.lane, batch.last_seq).map_err(|source| {
            ForwardError::Outbox { action: "remove_through", lane: batch.lane, source }
        })?;
        Metrics::add(&self.metrics.upstream_sent_records, batch.records.len() as u64);
        Metrics::add(&self.metrics.upstream_sent_batches, 1);
        self.metrics.record_sent(batch.records.len() as u64, std::time::Instant::now());
        debug!(
            lane = batch.lane.as_str(),
            first_seq = batch.first_seq,
            last_seq = batch.last_seq,
            records = batch.records.len(),
            "batch delivered"
        );
        self.upstream_answered();
        Ok(())
    }

    /// The batch can never be delivered: move it to the dead-letter tree so the lane moves on.
    fn dead_letter(&mut self, batch: &Batch, error: &SendError) -> Result<(), ForwardError> {
        let reason = error.to_string();
        self.outbox.dead_letter(batch.lane, &batch.records, &reason).map_err(|source| {
            ForwardError::Outbox { action: "dead_letter", lane: batch.lane, source }
        })?;
        Metrics::add(&self.metrics.dead_lettered_batches, 1);
        warn!(
            lane = batch.lane.as_str(),
            first_seq = batch.first_seq,
            last_seq = batch.last_seq,
            records = batch.records.len(),
            %reason,
            "upstream refused a batch; moved it to the dead-letter tree"
        );
        if matches!(error, SendError::Rejected { .. }) {
            // A refusal is an answer: the upstream is reachable.
            self.upstream_answered();
        }
        Ok(())
    }

    /// A send failed but may succeed later: count it, note the outage, return the delay.
    fn failed(&mut self, batch: &Batch, error: &SendError) -> Duration {
        Metrics::add(&self.metrics.upstream_failures, 1);
        self.metrics.upstream_up.store(0, Ordering::Relaxed);
        self.retrying = true;
        match &mut self.outage {
            None => {
                warn!(
                    lane = batch.lane.as_str(),
                    first_seq = batch.first_seq,
                    last_seq = batch.last_seq,
                    %error,
                    "upstream is down; records stay in the outbox and are retried"
                );
                self.outage = Some(Outage { since: Instant::now(), failures: 1 });
            }
            Some(outage) => {
                outage.failures += 1;
                debug!(failures = outage.failures, %error, "upstream still down");
            }
        }
        // Advance the schedule even when the receiver names a delay, so that a receiver
        // that stops sending `Retry-After` does not restart us at the initial delay.
        let backoff = self.backoff.next_delay();
        match error {
            SendError::Retryable { retry_after: Some(wanted), .. } => (*wanted).min(self.retry_max),
            _ => backoff,
        }
    }

    /// The upstream answered: mark it up and end an outage.
    fn upstream_answered(&mut self) {
        self.metrics.upstream_up.store(1, Ordering::Relaxed);
        self.backoff.reset();
        if let Some(outage) = self.outage.take() {
            info!(
                down_for = ?outage.since.elapsed(),
                failures = outage.failures,
                "upstream is up again"
            );
        }
    }
}

/// Sleeps `delay`; `false` if `cancel` fired first.
async fn sleep_or_cancel(delay: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        () = cancel.cancelled() => false,
        () = tokio::time::sleep(delay) => true,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::ops::RangeInclusive;

    use sensors::record::{Alert, AlertState, RecordBody, Severity, Summary, record_id};

    use super::http::receiver::{Received, Receiver, Reply};
    use super::*;
    use crate::config::{BufferConfig, Compression, HttpUpstreamConfig};
    use crate::store::Store;

    /// The agent id of every test batch.
    pub(crate) const AGENT: &str = "gw-test";

    pub(crate) fn summary(seq: u64) -> RecordBody {
        RecordBody::Summary(Summary {
            series: format!("pump-{seq}/temperature"),
            start_ms: 60_000 * seq as i64,
            window_ms: 60_000,
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

    pub(crate) fn alert(seq: u64) -> RecordBody {
        RecordBody::Alert(Alert {
            rule: "hot".into(),
            series: format!("pump-{seq}/temperature"),
            state: AlertState::Raised,
            severity: Severity::Critical,
            ts_ms: 1_000 * seq as i64,
            value: 91.5,
            threshold: 90.0,
            message: "hot: too hot".into(),
            labels: Default::default(),
        })
    }

    /// A batch of made-up records, as the forwarder would build it.
    pub(crate) fn batch_of(lane: Lane, seqs: RangeInclusive<u64>) -> Batch {
        let records: Vec<Record> = seqs
            .clone()
            .map(|seq| Record {
                id: record_id(AGENT, 0xabc, lane, seq),
                seq,
                body: if lane == Lane::Alerts { alert(seq) } else { summary(seq) },
            })
            .collect();
        Batch {
            version: BATCH_FORMAT_VERSION,
            agent: AGENT.into(),
            lane,
            first_seq: *seqs.start(),
            last_seq: *seqs.end(),
            records,
        }
    }

    /// An HTTP upstream at `url` with small delays for tests.
    pub(crate) fn http_config(url: &str, compression: Compression) -> HttpUpstreamConfig {
        HttpUpstreamConfig {
            url: url.into(),
            compression,
            format: sensors::wire::Format::Json,
            timeout: Duration::from_secs(5),
            retry_initial: Duration::from_millis(10),
            retry_max: Duration::from_millis(50),
            token_env: None,
            token_file: None,
            basic: None,
            tls: None,
            batch: BatchConfig::default(),
        }
    }

    /// A forwarder running against a real outbox in a temp dir.
    struct Harness {
        outbox: Outbox,
        metrics: Arc<Metrics>,
        cancel: CancellationToken,
        task: tokio::task::JoinHandle<Result<(), ForwardError>>,
        store: Store,
        _dir: tempfile::TempDir,
    }

    impl Harness {
        /// Starts a forwarder; `prefill` puts records before it starts.
        fn start(upstream: UpstreamConfig, prefill: impl FnOnce(&Outbox)) -> Harness {
            Self::start_with(upstream, BufferConfig::default(), prefill)
        }

        /// Starts a forwarder on an outbox with these settings.
        fn start_with(
            upstream: UpstreamConfig,
            buffer: BufferConfig,
            prefill: impl FnOnce(&Outbox),
        ) -> Harness {
            let dir = tempfile::tempdir().unwrap();
            let metrics = Arc::new(Metrics::default());
            let (store, _) = Store::open(&dir.path().join("db"), 1 << 20).unwrap();
            let outbox = Outbox::open(&store, AGENT, &buffer, metrics.clone()).unwrap();
            prefill(&outbox);
            let mut config = Config::from_toml(
                "[agent]\nid = \"gw-test\"\n[upstream]\nkind = \"file\"\npath = \"-\"\n",
            )
            .unwrap();
            config.upstream = upstream;
            let cancel = CancellationToken::new();
            let task = tokio::spawn(run(
                Arc::new(config),
                outbox.clone(),
                metrics.clone(),
                cancel.clone(),
            ));
            Harness { outbox, metrics, cancel, task, store, _dir: dir }
        }

        fn put_alerts(&self, seqs: RangeInclusive<u64>) {
            for seq in seqs {
                assert!(self.outbox.put(Lane::Alerts, seq, alert(seq)).unwrap());
            }
        }

        fn put_summaries(&self, seqs: RangeInclusive<u64>) {
            for seq in seqs {
                assert!(self.outbox.put(Lane::Summaries, seq, summary(seq)).unwrap());
            }
        }

        /// The ids the outbox gives these records.
        fn ids(&self, lane: Lane, seqs: RangeInclusive<u64>) -> Vec<String> {
            seqs.map(|seq| record_id(AGENT, self.store.epoch(), lane, seq)).collect()
        }

        /// Waits (up to 60 s: draining 10,000 records on a loaded 2-core machine takes
        /// seconds; speed is measured in benchmarks, not here) until the outbox is empty.
        async fn wait_until_empty(&self) {
            wait_until_within("the outbox empties", Duration::from_secs(60), || {
                let stats = self.outbox.stats();
                stats.alerts.records + stats.summaries.records == 0
            })
            .await;
        }

        /// Cancels and expects the forwarder to return `Ok` promptly.
        async fn stop(self) {
            self.cancel.cancel();
            tokio::time::timeout(Duration::from_secs(5), self.task)
                .await
                .expect("the forwarder stops within 5 s of cancel")
                .unwrap()
                .unwrap();
        }
    }

    /// Polls `condition` until it holds; panics after 10 s.
    async fn wait_until(what: &str, condition: impl FnMut() -> bool) {
        wait_until_within(what, Duration::from_secs(10), condition).await
    }

    /// Polls `condition` until it holds; panics after `limit`.
    async fn wait_until_within(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + limit;
        while !condition() {
            assert!(std::time::Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn http(url: &str, configure: impl FnOnce(&mut HttpUpstreamConfig)) -> UpstreamConfig {
        let mut config = http_config(url, Compression::Zstd);
        config.batch.max_age = Duration::from_millis(10);
        configure(&mut config);
        UpstreamConfig::Http(config)
    }

    fn lanes(received: &[Received]) -> Vec<Lane> {
        received.iter().map(|r| r.batch.lane).collect()
    }

    #[tokio::test]
    async fn acknowledged_batches_leave_the_outbox_and_are_counted() {
        let receiver = Receiver::start().await;
        let harness = Harness::start(http(&receiver.url, |_| {}), |_| {});
        harness.put_alerts(1..=3);
        harness.put_summaries(1..=2);
        harness.wait_until_empty().await;
        let received = receiver.wait_for(2).await;
        assert_eq!(lanes(&received), [Lane::Alerts, Lane::Summaries]);
        assert_eq!(received[0].batch.first_seq, 1);
        assert_eq!(received[0].batch.last_seq, 3);
        assert_eq!(received[0].batch.version, BATCH_FORMAT_VERSION);
        assert_eq!(received[0].batch.agent, AGENT);
        let m = &harness.metrics;
        assert_eq!(crate::metrics::get(&m.upstream_sent_records), 5);
        assert_eq!(crate::metrics::get(&m.upstream_sent_batches), 2);
        assert_eq!(crate::metrics::get(&m.upstream_up), 1);
        assert_eq!(crate::metrics::get(&m.upstream_failures), 0);
        harness.stop().await;
    }

    #[tokio::test]
    async fn a_503_is_retried_and_the_same_ids_arrive_exactly_once() {
        let receiver = Receiver::start().await;
        receiver.script([Reply::status(503), Reply::status(503)]);
        let harness = Harness::start(http(&receiver.url, |_| {}), |o| {
            for seq in 1..=5 {
                o.put(Lane::Summaries, seq, summary(seq)).unwrap();
            }
        });
        let received = receiver.wait_for(3).await;
        harness.wait_until_empty().await;
        let keys: Vec<_> = received.iter().map(|r| r.headers["idempotency-key"].clone()).collect();
        assert!(keys.iter().all(|k| k == "gw-test/summaries/1-5"), "{keys:?}");
        assert!(
            received.iter().all(|r| r.batch == received[0].batch),
            "a retry resends the same batch"
        );
        assert_eq!(receiver.acknowledged_ids(), harness.ids(Lane::Summaries, 1..=5));
        assert_eq!(crate::metrics::get(&harness.metrics.upstream_failures), 2);
        assert_eq!(crate::metrics::get(&harness.metrics.upstream_up), 1);
        harness.stop().await;
        assert_eq!(receiver.received().len(), 3, "nothing is sent after the acknowledgement");
    }

    #[tokio::test]
    async fn a_429_retry_after_is_honoured() {
        let receiver = Receiver::start().await;
        receiver.script([Reply::status(429).header("retry-after", "1")]);
        let harness =
            Harness::start(http(&receiver.url, |c| c.retry_max = Duration::from_secs(5)), |o| {
                o.put(Lane::Alerts, 1, alert(1)).unwrap();
            });
        let received = receiver.wait_for(2).await;
        let waited = received[1].at - received[0].at;
        assert!(waited >= Duration::from_secs(1), "retried after {waited:?}, before Retry-After");
        assert!(waited < Duration::from_secs(3), "retried after {waited:?}");
        harness.stop().await;
    }

    #[tokio::test]
    async fn retry_after_is_capped_at_retry_max() {
        let receiver = Receiver::start().await;
        receiver.script([Reply::status(503).header("retry-after", "3600")]);
        let harness = Harness::start(
            http(&receiver.url, |c| c.retry_max = Duration::from_millis(100)),
            |o| {
                o.put(Lane::Alerts, 1, alert(1)).unwrap();
            },
        );
        let received = receiver.wait_for(2).await;
        assert!(received[1].at - received[0].at < Duration::from_secs(2));
        harness.stop().await;
    }

    #[tokio::test]
    async fn a_400_dead_letters_the_batch_and_the_next_batch_still_goes() {
        let receiver = Receiver::start().await;
        receiver.script([Reply::status(400).body("unknown field `foo`")]);
        let harness = Harness::start(http(&receiver.url, |c| c.batch.max_records = 2), |o| {
            for seq in 1..=4 {
                o.put(Lane::Alerts, seq, alert(seq)).unwrap();
            }
        });
        let received = receiver.wait_for(2).await;
        harness.wait_until_empty().await;
        assert_eq!(received[0].batch.records.len(), 2);
        assert_eq!(received[0].status, 400);
        assert_eq!(receiver.acknowledged_ids(), harness.ids(Lane::Alerts, 3..=4));
        assert_eq!(crate::metrics::get(&harness.metrics.dead_lettered_batches), 1);
        assert_eq!(crate::metrics::get(&harness.metrics.upstream_failures), 0);
        harness.stop().await;
    }

    #[tokio::test]
    async fn a_retry_sends_the_gap_that_replaced_evicted_records() {
        let receiver = Receiver::start().await;
        receiver.script([Reply::status(503)]);
        // Room for a handful of summaries: the puts during the backoff evict the oldest.
        let buffer = BufferConfig { max_bytes: crate::config::ByteSize(700), ..Default::default() };
        let harness = Harness::start_with(
            http(&receiver.url, |c| {
                c.retry_initial = Duration::from_millis(300);
                c.retry_max = Duration::from_millis(300);
            }),
            buffer,
            |o| {
                for seq in 1..=3 {
                    o.put(Lane::Summaries, seq, summary(seq)).unwrap();
                }
            },
        );
        receiver.wait_for(1).await;
        harness.put_summaries(4..=20);
        assert!(harness.outbox.stats().evicted > 0, "the test must make the outbox evict");
        harness.wait_until_empty().await;
        let acknowledged: Vec<Record> = receiver
            .received()
            .into_iter()
            .filter(|r| r.status == 200)
            .flat_map(|r| r.batch.records)
            .collect();
        let RecordBody::Gap(gap) = &acknowledged[0].body else {
            panic!("the retry starts with a gap record: {acknowledged:?}");
        };
        assert_eq!((acknowledged[0].seq, gap.first_seq), (1, 1));
        // Every seq is accounted for exactly once: delivered, or reported lost by a gap.
        let mut covered = Vec::new();
        for record in &acknowledged {
            match &record.body {
                RecordBody::Gap(gap) => covered.extend(gap.first_seq..=gap.last_seq),
                _ => covered.push(record.seq),
            }
        }
        assert_eq!(covered, (1..=20).collect::<Vec<u64>>());
        harness.stop().await;
    }

    #[tokio::test]
    async fn alerts_go_before_a_summary_backlog() {
        let receiver = Receiver::start().await;
        let harness = Harness::start(http(&receiver.url, |c| c.batch.max_records = 2), |o| {
            for seq in 1..=6 {
                o.put(Lane::Summaries, seq, summary(seq)).unwrap();
            }
            o.put(Lane::Alerts, 1, alert(1)).unwrap();
        });
        let received = receiver.wait_for(4).await;
        assert_eq!(
            lanes(&received),
            [Lane::Alerts, Lane::Summaries, Lane::Summaries, Lane::Summaries]
        );
        harness.stop().await;
    }

    #[tokio::test]
    async fn an_alert_overtakes_a_summary_batch_that_is_being_retried() {
        let receiver = Receiver::start().await;
        receiver.script([Reply::status(503)]);
        let harness = Harness::start(
            http(&receiver.url, |c| {
                c.batch.max_records = 2;
                // Long enough that the alert below is surely in the outbox before the retry.
                c.retry_initial = Duration::from_millis(300);
                c.retry_max = Duration::from_millis(300);
            }),
            |o| {
                for seq in 1..=3 {
                    o.put(Lane::Summaries, seq, summary(seq)).unwrap();
                }
            },
        );
        receiver.wait_for(1).await;
        harness.put_alerts(1..=1);
        let received = receiver.wait_for(4).await;
        assert_eq!(
            lanes(&received),
            [Lane::Summaries, Lane::Alerts, Lane::Summaries, Lane::Summaries]
        );
        assert_eq!(received[2].batch, received[0].batch, "the failed batch is retried next");
        harness.wait_until_empty().await;
        harness.stop().await;
    }

    #[tokio::test]
    async fn summaries_linger_until_a_batch_is_full() {
        let receiver = Receiver::start().await;
        let harness = Harness::start(
            http(&receiver.url, |c| {
                c.batch.max_records = 3;
                c.batch.max_age = Duration::from_secs(30);
            }),
            |_| {},
        );
        let start = std::time::Instant::now();
        harness.put_summaries(1..=1);
        // Asserting that nothing happens needs a pause; 100 ms is 10 linger polls.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(receiver.received().is_empty(), "a lone summary lingers");
        harness.put_summaries(2..=3);
        let received = receiver.wait_for(1).await;
        assert_eq!(received[0].batch.records.len(), 3);
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "a full batch does not wait for max_age"
        );
        harness.stop().await;
    }

    #[tokio::test]
    async fn a_lingering_summary_leaves_after_max_age() {
        let receiver = Receiver::start().await;
        let harness = Harness::start(
            http(&receiver.url, |c| c.batch.max_age = Duration::from_millis(200)),
            |_| {},
        );
        let start = std::time::Instant::now();
        harness.put_summaries(1..=1);
        let received = receiver.wait_for(1).await;
        assert!(received[0].at - start >= Duration::from_millis(200));
        assert_eq!(received[0].batch.records.len(), 1);
        harness.stop().await;
    }

    #[tokio::test]
    async fn an_alert_leaves_before_the_rest_of_a_big_summary_backlog() {
        const BACKLOG: u64 = 10_000;
        let receiver = Receiver::start().await;
        let harness = Harness::start(http(&receiver.url, |c| c.batch.max_records = 20), |o| {
            for seq in 1..=BACKLOG {
                o.put(Lane::Summaries, seq, summary(seq)).unwrap();
            }
        });
        receiver.wait_for(1).await;
        let before = receiver.received().len();
        let put_at = std::time::Instant::now();
        harness.put_alerts(1..=1);
        let alert_at = loop {
            let received = receiver.received();
            if let Some(i) = received.iter().position(|r| r.batch.lane == Lane::Alerts) {
                break i;
            }
            assert!(put_at.elapsed() < Duration::from_secs(10), "the alert never left");
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        // At most the summary batch in flight when the alert was put goes before it.
        assert!(alert_at <= before + 1, "alert at {alert_at}, put after {before} batches");
        harness.wait_until_empty().await;
        let received = receiver.received();
        let summaries_after =
            received[alert_at..].iter().filter(|r| r.batch.lane == Lane::Summaries);
        assert!(summaries_after.count() > 100, "the backlog was still draining");
        let sent: usize = received.iter().map(|r| r.batch.records.len()).sum();
        assert_eq!(sent as u64, BACKLOG + 1);
        harness.stop().await;
    }

    #[tokio::test]
    async fn a_paced_drain_keeps_to_the_drain_rate_and_never_delays_an_alert() {
        let receiver = Receiver::start().await;
        let harness = Harness::start(
            http(&receiver.url, |c| {
                c.batch.drain_rate = Some(200.0);
                c.batch.max_age = Duration::ZERO;
            }),
            |o| {
                for seq in 1..=300 {
                    o.put(Lane::Summaries, seq, summary(seq)).unwrap();
                }
            },
        );
        receiver.wait_for(1).await;
        // The second summary batch waits a second for the pace; an alert does not.
        let put_at = std::time::Instant::now();
        harness.put_alerts(1..=1);
        let received = receiver.wait_for(3).await;
        assert_eq!(lanes(&received), [Lane::Summaries, Lane::Alerts, Lane::Summaries]);
        assert!(received[1].at - put_at < Duration::from_millis(500), "the alert was paced");
        let sizes: Vec<usize> = received.iter().map(|r| r.batch.records.len()).collect();
        assert_eq!(sizes, [200, 1, 100], "paced batches hold one second's worth");
        let spacing = received[2].at - received[0].at;
        assert!(spacing >= Duration::from_millis(900), "200 records at 200/s, then {spacing:?}");
        assert!(spacing < Duration::from_secs(3), "{spacing:?}");
        let rate = harness.metrics.send_rate(std::time::Instant::now());
        assert!(rate > 0.0, "deliveries feed the send rate");
        harness.stop().await;
    }

    #[tokio::test]
    async fn an_alert_does_not_wait_for_lingering_summaries() {
        let receiver = Receiver::start().await;
        let harness = Harness::start(
            http(&receiver.url, |c| c.batch.max_age = Duration::from_secs(30)),
            |_| {},
        );
        harness.put_summaries(1..=1);
        tokio::time::sleep(Duration::from_millis(30)).await;
        let start = std::time::Instant::now();
        harness.put_alerts(1..=1);
        let received = receiver.wait_for(1).await;
        assert_eq!(received[0].batch.lane, Lane::Alerts);
        assert!(received[0].at - start < Duration::from_secs(1));
        harness.stop().await;
    }

    #[tokio::test]
    async fn the_file_sink_writes_each_batch_as_a_json_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out/batches.jsonl");
        let batch = BatchConfig { max_age: Duration::from_millis(10), ..BatchConfig::default() };
        let upstream =
            UpstreamConfig::File(crate::config::FileUpstreamConfig { path: path.clone(), batch });
        let harness = Harness::start(upstream, |o| {
            for seq in 1..=3 {
                o.put(Lane::Summaries, seq, summary(seq)).unwrap();
            }
            o.put(Lane::Alerts, 1, alert(1)).unwrap();
        });
        harness.wait_until_empty().await;
        let text = std::fs::read_to_string(&path).unwrap();
        let batches: Vec<Batch> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(
            batches.iter().map(|b| b.lane).collect::<Vec<_>>(),
            [Lane::Alerts, Lane::Summaries]
        );
        assert_eq!(
            batches[1].records.iter().map(|r| r.id.clone()).collect::<Vec<_>>(),
            harness.ids(Lane::Summaries, 1..=3)
        );
        harness.stop().await;
    }

    #[tokio::test]
    async fn cancel_ends_a_backoff_sleep_at_once() {
        // A free port refuses connections: every send fails.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let url = format!("http://127.0.0.1:{port}/ingest");
        let harness = Harness::start(
            http(&url, |c| {
                c.retry_initial = Duration::from_secs(600);
                c.retry_max = Duration::from_secs(600);
            }),
            |o| {
                o.put(Lane::Alerts, 1, alert(1)).unwrap();
            },
        );
        let metrics = harness.metrics.clone();
        wait_until("a send failed", || crate::metrics::get(&metrics.upstream_failures) == 1).await;
        assert_eq!(crate::metrics::get(&metrics.upstream_up), 0);
        assert_eq!(harness.outbox.stats().alerts.records, 1, "a failed record stays");
        harness.stop().await;
    }

    #[tokio::test]
    async fn an_unusable_upstream_is_refused_at_start() {
        let harness = Harness::start(http("ftp://example.invalid/", |_| {}), |_| {});
        let result = tokio::time::timeout(Duration::from_secs(5), harness.task).await.unwrap();
        assert!(matches!(result.unwrap(), Err(ForwardError::InvalidUrl { .. })));
    }

    #[test]
    fn idempotency_keys_name_agent_lane_and_range() {
        assert_eq!(idempotency_key(&batch_of(Lane::Alerts, 3..=5)), "gw-test/alerts/3-5");
        assert_eq!(idempotency_key(&batch_of(Lane::Summaries, 9..=9)), "gw-test/summaries/9-9");
    }

    #[test]
    fn only_retryable_errors_say_so() {
        let retryable = SendError::Retryable { reason: "x".into(), retry_after: None };
        assert!(retryable.is_retryable());
        assert!(!SendError::Rejected { status: 400, body: String::new() }.is_retryable());
        assert!(!SendError::Unencodable { reason: "x".into() }.is_retryable());
    }
}
