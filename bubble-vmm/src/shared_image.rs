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
//! load, and so is the launch measurement.
//!
//! Hashing the image's ~1 MiB with SHA-384 takes milliseconds, too long for
//! every VM creation, and it gives the same page digests for every bubble
//! of the image. So [`SharedImage::create`] hashes each page from the very
//! buffer it writes into the file and appends the digests to the file,
//! behind the image, before sealing it: the measurement table. A VMM
//! adopting the file reads and checks the table and records those digests
//! for the image pages it maps ([`crate::load`]). Table format at offset
//! `span`: `"BUBMEAS1"`, `count u32`, `0u32`, then `count` entries of
//! `[gpa u64][page type u8][7 zero bytes][SHA-384 48]`, by address.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use bubble_attestation::measure::{PageInfo, PageType};

use crate::layout::{self, Image, IMAGE_BASE, PAGE};
use crate::vm_error::VmError;

/// Magic of the measurement table.
const TABLE_MAGIC: &[u8; 8] = b"BUBMEAS1";
/// Bytes before the table's entries.
const TABLE_HEAD: usize = 16;
/// Bytes per table entry.
const ENTRY_LEN: usize = 64;

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
    /// The image pages' PAGE_INFO, by address (the measurement table).
    measured: Vec<PageInfo>,
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
        let mut measured = Vec::new();
        for p in layout::image_pages(&image) {
            let Some(data) = p.data else {
                measured.push(PageInfo::of(p.gpa, PageType::Zero, &[]));
                continue;
            };
            pwrite_all(&fd, &data, p.gpa - IMAGE_BASE)?;
            // Hashed from the buffer just written: the bytes VMs will map.
            measured.push(PageInfo::of(p.gpa, PageType::Normal, &data));
        }
        pwrite_all(&fd, &encode_table(&measured), span)?;
        // SAFETY: fcntl on our own memfd.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, SEALS) } != 0 {
            return Err(io_err("sealing"));
        }
        Ok(Self {
            fd,
            entry,
            end,
            span,
            measured,
        })
    }

    /// Adopts an inherited descriptor that must hold `elf` laid out by
    /// [`SharedImage::create`]: it must be sealed against change, of the
    /// right size, and carry a well-formed measurement table for the image
    /// span (its content is the broker's to vouch for: the broker wrote
    /// and hashed it).
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
        let size = st.st_size as u64;
        let table_len = size.checked_sub(span).filter(|n| *n >= TABLE_HEAD as u64);
        let Some(table_len) =
            table_len.filter(|n| *n <= TABLE_HEAD as u64 + span / PAGE * ENTRY_LEN as u64)
        else {
            return Err(VmError::Memory(format!(
                "shared image: {size} bytes, expected {span} and a measurement table"
            )));
        };
        let mut table = vec![0u8; table_len as usize];
        pread_all(raw, &mut table, span)?;
        let measured = decode_table(&table, span)
            .map_err(|e| VmError::Memory(format!("shared image: measurement table: {e}")))?;
        // SAFETY: the descriptor was inherited for this purpose and nothing
        // else in the VMM uses it; from now on this value owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Self {
            fd,
            entry,
            end,
            span,
            measured,
        })
    }

    /// The image pages' PAGE_INFO updates, by address: NORMAL pages with
    /// the SHA-384 of the bytes written into the file, ZERO pages.
    pub fn measured_pages(&self) -> &[PageInfo] {
        &self.measured
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

fn pwrite_all(fd: &OwnedFd, data: &[u8], off: u64) -> Result<(), VmError> {
    let mut done = 0usize;
    while done < data.len() {
        // SAFETY: writes from a live buffer, bounded by its length, into
        // our own memfd.
        let n = unsafe {
            libc::pwrite(
                fd.as_raw_fd(),
                data[done..].as_ptr().cast(),
                data.len() - done,
                (off + done as u64) as libc::off_t,
            )
        };
        if n <= 0 {
            return Err(io_err("pwrite"));
        }
        done += n as usize;
    }
    Ok(())
}

fn pread_all(fd: RawFd, buf: &mut [u8], off: u64) -> Result<(), VmError> {
    let mut done = 0usize;
    while done < buf.len() {
        // SAFETY: reads into a live buffer, bounded by its length.
        let n = unsafe {
            libc::pread(
                fd,
                buf[done..].as_mut_ptr().cast(),
                buf.len() - done,
                (off + done as u64) as libc::off_t,
            )
        };
        if n <= 0 {
            return Err(io_err("pread"));
        }
        done += n as usize;
    }
    Ok(())
}

fn encode_table(pages: &[PageInfo]) -> Vec<u8> {
    let mut v = Vec::with_capacity(TABLE_HEAD + pages.len() * ENTRY_LEN);
    v.extend_from_slice(TABLE_MAGIC);
    v.extend((pages.len() as u32).to_le_bytes());
    v.extend(0u32.to_le_bytes());
    for p in pages {
        v.extend(p.gpa.to_le_bytes());
        v.push(p.page_type as u8);
        v.extend([0u8; 7]);
        v.extend(p.contents);
    }
    v
}

/// Why a measurement table was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TableError {
    /// Magic, count or length wrong.
    #[error("malformed header or length")]
    Malformed,
    /// An entry's address is unaligned, outside the image or out of order.
    #[error("page address {0:#x} unaligned, outside the image or out of order")]
    Address(u64),
    /// An entry is neither NORMAL nor a ZERO page with zero contents.
    #[error("page {0:#x}: unexpected type or contents")]
    Entry(u64),
}

