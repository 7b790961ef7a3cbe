//! The MQTT sink (`[upstream] kind = "mqtt"`): each batch is one QoS 1 PUBLISH on
//! `<topic template>` (default `edgewise/{agent}/{lane}`), and it leaves the outbox only after
//! the broker's PUBACK for it.
//!
//! # Two tasks, one connection
//!
//! The upstream has a rumqttc connection of its own (client id `edgewise-<agent>-up`), never
//! the ingest source's. rumqttc's event loop must be polled by one task that never awaits a
//! client call (dependency notes §1.2: buffered events starve the request channel), so:
//!
//! ```text
//!  forwarder task                     shared (one Mutex)               poller task
//!  ──────────────                     ──────────────────               ───────────
//!  send(batch):                                                        loop { eventloop.poll() }
//!    wait until the link is up  ◀──── link: Connecting | Up | Down ◀── ConnAck / errors
//!    lock: try_publish(QoS 1)   ────▶ inflight: deadline, pkid ◀────── Outgoing::Publish(pkid)
//!          + register inflight                      │          ◀────── Incoming::PubAck(pkid)
//!    await the reply            ◀──── Ok / Err ─────┘                  (or error, or deadline)
//! ```
//!
//! # PUBACK tracking (stop-and-wait)
//!
//! One batch is in flight at a time, as the forwarder sends one at a time. The poller maps
//! `Outgoing::Publish(pkid)` (rumqttc's event once the PUBLISH is written) to the in-flight
//! batch and answers it when `Incoming::PubAck` carries that pkid. Any other PUBACK is ignored.
//!
//! The mapping is only sound if the one publish rumqttc can write is the in-flight batch's.
//! Three rules make it so:
//!
//! 1. **Publish only while up, under the lock.** `send` checks the link and calls
//!    `try_publish` while holding the lock that the poller holds to tear a connection down,
//!    so a request is never queued after the tear-down that should have dropped it.
//! 2. **Every abandoned publish dies with its connection.** A connection error, or a batch
//!    whose PUBACK does not come within `timeout`, makes the poller (under the lock) fail the
//!    batch and call `EventLoop::clean()`, which drops the socket and moves everything still
//!    queued in rumqttc into its `pending` list, and rumqttc empties `pending` on the next
//!    CONNACK because the broker has no session for us (`session_present == false`). The
//!    poller also drops events rumqttc buffered from the old connection.
//! 3. **The retry comes from the outbox.** A failed batch is a retryable [`SendError`]: the
//!    forwarder backs off, peeks the outbox again and publishes again. So after any reconnect
//!    the in-flight batch is resent from the outbox, never from rumqttc's memory.
//!
//! # Why `clean_session = true`
//!
//! The outbox is the queue. A persistent session would give the broker and rumqttc a second
//! copy of the in-flight publish that rumqttc resends on its own after a reconnect, with a
//! pkid the poller cannot tell from a fresh publish, and that copy may differ from what the
//! outbox now holds (the outbox may have evicted records into a gap meanwhile). A clean
//! session makes every connection start empty, and nothing is lost by it: an unacknowledged
//! batch is still in the outbox and is sent again (receivers deduplicate by record id). The
//! broker also keeps no session state for a client that never subscribes.
//!
//! # Reconnects
//!
//! After every connection error the poller sleeps a capped, jittered [`Backoff`]
//! (`retry_initial` to `retry_max`; rumqttc itself would reconnect at once, in a hot loop).
//! While the link is down `send` fails at once with the last connection error, so the
//! forwarder logs "upstream is down" with the cause (an unknown CA, a missing client
//! certificate, refused credentials) and backs off with the same settings. The poller logs
//! each change of the link once (warn when lost or unreachable, info when up).
//!
//! # Body
//!
//! The same bytes as the HTTP sink's body: `sensors::wire::encode` in the configured `format`
//! (JSON or the compact layout) and `compression` (zstd by default, compressed on the blocking
//! pool). MQTT 3.1.1 has no headers to name them; the bytes do (compression magic, then `{`
//! for JSON), and `sensors::wire::decode_sniffed` reads them.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Outgoing,
    Packet, QoS, TlsConfiguration, Transport,
};
use sensors::record::{Batch, Lane};
use sensors::wire::{self, Compression as WireCompression, Format};
use tokio::sync::{Notify, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{ForwardError, SendError, tls};
use crate::config::{Compression, MqttUpstreamConfig, SecretSource, TlsConfig};
use crate::source::backoff::Backoff;

/// Capacity of rumqttc's request channel: one publish in flight plus the DISCONNECT at
/// shutdown; a few more slots cost nothing and are never used.
const REQUEST_CHANNEL_CAPACITY: usize = 4;

/// Largest packet accepted from the broker: we subscribe to nothing, so only acks, pings
/// and the CONNACK arrive.
const MAX_INCOMING_PACKET: usize = 16 * 1024;

/// The JSON body of a batch is about 2-3× the outbox bytes its records take (postcard);
/// 8× leaves room for short records whose JSON keys dominate.
const JSON_EXPANSION: u64 = 8;

/// Floor of the outgoing packet limit derived from `batch.max_bytes`: small batch limits
/// must never refuse a batch of a few large records.
const MIN_OUTGOING_PACKET: u64 = 1024 * 1024;

/// Ceiling of the outgoing packet limit: MQTT's own (a 4-byte remaining length, 256 MiB - 1).
const MAX_OUTGOING_PACKET: u64 = 268_435_455;

/// How long shutdown waits for our DISCONNECT to be written.
const DISCONNECT_GRACE: Duration = Duration::from_secs(1);

/// A parsed topic template: literal text with `{agent}` and `{lane}` placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TopicTemplate {
    parts: Vec<TopicPart>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TopicPart {
    Text(String),
    Agent,
    Lane,
}

impl TopicTemplate {
    /// Parses a template; refuses wildcards (a PUBLISH topic cannot hold `+` or `#`),
    /// unknown placeholders and unbalanced braces.
    pub(crate) fn parse(template: &str) -> Result<TopicTemplate, String> {
        if template.is_empty() {
            return Err("the topic is empty".into());
        }
        if template.contains(['+', '#']) {
            return Err("`+` and `#` are wildcards for subscribers; a topic to publish to \
                        cannot hold them"
                .into());
        }
        if template.contains('\0') {
            return Err("the topic holds a NUL character".into());
        }
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find(['{', '}']) {
            if rest[open..].starts_with('}') {
                return Err("a `}` without its `{`".into());
            }
            let Some(close) = rest[open..].find('}').map(|c| open + c) else {
                return Err("a `{` without its `}`".into());
            };
            if open > 0 {
                parts.push(TopicPart::Text(rest[..open].to_string()));
            }
            parts.push(match &rest[open + 1..close] {
                "agent" => TopicPart::Agent,
                "lane" => TopicPart::Lane,
                other => {
                    return Err(format!(
                        "unknown placeholder `{{{other}}}`; use {{agent}} and {{lane}}"
                    ));
                }
            });
            rest = &rest[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(TopicPart::Text(rest.to_string()));
        }
        Ok(TopicTemplate { parts })
    }

    /// The topic of `agent`'s batches on `lane`.
    pub(crate) fn render(&self, agent: &str, lane: Lane) -> String {
        self.parts
            .iter()
            .map(|part| match part {
                TopicPart::Text(text) => text.as_str(),
                TopicPart::Agent => agent,
                TopicPart::Lane => lane.as_str(),
            })
            .collect()
    }
}

/// Where the connection stands, as `send` needs to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Link {
    /// No connection attempt has finished yet.
    Connecting,
    /// Connected (CONNACK received).
    Up,
    /// Lost or unreachable; the poller is backing off. Holds the cause, for `send`'s error.
    Down(String),
}

/// The batch waiting for its PUBACK.
#[derive(Debug)]
struct Inflight {
    /// When the poller gives up on it and tears the connection down.
    deadline: Instant,
    /// Set by `Outgoing::Publish(pkid)` once rumqttc wrote it.
    pkid: Option<u16>,
    /// `Ok` on the PUBACK; `Err(reason)` when the connection failed or the deadline passed.
    reply: oneshot::Sender<Result<(), String>>,
}

/// State shared by the forwarder task (in `send`) and the poller task.
#[derive(Debug)]
struct Shared {
    /// The in-flight batch; its lock also orders publishes against tear-downs (rule 1 of the
    /// module docs). Held only for non-blocking work, never across an `.await`.
    inflight: Mutex<Option<Inflight>>,
    /// Wakes the poller when a batch was registered, so that it arms the deadline.
    registered: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Option<Inflight>> {
        // A panic while holding the lock leaves a consistent `Option`: keep going.
        self.inflight.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Publishes batches to an MQTT broker; see the module docs.
pub(crate) struct MqttSink {
    client: AsyncClient,
    shared: Arc<Shared>,
    link: watch::Receiver<Link>,
    topic: TopicTemplate,
    format: Format,
    compression: WireCompression,
    /// `host:port`, for messages.
    broker: String,
    timeout: Duration,
    max_payload: usize,
    /// Stops the poller when the sink is dropped.
    _stop: DropGuard,
}

impl std::fmt::Debug for MqttSink {
    // By hand: `MqttOptions`' Debug would show the password; the sink shows none of it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttSink")
            .field("broker", &self.broker)
            .field("topic", &self.topic)
            .field("link", &*self.link.borrow())
            .finish_non_exhaustive()
    }
}

impl MqttSink {
    /// Checks the settings, reads the password and the TLS files, and starts the poller task
    /// (which connects in the background). Must be called inside a tokio runtime.
    pub(crate) fn new(config: &MqttUpstreamConfig, agent: &str) -> Result<Self, ForwardError> {
        let Prepared { options, topic, max_payload } = prepare(config, agent)?;
        let client_id = options.client_id();
        let (client, mut eventloop) = AsyncClient::new(options, REQUEST_CHANNEL_CAPACITY);
        let mut network = rumqttc::NetworkOptions::new();
        network.set_connection_timeout(config.timeout.as_secs().max(1));
        eventloop.set_network_options(network);

        let broker = format!("{}:{}", config.host, config.port());
        let shared = Arc::new(Shared { inflight: Mutex::new(None), registered: Notify::new() });
        let (link_tx, link) = watch::channel(Link::Connecting);
        let stop = CancellationToken::new();
        tracing::info!(
            broker = %broker,
            client_id = %client_id,
            tls = config.tls.is_some(),
            topic = %config.topic,
            "MQTT upstream started"
        );
        let poller = Poller {
            eventloop,
            client: client.clone(),
            shared: shared.clone(),
            link: link_tx,
            backoff: Backoff::new(config.retry_initial, config.retry_max),
            broker: broker.clone(),
            failures: 0,
        };
        tokio::spawn(poller.run(stop.clone()));
        Ok(Self {
            client,
            shared,
            link,
            topic,
            format: config.format,
            compression: match config.compression {
                Compression::Zstd => WireCompression::Zstd,
                Compression::Gzip => WireCompression::Gzip,
                Compression::None => WireCompression::None,
            },
            broker,
            timeout: config.timeout,
            max_payload,
            _stop: stop.drop_guard(),
        })
    }

    /// Publishes one batch; `Ok` means the broker acknowledged it with a PUBACK.
    pub(crate) async fn send(&self, batch: &Batch) -> Result<(), SendError> {
        let body = self.encode(batch).await?;
        if body.len() > self.max_payload {
            return Err(SendError::Unencodable {
                reason: format!(
                    "the batch is {} bytes, more than the {} bytes an MQTT packet may hold here",
                    body.len(),
                    self.max_payload
                ),
            });
        }
        let topic = self.topic.render(&batch.agent, batch.lane);
        let deadline = Instant::now() + self.timeout;
        self.wait_for_link(deadline).await?;
        let (reply_tx, reply) = oneshot::channel();
        {
            let mut inflight = self.shared.lock();
            if let Link::Down(cause) = &*self.link.borrow() {
                return Err(self.down(cause));
            }
            if inflight.is_some() {
                // Only if an earlier `send` was dropped mid-wait; the poller ends that batch
                // at its deadline.
                return Err(retryable("the previous batch is still waiting for its PUBACK"));
            }
            self.client
                .try_publish(topic, QoS::AtLeastOnce, false, body)
                .map_err(|e| retryable(format!("cannot queue the PUBLISH: {e}")))?;
            *inflight = Some(Inflight { deadline, pkid: None, reply: reply_tx });
        }
        self.shared.registered.notify_one();
        match reply.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(retryable(reason)),
            Err(_) => Err(retryable("the MQTT connection task stopped")),
        }
    }

    /// The batch in the configured format and compression (compressed on the blocking pool:
    /// gzip of a full batch holds a thread for tens of milliseconds on a Pi).
    async fn encode(&self, batch: &Batch) -> Result<Vec<u8>, SendError> {
        let plain = wire::encode(batch, self.format, WireCompression::None)
            .map_err(|e| SendError::Unencodable { reason: e.to_string() })?;
        if self.compression == WireCompression::None {
            return Ok(plain);
        }
        let compression = self.compression;
        tokio::task::spawn_blocking(move || wire::compress(&plain, compression))
            .await
            .map_err(|e| retryable(format!("compression task: {e}")))?
            // Compressing into memory fails only when memory runs out: retry, not reject.
            .map_err(|e| retryable(format!("compression: {e}")))
    }

    /// Waits until the first connection attempt has finished (bounded by `deadline`); `Err`
    /// when the link is down.
    async fn wait_for_link(&self, deadline: Instant) -> Result<(), SendError> {
        let mut link = self.link.clone();
        let state = tokio::time::timeout_at(
            deadline,
            link.wait_for(|state| !matches!(state, Link::Connecting)),
        )
        .await;
        match state {
            Err(_) => Err(retryable(format!(
                "no connection to the MQTT broker at {} within {:?}",
                self.broker, self.timeout
            ))),
            Ok(Err(_)) => Err(retryable("the MQTT connection task stopped")),
            Ok(Ok(state)) => match &*state {
                Link::Down(cause) => Err(self.down(cause)),
                _ => Ok(()),
            },
        }
    }

    fn down(&self, cause: &str) -> SendError {
        retryable(format!("not connected to the MQTT broker at {}: {cause}", self.broker))
    }
}

/// What [`prepare`] derives from the config.
struct Prepared {
    options: MqttOptions,
    topic: TopicTemplate,
    max_payload: usize,
}

/// Checks the settings and builds the client options: credentials (the password read now),
/// TLS (files read now), packet limits, a clean session.
fn prepare(config: &MqttUpstreamConfig, agent: &str) -> Result<Prepared, ForwardError> {
    let setting = |key: &str, reason: String| ForwardError::Setting {
        key: format!("upstream.{key}"),
        reason,
    };
    let topic = TopicTemplate::parse(&config.topic).map_err(|r| setting("topic", r))?;
    let client_id = config.client_id(agent);
    if client_id.is_empty() {
        return Err(setting("client_id", "the client id is empty".into()));
    }
    if config.keep_alive < Duration::from_secs(1) {
        // rumqttc panics on sub-second keep-alives; validation asks for 5 s already.
        return Err(setting("keep_alive", "must be at least 1s".into()));
    }
    let max_payload = config
        .batch
        .max_bytes
        .bytes()
        .saturating_mul(JSON_EXPANSION)
        .clamp(MIN_OUTGOING_PACKET, MAX_OUTGOING_PACKET) as usize;
    let mut options = MqttOptions::new(client_id, config.host.clone(), config.port());
    options
        .set_keep_alive(config.keep_alive)
        // The outbox is our queue: see "Why clean_session = true" in the module docs.
        .set_clean_session(true)
        .set_max_packet_size(MAX_INCOMING_PACKET, max_payload);
    apply_auth(
        &mut options,
        config.username.as_ref(),
        config.password_source(),
        config.tls.as_ref(),
    )
    .map_err(|(key, reason)| setting(key, reason))?;
    Ok(Prepared { options, topic, max_payload })
}

/// Sets the CONNECT credentials (the password read now) and TLS (files read now) of an MQTT
/// connection, for MQTT sources and the MQTT upstream alike. An error names the key.
pub(crate) fn apply_auth(
    options: &mut MqttOptions,
    username: Option<&String>,
    password: Result<Option<SecretSource>, String>,
    tls: Option<&TlsConfig>,
) -> Result<(), (&'static str, String)> {
    match (username, password) {
        (_, Err(reason)) => return Err(("password_env", reason)),
        (None, Ok(Some(_))) => return Err(("username", "a password needs a username".into())),
        (None, Ok(None)) => {}
        (Some(username), Ok(None)) => {
            options.set_credentials(username.clone(), "");
        }
        (Some(username), Ok(Some(source))) => {
            let key = match &source {
                SecretSource::Env(_) => "password_env",
                SecretSource::File(_) => "password_file",
            };
            let password = source.resolve().map_err(|reason| (key, reason))?;
            options.set_credentials(username.clone(), password.expose());
        }
    }
    if let Some(tls_config) = tls {
        let client_config = tls::client_config(tls_config).map_err(|e| ("tls", e.to_string()))?;
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(Arc::new(
            client_config,
        ))));
    }
    Ok(())
}

