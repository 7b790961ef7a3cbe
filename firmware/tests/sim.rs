//! `firmware-sim` as a process: frames on stdout with line faults, and a pty that is
//! unplugged and replugged. Every wait has a deadline; the child is killed on drop.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use sensors::frame::{Decoder, Frame, FrameError};
use serde_json::Value;

/// Generous: CI machines have 2 cores and may be compiling at the same time.
const DEADLINE: Duration = Duration::from_secs(30);

/// A running simulator: its stderr events arrive on a channel; killed on drop.
struct Sim {
    child: Child,
    events: Receiver<Value>,
    seen: Vec<Value>,
}

impl Sim {
    fn spawn(args: &[&str]) -> (Sim, Option<ChildStdout>) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_firmware-sim"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("firmware-sim starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, events) = channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let event = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("stderr line is not JSON ({e}): {line}"));
                if tx.send(event).is_err() {
                    break;
                }
            }
        });
        let stdout = child.stdout.take();
        (Sim { child, events, seen: Vec::new() }, stdout)
    }

    /// The next event called `name` (earlier events are kept in `seen`).
    fn event(&mut self, name: &str) -> Value {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(event) => {
                    self.seen.push(event.clone());
                    if event["event"] == name {
                        return event;
                    }
                    assert_ne!(event["event"], "error", "the simulator failed: {event}");
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("no `{name}` event in {DEADLINE:?}; seen: {:?}", self.seen)
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("stderr closed before a `{name}` event; seen: {:?}", self.seen)
                }
            }
        }
    }

    /// Sends SIGTERM and waits for the exit.
    fn terminate(&mut self) -> ExitStatus {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "no exit in {DEADLINE:?} after SIGTERM");
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads `source` on a thread; chunks arrive on the channel until EOF or an error (a pty
/// whose master closed reads EIO).
fn read_chunks(mut source: impl Read + Send + 'static) -> Receiver<Vec<u8>> {
    let (tx, rx) = channel();
    thread::spawn(move || {
        let mut buf = [0u8; 1024];
        loop {
            match source.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    rx
}

/// Decodes chunks until `done` says enough or the source ends; returns the outcomes.
fn decode_until(
    chunks: &Receiver<Vec<u8>>,
    mut done: impl FnMut(&[Result<Frame, FrameError>]) -> bool,
) -> Vec<Result<Frame, FrameError>> {
    let deadline = Instant::now() + DEADLINE;
    let mut decoder = Decoder::new();
    let mut outcomes = Vec::new();
    while !done(&outcomes) {
        let left = deadline.saturating_duration_since(Instant::now());
        match chunks.recv_timeout(left) {
            Ok(chunk) => outcomes.extend(decoder.push(&chunk)),
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => panic!("no bytes in {DEADLINE:?}: {outcomes:?}"),
        }
    }
    outcomes
}

/// The seq of each good frame, `None` for each error.
fn seqs(outcomes: &[Result<Frame, FrameError>]) -> Vec<Option<u32>> {
    outcomes.iter().map(|o| o.as_ref().ok().map(|f| f.seq)).collect()
}

/// Every good frame carries one counter reading equal to its seq.
fn assert_counter_is_seq(outcomes: &[Result<Frame, FrameError>]) {
    for frame in outcomes.iter().flatten() {
        assert_eq!(frame.device_id, 7);
        assert_eq!(frame.readings.len(), 1, "{frame:?}");
        assert_eq!(frame.readings[0].channel, 0);
        assert_eq!(frame.readings[0].value, frame.seq as f32, "{frame:?}");
    }
}

#[test]
fn stdout_frames_carry_the_counter_with_garbage_and_a_corrupted_frame() {
    let (mut sim, stdout) = Sim::spawn(&[
        "--out",
        "-",
        "--frames",
        "20",
        "--sensors",
        "counter",
        "--interval",
        "5ms",
        "--garbage-every",
        "5",
        "--corrupt",
        "7",
    ]);
    let chunks = read_chunks(stdout.unwrap());
    let done = sim.event("done");
    assert_eq!(done["frames"], 20);
    assert_eq!(done["sent"], 20);
    assert_eq!(done["dropped"], 0);
    assert_eq!(done["dropped_seqs"], Value::Null);
    assert_eq!(done["garbage_bursts"], 4);
    assert_eq!(done["corrupted"], serde_json::json!([7]));
    assert!(sim.terminate().success());
    // stdout is closed at exit: everything written is in the pipe.
    let outcomes = decode_until(&chunks, |_| false);

    // Frame 7 is one error in its place; a burst after frames 4, 9, 14 and 19 is one error.
    let mut want = Vec::new();
    for seq in 0..20u32 {
        want.push((seq != 7).then_some(seq));
        if (seq + 1) % 5 == 0 {
            want.push(None);
        }
    }
    assert_eq!(seqs(&outcomes), want);
    assert_eq!(outcomes.iter().filter(|o| o.is_err()).count(), 5);
    assert_counter_is_seq(&outcomes);
}

/// The path a symlink points to, if it exists.
fn link_target(link: &Path) -> Option<PathBuf> {
    std::fs::read_link(link).ok()
}

#[test]
fn a_pty_buffers_frames_and_an_unplug_replugs_to_a_new_pts_with_the_reported_gap() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("ttyEDGE");
    let link_arg = link.to_str().unwrap();
    let (mut sim, _) = Sim::spawn(&[
        "--pty",
        link_arg,
        "--frames",
        "150",
        "--sensors",
        "counter",
        "--interval",
        "5ms",
        "--unplug-at",
        "40",
        "--unplug-for",
        "300ms",
    ]);
    let pty = sim.event("pty");
    let first_path = PathBuf::from(pty["path"].as_str().unwrap());
    assert_eq!(pty["link"], link_arg);
    assert_eq!(link_target(&link), Some(first_path.clone()));

    // Read the first pty with a plain File until it hangs up (the unplug closes the master).
    let first = File::open(&link).unwrap();
    // Held until the replug, so that the kernel cannot give the new pair the same pts number.
    let _hold_first = first.try_clone().unwrap();
    let before = decode_until(&read_chunks(first), |_| false);
    let unplugged = sim.event("unplugged");
    assert_eq!(unplugged["seq"], 40);

    let replugged = sim.event("replugged");
    let second_path = PathBuf::from(replugged["path"].as_str().unwrap());
    assert_ne!(second_path, first_path, "a replug makes a new pty");
    assert_eq!(link_target(&link), Some(second_path.clone()));
    let second = File::open(&link).unwrap();
    let after_chunks = read_chunks(second);

    let done = sim.event("done");
    assert_eq!(done["frames"], 150);
    let sent = done["sent"].as_u64().unwrap();
    let dropped = done["dropped"].as_u64().unwrap();
    assert_eq!(sent + dropped, 150);
    let [first_dropped, last_dropped] = [0, 1].map(|i| done["dropped_seqs"][i].as_u64().unwrap());
    assert_eq!(first_dropped, 40);
    assert_eq!(last_dropped - first_dropped + 1, dropped, "only the unplug dropped frames");
    assert!(dropped >= 10, "300 ms at 5 ms per frame drops dozens of frames: {dropped}");

    // The first pty delivered every frame before the unplug (it waits for the reader).
    let before_seqs = seqs(&before);
    assert_eq!(before_seqs, (0..40).map(Some).collect::<Vec<_>>());
    // The second pty: every frame after the gap, from last_dropped + 1 to 149, none lost (its
    // slave was open from the start, so nothing was lost before we opened it).
    let last = 149;
    let after = decode_until(&after_chunks, |o| {
        o.last().is_some_and(|f| f.as_ref().is_ok_and(|f| f.seq == last))
    });
    let want: Vec<Option<u32>> = (last_dropped as u32 + 1..=last).map(Some).collect();
    assert_eq!(seqs(&after), want);
    assert_counter_is_seq(&before);
    assert_counter_is_seq(&after);

    assert!(sim.terminate().success());
    assert!(link.symlink_metadata().is_err(), "the link is removed on exit");
}

/// Runs the simulator to `--frames N` on stdout and returns its frames and `done` event.
fn run_to_done(args: &[&str]) -> (Vec<Result<Frame, FrameError>>, Value) {
    let mut all = vec!["--out", "-"];
    all.extend_from_slice(args);
    let (mut sim, stdout) = Sim::spawn(&all);
    let chunks = read_chunks(stdout.unwrap());
    let done = sim.event("done");
    assert!(sim.terminate().success());
    (decode_until(&chunks, |_| false), done)
}

#[test]
fn the_default_sensors_report_plausible_values_on_their_own_channels() {
    use sensors::reading::{Quality, Unit};
    let (outcomes, done) = run_to_done(&["--interval", "20ms", "--frames", "40", "--seed", "3"]);
    assert_eq!(done["frames"], 40);
    let frames: Vec<Frame> = outcomes.into_iter().map(|o| o.unwrap()).collect();
    assert_eq!(frames.len(), 40);
    let mut channels = std::collections::BTreeMap::<u8, Vec<(Unit, f32)>>::new();
    for reading in frames.iter().flat_map(|f| f.readings.iter()) {
        assert_eq!(reading.quality, Quality::Good, "{reading:?}");
        channels.entry(reading.channel).or_default().push((reading.unit, reading.value));
    }
    let layout: Vec<(u8, Unit)> = channels.iter().map(|(&c, v)| (c, v[0].0)).collect();
    assert_eq!(
        layout,
        [
            (0, Unit::Unitless),
            (4, Unit::Celsius),
            (5, Unit::PercentRh),
            (6, Unit::Hectopascal),
            (8, Unit::G),
            (9, Unit::G),
            (12, Unit::Milliampere),
            (13, Unit::Volt),
            (14, Unit::Watt),
        ]
    );
    let within = |channel: u8, lo: f32, hi: f32| {
        for &(unit, value) in &channels[&channel] {
            assert!((lo..=hi).contains(&value), "channel {channel} ({unit:?}) = {value}");
        }
    };
    within(4, 15.0, 30.0);
    within(5, 0.0, 100.0);
    within(6, 1000.0, 1030.0);
    within(8, 0.02, 1.0);
    within(12, 400.0, 1200.0);
    within(13, 11.0, 13.0);
    // Each report of a slot is in its own frame; the vibration peak (max) is at least the
    // RMS of the same block.
    for frame in &frames {
        if let [rms, peak] = frame.readings.as_slice() {
            assert_eq!((rms.channel, peak.channel), (8, 9));
            assert!(peak.value >= rms.value, "{frame:?}");
        }
    }
}

#[test]
fn an_injected_dropout_gives_timeout_faults_then_reinit_and_the_counter_resumes() {
    use sensors::reading::{FaultCode, Quality};
    let (outcomes, done) = run_to_done(&[
        "--sensors",
        "counter",
        "--interval",
        "5ms",
        "--frames",
        "60",
        "--inject",
        "dropout@0+100ms",
    ]);
    let frames: Vec<Frame> = outcomes.into_iter().map(|o| o.unwrap()).collect();
    let seqs: Vec<u32> = frames.iter().map(|f| f.seq).collect();
    assert_eq!(seqs, (0..60).collect::<Vec<_>>());
    let faulted = frames
        .iter()
        .take_while(|f| f.readings[0].quality == Quality::Fault(FaultCode::Timeout))
        .count();
    assert!(faulted >= 1, "the dropout faulted no sample");
    // After the dropout the counter continues from 0: it did not count failed reads.
    for (i, frame) in frames[faulted..].iter().enumerate() {
        assert_eq!(frame.readings[0].quality, Quality::Good, "{frame:?}");
        assert_eq!(frame.readings[0].value, i as f32);
    }
    assert!(faulted < 60, "the counter never recovered");
    assert_eq!(done["sensor_faults"], faulted);
    // The first fault is a read error, each later one a failed re-init, and the sample that
    // recovers re-inits once more: as many re-inits as faulted samples.
    assert_eq!(done["reinits"], faulted);
}

#[test]
fn bad_arguments_are_refused_with_a_reason() {
    for args in [
        &["--sensors", "counter"][..],
        &["--out", "-", "--pty", "x"],
        &["--out", "-", "--sensors", "thermometer"],
        &["--out", "-", "--unplug-at", "3", "--unplug-for", "1s"],
        &["--out", "-", "--unplug-at", "3"],
        &["--out", "-", "--inject", "spike"],
        &["--out", "-", "--interval", "0ms"],
        &[
            "--out",
            "-",
            "--sensors",
            "counter,counter,counter,counter,counter,counter,counter,counter,counter",
        ],
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_firmware-sim"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + DEADLINE;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{args:?} was accepted: still running after {DEADLINE:?}");
            }
            thread::sleep(Duration::from_millis(10));
        };
        let mut stderr = String::new();
        child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
        assert!(!status.success(), "{args:?} was accepted");
        assert!(!stderr.trim().is_empty(), "{args:?}: no reason given");
    }
}
