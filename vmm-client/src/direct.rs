//! Writing a snapshot's pages straight into a restoring VMM's guest
//! memory (`process_vm_writev`).

use bubble_vmm::control::GuestSpan;
use bubble_vmm::layout::PAGE;

/// Why pages could not be written into a VMM directly.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The snapshot is malformed.
    #[error("snapshot does not decode: {0}")]
    Snapshot(String),
    /// The kernel refused (or wrote short); the caller streams instead.
    #[error("writing guest memory refused: {0}")]
    Refused(std::io::Error),
}

/// Pages written by one `process_vm_writev` call at most.
pub(crate) const PAGES_PER_WRITEV: usize = 512;

/// Writes a snapshot's pages into the guest memory of VMM `pid` (at
/// `span`); returns the encoded vCPU state. Every address is checked
/// against the snapshot's memory size and the span first.
pub(crate) fn write_pages(
    pid: u32,
    span: GuestSpan,
    snapshot: &[&[u8]],
) -> Result<Vec<u8>, WriteError> {
    let (state, pages) = bubble_vmm::snapshot::split_pages(snapshot)
        .map_err(|e| WriteError::Snapshot(e.to_string()))?;
    let borrowed: Vec<(u64, &[u8])> = pages.iter().map(|(g, p)| (*g, p.as_ref())).collect();
    let written = write_at(pid, span, &borrowed);
    drop(borrowed);
    // Pages that straddled two chunks were copied: guest memory, wiped.
    for (_, page) in pages {
        if let std::borrow::Cow::Owned(mut v) = page {
            zeroize::Zeroize::zeroize(&mut v);
        }
    }
    written.map(|_| state)
}

/// Writes whole pages into VMM `pid`'s guest memory at `span`; returns
/// how many.
pub(crate) fn write_at(
    pid: u32,
    span: GuestSpan,
    pages: &[(u64, &[u8])],
) -> Result<u64, WriteError> {
    let mut written = 0;
    for chunk in pages.chunks(PAGES_PER_WRITEV) {
        let mut local = Vec::with_capacity(chunk.len());
        let mut remote = Vec::with_capacity(chunk.len());
        for (gpa, data) in chunk {
            if gpa.checked_add(PAGE).is_none_or(|e| e > span.len) || data.len() as u64 != PAGE {
                return Err(WriteError::Snapshot("page outside guest memory".into()));
            }
            local.push(libc::iovec {
                iov_base: data.as_ptr() as *mut libc::c_void,
                iov_len: data.len(),
            });
            remote.push(libc::iovec {
                iov_base: (span.host + gpa) as *mut libc::c_void,
                iov_len: PAGE as usize,
            });
        }
        let want = chunk.len() * PAGE as usize;
        // SAFETY: `local` points at live page buffers borrowed for this
        // call (`pages`); `remote` names addresses in the VMM's guest
        // memory mapping (each page checked to lie within its length).
        // The kernel checks that we may write the other process's
        // memory.
        let n = unsafe {
            libc::process_vm_writev(
                pid as libc::pid_t,
                local.as_ptr(),
                local.len() as libc::c_ulong,
                remote.as_ptr(),
                remote.len() as libc::c_ulong,
                0,
            )
        };
        if n < 0 {
            return Err(WriteError::Refused(std::io::Error::last_os_error()));
        }
        if n as usize != want {
            return Err(WriteError::Refused(std::io::Error::other("short write")));
        }
        written += chunk.len() as u64;
    }
    Ok(written)
}
