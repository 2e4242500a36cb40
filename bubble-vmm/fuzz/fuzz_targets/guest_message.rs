//! Guest-written mailbox bytes: header and every payload parser.
#![no_main]

use bubble_vmm::abi;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = abi::Header::decode(data, 1 << 20) {
        let payload = data.get(abi::HEADER_LEN..).unwrap_or_default();
        let payload = &payload[..payload.len().min(h.length as usize)];
        let _ = abi::Call::decode(payload);
        let _ = abi::decode_error(payload);
        let _ = abi::decode_text(payload);
    }
    let _ = abi::BootInfo::decode(data);
});
