//! Helpers shared by the integration tests that run the real `edgewise` binary.
// Each test binary uses only some of these helpers.
#![allow(dead_code)]

use std::net::TcpListener;
use std::process::Child;

/// A free TCP port on 127.0.0.1 (bound, read and released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Kills a child process when the test ends, also on a failed assertion.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `edgewise run --config <config>` with `EDGEWISE_LOG=info`, for [`LoggedAgent::spawn`]
/// (add environment before spawning).
pub fn run_command(config: &std::path::Path) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_edgewise"));
    command.args(["run", "--config"]).arg(config).env("EDGEWISE_LOG", "info");
    command
}

/// A running agent whose stderr is collected for waits and failure messages; killed on drop.
pub struct LoggedAgent {
    pub child: Killed,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl LoggedAgent {
    /// Spawns `command` with stdin and stdout closed and stderr collected by a thread.
    pub fn spawn(mut command: std::process::Command) -> LoggedAgent {
        use std::io::{BufRead, BufReader};
        use std::process::Stdio;
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        LoggedAgent { child: Killed(child), log }
    }

    /// What the agent logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Sends the signal `name` (`TERM`, `HUP`, ...) with kill(1).
    pub fn signal(&self, name: &str) {
        let pid = self.child.0.id().to_string();
        let status = std::process::Command::new("kill").arg(format!("-{name}")).arg(pid).status();
        assert!(status.unwrap().success(), "kill -{name}");
    }

    /// The exit status, polled until `deadline` has passed.
    pub fn wait_exit(&mut self, deadline: std::time::Duration) -> std::process::ExitStatus {
        let start = std::time::Instant::now();
        loop {
            if let Some(status) = self.child.0.try_wait().unwrap() {
                return status;
            }
            assert!(start.elapsed() < deadline, "no exit within {deadline:?}:\n{}", self.log());
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// SIGTERM, as systemd stops the agent; asserts a clean exit within `deadline`.
    pub fn terminate(&mut self, deadline: std::time::Duration) {
        self.signal("TERM");
        let status = self.wait_exit(deadline);
        assert!(status.success(), "{status}; log:\n{}", self.log());
    }
}
