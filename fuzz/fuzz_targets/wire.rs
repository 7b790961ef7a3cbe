//! The upstream batch decoders: `sensors::wire::decode_sniffed` and `sensors::wire::decode`
//! (every content type and encoding), with decompression bounds.
//!
//! Beyond "no panic": a rejection has a non-empty message; an accepted batch passes
//! `verify`, and re-encoding it is stable (compact: the bytes of a second round equal those of
//! the first, which holds with NaN values too; JSON: the batch decodes back equal).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sensors::record::{BATCH_FORMAT_VERSION, Batch};
use sensors::wire::{self, Compression, Format, WireError};

fn check(outcome: Result<Batch, WireError>, from: Format) {
    let batch = match outcome {
        Ok(batch) => batch,
        Err(e) => {
            assert!(!e.to_string().is_empty(), "empty message for {e:?}");
            return;
        }
    };
    assert!(wire::verify(&batch).is_ok(), "decode returned an unverified batch");
    if batch.version == BATCH_FORMAT_VERSION {
        let first = wire::encode(&batch, Format::Postcard, Compression::None).unwrap();
        let again = wire::decode(&first, Format::Postcard.content_type(), None)
            .expect("a re-encoded compact batch decodes");
        let second = wire::encode(&again, Format::Postcard, Compression::None).unwrap();
        assert_eq!(first, second, "compact re-encoding is not stable");
    }
    if from == Format::Json {
        let json = wire::encode(&batch, Format::Json, Compression::None).unwrap();
        let again = wire::decode(&json, Format::Json.content_type(), None)
            .expect("a re-encoded JSON batch decodes");
        assert_eq!(again, batch);
    }
}

fuzz_target!(|data: &[u8]| {
    match wire::decode_sniffed(data) {
        Ok((batch, format, _)) => check(Ok(batch), format),
        Err(e) => check(Err(e), Format::Postcard),
    }
    for format in Format::ALL {
        for encoding in [None, Some("zstd"), Some("gzip")] {
            check(wire::decode(data, format.content_type(), encoding), format);
        }
    }
});
