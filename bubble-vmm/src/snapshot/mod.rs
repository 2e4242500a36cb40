//! Capturing and restoring a bubble's VM: vCPU state and the guest pages
//! that are not zero. The guest is captured only at a safe point: stopped
//! in its doorbell exit, between two calls.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs, kvm_xcrs, kvm_xsave};

use std::io::Read;

use crate::layout::{Layout, PAGE};
use crate::vm::{Vm, VmError};

mod stream;
pub use stream::{stream_snapshot, Scanned, Scanner, StreamError, Streamed};

/// Bytes of one page record in a snapshot body: `[gpa u64 LE][page]`.
pub const RECORD_LEN: usize = 8 + PAGE as usize;
/// Largest encoded vCPU state accepted in a snapshot body.
pub const MAX_STATE_LEN: usize = 1 << 20;
/// Page records read (and pre-faulted) per batch while streaming a restore.
const RESTORE_BATCH: usize = 64;

/// Why a snapshot body could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The body is malformed (lengths, version, layout, page addresses).
    #[error("malformed snapshot: {0}")]
    Malformed(&'static str),
    /// The snapshot is for another memory size than the prepared VM.
    #[error("snapshot is for {snapshot} bytes of memory, the VM has {vm}")]
    MemorySize {
        /// Size recorded in the snapshot.
        snapshot: u64,
        /// Size of the prepared VM.
        vm: u64,
    },
    /// Reading the body failed (the sender went away).
    #[error("reading the snapshot: {0}")]
    Io(#[from] std::io::Error),
    /// KVM or guest memory refused the state.
    #[error(transparent)]
    Vm(#[from] VmError),
}

/// Checks the next page address of a snapshot body: page-aligned, inside
/// `mem_size`, and above the previous one (`last`, updated), so no page
/// is written twice.
fn next_page(gpa: u64, last: &mut Option<u64>, mem_size: u64) -> Result<(), RestoreError> {
    let in_order = last.is_none_or(|p| gpa > p);
    if !gpa.is_multiple_of(PAGE) || gpa.checked_add(PAGE).is_none_or(|e| e > mem_size) || !in_order
    {
        return Err(RestoreError::Malformed(
            "page address out of range or out of order",
        ));
    }
    *last = Some(gpa);
    Ok(())
}

/// Parses the head of a snapshot body (`[state_len u32][state][n u32]`)
/// from its first bytes and checks it against the body's total length.
/// Returns the state and the page count.
pub fn parse_head(first: &[u8], body_len: usize) -> Result<(VmSnapshot, usize), RestoreError> {
    let bad = RestoreError::Malformed;
    let n = u32::from_le_bytes(
        first
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .ok_or(bad("short body"))?,
    ) as usize;
    if n > MAX_STATE_LEN {
        return Err(bad("state too large"));
    }
    let state = VmSnapshot::decode(first.get(4..4 + n).ok_or(bad("short state"))?)
        .ok_or(bad("state does not decode"))?;
    let count = u32::from_le_bytes(
        first
            .get(4 + n..8 + n)
            .and_then(|b| b.try_into().ok())
            .ok_or(bad("short body"))?,
    ) as usize;
    let expect = count
        .checked_mul(RECORD_LEN)
        .and_then(|p| p.checked_add(8 + n))
        .ok_or(bad("page count overflows"))?;
    if expect != body_len {
        return Err(bad("length differs from the page count"));
    }
    if count as u64 > state.mem_size / PAGE {
        return Err(bad("more pages than memory"));
    }
    Ok((state, count))
}

/// The runs of consecutive pages of a snapshot body, as (first guest
/// address, page count), in address order; `None` if the body does not
/// parse. Stored (authenticated) with a frozen copy, so that a restoring
/// VMM can fault those pages in while the copy is still being fetched.
pub fn page_runs(body: &[u8]) -> Option<Vec<(u64, u64)>> {
    let mut s = Scanner::new();
    s.feed(body).ok()?;
    s.finish().ok().map(|s| s.runs)
}

pub use crate::control::encode_runs;

/// Checks page runs against `mem_size`: page-aligned, non-empty, inside
/// memory, in increasing order without overlap.
pub fn check_runs(runs: &[(u64, u64)], mem_size: u64) -> bool {
    let mut end = 0u64;
    for &(g, pages) in runs {
        let Some(e) = pages.checked_mul(PAGE).and_then(|l| g.checked_add(l)) else {
            return false;
        };
        if g % PAGE != 0 || pages == 0 || g < end || e > mem_size {
            return false;
        }
        end = e;
    }
    true
}

/// Decodes a PREFAULT body's page runs and checks them ([`check_runs`]).
pub fn decode_runs(b: &[u8], mem_size: u64) -> Option<Vec<(u64, u64)>> {
    crate::control::decode_runs(b)
        .ok()
        .filter(|r| check_runs(r, mem_size))
}

/// A read cursor over a snapshot body given as consecutive parts.
struct Parts<'a> {
    parts: &'a [&'a [u8]],
    part: usize,
    at: usize,
}

