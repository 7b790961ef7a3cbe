//! The agent's local HTTP API, read the way a technician's tools read it: plain HTTP/1.1 over
//! a std TCP stream, so that a test needs no client of its own.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// The status code and body of `GET <path>` on the agent's API at 127.0.0.1:`port`, or
/// `None` while nothing answers.
pub fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((status, body))
}

/// The sum of the samples of metric `name` (all label sets) in the agent's `/metrics`, or
/// `None` while the API does not answer or has no such metric.
pub fn metric(port: u16, name: &str) -> Option<f64> {
    let (status, text) = get(port, "/metrics")?;
    if status != 200 {
        return None;
    }
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((key, value)) = line.rsplit_once(' ') else { continue };
        let bare = key.split('{').next().unwrap_or(key);
        if bare == name {
            *found.get_or_insert(0.0) += value.parse::<f64>().ok()?;
        }
    }
    found
}

/// The `/readyz` check named `name`: (HTTP status, whether it passed, its reason).
pub fn readiness(port: u16, name: &str) -> Option<(u16, bool, String)> {
    let (status, body) = get(port, "/readyz")?;
    let json: serde_json::Value = serde_json::from_str(body.trim()).ok()?;
    let check = json["checks"].as_array()?.iter().find(|c| c["name"] == name)?;
    Some((status, check["ok"].as_bool()?, check["reason"].as_str()?.to_string()))
}
