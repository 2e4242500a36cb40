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
/// GPA at which SNP measures the VMSA of vCPU 0 (`u64::MAX`, page-aligned,
/// bits above 51 cleared).
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

/// One PAGE_INFO update with the page already hashed: what a loader
/// records as it places a page, and what the chain folds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageInfo {
    /// Guest-physical address.
    pub gpa: u64,
    /// Type.
    pub page_type: PageType,
    /// SHA-384 of the page for NORMAL and VMSA pages, zero otherwise.
    pub contents: [u8; 48],
}

impl PageType {
    /// Whether PAGE_INFO carries the page's SHA-384 (NORMAL, VMSA) or zero.
    pub fn hashes_contents(self) -> bool {
        matches!(self, PageType::Normal | PageType::Vmsa)
    }

    /// The type of a PAGE_INFO type byte.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => PageType::Normal,
            2 => PageType::Vmsa,
            3 => PageType::Zero,
            4 => PageType::Unmeasured,
            5 => PageType::Secrets,
            6 => PageType::Cpuid,
            _ => return None,
        })
    }

    /// Lower-case name (as `sev-snp-measure` and `--explain` spell it).
    pub fn name(self) -> &'static str {
        match self {
            PageType::Normal => "normal",
            PageType::Vmsa => "vmsa",
            PageType::Zero => "zero",
            PageType::Unmeasured => "unmeasured",
            PageType::Secrets => "secrets",
            PageType::Cpuid => "cpuid",
        }
    }
}

impl PageInfo {
    /// The update of a page of type `page_type` holding `contents`
    /// (hashed only for the types whose PAGE_INFO carries a hash).
    pub fn of(gpa: u64, page_type: PageType, contents: &[u8]) -> Self {
        let contents = if page_type.hashes_contents() {
            Sha384::digest(contents).into()
        } else {
            [0u8; 48]
        };
        PageInfo {
            gpa,
            page_type,
            contents,
        }
    }
}

/// Extends `digest` with one hashed page.
pub fn extend_info(digest: &[u8; 48], u: &PageInfo) -> [u8; 48] {
    let mut info = [0u8; 0x70];
    info[..48].copy_from_slice(digest);
    info[48..96].copy_from_slice(&u.contents);
    info[96..98].copy_from_slice(&0x70u16.to_le_bytes());
    info[98] = u.page_type as u8;
    // imi_page (99), vmpl3/2/1 perms and reserved (100..104) stay zero.
    info[104..112].copy_from_slice(&u.gpa.to_le_bytes());
    Sha384::digest(info).into()
}

/// Extends `digest` with one page.
pub fn extend(digest: &[u8; 48], u: &PageUpdate<'_>) -> [u8; 48] {
    extend_info(digest, &PageInfo::of(u.gpa, u.page_type, u.contents))
}

/// The launch digest of a sequence of updates.
pub fn launch_digest<'a>(updates: impl IntoIterator<Item = PageUpdate<'a>>) -> [u8; 48] {
    updates.into_iter().fold([0u8; 48], |d, u| extend(&d, &u))
}

/// The launch digest of a sequence of hashed updates.
pub fn fold(updates: impl IntoIterator<Item = PageInfo>) -> [u8; 48] {
    updates
        .into_iter()
        .fold([0u8; 48], |d, u| extend_info(&d, &u))
}

/// A segment register as the SEV-ES save area holds it (`struct vmcb_seg`):
/// selector, attributes (VMCB format: type 0–3, S 4, DPL 5–6, P 7, AVL 8,
/// L 9, D/B 10, G 11), limit, base.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmsaSegment {
    /// Selector.
    pub selector: u16,
    /// Attributes, VMCB format.
    pub attrib: u16,
    /// Limit.
    pub limit: u32,
    /// Base.
    pub base: u64,
}

