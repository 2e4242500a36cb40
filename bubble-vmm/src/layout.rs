//! Guest memory layout and the initial state of a bubble.
//!
//! Everything here is deterministic: the same image, memory size and
//! payload limit always give the same initial pages and registers, so the
//! launch measurement [`crate::load`] records as it places them can be
//! reproduced offline.
//!
//! | guest-physical      | what                                            |
//! |---------------------|-------------------------------------------------|
//! | `0x1000`            | PML4                                            |
//! | `0x2000`            | PDPT                                            |
//! | `0x3000..0x7000`    | PDs for RAM: identity map, 2 MiB pages, U=1     |
//! | `0x7000`            | PD mapping the doorbell's 2 MiB page            |
//! | `0x8000`            | GDT (null, ring-0 code/data, ring-3 code/data, TSS) |
//! | `0x9000`            | TSS (64-bit, busy)                              |
//! | `0xA000`            | boot information ([`crate::abi::BootInfo`])     |
//! | `0x10000..0x100000` | stack (grows down from `0x100000`)              |
//! | `0x100000..`        | the guest image (ELF, loaded by `p_paddr`)       |
//! | after the image     | heap                                            |
//! | top of memory       | mailbox (header + payload)                      |
//! | `0x1_4000_0000`     | doorbell: no memory slot, any access exits      |

use crate::abi::{self, BootInfo, HEADER_LEN};

/// Page size.
pub const PAGE: u64 = 4096;
/// PML4 address.
pub const PML4: u64 = 0x1000;
/// PDPT address.
pub const PDPT: u64 = 0x2000;
/// First RAM page directory.
pub const PD_RAM: u64 = 0x3000;
/// Page directory of the doorbell region.
pub const PD_DOORBELL: u64 = 0x7000;
/// GDT address.
pub const GDT: u64 = 0x8000;
/// TSS address.
pub const TSS: u64 = 0x9000;
/// TSS limit (104-byte 64-bit TSS).
pub const TSS_LIMIT: u32 = 0x67;
/// Lowest stack address.
pub const STACK_BOTTOM: u64 = 0x10000;
/// Initial stack pointer: 8 below a 16-byte boundary, as at a SysV call.
pub const STACK_TOP: u64 = 0x100000 - 8;
/// Where guest images are linked.
pub const IMAGE_BASE: u64 = 0x100000;
/// The doorbell's guest-physical (and virtual) address.
pub const DOORBELL_GPA: u64 = 0x1_4000_0000;
/// Selectors: ring-3 code and data (RPL 3), TSS.
pub const USER_CS: u16 = 0x1b;
/// Ring-3 data selector.
pub const USER_DS: u16 = 0x23;
/// TSS selector.
pub const TSS_SEL: u16 = 0x28;
/// Most RAM the page tables map (4 page directories of 1 GiB).
pub const MAX_MEM: u64 = 4 << 30;
/// Smallest guest memory.
pub const MIN_MEM: u64 = 4 << 20;

/// Errors in a layout request or image.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    /// Memory size out of range or not whole MiB.
    #[error("memory size {0} bytes is not a whole number of MiB within 4 MiB..=4 GiB")]
    BadMemory(u64),
    /// The image is not a loadable static x86-64 ELF.
    #[error("guest image: {0}")]
    BadImage(String),
    /// Image, heap and mailbox do not fit in memory.
    #[error(
        "image ({image_end:#x}) and mailbox ({mailbox} bytes) do not fit in {mem} bytes of memory"
    )]
    TooSmall {
        /// End of the image.
        image_end: u64,
        /// Mailbox size.
        mailbox: u64,
        /// Memory size.
        mem: u64,
    },
}

/// A loadable segment of the guest image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical load address.
    pub gpa: u64,
    /// Bytes from the file.
    pub data: Vec<u8>,
    /// Size in memory (the rest is zero).
    pub mem_size: u64,
}

/// A parsed guest image.
#[derive(Clone, Debug)]
pub struct Image {
    /// Entry point.
    pub entry: u64,
    /// PT_LOAD segments.
    pub segments: Vec<Segment>,
}

fn rd<const N: usize>(b: &[u8], at: usize) -> Result<[u8; N], LayoutError> {
    b.get(at..at + N)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| LayoutError::BadImage("truncated ELF".into()))
}

impl Image {
    /// The entry point and end of the loaded image, checked like
    /// [`Image::parse`] but without copying segment data.
    pub fn parse_bounds(elf: &[u8]) -> Result<(u64, u64), LayoutError> {
        Self::parse_inner(elf, false).map(|i| (i.entry, i.end()))
    }

