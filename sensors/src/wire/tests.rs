//! Round trips (property tests), golden bytes of the compact layout, content negotiation,
//! sniffing, verification and hostile bodies.

use std::collections::BTreeMap;
use std::string::{String, ToString};
use std::vec::Vec;
use std::{format, vec};

use proptest::prelude::*;

use super::*;
use crate::record::{Alert, AlertState, Gap, Record, Severity, Summary};

fn summary(series: &str, start_ms: i64) -> Summary {
    Summary {
        series: series.into(),
        start_ms,
        window_ms: 10_000,
        count: 2,
        min: 1.5,
        max: 2.5,
        mean: 2.0,
        stddev: 0.5,
        first: 1.5,
        last: 2.5,
        windows: 1,
    }
}

/// A small summaries batch: a summary at seq 7, a gap at seq 8 covering 8..=9.
fn small_summaries() -> Batch {
    let gap = Gap {
        lane: Lane::Summaries,
        first_seq: 8,
        last_seq: 9,
        records: 2,
        from_ms: Some(70_000),
        to_ms: Some(80_000),
        reason: "outbox_full".into(),
        events: 4,
    };
    Batch {
        version: 2,
        agent: "gw".into(),
        lane: Lane::Summaries,
        first_seq: 7,
        last_seq: 8,
        records: vec![
            Record {
                id: "gw:beef:summaries:7".into(),
                seq: 7,
                body: RecordBody::Summary(summary("p/t", 60_000)),
            },
            Record { id: "gw:beef:summaries:8:gap".into(), seq: 8, body: RecordBody::Gap(gap) },
        ],
    }
}

/// A small alerts batch: one raised alert with a label and a message equal to its rule.
fn small_alerts() -> Batch {
    let mut labels = BTreeMap::new();
    labels.insert("device".to_string(), "p".to_string());
    let alert = Alert {
        rule: "hot".into(),
        series: "p/t".into(),
        state: AlertState::Raised,
        severity: Severity::Critical,
        ts_ms: 1_000,
        value: 91.5,
        threshold: 90.0,
        message: "hot".into(),
        labels,
    };
    Batch {
        version: 2,
        agent: "gw".into(),
        lane: Lane::Alerts,
        first_seq: 3,
        last_seq: 3,
        records: vec![Record {
            id: "gw:1:alerts:3".into(),
            seq: 3,
            body: RecordBody::Alert(alert),
        }],
    }
}

#[test]
fn golden_bytes_of_a_summary_and_a_gap() {
    #[rustfmt::skip]
    let expected: &[u8] = &[
        0x02,                                   // version 2
        0x02, b'g', b'w',                       // agent "gw"
        0x01,                                   // lane summaries
        0xef, 0xfd, 0x02,                       // epoch 0xbeef
        0x07, 0x08,                             // first_seq 7, last_seq 8
        0x02,                                   // 2 strings
        0x03, b'p', b'/', b't',
        0x0b, b'o', b'u', b't', b'b', b'o', b'x', b'_', b'f', b'u', b'l', b'l',
        0x02,                                   // 2 records
        0x01, 0x00,                             // summary, seq 7 (derived id)
        0x91,                                   // window_ms follows, first = min, last = max
        0x00,                                   // series "p/t"
        0xc0, 0xa9, 0x07,                       // start_ms +60_000
        0x90, 0x4e,                             // window_ms 10_000
        0x02,                                   // count
        0xf1, 0x01,                             // min 1.5 = 15 / 10^1
        0x91, 0x03,                             // max 2.5
        0x20,                                   // mean 2 = 2 / 10^0
        0x51,                                   // stddev 0.5
        0x02, 0x00,                             // gap, seq 8 (derived id with :gap)
        0x01,                                   // lane summaries
        0x00, 0x01,                             // first_seq = seq, last_seq = first + 1
        0x02,                                   // records
        0x03,                                   // from_ms and to_ms follow
        0xa0, 0x9c, 0x01,                       // from_ms +10_000 (after the summary's start)
        0xa0, 0x9c, 0x01,                       // to_ms +10_000
        0x01,                                   // reason "outbox_full"
        0x04,                                   // events
    ];
    let batch = small_summaries();
    let bytes = encode(&batch, Format::Postcard, Compression::None).unwrap();
    assert_eq!(bytes, expected, "{bytes:02x?}");
    assert_eq!(decode(expected, Format::Postcard.content_type(), None).unwrap(), batch);
}

