//! The local HTTP API, beside the data path: it only reads [`Metrics`], the outbox's stats
//! and the processor's [`ReadModel`].
//!
//! ```text
//! GET /                    the technician's page (static, embedded; never needs a token)
//! GET /healthz             200 "ok" while the process runs (never needs a token)
//! GET /readyz              200 or 503, JSON: every check with its reason
//! GET /metrics             Prometheus / OpenMetrics text, rendered from the atomics at scrape time
//! GET /api/v1/status       JSON: agent, sources, upstream, buffer
//! GET /api/v1/alerts       JSON: active alerts and the last transitions
//! GET /api/v1/series       JSON: each series' last value, current window, sparkline
//! GET /api/v1/series/history?name=S   JSON: S's last values from the journal (bounded scan)
//! GET /api/v1/rules        JSON: the loaded rules, their active alerts and last transition
//! ```
//!
//! The page polls the JSON endpoints every 2 s; it holds no data of its own, so it is served
//! without a token and asks for one when the API answers 401.
//!
//! # Address and token
//!
//! `[api] listen` (default [`crate::config::DEFAULT_API_LISTEN`], `"off"` disables it). The default address
//! in use (a second agent on the host, the tests running many) is a warning and the agent runs
//! without the API; an address set explicitly that is in use stops the start
//! ([`ApiError::Bind`] names the address and the key). When a token is configured
//! (`token_env` / `token_file`, required for a non-loopback address), every request but
//! `/healthz` needs `Authorization: Bearer <token>`, or gets a 401. The token is compared in
//! constant time and never logged.
//!
//! # Readiness
//!
//! Ready when every check passes: the agent not shutting down, each source connected (simulated sources always are), the
//! journal committing (its last flush succeeded, and a commit within [`JOURNAL_STALL`] or
//! three tick intervals, whichever is longer: ticks are committed also when idle, so a stall
//! means flushes hang or the writer stopped), and the
//! upstream not known to be down (up, or idle with no failure yet).
//!
//! # Limits
//!
//! At most [`MAX_CONNECTIONS`] connections at once, headers within [`HEADER_TIMEOUT`]; the
//! API reads no request bodies. Requests in flight at shutdown get [`SHUTDOWN_GRACE`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::config::{ApiConfig, Config, Secret, SourceConfig, UpstreamConfig};
use crate::http_server::{self, Limits};
use crate::journal::JournalReader;
use crate::metrics::{self, Histogram, Metrics};
use crate::outbox::Outbox;
use crate::readmodel::{ReadModel, RuleState};
use tokio_util::sync::CancellationToken;

/// Most connections served at once: the API serves a technician's page and a scraper, not
/// a crowd; the cap keeps a misbehaving client from exhausting file descriptors.
pub const MAX_CONNECTIONS: usize = 32;

/// How long a client may take to send the request head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long requests in flight may take to finish at shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Most journal entries one history request scans (newest first): ~10 ms of work.
pub const HISTORY_MAX_SCAN: usize = 50_000;

/// Most values one history request returns.
pub const HISTORY_MAX_POINTS: usize = 2_000;

/// The technician's page: one file, no build step, no external resources.
const PAGE: &str = include_str!("page/index.html");

/// The journal counts as not committing when no commit happened for this long (or three
/// tick intervals, if longer). A flush that fails is retried with backoff up to 5 s; a few
/// failed retries in a row make the agent unready.
pub const JOURNAL_STALL: Duration = Duration::from_secs(10);

/// Why the API could not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The listen address cannot be bound.
    #[error("cannot listen on {addr}: {error} (set by `[api] listen`; \"off\" disables the API)")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS's report (in the message: the agent logs errors without their chain).
        error: std::io::Error,
    },
    /// `[api] listen` or the token is invalid (normally caught by the config validation).
    #[error("[api]: {0}")]
    Config(String),
}

/// What the API reads: shared with the stages, never written by the API.
#[derive(Debug, Clone)]
pub struct View {
    /// The running configuration.
    pub config: Arc<Config>,
    /// The counters.
    pub metrics: Arc<Metrics>,
    /// The outbox (for its stats).
    pub outbox: Outbox,
    /// What the processor published.
    pub readmodel: Arc<ReadModel>,
    /// The journal, for one series' history.
    pub journal: JournalReader,
    /// Cancelled when the agent starts shutting down (it is then not ready).
    pub stopping: CancellationToken,
}

/// A bound API; [`Api::serve`] runs it.
#[derive(Debug)]
pub struct Api {
    listener: TcpListener,
    addr: SocketAddr,
    token: Option<Secret>,
}

