//! `firmware-sim`: the firmware core on a host, driving simulated sensors and writing frames to
//! stdout, a file or serial device, or a pseudo-terminal that the agent reads like a USB
//! serial device.
//!
//! ```text
//!              SimClock ◀── wall-clock ms (signals look real)
//!                 │
//! SimulatedSensor × n ──DynSensor──▶ firmware::Firmware ──embedded_io::Write──▶ Line ──▶ Port
//!                                    tick = ms since start         frames, 0x00s   │   stdout │ file │ pty
//!                                    poll() → next due tick        (+ line faults)│
//!                                                                                  └─▶ events (JSON lines, stderr)
//! ```
//!
//! The firmware is the very core that runs on a microcontroller; only the sensors, the clock
//! and the line are simulated. The main loop sleeps until the tick `poll` returns, in `poll(2)`
//! on a signalfd, so SIGINT/SIGTERM end it at once and cleanly (the pty link is removed).
//!
//! # The line and its faults
//!
//! [`Line`] sits between the firmware and the port. It gathers the firmware's bytes up to each
//! 0x00, so it sees whole frames (and their seq), and can misbehave on purpose:
//!
//! - `--garbage-every N`: after every N-th frame (counting dropped ones; none after a dropped
//!   frame), 5–20 random non-zero bytes and one 0x00: the receiver counts exactly one frame
//!   error per burst and loses no frame.
//! - `--corrupt SEQ,..`: one byte in the middle of those frames is changed (never to 0x00):
//!   one CRC or COBS error and one lost frame each; such frames count as sent.
//! - `--unplug-at SEQ --unplug-for DUR` (pty only): before frame SEQ the pty pair is closed
//!   (once the reader has read what was written, waiting at most [`UNPLUG_DRAIN_MAX`]) and the
//!   link removed; frames produced meanwhile are dropped (a self-powered device whose USB
//!   cable is out: its seq keeps counting); after DUR a new pair is made and the link re-pointed,
//!   and a 0x00 goes first.
//!
//! A pty master is non-blocking: when the reader does not keep up, a frame that does not fit
//! is dropped (counted), as on a USB CDC device whose host does not read. A frame written in
//! part leaves bytes on the line; the line then owes a 0x00, written before the next frame.
//!
//! # Accounting
//!
//! Every frame the firmware produces reaches the line, which either sends it or fails the
//! write (the firmware then counts it as dropped): `sent + dropped == frames`. The line keeps
//! the first and last dropped seq, the bursts it wrote completely and the corrupted seqs, and
//! the `done` event reports them. `--frames N` stops after the poll that reaches N frames;
//! `frames` in `done` is the exact count, which exceeds N only if that last poll completed
//! more than one frame (several sensors reporting at once).
//!
//! # Events (stderr, one JSON object per line)
//!
//! ```text
//! {"event":"pty","link":"/tmp/x/dev","path":"/dev/pts/5"}   a pty appeared behind the link
//! {"event":"unplugged","seq":40}                             before frame 40
//! {"event":"replugged","link":"/tmp/x/dev","path":"/dev/pts/6"}
//! {"event":"inject","kind":"spike","at_ms":30000,"duration_ms":5000}
//! {"event":"done","frames":200,"sent":140,"dropped":60,"dropped_seqs":[40,99],
//!  "garbage_bursts":0,"corrupted":[],"sensor_faults":0,"reinits":0,"samples_skipped":0}
//! {"event":"error","message":"..."}
//! ```

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal, Write as _};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{ArgGroup, Parser};
use embedded_hal::delay::DelayNs;
use firmware::{Aggregate, DynSensor, Firmware, MAX_PERIOD_MS, MAX_SLOTS, SlotConfig, Stats};
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::pty::{Winsize, openpty};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::SignalFd;
use nix::sys::termios::{SetArg, Termios, cfmakeraw, tcgetattr, tcsetattr};
use sensors::frame::{MAX_FRAME_SIZE, decode_frame};
use sensors::sim::{FaultKind, SimClock, SimKind, SimulatedSensor};
use serde_json::{Value, json};

