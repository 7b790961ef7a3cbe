//! `edgewise collect`: a reference receiver for the upstream wire format, for trying the
//! agent without a backend and as the executable form of the receiver contract.
//!
//! ```text
//! POST (any path) ─▶ body, at most --max-body ────────────────────────── 413 beyond
//!   ─▶ sensors::wire::decode by Content-Type / Content-Encoding ──────── 415 unknown type
//!      (JSON or compact, identity / zstd / gzip, verified ids and seqs)    or encoding,
//!                                                                          400 bad body
//!   ─▶ Dedup: which record ids are new ─▶ append them to FILE as JSON lines, fsync ─▶ 200
//!                                         (500 if the write fails: nothing is marked seen)
//! ```
//!
//! Every accepted batch gets a 200, a full duplicate too: the agent resends a batch whose
//! acknowledgement it lost, and must be able to drop it. One line per batch goes to the log
//! (stderr). Each line of FILE is one [`Record`] as JSON, exactly as the batch carried it;
//! its id names agent, store epoch, lane and seq.
//!
//! # De-duplication with bounded memory
//!
//! The de-duplication key is the record id: `(agent, epoch, lane, seq)` plus whether it is a
//! gap record (a gap has the id of the record it replaced with `:gap` appended). Instead of
//! every id, `Dedup` keeps per `(agent, epoch, lane)` stream and per kind (records, gaps) a
//! high-water mark and a small set above it (`Seen`):
//!
//! - `next`: every seq below it counts as seen;
//! - `above`: seqs at or above `next` seen out of order, at most [`MAX_ABOVE`]; beyond that the
//!   smallest is folded into `next` (a record arriving more than that many seqs late would be
//!   taken for a duplicate; the agent sends each lane in order, so it never is).
//!
//! An accepted batch holds every record its agent still had in `first_seq..=last_seq` (the
//! forwarder reads the lane in order; what is missing was evicted and is reported by a gap
//! record), so once it is written no other *record* of that range can come, and a batch that
//! starts at or below `next` moves `next` past its `last_seq`. Gap records are tracked one by
//! one: a gap may legitimately arrive after the records around it (the agent evicted records
//! that this receiver had already written but whose acknowledgement was lost).
//!
//! Memory is bounded by the number of streams ([`MAX_STREAMS`]; a batch of a new stream
//! beyond it gets a 503, so nothing is lost) times `MAX_ABOVE`. On start the state is rebuilt
//! from FILE (the highest seq of each stream and kind), so a restarted collector does not
//! write a resent batch twice. A torn last line (a crash in the middle of a write that was
//! never acknowledged) is cut off first.
//!
//! # Limits and shutdown
//!
//! At most [`MAX_CONNECTIONS`] connections are served at once; headers must arrive within
//! [`HEADER_TIMEOUT`] and a body within [`BODY_TIMEOUT`]. Decoding, de-duplication and the
//! write run on the blocking pool under one lock, so batches are written whole and in the
//! order they were accepted. The shutdown future (SIGTERM/SIGINT in `main`) stops accepting,
//! lets requests in flight finish for up to [`SHUTDOWN_GRACE`], and returns the totals.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::future::Future;
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error_chain;
use crate::http_server::{self, Limits};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use sensors::record::{Batch, Lane, Record, RecordBody};
use sensors::wire::{self, Compression, Format, WireError};
use tokio::net::TcpListener;
use tracing::{info, warn};

/// Most connections served at once; more wait in the listen backlog. A reference receiver
/// faces a handful of agents; the cap keeps a flood from exhausting file descriptors.
pub const MAX_CONNECTIONS: usize = 256;

/// Most `(agent, epoch, lane)` streams remembered: ~100 bytes each plus their out-of-order
/// seqs, so about 10 MiB for this many; a batch of a new stream beyond it gets a 503.
pub const MAX_STREAMS: usize = 100_000;

/// Most out-of-order seqs remembered per stream and kind (see the module docs).
pub const MAX_ABOVE: usize = 1024;