/// Binds `[api] listen`: `Ok(None)` when the API is off, or when the default address is in
/// use (logged once as a warning).
pub async fn bind(config: &ApiConfig) -> Result<Option<Api>, ApiError> {
    let Some(addr) = config.address().map_err(ApiError::Config)? else {
        return Ok(None);
    };
    let token = match config.token_source().map_err(ApiError::Config)? {
        Some(source) => Some(source.resolve().map_err(ApiError::Config)?),
        None => None,
    };
    let listener = match TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && config.is_default_listen() => {
            warn!(
                addr = %addr,
                "the API's default address is in use (another agent?); running without the API \
                 (set [api] listen to another address, or \"off\")"
            );
            return Ok(None);
        }
        Err(error) => return Err(ApiError::Bind { addr, error }),
    };
    let addr = listener.local_addr().map_err(|error| ApiError::Bind { addr, error })?;
    Ok(Some(Api { listener, addr, token }))
}

impl Api {
    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `shutdown` resolves, then lets requests in flight finish (up to
    /// [`SHUTDOWN_GRACE`]).
    pub async fn serve(self, view: View, shutdown: impl Future<Output = ()>) {
        info!(addr = %self.addr, token = self.token.is_some(), "API listening");
        let shared = Arc::new(Shared { view, token: self.token, started: Instant::now() });
        let limits = Limits {
            max_connections: MAX_CONNECTIONS,
            header_timeout: HEADER_TIMEOUT,
            shutdown_grace: SHUTDOWN_GRACE,
        };
        let service = move |request: Request<Incoming>, _peer: SocketAddr| {
            let shared = Arc::clone(&shared);
            async move {
                match handle(&request, &shared) {
                    Reply::Now(response) => response,
                    Reply::History(name) => history(&shared.view, name).await,
                }
            }
        };
        http_server::serve("api", self.listener, limits, service, shutdown).await;
    }
}

#[derive(Debug)]
struct Shared {
    view: View,
    token: Option<Secret>,
    started: Instant,
}

/// What [`handle`] decided: a response, or a journal read to do off the runtime.
enum Reply {
    Now(Response<Full<Bytes>>),
    History(String),
}

impl From<Response<Full<Bytes>>> for Reply {
    fn from(response: Response<Full<Bytes>>) -> Reply {
        Reply::Now(response)
    }
}

fn handle(request: &Request<Incoming>, shared: &Shared) -> Reply {
    let path = request.uri().path();
    if request.method() != Method::GET {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "only GET is accepted\n".into());
        response.headers_mut().insert("allow", HeaderValue::from_static("GET"));
        return response.into();
    }
    match path {
        "/healthz" => return text(StatusCode::OK, "ok\n".into()).into(),
        "/" | "/index.html" => {
            let mut response = Response::new(Full::new(Bytes::from_static(PAGE.as_bytes())));
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
            headers.insert(
                "content-security-policy",
                HeaderValue::from_static(
                    "default-src 'self'; style-src 'self' 'unsafe-inline'; \
                     script-src 'self' 'unsafe-inline'; img-src 'self' data:",
                ),
            );
            return response.into();
        }
        _ => {}
    }
    if let Some(token) = &shared.token
        && !authorized(request.headers().get(AUTHORIZATION), token)
    {
        let mut response = text(StatusCode::UNAUTHORIZED, "a bearer token is required\n".into());
        response.headers_mut().insert("www-authenticate", HeaderValue::from_static("Bearer"));
        return response.into();
    }
    let view = &shared.view;
    if path == "/api/v1/series/history" {
        return match query_param(request.uri().query(), "name") {
            Some(name) if !name.is_empty() => Reply::History(name),
            _ => text(StatusCode::BAD_REQUEST, "add ?name=<series>\n".into()).into(),
        };
    }
    let response = match path {
        "/readyz" => {
            let ready = readiness(view, crate::event::now_ms());
            let status = if ready.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            json(status, &ready)
        }
        "/metrics" => {
            let mut response = text(StatusCode::OK, render_metrics(view));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            response
        }
        "/api/v1/status" => json(StatusCode::OK, &status(view, shared.started.elapsed())),
        "/api/v1/alerts" => json(StatusCode::OK, &view.readmodel.alerts()),
        "/api/v1/series" => json(StatusCode::OK, &view.readmodel.series()),
        "/api/v1/rules" => json(StatusCode::OK, &rules(view)),
        _ => text(StatusCode::NOT_FOUND, format!("no such endpoint: {path}\n")),
    };
    response.into()
}

