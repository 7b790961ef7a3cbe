//! Harness for the end-to-end tests of edgewise: every piece is real and runs in its own
//! process or runtime, so tests exercise the agent exactly as a gateway would.
//!
//! - [`Mosquitto`]: a broker per test on a free port, with persistence (restartable).
//! - [`Receiver`]: an HTTP upstream that decodes and checks every batch, and can go down.
//! - [`Agent`]: the `edgewise` binary, killable with SIGKILL or stopped with SIGTERM.
//! - [`FirmwareSim`]: the `firmware-sim` binary writing device frames into a pseudo-terminal.
//! - [`Publisher`]: an MQTT client that publishes and waits for every PUBACK.
//! - [`AgentConfig`]: the agent's TOML, tuned for fast tests.
//! - [`expect`]: expected summaries computed from what a test published.
//! - [`wait`]: polling helpers; nothing sleeps for a guessed time.
//! - [`tls`]: a PKI made at test time and an HTTPS receiver with client certificates.
//! - [`api`]: `GET` on the agent's local API, its metrics and readiness checks.
//! - [`rig`]: a broker, a receiver and an agent wired together, a steady QoS 1 load, and the
//!   accounting of the fault suite (published, lost, duplicated; `FIGURES` lines).
//! - [`proxy`]: a TCP proxy that passes, refuses or cuts connections mid-packet.
//!
//! The harness is synchronous: each fixture owns its threads (and tokio runtime), so tests
//! are plain `#[test]` functions that the test runner runs in parallel. Every fixture cleans
//! up on drop and prints its logs when the test is failing.

pub mod agent;
pub mod api;
pub mod config;
pub mod device;
pub mod expect;
pub mod mosquitto;
pub mod proxy;
pub mod publisher;
pub mod receiver;
pub mod rig;
pub mod tls;
pub mod wait;

pub use agent::{Agent, edgewise_bin, workspace_bin};
pub use config::AgentConfig;
pub use device::{FirmwareSim, firmware_sim_bin, last_line_fields, link_exists};
pub use expect::{
    ExpectedAlert, ExpectedSummary, Reading, compare_alerts, compare_summaries, expected_summaries,
    expected_threshold_alerts, window_start,
};
pub use mosquitto::{Mosquitto, TlsListener};
pub use publisher::{Publisher, QoS};
pub use receiver::{Mode, Received, Receiver, decode_body};
pub use tls::{HttpsReceiver, Pki};
pub use wait::{Deadline, free_port, now_ms, port_open, wait_for, wait_until};
