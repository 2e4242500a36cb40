//! The launch measurement of a bubble: the SEV-SNP launch digest over the
//! pages the VMM places in guest memory, recorded as it places them
//! ([`crate::load`]), and the initial vCPU state as a VMSA page.
//!
//! Each entry is one `SNP_LAUNCH_UPDATE` PAGE_INFO (see
//! [`bubble_attestation::measure`]): NORMAL pages carry the SHA-384 of the
//! bytes written, ZERO and UNMEASURED ranges only their addresses. The
//! chain itself is folded on first use (the first attestation), not on the
//! create path; the record keeps only 48-byte page digests, never pages.

use std::sync::OnceLock;

use bubble_attestation::measure::{self, PageInfo, PageType, VmsaSegment, VmsaState};
use kvm_bindings::kvm_segment;

use crate::control::{LaunchMeasurement, LaunchOrigin};
use crate::layout::{self, InitialVcpu, PAGE};

/// One entry of the record: a hashed page or a run of pages of a type
/// without contents.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Entry {
    /// A page with its PAGE_INFO (NORMAL or VMSA).
    Page(PageInfo),
    /// `pages` consecutive pages from `gpa` of a contents-less type.
    Run {
        gpa: u64,
        pages: u64,
        page_type: PageType,
    },
}

/// A range of the record: one page with its content hash, or a run of
/// pages of a type whose PAGE_INFO carries no content hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchRange {
    /// First guest-physical address.
    pub gpa: u64,
    /// Length in bytes (whole pages).
    pub len: u64,
    /// Page type.
    pub page_type: PageType,
    /// SHA-384 of the page (NORMAL and VMSA pages).
    pub sha384: Option<[u8; 48]>,
}

/// The measured pages of a bubble in load order, and their launch digest.
#[derive(Debug, Default)]
pub struct LaunchLog {
    entries: Vec<Entry>,
    digest: OnceLock<[u8; 48]>,
}

impl PartialEq for LaunchLog {
    fn eq(&self, other: &Self) -> bool {
        self.entries == other.entries
    }
}

impl LaunchLog {
    /// An empty record.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a NORMAL page: `contents` are the bytes placed at `gpa`.
    pub fn normal(&mut self, gpa: u64, contents: &[u8]) {
        self.hashed(PageInfo::of(gpa, PageType::Normal, contents));
    }

    /// Records a page hashed elsewhere (a shared image's pages, hashed once
    /// from the bytes written into it).
    pub fn hashed(&mut self, info: PageInfo) {
        if info.page_type.hashes_contents() {
            self.entries.push(Entry::Page(info));
        } else {
            self.run(info.gpa, PAGE, info.page_type);
        }
    }

    /// Records `len` bytes (whole pages) from `gpa` as pages of a type
    /// without contents (ZERO, UNMEASURED, …); adjacent runs merge.
    pub fn run(&mut self, gpa: u64, len: u64, page_type: PageType) {
        let pages = len / PAGE;
        if pages == 0 {
            return;
        }
        if let Some(Entry::Run {
            gpa: g,
            pages: n,
            page_type: t,
        }) = self.entries.last_mut()
        {
            if *t == page_type && *g + *n * PAGE == gpa {
                *n += pages;
                return;
            }
        }
        self.entries.push(Entry::Run {
            gpa,
            pages,
            page_type,
        });
    }

    /// Records the initial vCPU state as the VMSA page.
    pub fn vmsa(&mut self, state: &VmsaState) {
        let page = measure::vmsa_page(state);
        self.entries.push(Entry::Page(PageInfo::of(
            measure::VMSA_GPA,
            PageType::Vmsa,
            &page,
        )));
    }

    /// Every PAGE_INFO update, in order.
    pub fn pages(&self) -> impl Iterator<Item = PageInfo> + '_ {
        self.entries.iter().flat_map(|e| {
            let (one, run) = match *e {
                Entry::Page(p) => (Some(p), None),
                Entry::Run {
                    gpa,
                    pages,
                    page_type,
                } => (None, Some((gpa, pages, page_type))),
            };
            one.into_iter()
                .chain(run.into_iter().flat_map(|(gpa, n, t)| {
                    (0..n).map(move |i| PageInfo {
                        gpa: gpa + i * PAGE,
                        page_type: t,
                        contents: [0u8; 48],
                    })
                }))
        })
    }

    /// The record as ranges, in order: one per hashed page (with its
    /// SHA-384) and one per run of contents-less pages (`--explain`).
    pub fn ranges(&self) -> impl Iterator<Item = LaunchRange> + '_ {
        self.entries.iter().map(|e| match *e {
            Entry::Page(p) => LaunchRange {
                gpa: p.gpa,
                len: PAGE,
                page_type: p.page_type,
                sha384: Some(p.contents),
            },
            Entry::Run {
                gpa,
                pages,
                page_type,
            } => LaunchRange {
                gpa,
                len: pages * PAGE,
                page_type,
                sha384: None,
            },
        })
    }

    /// The launch digest (folded once, then remembered).
    pub fn digest(&self) -> [u8; 48] {
        *self.digest.get_or_init(|| measure::fold(self.pages()))
    }
}