/// How long a client may take to send the request head (slowloris protection).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a client may take to send a body; a slow one gets a 408. The agent's own
/// request timeout is 10 s by default.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long requests in flight may take to finish after the shutdown signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Default `--max-body`: a compressed request body larger than this gets a 413. Sixty-four
/// default agent batches (256 KiB each, before compression).
pub const DEFAULT_MAX_BODY: usize = 16 << 20;

/// What `edgewise collect` was asked to do.
#[derive(Debug, Clone)]
pub struct CollectOptions {
    /// Address to listen on (`127.0.0.1:0` picks a free port).
    pub listen: SocketAddr,
    /// The JSON-lines file new records are appended to (created if missing).
    pub out: PathBuf,
    /// Largest request body accepted, as received (compressed).
    pub max_body: usize,
}

/// Why the collector cannot run.
#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    /// The listen address cannot be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS's report.
        #[source]
        source: std::io::Error,
    },
    /// The output file cannot be opened, read (to restore the de-duplication state) or
    /// repaired.
    #[error("cannot use output file {path}")]
    Out {
        /// The file.
        path: PathBuf,
        /// The OS's report.
        #[source]
        source: std::io::Error,
    },
}

/// Counts over the collector's life, returned when it stops.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Batches answered 200.
    pub batches: u64,
    /// Records written to the file.
    pub written: u64,
    /// Records dropped as already written.
    pub duplicates: u64,
    /// Requests refused (4xx, 5xx).
    pub refused: u64,
}

/// A bound collector; [`Collector::serve`] runs it.
#[derive(Debug)]
pub struct Collector {
    listener: TcpListener,
    addr: SocketAddr,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    max_body: usize,
    state: Mutex<State>,
}

/// The file and what it holds; under one lock so that batches are written whole.
#[derive(Debug)]
struct State {
    file: File,
    path: PathBuf,
    dedup: Dedup,
    totals: Totals,
}

impl Collector {
    /// Opens (or creates) the output file, restores the de-duplication state from it, and
    /// binds the listen address.
    pub async fn bind(options: &CollectOptions) -> Result<Collector, CollectError> {
        let out = options.out.clone();
        let (file, dedup, restored) =
            tokio::task::spawn_blocking(move || open_out(&out))
                .await
                .map_err(|e| CollectError::Out { path: options.out.clone(), source: e.into() })??;
        if restored.records > 0 || restored.torn_bytes > 0 || restored.unreadable > 0 {
            info!(
                path = %options.out.display(),
                records = restored.records,
                streams = dedup.streams.len(),
                unreadable_lines = restored.unreadable,
                torn_bytes_cut = restored.torn_bytes,
                "restored the de-duplication state from the output file"
            );
        }
        let listener = TcpListener::bind(options.listen)
            .await
            .map_err(|source| CollectError::Bind { addr: options.listen, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| CollectError::Bind { addr: options.listen, source })?;
        let state = State { file, path: options.out.clone(), dedup, totals: Totals::default() };
        let shared = Arc::new(Shared { max_body: options.max_body, state: Mutex::new(state) });
        Ok(Collector { listener, addr, shared })
    }

    /// The address actually bound (the port when `:0` was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `shutdown` resolves, then lets requests in flight finish (up to
    /// [`SHUTDOWN_GRACE`]) and returns the totals.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Totals {
        let limits = Limits {
            max_connections: MAX_CONNECTIONS,
            header_timeout: HEADER_TIMEOUT,
            shutdown_grace: SHUTDOWN_GRACE,
        };
        let shared = self.shared.clone();
        let service = move |request: Request<Incoming>, _peer: SocketAddr| {
            let shared = shared.clone();
            async move { handle(request, &shared).await }
        };
        if !http_server::serve("collect", self.listener, limits, service, shutdown).await {
            warn!(grace = ?SHUTDOWN_GRACE, "requests still in flight at shutdown were abandoned");
        }
        lock(&self.shared.state).totals
    }
}