/// The value of `key` in a query string, percent-decoded (`+` is a space); `None` when absent
/// or not valid UTF-8 after decoding.
fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    let raw = query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == key).then_some(v)
    })?;
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b'%' => return None,
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// `/api/v1/series/history`: reads the journal on a blocking thread.
async fn history(view: &View, name: String) -> Response<Full<Bytes>> {
    let reader = view.journal.clone();
    let read = tokio::task::spawn_blocking(move || {
        reader.history(&name, HISTORY_MAX_SCAN, HISTORY_MAX_POINTS)
    })
    .await;
    match read {
        Ok(Ok(history)) => json(StatusCode::OK, &history),
        Ok(Err(e)) => {
            text(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot read the journal: {e}\n"))
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("history task failed: {e}\n")),
    }
}

/// `/api/v1/rules`.
#[derive(Debug, Clone, Serialize)]
pub struct RulesView {
    /// The loaded rules, in configuration order.
    pub rules: Vec<RuleView>,
}

/// One rule in [`RulesView`].
#[derive(Debug, Clone, Serialize)]
pub struct RuleView {
    /// The rule and its state.
    #[serde(flatten)]
    pub state: RuleState,
    /// Alerts it raised since the start.
    pub raised: u64,
    /// Alerts it cleared since the start.
    pub cleared: u64,
}

/// Builds `/api/v1/rules`.
pub fn rules(view: &View) -> RulesView {
    let counts = view.metrics.alerts_by_rule();
    let rules = view
        .readmodel
        .rules()
        .into_iter()
        .map(|state| {
            let (raised, cleared) = counts.get(&state.rule.name).copied().unwrap_or((0, 0));
            RuleView { state, raised, cleared }
        })
        .collect();
    RulesView { rules }
}

/// Whether `header` is `Bearer <token>`; compared in constant time for equal lengths.
fn authorized(header: Option<&HeaderValue>, token: &Secret) -> bool {
    let Some(given) = header.and_then(|h| h.to_str().ok()).and_then(|h| h.strip_prefix("Bearer "))
    else {
        return false;
    };
    let (given, expected) = (given.trim().as_bytes(), token.expose().as_bytes());
    given.len() == expected.len()
        && given.iter().zip(expected).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

fn json(status: StatusCode, value: &impl Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_vec(value) {
        Ok(body) => {
            let mut response = Response::new(Full::new(Bytes::from(body)));
            *response.status_mut() = status;
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode: {e}\n")),
    }
}

/// `/readyz`: every check, and whether all passed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Readiness {
    /// All checks passed.
    pub ready: bool,
    /// Each check.
    pub checks: Vec<Check>,
}

/// One readiness check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    /// What was checked: `source:<name>`, `journal`, `upstream`.
    pub name: String,
    /// Whether it passed.
    pub ok: bool,
    /// Why it failed, or what it found.
    pub reason: String,
}

/// The readiness checks (see the module docs) at wall-clock time `now_ms`.
pub fn readiness(view: &View, now_ms: i64) -> Readiness {
    let metrics = &view.metrics;
    let stall = JOURNAL_STALL.max(view.config.journal.tick_interval * 3);
    let last_commit = metrics::get(&metrics.journal_last_commit_ms) as i64;
    let journal_committing =
        last_commit > 0 && now_ms.saturating_sub(last_commit) <= stall.as_millis() as i64;
    let connected = metrics.connected();
    let stopping = view.stopping.is_cancelled();
    let mut checks = vec![Check {
        name: "agent".into(),
        ok: !stopping,
        reason: if stopping { "shutting down" } else { "running" }.into(),
    }];
    for source in &view.config.sources {
        let name = source.name();
        let ok = matches!(source, SourceConfig::Simulated(_)) || connected.get(name) == Some(&true);
        let reason = if ok { "connected" } else { "not connected" };
        checks.push(Check { name: format!("source:{name}"), ok, reason: reason.into() });
    }
    let flush_failing = metrics::get(&metrics.journal_flush_failing) == 1;
    checks.push(Check {
        name: "journal".into(),
        ok: journal_committing && !flush_failing,
        reason: if flush_failing {
            "the last flush failed (disk full or read-only?); acks wait for a successful one".into()
        } else if journal_committing {
            "committing".into()
        } else {
            format!(
                "no commit for more than {}s: flushes fail or the writer stalls",
                stall.as_secs()
            )
        },
    });
    let (up, failures) =
        (metrics::get(&metrics.upstream_up) == 1, metrics::get(&metrics.upstream_failures));
    let (ok, reason) = match (up, failures) {
        (true, _) => (true, "up".to_string()),
        (false, 0) => (true, "idle: nothing sent yet".to_string()),
        (false, n) => (false, format!("down: the last attempt failed ({n} failures so far)")),
    };
    checks.push(Check { name: "upstream".into(), ok, reason });
    Readiness { ready: checks.iter().all(|c| c.ok), checks }
}

/// `/api/v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// This agent.
    pub agent: AgentStatus,
    /// Each configured source.
    pub sources: Vec<SourceStatus>,
    /// The upstream.
    pub upstream: UpstreamStatus,
    /// The outbox.
    pub buffer: BufferStatus,
    /// Alert counts.
    pub alerts: AlertCounts,
}

/// The agent part of [`Status`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentStatus {
    /// `[agent] id`.
    pub id: String,
    /// The agent's version.
    pub version: String,
    /// Seconds since the API started (with the agent).
    pub uptime_s: u64,
}

