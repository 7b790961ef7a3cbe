//! The data directory: the sled database of the outbox, the processor snapshot file and the
//! journal's segment files (see [`crate::journal`]).
//!
//! ```text
//! <data_dir>/db, conf, blobs/, snap.*   sled
//! <data_dir>/processor.snapshot         version u8 (2) + crc32 u32 LE (of the rest) + u64 BE
//!                                       journal position + state bytes; replaced whole
//!                                       (write a temporary file, fsync, rename, fsync the dir)
//! <data_dir>/journal/*.seg              the journal [journal]
//! ```
//!
//! The sled database holds the outbox and the store's identity, split into trees by owner
//! (`journal`, `dedup` and `snapshot` are what builds before 0.2 wrote there: read once,
//! when moving them out, never written):
//!
//! ```text
//! tree         key                          value
//! ----------   --------------------------   ------------------------------------------------
//! meta         b"epoch"                     u64 BE: random store epoch, written + flushed at creation
//!              b"lost_store"                i64 BE ms + UTF-8 path: the store this one replaced
//!                                           was quarantined there; cleared once reported
//! journal      u64 BE first seq of a chunk  version u8 (2) + postcard(Vec<event::Entry>): one
//!                                           chunk per group commit (v1: one entry) [journal]
//! snapshot     b"state"                     version u8 (1) + u64 BE journal position + state bytes
//! outbox       [lane u8][u64 BE seq]        version u8 (1) + postcard(record::Record) [outbox]
//!              [0xFF][b'n'][lane u8]        u64 BE next_seq of the lane
//! dead_letter  [lane u8][u64 BE seq]        version u8 (1) + postcard(dead letter)    [outbox]
//! dedup        [source u16 BE][pkid u16 BE] u64 BE hash of the last journaled QoS 1 message
//! ```
//!
//! Integers in keys are big-endian so that sled's byte order is numeric order.
//!
//! # Invariants
//!
//! - **Nothing in sled is durable until [`Store::flush`] returns `Ok`.** sled's background
//!   flusher is turned off (`flush_every_ms = None`): every fsync is an explicit, counted
//!   decision of the snapshot ([`Store::save_snapshot`] flushes first), the outbox's own
//!   checkpoints or shutdown, which keeps SD-card wear proportional to snapshots, not to
//!   wall time. What the outbox lost in a crash since then is derived again from the journal
//!   by the replay after the snapshot (same seqs, same ids).
//! - **A snapshot covers only durable outbox records.** [`Store::save_snapshot`] flushes
//!   sled before it replaces the snapshot file, so every record derived from the entries up
//!   to the snapshot's position is on disk before the position is.
//! - **The epoch never changes for the life of a store.** It is random and flushed before
//!   `open` returns, so record ids (`<agent>:<epoch>:<lane>:<seq>`) stay unique even when a
//!   store is quarantined and re-created and sequence numbers start again at 0.
//! - **A store that cannot be opened is set aside, not retried.** Corruption (any open
//!   failure other than a lock held by a live process or the surroundings below) renames the
//!   directory to `<dir>.corrupt-<unix secs>` and starts fresh: an agent under systemd must
//!   not crash-loop on a bad SD-card sector, and the old bytes stay on disk for a
//!   post-mortem. A lock held by another process is [`StoreError::Locked`]: that store is
//!   healthy and in use, so moving it away would split the data between two agents. A full
//!   disk, a read-only filesystem, missing permissions or exhausted memory or file handles
//!   are [`StoreError::Unavailable`]: the store is kept, and a restart retries.
//! - **A lost store is reported until the report is durable.** The fresh store is created
//!   with a `lost_store` marker, flushed with the epoch; [`Store::lost_store`] returns it on
//!   every open until [`Store::clear_lost_store`], which the caller runs after the alert and
//!   gap records it wrote at [`LOST_STORE_SEQ`] are flushed. A crash in between reports the
//!   loss again on the next start (the outbox ignores the second put of the same seq); a
//!   crash between the rename and the first flush of the fresh store is the one window in
//!   which a loss goes unreported.
//!
//! # Lifecycle
//!
//! `open` (creates the trees and the epoch) → the journal, the processor and the outbox
//! write through their own trees → the journal writer calls [`Store::flush`] once per group
//! commit (from `spawn_blocking`; never `flush_async`, which deadlocks in sled 0.34) → on
//! drop of the last handle sled flushes once more.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sensors::record::{Alert, AlertState, Gap, Lane, RecordBody, Severity};