/// Runs a collector until `shutdown`: binds, calls `ready` with the bound address, serves.
pub async fn run(
    options: &CollectOptions,
    ready: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()>,
) -> Result<Totals, CollectError> {
    let collector = Collector::bind(options).await?;
    ready(collector.local_addr());
    info!(addr = %collector.local_addr(), out = %options.out.display(), "collecting batches");
    Ok(collector.serve(shutdown).await)
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    // A panic while holding the lock leaves the state as consistent as the file: go on.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// One request: read, decode, de-duplicate, write, answer.
async fn handle(request: Request<Incoming>, shared: &Arc<Shared>) -> Response<Full<Bytes>> {
    match receive(request, shared).await {
        Ok(accepted) => {
            info!(
                agent = %accepted.agent,
                lane = %accepted.lane.as_str(),
                seq = %format_args!("{}-{}", accepted.first_seq, accepted.last_seq),
                records = accepted.records,
                new = accepted.new,
                duplicates = accepted.records - accepted.new,
                format = %format_args!("{}+{}", accepted.format, accepted.compression),
                bytes = accepted.wire_bytes,
                "batch accepted"
            );
            let text = format!(
                "ok: {} new, {} duplicate\n",
                accepted.new,
                accepted.records - accepted.new
            );
            answer(StatusCode::OK, text)
        }
        Err(refusal) => {
            warn!(status = refusal.status.as_u16(), reason = %refusal.reason, "batch refused");
            lock(&shared.state).totals.refused += 1;
            let mut response = answer(refusal.status, format!("{}\n", refusal.reason));
            if refusal.status == StatusCode::METHOD_NOT_ALLOWED {
                response.headers_mut().insert("allow", HeaderValue::from_static("POST"));
            }
            response
        }
    }
}

fn answer(status: StatusCode, text: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// A batch written (or found to be a duplicate).
#[derive(Debug)]
struct Accepted {
    agent: String,
    lane: Lane,
    first_seq: u64,
    last_seq: u64,
    records: usize,
    new: usize,
    format: Format,
    compression: Compression,
    wire_bytes: usize,
}

/// An answer other than 200, with the reason for the body and the log.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    reason: String,
}

impl Refusal {
    fn new(status: StatusCode, reason: impl Into<String>) -> Refusal {
        Refusal { status, reason: reason.into() }
    }
}

impl From<WireError> for Refusal {
    fn from(error: WireError) -> Refusal {
        let status = if error.is_unsupported_media_type() {
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        } else if error.is_too_large() {
            StatusCode::PAYLOAD_TOO_LARGE
        } else {
            StatusCode::BAD_REQUEST
        };
        Refusal::new(status, error_chain(&error))
    }
}

async fn receive(request: Request<Incoming>, shared: &Arc<Shared>) -> Result<Accepted, Refusal> {
    if request.method() != Method::POST {
        return Err(Refusal::new(StatusCode::METHOD_NOT_ALLOWED, "only POST is accepted"));
    }
    let header = |name: hyper::header::HeaderName| -> Result<Option<String>, Refusal> {
        match request.headers().get(&name) {
            None => Ok(None),
            Some(value) => value.to_str().map(|v| Some(v.to_string())).map_err(|_| {
                Refusal::new(StatusCode::BAD_REQUEST, format!("header {name} is not ASCII"))
            }),
        }
    };
    let content_type = header(CONTENT_TYPE)?.unwrap_or_default();
    let content_encoding = header(CONTENT_ENCODING)?;
    // Refuse what we cannot decode before reading the body.
    let format = Format::from_content_type(&content_type)
        .ok_or(WireError::UnsupportedContentType { content_type: content_type.clone() })?;
    let compression = match &content_encoding {
        None => Compression::None,
        Some(e) => Compression::from_content_encoding(e)
            .ok_or_else(|| WireError::UnsupportedEncoding { encoding: e.clone() })?,
    };
    let too_large = || {
        Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body larger than {} bytes", shared.max_body),
        )
    };
    let declared = header(CONTENT_LENGTH)?.and_then(|l| l.trim().parse::<u64>().ok());
    if declared.is_some_and(|l| l > shared.max_body as u64) {
        return Err(too_large());
    }
    let body = Limited::new(request.into_body(), shared.max_body).collect();
    let body = match tokio::time::timeout(BODY_TIMEOUT, body).await {
        Err(_) => return Err(Refusal::new(StatusCode::REQUEST_TIMEOUT, "body too slow")),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
        Ok(Err(e)) => {
            return Err(Refusal::new(StatusCode::BAD_REQUEST, format!("cannot read body: {e}")));
        }
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    let shared = shared.clone();
    tokio::task::spawn_blocking(move || {
        let batch = wire::decode(&body, &content_type, content_encoding.as_deref())?;
        let mut state = lock(&shared.state);
        let new = state.write(&batch)?;
        Ok(Accepted {
            agent: batch.agent,
            lane: batch.lane,
            first_seq: batch.first_seq,
            last_seq: batch.last_seq,
            records: batch.records.len(),
            new,
            format,
            compression,
            wire_bytes: body.len(),
        })
    })
    .await
    .map_err(|e| Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, format!("decoder task: {e}")))?
}

