//! The technician's page in a real headless browser: Debian's chromium driven by chromedriver
//! over the W3C WebDriver protocol (plain HTTP + JSON, spoken here without a client crate).
//! The agent runs with the simulated source and a rule that fires; the test waits for live
//! values, the alert, the rule's state and one series' history on the page, checks that a
//! phone-wide window does not scroll sideways, and saves screenshots (desktop and phone) to
//! `target/tmp/page-desktop.png` and `target/tmp/page-phone.png`.
//!
//! Needs `chromium` and `chromedriver` (`apt-get install chromium chromium-driver`;
//! `scripts/test.sh` installs them when missing).

mod common;
use common::{Killed, free_port};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

/// How long the page may take to show what a test waits for.
const DEADLINE: Duration = Duration::from_secs(60);

/// Finds a program on the usual paths, or fails with the install hint.
fn program(names: &[&str]) -> PathBuf {
    for name in names {
        for dir in ["/usr/bin", "/usr/local/bin", "/usr/lib/chromium"] {
            let path = Path::new(dir).join(name);
            if path.is_file() {
                return path;
            }
        }
    }
    panic!(
        "{names:?} not found: install Debian's chromium and chromium-driver \
         (`apt-get install chromium chromium-driver`; scripts/test.sh does this)"
    );
}