impl<'a> Parts<'a> {
    /// The next `n` bytes: borrowed when they lie in one part, else copied.
    /// `None` past the end of the body.
    fn take(&mut self, n: usize) -> Option<std::borrow::Cow<'a, [u8]>> {
        while self.part < self.parts.len() && self.at == self.parts[self.part].len() {
            self.part += 1;
            self.at = 0;
        }
        let parts: &'a [&'a [u8]] = self.parts;
        let cur: &'a [u8] = parts.get(self.part)?;
        if let Some(b) = cur.get(self.at..self.at + n) {
            self.at += n;
            return Some(std::borrow::Cow::Borrowed(b));
        }
        let mut v = Vec::with_capacity(n);
        while v.len() < n {
            let cur: &'a [u8] = parts.get(self.part)?;
            let want = (n - v.len()).min(cur.len() - self.at);
            v.extend_from_slice(&cur[self.at..self.at + want]);
            self.at += want;
            if self.at == cur.len() {
                self.part += 1;
                self.at = 0;
            }
        }
        Some(std::borrow::Cow::Owned(v))
    }
}

/// A snapshot body's pages: (guest address, 4096 bytes), borrowed from the
/// body where they lie in one part.
pub type Pages<'a> = Vec<(u64, std::borrow::Cow<'a, [u8]>)>;

/// Splits a snapshot body given as consecutive `parts` into its encoded
/// vCPU state and its pages, checking every length, that addresses are
/// page-aligned, inside memory and increasing.
pub fn split_pages<'a>(parts: &'a [&'a [u8]]) -> Result<(Vec<u8>, Pages<'a>), RestoreError> {
    let bad = RestoreError::Malformed;
    let body_len: usize = parts.iter().map(|p| p.len()).sum();
    let mut cur = Parts {
        parts,
        part: 0,
        at: 0,
    };
    let l = cur.take(4).ok_or(bad("short body"))?;
    let n = u32::from_le_bytes(l[..].try_into().map_err(|_| bad("short body"))?) as usize;
    if n > MAX_STATE_LEN || n.saturating_add(8) > body_len {
        return Err(bad("state length out of range"));
    }
    let mut head = Vec::with_capacity(8 + n);
    head.extend_from_slice(&l);
    head.extend_from_slice(&cur.take(n + 4).ok_or(bad("short state"))?);
    let (state, count) = parse_head(&head, body_len)?;
    let mut pages = Vec::with_capacity(count);
    let mut last: Option<u64> = None;
    for _ in 0..count {
        let g = cur.take(8).ok_or(bad("short body"))?;
        let gpa = u64::from_le_bytes(g[..].try_into().map_err(|_| bad("short body"))?);
        next_page(gpa, &mut last, state.mem_size)?;
        pages.push((gpa, cur.take(PAGE as usize).ok_or(bad("short body"))?));
    }
    Ok((head[4..4 + n].to_vec(), pages))
}

