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
//! Faults ([`Fault`], [`FaultPlan`]) make it a bad upstream on purpose: 5xx answers, answers
//! held past the agent's timeout, slow answers, connections reset without an answer, and
//! batches read in full and then failed (answered 500 or the connection closed), which are
//! kept apart as received-but-failed and never count as delivered. A plan fails each request
//! with a probability, choosing among its faults with a generator seeded by the plan, so a
//! mixed run is reproducible (given the same sequence of requests). Every injected fault is
//! counted in [`Received::faults`].
//!
//! Records are de-duplicated by id, the wire format's de-duplication key; a resent record
//! whose content differs from the first copy is reported as a conflict, since an agent that
//! replays its journal after a crash must reproduce its output exactly. A gap record has the
//! id of the first record it replaced with `:gap` appended (`sensors::record::gap_id`), so
//! the same seq can legitimately arrive twice: once as the record, once as its gap.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::serve::IncomingStream;
use sensors::record::{Alert, BATCH_FORMAT_VERSION, Batch, Gap, Lane, Record, RecordBody, Summary};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
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

/// One way of failing a request on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fault {
    /// A 5xx answer (500, 502, 503 or 504, chosen by the plan's generator); the body is read
    /// but not decoded, and counts as rejected.
    ServerError,
    /// The batch is stored (it counts as received, as at a backend that committed it) but
    /// the answer is held for [`FaultPlan::hold`], longer than the agent's upstream timeout:
    /// the agent gives up and sends it again, a duplicate the receiver counts.
    Timeout,
    /// The batch is stored and answered 200 after [`FaultPlan::slow`] (shorter than the
    /// agent's timeout).
    Slow,
    /// The connection is reset (RST) without an answer, once the request is read.
    Reset,
    /// The batch is read and decoded, kept as received-but-failed (not delivered), and
    /// answered 500.
    AcceptThenFail,
    /// The batch is read and decoded, kept as received-but-failed (not delivered), and the
    /// connection is closed without an answer.
    AcceptThenClose,
}

impl Fault {
    /// Every fault, in declaration order.
    pub const ALL: [Fault; 6] = [
        Fault::ServerError,
        Fault::Timeout,
        Fault::Slow,
        Fault::Reset,
        Fault::AcceptThenFail,
        Fault::AcceptThenClose,
    ];
}

/// Which requests fail, and how: each request fails with `probability`, with a fault drawn
/// uniformly from `faults` by a generator seeded with `seed`.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultPlan {
    /// Seed of the generator that decides each request.
    pub seed: u64,
    /// Share of requests that fail, 0.0 to 1.0.
    pub probability: f64,
    /// The faults to choose from; an empty list fails nothing.
    pub faults: Vec<Fault>,
    /// How long [`Fault::Timeout`] holds its answer: longer than the agent's timeout.
    pub hold: Duration,
    /// How long [`Fault::Slow`] delays its answer: shorter than the agent's timeout.
    pub slow: Duration,
}

impl FaultPlan {
    /// Every request fails with `fault` (holding 6 s for a timeout, past the harness's 5 s,
    /// and within the 10 s [`Receiver::refuse_connections`] waits; 200 ms when slow).
    pub fn always(fault: Fault) -> FaultPlan {
        FaultPlan {
            seed: 0,
            probability: 1.0,
            faults: vec![fault],
            hold: Duration::from_secs(6),
            slow: Duration::from_millis(200),
        }
    }

    /// A request fails with a random 5xx with `probability`.
    pub fn server_errors(probability: f64, seed: u64) -> FaultPlan {
        FaultPlan { seed, probability, ..FaultPlan::always(Fault::ServerError) }
    }

    /// A request fails with `probability`, in any of the [`Fault::ALL`] ways.
    pub fn mixed(probability: f64, seed: u64) -> FaultPlan {
        FaultPlan {
            seed,
            probability,
            faults: Fault::ALL.to_vec(),
            ..FaultPlan::always(Fault::Slow)
        }
    }

    /// The same plan holding timeouts for `hold` and delaying slow answers by `slow`.
    pub fn with_delays(mut self, hold: Duration, slow: Duration) -> FaultPlan {
        self.hold = hold;
        self.slow = slow;
        self
    }
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
    /// Requests failed by a [`FaultPlan`], by fault (`Slow` included, though it delivers).
    pub faults: BTreeMap<Fault, u64>,
    /// Batches read in full and then failed ([`Fault::AcceptThenFail`],
    /// [`Fault::AcceptThenClose`]): received but not delivered.
    pub failed_batches: Vec<BatchInfo>,
    /// Ids (parsed, as in `unique`) of the records of `failed_batches`.
    pub failed_records: BTreeSet<(Stream, u64, bool)>,
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

