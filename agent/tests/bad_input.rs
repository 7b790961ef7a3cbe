//! Bad input (issue 7): the decoders of everything that comes from outside the agent never
//! panic, and every rejection is an error value with a reason.
//!
//! - MQTT payloads (`source::payload::decode`, `parse_rfc3339_ms`);
//! - serial frames (`sensors::frame::decode_frame`, `Decoder::feed` / `push`);
//! - the configuration (`config::load_str_for`);
//! - upstream batches (`sensors::wire::decode_sniffed` / `decode`), with the decompression
//!   bound;
//! - recordings of `edgewise replay` (`recording::RecordingReader`, `parse_json_line`,
//!   `parse_time`).
//!
//! Each gets arbitrary bytes and valid inputs with random byte flips, truncations, insertions
//! and removals; valid inputs round-trip where an encoder exists. The cargo-fuzz targets in
//! `fuzz/` (run by `scripts/fuzz.sh`) make the same checks on millions of inputs; the inputs
//! they found crashing are kept in `fuzz/regressions/<target>/` and replayed here.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use edgewise::config::{PayloadConfig, PayloadFormat, Purpose, TimestampUnit, load_str_for};
use edgewise::recording::{self, Line, RecordingReader};
use edgewise::source::payload::{self, parse_rfc3339_ms};
use proptest::prelude::*;
use sensors::frame::{self, Decoder, Frame, FrameError, MAX_CHANNELS, MAX_FRAME_SIZE};
use sensors::reading::{ChannelReading, FaultCode, Quality, Unit};
use sensors::record::{Alert, AlertState, Batch, Gap, Lane, Record, RecordBody, Severity, Summary};
use sensors::wire::{self, Compression, Format};

/// The last year `humantime` can represent on this target (see
/// `valid_rfc3339_timestamps_parse_to_their_instant`).
#[cfg(target_pointer_width = "64")]
const MAX_ORACLE_YEAR: i64 = 9999;
#[cfg(not(target_pointer_width = "64"))]
const MAX_ORACLE_YEAR: i64 = 2037;

/// 9999-12-31T23:59:59.999Z in ms: the decoders' documented latest timestamp.
const MAX_TS_MS: i64 = 253_402_300_799_999;

// ---- mutations ----

/// One edit of a valid input.
#[derive(Debug, Clone)]
enum Mutation {
    /// XOR a byte with a non-zero mask.
    Flip(prop::sample::Index, u8),
    /// Cut the input there.
    Truncate(prop::sample::Index),
    /// Insert a byte there.
    Insert(prop::sample::Index, u8),
    /// Remove the byte there.
    Remove(prop::sample::Index),
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    let one = prop_oneof![
        (any::<prop::sample::Index>(), 1u8..=255).prop_map(|(i, m)| Mutation::Flip(i, m)),
        any::<prop::sample::Index>().prop_map(Mutation::Truncate),
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<prop::sample::Index>().prop_map(Mutation::Remove),
    ];
    prop::collection::vec(one, 1..5)
}

fn mutate(mut bytes: Vec<u8>, edits: &[Mutation]) -> Vec<u8> {
    for edit in edits {
        match edit {
            Mutation::Flip(i, mask) if !bytes.is_empty() => {
                let i = i.index(bytes.len());
                bytes[i] ^= mask;
            }
            Mutation::Truncate(i) => bytes.truncate(i.index(bytes.len() + 1)),
            Mutation::Insert(i, b) => bytes.insert(i.index(bytes.len() + 1), *b),
            Mutation::Remove(i) if !bytes.is_empty() => {
                bytes.remove(i.index(bytes.len()));
            }
            _ => {}
        }
    }
    bytes
}

// ---- MQTT payloads ----