/// What a VM knows of its launch measurement.
#[derive(Debug)]
pub enum Launch {
    /// Loaded by this VMM: the record of what it placed.
    Measured(LaunchLog),
    /// Restored: the launch digest its (authenticated) snapshot carries; a
    /// restored VM is not launched again.
    Carried([u8; 48]),
    /// Not known: a VM being restored, or restored from a snapshot made
    /// before snapshots carried the digest.
    Unknown,
}

impl Launch {
    /// The launch digest, if known.
    pub fn digest(&self) -> Option<[u8; 48]> {
        match self {
            Launch::Measured(l) => Some(l.digest()),
            Launch::Carried(d) => Some(*d),
            Launch::Unknown => None,
        }
    }

    /// The answer to a `MEASUREMENT` request (folded on first use), or
    /// `None` when the digest is not known.
    pub fn answer(&self) -> Option<LaunchMeasurement> {
        let origin = match self {
            Launch::Measured(_) => LaunchOrigin::Measured,
            Launch::Carried(_) => LaunchOrigin::Restored,
            Launch::Unknown => return None,
        };
        Some(LaunchMeasurement {
            origin,
            digest: self.digest()?,
        })
    }
}

/// The segment registers a bubble's vCPU starts with (shared by the KVM
/// setup and the VMSA, so both describe the same state).
#[derive(Clone, Copy, Debug)]
pub struct Segments {
    /// CS: 64-bit ring-3 code.
    pub cs: kvm_segment,
    /// SS, DS, ES, FS, GS: ring-3 data.
    pub data: kvm_segment,
    /// TR: the busy 64-bit TSS.
    pub tr: kvm_segment,
}

