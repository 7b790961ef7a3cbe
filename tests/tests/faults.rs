//! The fault suite (issue 7): the real agent under crash loops, broker faults, upstream faults
//! and a full disk, each test counting what was published, what arrived, what was lost and
//! what was duplicated, and printing one `FIGURES` line that RELIABILITY.md quotes.
//!
//! `EDGEWISE_FAULT_SCALE` (default 1) multiplies runs and load for a manual soak.
//! Build the binaries first: `cargo build -p edgewise && cargo test -p edgewise-tests --test faults`.

#[path = "faults/broker.rs"]
mod broker;
#[path = "faults/crash.rs"]
mod crash;
#[path = "faults/disk.rs"]
mod disk;
#[path = "faults/soak.rs"]
mod soak;
#[path = "faults/upstream.rs"]
mod upstream;
