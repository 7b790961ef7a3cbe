//! The serial source against real pseudo-terminals: `SerialStream::pair()` gives a master (our
//! "device") and a slave whose `/dev/pts/N` path goes into the config, so the source opens it
//! exactly as it opens a USB adapter.
//!
//! Opening a port flushes its buffers (serialport calls `tcflush`), so bytes written before
//! the source opened the slave are lost. Each test therefore first writes a probe reading
//! until one arrives ([`Running::wait_until_open`]), and skips probe events afterwards.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgewise::config::{
    SerialDataBits, SerialFraming, SerialParity, SerialSourceConfig, SerialStopBits,
};
use edgewise::event::{Event, Ingest};
use edgewise::metrics::Metrics;
use edgewise::source::{SourceError, serial};
use sensors::frame::{Frame, MAX_FRAME_SIZE, encode};
use sensors::reading::{ChannelReading, Unit};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_serial::{SerialPort, SerialStream};
use tokio_util::sync::CancellationToken;

/// Every wait in these tests gives up after this long.
const DEADLINE: Duration = Duration::from_secs(10);

/// `SerialStream::pair` is not thread-safe (ptsname on some platforms): one at a time.
static PTY: Mutex<()> = Mutex::new(());

/// A pty pair: the master end, and the slave's path (the slave fd itself is closed: the
/// source opens the path).
fn pty() -> (SerialStream, PathBuf) {
    let _guard = PTY.lock().unwrap_or_else(|e| e.into_inner());
    let (master, slave) = SerialStream::pair().expect("pty pair");
    let path = PathBuf::from(slave.name().expect("slave has a name"));
    (master, path)
}

fn config(path: &Path, framing: SerialFraming, series: &str) -> SerialSourceConfig {
    SerialSourceConfig {
        name: "serial".into(),
        path: path.to_path_buf(),
        baud: 115_200,
        parity: SerialParity::None,
        data_bits: SerialDataBits::Eight,
        stop_bits: SerialStopBits::One,
        framing,
        series: series.into(),
        reconnect_min: Duration::from_millis(10),
        reconnect_max: Duration::from_millis(100),
    }
}

struct Running {
    rx: mpsc::Receiver<Ingest>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
    task: JoinHandle<Result<(), SourceError>>,
}

impl Running {
    fn start(config: SerialSourceConfig) -> Running {
        let (tx, rx) = mpsc::channel(64);
        let metrics = Arc::new(Metrics::default());
        let cancel = CancellationToken::new();
        let task = tokio::spawn({
            let (metrics, cancel) = (metrics.clone(), cancel.clone());
            async move { serial::run(3, &config, tx, metrics, cancel).await }
        });
        Running { rx, metrics, cancel, task }
    }

    /// Writes a `probe()` every 50 ms until an event comes back: the source has the port open.
    async fn wait_until_open(
        &mut self,
        master: &mut SerialStream,
        mut probe: impl FnMut() -> Vec<u8>,
    ) {
        let start = Instant::now();
        loop {
            master.write_all(&probe()).await.expect("write probe");
            if let Ok(Some(_)) =
                tokio::time::timeout(Duration::from_millis(50), self.rx.recv()).await
            {
                return;
            }
            assert!(start.elapsed() < DEADLINE, "the source never opened the port");
        }
    }

    /// The next event that is not a probe (series `probe` or `99/0`).
    async fn next(&mut self) -> Event {
        loop {
            let ingest = tokio::time::timeout(DEADLINE, self.rx.recv())
                .await
                .expect("an event before the deadline")
                .expect("the source is running");
            assert!(ingest.ack.is_none() && ingest.redelivery.is_none());
            let event = ingest.event.expect("serial sends only events");
            if event.series != "probe" && event.series != "99/0" {
                return event;
            }
        }
    }

    fn rejected(&self, cause: &str) -> u64 {
        self.metrics.rejected().iter().filter(|((_, c), _)| *c == cause).map(|(_, n)| *n).sum()
    }

    async fn stop(self) {
        self.cancel.cancel();
        let result = tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("the source stops on cancel")
            .expect("the task did not panic");
        assert!(result.is_ok(), "{result:?}");
    }
}

const JSON_PROBE: &[u8] = b"{\"series\":\"probe\",\"value\":0}\n";

#[tokio::test]
async fn json_lines_become_events_with_series_value_and_time() {
    let (mut master, path) = pty();
    let mut source = Running::start(config(&path, SerialFraming::JsonLines, "default"));
    source.wait_until_open(&mut master, || JSON_PROBE.to_vec()).await;

    let before = edgewise::event::now_ms();
    master
        .write_all(
            b"{\"series\":\"pump-1/temp\",\"value\":21.5,\"ts\":1700000000000}\n{\"value\":3}\n",
        )
        .await
        .unwrap();
    let a = source.next().await;
    assert_eq!(
        (a.series.as_str(), a.value, a.ts_ms, a.source),
        ("pump-1/temp", 21.5, 1_700_000_000_000, 3)
    );
    let b = source.next().await;
    assert_eq!((b.series.as_str(), b.value), ("default", 3.0));
    assert_eq!(b.ts_ms, b.received_ms, "no ts: receive time");
    assert!(b.received_ms >= before);
    source.stop().await;
}

