//! Hot reload as a technician uses it: edit the file (or send SIGHUP) while the agent runs;
//! a valid change goes live, an invalid one is logged and the running rules stay.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(30);

fn config(dir: &Path, above: &str) -> String {
    format!(
        r#"[agent]
id = "reload-test"
data_dir = "{data}"
status_interval = "0s"

[journal]
tick_interval = "100ms"
commit_interval = "2ms"

[[sources]]
kind = "simulated"
devices = 1
metrics = ["temperature"]
interval = "50ms"
faults = false

[[rules]]
kind = "threshold"
name = "hot"
series = "+/temperature"
above = {above}

[upstream]
kind = "file"
path = "{out}"

[upstream.batch]
max_age = "50ms"
"#,
        data = dir.join("data").display(),
        out = dir.join("upstream.jsonl").display(),
    )
}

struct Running {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Running {
    fn start(config: &Path) -> Running {
        let mut child = Command::new(env!("CARGO_BIN_EXE_edgewise"))
            .args(["run", "--config"])
            .arg(config)
            .env("EDGEWISE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        Running { child, log }
    }

    fn wait_log(&self, needle: &str) {
        let start = Instant::now();
        while start.elapsed() < DEADLINE {
            if self.log.lock().unwrap().contains(needle) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("`{needle}` not logged within {DEADLINE:?}:\n{}", self.log.lock().unwrap());
    }

    fn count(&self, needle: &str) -> usize {
        self.log.lock().unwrap().matches(needle).count()
    }

    fn signal(&self, name: &str) {
        let status =
            Command::new("kill").arg(format!("-{name}")).arg(self.child.id().to_string()).status();
        assert!(status.unwrap().success());
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < DEADLINE {
        if condition() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{what} did not happen within {DEADLINE:?}");
}

fn raised_alerts(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("upstream.jsonl"))
        .unwrap_or_default()
        .matches(r#""state":"raised""#)
        .count()
}

#[test]
fn an_edited_rule_goes_live_and_an_invalid_edit_keeps_the_running_rules() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("edgewise.toml");
    std::fs::write(&file, config(dir.path(), "1000.0")).unwrap();
    let mut agent = Running::start(&file);
    agent.wait_log("processor replayed the journal");
    assert_eq!(raised_alerts(dir.path()), 0, "1000 °C is never reached");

    // The technician lowers the threshold below the simulated temperature.
    std::fs::write(&file, config(dir.path(), "-1000.0")).unwrap();
    agent.wait_log("new rules are live");
    wait_for("an alert from the reloaded rule", || raised_alerts(dir.path()) == 1);

    // A typo: logged with its position, the running rules stay, the agent keeps going.
    std::fs::write(&file, config(dir.path(), "\"cold\"")).unwrap();
    agent.wait_log("configuration reload rejected");
    assert!(agent.log.lock().unwrap().contains("edgewise.toml:"), "the problem has a position");
    assert!(agent.child.try_wait().unwrap().is_none(), "still running");

    // SIGHUP reloads on demand (the file is still invalid: rejected again, still running).
    let rejected = agent.count("configuration reload rejected");
    agent.signal("HUP");
    agent.wait_log("SIGHUP: reloading the configuration");
    wait_for("a second rejection", || agent.count("configuration reload rejected") > rejected);
    assert!(agent.child.try_wait().unwrap().is_none(), "still running");
    assert_eq!(raised_alerts(dir.path()), 1, "the live rule's episode goes on: no second raise");

    agent.signal("TERM");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = agent.child.try_wait().unwrap() {
            break status;
        }
        assert!(start.elapsed() < DEADLINE, "did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
}