/// Hands the calling thread's deferred frees (sled's replaced nodes and sealed log buffers) to
/// crossbeam-epoch's global queue, where the next collection frees them; see [`Store::flush`].
/// Cheap when the bag is empty.
pub fn release_deferred() {
    crossbeam_epoch::pin().flush();
}

/// Names of the trees, so that every module opens the same ones.
pub const TREE_META: &str = "meta";
/// The event journal (see [`crate::journal`]).
pub const TREE_JOURNAL: &str = "journal";
/// Processor snapshots.
pub const TREE_SNAPSHOT: &str = "snapshot";
/// Records waiting for upstream (see [`crate::outbox`]).
pub const TREE_OUTBOX: &str = "outbox";
/// Records the upstream rejected as malformed.
pub const TREE_DEAD_LETTER: &str = "dead_letter";
/// Last journaled hash per MQTT `(source, pkid)`, to drop broker redeliveries.
pub const TREE_DEDUP: &str = "dedup";

const ALL_TREES: [&str; 6] =
    [TREE_META, TREE_JOURNAL, TREE_SNAPSHOT, TREE_OUTBOX, TREE_DEAD_LETTER, TREE_DEDUP];

const EPOCH_KEY: &[u8] = b"epoch";
const LOST_STORE_KEY: &[u8] = b"lost_store";

/// Rule name of the alert that reports a quarantined store.
pub const LOST_STORE_RULE: &str = "edgewise:store";
/// Series of that alert.
pub const LOST_STORE_SERIES: &str = "edgewise/store";
/// Gap reason for the records and journal entries lost with a quarantined store.
pub const GAP_REASON_STORE_LOST: &str = "store_lost";
/// The seq of the records that report a lost store, in both lanes of the fresh outbox. The
/// processor numbers a lane from 1 (its counters start at 0 = none, and a fresh store has no
/// snapshot), and a fresh outbox accepts seqs from 0: seq 0 is the one seq of a fresh store
/// that nothing else ever uses.
pub const LOST_STORE_SEQ: u64 = 0;
const SNAPSHOT_KEY: &[u8] = b"state";
/// Version byte that leads a snapshot value; bump it when the envelope changes.
const SNAPSHOT_VERSION: u8 = 1;
/// Version byte + position.
const SNAPSHOT_HEADER_LEN: usize = 1 + 8;

/// The processor snapshot's file in the data directory.
pub const SNAPSHOT_FILE: &str = "processor.snapshot";

/// Where a new snapshot is written before it replaces the old one.
const SNAPSHOT_TMP_FILE: &str = "processor.snapshot.tmp";

/// Version byte of the snapshot file.
const SNAPSHOT_FILE_VERSION: u8 = 2;