    /// Parses a static x86-64 ELF executable whose segments lie within
    /// `[IMAGE_BASE, MAX_MEM)`. Bounds-checked; never panics.
    pub fn parse(elf: &[u8]) -> Result<Self, LayoutError> {
        Self::parse_inner(elf, true)
    }

    fn parse_inner(elf: &[u8], copy: bool) -> Result<Self, LayoutError> {
        let bad = |m: &str| LayoutError::BadImage(m.to_string());
        if elf.get(0..4) != Some(b"\x7fELF") {
            return Err(bad("not an ELF file"));
        }
        if elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
            return Err(bad("not a little-endian 64-bit ELF"));
        }
        if u16::from_le_bytes(rd(elf, 18)?) != 62 {
            return Err(bad("not x86-64"));
        }
        let entry = u64::from_le_bytes(rd(elf, 24)?);
        let phoff = u64::from_le_bytes(rd(elf, 32)?) as usize;
        let phentsize = u16::from_le_bytes(rd(elf, 54)?) as usize;
        let phnum = u16::from_le_bytes(rd(elf, 56)?) as usize;
        if phentsize != 56 || phnum > 64 {
            return Err(bad("unexpected program header table"));
        }
        let mut segments = Vec::new();
        for i in 0..phnum {
            let ph = phoff
                .checked_add(i * 56)
                .and_then(|o| elf.get(o..o + 56))
                .ok_or_else(|| bad("program header out of bounds"))?;
            if u32::from_le_bytes(rd(ph, 0)?) != 1 {
                continue; // not PT_LOAD
            }
            let off = u64::from_le_bytes(rd(ph, 8)?) as usize;
            let gpa = u64::from_le_bytes(rd(ph, 24)?);
            let filesz = u64::from_le_bytes(rd(ph, 32)?) as usize;
            let mem_size = u64::from_le_bytes(rd(ph, 40)?);
            if (filesz as u64) > mem_size {
                return Err(bad("segment file size exceeds memory size"));
            }
            let end = gpa
                .checked_add(mem_size)
                .ok_or_else(|| bad("segment overflows"))?;
            if gpa < IMAGE_BASE || end > MAX_MEM {
                return Err(bad("segment outside the image area"));
            }
            let bytes = off
                .checked_add(filesz)
                .and_then(|e| elf.get(off..e))
                .ok_or_else(|| bad("segment data out of bounds"))?;
            let data = if copy { bytes.to_vec() } else { Vec::new() };
            segments.push(Segment {
                gpa,
                data,
                mem_size,
            });
        }
        if segments.is_empty() {
            return Err(bad("no loadable segments"));
        }
        if !segments
            .iter()
            .any(|s| entry >= s.gpa && entry < s.gpa + s.mem_size)
        {
            return Err(bad("entry point outside the loaded segments"));
        }
        Ok(Image { entry, segments })
    }

    /// End of the highest segment.
    pub fn end(&self) -> u64 {
        self.segments
            .iter()
            .map(|s| s.gpa + s.mem_size)
            .max()
            .unwrap_or(IMAGE_BASE)
    }
}

/// Where everything goes for one bubble.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Memory size in bytes.
    pub mem_size: u64,
    /// Mailbox address.
    pub mailbox_gpa: u64,
    /// Mailbox size (header + maximum payload, page-rounded).
    pub mailbox_size: u64,
    /// Heap start.
    pub heap_start: u64,
    /// Heap end.
    pub heap_end: u64,
}

fn round_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

impl Layout {
    /// Plans memory for an image; the mailbox holds a CALL of
    /// `max_payload` input bytes (plus op name) or a reply of that size.
    pub fn new(mem_size: u64, image_end: u64, max_payload: u64) -> Result<Self, LayoutError> {
        if !(MIN_MEM..=MAX_MEM).contains(&mem_size) || !mem_size.is_multiple_of(1 << 20) {
            return Err(LayoutError::BadMemory(mem_size));
        }
        let mailbox_size = round_up(
            HEADER_LEN as u64
                + abi::MAX_CALL_OVERHEAD as u64
                + max_payload.max(abi::MAX_TEXT_LEN as u64 + 2),
            PAGE,
        );
        let heap_start = round_up(image_end, PAGE);
        let too_small = LayoutError::TooSmall {
            image_end,
            mailbox: mailbox_size,
            mem: mem_size,
        };
        let mailbox_gpa = mem_size
            .checked_sub(mailbox_size)
            .ok_or(too_small.clone())?;
        // At least 256 KiB of heap.
        if heap_start + (256 << 10) > mailbox_gpa {
            return Err(too_small);
        }
        Ok(Layout {
            mem_size,
            mailbox_gpa,
            mailbox_size,
            heap_start,
            heap_end: mailbox_gpa,
        })
    }

