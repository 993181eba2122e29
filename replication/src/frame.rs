//! Wire frames of the journal-shipping protocol.
//!
//! Every message on a replication stream is one frame:
//!
//! ```text
//! frame = len u32 LE | version u8 | body[len - 1]
//!         (len counts the version byte and the body; 1 <= len <= MAX_FRAME_BYTES)
//! body  = postcard encoding of `Message`
//! ```
//!
//! The version byte comes first so a peer speaking another wire version gets
//! a clear [`FrameError::UnsupportedVersion`] instead of a garbled decode.
//! postcard is not self-describing: adding, removing or reordering a
//! variant or a field changes the encoding, so any such change must bump
//! [`WIRE_VERSION`].
//! Decoding never panics on any input: arbitrary bytes give a [`FrameError`]
//! (a proptest below feeds it random bytes). After postcard decoding, every
//! message is checked against the limits in this module
//! ([`Message::validate`]), so the rest of the crate can rely on them.
//!
//! Journal entries travel as [`FramedEntry`]: the journal's own on-disk frame
//! (`len | crc32c | lsn | epoch | time_us | payload`), byte for byte, tagged
//! with its `(lsn, epoch)`. This crate never decodes the payload; it only
//! checks that the frame's fixed header agrees with the tags and that its
//! checksum holds ([`FramedEntry::verify`]).

use crate::types::{Epoch, Lsn, NodeId};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Wire version written in every frame's version byte.
pub const WIRE_VERSION: u8 = 1;
/// Length of the frame length prefix.
pub const LEN_PREFIX_BYTES: usize = 4;
/// Largest journal entry frame (header + payload) accepted: a maximal record
/// value (16 MiB) plus names and the 32-byte header, with room to spare.
pub const MAX_ENTRY_BYTES: usize = 17 * 1024 * 1024;
/// Largest number of entries in one `Entries` batch.
pub const MAX_BATCH_ENTRIES: usize = 4096;
/// Largest snapshot chunk in one `SnapshotChunk` frame.
pub const MAX_SNAPSHOT_CHUNK_BYTES: usize = 1024 * 1024;
/// Largest value of a frame's length prefix. One maximal entry must fit in a
/// batch of its own, so this is the entry limit plus room for the envelope.
pub const MAX_FRAME_BYTES: usize = MAX_ENTRY_BYTES + 64 * 1024;
/// Longest node id on the wire (also the limit for names in certificates).
pub const MAX_NODE_ID_BYTES: usize = 255;
/// Longest human-readable reason in a `Refused` message.
pub const MAX_REASON_BYTES: usize = 1024;

/// Length of the fixed header of a journal entry frame.
pub const JOURNAL_FRAME_HEADER_BYTES: usize = 32;

/// One journal entry as it is on disk, tagged with its position.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FramedEntry {
    /// Position of the entry.
    pub lsn: Lsn,
    /// Epoch of the primary that wrote the entry.
    pub epoch: Epoch,
    /// The whole journal frame, `len | crc32c | lsn | epoch | time_us | payload`.
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
}

impl std::fmt::Debug for FramedEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FramedEntry")
            .field("lsn", &self.lsn)
            .field("epoch", &self.epoch)
            .field("bytes_len", &self.bytes.len())
            .finish()
    }
}

impl FramedEntry {
    /// What a frame costs on the wire beyond its bytes (its message framing).
    pub const WIRE_OVERHEAD: usize = 20;

    /// Builds an entry by encoding a journal frame around `payload`. The node
    /// has its own encoder; this one serves tests and the in-memory fakes.
    pub fn encode(lsn: Lsn, epoch: Epoch, time_us: u64, payload: &[u8]) -> FramedEntry {
        let mut bytes = Vec::with_capacity(JOURNAL_FRAME_HEADER_BYTES + payload.len());
        let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        bytes.extend_from_slice(&len.to_le_bytes());
        bytes.extend_from_slice(&[0u8; 4]);
        bytes.extend_from_slice(&lsn.0.to_le_bytes());
        bytes.extend_from_slice(&epoch.0.to_le_bytes());
        bytes.extend_from_slice(&time_us.to_le_bytes());
        bytes.extend_from_slice(payload);
        let crc = crc32c::crc32c(&bytes[8..]);
        bytes[4..8].copy_from_slice(&crc.to_le_bytes());
        FramedEntry { lsn, epoch, bytes }
    }

