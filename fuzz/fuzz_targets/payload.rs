//! MQTT payload decoder (`edgewise::source::payload::decode`) and its RFC 3339 parser.
//!
//! The first byte picks the payload configuration (format, value and timestamp paths,
//! timestamp unit); the rest is the payload. Beyond "no panic": a rejection has a non-empty
//! message and cause, an accepted value is finite and an accepted timestamp lies in
//! 1970..=9999.
#![no_main]

use edgewise::config::{PayloadConfig, PayloadFormat, TimestampUnit};
use edgewise::source::payload::{decode, parse_rfc3339_ms};
use libfuzzer_sys::fuzz_target;

/// 9999-12-31T23:59:59.999Z in ms, the decoder's documented upper bound.
const MAX_TS_MS: i64 = 253_402_300_799_999;

fn config(selector: u8) -> PayloadConfig {
    let format = if selector & 1 == 0 { PayloadFormat::Json } else { PayloadFormat::Number };
    let timestamp_unit = match (selector >> 1) % 3 {
        0 => TimestampUnit::Auto,
        1 => TimestampUnit::Ms,
        _ => TimestampUnit::S,
    };
    let (value, timestamp) = match (selector >> 3) % 4 {
        0 => ("value", "ts"),
        1 => ("data.readings.1.v", "meta.time"),
        2 => ("", "ts"),
        _ => ("0", "1.t"),
    };
    PayloadConfig { format, value: value.into(), timestamp: timestamp.into(), timestamp_unit }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, payload)) = data.split_first() else { return };
    let cfg = config(selector);
    match decode(&cfg, payload) {
        Ok(decoded) => {
            assert!(decoded.value.is_finite(), "accepted a non-finite value: {decoded:?}");
            if let Some(ts) = decoded.ts_ms {
                assert!((0..=MAX_TS_MS).contains(&ts), "accepted ts {ts} out of range");
            }
        }
        Err(e) => {
            assert!(!e.to_string().is_empty(), "empty message for {e:?}");
            assert!(!e.cause().is_empty(), "empty cause for {e:?}");
        }
    }
    if let Ok(text) = std::str::from_utf8(payload) {
        match parse_rfc3339_ms(text) {
            Ok(ms) => assert!((0..=MAX_TS_MS).contains(&ms), "{text:?} gave {ms}"),
            Err(reason) => assert!(!reason.is_empty(), "empty reason for {text:?}"),
        }
    }
});
