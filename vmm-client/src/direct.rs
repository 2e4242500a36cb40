//! Writing a snapshot's pages straight into a restoring VMM's guest
//! memory: through the VMM's `/proc/<pid>/mem`, opened once and bound to
//! the VMM process (see [`crate::procmem`]), never by raw pid.

use std::fs::File;
use std::os::fd::AsRawFd;

use bubble_vmm::control::GuestSpan;
use bubble_vmm::layout::PAGE;

use crate::procmem::{ProcHandle, WriteError};

/// Iovecs given to one `pwritev` at most (the kernel's `IOV_MAX`).
const IOVECS_PER_WRITE: usize = 1024;

/// Where direct writes go: one VMM process's memory, opened at the first
/// write.
pub(crate) struct Target {
    proc: ProcHandle,
    mem: Option<File>,
}

impl Target {
    pub(crate) fn new(proc: ProcHandle) -> Self {
        Self { proc, mem: None }
    }

    fn mem(&mut self) -> Result<&File, WriteError> {
        if self.mem.is_none() {
            self.mem = Some(self.proc.open_mem()?);
        }
        // Set just above.
        self.mem
            .as_ref()
            .ok_or_else(|| WriteError::Refused(std::io::Error::other("no memory file")))
    }

    /// A failed or short write: the VMM is gone, or the kernel refused.
    fn failed(&self, e: std::io::Error) -> WriteError {
        if self.proc.exited() {
            WriteError::Gone
        } else {
            WriteError::Refused(e)
        }
    }
}

/// Writes a snapshot's pages into the guest memory of the VMM `target`
/// (at `span`); returns the encoded vCPU state. Every address is checked
/// against the snapshot's memory size and the span first.
pub(crate) fn write_pages(
    target: &mut Target,
    span: GuestSpan,
    snapshot: &[&[u8]],
) -> Result<Vec<u8>, WriteError> {
    let (state, pages) = bubble_vmm::snapshot::split_pages(snapshot)
        .map_err(|e| WriteError::Snapshot(e.to_string()))?;
    let borrowed: Vec<(u64, &[u8])> = pages.iter().map(|(g, p)| (*g, p.as_ref())).collect();
    let written = write_at(target, span, &borrowed);
    drop(borrowed);
    // Pages that straddled two chunks were copied: guest memory, wiped.
    for (_, page) in pages {
        if let std::borrow::Cow::Owned(mut v) = page {
            zeroize::Zeroize::zeroize(&mut v);
        }
    }
    written.map(|_| state)
}

/// Writes whole pages into the VMM's guest memory at `span`; returns how
/// many. Pages at consecutive addresses go in one `pwritev`.
pub(crate) fn write_at(
    target: &mut Target,
    span: GuestSpan,
    pages: &[(u64, &[u8])],
) -> Result<u64, WriteError> {
    if pages.is_empty() {
        return Ok(0);
    }
    for (gpa, data) in pages {
        if gpa.checked_add(PAGE).is_none_or(|e| e > span.len) || data.len() as u64 != PAGE {
            return Err(WriteError::Snapshot("page outside guest memory".into()));
        }
    }
    let fd = target.mem()?.as_raw_fd();
    let mut i = 0;
    while i < pages.len() {
        // A run of consecutive pages, one iovec each.
        let start = pages[i].0;
        let mut iov = Vec::with_capacity(IOVECS_PER_WRITE.min(pages.len() - i));
        while i < pages.len()
            && iov.len() < IOVECS_PER_WRITE
            && pages[i].0 == start + iov.len() as u64 * PAGE
        {
            iov.push(libc::iovec {
                iov_base: pages[i].1.as_ptr() as *mut libc::c_void,
                iov_len: PAGE as usize,
            });
            i += 1;
        }
        let want = iov.len() * PAGE as usize;
        let Ok(at) = libc::off_t::try_from(span.host + start) else {
            return Err(WriteError::Snapshot("guest address out of range".into()));
        };
        // SAFETY: `iov` points at live page buffers borrowed for this call
        // (`pages`); the file is the VMM's memory and `at` an address in
        // its guest memory mapping (every page checked to lie within its
        // length). The kernel checks that we may write it.
        let n = unsafe { libc::pwritev(fd, iov.as_ptr(), iov.len() as libc::c_int, at) };
        if n < 0 {
            return Err(target.failed(std::io::Error::last_os_error()));
        }
        if n as usize != want {
            return Err(target.failed(std::io::Error::other("short write")));
        }
    }
    Ok(pages.len() as u64)
}