impl State {
    /// Appends the batch's new records and syncs them; then (only then) marks them seen.
    /// Returns how many were new.
    fn write(&mut self, batch: &Batch) -> Result<usize, Refusal> {
        let Some(stream) = Stream::of(batch) else {
            // `verify` passed, so the first id has an epoch; this is unreachable in practice.
            return Err(Refusal::new(StatusCode::BAD_REQUEST, "record ids carry no store epoch"));
        };
        if !self.dedup.streams.contains_key(&stream) && self.dedup.streams.len() >= MAX_STREAMS {
            return Err(Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("this collector already tracks {MAX_STREAMS} streams"),
            ));
        }
        let new = self.dedup.new_records(&stream, batch);
        let mut lines = Vec::new();
        for record in &new {
            // A Record always serialises: plain strings and numbers.
            serde_json::to_writer(&mut lines, record).map_err(|e| {
                Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode: {e}"))
            })?;
            lines.push(b'\n');
        }
        if !lines.is_empty()
            && let Err(e) = append_synced(&mut self.file, &lines)
        {
            return Err(Refusal::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot write {}: {e}", self.path.display()),
            ));
        }
        let new = new.len();
        self.dedup.commit(stream, batch);
        self.totals.batches += 1;
        self.totals.written += new as u64;
        self.totals.duplicates += (batch.records.len() - new) as u64;
        Ok(new)
    }
}

/// Appends `bytes` and syncs them; on failure cuts the file back to where it was, so that
/// the resend the failure provokes is not written after a partial copy.
fn append_synced(file: &mut File, bytes: &[u8]) -> std::io::Result<()> {
    let start = file.seek(SeekFrom::End(0))?;
    let result = file.write_all(bytes).and_then(|()| file.sync_data());
    if result.is_err() {
        let _ = file.set_len(start);
    }
    result
}

/// What restoring from the output file found.
#[derive(Debug, Default)]
struct Restored {
    records: u64,
    unreadable: u64,
    torn_bytes: u64,
}

/// Opens the output file for appending, cuts a torn last line, and rebuilds the
/// de-duplication state from its records.
fn open_out(path: &Path) -> Result<(File, Dedup, Restored), CollectError> {
    let failed = |source| CollectError::Out { path: path.to_path_buf(), source };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)
        .map_err(failed)?;
    let mut dedup = Dedup::default();
    let mut restored = Restored::default();
    let mut reader = BufReader::new(&file);
    let mut line = Vec::new();
    let mut complete: u64 = 0;
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).map_err(failed)?;
        if n == 0 || line.last() != Some(&b'\n') {
            restored.torn_bytes = n as u64;
            break;
        }
        complete += n as u64;
        match serde_json::from_slice::<Record>(&line).ok().and_then(|r| restore(&mut dedup, &r)) {
            Some(()) => restored.records += 1,
            None => restored.unreadable += 1,
        }
    }
    drop(reader);
    if restored.torn_bytes > 0 {
        warn!(path = %path.display(), bytes = restored.torn_bytes, "cutting a torn last line");
        file.set_len(complete).map_err(failed)?;
        file.sync_data().map_err(failed)?;
    }
    Ok((file, dedup, restored))
}

