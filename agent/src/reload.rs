//! Hot reload: a new configuration is taken on SIGHUP or when the file changes.
//!
//! ```text
//!  SIGHUP ─┐
//!          ├─▶ load + validate ──ok──▶ watch::Sender<Arc<Config>> ──▶ processor (rules)
//!  mtime ──┘        │
//!                   └─error──▶ log every problem (file:line:column), keep the running config
//! ```
//!
//! Only the parts the processor owns can change while running: `[[rules]]` (and the
//! `[summary]` settings for windows opened after the change). A change to sources, storage,
//! journal, buffer or upstream is reported as needing a restart and otherwise ignored, so a
//! technician never gets half of a configuration. The file is polled (its length and mtime,
//! every [`POLL_INTERVAL`]) rather than watched with inotify: editors and config management
//! replace files by rename, which a poll of the path sees without special cases, and a poll
//! costs nothing measurable at this interval.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{self, Config};

/// How often the configuration file's metadata is checked.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The file is unchanged in what can be reloaded.
    Unchanged,
    /// New rules or summary settings were handed to the processor.
    Applied {
        /// Sections that changed but need a restart to take effect.
        need_restart: Vec<&'static str>,
    },
    /// The file is invalid; the running configuration stays.
    Rejected {
        /// How many problems were found.
        problems: usize,
    },
}

/// Compares a new configuration with the running one: the sections that changed and cannot
/// be applied without a restart.
pub fn restart_only_changes(running: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    let same =
        |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") == format!("{b:?}");
    if !same(&running.agent, &new.agent) {
        changed.push("agent");
    }
    if !same(&running.storage, &new.storage) {
        changed.push("storage");
    }
    if !same(&running.journal, &new.journal) {
        changed.push("journal");
    }
    if !same(&running.sources, &new.sources) {
        changed.push("sources");
    }
    if !same(&running.buffer, &new.buffer) {
        changed.push("buffer");
    }
    if !same(&running.upstream, &new.upstream) {
        changed.push("upstream");
    }
    changed
}

/// Whether the parts the processor applies at run time differ.
pub fn processor_changes(running: &Config, new: &Config) -> bool {
    format!("{:?}{:?}", running.rules, running.summary)
        != format!("{:?}{:?}", new.rules, new.summary)
}

/// Loads `path` and, if it is valid and differs in rules or summary, publishes it.
pub fn reload_once(path: &std::path::Path, tx: &watch::Sender<Arc<Config>>) -> Outcome {
    let running = tx.borrow().clone();
    let new = match config::load(path) {
        Ok(new) => new,
        Err(errors) => {
            for problem in &errors.problems {
                error!(%problem, "configuration reload rejected; the running configuration stays");
            }
            return Outcome::Rejected { problems: errors.problems.len() };
        }
    };
    let need_restart = restart_only_changes(&running, &new);
    if !need_restart.is_empty() {
        warn!(
            sections = ?need_restart,
            "these sections changed and take effect only after a restart"
        );
    }
    if !processor_changes(&running, &new) {
        if need_restart.is_empty() {
            info!("configuration reloaded: nothing changed");
        }
        return if need_restart.is_empty() {
            Outcome::Unchanged
        } else {
            Outcome::Applied { need_restart }
        };
    }
    // Keep the running values of everything that needs a restart: the processor sees only
    // rules and summary change.
    let applied = Config { rules: new.rules, summary: new.summary, ..(*running).clone() };
    info!(rules = applied.rules.len(), "configuration reloaded: rules and summary applied");
    tx.send_replace(Arc::new(applied));
    Outcome::Applied { need_restart }
}

/// Reloads on SIGHUP and when the file's length or modification time changes, until cancel.
pub async fn watch(path: PathBuf, tx: watch::Sender<Arc<Config>>, cancel: CancellationToken) {
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGHUP; reload only by file change");
            None
        }
    };
    let stamp = |path: &std::path::Path| -> Option<(u64, SystemTime)> {
        let meta = std::fs::metadata(path).ok()?;
        Some((meta.len(), meta.modified().ok()?))
    };
    let mut last = stamp(&path);
    let mut poll = tokio::time::interval(POLL_INTERVAL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let by_signal = tokio::select! {
            () = cancel.cancelled() => return,
            Some(()) = async {
                match hangup.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            } => true,
            _ = poll.tick() => false,
        };
        let now = stamp(&path);
        if by_signal || now != last {
            if by_signal {
                info!(path = %path.display(), "SIGHUP: reloading the configuration");
            } else {
                info!(path = %path.display(), "configuration file changed: reloading");
            }
            last = now;
            let _ = reload_once(&path, &tx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[agent]
id = "gw"

[[sources]]
kind = "simulated"

[[rules]]
kind = "threshold"
name = "hot"
series = "+/temperature"
above = 80.0

[upstream]
kind = "file"
path = "out.jsonl"
"#;

    fn setup(text: &str) -> (tempfile::TempDir, PathBuf, watch::Sender<Arc<Config>>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edgewise.toml");
        std::fs::write(&path, text).unwrap();
        let config = config::load(&path).unwrap();
        let (tx, _) = watch::channel(Arc::new(config));
        (dir, path, tx)
    }

    #[test]
    fn a_changed_threshold_is_applied() {
        let (_dir, path, tx) = setup(BASE);
        let mut rx = tx.subscribe();
        std::fs::write(&path, BASE.replace("above = 80.0", "above = 90.0")).unwrap();
        assert_eq!(reload_once(&path, &tx), Outcome::Applied { need_restart: vec![] });
        assert!(rx.has_changed().unwrap());
        assert!(format!("{:?}", rx.borrow_and_update().rules).contains("90.0"));
    }

    #[test]
    fn an_invalid_file_keeps_the_running_configuration() {
        let (_dir, path, tx) = setup(BASE);
        let rx = tx.subscribe();
        std::fs::write(&path, BASE.replace("above = 80.0", "above = \"hot\"")).unwrap();
        assert_eq!(reload_once(&path, &tx), Outcome::Rejected { problems: 1 });
        assert!(!rx.has_changed().unwrap());
    }

    #[test]
    fn source_changes_are_reported_as_needing_a_restart_and_not_applied() {
        let (_dir, path, tx) = setup(BASE);
        let rx = tx.subscribe();
        std::fs::write(
            &path,
            BASE.replace("kind = \"simulated\"", "kind = \"simulated\"\ndevices = 7"),
        )
        .unwrap();
        assert_eq!(reload_once(&path, &tx), Outcome::Applied { need_restart: vec!["sources"] });
        assert!(!rx.has_changed().unwrap(), "nothing the processor applies changed");
    }

    #[test]
    fn an_unchanged_file_changes_nothing() {
        let (_dir, path, tx) = setup(BASE);
        assert_eq!(reload_once(&path, &tx), Outcome::Unchanged);
    }
}
