//! A real HTTP upstream for the agent: an axum server on 127.0.0.1 that decodes every batch
//! with `sensors::wire` as a backend in Rust would (JSON or the compact layout; zstd, gzip or
//! identity), checks it against the wire format, and keeps everything it acknowledged for
//! the test to inspect. A body that does not decode (or has an unknown type or encoding) is
//! answered 400; a batch that decodes but breaks a rule of the format is acknowledged and
//! reported: both are protocol errors.
//!
//! Availability can be switched while the agent runs: answer 503 to every request, fail the
//! next N requests, or stop listening altogether (connections are refused) and listen again
//! on the same port later. Only batches answered with 200 count as received; rejected ones
//! are merely counted, because the agent must send them again.
//!
//! Records are de-duplicated by id, the wire format's de-duplication key; a resent record
//! whose content differs from the first copy is reported as a conflict, since an agent that
//! replays its journal after a crash must reproduce its output exactly. A gap record has the
//! id of the first record it replaced with `:gap` appended (`sensors::record::gap_id`), so
//! the same seq can legitimately arrive twice: once as the record, once as its gap.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use sensors::record::{Alert, BATCH_FORMAT_VERSION, Batch, Gap, Lane, Record, RecordBody, Summary};
use tokio::sync::oneshot;

/// The path batches are posted to.
pub const INGEST_PATH: &str = "/ingest";

/// What the receiver answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// 200 for every well-formed batch.
    Up,
    /// 503 Service Unavailable for every request.
    Unavailable,
}

/// The records of one agent store: ids are unique within `(agent, epoch, lane)`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Stream {
    /// The agent id.
    pub agent: String,
    /// The store epoch (hex in record ids).
    pub epoch: u64,
    /// The lane.
    pub lane: Lane,
}

/// One batch the receiver acknowledged.
#[derive(Debug, Clone)]
pub struct BatchInfo {
    /// The batch's lane.
    pub lane: Lane,
    /// First and last sequence number as the batch states them.
    pub first_seq: u64,
    /// See `first_seq`.
    pub last_seq: u64,
    /// Number of records.
    pub records: usize,
    /// `Content-Encoding` (`identity` when absent).
    pub encoding: String,
    /// The body's format, from its `Content-Type`.
    pub format: sensors::wire::Format,
    /// `Idempotency-Key`, if sent.
    pub idempotency_key: Option<String>,
    /// Body size on the wire.
    pub wire_bytes: usize,
    /// Body size after undoing `Content-Encoding` (JSON or compact).
    pub json_bytes: usize,
}

/// Everything received so far.
#[derive(Debug, Default)]
pub struct Received {
    /// Acknowledged batches in arrival order.
    pub batches: Vec<BatchInfo>,
    /// First copy of every record, by stream, sequence number and gap-ness (which is the
    /// record id, parsed).
    pub unique: BTreeMap<(Stream, u64, bool), Record>,
    /// Records received again after their first copy.
    pub duplicates: u64,
    /// Records in acknowledged batches, duplicates included.
    pub raw_records: u64,
    /// Places where a record arrived for the first time with a sequence number below one
    /// already seen in its stream.
    pub order_violations: Vec<String>,
    /// Copies of an id whose content differed from the first copy.
    pub conflicts: Vec<String>,
    /// Wire-format violations: undecodable bodies, wrong keys, ids or ranges.
    pub protocol_errors: Vec<String>,
    /// Requests answered 200.
    pub accepted_requests: u64,
    /// Requests answered 503 (down or failing on purpose).
    pub rejected_requests: u64,
    highest_first_seen: HashMap<Stream, u64>,
}

impl Received {
    /// Number of distinct record ids.
    pub fn unique_count(&self) -> usize {
        self.unique.len()
    }

    /// All distinct records in (stream, seq) order.
    pub fn records(&self) -> impl Iterator<Item = &Record> {
        self.unique.values()
    }

    /// Distinct summaries in (stream, seq) order.
    pub fn summaries(&self) -> Vec<&Summary> {
        self.records()
            .filter_map(|r| match &r.body {
                RecordBody::Summary(s) => Some(s),
                _ => None,
            })
            .collect()
    }

    /// Distinct alerts in (stream, seq) order.
    pub fn alerts(&self) -> Vec<&Alert> {
        self.records()
            .filter_map(|r| match &r.body {
                RecordBody::Alert(a) => Some(a),
                _ => None,
            })
            .collect()
    }

