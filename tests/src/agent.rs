//! The agent under test: the real `edgewise` binary in its own process.
//!
//! The binary is found through `EDGEWISE_BIN`, or next to this test's own executable
//! (`<target>/debug/deps/e2e-…` → `<target>/debug/edgewise`). Cargo does not build a
//! dependency's binary for an integration test of another package, so it must be built
//! first (`cargo build -p edgewise`).
//!
//! Each start appends to `agent.stdout.log` / `agent.stderr.log` in the agent's directory
//! under a `=== start N ===` marker; both are printed when a test fails.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::wait::wait_until;

/// How long a graceful stop may take before the test fails.
pub const TERMINATE_TIMEOUT: Duration = Duration::from_secs(15);

/// Locates the `edgewise` binary; panics with a hint when it is missing.
pub fn edgewise_bin() -> PathBuf {
    workspace_bin("edgewise", "EDGEWISE_BIN", "edgewise")
}

/// Locates the binary `name` of the workspace package `package`: `$env_var` if set, else next
/// to this test's own executable. Panics with a hint when it is missing.
pub fn workspace_bin(name: &str, env_var: &str, package: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env_var) {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "{env_var}={} does not exist", path.display());
        return path;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut candidates = Vec::new();
    for dir in exe.ancestors().skip(1) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            if package == "edgewise" {
                warn_if_stale(&candidate);
            }
            return candidate;
        }
        candidates.push(candidate);
        if dir.file_name().is_some_and(|n| n == "target") {
            break;
        }
    }
    panic!(
        "the {name} binary is missing; build it first: cargo build -p {package} \
         (looked at {candidates:?}; or set {env_var})"
    );
}

/// Warns (once per test binary) when a source file of the agent is newer than the binary:
/// `cargo test` does not rebuild another package's binary, and an old one fails confusingly.
fn warn_if_stale(bin: &Path) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let Some(built) = modified(bin) else { return };
        let sources = Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/src");
        let mut stack = vec![sources];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else if modified(&path).is_some_and(|m| m > built) {
                    eprintln!(
                        "warning: {} is newer than {}; run `cargo build -p edgewise` first",
                        path.display(),
                        bin.display()
                    );
                    return;
                }
            }
        }
    });
}

/// A running (or stopped) agent process with its config and logs in `dir`.
#[derive(Debug)]
pub struct Agent {
    bin: PathBuf,
    dir: PathBuf,
    config: PathBuf,
    child: Option<Child>,
    starts: u32,
    pid: Option<u32>,
}

impl Agent {
    /// Writes `config_toml` to `dir/edgewise.toml` and starts `edgewise run --config` on it,
    /// with `dir` as its working directory.
    pub fn start(config_toml: &str, dir: &Path) -> Agent {
        std::fs::create_dir_all(dir).expect("create agent dir");
        let config = dir.join("edgewise.toml");
        std::fs::write(&config, config_toml).expect("write agent config");
        let mut agent = Agent {
            bin: edgewise_bin(),
            dir: dir.to_path_buf(),
            config,
            child: None,
            starts: 0,
            pid: None,
        };
        agent.spawn();
        agent
    }

    fn log_file(&self, name: &str) -> File {
        File::options()
            .create(true)
            .append(true)
            .open(self.dir.join(name))
            .unwrap_or_else(|e| panic!("open {name}: {e}"))
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let marker = format!("=== start {} ===\n", self.starts);
        let mut stdout = self.log_file("agent.stdout.log");
        let mut stderr = self.log_file("agent.stderr.log");
        stdout.write_all(marker.as_bytes()).expect("write log marker");
        stderr.write_all(marker.as_bytes()).expect("write log marker");
        let mut command = Command::new(&self.bin);
        command
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        let child =
            command.spawn().unwrap_or_else(|e| panic!("cannot spawn {}: {e}", self.bin.display()));
        self.pid = Some(child.id());
        self.child = Some(child);
    }

    /// Starts the agent again with the same config and data after it stopped.
    pub fn restart(&mut self) {
        assert!(!self.is_running(), "restart of an agent that still runs");
        self.child = None;
        self.spawn();
    }

    /// The agent's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The PID of the current process, while it has one.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|_| self.pid).unwrap_or(None)
    }

    /// Whether the process is alive.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// How the process ended, if it did.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Kills the process with SIGKILL and reaps it.
    pub fn kill9(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits for the process to exit; panics (with the logs) if it takes
    /// longer than [`TERMINATE_TIMEOUT`].
    #[track_caller]
    pub fn terminate(&mut self) -> ExitStatus {
        let Some(child) = self.child.as_mut() else { panic!("terminate: agent never started") };
        if let Ok(Some(status)) = child.try_wait() {
            return status;
        }
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let mut status = None;
        wait_until(TERMINATE_TIMEOUT, || {
            status = child.try_wait().ok().flatten();
            status.is_some()
        });
        match status {
            Some(status) => status,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the agent did not exit within {TERMINATE_TIMEOUT:?} of SIGTERM");
            }
        }
    }

    /// Freezes the process (SIGSTOP): its connections stay open but nothing is read, acked
    /// or sent, as on a gateway that stalls.
    pub fn pause(&self) {
        self.signal(Signal::SIGSTOP);
    }

    /// Lets a paused process run again (SIGCONT).
    pub fn resume(&self) {
        self.signal(Signal::SIGCONT);
    }

    fn signal(&self, signal: Signal) {
        let pid = self.pid().expect("signal to an agent that is not running");
        kill(Pid::from_raw(pid as i32), signal)
            .unwrap_or_else(|e| panic!("cannot send {signal} to the agent: {e}"));
    }

    /// Resident set size of the process in KiB (`VmRSS` of /proc/PID/status).
    pub fn rss_kb(&self) -> Option<u64> {
        let pid = self.pid()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// Everything the agent wrote to stdout and stderr, all starts.
    pub fn logs(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        format!(
            "--- stdout ---\n{}--- stderr ---\n{}",
            read("agent.stdout.log"),
            read("agent.stderr.log")
        )
    }

    /// Panics with `message` and the agent's logs unless it is running.
    #[track_caller]
    pub fn assert_running(&mut self, message: &str) {
        if !self.is_running() {
            panic!("{message}: the agent exited with {:?}", self.exit_status());
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SIGKILL also ends a paused (stopped) process.
        self.kill9();
        if std::thread::panicking() {
            let logs = self.logs();
            let lines: Vec<&str> = logs.lines().collect();
            let shown = &lines[lines.len().saturating_sub(200)..];
            eprintln!(
                "----- agent logs ({}; last {} of {} lines) -----",
                self.dir.display(),
                shown.len(),
                lines.len()
            );
            for line in shown {
                eprintln!("{line}");
            }
        }
    }
}