/// Duration of an injected fault when `--inject` gives none.
const DEFAULT_INJECT_DURATION: Duration = Duration::from_secs(30);

/// Bounds of a garbage burst: long enough to look like line noise, short enough never to be
/// an oversize block (the receiver would still count one error, but a different one).
const GARBAGE_LEN: std::ops::RangeInclusive<usize> = 5..=20;

/// How often a failed replug (no pty could be made) is retried.
const REPLUG_RETRY: Duration = Duration::from_secs(1);

/// How long an unplug waits for the reader to take the bytes already written. A reader that
/// keeps up gets every frame sent before the unplug (so that only the frames produced while
/// unplugged are missing); what it has not read by then is lost with the pty, as on a real
/// unplug (those frames still count as sent).
const UNPLUG_DRAIN_MAX: Duration = Duration::from_millis(500);

#[derive(Debug, Parser)]
#[command(
    name = "firmware-sim",
    version,
    about = "Runs the edgewise firmware core against simulated sensors and writes its frames \
             to stdout, a file or serial device, or a pseudo-terminal."
)]
#[command(group(ArgGroup::new("output").required(true).args(["out", "pty"])))]
struct Cli {
    /// The device id in every frame.
    #[arg(long, default_value_t = 7)]
    device_id: u32,
    /// Simulated sensors, one slot each (slot i owns channels 4i..4i+3): counter,
    /// environment, vibration, power.
    #[arg(long, value_delimiter = ',', default_value = "counter,environment,vibration,power")]
    sensors: Vec<SimKind>,
    /// The report interval of every sensor (e.g. 100ms, 1s); sensors that aggregate sample
    /// several times per interval.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Seed of the simulated signals (sensor i gets seed + i) and of the garbage bytes.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Random fault episodes in the simulated signals (the counter has none).
    #[arg(long)]
    faults: bool,
    /// A fault on every sensor at SECS seconds after start, lasting DUR (default 30s):
    /// excursion, spike, drift, stuck, dropout, noise_burst. Repeatable.
    #[arg(long = "inject", value_name = "KIND@SECS[+DUR]")]
    injections: Vec<Injection>,
    /// Stop sampling after N frames (sent or dropped), print the final stats, and keep the
    /// output open until SIGTERM/SIGINT.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    frames: Option<u32>,
    /// Write to stdout (`-`) or to an existing file or serial device.
    #[arg(long, value_name = "-|PATH")]
    out: Option<PathBuf>,
    /// Create a pseudo-terminal and point the symlink LINK at its slave.
    #[arg(long, value_name = "LINK")]
    pty: Option<PathBuf>,
    /// After every N-th frame, write a burst of 5–20 random non-zero bytes and a 0x00.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    garbage_every: Option<u32>,
    /// Change one byte in the frames with these seqs.
    #[arg(long, value_delimiter = ',', value_name = "SEQ[,SEQ...]")]
    corrupt: Vec<u32>,
    /// With --pty: before frame SEQ, close the pty and remove the link ...
    #[arg(long, value_name = "SEQ", requires = "unplug_for")]
    unplug_at: Option<u32>,
    /// ... for this long (e.g. 2s), then make a new pty and re-point the link.
    #[arg(long, value_name = "DUR", requires = "unplug_at", value_parser = humantime::parse_duration)]
    unplug_for: Option<Duration>,
}

/// `--inject KIND@SECS[+DUR]`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Injection {
    kind: FaultKind,
    at: Duration,
    duration: Duration,
}

impl FromStr for Injection {
    type Err = String;

    fn from_str(s: &str) -> Result<Injection, String> {
        let (kind, when) =
            s.split_once('@').ok_or_else(|| format!("`{s}`: expected KIND@SECS[+DUR]"))?;
        let kind = kind.parse::<FaultKind>().map_err(|e| e.to_string())?;
        let (secs, duration) = match when.split_once('+') {
            Some((secs, duration)) => (secs, parse_duration_or_secs(duration)?),
            None => (when, DEFAULT_INJECT_DURATION),
        };
        let at = parse_duration_or_secs(secs)?;
        Ok(Injection { kind, at, duration })
    }
}