    /// The boot information the guest reads.
    pub fn boot_info(&self) -> BootInfo {
        BootInfo {
            mem_size: self.mem_size,
            mailbox_gpa: self.mailbox_gpa,
            mailbox_size: self.mailbox_size,
            heap_start: self.heap_start,
            heap_end: self.heap_end,
            doorbell_gpa: DOORBELL_GPA,
        }
    }
}

/// A page the VMM writes at boot, with its contents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootPage {
    /// Guest-physical address (page-aligned).
    pub gpa: u64,
    /// The 4096 bytes.
    pub data: Vec<u8>,
}

/// A page of the loaded image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImagePage {
    /// Guest-physical address (page-aligned).
    pub gpa: u64,
    /// The page's bytes where it holds file bytes (zero-filled to the page);
    /// `None` for a page only zero-initialized memory (`.bss`) covers.
    pub data: Option<Vec<u8>>,
}

/// The initial vCPU state (identical on every boot of a layout).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitialVcpu {
    /// RIP (the image entry point).
    pub rip: u64,
    /// RSP.
    pub rsp: u64,
    /// RFLAGS.
    pub rflags: u64,
    /// CR0.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// EFER.
    pub efer: u64,
    /// CS selector.
    pub cs: u16,
    /// SS/DS/ES/FS/GS selector.
    pub ds: u16,
    /// TR selector.
    pub tr: u16,
    /// GDT base.
    pub gdt_base: u64,
    /// GDT limit.
    pub gdt_limit: u16,
    /// x87 control word.
    pub fcw: u16,
    /// MXCSR.
    pub mxcsr: u32,
}

/// CR0: PE | MP | ET | NE | WP | PG.
pub const CR0: u64 = 0x1 | 0x2 | 0x10 | 0x20 | 0x1_0000 | 0x8000_0000;
/// CR4: PAE | OSFXSR | OSXMMEXCPT.
pub const CR4: u64 = 0x20 | 0x200 | 0x400;
/// EFER: LME | LMA.
pub const EFER: u64 = 0x100 | 0x400;

/// The vCPU state a bubble starts in.
pub fn initial_vcpu(entry: u64) -> InitialVcpu {
    InitialVcpu {
        rip: entry,
        rsp: STACK_TOP,
        rflags: 0x2,
        cr0: CR0,
        cr3: PML4,
        cr4: CR4,
        efer: EFER,
        cs: USER_CS,
        ds: USER_DS,
        tr: TSS_SEL,
        gdt_base: GDT,
        gdt_limit: 7 * 8 - 1,
        fcw: 0x37f,
        mxcsr: 0x1f80,
    }
}

