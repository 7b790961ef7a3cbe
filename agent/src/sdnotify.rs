//! systemd integration without libsystemd: the `sd_notify` protocol and the watchdog.
//!
//! Under `Type=notify` systemd passes `$NOTIFY_SOCKET`, a Unix datagram socket: a path
//! (`/run/systemd/notify`) or, starting with `@`, a Linux abstract socket. The agent sends
//!
//! - `READY=1` once the store is open and every stage has started;
//! - `STOPPING=1` when shutdown begins;
//! - `WATCHDOG=1` every half of `$WATCHDOG_USEC` (`WatchdogSec=`), but only while the
//!   pipeline makes progress (below), so that systemd restarts an agent that hangs;
//! - `STATUS=...`, one line for `systemctl status` (upstream state and outbox depth).
//!
//! Without `$NOTIFY_SOCKET` (not under systemd, `Type=simple`) all of this is off. A
//! `$WATCHDOG_PID` naming another process means the watchdog is not ours: no pings.
//!
//! # What a ping proves
//!
//! A timer that fires only proves that the runtime runs. The ping proves that events move:
//! the journal writer journals a clock tick every `journal.tick_interval`, also when idle,
//! and the processor applies every journal entry and publishes its position
//! ([`ReadModel::position`]). That position is the heartbeat: it advances when the sources, the
//! writer's group commit (an fsync) and the processor all work. When it has not moved for
//! the stall window (the watchdog interval, or three tick intervals if longer, so that a
//! long `tick_interval` is no false alarm), pings stop, `STATUS=` says why, and systemd kills
//! and restarts the agent after `WatchdogSec`. The journal and snapshot make that restart
//! lossless. (A failing flush, e.g. a full disk, also stops the ticks and so the pings.)

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::metrics::{self, Metrics};
use crate::outbox::Outbox;
use crate::readmodel::ReadModel;

/// How often `STATUS=` is refreshed when systemd set no watchdog.
pub const STATUS_PERIOD: Duration = Duration::from_secs(10);

/// How long one notification may block (the socket's queue full): systemd reads it at once,
/// so this is only a bound for a wedged manager.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// A connection to systemd's notification socket, or nothing.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier { target: None }
    }

    /// From `$NOTIFY_SOCKET`: disabled when it is not set, or (logged) when it is unusable.
    pub fn from_env() -> Notifier {
        match std::env::var_os("NOTIFY_SOCKET") {
            None => Notifier::disabled(),
            Some(value) => Notifier::connect(&value).unwrap_or_else(|e| {
                warn!(error = %e, socket = ?value, "cannot use $NOTIFY_SOCKET; not notifying systemd");
                Notifier::disabled()
            }),
        }
    }

    /// A notifier sending to `socket`: an absolute path, or `@name` for an abstract socket.
    pub fn connect(socket: &OsStr) -> io::Result<Notifier> {
        let addr = parse_address(socket)?;
        let datagram = UnixDatagram::unbound()?;
        datagram.set_write_timeout(Some(SEND_TIMEOUT))?;
        Ok(Notifier { target: Some((datagram, addr)) })
    }

    /// Whether notifications go anywhere.
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends `state` (newline-separated `KEY=value` assignments) as one datagram; nothing
    /// when disabled.
    pub fn notify(&self, state: &str) -> io::Result<()> {
        match &self.target {
            None => Ok(()),
            Some((socket, addr)) => socket.send_to_addr(state.as_bytes(), addr).map(drop),
        }
    }

    /// [`Notifier::notify`], logging a failure (systemd then restarts or times us out; there
    /// is nothing else to do about it).
    fn send(&self, state: &str) {
        if let Err(e) = self.notify(state) {
            warn!(error = %e, "cannot notify systemd");
        }
    }
}

/// `$NOTIFY_SOCKET` as an address: `/path` or `@abstract` (vsock and others are refused).
fn parse_address(socket: &OsStr) -> io::Result<SocketAddr> {
    let bytes = socket.as_bytes();
    match bytes.first() {
        Some(b'/') => SocketAddr::from_pathname(socket),
        Some(b'@') => abstract_address(&bytes[1..]),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "only a path or an @abstract socket is supported",
        )),
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_address(name: &[u8]) -> io::Result<SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_address(_name: &[u8]) -> io::Result<SocketAddr> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "abstract sockets exist on Linux only"))
}

