//! The canonical REPORT_DATA binding of an attestation report to the
//! verifier's nonce and the bubble's public keys.

use sha2::{Digest, Sha512};

/// Domain prefix hashed first into REPORT_DATA.
pub const REPORT_DATA_DOMAIN: &[u8] = b"bubble-v1";

/// REPORT_DATA (64 bytes) for an attestation report:
///
/// `SHA-512("bubble-v1" || u32 LE len(nonce) || nonce || kem_pk || sig_pk)`
///
/// where `kem_pk` is the bubble's X25519 HPKE public key and `sig_pk` its
/// Ed25519 public key. The nonce's length is encoded (u32, little endian)
/// because the nonce is variable-length; the keys are fixed at 32 bytes.
/// Nonces are limited far below 4 GiB by the API (16..=64 bytes); a nonce
/// longer than `u32::MAX` bytes would be encoded with length `u32::MAX`.
/// This is the one implementation the guest, the broker and verifiers use.
pub fn report_data(nonce: &[u8], kem_pk: &[u8; 32], sig_pk: &[u8; 32]) -> [u8; 64] {
    let len = u32::try_from(nonce.len()).unwrap_or(u32::MAX);
    let mut h = Sha512::new();
    h.update(REPORT_DATA_DOMAIN);
    h.update(len.to_le_bytes());
    h.update(nonce);
    h.update(kem_pk);
    h.update(sig_pk);
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    #[test]
    fn matches_the_documented_formula() {
        let nonce = [7u8; 20];
        let kem = [1u8; 32];
        let sig = [2u8; 32];
        let mut msg = Vec::new();
        msg.extend_from_slice(b"bubble-v1");
        msg.extend_from_slice(&20u32.to_le_bytes());
        msg.extend_from_slice(&nonce);
        msg.extend_from_slice(&kem);
        msg.extend_from_slice(&sig);
        let want: [u8; 64] = Sha512::digest(&msg).into();
        assert_eq!(report_data(&nonce, &kem, &sig), want);
    }

    #[test]
    fn known_answer() {
        // SHA-512("bubble-v1" || 00000000 || [0x11;32] || [0x22;32]),
        // computed independently with Python's hashlib.
        let got = report_data(&[], &[0x11; 32], &[0x22; 32]);
        assert_eq!(hex::encode(got), KAT_EMPTY_NONCE);
    }

    const KAT_EMPTY_NONCE: &str = "c2707e745181c421906ead6354ad9b2fa99116895b36ade1b525e4b7b990a9493c5b985853ecaa8c18ea7b646afd3e9a0e76cb71c7aefabfe796138db0ddf8e3";

    #[test]
    fn every_input_matters() {
        let base = report_data(b"nonce-0123456789", &[1; 32], &[2; 32]);
        assert_ne!(base, report_data(b"nonce-0123456788", &[1; 32], &[2; 32]));
        assert_ne!(base, report_data(b"nonce-0123456789", &[3; 32], &[2; 32]));
        assert_ne!(base, report_data(b"nonce-0123456789", &[1; 32], &[3; 32]));
        // Swapping the keys changes the binding.
        assert_ne!(
            report_data(b"n", &[1; 32], &[2; 32]),
            report_data(b"n", &[2; 32], &[1; 32])
        );
    }

    #[test]
    fn length_prefix_is_hashed() {
        // The documented formula differs from the unprefixed concatenation.
        let mut h = Sha512::new();
        h.update(b"bubble-v1abc");
        h.update([0u8; 64]);
        let unprefixed: [u8; 64] = h.finalize().into();
        assert_ne!(report_data(b"abc", &[0; 32], &[0; 32]), unprefixed);
    }
}
