//! The journal's on-disk format: segment headers and entry frames.
//!
//! ```text
//! segment = header(64 bytes) entry*
//! header  = magic "MIRRORDB" | format u32 | header_len u32 (=64) | database id [16]
//!         | epoch u64 | first_lsn u64 | created_us u64 | reserved u32 | crc32c u32
//!           (crc over bytes 0..60)
//! entry   = len u32 | crc32c u32 | lsn u64 | epoch u64 | time_us u64 | payload[len]
//!           (crc over lsn..payload, i.e. bytes 8..32+len of the frame)
//! ```
//!
//! All integers are little-endian. The payload is a postcard-encoded
//! [`Op`](crate::model::Op). Replication ships whole frames byte for byte, so
//! a mirror's journal is identical to its primary's. Decoding never panics on
//! any input; it returns [`FrameError`].

use crate::model::Op;
use thiserror::Error;

/// Magic bytes at the start of every segment.
pub const SEGMENT_MAGIC: [u8; 8] = *b"MIRRORDB";
/// Version of the segment and frame layout.
pub const FORMAT_VERSION: u32 = 1;
/// Length of a segment header.
pub const HEADER_LEN: usize = 64;
/// Length of an entry frame's fixed part, before the payload.
pub const FRAME_HEADER_LEN: usize = 32;
/// Largest payload of one entry: a maximal record value plus its names.
pub const MAX_PAYLOAD_BYTES: usize = crate::model::MAX_VALUE_BYTES + 64 * 1024;

/// The header that opens every journal segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    pub db_id: [u8; 16],
    pub epoch: u64,
    pub first_lsn: u64,
    pub created_us: u64,
}

/// The fixed part of an entry frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub len: u32,
    pub crc: u32,
    pub lsn: u64,
    pub epoch: u64,
    pub time_us: u64,
}

/// Why bytes could not be decoded as a header or a frame.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    #[error("need {need} bytes, have {have}")]
    Short { need: usize, have: usize },
    #[error("bad magic: not a mirrordb journal segment")]
    BadMagic,
    #[error("unsupported journal format version {0}")]
    Version(u32),
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Crc { stored: u32, computed: u32 },
    #[error("entry length {0} exceeds the limit of {MAX_PAYLOAD_BYTES} bytes")]
    TooLong(u32),
    #[error("payload does not decode as an operation: {0}")]
    Payload(String),
}

