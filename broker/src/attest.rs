//! Attestation on the broker: the launch measurement of a bubble and its
//! reports from the TEE backend.
//!
//! This host has no SEV-SNP, so reports come from the **simulated** virtual
//! PSP (`DATA_DIR/psp`), and say so: CHIP_ID `BUBBLE-SIMULATED…`, TEE
//! `sim`. Default verification policies refuse them.

use bubble_attestation::measure::{self, PageType, PageUpdate, VcpuState};
use bubble_vmm::images::{initial_state, GuestImage};

/// The SNP launch digest of a bubble booted from `image` with `memory_mib`
/// of memory and a mailbox for `max_payload`: every initial page (boot
/// pages, then image pages, by address) as a NORMAL page, then the vCPU's
/// initial state as the VMSA.
pub fn measurement(
    image: &GuestImage,
    memory_mib: u32,
    max_payload: usize,
) -> Result<[u8; 48], String> {
    let (pages, v) = initial_state(image, u64::from(memory_mib) << 20, max_payload as u64)?;
    let vmsa = measure::vmsa_page(&VcpuState {
        rip: v.rip,
        rsp: v.rsp,
        rflags: v.rflags,
        cr0: v.cr0,
        cr3: v.cr3,
        cr4: v.cr4,
        efer: v.efer,
        cs: v.cs,
        ds: v.ds,
        tr: v.tr,
        gdt_base: v.gdt_base,
        gdt_limit: v.gdt_limit,
        fcw: v.fcw,
        mxcsr: v.mxcsr,
    });
    let updates = pages
        .iter()
        .map(|p| PageUpdate {
            gpa: p.gpa,
            page_type: PageType::Normal,
            contents: &p.data,
        })
        .chain(std::iter::once(PageUpdate {
            gpa: measure::VMSA_GPA,
            page_type: PageType::Vmsa,
            contents: &vmsa,
        }));
    Ok(measure::launch_digest(updates))
}