/// A duration as humantime (`5s`, `250ms`) or as plain seconds (`30`, `2.5`).
fn parse_duration_or_secs(s: &str) -> Result<Duration, String> {
    if let Ok(secs) = s.parse::<f64>() {
        return Duration::try_from_secs_f64(secs)
            .map_err(|_| format!("`{s}`: not a duration of zero or more seconds"));
    }
    humantime::parse_duration(s).map_err(|e| format!("`{s}`: {e}"))
}

/// The slot of each sensor kind for a report interval: every kind reports once per interval;
/// the aggregating ones sample several times in it (at least 1 ms apart).
fn slot_config(kind: SimKind, index: usize, interval_ms: u32) -> SlotConfig {
    let (samples, aggregate): (u32, &'static [Aggregate]) = match kind {
        // Every read is reported: the value is the number of earlier reads.
        SimKind::Counter => (1, &[Aggregate::Last]),
        // Temperature, humidity, pressure change slowly: average out the noise.
        SimKind::Environment => (4, &[Aggregate::Mean]),
        // ISO 10816 judges vibration by RMS over a window; the peak catches impacts.
        SimKind::Vibration => (10, &[Aggregate::Rms, Aggregate::Max]),
        // Mean current and power; the lowest voltage shows supply sags.
        SimKind::Power => (5, &[Aggregate::Mean, Aggregate::Min, Aggregate::Mean]),
    };
    let samples = samples.min(interval_ms).max(1);
    SlotConfig {
        sample_period_ms: interval_ms / samples,
        samples_per_report: samples as u16,
        aggregate,
        // index < MAX_SLOTS (checked in `run`), so 4 * index < 32.
        first_channel: (index * sensors::sensor::MAX_CHANNELS) as u8,
    }
}

/// Delays sleep the thread (the simulated sensors do not ask for any).
struct ThreadDelay;

impl DelayNs for ThreadDelay {
    fn delay_ns(&mut self, ns: u32) {
        std::thread::sleep(Duration::from_nanos(u64::from(ns)));
    }
}

/// One pseudo-terminal pair. Both ends stay open while it exists: the slave so that bytes
/// written before a reader opens it are buffered (and no hangup when a reader closes it).
#[derive(Debug)]
struct PtyPair {
    master: File,
    slave: OwnedFd,
    path: PathBuf,
}