    /// Events that distinct gap records report (late, evicted, expired ... events that no
    /// summary counts).
    pub fn gap_event_total(&self) -> u64 {
        self.gaps().iter().map(|g| g.events).sum()
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

    /// Requests failed by a [`FaultPlan`], all faults.
    pub fn faults_injected(&self) -> u64 {
        self.faults.values().sum()
    }

    /// Records of received-but-failed batches that never arrived in a delivered batch.
    pub fn failed_never_delivered(&self) -> Vec<String> {
        self.failed_records
            .iter()
            .filter(|key| !self.unique.contains_key(key))
            .map(|(stream, seq, gap)| {
                format!("{stream:?} seq {seq}{}", if *gap { " gap" } else { "" })
            })
            .collect()
    }

    /// A one-paragraph account for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "{} batches ({} accepted requests, {} rejected, faults {:?}, {} batches failed \
             after receipt), {} raw records, {} unique, {} duplicates, {} summaries (count \
             total {}), {} alerts, {} gaps; order violations: {:?}; conflicts: {:?}; protocol \
             errors: {:?}; holes: {:?}",
            self.batches.len(),
            self.accepted_requests,
            self.rejected_requests,
            self.faults,
            self.failed_batches.len(),
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

    /// Takes in one decoded batch that is then failed on purpose: checked, kept apart, not
    /// delivered.
    fn record_failed_batch(&mut self, batch: Batch, info: BatchInfo) {
        self.check_batch(&batch, &info);
        self.failed_batches.push(info);
        for record in batch.records {
            if let Some((stream, is_gap)) = parse_id(&record.id) {
                self.failed_records.insert((stream, record.seq, is_gap));
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
    plan: Option<(FaultPlan, fastrand::Rng)>,
}

impl Control {
    /// Decides the next request: a fault, the status of a `ServerError` and how long a
    /// `Timeout` or `Slow` answer waits.
    fn next_fault(&mut self) -> Option<(Fault, StatusCode, Duration)> {
        let (plan, rng) = self.plan.as_mut()?;
        if plan.faults.is_empty() || rng.f64() >= plan.probability {
            return None;
        }
        let fault = plan.faults[rng.usize(..plan.faults.len())];
        let status = [500, 502, 503, 504][rng.usize(..4)];
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let wait = match fault {
            Fault::Timeout => plan.hold,
            Fault::Slow => plan.slow,
            _ => Duration::ZERO,
        };
        Some((fault, status, wait))
    }
}

/// What a handler asks of its connection: nothing, close it, or reset it.
const CONN_OK: u8 = 0;
const CONN_CLOSE: u8 = 1;
const CONN_RESET: u8 = 2;

/// A handle on one accepted connection (the `ConnectInfo` of every request on it), through
/// which a handler can have it closed or reset instead of answered.
#[derive(Debug, Clone)]
struct Conn {
    kill: Arc<AtomicU8>,
}

impl Conn {
    fn new() -> Conn {
        Conn { kill: Arc::new(AtomicU8::new(CONN_OK)) }
    }

    /// From now on the connection fails every read and write, so the answer being written
    /// is never sent and hyper drops the socket; `how` is [`CONN_CLOSE`] (FIN) or
    /// [`CONN_RESET`] (RST).
    fn kill(&self, how: u8) {
        self.kill.store(how, Ordering::SeqCst);
    }
}

impl Connected<IncomingStream<'_, FaultListener>> for Conn {
    fn connect_info(stream: IncomingStream<'_, FaultListener>) -> Conn {
        stream.remote_addr().clone()
    }
}

/// The receiver's listener: a TCP listener whose connections can be killed by a handler.
struct FaultListener(tokio::net::TcpListener);

impl axum::serve::Listener for FaultListener {
    type Io = FaultIo;
    type Addr = Conn;

    async fn accept(&mut self) -> (FaultIo, Conn) {
        loop {
            match self.0.accept().await {
                Ok((stream, _)) => {
                    let conn = Conn::new();
                    return (FaultIo { stream, conn: conn.clone(), lingered: false }, conn);
                }
                // Out of descriptors and the like: wait a little, as axum's own loop does.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Conn> {
        self.0.local_addr().map(|_| Conn::new())
    }
}

/// An accepted TCP stream that fails once its [`Conn`] is killed.
struct FaultIo {
    stream: tokio::net::TcpStream,
    conn: Conn,
    lingered: bool,
}

impl FaultIo {
    /// The error every operation returns once the connection is killed (after arranging an
    /// RST for a reset: `SO_LINGER` 0 makes the close abortive).
    fn killed(&mut self) -> Option<std::io::Error> {
        match self.conn.kill.load(Ordering::SeqCst) {
            CONN_OK => None,
            how => {
                if how == CONN_RESET && !self.lingered {
                    self.lingered = true;
                    // A zero linger does not block on drop, which is what the deprecation
                    // is about.
                    #[allow(deprecated)]
                    let _ = self.stream.set_linger(Some(Duration::ZERO));
                }
                Some(std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    "killed by the test",
                ))
            }
        }
    }
}

impl AsyncRead for FaultIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(e) = self.killed() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for FaultIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(e) = self.killed() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if let Some(e) = self.killed() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
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
            control: Mutex::new(Control {
                mode: Mode::Up,
                fail_next: 0,
                delay: Duration::ZERO,
                plan: None,
            }),
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
        let listener = FaultListener(listener);
        let app = app.into_make_service_with_connect_info::<Conn>();
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

    /// Fails requests as `plan` says from now on (after `Unavailable` and
    /// [`Receiver::fail_next`], which come first); the plan's generator starts from its seed.
    pub fn set_faults(&self, plan: FaultPlan) {
        let rng = fastrand::Rng::with_seed(plan.seed);
        self.shared.control().plan = Some((plan, rng));
    }

    /// Stops failing requests on purpose.
    pub fn clear_faults(&self) {
        self.shared.control().plan = None;
    }

    /// Requests failed with `fault` so far.
    pub fn fault_count(&self, fault: Fault) -> u64 {
        self.with(|r| r.faults.get(&fault).copied().unwrap_or(0))
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
    ConnectInfo(conn): ConnectInfo<Conn>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let fault = {
        let mut control = shared.control();
        if control.mode == Mode::Unavailable || control.fail_next > 0 {
            control.fail_next = control.fail_next.saturating_sub(1);
            drop(control);
            shared.received().rejected_requests += 1;
            return (StatusCode::SERVICE_UNAVAILABLE, "down for the test\n").into_response();
        }
        let fault = control.next_fault();
        drop(control);
        if let Some((fault, _, _)) = fault {
            *shared.received().faults.entry(fault).or_insert(0) += 1;
        }
        fault
    };
    match fault {
        Some((Fault::ServerError, status, _)) => {
            shared.received().rejected_requests += 1;
            return (status, "failing for the test\n").into_response();
        }
        Some((Fault::Reset, _, _)) => {
            conn.kill(CONN_RESET);
            return (StatusCode::INTERNAL_SERVER_ERROR, "never sent\n").into_response();
        }
        _ => {}
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let encoding = header("content-encoding").unwrap_or_else(|| "identity".into());
    let content_type = header("content-type").unwrap_or_default();
    let refuse = |shared: &Shared, e: sensors::wire::WireError| {
        let reason = error_chain(&e);
        shared.received().protocol_errors.push(format!("undecodable body: {reason}"));
        (StatusCode::BAD_REQUEST, format!("{reason}\n")).into_response()
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
    if let Some((fault @ (Fault::AcceptThenFail | Fault::AcceptThenClose), _, _)) = fault {
        shared.received().record_failed_batch(batch, info);
        if fault == Fault::AcceptThenClose {
            conn.kill(CONN_CLOSE);
        }
        return (StatusCode::INTERNAL_SERVER_ERROR, "stored nothing after all\n").into_response();
    }
    {
        let mut received = shared.received();
        received.accepted_requests += 1;
        received.record_batch(batch, info);
    }
    let delay = match fault {
        Some((Fault::Timeout | Fault::Slow, _, wait)) => wait,
        _ => shared.control().delay,
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    (StatusCode::OK, "ok\n").into_response()
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    /// Posts a (not decodable) body on a fresh connection: what came back, or the error.
    fn post(receiver: &Receiver) -> Result<String, std::io::Error> {
        let mut stream = std::net::TcpStream::connect(receiver.addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let body = "{}";
        let request = format!(
            "POST {INGEST_PATH} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             Content-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes())?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    }

    #[test]
    fn a_reset_answers_nothing_and_a_server_error_answers_5xx() {
        let receiver = Receiver::start();
        receiver.set_faults(FaultPlan::always(Fault::Reset));
        match post(&receiver) {
            Ok(response) => assert!(response.is_empty(), "answered: {response:?}"),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        }
        receiver.set_faults(FaultPlan::always(Fault::ServerError));
        let response = post(&receiver).expect("an answer");
        assert!(response.starts_with("HTTP/1.1 50"), "{response:?}");
        receiver.clear_faults();
        let response = post(&receiver).expect("an answer");
        assert!(response.starts_with("HTTP/1.1 400"), "undecodable body: {response:?}");
        let faults = receiver.with(|r| r.faults.clone());
        assert_eq!(faults, BTreeMap::from([(Fault::ServerError, 1), (Fault::Reset, 1)]));
    }

    #[test]
    fn a_plan_is_reproducible_from_its_seed() {
        let decisions = |seed| {
            let mut control = Control {
                mode: Mode::Up,
                fail_next: 0,
                delay: Duration::ZERO,
                plan: Some((FaultPlan::mixed(0.5, seed), fastrand::Rng::with_seed(seed))),
            };
            (0..200).map(|_| control.next_fault().map(|(f, s, _)| (f, s))).collect::<Vec<_>>()
        };
        assert_eq!(decisions(7), decisions(7));
        assert_ne!(decisions(7), decisions(8));
        let failed = decisions(7).iter().filter(|d| d.is_some()).count();
        assert!((60..140).contains(&failed), "{failed} of 200 failed at p = 0.5");
    }
}
