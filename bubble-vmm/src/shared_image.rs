//! The guest image as a sealed, shared memory file.
//!
//! Loading the shim by copying its ~1 MiB of segments into every new VM
//! costs a page fault and a copy per page on the create path, and a private
//! copy of the same code in every bubble. Instead the broker lays the image
//! out once, exactly as loading would put it in guest memory from
//! [`IMAGE_BASE`], in a memfd sealed against any change (write, grow,
//! shrink, further seals). VMM processes inherit the descriptor and map it
//! copy-on-write over the image range of guest memory: pages the guest
//! only reads (code, constants) are shared by all bubbles; a page the
//! guest writes becomes its own private copy, invisible to every other
//! bubble and to the file. Guest memory content is identical to a copied
//! load, so the launch measurement is unchanged.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::layout::{self, Image, IMAGE_BASE, PAGE};
use crate::vm::VmError;

/// Seals a shared image must carry: nothing can change it once made.
const SEALS: libc::c_int =
    libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// A guest image laid out page by page in a sealed memfd.
#[derive(Debug)]
pub struct SharedImage {
    fd: OwnedFd,
    entry: u64,
    end: u64,
    span: u64,
}

fn io_err(what: &str) -> VmError {
    VmError::Memory(format!(
        "shared image: {what}: {}",
        std::io::Error::last_os_error()
    ))
}

/// Image entry, end of its highest segment, and bytes mapped from
/// [`IMAGE_BASE`] (whole pages).
fn bounds(elf: &[u8]) -> Result<(u64, u64, u64), VmError> {
    let (entry, end) = Image::parse_bounds(elf)?;
    let span = end.div_ceil(PAGE) * PAGE - IMAGE_BASE;
    Ok((entry, end, span))
}

impl SharedImage {
    /// Lays `elf` out in a new sealed memfd. The descriptor is inherited
    /// by child processes (no close-on-exec), so VMMs can map it by number.
    pub fn create(elf: &[u8]) -> Result<Self, VmError> {
        let (entry, end, span) = bounds(elf)?;
        let image = Image::parse(elf)?;
        // SAFETY: memfd_create takes a NUL-terminated name and flags; it
        // returns a new descriptor or -1.
        let raw = unsafe { libc::memfd_create(c"bubble-image".as_ptr(), libc::MFD_ALLOW_SEALING) };
        if raw < 0 {
            return Err(io_err("memfd_create"));
        }
        // SAFETY: `raw` is a descriptor we just created and own alone.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on our own memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), span as libc::off_t) } != 0 {
            return Err(io_err("ftruncate"));
        }
        for p in layout::image_pages(&image) {
            let off = p.gpa - IMAGE_BASE;
            let mut done = 0usize;
            while done < p.data.len() {
                // SAFETY: writes from a live buffer, bounded by its length,
                // into our own memfd.
                let n = unsafe {
                    libc::pwrite(
                        fd.as_raw_fd(),
                        p.data[done..].as_ptr().cast(),
                        p.data.len() - done,
                        (off + done as u64) as libc::off_t,
                    )
                };
                if n <= 0 {
                    return Err(io_err("pwrite"));
                }
                done += n as usize;
            }
        }
        // SAFETY: fcntl on our own memfd.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, SEALS) } != 0 {
            return Err(io_err("sealing"));
        }
        Ok(Self {
            fd,
            entry,
            end,
            span,
        })
    }

    /// Adopts an inherited descriptor that must hold `elf` laid out by
    /// [`SharedImage::create`]: it must be sealed against change and of
    /// the right size (its content is the broker's to vouch for; the
    /// broker measures the image from the same ELF).
    pub fn adopt(raw: RawFd, elf: &[u8]) -> Result<Self, VmError> {
        let (entry, end, span) = bounds(elf)?;
        // SAFETY: fcntl(F_GET_SEALS) only queries the descriptor.
        let seals = unsafe { libc::fcntl(raw, libc::F_GET_SEALS) };
        if seals < 0 {
            return Err(io_err("not a sealable memfd"));
        }
        if seals & SEALS != SEALS {
            return Err(VmError::Memory(
                "shared image: descriptor is not sealed against change".into(),
            ));
        }
        // SAFETY: fstat writes into a zeroed stat buffer we own.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstat(raw, &mut st) } != 0 {
            return Err(io_err("fstat"));
        }
        if st.st_size as u64 != span {
            return Err(VmError::Memory(format!(
                "shared image: {} bytes, expected {span}",
                st.st_size
            )));
        }
        // SAFETY: the descriptor was inherited for this purpose and nothing
        // else in the VMM uses it; from now on this value owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Self {
            fd,
            entry,
            end,
            span,
        })
    }

    /// The descriptor number (to pass to a child process).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Entry point of the image.
    pub fn entry(&self) -> u64 {
        self.entry
    }

    /// End of the image's highest segment (for the memory layout).
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Maps the image copy-on-write at `host` (the host address of guest
    /// physical [`IMAGE_BASE`]), replacing what was mapped there.
    ///
    /// # Safety
    /// `host..host + span` must lie inside a mapping the caller owns and
    /// that nothing else references (fresh guest memory of a VM that has
    /// not run).
    pub(crate) unsafe fn map_at(&self, host: *mut u8) -> Result<(), VmError> {
        // SAFETY: the caller guarantees the range is its own, unused guest
        // memory; MAP_FIXED replaces exactly that range with a private
        // (copy-on-write) mapping of the sealed file.
        let p = unsafe {
            libc::mmap(
                host.cast(),
                self.span as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED,
                self.fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED || p != host.cast() {
            return Err(io_err("mmap"));
        }
        Ok(())
    }

    /// Bytes mapped from [`IMAGE_BASE`].
    pub fn span(&self) -> u64 {
        self.span
    }
}
