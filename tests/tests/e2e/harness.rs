//! Tests of the fixtures themselves, so that a failing scenario points at the agent.

use std::io::{Read, Write};
use std::time::Duration;

use edgewise_tests::{Mosquitto, Publisher, QoS, Receiver};
use sensors::record::{
    Alert, AlertState, Batch, Gap, Lane, Record, RecordBody, Severity, gap_id, record_id,
};

#[test]
fn mosquitto_restarts_on_its_port_and_keeps_a_persistent_sessions_queued_message() {
    let mut broker = Mosquitto::start();
    let subscriber = Publisher::connect_with(broker.port(), "harness-sub", false);
    subscriber.subscribe("t/#", QoS::AtLeastOnce);
    assert!(broker.has_subscriber("harness-sub"), "{}", broker.log());
    subscriber.disconnect();

    let publisher = Publisher::connect(broker.port(), "harness-pub");
    publisher.publish_all(QoS::AtLeastOnce, [("t/x", b"kept".to_vec())]);
    drop(publisher);

    let port = broker.port();
    broker.restart();
    assert_eq!(broker.port(), port);

    let subscriber = Publisher::connect_with(broker.port(), "harness-sub", false);
    let delivered = edgewise_tests::wait_until(Duration::from_secs(10), || {
        subscriber.received().iter().any(|(t, p)| t == "t/x" && p == b"kept")
    });
    assert!(delivered, "queued message lost over a restart; broker log:\n{}", broker.log());
}

fn batch_json() -> Vec<u8> {
    let agent = "gw";
    let records = (1..=2)
        .map(|seq| Record {
            id: record_id(agent, 0xab, Lane::Alerts, seq),
            seq,
            body: RecordBody::Alert(Alert {
                rule: "hot".into(),
                series: "s/a".into(),
                state: if seq == 1 { AlertState::Raised } else { AlertState::Cleared },
                severity: Severity::Critical,
                ts_ms: 1_700_000_000_000,
                value: 31.0,
                threshold: 30.0,
                message: "hot".into(),
                labels: Default::default(),
            }),
        })
        .collect();
    let batch = Batch {
        version: sensors::record::BATCH_FORMAT_VERSION,
        agent: agent.into(),
        lane: Lane::Alerts,
        first_seq: 1,
        last_seq: 2,
        records,
    };
    serde_json::to_vec(&batch).unwrap()
}

/// POSTs a body over a plain TCP connection; returns the status code (0 if refused).
fn post(port: u16, encoding: Option<&str>, key: &str, body: &[u8]) -> u16 {
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return 0 };
    let encoding = encoding.map(|e| format!("Content-Encoding: {e}\r\n")).unwrap_or_default();
    let head = format!(
        "POST /ingest HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         {encoding}Idempotency-Key: {key}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[test]
fn receiver_decodes_zstd_gzip_and_identity_and_deduplicates_by_id() {
    let mut receiver = Receiver::start();
    let json = batch_json();
    let zstd = zstd::encode_all(&json[..], 3).unwrap();
    let gzip = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&json).unwrap();
        e.finish().unwrap()
    };
    let key = "gw/alerts/1-2";
    assert_eq!(post(receiver.port(), Some("zstd"), key, &zstd), 200);
    assert_eq!(post(receiver.port(), Some("gzip"), key, &gzip), 200);
    assert_eq!(post(receiver.port(), None, key, &json), 200);
    assert_eq!(post(receiver.port(), Some("zstd"), key, &json), 400, "raw JSON labelled zstd");

    receiver.with(|r| {
        assert_eq!(r.unique_count(), 2);
        assert_eq!(r.duplicates, 4);
        assert_eq!(r.alerts().len(), 2);
        let encodings: Vec<&str> = r.batches.iter().map(|b| b.encoding.as_str()).collect();
        assert_eq!(encodings, ["zstd", "gzip", "identity"]);
        assert!(r.order_violations.is_empty() && r.conflicts.is_empty());
        assert!(r.holes().is_empty(), "{:?}", r.holes());
        assert_eq!(r.protocol_errors.len(), 1, "{:?}", r.protocol_errors);
    });

    assert_eq!(post(receiver.port(), None, "wrong/key", &json), 200);
    receiver.with(|r| assert_eq!(r.protocol_errors.len(), 2, "{:?}", r.protocol_errors));

    receiver.set_unavailable();
    assert_eq!(post(receiver.port(), None, key, &json), 503);
    receiver.set_up();
    receiver.fail_next(1);
    assert_eq!(post(receiver.port(), None, key, &json), 503);
    assert_eq!(post(receiver.port(), None, key, &json), 200);

    receiver.refuse_connections();
    assert_eq!(post(receiver.port(), None, key, &json), 0, "connection should be refused");
    receiver.accept_connections();
    assert_eq!(post(receiver.port(), None, key, &json), 200);
    receiver.with(|r| {
        assert_eq!(r.rejected_requests, 2);
        assert_eq!(r.unique_count(), 2);
    });

    receiver.set_delay(Duration::from_millis(300));
    let started = std::time::Instant::now();
    assert_eq!(post(receiver.port(), None, key, &json), 200);
    assert!(started.elapsed() >= Duration::from_millis(300), "a slow upstream answers late");
}