impl PtyPair {
    /// Waits until the reader has taken everything written (the slave has nothing left to
    /// read), at most `max`.
    fn wait_drained(&self, max: Duration) {
        let deadline = Instant::now() + max;
        loop {
            let mut fds = [PollFd::new(self.slave.as_fd(), PollFlags::POLLIN)];
            let unread = matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0);
            if !unread || Instant::now() >= deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Makes a pty pair: slave raw (no echo, no CR/LF translation: frames are binary), master
/// non-blocking.
fn open_pty() -> io::Result<PtyPair> {
    let pair = openpty(None::<&Winsize>, None::<&Termios>)?;
    make_raw(&pair.slave)?;
    fcntl(&pair.master, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
    let path = nix::unistd::ttyname(&pair.slave)?;
    Ok(PtyPair { master: File::from(pair.master), slave: pair.slave, path })
}

/// Sets a terminal to raw mode.
fn make_raw(fd: impl AsFd) -> io::Result<()> {
    let mut termios = tcgetattr(&fd)?;
    cfmakeraw(&mut termios);
    tcsetattr(&fd, SetArg::TCSANOW, &termios)?;
    Ok(())
}

/// Points `link` at `target` atomically: a symlink beside it, renamed over it.
fn point_link(link: &Path, target: &Path) -> io::Result<()> {
    let mut tmp = link.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::os::unix::fs::symlink(target, &tmp)?;
    std::fs::rename(&tmp, link)
}

/// Where the line's bytes go.
#[derive(Debug)]
enum Port {
    /// Stdout, a file or a serial device: blocking writes.
    Stream(Box<dyn WriteDebug>),
    /// A pty behind a symlink; `None` while unplugged.
    Pty { link: PathBuf, pair: Option<PtyPair> },
}

/// `io::Write` that can be shown in `Debug` output.
trait WriteDebug: io::Write + std::fmt::Debug {}

impl<T: io::Write + std::fmt::Debug> WriteDebug for T {}

impl Port {
    /// Writes all of `bytes` and flushes; `NotConnected` while unplugged.
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Port::Stream(w) => {
                w.write_all(bytes)?;
                w.flush()
            }
            Port::Pty { pair: Some(pair), .. } => pair.master.write_all(bytes),
            Port::Pty { pair: None, .. } => Err(io::ErrorKind::NotConnected.into()),
        }
    }
}

/// A planned unplug: before frame `at_seq`, for `duration`.
#[derive(Debug, Clone, Copy)]
struct Unplug {
    at_seq: u32,
    duration: Duration,
    /// When the cable goes back in, once it is out.
    replug_at: Option<Instant>,
    done: bool,
}

/// What the line did, for the `done` event.
#[derive(Debug, Clone, Default, PartialEq)]
struct LineStats {
    sent: u32,
    dropped: u32,
    /// First and last seq of the dropped frames.
    dropped_seqs: Option<(u32, u32)>,
    garbage_bursts: u32,
    corrupted: Vec<u32>,
}

/// The simulated serial line: takes the firmware's bytes, forwards them to the [`Port`] and
/// injects the line faults (see the module docs).
#[derive(Debug)]
struct Line {
    port: Port,
    /// The frame being gathered, up to its 0x00.
    pending: Vec<u8>,
    /// Bytes of a failed write may be on the line: a 0x00 goes before the next frame.
    owes_delimiter: bool,
    frames: u32,
    garbage_every: Option<u32>,
    corrupt: BTreeSet<u32>,
    unplug: Option<Unplug>,
    rng: fastrand::Rng,
    stats: LineStats,
    /// Events for stderr, drained by the main loop.
    events: Vec<Value>,
}

impl Line {
    fn new(port: Port, seed: u64) -> Line {
        Line {
            port,
            pending: Vec::with_capacity(MAX_FRAME_SIZE),
            owes_delimiter: false,
            frames: 0,
            garbage_every: None,
            corrupt: BTreeSet::new(),
            unplug: None,
            rng: fastrand::Rng::with_seed(seed),
            stats: LineStats::default(),
            events: Vec::new(),
        }
    }

    /// When the line next needs [`Line::maintain`] (a replug), if ever.
    fn next_deadline(&self) -> Option<Instant> {
        self.unplug.and_then(|u| u.replug_at)
    }

    /// Puts the cable back in once the unplug time is over.
    fn maintain(&mut self, now: Instant) {
        let Some(unplug) = &mut self.unplug else { return };
        let Some(at) = unplug.replug_at else { return };
        if now < at {
            return;
        }
        let Port::Pty { link, pair } = &mut self.port else { return };
        match open_pty().and_then(|p| point_link(link, &p.path).map(|()| p)) {
            Ok(new) => {
                let path = new.path.display().to_string();
                let link = link.display().to_string();
                self.events.push(json!({"event": "replugged", "link": link, "path": path}));
                self.events.push(json!({"event": "pty", "link": link, "path": path}));
                *pair = Some(new);
                unplug.replug_at = None;
                unplug.done = true;
                self.owes_delimiter = true;
            }
            Err(e) => {
                self.events.push(json!({"event": "error", "message": format!("replug: {e}")}));
                unplug.replug_at = Some(now + REPLUG_RETRY);
            }
        }
    }

    /// Pulls the cable before frame `seq` if that is the plan.
    fn maybe_unplug(&mut self, seq: u32) {
        let Some(unplug) = &mut self.unplug else { return };
        if unplug.done || unplug.replug_at.is_some() || unplug.at_seq != seq {
            return;
        }
        if let Port::Pty { link, pair } = &mut self.port {
            if let Some(pair) = pair.take() {
                pair.wait_drained(UNPLUG_DRAIN_MAX);
            }
            // The link may already be gone (someone removed it): nothing to undo then.
            let _ = std::fs::remove_file(link);
        }
        unplug.replug_at = Some(Instant::now() + unplug.duration);
        self.events.push(json!({"event": "unplugged", "seq": seq}));
    }

