//! A replication message off the wire, from arbitrary bytes: an error or a
//! message, never a panic; a decoded message encodes again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mirrordb_replication::frame::{decode, decode_body, encode};

fuzz_target!(|data: &[u8]| {
    let _ = decode_body(data);
    if let Ok(Some((msg, _))) = decode(data) {
        let _ = msg.validate();
        let _ = encode(&msg);
    }
});
