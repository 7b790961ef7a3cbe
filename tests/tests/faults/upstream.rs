//! Upstream faults: the agent forwards to a receiver that fails on purpose, one kind of
//! fault after another, then all of them mixed at random (seeded), while readings arrive
//! over MQTT at QoS 1 (so the test knows exactly what was published). The faults:
//!
//! - 5xx answers (500, 502, 503, 504);
//! - timeouts: the receiver stores the batch but holds the answer past the agent's upstream
//!   timeout (400 ms here), so the agent sends it again: raw duplicates;
//! - slow answers (200 after 150 ms, within the timeout);
//! - connections reset without an answer;
//! - accept then fail: the batch is read in full, kept apart as received-but-failed (never
//!   delivered), and answered 500 or the connection closed.
//!
//! Then the receiver is healthy again and the outbox must drain. Every published event must
//! be accounted for exactly once after de-duplication by record id (each 1 s window's summary
//! exact, no gap records since nothing is evicted), every alert must arrive, every
//! received-but-failed record must have been delivered later, raw duplicates are allowed but
//! counted, and the agent must still run (and stop cleanly).
//!
//! `EDGEWISE_FAULT_SCALE` multiplies the faults per episode and of the mixed phase;
//! `EDGEWISE_FAULT_SEED` changes the seed of the mixed phase (default 7).

use std::time::{Duration, Instant};

use edgewise_tests::api::metric;
use edgewise_tests::receiver::{Fault, FaultPlan};
use edgewise_tests::rig::{Rounds, account, assert_clean_stream};
use edgewise_tests::{
    Agent, AgentConfig, Deadline, Mosquitto, Received, Receiver, compare_alerts, compare_summaries,
    expected_summaries, expected_threshold_alerts, free_port, now_ms, wait_until,
};

/// Series published every round.
const SERIES: usize = 20;
/// One round of readings every this long.
const ROUND: Duration = Duration::from_millis(100);
/// The series the threshold rule watches; it runs hot for 10 rounds in every 20.
const HOT: &str = "s/up/0";
/// The agent's upstream timeout in this test (the harness default is 5 s).
const UPSTREAM_TIMEOUT: &str = "400ms";
/// How long a `Timeout` answer is held: well past [`UPSTREAM_TIMEOUT`].
const HOLD: Duration = Duration::from_millis(1_000);
/// How long a `Slow` answer is delayed: within [`UPSTREAM_TIMEOUT`].
const SLOW: Duration = Duration::from_millis(150);
/// Faults injected per single-fault episode (times the scale).
const PER_EPISODE: u64 = 3;
/// Faults injected in the mixed phase (times the scale).
const MIXED: u64 = 12;
/// Longest time one phase may take to inject its faults.
const PHASE_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest wait for the outbox to drain once the receiver is healthy.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Publishes a round of `load` every [`ROUND`] until `done` holds; panics after
/// [`PHASE_TIMEOUT`] or when the agent stops.
fn until(load: &mut Rounds, agent: &mut Agent, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Deadline::after(PHASE_TIMEOUT);
    loop {
        let started = Instant::now();
        load.round();
        if done() {
            return;
        }
        agent.assert_running(what);
        assert!(!deadline.passed(), "{what}: not done within {PHASE_TIMEOUT:?}");
        std::thread::sleep(ROUND.saturating_sub(started.elapsed()));
    }
}

