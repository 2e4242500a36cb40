//! The SEV-SNP launch digest (AMD SEV-SNP ABI, `SNP_LAUNCH_UPDATE` and
//! the `PAGE_INFO` structure), computed in software over a bubble's
//! initial pages and vCPU state, so that `bubblectl measure` reproduces the
//! MEASUREMENT a bubble reports, byte for byte, offline.
//!
//! For each page, in order:
//! `digest = SHA-384(PAGE_INFO)` where `PAGE_INFO` (0x70 bytes) is
//! `digest_cur[48] ‖ contents[48] ‖ length u16 = 0x70 ‖ page_type u8 ‖
//! imi_page u8 ‖ vmpl3_perms u8 ‖ vmpl2_perms u8 ‖ vmpl1_perms u8 ‖
//! reserved u8 ‖ gpa u64`, all little-endian. `contents` is SHA-384 of the
//! page for NORMAL and VMSA pages and zero for ZERO, UNMEASURED, SECRETS
//! and CPUID pages. The digest starts at zero.

use sha2::{Digest, Sha384};

/// Page size.
pub const PAGE: usize = 4096;
/// GPA at which SNP measures the VMSA of vCPU 0.
pub const VMSA_GPA: u64 = 0xFFFF_FFFF_F000;

/// PAGE_INFO page types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PageType {
    /// Measured contents.
    Normal = 1,
    /// A vCPU save area.
    Vmsa = 2,
    /// A zero page.
    Zero = 3,
    /// Unmeasured.
    Unmeasured = 4,
    /// Secrets page.
    Secrets = 5,
    /// CPUID page.
    Cpuid = 6,
}

/// One PAGE_INFO update.
#[derive(Clone, Copy, Debug)]
pub struct PageUpdate<'a> {
    /// Guest-physical address.
    pub gpa: u64,
    /// Type.
    pub page_type: PageType,
    /// The page (4096 bytes; ignored for zero-content types).
    pub contents: &'a [u8],
}

/// Extends `digest` with one page.
pub fn extend(digest: &[u8; 48], u: &PageUpdate<'_>) -> [u8; 48] {
    let contents: [u8; 48] = match u.page_type {
        PageType::Normal | PageType::Vmsa => Sha384::digest(u.contents).into(),
        _ => [0u8; 48],
    };
    let mut info = [0u8; 0x70];
    info[..48].copy_from_slice(digest);
    info[48..96].copy_from_slice(&contents);
    info[96..98].copy_from_slice(&0x70u16.to_le_bytes());
    info[98] = u.page_type as u8;
    info[99] = 0; // imi_page
                  // vmpl3/2/1 perms and reserved stay zero.
    info[104..112].copy_from_slice(&u.gpa.to_le_bytes());
    Sha384::digest(info).into()
}

/// The launch digest of a sequence of updates.
pub fn launch_digest<'a>(updates: impl IntoIterator<Item = PageUpdate<'a>>) -> [u8; 48] {
    updates.into_iter().fold([0u8; 48], |d, u| extend(&d, &u))
}

/// The initial register state of a bubble's vCPU, as measured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuState {
    /// RIP.
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
    /// Data selectors.
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

/// The name the VMM-facing API uses for [`VcpuState`].
pub type InitialVcpuState = VcpuState;

/// A VMSA-like page with the state at SEV-ES save-area offsets: segment
/// selectors (ES 0x000, CS 0x010, SS 0x020, DS 0x030, FS 0x040, GS 0x050,
/// TR 0x090), GDTR limit/base (0x064/0x068), EFER 0x0D0, CR4 0x148,
/// CR3 0x150, CR0 0x158, RFLAGS 0x170, RIP 0x178, RSP 0x1D8, MXCSR 0x3E8,
/// FCW 0x3F0. Everything else is zero.
pub fn vmsa_page(s: &VcpuState) -> [u8; PAGE] {
    let mut p = [0u8; PAGE];
    let mut put = |at: usize, b: &[u8]| p[at..at + b.len()].copy_from_slice(b);
    for at in [0x000, 0x020, 0x030, 0x040, 0x050] {
        put(at, &s.ds.to_le_bytes());
    }
    put(0x010, &s.cs.to_le_bytes());
    put(0x090, &s.tr.to_le_bytes());
    put(0x064, &u32::from(s.gdt_limit).to_le_bytes());
    put(0x068, &s.gdt_base.to_le_bytes());
    put(0x0D0, &s.efer.to_le_bytes());
    put(0x148, &s.cr4.to_le_bytes());
    put(0x150, &s.cr3.to_le_bytes());
    put(0x158, &s.cr0.to_le_bytes());
    put(0x170, &s.rflags.to_le_bytes());
    put(0x178, &s.rip.to_le_bytes());
    put(0x1D8, &s.rsp.to_le_bytes());
    put(0x3E8, &s.mxcsr.to_le_bytes());
    put(0x3F0, &s.fcw.to_le_bytes());
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vectors computed independently from the AMD spec's PAGE_INFO
    /// definition with Python's hashlib (tests/vectors/gen_vectors.py).
    #[test]
    fn matches_independent_python_vectors() {
        let text = include_str!("../tests/vectors/launch_digest.txt");
        let mut n = 0;
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        {
            let mut it = line.split_whitespace();
            let name = it.next().unwrap();
            let want = it.next().unwrap();
            let pages = vector_pages(name);
            let got = launch_digest(pages.iter().map(|(gpa, t, c)| PageUpdate {
                gpa: *gpa,
                page_type: *t,
                contents: c,
            }));
            assert_eq!(hex::encode(got), want, "vector {name}");
            n += 1;
        }
        assert!(n >= 4);
    }

    /// The pages of each named vector (mirrors gen_vectors.py).
    fn vector_pages(name: &str) -> Vec<(u64, PageType, Vec<u8>)> {
        let fill = |b: u8| vec![b; PAGE];
        let ramp: Vec<u8> = (0..PAGE).map(|i| (i % 251) as u8).collect();
        match name {
            "one_normal" => vec![(0x1000, PageType::Normal, fill(0xAB))],
            "mixed" => vec![
                (0x1000, PageType::Normal, ramp.clone()),
                (0x2000, PageType::Zero, fill(0)),
                (0x3000, PageType::Normal, fill(0x00)),
                (0x100000, PageType::Normal, fill(0x5A)),
            ],
            "with_vmsa" => vec![
                (0x1000, PageType::Normal, ramp.clone()),
                (VMSA_GPA, PageType::Vmsa, fill(0x11)),
            ],
            "all_types" => vec![
                (0x0, PageType::Normal, ramp.clone()),
                (0x5000, PageType::Zero, fill(0)),
                (0x6000, PageType::Unmeasured, fill(0)),
                (0x7000, PageType::Secrets, fill(0)),
                (0x8000, PageType::Cpuid, fill(0)),
                (0x7FFF_F000, PageType::Normal, fill(0xFF)),
                (VMSA_GPA, PageType::Vmsa, ramp),
            ],
            other => panic!("unknown vector {other}"),
        }
    }
}
