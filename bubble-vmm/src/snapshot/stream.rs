//! A snapshot as a stream: the VMM cuts it into pieces as it reads guest
//! memory (never holding it whole), and a receiver checks its structure
//! piece by piece ([`Scanner`]) without buffering it.

use zeroize::Zeroizing;

use super::{next_page, RestoreError, VmSnapshot, MAX_STATE_LEN};
use crate::control::SNAPSHOT_PIECE;
use crate::layout::PAGE;
use crate::vm::{Vm, VmError};

/// Why a snapshot could not be streamed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// Reading the VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A count does not fit its field.
    #[error("snapshot field too large: {0}")]
    TooLarge(&'static str),
    /// The receiver went away.
    #[error("the receiver of the snapshot went away")]
    Closed,
}

/// What a streamed snapshot amounted to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Streamed {
    /// Pieces handed out.
    pub pieces: u64,
    /// Bytes handed out.
    pub len: u64,
}

/// Collects bytes into pieces of [`SNAPSHOT_PIECE`] bytes (guest memory:
/// the buffer is wiped when dropped).
struct Pieces<F: FnMut(&[u8]) -> bool> {
    buf: Zeroizing<Vec<u8>>,
    send: F,
    done: Streamed,
}

impl<F: FnMut(&[u8]) -> bool> Pieces<F> {
    fn put(&mut self, mut b: &[u8]) -> Result<(), StreamError> {
        while !b.is_empty() {
            let k = (SNAPSHOT_PIECE - self.buf.len()).min(b.len());
            self.buf.extend_from_slice(&b[..k]);
            b = &b[k..];
            if self.buf.len() == SNAPSHOT_PIECE {
                self.flush()?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        if !(self.send)(&self.buf) {
            return Err(StreamError::Closed);
        }
        self.done.pieces += 1;
        self.done.len += self.buf.len() as u64;
        // `clear` keeps the capacity; the bytes are overwritten by the next
        // piece and wiped when the buffer drops.
        self.buf.clear();
        Ok(())
    }
}

/// Streams `vm`'s snapshot (`[state_len u32][state][n u32][(gpa u64,
/// page)*]`, see the module above) to `send` in pieces of at most
/// [`SNAPSHOT_PIECE`] bytes; `send` returns false when its receiver is
/// gone. Call only while the vCPU is stopped.
pub fn stream_snapshot(vm: &Vm, send: impl FnMut(&[u8]) -> bool) -> Result<Streamed, StreamError> {
    let state = Zeroizing::new(vm.capture()?.encode());
    let pages = vm.nonzero_pages()?;
    let state_len = u32::try_from(state.len()).map_err(|_| StreamError::TooLarge("state"))?;
    let count = u32::try_from(pages.len()).map_err(|_| StreamError::TooLarge("page count"))?;
    let mut out = Pieces {
        buf: Zeroizing::new(Vec::with_capacity(SNAPSHOT_PIECE)),
        send,
        done: Streamed { pieces: 0, len: 0 },
    };
    out.put(&state_len.to_le_bytes())?;
    out.put(&state)?;
    out.put(&count.to_le_bytes())?;
    let mut page = Zeroizing::new(vec![0u8; PAGE as usize]);
    for gpa in pages {
        vm.read(gpa, &mut page)?;
        out.put(&gpa.to_le_bytes())?;
        out.put(&page)?;
    }
    out.flush()?;
    Ok(out.done)
}

/// Where a [`Scanner`] is in the snapshot.
#[derive(Clone, Copy, Debug)]
enum Phase {
    StateLen,
    State(usize),
    Count,
    Gpa,
    /// Page bytes still to skip.
    Page(usize),
    Done,
}

/// What a complete snapshot holds, as a [`Scanner`] found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scanned {
    /// Runs of captured pages (first guest address, pages), in order.
    pub runs: Vec<(u64, u64)>,
    /// Total length in bytes.
    pub len: u64,
    /// Guest memory size the snapshot is for.
    pub mem_size: u64,
}

/// Checks a snapshot's structure as it streams by, in pieces cut
/// anywhere: the state decodes, the page count fits memory, every page
/// address is page-aligned, inside memory and increasing, and nothing
/// follows the last page. Holds at most the state, never a page.
pub struct Scanner {
    phase: Phase,
    /// The field being collected (the state is guest data: wiped).
    field: Zeroizing<Vec<u8>>,
    mem_size: u64,
    /// The memory size the state must name, if known.
    expect_mem: Option<u64>,
    /// Page records still to come.
    left: u64,
    last: Option<u64>,
    runs: Vec<(u64, u64)>,
    len: u64,
}

impl Default for Scanner {
    fn default() -> Self {
        Self::new()
    }
}

impl Scanner {
    /// A scanner at the start of a snapshot.
    pub fn new() -> Self {
        Scanner {
            phase: Phase::StateLen,
            field: Zeroizing::new(Vec::new()),
            mem_size: 0,
            expect_mem: None,
            left: 0,
            last: None,
            runs: Vec::new(),
            len: 0,
        }
    }

