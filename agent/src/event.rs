//! The values that flow along the data path: events from sources, journal entries, and the
//! ingest messages that carry an acknowledgement back to the source.

use serde::{Deserialize, Serialize};

/// One accepted sensor reading.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Series key, e.g. `pump-1/temperature`.
    pub series: String,
    /// Event time: ms since the Unix epoch (from the payload, or the receive time).
    pub ts_ms: i64,
    /// The reading.
    pub value: f64,
    /// Receive time on the gateway, ms since the Unix epoch.
    pub received_ms: i64,
    /// Index of the source in the configuration's `sources` list.
    pub source: u16,
}

/// One entry of the journal: the processor's whole input, so that replaying the journal
/// reproduces its output exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Entry {
    /// An accepted event.
    Event(Event),
    /// The gateway clock at this point of the log; closes windows and fires timers when no
    /// event arrives. Postcard discriminant 1: append new variants after it.
    Tick {
        /// Gateway time, ms since the Unix epoch.
        now_ms: i64,
    },
}

/// How the journal recognises a QoS 1 message that the broker redelivers after a crash
/// (its PUBACK was lost): the packet id is unique among unacknowledged messages of one
/// session, and the hash tells a redelivery from a new message that reuses the packet id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Redelivery {
    /// Index of the source.
    pub source: u16,
    /// MQTT packet id.
    pub pkid: u16,
    /// Hash of topic and payload.
    pub hash: u64,
    /// The DUP flag of the PUBLISH: only a DUP message can be a redelivery.
    pub dup: bool,
}

/// An acknowledgement that the journal sends back once the entry it belongs to is durable.
/// For MQTT it returns the PUBLISH to the source's event-loop task, which sends the PUBACK
/// (one task polls and acks: rumqttc deadlocks when another task awaits its request channel).
#[derive(Debug)]
pub struct Ack {
    tx: tokio::sync::mpsc::UnboundedSender<rumqttc::Publish>,
    publish: rumqttc::Publish,
}

impl Ack {
    /// An ack that hands `publish` back through `tx`.
    pub fn new(
        tx: tokio::sync::mpsc::UnboundedSender<rumqttc::Publish>,
        publish: rumqttc::Publish,
    ) -> Self {
        Self { tx, publish }
    }

    /// Sends the acknowledgement (ignored if the source is gone: the broker redelivers).
    pub fn send(self) {
        let _ = self.tx.send(self.publish);
    }
}

/// What a source hands to the journal writer.
#[derive(Debug)]
pub struct Ingest {
    /// The event, or `None` for a rejected message that only needs its ack (bad payloads
    /// are acknowledged so the broker does not redeliver them forever).
    pub event: Option<Event>,
    /// Sent after the commit that holds the event is flushed.
    pub ack: Option<Ack>,
    /// Set for QoS 1 MQTT messages: lets the journal drop broker redeliveries.
    pub redelivery: Option<Redelivery>,
}

/// Wall-clock time in ms since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
