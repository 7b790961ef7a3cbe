//! edgewise: an event aggregation agent for edge and IoT gateways.
//!
//! The crate follows the data path, one module per stage:
//!
//! ```text
//! source::{mqtt, serial, sim} ─▶ journal ─▶ processor (rules, summary) ─▶ outbox ─▶ forward::{http, mqtt, file}
//!                                (sled,      (one owner of state,          (sled,     (batches, retries,
//!                                 group       deterministic, snapshots)     lanes,     TLS, idempotency)
//!                                 commit)                                   TTL, compaction, byte cap)
//! ```
//!
//! - [`config`]: the TOML configuration and its validation.
//! - [`event`]: the values passed between stages.
//! - [`source`]: MQTT, serial and simulated sources turning bytes into [`event::Event`]s.
//! - [`store`]: the sled database shared by journal, snapshots and outbox.
//! - [`journal`]: the event log with group commit and a durable watermark.
//! - [`processor`]: applies journal entries to [`rules`] and [`summary`] windows.
//! - [`outbox`]: records waiting for upstream, in lanes, with a byte cap.
//! - [`compact`]: merging old summaries into coarser windows when the outbox fills.
//! - [`forward`]: sends outbox batches upstream.
//! - [`recording`]: recordings (JSON lines, CSV) for replay, and the journal export.
//! - [`replay`]: runs the processor over a recording in event time (`edgewise replay`).
//! - [`reload`]: hot reload of rules on SIGHUP or when the file changes.
//! - [`topology`]: spawns the tasks and runs the one shutdown path.
//! - [`metrics`]: counters shared by all stages.
//! - [`collect`]: `edgewise collect`, the reference receiver for backends.
//! - [`api`]: the local HTTP API (health, readiness, Prometheus metrics, JSON read side).
//! - [`readmodel`]: what the processor publishes for the API (latest values, alerts).
//! - [`http_server`]: the hyper accept loop shared by the API and `collect`.
//! - [`sentmark`]: the highest record upstream acknowledged, outside sled (rollback check).
//! - [`sdnotify`]: systemd's `READY=1` / `WATCHDOG=1` (the watchdog pings only while the
//!   processor's position moves).

pub mod api;
pub mod collect;
pub mod compact;
pub mod config;
pub mod event;
pub mod forward;
pub mod http_server;
pub mod journal;
pub mod metrics;
pub mod outbox;
pub mod processor;
pub mod readmodel;
pub mod recording;
pub mod reload;
pub mod replay;
pub mod rules;
pub mod sdnotify;
pub mod sentmark;
pub mod series_map;
pub mod source;
pub mod store;
pub mod summary;
pub mod topology;

pub use topology::run;

/// glibc's malloc tuning of the agent, as `(NAME, VALUE)` environment variables: `edgewise run`
/// re-executes itself with them (see `main.rs`), and the systemd unit sets the same in its
/// `Environment=` (agent/tests/packaging.rs checks that the two agree).
pub const MALLOC_TUNING: [(&str, &str); 2] =
    [("MALLOC_ARENA_MAX", "1"), ("MALLOC_MMAP_THRESHOLD_", "131072")];

/// An error and its sources on one line, `outer: cause: root cause`: what logs and the CLI
/// print, since reqwest, hyper and rustls put the useful part in the sources.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
