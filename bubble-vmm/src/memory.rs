//! Guest memory mappings: making them, finding them, faulting them in.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout;
use crate::vm_error::VmError;

/// Guest memory of `mem_size` bytes from guest-physical 0: anonymous and
/// `MAP_NORESERVE`, so untouched pages cost no host memory.
pub fn anon_memory(mem_size: u64) -> Result<GuestMemoryMmap<()>, VmError> {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mem_size as usize)])
        .map_err(|e| VmError::Memory(e.to_string()))
}

/// Host address and length of guest memory (its single region).
pub fn host_span(mem: &GuestMemoryMmap<()>) -> Option<(*mut u8, usize)> {
    let region = mem.iter().next()?;
    let host = region
        .get_host_address(vm_memory::MemoryRegionAddress(0))
        .ok()?;
    Some((host, region.len() as usize))
}

/// Faults in the host pages behind these guest pages in few system calls
/// (runs of contiguous pages); addresses outside `mem` are skipped.
pub fn populate(mem: &GuestMemoryMmap<()>, gpas: impl Iterator<Item = u64>) {
    const MADV_POPULATE_WRITE: libc::c_int = 23;
    let Some((host, len)) = host_span(mem) else {
        return;
    };
    let flush = |(start, end): (u64, u64)| {
        if end <= len as u64 {
            // SAFETY: the range lies inside the guest memory mapping;
            // MADV_POPULATE_WRITE only faults pages in (errors, e.g. on
            // kernels without it, are harmless: writes fault normally).
            unsafe {
                libc::madvise(
                    host.add(start as usize).cast(),
                    (end - start) as usize,
                    MADV_POPULATE_WRITE,
                );
            }
        }
    };
    let mut run: Option<(u64, u64)> = None;
    for g in gpas {
        run = match run {
            Some((s, e)) if e == g => Some((s, e + layout::PAGE)),
            Some(r) => {
                flush(r);
                Some((g, g + layout::PAGE))
            }
            None => Some((g, g + layout::PAGE)),
        };
    }
    if let Some(r) = run {
        flush(r);
    }
}
