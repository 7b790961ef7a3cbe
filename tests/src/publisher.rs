//! An MQTT client for tests (rumqttc): publishes at QoS 0 or 1 and waits for every PUBACK,
//! so that "published" means "the broker has it". It can also subscribe, which the tests of
//! the broker fixture use.
//!
//! One task polls the event loop and only counts; the test thread sends requests through the
//! client handle (rumqttc deadlocks when the polling task itself awaits the request channel).
//! A connection lost while publishes are unacknowledged is reported, never papered over by a
//! resend: a resend would make the broker deliver a message twice and break the exact counts
//! the end-to-end tests assert.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, Incoming, MqttOptions, Outgoing};

pub use rumqttc::QoS;

use crate::wait::wait_until;

/// How long [`Publisher::publish_all`] waits for the broker's acknowledgements.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
struct Counters {
    outgoing_publishes: AtomicU64,
    pubacks: AtomicU64,
    subacks: AtomicU64,
    connacks: AtomicU64,
    connection_errors: AtomicU64,
    connected: AtomicBool,
    last_error: Mutex<Option<String>>,
    received: Mutex<Vec<(String, Vec<u8>)>>,
}

/// A connected MQTT client; its connection is dropped with it.
#[derive(Debug)]
pub struct Publisher {
    rt: tokio::runtime::Runtime,
    client: AsyncClient,
    counters: Arc<Counters>,
    poller: tokio::task::JoinHandle<()>,
    client_id: String,
}

impl Publisher {
    /// Connects with a clean session and waits for the CONNACK.
    pub fn connect(port: u16, client_id: &str) -> Publisher {
        Publisher::connect_with(port, client_id, true)
    }

    /// Connects, with a persistent session when `clean_session` is false, and waits for the
    /// CONNACK.
    pub fn connect_with(port: u16, client_id: &str, clean_session: bool) -> Publisher {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
        options
            .set_clean_session(clean_session)
            .set_keep_alive(Duration::from_secs(30))
            .set_inflight(100)
            .set_max_packet_size(256 * 1024, 256 * 1024);
        let (client, eventloop) = AsyncClient::new(options, 1000);
        let counters = Arc::new(Counters::default());
        let poller = rt.spawn(poll(eventloop, counters.clone()));
        let publisher =
            Publisher { rt, client, counters, poller, client_id: client_id.to_string() };
        let connected = wait_until(Duration::from_secs(10), || {
            publisher.counters.connacks.load(Ordering::SeqCst) > 0
        });
        assert!(
            connected,
            "{client_id} could not connect to 127.0.0.1:{port}: {:?}",
            publisher.last_error()
        );
        publisher
    }

