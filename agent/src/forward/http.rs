//! The HTTP sink: one `POST` per batch, acknowledged by any 2xx.
//!
//! ```text
//! POST <url>
//! Content-Type: application/json | application/x-edgewise-batch   (`format = "json" | "postcard"`)
//! Content-Encoding: zstd | gzip          (absent for `compression = "none"`)
//! Idempotency-Key: <agent>/<lane>/<first_seq>-<last_seq>
//! User-Agent: edgewise/<version>
//!
//! <the Batch as JSON or in the compact binary layout, compressed>
//! ```
//!
//! The body is `sensors::wire`'s, the encoding backends decode with. reqwest only
//! decompresses *responses*, so request bodies are compressed here (zstd level 3, or gzip),
//! off the async threads in `spawn_blocking`. Responses map to
//! [`SendError`]: network errors, timeouts, 408, 429, 5xx (and unexpected 1xx/3xx: redirects
//! are not followed, a moved endpoint is a configuration problem and must not eat batches)
//! are retryable with an optional `Retry-After`; every other 4xx is a rejection that
//! dead-letters the batch. A rejection carries an excerpt of the response body so that the
//! dead-letter reason tells a technician what the receiver disliked.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::header::{CONTENT_ENCODING, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use reqwest::{Response, StatusCode, Url};
use sensors::record::Batch;
use sensors::wire::{self, Format};

use super::{ForwardError, SendError, idempotency_key};
use crate::config::{Compression, HttpUpstreamConfig};
use crate::error_chain;

/// `User-Agent` of every request: lets a receiver tell agent versions apart in its logs.
pub(crate) const USER_AGENT: &str = concat!("edgewise/", env!("CARGO_PKG_VERSION"));

/// Most bytes of an error response kept for logs and the dead-letter reason: enough for a
/// JSON error message, small enough to log; the rest of the body is not read.
const EXCERPT_BYTES: usize = 512;

/// Most bytes of a 2xx body read before the response is dropped. Reading a short body to
/// its end lets the connection go back to the pool; a receiver answering with a huge body
/// costs us a new connection, not memory.
const DRAIN_BYTES: usize = 64 * 1024;

/// POSTs batches to one endpoint.
#[derive(Debug)]
pub(crate) struct HttpSink {
    client: reqwest::Client,
    url: Url,
    compression: Compression,
    /// `format`: JSON or the compact layout.
    format: Format,
}

impl HttpSink {
    /// Builds the client. Refuses a URL that is not `http(s)://` and an agent id that
    /// cannot be part of the `Idempotency-Key` header (control characters): better at start
    /// than a dead-lettered batch each.
    pub(crate) fn new(config: &HttpUpstreamConfig, agent: &str) -> Result<Self, ForwardError> {
        if let Err(e) = HeaderValue::from_str(agent) {
            return Err(ForwardError::AgentId { id: agent.into(), reason: e.to_string() });
        }
        let invalid = |reason: String| ForwardError::InvalidUrl { url: config.url.clone(), reason };
        let url = Url::parse(&config.url).map_err(|e| invalid(e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid(format!("scheme `{}` is not http or https", url.scheme())));
        }
        // reqwest is built with `rustls-no-provider` (ring instead of aws-lc, which needs
        // cmake on 32-bit ARM) and panics without a process-wide provider. Installing twice
        // is an `Err` we can ignore: some provider is installed either way.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .timeout(config.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .default_headers(Self::auth_headers(config)?);
        if url.scheme() == "https" {
            // One TLS setup for both upstreams (`forward::tls`): ring, the CA of
            // `[upstream.tls]` or the system's roots, the client certificate, `server_name`.
            let default = crate::config::TlsConfig::default();
            let tls = super::tls::client_config(config.tls.as_ref().unwrap_or(&default))?;
            builder = builder.tls_backend_preconfigured(tls);
        }
        let client = builder.build().map_err(|source| ForwardError::HttpClient { source })?;
        Ok(Self { client, url, compression: config.compression, format: config.format })
    }

