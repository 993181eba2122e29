//! A journal frame and its payload from arbitrary bytes: an error, never a
//! panic (a torn or corrupted journal tail is read this way at recovery).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mirrordb::journal::format::{SegmentHeader, decode_frame, decode_op};

fuzz_target!(|data: &[u8]| {
    let _ = SegmentHeader::decode(data);
    if let Ok(frame) = decode_frame(data) {
        let _ = decode_op(frame.payload);
    }
    let _ = decode_op(data);
});
