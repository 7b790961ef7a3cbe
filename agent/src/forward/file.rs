//! The file sink (`kind = "file"`): each batch becomes one JSON line appended to a file, or
//! written to standard output for `path = "-"`. Used by the quick-start demo, air-gapped
//! sites and debugging.
//!
//! A batch is acknowledged only after its line is written, flushed and `sync_data`'d, so
//! the file has the same at-least-once contract as an HTTP receiver: a crash between the
//! sync and the outbox removal repeats the line (same record ids) on the next start.
//!
//! Lifecycle per batch: open in append mode (creating the file) → note its length → write
//! the line → `sync_data` → close. Opening per batch lets logrotate move the file away
//! between batches. A failed write truncates the file back to the noted length, so a disk
//! that fills up never leaves half a line for a JSON-lines reader to choke on; the batch is
//! then retried (retryable error) instead of dead-lettered, because it is the disk, not the
//! batch, that failed. All of it runs on the blocking pool: an SD card's fsync takes tens of
//! milliseconds.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use sensors::record::Batch;

use super::{ForwardError, SendError};
use crate::config::FileUpstreamConfig;

/// Appends batches as JSON lines.
#[derive(Debug)]
pub(crate) struct FileSink {
    /// `None` is standard output.
    path: Option<PathBuf>,
}

impl FileSink {
    /// Creates the parent directories and checks that the file can be opened for appending,
    /// so that a wrong path is refused at start rather than retried forever.
    pub(crate) fn new(config: &FileUpstreamConfig) -> Result<Self, ForwardError> {
        if config.path == Path::new("-") {
            return Ok(Self { path: None });
        }
        let path = config.path.clone();
        let fail = |source| ForwardError::OpenFile { path: path.clone(), source };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(fail)?;
        }
        OpenOptions::new().create(true).append(true).open(&path).map_err(fail)?;
        Ok(Self { path: Some(path) })
    }

    /// Appends one batch as a JSON line; `Ok` once the line is durable.
    pub(crate) async fn send(&self, batch: &Batch) -> Result<(), SendError> {
        let mut line = serde_json::to_vec(batch)
            .map_err(|e| SendError::Unencodable { reason: format!("JSON: {e}") })?;
        line.push(b'\n');
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || match &path {
            Some(path) => append(path, &line).map_err(|e| (path.display().to_string(), e)),
            None => {
                let mut out = std::io::stdout().lock();
                out.write_all(&line).and_then(|()| out.flush()).map_err(|e| ("stdout".into(), e))
            }
        })
        .await
        .map_err(|e| SendError::Retryable { reason: format!("file task: {e}"), retry_after: None })?
        .map_err(|(target, e)| SendError::Retryable {
            reason: format!("cannot write to {target}: {e}"),
            retry_after: None,
        })
    }
}

/// Appends `line` durably, or leaves the file as it was.
fn append(path: &Path, line: &[u8]) -> std::io::Result<()> {
    let mut file = OpenOptions::new().create(true).append(true).open(path)?;
    let before = file.metadata()?.len();
    let written = file.write_all(line).and_then(|()| file.sync_data());
    if written.is_err() {
        // Best effort: if even the truncation fails, the next line still starts after a
        // newline-less fragment, which the retry cannot make worse.
        let _ = file.set_len(before);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forward::tests::batch_of;
    use sensors::record::Lane;

    fn config(path: PathBuf) -> FileUpstreamConfig {
        FileUpstreamConfig { path, batch: Default::default() }
    }

    #[tokio::test]
    async fn batches_become_parseable_json_lines_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/dirs/batches.jsonl");
        let sink = FileSink::new(&config(path.clone())).unwrap();
        let batches = [batch_of(Lane::Alerts, 1..=2), batch_of(Lane::Summaries, 1..=3)];
        for batch in &batches {
            sink.send(batch).await.unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with('\n'));
        let parsed: Vec<Batch> =
            text.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
        assert_eq!(parsed, batches);
    }

    #[tokio::test]
    async fn a_reopened_sink_appends_instead_of_truncating() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("batches.jsonl");
        FileSink::new(&config(path.clone()))
            .unwrap()
            .send(&batch_of(Lane::Alerts, 1..=1))
            .await
            .unwrap();
        FileSink::new(&config(path.clone()))
            .unwrap()
            .send(&batch_of(Lane::Alerts, 2..=2))
            .await
            .unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 2);
    }

    #[test]
    fn an_unwritable_path_is_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("not-a-dir");
        std::fs::write(&blocker, b"").unwrap();
        let error = FileSink::new(&config(blocker.join("batches.jsonl"))).unwrap_err();
        assert!(matches!(error, ForwardError::OpenFile { .. }), "{error:?}");
    }

    #[test]
    fn a_dash_means_standard_output() {
        let sink = FileSink::new(&config(PathBuf::from("-"))).unwrap();
        assert!(sink.path.is_none());
    }
}
