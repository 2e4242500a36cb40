//! Zeroizing containers for secret bytes.

use alloc::vec::Vec;
use core::fmt;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// Secret bytes (a credential, a decrypted page, a plaintext result):
/// zeroized when dropped, and `Debug` prints only the length.
#[derive(Clone, Default)]
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl SecretBytes {
    /// Takes ownership of `bytes` (which will be zeroized on drop).
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// Copies `bytes` into a new secret.
    pub fn from_slice(bytes: &[u8]) -> Self {
        Self::new(bytes.to_vec())
    }

    /// The secret bytes. Do not log them.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// Mutable access to the secret bytes.
    pub fn expose_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }

    /// Zeroizes the secret and gives its (now empty) buffer back, so that
    /// its capacity can be reused without fresh allocations.
    pub fn into_zeroized_buffer(mut self) -> Vec<u8> {
        let mut v = core::mem::take(&mut *self.0);
        v.zeroize();
        v.clear();
        v
    }

    /// Shortens the secret to `len` bytes (the cut bytes are zeroized).
    pub fn truncate(&mut self, len: usize) {
        if len < self.0.len() {
            self.0[len..].zeroize();
            self.0.truncate(len);
        }
    }

    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Constant-time equality (for comparing secrets without a timing leak).
    pub fn ct_eq(&self, other: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        self.0.len() == other.len() && bool::from(self.0.as_slice().ct_eq(other))
    }
}

impl From<Vec<u8>> for SecretBytes {
    fn from(bytes: Vec<u8>) -> Self {
        Self::new(bytes)
    }
}

impl Zeroize for SecretBytes {
    fn zeroize(&mut self) {
        self.0.zeroize();
    }
}

impl ZeroizeOnDrop for SecretBytes {}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes([REDACTED; {}])", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;

    #[test]
    fn debug_is_redacted() {
        let s = SecretBytes::from_slice(&[0xde, 0xad, 0xbe, 0xef, 0x42]);
        let d = format!("{s:?}");
        assert_eq!(d, "SecretBytes([REDACTED; 5])");
        assert!(!d.contains("dead"));
        assert!(!d.contains("222"));
        assert!(!d.contains("239"));
    }

    #[test]
    fn accessors_and_zeroize() {
        let mut s = SecretBytes::new(alloc::vec![1, 2, 3]);
        assert_eq!(s.expose(), &[1, 2, 3]);
        assert_eq!(s.len(), 3);
        assert!(!s.is_empty());
        assert!(s.ct_eq(&[1, 2, 3]));
        assert!(!s.ct_eq(&[1, 2, 4]));
        assert!(!s.ct_eq(&[1, 2]));
        s.expose_mut()[0] = 9;
        assert_eq!(s.expose(), &[9, 2, 3]);
        s.zeroize();
        assert!(s.is_empty());
        assert!(SecretBytes::default().is_empty());
    }
}