    /// The `Authorization` header of every request (a bearer token, or basic auth), read once at
    /// start and marked sensitive: `Debug` of the header map prints `Sensitive`, never the value.
    /// The secret comes from an environment variable or a file (`config::SecretSource`).
    fn auth_headers(
        config: &HttpUpstreamConfig,
    ) -> Result<reqwest::header::HeaderMap, ForwardError> {
        use base64::Engine as _;
        let setting = |key: &str, reason: String| ForwardError::Setting {
            key: format!("upstream.{key}"),
            reason,
        };
        let resolve = |name: &str, source: &crate::config::SecretSource| {
            let key = match source {
                crate::config::SecretSource::Env(_) => format!("{name}_env"),
                crate::config::SecretSource::File(_) => format!("{name}_file"),
            };
            source.resolve().map_err(|reason| setting(&key, reason))
        };
        let mut headers = reqwest::header::HeaderMap::new();
        let token = config.token_source().map_err(|reason| setting("token_env", reason))?;
        let (key, text) = match (token, &config.basic) {
            (Some(_), Some(_)) => {
                return Err(setting("basic", "set a bearer token or basic auth, not both".into()));
            }
            (Some(source), None) => {
                ("token", format!("Bearer {}", resolve("token", &source)?.expose()))
            }
            (None, Some(basic)) => {
                let source = basic
                    .password_source()
                    .map_err(|reason| setting("basic.password_env", reason))?;
                let password = resolve("basic.password", &source)?;
                let pair = format!("{}:{}", basic.username, password.expose());
                let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
                ("basic", format!("Basic {encoded}"))
            }
            (None, None) => return Ok(headers),
        };
        let mut value = HeaderValue::from_str(&text).map_err(|_| {
            setting(key, "holds characters that cannot be sent in an HTTP header".into())
        })?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
        Ok(headers)
    }

    /// Sends one batch; `Ok` means the receiver acknowledged it with a 2xx.
    pub(crate) async fn send(&self, batch: &Batch) -> Result<(), SendError> {
        let body = encode(batch, self.format, self.compression).await?;
        let key = HeaderValue::from_str(&idempotency_key(batch)).map_err(|e| {
            SendError::Unencodable { reason: format!("idempotency key is not a header value: {e}") }
        })?;
        let mut request = self
            .client
            .post(self.url.clone())
            .header(CONTENT_TYPE, self.format.content_type())
            .header("idempotency-key", key);
        if let Some(encoding) = content_encoding(self.compression) {
            request = request.header(CONTENT_ENCODING, encoding);
        }
        let response = request
            .body(body)
            .send()
            .await
            .map_err(|e| SendError::Retryable { reason: explained(&e), retry_after: None })?;
        classify(response).await
    }
}

/// The wire compression of a `compression` setting.
fn wire_compression(compression: Compression) -> wire::Compression {
    match compression {
        Compression::Zstd => wire::Compression::Zstd,
        Compression::Gzip => wire::Compression::Gzip,
        Compression::None => wire::Compression::None,
    }
}

/// The `Content-Encoding` for a compression setting; `None` sends no header.
fn content_encoding(compression: Compression) -> Option<&'static str> {
    match wire_compression(compression) {
        wire::Compression::None => None,
        other => Some(other.content_encoding()),
    }
}

/// Serialises a batch in `format` (`sensors::wire::encode`) and compresses it.
async fn encode(
    batch: &Batch,
    format: Format,
    compression: Compression,
) -> Result<Vec<u8>, SendError> {
    let plain = wire::encode(batch, format, wire::Compression::None)
        .map_err(|e| SendError::Unencodable { reason: error_chain(&e) })?;
    let compression = wire_compression(compression);
    if compression == wire::Compression::None {
        return Ok(plain);
    }
    // A full batch is 256 KiB by default; gzip at ~25 MB/s on x86 (slower on a Pi) would hold
    // an async worker thread for tens of ms, so compression runs on the blocking pool.
    tokio::task::spawn_blocking(move || wire::compress(&plain, compression))
        .await
        .map_err(|e| SendError::Retryable {
            reason: format!("compression task: {e}"),
            retry_after: None,
        })?
        // Compressing into memory fails only when memory runs out: not the batch's fault,
        // so retry rather than dead-letter.
        .map_err(|e| SendError::Retryable { reason: error_chain(&e), retry_after: None })
}