fn payload_configs() -> Vec<PayloadConfig> {
    let mut out = Vec::new();
    for format in [PayloadFormat::Json, PayloadFormat::Number] {
        for timestamp_unit in [TimestampUnit::Auto, TimestampUnit::Ms, TimestampUnit::S] {
            for (value, timestamp) in
                [("value", "ts"), ("data.readings.1.v", "meta.time"), ("", "ts")]
            {
                out.push(PayloadConfig {
                    format,
                    value: value.into(),
                    timestamp: timestamp.into(),
                    timestamp_unit,
                });
            }
        }
    }
    out
}

/// Decodes `bytes` with every configuration and checks the outcome's invariants.
fn check_payload(bytes: &[u8]) -> Result<(), TestCaseError> {
    for cfg in payload_configs() {
        match payload::decode(&cfg, bytes) {
            Ok(decoded) => {
                prop_assert!(decoded.value.is_finite(), "{decoded:?}");
                if let Some(ts) = decoded.ts_ms {
                    prop_assert!((0..=MAX_TS_MS).contains(&ts), "{decoded:?}");
                }
            }
            Err(e) => {
                prop_assert!(!e.to_string().is_empty() && !e.cause().is_empty(), "{e:?}");
            }
        }
    }
    if let Ok(text) = std::str::from_utf8(bytes) {
        check_rfc3339(text)?;
    }
    Ok(())
}

fn check_rfc3339(text: &str) -> Result<(), TestCaseError> {
    match parse_rfc3339_ms(text) {
        Ok(ms) => prop_assert!((0..=MAX_TS_MS).contains(&ms), "{text:?} gave {ms}"),
        Err(reason) => prop_assert!(!reason.is_empty(), "{text:?}"),
    }
    Ok(())
}

const VALID_PAYLOADS: [&str; 5] = [
    r#"{"value": 21.5, "ts": "2023-11-14T22:13:20.123+02:00"}"#,
    r#"{"value": "7.25", "ts": 1700000000123}"#,
    r#"{"data":{"readings":[{"v":1},{"v":2.5}]},"meta":{"time":1700000000}}"#,
    " 21.5\n",
    "-1e3",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_never_panic_the_payload_decoder(
        bytes in prop::collection::vec(any::<u8>(), 0..120),
    ) {
        check_payload(&bytes)?;
    }

    #[test]
    fn mutated_payloads_never_panic_the_payload_decoder(
        which in 0..VALID_PAYLOADS.len(),
        edits in mutations(),
    ) {
        check_payload(&mutate(VALID_PAYLOADS[which].as_bytes().to_vec(), &edits))?;
    }

    #[test]
    fn mutated_timestamps_never_panic_the_rfc3339_parser(edits in mutations()) {
        let bytes = mutate(b"2023-11-14T22:13:20.123+02:00".to_vec(), &edits);
        check_rfc3339(&String::from_utf8_lossy(&bytes))?;
    }

    /// Valid UTC timestamps parse to what `humantime` (an independent parser) makes of them.
    /// humantime returns a `SystemTime`, which on 32-bit ARM (armv7, a 32-bit `time_t`) ends
    /// in January 2038: there the years stop at 2037 (our parser works in `i64` ms on every
    /// target; `timestamps_at_the_ends_of_i64_neither_panic_nor_storm` covers the far future).
    #[test]
    fn valid_rfc3339_timestamps_parse_to_their_instant(
        (year, month, day) in (1970i64..=MAX_ORACLE_YEAR, 1i64..=12, 1i64..=28),
        (hour, minute, second, ms) in (0i64..24, 0i64..60, 0i64..60, 0i64..1000),
    ) {
        let text = format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{ms:03}Z");
        let reference = humantime::parse_rfc3339(&text).unwrap();
        let reference_ms = reference.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
        prop_assert_eq!(parse_rfc3339_ms(&text), Ok(reference_ms as i64), "{}", text);
    }
}