/// One source in [`Status`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceStatus {
    /// Configured name.
    pub name: String,
    /// `mqtt`, `serial` or `simulated`.
    pub kind: String,
    /// Whether it is connected.
    pub connected: bool,
    /// Events of this source the processor applied.
    pub events_in: u64,
    /// Rejected inputs of this source, all causes.
    pub rejects: u64,
}

/// The upstream part of [`Status`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpstreamStatus {
    /// `http`, `mqtt` or `file`.
    pub kind: String,
    /// Whether the last attempt succeeded.
    pub up: bool,
    /// Records delivered.
    pub sent_records: u64,
    /// Batches delivered.
    pub sent_batches: u64,
    /// Failed attempts.
    pub failures: u64,
}

/// One outbox lane in [`BufferStatus`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LaneStatus {
    /// Records waiting.
    pub records: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// The outbox part of [`Status`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BufferStatus {
    /// The alerts lane.
    pub alerts: LaneStatus,
    /// The summaries lane.
    pub summaries: LaneStatus,
    /// Bytes waiting, all lanes.
    pub backlog_bytes: u64,
    /// Age of the oldest waiting record; none when empty.
    pub oldest_age_s: Option<u64>,
    /// Estimated seconds to send the backlog; none when nothing was sent lately.
    pub drain_eta_s: Option<u64>,
}

/// Alert counts in [`Status`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AlertCounts {
    /// Raised and not cleared (since the start).
    pub active: usize,
    /// Raised.
    pub raised: u64,
    /// Cleared.
    pub cleared: u64,
}

/// Builds `/api/v1/status`.
pub fn status(view: &View, uptime: Duration) -> Status {
    let (config, metrics) = (&view.config, &view.metrics);
    let connected = metrics.connected();
    let rejected = metrics.rejected();
    let events = view.readmodel.events_by_source();
    let sources = config
        .sources
        .iter()
        .enumerate()
        .map(|(index, source)| {
            let name = source.name();
            let kind = match source {
                SourceConfig::Mqtt(_) => "mqtt",
                SourceConfig::Serial(_) => "serial",
                SourceConfig::Simulated(_) => "simulated",
            };
            SourceStatus {
                name: name.to_string(),
                kind: kind.into(),
                connected: kind == "simulated" || connected.get(name) == Some(&true),
                events_in: u16::try_from(index)
                    .ok()
                    .and_then(|i| events.get(&i))
                    .copied()
                    .unwrap_or(0),
                rejects: rejected.iter().filter(|((s, _), _)| s == name).map(|(_, n)| n).sum(),
            }
        })
        .collect();
    let stats = view.outbox.stats();
    Status {
        agent: AgentStatus {
            id: config.agent.id.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_s: uptime.as_secs(),
        },
        sources,
        upstream: UpstreamStatus {
            kind: upstream_kind(&config.upstream).into(),
            up: metrics::get(&metrics.upstream_up) == 1,
            sent_records: metrics::get(&metrics.upstream_sent_records),
            sent_batches: metrics::get(&metrics.upstream_sent_batches),
            failures: metrics::get(&metrics.upstream_failures),
        },
        buffer: BufferStatus {
            alerts: LaneStatus { records: stats.alerts.records, bytes: stats.alerts.bytes },
            summaries: LaneStatus {
                records: stats.summaries.records,
                bytes: stats.summaries.bytes,
            },
            backlog_bytes: metrics::get(&metrics.backlog_bytes),
            oldest_age_s: metrics.backlog_age_ms(crate::event::now_ms()).map(|ms| ms / 1_000),
            drain_eta_s: metrics.drain_eta_s(Instant::now()),
        },
        alerts: AlertCounts {
            active: view.readmodel.active_alerts(),
            raised: metrics::get(&metrics.alerts_raised),
            cleared: metrics::get(&metrics.alerts_cleared),
        },
    }
}

fn upstream_kind(upstream: &UpstreamConfig) -> &'static str {
    match upstream {
        UpstreamConfig::Http(_) => "http",
        UpstreamConfig::Mqtt(_) => "mqtt",
        UpstreamConfig::File(_) => "file",
    }
}

/// Renders `/metrics` (OpenMetrics text, metric names prefixed `edgewise_`).
pub fn render_metrics(view: &View) -> String {
    let mut registry = Registry::with_prefix("edgewise");
    registry.register_collector(Box::new(ScrapeCollector(view.clone())));
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        // Only a `fmt::Write` into a `String` can fail here, which it does not.
        warn!(error = %e, "cannot render the metrics");
    }
    out
}

/// Reads the counters at scrape time: nothing is counted twice.
#[derive(Debug)]
struct ScrapeCollector(View);

/// Helps write one family after another.
struct Families<'a, 'b>(&'b mut DescriptorEncoder<'a>);

