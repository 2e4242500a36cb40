//! The audit record decoder on arbitrary bytes: it never panics, and what
//! it accepts its encoder writes back byte for byte; the verifier walks any
//! file without panicking.
#![no_main]

use bubble_audit::{decode_frame, verify, Frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Frame::Record { record, len }) = decode_frame(data) {
        assert_eq!(record.encode().as_slice(), &data[..len]);
    }
    let _ = verify(data, None);
});