#[test]
fn upstream_faults_lose_nothing_and_duplicate_nothing_after_dedup() {
    let scale = env_u64("EDGEWISE_FAULT_SCALE", 1).max(1);
    let seed = env_u64("EDGEWISE_FAULT_SEED", 7);
    let dir = tempfile::Builder::new().prefix("edgewise-faults-").tempdir().unwrap();
    let broker = Mosquitto::start();
    let receiver = Receiver::start();
    let api_port = free_port();
    let mut config = AgentConfig::new(
        "gw-upfault",
        dir.path().join("agent/data"),
        broker.port(),
        &receiver.url(),
    );
    config.threshold_rule("hot", HOT, 50.0, 40.0);
    config.extra.push_str(&format!("\n[api]\nlisten = \"127.0.0.1:{api_port}\"\n"));
    let toml = config.toml();
    assert!(toml.contains("timeout = \"5s\""), "the harness config changed:\n{toml}");
    let toml = toml.replace("timeout = \"5s\"", &format!("timeout = {UPSTREAM_TIMEOUT:?}"));
    let mut agent = Agent::start(&toml, &dir.path().join("agent"));
    let client_id = config.client_id();
    let subscribed = wait_until(Duration::from_secs(20), || {
        broker.has_subscriber(&client_id) || !agent.is_running()
    });
    agent.assert_running("the agent stopped during start-up");
    assert!(subscribed, "{client_id} did not subscribe; broker log:\n{}", broker.log());
    let mut load = Rounds::new(broker.port(), "upfault-pub", "s/up", SERIES);

    // A healthy start: something arrives before the faults begin.
    until(&mut load, &mut agent, "first delivery", || receiver.unique_count() > 0);

    // One episode per fault: every request fails that way until it happened often enough.
    let started = Instant::now();
    let mut episodes = Vec::new();
    for fault in Fault::ALL {
        let before = receiver.fault_count(fault);
        receiver.set_faults(FaultPlan::always(fault).with_delays(HOLD, SLOW));
        let what = format!("{fault:?} episode");
        until(&mut load, &mut agent, &what, || {
            receiver.fault_count(fault) >= before + PER_EPISODE * scale
        });
        episodes.push((format!("{fault:?}"), receiver.fault_count(fault) - before));
    }
    // All of them mixed, half of the requests failing, seeded.
    let before = receiver.with(Received::faults_injected);
    receiver.set_faults(FaultPlan::mixed(0.5, seed).with_delays(HOLD, SLOW));
    until(&mut load, &mut agent, "mixed faults", || {
        receiver.with(Received::faults_injected) >= before + MIXED * scale
    });
    episodes.push(("mixed".into(), receiver.with(Received::faults_injected) - before));
    receiver.clear_faults();
    let fault_time = started.elapsed();

    // Healthy again: the last windows close (1 s + 500 ms lateness) and everything drains.
    let published = load.readings.len() as u64;
    let last_ts = load.last_ts;
    assert!(wait_until(Duration::from_secs(10), || now_ms() > last_ts + 1_000 + 500 + 200));
    let alerts =
        expected_threshold_alerts(load.readings.iter().filter(|r| r.series == HOT), 50.0, 40.0);
    assert!(alerts.len() >= 2, "the load is meant to run hot: {alerts:?}");
    let drain_started = Instant::now();
    let drained = wait_until(DRAIN_TIMEOUT, || {
        let arrived = receiver
            .with(|r| r.summary_count_total() >= published && r.alerts().len() >= alerts.len());
        arrived && metric(api_port, "edgewise_outbox_records") == Some(0.0)
    });
    let drain_time = drain_started.elapsed();
    assert!(
        drained,
        "not drained in {DRAIN_TIMEOUT:?}: published {published}, outbox records {:?}; {}",
        metric(api_port, "edgewise_outbox_records"),
        receiver.describe()
    );
    agent.assert_running("after the faults");

    let expected = expected_summaries(&load.readings, 1_000);
    assert_clean_stream(&receiver);
    let (lost, duplicated, raw_duplicates, injected) = receiver.with(|r| {
        assert!(r.gaps().is_empty(), "nothing was evicted, yet gaps: {:?}", r.gaps());
        let never = r.failed_never_delivered();
        assert!(never.is_empty(), "received-but-failed, never delivered: {never:?}");
        for fault in Fault::ALL {
            assert!(r.faults.get(&fault).is_some_and(|n| *n > 0), "{fault:?} never injected");
        }
        assert!(!r.failed_batches.is_empty(), "no batch was failed after receipt");

        // Per window: events counted too few times (lost) or too many (duplicated).
        let accounting = account(&expected, &r.summaries());
        let problems = compare_summaries(&expected, &r.summaries());
        assert!(problems.is_empty(), "summaries differ: {problems:#?}");
        let problems = compare_alerts(&alerts, &r.alerts());
        assert!(problems.is_empty(), "alerts differ: {problems:#?}");
        assert_eq!(r.summary_count_total(), published, "every event once: {}", r.describe());
        eprintln!(
            "upstream faults: {published} events in {} rounds, faults {:?} over {fault_time:?} \
             (episodes {episodes:?}, seed {seed}); {} batches delivered, {} failed after \
             receipt; {} raw records, {} unique, {} raw duplicates; {} alerts; drained in \
             {drain_time:?}",
            load.round,
            r.faults,
            r.batches.len(),
            r.failed_batches.len(),
            r.raw_records,
            r.unique_count(),
            r.duplicates,
            r.alerts().len(),
        );
        (accounting.lost, accounting.duplicated, r.duplicates, r.faults_injected())
    });
    assert_eq!((lost, duplicated), (0, 0), "lost / duplicated events after dedup");

    let status = agent.terminate();
    assert!(status.success(), "SIGTERM should stop the agent cleanly, got {status}");
    eprintln!(
        "FIGURES fault=upstream_faults runs={injected} events={published} lost={lost} \
         duplicates_raw={raw_duplicates} duplicates_after_dedup={duplicated}"
    );
}