/// The initial vCPU state of a bubble, as the SEV-ES save area (VMSA)
/// measures it. Fields not listed here are zero in the page.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmsaState {
    /// ES.
    pub es: VmsaSegment,
    /// CS.
    pub cs: VmsaSegment,
    /// SS.
    pub ss: VmsaSegment,
    /// DS.
    pub ds: VmsaSegment,
    /// FS.
    pub fs: VmsaSegment,
    /// GS.
    pub gs: VmsaSegment,
    /// GDTR (limit and base).
    pub gdtr: VmsaSegment,
    /// LDTR.
    pub ldtr: VmsaSegment,
    /// IDTR (limit and base).
    pub idtr: VmsaSegment,
    /// TR.
    pub tr: VmsaSegment,
    /// Current privilege level.
    pub cpl: u8,
    /// EFER.
    pub efer: u64,
    /// CR4.
    pub cr4: u64,
    /// CR3.
    pub cr3: u64,
    /// CR0.
    pub cr0: u64,
    /// DR7.
    pub dr7: u64,
    /// DR6.
    pub dr6: u64,
    /// RFLAGS.
    pub rflags: u64,
    /// RIP.
    pub rip: u64,
    /// RSP.
    pub rsp: u64,
    /// PAT MSR.
    pub g_pat: u64,
    /// XCR0.
    pub xcr0: u64,
    /// MXCSR.
    pub mxcsr: u32,
    /// x87 control word.
    pub x87_fcw: u16,
}

/// Offsets in the SEV-ES save area (AMD APM vol. 2, table B-4; Linux
/// `struct sev_es_save_area`).
pub mod vmsa_offset {
    /// ES; CS, SS, DS, FS, GS, GDTR, LDTR, IDTR, TR follow every 0x10.
    pub const ES: usize = 0x000;
    /// CPL.
    pub const CPL: usize = 0x0CB;
    /// EFER.
    pub const EFER: usize = 0x0D0;
    /// CR4.
    pub const CR4: usize = 0x148;
    /// CR3.
    pub const CR3: usize = 0x150;
    /// CR0.
    pub const CR0: usize = 0x158;
    /// DR7.
    pub const DR7: usize = 0x160;
    /// DR6.
    pub const DR6: usize = 0x168;
    /// RFLAGS.
    pub const RFLAGS: usize = 0x170;
    /// RIP.
    pub const RIP: usize = 0x178;
    /// RSP.
    pub const RSP: usize = 0x1D8;
    /// G_PAT.
    pub const G_PAT: usize = 0x268;
    /// XCR0.
    pub const XCR0: usize = 0x3E8;
    /// MXCSR.
    pub const MXCSR: usize = 0x408;
    /// x87 FCW.
    pub const X87_FCW: usize = 0x410;
}

/// The VMSA page of `s` in the SEV-ES save-area layout (see
/// [`vmsa_offset`]); every other byte is zero.
pub fn vmsa_page(s: &VmsaState) -> [u8; PAGE] {
    use vmsa_offset as o;
    let mut p = [0u8; PAGE];
    let mut put = |at: usize, b: &[u8]| p[at..at + b.len()].copy_from_slice(b);
    let segs = [
        s.es, s.cs, s.ss, s.ds, s.fs, s.gs, s.gdtr, s.ldtr, s.idtr, s.tr,
    ];
    for (i, g) in segs.iter().enumerate() {
        let at = o::ES + 0x10 * i;
        put(at, &g.selector.to_le_bytes());
        put(at + 2, &g.attrib.to_le_bytes());
        put(at + 4, &g.limit.to_le_bytes());
        put(at + 8, &g.base.to_le_bytes());
    }
    put(o::CPL, &[s.cpl]);
    for (at, v) in [
        (o::EFER, s.efer),
        (o::CR4, s.cr4),
        (o::CR3, s.cr3),
        (o::CR0, s.cr0),
        (o::DR7, s.dr7),
        (o::DR6, s.dr6),
        (o::RFLAGS, s.rflags),
        (o::RIP, s.rip),
        (o::RSP, s.rsp),
        (o::G_PAT, s.g_pat),
        (o::XCR0, s.xcr0),
    ] {
        put(at, &v.to_le_bytes());
    }
    put(o::MXCSR, &s.mxcsr.to_le_bytes());
    put(o::X87_FCW, &s.x87_fcw.to_le_bytes());
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