/// One HTTP/1.1 request with an optional JSON body; returns the status and the parsed body.
fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let body = body.map(Value::to_string).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body.as_bytes()).unwrap();
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line).unwrap();
    let status = status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status");
    let mut length = None;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse::<usize>().ok();
        }
    }
    let mut bytes = Vec::new();
    match length {
        Some(n) => {
            bytes.resize(n, 0);
            reader.read_exact(&mut bytes).unwrap();
        }
        None => {
            reader.read_to_end(&mut bytes).unwrap();
        }
    }
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// A chromedriver process and one headless chromium session.
struct Browser {
    addr: SocketAddr,
    session: String,
    _driver: Killed,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Browser {
        let driver = program(&["chromedriver"]);
        let chromium = program(&["chromium", "chromium-browser"]);
        let port = free_port();
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let driver = Killed(child);
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + DEADLINE;
        while TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not listen on {addr}");
            std::thread::sleep(Duration::from_millis(50));
        }
        let profile = tempfile::tempdir().unwrap();
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,1000",
                         format!("--user-data-dir={}", profile.path().display())],
            },
        }}});
        let (status, answer) = http(addr, "POST", "/session", Some(&capabilities));
        assert_eq!(status, 200, "new session: {answer}");
        let session = answer["value"]["sessionId"].as_str().expect("session id").to_string();
        Browser { addr, session, _driver: driver, _profile: profile }
    }

    fn command(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{path}", self.session);
        let (status, answer) = http(self.addr, method, &path, body.as_ref());
        assert_eq!(status, 200, "{method} {path}: {answer}");
        answer["value"].clone()
    }

    fn open(&self, url: &str) {
        self.command("POST", "/url", Some(json!({ "url": url })));
    }

    /// Runs `script` (a function body; `return` gives the result) in the page.
    fn eval(&self, script: &str) -> Value {
        self.command("POST", "/execute/sync", Some(json!({ "script": script, "args": [] })))
    }

    /// Evaluates `script` until it returns `true`, or panics naming `what` and the page's
    /// banner and update count.
    fn wait_for(&self, what: &str, script: &str) {
        let deadline = Instant::now() + DEADLINE;
        while self.eval(script) != Value::Bool(true) {
            if Instant::now() > deadline {
                let state = self.eval(
                    "return {updates: document.body.dataset.updates, \
                     banner: (document.getElementById('banner') || {}).textContent}",
                );
                panic!("timed out waiting for {what}; page state: {state}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn resize(&self, width: u32, height: u32) {
        self.command("POST", "/window/rect", Some(json!({ "width": width, "height": height })));
    }

    /// Saves a PNG screenshot of the viewport.
    fn screenshot(&self, path: &Path) {
        let encoded = self.command("GET", "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(encoded.as_str().expect("base64 string"))
            .expect("valid base64");
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        std::fs::write(path, png).unwrap();
        eprintln!("screenshot: {}", path.display());
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let path = format!("/session/{}", self.session);
        let _ = std::panic::catch_unwind(|| http(self.addr, "DELETE", &path, None));
    }
}

/// Starts the agent with two simulated pumps and a rule that fires on every temperature.
fn start_agent(dir: &Path) -> (Killed, SocketAddr) {
    let port = free_port();
    let config = format!(
        r#"[agent]
id = "gw-page-test"
data_dir = "{data}"
status_interval = "0s"

[[sources]]
kind = "simulated"
name = "sim"
devices = 2
metrics = ["temperature", "vibration"]
interval = "100ms"

[[rules]]
name = "hot"
kind = "threshold"
series = "+/temperature"
above = -100.0
severity = "critical"

[upstream]
kind = "file"
path = "{out}"

[api]
listen = "127.0.0.1:{port}"
"#,
        data = dir.join("data").display(),
        out = dir.join("upstream.jsonl").display(),
    );
    let path = dir.join("agent.toml");
    std::fs::write(&path, config).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_edgewise"))
        .args(["run", "--config"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the agent");
    (Killed(child), format!("127.0.0.1:{port}").parse().unwrap())
}

#[test]
fn the_page_shows_live_values_alerts_rules_and_history_on_desktop_and_phone() {
    let dir = tempfile::tempdir().unwrap();
    let (_agent, api) = start_agent(dir.path());
    let deadline = Instant::now() + DEADLINE;
    while TcpStream::connect(api).is_err() {
        assert!(Instant::now() < deadline, "the agent's API did not listen on {api}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let browser = Browser::start();
    browser.open(&format!("http://{api}/"));

    // Live values: every series of both pumps, each with a value and a drawn sparkline.
    browser.wait_for(
        "four series with values and sparklines",
        "var rows = document.querySelectorAll('#series tr[data-series]'); \
         return rows.length === 4 && Array.from(rows).every(function (r) { \
           return r.querySelector('.value').textContent.trim() !== '' && \
                  r.querySelector('svg.spark polyline') !== null; })",
    );
    let names = browser.eval(
        "return Array.from(document.querySelectorAll('#series tr[data-series]'))\
         .map(function (r) { return r.dataset.series; }).sort()",
    );
    assert_eq!(
        names,
        json!(["pump-1/temperature", "pump-1/vibration", "pump-2/temperature", "pump-2/vibration"])
    );
    // The values move: the page keeps polling and redraws what changed.
    let first = browser.eval(
        "return [document.body.dataset.updates, \
         document.querySelector('#series tr[data-series=\"pump-1/vibration\"] .value').textContent]",
    );
    browser.wait_for(
        "a new value for pump-1/vibration after more updates",
        &format!(
            "return +document.body.dataset.updates > {} && document.querySelector(\
             '#series tr[data-series=\"pump-1/vibration\"] .value').textContent !== {}",
            first[0].as_str().unwrap(),
            first[1]
        ),
    );

    // The alert, on top, for both pumps; the rule shows as firing.
    browser.wait_for(
        "the `hot` alert of both pumps",
        "return document.querySelectorAll('#alerts .alert[data-rule=\"hot\"]').length === 2",
    );
    let alerts = browser.eval(
        "return Array.from(document.querySelectorAll('#alerts .alert'))\
         .map(function (a) { return a.dataset.series; }).sort()",
    );
    assert_eq!(alerts, json!(["pump-1/temperature", "pump-2/temperature"]));
    browser.wait_for(
        "the rule `hot` listed as firing (2)",
        "var r = document.querySelector('#rules [data-rule=\"hot\"]'); \
         return r !== null && r.textContent.indexOf('firing (2)') >= 0",
    );
    browser.wait_for(
        "the readiness pill saying ready",
        "return document.getElementById('ready').dataset.ready === 'true'",
    );
    let uplink = browser.eval("return document.getElementById('uplink').textContent");
    assert!(uplink.as_str().unwrap().contains("file"), "uplink card: {uplink}");

    // One series' history from the journal, drawn after a click on its row.
    browser.eval(
        "document.querySelector('#series tr[data-series=\"pump-2/temperature\"]').click(); \
         return true",
    );
    browser.wait_for(
        "the history chart of pump-2/temperature",
        "return document.getElementById('charttitle').textContent === 'pump-2/temperature' && \
         document.querySelector('#chart polyline') !== null && \
         /^[1-9][0-9]* points/.test(document.getElementById('chartinfo').textContent)",
    );

    let artifacts = Path::new(env!("CARGO_TARGET_TMPDIR"));
    browser.screenshot(&artifacts.join("page-desktop.png"));

    // A phone: the page fits the width (no sideways scrolling of the page itself).
    browser.resize(390, 1400);
    browser.wait_for(
        "the page to fit a 390 px wide window",
        "return window.innerWidth <= 400 && \
         document.documentElement.scrollWidth <= window.innerWidth + 1",
    );
    browser.screenshot(&artifacts.join("page-phone.png"));
}