    /// Handles one block the firmware wrote, its 0x00 included.
    fn block(&mut self, block: &[u8]) -> io::Result<()> {
        if block.len() <= 1 {
            // The firmware's idle or resync 0x00: the line owns delimiters; if it cannot
            // write this one it owes it (the frame that follows must still reach `frame`).
            self.owes_delimiter = self.port.write_all(&[0]).is_err();
            return Ok(());
        }
        self.frame(block)
    }

    /// Sends one frame (or drops it) and, after every N-th, a garbage burst.
    fn frame(&mut self, block: &[u8]) -> io::Result<()> {
        self.frames = self.frames.wrapping_add(1);
        let body = &block[..block.len() - 1];
        // The firmware's own frames always decode; the seq is what the faults are keyed by.
        let seq = decode_frame(body).map(|f| f.seq).unwrap_or(self.frames.wrapping_sub(1));
        self.maybe_unplug(seq);
        self.maintain(Instant::now());
        let mut bytes = block.to_vec();
        if self.corrupt.contains(&seq) {
            let i = body.len() / 2;
            // Any change but to 0x00 (which would split the frame in two errors).
            bytes[i] = if bytes[i] == 0xFF { 0x7F } else { bytes[i] + 1 };
        }
        let written = if self.owes_delimiter {
            self.port.write_all(&[0]).and_then(|()| self.port.write_all(&bytes))
        } else {
            self.port.write_all(&bytes)
        };
        if let Err(e) = written {
            self.owes_delimiter = true;
            self.stats.dropped = self.stats.dropped.wrapping_add(1);
            self.stats.dropped_seqs = Some(match self.stats.dropped_seqs {
                Some((first, _)) => (first, seq),
                None => (seq, seq),
            });
            return Err(e);
        }
        self.owes_delimiter = false;
        self.stats.sent = self.stats.sent.wrapping_add(1);
        if self.corrupt.contains(&seq) {
            self.stats.corrupted.push(seq);
        }
        if self.garbage_every.is_some_and(|n| self.frames.is_multiple_of(n)) {
            let len = self.rng.usize(GARBAGE_LEN);
            let mut burst: Vec<u8> = (0..len).map(|_| self.rng.u8(1..=255)).collect();
            burst.push(0);
            match self.port.write_all(&burst) {
                Ok(()) => self.stats.garbage_bursts = self.stats.garbage_bursts.wrapping_add(1),
                Err(_) => self.owes_delimiter = true,
            }
        }
        Ok(())
    }
}

impl embedded_io::ErrorType for Line {
    type Error = io::Error;
}

impl embedded_io::Write for Line {
    /// Takes bytes up to and including the next 0x00 (or all of them if there is none); a
    /// frame's outcome is the outcome of the call that completes it.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let (take, complete) = match buf.iter().position(|&b| b == 0) {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if self.pending.len() + take > MAX_FRAME_SIZE {
            self.pending.clear();
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "block longer than a frame"));
        }
        self.pending.extend_from_slice(&buf[..take]);
        if complete {
            let block = std::mem::take(&mut self.pending);
            let outcome = self.block(&block);
            self.pending = block;
            self.pending.clear();
            outcome?;
        }
        Ok(take)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Milliseconds since the Unix epoch (the simulated signals' daily cycle is UTC).
fn wall_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Prints one event line on stderr.
fn emit(event: &Value) {
    eprintln!("{event}");
}

/// The `done` event.
fn done_event(stats: Stats, line: &LineStats) -> Value {
    json!({
        "event": "done",
        "frames": stats.frames_sent.wrapping_add(stats.frames_dropped),
        "sent": stats.frames_sent,
        "dropped": stats.frames_dropped,
        "dropped_seqs": line.dropped_seqs.map(|(first, last)| [first, last]),
        "garbage_bursts": line.garbage_bursts,
        "corrupted": line.corrupted,
        "sensor_faults": stats.sensor_faults,
        "reinits": stats.reinits,
        "samples_skipped": stats.samples_skipped,
    })
}

/// Blocks SIGINT and SIGTERM and returns a signalfd that becomes readable when one arrives
/// (no handler, so no `unsafe` and no async-signal-safety concerns).
fn signal_fd() -> io::Result<SignalFd> {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGINT);
    mask.add(Signal::SIGTERM);
    mask.thread_block()?;
    Ok(SignalFd::new(&mask)?)
}