/// The watchdog interval from `$WATCHDOG_USEC` and `$WATCHDOG_PID` (as `sd_watchdog_enabled`):
/// `None` when the usec value is not set, or the pid is set to another process than `own_pid`.
/// An unparsable or zero value is an error.
pub fn parse_watchdog(
    usec: Option<&OsStr>,
    pid: Option<&OsStr>,
    own_pid: u32,
) -> Result<Option<Duration>, String> {
    let Some(usec) = usec else { return Ok(None) };
    let usec = usec
        .to_str()
        .and_then(|text| text.parse::<u64>().ok())
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("WATCHDOG_USEC={usec:?} is not a positive number"))?;
    if let Some(pid) = pid {
        let pid = pid
            .to_str()
            .and_then(|text| text.parse::<u32>().ok())
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("WATCHDOG_PID={pid:?} is not a process id"))?;
        if pid != own_pid {
            return Ok(None);
        }
    }
    Ok(Some(Duration::from_micros(usec)))
}

/// [`parse_watchdog`] over this process's environment; a bad value is logged and disables it.
pub fn watchdog_from_env() -> Option<Duration> {
    let (usec, pid) = (std::env::var_os("WATCHDOG_USEC"), std::env::var_os("WATCHDOG_PID"));
    parse_watchdog(usec.as_deref(), pid.as_deref(), std::process::id()).unwrap_or_else(|e| {
        warn!(error = %e, "the systemd watchdog is off");
        None
    })
}

/// How long the heartbeat may stand still before the pings stop: the watchdog interval, or
/// three journal ticks if longer (an idle pipeline moves only once per tick).
pub fn stall_window(watchdog: Duration, tick_interval: Duration) -> Duration {
    watchdog.max(tick_interval.saturating_mul(3))
}

/// The heartbeat's last value and when it last changed.
#[derive(Debug, Clone)]
pub struct Progress {
    last: u64,
    since: Instant,
    stall: Duration,
}

impl Progress {
    /// Starts watching at `value`, as if it had just changed.
    pub fn new(value: u64, now: Instant, stall: Duration) -> Progress {
        Progress { last: value, since: now, stall }
    }

    /// Records the heartbeat's `value` at `now`: `Ok` while it changed within the stall
    /// window, `Err(how long it stands still)` after.
    pub fn observe(&mut self, value: u64, now: Instant) -> Result<(), Duration> {
        if value != self.last {
            (self.last, self.since) = (value, now);
        }
        let still = now.saturating_duration_since(self.since);
        if still < self.stall { Ok(()) } else { Err(still) }
    }
}

/// What the notifications read from the running agent.
#[derive(Debug, Clone)]
pub struct Probe {
    /// The counters (upstream state, events in).
    pub metrics: Arc<Metrics>,
    /// The outbox (its depth).
    pub outbox: Outbox,
    /// The processor's published position: the heartbeat.
    pub readmodel: Arc<ReadModel>,
}

impl Probe {
    /// The heartbeat: the journal seq the processor applied last.
    pub fn heartbeat(&self) -> u64 {
        self.readmodel.position()
    }

    /// The `STATUS=` text, e.g. `upstream up; outbox 12 records (3 KiB); 4711 events in`.
    pub fn status(&self) -> String {
        let stats = self.outbox.stats();
        format!(
            "upstream {}; outbox {} records ({} KiB); {} events in",
            self.metrics.upstream_state(),
            stats.alerts.records + stats.summaries.records,
            (stats.alerts.bytes + stats.summaries.bytes) / 1024,
            metrics::get(&self.metrics.events_in)
        )
    }
}

/// The running notifications: [`Service::stopping`] ends them.
#[derive(Debug)]
pub struct Service {
    notifier: Arc<Notifier>,
    stop: CancellationToken,
}

impl Service {
    /// Sends `READY=1` (the stages have started) and, when `$NOTIFY_SOCKET` is set, spawns
    /// the task that refreshes `STATUS=` and pings the watchdog (see the module docs). Off
    /// the systemd path, does nothing.
    pub fn start(probe: Probe, tick_interval: Duration) -> Service {
        let notifier = Arc::new(Notifier::from_env());
        let stop = CancellationToken::new();
        if notifier.is_enabled() {
            let watchdog = watchdog_from_env();
            notifier.send(&format!("READY=1\nSTATUS=started; {}", probe.status()));
            info!(watchdog = ?watchdog, "notified systemd: ready");
            let stall = watchdog.map(|w| stall_window(w, tick_interval));
            let heartbeat = probe.clone();
            tokio::spawn(notify_loop(
                notifier.clone(),
                watchdog.zip(stall),
                move || heartbeat.heartbeat(),
                move || probe.status(),
                stop.clone(),
            ));
        }
        Service { notifier, stop }
    }