#[test]
fn golden_bytes_of_an_alert_with_labels() {
    #[rustfmt::skip]
    let expected: &[u8] = &[
        0x02, 0x02, b'g', b'w', 0x00,           // version, agent, lane alerts
        0x01, 0x03, 0x03,                       // epoch 1, first_seq 3, last_seq 3
        0x04,                                   // 4 strings: the message is the rule's
        0x03, b'h', b'o', b't',
        0x03, b'p', b'/', b't',
        0x06, b'd', b'e', b'v', b'i', b'c', b'e',
        0x01, b'p',
        0x01,                                   // 1 record
        0x00, 0x00,                             // alert, seq 3
        0x00, 0x01,                             // rule "hot", series "p/t"
        0x04,                                   // raised, critical
        0xd0, 0x0f,                             // ts_ms +1_000
        0xb1, 0x72,                             // value 91.5
        0xa0, 0x0b,                             // threshold 90
        0x00,                                   // message "hot"
        0x01, 0x02, 0x03,                       // labels {device: p}
    ];
    let batch = small_alerts();
    let bytes = encode(&batch, Format::Postcard, Compression::None).unwrap();
    assert_eq!(bytes, expected, "{bytes:02x?}");
    assert_eq!(decode(expected, Format::Postcard.content_type(), None).unwrap(), batch);
}

#[test]
fn content_types_and_encodings_are_negotiated_by_their_names() {
    assert_eq!(Format::from_content_type("application/json"), Some(Format::Json));
    assert_eq!(Format::from_content_type(" Application/JSON ; charset=utf-8"), Some(Format::Json));
    assert_eq!(
        Format::from_content_type("application/x-edgewise-batch;v=2"),
        Some(Format::Postcard)
    );
    assert_eq!(Format::from_content_type("text/plain"), None);
    assert_eq!(Format::from_content_type(""), None);
    for format in Format::ALL {
        assert_eq!(Format::from_content_type(format.content_type()), Some(format));
    }
    for compression in Compression::ALL {
        assert_eq!(
            Compression::from_content_encoding(compression.content_encoding()),
            Some(compression)
        );
    }
    assert_eq!(Compression::from_content_encoding("GZIP"), Some(Compression::Gzip));
    assert_eq!(Compression::from_content_encoding("x-gzip"), Some(Compression::Gzip));
    assert_eq!(Compression::from_content_encoding(""), Some(Compression::None));
    assert_eq!(Compression::from_content_encoding("br"), None);
    assert_eq!(Compression::from_content_encoding("gzip, zstd"), None);
}

#[test]
fn every_format_and_compression_decodes_by_headers_and_by_sniffing() {
    for batch in [small_summaries(), small_alerts()] {
        for format in Format::ALL {
            for compression in Compression::ALL {
                let bytes = encode(&batch, format, compression).unwrap();
                assert_eq!(Compression::sniff(&bytes), compression, "{format} {compression}");
                let encoding = match compression {
                    Compression::None => None,
                    c => Some(c.content_encoding()),
                };
                let decoded = decode(&bytes, format.content_type(), encoding).unwrap();
                assert_eq!(decoded, batch, "{format} {compression}");
                let (sniffed, f, c) = decode_sniffed(&bytes).unwrap();
                assert_eq!((sniffed, f, c), (batch.clone(), format, compression));
            }
        }
    }
}

#[test]
fn decode_unverified_returns_what_verify_would_refuse() {
    let mut batch = small_alerts();
    batch.records[0].id = "someone-else:1:alerts:3".into();
    for format in Format::ALL {
        let bytes = encode(&batch, format, Compression::Gzip).unwrap();
        assert!(decode(&bytes, format.content_type(), Some("gzip")).is_err());
        let decoded = decode_unverified(&bytes, format.content_type(), Some("gzip")).unwrap();
        assert_eq!(decoded, batch);
    }
}