    /// The last connection error, if any.
    pub fn last_error(&self) -> Option<String> {
        self.counters.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// How many times the connection failed.
    pub fn connection_errors(&self) -> u64 {
        self.counters.connection_errors.load(Ordering::SeqCst)
    }

    /// How many CONNACKs the client has received (1 + reconnections).
    pub fn connacks(&self) -> u64 {
        self.counters.connacks.load(Ordering::SeqCst)
    }

    /// Waits until the client has connected more than `connacks_before` times, i.e. has
    /// reconnected after a broker restart.
    #[track_caller]
    pub fn wait_reconnected(&self, connacks_before: u64, timeout: Duration) {
        let ok = wait_until(timeout, || {
            self.connacks() > connacks_before && self.counters.connected.load(Ordering::SeqCst)
        });
        assert!(
            ok,
            "{} did not reconnect within {timeout:?}: {:?}",
            self.client_id,
            self.last_error()
        );
    }

    /// Waits until the client is connected (again, after a broker restart).
    #[track_caller]
    pub fn wait_connected(&self, timeout: Duration) {
        let ok = wait_until(timeout, || self.counters.connected.load(Ordering::SeqCst));
        assert!(
            ok,
            "{} did not reconnect within {timeout:?}: {:?}",
            self.client_id,
            self.last_error()
        );
    }

    /// Publishes every message in order and returns once the broker acknowledged all of them
    /// (QoS 1) or they were written to the connection (QoS 0). Panics when the connection is
    /// lost with messages unacknowledged or the acks do not come within [`ACK_TIMEOUT`].
    #[track_caller]
    pub fn publish_all<I, T, P>(&self, qos: QoS, messages: I) -> usize
    where
        I: IntoIterator<Item = (T, P)>,
        T: Into<String>,
        P: Into<Vec<u8>>,
    {
        let errors_before = self.connection_errors();
        let acked_before = self.acknowledged(qos);
        let mut n = 0u64;
        for (topic, payload) in messages {
            let topic = topic.into();
            let result = self.rt.block_on(self.client.publish(topic.clone(), qos, false, payload));
            if let Err(e) = result {
                panic!("publish to {topic} failed: {e}");
            }
            n += 1;
        }
        let target = acked_before + n;
        let done = wait_until(ACK_TIMEOUT, || {
            self.acknowledged(qos) >= target || self.connection_errors() > errors_before
        });
        let acked = self.acknowledged(qos) - acked_before;
        assert!(
            self.connection_errors() == errors_before || acked >= n,
            "{}: connection lost with {} of {n} publishes unacknowledged: {:?}",
            self.client_id,
            n - acked,
            self.last_error()
        );
        assert!(
            done,
            "{}: only {acked} of {n} publishes acknowledged in {ACK_TIMEOUT:?}",
            self.client_id
        );
        n as usize
    }

    fn acknowledged(&self, qos: QoS) -> u64 {
        match qos {
            QoS::AtMostOnce => self.counters.outgoing_publishes.load(Ordering::SeqCst),
            _ => self.counters.pubacks.load(Ordering::SeqCst),
        }
    }

    /// Subscribes and waits for the SUBACK.
    #[track_caller]
    pub fn subscribe(&self, filter: &str, qos: QoS) {
        let before = self.counters.subacks.load(Ordering::SeqCst);
        self.rt
            .block_on(self.client.subscribe(filter, qos))
            .unwrap_or_else(|e| panic!("subscribe {filter}: {e}"));
        let ok = wait_until(Duration::from_secs(10), || {
            self.counters.subacks.load(Ordering::SeqCst) > before
        });
        assert!(ok, "no SUBACK for {filter}");
    }

    /// Messages received on subscriptions so far, as (topic, payload).
    pub fn received(&self) -> Vec<(String, Vec<u8>)> {
        self.counters.received.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Sends DISCONNECT and waits (briefly) for it to leave, then stops polling.
    pub fn disconnect(self) {
        let _ = self.rt.block_on(self.client.disconnect());
        let _ = wait_until(Duration::from_secs(5), || {
            !self.counters.connected.load(Ordering::SeqCst) || self.poller.is_finished()
        });
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.poller.abort();
    }
}

async fn poll(mut eventloop: EventLoop, counters: Arc<Counters>) {
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                counters.connected.store(true, Ordering::SeqCst);
                counters.connacks.fetch_add(1, Ordering::SeqCst);
            }
            Ok(Event::Incoming(Incoming::PubAck(_))) => {
                counters.pubacks.fetch_add(1, Ordering::SeqCst);
            }
            Ok(Event::Incoming(Incoming::SubAck(_))) => {
                counters.subacks.fetch_add(1, Ordering::SeqCst);
            }
            Ok(Event::Incoming(Incoming::Publish(p))) => {
                let topic = p.topic.clone();
                counters
                    .received
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((topic, p.payload.to_vec()));
            }
            Ok(Event::Outgoing(Outgoing::Publish(_))) => {
                counters.outgoing_publishes.fetch_add(1, Ordering::SeqCst);
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                counters.connected.store(false, Ordering::SeqCst);
            }
            Ok(_) => {}
            Err(rumqttc::ConnectionError::RequestsDone) => return,
            Err(e) => {
                let was_connected = counters.connected.swap(false, Ordering::SeqCst);
                if was_connected {
                    counters.connection_errors.fetch_add(1, Ordering::SeqCst);
                }
                *counters.last_error.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(e.to_string());
                // rumqttc reconnects on the next poll without any delay of its own.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
