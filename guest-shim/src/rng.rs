//! Randomness inside the guest: the CPU's RDRAND (checked with CPUID),
//! drawn directly for every request, with the bounded retries Intel and
//! AMD recommend. Without RDRAND the shim refuses to make keys.

use bubble_keys::{CryptoRng, RngCore};

/// RDRAND as a cryptographic RNG.
pub struct RdRand(());

impl RdRand {
    /// Returns the RNG if the CPU has RDRAND.
    pub fn new() -> Option<Self> {
        // CPUID leaf 1 is always available in 64-bit mode.
        let ecx = core::arch::x86_64::__cpuid(1).ecx;
        (ecx & (1 << 30) != 0).then_some(RdRand(()))
    }

    fn next(&mut self) -> u64 {
        for _ in 0..64 {
            let v: u64;
            let ok: u8;
            // SAFETY: RDRAND is present (checked in `new`); it only writes
            // the output register and CF.
            unsafe {
                core::arch::asm!("rdrand {v}", "setc {ok}", v = out(reg) v, ok = out(reg_byte) ok,
                    options(nomem, nostack));
            }
            if ok == 1 {
                return v;
            }
        }
        // The DRNG keeps failing: never hand out predictable bytes.
        crate::fault()
    }
}

impl RngCore for RdRand {
    fn next_u32(&mut self) -> u32 {
        self.next() as u32
    }

    fn next_u64(&mut self) -> u64 {
        self.next()
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl CryptoRng for RdRand {}