#[test]
fn json_with_leading_whitespace_is_sniffed_as_json() {
    let mut bytes = b" \n\t".to_vec();
    bytes.extend(encode(&small_alerts(), Format::Json, Compression::None).unwrap());
    let (batch, format, _) = decode_sniffed(&bytes).unwrap();
    assert_eq!((batch, format), (small_alerts(), Format::Json));
}

#[test]
fn unknown_types_and_encodings_are_unsupported_media() {
    let bytes = encode(&small_alerts(), Format::Json, Compression::None).unwrap();
    let error = decode(&bytes, "text/csv", None).unwrap_err();
    assert!(error.is_unsupported_media_type(), "{error}");
    assert!(error.to_string().contains("text/csv"), "{error}");
    let error = decode(&bytes, "application/json", Some("br")).unwrap_err();
    assert!(error.is_unsupported_media_type(), "{error}");
    assert!(error.to_string().contains("\"br\""), "{error}");
    // A wrong but known encoding is a bad body, not an unsupported one.
    let error = decode(&bytes, "application/json", Some("zstd")).unwrap_err();
    assert!(matches!(error, WireError::Decompress { compression: Compression::Zstd, .. }));
    assert!(!error.is_unsupported_media_type());
}

#[test]
fn a_version_1_json_batch_still_decodes() {
    let json = r#"{"version":1,"agent":"gw","lane":"summaries","first_seq":7,"last_seq":7,
        "records":[{"id":"gw:beef:summaries:7","seq":7,"body":{"summary":{"series":"p/t",
        "start_ms":60000,"window_ms":10000,"count":2,"min":1.5,"max":2.5,"mean":2.0,
        "stddev":0.5,"first":1.5,"last":2.5}}}]}"#;
    let batch = decode(json.as_bytes(), "application/json", None).unwrap();
    assert_eq!(batch.version, 1);
    let RecordBody::Summary(s) = &batch.records[0].body else { panic!("{batch:?}") };
    assert_eq!(s.windows, 1);
}

#[test]
fn unknown_versions_are_refused_by_both_formats() {
    let mut batch = small_alerts();
    batch.version = 3;
    let json = encode(&batch, Format::Json, Compression::None).unwrap();
    let error = decode(&json, "application/json", None).unwrap_err();
    assert!(matches!(error, WireError::UnsupportedVersion { version: 3 }), "{error}");
    assert!(matches!(
        encode(&batch, Format::Postcard, Compression::None),
        Err(WireError::UnsupportedVersion { version: 3 })
    ));
    let mut compact = encode(&small_alerts(), Format::Postcard, Compression::None).unwrap();
    compact[0] = 3;
    let error = decode_sniffed(&compact).unwrap_err();
    assert!(matches!(error, WireError::UnsupportedVersion { version: 3 }), "{error}");
}

#[test]
fn verify_names_the_broken_rule() {
    let check = |edit: &dyn Fn(&mut Batch), expected: &str| {
        let mut batch = small_summaries();
        edit(&mut batch);
        let error = verify(&batch).unwrap_err().to_string();
        assert!(error.contains(expected), "{error:?} should mention {expected:?}");
        // The decoders refuse what verify refuses, whichever format carried it.
        for format in Format::ALL {
            let bytes = encode(&batch, format, Compression::None).unwrap();
            assert!(decode(&bytes, format.content_type(), None).is_err(), "{format}");
        }
    };
    assert!(verify(&small_summaries()).is_ok());
    check(&|b| b.records.clear(), "no records");
    check(&|b| b.last_seq = 9, "span 7..=8");
    check(
        &|b| b.records[1].id = "gw:beef:summaries:8".into(),
        "should be \"gw:beef:summaries:8:gap\"",
    );
    check(
        &|b| b.records[0].id = "gw:beef:alerts:7".into(),
        "is not `gw:<epoch hex>:summaries:<seq>`",
    );
    check(&|b| b.records[1].id = "gw:bee:summaries:8:gap".into(), "should be");
    check(&|b| b.agent = "gw2".into(), "is not `gw2:");
    check(
        &|b| {
            b.records.swap(0, 1);
            b.first_seq = 8;
            b.last_seq = 7;
        },
        "follows seq 8",
    );
    check(
        &|b| {
            if let RecordBody::Gap(g) = &mut b.records[1].body {
                g.last_seq = 7;
            }
        },
        "empty range",
    );
}