    /// A scanner that also refuses a state naming another memory size
    /// than `mem_size` (the bubble's): a VMM cannot make its snapshot, and
    /// what the store holds, larger than its bubble.
    pub fn expecting(mem_size: u64) -> Self {
        Scanner {
            expect_mem: Some(mem_size),
            ..Self::new()
        }
    }

    fn want(&self) -> usize {
        match self.phase {
            Phase::StateLen | Phase::Count => 4,
            Phase::State(n) => n,
            Phase::Gpa => 8,
            Phase::Page(n) => n,
            Phase::Done => 0,
        }
    }

    /// Takes the next bytes of the snapshot.
    pub fn feed(&mut self, mut b: &[u8]) -> Result<(), RestoreError> {
        let bad = RestoreError::Malformed;
        self.len = self.len.saturating_add(b.len() as u64);
        while !b.is_empty() {
            match self.phase {
                Phase::Done => return Err(bad("bytes after the last page")),
                Phase::Page(left) => {
                    let k = left.min(b.len());
                    b = &b[k..];
                    self.phase = match (left - k, self.left) {
                        (0, 0) => Phase::Done,
                        (0, _) => Phase::Gpa,
                        (l, _) => Phase::Page(l),
                    };
                    continue;
                }
                _ => {}
            }
            let k = (self.want() - self.field.len()).min(b.len());
            self.field.extend_from_slice(&b[..k]);
            b = &b[k..];
            if self.field.len() == self.want() {
                self.field_done()?;
            }
        }
        Ok(())
    }

    /// Acts on a complete field.
    fn field_done(&mut self) -> Result<(), RestoreError> {
        let bad = RestoreError::Malformed;
        let f = std::mem::take(&mut *self.field);
        let f = Zeroizing::new(f);
        let le4 = |f: &[u8]| {
            f.try_into()
                .map(u32::from_le_bytes)
                .map_err(|_| bad("short"))
        };
        self.phase = match self.phase {
            Phase::StateLen => {
                let n = le4(&f)? as usize;
                if n == 0 || n > MAX_STATE_LEN {
                    return Err(bad("state length out of range"));
                }
                Phase::State(n)
            }
            Phase::State(_) => {
                let state = VmSnapshot::decode(&f).ok_or(bad("state does not decode"))?;
                if self.expect_mem.is_some_and(|m| m != state.mem_size) {
                    return Err(bad("the state names another memory size than the bubble's"));
                }
                self.mem_size = state.mem_size;
                Phase::Count
            }
            Phase::Count => {
                self.left = u64::from(le4(&f)?);
                if self.left > self.mem_size / PAGE {
                    return Err(bad("more pages than memory"));
                }
                if self.left == 0 {
                    Phase::Done
                } else {
                    Phase::Gpa
                }
            }
            Phase::Gpa => {
                let gpa = f
                    .as_slice()
                    .try_into()
                    .map(u64::from_le_bytes)
                    .map_err(|_| bad("short"))?;
                next_page(gpa, &mut self.last, self.mem_size)?;
                match self.runs.last_mut() {
                    Some((start, n)) if *start + *n * PAGE == gpa => *n += 1,
                    _ => self.runs.push((gpa, 1)),
                }
                self.left -= 1;
                Phase::Page(PAGE as usize)
            }
            Phase::Page(_) | Phase::Done => self.phase,
        };
        Ok(())
    }

    /// The snapshot ended: it must be complete.
    pub fn finish(self) -> Result<Scanned, RestoreError> {
        match self.phase {
            Phase::Done => Ok(Scanned {
                runs: self.runs,
                len: self.len,
                mem_size: self.mem_size,
            }),
            _ => Err(RestoreError::Malformed("the snapshot ends early")),
        }
    }
}
