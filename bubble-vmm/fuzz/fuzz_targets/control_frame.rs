//! Control-protocol frames and bodies, and snapshot body heads.
#![no_main]

use bubble_vmm::control::{self, Frame, Status};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Frame::read_from(&mut &data[..]);
    let _ = Frame::decode(data);
    let _ = Status::decode(data);
    let _ = control::decode_call(data);
    let _ = bubble_vmm::snapshot::parse_head(data, data.len());
    let _ = bubble_vmm::snapshot::page_runs(data);
    let _ = bubble_vmm::snapshot::decode_runs(data, 64 << 20);
    let _ = bubble_vmm::snapshot::split_pages(&[data]);
});
