//! Guest ABI message parsing with garbage, truncated and oversized
//! input: every case is refused with a precise error and nothing panics.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bubble_vmm::abi::{self, AbiError, BootInfo, Header, MsgType, HEADER_LEN};

fn header(magic: u32, version: u16, t: u16, len: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&magic.to_le_bytes());
    h[4..6].copy_from_slice(&version.to_le_bytes());
    h[6..8].copy_from_slice(&t.to_le_bytes());
    h[8..12].copy_from_slice(&len.to_le_bytes());
    h
}

#[test]
fn headers_round_trip() {
    let h = Header {
        msg_type: MsgType::Reply,
        length: 1 << 20,
        seq: 42,
        host_time_ns: 0,
    };
    assert_eq!(Header::decode(&h.encode(), 1 << 20), Ok(h));
}

#[test]
fn garbage_headers_are_refused_precisely() {
    assert_eq!(Header::decode(&[], 100), Err(AbiError::Truncated));
    assert_eq!(
        Header::decode(&[0u8; HEADER_LEN - 1], 100),
        Err(AbiError::Truncated)
    );
    assert_eq!(
        Header::decode(&header(0xdead_beef, 1, 2, 0), 100),
        Err(AbiError::BadMagic(0xdead_beef))
    );
    assert_eq!(
        Header::decode(&header(abi::MAGIC, 7, 2, 0), 100),
        Err(AbiError::BadVersion(7))
    );
    assert_eq!(
        Header::decode(&header(abi::MAGIC, abi::ABI_VERSION, 0x4242, 0), 100),
        Err(AbiError::UnknownType(0x4242))
    );
    // Error texts name the offending value.
    let e = Header::decode(&header(abi::MAGIC, abi::ABI_VERSION, 0x4242, 0), 100).unwrap_err();
    assert!(e.to_string().contains("0x4242"), "{e}");
}

#[test]
fn oversized_lengths_are_refused() {
    let max = 1 << 20;
    assert!(Header::decode(
        &header(abi::MAGIC, abi::ABI_VERSION, 2, max),
        u64::from(max)
    )
    .is_ok());
    assert_eq!(
        Header::decode(
            &header(abi::MAGIC, abi::ABI_VERSION, 2, max + 1),
            u64::from(max)
        ),
        Err(AbiError::TooLong {
            len: u64::from(max) + 1,
            max: u64::from(max)
        })
    );
    assert_eq!(
        Header::decode(
            &header(abi::MAGIC, abi::ABI_VERSION, 4, u32::MAX),
            u64::from(max)
        ),
        Err(AbiError::TooLong {
            len: u64::from(u32::MAX),
            max: u64::from(max)
        })
    );
}

#[test]
fn payload_parsers_refuse_garbage() {
    // CALL: op length 0, longer than allowed, longer than the payload,
    // not UTF-8, unknown flags.
    use abi::Call;
    assert_eq!(Call::decode(&[]), Err(AbiError::Truncated));
    assert!(matches!(
        Call::decode(&[0, 0]),
        Err(AbiError::BadLength { .. })
    ));
    assert!(matches!(
        Call::decode(&[65u8; 70]),
        Err(AbiError::BadFlags(65))
    ));
    assert!(matches!(
        Call::decode(&[0, 65, b'e']),
        Err(AbiError::BadLength { .. })
    ));
    assert_eq!(Call::decode(&[0, 10, b'e']), Err(AbiError::Truncated));
    assert!(matches!(
        Call::decode(&[0, 1, 0xff]),
        Err(AbiError::BadText { .. })
    ));
    assert_eq!(
        Call::decode(b"\x00\x04echoabc"),
        Ok(Call::plain("echo", b"abc"))
    );
    // ERROR_REPLY and texts.
    assert_eq!(abi::decode_error(&[1]), Err(AbiError::Truncated));
    assert!(matches!(
        abi::decode_error(&[1, 0, 0xc3]),
        Err(AbiError::BadText { .. })
    ));
    assert_eq!(abi::decode_error(b"\x02\x00bad"), Ok((2, "bad")));
    let long = vec![b'a'; abi::MAX_TEXT_LEN + 1];
    assert!(matches!(
        abi::decode_text(&long),
        Err(AbiError::BadText { .. })
    ));
    assert_eq!(
        abi::decode_text(&long[1..]).map(str::len),
        Ok(abi::MAX_TEXT_LEN)
    );
    // Boot information.
    assert_eq!(BootInfo::decode(&[0u8; 7]), Err(AbiError::Truncated));
    let mut truncated = abi::BOOT_INFO_MAGIC.to_le_bytes().to_vec();
    truncated.extend(u64::from(abi::ABI_VERSION).to_le_bytes());
    truncated.push(0);
    assert_eq!(BootInfo::decode(&truncated), Err(AbiError::Truncated));
    assert!(matches!(
        BootInfo::decode(&[0u8; 64]),
        Err(AbiError::BadMagic(_))
    ));
}

#[test]
fn encode_call_refuses_what_does_not_fit() {
    use abi::Call;
    let mut buf = [0u8; 16];
    assert_eq!(
        Call::plain("echo", b"012345678").encode_into(&mut buf),
        Ok(15)
    );
    assert_eq!(
        Call::plain("echo", b"012345678901").encode_into(&mut buf),
        Err(AbiError::NoSpace)
    );
    assert!(Call::plain("", b"").encode_into(&mut buf).is_err());
    let mut big = vec![0u8; 200];
    assert!(Call::plain(&"x".repeat(65), b"")
        .encode_into(&mut big)
        .is_err());
}

/// Pseudo-random garbage (xorshift, fixed seed): the parsers either accept
/// or refuse, and never panic.
#[test]
fn random_garbage_never_panics() {
    let mut s: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    for _ in 0..20_000 {
        let n = (next() % 200) as usize;
        let mut b: Vec<u8> = (0..n).map(|_| next() as u8).collect();
        if n >= 8 && next() % 2 == 0 {
            // Often a valid prefix, so deeper checks are reached.
            b[0..4].copy_from_slice(&abi::MAGIC.to_le_bytes());
            b[4..6].copy_from_slice(&abi::ABI_VERSION.to_le_bytes());
        }
        if let Ok(h) = Header::decode(&b, 64) {
            assert!(h.length <= 64);
        }
        let _ = abi::Call::decode(&b);
        let _ = abi::decode_error(&b);
        let _ = abi::decode_text(&b);
        let _ = BootInfo::decode(&b);
    }
}