/// Waits up to `timeout` (None: forever) for SIGINT/SIGTERM; true if one came.
fn wait_for_signal(signals: &SignalFd, timeout: Option<Duration>) -> io::Result<bool> {
    let timeout = match timeout {
        // Round up: waking before the due tick would only make the loop spin once more.
        Some(t) => PollTimeout::try_from(t.as_millis().saturating_add(1).min(60_000) as u32)
            .unwrap_or(PollTimeout::MAX),
        None => PollTimeout::NONE,
    };
    let mut fds = [PollFd::new(signals.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, timeout) {
        Ok(0) | Err(nix::errno::Errno::EINTR) => Ok(false),
        Ok(_) => Ok(signals.read_signal()?.is_some()),
        Err(e) => Err(e.into()),
    }
}

/// Opens the output the command line asks for; the first event names a pty.
fn open_port(cli: &Cli) -> Result<(Port, Option<Value>), String> {
    if let Some(link) = &cli.pty {
        let pair = open_pty().map_err(|e| format!("cannot create a pty: {e}"))?;
        point_link(link, &pair.path).map_err(|e| {
            format!("cannot point {} at {}: {e}", link.display(), pair.path.display())
        })?;
        let event = json!({
            "event": "pty",
            "link": link.display().to_string(),
            "path": pair.path.display().to_string(),
        });
        return Ok((Port::Pty { link: link.clone(), pair: Some(pair) }, Some(event)));
    }
    match &cli.out {
        Some(path) if path.as_os_str() == "-" => Ok((Port::Stream(Box::new(io::stdout())), None)),
        Some(path) => {
            let file = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| format!("cannot open {} for writing: {e}", path.display()))?;
            if file.is_terminal() {
                // A serial device: binary frames must not meet the line discipline.
                make_raw(&file).map_err(|e| format!("cannot set {} raw: {e}", path.display()))?;
            }
            Ok((Port::Stream(Box::new(file)), None))
        }
        None => Err("one of --out and --pty is required".into()),
    }
}

fn run(cli: Cli) -> Result<(), String> {
    // Checked here: clap's `requires` on an argument of the required `output` group is not
    // enforced when the group is satisfied by the other member.
    if cli.unplug_at.is_some() && cli.pty.is_none() {
        return Err("--unplug-at needs --pty (only a pty can be unplugged)".into());
    }
    if cli.sensors.is_empty() || cli.sensors.len() > MAX_SLOTS {
        return Err(format!("--sensors: give 1 to {MAX_SLOTS} sensors"));
    }
    let interval_ms = u32::try_from(cli.interval.as_millis())
        .ok()
        .filter(|ms| (1..=MAX_PERIOD_MS).contains(ms))
        .ok_or_else(|| format!("--interval: between 1ms and {MAX_PERIOD_MS}ms"))?;
    let signals = signal_fd().map_err(|e| format!("cannot set up signal handling: {e}"))?;

    let clock = SimClock::new(wall_ms());
    let mut sim_sensors: Vec<SimulatedSensor> = cli
        .sensors
        .iter()
        .zip(0..)
        .map(|(&kind, i)| {
            let seed = cli.seed.wrapping_add(i);
            SimulatedSensor::new(kind, seed, clock.clone()).with_random_faults(cli.faults)
        })
        .collect();
    let slots: Vec<SlotConfig> =
        cli.sensors.iter().enumerate().map(|(i, &k)| slot_config(k, i, interval_ms)).collect();

    let (port, first_event) = open_port(&cli)?;
    let link = match &port {
        Port::Pty { link, .. } => Some(link.clone()),
        Port::Stream(_) => None,
    };
    let mut line = Line::new(port, cli.seed);
    line.garbage_every = cli.garbage_every;
    line.corrupt = cli.corrupt.iter().copied().collect();
    line.unplug = match (cli.unplug_at, cli.unplug_for) {
        (Some(at_seq), Some(duration)) => {
            Some(Unplug { at_seq, duration, replug_at: None, done: false })
        }
        _ => None,
    };
    if let Some(event) = first_event {
        emit(&event);
    }
    let mut fw = Firmware::new(cli.device_id, line, &slots).map_err(|e| e.to_string())?;

    let outcome = simulate(&cli, &mut fw, &mut sim_sensors, &clock, &signals);
    if let Some(link) = link {
        // Gone already if we were unplugged at the end.
        let _ = std::fs::remove_file(link);
    }
    outcome
}

