//! The MQTT source: subscribes on a (local) broker and turns PUBLISHes into events, with QoS 1
//! messages acknowledged only after the journal commit that holds them.
//!
//! # One task
//!
//! rumqttc's `EventLoop::poll()` serves buffered incoming packets before it reads the request
//! channel, so a task that polls and also *awaits* `client.ack()` deadlocks once the channel is
//! full (rumqtt #263, #1025). Here a single task does everything, and only with non-blocking
//! client calls:
//!
//! ```text
//!           ┌──────────────────────── poller task ─────────────────────────┐
//! broker ──▶│ eventloop.poll() ─▶ render series, decode ─▶ ingest.send().await ├──▶ journal
//!           │       ▲                                                       │      │ commit,
//!           │       └── client.try_ack() ◀── pending VecDeque ◀── acks rx ◀─┼──────┘ Ack::send
//!           └───────────────────────────────────────────────────────────────┘
//! ```
//!
//! The `poll()` future is kept alive while acks are handed to the client (the client is a
//! separate handle onto the request channel), so an arriving ack never cancels a half-done
//! network read or write inside rumqttc. When the request channel is full an ack waits in a
//! local queue and is retried after the next poll result; acks are sent in the order they come
//! back, which is receive order because the journal commits in order.
//!
//! # Acks, sessions and redeliveries
//!
//! - With `qos = 1` the client uses a persistent session (`clean_session = false`, stable client
//!   id) and manual acks: the broker keeps every message it has not seen a PUBACK for, across
//!   our crashes and restarts, and redelivers it with the DUP flag.
//! - Each message becomes exactly one `Ingest`. A message that cannot be decoded is counted in
//!   `rejected{source, cause}`, logged at a limited rate, and still sent as `Ingest { event:
//!   None, ack, .. }`: it is acknowledged in order after the commit, so the broker does not
//!   redeliver garbage forever. QoS 1 messages carry a [`Redelivery`] (packet id, FNV-1a hash
//!   of topic and payload, DUP) so the journal can drop a redelivered copy it already holds.
//! - Acks are bound to the connection they were received on: every connection error replaces
//!   the ack channel, so an ack that comes back after the connection dropped finds its channel
//!   closed and is discarded. Sending it on the next connection could acknowledge a *different*
//!   message that reuses the packet id when the broker lost our session; instead the broker
//!   redelivers the message and the journal acknowledges the redelivery. rumqttc does the same
//!   with acks still queued in its request channel at a disconnect.
//!
//! # Lifecycle
//!
//! Connect → on every CONNACK reset the backoff and, when the broker has no session for us
//! (`session_present == false`), subscribe to all topics → receive. After each connection
//! error sleep a capped, jittered [`Backoff`] (rumqttc itself reconnects instantly on the
//! next poll). Connection state changes are logged once (info when connected, warn when lost
//! or unreachable); retries are logged at debug. On cancel: stop polling, hand the acks that
//! already came back to the client, send DISCONNECT and drive the event loop until it is
//! written (bounded by [`DISCONNECT_GRACE`]).
//!
//! Backpressure: `ingest.send().await` blocks the poller, which stops reading the socket. The
//! broker's inflight window for QoS 1 (Mosquitto: 20 messages) bounds what it sends before our
//! acks, so a journal channel larger than that window never holds the poller long enough to
//! miss keep-alives in steady state.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, ConnAck, Event as MqttEvent, EventLoop, MqttOptions, Outgoing, Packet, Publish,
    QoS, SubAck, SubscribeFilter, SubscribeReasonCode,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::backoff::Backoff;
use super::payload::{self, SeriesTemplate};
use super::{RejectLog, SourceError, send_or_cancel};
use crate::config::{Config, MqttSourceConfig, PayloadConfig};
use crate::event::{Ack, Event, Ingest, Redelivery, now_ms};
use crate::metrics::Metrics;

/// Capacity of rumqttc's request channel. Requests are acks plus one SUBSCRIBE per
/// connection; the broker's inflight window (Mosquitto: 20) bounds the acks outstanding at
/// once, so 1024 is never full in practice, and a full channel only delays acks (local queue).
const REQUEST_CHANNEL_CAPACITY: usize = 1024;

/// How long shutdown waits for the DISCONNECT to be written.
pub const DISCONNECT_GRACE: Duration = Duration::from_secs(1);