/// Loads the vCPU state of a snapshot whose pages are already in `vm`'s
/// guest memory (written there by the broker, see
/// [`crate::client::VmmClient::restore`]); checks the state and that it
/// is for this memory size.
pub fn restore_state(vm: &mut Vm, state: &[u8]) -> Result<(), RestoreError> {
    let state =
        VmSnapshot::decode(state).ok_or(RestoreError::Malformed("state does not decode"))?;
    let vm_size = vm.layout().mem_size;
    if state.mem_size != vm_size {
        return Err(RestoreError::MemorySize {
            snapshot: state.mem_size,
            vm: vm_size,
        });
    }
    vm.set_layout(state.layout());
    vm.restore_vcpu(&state.vcpu)?;
    vm.set_launch(carried(&state));
    Ok(())
}

/// The launch measurement a restored VM reports: the one of its launch,
/// as its snapshot carries it.
fn carried(state: &VmSnapshot) -> crate::launch::Launch {
    match state.launch_digest {
        Some(d) => crate::launch::Launch::Carried(d),
        None => crate::launch::Launch::Unknown,
    }
}

/// Streams a snapshot body of `body_len` bytes from `r` into `vm` (a VM
/// built by [`Vm::from_shell`] and never run): pages are written
/// as they arrive, in batches pre-faulted in few system calls, then the
/// vCPU state is loaded. Every length and address is checked; on error
/// the VM must be discarded (the stream position is lost).
pub fn restore_from(vm: &mut Vm, r: &mut impl Read, body_len: usize) -> Result<(), RestoreError> {
    let bad = RestoreError::Malformed;
    let mut l = [0u8; 4];
    r.read_exact(&mut l)?;
    let n = u32::from_le_bytes(l) as usize;
    if n > MAX_STATE_LEN || n.saturating_add(8) > body_len {
        return Err(bad("state length out of range"));
    }
    let mut head = vec![0u8; 8 + n];
    head[..4].copy_from_slice(&l);
    r.read_exact(&mut head[4..])?;
    let (state, count) = parse_head(&head, body_len)?;
    let vm_size = vm.layout().mem_size;
    if state.mem_size != vm_size {
        return Err(RestoreError::MemorySize {
            snapshot: state.mem_size,
            vm: vm_size,
        });
    }
    // Guest pages pass through here: wiped when the restore ends.
    let mut buf = zeroize::Zeroizing::new(vec![0u8; RESTORE_BATCH * RECORD_LEN]);
    let mut left = count;
    let mut last: Option<u64> = None;
    while left > 0 {
        let k = left.min(RESTORE_BATCH);
        let batch = &mut buf[..k * RECORD_LEN];
        r.read_exact(batch)?;
        let mut gpas = [0u64; RESTORE_BATCH];
        for (i, rec) in batch.chunks_exact(RECORD_LEN).enumerate() {
            let mut g = [0u8; 8];
            g.copy_from_slice(&rec[..8]);
            let gpa = u64::from_le_bytes(g);
            next_page(gpa, &mut last, vm_size)?;
            gpas[i] = gpa;
        }
        vm.populate(gpas[..k].iter().copied());
        for (i, rec) in batch.chunks_exact(RECORD_LEN).enumerate() {
            vm.write(gpas[i], &rec[8..])?;
        }
        left -= k;
    }
    vm.set_layout(state.layout());
    vm.restore_vcpu(&state.vcpu)?;
    vm.set_launch(carried(&state));
    Ok(())
}

/// The vCPU's architectural state.
pub struct VcpuSnapshot {
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment and control registers, EFER.
    pub sregs: kvm_sregs,
    /// x87/SSE state.
    pub fpu: kvm_fpu,
    /// XSAVE area.
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
}