    /// Shutdown begins: stops the pings and sends `STOPPING=1`.
    pub fn stopping(&self) {
        self.stop.cancel();
        self.notifier.send("STOPPING=1\nSTATUS=stopping");
    }
}

/// Every half watchdog interval (or [`STATUS_PERIOD`] without a watchdog) until `stop`:
/// `WATCHDOG=1` with a fresh `STATUS=` while `heartbeat` moved within the stall window, else
/// only `STATUS=` saying that the pipeline stalls. `watchdog` is (interval, stall window).
async fn notify_loop(
    notifier: Arc<Notifier>,
    watchdog: Option<(Duration, Duration)>,
    heartbeat: impl Fn() -> u64,
    status: impl Fn() -> String,
    stop: CancellationToken,
) {
    let period = watchdog.map_or(STATUS_PERIOD, |(interval, _)| interval / 2);
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut progress = watchdog.map(|(_, stall)| Progress::new(heartbeat(), Instant::now(), stall));
    let mut stalled = false;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = stop.cancelled() => return,
        }
        let Some(progress) = &mut progress else {
            notifier.send(&format!("STATUS={}", status()));
            continue;
        };
        match progress.observe(heartbeat(), Instant::now()) {
            Ok(()) => {
                if stalled {
                    info!("the pipeline moves again; pinging the systemd watchdog again");
                    stalled = false;
                }
                notifier.send(&format!("WATCHDOG=1\nSTATUS={}", status()));
            }
            Err(still) => {
                if !stalled {
                    error!(
                        still_s = still.as_secs(),
                        "no pipeline progress (the processor applied no journal entry, not \
                         even a tick); withholding the watchdog ping so that systemd restarts \
                         the agent"
                    );
                    stalled = true;
                }
                notifier.send(&format!(
                    "STATUS=stalled: no pipeline progress for {}s; {}",
                    still.as_secs(),
                    status()
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn os(text: &str) -> Option<&OsStr> {
        Some(OsStr::new(text))
    }

    #[test]
    fn watchdog_usec_is_parsed_as_microseconds() {
        assert_eq!(parse_watchdog(os("400000"), None, 7), Ok(Some(Duration::from_millis(400))));
        assert_eq!(parse_watchdog(os("30000000"), None, 7), Ok(Some(Duration::from_secs(30))));
        assert_eq!(parse_watchdog(None, None, 7), Ok(None), "no watchdog configured");
        assert_eq!(parse_watchdog(None, os("7"), 7), Ok(None), "a pid alone enables nothing");
    }

    #[test]
    fn bad_watchdog_usec_is_an_error() {
        for bad in ["", "0", "-5", "1.5", "30s", " 400000", "18446744073709551616"] {
            assert!(parse_watchdog(os(bad), None, 7).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn watchdog_pid_of_another_process_disables_the_pings() {
        let ours = Ok(Some(Duration::from_secs(1)));
        assert_eq!(parse_watchdog(os("1000000"), os("7"), 7), ours);
        assert_eq!(parse_watchdog(os("1000000"), os("8"), 7), Ok(None));
        for bad in ["", "0", "x", "-7"] {
            assert!(parse_watchdog(os("1000000"), os(bad), 7).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_stall_window_covers_three_ticks() {
        let s = Duration::from_secs;
        assert_eq!(stall_window(s(30), s(1)), s(30));
        assert_eq!(stall_window(s(30), s(20)), s(60));
        assert_eq!(
            stall_window(Duration::from_millis(400), Duration::from_millis(100)),
            Duration::from_millis(400)
        );
    }

    #[test]
    fn progress_is_alive_while_the_heartbeat_moves_within_the_window() {
        let start = Instant::now();
        let ms = |n| start + Duration::from_millis(n);
        let mut p = Progress::new(5, start, Duration::from_millis(100));
        assert_eq!(p.observe(5, ms(50)), Ok(()), "still within the window");
        assert_eq!(p.observe(5, ms(100)), Err(Duration::from_millis(100)), "a full window still");
        assert_eq!(p.observe(6, ms(120)), Ok(()), "moved: alive again");
        assert_eq!(p.observe(6, ms(219)), Ok(()));
        assert_eq!(p.observe(6, ms(230)), Err(Duration::from_millis(110)));
        assert_eq!(
            p.observe(2, ms(231)),
            Ok(()),
            "any change counts (a fresh store restarts seqs)"
        );
    }

    #[test]
    fn addresses_are_paths_or_abstract_names() {
        let path = parse_address(OsStr::new("/run/systemd/notify")).unwrap();
        assert_eq!(path.as_pathname(), Some(std::path::Path::new("/run/systemd/notify")));
        let name = parse_address(OsStr::new("@/org/freedesktop/systemd1/notify")).unwrap();
        assert_eq!(name.as_pathname(), None);
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            assert_eq!(name.as_abstract_name(), Some(&b"/org/freedesktop/systemd1/notify"[..]));
        }
        assert!(parse_address(OsStr::new("vsock:2:1234")).is_err());
        assert!(parse_address(OsStr::new("relative/path")).is_err());
        assert!(parse_address(OsStr::new("")).is_err());
    }

    /// The next datagram within five seconds.
    fn next(receiver: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = receiver.recv(&mut buf).expect("a notification within the deadline");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    fn receiver(dir: &tempfile::TempDir, name: &str) -> (UnixDatagram, OsString) {
        let path = dir.path().join(name);
        let receiver = UnixDatagram::bind(&path).unwrap();
        receiver.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        (receiver, path.into_os_string())
    }

    #[test]
    fn notifications_reach_path_and_abstract_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let (receiver, path) = receiver(&dir, "notify");
        Notifier::connect(&path).unwrap().notify("READY=1").unwrap();
        assert_eq!(next(&receiver), "READY=1");

        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            let name = format!("edgewise-test-{}-{:x}", std::process::id(), fastrand::u64(..));
            let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
            let receiver = UnixDatagram::bind_addr(&addr).unwrap();
            receiver.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let notifier = Notifier::connect(OsStr::new(&format!("@{name}"))).unwrap();
            notifier.notify("STOPPING=1").unwrap();
            assert_eq!(next(&receiver), "STOPPING=1");
        }

        assert!(Notifier::disabled().notify("READY=1").is_ok(), "disabled sends nothing");
    }

    /// The loop pings while the heartbeat moves, withholds pings (saying so in STATUS) once
    /// it stood still for the stall window, and pings again when it moves again.
    #[tokio::test]
    async fn pings_stop_while_the_heartbeat_stands_still() {
        let dir = tempfile::tempdir().unwrap();
        let (receiver, path) = receiver(&dir, "notify");
        let notifier = Arc::new(Notifier::connect(&path).unwrap());
        let beat = Arc::new(AtomicU64::new(0));
        let moving = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let stop = CancellationToken::new();
        let (b, m) = (beat.clone(), moving.clone());
        // Every read of a moving heartbeat sees a new value, as a working processor gives.
        let heartbeat = move || {
            if m.load(Ordering::SeqCst) {
                b.fetch_add(1, Ordering::SeqCst) + 1
            } else {
                b.load(Ordering::SeqCst)
            }
        };
        let watchdog = Some((Duration::from_millis(60), Duration::from_millis(60)));
        let task = tokio::spawn(notify_loop(
            notifier,
            watchdog,
            heartbeat,
            || "fine".into(),
            stop.clone(),
        ));
        let messages = tokio::task::spawn_blocking(move || {
            let mut pings = 0;
            while pings < 3 {
                let message = next(&receiver);
                assert_eq!(message, "WATCHDOG=1\nSTATUS=fine");
                pings += 1;
            }
            moving.store(false, Ordering::SeqCst);
            // Pings may continue until a full window passes; then only stalled STATUS lines.
            let mut message = next(&receiver);
            while message.starts_with("WATCHDOG=1") {
                message = next(&receiver);
            }
            for _ in 0..3 {
                assert!(
                    message.starts_with("STATUS=stalled: no pipeline progress for "),
                    "{message}"
                );
                assert!(message.ends_with("; fine"), "{message}");
                message = next(&receiver);
            }
            moving.store(true, Ordering::SeqCst);
            while !message.starts_with("WATCHDOG=1") {
                assert!(message.starts_with("STATUS=stalled"), "{message}");
                message = next(&receiver);
            }
            message
        })
        .await
        .unwrap();
        assert_eq!(messages, "WATCHDOG=1\nSTATUS=fine", "pings resume when the heartbeat moves");
        stop.cancel();
        task.await.unwrap();
    }
}