/// Maps a response to acknowledged, retryable or rejected.
async fn classify(mut response: Response) -> Result<(), SendError> {
    let status = response.status();
    if status.is_success() {
        read_excerpt(&mut response, DRAIN_BYTES).await;
        return Ok(());
    }
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| parse_retry_after(value, SystemTime::now()));
    let body = read_excerpt(&mut response, EXCERPT_BYTES).await;
    if is_retryable_status(status) {
        let reason = if body.is_empty() {
            format!("HTTP {status}")
        } else {
            format!("HTTP {status}: {body}")
        };
        Err(SendError::Retryable { reason, retry_after })
    } else {
        Err(SendError::Rejected { status: status.as_u16(), body })
    }
}

/// Whether a non-2xx status is worth retrying: 408, 429 and 5xx say "not now". 401, 403 and
/// 404 say "not here, not with these credentials": an expired token or a wrong path is fixed
/// by a technician while the batches wait; dead-lettering would move every batch of the
/// outage aside. Every other 4xx says "never" (the batch itself is refused). 1xx/3xx never
/// reach us from a sane receiver (redirects are off): they mean a misconfigured URL too.
pub(crate) fn is_retryable_status(status: StatusCode) -> bool {
    !status.is_client_error()
        || matches!(
            status,
            StatusCode::REQUEST_TIMEOUT
                | StatusCode::TOO_MANY_REQUESTS
                | StatusCode::UNAUTHORIZED
                | StatusCode::FORBIDDEN
                | StatusCode::NOT_FOUND
        )
}