/// Everything but the pages: what a restore needs to rebuild the VM.
pub struct VmSnapshot {
    /// Snapshot format version.
    pub version: u32,
    /// Memory layout (size, mailbox, heap).
    pub mem_size: u64,
    /// Mailbox address.
    pub mailbox_gpa: u64,
    /// Mailbox size.
    pub mailbox_size: u64,
    /// Heap start.
    pub heap_start: u64,
    /// Heap end.
    pub heap_end: u64,
    /// vCPU state.
    pub vcpu: VcpuSnapshot,
    /// The launch digest of the bubble (carried from its launch through
    /// every suspend and restore; `None` in version-1 snapshots).
    pub launch_digest: Option<[u8; 48]>,
}

/// Current snapshot format (2: with the launch digest after the layout).
pub const SNAPSHOT_VERSION: u32 = 2;

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Plain-old-data KVM structures that travel as their bytes.
trait Pod: Sized {}
impl Pod for kvm_regs {}
impl Pod for kvm_sregs {}
impl Pod for kvm_fpu {}
impl Pod for kvm_xsave {}
impl Pod for kvm_xcrs {}

fn pod_bytes<T: Pod>(v: &T, out: &mut Vec<u8>) {
    let n = std::mem::size_of::<T>();
    out.extend((n as u32).to_le_bytes());
    // SAFETY: T is a repr(C) KVM structure of integers (no pointers, no
    // padding-dependent invariants); reading its bytes is sound.
    let bytes = unsafe { std::slice::from_raw_parts(v as *const T as *const u8, n) };
    out.extend_from_slice(bytes);
}

fn pod_read<T: Pod + Default>(b: &mut &[u8]) -> Option<T> {
    let n = std::mem::size_of::<T>();
    let len = u32::from_le_bytes(b.get(..4)?.try_into().ok()?) as usize;
    if len != n {
        return None;
    }
    let src = b.get(4..4 + n)?;
    let mut v = T::default();
    // SAFETY: `src` has exactly size_of::<T>() bytes and every bit pattern
    // is a valid value of these integer-only KVM structures.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), &mut v as *mut T as *mut u8, n) };
    *b = &b[4 + n..];
    Some(v)
}

impl VmSnapshot {
    /// Encodes the snapshot (without pages).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        for x in [
            u64::from(self.version),
            self.mem_size,
            self.mailbox_gpa,
            self.mailbox_size,
            self.heap_start,
            self.heap_end,
        ] {
            v.extend(x.to_le_bytes());
        }
        if self.version >= 2 {
            v.push(u8::from(self.launch_digest.is_some()));
            v.extend(self.launch_digest.unwrap_or([0u8; 48]));
        }
        pod_bytes(&self.vcpu.regs, &mut v);
        pod_bytes(&self.vcpu.sregs, &mut v);
        pod_bytes(&self.vcpu.fpu, &mut v);
        pod_bytes(&self.vcpu.xsave, &mut v);
        pod_bytes(&self.vcpu.xcrs, &mut v);
        v
    }

    /// Decodes a snapshot; checks the version and the layout.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let f = |i: usize| -> Option<u64> {
            Some(u64::from_le_bytes(
                b.get(i * 8..i * 8 + 8)?.try_into().ok()?,
            ))
        };
        let version = f(0)? as u32;
        let (launch_digest, mut rest) = match version {
            1 => (None, b.get(48..)?),
            2 => {
                let d: [u8; 48] = b.get(49..97)?.try_into().ok()?;
                let known = match b.get(48)? {
                    0 if d == [0u8; 48] => false,
                    1 => true,
                    _ => return None,
                };
                (known.then_some(d), b.get(97..)?)
            }
            _ => return None,
        };
        let s = VmSnapshot {
            version,
            mem_size: f(1)?,
            mailbox_gpa: f(2)?,
            mailbox_size: f(3)?,
            heap_start: f(4)?,
            heap_end: f(5)?,
            vcpu: VcpuSnapshot {
                regs: pod_read(&mut rest)?,
                sregs: pod_read(&mut rest)?,
                fpu: pod_read(&mut rest)?,
                xsave: pod_read(&mut rest)?,
                xcrs: pod_read(&mut rest)?,
            },
            launch_digest,
        };
        let l = s.layout();
        let sane = rest.is_empty()
            && (crate::layout::MIN_MEM..=crate::layout::MAX_MEM).contains(&l.mem_size)
            && l.mailbox_gpa.checked_add(l.mailbox_size) == Some(l.mem_size)
            && l.mailbox_size > crate::abi::HEADER_LEN as u64
            && l.heap_start <= l.heap_end
            && l.heap_end <= l.mailbox_gpa;
        sane.then_some(s)
    }

    /// The layout recorded in the snapshot.
    pub fn layout(&self) -> Layout {
        Layout {
            mem_size: self.mem_size,
            mailbox_gpa: self.mailbox_gpa,
            mailbox_size: self.mailbox_size,
            heap_start: self.heap_start,
            heap_end: self.heap_end,
        }
    }
}