impl SegmentHeader {
    /// Encodes the header into its 64 bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&SEGMENT_MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        b[16..32].copy_from_slice(&self.db_id);
        b[32..40].copy_from_slice(&self.epoch.to_le_bytes());
        b[40..48].copy_from_slice(&self.first_lsn.to_le_bytes());
        b[48..56].copy_from_slice(&self.created_us.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and checks a header.
    pub fn decode(b: &[u8]) -> Result<SegmentHeader, FrameError> {
        if b.len() < HEADER_LEN {
            return Err(FrameError::Short {
                need: HEADER_LEN,
                have: b.len(),
            });
        }
        if b[0..8] != SEGMENT_MAGIC {
            return Err(FrameError::BadMagic);
        }
        let version = u32_at(b, 8);
        if version != FORMAT_VERSION {
            return Err(FrameError::Version(version));
        }
        let stored = u32_at(b, 60);
        let computed = crc32c::crc32c(&b[0..60]);
        if stored != computed {
            return Err(FrameError::Crc { stored, computed });
        }
        let mut db_id = [0u8; 16];
        db_id.copy_from_slice(&b[16..32]);
        Ok(SegmentHeader {
            db_id,
            epoch: u64_at(b, 32),
            first_lsn: u64_at(b, 40),
            created_us: u64_at(b, 48),
        })
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Appends one encoded entry frame to `out`. Returns the frame's length.
pub fn encode_frame(
    out: &mut Vec<u8>,
    lsn: u64,
    epoch: u64,
    time_us: u64,
    payload: &[u8],
) -> usize {
    assert!(
        payload.len() <= MAX_PAYLOAD_BYTES,
        "caller validates sizes before journaling"
    );
    let start = out.len();
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&lsn.to_le_bytes());
    out.extend_from_slice(&epoch.to_le_bytes());
    out.extend_from_slice(&time_us.to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32c::crc32c(&out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    out.len() - start
}

/// Encodes an operation as an entry payload.
pub fn encode_op(op: &Op) -> Vec<u8> {
    postcard::to_stdvec(op).expect("encoding an in-memory Op into a Vec cannot fail")
}

/// Decodes an entry payload into an operation.
pub fn decode_op(payload: &[u8]) -> Result<Op, FrameError> {
    postcard::from_bytes(payload).map_err(|e| FrameError::Payload(e.to_string()))
}

/// Whether `b` starts with an all-zero frame header: the end of a segment's
/// entries, where zeroed blocks wait for the writer
/// ([`crate::journal::prealloc`]). No real frame starts so: its checksum
/// covers a non-zero LSN.
pub fn is_zero_header(b: &[u8]) -> bool {
    b.len() >= FRAME_HEADER_LEN && b[..FRAME_HEADER_LEN].iter().all(|x| *x == 0)
}

/// Reads the fixed part of a frame (no checksum check yet).
pub fn decode_frame_header(b: &[u8]) -> Result<FrameHeader, FrameError> {
    if b.len() < FRAME_HEADER_LEN {
        return Err(FrameError::Short {
            need: FRAME_HEADER_LEN,
            have: b.len(),
        });
    }
    let len = u32_at(b, 0);
    if len as usize > MAX_PAYLOAD_BYTES {
        return Err(FrameError::TooLong(len));
    }
    Ok(FrameHeader {
        len,
        crc: u32_at(b, 4),
        lsn: u64_at(b, 8),
        epoch: u64_at(b, 16),
        time_us: u64_at(b, 24),
    })
}

/// A decoded, checksum-verified frame borrowing its payload.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub header: FrameHeader,
    pub payload: &'a [u8],
}

impl Frame<'_> {
    /// Total length of the frame on disk.
    pub fn frame_len(&self) -> usize {
        FRAME_HEADER_LEN + self.payload.len()
    }
}

/// Decodes and verifies the frame at the start of `b`.
pub fn decode_frame(b: &[u8]) -> Result<Frame<'_>, FrameError> {
    let header = decode_frame_header(b)?;
    let total = FRAME_HEADER_LEN + header.len as usize;
    if b.len() < total {
        return Err(FrameError::Short {
            need: total,
            have: b.len(),
        });
    }
    let computed = crc32c::crc32c(&b[8..total]);
    if computed != header.crc {
        return Err(FrameError::Crc {
            stored: header.crc,
            computed,
        });
    }
    Ok(Frame {
        header,
        payload: &b[FRAME_HEADER_LEN..total],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SessionId;
    use proptest::prelude::*;

    #[test]
    fn header_round_trips_and_detects_damage() {
        let h = SegmentHeader {
            db_id: [7; 16],
            epoch: 3,
            first_lsn: 1001,
            created_us: 42,
        };
        let mut b = h.encode();
        assert_eq!(SegmentHeader::decode(&b), Ok(h));
        b[40] ^= 1;
        assert!(matches!(
            SegmentHeader::decode(&b),
            Err(FrameError::Crc { .. })
        ));
        assert_eq!(
            SegmentHeader::decode(b"MIRROR"),
            Err(FrameError::Short { need: 64, have: 6 })
        );
        let mut other = h.encode();
        other[0] = b'X';
        assert_eq!(SegmentHeader::decode(&other), Err(FrameError::BadMagic));
    }

    #[test]
    fn frame_round_trips_with_op() {
        let op = Op::Put {
            session: SessionId(1),
            table: "t".into(),
            key: "k".into(),
            value: br#"{"v":1}"#.to_vec(),
        };
        let mut buf = Vec::new();
        let n = encode_frame(&mut buf, 5, 2, 99, &encode_op(&op));
        assert_eq!(n, buf.len());
        let f = decode_frame(&buf).expect("valid frame");
        assert_eq!(f.header.lsn, 5);
        assert_eq!(f.header.epoch, 2);
        assert_eq!(f.header.time_us, 99);
        assert_eq!(decode_op(f.payload), Ok(op));
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let mut buf = Vec::new();
        encode_frame(&mut buf, 1, 1, 1, b"payload");
        for i in 4..buf.len() {
            for bit in 0..8 {
                let mut b = buf.clone();
                b[i] ^= 1 << bit;
                assert!(
                    decode_frame(&b).is_err(),
                    "flip at byte {i} bit {bit} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn truncated_frame_is_short() {
        let mut buf = Vec::new();
        encode_frame(&mut buf, 1, 1, 1, b"payload");
        for cut in 0..buf.len() {
            assert!(matches!(
                decode_frame(&buf[..cut]),
                Err(FrameError::Short { .. })
            ));
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = SegmentHeader::decode(&bytes);
            if let Ok(f) = decode_frame(&bytes) {
                let _ = decode_op(f.payload);
            }
            let _ = decode_op(&bytes);
        }

        #[test]
        fn arbitrary_payload_frames_round_trip(
            lsn in any::<u64>(), epoch in any::<u64>(), t in any::<u64>(),
            payload in proptest::collection::vec(any::<u8>(), 0..2048),
        ) {
            let mut buf = Vec::new();
            encode_frame(&mut buf, lsn, epoch, t, &payload);
            let f = decode_frame(&buf).expect("own frame decodes");
            prop_assert_eq!(f.header.lsn, lsn);
            prop_assert_eq!(f.payload, &payload[..]);
        }
    }
}
