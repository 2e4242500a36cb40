//! Guest images: the measured guest shim, and hostile test guests written
//! as raw x86-64 machine code against the same layout.

use crate::abi::{MsgType, ABI_VERSION, MAGIC};
use crate::layout::{self, Layout};

/// The guest shim ELF, built by this crate's build script.
pub static SHIM_ELF: &[u8] = include_bytes!(env!("BUBBLE_SHIM_ELF"));

static SHARED_SHIM: std::sync::OnceLock<Option<crate::shared_image::SharedImage>> =
    std::sync::OnceLock::new();

/// Descriptor of this process's shared, sealed copy of the laid-out shim
/// (made on first use; `None` if the kernel refused), for VMM children to
/// inherit and map. Call it before starting VMM processes.
pub fn shared_shim_fd() -> Option<i32> {
    SHARED_SHIM
        .get_or_init(|| crate::shared_image::SharedImage::create(SHIM_ELF).ok())
        .as_ref()
        .map(|i| i.raw_fd())
}

/// Misbehaving guests, for tests of the VMM's defences.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HostileKind {
    /// Writes garbage over the mailbox header and rings the doorbell.
    Garbage,
    /// Announces a message longer than the mailbox.
    Oversized,
    /// Rings the doorbell with LOG messages in a tight loop.
    Flood,
    /// Executes `ud2` with no IDT: a triple fault.
    TripleFault,
    /// Says READY, then spins forever when called.
    Spin,
    /// Touches an MMIO address that is not the doorbell.
    StrayMmio,
    /// Says READY, then answers a call with an AWAITING whose key length
    /// (200) is over the limit and whose bytes are garbage.
    BadAwait,
    /// Says READY_EARLY, then spins instead of finishing its start-up.
    EarlySpin,
    /// Says READY_EARLY, then (after a busy wait of tens of ms) writes
    /// garbage over the mailbox header and rings the doorbell instead of
    /// saying READY.
    EarlyGarbage,
}

impl HostileKind {
    /// Every kind.
    pub const ALL: &'static [HostileKind] = &[
        HostileKind::Garbage,
        HostileKind::Oversized,
        HostileKind::Flood,
        HostileKind::TripleFault,
        HostileKind::Spin,
        HostileKind::StrayMmio,
        HostileKind::BadAwait,
        HostileKind::EarlySpin,
        HostileKind::EarlyGarbage,
    ];

    /// Its name (`test:<name>` images in the broker).
    pub fn name(&self) -> &'static str {
        match self {
            HostileKind::Garbage => "garbage",
            HostileKind::Oversized => "oversized",
            HostileKind::Flood => "flood",
            HostileKind::TripleFault => "triple-fault",
            HostileKind::Spin => "spin",
            HostileKind::StrayMmio => "stray-mmio",
            HostileKind::BadAwait => "bad-await",
            HostileKind::EarlySpin => "early-spin",
            HostileKind::EarlyGarbage => "early-garbage",
        }
    }

    /// Parses a name.
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|k| k.name() == s)
    }
}

/// A tiny x86-64 code emitter for test guests.
struct Asm(Vec<u8>);

impl Asm {
    fn mov_rbx(&mut self, v: u64) {
        self.0.extend([0x48, 0xbb]);
        self.0.extend(v.to_le_bytes());
    }
    fn mov_rax(&mut self, v: u64) {
        self.0.extend([0x48, 0xb8]);
        self.0.extend(v.to_le_bytes());
    }
    /// mov [rbx + disp8], rax
    fn store_rax(&mut self, disp: u8) {
        self.0.extend([0x48, 0x89, 0x43, disp]);
    }
    /// mov dword [rbx], eax
    fn store_eax(&mut self) {
        self.0.extend([0x89, 0x03]);
    }
    /// Busy-waits `n` iterations (`mov rcx, n; 1: dec rcx; jnz 1b`).
    fn busy(&mut self, n: u64) {
        self.0.extend([0x48, 0xb9]);
        self.0.extend(n.to_le_bytes());
        let top = self.here();
        self.0.extend([0x48, 0xff, 0xc9]);
        let rel = top as i64 - (self.0.len() as i64 + 2);
        self.0.extend([0x75, rel as i8 as u8]);
    }
    fn here(&self) -> usize {
        self.0.len()
    }
    fn jmp_to(&mut self, target: usize) {
        let rel = target as i64 - (self.0.len() as i64 + 2);
        self.0.extend([0xeb, rel as i8 as u8]);
    }
    fn ring(&mut self) {
        self.mov_rbx(layout::DOORBELL_GPA);
        self.store_eax();
    }
    /// Writes the first 16 header bytes (magic, version, type, length).
    fn header(&mut self, mailbox: u64, ty: u16, len: u32) {
        self.mov_rbx(mailbox);
        self.mov_rax(u64::from(MAGIC) | (u64::from(ABI_VERSION) << 32) | (u64::from(ty) << 48));
        self.store_rax(0);
        self.mov_rax(u64::from(len));
        self.store_rax(8);
    }
}