/// Reads up to `limit` bytes of the body as (lossy) UTF-8, trimmed; errors end the read,
/// since the excerpt only decorates a status we already have.
async fn read_excerpt(response: &mut Response, limit: usize) -> String {
    let mut bytes = Vec::new();
    while bytes.len() < limit {
        match response.chunk().await {
            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    bytes.truncate(limit);
    String::from_utf8_lossy(&bytes).trim().to_string()
}

/// `Retry-After` as a delay from `now`: delta-seconds (`120`) or an IMF-fixdate
/// (`Wed, 21 Oct 2015 07:28:00 GMT`); a date in the past is zero. `None` for anything else
/// (the obsolete RFC 850 and asctime date forms included): the caller falls back to its
/// own backoff, which is always safe.
pub(crate) fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // More digits than a u64 holds is "very long"; the caller caps it at `retry_max`.
        return Some(value.parse().map(Duration::from_secs).unwrap_or(Duration::MAX));
    }
    let at = parse_imf_fixdate(value)?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Parses `Sun, 06 Nov 1994 08:49:37 GMT` (RFC 9110 §5.6.7, the form senders must use).
fn parse_imf_fixdate(value: &str) -> Option<SystemTime> {
    const MONTHS: [&str; 12] =
        ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let parts: Vec<&str> = value.split_ascii_whitespace().collect();
    let [weekday, day, month, year, time, "GMT"] = parts.as_slice() else {
        return None;
    };
    if !weekday.ends_with(',') || day.len() != 2 || year.len() != 4 {
        return None;
    }
    let number = |text: &str| -> Option<u64> {
        text.bytes().all(|b| b.is_ascii_digit()).then(|| text.parse().ok()).flatten()
    };
    let day = number(day).filter(|d| (1..=31).contains(d))?;
    let month = MONTHS.iter().position(|m| m == month)? as u64 + 1;
    let year = number(year).filter(|y| *y >= 1970)?;
    let [hour, minute, second] = time.split(':').collect::<Vec<_>>()[..] else {
        return None;
    };
    let (hour, minute, second) = (number(hour)?, number(minute)?, number(second)?);
    if hour > 23 || minute > 59 || second > 60 || time.len() != 8 {
        return None;
    }
    let days = crate::source::payload::days_from_civil(year as i64, month as i64, day as i64);
    let seconds = u64::try_from(days).ok()? * 86_400 + hour * 3600 + minute * 60 + second;
    UNIX_EPOCH.checked_add(Duration::from_secs(seconds))
}

/// [`error_chain`] (reqwest's own message, "error sending request", hides the cause) plus a hint for the TLS failures a configuration causes (an unknown CA, a
/// missing client certificate, a name mismatch), so the log says which key to fix.
fn explained(error: &dyn std::error::Error) -> String {
    let text = error_chain(error);
    match super::tls::explain(&text) {
        Some(hint) => format!("{text} ({hint})"),
        None => text,
    }
}

/// An in-test HTTP receiver (axum on `127.0.0.1:0`): records every request with its
/// decoded batch and answers from a script ("503 twice, then 200"), 200 when the script is
/// empty. Shared by the sink tests here and the forwarder tests in `forward`.
#[cfg(test)]
pub(crate) mod receiver {
    use std::collections::VecDeque;
    use std::io::Read as _;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use axum::body::Bytes;
    use axum::extract::State;
    use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
    use axum::response::{IntoResponse, Response};
    use sensors::record::Batch;

    /// One scripted answer.
    #[derive(Debug, Clone)]
    pub(crate) struct Reply {
        pub(crate) status: u16,
        pub(crate) headers: Vec<(&'static str, String)>,
        pub(crate) body: String,
    }

    impl Reply {
        pub(crate) fn status(status: u16) -> Self {
            Self { status, headers: Vec::new(), body: String::new() }
        }
        pub(crate) fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
            self.headers.push((name, value.into()));
            self
        }
        pub(crate) fn body(mut self, body: impl Into<String>) -> Self {
            self.body = body.into();
            self
        }
    }

    /// One request as the receiver saw it.
    #[derive(Debug, Clone)]
    pub(crate) struct Received {
        pub(crate) headers: HeaderMap,
        /// The body after undoing `Content-Encoding`.
        pub(crate) json: Vec<u8>,
        pub(crate) batch: Batch,
        /// The status the receiver answered with.
        pub(crate) status: u16,
        /// When the request arrived.
        pub(crate) at: std::time::Instant,
    }

    #[derive(Debug)]
    struct Shared {
        script: Mutex<VecDeque<Reply>>,
        received: Mutex<Vec<Received>>,
        count: tokio::sync::watch::Sender<usize>,
    }

    /// A running receiver; stops when dropped.
    #[derive(Debug)]
    pub(crate) struct Receiver {
        pub(crate) url: String,
        shared: Arc<Shared>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for Receiver {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl Receiver {
        pub(crate) async fn start() -> Receiver {
            let shared = Arc::new(Shared {
                script: Mutex::new(VecDeque::new()),
                received: Mutex::new(Vec::new()),
                count: tokio::sync::watch::channel(0).0,
            });
            let app = axum::Router::new()
                .route("/ingest", axum::routing::post(handle))
                .with_state(shared.clone());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}/ingest", listener.local_addr().unwrap());
            let task = tokio::spawn(async move {
                axum::serve(listener, app).await.unwrap();
            });
            Receiver { url, shared, task }
        }

        /// Queues answers for the next requests.
        pub(crate) fn script(&self, replies: impl IntoIterator<Item = Reply>) {
            self.shared.script.lock().unwrap().extend(replies);
        }

        pub(crate) fn received(&self) -> Vec<Received> {
            self.shared.received.lock().unwrap().clone()
        }

        /// Waits until `n` requests arrived; panics after a deadline.
        pub(crate) async fn wait_for(&self, n: usize) -> Vec<Received> {
            let mut count = self.shared.count.subscribe();
            tokio::time::timeout(Duration::from_secs(10), count.wait_for(|c| *c >= n))
                .await
                .unwrap_or_else(|_| panic!("{n} requests within 10 s; got {:?}", self.received()))
                .unwrap();
            self.received()
        }

        /// Record ids of every batch the receiver acknowledged, in arrival order.
        pub(crate) fn acknowledged_ids(&self) -> Vec<String> {
            self.received()
                .iter()
                .filter(|r| (200..300).contains(&r.status))
                .flat_map(|r| r.batch.records.iter().map(|rec| rec.id.clone()))
                .collect()
        }
    }

    pub(crate) fn decode(headers: &HeaderMap, body: &[u8]) -> Vec<u8> {
        match headers.get("content-encoding").map(|v| v.to_str().unwrap()) {
            None => body.to_vec(),
            Some("zstd") => zstd::decode_all(body).unwrap(),
            Some("gzip") => {
                let mut out = Vec::new();
                flate2::read::GzDecoder::new(body).read_to_end(&mut out).unwrap();
                out
            }
            Some(other) => panic!("unexpected Content-Encoding {other}"),
        }
    }

    async fn handle(
        State(shared): State<Arc<Shared>>,
        headers: HeaderMap,
        body: Bytes,
    ) -> Response {
        let at = std::time::Instant::now();
        let json = decode(&headers, &body);
        // Either format, by its Content-Type; the wire decoder also verifies ids and seqs.
        let content_type =
            headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
        let batch: Batch = sensors::wire::decode(&json, content_type, None).unwrap();
        let reply = shared.script.lock().unwrap().pop_front().unwrap_or(Reply::status(200));
        shared.received.lock().unwrap().push(Received {
            headers,
            json,
            batch,
            status: reply.status,
            at,
        });
        shared.count.send_modify(|c| *c += 1);
        let mut response =
            (StatusCode::from_u16(reply.status).unwrap(), reply.body).into_response();
        for (name, value) in reply.headers {
            response
                .headers_mut()
                .insert(HeaderName::from_static(name), HeaderValue::from_str(&value).unwrap());
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::receiver::{Receiver, Reply};
    use super::*;
    use crate::forward::tests::{AGENT, batch_of, http_config};
    use sensors::record::Lane;

    #[tokio::test]
    async fn a_2xx_acknowledges_the_batch() {
        let receiver = Receiver::start().await;
        receiver.script([Reply::status(204)]);
        let sink = HttpSink::new(&http_config(&receiver.url, Compression::Zstd), AGENT).unwrap();
        let batch = batch_of(Lane::Alerts, 1..=3);
        sink.send(&batch).await.unwrap();
        let received = receiver.wait_for(1).await;
        assert_eq!(received[0].batch, batch);
    }

    #[tokio::test]
    async fn requests_carry_the_wire_format_headers() {
        let receiver = Receiver::start().await;
        let sink = HttpSink::new(&http_config(&receiver.url, Compression::Zstd), AGENT).unwrap();
        sink.send(&batch_of(Lane::Summaries, 7..=9)).await.unwrap();
        let headers = &receiver.wait_for(1).await[0].headers;
        assert_eq!(headers["idempotency-key"], "gw-test/summaries/7-9");
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(headers["content-encoding"], "zstd");
        assert_eq!(headers["user-agent"], USER_AGENT);
        assert!(USER_AGENT.starts_with("edgewise/"));
    }

    #[tokio::test]
    async fn zstd_gzip_and_plain_bodies_decode_to_the_same_json() {
        let receiver = Receiver::start().await;
        let batch = batch_of(Lane::Summaries, 1..=50);
        for compression in [Compression::Zstd, Compression::Gzip, Compression::None] {
            let sink = HttpSink::new(&http_config(&receiver.url, compression), AGENT).unwrap();
            sink.send(&batch).await.unwrap();
        }
        let received = receiver.wait_for(3).await;
        let encodings: Vec<Option<&str>> = received
            .iter()
            .map(|r| r.headers.get("content-encoding").map(|v| v.to_str().unwrap()))
            .collect();
        assert_eq!(encodings, [Some("zstd"), Some("gzip"), None]);
        let plain = serde_json::to_vec(&batch).unwrap();
        for r in &received {
            assert_eq!(r.json, plain);
        }
    }

    #[tokio::test]
    async fn postcard_batches_arrive_decodable_under_their_content_type() {
        let receiver = Receiver::start().await;
        let batch = batch_of(Lane::Summaries, 1..=50);
        for compression in [Compression::Zstd, Compression::Gzip, Compression::None] {
            let mut config = http_config(&receiver.url, compression);
            config.format = Format::Postcard;
            HttpSink::new(&config, AGENT).unwrap().send(&batch).await.unwrap();
        }
        let json = serde_json::to_vec(&batch).unwrap();
        for r in receiver.wait_for(3).await {
            assert_eq!(r.headers["content-type"], "application/x-edgewise-batch");
            // The receiver decoded (and verified) it with `sensors::wire::decode`.
            assert_eq!(r.batch, batch);
            assert!(r.json.len() * 4 < json.len(), "{} vs JSON {}", r.json.len(), json.len());
        }
    }

    #[tokio::test]
    async fn server_errors_timeouts_and_throttling_are_retryable() {
        let receiver = Receiver::start().await;
        receiver.script([
            Reply::status(503).body("maintenance"),
            Reply::status(408),
            Reply::status(429).header("retry-after", "7"),
        ]);
        let sink = HttpSink::new(&http_config(&receiver.url, Compression::None), AGENT).unwrap();
        let batch = batch_of(Lane::Alerts, 1..=1);
        let mut errors = Vec::new();
        for _ in 0..3 {
            errors.push(sink.send(&batch).await.unwrap_err());
        }
        assert!(errors.iter().all(SendError::is_retryable), "{errors:?}");
        assert!(errors[0].to_string().contains("503"), "{}", errors[0]);
        assert!(errors[0].to_string().contains("maintenance"), "{}", errors[0]);
        assert!(matches!(
            errors[2],
            SendError::Retryable { retry_after: Some(d), .. } if d == Duration::from_secs(7)
        ));
    }

    #[tokio::test]
    async fn other_client_errors_reject_the_batch_with_a_body_excerpt() {
        let receiver = Receiver::start().await;
        receiver.script([Reply::status(400).body(format!("bad field {}", "x".repeat(2000)))]);
        let sink = HttpSink::new(&http_config(&receiver.url, Compression::Gzip), AGENT).unwrap();
        let error = sink.send(&batch_of(Lane::Alerts, 1..=1)).await.unwrap_err();
        let SendError::Rejected { status, body } = &error else {
            panic!("expected a rejection, got {error:?}");
        };
        assert_eq!(*status, 400);
        assert!(body.starts_with("bad field x"), "{body}");
        assert_eq!(body.len(), EXCERPT_BYTES);
        assert!(!error.is_retryable());
    }

    #[tokio::test]
    async fn an_unreachable_receiver_is_retryable_and_names_the_cause() {
        // Bind and drop a listener: its port is free and refuses connections.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let url = format!("http://127.0.0.1:{port}/ingest");
        let sink = HttpSink::new(&http_config(&url, Compression::Zstd), AGENT).unwrap();
        let error = sink.send(&batch_of(Lane::Alerts, 1..=1)).await.unwrap_err();
        assert!(error.is_retryable(), "{error:?}");
        assert!(error.to_string().to_lowercase().contains("refused"), "{error}");
    }

    #[test]
    fn an_agent_id_that_cannot_be_a_header_is_refused_at_start() {
        let config = http_config("http://127.0.0.1:1/", Compression::Zstd);
        let error = HttpSink::new(&config, "gw\n1").unwrap_err();
        assert!(matches!(error, ForwardError::AgentId { .. }), "{error:?}");
        assert!(HttpSink::new(&config, "Gerät-1").is_ok(), "non-ASCII UTF-8 is fine");
    }

    #[test]
    fn status_classes_follow_the_wire_contract() {
        let retryable = |code| is_retryable_status(StatusCode::from_u16(code).unwrap());
        for code in [500, 502, 503, 504, 408, 429, 401, 403, 404, 301, 307] {
            assert!(retryable(code), "{code}");
        }
        for code in [400, 409, 413, 415, 422] {
            assert!(!retryable(code), "{code}");
        }
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = UNIX_EPOCH + Duration::from_secs(1_445_412_480); // Wed, 21 Oct 2015 07:28:00 GMT
        assert_eq!(parse_retry_after(" 120 ", now), Some(Duration::from_secs(120)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:29:30 GMT", now),
            Some(Duration::from_secs(90))
        );
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("99999999999999999999999", now), Some(Duration::MAX));
        for junk in [
            "",
            "soon",
            "-5",
            "1.5",
            "Wednesday, 21-Oct-15 07:28:00 GMT",
            "Wed, 21 Oct 2015 25:00:00 GMT",
        ] {
            assert_eq!(parse_retry_after(junk, now), None, "{junk}");
        }
    }

    #[test]
    fn http_dates_match_known_epoch_seconds() {
        let secs = |s| parse_imf_fixdate(s).unwrap().duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(secs("Thu, 01 Jan 1970 00:00:00 GMT"), 0);
        assert_eq!(secs("Sun, 06 Nov 1994 08:49:37 GMT"), 784_111_777);
        assert_eq!(secs("Tue, 29 Feb 2028 12:00:00 GMT"), 1_835_438_400);
    }
}

/// `Authorization` from `token_*` and `basic`, and TLS with our own client configuration.
#[cfg(test)]
mod auth_tests {
    use super::receiver::Receiver;
    use super::*;
    use crate::config::BasicAuthConfig;
    use crate::forward::tests::{AGENT, batch_of, http_config};
    use sensors::record::Lane;

    fn secret_file(dir: &tempfile::TempDir, text: &str) -> std::path::PathBuf {
        let path = dir.path().join("secret");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[tokio::test]
    async fn a_bearer_token_from_a_file_goes_with_every_request_and_not_into_debug() {
        let receiver = Receiver::start().await;
        let dir = tempfile::tempdir().unwrap();
        let mut config = http_config(&receiver.url, Compression::None);
        config.token_file = Some(secret_file(&dir, "t0ken.value\n"));
        let sink = HttpSink::new(&config, AGENT).unwrap();
        sink.send(&batch_of(Lane::Alerts, 1..=1)).await.unwrap();
        sink.send(&batch_of(Lane::Alerts, 2..=2)).await.unwrap();
        for request in receiver.wait_for(2).await {
            assert_eq!(request.headers["authorization"], "Bearer t0ken.value");
        }
        assert!(!format!("{sink:?}").contains("t0ken"), "{sink:?}");
    }

    #[tokio::test]
    async fn basic_auth_sends_the_user_and_the_password_from_its_file() {
        let receiver = Receiver::start().await;
        let dir = tempfile::tempdir().unwrap();
        let mut config = http_config(&receiver.url, Compression::None);
        config.basic = Some(BasicAuthConfig {
            username: "gw-1".into(),
            password_env: None,
            password_file: Some(secret_file(&dir, "open sesame")),
        });
        let sink = HttpSink::new(&config, AGENT).unwrap();
        sink.send(&batch_of(Lane::Alerts, 1..=1)).await.unwrap();
        // base64("gw-1:open sesame")
        assert_eq!(
            receiver.wait_for(1).await[0].headers["authorization"],
            "Basic Z3ctMTpvcGVuIHNlc2FtZQ=="
        );
    }

    #[test]
    fn a_token_that_cannot_be_read_is_refused_at_start_naming_the_key() {
        let mut config = http_config("http://127.0.0.1:1/", Compression::None);
        config.token_file = Some("/nonexistent/edgewise-token".into());
        let Err(ForwardError::Setting { key, reason }) = HttpSink::new(&config, AGENT) else {
            panic!("expected a setting error");
        };
        assert_eq!(key, "upstream.token_file");
        assert!(reason.contains("/nonexistent/edgewise-token"), "{reason}");
    }

    #[test]
    fn an_https_url_with_an_unusable_ca_file_is_refused_at_start() {
        let mut config = http_config("https://127.0.0.1:1/", Compression::None);
        config.tls = Some(crate::config::TlsConfig {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        });
        let error = HttpSink::new(&config, AGENT).unwrap_err();
        assert!(matches!(error, ForwardError::Tls(_)), "{error:?}");
    }
}
