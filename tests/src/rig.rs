//! The fixture most end-to-end and fault tests start from: a broker, a receiver and the
//! agent's directory and configuration, plus the checks every test ends with.
//!
//! A test builds a [`Rig`], adjusts `rig.config` (lateness, rules, the MQTT port when a proxy
//! sits in between), starts the agent with [`Rig::start_agent`] and publishes with
//! [`Rig::publisher`]; at the end it checks the stream with [`assert_clean_stream`].
//!
//! For the fault suite: [`Load`] publishes a steady QoS 1 load in a thread while a test
//! injects faults; [`wait_accounted`] and [`account`] compare the received summaries with the
//! expected ones window by window (events lost, events counted twice after de-duplication);
//! [`assert_accounted`] requires both to be zero and the stream clean; [`print_figures`]
//! prints the test's `FIGURES` line; [`fault_scale`] reads `EDGEWISE_FAULT_SCALE`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sensors::record::Summary;

use crate::agent::Agent;
use crate::config::AgentConfig;
use crate::expect::{ExpectedSummary, Reading, compare_summaries};
use crate::mosquitto::Mosquitto;
use crate::publisher::{Publisher, QoS};
use crate::receiver::Receiver;
use crate::wait::{Deadline, now_ms, wait_until};

/// How long [`Rig::start_agent`] waits for the agent's subscription: a start on a busy
/// machine replays its journal and connects within a few seconds.
pub const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(20);

/// A broker, a receiver and the agent's directory for one test.
#[derive(Debug)]
pub struct Rig {
    /// The test's broker (restartable, persistent sessions).
    pub broker: Mosquitto,
    /// The test's upstream.
    pub receiver: Receiver,
    /// The agent's configuration, pointing at `broker` and `receiver`.
    pub config: AgentConfig,
    /// The test's temp dir; the agent lives in `agent/` below it.
    pub dir: tempfile::TempDir,
}

impl Rig {
    /// Starts a broker and a receiver and configures an agent `agent_id` between them, with
    /// its data in a fresh temp dir.
    pub fn new(agent_id: &str) -> Rig {
        let dir = tempfile::Builder::new().prefix("edgewise-e2e-").tempdir().unwrap();
        let broker = Mosquitto::start();
        let receiver = Receiver::start();
        let config = AgentConfig::new(
            agent_id,
            dir.path().join("agent/data"),
            broker.port(),
            &receiver.url(),
        );
        Rig { broker, receiver, config, dir }
    }

    /// Keeps the test's directory (agent config, data and logs) when `EDGEWISE_E2E_KEEP` is
    /// set, for a look after a passing run; failing runs print the logs anyway.
    pub fn keep_if_asked(self) {
        if std::env::var_os("EDGEWISE_E2E_KEEP").is_some() {
            let path = self.dir.keep();
            let _ = std::fs::write(path.join("mosquitto.log"), self.broker.log());
            eprintln!("kept {}", path.display());
        }
    }

    /// The agent's directory: config, logs and `data/`.
    pub fn agent_dir(&self) -> PathBuf {
        self.dir.path().join("agent")
    }

    /// Starts the agent and waits until it has subscribed, so that nothing published
    /// afterwards can miss its session.
    #[track_caller]
    pub fn start_agent(&self) -> Agent {
        let mut agent = Agent::start(&self.config.toml(), &self.agent_dir());
        let client_id = self.config.client_id();
        let ready = wait_until(SUBSCRIBE_TIMEOUT, || {
            self.broker.has_subscriber(&client_id) || !agent.is_running()
        });
        agent.assert_running("the agent stopped during start-up");
        assert!(
            ready,
            "{client_id} did not subscribe in {SUBSCRIBE_TIMEOUT:?}; broker log:\n{}",
            self.broker.log()
        );
        agent
    }

    /// A publisher connected straight to the broker (never through a proxy).
    pub fn publisher(&self, name: &str) -> Publisher {
        Publisher::connect(self.broker.port(), name)
    }
}

/// The MQTT messages (topic, JSON payload) of `readings`, in order.
pub fn messages(readings: &[Reading]) -> Vec<(String, Vec<u8>)> {
    readings.iter().map(Reading::message).collect()
}

