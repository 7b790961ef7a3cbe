//! Spawns the stages and runs the one shutdown path.
//!
//! ```text
//! sources ──Ingest──▶ journal writer ──(seq, Entry)──▶ processor ──▶ outbox ◀── forwarder
//!   (N tasks)  bounded      (group commit,     bounded      (rules,        (sled)    (upstream)
//!                           acks after fsync)               summaries, snapshots)
//! ```
//!
//! Shutdown order (each stage ends when its input closes, so nothing accepted is left behind):
//! 1. the sources stop (cancel) and drop their ingest senders;
//! 2. the journal writer drains the channel, makes its final commit and closes the processor
//!    channel;
//! 3. the processor applies what it got, snapshots and flushes;
//! 4. the forwarder finishes its in-flight send before `agent.shutdown_timeout`;
//! 5. a last flush of the store.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sensors::record::{Alert, RecordBody};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::metrics::{self, Metrics};
use crate::outbox::Outbox;
use crate::store::Store;
use crate::{forward, journal, processor, source};

/// Ingest messages in flight between the sources and the journal writer. One group commit takes
/// at most `journal.commit_max_entries`; twice the default lets the next commit fill while the
/// current one is being flushed. When full, sources wait (MQTT then stops reading its socket and
/// the broker queues for us).
pub const INGEST_CHANNEL_CAPACITY: usize = 8192;

