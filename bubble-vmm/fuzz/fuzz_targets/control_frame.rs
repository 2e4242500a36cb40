//! Control-protocol frame heads, page runs and snapshot body heads.
#![no_main]

use bubble_vmm::control::{self, Head, HEAD_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(h) = data.get(..HEAD_LEN) {
        let mut head = [0u8; HEAD_LEN];
        head.copy_from_slice(h);
        let _ = Head::parse(&head);
    }
    let _ = Head::read(&mut &data[..]).and_then(|h| h.read_body(&mut &data[HEAD_LEN..]));
    let _ = control::decode_runs(data);
    let _ = bubble_vmm::snapshot::parse_head(data, data.len());
    let _ = bubble_vmm::snapshot::page_runs(data);
    let _ = bubble_vmm::snapshot::decode_runs(data, 64 << 20);
    let _ = bubble_vmm::snapshot::split_pages(&[data]);
});