/// Asserts the receiver saw a clean stream: no wire-format error, no conflicting copies, no
/// out-of-order first delivery, no sequence hole that a gap record does not explain.
/// Duplicates of a record id are allowed (the receiver de-duplicates them, as the upstream
/// does); a duplicate with different content is a conflict.
#[track_caller]
pub fn assert_clean_stream(receiver: &Receiver) {
    receiver.with(|r| {
        assert!(r.protocol_errors.is_empty(), "wire-format errors: {:?}", r.protocol_errors);
        assert!(r.conflicts.is_empty(), "same id, different content: {:?}", r.conflicts);
        assert!(r.order_violations.is_empty(), "out of order: {:?}", r.order_violations);
        let holes = r.holes();
        assert!(holes.is_empty(), "records lost without a gap record: {holes:?}");
    });
}

/// How the distinct summaries a receiver holds account for the events a test published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accounting {
    /// Events published (and acknowledged by the broker).
    pub published: u64,
    /// Σ `count` over the distinct summaries received.
    pub counted: u64,
    /// Events of expected windows that no summary counts: per window, expected count minus
    /// the counts received for it, where positive.
    pub lost: u64,
    /// Events counted more than once after de-duplication by record id: per window, counts
    /// received beyond the expected count, plus every count of an unexpected window.
    pub duplicated: u64,
}

/// Compares the distinct summaries `received` with the `expected` ones window by window.
pub fn account(
    expected: &BTreeMap<(String, i64), ExpectedSummary>,
    received: &[&Summary],
) -> Accounting {
    let mut counts: BTreeMap<(String, i64), u64> = BTreeMap::new();
    for s in received {
        *counts.entry((s.series.clone(), s.start_ms)).or_default() += s.count;
    }
    let published = expected.values().map(|e| e.count).sum();
    let counted = counts.values().sum();
    let mut lost = 0;
    let mut duplicated = 0;
    for (key, e) in expected {
        let got = counts.get(key).copied().unwrap_or(0);
        lost += e.count.saturating_sub(got);
        duplicated += got.saturating_sub(e.count);
    }
    duplicated +=
        counts.iter().filter(|(k, _)| !expected.contains_key(*k)).map(|(_, n)| n).sum::<u64>();
    Accounting { published, counted, lost, duplicated }
}

/// Prints the `FIGURES` line of a fault test to stderr (RELIABILITY.md quotes them):
/// `FIGURES fault=<fault> runs=<runs> events=<published> lost=<n> duplicates_raw=<copies the
/// receiver dropped> duplicates_after_dedup=<events counted twice>`.
pub fn print_figures(fault: &str, runs: u64, accounting: &Accounting, duplicates_raw: u64) {
    eprintln!(
        "FIGURES fault={fault} runs={runs} events={} lost={} duplicates_raw={duplicates_raw} \
         duplicates_after_dedup={}",
        accounting.published, accounting.lost, accounting.duplicated
    );
}

/// `EDGEWISE_FAULT_SCALE` (default 1, at least 1): the factor a fault test multiplies its
/// runs and load by, for a manual soak.
pub fn fault_scale() -> u64 {
    std::env::var("EDGEWISE_FAULT_SCALE")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(1)
        .max(1)
}

/// A steady QoS 1 load in its own thread: every `tick`, `per_tick` readings round-robin over
/// `series` series (`s/<name>-<i>`), stamped `lead_ms` ahead of the wall clock (strictly
/// increasing), published straight to the broker and waited for (PUBACK) before the next
/// tick. [`Load::stop`] returns what was acknowledged.
#[derive(Debug)]
pub struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    thread: JoinHandle<Vec<Reading>>,
}

impl Load {
    /// Connects a publisher `name` to the broker on `broker_port` and starts publishing.
    pub fn start(
        broker_port: u16,
        name: &str,
        series: usize,
        per_tick: usize,
        tick: Duration,
        lead_ms: i64,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let publisher = Publisher::connect(broker_port, name);
        let thread = {
            let (stop, acked, name) = (stop.clone(), acked.clone(), name.to_string());
            std::thread::spawn(move || {
                let mut readings = Vec::new();
                let mut last_ts = 0;
                let mut i = 0usize;
                while !stop.load(Ordering::SeqCst) {
                    let started = Instant::now();
                    let batch: Vec<Reading> = (0..per_tick)
                        .map(|_| {
                            last_ts = (now_ms() + lead_ms).max(last_ts + 1);
                            let r = Reading::new(
                                format!("s/{name}-{}", i % series),
                                last_ts,
                                (i % 97) as f64 / 4.0,
                            );
                            i += 1;
                            r
                        })
                        .collect();
                    publisher.publish_all(QoS::AtLeastOnce, messages(&batch));
                    readings.extend(batch);
                    acked.store(readings.len() as u64, Ordering::SeqCst);
                    std::thread::sleep(tick.saturating_sub(started.elapsed()));
                }
                readings
            })
        };
        Load { stop, acked, thread }
    }

