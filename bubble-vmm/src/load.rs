//! Loading a bubble's initial memory, and recording its launch measurement
//! while doing it: every page is recorded where it is placed, from the
//! bytes placed, in load order. No KVM is involved, so `bubblectl measure`
//! runs the very same code offline.
//!
//! Load (= measurement) order:
//! 1. the image: pages holding ELF file bytes as NORMAL (SHA-384 of the
//!    page as it lies in guest memory, or as it was written into the sealed
//!    shared image), pages only `.bss` covers as ZERO, by address;
//! 2. the stack (`0x10000..0x100000`) as ZERO pages;
//! 3. the boot pages (page tables, GDT, TSS, boot information) as NORMAL,
//!    by address, hashed from the buffer written;
//! 4. the mailbox as UNMEASURED pages (shared with the host: its address is
//!    measured, its contents are not);
//! 5. the initial vCPU state as the VMSA page.

use std::io::Cursor;

use bubble_attestation::measure::PageType;
use linux_loader::loader::{elf::Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::launch::{self, LaunchLog};
use crate::layout::{self, Image, InitialVcpu, Layout, IMAGE_BASE, PAGE};
use crate::memory;
use crate::shared_image::SharedImage;
use crate::vm_error::VmError;

/// What to load as the image.
#[derive(Clone, Copy)]
pub enum Source<'a> {
    /// An ELF file, copied in (by `linux-loader`).
    Elf(&'a [u8]),
    /// A shared image, mapped copy-on-write.
    Shared(&'a SharedImage),
    /// Raw machine code at [`IMAGE_BASE`] (floors, hostile test guests).
    Code(&'a [u8]),
}

/// Guest memory as loaded, with what the vCPU starts with and the record.
pub struct Loaded {
    /// Guest memory from guest-physical 0.
    pub mem: GuestMemoryMmap<()>,
    /// The layout.
    pub layout: Layout,
    /// Initial vCPU state.
    pub vcpu: InitialVcpu,
    /// The measured pages in load order.
    pub log: LaunchLog,
}

impl Loaded {
    /// The page at `gpa` as loaded.
    pub fn page(&self, gpa: u64) -> Result<Vec<u8>, VmError> {
        let mut buf = vec![0u8; PAGE as usize];
        self.mem
            .read_slice(&mut buf, GuestAddress(gpa))
            .map_err(mem_err)?;
        Ok(buf)
    }
}

fn mem_err(e: impl std::fmt::Display) -> VmError {
    VmError::Memory(e.to_string())
}

/// Records the image pages of `image` from guest memory as placed there.
fn record_placed(
    mem: &GuestMemoryMmap<()>,
    image: &Image,
    log: &mut LaunchLog,
) -> Result<(), VmError> {
    let mut buf = vec![0u8; PAGE as usize];
    for p in layout::image_pages(image) {
        match p.data {
            Some(_) => {
                mem.read_slice(&mut buf, GuestAddress(p.gpa))
                    .map_err(mem_err)?;
                log.normal(p.gpa, &buf);
            }
            None => log.run(p.gpa, PAGE, PageType::Zero),
        }
    }
    Ok(())
}

/// Creates guest memory of `mem_size` bytes and loads `src` into it with a
/// mailbox for `max_payload` bytes, recording the launch measurement.
pub fn load(src: Source<'_>, mem_size: u64, max_payload: u64) -> Result<Loaded, VmError> {
    let (layout, entry) = match src {
        Source::Elf(elf) => {
            let (entry, end) = Image::parse_bounds(elf)?;
            (Layout::new(mem_size, end, max_payload)?, entry)
        }
        Source::Shared(img) => (Layout::new(mem_size, img.end(), max_payload)?, img.entry()),
        Source::Code(code) => (
            Layout::new(mem_size, IMAGE_BASE + code.len() as u64, max_payload)?,
            IMAGE_BASE,
        ),
    };
    let mem = memory::anon_memory(mem_size)?;
    let mut log = LaunchLog::new();
    // 1. The image.
    let entry = match src {
        Source::Elf(elf) => {
            let loaded = Elf::load(&mem, None, &mut Cursor::new(elf), None)
                .map_err(|e| VmError::Memory(format!("loading the image: {e}")))?;
            record_placed(&mem, &Image::parse(elf)?, &mut log)?;
            loaded.kernel_load.0
        }
        Source::Shared(img) => {
            let (host, len) =
                memory::host_span(&mem).ok_or_else(|| VmError::Memory("no guest memory".into()))?;
            if IMAGE_BASE + img.span() > len as u64 {
                return Err(VmError::Memory("image does not fit in guest memory".into()));
            }
            // SAFETY: IMAGE_BASE..IMAGE_BASE+span lies inside this fresh
            // guest memory mapping (checked above), which nothing else
            // references yet: no VM uses it and nothing was written there.
            unsafe { img.map_at(host.add(IMAGE_BASE as usize))? };
            for p in img.measured_pages() {
                log.hashed(*p);
            }
            entry
        }
        Source::Code(code) => {
            mem.write_slice(code, GuestAddress(IMAGE_BASE))
                .map_err(mem_err)?;
            let image = Image {
                entry: IMAGE_BASE,
                segments: vec![layout::Segment {
                    gpa: IMAGE_BASE,
                    data: code.to_vec(),
                    mem_size: code.len() as u64,
                }],
            };
            record_placed(&mem, &image, &mut log)?;
            entry
        }
    };
    // 2. The stack.
    log.run(
        layout::STACK_BOTTOM,
        IMAGE_BASE - layout::STACK_BOTTOM,
        PageType::Zero,
    );
    // 3. The boot pages, hashed from the very buffer written.
    for p in layout::boot_pages(&layout) {
        mem.write_slice(&p.data, GuestAddress(p.gpa))
            .map_err(mem_err)?;
        log.normal(p.gpa, &p.data);
    }
    // 4. The mailbox.
    log.run(
        layout.mailbox_gpa,
        layout.mailbox_size,
        PageType::Unmeasured,
    );
    // 5. The vCPU.
    let vcpu = layout::initial_vcpu(entry);
    log.vmsa(&launch::vmsa_state(&vcpu));
    Ok(Loaded {
        mem,
        layout,
        vcpu,
        log,
    })
}

/// The launch measurement record of a bubble booted from `image` with
/// `mem_size` bytes of memory and a mailbox for `max_payload`: the image is
/// loaded into (unregistered) guest memory exactly as a VMM loads it
/// without a shared image, and the record kept. For `bubblectl measure`.
pub fn measure_offline(
    image: &crate::images::GuestImage,
    mem_size: u64,
    max_payload: u64,
) -> Result<LaunchLog, VmError> {
    use crate::images::{self, GuestImage};
    let loaded = match image {
        GuestImage::Shim => load(Source::Elf(images::SHIM_ELF), mem_size, max_payload)?,
        GuestImage::Elf(p) => {
            let elf = std::fs::read(p)
                .map_err(|e| VmError::Memory(format!("reading {}: {e}", p.display())))?;
            load(Source::Elf(&elf), mem_size, max_payload)?
        }
        GuestImage::Hostile(k) => {
            let code = images::hostile_code_for(*k, mem_size, max_payload)?;
            load(Source::Code(&code), mem_size, max_payload)?
        }
    };
    Ok(loaded.log)
}