fn retryable(reason: impl Into<String>) -> SendError {
    SendError::Retryable { reason: reason.into(), retry_after: None }
}

/// The task that owns the event loop; see the module docs.
struct Poller {
    eventloop: EventLoop,
    client: AsyncClient,
    shared: Arc<Shared>,
    link: watch::Sender<Link>,
    backoff: Backoff,
    broker: String,
    /// Connection attempts failed since the last CONNACK (0 while up).
    failures: u64,
}

/// What woke the poller.
enum Wake {
    Stopped,
    /// The in-flight batch's deadline passed.
    Deadline,
    Polled(Result<Event, ConnectionError>),
}

impl Poller {
    async fn run(mut self, stop: CancellationToken) {
        loop {
            let wake = {
                let poll = self.eventloop.poll();
                tokio::pin!(poll);
                loop {
                    let deadline = self.shared.lock().as_ref().map(|i| i.deadline);
                    tokio::select! {
                        biased;
                        () = stop.cancelled() => break Wake::Stopped,
                        () = sleep_until(deadline), if deadline.is_some() => break Wake::Deadline,
                        () = self.shared.registered.notified() => continue,
                        polled = &mut poll => break Wake::Polled(polled),
                    }
                }
            };
            match wake {
                Wake::Stopped => break,
                Wake::Deadline => {
                    let cause = "no PUBACK before the timeout; reconnecting".to_string();
                    self.tear_down(&cause);
                    if !self.pause(&stop).await {
                        break;
                    }
                }
                Wake::Polled(Ok(event)) => self.on_event(event),
                Wake::Polled(Err(error)) => {
                    let cause = describe(&error);
                    self.tear_down(&cause);
                    if !self.pause(&stop).await {
                        break;
                    }
                }
            }
        }
        self.disconnect().await;
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Incoming(Packet::ConnAck(_)) => {
                // Events rumqttc buffered before the last error belong to the old connection
                // (rule 2 of the module docs).
                self.eventloop.state.events.clear();
                self.backoff.reset();
                tracing::info!(
                    broker = %self.broker,
                    failed_attempts = self.failures,
                    "connected to the upstream MQTT broker"
                );
                self.failures = 0;
                self.link.send_replace(Link::Up);
            }
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                if let Some(inflight) = self.shared.lock().as_mut() {
                    inflight.pkid = Some(pkid);
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                let mut inflight = self.shared.lock();
                if inflight.as_ref().is_some_and(|i| i.pkid == Some(ack.pkid))
                    && let Some(done) = inflight.take()
                {
                    let _ = done.reply.send(Ok(()));
                }
            }
            _ => {}
        }
    }

    /// Drops the connection and everything queued on it, and fails the in-flight batch
    /// (rule 2 of the module docs). `cause` is logged and handed to `send`.
    fn tear_down(&mut self, cause: &str) {
        {
            let mut inflight = self.shared.lock();
            self.eventloop.clean();
            if let Some(abandoned) = inflight.take() {
                let _ = abandoned.reply.send(Err(format!("{cause} (the batch is resent)")));
            }
            let was = self.link.send_replace(Link::Down(cause.to_string()));
            self.failures += 1;
            match was {
                Link::Up => tracing::warn!(
                    broker = %self.broker, error = %cause,
                    "lost the upstream MQTT connection; reconnecting with backoff"
                ),
                Link::Connecting => tracing::warn!(
                    broker = %self.broker, error = %cause,
                    "cannot connect to the upstream MQTT broker; retrying with backoff"
                ),
                Link::Down(_) => tracing::debug!(
                    broker = %self.broker, error = %cause, attempts = self.failures,
                    "upstream MQTT reconnect failed"
                ),
            }
        }
    }

    /// Sleeps the backoff delay; `false` if stopped meanwhile.
    async fn pause(&mut self, stop: &CancellationToken) -> bool {
        let delay = self.backoff.next_delay();
        tracing::debug!(?delay, "upstream MQTT reconnect after delay");
        tokio::select! {
            () = stop.cancelled() => false,
            () = tokio::time::sleep(delay) => true,
        }
    }

    /// Best effort: send DISCONNECT if connected, so the broker logs a clean goodbye.
    async fn disconnect(&mut self) {
        if *self.link.borrow() != Link::Up || self.client.try_disconnect().is_err() {
            return;
        }
        let written = async {
            loop {
                match self.eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        };
        let _ = tokio::time::timeout(DISCONNECT_GRACE, written).await;
    }
}

