//! REPORT_DATA binding agreement with `bubble-keys`, and parsing/verifying
//! arbitrary bytes without panics.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bubble_attestation::{report_data_binding, verify_amd, Report, ReportError};

#[test]
fn binding_matches_keys_crate_and_formula() {
    for n in [0usize, 1, 32, 200] {
        let nonce: Vec<u8> = (0..n).map(|i| i as u8).collect();
        let kem = [3u8; 32];
        let sig = [9u8; 32];
        let ours = report_data_binding(&nonce, &kem, &sig);
        assert_eq!(ours, bubble_keys::report_data(&nonce, &kem, &sig));
        // Any change to any input changes the binding.
        assert_ne!(ours, report_data_binding(&nonce, &sig, &kem));
        let mut n2 = nonce.clone();
        n2.push(0);
        assert_ne!(ours, report_data_binding(&n2, &kem, &sig));
    }
}

/// xorshift64*: deterministic pseudo-random bytes for the fuzz loop.
fn rng(state: &mut u64) -> u8 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
}

#[test]
fn arbitrary_bytes_never_panic() {
    let vcek = include_bytes!("../../../shared/testdata/snp-real/sevcrate-milan-vcek.der");
    let mut st = 0x1234_5678_9abc_def1u64;
    let mut accepted = 0;
    for round in 0..400 {
        let len = match round % 5 {
            0 => 1184,
            1 => 2368,
            2 => (rng(&mut st) as usize) * 9,
            3 => 1183,
            _ => 1185,
        };
        let mut b: Vec<u8> = (0..len).map(|_| rng(&mut st)).collect();
        if round % 5 == 1 {
            // Valid hex text of random bytes.
            b = b
                .iter()
                .map(|x| b"0123456789abcdef"[(*x & 15) as usize])
                .collect();
        }
        if round % 2 == 0 && len >= 4 {
            b[0..4].copy_from_slice(&(2 + (round as u32 % 4)).to_le_bytes());
            if len == 2368 {
                b[0..8].copy_from_slice(b"02000000");
            }
        }
        match Report::parse_any(&b) {
            Ok(r) => {
                accepted += 1;
                assert!(verify_amd(&r, vcek, None).is_err());
                let _ = r.reported_tcb();
                let _ = r.signature();
            }
            Err(ReportError::Length(_) | ReportError::Version(_) | ReportError::Encoding) => {}
        }
    }
    assert!(accepted > 50, "only {accepted} random reports parsed");
}