/// Committed batches waiting for the processor. Each is one group commit, so this bounds the
/// processor's lag to a few commits before the writer waits.
pub const PROCESSOR_CHANNEL_CAPACITY: usize = 16;

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// The store could not be opened.
    #[error("cannot open the store in {dir}: {source}")]
    Store {
        /// The data directory.
        dir: String,
        /// The cause.
        source: crate::store::StoreError,
    },
    /// The journal could not be opened.
    #[error("cannot open the journal: {0}")]
    Journal(#[from] crate::journal::JournalError),
    /// The outbox could not be opened.
    #[error("cannot open the outbox: {0}")]
    Outbox(#[from] crate::outbox::OutboxError),
    /// The API could not start (its address is in use, its token unreadable).
    #[error(transparent)]
    Api(#[from] crate::api::ApiError),
    /// A stage failed while running.
    #[error("{stage} failed: {reason}")]
    Stage {
        /// Which stage.
        stage: &'static str,
        /// What happened.
        reason: String,
    },
}

/// Runs the agent until `shutdown` resolves (or a stage fails), then stops in order.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), TopologyError> {
    run_with_metrics(config, None, Arc::new(Metrics::default()), shutdown).await
}

/// [`run`] with hot reload of `config_path` (SIGHUP or a file change, see [`crate::reload`])
/// and caller-owned metrics (tests and the API read them).
pub async fn run_with_metrics(
    config: Config,
    config_path: Option<std::path::PathBuf>,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), TopologyError> {
    // reqwest and (later) rumqttc TLS use the process-wide rustls provider: ring, never aws-lc.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = Arc::new(config);
    // Bound before anything is opened: an address in use stops the start with a clear error.
    let api = crate::api::bind(&config.api).await?;
    let dir = config.agent.data_dir.clone();
    let (store, report) = Store::open(&dir, config.storage.cache_capacity.bytes())
        .map_err(|source| TopologyError::Store { dir: dir.display().to_string(), source })?;
    if let Some(moved) = &report.quarantined {
        error!(
            moved_to = %moved.display(),
            "the store was corrupted; it was moved aside and a fresh one was created"
        );
    }
    let journal = journal::Journal::open_with(&store, journal::segment_bytes(&config.journal))?;
    let reader = journal.reader();
    let api_reader = reader.clone();
    let recovered_through = journal.last_seq();
    let outbox = Outbox::open(&store, &config.agent.id, &config.buffer, metrics.clone())?;
    // Before the processor starts: its records are numbered from 1, the report takes seq 0.
    let lost_store_alert = report_lost_store(&store, &outbox, &dir, &metrics).await?;
    info!(
        agent = %config.agent.id,
        data_dir = %dir.display(),
        epoch = format_args!("{:x}", store.epoch()),
        journal_last_seq = journal.last_seq(),
        "edgewise {} starting",
        env!("CARGO_PKG_VERSION")
    );

    let readmodel = Arc::new(crate::readmodel::ReadModel::default());
    if let Some(alert) = &lost_store_alert {
        readmodel.publish_alert(alert);
    }
    let (ingest_tx, ingest_rx) = mpsc::channel(INGEST_CHANNEL_CAPACITY);
    let (processor_tx, processor_rx) = mpsc::channel(PROCESSOR_CHANNEL_CAPACITY);
    let source_cancel = CancellationToken::new();
    let forward_cancel = CancellationToken::new();
    let failed = CancellationToken::new();
    let (reload_tx, reload_rx) = tokio::sync::watch::channel(config.clone());
    let reloader = config_path
        .map(|path| tokio::spawn(crate::reload::watch(path, reload_tx, forward_cancel.clone())));

    let writer = watch_stage(
        "journal writer",
        failed.clone(),
        tokio::spawn(journal::run_writer(
            journal,
            config.journal.clone(),
            ingest_rx,
            processor_tx,
            metrics.clone(),
        )),
    );
    let processor = watch_stage(
        "processor",
        failed.clone(),
        tokio::spawn(processor::run(
            config.clone(),
            store.clone(),
            reader,
            outbox.clone(),
            processor_rx,
            metrics.clone(),
            recovered_through,
            reload_rx,
            readmodel.clone(),
        )),
    );
    let forwarder = watch_stage(
        "forwarder",
        failed.clone(),
        tokio::spawn(forward::run(
            config.clone(),
            outbox.clone(),
            metrics.clone(),
            forward_cancel.clone(),
        )),
    );
    let mut sources = Vec::new();
    for index in 0..config.sources.len() {
        let name = config.sources[index].name().to_string();
        sources.push(watch_stage(
            "source",
            failed.clone(),
            tokio::spawn({
                let (config, tx, metrics, cancel) =
                    (config.clone(), ingest_tx.clone(), metrics.clone(), source_cancel.clone());
                async move {
                    let result = source::run(index as u16, config, tx, metrics, cancel).await;
                    if let Err(e) = &result {
                        error!(source = %name, error = %e, "source stopped");
                    }
                    result
                }
            }),
        ));
    }
    drop(ingest_tx);
    let status_stop = CancellationToken::new();
    let status = tokio::spawn(status_loop(
        config.agent.status_interval,
        metrics.clone(),
        outbox.clone(),
        status_stop.clone(),
    ));
    let api_stop = CancellationToken::new();
    let api = api.map(|api| {
        let view = crate::api::View {
            config: config.clone(),
            metrics: metrics.clone(),
            outbox: outbox.clone(),
            readmodel: readmodel.clone(),
            journal: api_reader,
            stopping: source_cancel.clone(),
        };
        tokio::spawn(api.serve(view, api_stop.clone().cancelled_owned()))
    });
    let probe = crate::sdnotify::Probe {
        metrics: metrics.clone(),
        outbox: outbox.clone(),
        readmodel: readmodel.clone(),
    };
    let systemd = crate::sdnotify::Service::start(probe, config.journal.tick_interval);

    let mut result = Ok(());
    tokio::select! {
        () = shutdown => info!("shutting down"),
        () = failed.cancelled() => {
            result = Err(TopologyError::Stage {
                stage: "agent",
                reason: "a stage failed; see the log above".into(),
            });
        }
    }
    systemd.stopping();

    source_cancel.cancel();
    for s in sources {
        let _ = s.await;
    }
    let _ = writer.await;
    let _ = processor.await;
    forward_cancel.cancel();
    if tokio::time::timeout(config.agent.shutdown_timeout, forwarder).await.is_err() {
        warn!(
            timeout = ?config.agent.shutdown_timeout,
            "upstream send still in flight at the shutdown deadline; it is resent after restart"
        );
    }
    if let Some(reloader) = reloader {
        reloader.abort();
    }
    let flush_store = store.clone();
    match tokio::task::spawn_blocking(move || flush_store.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = %e, "final flush failed"),
        Err(e) => warn!(error = %e, "final flush task failed"),
    }
    // Every stage has stopped: the counters are final. The status task logs them once more.
    status_stop.cancel();
    if let Err(e) = status.await {
        warn!(error = %e, "status task failed");
    }
    // The API answers until here, so the final counters can still be scraped.
    api_stop.cancel();
    if let Some(api) = api
        && let Err(e) = api.await
    {
        warn!(error = %e, "API task failed");
    }
    let stats = outbox.stats();
    info!(
        outbox_alerts = stats.alerts.records,
        outbox_summaries = stats.summaries.records,
        "stopped"
    );
    result
}