#[test]
fn decompression_stops_at_the_limit() {
    let zeros = vec![0u8; MAX_DECODED_BYTES + 1];
    for compression in [Compression::Zstd, Compression::Gzip] {
        let bomb = compress(&zeros, compression).unwrap();
        assert!(bomb.len() < MAX_DECODED_BYTES / 100, "{compression}: {} bytes", bomb.len());
        let error =
            decode(&bomb, "application/json", Some(compression.content_encoding())).unwrap_err();
        assert!(error.is_too_large(), "{compression}: {error}");
        assert!(decode_sniffed(&bomb).unwrap_err().is_too_large(), "{compression}");
    }
    let exact = compress(&zeros[..MAX_DECODED_BYTES], Compression::Zstd).unwrap();
    assert_eq!(decompress(&exact, Compression::Zstd).unwrap().len(), MAX_DECODED_BYTES);
    assert!(decompress(&zeros, Compression::None).unwrap_err().is_too_large());
}

#[test]
fn a_small_compact_batch_that_repeats_a_long_string_is_too_large() {
    // 1 MiB series name, referenced by 100 summaries: 1 MiB on the wire, 100 MiB decoded.
    let series = "s".repeat(1 << 20);
    let mut batch = small_summaries();
    batch.records = (0..100)
        .map(|seq| Record {
            id: record_id("gw", 0xbeef, Lane::Summaries, seq),
            seq,
            body: RecordBody::Summary(summary(&series, 0)),
        })
        .collect();
    (batch.first_seq, batch.last_seq) = (0, 99);
    let bytes = encode(&batch, Format::Postcard, Compression::None).unwrap();
    assert!(bytes.len() < 2 << 20, "{}", bytes.len());
    let error = decode(&bytes, Format::Postcard.content_type(), None).unwrap_err();
    assert!(error.is_too_large(), "{error}");
}

#[test]
fn truncated_compact_batches_are_errors_with_an_offset() {
    let bytes = encode(&small_summaries(), Format::Postcard, Compression::None).unwrap();
    for len in 0..bytes.len() {
        let error = decode(&bytes[..len], Format::Postcard.content_type(), None).unwrap_err();
        assert!(matches!(error, WireError::Compact { .. }), "{len}: {error}");
    }
    let mut longer = bytes.clone();
    longer.push(0);
    let error = decode(&longer, Format::Postcard.content_type(), None).unwrap_err();
    assert!(error.to_string().contains("1 bytes follow the last record"), "{error}");
}

#[test]
fn claimed_counts_beyond_the_input_are_refused_before_allocating() {
    // version, agent "", lane, epoch, first, last, then 2^62 strings.
    let bytes = [2, 0, 1, 0, 0, 0, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x40];
    let error = decode(&bytes, Format::Postcard.content_type(), None).unwrap_err();
    assert!(error.to_string().contains("items cannot fit"), "{error}");
}

#[test]
fn numbers_keep_their_bits() {
    let values = [
        0.0,
        -0.0,
        1.0,
        -1.0,
        61.2,
        -273.15,
        0.00001,
        0.000001,
        1e15,
        9_007_199_254_740_993.0,
        1e300,
        f64::MIN_POSITIVE,
        f64::MIN_POSITIVE / 4.0,
        f64::MAX,
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::from(61.23f32),
        f64::from(f32::MAX),
        core::f64::consts::PI,
        f64::NAN,
        -f64::NAN,
        f64::from_bits(0x7ff8_0000_dead_beef),
    ];
    for value in values {
        let mut w = compact_writer();
        w.num(value);
        let decoded = compact_reader(&w.0).num().unwrap();
        assert_eq!(decoded.to_bits(), value.to_bits(), "{value:e}");
    }
    // Decimals are short: the point of the encoding.
    for (value, len) in [(0.0, 1), (61.2, 2), (-273.15, 3), (91.5, 2), (1013.25, 3)] {
        let mut w = compact_writer();
        w.num(value);
        assert_eq!(w.0.len(), len, "{value}");
    }
    let mut w = compact_writer();
    w.num(f64::from(61.23f32));
    assert_eq!(w.0.len(), 5, "an f32 reading takes 4 bytes and a tag");
}

