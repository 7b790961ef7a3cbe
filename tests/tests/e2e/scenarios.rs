//! The end-to-end scenarios: each one owns a temp dir, a broker, a receiver and an agent.
//!
//! Readings carry payload timestamps a little ahead of the clock, so that a busy machine or
//! an agent restart never turns them into late events: windows close by the agent's clock
//! once their end plus `allowed_lateness` has passed, and the test then waits for the
//! summaries instead of sleeping.

use std::time::{Duration, Instant};

use edgewise_tests::rig::{Rig, assert_clean_stream, messages};
use edgewise_tests::{
    Publisher, QoS, Reading, Receiver, compare_alerts, compare_summaries, expected_summaries,
    expected_threshold_alerts, now_ms, wait_for, wait_until, window_start,
};
use sensors::record::{Lane, RecordBody, Severity};

/// Longest wait for records that are due.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(60);

/// Strictly increasing payload timestamps that run `lead_ms` ahead of the wall clock.
struct Stamps {
    lead_ms: i64,
    last: i64,
}

impl Stamps {
    fn new(lead_ms: i64) -> Stamps {
        Stamps { lead_ms, last: 0 }
    }

    fn next(&mut self) -> i64 {
        self.last = (now_ms() + self.lead_ms).max(self.last + 1);
        self.last
    }
}

/// Waits until the receiver holds at least `n` distinct summaries.
#[track_caller]
fn wait_for_summaries(receiver: &Receiver, n: usize) {
    let ok = wait_until(DELIVERY_TIMEOUT, || receiver.with(|r| r.summaries().len() >= n));
    assert!(ok, "expected {n} summaries within {DELIVERY_TIMEOUT:?}; {}", receiver.describe());
}

#[test]
fn known_input_gives_exactly_the_expected_alerts_and_summaries() {
    let mut rig = Rig::new("gw-known");
    rig.config.compression = "gzip".into();
    rig.config.threshold_rule("hot", "s/+/temp", 30.0, 25.0);
    let mut agent = rig.start_agent();

    // Two series over three 1 s windows, 100 ms apart, starting two windows ahead of now.
    // Pump 1 has two excursions; inside them it dips to exactly the clear level (no clear)
    // and peaks again (no second raise); between them it touches exactly the raise level.
    let hot =
        [20.0, 22.0, 24.0, 31.0, 35.0, 28.0, 25.0, 32.0, 24.0, 26.0, 30.0, 33.0, 34.0, 22.0, 20.0];
    let calm =
        [21.0, 22.5, 23.0, 25.0, 29.0, 30.0, 27.0, 26.0, 24.5, 23.0, 22.0, 21.5, 29.9, 28.0, 21.0];
    let base = window_start(now_ms() + 2_000, 1_000);
    let mut readings = Vec::new();
    for i in 0..hot.len() {
        let ts = base + i as i64 * 100;
        readings.push(Reading::new("s/pump-1/temp", ts + 7, hot[i]));
        readings.push(Reading::new("s/pump-2/temp", ts + 53, calm[i]));
    }
    let publisher = rig.publisher("known-pub");
    publisher.publish_all(QoS::AtLeastOnce, messages(&readings));

    let summaries = expected_summaries(&readings, 1_000);
    let alerts = expected_threshold_alerts(&readings, 30.0, 25.0);
    assert_eq!(alerts.len(), 4, "the input is meant to have two excursions");
    assert_eq!(summaries.len(), 4, "two series over two windows");
    wait_for_summaries(&rig.receiver, summaries.len());
    wait_for(DELIVERY_TIMEOUT, "the four alerts", || {
        rig.receiver.with(|r| r.alerts().len() >= alerts.len())
    });

    rig.receiver.with(|r| {
        let problems = compare_summaries(&summaries, &r.summaries());
        assert!(problems.is_empty(), "summaries differ: {problems:#?}");
        let received = r.alerts();
        let problems = compare_alerts(&alerts, &received);
        assert!(problems.is_empty(), "alerts differ: {problems:#?}");
        for a in &received {
            assert_eq!((a.rule.as_str(), a.severity), ("hot", Severity::Critical), "{a:?}");
            assert!(!a.message.is_empty(), "{a:?}");
        }
        assert!(r.gaps().is_empty(), "{:?}", r.gaps());
        assert!(r.batches.iter().all(|b| b.encoding == "gzip"), "gzip was configured");
        let alert_batches = r.batches.iter().filter(|b| b.lane == Lane::Alerts).count();
        assert!(alert_batches > 0);
    });
    assert_clean_stream(&rig.receiver);
    let status = agent.terminate();
    assert!(status.success(), "SIGTERM should stop the agent cleanly, got {status}");
    rig.keep_if_asked();
}