impl Families<'_, '_> {
    fn one(&mut self, name: &str, help: &str, kind: MetricType, value: f64) -> std::fmt::Result {
        let mut metric = self.0.encode_descriptor(name, help, None, kind)?;
        encode_value(&mut metric, kind, value)
    }

    fn histogram(&mut self, name: &str, help: &str, histogram: &Histogram) -> std::fmt::Result {
        let (sum, count, buckets) = histogram.snapshot();
        let mut metric = self.0.encode_descriptor(name, help, None, MetricType::Histogram)?;
        metric.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn labelled(
        &mut self,
        name: &str,
        help: &str,
        kind: MetricType,
        rows: &[(Vec<(&str, &str)>, f64)],
    ) -> std::fmt::Result {
        let mut metric = self.0.encode_descriptor(name, help, None, kind)?;
        for (labels, value) in rows {
            let mut row = metric.encode_family(labels)?;
            encode_value(&mut row, kind, *value)?;
        }
        Ok(())
    }
}

fn encode_value(
    metric: &mut prometheus_client::encoding::MetricEncoder<'_>,
    kind: MetricType,
    value: f64,
) -> std::fmt::Result {
    // Whole numbers (every counter, most gauges) print as integers: `42`, not `42.0`.
    let whole = value.fract() == 0.0 && (0.0..9.0e15).contains(&value);
    match (kind, whole) {
        (MetricType::Counter, true) => {
            metric.encode_counter::<NoLabelSet, _, f64>(&(value as u64), None)
        }
        (MetricType::Counter, false) => metric.encode_counter::<NoLabelSet, _, f64>(&value, None),
        (_, true) => metric.encode_gauge(&(value as i64)),
        (_, false) => metric.encode_gauge(&value),
    }
}

impl Collector for ScrapeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        use MetricType::{Counter, Gauge};
        let view = &self.0;
        let (m, config) = (&*view.metrics, &*view.config);
        let get = |counter: &std::sync::atomic::AtomicU64| metrics::get(counter) as f64;
        let mut f = Families(&mut encoder);

        f.one("events_in", "Events accepted into the journal.", Counter, get(&m.events_in))?;
        let events = view.readmodel.events_by_source();
        let connected = m.connected();
        let names: Vec<&str> = config.sources.iter().map(SourceConfig::name).collect();
        let per_source = |value: &dyn Fn(usize, &str) -> f64| -> Vec<(Vec<(&str, &str)>, f64)> {
            names
                .iter()
                .enumerate()
                .map(|(i, name)| (vec![("source", *name)], value(i, name)))
                .collect()
        };
        let rows = per_source(&|i, _| {
            u16::try_from(i).ok().and_then(|i| events.get(&i)).copied().unwrap_or(0) as f64
        });
        f.labelled(
            "source_events",
            "Events of each source applied by the processor.",
            Counter,
            &rows,
        )?;
        let rows = per_source(&|i, name| {
            let simulated = matches!(config.sources[i], SourceConfig::Simulated(_));
            f64::from(u8::from(simulated || connected.get(name) == Some(&true)))
        });
        f.labelled("source_connected", "1 when the source is connected.", Gauge, &rows)?;
        let rejected = m.rejected();
        let rows: Vec<_> = rejected
            .iter()
            .map(|((source, cause), n)| {
                (vec![("source", source.as_str()), ("cause", *cause)], *n as f64)
            })
            .collect();
        f.labelled("rejects", "Rejected input by source and cause.", Counter, &rows)?;
        let devices = m.devices();
        let rows: Vec<_> = devices
            .iter()
            .map(|(s, c)| (vec![("source", s.as_str())], c.lost_frames as f64))
            .collect();
        f.labelled("lost_frames", "Device frames that never arrived, by source.", Counter, &rows)?;
        let rows: Vec<_> = devices
            .iter()
            .map(|(s, c)| (vec![("source", s.as_str())], c.device_restarts as f64))
            .collect();
        f.labelled("device_restarts", "Device restarts, by source.", Counter, &rows)?;

        f.one(
            "journal_commits",
            "Group commits (fsyncs) of the journal.",
            Counter,
            get(&m.journal_commits),
        )?;
        f.one(
            "journal_flush_failures",
            "Journal flushes that failed (each retry counts).",
            Counter,
            get(&m.journal_flush_failures),
        )?;
        let durable = metrics::get(&m.journal_durable_seq);
        f.one("journal_durable_seq", "Highest durable journal sequence.", Gauge, durable as f64)?;
        let lag = durable.saturating_sub(view.readmodel.position());
        f.one(
            "processor_lag_entries",
            "Journal entries committed but not yet applied.",
            Gauge,
            lag as f64,
        )?;
        f.one(
            "events_processed",
            "Events applied by the processor.",
            Counter,
            get(&m.events_processed),
        )?;
        f.one(
            "store_quarantines",
            "Stores that failed to open and were set aside for a fresh one (reported upstream).",
            Counter,
            get(&m.store_quarantines),
        )?;
        f.one(
            "store_rollbacks",
            "Outbox lanes found behind what upstream acknowledged (the store went back in time).",
            Counter,
            get(&m.store_rollbacks),
        )?;
        f.one(
            "late_events",
            "Events older than their window's allowed lateness.",
            Counter,
            get(&m.late_events),
        )?;
        f.one(
            "future_events",
            "Events stamped too far in the future.",
            Counter,
            get(&m.future_events),
        )?;