#[test]
fn publisher_waits_for_every_puback_at_qos1_and_qos0_is_written() {
    let broker = Mosquitto::start();
    let subscriber = Publisher::connect(broker.port(), "harness-count");
    subscriber.subscribe("c/#", QoS::AtLeastOnce);
    let publisher = Publisher::connect(broker.port(), "harness-pub2");
    let n = publisher.publish_all(
        QoS::AtLeastOnce,
        (0..500).map(|i| (format!("c/{}", i % 7), format!("{i}").into_bytes())),
    );
    assert_eq!(n, 500);
    publisher.publish_all(QoS::AtMostOnce, (0..10).map(|i| ("c/zero", vec![i as u8])));
    let all =
        edgewise_tests::wait_until(Duration::from_secs(10), || subscriber.received().len() == 510);
    assert!(all, "subscriber got {} of 510", subscriber.received().len());
}

#[test]
fn receiver_keeps_a_gap_apart_from_the_record_it_replaced() {
    let receiver = Receiver::start();
    let summary = |seq: u64| Record {
        id: record_id("gw", 7, Lane::Summaries, seq),
        seq,
        body: RecordBody::Summary(sensors::record::Summary {
            series: "s/a".into(),
            start_ms: 1_000 * seq as i64,
            window_ms: 1_000,
            count: 1,
            min: 1.0,
            max: 1.0,
            mean: 1.0,
            stddev: 0.0,
            first: 1.0,
            last: 1.0,
            windows: 1,
        }),
    };
    let gap = Record {
        id: gap_id("gw", 7, Lane::Summaries, 2),
        seq: 2,
        body: RecordBody::Gap(Gap {
            lane: Lane::Summaries,
            first_seq: 2,
            last_seq: 3,
            records: 2,
            from_ms: Some(2_000),
            to_ms: Some(3_000),
            reason: "outbox_full".into(),
            events: 2,
        }),
    };
    let send = |records: Vec<Record>| {
        let (first_seq, last_seq) = (records[0].seq, records[records.len() - 1].seq);
        let batch = Batch {
            version: sensors::record::BATCH_FORMAT_VERSION,
            agent: "gw".into(),
            lane: Lane::Summaries,
            first_seq,
            last_seq,
            records,
        };
        let key = format!("gw/summaries/{first_seq}-{last_seq}");
        post(receiver.port(), None, &key, &serde_json::to_vec(&batch).unwrap())
    };
    // Record 2 arrived but its ack was lost; then 2 and 3 were evicted behind a gap.
    assert_eq!(send(vec![summary(1), summary(2)]), 200);
    assert_eq!(send(vec![gap, summary(4)]), 200);
    receiver.with(|r| {
        assert_eq!(r.unique_count(), 4);
        assert_eq!((r.duplicates, r.gaps().len(), r.summaries().len()), (0, 1, 3));
        assert!(r.protocol_errors.is_empty(), "{:?}", r.protocol_errors);
        assert!(r.order_violations.is_empty(), "{:?}", r.order_violations);
        assert!(r.holes().is_empty(), "{:?}", r.holes());
    });
    // A summary that claims a gap's id is a wire-format error.
    let mut fake = summary(5);
    fake.id = gap_id("gw", 7, Lane::Summaries, 5);
    assert_eq!(send(vec![fake]), 200);
    receiver.with(|r| assert_eq!(r.protocol_errors.len(), 1, "{:?}", r.protocol_errors));
}
