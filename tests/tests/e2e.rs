//! End-to-end tests of edgewise: the real binary between a real Mosquitto and a real HTTP
//! receiver, one set of fixtures per test so that tests run in parallel.
//!
//! Build the binaries first: `cargo build -p edgewise -p firmware && cargo test -p edgewise-tests`.

#[path = "e2e/collect.rs"]
mod collect;
#[path = "e2e/device.rs"]
mod device;
#[path = "e2e/harness.rs"]
mod harness;
#[path = "e2e/outage.rs"]
mod outage;
#[path = "e2e/scenarios.rs"]
mod scenarios;
