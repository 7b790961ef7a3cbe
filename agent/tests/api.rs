//! The local API of a running agent (the real binary): readiness, Prometheus metrics, the
//! series read model and `edgewise status`; an explicitly configured address in use stops
//! the start with an error naming it.

mod common;
use common::{Killed, free_port};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long the agent may take to become ready (store open, first commits).
const DEADLINE: Duration = Duration::from_secs(30);

fn edgewise() -> Command {
    Command::new(env!("CARGO_BIN_EXE_edgewise"))
}

fn write_config(dir: &Path, listen: &str, api_extra: &str) -> std::path::PathBuf {
    let config = format!(
        r#"[agent]
id = "gw-api-test"
data_dir = "{data}"
status_interval = "0s"

[[sources]]
kind = "simulated"
name = "sim"
devices = 2
metrics = ["temperature"]
interval = "50ms"

[upstream]
kind = "file"
path = "{out}"

[api]
listen = "{listen}"
{api_extra}
"#,
        data = dir.join("data").display(),
        out = dir.join("upstream.jsonl").display(),
    );
    let path = dir.join("agent.toml");
    std::fs::write(&path, config).unwrap();
    path
}

/// A plain HTTP/1.1 GET: `(status, body)`, or `None` when nothing answers.
fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    get_with(addr, path, "")
}

/// [`get`] with extra header lines (each ending in `\r\n`).
fn get_with(addr: SocketAddr, path: &str, headers: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let head = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Connection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// Polls `path` until `done` accepts the answer, or panics with the last answer at the
/// deadline.
fn poll(addr: SocketAddr, path: &str, done: impl Fn(u16, &str) -> bool) -> String {
    let start = Instant::now();
    loop {
        let answer = get(addr, path);
        if let Some((status, body)) = &answer
            && done(*status, body)
        {
            return body.clone();
        }
        assert!(start.elapsed() < DEADLINE, "{path} never got there; last answer {answer:?}");
        // A pause between attempts of a poll with a deadline, not a wait for a condition.
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The value of the sample named exactly `name` (labels included) in Prometheus text.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.rsplit_once(' ').filter(|(n, _)| *n == name).and_then(|(_, v)| v.parse().ok())
    })
}

#[test]
fn a_running_agent_serves_readiness_metrics_series_and_status() {
    let dir = tempfile::tempdir().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = write_config(dir.path(), &addr.to_string(), "");
    let _agent = Killed(
        edgewise()
            .args(["run", "--exit-after", "120s", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    assert_eq!(poll(addr, "/healthz", |s, _| s == 200), "ok\n");
    let ready = poll(addr, "/readyz", |s, _| s == 200);
    let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
    assert_eq!(ready["ready"], true, "{ready}");

    let metrics = poll(addr, "/metrics", |s, body| {
        s == 200 && sample(body, "edgewise_events_in_total").is_some_and(|n| n > 0.0)
    });
    for family in [
        "# TYPE edgewise_rejects counter",
        "# TYPE edgewise_journal_commits counter",
        "# TYPE edgewise_journal_durable_seq gauge",
        "# TYPE edgewise_processor_lag_entries gauge",
        "# TYPE edgewise_outbox_records gauge",
        "# TYPE edgewise_upstream_up gauge",
        "# TYPE edgewise_alerts_raised counter",
        "# TYPE edgewise_process_resident_memory_bytes gauge",
    ] {
        assert!(metrics.contains(family), "{family} missing from:\n{metrics}");
    }
    assert_eq!(sample(&metrics, r#"edgewise_source_connected{source="sim"}"#), Some(1.0));

    let series = poll(addr, "/api/v1/series", |s, body| {
        s == 200 && body.contains("pump-1/temperature") && body.contains("pump-2/temperature")
    });
    let series: serde_json::Value = serde_json::from_str(&series).unwrap();
    assert_eq!(series["series"].as_array().map(Vec::len), Some(2), "{series}");

    let alerts = poll(addr, "/api/v1/alerts", |s, _| s == 200);
    let alerts: serde_json::Value = serde_json::from_str(&alerts).unwrap();
    assert!(alerts["active"].is_array() && alerts["transitions"].is_array(), "{alerts}");
    assert_eq!(get(addr, "/nope").map(|(s, _)| s), Some(404));

    let out = edgewise().args(["status", "--api", &addr.to_string()]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("gw-api-test"), "{stdout}");
    assert!(stdout.contains("sim") && stdout.contains("simulated"), "{stdout}");
}

#[test]
fn status_says_when_no_agent_answers() {
    let addr = format!("127.0.0.1:{}", free_port());
    let out = edgewise().args(["status", "--api", &addr]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("no agent answering at {addr}")), "{stderr}");
}

#[test]
fn an_explicit_address_in_use_stops_the_start_naming_it_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let config = write_config(dir.path(), &addr, "");
    let out =
        edgewise().args(["run", "--exit-after", "30s", "--config"]).arg(&config).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("cannot listen on {addr}")), "{stderr}");
    assert!(stderr.contains("[api] listen"), "{stderr}");
}

#[test]
fn with_a_token_every_endpoint_but_healthz_needs_it() {
    let dir = tempfile::tempdir().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let token_file = dir.path().join("api-token");
    std::fs::write(&token_file, "t0ken-for-the-test\n").unwrap();
    let extra = format!("token_file = \"{}\"", token_file.display());
    let config = write_config(dir.path(), &addr.to_string(), &extra);
    let _agent = Killed(
        edgewise()
            .args(["run", "--exit-after", "120s", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    poll(addr, "/healthz", |s, _| s == 200);
    assert_eq!(get(addr, "/api/v1/status").map(|(s, _)| s), Some(401));
    let wrong = "Authorization: Bearer t0ken-for-the-tesT\r\n";
    assert_eq!(get_with(addr, "/metrics", wrong).map(|(s, _)| s), Some(401));
    let right = "Authorization: Bearer t0ken-for-the-test\r\n";
    let (status, body) = get_with(addr, "/api/v1/status", right).unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("gw-api-test"), "{body}");
    // `edgewise status --config` takes the address and the token from the file.
    let out = edgewise().args(["status", "--config"]).arg(&config).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("gw-api-test"), "{stdout}");
}
