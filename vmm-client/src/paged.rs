//! Writing a snapshot into a restoring VMM's guest memory as it arrives,
//! piece by piece (through its memory file, see [`crate::procmem`]), so the writer never holds more
//! than one page of it (a page cut between two pieces) besides the vCPU
//! state. The snapshot's structure is checked by a
//! [`bubble_vmm::snapshot::Scanner`] before any byte of a piece is
//! written.

use bubble_vmm::control::GuestSpan;
use bubble_vmm::layout::PAGE;
use bubble_vmm::snapshot::Scanner;
use zeroize::Zeroizing;

use crate::direct::{write_at, Target};
use crate::procmem::ProcHandle;
use crate::procmem::WriteError;

/// Where the writer is in the snapshot.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    StateLen,
    State(usize),
    Count,
    Gpa,
    /// A page at this guest address; bytes of it already in `field`.
    Page(u64),
    Done,
}

/// A snapshot being written into a VMM's guest memory at `span`.
pub struct PageWriter {
    target: Target,
    span: GuestSpan,
    scan: Scanner,
    phase: Phase,
    /// The field (or page) being collected across pieces: guest data,
    /// wiped.
    field: Zeroizing<Vec<u8>>,
    state: Zeroizing<Vec<u8>>,
    left: u64,
    written: u64,
}

impl PageWriter {
    /// A writer for a VMM whose guest memory `mem_size` bytes long lies
    /// at `span` in process `proc` (from PREFAULT).
    pub fn new(proc: ProcHandle, span: GuestSpan, mem_size: u64) -> Self {
        Self {
            target: Target::new(proc),
            span,
            scan: Scanner::expecting(mem_size),
            phase: Phase::StateLen,
            field: Zeroizing::new(Vec::with_capacity(PAGE as usize)),
            state: Zeroizing::new(Vec::new()),
            left: 0,
            written: 0,
        }
    }

    /// Pages written so far.
    pub fn pages_written(&self) -> u64 {
        self.written
    }

    fn want(&self) -> usize {
        match self.phase {
            Phase::StateLen | Phase::Count => 4,
            Phase::State(n) => n,
            Phase::Gpa => 8,
            Phase::Page(_) => PAGE as usize,
            Phase::Done => 0,
        }
    }

    /// Takes the next piece of the snapshot: checks it, then writes every
    /// page it completes into guest memory.
    pub fn feed(&mut self, piece: &[u8]) -> Result<(), WriteError> {
        self.scan
            .feed(piece)
            .map_err(|e| WriteError::Snapshot(e.to_string()))?;
        let mut batch: Vec<(u64, &[u8])> = Vec::new();
        let mut b = piece;
        while !b.is_empty() {
            if let Phase::Page(gpa) = self.phase {
                // A whole page inside this piece: written from it directly.
                if self.field.is_empty() && b.len() >= PAGE as usize {
                    let (page, rest) = b.split_at(PAGE as usize);
                    batch.push((gpa, page));
                    b = rest;
                    self.next_record();
                    continue;
                }
            }
            let k = (self.want() - self.field.len()).min(b.len());
            self.field.extend_from_slice(&b[..k]);
            b = &b[k..];
            if self.field.len() < self.want() {
                break;
            }
            match self.phase {
                Phase::StateLen => {
                    let n = u32::from_le_bytes(le(&self.field)?) as usize;
                    self.phase = if n == 0 {
                        Phase::Count
                    } else {
                        Phase::State(n)
                    };
                }
                Phase::State(_) => {
                    self.state = Zeroizing::new(std::mem::take(&mut *self.field));
                    self.phase = Phase::Count;
                }
                Phase::Count => {
                    self.left = u64::from(u32::from_le_bytes(le(&self.field)?));
                    self.phase = if self.left == 0 {
                        Phase::Done
                    } else {
                        Phase::Gpa
                    };
                }
                Phase::Gpa => self.phase = Phase::Page(u64::from_le_bytes(le(&self.field)?)),
                Phase::Page(gpa) => {
                    // A page cut between pieces, now complete: written now
                    // (the field is reused by the next record).
                    self.written +=
                        write_at(&mut self.target, self.span, &[(gpa, &self.field[..])])?;
                    self.next_record();
                }
                Phase::Done => {
                    return Err(WriteError::Snapshot("bytes after the last page".into()))
                }
            }
            self.field.clear();
        }
        self.written += write_at(&mut self.target, self.span, &batch)?;
        Ok(())
    }

    fn next_record(&mut self) {
        self.left = self.left.saturating_sub(1);
        self.phase = if self.left == 0 {
            Phase::Done
        } else {
            Phase::Gpa
        };
    }

