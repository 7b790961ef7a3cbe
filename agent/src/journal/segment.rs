//! The journal's files: append-only segments of checksummed records.
//!
//! ```text
//! <data_dir>/journal/<first seq, 20 decimal digits>.seg
//!     record*    [body len u32 LE][crc32 of the body u32 LE][body]
//!     body       [first seq u64 BE][key count u32 BE][key count x KEY][chunk]
//!     KEY        [source u16 BE][pkid u16 BE][hash u64 BE]   (a dedup key, see the journal)
//!     chunk      [version u8 = 2][postcard(Vec<event::Entry>)]: entries first, first + 1, ...
//!                or nothing: a record of dedup keys only (written by the sled migration)
//! ```
//!
//! A segment is named by the seq its first record starts at, so the file names sort in seq
//! order. The writer appends whole records and syncs the file (`fdatasync`) at each group
//! commit; a power cut can therefore leave only the last segment with a torn or zeroed tail,
//! which the checksum finds and [`scan`] cuts off. Whole files are deleted when trimmed, so
//! the journal never rewrites a byte it wrote: on an SD card every journal byte is written
//! once, and nothing in memory grows with its history.

use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

/// The extension of a segment file.
pub(super) const EXTENSION: &str = "seg";

/// `[len][crc]` in front of every record body.
pub(super) const RECORD_HEADER_LEN: u64 = 8;

/// `[first][key count]` at the start of every body.
const BODY_HEADER_LEN: usize = 12;

/// One dedup key in a body.
const KEY_LEN: usize = 12;

/// A body longer than this is not believed (a garbage length): far above any record the
/// writer makes (a chunk is bounded by `CHUNK_MAX_BYTES`, the keys by the commit size),
/// far below what would hurt to allocate.
const MAX_BODY_LEN: u32 = 64 * 1024 * 1024;

/// The path of the segment whose first record starts at `first`.
pub(super) fn path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.{EXTENSION}"))
}

/// The segments in `dir`, by first seq. Other files are ignored.
pub(super) fn list(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut segments = Vec::new();
    for item in fs::read_dir(dir)? {
        let path = item?.path();
        if path.extension().and_then(|e| e.to_str()) != Some(EXTENSION) {
            continue;
        }
        let Some(first) = path.file_stem().and_then(|s| s.to_str()).and_then(|s| s.parse().ok())
        else {
            continue;
        };
        segments.push((first, path));
    }
    segments.sort_unstable_by_key(|(first, _)| *first);
    Ok(segments)
}