fn user_seg(selector: u16, type_: u8, l: u8, db: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 3,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The segments of `v`.
pub fn segments(v: &InitialVcpu) -> Segments {
    Segments {
        cs: user_seg(v.cs, 0xb, 1, 0),
        data: user_seg(v.ds, 0x3, 0, 1),
        tr: kvm_segment {
            base: layout::TSS,
            limit: layout::TSS_LIMIT,
            selector: v.tr,
            type_: 0xb,
            present: 1,
            dpl: 0,
            db: 0,
            s: 0,
            l: 0,
            g: 0,
            avl: 0,
            unusable: 0,
            padding: 0,
        },
    }
}

/// A KVM segment in the save area's form (VMCB attribute bits).
fn vmsa_seg(s: &kvm_segment) -> VmsaSegment {
    let attrib = u16::from(s.type_ & 0xf)
        | u16::from(s.s & 1) << 4
        | u16::from(s.dpl & 3) << 5
        | u16::from(s.present & 1) << 7
        | u16::from(s.avl & 1) << 8
        | u16::from(s.l & 1) << 9
        | u16::from(s.db & 1) << 10
        | u16::from(s.g & 1) << 11;
    VmsaSegment {
        selector: s.selector,
        attrib,
        limit: s.limit,
        base: s.base,
    }
}

/// Reset values a new KVM vCPU has and the VMM leaves as they are.
pub const RESET_DR6: u64 = 0xffff_0ff0;
/// DR7 at reset.
pub const RESET_DR7: u64 = 0x400;
/// PAT at reset.
pub const RESET_PAT: u64 = 0x0007_0406_0007_0406;
/// XCR0 at reset (x87 only).
pub const RESET_XCR0: u64 = 1;
/// LDTR at reset: null selector, limit 0xFFFF, present LDT (type 2).
pub const RESET_LDTR: VmsaSegment = VmsaSegment {
    selector: 0,
    attrib: 0x82,
    limit: 0xffff,
    base: 0,
};

/// The VMSA of a bubble's initial vCPU state `v`: what the VMM loads into
/// the vCPU (segments, descriptor tables, control registers, RIP, RSP,
/// RFLAGS, FCW, MXCSR; IDTR empty) plus the reset values it keeps (LDTR,
/// DR6, DR7, PAT, XCR0); CPL 3, the DPL of CS. A test reads the state back
/// from KVM and compares.
pub fn vmsa_state(v: &InitialVcpu) -> VmsaState {
    let s = segments(v);
    let d = vmsa_seg(&s.data);
    VmsaState {
        es: d,
        cs: vmsa_seg(&s.cs),
        ss: d,
        ds: d,
        fs: d,
        gs: d,
        gdtr: VmsaSegment {
            limit: u32::from(v.gdt_limit),
            base: v.gdt_base,
            ..VmsaSegment::default()
        },
        ldtr: RESET_LDTR,
        idtr: VmsaSegment::default(),
        tr: vmsa_seg(&s.tr),
        cpl: s.cs.dpl,
        efer: v.efer,
        cr4: v.cr4,
        cr3: v.cr3,
        cr0: v.cr0,
        dr7: RESET_DR7,
        dr6: RESET_DR6,
        rflags: v.rflags,
        rip: v.rip,
        rsp: v.rsp,
        g_pat: RESET_PAT,
        xcr0: RESET_XCR0,
        mxcsr: v.mxcsr,
        x87_fcw: v.fcw,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_and_expand_in_order() {
        let mut l = LaunchLog::new();
        l.normal(0x1000, &[1u8; 4096]);
        l.run(0x2000, 2 * PAGE, PageType::Zero);
        l.run(0x4000, PAGE, PageType::Zero);
        l.run(0x5000, PAGE, PageType::Unmeasured);
        let p: Vec<_> = l.pages().collect();
        assert_eq!(l.entries.len(), 3);
        assert_eq!(
            p.iter().map(|p| (p.gpa, p.page_type)).collect::<Vec<_>>(),
            vec![
                (0x1000, PageType::Normal),
                (0x2000, PageType::Zero),
                (0x3000, PageType::Zero),
                (0x4000, PageType::Zero),
                (0x5000, PageType::Unmeasured),
            ]
        );
        // Folding the expanded list equals folding page by page.
        let pages = [[1u8; 4096], [0u8; 4096]];
        let want = measure::launch_digest(
            [
                (0x1000, PageType::Normal, &pages[0]),
                (0x2000, PageType::Zero, &pages[1]),
                (0x3000, PageType::Zero, &pages[1]),
                (0x4000, PageType::Zero, &pages[1]),
                (0x5000, PageType::Unmeasured, &pages[1]),
            ]
            .map(|(gpa, page_type, c)| measure::PageUpdate {
                gpa,
                page_type,
                contents: &c[..],
            }),
        );
        assert_eq!(l.digest(), want);
    }

    #[test]
    fn vmsa_attributes_are_the_vmcb_encoding() {
        let v = layout::initial_vcpu(0x100000);
        let s = vmsa_state(&v);
        // 64-bit ring-3 code: type 0xb, S, DPL 3, P, L, G.
        assert_eq!(
            s.cs.attrib,
            0xb | 1 << 4 | 3 << 5 | 1 << 7 | 1 << 9 | 1 << 11
        );
        assert_eq!(s.cpl, 3);
        assert_eq!(s.tr.base, layout::TSS);
        assert_eq!(s.rsp % 16, 8);
    }

    /// The VMSA describes the vCPU state KVM actually holds before the
    /// first instruction.
    #[test]
    fn the_vmsa_is_the_state_kvm_holds() {
        let vm = crate::vm::Vm::with_code(&crate::images::floor_code(), 16 << 20, 1 << 20).unwrap();
        let v = vm.vcpu();
        let (sr, r) = (v.get_sregs().unwrap(), v.get_regs().unwrap());
        let xcr0 = v.get_xcrs().unwrap().xcrs[0].value;
        // x87/SSE control state from the XSAVE legacy area (FCW at byte 0,
        // MXCSR at byte 24): KVM_GET_FPU here reports MXCSR 0 although
        // the vCPU holds the 0x1F80 KVM_SET_FPU gave it.
        let xs = v.get_xsave().unwrap();
        let dbg = v.get_debug_regs().unwrap();
        let mut msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index: 0x277, // IA32_PAT
            ..Default::default()
        }])
        .unwrap();
        assert_eq!(v.get_msrs(&mut msrs).unwrap(), 1);
        let dt = |d: &kvm_bindings::kvm_dtable| VmsaSegment {
            limit: u32::from(d.limit),
            base: d.base,
            ..VmsaSegment::default()
        };
        let held = VmsaState {
            es: vmsa_seg(&sr.es),
            cs: vmsa_seg(&sr.cs),
            ss: vmsa_seg(&sr.ss),
            ds: vmsa_seg(&sr.ds),
            fs: vmsa_seg(&sr.fs),
            gs: vmsa_seg(&sr.gs),
            gdtr: dt(&sr.gdt),
            ldtr: vmsa_seg(&sr.ldt),
            idtr: dt(&sr.idt),
            tr: vmsa_seg(&sr.tr),
            cpl: sr.cs.dpl,
            efer: sr.efer,
            cr4: sr.cr4,
            cr3: sr.cr3,
            cr0: sr.cr0,
            dr7: dbg.dr7,
            dr6: dbg.dr6,
            rflags: r.rflags,
            rip: r.rip,
            rsp: r.rsp,
            g_pat: msrs.as_slice()[0].data,
            xcr0,
            mxcsr: xs.region[6],
            x87_fcw: (xs.region[0] & 0xffff) as u16,
        };
        let want = vmsa_state(&layout::initial_vcpu(layout::IMAGE_BASE));
        assert_eq!(held, want);
        // And that is what the VM recorded last.
        let Launch::Measured(log) = vm.launch() else {
            panic!("a loaded VM is measured")
        };
        let last = log.pages().last().unwrap();
        assert_eq!(
            last,
            PageInfo::of(
                measure::VMSA_GPA,
                PageType::Vmsa,
                &measure::vmsa_page(&want)
            )
        );
    }
}