/// Publishes a reading for `s/a` (an excursion every 40 readings) and `s/b` every 20 ms.
struct Feed<'a> {
    publisher: &'a Publisher,
    stamps: Stamps,
    readings: Vec<Reading>,
    i: u64,
}

impl Feed<'_> {
    fn run_for(&mut self, duration: Duration) {
        let end = Instant::now() + duration;
        while Instant::now() < end {
            let i = self.i;
            let a = if i % 40 < 5 { 40.0 } else { 20.0 + (i % 7) as f64 };
            let pair = [
                Reading::new("s/a", self.stamps.next(), a),
                Reading::new("s/b", self.stamps.next(), i as f64),
            ];
            self.publisher.publish_all(QoS::AtLeastOnce, messages(&pair));
            self.readings.extend(pair);
            self.i += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn every_record_arrives_in_order_after_the_upstream_was_down_and_refusing_connections() {
    let mut rig = Rig::new("gw-outage");
    rig.config.allowed_lateness = "1s".into();
    rig.config.threshold_rule("hot", "s/a", 30.0, 25.0);
    let _agent = rig.start_agent();
    // The first two requests fail, before the real outage.
    rig.receiver.fail_next(2);
    let publisher = rig.publisher("outage-pub");
    let mut feed =
        Feed { publisher: &publisher, stamps: Stamps::new(500), readings: Vec::new(), i: 0 };
    feed.run_for(Duration::from_millis(1_200));
    wait_for(DELIVERY_TIMEOUT, "records while the upstream is up", || {
        rig.receiver.unique_count() > 0
    });

    rig.receiver.set_unavailable();
    let rejected_before = rig.receiver.with(|r| r.rejected_requests);
    feed.run_for(Duration::from_millis(1_500));
    wait_for(DELIVERY_TIMEOUT, "the agent to retry against 503", || {
        rig.receiver.with(|r| r.rejected_requests >= rejected_before + 3)
    });

    rig.receiver.refuse_connections();
    feed.run_for(Duration::from_millis(1_500));
    // Let the last windows close while nobody listens.
    let closed = feed.stamps.last + 1_000 + 1_000 + 200;
    assert!(wait_until(DELIVERY_TIMEOUT, || now_ms() > closed));

    rig.receiver.set_up();
    let readings = feed.readings;
    let summaries = expected_summaries(&readings, 1_000);
    let alerts =
        expected_threshold_alerts(readings.iter().filter(|r| r.series == "s/a"), 30.0, 25.0);
    assert!(alerts.len() >= 4, "the input is meant to raise repeatedly: {alerts:?}");
    wait_for_summaries(&rig.receiver, summaries.len());
    wait_for(DELIVERY_TIMEOUT, "all alerts", || {
        rig.receiver.with(|r| r.alerts().len() >= alerts.len())
    });

    rig.receiver.with(|r| {
        let problems = compare_summaries(&summaries, &r.summaries());
        assert!(problems.is_empty(), "summaries differ: {problems:#?}");
        let problems = compare_alerts(&alerts, &r.alerts());
        assert!(problems.is_empty(), "alerts differ: {problems:#?}");
        assert!(r.gaps().is_empty(), "nothing should be evicted: {:?}", r.gaps());
        eprintln!(
            "outage: {} unique records, {} raw duplicates received, {} requests rejected",
            r.unique_count(),
            r.duplicates,
            r.rejected_requests
        );
    });
    assert_clean_stream(&rig.receiver);
    rig.keep_if_asked();
}

#[test]
fn repeated_sigkill_of_the_agent_loses_and_duplicates_no_published_event() {
    const MESSAGES: usize = 2_000;
    const SERIES: usize = 4;
    let mut rig = Rig::new("gw-kill");
    rig.config.allowed_lateness = "1s".into();
    let mut agent = rig.start_agent();

    // 2000 readings 2 ms apart in event time, published at the same pace (50 per 100 ms),
    // starting 300 ms ahead of the clock: windows close (and summaries are forwarded) while
    // the kills go on, and a restart has 1.3 s before an event would be late.
    let base = now_ms() + 300;
    let readings: Vec<Reading> = (0..MESSAGES)
        .map(|i| Reading::new(format!("s/k{}", i % SERIES), base + 2 * i as i64, (i % 97) as f64))
        .collect();
    let port = rig.broker.port();
    let to_publish = messages(&readings);
    let publishing = std::thread::spawn(move || {
        let publisher = Publisher::connect(port, "kill-pub");
        for chunk in to_publish.chunks(50) {
            let started = Instant::now();
            publisher.publish_all(QoS::AtLeastOnce, chunk.to_vec());
            std::thread::sleep(Duration::from_millis(100).saturating_sub(started.elapsed()));
        }
    });

    let pauses: Vec<u64> = (0..5).map(|_| fastrand::u64(300..=800)).collect();
    eprintln!("kills after {pauses:?} ms");
    for (kill, pause) in pauses.iter().enumerate() {
        std::thread::sleep(Duration::from_millis(*pause));
        agent.assert_running(&format!("before kill {kill}"));
        agent.kill9();
        agent.restart();
    }
    publishing.join().expect("publisher thread");

    let summaries = expected_summaries(&readings, 1_000);
    let done = wait_until(DELIVERY_TIMEOUT, || {
        rig.receiver.with(|r| r.summary_count_total() >= MESSAGES as u64)
            && rig.receiver.with(|r| r.summaries().len() >= summaries.len())
    });
    let total = rig.receiver.with(|r| r.summary_count_total());
    assert!(done, "summaries count {total} events of {MESSAGES}; {}", rig.receiver.describe());
    rig.receiver.with(|r| {
        assert_eq!(r.summary_count_total(), MESSAGES as u64, "{}", r.describe());
        let problems = compare_summaries(&summaries, &r.summaries());
        assert!(problems.is_empty(), "summaries differ: {problems:#?}");
        eprintln!("sigkill: {} raw duplicates received", r.duplicates);
    });
    assert_clean_stream(&rig.receiver);
    agent.assert_running("after the last restart");
    rig.keep_if_asked();
}

#[test]
fn a_broker_restart_mid_stream_loses_no_acknowledged_event() {
    const CHUNKS: usize = 30;
    const CHUNK: usize = 100;
    let mut rig = Rig::new("gw-broker");
    rig.config.allowed_lateness = "3s".into();
    let mut agent = rig.start_agent();

    let base = now_ms() + 1_000;
    let readings: Vec<Reading> = (0..CHUNKS * CHUNK)
        .map(|i| Reading::new(format!("s/m{}", i % 3), base + i as i64, (i % 89) as f64 / 4.0))
        .collect();
    let publisher = rig.publisher("broker-pub");
    // The broker restarts twice between two fully acknowledged chunks of the publisher: a
    // resend by the publisher could duplicate a message the broker already had and would blur
    // what this test examines (the agent's session). The first restart hits a running agent;
    // before the second one the agent is frozen while 400 messages are published, so that
    // the broker holds unacknowledged in-flight messages and a queue for it, and the agent
    // has unread PUBLISHes in its socket that it can no longer acknowledge on that
    // connection: after the restart the broker redelivers them (DUP) and the agent must count
    // each once.
    for (n, chunk) in readings.chunks(CHUNK).enumerate() {
        if n == 8 || n == 19 {
            let connacks = publisher.connacks();
            rig.broker.restart();
            publisher.wait_reconnected(connacks, Duration::from_secs(20));
        }
        if n == 15 {
            agent.pause();
        }
        if n == 19 {
            agent.resume();
        }
        publisher.publish_all(QoS::AtLeastOnce, messages(chunk));
    }

    let summaries = expected_summaries(&readings, 1_000);
    let done = wait_until(DELIVERY_TIMEOUT, || {
        rig.receiver.with(|r| {
            r.summary_count_total() >= readings.len() as u64
                && r.summaries().len() >= summaries.len()
        })
    });
    assert!(done, "not everything arrived: {}", rig.receiver.describe());
    rig.receiver.with(|r| {
        assert_eq!(r.summary_count_total(), readings.len() as u64, "{}", r.describe());
        let problems = compare_summaries(&summaries, &r.summaries());
        assert!(problems.is_empty(), "summaries differ: {problems:#?}");
    });
    assert_clean_stream(&rig.receiver);
    agent.assert_running("after two broker restarts");
    rig.keep_if_asked();
}

#[test]
fn malformed_payloads_are_rejected_with_their_cause_and_do_not_disturb_valid_events() {
    let mut rig = Rig::new("gw-bad");
    rig.config.compression = "none".into();
    let mut agent = rig.start_agent();

    let mut stamps = Stamps::new(1_500);
    let mut valid = Vec::new();
    let mut all: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..40 {
        let r = Reading::new("s/good", stamps.next(), 10.0 + i as f64);
        all.push(r.message());
        valid.push(r);
        let ts = stamps.next();
        let bad = match i % 5 {
            0 => "{not json".to_string(),
            1 => format!("{{\"ts\": {ts}}}"),
            2 => format!("{{\"value\": \"hot\", \"ts\": {ts}}}"),
            3 => "{\"value\": 1.5, \"ts\": \"yesterday\"}".to_string(),
            _ => format!("{{\"value\": 1.5, \"ts\": {}}}", ts + 86_400_000),
        };
        all.push(("s/good".into(), bad.into_bytes()));
    }
    let publisher = rig.publisher("bad-pub");
    publisher.publish_all(QoS::AtLeastOnce, all);

    let summaries = expected_summaries(&valid, 1_000);
    wait_for_summaries(&rig.receiver, summaries.len());
    rig.receiver.with(|r| {
        let problems = compare_summaries(&summaries, &r.summaries());
        assert!(problems.is_empty(), "summaries differ: {problems:#?}");
    });
    assert_clean_stream(&rig.receiver);
    agent.assert_running("after malformed payloads");

    // Each cause is logged (rate-limited per cause) with its stable label.
    let logs = agent.logs();
    let rejects: Vec<&str> = logs.lines().filter(|l| l.contains("rejected")).collect();
    for cause in ["invalid_json", "missing_value", "value_not_number", "bad_timestamp", "future"] {
        assert!(
            rejects.iter().any(|l| l.contains(cause)),
            "no log line tells the cause {cause:?}; lines about rejections: {rejects:#?}"
        );
    }
    let status = agent.terminate();
    assert!(status.success(), "SIGTERM should stop the agent cleanly, got {status}");

    // The rejected QoS 1 messages were acknowledged: after a restart the broker has nothing
    // to redeliver, so the new run rejects nothing (its first status line says so).
    agent.restart();
    let second_run = || agent.logs().rsplit("=== start 2 ===").next().unwrap_or("").to_string();
    wait_for(Duration::from_secs(20), "a status line of the second run", || {
        second_run().contains("status")
    });
    let log = second_run();
    let redelivered: Vec<&str> = log.lines().filter(|l| l.contains("rejected an")).collect();
    assert!(redelivered.is_empty(), "malformed messages came back: {redelivered:#?}");
    assert!(log.contains("rejected=0"), "the status line should count no rejection:\n{log}");
    agent.assert_running("after the restart");
    rig.keep_if_asked();
}

#[test]
fn a_long_outage_evicts_the_oldest_summaries_behind_a_gap_and_keeps_alerts_and_memory_bounded() {
    const SERIES: usize = 200;
    const RSS_LIMIT_KB: u64 = 60 * 1024;
    let mut rig = Rig::new("gw-full");
    rig.config.buffer_max_bytes = Some("64 KiB".into());
    // Eviction is what this test examines; compaction and TTL have their own (outage.rs).
    rig.config.buffer_extra = "compact_above = \"off\"\n".into();
    rig.config.allowed_lateness = "500ms".into();
    rig.config.threshold_rule("hot", "s/dev-0", 50.0, 40.0);
    rig.receiver.refuse_connections();
    let agent = rig.start_agent();
    let publisher = rig.publisher("full-pub");

    // 8 s of two readings per series per second; s/dev-0 crosses the threshold three times.
    let mut stamps = Stamps::new(300);
    let mut readings = Vec::new();
    let mut max_rss_kb = 0;
    let start = Instant::now();
    let mut round = 0u64;
    while start.elapsed() < Duration::from_secs(8) {
        let round_start = Instant::now();
        let second = start.elapsed().as_secs();
        let batch: Vec<Reading> = (0..SERIES)
            .map(|s| {
                let value = match (s, second) {
                    (0, 2 | 3 | 6) => 100.0,
                    _ => 20.0 + ((round as usize + s) % 10) as f64,
                };
                Reading::new(format!("s/dev-{s}"), stamps.next(), value)
            })
            .collect();
        publisher.publish_all(QoS::AtLeastOnce, messages(&batch));
        readings.extend(batch);
        max_rss_kb = max_rss_kb.max(agent.rss_kb().unwrap_or(0));
        round += 1;
        std::thread::sleep(Duration::from_millis(500).saturating_sub(round_start.elapsed()));
    }
    // Every window closes while the upstream is still away.
    let closed = stamps.last + 1_000 + 500 + 300;
    while now_ms() <= closed {
        max_rss_kb = max_rss_kb.max(agent.rss_kb().unwrap_or(0));
        std::thread::sleep(Duration::from_millis(100));
    }

    rig.receiver.set_up();
    let expected = expected_summaries(&readings, 1_000);
    let alerts =
        expected_threshold_alerts(readings.iter().filter(|r| r.series == "s/dev-0"), 50.0, 40.0);
    assert_eq!(alerts.len(), 4, "{alerts:?}");
    // Everything is accounted for once the received summaries and the gap records add up.
    let accounted = || {
        rig.receiver.with(|r| {
            let lost: u64 = r.gaps().iter().map(|g| g.records).sum();
            r.summaries().len() as u64 + lost >= expected.len() as u64
                && r.alerts().len() >= alerts.len()
        })
    };
    assert!(wait_until(DELIVERY_TIMEOUT, accounted), "{}", rig.receiver.describe());

    rig.receiver.with(|r| {
        let gaps = r.gaps();
        assert!(
            !gaps.is_empty(),
            "the outbox cap was exceeded but no gap arrived: {}",
            r.describe()
        );
        let lost: u64 = gaps.iter().map(|g| g.records).sum();
        for g in &gaps {
            assert_eq!(g.lane, Lane::Summaries, "only summaries may be evicted: {g:?}");
            assert_eq!(g.records, g.last_seq - g.first_seq + 1, "{g:?}");
            assert!(!g.reason.is_empty(), "{g:?}");
        }
        let received = r.summaries();
        assert_eq!(received.len() as u64 + lost, expected.len() as u64, "{}", r.describe());

        // The survivors are the newest summaries: above every evicted sequence number, and no
        // older in event time than any evicted window.
        let max_lost_seq = gaps.iter().map(|g| g.last_seq).max().unwrap();
        for record in r.records() {
            if let RecordBody::Summary(s) = &record.body {
                assert!(
                    record.seq > max_lost_seq,
                    "{} survived but is older than a gap",
                    record.id
                );
                let e = &expected[&(s.series.clone(), s.start_ms)];
                assert!(e.diff(s).is_empty(), "{} @ {}: {:?}", s.series, s.start_ms, e.diff(s));
            }
        }
        let survivors: std::collections::BTreeSet<(String, i64)> =
            received.iter().map(|s| (s.series.clone(), s.start_ms)).collect();
        let oldest_survivor = survivors.iter().map(|k| k.1).min().unwrap_or(i64::MAX);
        let newest_evicted =
            expected.keys().filter(|k| !survivors.contains(*k)).map(|k| k.1).max().unwrap();
        assert!(
            newest_evicted <= oldest_survivor,
            "an evicted window ({newest_evicted}) is newer than a surviving one ({oldest_survivor})"
        );
        for g in &gaps {
            if let (Some(from), Some(to)) = (g.from_ms, g.to_ms) {
                assert!(from <= to && to <= oldest_survivor + 1_000, "{g:?}");
            }
        }

        let problems = compare_alerts(&alerts, &r.alerts());
        assert!(problems.is_empty(), "alerts differ: {problems:#?}");
        eprintln!(
            "outbox full: {} summaries evicted in {} gap(s), {} survived, max RSS {} KiB",
            lost,
            gaps.len(),
            received.len(),
            max_rss_kb
        );
    });
    assert_clean_stream(&rig.receiver);
    assert!(max_rss_kb > 0, "RSS was never sampled");
    assert!(max_rss_kb < RSS_LIMIT_KB, "RSS reached {max_rss_kb} KiB during the outage");
    rig.keep_if_asked();
}