/// `rejected` cause of a topic the series template cannot render.
const CAUSE_BAD_SERIES: &str = "bad_series";

/// Everything fixed for the life of the source.
#[derive(Debug)]
struct Settings {
    index: u16,
    name: String,
    qos: QoS,
    topics: Vec<String>,
    template: SeriesTemplate,
    payload: PayloadConfig,
}

/// Checks `cfg` and builds the rumqttc options; every error here would otherwise be a panic
/// inside rumqttc or a silent failure later.
fn prepare(
    index: u16,
    config: &Config,
    cfg: &MqttSourceConfig,
) -> Result<(Settings, MqttOptions), SourceError> {
    let invalid = |reason: String| SourceError::InvalidConfig { name: cfg.name.clone(), reason };
    let qos = match cfg.qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        other => return Err(invalid(format!("`qos` must be 0 or 1, not {other}"))),
    };
    if cfg.topics.is_empty() {
        return Err(invalid("`topics` is empty; give at least one topic filter".into()));
    }
    if let Some(bad) = cfg.topics.iter().find(|t| !rumqttc::valid_filter(t)) {
        return Err(invalid(format!("`{bad}` is not a valid MQTT topic filter")));
    }
    let template = SeriesTemplate::parse(&cfg.series).map_err(invalid)?;
    let client_id = config.mqtt_client_id(cfg);
    if client_id.is_empty() {
        return Err(invalid("`client_id` is empty; the broker keys our session by it".into()));
    }
    if !cfg.keep_alive.is_zero() && cfg.keep_alive < Duration::from_secs(1) {
        return Err(invalid("`keep_alive` must be 0 s (off) or at least 1 s".into()));
    }
    let max_packet = usize::try_from(cfg.max_packet_size.bytes()).unwrap_or(usize::MAX);

    let mut options = MqttOptions::new(client_id, cfg.host.clone(), cfg.port);
    options
        .set_keep_alive(cfg.keep_alive)
        // QoS 1 needs the broker to keep unacknowledged messages while we are away.
        .set_clean_session(qos == QoS::AtMostOnce)
        .set_manual_acks(true)
        .set_max_packet_size(max_packet, max_packet)
        .set_request_channel_capacity(REQUEST_CHANNEL_CAPACITY);
    crate::forward::mqtt::apply_auth(
        &mut options,
        cfg.username.as_ref(),
        cfg.password_source(),
        cfg.tls.as_ref(),
    )
    .map_err(|(key, reason)| invalid(format!("`{key}`: {reason}")))?;
    let settings = Settings {
        index,
        name: cfg.name.clone(),
        qos,
        topics: cfg.topics.clone(),
        template,
        payload: cfg.payload.clone(),
    };
    Ok((settings, options))
}

/// Where the connection stands, so that each change is logged once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// Never connected yet.
    Starting,
    /// Connected (CONNACK received).
    Up,
    /// Lost or unreachable; retrying.
    Down,
}

/// Runs an MQTT source until `cancel`; see the module docs.
pub(crate) async fn run(
    index: u16,
    config: &Config,
    cfg: &MqttSourceConfig,
    ingest: mpsc::Sender<Ingest>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) -> Result<(), SourceError> {
    let (settings, options) = prepare(index, config, cfg)?;
    let client_id = options.client_id();
    let (client, eventloop) = AsyncClient::new(options, REQUEST_CHANNEL_CAPACITY);
    tracing::info!(
        source = %settings.name,
        broker = %format_args!("{}:{}", cfg.host, cfg.port),
        client_id = %client_id,
        topics = ?settings.topics,
        qos = cfg.qos,
        "MQTT source started"
    );
    let mut poller = Poller {
        settings,
        client,
        eventloop,
        ingest,
        metrics,
        backoff: Backoff::new(cfg.reconnect_min, cfg.reconnect_max),
        acks: mpsc::unbounded_channel(),
        pending_acks: VecDeque::new(),
        reject_log: RejectLog::default(),
        link: Link::Starting,
        failures: 0,
        broker: format!("{}:{}", cfg.host, cfg.port),
    };
    let result = poller.run(&cancel).await;
    poller.shutdown().await;
    tracing::info!(source = %poller.settings.name, "MQTT source stopped");
    result
}