    /// Distinct gap records in (stream, seq) order.
    pub fn gaps(&self) -> Vec<&Gap> {
        self.records()
            .filter_map(|r| match &r.body {
                RecordBody::Gap(g) => Some(g),
                _ => None,
            })
            .collect()
    }

    /// Sum of the counts of all distinct summaries.
    pub fn summary_count_total(&self) -> u64 {
        self.summaries().iter().map(|s| s.count).sum()
    }

    /// Sequence numbers that are neither received nor covered by a gap record, per stream:
    /// each stream must be dense from its start (seq 0 or 1) to the highest seq seen.
    pub fn holes(&self) -> Vec<String> {
        let mut seen: BTreeMap<Stream, BTreeSet<u64>> = BTreeMap::new();
        for ((stream, seq, _), record) in &self.unique {
            seen.entry(stream.clone()).or_default().insert(*seq);
            if let RecordBody::Gap(gap) = &record.body {
                let covered = Stream { lane: gap.lane, ..stream.clone() };
                seen.entry(covered).or_default().extend(gap.first_seq..=gap.last_seq);
            }
        }
        let mut holes = Vec::new();
        for (stream, seqs) in seen {
            let (Some(&min), Some(&max)) = (seqs.first(), seqs.last()) else { continue };
            if min > 1 {
                holes.push(format!("{stream:?}: nothing before seq {min}"));
            }
            let mut missing = Vec::new();
            for seq in min..=max {
                if !seqs.contains(&seq) {
                    missing.push(seq);
                }
            }
            if !missing.is_empty() {
                let shown: Vec<_> = missing.iter().take(20).collect();
                holes.push(format!("{stream:?}: {} missing seqs, first {shown:?}", missing.len()));
            }
        }
        holes
    }

    /// A one-paragraph account for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "{} batches ({} accepted requests, {} rejected), {} raw records, {} unique, {} \
             duplicates, {} summaries (count total {}), {} alerts, {} gaps; order violations: \
             {:?}; conflicts: {:?}; protocol errors: {:?}; holes: {:?}",
            self.batches.len(),
            self.accepted_requests,
            self.rejected_requests,
            self.raw_records,
            self.unique_count(),
            self.duplicates,
            self.summaries().len(),
            self.summary_count_total(),
            self.alerts().len(),
            self.gaps().len(),
            first_few(&self.order_violations),
            first_few(&self.conflicts),
            first_few(&self.protocol_errors),
            self.holes(),
        )
    }

    /// Takes in one decoded, acknowledged batch.
    fn record_batch(&mut self, batch: Batch, info: BatchInfo) {
        self.check_batch(&batch, &info);
        self.batches.push(info);
        for record in batch.records {
            self.raw_records += 1;
            let Some((stream, is_gap)) = parse_id(&record.id) else {
                self.protocol_errors.push(format!("unparsable record id {:?}", record.id));
                continue;
            };
            let key = (stream.clone(), record.seq, is_gap);
            match self.unique.get(&key) {
                Some(first) => {
                    self.duplicates += 1;
                    if first != &record {
                        self.conflicts.push(format!(
                            "{}: first {:?}, now {:?}",
                            record.id, first.body, record.body
                        ));
                    }
                }
                None => {
                    let highest = self.highest_first_seen.entry(stream).or_insert(0);
                    if record.seq < *highest {
                        self.order_violations.push(format!(
                            "{} arrived after seq {} of its lane",
                            record.id, *highest
                        ));
                    }
                    *highest = (*highest).max(record.seq);
                    self.unique.insert(key, record);
                }
            }
        }
    }

    fn check_batch(&mut self, batch: &Batch, info: &BatchInfo) {
        let mut problems = Vec::new();
        if batch.version != BATCH_FORMAT_VERSION {
            problems.push(format!("version {} != {BATCH_FORMAT_VERSION}", batch.version));
        }
        let key = format!(
            "{}/{}/{}-{}",
            batch.agent,
            batch.lane.as_str(),
            batch.first_seq,
            batch.last_seq
        );
        if info.idempotency_key.as_deref() != Some(key.as_str()) {
            problems.push(format!("Idempotency-Key {:?}, expected {key:?}", info.idempotency_key));
        }
        match (batch.records.first(), batch.records.last()) {
            (Some(first), Some(last)) => {
                if first.seq != batch.first_seq || last.seq != batch.last_seq {
                    problems.push(format!(
                        "range {}-{} but records {}-{}",
                        batch.first_seq, batch.last_seq, first.seq, last.seq
                    ));
                }
            }
            _ => problems.push("empty batch".into()),
        }
        for pair in batch.records.windows(2) {
            if pair[1].seq <= pair[0].seq {
                problems.push(format!("seq {} follows {} in one batch", pair[1].seq, pair[0].seq));
            }
        }
        for record in &batch.records {
            match parse_id(&record.id) {
                Some((s, _)) => {
                    let expected = match record.body {
                        RecordBody::Gap(_) => {
                            sensors::record::gap_id(&batch.agent, s.epoch, batch.lane, record.seq)
                        }
                        _ => sensors::record::record_id(
                            &batch.agent,
                            s.epoch,
                            batch.lane,
                            record.seq,
                        ),
                    };
                    if record.id != expected {
                        problems.push(format!("record id {:?}, expected {expected:?}", record.id));
                    }
                }
                None => {
                    problems.push(format!("record id {:?} is not agent:epoch:lane:seq", record.id))
                }
            }
        }
        for p in problems {
            self.protocol_errors.push(format!("batch {key}: {p}"));
        }
    }
}

