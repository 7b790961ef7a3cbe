//! Polling helpers: tests await conditions instead of sleeping for a guessed time.

use std::time::{Duration, Instant};

/// How often a condition is re-evaluated.
pub const POLL: Duration = Duration::from_millis(20);

/// Polls `condition` every [`POLL`] until it holds or `timeout` has passed; returns whether it
/// held. The condition is evaluated one last time at the deadline so a slow poll never turns a
/// success into a timeout.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return condition();
        }
        std::thread::sleep(POLL);
    }
}

/// Like [`wait_until`] but panics with `what` and the elapsed time when the condition does not
/// hold in time.
#[track_caller]
pub fn wait_for(timeout: Duration, what: &str, condition: impl FnMut() -> bool) {
    let start = Instant::now();
    if !wait_until(timeout, condition) {
        panic!("timed out after {:?} waiting for {what}", start.elapsed());
    }
}

/// A deadline that can tell how much time is left.
#[derive(Debug, Clone, Copy)]
pub struct Deadline(Instant);

impl Deadline {
    /// A deadline `timeout` from now.
    pub fn after(timeout: Duration) -> Deadline {
        Deadline(Instant::now() + timeout)
    }

    /// Time left, zero once passed.
    pub fn remaining(self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }

    /// Whether the deadline has passed.
    pub fn passed(self) -> bool {
        Instant::now() >= self.0
    }
}

/// A free TCP port on 127.0.0.1: bound to port 0, read, released. Another process may take it
/// before the caller binds it; callers that spawn a server retry with a new port on failure.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr of a bound listener").port()
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
pub fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

/// The current wall-clock time in ms since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