/// `[version][crc32][position]` in front of the state.
const SNAPSHOT_FILE_HEADER_LEN: usize = 1 + 4 + 8;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another live process holds the store's lock (sled takes an exclusive file lock).
    #[error("store {dir} is locked by another process (is another agent running?)")]
    Locked {
        /// The store directory.
        dir: PathBuf,
        /// sled's report.
        #[source]
        source: sled::Error,
    },
    /// The store could not be opened because of its surroundings, not its contents (a full
    /// disk, a read-only or inaccessible directory, no memory or file handles): it is kept
    /// as it is, and the open can be retried once the cause is gone.
    #[error("cannot open store {dir} (kept as it is: fix the cause, the agent retries on restart)")]
    Unavailable {
        /// The store directory.
        dir: PathBuf,
        /// sled's report.
        #[source]
        source: sled::Error,
    },
    /// The store could not be opened, even fresh after quarantining the old one.
    #[error("cannot open store {dir}")]
    Open {
        /// The store directory.
        dir: PathBuf,
        /// sled's report.
        #[source]
        source: sled::Error,
    },
    /// A store that failed to open could not be moved aside.
    #[error("cannot quarantine store {dir} to {to}")]
    Quarantine {
        /// The store directory.
        dir: PathBuf,
        /// Where it was to be moved.
        to: PathBuf,
        /// The rename's error.
        #[source]
        source: std::io::Error,
    },
    /// A sled operation failed.
    #[error("store: {context}")]
    Sled {
        /// What the store was doing.
        context: &'static str,
        /// sled's report.
        #[source]
        source: sled::Error,
    },
    /// A file of the store (snapshot) could not be read or written.
    #[error("store: {context} {}", path.display())]
    Io {
        /// What the store was doing.
        context: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS's report.
        #[source]
        source: std::io::Error,
    },
    /// A stored value does not have the expected shape.
    #[error("store: corrupt {what}: {reason}")]
    Corrupt {
        /// Which value.
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

impl StoreError {
    /// Whether retrying the same operation later may succeed (I/O errors may be transient,
    /// e.g. a full disk that gets cleaned; corruption and a held lock are not).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Sled { source: sled::Error::Io(_), .. }
                | StoreError::Unavailable { .. }
                | StoreError::Io { .. }
        )
    }

    fn sled(context: &'static str) -> impl FnOnce(sled::Error) -> StoreError {
        move |source| StoreError::Sled { context, source }
    }
}

/// What [`Store::open`] found.
#[derive(Debug, Default)]
pub struct OpenReport {
    /// Where a store that failed to open was moved by this open (its data is not in the new
    /// store). [`Store::lost_store`] also reports a quarantine of an earlier, crashed run.
    pub quarantined: Option<PathBuf>,
    /// The store was created by this open (no epoch was found).
    pub created: bool,
}

/// Handle to the shared sled database. Cheap to clone (sled handles are reference counted).
#[derive(Clone, Debug)]
pub struct Store {
    db: sled::Db,
    dir: PathBuf,
    snapshot: sled::Tree,
    epoch: u64,
}