#[tokio::test]
async fn a_bad_line_is_counted_and_the_next_good_line_still_arrives() {
    let (mut master, path) = pty();
    let mut source = Running::start(config(&path, SerialFraming::CsvLines, "default"));
    source.wait_until_open(&mut master, || b"probe,0\n".to_vec()).await;

    let mut bytes = b"a,not-a-number\n".to_vec();
    bytes.extend(std::iter::repeat_n(b'x', 5_000));
    bytes.extend_from_slice(b"\n1700000000,b,2.5\n");
    master.write_all(&bytes).await.unwrap();
    let event = source.next().await;
    assert_eq!((event.series.as_str(), event.value, event.ts_ms), ("b", 2.5, 1_700_000_000_000));
    assert_eq!(source.rejected("invalid_value"), 1);
    assert_eq!(source.rejected("line_too_long"), 1);
    source.stop().await;
}

fn encoded(device: u32, seq: u32, value: f32) -> Vec<u8> {
    encoded_at(device, seq, seq * 100, value)
}

fn encoded_at(device: u32, seq: u32, tick: u32, value: f32) -> Vec<u8> {
    let mut frame = Frame::new(device, seq, tick);
    frame.readings.push(ChannelReading::good(0, Unit::Celsius, value)).unwrap();
    let mut buf = [0u8; MAX_FRAME_SIZE];
    let n = encode(&frame, &mut buf).unwrap();
    buf[..n].to_vec()
}

/// The next event of series `1/0` (device 1, channel 0).
async fn next_of_device_1(source: &mut Running) -> Event {
    loop {
        let event = source.next().await;
        if event.series == "1/0" {
            return event;
        }
    }
}

#[tokio::test]
async fn frames_survive_garbage_and_corruption_and_gaps_are_counted() {
    let (mut master, path) = pty();
    let mut source = Running::start(config(&path, SerialFraming::Frames, "{device}/{channel}"));
    // The probe is a frame of its own device, whose series `99/0` `next` skips.
    let mut seq = 0;
    source
        .wait_until_open(&mut master, || {
            seq += 1;
            encoded(99, seq, 0.0)
        })
        .await;

    // Seq 1 anchors device 1's clock: the first frame of a device gets its receive time.
    master.write_all(&encoded_at(1, 1, 1_000, 1.0)).await.unwrap();
    let first = next_of_device_1(&mut source).await;
    assert_eq!((first.value, first.ts_ms), (1.0, first.received_ms));

    // The device holds its next frames (ticks 10 ms apart) and sends them in one burst.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut bytes = b"\x13\x37garbage\0".to_vec();
    bytes.extend(encoded_at(1, 2, 1_010, 2.0));
    let mut corrupt = encoded_at(1, 3, 1_020, 3.0);
    corrupt[4] ^= 0x01;
    bytes.extend(corrupt);
    bytes.extend(encoded_at(1, 4, 1_040, 4.0));
    bytes.extend(encoded_at(1, 7, 1_070, 7.0));
    master.write_all(&bytes).await.unwrap();

    let mut got = Vec::new();
    while got.len() < 3 {
        let event = next_of_device_1(&mut source).await;
        assert!(event.ts_ms <= event.received_ms, "{event:?}");
        got.push((event.value, event.ts_ms - first.ts_ms));
    }
    // Spaced by their ticks, not all stamped with the burst's receive time.
    assert_eq!(got, vec![(2.0, 10), (4.0, 40), (7.0, 70)]);
    let frame_errors: u64 = ["frame_cobs", "frame_crc", "frame_decode", "frame_empty"]
        .iter()
        .map(|c| source.rejected(c))
        .sum();
    assert_eq!(frame_errors, 2, "{:?}", source.metrics.rejected());
    // Seq 3 was corrupted, 5 and 6 never sent: lost frames, not rejected input.
    assert_eq!(source.metrics.devices()["serial"].lost_frames, 3);
    assert_eq!(source.metrics.lost_frames_total(), 3);
    assert_eq!(source.rejected("lost_frames"), 0);
    assert_eq!(source.metrics.devices()["serial"].device_restarts, 0);

    // The device restarts: its tick starts over. Counted, and its reading still arrives.
    master.write_all(&encoded_at(1, 1, 5, 8.0)).await.unwrap();
    let after = next_of_device_1(&mut source).await;
    assert_eq!((after.value, after.ts_ms), (8.0, after.received_ms), "re-anchored");
    assert_eq!(source.metrics.devices()["serial"].device_restarts, 1);
    assert_eq!(source.metrics.lost_frames_total(), 3);
    source.stop().await;
}

