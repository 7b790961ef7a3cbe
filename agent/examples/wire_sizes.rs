//! Bytes on the wire and codec time of the upstream formats, on a realistic workload.
//!
//! ```text
//! cargo run --release -p edgewise --example wire_sizes
//! ```
//!
//! Workload: 1,000 series (200 pumps × temperature, vibration, pressure, current, humidity),
//! six 10 s windows of summaries over 1 Hz readings, in batches of 500 records as the agent
//! sends a backlog; 100 alerts with labels, as one backlog batch and one at a time (alerts
//! leave at once, so live alert batches hold one record). Readings have a sensor's
//! resolution (0.01) as MQTT JSON payloads carry them; two more rows show summaries of
//! full-precision (simulated) and f32 (firmware) readings. Prints a Markdown table.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use sensors::record::{
    Alert, AlertState, BATCH_FORMAT_VERSION, Batch, Lane, Record, RecordBody, Severity, Summary,
    record_id,
};
use sensors::wire::{self, Compression, Format};

const AGENT: &str = "line3-gw01";
const EPOCH: u64 = 0x5be0_c1d2_a3f4_e5d6;
const DEVICES: usize = 200;
const METRICS: [(&str, f64, f64); 5] = [
    ("temperature", 61.0, 2.0),
    ("vibration", 3.5, 0.8),
    ("pressure", 4.2, 0.3),
    ("current", 12.0, 1.5),
    ("humidity", 45.0, 5.0),
];
const WINDOWS: usize = 6;
const WINDOW_MS: u64 = 10_000;
const READINGS_PER_WINDOW: usize = 10;
const START_MS: i64 = 1_764_064_800_000;
const BATCH_RECORDS: usize = 500;
const ALERTS: usize = 100;
/// Each timing repeats its work for at least this long.
const MIN_TIMING: Duration = Duration::from_millis(300);

/// How readings are quantised.
#[derive(Clone, Copy)]
enum Readings {
    /// 0.01 resolution, as decimal JSON payloads.
    Decimal,
    /// Whatever an f64 simulation produces.
    Full,
    /// f32, as firmware frames carry them.
    F32,
}

fn summaries(kind: Readings) -> Vec<RecordBody> {
    let mut rng = fastrand::Rng::with_seed(7);
    let mut out = Vec::new();
    for window in 0..WINDOWS {
        for device in 1..=DEVICES {
            for (metric, base, spread) in METRICS {
                let values: Vec<f64> = (0..READINGS_PER_WINDOW)
                    .map(|_| {
                        let v = base + spread * (rng.f64() - 0.5) + device as f64 * 0.01;
                        match kind {
                            Readings::Decimal => (v * 100.0).round() / 100.0,
                            Readings::Full => v,
                            Readings::F32 => f64::from(v as f32),
                        }
                    })
                    .collect();
                let n = values.len() as f64;
                let mean = values.iter().sum::<f64>() / n;
                let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
                out.push(RecordBody::Summary(Summary {
                    series: format!("pump-{device}/{metric}"),
                    start_ms: START_MS + (window as u64 * WINDOW_MS) as i64,
                    window_ms: WINDOW_MS,
                    count: values.len() as u64,
                    min: values.iter().copied().fold(f64::INFINITY, f64::min),
                    max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                    mean,
                    stddev: var.sqrt(),
                    first: values[0],
                    last: values[values.len() - 1],
                    windows: 1,
                }));
            }
        }
    }
    out
}

fn alerts() -> Vec<RecordBody> {
    let rules = [
        ("bearing-overheat", "temperature", 85.0, Severity::Critical),
        ("high-vibration", "vibration", 7.1, Severity::Warning),
        ("low-pressure", "pressure", 1.0, Severity::Warning),
        ("overcurrent", "current", 20.0, Severity::Critical),
        ("sensor-stuck", "humidity", 0.0, Severity::Info),
    ];
    (0..ALERTS)
        .map(|i| {
            let (rule, metric, threshold, severity) = rules[i % rules.len()];
            let device = format!("pump-{}", 1 + (i * 37) % DEVICES);
            let raised = i % 2 == 0;
            let value =
                ((threshold + if raised { 1.25 } else { -0.75 }) * 100.0f64).round() / 100.0;
            let state = if raised { "raised" } else { "cleared" };
            let labels = BTreeMap::from([
                ("device".to_string(), device.clone()),
                ("metric".to_string(), metric.to_string()),
                ("site".to_string(), "line3".to_string()),
            ]);
            RecordBody::Alert(Alert {
                rule: rule.into(),
                series: format!("{device}/{metric}"),
                state: if raised { AlertState::Raised } else { AlertState::Cleared },
                severity,
                ts_ms: START_MS + 1_234 + 4_711 * i as i64,
                value,
                threshold,
                message: format!("{device} {metric} at {value} ({state}; limit {threshold})"),
                labels,
            })
        })
        .collect()
}