/// Tells upstream that the store this one replaced was lost (see
/// [`crate::store::LostStore::records`]): writes its alert and gap records to the fresh outbox
/// at [`crate::store::LOST_STORE_SEQ`], flushes, then forgets the marker, so that a crash in
/// between reports it again rather than never. Counts `store_quarantines`; returns the alert
/// for the read model.
async fn report_lost_store(
    store: &Store,
    outbox: &Outbox,
    dir: &std::path::Path,
    metrics: &Metrics,
) -> Result<Option<Alert>, TopologyError> {
    let store_error = |source| TopologyError::Store { dir: dir.display().to_string(), source };
    let Some(lost) = store.lost_store().map_err(store_error)? else {
        return Ok(None);
    };
    let mut alert = None;
    for (lane, seq, body) in lost.records(dir) {
        if let RecordBody::Alert(a) = &body {
            alert = Some(a.clone());
        }
        if !outbox.put(lane, seq, body)? {
            info!(lane = lane.as_str(), seq, "the lost store was already reported");
        }
    }
    let flush_store = store.clone();
    tokio::task::spawn_blocking(move || flush_store.clear_lost_store())
        .await
        .map_err(|e| TopologyError::Stage { stage: "store", reason: e.to_string() })?
        .map_err(store_error)?;
    Metrics::add(&metrics.store_quarantines, 1);
    error!(
        moved_to = %lost.moved_to.display(),
        rule = crate::store::LOST_STORE_RULE,
        "the lost store was reported upstream (a critical alert and a store_lost gap)"
    );
    Ok(alert)
}

/// Wraps a stage's task so that an error or a panic cancels `failed` (which stops the agent:
/// systemd restarts it, and the journal and snapshot make the restart lossless).
fn watch_stage<E: std::error::Error + Send + 'static>(
    stage: &'static str,
    failed: CancellationToken,
    handle: JoinHandle<Result<(), E>>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        match handle.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                error!(stage, error = %crate::error_chain(&e), "stage failed");
                failed.cancel();
            }
            Err(e) => {
                error!(stage, error = %e, "stage panicked");
                failed.cancel();
            }
        }
    })
}

/// Most `source/cause` entries in the status line's `rejects` field; the rest are summed up
/// as `+k more`. Ten keeps the line readable on an 80-column console while still showing every
/// cause of a typical gateway (a few sources, a few causes each).
const STATUS_MAX_REJECTS: usize = 10;

/// Logs one status line every `interval` (none when it is zero), and a last one, `final
/// status`, when `stop` is cancelled: the caller cancels it after every stage has stopped, so
/// that line holds the exact final counters.
async fn status_loop(
    interval: Duration,
    metrics: Arc<Metrics>,
    outbox: Outbox,
    stop: CancellationToken,
) {
    let mut rate = RateMeter::new(metrics::get(&metrics.events_in), Instant::now());
    if interval.is_zero() {
        stop.cancelled().await;
    } else {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = stop.cancelled() => break,
            }
            log_status("status", &metrics, &outbox, &mut rate);
        }
    }
    log_status("final status", &metrics, &outbox, &mut rate);
}

/// Events per second between two status lines.
struct RateMeter {
    last_in: u64,
    last: Instant,
}

impl RateMeter {
    fn new(events_in: u64, now: Instant) -> RateMeter {
        RateMeter { last_in: events_in, last: now }
    }

    fn rate(&mut self, events_in: u64, now: Instant) -> f64 {
        let secs = now.duration_since(self.last).as_secs_f64();
        let n = events_in.saturating_sub(self.last_in);
        (self.last_in, self.last) = (events_in, now);
        if secs > 0.0 { n as f64 / secs } else { 0.0 }
    }
}

