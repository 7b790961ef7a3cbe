//! No secret leaves the agent: with an MQTT password, an upstream bearer token and an API
//! token configured (from environment variables, the only way besides files), the real
//! binary at debug log level, `edgewise check`, `edgewise status`, `/metrics` and every JSON
//! endpoint never show any of them, while the secrets are in use (the API accepts the token,
//! the upstream and the broker are tried).

mod common;
use common::{Killed, free_port};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MQTT_PASSWORD: &str = "mqtt-pw-7Hq2ZxS3cret";
const UPSTREAM_TOKEN: &str = "upstream-tok-Vb81Kr0Secret";
const API_TOKEN: &str = "api-tok-Qe55Lm9Secret";

fn edgewise() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_edgewise"));
    command
        .env("T_MQTT_PASSWORD", MQTT_PASSWORD)
        .env("T_UPSTREAM_TOKEN", UPSTREAM_TOKEN)
        .env("T_API_TOKEN", API_TOKEN)
        .env("EDGEWISE_LOG", "debug");
    command
}

fn write_config(dir: &Path, api: SocketAddr) -> std::path::PathBuf {
    // Nothing listens on the broker's or the upstream's port: both are tried and fail,
    // so their errors (which name the peer) are logged.
    let config = format!(
        r#"[agent]
id = "gw-secrets"
data_dir = "{data}"
status_interval = "1s"

[summary]
window = "1s"
allowed_lateness = "0s"

[[sources]]
kind = "simulated"
name = "sim"
devices = 1
metrics = ["temperature"]
interval = "50ms"

[[sources]]
kind = "mqtt"
name = "plant"
host = "127.0.0.1"
port = {broker}
topics = ["site/#"]
username = "gw"
password_env = "T_MQTT_PASSWORD"
reconnect_max = "500ms"

[upstream]
kind = "http"
url = "http://127.0.0.1:{upstream}/ingest"
token_env = "T_UPSTREAM_TOKEN"

[api]
listen = "{api}"
token_env = "T_API_TOKEN"
"#,
        data = dir.join("data").display(),
        broker = free_port(),
        upstream = free_port(),
    );
    let path = dir.join("agent.toml");
    std::fs::write(&path, config).unwrap();
    path
}

/// GET with an optional bearer token: `(status, body)`.
fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let head = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    Some((status, response))
}

fn assert_no_secret(what: &str, text: &str) {
    for secret in [MQTT_PASSWORD, UPSTREAM_TOKEN, API_TOKEN] {
        assert!(!text.contains(secret), "{what} shows a secret:\n{text}");
    }
}

#[test]
fn no_secret_appears_in_logs_check_status_metrics_or_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = write_config(dir.path(), api);

    let check = edgewise().args(["check", "--config"]).arg(&config).output().unwrap();
    let check_out = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(check.status.success(), "check: {check_out}");
    assert_no_secret("edgewise check", &check_out);

    let log = dir.path().join("agent.log");
    let child = edgewise()
        .args(["run", "--exit-after", "120s", "--config"])
        .arg(&config)
        .stdout(std::fs::File::create(dir.path().join("agent.out")).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut agent = Killed(child);

    // Wait until the secrets were used: the upstream tried (and failed) twice, the API
    // answers with the token.
    let deadline = Instant::now() + Duration::from_secs(60);
    let metrics = loop {
        if let Some((200, body)) = get(api, "/metrics", Some(API_TOKEN))
            && body.lines().any(|l| {
                l.strip_prefix("edgewise_upstream_failures_total ")
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .is_some_and(|n| n >= 2.0)
            })
        {
            break body;
        }
        assert!(Instant::now() < deadline, "the upstream was never tried");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_no_secret("/metrics", &metrics);
    let (status, unauthorized) = get(api, "/api/v1/status", None).unwrap();
    assert_eq!(status, 401);
    assert_no_secret("a 401", &unauthorized);
    let (status, _) = get(api, "/api/v1/status", Some("wrong-token")).unwrap();
    assert_eq!(status, 401, "a wrong token is refused");
    for path in [
        "/readyz",
        "/api/v1/status",
        "/api/v1/series",
        "/api/v1/alerts",
        "/api/v1/rules",
        "/api/v1/series/history?name=pump-1%2Ftemperature",
        "/",
    ] {
        let (status, body) = get(api, path, Some(API_TOKEN)).unwrap();
        assert!(status == 200 || (path == "/readyz" && status == 503), "{path}: {status}");
        assert_no_secret(path, &body);
    }

    let status = edgewise().args(["status", "--config"]).arg(&config).output().unwrap();
    let status_out = String::from_utf8_lossy(&status.stdout).to_string();
    assert!(status.status.success(), "status: {status_out}");
    assert!(status_out.contains("gw-secrets"), "status used the token: {status_out}");
    assert_no_secret("edgewise status", &status_out);

    // SIGTERM: the final status line is logged too.
    nix_term(agent.0.id());
    let deadline = Instant::now() + Duration::from_secs(30);
    while agent.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the agent did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("final status"), "the log is complete: {log}");
    assert!(log.contains("127.0.0.1"), "peers were logged (the upstream and broker errors)");
    assert!(log.lines().count() > 20, "a debug log: {log}");
    assert_no_secret("the debug log", &log);
}

/// Sends SIGTERM with `kill`, the way systemd stops the agent.
fn nix_term(pid: u32) {
    let status =
        Command::new("kill").args(["-TERM", &pid.to_string()]).stdout(Stdio::null()).status();
    assert!(status.unwrap().success());
}