/// The ends of the accepted range, on every target (the property above stops at 2037 on
/// 32-bit ARM, where its oracle does): values computed independently of both parsers.
#[test]
fn rfc3339_timestamps_at_the_ends_of_the_range_parse_on_every_target() {
    assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00.000Z"), Ok(0));
    // 2038-01-19T03:14:08Z is 2^31 s: the first second a 32-bit time_t cannot hold.
    assert_eq!(parse_rfc3339_ms("2038-01-19T03:14:08.000Z"), Ok((1i64 << 31) * 1000));
    // `date -u -d 9999-12-31T23:59:59Z +%s` prints 253402300799.
    assert_eq!(parse_rfc3339_ms("9999-12-31T23:59:59.999Z"), Ok(253_402_300_799_999));
}

// ---- serial frames ----

fn unit() -> impl Strategy<Value = Unit> {
    prop::sample::select(vec![
        Unit::Celsius,
        Unit::PercentRh,
        Unit::Hectopascal,
        Unit::MillimetrePerSecond,
        Unit::G,
        Unit::Milliampere,
        Unit::Volt,
        Unit::Watt,
        Unit::Unitless,
    ])
}

fn quality() -> impl Strategy<Value = Quality> {
    prop_oneof![
        Just(Quality::Good),
        Just(Quality::Uncertain),
        prop::sample::select(vec![
            FaultCode::Bus,
            FaultCode::WrongDevice,
            FaultCode::InvalidData,
            FaultCode::Timeout
        ])
        .prop_map(Quality::Fault),
    ]
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    let reading = (any::<u8>(), unit(), any::<f32>(), quality()).prop_map(
        |(channel, unit, value, quality)| ChannelReading { channel, unit, value, quality },
    );
    (
        prop_oneof![any::<u32>(), 0u32..200],
        any::<u32>(),
        any::<u32>(),
        prop::collection::vec(reading, 0..=MAX_CHANNELS),
    )
        .prop_map(|(device_id, seq, tick, readings)| {
            let mut frame = Frame::new(device_id, seq, tick);
            for r in readings {
                frame.readings.push(r).unwrap();
            }
            frame
        })
}

/// A frame's fields with the floats as bits: NaN is a valid reading value.
type FrameFields = (u8, u32, u32, u32, Vec<(u8, Unit, u32, Quality)>);

fn fields(f: &Frame) -> FrameFields {
    let readings =
        f.readings.iter().map(|r| (r.channel, r.unit, r.value.to_bits(), r.quality)).collect();
    (f.version, f.device_id, f.seq, f.device_tick_ms, readings)
}

fn wire_frame(frame: &Frame) -> Vec<u8> {
    let mut out = [0u8; MAX_FRAME_SIZE];
    let n = frame::encode(frame, &mut out).unwrap();
    out[..n].to_vec()
}