/// The bodies in batches of `size` records with consecutive seqs, as the outbox hands them out.
fn batches(lane: Lane, bodies: Vec<RecordBody>, size: usize) -> Vec<Batch> {
    let records: Vec<Record> = bodies
        .into_iter()
        .enumerate()
        .map(|(i, body)| {
            let seq = i as u64 + 1;
            Record { id: record_id(AGENT, EPOCH, lane, seq), seq, body }
        })
        .collect();
    records
        .chunks(size)
        .map(|chunk| Batch {
            version: BATCH_FORMAT_VERSION,
            agent: AGENT.into(),
            lane,
            first_seq: chunk[0].seq,
            last_seq: chunk[chunk.len() - 1].seq,
            records: chunk.to_vec(),
        })
        .collect()
}

/// Runs `f` over and over for at least [`MIN_TIMING`]; the mean time of one run.
fn time(mut f: impl FnMut()) -> Duration {
    let start = Instant::now();
    let mut runs = 0u32;
    while start.elapsed() < MIN_TIMING || runs < 3 {
        f();
        runs += 1;
    }
    start.elapsed() / runs
}

struct Row {
    bytes_per_record: f64,
    encode_us_per_record: f64,
    decode_us_per_record: f64,
}

fn measure(batches: &[Batch], format: Format, compression: Compression) -> Row {
    let records: usize = batches.iter().map(|b| b.records.len()).sum();
    let bodies: Vec<Vec<u8>> =
        batches.iter().map(|b| wire::encode(b, format, compression).unwrap()).collect();
    let bytes: usize = bodies.iter().map(Vec::len).sum();
    // Every body decodes (and verifies) back to its batch.
    for (body, batch) in bodies.iter().zip(batches) {
        let encoding = (compression != Compression::None).then(|| compression.content_encoding());
        assert_eq!(&wire::decode(body, format.content_type(), encoding).unwrap(), batch);
    }
    let encode = time(|| {
        for batch in batches {
            std::hint::black_box(wire::encode(batch, format, compression).unwrap());
        }
    });
    let decode = time(|| {
        for body in &bodies {
            let encoding = Some(compression.content_encoding());
            std::hint::black_box(wire::decode(body, format.content_type(), encoding).unwrap());
        }
    });
    let per = |d: Duration| d.as_secs_f64() * 1e6 / records as f64;
    Row {
        bytes_per_record: bytes as f64 / records as f64,
        encode_us_per_record: per(encode),
        decode_us_per_record: per(decode),
    }
}

const COMBINATIONS: [(Format, Compression); 6] = [
    (Format::Json, Compression::None),
    (Format::Json, Compression::Zstd),
    (Format::Json, Compression::Gzip),
    (Format::Postcard, Compression::None),
    (Format::Postcard, Compression::Zstd),
    (Format::Postcard, Compression::Gzip),
];

fn main() {
    let summary_batches = batches(Lane::Summaries, summaries(Readings::Decimal), BATCH_RECORDS);
    let alert_backlog = batches(Lane::Alerts, alerts(), BATCH_RECORDS);
    let alert_live = batches(Lane::Alerts, alerts(), 1);
    println!(
        "{} summaries in {} batches, {} alerts ({} labels each); bytes per record, \
         µs per record to encode and to decode (+ verify)\n",
        WINDOWS * DEVICES * METRICS.len(),
        summary_batches.len(),
        ALERTS,
        3
    );
    println!(
        "| body | summary B | alert B (batch of 100) | alert B (batch of 1) | \
         summary enc µs | summary dec µs | alert enc µs | alert dec µs |"
    );
    println!("|---|--:|--:|--:|--:|--:|--:|--:|");
    let mut compact_zstd = (0.0, 0.0);
    for (format, compression) in COMBINATIONS {
        let s = measure(&summary_batches, format, compression);
        let a = measure(&alert_backlog, format, compression);
        let one = measure(&alert_live, format, compression);
        if (format, compression) == (Format::Postcard, Compression::Zstd) {
            compact_zstd = (s.bytes_per_record, a.bytes_per_record);
        }
        println!(
            "| {format}+{compression} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} |",
            s.bytes_per_record,
            a.bytes_per_record,
            one.bytes_per_record,
            s.encode_us_per_record,
            s.decode_us_per_record,
            a.encode_us_per_record,
            a.decode_us_per_record,
        );
    }
    println!("\nSummaries by how readings are quantised (bytes per summary):\n");
    println!("| readings | json | json+zstd | postcard | postcard+zstd |");
    println!("|---|--:|--:|--:|--:|");
    for (name, kind) in [
        ("0.01 resolution (MQTT JSON)", Readings::Decimal),
        ("f32 (firmware frames)", Readings::F32),
        ("full f64 (simulated)", Readings::Full),
    ] {
        let batches = batches(Lane::Summaries, summaries(kind), BATCH_RECORDS);
        let size = |format, compression| {
            let bytes: usize =
                batches.iter().map(|b| wire::encode(b, format, compression).unwrap().len()).sum();
            bytes as f64 / (WINDOWS * DEVICES * METRICS.len()) as f64
        };
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} | {:.1} |",
            size(Format::Json, Compression::None),
            size(Format::Json, Compression::Zstd),
            size(Format::Postcard, Compression::None),
            size(Format::Postcard, Compression::Zstd),
        );
    }
    eprintln!(
        "\npostcard+zstd: {:.1} B per summary, {:.1} B per alert in a backlog batch",
        compact_zstd.0, compact_zstd.1
    );
}
