//! Guest images (ELF) given to the VMM.
#![no_main]

use bubble_vmm::layout::Image;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Image::parse(data);
});