/// Sleeps until `deadline`; never returns for `None` (the select! arm is disabled then).
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// A connection error with its causes on one line and, for the usual TLS and login
/// mistakes, what to change.
fn describe(error: &ConnectionError) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    let hint = match error {
        ConnectionError::ConnectionRefused(
            ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized,
        ) => Some("the broker refused our credentials: check upstream.username and the password"),
        ConnectionError::ConnectionRefused(ConnectReturnCode::BadClientId) => {
            Some("the broker refused our client id: check upstream.client_id")
        }
        _ => tls::explain(&text),
    };
    match hint {
        Some(hint) => format!("{text} ({hint})"),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::mpsc;

    use super::*;
    use crate::config::{BatchConfig, MqttUpstreamConfig};
    use crate::forward::tests::{AGENT, batch_of};

    /// What the fake broker does with a PUBLISH.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Answer {
        /// PUBACK with the publish's packet id.
        Ack,
        /// Nothing.
        Ignore,
        /// PUBACK with another packet id.
        AckOtherPkid,
        /// Close the connection.
        Close,
    }

    /// What the fake broker saw.
    #[derive(Debug, Clone, PartialEq)]
    enum Seen {
        Connect {
            client_id: String,
            clean: bool,
            username: Option<String>,
            password: Option<String>,
        },
        Publish {
            topic: String,
            qos: u8,
            pkid: u16,
            payload: Vec<u8>,
        },
    }

    /// A minimal MQTT 3.1.1 broker on 127.0.0.1: CONNACKs every CONNECT, answers PUBLISHes
    /// from a script (PUBACK when the script is empty), answers pings. Enough to drive the
    /// sink through every PUBACK path deterministically.
    struct FakeBroker {
        port: u16,
        script: Arc<Mutex<VecDeque<Answer>>>,
        seen: mpsc::UnboundedReceiver<Seen>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for FakeBroker {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl FakeBroker {
        async fn start(script: impl IntoIterator<Item = Answer>) -> FakeBroker {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let script = Arc::new(Mutex::new(script.into_iter().collect::<VecDeque<_>>()));
            let (tx, seen) = mpsc::unbounded_channel();
            let task = tokio::spawn({
                let script = script.clone();
                async move {
                    while let Ok((stream, _)) = listener.accept().await {
                        tokio::spawn(serve(stream, script.clone(), tx.clone()));
                    }
                }
            });
            FakeBroker { port, script, seen, task }
        }

        /// The next thing seen; panics after 10 s.
        async fn next(&mut self) -> Seen {
            tokio::time::timeout(Duration::from_secs(10), self.seen.recv())
                .await
                .expect("the broker saw something within 10 s")
                .unwrap()
        }

        async fn next_publish(&mut self) -> Seen {
            loop {
                if let seen @ Seen::Publish { .. } = self.next().await {
                    return seen;
                }
            }
        }

        fn pending_script(&self) -> usize {
            self.script.lock().unwrap().len()
        }
    }

    async fn serve(
        mut stream: TcpStream,
        script: Arc<Mutex<VecDeque<Answer>>>,
        seen: mpsc::UnboundedSender<Seen>,
    ) {
        while let Some((header, body)) = read_packet(&mut stream).await {
            let reply: Vec<u8> = match header >> 4 {
                1 => {
                    let _ = seen.send(parse_connect(&body));
                    vec![0x20, 0x02, 0x00, 0x00]
                }
                3 => {
                    let qos = (header >> 1) & 3;
                    let topic_len = u16::from_be_bytes([body[0], body[1]]) as usize;
                    let topic = String::from_utf8(body[2..2 + topic_len].to_vec()).unwrap();
                    let pkid = u16::from_be_bytes([body[2 + topic_len], body[3 + topic_len]]);
                    let payload = body[4 + topic_len..].to_vec();
                    let _ = seen.send(Seen::Publish { topic, qos, pkid, payload });
                    let answer = script.lock().unwrap().pop_front().unwrap_or(Answer::Ack);
                    let [hi, lo] = match answer {
                        Answer::Ack => pkid.to_be_bytes(),
                        Answer::AckOtherPkid => pkid.wrapping_add(7).to_be_bytes(),
                        Answer::Ignore => continue,
                        Answer::Close => return,
                    };
                    vec![0x40, 0x02, hi, lo]
                }
                12 => vec![0xd0, 0x00],
                14 => return,
                _ => continue,
            };
            if stream.write_all(&reply).await.is_err() {
                return;
            }
        }
    }

    async fn read_packet(stream: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
        let header = stream.read_u8().await.ok()?;
        let mut length = 0usize;
        for shift in (0..28).step_by(7) {
            let byte = stream.read_u8().await.ok()?;
            length |= usize::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0; length];
        stream.read_exact(&mut body).await.ok()?;
        Some((header, body))
    }

    fn parse_connect(body: &[u8]) -> Seen {
        let mut at = 2 + u16::from_be_bytes([body[0], body[1]]) as usize + 1;
        let flags = body[at];
        at += 3;
        let mut string = || {
            let len = u16::from_be_bytes([body[at], body[at + 1]]) as usize;
            let text = String::from_utf8_lossy(&body[at + 2..at + 2 + len]).into_owned();
            at += 2 + len;
            text
        };
        let client_id = string();
        let username = (flags & 0x80 != 0).then(&mut string);
        let password = (flags & 0x40 != 0).then(&mut string);
        Seen::Connect { client_id, clean: flags & 0x02 != 0, username, password }
    }

    fn config(port: u16) -> MqttUpstreamConfig {
        MqttUpstreamConfig {
            host: "127.0.0.1".into(),
            port: Some(port),
            client_id: None,
            topic: "edgewise/{agent}/{lane}".into(),
            format: Format::Json,
            compression: Compression::None,
            keep_alive: Duration::from_secs(30),
            timeout: Duration::from_secs(5),
            retry_initial: Duration::from_millis(10),
            retry_max: Duration::from_millis(50),
            username: None,
            password_env: None,
            password_file: None,
            tls: None,
            batch: BatchConfig::default(),
        }
    }

    /// Sends until the sink reports the link up and the batch acknowledged (the first send
    /// after a failure may meet the link still down, like the forwarder's retry would).
    async fn send_until_acknowledged(sink: &MqttSink, batch: &Batch) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match sink.send(batch).await {
                Ok(()) => return,
                Err(e) => {
                    assert!(e.is_retryable(), "{e}");
                    assert!(std::time::Instant::now() < deadline, "not acknowledged: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    #[tokio::test]
    async fn a_batch_is_acknowledged_by_its_puback_on_its_lane_topic() {
        let mut broker = FakeBroker::start([]).await;
        let sink = MqttSink::new(&config(broker.port), AGENT).unwrap();
        let batch = batch_of(Lane::Alerts, 1..=3);
        sink.send(&batch).await.unwrap();
        let Seen::Connect { client_id, clean, username, password } = broker.next().await else {
            panic!("CONNECT first");
        };
        assert_eq!(client_id, "edgewise-gw-test-up");
        assert!(clean, "the outbox is the queue: clean session");
        assert_eq!((username, password), (None, None));
        let Seen::Publish { topic, qos, payload, .. } = broker.next_publish().await else {
            unreachable!()
        };
        assert_eq!(topic, "edgewise/gw-test/alerts");
        assert_eq!(qos, 1);
        assert_eq!(serde_json::from_slice::<Batch>(&payload).unwrap(), batch);
        sink.send(&batch_of(Lane::Summaries, 4..=4)).await.unwrap();
        let Seen::Publish { topic, .. } = broker.next_publish().await else { unreachable!() };
        assert_eq!(topic, "edgewise/gw-test/summaries");
    }

    #[tokio::test]
    async fn bodies_carry_the_configured_format_and_compression() {
        let mut broker = FakeBroker::start([]).await;
        let batch = batch_of(Lane::Summaries, 1..=20);
        let settings = [
            (Format::Postcard, Compression::Zstd, WireCompression::Zstd),
            (Format::Json, Compression::Gzip, WireCompression::Gzip),
        ];
        for (format, compression, expected) in settings {
            let mut cfg = config(broker.port);
            cfg.format = format;
            cfg.compression = compression;
            let sink = MqttSink::new(&cfg, AGENT).unwrap();
            sink.send(&batch).await.unwrap();
            let Seen::Publish { payload, .. } = broker.next_publish().await else { unreachable!() };
            let (decoded, sniffed_format, sniffed_compression) =
                wire::decode_sniffed(&payload).unwrap();
            assert_eq!((sniffed_format, sniffed_compression), (format, expected));
            assert_eq!(decoded, batch);
        }
    }

    #[tokio::test]
    async fn a_missing_puback_times_out_and_the_retry_goes_on_a_fresh_connection() {
        let mut broker = FakeBroker::start([Answer::Ignore]).await;
        let mut cfg = config(broker.port);
        cfg.timeout = Duration::from_millis(300);
        let sink = MqttSink::new(&cfg, AGENT).unwrap();
        let batch = batch_of(Lane::Alerts, 1..=2);
        let error = sink.send(&batch).await.unwrap_err();
        assert!(error.is_retryable());
        assert!(error.to_string().contains("no PUBACK"), "{error}");
        send_until_acknowledged(&sink, &batch).await;
        let mut seen = vec![broker.next().await];
        while seen.iter().filter(|s| matches!(s, Seen::Publish { .. })).count() < 2 {
            seen.push(broker.next().await);
        }
        let connects = seen.iter().filter(|s| matches!(s, Seen::Connect { .. })).count();
        assert_eq!(connects, 2, "the timeout dropped the connection: {seen:?}");
        assert!(matches!(seen.last(), Some(Seen::Publish { .. })));
        // rumqttc did not resend the abandoned publish on its own: the only other publish
        // is the retry, which came from the caller.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(broker.seen.try_recv().is_err(), "nothing else was published");
    }

    #[tokio::test]
    async fn a_connection_lost_before_the_puback_fails_the_batch_at_once() {
        let broker = FakeBroker::start([Answer::Close]).await;
        let sink = MqttSink::new(&config(broker.port), AGENT).unwrap();
        let batch = batch_of(Lane::Summaries, 1..=5);
        let started = std::time::Instant::now();
        let error = sink.send(&batch).await.unwrap_err();
        assert!(error.is_retryable());
        assert!(started.elapsed() < Duration::from_secs(4), "did not wait for the timeout");
        send_until_acknowledged(&sink, &batch).await;
        assert_eq!(broker.pending_script(), 0);
    }

    #[tokio::test]
    async fn a_puback_for_another_packet_fails_the_batch_instead_of_acknowledging_it() {
        // rumqttc treats an ack it did not ask for as a protocol error and drops the
        // connection; either way the batch must not count as delivered.
        let broker = FakeBroker::start([Answer::AckOtherPkid]).await;
        let mut cfg = config(broker.port);
        cfg.timeout = Duration::from_millis(300);
        let sink = MqttSink::new(&cfg, AGENT).unwrap();
        let batch = batch_of(Lane::Alerts, 1..=1);
        let error = sink.send(&batch).await.unwrap_err();
        assert!(error.is_retryable(), "{error}");
        send_until_acknowledged(&sink, &batch).await;
    }

    #[tokio::test]
    async fn an_unreachable_broker_fails_fast_and_names_the_cause() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let sink = MqttSink::new(&config(port), AGENT).unwrap();
        let started = std::time::Instant::now();
        let error = sink.send(&batch_of(Lane::Alerts, 1..=1)).await.unwrap_err();
        assert!(error.is_retryable());
        let text = error.to_string();
        assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
        assert!(text.to_lowercase().contains("refused"), "{text}");
        assert!(started.elapsed() < Duration::from_secs(4), "did not wait for the timeout");
    }

    #[tokio::test]
    async fn credentials_come_from_a_file_and_never_show_in_debug() {
        let mut broker = FakeBroker::start([]).await;
        let dir = tempfile::tempdir().unwrap();
        let secret = "s3cr3t-Pa55";
        std::fs::write(dir.path().join("password"), format!("{secret}\n")).unwrap();
        let mut cfg = config(broker.port);
        cfg.username = Some("gw-user".into());
        cfg.password_file = Some(dir.path().join("password"));
        let sink = MqttSink::new(&cfg, AGENT).unwrap();
        sink.send(&batch_of(Lane::Alerts, 1..=1)).await.unwrap();
        let Seen::Connect { username, password, .. } = broker.next().await else {
            panic!("CONNECT first");
        };
        assert_eq!(username.as_deref(), Some("gw-user"));
        assert_eq!(password.as_deref(), Some(secret), "the trailing newline is dropped");
        assert!(!format!("{sink:?}").contains(secret));
        assert!(!format!("{cfg:?}").contains(secret));
    }

    #[test]
    fn an_unreadable_password_file_is_refused_at_start_naming_the_key() {
        let mut cfg = config(1883);
        cfg.username = Some("u".into());
        cfg.password_file = Some("/nonexistent/edgewise-password".into());
        let Err(ForwardError::Setting { key, reason }) = prepare(&cfg, AGENT) else {
            panic!("expected a setting error");
        };
        assert_eq!(key, "upstream.password_file");
        assert!(reason.contains("/nonexistent/edgewise-password"), "{reason}");
    }

    #[test]
    fn the_packet_limit_fits_the_biggest_batch() {
        let mut cfg = config(1883);
        cfg.batch.max_bytes = crate::config::ByteSize(4 << 20);
        assert_eq!(prepare(&cfg, AGENT).unwrap().max_payload, 32 << 20);
        cfg.batch.max_bytes = crate::config::ByteSize(1024);
        assert_eq!(prepare(&cfg, AGENT).unwrap().max_payload, MIN_OUTGOING_PACKET as usize);
    }

    #[test]
    fn topic_templates_fill_agent_and_lane() {
        let t = TopicTemplate::parse("edgewise/{agent}/{lane}").unwrap();
        assert_eq!(t.render("gw-1", Lane::Alerts), "edgewise/gw-1/alerts");
        let t = TopicTemplate::parse("plant/{lane}-{agent}/up").unwrap();
        assert_eq!(t.render("gw-1", Lane::Summaries), "plant/summaries-gw-1/up");
        assert_eq!(TopicTemplate::parse("fixed").unwrap().render("a", Lane::Alerts), "fixed");
    }

    #[test]
    fn topic_templates_refuse_wildcards_and_unknown_placeholders() {
        for (bad, words) in [
            ("", "empty"),
            ("a/+/b", "wildcards"),
            ("a/#", "wildcards"),
            ("a/{gateway}", "unknown placeholder `{gateway}`"),
            ("a/{agent", "without its `}`"),
            ("a/agent}", "without its `{`"),
        ] {
            let error = TopicTemplate::parse(bad).unwrap_err();
            assert!(error.contains(words), "{bad}: {error}");
        }
    }
}
