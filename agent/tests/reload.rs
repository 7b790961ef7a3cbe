//! Hot reload as a technician uses it: edit the file (or send SIGHUP) while the agent runs;
//! a valid change goes live, an invalid one is logged and the running rules stay.

mod common;
use common::{LoggedAgent, run_command};
use std::path::Path;
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

/// Waits until the agent's log contains `needle`.
fn wait_log(agent: &LoggedAgent, needle: &str) {
    let start = Instant::now();
    while !agent.log().contains(needle) {
        assert!(
            start.elapsed() < DEADLINE,
            "`{needle}` not logged within {DEADLINE:?}:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How often the agent's log contains `needle`.
fn count(agent: &LoggedAgent, needle: &str) -> usize {
    agent.log().matches(needle).count()
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
    let mut agent = LoggedAgent::spawn(run_command(&file));
    wait_log(&agent, "processor replayed the journal");
    assert_eq!(raised_alerts(dir.path()), 0, "1000 °C is never reached");

    // The technician lowers the threshold below the simulated temperature.
    std::fs::write(&file, config(dir.path(), "-1000.0")).unwrap();
    wait_log(&agent, "new rules are live");
    wait_for("an alert from the reloaded rule", || raised_alerts(dir.path()) == 1);

    // A typo: logged with its position, the running rules stay, the agent keeps going.
    std::fs::write(&file, config(dir.path(), "\"cold\"")).unwrap();
    wait_log(&agent, "configuration reload rejected");
    assert!(agent.log().contains("edgewise.toml:"), "the problem has a position");
    assert!(agent.child.0.try_wait().unwrap().is_none(), "still running");

    // SIGHUP reloads on demand (the file is still invalid: rejected again, still running).
    let rejected = count(&agent, "configuration reload rejected");
    agent.signal("HUP");
    wait_log(&agent, "SIGHUP: reloading the configuration");
    wait_for("a second rejection", || count(&agent, "configuration reload rejected") > rejected);
    assert!(agent.child.0.try_wait().unwrap().is_none(), "still running");
    assert_eq!(raised_alerts(dir.path()), 1, "the live rule's episode goes on: no second raise");

    agent.terminate(DEADLINE);
}