/// The firmware's view of the simulated sensors (rebuilt per poll: the simulation also needs
/// the sensors themselves, for injections).
fn as_dyn(sim_sensors: &mut [SimulatedSensor]) -> Vec<&mut dyn DynSensor> {
    sim_sensors.iter_mut().map(|s| s as &mut dyn DynSensor).collect()
}

/// The main loop: sample until `--frames` or a signal, then (with `--frames`) idle until a
/// signal with the port open.
fn simulate(
    cli: &Cli,
    fw: &mut Firmware<Line>,
    sim_sensors: &mut [SimulatedSensor],
    clock: &SimClock,
    signals: &SignalFd,
) -> Result<(), String> {
    let mut injections = cli.injections.clone();
    injections.sort_by_key(|i| i.at);
    let mut injections = injections.into_iter().peekable();
    let start = Instant::now();
    // Ms since start, wrapping at u32 like a device's uptime tick.
    let tick = |now: Instant| now.duration_since(start).as_millis() as u32;
    let mut delay = ThreadDelay;

    clock.set(wall_ms());
    fw.start(tick(Instant::now()), &mut as_dyn(sim_sensors), &mut delay);
    let mut sampling = true;
    loop {
        let now = Instant::now();
        fw.writer_mut().maintain(now);
        let mut wake: Option<Instant> = fw.writer_mut().next_deadline();
        if sampling {
            clock.set(wall_ms());
            while let Some(injection) = injections.next_if(|i| start + i.at <= now) {
                let ms = i64::try_from(injection.duration.as_millis()).unwrap_or(i64::MAX);
                for sensor in sim_sensors.iter_mut() {
                    sensor.inject(injection.kind, ms);
                }
                emit(&json!({
                    "event": "inject",
                    "kind": injection.kind.name(),
                    "at_ms": injection.at.as_millis() as u64,
                    "duration_ms": ms,
                }));
            }
            let due = fw.poll(tick(now), &mut as_dyn(sim_sensors), &mut delay);
            let stats = fw.stats();
            let produced = stats.frames_sent.wrapping_add(stats.frames_dropped);
            if cli.frames.is_some_and(|n| produced >= n) {
                sampling = false;
                for event in fw.writer_mut().events.drain(..) {
                    emit(&event);
                }
                emit(&done_event(stats, &fw.writer_mut().stats));
            } else {
                let due_in = due.wrapping_sub(tick(Instant::now()));
                // A due tick already past shows as a huge wrapping distance: poll at once.
                let due_in = if due_in >= 1 << 31 { 0 } else { due_in };
                let mut due_at = Instant::now() + Duration::from_millis(u64::from(due_in));
                if let Some(next) = injections.peek() {
                    due_at = due_at.min(start + next.at);
                }
                wake = Some(wake.map_or(due_at, |w| w.min(due_at)));
            }
        }
        for event in fw.writer_mut().events.drain(..) {
            emit(&event);
        }
        let timeout = wake.map(|w| w.saturating_duration_since(Instant::now()));
        if wait_for_signal(signals, timeout).map_err(|e| format!("waiting: {e}"))? {
            if sampling {
                emit(&done_event(fw.stats(), &fw.writer_mut().stats));
            }
            return Ok(());
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            emit(&json!({"event": "error", "message": message}));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::{Cell, RefCell};
    use std::rc::Rc;

    use embedded_io::Write as _;
    use sensors::frame::{Decoder, Frame, encode};

    use super::*;

    #[test]
    fn injections_parse_kind_start_and_duration() {
        let parse = |s: &str| s.parse::<Injection>();
        assert_eq!(
            parse("spike@30+5s"),
            Ok(Injection {
                kind: FaultKind::Spike,
                at: Duration::from_secs(30),
                duration: Duration::from_secs(5)
            })
        );
        assert_eq!(
            parse("noise_burst@2.5"),
            Ok(Injection {
                kind: FaultKind::NoiseBurst,
                at: Duration::from_millis(2_500),
                duration: DEFAULT_INJECT_DURATION
            })
        );
        assert_eq!(parse("stuck@1m+500ms").unwrap().at, Duration::from_secs(60));
        assert_eq!(parse("drift@0+90").unwrap().duration, Duration::from_secs(90));
        for bad in ["spike", "bogus@1", "spike@-1", "spike@soon", "spike@1+forever"] {
            assert!(parse(bad).is_err(), "{bad} was accepted");
        }
        assert!(parse("bogus@1").unwrap_err().contains("noise_burst"));
    }

    #[test]
    fn every_kind_reports_once_per_interval_with_its_own_channels() {
        let c = |kind, i, ms| {
            let s = slot_config(kind, i, ms);
            (s.sample_period_ms, s.samples_per_report, s.aggregate, s.first_channel)
        };
        assert_eq!(c(SimKind::Counter, 0, 100), (100, 1, &[Aggregate::Last][..], 0));
        assert_eq!(c(SimKind::Environment, 1, 100), (25, 4, &[Aggregate::Mean][..], 4));
        assert_eq!(
            c(SimKind::Vibration, 2, 100),
            (10, 10, &[Aggregate::Rms, Aggregate::Max][..], 8)
        );
        assert_eq!(c(SimKind::Power, 7, 100).0, 20);
        assert_eq!(c(SimKind::Power, 7, 100).3, 28);
        // Too short an interval for 10 samples: one per ms.
        assert_eq!(c(SimKind::Vibration, 0, 5).0, 1);
        assert_eq!(c(SimKind::Vibration, 0, 5).1, 5);
        assert_eq!(c(SimKind::Vibration, 0, 1).1, 1);
    }

    /// A stream port that fails while `fail` is set (after taking `partial` bytes).
    #[derive(Debug, Clone, Default)]
    struct TestPort {
        out: Rc<RefCell<Vec<u8>>>,
        fail: Rc<Cell<bool>>,
    }

    impl io::Write for TestPort {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.fail.get() {
                let partial = buf.len().min(3);
                self.out.borrow_mut().extend_from_slice(&buf[..partial]);
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.out.borrow_mut().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn encoded(seq: u32) -> Vec<u8> {
        let mut buf = [0u8; MAX_FRAME_SIZE];
        let n = encode(&Frame::new(7, seq, seq * 10), &mut buf).unwrap();
        buf[..n].to_vec()
    }

    #[test]
    fn a_failed_port_write_drops_the_frame_and_a_delimiter_precedes_the_next() {
        let port = TestPort::default();
        let mut line = Line::new(Port::Stream(Box::new(port.clone())), 1);
        line.garbage_every = Some(2);
        line.corrupt = [3].into();
        let mut results = Vec::new();
        for seq in 0..5 {
            port.fail.set(seq == 1);
            // Split the way a writer may see it: two calls per frame.
            let bytes = encoded(seq);
            let (a, b) = bytes.split_at(4);
            results.push(line.write_all(a).and_then(|()| line.write_all(b)).is_ok());
        }
        assert_eq!(results, [true, false, true, true, true]);
        assert_eq!(
            line.stats,
            LineStats {
                sent: 4,
                dropped: 1,
                dropped_seqs: Some((1, 1)),
                // Every 2nd frame: seq 1 (dropped, so no burst) and seq 3.
                garbage_bursts: 1,
                corrupted: vec![3],
            }
        );
        let out = port.out.borrow();
        let outcomes: Vec<Option<u32>> =
            Decoder::new().push(&out).map(|o| o.ok().map(|f| f.seq)).collect();
        // 0, [3 bytes of 1 + the owed 0x00: error], 2, 3 corrupted, [burst], 4.
        assert_eq!(outcomes, [Some(0), None, Some(2), None, None, Some(4)]);
    }
}
