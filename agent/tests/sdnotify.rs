//! The real binary under a stand-in for systemd: a Unix datagram socket as `$NOTIFY_SOCKET`
//! and a 400 ms `$WATCHDOG_USEC`. The agent sends `READY=1` first, then `WATCHDOG=1` pings
//! (every 200 ms while its pipeline moves), and on SIGTERM `STOPPING=1`, then exits 0.

mod common;
use common::{LoggedAgent, run_command};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long each step may take (start, pings, stop), generous for a loaded CI machine.
const DEADLINE: Duration = Duration::from_secs(30);

/// A simulated source with 100 ms journal ticks, a file upstream and the API off.
fn write_config(dir: &Path) -> std::path::PathBuf {
    let config = format!(
        r#"[agent]
id = "sdnotify-test"
data_dir = "{data}"
status_interval = "0s"

[journal]
tick_interval = "100ms"

[[sources]]
kind = "simulated"
name = "sim"
devices = 1
metrics = ["temperature"]
interval = "50ms"
faults = false

[upstream]
kind = "file"
path = "{out}"

[api]
listen = "off"
"#,
        data = dir.join("data").display(),
        out = dir.join("upstream.jsonl").display(),
    );
    let path = dir.join("agent.toml");
    std::fs::write(&path, config).unwrap();
    path
}

/// The notifications received, in order.
struct Systemd {
    socket: UnixDatagram,
    received: Vec<String>,
}

impl Systemd {
    /// Receives until a datagram has a line `assignment`; returns that datagram's index.
    fn wait_for(&mut self, assignment: &str, agent: &mut LoggedAgent) -> usize {
        let start = Instant::now();
        let mut buf = [0u8; 4096];
        loop {
            assert!(
                start.elapsed() < DEADLINE,
                "no {assignment} within {DEADLINE:?}; received {:?}\nlog:\n{}",
                self.received,
                agent.log()
            );
            match self.socket.recv(&mut buf) {
                Ok(n) => {
                    let message = String::from_utf8(buf[..n].to_vec()).unwrap();
                    let found = message.lines().any(|line| line == assignment);
                    self.received.push(message);
                    if found {
                        return self.received.len() - 1;
                    }
                }
                // The read timeout: check that the agent still runs, then wait again.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(e) => panic!("recv: {e}"),
            }
            if assignment != "STOPPING=1"
                && let Some(status) = agent.child.0.try_wait().unwrap()
            {
                panic!("the agent exited with {status}; log:\n{}", agent.log());
            }
        }
    }
}

#[test]
fn ready_watchdog_pings_and_stopping_reach_systemd() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let socket_path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(200))).unwrap();

    let mut command = run_command(&config);
    command
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "400000")
        .env_remove("WATCHDOG_PID");
    let mut agent = LoggedAgent::spawn(command);
    let mut systemd = Systemd { socket, received: Vec::new() };

    let ready = systemd.wait_for("READY=1", &mut agent);
    assert_eq!(ready, 0, "READY=1 comes first: {:?}", systemd.received);
    assert!(
        systemd.received[0].lines().any(|l| l.starts_with("STATUS=started; upstream ")),
        "{:?}",
        systemd.received[0]
    );
    let first_ping = systemd.wait_for("WATCHDOG=1", &mut agent);
    let second_ping = systemd.wait_for("WATCHDOG=1", &mut agent);
    assert!(first_ping > ready && second_ping > first_ping);
    for ping in [first_ping, second_ping] {
        assert!(
            systemd.received[ping].contains("\nSTATUS=upstream "),
            "a ping carries the status: {:?}",
            systemd.received[ping]
        );
    }

    agent.signal("TERM");
    systemd.wait_for("STOPPING=1", &mut agent);
    let status = agent.wait_exit(DEADLINE);
    assert!(status.success(), "{status}; log:\n{}", agent.log());
}
