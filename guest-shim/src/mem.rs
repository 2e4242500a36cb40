//! Memory support for a freestanding binary: the heap allocator, the
//! `mem*` functions the compiler calls, and a fixed-size text buffer.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::ptr::NonNull;

use linked_list_allocator::Heap;

/// The global allocator: a first-fit free list over the heap range the VMM
/// reserved. The guest is single-threaded and takes no interrupts, so no
/// lock is needed.
struct GuestHeap(UnsafeCell<Heap>);

// SAFETY: the guest runs on one vCPU without interrupts; there is never
// concurrent access.
unsafe impl Sync for GuestHeap {}

#[global_allocator]
static HEAP: GuestHeap = GuestHeap(UnsafeCell::new(Heap::empty()));

/// Hands the heap range to the allocator (once, at boot).
pub fn init_heap(start: usize, end: usize) {
    if end > start {
        // SAFETY: [start, end) is guest memory reserved for the heap by the
        // VMM and used for nothing else; called once before any allocation.
        unsafe { (*HEAP.0.get()).init(start as *mut u8, end - start) }
    }
}

unsafe impl GlobalAlloc for GuestHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: single-threaded (see above).
        match unsafe { (*self.0.get()).allocate_first_fit(layout) } {
            Ok(p) => p.as_ptr(),
            Err(()) => core::ptr::null_mut(),
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if let Some(p) = NonNull::new(ptr) {
            // SAFETY: `ptr` came from `alloc` with the same layout.
            unsafe { (*self.0.get()).deallocate(p, layout) }
        }
    }
}

/// A text buffer on the stack for `core::fmt` (truncates when full).
pub struct FixedBuf<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> FixedBuf<N> {
    /// An empty buffer.
    pub const fn new() -> Self {
        Self {
            buf: [0; N],
            len: 0,
        }
    }

    /// The text written so far.
    pub fn as_str(&self) -> &str {
        match core::str::from_utf8(&self.buf[..self.len]) {
            Ok(s) => s,
            // Truncation may split a character: keep the valid prefix.
            Err(e) => core::str::from_utf8(&self.buf[..e.valid_up_to()]).unwrap_or(""),
        }
    }
}

impl<const N: usize> core::fmt::Write for FixedBuf<N> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let n = s.len().min(N - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

// The compiler lowers copies to these symbols; a freestanding binary must
// provide them. `rep movsb`/`rep stosb` run natively at CPL 3 and cannot be
// turned back into calls to themselves by the optimizer.

/// Copies `n` bytes (non-overlapping).
///
/// # Safety
/// `d` and `s` must be valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcpy(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid.
    unsafe {
        core::arch::asm!("rep movsb", inout("rcx") n => _, inout("rdi") d => _, inout("rsi") s => _,
            options(nostack, preserves_flags));
    }
    d
}

/// Copies `n` bytes (ranges may overlap).
///
/// # Safety
/// `d` and `s` must be valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memmove(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    if (d as usize) <= (s as usize) || (d as usize) >= (s as usize).wrapping_add(n) {
        // SAFETY: forward copy is correct when the destination starts
        // before the source or does not overlap it.
        unsafe { memcpy(d, s, n) }
    } else {
        // SAFETY: backward copy with the direction flag set, restored after.
        unsafe {
            core::arch::asm!("std", "rep movsb", "cld",
                inout("rcx") n => _, inout("rdi") d.add(n - 1) => _, inout("rsi") s.add(n - 1) => _,
                options(nostack));
        }
        d
    }
}

/// Fills `n` bytes with `c`.
///
/// # Safety
/// `d` must be valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memset(d: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range is valid.
    unsafe {
        core::arch::asm!("rep stosb", inout("rcx") n => _, inout("rdi") d => _, in("al") c as u8,
            options(nostack, preserves_flags));
    }
    d
}

/// Compares `n` bytes.
///
/// # Safety
/// `a` and `b` must be valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n and the caller guarantees validity.
        let (x, y) = unsafe {
            (
                core::ptr::read_volatile(a.add(i)),
                core::ptr::read_volatile(b.add(i)),
            )
        };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// Compares `n` bytes for equality.
///
/// # Safety
/// `a` and `b` must be valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract.
    unsafe { memcmp(a, b, n) }
}

/// Referenced by the prebuilt `liballoc` even with `panic = "abort"`;
/// never called.
#[no_mangle]
pub extern "C" fn _Unwind_Resume() -> ! {
    super::fault()
}

/// Referenced by the prebuilt `core`/`alloc`; never called.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}