    /// Size counted against batch and in-flight limits.
    pub fn wire_len(&self) -> usize {
        self.bytes.len() + Self::WIRE_OVERHEAD
    }

    /// Checks the journal frame's fixed header against the tags and its
    /// checksum, without looking inside the payload.
    pub fn verify(&self) -> Result<(), EntryError> {
        let b = &self.bytes;
        if b.len() > MAX_ENTRY_BYTES {
            return Err(EntryError::TooLarge(b.len()));
        }
        if b.len() < JOURNAL_FRAME_HEADER_BYTES {
            return Err(EntryError::Short(b.len()));
        }
        let u32_at = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let u64_at = |at: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(a)
        };
        let len = u32_at(0) as usize;
        if JOURNAL_FRAME_HEADER_BYTES + len != b.len() {
            return Err(EntryError::Length {
                declared: len,
                actual: b.len() - JOURNAL_FRAME_HEADER_BYTES,
            });
        }
        let (lsn, epoch) = (Lsn(u64_at(8)), Epoch(u64_at(16)));
        if lsn != self.lsn || epoch != self.epoch {
            return Err(EntryError::TagMismatch {
                tag: (self.lsn, self.epoch),
                frame: (lsn, epoch),
            });
        }
        let stored = u32_at(4);
        let computed = crc32c::crc32c(&b[8..]);
        if stored != computed {
            return Err(EntryError::Checksum { lsn });
        }
        Ok(())
    }
}

/// Why a journal entry received from a peer is not acceptable.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EntryError {
    /// Shorter than the fixed frame header.
    #[error("entry frame of {0} bytes is shorter than its header")]
    Short(usize),
    /// Larger than [`MAX_ENTRY_BYTES`].
    #[error("entry frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// The frame's length field disagrees with the bytes carried.
    #[error("entry frame declares {declared} payload bytes but carries {actual}")]
    Length { declared: usize, actual: usize },
    /// The frame's header says another position than its tag.
    #[error("entry tagged {tag:?} holds a frame for {frame:?}")]
    TagMismatch {
        tag: (Lsn, Epoch),
        frame: (Lsn, Epoch),
    },
    /// The frame's crc32c does not match.
    #[error("entry {lsn}: checksum mismatch")]
    Checksum { lsn: Lsn },
}

/// Why the primary refuses a subscription.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum RefuseCode {
    /// The mirror's database id is not the primary's.
    DatabaseMismatch,
    /// The mirror has seen a newer epoch than this node's: this node is not
    /// (or no longer) the primary.
    StalePrimary,
    /// The node asked is not the primary.
    NotPrimary,
    /// The mirror claims entries beyond the primary's end in the same epoch.
    MirrorAhead,
    /// The peer broke the protocol.
    ProtocolViolation,
    /// Anything else; see the reason text.
    Other,
}

/// Every message of the replication protocol.
///
/// Mirror → primary: `Subscribe`, `Ack`. Primary → mirror: everything else.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Message {
    /// First message of a mirror (and again after `Diverged` or a reseed):
    /// "I am `node`, my journal ends at `(last_lsn, last_epoch)`".
    Subscribe {
        node: NodeId,
        db_id: [u8; 16],
        last_lsn: Lsn,
        last_epoch: Epoch,
    },
    /// The primary accepts the subscription and streams from `from_lsn`;
    /// `epoch` is the primary's, `db_id` its database's (an empty mirror
    /// adopts it).
    Streaming {
        from_lsn: Lsn,
        epoch: Epoch,
        db_id: [u8; 16],
    },
    /// A batch of consecutive entries, and the primary's last durable LSN
    /// when it was sent (so the mirror knows its lag while streaming).
    Entries {
        entries: Vec<FramedEntry>,
        primary_last_lsn: Lsn,
    },
    /// Mirror's progress: durable in its journal / applied to its data file.
    Ack { flushed_lsn: Lsn, applied_lsn: Lsn },
    /// The mirror's tail diverged: it must drop its entries `>= fork_lsn`
    /// and subscribe again.
    Diverged { fork_lsn: Lsn, epoch: Epoch },
    /// The mirror cannot be served from the journal; a snapshot follows.
    NeedsReseed {
        oldest_lsn: Lsn,
        primary_last_lsn: Lsn,
        db_id: [u8; 16],
    },
    /// A snapshot containing exactly the entries `<= lsn` begins.
    SnapshotBegin {
        lsn: Lsn,
        epoch: Epoch,
        total_bytes: u64,
    },
    /// A piece of the snapshot.
    SnapshotChunk {
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// The snapshot is complete; `checksum` is the crc32c of all its bytes.
    SnapshotEnd { checksum: u32 },
    /// Primary keep-alive and position report.
    Heartbeat { primary_last_lsn: Lsn, epoch: Epoch },
    /// The subscription is refused; the primary closes the stream.
    Refused { code: RefuseCode, reason: String },
}

