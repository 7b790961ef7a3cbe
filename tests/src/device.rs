//! The device under test: the real `firmware-sim` binary (the firmware core driving simulated
//! sensors), writing frames into a pseudo-terminal that the agent reads like a USB adapter.
//!
//! `firmware-sim` reports on stderr, one JSON object per line (`pty`, `unplugged`,
//! `replugged`, `done`); [`FirmwareSim`] collects them so that a test computes its
//! expectations from what the device says it did, and prints the device's stderr when the
//! test fails.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use crate::agent::workspace_bin;
use crate::wait::wait_until;

/// Locates the `firmware-sim` binary (`FIRMWARE_SIM_BIN`, or next to the test executable).
pub fn firmware_sim_bin() -> PathBuf {
    workspace_bin("firmware-sim", "FIRMWARE_SIM_BIN", "firmware")
}

/// A running `firmware-sim` process.
#[derive(Debug)]
pub struct FirmwareSim {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl FirmwareSim {
    /// Starts `firmware-sim` with `args`; stdout is discarded, stderr is collected.
    pub fn start(args: &[&str]) -> FirmwareSim {
        let bin = firmware_sim_bin();
        let mut child = Command::new(&bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", bin.display()));
        let stderr = child.stderr.take().expect("piped stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        FirmwareSim { child, lines }
    }

    /// Everything written to stderr so far.
    pub fn stderr(&self) -> String {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).join("\n")
    }

    /// The JSON events on stderr so far, in order.
    pub fn events(&self) -> Vec<Value> {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|value| value.get("event").is_some())
            .collect()
    }

    /// Waits for the first event named `name`; panics with the device's stderr after
    /// `timeout`.
    #[track_caller]
    pub fn wait_event(&self, name: &str, timeout: Duration) -> Value {
        let mut found = None;
        wait_until(timeout, || {
            found = self.events().into_iter().find(|e| e["event"] == name);
            found.is_some()
        });
        found.unwrap_or_else(|| {
            panic!("firmware-sim: no {name:?} event within {timeout:?}; stderr:\n{}", self.stderr())
        })
    }

    /// Waits for the `n`-th (from 1) event named `name`.
    #[track_caller]
    pub fn wait_nth_event(&self, name: &str, n: usize, timeout: Duration) -> Value {
        let mut found = None;
        wait_until(timeout, || {
            found = self.events().into_iter().filter(|e| e["event"] == name).nth(n - 1);
            found.is_some()
        });
        found.unwrap_or_else(|| {
            panic!(
                "firmware-sim: no event {name:?} #{n} within {timeout:?}; stderr:\n{}",
                self.stderr()
            )
        })
    }

    /// Sends SIGTERM and waits for the exit; panics if it does not come within 10 s.
    #[track_caller]
    pub fn terminate(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let exited =
            wait_until(Duration::from_secs(10), || matches!(self.child.try_wait(), Ok(Some(_))));
        assert!(exited, "firmware-sim ignored SIGTERM; stderr:\n{}", self.stderr());
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for FirmwareSim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- firmware-sim stderr -----\n{}", self.stderr());
        }
    }
}

/// The key=value fields of the last line of `log` that contains `marker` (e.g. the agent's
/// final `status` line); values in double quotes keep their spaces. Empty if there is none.
pub fn last_line_fields(log: &str, marker: &str) -> Vec<(String, String)> {
    let Some(line) = log.lines().rev().find(|l| l.contains(marker)) else { return Vec::new() };
    let mut fields = Vec::new();
    let mut rest = line;
    while let Some(eq) = rest.find('=') {
        let key_start = rest[..eq].rfind(' ').map_or(0, |i| i + 1);
        let key = rest[key_start..eq].to_string();
        let after = &rest[eq + 1..];
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted.find('"').unwrap_or(quoted.len());
            (quoted[..end].to_string(), quoted.get(end + 1..).unwrap_or(""))
        } else {
            let end = after.find(' ').unwrap_or(after.len());
            (after[..end].to_string(), &after[end..])
        };
        fields.push((key, value));
        rest = next;
    }
    fields
}

/// Whether `path` exists as a symlink (the device's pty link).
pub fn link_exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_of_a_tracing_line_with_quoted_values() {
        let log = "x status a=1\n2026 INFO edgewise: status events_in=10 lost_frames=3 \
                   rejects=\"serial/frame_crc=2 serial/frame_cobs=1\" upstream=up\nother";
        let fields = last_line_fields(log, "status");
        let get = |k: &str| fields.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
        assert_eq!(get("events_in"), Some("10"));
        assert_eq!(get("lost_frames"), Some("3"));
        assert_eq!(get("rejects"), Some("serial/frame_crc=2 serial/frame_cobs=1"));
        assert_eq!(get("upstream"), Some("up"));
        assert_eq!(get("a"), None, "only the last matching line");
    }
}
