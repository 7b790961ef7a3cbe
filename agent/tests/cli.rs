//! The command line as a user meets it: every shipped config is valid, `check` reports every
//! problem with a position and exits 2, `--version` prints the version.

use std::path::{Path, PathBuf};
use std::process::Command;

fn edgewise() -> Command {
    Command::new(env!("CARGO_BIN_EXE_edgewise"))
}

fn config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config")
}

#[test]
fn every_file_in_config_loads_and_validates() {
    let mut checked = 0;
    for entry in std::fs::read_dir(config_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            match edgewise::config::load_with_warnings(&path, edgewise::config::Purpose::Run) {
                Err(errors) => panic!("{} is invalid:\n{errors}", path.display()),
                Ok((_, warnings)) => assert!(
                    warnings.is_empty(),
                    "{} has warnings: {:?}",
                    path.display(),
                    warnings
                        .iter()
                        .map(|w| edgewise::config::Warning(w).to_string())
                        .collect::<Vec<_>>()
                ),
            }
            let out = edgewise().args(["check", "--config"]).arg(&path).output().unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert!(checked >= 3, "expected the shipped examples, found {checked}");
}

#[test]
fn check_prints_every_problem_with_file_line_and_column_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        r#"[agent]
id = "gw-1"

[[sources]]
kind = "mqtt"
topics = ["plant/#/x"]
qos = 2

[[rules]]
kind = "threshold"
name = "hot"
series = "+/temp"
above = 80.0
clear = 90.0

[upstream]
kind = "http"
url = "not a url"
"#,
    )
    .unwrap();
    let out = edgewise().args(["check", "--config"]).arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let name = file.display().to_string();
    for expected in [
        format!("{name}:6:11: error: sources[0].topics[0]"),
        format!("{name}:7:7: error: sources[0].qos"),
        format!("{name}:14:"),
        format!("{name}:18:7: error: upstream.url"),
    ] {
        assert!(stderr.contains(&expected), "missing `{expected}` in:\n{stderr}");
    }
    assert!(stderr.contains("hint:"), "{stderr}");
}

#[test]
fn check_reports_a_missing_file_clearly() {
    let out =
        edgewise().args(["check", "--config", "/nonexistent/edgewise.toml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read the file"));
}

#[test]
fn version_prints_the_package_version() {
    let out = edgewise().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("edgewise {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn run_refuses_an_invalid_config_with_exit_status_2() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[agent]\nid = \"x\"\n").unwrap();
    let out = edgewise().args(["run", "--config"]).arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing section `[upstream]`"));
}

#[test]
fn check_warns_about_a_rule_that_can_never_fire_but_accepts_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("typo.toml");
    std::fs::write(
        &file,
        r#"[agent]
id = "gw-1"

[[sources]]
kind = "simulated"
metrics = ["temperature"]

[[rules]]
kind = "threshold"
name = "hot"
series = "pump-*/temprature"
above = 80.0

[upstream]
kind = "file"
path = "out.jsonl"
"#,
    )
    .unwrap();
    let out = edgewise().args(["check", "--config"]).arg(&file).output().unwrap();
    assert!(out.status.success(), "a warning is not an error");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}:11:10: warning: rules[0].series", file.display())),
        "{stderr}"
    );
}

/// `edgewise run` re-executes itself once with glibc's malloc tuned (the same PID: a
/// supervisor sees one process), unless the environment decides already.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn run_tunes_glibc_malloc_in_the_same_process_unless_told_not_to() {
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let mut child = edgewise()
        .args(["run", "--exit-after", "60s"])
        .current_dir(dir.path())
        .env_remove("MALLOC_ARENA_MAX")
        .env_remove("MALLOC_MMAP_THRESHOLD_")
        .env_remove("GLIBC_TUNABLES")
        .env_remove("EDGEWISE_MALLOC")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let environ = format!("/proc/{}/environ", child.id());
    let deadline = Instant::now() + Duration::from_secs(20);
    let tuned = loop {
        let vars = std::fs::read(&environ).unwrap_or_default();
        let vars: Vec<&[u8]> = vars.split(|b| *b == 0).collect();
        let has = |(name, value): &(&str, &str)| {
            vars.iter().any(|var| *var == format!("{name}={value}").as_bytes())
        };
        if has(&edgewise::MALLOC_TUNING[0]) {
            break edgewise::MALLOC_TUNING.iter().all(has);
        }
        assert!(Instant::now() < deadline, "{environ} never showed the malloc tuning");
        assert!(child.try_wait().unwrap().is_none(), "the agent exited");
        std::thread::sleep(Duration::from_millis(20));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(tuned, "both settings, in the process the supervisor started");

    let out = edgewise()
        .args(["run", "--exit-after", "1s"])
        .current_dir(dir.path())
        .env("EDGEWISE_MALLOC", "default")
        .env_remove("MALLOC_ARENA_MAX")
        .env_remove("MALLOC_MMAP_THRESHOLD_")
        .output()
        .unwrap();
    assert!(out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("malloc: not tuned by edgewise"), "{log}");
    assert!(!log.contains("malloc tuned"), "{log}");
}