        let stats = view.outbox.stats();
        let lanes = [("alerts", &stats.alerts), ("summaries", &stats.summaries)];
        let rows: Vec<_> =
            lanes.iter().map(|(l, s)| (vec![("lane", *l)], s.records as f64)).collect();
        f.labelled("outbox_records", "Records waiting in the outbox, by lane.", Gauge, &rows)?;
        let rows: Vec<_> =
            lanes.iter().map(|(l, s)| (vec![("lane", *l)], s.bytes as f64)).collect();
        f.labelled("outbox_bytes", "Bytes waiting in the outbox, by lane.", Gauge, &rows)?;
        f.one(
            "backlog_bytes",
            "Bytes waiting in the outbox, all lanes.",
            Gauge,
            get(&m.backlog_bytes),
        )?;
        if let Some(age) = m.backlog_age_ms(crate::event::now_ms()) {
            f.one(
                "backlog_oldest_age_seconds",
                "Age of the oldest waiting record.",
                Gauge,
                age as f64 / 1e3,
            )?;
        }
        f.one(
            "outbox_evicted",
            "Records evicted at the byte cap.",
            Counter,
            get(&m.outbox_evicted),
        )?;
        f.one(
            "outbox_expired",
            "Records dropped past their lane's TTL.",
            Counter,
            get(&m.outbox_expired),
        )?;
        f.one(
            "outbox_compacted",
            "Summaries merged away by compaction.",
            Counter,
            get(&m.outbox_compacted_in),
        )?;

        f.one(
            "upstream_sent_records",
            "Records delivered upstream.",
            Counter,
            get(&m.upstream_sent_records),
        )?;
        f.one(
            "upstream_sent_batches",
            "Batches delivered upstream.",
            Counter,
            get(&m.upstream_sent_batches),
        )?;
        f.one(
            "upstream_failures",
            "Failed upstream send attempts.",
            Counter,
            get(&m.upstream_failures),
        )?;
        f.one(
            "upstream_up",
            "1 when the last upstream attempt succeeded.",
            Gauge,
            get(&m.upstream_up),
        )?;

        f.histogram(
            "upstream_send_seconds",
            "Time of upstream send attempts, request to answer.",
            &m.upstream_latency,
        )?;
        f.one("alerts_raised", "Alerts raised.", Counter, get(&m.alerts_raised))?;
        f.one("alerts_cleared", "Alerts cleared.", Counter, get(&m.alerts_cleared))?;
        let by_rule = m.alerts_by_rule();
        let rows: Vec<_> =
            by_rule.iter().map(|(r, (n, _))| (vec![("rule", r.as_str())], *n as f64)).collect();
        f.labelled("rule_alerts_raised", "Alerts raised, by rule.", Counter, &rows)?;
        let rows: Vec<_> =
            by_rule.iter().map(|(r, (_, n))| (vec![("rule", r.as_str())], *n as f64)).collect();
        f.labelled("rule_alerts_cleared", "Alerts cleared, by rule.", Counter, &rows)?;
        f.one(
            "active_alerts",
            "Alerts raised and not cleared since the start.",
            Gauge,
            view.readmodel.active_alerts() as f64,
        )?;

        if let Some(rss) = resident_bytes() {
            f.one("process_resident_memory_bytes", "Resident memory (VmRSS).", Gauge, rss as f64)?;
        }
        Ok(())
    }
}

