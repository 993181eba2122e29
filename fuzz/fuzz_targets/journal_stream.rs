//! A stream of segments (a journal archive once decompressed) from
//! arbitrary bytes: every item an entry or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mirrordb::journal::scan::SegmentStreamReader;

fuzz_target!(|data: &[u8]| {
    for item in SegmentStreamReader::new(data).take(10_000) {
        if item.is_err() {
            break;
        }
    }
});