/// The single task that owns the event loop; see the module docs.
struct Poller {
    settings: Settings,
    client: AsyncClient,
    eventloop: EventLoop,
    ingest: mpsc::Sender<Ingest>,
    metrics: Arc<Metrics>,
    backoff: Backoff,
    /// Acks of the current connection come back here (replaced at every connection error).
    acks: (mpsc::UnboundedSender<Publish>, mpsc::UnboundedReceiver<Publish>),
    /// Acks that did not fit into the request channel yet, in receive order.
    pending_acks: VecDeque<Publish>,
    reject_log: RejectLog,
    link: Link,
    /// Connection attempts failed since the last CONNACK.
    failures: u64,
    broker: String,
}

impl std::fmt::Debug for Poller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Poller")
            .field("source", &self.settings.name)
            .field("link", &self.link)
            .field("pending_acks", &self.pending_acks.len())
            .finish_non_exhaustive()
    }
}

/// What woke the poller.
enum Wake {
    Cancelled,
    Polled(Result<MqttEvent, rumqttc::ConnectionError>),
}

impl Poller {
    async fn run(&mut self, cancel: &CancellationToken) -> Result<(), SourceError> {
        loop {
            self.flush_acks();
            let wake = {
                let poll = self.eventloop.poll();
                tokio::pin!(poll);
                loop {
                    tokio::select! {
                        biased;
                        _ = cancel.cancelled() => break Wake::Cancelled,
                        Some(publish) = self.acks.1.recv() => {
                            self.pending_acks.push_back(publish);
                            flush_acks(&self.client, &mut self.pending_acks);
                        }
                        polled = &mut poll => break Wake::Polled(polled),
                    }
                }
            };
            match wake {
                Wake::Cancelled => return Ok(()),
                Wake::Polled(Ok(MqttEvent::Incoming(packet))) => {
                    if !self.on_packet(packet, cancel).await? {
                        return Ok(());
                    }
                }
                Wake::Polled(Ok(MqttEvent::Outgoing(_))) => {}
                Wake::Polled(Err(error)) => {
                    self.on_error(&error);
                    let delay = self.backoff.next_delay();
                    tracing::debug!(source = %self.settings.name, ?delay, "reconnecting after delay");
                    tokio::select! {
                        biased;
                        _ = cancel.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// Handles one incoming packet; `Ok(false)` means cancelled.
    async fn on_packet(
        &mut self,
        packet: Packet,
        cancel: &CancellationToken,
    ) -> Result<bool, SourceError> {
        match packet {
            Packet::Publish(publish) => self.on_publish(publish, cancel).await,
            Packet::ConnAck(connack) => {
                self.on_connack(&connack);
                Ok(true)
            }
            Packet::SubAck(suback) => {
                self.on_suback(&suback);
                Ok(true)
            }
            _ => Ok(true),
        }
    }

    fn on_connack(&mut self, connack: &ConnAck) {
        self.backoff.reset();
        self.metrics.set_connected(&self.settings.name, true);
        tracing::info!(
            source = %self.settings.name,
            broker = %self.broker,
            session_present = connack.session_present,
            failed_attempts = self.failures,
            "connected to the MQTT broker"
        );
        self.link = Link::Up;
        self.failures = 0;
        if !connack.session_present {
            // A new session has no subscriptions (first start, clean session for QoS 0, or
            // the broker lost its state): subscribe again. `try_` because this task is the
            // poller; the request channel is empty right after a (re)connect.
            let filters = self
                .settings
                .topics
                .iter()
                .map(|t| SubscribeFilter::new(t.clone(), self.settings.qos));
            if let Err(error) = self.client.try_subscribe_many(filters) {
                tracing::error!(
                    source = %self.settings.name,
                    %error,
                    "cannot queue the subscription; no messages will arrive until the next reconnect"
                );
            }
        }
    }

    fn on_suback(&self, suback: &SubAck) {
        for (topic, code) in self.settings.topics.iter().zip(&suback.return_codes) {
            match code {
                SubscribeReasonCode::Success(granted) => tracing::debug!(
                    source = %self.settings.name, topic = %topic, granted = ?granted,
                    "subscribed"
                ),
                SubscribeReasonCode::Failure => tracing::warn!(
                    source = %self.settings.name, topic = %topic,
                    "the broker refused the subscription (check its ACLs)"
                ),
            }
        }
    }

    fn on_error(&mut self, error: &rumqttc::ConnectionError) {
        self.failures += 1;
        self.metrics.set_connected(&self.settings.name, false);
        match self.link {
            Link::Up => tracing::warn!(
                source = %self.settings.name, broker = %self.broker, %error,
                "lost the MQTT connection; reconnecting with backoff"
            ),
            Link::Starting => tracing::warn!(
                source = %self.settings.name, broker = %self.broker, %error,
                "cannot connect to the MQTT broker; retrying with backoff"
            ),
            Link::Down => tracing::debug!(
                source = %self.settings.name, %error, attempts = self.failures,
                "MQTT reconnect failed"
            ),
        }
        self.link = Link::Down;
        // Acks of the dead connection must not reach the next one (see the module docs).
        self.acks = mpsc::unbounded_channel();
        self.pending_acks.clear();
    }

    /// Decodes one PUBLISH and hands it to the journal; `Ok(false)` means cancelled.
    async fn on_publish(
        &mut self,
        publish: Publish,
        cancel: &CancellationToken,
    ) -> Result<bool, SourceError> {
        let received_ms = now_ms();
        let acknowledged = publish.qos != QoS::AtMostOnce;
        let event = match self.decode(&publish, received_ms) {
            Ok(event) => Some(event),
            Err((cause, reason)) => {
                self.metrics.reject(&self.settings.name, cause);
                if let Some(suppressed) = self.reject_log.admit(cause, Instant::now()) {
                    tracing::warn!(
                        source = %self.settings.name,
                        topic = %publish.topic,
                        cause,
                        suppressed,
                        %reason,
                        "rejected an MQTT message"
                    );
                }
                None
            }
        };
        if !acknowledged && event.is_none() {
            return Ok(true);
        }
        let redelivery = (acknowledged && event.is_some()).then(|| Redelivery {
            source: self.settings.index,
            pkid: publish.pkid,
            hash: message_hash(&publish.topic, &publish.payload),
            dup: publish.dup,
        });
        let ack = acknowledged.then(|| Ack::new(self.acks.0.clone(), bare_ack(&publish)));
        send_or_cancel(&self.ingest, Ingest { event, ack, redelivery }, cancel, &self.settings.name)
            .await
    }

    fn decode(&self, publish: &Publish, received_ms: i64) -> Result<Event, (&'static str, String)> {
        let series = self
            .settings
            .template
            .render(&publish.topic)
            .map_err(|reason| (CAUSE_BAD_SERIES, reason))?;
        let decoded = payload::decode(&self.settings.payload, &publish.payload)
            .map_err(|e| (e.cause(), e.to_string()))?;
        Ok(Event {
            series,
            ts_ms: decoded.ts_ms.unwrap_or(received_ms),
            value: decoded.value,
            received_ms,
            source: self.settings.index,
        })
    }

    fn flush_acks(&mut self) {
        flush_acks(&self.client, &mut self.pending_acks);
    }

    /// Best effort on cancel: send the acks that already came back, then DISCONNECT.
    async fn shutdown(&mut self) {
        if self.link != Link::Up {
            return;
        }
        while let Ok(publish) = self.acks.1.try_recv() {
            self.pending_acks.push_back(publish);
        }
        self.flush_acks();
        if !self.pending_acks.is_empty() {
            tracing::debug!(
                source = %self.settings.name,
                dropped = self.pending_acks.len(),
                "acks left unsent at shutdown; the broker will redeliver"
            );
        }
        if self.client.try_disconnect().is_err() {
            return;
        }
        // Polling writes the queued acks and then the DISCONNECT (requests are served in
        // order). Incoming publishes seen here are not handed on: they stay unacknowledged
        // and the broker redelivers them to the next run.
        let drain = async {
            loop {
                match self.eventloop.poll().await {
                    Ok(MqttEvent::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        };
        if tokio::time::timeout(DISCONNECT_GRACE, drain).await.is_err() {
            tracing::debug!(source = %self.settings.name, "DISCONNECT not written in time");
        }
    }
}

/// What an acknowledgement needs of a PUBLISH: its packet id and QoS (rumqttc's `ack` reads
/// nothing else). The received PUBLISH's topic and payload are slices of rumqttc's read buffer;
/// carrying them until the journal commit kept whole read buffers alive for every message in
/// flight (heaptrack, QoS 1 flat out: 2.7 MB of read buffers and a 4 MiB queue of PUBLISHes).
fn bare_ack(publish: &Publish) -> Publish {
    let mut bare = Publish::new("", publish.qos, Vec::new());
    bare.pkid = publish.pkid;
    bare
}

/// Moves queued acks into the request channel until it is full; order is kept.
fn flush_acks(client: &AsyncClient, pending: &mut VecDeque<Publish>) {
    while let Some(publish) = pending.front() {
        if client.try_ack(publish).is_err() {
            // Full (the event loop owns the receiver, so it cannot be closed): retry after
            // the next poll has drained some requests.
            break;
        }
        pending.pop_front();
    }
}

/// FNV-1a 64 of the topic, a 0xFF separator (never part of UTF-8 text, so `("ab", "c")` and
/// `("a", "bc")` differ) and the payload. Hand-written so the value is stable across Rust
/// versions and processes: the journal compares hashes of messages received before a crash.
pub fn message_hash(topic: &str, payload: &[u8]) -> u64 {
    let mut hash = Fnv1a::new();
    hash.write(topic.as_bytes());
    hash.write(&[0xFF]);
    hash.write(payload);
    hash.finish()
}

/// The 64-bit FNV-1a hash.
#[derive(Debug, Clone, Copy)]
struct Fnv1a(u64);

impl Fnv1a {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    fn new() -> Self {
        Self(Self::OFFSET_BASIS)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(Self::PRIME);
        }
    }

    fn finish(self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fnv(bytes: &[u8]) -> u64 {
        let mut h = Fnv1a::new();
        h.write(bytes);
        h.finish()
    }

    #[test]
    fn fnv1a_matches_the_reference_vectors() {
        // From the FNV reference test suite (draft-eastlake-fnv).
        assert_eq!(fnv(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv(b"foobar"), 0x8594_4171_f739_67e8);
    }

    fn config(port: u16, client_id: &str, extra: &str) -> Config {
        Config::from_toml(&format!(
            r#"
            [agent]
            id = "test"
            [upstream]
            kind = "file"
            path = "-"
            [[sources]]
            kind = "mqtt"
            name = "plant"
            host = "127.0.0.1"
            port = {port}
            client_id = "{client_id}"
            topics = ["plant/+/+"]
            series = "{{1}}/{{2}}"
            keep_alive = "5s"
            reconnect_min = "20ms"
            reconnect_max = "200ms"
            {extra}
            "#
        ))
        .unwrap()
    }

    fn mqtt_cfg(config: &Config) -> &MqttSourceConfig {
        match &config.sources[0] {
            crate::config::SourceConfig::Mqtt(c) => c,
            _ => unreachable!("the test configuration has one mqtt source"),
        }
    }

    #[test]
    fn configurations_rumqttc_would_panic_on_are_rejected() {
        type Patch = fn(&mut MqttSourceConfig);
        let cases: [(Patch, &str); 6] = [
            (|c| c.qos = 2, "`qos` must be 0 or 1"),
            (|c| c.keep_alive = Duration::from_millis(500), "`keep_alive`"),
            (|c| c.series = "{nope}".into(), "unknown placeholder"),
            (|c| c.client_id = Some(String::new()), "`client_id` is empty"),
            (|c| c.topics = vec!["plant/#/x".into()], "not a valid MQTT topic filter"),
            (|c| c.topics.clear(), "`topics` is empty"),
        ];
        for (patch, needle) in cases {
            let mut config = config(1883, "id", "");
            let crate::config::SourceConfig::Mqtt(c) = &mut config.sources[0] else {
                unreachable!()
            };
            patch(c);
            let err = prepare(0, &config, mqtt_cfg(&config)).unwrap_err();
            assert!(err.to_string().contains(needle), "`{err}` lacks `{needle}`");
        }
    }

    #[test]
    fn credentials_are_read_from_the_environment_and_sent_in_connect() {
        // The variable is never set: its name is unique to this test.
        let var = "EDGEWISE_TEST_SOURCE_PASSWORD_41";
        let mut config = config(1883, "id", "");
        let crate::config::SourceConfig::Mqtt(c) = &mut config.sources[0] else { unreachable!() };
        c.username = Some("gw".into());
        c.password_env = Some(var.into());
        let err = prepare(0, &config, mqtt_cfg(&config)).unwrap_err().to_string();
        assert!(err.contains("password_env") && err.contains(var), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\n").unwrap();
        let crate::config::SourceConfig::Mqtt(c) = &mut config.sources[0] else { unreachable!() };
        c.password_env = None;
        c.password_file = Some(file);
        let (_, options) = prepare(0, &config, mqtt_cfg(&config)).unwrap();
        let login = options.credentials().expect("credentials set");
        assert_eq!((login.username.as_str(), login.password.as_str()), ("gw", "s3cret"));
    }

    #[test]
    fn an_ack_keeps_the_packet_id_and_qos_but_not_the_message() {
        let mut publish = Publish::new("sensors/p1/t", QoS::AtLeastOnce, vec![7u8; 512]);
        publish.pkid = 42;
        let bare = bare_ack(&publish);
        assert_eq!((bare.pkid, bare.qos), (42, QoS::AtLeastOnce));
        assert!(bare.topic.is_empty() && bare.payload.is_empty());
    }

    #[test]
    fn acks_that_do_not_fit_the_request_channel_wait_in_order() {
        let (client, eventloop) = AsyncClient::new(MqttOptions::new("id", "127.0.0.1", 1), 2);
        let publish = |pkid| {
            let mut p = Publish::new("t", QoS::AtLeastOnce, vec![]);
            p.pkid = pkid;
            p
        };
        let mut pending: VecDeque<Publish> = (1..=5).map(publish).collect();
        flush_acks(&client, &mut pending);
        let left: Vec<u16> = pending.iter().map(|p| p.pkid).collect();
        assert_eq!(left, [3, 4, 5]);
        drop(eventloop);
    }

    #[test]
    fn qos1_uses_a_persistent_session_with_manual_acks() {
        let config = config(1883, "edgewise-gw-in", "");
        let (settings, options) = prepare(0, &config, mqtt_cfg(&config)).unwrap();
        assert_eq!(settings.qos, QoS::AtLeastOnce);
        assert!(!options.clean_session());
        assert!(options.manual_acks());
        assert_eq!(options.client_id(), "edgewise-gw-in");
        assert_eq!(options.max_packet_size(), 64 * 1024);
        assert_eq!(options.request_channel_capacity(), REQUEST_CHANNEL_CAPACITY);
        let config = self::config(1883, "x", "qos = 0");
        let (_, options) = prepare(0, &config, mqtt_cfg(&config)).unwrap();
        assert!(options.clean_session());
    }

    /// A Mosquitto broker on a free loopback port, killed on drop.
    struct Mosquitto {
        child: std::process::Child,
        port: u16,
        dir: tempfile::TempDir,
    }

    const BROKER: &str = "/usr/sbin/mosquitto";
    const DEADLINE: Duration = Duration::from_secs(10);

    impl Mosquitto {
        fn start() -> Self {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .unwrap()
                .port();
            Self::start_on(port)
        }

        fn start_on(port: u16) -> Self {
            assert!(
                std::path::Path::new(BROKER).exists(),
                "{BROKER} is missing: `apt-get install -y mosquitto`"
            );
            let dir = tempfile::tempdir().unwrap();
            let conf = dir.path().join("mosquitto.conf");
            std::fs::write(
                &conf,
                format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
            )
            .unwrap();
            let log = std::fs::File::create(dir.path().join("mosquitto.log")).unwrap();
            let child = std::process::Command::new(BROKER)
                .arg("-c")
                .arg(&conf)
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            let mut broker = Self { child, port, dir };
            broker.wait_until_listening();
            broker
        }

        fn wait_until_listening(&mut self) {
            let deadline = Instant::now() + DEADLINE;
            loop {
                if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                    return;
                }
                if let Ok(Some(status)) = self.child.try_wait() {
                    panic!("mosquitto exited with {status}: {}", self.log());
                }
                assert!(Instant::now() < deadline, "mosquitto not listening: {}", self.log());
                std::thread::sleep(Duration::from_millis(20));
            }
        }

        fn log(&self) -> String {
            std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
        }
    }

    impl Drop for Mosquitto {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// A test publisher: its own client with a polling task (auto acks), aborted on drop.
    struct Publisher {
        client: AsyncClient,
        task: tokio::task::JoinHandle<()>,
    }

    impl Publisher {
        fn connect(port: u16) -> Self {
            let id = format!("test-publisher-{}", fastrand::u64(..));
            let (client, mut eventloop) =
                AsyncClient::new(MqttOptions::new(id, "127.0.0.1", port), 64);
            let task = tokio::spawn(async move {
                loop {
                    if eventloop.poll().await.is_err() {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            });
            Self { client, task }
        }

        async fn publish(&self, topic: &str, qos: QoS, payload: &[u8]) {
            self.client.publish(topic, qos, false, payload.to_vec()).await.unwrap();
        }
    }

    impl Drop for Publisher {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    /// A running source under test.
    struct Source {
        rx: mpsc::Receiver<Ingest>,
        cancel: CancellationToken,
        task: tokio::task::JoinHandle<Result<(), SourceError>>,
        metrics: Arc<Metrics>,
    }

    const PROBE_TOPIC: &str = "plant/probe/probe";

    impl Source {
        fn start(config: Config) -> Self {
            let (tx, rx) = mpsc::channel(64);
            let cancel = CancellationToken::new();
            let metrics = Arc::new(Metrics::default());
            let task = tokio::spawn(crate::source::run(
                0,
                Arc::new(config),
                tx,
                metrics.clone(),
                cancel.clone(),
            ));
            Self { rx, cancel, task, metrics }
        }

        /// The next ingest that is not a probe (probes are acknowledged and skipped).
        async fn next(&mut self) -> Ingest {
            loop {
                let ingest = tokio::time::timeout(DEADLINE, self.rx.recv())
                    .await
                    .expect("no message before the deadline")
                    .expect("the source stopped");
                if ingest.event.as_ref().is_some_and(|e| e.series == "probe/probe") {
                    if let Some(ack) = ingest.ack {
                        ack.send();
                    }
                    continue;
                }
                return ingest;
            }
        }

        /// Publishes probes until one comes through: the source is connected and subscribed.
        async fn wait_until_subscribed(&mut self, publisher: &Publisher) {
            let deadline = Instant::now() + DEADLINE;
            loop {
                publisher.publish(PROBE_TOPIC, QoS::AtLeastOnce, br#"{"value": 0}"#).await;
                let wait = tokio::time::timeout(Duration::from_millis(200), self.rx.recv()).await;
                if let Ok(Some(ingest)) = wait {
                    assert_eq!(ingest.event.as_ref().unwrap().series, "probe/probe");
                    if let Some(ack) = ingest.ack {
                        ack.send();
                    }
                    return;
                }
                assert!(Instant::now() < deadline, "the source never received a probe");
            }
        }

        async fn stop(self) {
            self.cancel.cancel();
            let result = tokio::time::timeout(DEADLINE, self.task).await.unwrap().unwrap();
            assert!(result.is_ok(), "{result:?}");
        }
    }

    #[tokio::test]
    async fn messages_become_ingests_with_series_value_ack_and_redelivery_key() {
        let broker = Mosquitto::start();
        let publisher = Publisher::connect(broker.port);
        let mut source = Source::start(config(broker.port, "edgewise-test-decode", ""));
        source.wait_until_subscribed(&publisher).await;

        let good = br#"{"value": 21.5, "ts": 1700000000}"#;
        publisher.publish("plant/line1/pump-1", QoS::AtLeastOnce, good).await;
        publisher.publish("plant/line1/pump-2", QoS::AtLeastOnce, b"not json").await;
        publisher.publish("plant/line1/pump-3", QoS::AtMostOnce, br#"{"value": 3}"#).await;
        let before_ms = now_ms();

        let first = source.next().await;
        let event = first.event.as_ref().unwrap();
        assert_eq!(event.series, "line1/pump-1");
        assert_eq!(event.value, 21.5);
        assert_eq!(event.ts_ms, 1_700_000_000_000);
        assert_eq!(event.source, 0);
        assert!(event.received_ms >= before_ms - 5_000 && event.received_ms <= now_ms());
        let redelivery = first.redelivery.unwrap();
        assert_eq!(redelivery.source, 0);
        assert!(!redelivery.dup);
        assert_eq!(redelivery.hash, message_hash("plant/line1/pump-1", good));
        assert!(first.ack.is_some());

        let bad = source.next().await;
        assert!(bad.event.is_none() && bad.redelivery.is_none());
        assert!(bad.ack.is_some(), "a rejected QoS 1 message is still acknowledged");
        assert_eq!(source.metrics.rejected().get(&("plant".to_string(), "invalid_json")), Some(&1));

        let qos0 = source.next().await;
        let event = qos0.event.as_ref().unwrap();
        assert_eq!((event.series.as_str(), event.value), ("line1/pump-3", 3.0));
        assert_eq!(event.ts_ms, event.received_ms, "no payload timestamp: receive time");
        assert!(qos0.ack.is_none() && qos0.redelivery.is_none());

        for ingest in [first, bad] {
            ingest.ack.unwrap().send();
        }
        source.stop().await;
    }

    #[tokio::test]
    async fn an_unacked_message_is_redelivered_with_dup_and_not_after_its_ack() {
        let broker = Mosquitto::start();
        let publisher = Publisher::connect(broker.port);
        let client_id = "edgewise-test-redelivery";

        // First run: receive M and stop without acknowledging it.
        let mut first_run = Source::start(config(broker.port, client_id, ""));
        first_run.wait_until_subscribed(&publisher).await;
        publisher.publish("plant/line1/pump-1", QoS::AtLeastOnce, br#"{"value": 1}"#).await;
        let original = first_run.next().await;
        let original_key = original.redelivery.unwrap();
        assert!(!original_key.dup);
        first_run.stop().await;
        drop(original);

        // Second run, same client id: the broker still waits for M's PUBACK and redelivers it.
        let mut second_run = Source::start(config(broker.port, client_id, ""));
        let again = second_run.next().await;
        let key = again.redelivery.unwrap();
        assert!(key.dup, "a redelivery carries DUP");
        assert_eq!((key.pkid, key.hash), (original_key.pkid, original_key.hash));
        assert_eq!(again.event.as_ref().unwrap().value, 1.0);
        again.ack.unwrap().send();
        second_run.stop().await;

        // Third run: M was acknowledged, so the first message is the next new one.
        let mut third_run = Source::start(config(broker.port, client_id, ""));
        third_run.wait_until_subscribed(&publisher).await;
        publisher.publish("plant/line1/pump-1", QoS::AtLeastOnce, br#"{"value": 2}"#).await;
        let next = third_run.next().await;
        assert_eq!(next.event.as_ref().unwrap().value, 2.0, "M was redelivered after its ack");
        assert!(!next.redelivery.unwrap().dup);
        next.ack.unwrap().send();
        third_run.stop().await;
    }

    #[tokio::test]
    async fn the_source_reconnects_and_resubscribes_after_the_broker_restarts() {
        let broker = Mosquitto::start();
        let port = broker.port;
        let mut source = Source::start(config(port, "edgewise-test-restart", ""));
        {
            let publisher = Publisher::connect(port);
            source.wait_until_subscribed(&publisher).await;
        }
        // The new broker has no session for us (persistence false): the source must
        // subscribe again on its own.
        drop(broker);
        let _broker = Mosquitto::start_on(port);
        let publisher = Publisher::connect(port);
        source.wait_until_subscribed(&publisher).await;
        publisher.publish("plant/line2/pump-9", QoS::AtLeastOnce, br#"{"value": 9}"#).await;
        let ingest = source.next().await;
        assert_eq!(ingest.event.as_ref().unwrap().series, "line2/pump-9");
        ingest.ack.unwrap().send();
        source.stop().await;
    }

    #[tokio::test]
    async fn an_unreachable_broker_does_not_stop_the_source_and_cancel_does() {
        let port =
            std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).unwrap().port();
        let source = Source::start(config(port, "edgewise-test-unreachable", ""));
        // Let it fail a few connection attempts (20 ms initial backoff).
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(!source.task.is_finished());
        source.stop().await;
    }

    #[test]
    fn the_message_hash_separates_topic_from_payload() {
        assert_ne!(message_hash("ab", b"c"), message_hash("a", b"bc"));
        assert_eq!(message_hash("t/1", b"{}"), message_hash("t/1", b"{}"));
        assert_ne!(message_hash("t/1", b"{}"), message_hash("t/2", b"{}"));
    }
}