fn first_few(items: &[String]) -> &[String] {
    &items[..items.len().min(5)]
}

/// Parses a record id `<agent>:<epoch hex>:<lane>:<seq>` or a gap id (the same with `:gap`
/// appended): its stream and whether it is a gap's.
pub fn parse_id(id: &str) -> Option<(Stream, bool)> {
    match id.strip_suffix(":gap") {
        Some(record) => Some((parse_stream(record)?, true)),
        None => Some((parse_stream(id)?, false)),
    }
}

/// Parses the stream of a record id `<agent>:<epoch hex>:<lane>:<seq>` (or a gap id).
pub fn parse_stream(id: &str) -> Option<Stream> {
    let id = id.strip_suffix(":gap").unwrap_or(id);
    let mut parts = id.rsplitn(4, ':');
    let _seq: u64 = parts.next()?.parse().ok()?;
    let lane = match parts.next()? {
        "alerts" => Lane::Alerts,
        "summaries" => Lane::Summaries,
        _ => return None,
    };
    let epoch = u64::from_str_radix(parts.next()?, 16).ok()?;
    let agent = parts.next()?.to_string();
    Some(Stream { agent, epoch, lane })
}

#[derive(Debug)]
struct Shared {
    received: Mutex<Received>,
    control: Mutex<Control>,
}

#[derive(Debug)]
struct Control {
    mode: Mode,
    fail_next: u64,
    delay: Duration,
}