fn compact_writer() -> compact::Writer {
    compact::Writer(Vec::new())
}

fn compact_reader(bytes: &[u8]) -> compact::Reader<'_> {
    compact::Reader { bytes, pos: 0, budget: MAX_DECODED_BYTES }
}

#[test]
fn the_compact_layout_is_much_smaller_than_json() {
    let records: Vec<Record> = (1..=100u64)
        .map(|seq| Record {
            id: record_id("line3-gw01", 0x5be0_c1d2_a3f4_e5d6, Lane::Summaries, seq),
            seq,
            body: RecordBody::Summary(Summary {
                series: format!("pump-{}/bearing_temp", seq % 20),
                start_ms: 1_764_064_860_000 + 60_000 * (seq / 20) as i64,
                window_ms: 60_000,
                count: 60,
                min: 61.2,
                max: 64.9,
                mean: 63.118_333_333_333_33,
                stddev: 0.812_345_678_9,
                first: 61.2,
                last: 64.0,
                windows: 1,
            }),
        })
        .collect();
    let batch = Batch {
        version: 2,
        agent: "line3-gw01".into(),
        lane: Lane::Summaries,
        first_seq: 1,
        last_seq: 100,
        records,
    };
    let json = encode(&batch, Format::Json, Compression::None).unwrap();
    let compact = encode(&batch, Format::Postcard, Compression::None).unwrap();
    assert!(compact.len() * 6 < json.len(), "compact {} vs JSON {}", compact.len(), json.len());
}

// ---- property tests ----

fn float() -> impl Strategy<Value = f64> {
    prop_oneof![
        // Decimal readings (MQTT JSON payloads).
        (-1_000_000i64..1_000_000, 0u8..=4).prop_map(|(m, k)| m as f64 / 10f64.powi(k.into())),
        // Device readings (f32 on the wire from firmware).
        any::<f32>().prop_filter("no NaN", |f| !f.is_nan()).prop_map(f64::from),
        // Anything else, NaN excluded (NaN != NaN would fail the comparison, not the codec).
        any::<f64>().prop_filter("no NaN", |f| !f.is_nan()),
        Just(0.0),
        Just(-0.0),
    ]
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec!["pump-1/temp", "pump-2/temp", "outbox_full", "hot", "", "ü"])
            .prop_map(String::from),
        ".{0,12}",
    ]
}

fn summary_body() -> impl Strategy<Value = RecordBody> {
    (
        (text(), any::<i64>(), prop_oneof![Just(10_000u64), Just(60_000), any::<u64>()]),
        any::<u64>(),
        (float(), float(), float(), float()),
        (0u8..6, 0u8..6, prop_oneof![Just(1u32), any::<u32>()]),
    )
        .prop_map(
            |((series, start_ms, window_ms), count, (min, max, mean, stddev), (f, l, windows))| {
                // First and last often equal min or max, as in real windows.
                let pick = |i: u8, other: f64| match i {
                    0 => min,
                    1 => max,
                    _ => other,
                };
                RecordBody::Summary(Summary {
                    series,
                    start_ms,
                    window_ms,
                    count,
                    min,
                    max: if f == 5 { min } else { max },
                    mean: if l == 5 { min } else { mean },
                    stddev,
                    first: pick(f, mean + 1.0),
                    last: pick(l, stddev - 1.0),
                    windows,
                })
            },
        )
}

fn alert_body() -> impl Strategy<Value = RecordBody> {
    (
        (text(), text(), any::<bool>(), 0u8..3, any::<i64>()),
        (float(), float(), text()),
        prop::collection::btree_map(text(), text(), 0..4),
    )
        .prop_map(
            |((rule, series, cleared, severity, ts_ms), (value, threshold, message), labels)| {
                RecordBody::Alert(Alert {
                    rule,
                    series,
                    state: if cleared { AlertState::Cleared } else { AlertState::Raised },
                    severity: [Severity::Info, Severity::Warning, Severity::Critical]
                        [usize::from(severity)],
                    ts_ms,
                    value,
                    threshold,
                    message,
                    labels,
                })
            },
        )
}

