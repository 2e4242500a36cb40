//! Deterministic RNGs for tests only.

use alloc::vec::Vec;
use rand_core::{CryptoRng, Error, RngCore};
use sha2::{Digest, Sha256};

/// Yields exactly the given bytes (an RFC test vector's `ikmE`), then
/// panics: a test that draws more randomness than expected fails loudly.
pub(crate) struct FixedRng {
    bytes: Vec<u8>,
    pos: usize,
}

impl FixedRng {
    pub(crate) fn new(bytes: &[u8]) -> Self {
        Self {
            bytes: bytes.to_vec(),
            pos: 0,
        }
    }
}

impl RngCore for FixedRng {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.fill_bytes(&mut b);
        u32::from_le_bytes(b)
    }
    fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.fill_bytes(&mut b);
        u64::from_le_bytes(b)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        let end = self.pos + dest.len();
        assert!(end <= self.bytes.len(), "FixedRng exhausted");
        dest.copy_from_slice(&self.bytes[self.pos..end]);
        self.pos = end;
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl CryptoRng for FixedRng {}

/// A seeded SHA-256 counter-mode stream, so tests are reproducible and run
/// without an OS RNG (also in the no_std build).
pub(crate) struct TestRng {
    seed: [u8; 32],
    counter: u64,
    buf: [u8; 32],
    used: usize,
}

impl TestRng {
    pub(crate) fn new(seed: u64) -> Self {
        Self {
            seed: Sha256::digest(seed.to_le_bytes()).into(),
            counter: 0,
            buf: [0; 32],
            used: 32,
        }
    }
}

impl RngCore for TestRng {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.fill_bytes(&mut b);
        u32::from_le_bytes(b)
    }
    fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.fill_bytes(&mut b);
        u64::from_le_bytes(b)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for d in dest {
            if self.used == 32 {
                let mut h = Sha256::new();
                h.update(self.seed);
                h.update(self.counter.to_le_bytes());
                self.buf = h.finalize().into();
                self.counter += 1;
                self.used = 0;
            }
            *d = self.buf[self.used];
            self.used += 1;
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl CryptoRng for TestRng {}

/// Hex-decodes a test constant.
pub(crate) fn h(s: &str) -> Vec<u8> {
    hex::decode(s).expect("test hex")
}

/// Hex-decodes a 32-byte test constant.
pub(crate) fn h32(s: &str) -> [u8; 32] {
    h(s).try_into().expect("32 bytes")
}