#[test]
fn the_line_settings_reach_the_port_builder() {
    use tokio_serial::{DataBits, Parity, StopBits};
    let mut settings = config(Path::new("/dev/ttyUSB0"), SerialFraming::Frames, "{device}");
    settings.baud = 9_600;
    let expected = |parity, data_bits, stop_bits| {
        tokio_serial::new("/dev/ttyUSB0", 9_600)
            .parity(parity)
            .data_bits(data_bits)
            .stop_bits(stop_bits)
    };
    assert_eq!(serial::builder(&settings), expected(Parity::None, DataBits::Eight, StopBits::One));
    let cases = [
        (SerialParity::Even, SerialDataBits::Eight, SerialStopBits::One),
        (SerialParity::Odd, SerialDataBits::Seven, SerialStopBits::Two),
        (SerialParity::None, SerialDataBits::Six, SerialStopBits::One),
        (SerialParity::Even, SerialDataBits::Five, SerialStopBits::Two),
    ];
    let wanted = [
        (Parity::Even, DataBits::Eight, StopBits::One),
        (Parity::Odd, DataBits::Seven, StopBits::Two),
        (Parity::None, DataBits::Six, StopBits::One),
        (Parity::Even, DataBits::Five, StopBits::Two),
    ];
    for ((parity, data_bits, stop_bits), (p, d, s)) in cases.into_iter().zip(wanted) {
        settings.parity = parity;
        settings.data_bits = data_bits;
        settings.stop_bits = stop_bits;
        assert_eq!(serial::builder(&settings), expected(p, d, s), "{parity:?} {data_bits:?}");
    }
}

#[tokio::test]
async fn a_pty_opens_with_even_parity_and_keeps_the_stop_bits() {
    // Linux ptys force 8 data bits and no parity (pty_set_termios), so only the stop bits can
    // be read back; the open itself must succeed with any setting.
    let (_master, path) = pty();
    let mut settings = config(&path, SerialFraming::Frames, "{device}");
    for stop_bits in [SerialStopBits::Two, SerialStopBits::One] {
        settings.parity = SerialParity::Even;
        settings.data_bits = SerialDataBits::Seven;
        settings.stop_bits = stop_bits;
        let port = serial::open(&settings).expect("a pty accepts 7E1 and 7E2");
        let want = match stop_bits {
            SerialStopBits::One => tokio_serial::StopBits::One,
            SerialStopBits::Two => tokio_serial::StopBits::Two,
        };
        assert_eq!(port.stop_bits().unwrap(), want);
    }
}

#[tokio::test]
async fn a_source_configured_8e1_reads_its_device() {
    let (mut master, path) = pty();
    let mut settings = config(&path, SerialFraming::JsonLines, "default");
    settings.parity = SerialParity::Even;
    let mut source = Running::start(settings);
    source.wait_until_open(&mut master, || JSON_PROBE.to_vec()).await;
    master.write_all(b"{\"series\":\"meter\",\"value\":230.5}\n").await.unwrap();
    let event = source.next().await;
    assert_eq!((event.series.as_str(), event.value), ("meter", 230.5));
    source.stop().await;
}

#[tokio::test]
async fn the_source_reopens_a_replugged_device_behind_the_same_path() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("ttyDEVICE");
    let (mut master, first) = pty();
    std::os::unix::fs::symlink(&first, &link).unwrap();
    let mut source = Running::start(config(&link, SerialFraming::JsonLines, "default"));
    source.wait_until_open(&mut master, || JSON_PROBE.to_vec()).await;
    master.write_all(b"{\"series\":\"before\",\"value\":1}\n").await.unwrap();
    assert_eq!(source.next().await.series, "before");

    // Unplug: the device end goes away; the source sees EIO and starts retrying.
    drop(master);
    // Replug: a new pty behind the same (re-pointed) path.
    let (mut master, second) = pty();
    let tmp = dir.path().join("ttyDEVICE.new");
    std::os::unix::fs::symlink(&second, &tmp).unwrap();
    std::fs::rename(&tmp, &link).unwrap();
    source.wait_until_open(&mut master, || JSON_PROBE.to_vec()).await;
    master.write_all(b"{\"series\":\"after\",\"value\":2}\n").await.unwrap();
    assert_eq!(source.next().await.series, "after");
    assert!(!source.task.is_finished());
    source.stop().await;
}

#[tokio::test]
async fn a_missing_device_is_retried_until_cancel() {
    let dir = tempfile::tempdir().unwrap();
    let source =
        Running::start(config(&dir.path().join("absent"), SerialFraming::Frames, "{device}"));
    assert!(!source.task.is_finished());
    source.stop().await;
}

#[tokio::test]
async fn an_unknown_series_placeholder_is_a_config_error() {
    let (tx, _rx) = mpsc::channel(1);
    let result = serial::run(
        0,
        &config(Path::new("/dev/null"), SerialFraming::Frames, "{topic}"),
        tx,
        Arc::new(Metrics::default()),
        CancellationToken::new(),
    )
    .await;
    assert!(matches!(result, Err(SourceError::InvalidConfig { .. })), "{result:?}");
}