/// `edgewise status`: the agent's status and active alerts as a compact table.
pub fn format_status(status: &Status, alerts: &crate::readmodel::AlertsView) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let or_dash = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| format!("{v}s"));
    let a = &status.agent;
    let _ = writeln!(out, "agent     {} (edgewise {}), up {}s", a.id, a.version, a.uptime_s);
    let width = status.sources.iter().map(|s| s.name.len()).max().unwrap_or(0).max(6);
    let _ = writeln!(
        out,
        "{:<width$}  {:<9}  {:<9}  {:>10}  {:>7}",
        "SOURCE", "KIND", "CONNECTED", "EVENTS", "REJECTS"
    );
    for s in &status.sources {
        let connected = if s.connected { "yes" } else { "no" };
        let _ = writeln!(
            out,
            "{:<width$}  {:<9}  {:<9}  {:>10}  {:>7}",
            s.name, s.kind, connected, s.events_in, s.rejects
        );
    }
    let u = &status.upstream;
    let state = if u.up {
        "up"
    } else if u.failures == 0 {
        "idle"
    } else {
        "down"
    };
    let _ = writeln!(
        out,
        "upstream  {} {state}: {} records in {} batches sent, {} failures",
        u.kind, u.sent_records, u.sent_batches, u.failures
    );
    let b = &status.buffer;
    let _ = writeln!(
        out,
        "buffer    alerts {} ({} B), summaries {} ({} B); oldest {}, drain eta {}",
        b.alerts.records,
        b.alerts.bytes,
        b.summaries.records,
        b.summaries.bytes,
        or_dash(b.oldest_age_s),
        or_dash(b.drain_eta_s)
    );
    let c = &status.alerts;
    let _ = writeln!(
        out,
        "alerts    {} active ({} raised, {} cleared)",
        alerts.active.len(),
        c.raised,
        c.cleared
    );
    for alert in &alerts.active {
        let _ = writeln!(
            out,
            "  {:<8?}  {}  {}  value {:.2} (threshold {})",
            alert.severity, alert.rule, alert.series, alert.value, alert.threshold
        );
    }
    out
}

