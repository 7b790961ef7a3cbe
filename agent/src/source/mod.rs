//! Sources: turn bytes from the outside world into [`Event`](crate::event::Event)s and hand
//! them to the journal writer as [`Ingest`] messages.
//!
//! ```text
//! broker ──PUBLISH──▶ mqtt (one task: poll, decode, send Ingest, send PUBACKs) ──Ingest──▶ journal
//!                          ▲                                                              │
//!                          └──────────── Ack (the PUBLISH back, after the commit) ◀───────┘
//! sim (seeded signal generator) ──Ingest (no ack)──▶ journal
//! ```
//!
//! - [`mqtt`]: subscribes on a local broker; QoS 1 messages are acknowledged only after the
//!   journal commit that holds them, so a crash between receive and commit makes the broker
//!   redeliver rather than lose them.
//! - [`sim`]: realistic pump signals with injected faults, for demos and tests.
//! - [`payload`]: pure payload decoding and series templates.
//! - [`backoff`]: reconnect/retry delays, shared with the forwarders.
//!
//! Lifecycle: the topology spawns one [`run`] per configured source. It returns `Ok(())`
//! after `cancel` fires (the sources stop first on shutdown), and an error only for a
//! configuration it cannot run or when the journal side of the channel is gone while not
//! cancelled. Backpressure: `ingest` is bounded and every source awaits its `send`, so a slow
//! journal slows the sources down instead of growing memory.

pub mod backoff;
pub mod mqtt;
pub mod payload;
pub mod serial;
pub mod sim;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, SourceConfig};
use crate::event::Ingest;
use crate::metrics::Metrics;

/// Why a source cannot run.
#[derive(thiserror::Error, Debug)]
pub enum SourceError {
    /// `index` is past the end of `config.sources`.
    #[error("source #{index} is not configured (the configuration has {count} sources)")]
    NotConfigured {
        /// The requested index.
        index: u16,
        /// How many sources are configured.
        count: usize,
    },
    /// The source's configuration cannot be run.
    #[error("source `{name}`: {reason}")]
    InvalidConfig {
        /// The source's name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The journal dropped its receiver while the source was still running.
    #[error("source `{name}`: the journal stopped accepting events")]
    IngestClosed {
        /// The source's name.
        name: String,
    },
}

impl SourceError {
    /// Whether restarting the source could help: only the journal going away is transient
    /// (and then only if the journal is restarted too); configuration errors are permanent.
    pub fn is_retryable(&self) -> bool {
        matches!(self, SourceError::IngestClosed { .. })
    }
}

/// Runs source number `index` (its config is `config.sources[index]`) until `cancel`; sends
/// [`Ingest`] values into `ingest` (bounded: awaiting send is the backpressure).
pub async fn run(
    index: u16,
    config: Arc<Config>,
    ingest: mpsc::Sender<Ingest>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) -> Result<(), SourceError> {
    let Some(source) = config.sources.get(usize::from(index)) else {
        return Err(SourceError::NotConfigured { index, count: config.sources.len() });
    };
    match source {
        SourceConfig::Mqtt(mqtt_config) => {
            mqtt::run(index, &config, mqtt_config, ingest, metrics, cancel).await
        }
        SourceConfig::Simulated(sim_config) => sim::run(index, sim_config, ingest, cancel).await,
        SourceConfig::Serial(serial_config) => {
            serial::run(index, serial_config, ingest, metrics, cancel).await
        }
    }
}

/// Sends one message, giving up when `cancel` fires first. `Ok(false)` means cancelled.
async fn send_or_cancel(
    ingest: &mpsc::Sender<Ingest>,
    message: Ingest,
    cancel: &CancellationToken,
    name: &str,
) -> Result<bool, SourceError> {
    tokio::select! {
        biased;
        _ = cancel.cancelled() => Ok(false),
        sent = ingest.send(message) => match sent {
            Ok(()) => Ok(true),
            // The journal went away during shutdown: not an error then.
            Err(_) if cancel.is_cancelled() => Ok(false),
            Err(_) => Err(SourceError::IngestClosed { name: name.to_string() }),
        },
    }
}

/// How often a repeated rejection cause is logged at most.
pub(crate) const REJECT_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Per-cause log rate limiter: the first rejection of a cause is logged, then at most one per
/// [`REJECT_LOG_INTERVAL`] carrying the number suppressed since the last line. A sensor
/// that sends garbage ten times a second must not fill the SD card with logs; the metrics
/// count every rejection anyway.
#[derive(Debug, Default)]
pub(crate) struct RejectLog {
    causes: HashMap<&'static str, CauseLog>,
}

#[derive(Debug)]
struct CauseLog {
    last_logged: Instant,
    suppressed: u64,
}

impl RejectLog {
    /// Records a rejection at `now`; `Some(suppressed)` means "log it now", with the number of
    /// rejections of this cause not logged since the previous line.
    pub(crate) fn admit(&mut self, cause: &'static str, now: Instant) -> Option<u64> {
        match self.causes.get_mut(cause) {
            None => {
                self.causes.insert(cause, CauseLog { last_logged: now, suppressed: 0 });
                Some(0)
            }
            Some(entry)
                if now.saturating_duration_since(entry.last_logged) >= REJECT_LOG_INTERVAL =>
            {
                let suppressed = std::mem::take(&mut entry.suppressed);
                entry.last_logged = now;
                Some(suppressed)
            }
            Some(entry) => {
                entry.suppressed += 1;
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_is_logged_first_then_at_most_every_interval() {
        let mut log = RejectLog::default();
        let t0 = Instant::now();
        assert_eq!(log.admit("invalid_json", t0), Some(0));
        assert_eq!(log.admit("invalid_json", t0 + Duration::from_secs(1)), None);
        assert_eq!(log.admit("invalid_json", t0 + Duration::from_secs(9)), None);
        // Another cause has its own budget.
        assert_eq!(log.admit("non_finite", t0 + Duration::from_secs(9)), Some(0));
        assert_eq!(log.admit("invalid_json", t0 + Duration::from_secs(10)), Some(2));
        assert_eq!(log.admit("invalid_json", t0 + Duration::from_secs(11)), None);
        assert_eq!(log.admit("invalid_json", t0 + Duration::from_secs(25)), Some(1));
    }

    #[tokio::test]
    async fn an_unknown_index_is_an_error() {
        let config =
            Config::from_toml("[agent]\nid = \"gw\"\n[upstream]\nkind = \"file\"\npath = \"-\"\n")
                .unwrap();
        let (tx, _rx) = mpsc::channel(1);
        let result =
            run(3, Arc::new(config), tx, Arc::new(Metrics::default()), CancellationToken::new())
                .await;
        assert!(matches!(result, Err(SourceError::NotConfigured { index: 3, count: 0 })));
    }
}