fn put64(page: &mut [u8], at: usize, v: u64) {
    page[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// The boot pages (tables, GDT, TSS, boot information), in address order.
pub fn boot_pages(layout: &Layout) -> Vec<BootPage> {
    let mut pages = Vec::new();
    let mut page = |gpa: u64, fill: &dyn Fn(&mut [u8])| {
        let mut data = vec![0u8; PAGE as usize];
        fill(&mut data);
        pages.push(BootPage { gpa, data });
    };
    // P | RW | US for table entries; + PS for 2 MiB leaves.
    const T: u64 = 0x7;
    const LEAF: u64 = 0x87;
    let gib = layout.mem_size.div_ceil(1 << 30);
    page(PML4, &|p| put64(p, 0, PDPT | T));
    page(PDPT, &|p| {
        for i in 0..gib {
            put64(p, (i * 8) as usize, (PD_RAM + i * PAGE) | T);
        }
        put64(p, ((DOORBELL_GPA >> 30) * 8) as usize, PD_DOORBELL | T);
    });
    for i in 0..gib {
        let base = i << 30;
        page(PD_RAM + i * PAGE, &|p| {
            for j in 0..512u64 {
                let addr = base + (j << 21);
                if addr < layout.mem_size {
                    put64(p, (j * 8) as usize, addr | LEAF);
                }
            }
        });
    }
    page(PD_DOORBELL, &|p| {
        put64(
            p,
            (((DOORBELL_GPA >> 21) & 511) * 8) as usize,
            (DOORBELL_GPA & !((2 << 20) - 1)) | LEAF,
        )
    });
    page(GDT, &|p| {
        put64(p, 8, 0x00af_9b00_0000_ffff); // ring-0 code (unused)
        put64(p, 16, 0x00cf_9300_0000_ffff); // ring-0 data (unused)
        put64(p, 24, 0x00af_fb00_0000_ffff); // ring-3 code, 64-bit
        put64(p, 32, 0x00cf_f300_0000_ffff); // ring-3 data
        let (base, limit) = (TSS, u64::from(TSS_LIMIT));
        let lo = (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | (0x8b << 40) // present, busy 64-bit TSS
            | (((limit >> 16) & 0xf) << 48)
            | (((base >> 24) & 0xff) << 56);
        put64(p, 40, lo);
        put64(p, 48, base >> 32);
    });
    page(TSS, &|p| {
        // RSP0 and the I/O map base (past the limit: no I/O bitmap).
        put64(p, 4, STACK_TOP + 8);
        p[102..104].copy_from_slice(&(TSS_LIMIT as u16 + 1).to_le_bytes());
    });
    let info = layout.boot_info().encode();
    page(abi::BOOT_INFO_GPA, &|p| {
        p[..info.len()].copy_from_slice(&info)
    });
    pages
}

/// The image's pages, in address order: pages holding file bytes
/// (zero-filled to whole pages), and pages only zero-initialized memory
/// (`.bss`) covers, without data.
pub fn image_pages(image: &Image) -> Vec<ImagePage> {
    let mut map = std::collections::BTreeMap::<u64, Option<Vec<u8>>>::new();
    for s in &image.segments {
        for (i, b) in s.data.iter().enumerate() {
            let a = s.gpa + i as u64;
            let pg = map
                .entry(a & !(PAGE - 1))
                .or_insert(None)
                .get_or_insert_with(|| vec![0u8; PAGE as usize]);
            pg[(a & (PAGE - 1)) as usize] = *b;
        }
    }
    for s in &image.segments {
        let mut g = s.gpa & !(PAGE - 1);
        while g < s.gpa + s.mem_size {
            map.entry(g).or_insert(None);
            g += PAGE;
        }
    }
    map.into_iter()
        .map(|(gpa, data)| ImagePage { gpa, data })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_are_checked() {
        assert!(Layout::new(4 << 20, IMAGE_BASE + 0x10000, 1 << 20).is_ok());
        assert_eq!(
            Layout::new(3 << 20, IMAGE_BASE, 0),
            Err(LayoutError::BadMemory(3 << 20))
        );
        assert!(Layout::new(5 << 20, IMAGE_BASE, 0).is_ok());
        assert!(Layout::new((5 << 20) + 4096, IMAGE_BASE, 0).is_err());
        assert!(Layout::new(8 << 30, IMAGE_BASE, 0).is_err());
        assert!(matches!(
            Layout::new(4 << 20, IMAGE_BASE + 0x10000, 3 << 20),
            Err(LayoutError::TooSmall { .. })
        ));
        let l = Layout::new(4096 << 20, IMAGE_BASE + 0x10000, 1 << 20).unwrap();
        assert_eq!(l.mailbox_gpa + l.mailbox_size, 4096 << 20);
    }

    #[test]
    fn hostile_elves_are_refused_without_panics() {
        let good = include_bytes!(env!("BUBBLE_SHIM_ELF"));
        assert!(Image::parse(good).is_ok());
        // Every truncation and many single-byte corruptions parse or fail
        // cleanly.
        for n in 0..good.len().min(512) {
            let _ = Image::parse(&good[..n]);
        }
        for i in 0..256 {
            let mut b = good.to_vec();
            b[i] ^= 0xff;
            let _ = Image::parse(&b);
        }
        assert!(Image::parse(b"").is_err());
        assert!(Image::parse(b"\x7fELF").is_err());
    }

    #[test]
    fn image_pages_are_ordered_page_sized_and_cover_the_image() {
        let img = Image::parse(include_bytes!(env!("BUBBLE_SHIM_ELF"))).unwrap();
        let a = image_pages(&img);
        assert!(a.windows(2).all(|w| w[0].gpa < w[1].gpa));
        assert!(
            a.iter()
                .all(|p| p.gpa % PAGE == 0
                    && p.data.as_ref().is_none_or(|d| d.len() == PAGE as usize))
        );
        assert!(a.iter().any(|p| p.data.is_some()));
        // Every byte of every segment lies in a listed page.
        for s in &img.segments {
            let last = (s.gpa + s.mem_size - 1) & !(PAGE - 1);
            assert!(a.iter().any(|p| p.gpa == s.gpa & !(PAGE - 1)));
            assert!(a.iter().any(|p| p.gpa == last));
        }
    }
}
