//! The serial frame decoder: `decode_frame`, `Decoder::feed` and `Decoder::push`.
//!
//! Beyond "no panic": feeding byte by byte and pushing the slice give the same outcomes; a
//! block that decodes re-encodes to a frame that decodes to the same values; an error has a
//! non-empty message; and after any input, a 0x00 and one valid frame, that frame decodes
//! (the decoder resynchronises at every delimiter).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sensors::frame::{Decoder, Frame, FrameError, MAX_FRAME_SIZE, decode_frame, encode};
use sensors::reading::{ChannelReading, Unit};

/// The frame's fields with the readings' floats as bits (NaN is a valid reading value).
fn fields(f: &Frame) -> (u8, u32, u32, u32, Vec<(u8, Unit, u32, String)>) {
    let readings = f
        .readings
        .iter()
        .map(|r| (r.channel, r.unit, r.value.to_bits(), format!("{:?}", r.quality)))
        .collect();
    (f.version, f.device_id, f.seq, f.device_tick_ms, readings)
}

fn check(outcome: &Result<Frame, FrameError>) {
    match outcome {
        Ok(frame) => {
            let mut out = [0u8; MAX_FRAME_SIZE];
            let n = encode(frame, &mut out).expect("a decoded frame encodes");
            assert_eq!(out[n - 1], 0, "encoded frames end with the delimiter");
            let again = decode_frame(&out[..n - 1]).expect("a re-encoded frame decodes");
            assert_eq!(fields(&again), fields(frame));
        }
        Err(e) => assert!(!e.to_string().is_empty(), "empty message for {e:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    check(&decode_frame(data));

    let mut fed = Decoder::new();
    let by_byte: Vec<_> = data.iter().filter_map(|&b| fed.feed(b)).collect();
    let mut pushed = Decoder::new();
    let by_slice: Vec<_> = pushed.push(data).collect();
    assert_eq!(by_byte.len(), by_slice.len());
    for (a, b) in by_byte.iter().zip(&by_slice) {
        match (a, b) {
            (Ok(a), Ok(b)) => assert_eq!(fields(a), fields(b)),
            (Err(a), Err(b)) => assert_eq!(a, b),
            _ => panic!("feed and push disagree: {a:?} vs {b:?}"),
        }
        check(a);
    }

    // Resynchronisation: whatever came before, a delimiter and a valid frame decode it.
    let mut frame = Frame::new(7, 42, 1_000);
    frame.readings.push(ChannelReading::good(3, Unit::Celsius, 21.5)).unwrap();
    let mut wire = [0u8; MAX_FRAME_SIZE];
    let n = encode(&frame, &mut wire).unwrap();
    let mut tail = vec![0u8];
    tail.extend_from_slice(&wire[..n]);
    let last = pushed.push(&tail).last().expect("the valid frame yields an outcome");
    assert_eq!(fields(&last.expect("the valid frame after garbage decodes")), fields(&frame));
});