impl Store {
    /// [`Store::open`], retrying for up to `patience` while the store is
    /// [`StoreError::Locked`]: for a caller that dropped its own handle a moment ago, since
    /// sled's I/O threads may hold the file lock briefly after the last handle is gone (tests
    /// that reopen a store in-process). A lock another process holds still fails, later.
    pub fn open_after_drop(
        dir: &Path,
        cache_capacity: u64,
        patience: std::time::Duration,
    ) -> Result<(Store, OpenReport), StoreError> {
        let deadline = std::time::Instant::now() + patience;
        loop {
            match Self::open(dir, cache_capacity) {
                Err(StoreError::Locked { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                result => return result,
            }
        }
    }

    /// Opens (creating) the sled db in `dir` with `cache_capacity` bytes of cache and
    /// `flush_every_ms = None` (we flush explicitly). Opens every tree, creates and flushes
    /// the store epoch if missing. A store that fails to open for any reason but a lock held
    /// by another process or its surroundings ([`StoreError::Unavailable`]: a full disk, a
    /// read-only filesystem, ...) is renamed to `<dir>.corrupt-<unix secs>` and a fresh one
    /// opened.
    pub fn open(dir: &Path, cache_capacity: u64) -> Result<(Store, OpenReport), StoreError> {
        let first = match Self::try_open(dir, cache_capacity, None) {
            Ok((store, created)) => {
                return Ok((store, OpenReport { quarantined: None, created }));
            }
            Err(error) => error,
        };
        if let OpenFailure::Sled(source) = &first
            && is_lock_error(source)
        {
            let OpenFailure::Sled(source) = first else { unreachable!("matched above") };
            return Err(StoreError::Locked { dir: dir.to_path_buf(), source });
        }
        if let OpenFailure::Sled(source) = &first
            && is_environment_error(source)
        {
            let OpenFailure::Sled(source) = first else { unreachable!("matched above") };
            return Err(StoreError::Unavailable { dir: dir.to_path_buf(), source });
        }

        let to = quarantine_path(dir);
        tracing::error!(
            dir = %dir.display(),
            to = %to.display(),
            error = %first,
            "store failed to open; moving it aside and starting a fresh one"
        );
        std::fs::rename(dir, &to).map_err(|source| StoreError::Quarantine {
            dir: dir.to_path_buf(),
            to: to.clone(),
            source,
        })?;
        // One attempt only: if a fresh store fails too, the disk itself is the problem and
        // the caller has to see the error (no crash loop of quarantines).
        let lost = LostStore { moved_to: to.clone(), at_ms: crate::event::now_ms() };
        match Self::try_open(dir, cache_capacity, Some(&lost)) {
            Ok((store, created)) => Ok((store, OpenReport { quarantined: Some(to), created })),
            Err(OpenFailure::Sled(source)) if is_lock_error(&source) => {
                Err(StoreError::Locked { dir: dir.to_path_buf(), source })
            }
            Err(OpenFailure::Sled(source)) => {
                Err(StoreError::Open { dir: dir.to_path_buf(), source })
            }
            Err(OpenFailure::BadEpoch(reason)) => {
                Err(StoreError::Corrupt { what: "store epoch", reason })
            }
        }
    }

    /// Opens the db, every tree and the epoch; `Ok(created)`. A store created here records
    /// `lost` (the store it replaces) in the same flush as its epoch.
    fn try_open(
        dir: &Path,
        cache_capacity: u64,
        lost: Option<&LostStore>,
    ) -> Result<(Store, bool), OpenFailure> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_capacity)
            .flush_every_ms(None)
            .open()
            .map_err(OpenFailure::Sled)?;
        // Opening every tree up front makes a damaged tree root show up here, where it can be
        // quarantined, rather than later in some task.
        for name in ALL_TREES {
            db.open_tree(name).map_err(OpenFailure::Sled)?;
        }
        let meta = db.open_tree(TREE_META).map_err(OpenFailure::Sled)?;
        let snapshot = db.open_tree(TREE_SNAPSHOT).map_err(OpenFailure::Sled)?;
        let (epoch, created) = match meta.get(EPOCH_KEY).map_err(OpenFailure::Sled)? {
            Some(bytes) => {
                let array: [u8; 8] = bytes.as_ref().try_into().map_err(|_| {
                    OpenFailure::BadEpoch(format!("{} bytes instead of 8", bytes.len()))
                })?;
                (u64::from_be_bytes(array), false)
            }
            None => {
                // Non-zero so that 0 can never be mistaken for a real epoch in logs or ids.
                let epoch = fastrand::u64(1..);
                meta.insert(EPOCH_KEY, &epoch.to_be_bytes()).map_err(OpenFailure::Sled)?;
                if let Some(lost) = lost {
                    meta.insert(LOST_STORE_KEY, lost.encode()).map_err(OpenFailure::Sled)?;
                }
                // Durable before any record id is built from it.
                db.flush().map_err(OpenFailure::Sled)?;
                (epoch, true)
            }
        };
        Ok((Store { db, dir: dir.to_path_buf(), snapshot, epoch }, created))
    }

    /// The sled database, for modules that open their own trees.
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// The store epoch: random, fixed for the life of this store.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The store's directory (sled's files, and [`crate::sentmark`]'s beside them).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The quarantined store this store replaced, until [`Store::clear_lost_store`].
    pub fn lost_store(&self) -> Result<Option<LostStore>, StoreError> {
        let meta = self.db.open_tree(TREE_META).map_err(StoreError::sled("open meta"))?;
        let Some(value) = meta.get(LOST_STORE_KEY).map_err(StoreError::sled("read lost store"))?
        else {
            return Ok(None);
        };
        LostStore::decode(&value).map(Some).ok_or_else(|| StoreError::Corrupt {
            what: "lost store marker",
            reason: format!("{} bytes, shorter than its time", value.len()),
        })
    }

