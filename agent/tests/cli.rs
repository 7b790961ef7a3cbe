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