impl Vm {
    /// Captures the vCPU and layout (call only while the vCPU is stopped).
    pub fn capture(&self) -> Result<VmSnapshot, VmError> {
        let v = self.vcpu();
        let l = *self.layout();
        Ok(VmSnapshot {
            version: SNAPSHOT_VERSION,
            mem_size: l.mem_size,
            mailbox_gpa: l.mailbox_gpa,
            mailbox_size: l.mailbox_size,
            heap_start: l.heap_start,
            heap_end: l.heap_end,
            vcpu: VcpuSnapshot {
                regs: v.get_regs().map_err(kvm("get regs"))?,
                sregs: v.get_sregs().map_err(kvm("get sregs"))?,
                fpu: v.get_fpu().map_err(kvm("get fpu"))?,
                xsave: v.get_xsave().map_err(kvm("get xsave"))?,
                xcrs: v.get_xcrs().map_err(kvm("get xcrs"))?,
            },
            launch_digest: self.launch().digest(),
        })
    }

    /// Sets the vCPU state from a snapshot.
    pub fn restore_vcpu(&self, s: &VcpuSnapshot) -> Result<(), VmError> {
        let v = self.vcpu();
        v.set_sregs(&s.sregs).map_err(kvm("set sregs"))?;
        v.set_regs(&s.regs).map_err(kvm("set regs"))?;
        v.set_fpu(&s.fpu).map_err(kvm("set fpu"))?;
        // SAFETY: the xsave area comes from KVM_GET_XSAVE of a vCPU created
        // with the same supported CPUID on this kind of host; KVM validates
        // its header and rejects unsupported features.
        unsafe { v.set_xsave(&s.xsave) }.map_err(kvm("set xsave"))?;
        v.set_xcrs(&s.xcrs).map_err(kvm("set xcrs"))?;
        Ok(())
    }

    /// Pre-faults the host pages backing these guest pages in few system
    /// calls (runs of contiguous pages), before a restore writes them.
    pub fn populate(&self, gpas: impl Iterator<Item = u64>) {
        crate::vm::populate(self.memory(), gpas)
    }

    /// Guest-physical addresses of the pages that are resident and not all
    /// zero (untouched pages are never resident, so they are never read).
    pub fn nonzero_pages(&self) -> Result<Vec<u64>, VmError> {
        let (host, len) = self.host_range()?;
        let pages = len / PAGE as usize;
        let mut vec = vec![0u8; pages];
        // SAFETY: `host..host+len` is the guest memory mapping owned by the
        // VM; mincore writes one byte per page into `vec`, sized for it.
        let r = unsafe { libc::mincore(host as *mut libc::c_void, len, vec.as_mut_ptr()) };
        if r != 0 {
            return Err(VmError::Memory(format!(
                "mincore: {}",
                std::io::Error::last_os_error()
            )));
        }
        let mut out = Vec::new();
        let mut buf = vec![0u8; PAGE as usize];
        for (i, v) in vec.iter().enumerate() {
            if v & 1 == 0 {
                continue;
            }
            let gpa = i as u64 * PAGE;
            self.read(gpa, &mut buf)?;
            if buf.iter().any(|b| *b != 0) {
                out.push(gpa);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