/// Appends one record to `out`.
pub(super) fn encode(out: &mut Vec<u8>, first: u64, keys: &[([u8; 4], u64)], chunk: &[u8]) {
    let body_len = BODY_HEADER_LEN + keys.len() * KEY_LEN + chunk.len();
    let start = out.len();
    out.reserve(RECORD_HEADER_LEN as usize + body_len);
    out.extend_from_slice(&u32::try_from(body_len).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&first.to_be_bytes());
    out.extend_from_slice(&u32::try_from(keys.len()).unwrap_or(u32::MAX).to_be_bytes());
    for (key, hash) in keys {
        out.extend_from_slice(key);
        out.extend_from_slice(&hash.to_be_bytes());
    }
    out.extend_from_slice(chunk);
    let crc = crc32fast::hash(&out[start + RECORD_HEADER_LEN as usize..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// One record's body, checked against its checksum.
#[derive(Debug)]
pub(super) struct Body {
    bytes: Vec<u8>,
}

impl Body {
    /// The seq of the chunk's first entry.
    pub(super) fn first(&self) -> u64 {
        u64::from_be_bytes(self.bytes[..8].try_into().unwrap_or_default())
    }

    fn key_count(&self) -> usize {
        u32::from_be_bytes(self.bytes[8..12].try_into().unwrap_or_default()) as usize
    }

    /// The dedup keys written with the chunk.
    pub(super) fn keys(&self) -> impl Iterator<Item = ([u8; 4], u64)> + '_ {
        self.bytes[BODY_HEADER_LEN..BODY_HEADER_LEN + self.key_count() * KEY_LEN]
            .chunks_exact(KEY_LEN)
            .map(|key| {
                let (key, hash) = key.split_at(4);
                (
                    key.try_into().unwrap_or_default(),
                    u64::from_be_bytes(hash.try_into().unwrap_or_default()),
                )
            })
    }

    /// The chunk (`[version][postcard(Vec<Entry>)]`); empty for a record of keys only.
    pub(super) fn chunk(&self) -> &[u8] {
        &self.bytes[BODY_HEADER_LEN + self.key_count() * KEY_LEN..]
    }
}

/// What [`next`] found at the reader's position.
#[derive(Debug)]
pub(super) enum Next {
    /// A whole record whose checksum matches; `len` bytes of the file, header included.
    Record { body: Body, len: u64 },
    /// The end of the readable part.
    End,
    /// Bytes that are not a record: a torn write, zeroes, or damage.
    Bad(String),
}

/// Reads the record at the reader's position; `remaining` bytes of the file may be read.
pub(super) fn next(reader: &mut impl Read, remaining: u64) -> io::Result<Next> {
    if remaining == 0 {
        return Ok(Next::End);
    }
    if remaining < RECORD_HEADER_LEN {
        return Ok(Next::Bad(format!("{remaining} bytes, shorter than a record header")));
    }
    let mut header = [0u8; RECORD_HEADER_LEN as usize];
    reader.read_exact(&mut header)?;
    let len = u32::from_le_bytes(header[..4].try_into().unwrap_or_default());
    let crc = u32::from_le_bytes(header[4..].try_into().unwrap_or_default());
    let total = RECORD_HEADER_LEN + u64::from(len);
    if (len as usize) < BODY_HEADER_LEN || len > MAX_BODY_LEN || total > remaining {
        return Ok(Next::Bad(format!("a record of {len} bytes where {remaining} remain")));
    }
    let mut bytes = vec![0u8; len as usize];
    reader.read_exact(&mut bytes)?;
    if crc32fast::hash(&bytes) != crc {
        return Ok(Next::Bad(format!("checksum mismatch in a record of {len} bytes")));
    }
    let body = Body { bytes };
    if BODY_HEADER_LEN + body.key_count().saturating_mul(KEY_LEN) > len as usize {
        return Ok(Next::Bad(format!("{} keys in a record of {len} bytes", body.key_count())));
    }
    Ok(Next::Record { body, len: total })
}

/// A segment file opened for reading its first `len` bytes.
pub(super) struct SegmentReader {
    reader: BufReader<File>,
    remaining: u64,
}

impl SegmentReader {
    /// `Ok(None)` when the file is gone (trimmed after it was listed).
    pub(super) fn open(path: &Path, len: u64) -> io::Result<Option<SegmentReader>> {
        match File::open(path) {
            Ok(file) => Ok(Some(SegmentReader { reader: BufReader::new(file), remaining: len })),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// The next record; after a `Bad` or `End` the rest is not read.
    pub(super) fn next(&mut self) -> io::Result<Next> {
        let found = next(&mut self.reader, self.remaining)?;
        match &found {
            Next::Record { len, .. } => self.remaining -= len,
            Next::End | Next::Bad(_) => self.remaining = 0,
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_back_with_its_keys_and_chunk() {
        let mut bytes = Vec::new();
        encode(&mut bytes, 42, &[([0, 1, 0, 7], 99)], b"\x02chunk");
        encode(&mut bytes, 43, &[], b"");
        let mut reader = bytes.as_slice();
        let Next::Record { body, len } = next(&mut reader, bytes.len() as u64).unwrap() else {
            panic!("a record")
        };
        assert_eq!((body.first(), body.chunk()), (42, &b"\x02chunk"[..]));
        assert_eq!(body.keys().collect::<Vec<_>>(), vec![([0, 1, 0, 7], 99)]);
        assert_eq!(len, 8 + 12 + 12 + 6);
        let remaining = bytes.len() as u64 - len;
        let Next::Record { body, .. } = next(&mut reader, remaining).unwrap() else {
            panic!("a record")
        };
        assert_eq!((body.first(), body.keys().count(), body.chunk().len()), (43, 0, 0));
        assert!(matches!(next(&mut reader, 0).unwrap(), Next::End));
    }

    #[test]
    fn a_torn_or_damaged_record_is_bad_not_a_panic() {
        let mut bytes = Vec::new();
        encode(&mut bytes, 1, &[], b"\x02payload");
        for cut in 1..bytes.len() {
            let found = next(&mut &bytes[..cut], cut as u64).unwrap();
            assert!(matches!(found, Next::Bad(_)), "cut at {cut}: {found:?}");
        }
        for flip in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[flip] ^= 0x40;
            let found = next(&mut damaged.as_slice(), damaged.len() as u64).unwrap();
            assert!(matches!(found, Next::Bad(_)), "bit flipped in byte {flip}: {found:?}");
        }
        let zeroes = [0u8; 64];
        assert!(matches!(next(&mut &zeroes[..], 64).unwrap(), Next::Bad(_)));
    }
}