    /// Forgets the lost store once its report is durable, and flushes (blocking).
    pub fn clear_lost_store(&self) -> Result<(), StoreError> {
        let meta = self.db.open_tree(TREE_META).map_err(StoreError::sled("open meta"))?;
        meta.remove(LOST_STORE_KEY).map_err(StoreError::sled("clear lost store"))?;
        self.flush()
    }

    /// Blocking fsync of the whole db (sled flush is db-wide). Call from `spawn_blocking`.
    /// Never use `flush_async` (deadlocks in sled 0.34).
    ///
    /// Then hands this thread's deferred frees to sled's collector: a flush seals sled's
    /// current I/O buffer, and sled frees the old one through crossbeam-epoch's
    /// *thread-local* bag of deferred functions, which is handed on only when 64 of them have
    /// piled up. A thread that touches sled only to flush (a snapshot every 30 s from tokio's
    /// blocking pool) thus kept up to 64 whole log segments (512 KiB each, 32 MiB) alive: the
    /// RSS grew by a segment per flush (BENCHMARKS.md, "Memory, session 8").
    pub fn flush(&self) -> Result<(), StoreError> {
        let flushed = self.db.flush().map(drop).map_err(StoreError::sled("flush"));
        release_deferred();
        flushed
    }

    /// Stores processor state and the journal position it covers, durably: flushes sled
    /// first (the outbox records the state covers), then replaces the snapshot file (a
    /// temporary file, fsync, rename, fsync of the directory), so that position and state
    /// change together and a crash leaves the old snapshot or the new one. Blocking.
    pub fn save_snapshot(&self, position: u64, state: &[u8]) -> Result<(), StoreError> {
        self.flush()?;
        let mut value = Vec::with_capacity(SNAPSHOT_FILE_HEADER_LEN + state.len());
        value.push(SNAPSHOT_FILE_VERSION);
        value.extend_from_slice(&[0; 4]);
        value.extend_from_slice(&position.to_be_bytes());
        value.extend_from_slice(state);
        let crc = crc32fast::hash(&value[5..]);
        value[1..5].copy_from_slice(&crc.to_le_bytes());
        let path = self.dir.join(SNAPSHOT_FILE);
        let tmp = self.dir.join(SNAPSHOT_TMP_FILE);
        let io = |source| StoreError::Io { context: "save snapshot", path: path.clone(), source };
        let mut file = std::fs::File::create(&tmp).map_err(io)?;
        std::io::Write::write_all(&mut file, &value).map_err(io)?;
        file.sync_data().map_err(io)?;
        drop(file);
        std::fs::rename(&tmp, &path).map_err(io)?;
        std::fs::File::open(&self.dir).and_then(|dir| dir.sync_all()).map_err(io)?;
        Ok(())
    }

    /// The last saved snapshot: `(journal position, state)`, or `None` if none was saved.
    /// Reads the snapshot file, or, in a store of an older build that has none yet, sled's
    /// `snapshot` tree.
    pub fn load_snapshot(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let path = self.dir.join(SNAPSHOT_FILE);
        match std::fs::read(&path) {
            Ok(value) => return decode_snapshot_file(&value).map(Some),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(StoreError::Io { context: "load snapshot", path, source }),
        }
        let Some(value) =
            self.snapshot.get(SNAPSHOT_KEY).map_err(StoreError::sled("load snapshot"))?
        else {
            return Ok(None);
        };
        if value.len() < SNAPSHOT_HEADER_LEN {
            return Err(StoreError::Corrupt {
                what: "snapshot",
                reason: format!("{} bytes, shorter than its header", value.len()),
            });
        }
        if value[0] != SNAPSHOT_VERSION {
            return Err(StoreError::Corrupt {
                what: "snapshot",
                reason: format!("unknown version {}", value[0]),
            });
        }
        let mut position = [0u8; 8];
        position.copy_from_slice(&value[1..SNAPSHOT_HEADER_LEN]);
        Ok(Some((u64::from_be_bytes(position), value[SNAPSHOT_HEADER_LEN..].to_vec())))
    }
}

