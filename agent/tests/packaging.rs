//! The Debian package's files agree with the agent and with each other: the installed
//! configuration (`packaging/edgewise.toml`) passes `edgewise check` without a warning, and the
//! systemd unit runs the real command line on that file, as the user the maintainer script
//! creates, with write access to where the configuration puts the store.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_file(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The unit's `Key=value` assignments (comments and section headers skipped); a key set
/// more than once (`DeviceAllow=`) keeps every value.
fn unit() -> BTreeMap<String, Vec<String>> {
    let mut keys: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in read("packaging/edgewise.service").lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('[') {
            continue;
        }
        let (key, value) = line.split_once('=').unwrap_or_else(|| panic!("not Key=value: {line}"));
        keys.entry(key.to_string()).or_default().push(value.to_string());
    }
    keys
}

fn one<'a>(unit: &'a BTreeMap<String, Vec<String>>, key: &str) -> &'a str {
    match unit.get(key).map(Vec::as_slice) {
        Some([value]) => value,
        other => panic!("{key}= must be set once in the unit, got {other:?}"),
    }
}

#[test]
fn the_installed_configuration_is_valid_without_warnings() {
    let output = Command::new(env!("CARGO_BIN_EXE_edgewise"))
        .args(["check", "--config"])
        .arg(repo_file("packaging/edgewise.toml"))
        .env_remove("EDGEWISE_CONFIG")
        .output()
        .unwrap();
    let (stdout, stderr) =
        (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{}\n{stdout}{stderr}", output.status);
    assert!(stdout.contains(": ok (1 source(s), 2 rule(s), upstream file -)"), "{stdout}");
    assert_eq!(stderr, "", "no warnings");
}

#[test]
fn the_unit_runs_the_installed_configuration_under_systemd_supervision() {
    let unit = unit();
    assert_eq!(
        one(&unit, "ExecStart"),
        "/usr/bin/edgewise run --config /etc/edgewise/edgewise.toml"
    );
    assert_eq!(one(&unit, "ExecReload"), "/bin/kill -HUP $MAINPID", "SIGHUP reloads the rules");
    assert_eq!(one(&unit, "Type"), "notify", "the agent sends READY=1 (agent/src/sdnotify.rs)");
    assert_eq!(one(&unit, "NotifyAccess"), "main");
    assert_eq!(one(&unit, "WatchdogSec"), "30s");
    assert_eq!(one(&unit, "Restart"), "on-failure");
    assert_eq!(one(&unit, "StartLimitIntervalSec"), "0", "an exit asks for a restart, always");
    assert_eq!(one(&unit, "CapabilityBoundingSet"), "");
    assert_eq!(one(&unit, "ProtectSystem"), "strict");
    let devices = &unit["DeviceAllow"];
    for tty in ["char-ttyUSB rw", "char-ttyACM rw", "char-ttyAMA rw"] {
        assert!(devices.iter().any(|d| d == tty), "DeviceAllow={tty} missing: {devices:?}");
    }
    assert_eq!(one(&unit, "SupplementaryGroups"), "dialout");
    // The memory figures in BENCHMARKS.md were measured with this malloc tuning, the one the
    // agent also applies to itself when started without it.
    let environment: Vec<&str> = one(&unit, "Environment").split_whitespace().collect();
    let tuning: Vec<String> =
        edgewise::MALLOC_TUNING.iter().map(|(name, value)| format!("{name}={value}")).collect();
    assert_eq!(environment, tuning);
}

/// The store must be writable, and so must its sibling `<data_dir>.corrupt-*` where a store
/// that cannot be opened is moved: the data dir is a subdirectory of the unit's writable state
/// directory, not the state directory itself (whose parent, /var/lib, is read-only).
#[test]
fn the_store_lies_inside_the_units_writable_state_directory() {
    let unit = unit();
    let state = Path::new("/var/lib").join(one(&unit, "StateDirectory"));
    assert_eq!(Path::new(one(&unit, "ReadWritePaths")), state);
    let config = edgewise::config::load_for(
        &repo_file("packaging/edgewise.toml"),
        edgewise::config::Purpose::Run,
    )
    .unwrap();
    let data_dir = &config.agent.data_dir;
    assert!(
        data_dir.starts_with(&state) && data_dir != &state,
        "data_dir {} must be a subdirectory of {}",
        data_dir.display(),
        state.display()
    );
}

#[test]
fn the_maintainer_scripts_create_the_units_user_and_the_package_installs_the_units_paths() {
    let unit = unit();
    let (user, group) = (one(&unit, "User"), one(&unit, "Group"));
    let postinst = read("packaging/postinst");
    assert!(postinst.contains(&format!("addgroup --system --quiet {group}")), "{postinst}");
    assert!(postinst.contains("adduser --system") && postinst.contains(&format!(" {user}\n")));
    assert!(postinst.contains(&format!("adduser --quiet {user} dialout")), "serial access");
    let script = read("scripts/package-deb.sh");
    for installed in [
        "\"$root/usr/bin/edgewise\"",
        "packaging/edgewise.toml \"$root/etc/edgewise/edgewise.toml\"",
        "packaging/edgewise.service \"$root/lib/systemd/system/edgewise.service\"",
        "echo /etc/edgewise/edgewise.toml >\"$root/DEBIAN/conffiles\"",
    ] {
        assert!(script.contains(installed), "scripts/package-deb.sh lacks {installed}");
    }
}