/// Marks a record from the output file as seen. `None` if its id is not a record id.
fn restore(dedup: &mut Dedup, record: &Record) -> Option<()> {
    let (stream, is_gap) = Stream::parse_id(&record.id)?;
    if dedup.streams.contains_key(&stream) || dedup.streams.len() < MAX_STREAMS {
        let seen = dedup.streams.entry(stream).or_default();
        let kind = if is_gap { &mut seen.gaps } else { &mut seen.records };
        kind.advance_past(record.seq);
    }
    Some(())
}

/// One agent store's lane: record ids are unique within it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Stream {
    agent: String,
    epoch: u64,
    lane: Lane,
}

impl Stream {
    /// The stream of a verified batch (its first record's id names the epoch).
    fn of(batch: &Batch) -> Option<Stream> {
        let first = batch.records.first()?;
        let epoch = wire::epoch_of(&batch.agent, batch.lane, &first.id)?;
        Some(Stream { agent: batch.agent.clone(), epoch, lane: batch.lane })
    }

    /// The stream of a record id `<agent>:<epoch hex>:<lane>:<seq>[:gap]`, and whether it is
    /// a gap's. The agent id may contain `:`; the other parts cannot.
    fn parse_id(id: &str) -> Option<(Stream, bool)> {
        let (id, is_gap) = match id.strip_suffix(":gap") {
            Some(id) => (id, true),
            None => (id, false),
        };
        let mut parts = id.rsplitn(4, ':');
        let _seq: u64 = parts.next()?.parse().ok()?;
        let lane = match parts.next()? {
            "alerts" => Lane::Alerts,
            "summaries" => Lane::Summaries,
            _ => return None,
        };
        let epoch = u64::from_str_radix(parts.next()?, 16).ok()?;
        let agent = parts.next()?.to_string();
        Some((Stream { agent, epoch, lane }, is_gap))
    }
}

/// Which record ids were written, per stream (see the module docs). A pure state machine:
/// [`Dedup::new_records`] asks, [`Dedup::commit`] records an accepted batch.
#[derive(Debug, Default)]
struct Dedup {
    streams: HashMap<Stream, StreamSeen>,
}

#[derive(Debug, Default)]
struct StreamSeen {
    records: Seen,
    gaps: Seen,
}

impl Dedup {
    /// The records of a verified batch of `stream` not written before.
    fn new_records<'b>(&self, stream: &Stream, batch: &'b Batch) -> Vec<&'b Record> {
        let seen = self.streams.get(stream);
        let is_new = |record: &&Record| {
            seen.is_none_or(|seen| {
                let kind = match record.body {
                    RecordBody::Gap(_) => &seen.gaps,
                    _ => &seen.records,
                };
                !kind.contains(record.seq)
            })
        };
        batch.records.iter().filter(is_new).collect()
    }

    /// Marks every record of an accepted batch as written, and its range as done for
    /// records (a batch holds every record its agent had in its range).
    fn commit(&mut self, stream: Stream, batch: &Batch) {
        let seen = self.streams.entry(stream).or_insert_with(|| StreamSeen {
            // A stream's first batch: nothing before it will come (the lane is sent in order).
            records: Seen::starting_at(batch.first_seq),
            gaps: Seen::default(),
        });
        for record in &batch.records {
            match record.body {
                RecordBody::Gap(_) => seen.gaps.insert(record.seq),
                _ => seen.records.insert(record.seq),
            }
        }
        seen.records.cover(batch.first_seq, batch.last_seq);
    }
}

/// Seen sequence numbers of one kind in one stream: everything below `next`, and `above`.
#[derive(Debug, Default)]
struct Seen {
    next: u64,
    above: BTreeSet<u64>,
}