impl Shared {
    fn received(&self) -> MutexGuard<'_, Received> {
        self.received.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn control(&self) -> MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The HTTP upstream; stops on drop.
#[derive(Debug)]
pub struct Receiver {
    rt: tokio::runtime::Runtime,
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: Option<(oneshot::Sender<()>, tokio::task::JoinHandle<()>)>,
}

impl Receiver {
    /// Starts listening on a free port of 127.0.0.1, answering 200.
    pub fn start() -> Receiver {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let listener =
            rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local_addr");
        let shared = Arc::new(Shared {
            received: Mutex::new(Received::default()),
            control: Mutex::new(Control { mode: Mode::Up, fail_next: 0, delay: Duration::ZERO }),
        });
        let mut receiver = Receiver { rt, addr, shared, server: None };
        receiver.serve(listener);
        receiver
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let app = Router::new()
            .route(INGEST_PATH, post(ingest))
            .layer(DefaultBodyLimit::disable())
            .with_state(self.shared.clone());
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = self.rt.spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop_rx.await;
                })
                .await;
        });
        self.server = Some((stop_tx, task));
    }

    /// The URL batches are posted to.
    pub fn url(&self) -> String {
        format!("http://{}{INGEST_PATH}", self.addr)
    }

    /// The port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Answers 503 to every request from now on.
    pub fn set_unavailable(&self) {
        self.shared.control().mode = Mode::Unavailable;
    }

    /// Answers 200 again (also listens again if connections were refused).
    pub fn set_up(&mut self) {
        self.shared.control().mode = Mode::Up;
        self.accept_connections();
    }

    /// Answers 503 to the next `n` requests, then behaves as the mode says.
    pub fn fail_next(&self, n: u64) {
        self.shared.control().fail_next = n;
    }

    /// Answers accepted batches only after `delay` (they count as received at once): a slow
    /// upstream, which keeps requests in flight long enough to kill the sender meanwhile.
    pub fn set_delay(&self, delay: Duration) {
        self.shared.control().delay = delay;
    }

    /// Stops listening: new connections are refused and open ones are closed once their
    /// current request is answered.
    pub fn refuse_connections(&mut self) {
        let Some((stop, task)) = self.server.take() else { return };
        let _ = stop.send(());
        let finished = self
            .rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(10), task).await.is_ok() });
        assert!(finished, "receiver did not shut down within 10 s");
    }

    /// Listens again on the same port after [`Receiver::refuse_connections`].
    pub fn accept_connections(&mut self) {
        if self.server.is_some() {
            return;
        }
        let addr = self.addr;
        let mut last_error = None;
        for _ in 0..50 {
            match self.rt.block_on(tokio::net::TcpListener::bind(addr)) {
                Ok(listener) => {
                    self.serve(listener);
                    return;
                }
                Err(e) => last_error = Some(e),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("cannot listen on {addr} again: {last_error:?}");
    }

    /// Whether the receiver is listening.
    pub fn is_listening(&self) -> bool {
        self.server.is_some()
    }

    /// Runs `f` on everything received so far (under the lock; keep it short).
    pub fn with<T>(&self, f: impl FnOnce(&Received) -> T) -> T {
        f(&self.shared.received())
    }

    /// Number of distinct records received.
    pub fn unique_count(&self) -> usize {
        self.with(Received::unique_count)
    }

    /// [`Received::describe`].
    pub fn describe(&self) -> String {
        self.with(Received::describe)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some((stop, _task)) = self.server.take() {
            let _ = stop.send(());
        }
        if std::thread::panicking() {
            eprintln!("----- receiver on {}: {} -----", self.addr, self.describe());
        }
    }
}

/// An error and its sources on one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Decodes a body by its `Content-Encoding`.
pub fn decode_body(encoding: &str, body: &[u8]) -> Result<Vec<u8>, String> {
    match encoding {
        "identity" => Ok(body.to_vec()),
        "zstd" => zstd::decode_all(body).map_err(|e| format!("zstd: {e}")),
        "gzip" => {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(body)
                .read_to_end(&mut out)
                .map_err(|e| format!("gzip: {e}"))?;
            Ok(out)
        }
        other => Err(format!("unknown Content-Encoding {other:?}")),
    }
}

async fn ingest(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    {
        let mut control = shared.control();
        if control.mode == Mode::Unavailable || control.fail_next > 0 {
            control.fail_next = control.fail_next.saturating_sub(1);
            drop(control);
            shared.received().rejected_requests += 1;
            return (StatusCode::SERVICE_UNAVAILABLE, "down for the test\n".into());
        }
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let encoding = header("content-encoding").unwrap_or_else(|| "identity".into());
    let content_type = header("content-type").unwrap_or_default();
    let refuse = |shared: &Shared, e: sensors::wire::WireError| {
        let reason = error_chain(&e);
        shared.received().protocol_errors.push(format!("undecodable body: {reason}"));
        (StatusCode::BAD_REQUEST, format!("{reason}\n"))
    };
    // Decompressed first only to measure it; `decode` does the rest (type, verification).
    let compression = sensors::wire::Compression::from_content_encoding(&encoding)
        .ok_or(sensors::wire::WireError::UnsupportedEncoding { encoding: encoding.clone() });
    let decoded = match compression.and_then(|c| sensors::wire::decompress(&body, c)) {
        Ok(d) => d,
        Err(e) => return refuse(&shared, e),
    };
    // Unverified: a batch that breaks a rule of the format is acknowledged and reported by
    // `check_batch` (one protocol error per broken rule), so that a test sees every violation
    // rather than a dead-lettered batch.
    let batch: Batch = match sensors::wire::decode_unverified(&decoded, &content_type, None) {
        Ok(b) => b,
        Err(e) => return refuse(&shared, e),
    };
    let info = BatchInfo {
        lane: batch.lane,
        first_seq: batch.first_seq,
        last_seq: batch.last_seq,
        records: batch.records.len(),
        encoding,
        format: sensors::wire::Format::from_content_type(&content_type).unwrap_or_default(),
        idempotency_key: header("idempotency-key"),
        wire_bytes: body.len(),
        json_bytes: decoded.len(),
    };
    {
        let mut received = shared.received();
        received.accepted_requests += 1;
        received.record_batch(batch, info);
    }
    let delay = shared.control().delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    (StatusCode::OK, "ok\n".into())
}