impl Message {
    /// A short name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Subscribe { .. } => "subscribe",
            Message::Streaming { .. } => "streaming",
            Message::Entries { .. } => "entries",
            Message::Ack { .. } => "ack",
            Message::Diverged { .. } => "diverged",
            Message::NeedsReseed { .. } => "needs_reseed",
            Message::SnapshotBegin { .. } => "snapshot_begin",
            Message::SnapshotChunk { .. } => "snapshot_chunk",
            Message::SnapshotEnd { .. } => "snapshot_end",
            Message::Heartbeat { .. } => "heartbeat",
            Message::Refused { .. } => "refused",
        }
    }

    /// Checks the limits of this module that postcard cannot express.
    pub fn validate(&self) -> Result<(), FrameError> {
        match self {
            Message::Subscribe { node, .. } if node.0.len() > MAX_NODE_ID_BYTES => {
                Err(FrameError::Limit("node id too long"))
            }
            Message::Entries { entries, .. } => {
                if entries.len() > MAX_BATCH_ENTRIES {
                    return Err(FrameError::Limit("too many entries in a batch"));
                }
                if entries.iter().any(|e| e.bytes.len() > MAX_ENTRY_BYTES) {
                    return Err(FrameError::Limit("entry too large"));
                }
                Ok(())
            }
            Message::SnapshotChunk { bytes } if bytes.len() > MAX_SNAPSHOT_CHUNK_BYTES => {
                Err(FrameError::Limit("snapshot chunk too large"))
            }
            Message::Refused { reason, .. } if reason.len() > MAX_REASON_BYTES => {
                Err(FrameError::Limit("refusal reason too long"))
            }
            _ => Ok(()),
        }
    }
}

/// Why bytes are not a valid frame, or a message cannot be framed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix exceeds [`MAX_FRAME_BYTES`].
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_BYTES}")]
    TooLarge(usize),
    /// A zero length prefix (no version byte).
    #[error("empty frame")]
    Empty,
    /// The peer speaks a wire version we do not.
    #[error("unsupported wire version {0} (this node speaks {WIRE_VERSION})")]
    UnsupportedVersion(u8),
    /// The body is not a valid message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The body decoded but left bytes over.
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    /// The message breaks a limit of this module.
    #[error("message over limit: {0}")]
    Limit(&'static str),
}

/// Encodes `msg` as one complete frame (length prefix included).
pub fn encode(msg: &Message) -> Result<Vec<u8>, FrameError> {
    msg.validate()?;
    let mut out = vec![0u8; LEN_PREFIX_BYTES];
    out.push(WIRE_VERSION);
    let mut out =
        postcard::to_extend(msg, out).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = out.len() - LEN_PREFIX_BYTES;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    let len32 = u32::try_from(len).map_err(|_| FrameError::TooLarge(len))?;
    out[..LEN_PREFIX_BYTES].copy_from_slice(&len32.to_le_bytes());
    Ok(out)
}

/// Reads a length prefix and checks it against the limit. Returns the number
/// of bytes that follow it.
pub fn decode_len(prefix: [u8; LEN_PREFIX_BYTES]) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

/// Decodes what follows the length prefix: the version byte and the body.
pub fn decode_body(body: &[u8]) -> Result<Message, FrameError> {
    let (&version, rest) = body.split_first().ok_or(FrameError::Empty)?;
    if version != WIRE_VERSION {
        return Err(FrameError::UnsupportedVersion(version));
    }
    let (msg, left): (Message, &[u8]) =
        postcard::take_from_bytes(rest).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if !left.is_empty() {
        return Err(FrameError::Trailing(left.len()));
    }
    msg.validate()?;
    Ok(msg)
}