impl Seen {
    fn starting_at(next: u64) -> Seen {
        Seen { next, above: BTreeSet::new() }
    }

    fn contains(&self, seq: u64) -> bool {
        seq < self.next || self.above.contains(&seq)
    }

    fn insert(&mut self, seq: u64) {
        if seq >= self.next {
            self.above.insert(seq);
        }
        self.settle();
    }

    /// Every seq up to `last` is done, if the range connects to what is done already.
    fn cover(&mut self, first: u64, last: u64) {
        if first <= self.next {
            self.advance_past(last);
        }
    }

    /// Every seq up to `seq` is done.
    fn advance_past(&mut self, seq: u64) {
        match seq.checked_add(1) {
            Some(next) if next > self.next => {
                self.next = next;
                self.above = self.above.split_off(&next);
            }
            Some(_) => {}
            // `next` cannot pass u64::MAX: everything below is done, `above` keeps the last.
            None => {
                self.next = u64::MAX;
                self.above = BTreeSet::from([u64::MAX]);
            }
        }
        self.settle();
    }

    /// Folds seqs that continue `next` into it, and the smallest ones beyond [`MAX_ABOVE`].
    fn settle(&mut self) {
        while let Some(&first) = self.above.first() {
            if first == self.next {
                // At u64::MAX nothing can follow; `above` keeps it.
                let Some(next) = first.checked_add(1) else { break };
                self.above.pop_first();
                self.next = next;
            } else if self.above.len() > MAX_ABOVE {
                self.above.pop_first();
                self.next = first.saturating_add(1);
            } else {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sensors::record::{Gap, Summary, gap_id, record_id};

    fn summary() -> RecordBody {
        RecordBody::Summary(Summary {
            series: "p/t".into(),
            start_ms: 0,
            window_ms: 1000,
            count: 1,
            min: 1.0,
            max: 1.0,
            mean: 1.0,
            stddev: 0.0,
            first: 1.0,
            last: 1.0,
            windows: 1,
        })
    }

    fn gap(first: u64, last: u64) -> RecordBody {
        RecordBody::Gap(Gap {
            lane: Lane::Summaries,
            first_seq: first,
            last_seq: last,
            records: last - first + 1,
            from_ms: None,
            to_ms: None,
            reason: "outbox_full".into(),
            events: 0,
        })
    }

    /// A batch of `gw`, epoch 1, summaries; `gaps` lists seqs that are gap records.
    fn batch(seqs: &[u64], gaps: &[u64]) -> Batch {
        let records = seqs
            .iter()
            .map(|&seq| {
                if gaps.contains(&seq) {
                    let id = gap_id("gw", 1, Lane::Summaries, seq);
                    Record { id, seq, body: gap(seq, seq + 1) }
                } else {
                    Record { id: record_id("gw", 1, Lane::Summaries, seq), seq, body: summary() }
                }
            })
            .collect();
        Batch {
            version: 2,
            agent: "gw".into(),
            lane: Lane::Summaries,
            first_seq: seqs[0],
            last_seq: *seqs.last().unwrap(),
            records,
        }
    }

    /// Offers a batch; returns the seqs that were new (and commits them).
    fn offer(dedup: &mut Dedup, batch: &Batch) -> Vec<u64> {
        let stream = Stream::of(batch).unwrap();
        let new: Vec<u64> = dedup.new_records(&stream, batch).iter().map(|r| r.seq).collect();
        dedup.commit(stream, batch);
        new
    }

    #[test]
    fn a_resent_batch_is_all_duplicates() {
        let mut dedup = Dedup::default();
        assert_eq!(offer(&mut dedup, &batch(&[1, 2, 3], &[])), [1, 2, 3]);
        assert_eq!(offer(&mut dedup, &batch(&[1, 2, 3], &[])), Vec::<u64>::new());
        assert_eq!(offer(&mut dedup, &batch(&[2, 3, 4, 5], &[])), [4, 5]);
    }

    #[test]
    fn a_gap_that_replaced_written_records_is_still_new() {
        let mut dedup = Dedup::default();
        assert_eq!(offer(&mut dedup, &batch(&[1, 2, 3, 4], &[])), [1, 2, 3, 4]);
        // The acknowledgement was lost; 1..=2 were evicted into a gap at seq 1.
        assert_eq!(offer(&mut dedup, &batch(&[1, 3, 4], &[1])), [1]);
        assert_eq!(offer(&mut dedup, &batch(&[1, 3, 4], &[1])), Vec::<u64>::new());
    }

    #[test]
    fn records_evicted_inside_a_batch_range_do_not_hold_the_mark_back() {
        let mut dedup = Dedup::default();
        // Seqs 3..=4 were evicted (a gap at 3 covers them); the batch spans 1..=6.
        offer(&mut dedup, &batch(&[1, 2, 3, 5, 6], &[3]));
        let seen = &dedup.streams.values().next().unwrap().records;
        assert_eq!((seen.next, seen.above.len()), (7, 0));
    }

    #[test]
    fn streams_are_separate() {
        let mut dedup = Dedup::default();
        offer(&mut dedup, &batch(&[1, 2], &[]));
        let mut other = batch(&[1, 2], &[]);
        other.agent = "gw2".into();
        for r in &mut other.records {
            r.id = record_id("gw2", 1, Lane::Summaries, r.seq);
        }
        assert_eq!(offer(&mut dedup, &other), [1, 2]);
    }

    #[test]
    fn out_of_order_seqs_are_remembered_up_to_the_cap() {
        let mut seen = Seen::starting_at(0);
        seen.insert(5);
        seen.insert(3);
        assert!(seen.contains(5) && seen.contains(3) && !seen.contains(4));
        seen.insert(0);
        assert_eq!(seen.next, 1);
        for seq in 0..(MAX_ABOVE as u64 + 10) {
            seen.insert(1_000 + 2 * seq);
        }
        assert!(seen.above.len() <= MAX_ABOVE);
        // The oldest were folded into the mark: they count as seen now.
        assert!(seen.contains(4));
        assert!(!seen.contains(1_000 + 2 * (MAX_ABOVE as u64 + 9) + 1));
    }

    #[test]
    fn seqs_at_the_end_of_the_range_do_not_overflow() {
        let mut seen = Seen::starting_at(u64::MAX - 1);
        seen.insert(u64::MAX - 1);
        seen.insert(u64::MAX);
        seen.cover(u64::MAX - 1, u64::MAX);
        assert!(seen.contains(u64::MAX) && seen.contains(u64::MAX - 1));
        let mut restored = Seen::default();
        restored.advance_past(u64::MAX);
        assert!(restored.contains(u64::MAX) && restored.contains(0));
    }

    #[test]
    fn record_ids_parse_into_their_stream() {
        let (stream, gap) = Stream::parse_id("gw:with:colons:beef:alerts:7:gap").unwrap();
        assert_eq!(
            (stream.agent.as_str(), stream.epoch, stream.lane, gap),
            ("gw:with:colons", 0xbeef, Lane::Alerts, true)
        );
        assert!(Stream::parse_id("gw:beef:other:7").is_none());
        assert!(Stream::parse_id("gw:zz:alerts:7").is_none());
    }

    #[test]
    fn restoring_from_the_file_cuts_a_torn_line_and_remembers_the_highest_seqs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let b = batch(&[1, 2, 3], &[2]);
        let mut text = String::new();
        for r in &b.records {
            text.push_str(&serde_json::to_string(r).unwrap());
            text.push('\n');
        }
        text.push_str("not json\n");
        std::fs::write(&path, format!("{text}{{\"id\":\"gw:1:summ")).unwrap();
        let (_file, mut dedup, restored) = open_out(&path).unwrap();
        assert_eq!((restored.records, restored.unreadable, restored.torn_bytes), (3, 1, 16));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        assert_eq!(offer(&mut dedup, &batch(&[1, 2, 3, 4], &[2])), [4]);
    }
}
