//! The sent mark: a small file beside sled's, outside sled, that remembers the highest record
//! seq upstream acknowledged in each lane of the store's epoch.
//!
//! # Why
//!
//! sled 0.34 opens a store whose newest log segments are damaged (garbage, a truncated file)
//! without an error: it rolls back to an older consistent state (measured in
//! `agent/tests/corrupt_store.rs`). The journal, the snapshot and the outbox then all go back
//! to that time, with the same epoch, and the outbox would number new records with seqs
//! upstream already holds under other contents: upstream de-duplicates by id and would drop
//! them, silently. This file is what sled's rollback cannot touch: after its replay, a
//! processor whose lane counter is below the mark has lost journal entries behind records
//! upstream holds, so the outbox continues after the mark and reports the rollback in a gap
//! record ([`crate::outbox::Outbox::report_rollback`]). A power cut before a flush is not a
//! rollback: the records sent before it came from durable journal entries, and the replay
//! regenerates them with the same seqs (comparing the outbox itself with the mark would take
//! that for a rollback, and upstream would count those records twice).
//!
//! # Format and writes
//!
//! `sent-mark` in the store directory (it moves with the store when the store is
//! quarantined): `[version u8 = 1][epoch u64 BE][alerts last sent seq + 1 u64 BE]
//! [summaries last sent seq + 1 u64 BE]`, 25 bytes. It is written to `sent-mark.tmp` and
//! renamed over the old one, so a reader sees the old mark or the new one, never a mix. It is
//! fsynced at most once per [`SYNC_INTERVAL`] (SD-card wear): a power cut may lose the last
//! second of marks, a process crash loses none. A mark of another epoch (a fresh store after
//! a quarantine) is ignored and replaced.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sensors::record::Lane;

/// File name of the mark in the store directory.
pub const FILE_NAME: &str = "sent-mark";
const VERSION: u8 = 1;
const LEN: usize = 1 + 8 + 8 + 8;
/// Longest time between two fsyncs of the mark.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// The mark: per lane, one past the highest seq upstream acknowledged (0 = none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SentMark {
    /// The store epoch the seqs belong to.
    pub epoch: u64,
    /// Indexed by [`Lane::tag`].
    pub next: [u64; 2],
}

impl SentMark {
    /// One past the highest acknowledged seq of `lane`.
    pub fn next(&self, lane: Lane) -> u64 {
        self.next[usize::from(lane.tag())]
    }

    fn encode(&self) -> [u8; LEN] {
        let mut bytes = [0u8; LEN];
        bytes[0] = VERSION;
        bytes[1..9].copy_from_slice(&self.epoch.to_be_bytes());
        bytes[9..17].copy_from_slice(&self.next[0].to_be_bytes());
        bytes[17..25].copy_from_slice(&self.next[1].to_be_bytes());
        bytes
    }

    fn decode(bytes: &[u8]) -> Result<SentMark, String> {
        let bytes: &[u8; LEN] =
            bytes.try_into().map_err(|_| format!("{} bytes, expected {LEN}", bytes.len()))?;
        if bytes[0] != VERSION {
            return Err(format!("version {}, expected {VERSION}", bytes[0]));
        }
        let u64_at = |at: usize| {
            let mut word = [0u8; 8];
            word.copy_from_slice(&bytes[at..at + 8]);
            u64::from_be_bytes(word)
        };
        Ok(SentMark { epoch: u64_at(1), next: [u64_at(9), u64_at(17)] })
    }
}

/// Reads and writes the mark of one store directory.
#[derive(Debug)]
pub struct MarkFile {
    path: PathBuf,
    tmp: PathBuf,
    dir: PathBuf,
    mark: SentMark,
    last_sync: Option<Instant>,
}

impl MarkFile {
    /// The mark of `dir` for a store of `epoch`: the stored one, or an empty one when there is
    /// none, it is unreadable (logged) or it belongs to another epoch.
    pub fn open(dir: &Path, epoch: u64) -> MarkFile {
        let path = dir.join(FILE_NAME);
        let stored = match std::fs::read(&path) {
            Ok(bytes) => match SentMark::decode(&bytes) {
                Ok(mark) if mark.epoch == epoch => Some(mark),
                Ok(_) => None,
                Err(reason) => {
                    tracing::warn!(path = %path.display(), %reason, "ignoring an unreadable sent mark");
                    None
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the sent mark");
                None
            }
        };
        MarkFile {
            tmp: dir.join(format!("{FILE_NAME}.tmp")),
            dir: dir.to_path_buf(),
            path,
            mark: stored.unwrap_or(SentMark { epoch, next: [0, 0] }),
            last_sync: None,
        }
    }

    /// The mark as read at open or last written.
    pub fn mark(&self) -> SentMark {
        self.mark
    }

    /// Records that upstream acknowledged `lane` through `last_seq`; writes the file if that
    /// raises the mark (fsynced when the last fsync is [`SYNC_INTERVAL`] old).
    pub fn acknowledged(&mut self, lane: Lane, last_seq: u64) -> std::io::Result<()> {
        let slot = &mut self.mark.next[usize::from(lane.tag())];
        if last_seq < *slot {
            return Ok(());
        }
        *slot = last_seq + 1;
        let sync = self.last_sync.is_none_or(|at| at.elapsed() >= SYNC_INTERVAL);
        let mut file = std::fs::File::create(&self.tmp)?;
        file.write_all(&self.mark.encode())?;
        if sync {
            file.sync_all()?;
        }
        drop(file);
        std::fs::rename(&self.tmp, &self.path)?;
        if sync {
            // The rename is durable once the directory is.
            std::fs::File::open(&self.dir)?.sync_all()?;
            self.last_sync = Some(Instant::now());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mark_survives_a_reopen_and_only_rises() {
        let tmp = tempfile::tempdir().unwrap();
        let mut file = MarkFile::open(tmp.path(), 7);
        assert_eq!(file.mark(), SentMark { epoch: 7, next: [0, 0] });
        file.acknowledged(Lane::Summaries, 41).unwrap();
        file.acknowledged(Lane::Alerts, 3).unwrap();
        file.acknowledged(Lane::Summaries, 12).unwrap();
        let reopened = MarkFile::open(tmp.path(), 7);
        assert_eq!(reopened.mark(), SentMark { epoch: 7, next: [4, 42] });
        assert_eq!(reopened.mark().next(Lane::Summaries), 42);
        assert!(!tmp.path().join("sent-mark.tmp").exists());
    }

    #[test]
    fn a_mark_of_another_epoch_or_unreadable_is_ignored() {
        let tmp = tempfile::tempdir().unwrap();
        MarkFile::open(tmp.path(), 7).acknowledged(Lane::Alerts, 9).unwrap();
        assert_eq!(MarkFile::open(tmp.path(), 8).mark(), SentMark { epoch: 8, next: [0, 0] });
        std::fs::write(tmp.path().join(FILE_NAME), b"garbage").unwrap();
        assert_eq!(MarkFile::open(tmp.path(), 7).mark(), SentMark { epoch: 7, next: [0, 0] });
        let mut bytes = SentMark { epoch: 7, next: [1, 2] }.encode();
        bytes[0] = 9;
        assert!(SentMark::decode(&bytes).unwrap_err().contains("version 9"));
    }
}
