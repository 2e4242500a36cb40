//! Every decoder of the guest contract, chosen by the first byte (the
//! rest is the input), and a re-encoding check wherever the encoding is
//! canonical: what a decoder accepts, its encoder writes back byte for byte.
#![no_main]

use bubble_abi::ops::{
    AttestBinding, Hmac, LoadPortion, PortionCall, Provision, PublicKeys, SealedPortionCall,
    Sha256Chain, SignedResult,
};
use bubble_abi::*;
use libfuzzer_sys::fuzz_target;

/// Re-encodes with `f` into a buffer of the input's size and compares.
fn same(input: &[u8], f: impl FnOnce(&mut [u8]) -> Result<usize, AbiError>) {
    let mut buf = vec![0u8; input.len()];
    let n = f(&mut buf).expect("a decoded value re-encodes");
    assert_eq!(&buf[..n], input);
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, b)) = data.split_first() else {
        return;
    };
    match which % 17 {
        0 => {
            if let Ok(h) = Header::decode(b, 1 << 20) {
                let back = Header::decode(&h.encode(), 1 << 20);
                assert_eq!(back, Ok(h));
            }
        }
        1 => {
            if let Ok(i) = BootInfo::decode(b) {
                assert_eq!(&i.encode()[..], &b[..BOOT_INFO_LEN]);
            }
        }
        2 => {
            if let Ok((c, t)) = decode_error(b) {
                same(b, |o| encode_error(c, t, o));
            }
        }
        3 => {
            let _ = decode_text(b);
        }
        4 => {
            if let Ok(c) = Call::decode(b) {
                assert_eq!(c.encoded_len(), b.len());
                same(b, |o| c.encode_into(o));
            }
        }
        5 => {
            if let Ok(p) = PortionCall::decode(b) {
                same(b, |o| p.encode_into(o));
            }
        }
        6 => {
            if let Ok(r) = SignedResult::decode(b) {
                same(b, |o| r.encode_into(o));
            }
        }
        7 => {
            if let Ok(k) = PublicKeys::decode(b) {
                assert_eq!(&k.encode()[..], b);
            }
        }
        8 => {
            if let Ok(a) = AttestBinding::decode(b) {
                assert_eq!(&a.encode()[..], b);
            }
        }
        9 => {
            if let Ok(p) = Provision::decode(b) {
                same(b, |o| p.encode_into(o));
            }
        }
        10 => {
            if let Ok(l) = LoadPortion::decode(b) {
                same(b, |o| l.encode_into(o));
            }
        }
        11 => {
            if let Ok(h) = Hmac::decode(b) {
                same(b, |o| h.encode_into(o));
            }
        }
        12 => {
            if let Ok(c) = Sha256Chain::decode(b) {
                same(b, |o| c.encode_into(o));
            }
        }
        13 => {
            if let Ok(c) = SealedPortionCall::decode(b) {
                assert_eq!(c.encoded_len(), b.len());
                same(b, |o| c.encode_into(o));
            }
        }
        14 => {
            if let Ok(a) = Awaiting::decode(b) {
                assert_eq!(a.encoded_len(), b.len());
                same(b, |o| a.encode_into(o));
            }
        }
        15 => {
            if let Ok(r) = Resume::decode(b) {
                assert_eq!(r.encoded_len(), b.len());
                same(b, |o| r.encode_into(o));
            }
        }
        _ => {
            if let Ok(p) = SecurityPolicy::decode(b) {
                assert_eq!(p.encode(), b);
                let _ = p.digest();
            }
            let _ = ErrorCode::try_from(u16::from_le_bytes([
                b.first().copied().unwrap_or(0),
                b.get(1).copied().unwrap_or(0),
            ]));
            let _ = CallFlags::from_bits(b.first().copied().unwrap_or(0));
        }
    }
});
