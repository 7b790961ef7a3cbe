//! The recording reader of `edgewise replay` (`RecordingReader` over in-memory text, both
//! formats, with and without a default series) and its line and time parsers.
//!
//! Beyond "no panic": a bad line has a reason and a line number, a reading has a series, a
//! finite value and a timestamp in 1970..=9999, and line numbers increase.
#![no_main]

use std::io::Cursor;
use std::path::Path;

use edgewise::config::TimestampUnit;
use edgewise::recording::{
    Format, Line, RecordingReader, parse_json_line, parse_time, parse_timestamp,
};
use libfuzzer_sys::fuzz_target;

/// 9999-12-31T23:59:59.999Z in ms, the documented upper bound.
const MAX_TS_MS: i64 = 253_402_300_799_999;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else { return };
    let format = if selector & 1 == 0 { Format::Csv } else { Format::JsonLines };
    let series = (selector & 2 != 0).then(|| "fuzz/series".to_string());
    let mut reader = RecordingReader::new(Cursor::new(body), Path::new("fuzz.rec"), format, series);
    let mut last_line = 0;
    loop {
        match reader.next_line() {
            Ok(None) => break,
            Ok(Some(Line::Reading(r))) => {
                assert!(r.line > last_line, "line numbers go back: {} after {last_line}", r.line);
                last_line = r.line;
                assert!(!r.series.is_empty(), "reading without a series: {r:?}");
                assert!(r.value.is_finite(), "non-finite reading: {r:?}");
                assert!((0..=MAX_TS_MS).contains(&r.ts_ms), "ts out of range: {r:?}");
            }
            Ok(Some(Line::Bad(bad))) => {
                assert!(
                    bad.line > last_line,
                    "line numbers go back: {} after {last_line}",
                    bad.line
                );
                last_line = bad.line;
                assert!(!bad.reason.is_empty(), "bad line without a reason: {bad:?}");
            }
            Err(e) => {
                assert!(!e.to_string().is_empty(), "empty message for {e:?}");
                break;
            }
        }
    }
    assert!(reader.bytes_read() <= body.len() as u64);

    if let Ok(text) = std::str::from_utf8(body) {
        match parse_json_line(text, None, None) {
            Ok((ts, series, value)) => {
                assert!((0..=MAX_TS_MS).contains(&ts) && !series.is_empty() && value.is_finite());
            }
            Err(e) => assert!(!e.cause.is_empty() && !e.reason.is_empty(), "{e:?}"),
        }
        let _ = parse_json_line(text, Some("s"), Some(0));
        for unit in [TimestampUnit::Auto, TimestampUnit::Ms, TimestampUnit::S] {
            match parse_timestamp(text, unit) {
                Ok(ts) => assert!((0..=MAX_TS_MS).contains(&ts), "{text:?} gave {ts}"),
                Err(reason) => assert!(!reason.is_empty()),
            }
        }
        if let Err(e) = parse_time(text, 1_700_000_000_000) {
            assert!(!e.to_string().is_empty());
        }
    }
});