/// Runs `bytes` through `decode_frame`, `feed` and `push`; checks that they agree and that
/// errors have messages. Returns the stream decoder's outcomes.
fn check_frames(bytes: &[u8]) -> Result<Vec<Result<FrameFields, FrameError>>, TestCaseError> {
    if let Err(e) = frame::decode_frame(bytes) {
        prop_assert!(!e.to_string().is_empty(), "{e:?}");
    }
    let mut fed = Decoder::new();
    let by_byte: Vec<_> =
        bytes.iter().filter_map(|&b| fed.feed(b)).map(|r| r.map(|f| fields(&f))).collect();
    let by_slice: Vec<_> = Decoder::new().push(bytes).map(|r| r.map(|f| fields(&f))).collect();
    prop_assert_eq!(&by_byte, &by_slice);
    for outcome in &by_slice {
        if let Err(e) = outcome {
            prop_assert!(!e.to_string().is_empty(), "{e:?}");
        }
    }
    Ok(by_slice)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_never_panic_the_frame_decoders(
        bytes in prop::collection::vec(any::<u8>(), 0..400),
    ) {
        for outcome in check_frames(&bytes)? {
            // A CRC-32C makes a valid frame in random bytes a ~2^-32 event.
            prop_assert!(outcome.is_err(), "random bytes decoded as {outcome:?}");
        }
    }

    #[test]
    fn frames_round_trip_through_both_decoders(frame in arb_frame()) {
        let wire = wire_frame(&frame);
        prop_assert!(wire.len() <= MAX_FRAME_SIZE);
        let block = frame::decode_frame(&wire[..wire.len() - 1]).unwrap();
        prop_assert_eq!(fields(&block), fields(&frame));
        prop_assert_eq!(check_frames(&wire)?, vec![Ok(fields(&frame))]);
    }

    /// A damaged frame is an error, never a different frame.
    #[test]
    fn mutated_frames_are_rejected_or_unchanged(frame in arb_frame(), edits in mutations()) {
        let bytes = mutate(wire_frame(&frame), &edits);
        for got in check_frames(&bytes)?.into_iter().flatten() {
            prop_assert_eq!(got, fields(&frame));
        }
    }

    /// Whatever came before, a 0x00 resynchronises: every valid frame after it decodes.
    #[test]
    fn valid_frames_after_garbage_are_all_decoded(
        garbage in prop::collection::vec(any::<u8>(), 0..300),
        frames in prop::collection::vec(arb_frame(), 1..6),
    ) {
        let mut decoder = Decoder::new();
        let mut prefix = garbage;
        prefix.push(0);
        for outcome in decoder.push(&prefix) {
            prop_assert!(outcome.is_err(), "garbage decoded as {outcome:?}");
        }
        let stream: Vec<u8> = frames.iter().flat_map(wire_frame).collect();
        let got: Vec<_> = decoder.push(&stream).map(|r| r.map(|f| fields(&f))).collect();
        let want: Vec<_> = frames.iter().map(|f| Ok(fields(f))).collect();
        prop_assert_eq!(got, want);
    }
}

// ---- configuration ----

const SHIPPED_CONFIGS: [(&str, &str); 6] = [
    ("cold-chain.toml", include_str!("../../config/cold-chain.toml")),
    ("demo.toml", include_str!("../../config/demo.toml")),
    ("gateway.toml", include_str!("../../config/gateway.toml")),
    ("patient-monitoring.toml", include_str!("../../config/patient-monitoring.toml")),
    ("pump-maintenance.toml", include_str!("../../config/pump-maintenance.toml")),
    ("reference.toml", include_str!("../../config/reference.toml")),
];