/// Decodes and checks a measurement table for an image of `span` bytes.
fn decode_table(b: &[u8], span: u64) -> Result<Vec<PageInfo>, TableError> {
    let head = b.get(..TABLE_HEAD).ok_or(TableError::Malformed)?;
    let mut n = [0u8; 4];
    n.copy_from_slice(&head[8..12]);
    let count = u32::from_le_bytes(n) as usize;
    if &head[..8] != TABLE_MAGIC
        || head[12..16] != [0u8; 4]
        || count
            .checked_mul(ENTRY_LEN)
            .and_then(|l| l.checked_add(TABLE_HEAD))
            != Some(b.len())
    {
        return Err(TableError::Malformed);
    }
    let mut out = Vec::with_capacity(count);
    let mut next = IMAGE_BASE;
    for e in b[TABLE_HEAD..].chunks_exact(ENTRY_LEN) {
        let mut g = [0u8; 8];
        g.copy_from_slice(&e[..8]);
        let gpa = u64::from_le_bytes(g);
        if gpa < next || !gpa.is_multiple_of(PAGE) || gpa >= IMAGE_BASE + span {
            return Err(TableError::Address(gpa));
        }
        next = gpa + PAGE;
        let mut contents = [0u8; 48];
        contents.copy_from_slice(&e[16..64]);
        let page_type = match PageType::from_u8(e[8]) {
            Some(PageType::Normal) => PageType::Normal,
            Some(PageType::Zero) if contents == [0u8; 48] => PageType::Zero,
            _ => return Err(TableError::Entry(gpa)),
        };
        if e[9..16] != [0u8; 7] {
            return Err(TableError::Entry(gpa));
        }
        out.push(PageInfo {
            gpa,
            page_type,
            contents,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_round_trip_and_hostile_ones_are_refused() {
        let pages = vec![
            PageInfo::of(IMAGE_BASE, PageType::Normal, &[1u8; 4096]),
            PageInfo::of(IMAGE_BASE + PAGE, PageType::Zero, &[]),
        ];
        let t = encode_table(&pages);
        assert_eq!(decode_table(&t, 2 * PAGE), Ok(pages.clone()));
        assert_eq!(
            decode_table(&t, PAGE),
            Err(TableError::Address(IMAGE_BASE + PAGE))
        );
        for n in 0..t.len() {
            assert!(decode_table(&t[..n], 2 * PAGE).is_err());
        }
        for i in 0..t.len() {
            let mut m = t.clone();
            m[i] ^= 0x80;
            // Flipping a bit of a NORMAL page's digest is not detectable
            // here (the content is the broker's); anything else is refused.
            if (TABLE_HEAD + 16..TABLE_HEAD + 64).contains(&i) {
                continue;
            }
            assert!(decode_table(&m, 2 * PAGE).is_err(), "byte {i}");
        }
    }
}