    /// The snapshot ended: it must be complete. Returns the encoded vCPU
    /// state (for RESTORE_STATE).
    pub fn finish(self) -> Result<Zeroizing<Vec<u8>>, WriteError> {
        self.scan
            .finish()
            .map_err(|e| WriteError::Snapshot(e.to_string()))?;
        if self.phase != Phase::Done {
            return Err(WriteError::Snapshot("the snapshot ends early".into()));
        }
        Ok(self.state)
    }
}

/// A little-endian field of exactly `N` bytes.
fn le<const N: usize>(b: &[u8]) -> Result<[u8; N], WriteError> {
    b.try_into()
        .map_err(|_| WriteError::Snapshot("short field".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bubble_vmm::layout::{Layout, IMAGE_BASE};
    use bubble_vmm::snapshot::{VcpuSnapshot, VmSnapshot, SNAPSHOT_VERSION};

    const MEM: u64 = 16 << 20;

    fn state() -> Vec<u8> {
        let l = Layout::new(MEM, IMAGE_BASE + PAGE, 1 << 20).unwrap();
        VmSnapshot {
            version: SNAPSHOT_VERSION,
            mem_size: l.mem_size,
            mailbox_gpa: l.mailbox_gpa,
            mailbox_size: l.mailbox_size,
            heap_start: l.heap_start,
            heap_end: l.heap_end,
            vcpu: VcpuSnapshot {
                regs: Default::default(),
                sregs: Default::default(),
                fpu: Default::default(),
                xsave: Default::default(),
                xcrs: Default::default(),
            },
            launch_digest: None,
        }
        .encode()
    }

    fn body(gpas: &[u64]) -> Vec<u8> {
        let state = state();
        let mut b = (state.len() as u32).to_le_bytes().to_vec();
        b.extend(&state);
        b.extend((gpas.len() as u32).to_le_bytes());
        for g in gpas {
            b.extend(g.to_le_bytes());
            b.extend([(*g >> 12) as u8 | 1; PAGE as usize]);
        }
        b
    }

    /// Feeds `body` cut in pieces of `cut` bytes into this process's own
    /// "guest memory" (a buffer); returns the buffer and the outcome.
    fn load(body: &[u8], cut: usize) -> (Vec<u8>, Result<Vec<u8>, WriteError>) {
        let mem = vec![0u8; MEM as usize];
        let span = GuestSpan {
            host: mem.as_ptr() as u64,
            len: MEM,
        };
        let mut w = PageWriter::new(ProcHandle::this_process(), span, MEM);
        let fed = body.chunks(cut).try_for_each(|p| w.feed(p));
        let r = fed.and_then(|()| w.finish().map(|s| s.to_vec()));
        (mem, r)
    }

    #[test]
    fn pages_land_where_they_belong_however_the_snapshot_is_cut() {
        let gpas = [0, PAGE, 5 * PAGE, 6 * PAGE, MEM - PAGE];
        let b = body(&gpas);
        for cut in [1, 7, 4095, 4096, 4104, 5000, 1 << 20, b.len()] {
            let (mem, r) = load(&b, cut);
            assert_eq!(r.unwrap(), state(), "cut {cut}");
            for g in (0..MEM).step_by(PAGE as usize) {
                let page = &mem[g as usize..(g + PAGE) as usize];
                let want = if gpas.contains(&g) {
                    (g >> 12) as u8 | 1
                } else {
                    0
                };
                assert!(page.iter().all(|x| *x == want), "cut {cut} page {g:#x}");
            }
        }
    }

    #[test]
    fn a_writer_whose_vmm_died_fails_typed_and_writes_nowhere() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let proc = ProcHandle::of_child(&child);
        // An address span in the child that this test knows nothing
        // about: whatever happens, the writer only ever reaches the child.
        let span = GuestSpan {
            host: 0x7000_0000_0000,
            len: MEM,
        };
        let mut w = PageWriter::new(proc, span, MEM);
        child.kill().unwrap();
        child.wait().unwrap();
        // Its pid is free for any new process now; the writer refuses.
        let b = body(&[0, PAGE]);
        assert!(matches!(w.feed(&b), Err(WriteError::Gone)));
    }

    #[test]
    fn a_malformed_or_short_snapshot_is_refused() {
        // Ends early: refused at the end.
        let b = body(&[0, PAGE]);
        let (_, r) = load(&b[..b.len() - 1], 4096);
        assert!(matches!(r, Err(WriteError::Snapshot(_))));
        // A page outside memory, out of order, or bytes after the last.
        for bad in [body(&[MEM]), body(&[PAGE, 0])] {
            let (_, r) = load(&bad, 1 << 20);
            assert!(matches!(r, Err(WriteError::Snapshot(_))));
        }
        let mut extra = body(&[0]);
        extra.push(0);
        let (_, r) = load(&extra, 1 << 20);
        assert!(matches!(r, Err(WriteError::Snapshot(_))));
    }
}