/// Loads `text` for `Purpose::Offline` (`Run` would read secret files and environment
/// variables named in the text) and checks that a rejection lists located problems.
fn check_config(text: &str) -> Result<(), TestCaseError> {
    if let Err(errors) = load_str_for("bad.toml", text, Purpose::Offline) {
        prop_assert!(!errors.problems.is_empty());
        for p in &errors.problems {
            prop_assert!(!p.message.is_empty(), "{p:?}");
            prop_assert!(p.line >= 1 && p.column >= 1, "unlocated: {p:?}");
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn arbitrary_text_never_panics_the_config_parser(
        text in r##"([\[\]{}="#., a-z0-9_\n-]|\[\[rules\]\]|kind|series|labels){0,60}"##,
    ) {
        check_config(&text)?;
    }

    #[test]
    fn mutated_configs_never_panic_the_config_parser(
        which in 0..SHIPPED_CONFIGS.len(),
        edits in mutations(),
    ) {
        let bytes = mutate(SHIPPED_CONFIGS[which].1.as_bytes().to_vec(), &edits);
        check_config(&String::from_utf8_lossy(&bytes))?;
    }
}

/// A rule with this label key (one every rule accepts) fails validation with a message at its
/// key, not with a panic.
fn config_with_label_key(key: &str) -> String {
    format!(
        "[agent]\nid = \"gw\"\n\n[[rules]]\nkind = \"threshold\"\nname = \"hot\"\n\
         series = \"a/temp\"\nabove = 80.0\nlabels = {{ {key:?} = \"x\" }}\n\n\
         [upstream]\nkind = \"file\"\npath = \"out.jsonl\"\n"
    )
}

/// Found by review, reproduced by the `config` fuzz target: a label name with `]]` after a
/// `[` (or a multi-byte character after a `]`) went into `KeyPath::parse` as part of the
/// issue's path and sliced a string out of bounds.
#[test]
fn label_names_with_brackets_are_reported_not_panicked_on() {
    for key in ["a[1]]", "[]]", "a[1]é]", "x[0]]]"] {
        let text = config_with_label_key(key);
        let errors = load_str_for("labels.toml", &text, Purpose::Offline)
            .expect_err("a label name with brackets is not valid");
        assert!(
            errors.problems.iter().any(|p| p.message.contains("label names")),
            "{key}: {errors}"
        );
    }
}

// ---- upstream batches ----

fn float() -> impl Strategy<Value = f64> {
    prop_oneof![
        (-1_000_000i64..1_000_000, 0u8..=4).prop_map(|(m, k)| m as f64 / 10f64.powi(k.into())),
        any::<f64>().prop_filter("JSON has no NaN or infinities", |f| f.is_finite()),
    ]
}

fn body(lane: Lane, seq: u64) -> impl Strategy<Value = RecordBody> {
    let summary = (".{0,8}", any::<i64>(), any::<u64>(), (float(), float(), float(), float()))
        .prop_map(|(series, start_ms, count, (min, max, mean, stddev))| {
            RecordBody::Summary(Summary {
                series,
                start_ms,
                window_ms: 10_000,
                count,
                min,
                max,
                mean,
                stddev,
                first: min,
                last: max,
                windows: 1,
            })
        });
    let alert = (".{0,8}", any::<bool>(), any::<i64>(), float(), ".{0,8}").prop_map(
        |(rule, cleared, ts_ms, value, message)| {
            RecordBody::Alert(Alert {
                rule,
                series: "p/t".into(),
                state: if cleared { AlertState::Cleared } else { AlertState::Raised },
                severity: Severity::Warning,
                ts_ms,
                value,
                threshold: 90.0,
                message,
                labels: [("device".to_string(), "p".to_string())].into(),
            })
        },
    );
    let gap =
        (0u64..100, any::<Option<i64>>(), any::<u64>()).prop_map(move |(span, from_ms, events)| {
            RecordBody::Gap(Gap {
                lane,
                first_seq: seq,
                last_seq: seq + span,
                records: span + 1,
                from_ms,
                to_ms: None,
                reason: "outbox_full".into(),
                events,
            })
        });
    prop_oneof![summary, alert, gap]
}

/// A verified batch: one lane, increasing seqs, derived ids.
fn arb_batch() -> impl Strategy<Value = Batch> {
    (any::<bool>(), any::<u64>(), 0u64..1_000_000, 1usize..6)
        .prop_flat_map(|(alerts, epoch, first_seq, n)| {
            let lane = if alerts { Lane::Alerts } else { Lane::Summaries };
            let bodies: Vec<_> = (0..n as u64).map(|i| body(lane, first_seq + 2 * i)).collect();
            (Just((lane, epoch, first_seq)), bodies)
        })
        .prop_map(|((lane, epoch, first_seq), bodies)| {
            let records: Vec<Record> = bodies
                .into_iter()
                .enumerate()
                .map(|(i, body)| {
                    let seq = first_seq + 2 * i as u64;
                    let id = match body {
                        RecordBody::Gap(_) => sensors::record::gap_id("gw", epoch, lane, seq),
                        _ => sensors::record::record_id("gw", epoch, lane, seq),
                    };
                    Record { id, seq, body }
                })
                .collect();
            Batch {
                version: sensors::record::BATCH_FORMAT_VERSION,
                agent: "gw".into(),
                lane,
                first_seq,
                last_seq: records.last().unwrap().seq,
                records,
            }
        })
}

/// Decodes `bytes` every way a receiver may; accepted batches pass `verify`, rejections say
/// why.
fn check_wire(bytes: &[u8]) -> Result<(), TestCaseError> {
    let mut outcomes = vec![wire::decode_sniffed(bytes).map(|(batch, _, _)| batch)];
    for format in Format::ALL {
        for encoding in [None, Some("identity"), Some("zstd"), Some("gzip")] {
            outcomes.push(wire::decode(bytes, format.content_type(), encoding));
        }
    }
    for outcome in outcomes {
        match outcome {
            Ok(batch) => prop_assert!(wire::verify(&batch).is_ok(), "{batch:?}"),
            Err(e) => prop_assert!(!e.to_string().is_empty(), "{e:?}"),
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn arbitrary_bytes_never_panic_the_batch_decoders(
        bytes in prop::collection::vec(any::<u8>(), 0..300),
        magic in prop::sample::select(vec![&b""[..], b"\x02", b"{", b"\x28\xb5\x2f\xfd", b"\x1f\x8b"]),
    ) {
        let mut input = magic.to_vec();
        input.extend_from_slice(&bytes);
        check_wire(&input)?;
    }

    #[test]
    fn batches_round_trip_through_every_format_and_compression(batch in arb_batch()) {
        prop_assert!(wire::verify(&batch).is_ok(), "{:?}", wire::verify(&batch));
        for format in Format::ALL {
            for compression in Compression::ALL {
                let bytes = wire::encode(&batch, format, compression).unwrap();
                let encoding = Some(compression.content_encoding());
                let decoded = wire::decode(&bytes, format.content_type(), encoding).unwrap();
                prop_assert_eq!(&decoded, &batch);
                let sniffed = wire::decode_sniffed(&bytes).unwrap();
                prop_assert_eq!(sniffed, (batch.clone(), format, compression));
            }
        }
    }

    #[test]
    fn mutated_batches_never_panic_the_batch_decoders(
        batch in arb_batch(),
        format in prop::sample::select(Format::ALL.to_vec()),
        compression in prop::sample::select(Compression::ALL.to_vec()),
        edits in mutations(),
    ) {
        let bytes = wire::encode(&batch, format, compression).unwrap();
        check_wire(&mutate(bytes, &edits))?;
    }
}

/// A zip bomb is refused as too large, whichever compression carries it.
#[test]
fn bodies_that_decompress_beyond_the_limit_are_too_large() {
    let plain = vec![b' '; wire::MAX_DECODED_BYTES + 1];
    for compression in [Compression::Zstd, Compression::Gzip] {
        let bomb = wire::compress(&plain, compression).unwrap();
        assert!(bomb.len() < 1 << 20, "{compression}: {} bytes", bomb.len());
        let error = wire::decode_sniffed(&bomb).unwrap_err();
        assert!(error.is_too_large(), "{compression}: {error}");
        let error = wire::decode(&bomb, "application/json", Some(compression.content_encoding()))
            .unwrap_err();
        assert!(error.is_too_large(), "{compression}: {error}");
    }
}

// ---- recordings ----

/// Reads `bytes` as a recording in every format, with and without a default series, and
/// checks every line it yields.
fn check_recording(bytes: &[u8]) -> Result<(), TestCaseError> {
    for format in [recording::Format::Csv, recording::Format::JsonLines] {
        for series in [None, Some("dev/metric".to_string())] {
            let mut reader =
                RecordingReader::new(Cursor::new(bytes), Path::new("bad.rec"), format, series);
            let mut last = 0;
            loop {
                match reader.next_line() {
                    Ok(None) => break,
                    Ok(Some(Line::Reading(r))) => {
                        prop_assert!(r.line > last, "{r:?} after line {last}");
                        last = r.line;
                        prop_assert!(!r.series.is_empty() && r.value.is_finite(), "{r:?}");
                        prop_assert!((0..=MAX_TS_MS).contains(&r.ts_ms), "{r:?}");
                    }
                    Ok(Some(Line::Bad(bad))) => {
                        prop_assert!(bad.line > last, "{bad:?} after line {last}");
                        last = bad.line;
                        prop_assert!(!bad.reason.is_empty(), "{bad:?}");
                    }
                    Err(e) => {
                        prop_assert!(!e.to_string().is_empty(), "{e:?}");
                        break;
                    }
                }
            }
        }
    }
    if let Ok(text) = std::str::from_utf8(bytes) {
        if let Err(e) = recording::parse_json_line(text, None, None) {
            prop_assert!(!e.cause.is_empty() && !e.reason.is_empty(), "{e:?}");
        }
        if let Err(e) = recording::parse_time(text, 1_700_000_000_000) {
            prop_assert!(!e.to_string().is_empty(), "{e:?}");
        }
    }
    Ok(())
}

const VALID_RECORDINGS: [&str; 4] = [
    "{\"ts\": 1718000000000, \"series\": \"pump-1/temperature\", \"value\": 71.5}\n\
     {\"timestamp\": \"2024-06-10T06:13:20.5Z\", \"series\": \"pump-1/temperature\", \"value\": 72}\n",
    "timestamp,series,value\n2024-06-10T06:13:20Z,pump-1/temperature,71.5\n\"1718000001\",\"a,b\",\"3\"\n",
    "ts_ms,value\n1718000000000,71.5\n# note\n\n1718000001000,72\n",
    "1718000000,71.5\n1718000001,72\n",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_never_panic_the_recording_reader(
        bytes in prop::collection::vec(
            prop_oneof![any::<u8>(), prop::sample::select(b",\n\"{}:0123456789.-TZ".to_vec())],
            0..200,
        ),
    ) {
        check_recording(&bytes)?;
    }

    #[test]
    fn mutated_recordings_never_panic_the_recording_reader(
        which in 0..VALID_RECORDINGS.len(),
        edits in mutations(),
    ) {
        check_recording(&mutate(VALID_RECORDINGS[which].as_bytes().to_vec(), &edits))?;
    }

    /// What `journal export` writes, `replay` reads back unchanged.
    #[test]
    fn written_readings_read_back(
        readings in prop::collection::vec(
            (100_000_000_000..=MAX_TS_MS, ".{1,12}", any::<f64>().prop_filter("finite", |v| v.is_finite())),
            1..8,
        ),
    ) {
        let mut text = Vec::new();
        for (ts, series, value) in &readings {
            recording::write_reading(&mut text, *ts, series, *value).unwrap();
        }
        let reader = RecordingReader::new(
            Cursor::new(&text),
            Path::new("export.jsonl"),
            recording::Format::JsonLines,
            None,
        );
        let got: Vec<_> = reader
            .map(|line| match line.unwrap() {
                Line::Reading(r) => (r.ts_ms, r.series, r.value),
                Line::Bad(bad) => panic!("{bad:?} in {}", String::from_utf8_lossy(&text)),
            })
            .collect();
        prop_assert_eq!(got, readings);
    }
}

// ---- inputs the fuzzer found ----

/// Every input under `fuzz/regressions/<target>/` goes through the checks of the decoder its
/// target fuzzes (the first byte selects the configuration in `payload` and `recording`, as
/// in the fuzz targets; here every configuration is tried).
#[test]
fn inputs_the_fuzzer_found_crashing_are_handled() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions");
    let Ok(targets) = std::fs::read_dir(&root) else { return };
    for target in targets {
        let target = target.unwrap().path();
        let name = target.file_name().unwrap().to_string_lossy().into_owned();
        for input in std::fs::read_dir(&target).unwrap() {
            let path = input.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            let rest = bytes.get(1..).unwrap_or_default();
            let outcome = match name.as_str() {
                "payload" => check_payload(rest),
                "frame" => check_frames(&bytes).map(drop),
                "config" => check_config(&String::from_utf8_lossy(&bytes)),
                "wire" => check_wire(&bytes),
                "recording" => check_recording(rest),
                other => panic!("no checks for fuzz target `{other}`"),
            };
            if let Err(e) = outcome {
                panic!("{}: {e}", path.display());
            }
        }
    }
}