/// Decodes the snapshot file: `[version 2][crc32][position][state]`.
fn decode_snapshot_file(value: &[u8]) -> Result<(u64, Vec<u8>), StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt { what: "snapshot", reason };
    if value.len() < SNAPSHOT_FILE_HEADER_LEN {
        return Err(corrupt(format!("{} bytes, shorter than its header", value.len())));
    }
    if value[0] != SNAPSHOT_FILE_VERSION {
        return Err(corrupt(format!("unknown version {}", value[0])));
    }
    let crc = u32::from_le_bytes(value[1..5].try_into().unwrap_or_default());
    if crc32fast::hash(&value[5..]) != crc {
        return Err(corrupt("checksum mismatch".into()));
    }
    let position = u64::from_be_bytes(value[5..13].try_into().unwrap_or_default());
    Ok((position, value[SNAPSHOT_FILE_HEADER_LEN..].to_vec()))
}

/// A store that failed to open and was set aside; its data is not in this store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostStore {
    /// Where it was moved.
    pub moved_to: PathBuf,
    /// When, ms since the Unix epoch (the agent's clock).
    pub at_ms: i64,
}

impl LostStore {
    fn encode(&self) -> Vec<u8> {
        let mut value = self.at_ms.to_be_bytes().to_vec();
        value.extend_from_slice(self.moved_to.to_string_lossy().as_bytes());
        value
    }

    fn decode(value: &[u8]) -> Option<LostStore> {
        let (at, path) = value.split_first_chunk::<8>()?;
        Some(LostStore {
            moved_to: PathBuf::from(String::from_utf8_lossy(path).into_owned()),
            at_ms: i64::from_be_bytes(*at),
        })
    }

    /// What upstream is told, as `(lane, seq, body)` for [`crate::outbox::Outbox::put`] at
    /// [`LOST_STORE_SEQ`]: a critical alert [`LOST_STORE_RULE`] (raised, never cleared:
    /// nothing brings the data back) naming the quarantine path, and a gap with reason
    /// [`GAP_REASON_STORE_LOST`] in the summaries lane. What the old store held (unsent
    /// records of both lanes, journal entries not yet summarised) cannot be read, so the gap
    /// counts nothing (`records`, `events` and its seqs are 0) and says only until when
    /// (`to_ms`, the time of the quarantine); its lane is the summaries lane because that is
    /// where it is stored, and the alert says that alerts may have been lost too.
    pub fn records(&self, dir: &Path) -> [(Lane, u64, RecordBody); 2] {
        let moved_to = self.moved_to.display().to_string();
        let alert = Alert {
            rule: LOST_STORE_RULE.to_string(),
            series: LOST_STORE_SERIES.to_string(),
            state: AlertState::Raised,
            severity: Severity::Critical,
            ts_ms: self.at_ms,
            value: 0.0,
            threshold: 0.0,
            message: format!(
                "the store {} could not be opened and was moved to {moved_to}; a fresh store \
                 was started: records not yet sent (alerts and summaries) and events not yet \
                 summarised before then are lost",
                dir.display()
            ),
            labels: BTreeMap::from([("moved_to".to_string(), moved_to)]),
        };
        let gap = Gap {
            lane: Lane::Summaries,
            first_seq: LOST_STORE_SEQ,
            last_seq: LOST_STORE_SEQ,
            records: 0,
            from_ms: None,
            to_ms: Some(self.at_ms),
            reason: GAP_REASON_STORE_LOST.to_string(),
            events: 0,
        };
        [
            (Lane::Alerts, LOST_STORE_SEQ, RecordBody::Alert(alert)),
            (Lane::Summaries, LOST_STORE_SEQ, RecordBody::Gap(gap)),
        ]
    }
}

/// Why one open attempt failed.
#[derive(Debug)]
enum OpenFailure {
    Sled(sled::Error),
    BadEpoch(String),
}