/// One status line: rates in, alerts, outbox depth, backlog (bytes, age of the oldest
/// record, estimated drain time), upstream state, rejects and lost frames.
fn log_status(message: &str, metrics: &Metrics, outbox: &Outbox, rate: &mut RateMeter) {
    let events_in = metrics::get(&metrics.events_in);
    let rate = rate.rate(events_in, Instant::now());
    let stats = outbox.stats();
    let oldest_age_ms = metrics.backlog_age_ms(crate::event::now_ms());
    let upstream = metrics.upstream_state();
    info!(
        events_per_s = format_args!("{rate:.1}"),
        events_in,
        commits = metrics::get(&metrics.journal_commits),
        rejected = metrics.rejected_total(),
        rejects = ?format_rejects(&metrics.rejected(), STATUS_MAX_REJECTS),
        lost_frames = metrics.lost_frames_total(),
        late = metrics::get(&metrics.late_events),
        alerts_raised = metrics::get(&metrics.alerts_raised),
        alerts_cleared = metrics::get(&metrics.alerts_cleared),
        summaries = metrics::get(&metrics.summaries),
        outbox_alerts = stats.alerts.records,
        outbox_summaries = stats.summaries.records,
        outbox_bytes = stats.alerts.bytes + stats.summaries.bytes,
        evicted = stats.evicted,
        expired = stats.expired,
        compacted = stats.compacted_in,
        backlog_bytes = metrics::get(&metrics.backlog_bytes),
        oldest_age_s = %or_dash(oldest_age_ms.map(|ms| ms / 1_000)),
        drain_eta_s = %or_dash(metrics.drain_eta_s(Instant::now())),
        sent = metrics::get(&metrics.upstream_sent_records),
        upstream,
        "{message}"
    );
}

/// A status field that may be unknown: the number, or `-` (an empty outbox has no oldest
/// record; an upstream that sent nothing lately gives no drain estimate).
fn or_dash(value: Option<u64>) -> String {
    value.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// The non-zero rejects as `source/cause=n`, space-separated, largest first (ties in name
/// order), at most `max` of them and then `+k more` for the `k` left out.
fn format_rejects(rejected: &BTreeMap<(String, &'static str), u64>, max: usize) -> String {
    let mut entries: Vec<_> = rejected.iter().filter(|(_, n)| **n > 0).collect();
    entries.sort_by(|(a, m), (b, n)| n.cmp(m).then_with(|| a.cmp(b)));
    let mut out = String::new();
    for ((source, cause), n) in entries.iter().take(max) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(&format!("{source}/{cause}={n}"));
    }
    if entries.len() > max {
        out.push_str(&format!(" +{} more", entries.len() - max));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejects(entries: &[(&str, &'static str, u64)]) -> BTreeMap<(String, &'static str), u64> {
        entries.iter().map(|(s, c, n)| ((s.to_string(), *c), *n)).collect()
    }

    #[test]
    fn rejects_are_listed_largest_first_without_zeros() {
        let map = rejects(&[
            ("mqtt", "invalid_json", 2),
            ("serial", "frame_crc", 5),
            ("serial", "seq_jump", 0),
            ("mqtt", "non_finite", 2),
        ]);
        assert_eq!(
            format_rejects(&map, 10),
            "serial/frame_crc=5 mqtt/invalid_json=2 mqtt/non_finite=2"
        );
        assert_eq!(format_rejects(&BTreeMap::new(), 10), "");
    }

    #[test]
    fn rejects_beyond_the_cap_are_summed_up_as_more() {
        const CAUSES: [&str; 13] =
            ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m"];
        let map: BTreeMap<_, _> =
            CAUSES.iter().enumerate().map(|(i, c)| (("s".to_string(), *c), i as u64 + 1)).collect();
        let line = format_rejects(&map, 10);
        assert!(line.starts_with("s/m=13 s/l=12 "), "{line}");
        assert!(line.ends_with(" s/d=4 +3 more"), "{line}");
        assert_eq!(line.split(' ').count(), 12, "{line}");
    }
}