/// Machine code of a hostile guest for `layout` (loaded at the image base).
pub fn hostile_code(kind: HostileKind, l: &Layout) -> Vec<u8> {
    let mut a = Asm(Vec::new());
    let mb = l.mailbox_gpa;
    match kind {
        HostileKind::Garbage => {
            a.mov_rbx(mb);
            a.mov_rax(0xdead_beef_cafe_babe);
            a.store_rax(0);
            a.store_rax(8);
            a.ring();
            let l = a.here();
            a.jmp_to(l);
        }
        HostileKind::Oversized => {
            a.header(mb, MsgType::Ready as u16, 0xffff_fff0);
            a.ring();
            let l = a.here();
            a.jmp_to(l);
        }
        HostileKind::Flood => {
            a.header(mb, MsgType::Log as u16, 4);
            a.mov_rax(u64::from(u32::from_le_bytes(*b"spam")));
            a.store_rax(64);
            let top = a.here();
            a.ring();
            a.jmp_to(top);
        }
        HostileKind::TripleFault => {
            a.0.extend([0x0f, 0x0b]); // ud2
        }
        HostileKind::Spin | HostileKind::EarlySpin => {
            // Says READY (or READY_EARLY), then spins when resumed.
            let said = if kind == HostileKind::Spin {
                MsgType::Ready
            } else {
                MsgType::ReadyEarly
            };
            a.header(mb, said as u16, 0);
            a.ring();
            let l = a.here();
            a.jmp_to(l);
        }
        HostileKind::BadAwait => {
            a.header(mb, MsgType::Ready as u16, 0);
            a.ring();
            // [timeout 1000 u32][key_len 200][8 bytes of garbage]
            a.header(mb, MsgType::Awaiting as u16, 13);
            a.mov_rax(1000 | (200 << 32) | (0x00fc_fdfe << 40));
            a.store_rax(64);
            a.mov_rax(0xdead_beef_cafe_babe);
            a.store_rax(72);
            a.ring();
            let l = a.here();
            a.jmp_to(l);
        }
        HostileKind::EarlyGarbage => {
            a.header(mb, MsgType::ReadyEarly as u16, 0);
            a.ring();
            // A while (tens of ms) after READY_EARLY, so that the broker
            // has taken READY before the failure comes.
            a.busy(50_000_000);
            a.mov_rbx(mb);
            a.mov_rax(0xdead_beef_cafe_babe);
            a.store_rax(0);
            a.store_rax(8);
            a.ring();
            let l = a.here();
            a.jmp_to(l);
        }
        HostileKind::StrayMmio => {
            a.mov_rbx(layout::DOORBELL_GPA + 0x1000);
            a.store_eax();
            let l = a.here();
            a.jmp_to(l);
        }
    }
    a.0
}

/// Machine code of the minimal floor guest: rings the doorbell forever.
pub fn floor_code() -> Vec<u8> {
    let mut a = Asm(Vec::new());
    a.mov_rbx(layout::DOORBELL_GPA);
    let top = a.here();
    a.store_eax();
    a.jmp_to(top);
    a.0
}

/// Machine code of a hostile guest for a bubble of `mem_size` bytes with a
/// mailbox for `max_payload`: planned with a placeholder image size first
/// (the code's length does not depend on the layout, only its constants do).
pub fn hostile_code_for(
    kind: HostileKind,
    mem_size: u64,
    max_payload: u64,
) -> Result<Vec<u8>, layout::LayoutError> {
    let probe = Layout::new(mem_size, layout::IMAGE_BASE + 4096, max_payload)?;
    Ok(hostile_code(kind, &probe))
}

/// The guest a bubble boots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestImage {
    /// The built-in guest shim.
    Shim,
    /// A hostile test guest.
    Hostile(HostileKind),
    /// Another ELF file.
    Elf(std::path::PathBuf),
}

impl GuestImage {
    /// Command-line form (`shim`, `hostile:<kind>`, `elf:<path>`).
    pub fn to_arg(&self) -> String {
        match self {
            GuestImage::Shim => "shim".into(),
            GuestImage::Hostile(k) => format!("hostile:{}", k.name()),
            GuestImage::Elf(p) => format!("elf:{}", p.display()),
        }
    }

    /// Parses the command-line form.
    pub fn from_arg(s: &str) -> Option<Self> {
        if s == "shim" {
            return Some(GuestImage::Shim);
        }
        if let Some(k) = s.strip_prefix("hostile:") {
            return HostileKind::from_name(k).map(GuestImage::Hostile);
        }
        s.strip_prefix("elf:").map(|p| GuestImage::Elf(p.into()))
    }
}
