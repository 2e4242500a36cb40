//! This crate's API takes rand_core 0.6 RNGs (the guest's RDRAND RNG, the
//! host's `OsRng`); the `hpke` crate takes rand_core 0.10's. [`Rng010`]
//! lets the former drive the latter, byte for byte.

use core::convert::Infallible;
use hpke::rand_core::{TryCryptoRng, TryRng};
use rand_core::{CryptoRng, RngCore};

/// A rand_core 0.6 `RngCore + CryptoRng`, seen as a rand_core 0.10
/// `CryptoRng`.
pub(super) struct Rng010<'a, R>(pub(super) &'a mut R);

impl<R: RngCore + CryptoRng> TryRng for Rng010<'_, R> {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        Ok(self.0.next_u32())
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        Ok(self.0.next_u64())
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        self.0.fill_bytes(dst);
        Ok(())
    }
}

impl<R: RngCore + CryptoRng> TryCryptoRng for Rng010<'_, R> {}