/// Decodes the first frame in `buf`. Returns `Ok(None)` when `buf` holds only
/// part of a frame, or the message and the number of bytes it used.
pub fn decode(buf: &[u8]) -> Result<Option<(Message, usize)>, FrameError> {
    let Some(prefix) = buf.first_chunk::<LEN_PREFIX_BYTES>() else {
        return Ok(None);
    };
    let len = decode_len(*prefix)?;
    let Some(body) = buf.get(LEN_PREFIX_BYTES..LEN_PREFIX_BYTES + len) else {
        return Ok(None);
    };
    Ok(Some((decode_body(body)?, LEN_PREFIX_BYTES + len)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<Message> {
        vec![
            Message::Subscribe {
                node: NodeId::from("n2"),
                db_id: [7; 16],
                last_lsn: Lsn(41),
                last_epoch: Epoch(3),
            },
            Message::Streaming {
                from_lsn: Lsn(42),
                epoch: Epoch(3),
                db_id: [7; 16],
            },
            Message::Entries {
                entries: vec![
                    FramedEntry::encode(Lsn(42), Epoch(3), 1, b"payload"),
                    FramedEntry::encode(Lsn(43), Epoch(3), 2, b""),
                ],
                primary_last_lsn: Lsn(50),
            },
            Message::Ack {
                flushed_lsn: Lsn(43),
                applied_lsn: Lsn(40),
            },
            Message::Diverged {
                fork_lsn: Lsn(10),
                epoch: Epoch(4),
            },
            Message::NeedsReseed {
                oldest_lsn: Lsn(100),
                primary_last_lsn: Lsn(200),
                db_id: [7; 16],
            },
            Message::SnapshotBegin {
                lsn: Lsn(99),
                epoch: Epoch(4),
                total_bytes: 3,
            },
            Message::SnapshotChunk {
                bytes: vec![1, 2, 3],
            },
            Message::SnapshotEnd { checksum: 0xdead },
            Message::Heartbeat {
                primary_last_lsn: Lsn(200),
                epoch: Epoch(4),
            },
            Message::Refused {
                code: RefuseCode::StalePrimary,
                reason: "seen epoch 5".into(),
            },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for msg in samples() {
            let bytes = encode(&msg).unwrap();
            let (back, used) = decode(&bytes).unwrap().unwrap();
            assert_eq!(back, msg);
            assert_eq!(used, bytes.len());
        }
    }

    #[test]
    fn partial_frames_ask_for_more() {
        let bytes = encode(&samples()[2]).unwrap();
        for cut in 0..bytes.len() {
            assert_eq!(decode(&bytes[..cut]).unwrap(), None, "cut at {cut}");
        }
    }

    #[test]
    fn unknown_version_is_a_clear_error() {
        let mut bytes = encode(&samples()[0]).unwrap();
        bytes[LEN_PREFIX_BYTES] = 9;
        assert_eq!(decode(&bytes), Err(FrameError::UnsupportedVersion(9)));
    }

    #[test]
    fn oversized_and_empty_prefixes_are_refused() {
        let big = (MAX_FRAME_BYTES as u32 + 1).to_le_bytes();
        assert_eq!(decode(&big), Err(FrameError::TooLarge(MAX_FRAME_BYTES + 1)));
        assert_eq!(decode(&[0, 0, 0, 0]), Err(FrameError::Empty));
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = encode(&samples()[3]).unwrap();
        bytes.push(0);
        let len = (bytes.len() - LEN_PREFIX_BYTES) as u32;
        bytes[..4].copy_from_slice(&len.to_le_bytes());
        assert_eq!(decode(&bytes), Err(FrameError::Trailing(1)));
    }

    #[test]
    fn limits_are_checked_on_both_ends() {
        let long = Message::Subscribe {
            node: NodeId("x".repeat(MAX_NODE_ID_BYTES + 1)),
            db_id: [0; 16],
            last_lsn: Lsn(0),
            last_epoch: Epoch(0),
        };
        assert!(matches!(encode(&long), Err(FrameError::Limit(_))));
        // Hand-encode the same message to check the decoder refuses it too.
        let mut body = vec![WIRE_VERSION];
        body = postcard::to_extend(&long, body).unwrap();
        assert!(matches!(decode_body(&body), Err(FrameError::Limit(_))));
    }

    #[test]
    fn entry_verification_checks_header_and_checksum() {
        let e = FramedEntry::encode(Lsn(5), Epoch(2), 9, b"hello");
        assert_eq!(e.verify(), Ok(()));
        let mut retag = e.clone();
        retag.lsn = Lsn(6);
        assert!(matches!(
            retag.verify(),
            Err(EntryError::TagMismatch { .. })
        ));
        let mut flipped = e.clone();
        let last = flipped.bytes.len() - 1;
        flipped.bytes[last] ^= 1;
        assert_eq!(flipped.verify(), Err(EntryError::Checksum { lsn: Lsn(5) }));
        let mut short = e.clone();
        short.bytes.truncate(10);
        assert_eq!(short.verify(), Err(EntryError::Short(10)));
        let mut cut = e;
        cut.bytes.pop();
        assert!(matches!(cut.verify(), Err(EntryError::Length { .. })));
    }

    fn arb_entry() -> impl Strategy<Value = FramedEntry> {
        (
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..64),
        )
            .prop_map(|(l, e, p)| FramedEntry::encode(Lsn(l), Epoch(e), 0, &p))
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        let lsn = any::<u64>().prop_map(Lsn);
        let epoch = any::<u64>().prop_map(Epoch);
        prop_oneof![
            (
                "[a-z0-9-]{1,63}",
                any::<[u8; 16]>(),
                lsn.clone(),
                epoch.clone()
            )
                .prop_map(|(n, db_id, last_lsn, last_epoch)| Message::Subscribe {
                    node: NodeId(n),
                    db_id,
                    last_lsn,
                    last_epoch
                }),
            (lsn.clone(), epoch.clone(), any::<[u8; 16]>()).prop_map(|(from_lsn, epoch, db_id)| {
                Message::Streaming {
                    from_lsn,
                    epoch,
                    db_id,
                }
            }),
            (proptest::collection::vec(arb_entry(), 0..8), lsn.clone()).prop_map(
                |(entries, primary_last_lsn)| Message::Entries {
                    entries,
                    primary_last_lsn
                }
            ),
            (lsn.clone(), lsn.clone()).prop_map(|(flushed_lsn, applied_lsn)| Message::Ack {
                flushed_lsn,
                applied_lsn
            }),
            (lsn.clone(), epoch.clone())
                .prop_map(|(fork_lsn, epoch)| Message::Diverged { fork_lsn, epoch }),
            (lsn.clone(), lsn.clone(), any::<[u8; 16]>()).prop_map(
                |(oldest_lsn, primary_last_lsn, db_id)| Message::NeedsReseed {
                    oldest_lsn,
                    primary_last_lsn,
                    db_id
                }
            ),
            (lsn.clone(), epoch.clone(), any::<u64>()).prop_map(|(lsn, epoch, total_bytes)| {
                Message::SnapshotBegin {
                    lsn,
                    epoch,
                    total_bytes,
                }
            }),
            proptest::collection::vec(any::<u8>(), 0..256)
                .prop_map(|bytes| Message::SnapshotChunk { bytes }),
            any::<u32>().prop_map(|checksum| Message::SnapshotEnd { checksum }),
            (lsn, epoch).prop_map(|(primary_last_lsn, epoch)| Message::Heartbeat {
                primary_last_lsn,
                epoch
            }),
            ".{0,100}".prop_map(|reason| Message::Refused {
                code: RefuseCode::Other,
                reason
            }),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_messages_round_trip(msg in arb_message()) {
            let bytes = encode(&msg).unwrap();
            let (back, used) = decode(&bytes).unwrap().unwrap();
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(back, msg);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
            let _ = decode_body(&bytes);
        }

        #[test]
        fn arbitrary_bodies_with_our_version_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..512)
        ) {
            let mut body = vec![WIRE_VERSION];
            body.extend_from_slice(&bytes);
            if let Ok(msg) = decode_body(&body) {
                // Whatever decodes must re-encode within the limits.
                prop_assert!(encode(&msg).is_ok());
            }
        }

        #[test]
        fn mutated_frames_never_panic(idx in 0usize..11, flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
            let mut bytes = encode(&samples()[idx]).unwrap();
            for (at, val) in flips {
                let n = bytes.len();
                bytes[at % n] = val;
            }
            let _ = decode(&bytes);
        }

        #[test]
        fn entries_round_trip(payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..16), start in 1u64..1_000_000, epoch in 0u64..100) {
            let entries: Vec<FramedEntry> = payloads.iter().enumerate()
                .map(|(i, p)| FramedEntry::encode(Lsn(start + i as u64), Epoch(epoch), 0, p))
                .collect();
            let msg = Message::Entries { entries, primary_last_lsn: Lsn(start) };
            let bytes = encode(&msg).unwrap();
            let (back, _) = decode(&bytes).unwrap().unwrap();
            prop_assert_eq!(back, msg);
        }
    }
}