impl std::fmt::Display for OpenFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenFailure::Sled(e) => write!(f, "{e}"),
            OpenFailure::BadEpoch(reason) => write!(f, "bad store epoch: {reason}"),
        }
    }
}

/// sled 0.34 reports a held lock as `Io(Other, "could not acquire lock on ...")` (see
/// `Config::try_lock`); there is no dedicated variant, so the message is the only signal.
fn is_lock_error(error: &sled::Error) -> bool {
    matches!(error, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
}

/// Whether an open failed because of the store's surroundings rather than its contents:
/// a full disk or quota, a read-only filesystem, missing permissions, no memory or file
/// handles. Such a store is healthy; moving it aside would throw its data away for nothing
/// (on a full disk the fresh store would fail too, and the next restart would quarantine
/// that). Everything else (corruption, unreadable files, I/O errors of a bad sector) is the
/// store's own fault and quarantined.
fn is_environment_error(error: &sled::Error) -> bool {
    use std::io::ErrorKind;
    let sled::Error::Io(io) = error else { return false };
    // ENOMEM, ENFILE, EMFILE, ENOSPC, EROFS, EDQUOT (Linux numbers).
    matches!(io.raw_os_error(), Some(12 | 23 | 24 | 28 | 30 | 122))
        || matches!(
            io.kind(),
            ErrorKind::StorageFull
                | ErrorKind::QuotaExceeded
                | ErrorKind::ReadOnlyFilesystem
                | ErrorKind::PermissionDenied
                | ErrorKind::OutOfMemory
        )
}

/// `<dir>.corrupt-<unix secs>`, with a `-<n>` suffix if that name is taken (two failures
/// within one second must not collide).
fn quarantine_path(dir: &Path) -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // `components()` drops a trailing slash, so `data/` becomes `data.corrupt-…`, not
    // `data/.corrupt-…` inside the directory being moved.
    let base = dir.components().as_path().as_os_str().to_os_string();
    let mut candidate = base.clone();
    candidate.push(format!(".corrupt-{secs}"));
    let mut n = 1u32;
    while Path::new(&candidate).exists() {
        candidate = base.clone();
        candidate.push(format!(".corrupt-{secs}-{n}"));
        n += 1;
    }
    PathBuf::from(candidate)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CACHE: u64 = 1024 * 1024;

    /// Opens the store in `dir` again after the test dropped its handle.
    fn reopen(dir: &Path) -> (Store, OpenReport) {
        Store::open_after_drop(dir, CACHE, std::time::Duration::from_secs(10)).unwrap()
    }

    #[test]
    fn a_new_store_gets_an_epoch_that_survives_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("db");
        let (store, report) = Store::open(&dir, CACHE).unwrap();
        assert!(report.created);
        assert!(report.quarantined.is_none());
        let epoch = store.epoch();
        assert_ne!(epoch, 0);
        drop(store);

        let (store, report) = reopen(&dir);
        assert!(!report.created);
        assert_eq!(store.epoch(), epoch);
        for name in ALL_TREES {
            assert!(store.db().tree_names().iter().any(|t| t.as_ref() == name.as_bytes()));
        }
    }

    #[test]
    fn a_snapshot_round_trips_with_its_position() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("db");
        let (store, _) = Store::open(&dir, CACHE).unwrap();
        assert_eq!(store.load_snapshot().unwrap(), None);
        store.save_snapshot(41, b"old").unwrap();
        store.save_snapshot(42, b"state bytes").unwrap();
        store.flush().unwrap();
        drop(store);

        let (store, _) = reopen(&dir);
        assert_eq!(store.load_snapshot().unwrap(), Some((42, b"state bytes".to_vec())));
    }

    #[test]
    fn a_second_open_of_a_store_in_use_is_locked_and_moves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("db");
        let (store, _) = Store::open(&dir, CACHE).unwrap();
        let err = Store::open(&dir, CACHE).unwrap_err();
        assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
        assert!(!err.is_retryable());
        // The store in use is untouched: no quarantine directory appeared.
        let entries: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
        assert_eq!(entries.len(), 1);
        drop(store);
    }

    #[test]
    fn a_corrupted_store_is_quarantined_and_a_fresh_one_opens() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("db");
        let (store, _) = Store::open(&dir, CACHE).unwrap();
        let old_epoch = store.epoch();
        store.save_snapshot(7, b"precious").unwrap();
        store.flush().unwrap();
        drop(store);

        // Garbage over every file of the store, as a bad SD card would leave it.
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                let len = std::fs::metadata(&path).unwrap().len().max(64) as usize;
                let garbage: Vec<u8> = (0..len).map(|i| (i * 7 + 13) as u8).collect();
                std::fs::write(&path, garbage).unwrap();
            }
        }

        let (store, report) = reopen(&dir);
        let quarantined = report.quarantined.expect("the corrupt store is moved aside");
        assert!(report.created);
        assert!(quarantined.exists());
        let name = quarantined.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("db.corrupt-"), "{name}");
        assert_ne!(store.epoch(), old_epoch);
        assert_eq!(store.load_snapshot().unwrap(), None);

        // The loss is remembered across restarts until it was reported.
        let lost = store.lost_store().unwrap().expect("the fresh store knows what it replaced");
        assert_eq!(lost.moved_to, quarantined);
        drop(store);
        let (store, report) = reopen(&dir);
        assert!(report.quarantined.is_none());
        assert_eq!(store.lost_store().unwrap().as_ref(), Some(&lost));
        let [(alert_lane, alert_seq, alert), (gap_lane, gap_seq, gap)] = lost.records(&dir);
        assert_eq!(
            (alert_lane, alert_seq, gap_lane, gap_seq),
            (Lane::Alerts, 0, Lane::Summaries, 0)
        );
        let RecordBody::Alert(alert) = alert else { panic!("{alert:?}") };
        assert_eq!((alert.rule.as_str(), alert.severity), (LOST_STORE_RULE, Severity::Critical));
        assert!(alert.message.contains(&quarantined.display().to_string()), "{}", alert.message);
        let RecordBody::Gap(gap) = gap else { panic!("{gap:?}") };
        assert_eq!((gap.reason.as_str(), gap.to_ms), (GAP_REASON_STORE_LOST, Some(lost.at_ms)));
        store.clear_lost_store().unwrap();
        drop(store);
        let (store, _) = reopen(&dir);
        assert_eq!(store.lost_store().unwrap(), None);
    }

    #[test]
    fn a_full_disk_or_read_only_filesystem_is_not_mistaken_for_corruption() {
        use std::io::{Error, ErrorKind};
        let os = |code| sled::Error::Io(Error::from_raw_os_error(code));
        // ENOSPC, EROFS, EACCES, EDQUOT, EMFILE, ENOMEM: the store is fine, its place is not.
        for code in [28, 30, 13, 122, 24, 12] {
            assert!(is_environment_error(&os(code)), "errno {code}");
        }
        // EIO (a bad sector), garbage and sled's own corruption reports: quarantined.
        assert!(!is_environment_error(&os(5)));
        assert!(!is_environment_error(&sled::Error::Io(Error::new(
            ErrorKind::InvalidData,
            "garbage"
        ))));
        assert!(!is_environment_error(&sled::Error::Corruption { at: None, bt: () }));
        assert!(!is_environment_error(&sled::Error::Unsupported("format".into())));
        let unavailable = StoreError::Unavailable { dir: PathBuf::from("/data"), source: os(28) };
        assert!(unavailable.is_retryable());
        assert!(unavailable.to_string().contains("kept as it is"), "{unavailable}");
    }

    #[test]
    fn quarantine_names_do_not_collide() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("db");
        let first = quarantine_path(&dir);
        std::fs::create_dir(&first).unwrap();
        let second = quarantine_path(&dir);
        assert_ne!(first, second);
        let with_slash = quarantine_path(Path::new("some/dir/"));
        assert!(with_slash.to_string_lossy().starts_with("some/dir.corrupt-"), "{with_slash:?}");
    }
}
