//! The configuration parser: `edgewise::config::load_str_for` (TOML text to a validated
//! `Config`, every problem with file:line:col).
//!
//! `Purpose::Offline`: the `Run` checks also read secret files and environment variables
//! named in the text, which a fuzzer must not do. Beyond "no panic": a rejection lists at
//! least one problem, each with a message and a 1-based position; an accepted config's
//! warnings locate without panicking.
#![no_main]

use edgewise::config::{Purpose, load_str_for, locate};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match load_str_for("fuzz.toml", &text, Purpose::Offline) {
        Ok(config) => {
            let warnings = locate("fuzz.toml", &text, config.warnings());
            for w in &warnings {
                assert!(!w.message.is_empty(), "empty warning: {w:?}");
            }
        }
        Err(errors) => {
            assert!(!errors.problems.is_empty(), "an error without problems");
            for p in &errors.problems {
                assert!(!p.message.is_empty(), "empty message: {p:?}");
                assert!(p.line >= 1 && p.column >= 1, "unlocated problem: {p:?}");
            }
            assert!(!errors.to_string().is_empty());
        }
    }
});