/// The process's resident memory from `/proc/self/status` (Linux only; none elsewhere).
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_rss(&status)
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 =
        line.trim_start_matches("VmRSS:").trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    const CONFIG: &str = r#"
        [agent]
        id = "gw-test"
        [[sources]]
        kind = "simulated"
        name = "sim"
        [[sources]]
        kind = "mqtt"
        name = "plant"
        host = "localhost"
        topics = ["site/#"]
        [upstream]
        kind = "file"
        path = "out.jsonl"
    "#;

    fn view(dir: &std::path::Path) -> View {
        let config = crate::config::load_str("test.toml", CONFIG).expect("valid config");
        let metrics = Arc::new(Metrics::default());
        let (store, _) = crate::store::Store::open(dir, 1 << 20).expect("store");
        let outbox =
            Outbox::open(&store, "gw-test", &config.buffer, metrics.clone()).expect("outbox");
        let journal = crate::journal::Journal::open(&store).expect("journal").reader();
        View {
            config: Arc::new(config),
            metrics,
            outbox,
            readmodel: Arc::default(),
            journal,
            stopping: CancellationToken::new(),
        }
    }

    #[test]
    fn query_parameters_are_percent_decoded() {
        assert_eq!(query_param(Some("name=pump-1%2Ftemp"), "name").as_deref(), Some("pump-1/temp"));
        assert_eq!(query_param(Some("a=1&name=x+y"), "name").as_deref(), Some("x y"));
        assert_eq!(query_param(Some("name=%E2%82%AC"), "name").as_deref(), Some("€"));
        assert_eq!(query_param(Some("name=%2"), "name"), None, "a cut escape is refused");
        assert_eq!(query_param(Some("name=%FF"), "name"), None, "not UTF-8");
        assert_eq!(query_param(Some("other=1"), "name"), None);
        assert_eq!(query_param(None, "name"), None);
    }

    #[test]
    fn the_agent_is_not_ready_once_it_starts_shutting_down() {
        let dir = tempfile::tempdir().unwrap();
        let view = view(dir.path());
        let agent_check = |r: &Readiness| r.checks.iter().find(|c| c.name == "agent").cloned();
        let before = readiness(&view, crate::event::now_ms());
        assert!(agent_check(&before).unwrap().ok);
        view.stopping.cancel();
        let after = readiness(&view, crate::event::now_ms());
        assert!(!after.ready);
        assert_eq!(agent_check(&after).unwrap().reason, "shutting down");
    }

    /// `name{labels} value` lines of the rendered text, as (name with labels, value).
    fn samples(text: &str) -> Vec<(String, f64)> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                Some((name.to_string(), value.parse().ok()?))
            })
            .collect()
    }

    fn sample(text: &str, name: &str) -> Option<f64> {
        samples(text).into_iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    #[test]
    fn metrics_render_the_counters_with_their_labels() {
        let dir = tempfile::tempdir().unwrap();
        let view = view(dir.path());
        let m = &view.metrics;
        m.events_in.store(42, Ordering::Relaxed);
        m.reject("plant", "invalid_json");
        m.reject("plant", "invalid_json");
        m.lost_frames("plant", 3);
        m.set_connected("plant", true);
        m.alert_transition("hot", true);
        m.journal_durable_seq.store(10, Ordering::Relaxed);
        m.upstream_latency.observe(Duration::from_millis(30));
        m.upstream_latency.observe(Duration::from_millis(40));
        m.upstream_latency.observe(Duration::from_secs(60));
        let event = crate::event::Event {
            series: "pump-1/temperature".into(),
            ts_ms: 1,
            value: 20.0,
            received_ms: 1,
            source: 0,
        };
        view.readmodel.publish_applied([(7, &crate::event::Entry::Event(event))]);
        let text = render_metrics(&view);
        assert!(text.contains("# TYPE edgewise_events_in counter"), "{text}");
        assert_eq!(sample(&text, "edgewise_events_in_total"), Some(42.0), "{text}");
        assert_eq!(
            sample(&text, r#"edgewise_rejects_total{source="plant",cause="invalid_json"}"#),
            Some(2.0),
            "{text}"
        );
        assert_eq!(sample(&text, r#"edgewise_lost_frames_total{source="plant"}"#), Some(3.0));
        assert_eq!(sample(&text, r#"edgewise_source_connected{source="plant"}"#), Some(1.0));
        assert_eq!(sample(&text, r#"edgewise_source_connected{source="sim"}"#), Some(1.0));
        assert_eq!(sample(&text, r#"edgewise_source_events_total{source="sim"}"#), Some(1.0));
        assert_eq!(sample(&text, r#"edgewise_rule_alerts_raised_total{rule="hot"}"#), Some(1.0));
        assert_eq!(sample(&text, "edgewise_processor_lag_entries"), Some(3.0));
        assert_eq!(sample(&text, r#"edgewise_outbox_records{lane="alerts"}"#), Some(0.0));
        // Cumulative buckets: 30 and 40 ms are at most 0.05 s; 60 s only in +Inf.
        let bucket = |le: &str| {
            sample(&text, &format!("edgewise_upstream_send_seconds_bucket{{le=\"{le}\"}}"))
        };
        assert_eq!(bucket("0.025"), Some(0.0), "{text}");
        assert_eq!(bucket("0.05"), Some(2.0), "{text}");
        assert_eq!(bucket("30.0"), Some(2.0), "{text}");
        assert_eq!(bucket("+Inf"), Some(3.0), "{text}");
        assert_eq!(sample(&text, "edgewise_upstream_send_seconds_count"), Some(3.0));
        assert_eq!(sample(&text, "edgewise_upstream_send_seconds_sum"), Some(60.07));
        assert!(sample(&text, "edgewise_process_resident_memory_bytes").is_some_and(|v| v > 0.0));
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn readiness_names_each_failed_check() {
        let dir = tempfile::tempdir().unwrap();
        let view = view(dir.path());
        let now = 1_800_000_000_000;
        view.metrics.journal_last_commit_ms.store(now as u64 - 500, Ordering::Relaxed);
        let ready = readiness(&view, now);
        assert!(!ready.ready);
        let failed: Vec<_> =
            ready.checks.iter().filter(|c| !c.ok).map(|c| c.name.as_str()).collect();
        assert_eq!(failed, ["source:plant"], "the simulated source is always connected");

        view.metrics.set_connected("plant", true);
        assert!(readiness(&view, now).ready, "idle upstream with no failure is ready");

        view.metrics.upstream_failures.store(2, Ordering::Relaxed);
        // No commit for a minute: the writer stalls.
        let ready = readiness(&view, now + 60_000);
        let failed: Vec<_> =
            ready.checks.iter().filter(|c| !c.ok).map(|c| c.name.as_str()).collect();
        assert_eq!(failed, ["journal", "upstream"]);
        assert!(ready.checks.iter().any(|c| c.reason.contains("2 failures")));

        view.metrics.upstream_up.store(1, Ordering::Relaxed);
        assert!(readiness(&view, now).ready);

        // A failing flush makes the journal unready even while commits were recent.
        view.metrics.journal_flush_failing.store(1, Ordering::Relaxed);
        let ready = readiness(&view, now);
        assert!(!ready.ready);
        let journal = ready.checks.iter().find(|c| c.name == "journal").unwrap();
        assert!(!journal.ok && journal.reason.contains("flush failed"), "{journal:?}");
    }

    #[test]
    fn the_token_must_match_exactly() {
        let token = crate::config::SecretSource::Env("EDGEWISE_API_TEST_TOKEN_UNSET".into());
        assert!(token.resolve().is_err(), "the test needs an unset variable");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "s3cret\n").unwrap();
        let token = crate::config::SecretSource::File(dir.path().join("token")).resolve().unwrap();
        let header = |v: &str| HeaderValue::from_str(v).unwrap();
        assert!(authorized(Some(&header("Bearer s3cret")), &token));
        assert!(!authorized(Some(&header("Bearer s3cre")), &token));
        assert!(!authorized(Some(&header("Bearer s3cret2")), &token));
        assert!(!authorized(Some(&header("Basic s3cret")), &token));
        assert!(!authorized(None, &token));
    }

    #[test]
    fn vm_rss_is_read_in_bytes() {
        assert_eq!(parse_vm_rss("Name:\tx\nVmRSS:\t   1234 kB\nVmSwap: 0 kB\n"), Some(1234 * 1024));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
    }
}