    /// Readings acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::SeqCst)
    }

    /// Stops after the current tick and returns every acknowledged reading; re-raises a panic
    /// of the publishing thread (a lost connection or a missing PUBACK).
    pub fn stop(self) -> Vec<Reading> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }
}

/// Longest wait for records that are due once a fault is over.
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(60);

/// Waits (up to [`DELIVERY_TIMEOUT`]) until the distinct summaries count every expected event
/// and cover every expected window; returns the accounting either way, for the figures.
pub fn wait_accounted(
    receiver: &Receiver,
    expected: &BTreeMap<(String, i64), ExpectedSummary>,
) -> Accounting {
    let published: u64 = expected.values().map(|e| e.count).sum();
    wait_until(DELIVERY_TIMEOUT, || {
        receiver
            .with(|r| r.summary_count_total() >= published && r.summaries().len() >= expected.len())
    });
    receiver.with(|r| account(expected, &r.summaries()))
}

/// Asserts that the summaries account for every published event exactly: nothing lost,
/// nothing counted twice, each window's statistics as expected, and a clean stream.
#[track_caller]
pub fn assert_accounted(
    receiver: &Receiver,
    expected: &BTreeMap<(String, i64), ExpectedSummary>,
    accounting: &Accounting,
) {
    receiver.with(|r| {
        assert_eq!(accounting.lost, 0, "acknowledged events lost: {}", r.describe());
        assert_eq!(accounting.duplicated, 0, "events counted twice: {}", r.describe());
        assert_eq!(accounting.counted, accounting.published, "{}", r.describe());
        let problems = compare_summaries(expected, &r.summaries());
        assert!(problems.is_empty(), "summaries differ: {problems:#?}");
    });
    assert_clean_stream(receiver);
}

/// Rounds of QoS 1 readings published from the test's thread, one reading per series per
/// round, with strictly increasing timestamps, remembered for the accounting. Series
/// `<prefix>/0` runs hot (90) for 10 rounds in every 20 and cool (20) otherwise, for a
/// threshold rule to raise and clear; the others wander between 10 and 32.
pub struct Rounds {
    /// The publisher (waits for every PUBACK).
    pub publisher: Publisher,
    /// Everything published, in order.
    pub readings: Vec<Reading>,
    /// The last timestamp used (ms).
    pub last_ts: i64,
    /// Rounds published.
    pub round: usize,
    prefix: String,
    series: usize,
}

impl std::fmt::Debug for Rounds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rounds")
            .field("prefix", &self.prefix)
            .field("round", &self.round)
            .field("published", &self.readings.len())
            .finish_non_exhaustive()
    }
}

impl Rounds {
    /// Connects publisher `name` to the broker on `broker_port`.
    pub fn new(broker_port: u16, name: &str, prefix: &str, series: usize) -> Rounds {
        Rounds {
            publisher: Publisher::connect(broker_port, name),
            readings: Vec::new(),
            last_ts: 0,
            round: 0,
            prefix: prefix.to_string(),
            series,
        }
    }

    /// The hot series' key.
    pub fn hot(&self) -> String {
        format!("{}/0", self.prefix)
    }

    /// The next timestamp: now, or 1 ms after the last one.
    pub fn next_ts(&mut self) -> i64 {
        self.last_ts = now_ms().max(self.last_ts + 1);
        self.last_ts
    }

    /// Publishes one round and waits for its PUBACKs.
    pub fn round(&mut self) {
        let hot_phase = (self.round / 10) % 2 == 1;
        let batch: Vec<Reading> = (0..self.series)
            .map(|s| {
                let value = match s {
                    0 if hot_phase => 90.0,
                    0 => 20.0,
                    _ => 10.0 + ((self.round * 7 + s * 3) % 23) as f64,
                };
                Reading::new(format!("{}/{s}", self.prefix), self.next_ts(), value)
            })
            .collect();
        self.publish(batch);
        self.round += 1;
    }

    /// Publishes `readings` (and remembers them).
    pub fn publish(&mut self, readings: Vec<Reading>) {
        self.publisher.publish_all(QoS::AtLeastOnce, readings.iter().map(Reading::message));
        self.readings.extend(readings);
    }

    /// Publishes a round every `every` for `duration`.
    pub fn run_for(&mut self, duration: Duration, every: Duration) {
        let deadline = Deadline::after(duration);
        while !deadline.passed() {
            let started = Instant::now();
            self.round();
            std::thread::sleep(every.saturating_sub(started.elapsed()));
        }
    }
}