fn gap_body() -> impl Strategy<Value = (u64, u64, Option<i64>, Option<i64>, String, u64, bool)> {
    (
        0u64..1000,
        any::<u64>(),
        any::<Option<i64>>(),
        any::<Option<i64>>(),
        text(),
        any::<u64>(),
        any::<bool>(),
    )
}

/// Records of one lane with increasing seqs (sometimes skipping), each body any kind.
fn batch(valid_ids: bool) -> impl Strategy<Value = Batch> {
    let record = (
        1u64..4,
        prop_oneof![
            summary_body(),
            alert_body(),
            gap_body().prop_map(|g| {
                // Patched below, once the seq is known.
                RecordBody::Gap(Gap {
                    lane: if g.6 { Lane::Alerts } else { Lane::Summaries },
                    first_seq: g.0,
                    last_seq: g.0.saturating_add(g.1 % 1000),
                    records: g.1,
                    from_ms: g.2,
                    to_ms: g.3,
                    reason: g.4,
                    events: g.5,
                })
            })
        ],
        ".{0,20}",
        0u8..10,
    );
    (
        prop::sample::select(vec!["gw", "line3-gw01", "gw:colon", "Gerät-1", ""]),
        any::<u64>(),
        any::<bool>(),
        prop_oneof![0u64..1_000_000, Just(u64::MAX - 200)],
        prop::collection::vec(record, 1..40),
    )
        .prop_map(move |(agent, epoch, alerts, first_seq, records)| {
            let lane = if alerts { Lane::Alerts } else { Lane::Summaries };
            let mut seq = first_seq;
            let mut out = Vec::new();
            for (i, (step, mut body, odd_id, roll)) in records.into_iter().enumerate() {
                if i > 0 {
                    seq += step;
                }
                if let RecordBody::Gap(g) = &mut body {
                    // Usually the gap starts at its own seq; sometimes elsewhere.
                    if g.first_seq % 3 != 0 {
                        let span = g.last_seq - g.first_seq;
                        g.first_seq = seq;
                        g.last_seq = seq.saturating_add(span);
                    }
                }
                let id = if valid_ids || roll < 7 {
                    derived_id(agent, epoch, lane, seq, &body)
                } else {
                    odd_id
                };
                out.push(Record { id, seq, body });
            }
            Batch {
                version: BATCH_FORMAT_VERSION,
                agent: agent.into(),
                lane,
                first_seq,
                last_seq: seq,
                records: out,
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn valid_batches_round_trip_through_every_format_and_compression(batch in batch(true)) {
        prop_assert!(verify(&batch).is_ok(), "{:?}", verify(&batch));
        for format in Format::ALL {
            for compression in Compression::ALL {
                let bytes = encode(&batch, format, compression).unwrap();
                let encoding = Some(compression.content_encoding());
                let decoded = decode(&bytes, format.content_type(), encoding);
                prop_assert_eq!(decoded.unwrap(), batch.clone());
                let (sniffed, f, c) = decode_sniffed(&bytes).unwrap();
                prop_assert_eq!((sniffed, f, c), (batch.clone(), format, compression));
            }
        }
    }

    #[test]
    fn records_with_ids_of_their_own_round_trip_through_the_compact_layout(batch in batch(false)) {
        let bytes = compact::encode(&batch).unwrap();
        prop_assert_eq!(compact::decode(&bytes).unwrap(), batch);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoders(
        bytes in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        let _ = decode(&bytes, Format::Postcard.content_type(), None);
        let _ = decode_sniffed(&bytes);
        let mut versioned = bytes.clone();
        versioned.insert(0, 2);
        let _ = decode_sniffed(&versioned);
    }

    #[test]
    fn corrupted_compact_batches_never_panic(
        batch in batch(true),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let mut bytes = compact::encode(&batch).unwrap();
        let i = at.index(bytes.len());
        bytes[i] = byte;
        let _ = decode(&bytes, Format::Postcard.content_type(), None);
    }
}
