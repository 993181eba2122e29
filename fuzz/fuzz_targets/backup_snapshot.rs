//! A backup set's snapshot stream (after decompression) and a journal
//! archive's, from arbitrary bytes: errors, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mirrordb::backup::format::{ArchiveReader, SnapshotReader};

fuzz_target!(|data: &[u8]| {
    if let Ok(mut r) = SnapshotReader::new(data, "fuzz") {
        for _ in 0..10_000 {
            match r.next_item() {
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
    }
    let mut a = ArchiveReader::new(data, "fuzz");
    for _ in 0..10_000 {
        match a.next_frame() {
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
});
