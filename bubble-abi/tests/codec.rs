//! Round trips, every truncation, and hostile bytes into every decoder.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bubble_abi::ops::{
    AttestBinding, Hmac, LoadPortion, PortionCall, Provision, PublicKeys, SealedPortionCall,
    Sha256Chain, SignedResult,
};
use bubble_abi::*;

/// Every decoder of the crate, run on `b`; returns how many accepted it.
fn decode_all(b: &[u8]) -> usize {
    [
        Header::decode(b, u64::MAX).is_ok(),
        BootInfo::decode(b).is_ok(),
        decode_error(b).is_ok(),
        decode_text(b).is_ok(),
        Call::decode(b).is_ok(),
        PortionCall::decode(b).is_ok(),
        SignedResult::decode(b).is_ok(),
        PublicKeys::decode(b).is_ok(),
        AttestBinding::decode(b).is_ok(),
        Provision::decode(b).is_ok(),
        LoadPortion::decode(b).is_ok(),
        Hmac::decode(b).is_ok(),
        Sha256Chain::decode(b).is_ok(),
        SealedPortionCall::decode(b).is_ok(),
        SecurityPolicy::decode(b).is_ok(),
    ]
    .iter()
    .filter(|x| **x)
    .count()
}

#[test]
fn hostile_bytes_never_panic() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for len in 0..600 {
        for round in 0..8 {
            let b: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    // Small bytes too: they look like lengths and flags.
                    if round % 2 == 0 {
                        (seed % 4) as u8
                    } else {
                        seed as u8
                    }
                })
                .collect();
            decode_all(&b);
        }
        decode_all(&vec![0xff; len]);
        decode_all(&vec![0; len]);
    }
}

#[test]
fn error_codes_round_trip_and_unknown_codes_are_refused() {
    for c in ErrorCode::ALL {
        assert_eq!(ErrorCode::try_from(c as u16), Ok(c));
        assert_eq!(u16::from(c), c.as_u16());
    }
    assert_eq!(ErrorCode::try_from(0), Err(0));
    assert_eq!(ErrorCode::try_from(19), Err(19));
    assert_eq!(code::NO_SESSION, 15);
    assert_eq!((code::AWAITING, code::NOT_AWAITING), (16, 17));
    assert_eq!(code::RATE_LIMITED, 18);
    assert_eq!(code::STATE, 11);
    assert_eq!((code::FROZEN, code::REPLAY, code::NOT_OPENED), (12, 13, 14));
    assert_eq!(code::UNKNOWN_OP, 1);
    assert_eq!(ErrorCode::Trap.to_string(), "TRAP (9)");
}

#[test]
fn header_round_trips_and_checks_every_field() {
    for t in MsgType::ALL {
        let h = Header {
            msg_type: t,
            length: 77,
            seq: 0x0102_0304_0506_0708,
            host_time_ns: 0x1112_1314_1516_1718,
        };
        let e = h.encode();
        assert_eq!(Header::decode(&e, 77), Ok(h));
        assert_eq!(
            Header::decode(&e, 76),
            Err(AbiError::TooLong { len: 77, max: 76 })
        );
        for n in 0..HEADER_LEN {
            assert_eq!(Header::decode(&e[..n], 100), Err(AbiError::Truncated));
        }
    }
    let mut e = Header {
        msg_type: MsgType::Log,
        length: 0,
        seq: 1,
        host_time_ns: 0,
    }
    .encode();
    e[4] = 1; // version 1: the `sign:` prefix ABI
    assert_eq!(Header::decode(&e, 0), Err(AbiError::BadVersion(1)));
    e[4] = 2;
    e[6] = 9;
    assert_eq!(Header::decode(&e, 0), Err(AbiError::UnknownType(9)));
    e[0] = 0;
    assert!(matches!(Header::decode(&e, 0), Err(AbiError::BadMagic(_))));
}

#[test]
fn boot_info_round_trips() {
    let b = BootInfo {
        mem_size: 64 << 20,
        mailbox_gpa: 1,
        mailbox_size: 2,
        heap_start: 3,
        heap_end: 4,
        doorbell_gpa: 5,
    };
    let e = b.encode();
    assert_eq!(BootInfo::decode(&e), Ok(b));
    for n in 0..BOOT_INFO_LEN {
        assert_eq!(BootInfo::decode(&e[..n]).ok(), None);
    }
    let mut bad = e;
    bad[8] = 1;
    assert_eq!(BootInfo::decode(&bad), Err(AbiError::BadVersion(1)));
}

#[test]
fn error_reply_and_text() {
    let mut buf = [0u8; 2000];
    let n = encode_error(code::DENIED, "no", &mut buf).unwrap();
    assert_eq!(decode_error(&buf[..n]), Ok((5, "no")));
    // Long texts are cut at a character boundary.
    let long = "é".repeat(600);
    let n = encode_error(3, &long, &mut buf).unwrap();
    let (_, t) = decode_error(&buf[..n]).unwrap();
    assert_eq!(t.len(), MAX_TEXT_LEN);
    assert_eq!(encode_error(3, "x", &mut [0u8; 2]), Err(AbiError::NoSpace));
    assert_eq!(decode_error(&[1]), Err(AbiError::Truncated));
    assert!(decode_error(&[1, 0, 0xff]).is_err());
    assert!(decode_text(&vec![b'a'; MAX_TEXT_LEN + 1]).is_err());
    assert_eq!(decode_text(b"hi"), Ok("hi"));
}

fn calls() -> Vec<Call<'static>> {
    let op64: &'static str = Box::leak("o".repeat(MAX_OP_LEN).into_boxed_str());
    let id255: &'static str = Box::leak("i".repeat(MAX_BUBBLE_ID_LEN).into_boxed_str());
    vec![
        Call::plain("echo", b"abc"),
        Call::plain(op64, b""),
        Call {
            op: op64,
            sign: Some(Signing {
                bubble_id: "b-1",
                seal_to: None,
            }),
            input: b"in",
        },
        Call {
            op: "sha256",
            sign: Some(Signing {
                bubble_id: id255,
                seal_to: Some([7; 32]),
            }),
            input: b"",
        },
    ]
}

#[test]
fn calls_round_trip_and_every_truncation_fails_or_shortens_the_input() {
    for c in calls() {
        let e = c.encode().unwrap();
        assert_eq!(e.len(), c.encoded_len());
        assert!(e.len() <= MAX_CALL_OVERHEAD + c.input.len());
        let d = Call::decode(&e).unwrap();
        assert_eq!(d, c);
        assert_eq!(&e[d.input_offset()..], c.input);
        assert_eq!(d.flags().bits(), e[0]);
        for n in 0..e.len() {
            match Call::decode(&e[..n]) {
                Err(_) => assert!(n < c.input_offset()),
                Ok(t) => assert_eq!(t.input, &c.input[..n - c.input_offset()]),
            }
        }
        let mut small = vec![0u8; e.len() - 1];
        assert_eq!(c.encode_into(&mut small), Err(AbiError::NoSpace));
    }
}

#[test]
fn a_signed_64_byte_op_keeps_its_name() {
    let op = "x".repeat(MAX_OP_LEN);
    let c = Call {
        op: &op,
        sign: Some(Signing {
            bubble_id: "b-1",
            seal_to: None,
        }),
        input: b"",
    };
    assert_eq!(Call::decode(&c.encode().unwrap()).unwrap().op, op);
}

#[test]
fn bad_calls_are_refused() {
    let op65 = "x".repeat(MAX_OP_LEN + 1);
    assert!(Call::plain(&op65, b"").encode().is_err());
    assert!(Call::plain("", b"").encode().is_err());
    let empty_id = Call {
        op: "a",
        sign: Some(Signing {
            bubble_id: "",
            seal_to: None,
        }),
        input: b"",
    };
    assert!(empty_id.encode().is_err());
    assert_eq!(Call::decode(&[]), Err(AbiError::Truncated));
    assert_eq!(Call::decode(&[0x04, 1, b'a']), Err(AbiError::BadFlags(4)));
    // SEAL without SIGN.
    assert_eq!(Call::decode(&[0x02, 1, b'a']), Err(AbiError::BadFlags(2)));
    assert!(Call::decode(&[0, 0]).is_err());
    assert!(Call::decode(&[0, 65]).is_err());
    assert!(Call::decode(&[0, 1, 0xff]).is_err());
    // SIGN with an empty id; SEAL with a short key.
    assert!(Call::decode(&[1, 1, b'a', 0]).is_err());
    assert_eq!(
        Call::decode(&[3, 1, b'a', 1, b'b', 0, 0]),
        Err(AbiError::Truncated)
    );
    assert_eq!(CallFlags::from_bits(3).unwrap().bits(), 3);
}

#[test]
fn portion_call_round_trips() {
    let p = PortionCall {
        portion: "payments",
        function: "tokenize",
        input: b"4111",
    };
    let e = p.encode().unwrap();
    assert_eq!(e[0], 8);
    assert!(e.len() <= MAX_PORTION_FRAME_OVERHEAD + p.input.len());
    assert_eq!(PortionCall::decode(&e), Ok(p));
    for n in 0..11 {
        assert!(PortionCall::decode(&e[..n]).is_err(), "{n}");
    }
    let long = "p".repeat(MAX_NAME_LEN + 1);
    let bad = PortionCall {
        portion: &long,
        function: "f",
        input: b"",
    };
    assert!(bad.encode().is_err());
}

#[test]
fn signed_result_round_trips_without_magic_offsets() {
    let r = SignedResult {
        call_id: 9,
        sealed: true,
        signature: [3; 64],
        output: b"out",
    };
    let e = r.encode();
    assert_eq!(e.len(), SignedResult::PREFIX_LEN + 3);
    assert_eq!(SignedResult::decode(&e), Ok(r));
    let mut buf = [0u8; 76];
    assert_eq!(r.encode_into(&mut buf), Ok(76));
    assert_eq!(&buf[..], &e[..]);
    for n in 0..SignedResult::PREFIX_LEN {
        assert_eq!(SignedResult::decode(&e[..n]), Err(AbiError::Truncated));
    }
    let mut bad = e.clone();
    bad[8] = 2;
    assert!(SignedResult::decode(&bad).is_err());
}

#[test]
fn fixed_answers_need_their_exact_length() {
    let a = AttestBinding {
        kem_pk: [1; 32],
        sig_pk: [2; 32],
        report_data: [3; 64],
        portions_digest: [4; 48],
        policy_digest: [5; 32],
    };
    let e = a.encode();
    assert_eq!(e.len(), 208);
    assert_eq!(AttestBinding::decode(&e), Ok(a));
    assert_eq!(&e[176..], &[5; 32]);
    let mut long = e.to_vec();
    long.push(0);
    assert_eq!(
        AttestBinding::decode(&long),
        Err(AbiError::TrailingBytes(1))
    );
    assert_eq!(AttestBinding::decode(&e[..207]), Err(AbiError::Truncated));
    let k = PublicKeys {
        kem_pk: [1; 32],
        sig_pk: [2; 32],
    };
    assert_eq!(PublicKeys::decode(&k.encode()), Ok(k));
    assert!(PublicKeys::decode(&[0; 63]).is_err());
    assert!(ops::check_nonce(&[0; 15]).is_err());
    assert!(ops::check_nonce(&[0; 16]).is_ok());
    assert!(ops::check_nonce(&[0; 64]).is_ok());
    assert!(ops::check_nonce(&[0; 65]).is_err());
}

#[test]
fn provisioning_load_and_hmac_frames() {
    let p = Provision {
        bubble_id: "b-1",
        name: "card-key",
        sealed: b"box",
    };
    let e = p.encode().unwrap();
    assert_eq!(Provision::decode(&e), Ok(p));
    // Every truncation fails: the sealed box may not be empty.
    for n in 0..e.len() - 2 {
        assert!(Provision::decode(&e[..n]).is_err(), "{n}");
    }
    assert!(Provision { sealed: b"", ..p }.encode().is_err());
    let l = LoadPortion {
        name: "pay",
        module: b"\0asm",
    };
    let e = l.encode().unwrap();
    assert_eq!(LoadPortion::decode(&e), Ok(l));
    assert!(LoadPortion::decode(&e[..4]).is_err());
    let h = Hmac {
        name: "k",
        data: b"d",
    };
    assert_eq!(Hmac::decode(&h.encode().unwrap()), Ok(h));
    assert!(Hmac::decode(&[0, 1]).is_err());
    let c = Sha256Chain {
        rounds: 5,
        data: b"x",
    };
    let mut buf = [0u8; 5];
    assert_eq!(c.encode_into(&mut buf), Ok(5));
    assert_eq!(Sha256Chain::decode(&buf), Ok(c));
    assert!(Sha256Chain::decode(&buf[..3]).is_err());
}

/// The credential rate is in the attested bytes: a rated policy round
/// trips, its digest differs from the same policy without a rate (which
/// encodes as before), zero rates and partial rates are refused.
#[test]
fn policy_credential_rate_is_in_the_wire_form() {
    let base = SecurityPolicy {
        grants: vec![("pay".into(), vec!["k".into()])],
        ..Default::default()
    };
    let rated = SecurityPolicy {
        credential_rate: Some(CredentialRate {
            per_sec: 100,
            burst: 20,
        }),
        ..base.clone()
    };
    let e = rated.encode();
    assert_eq!(e.len(), base.encode().len() + 8);
    assert_eq!(&e[..e.len() - 8], &base.encode()[..]);
    assert_eq!(SecurityPolicy::decode(&e), Ok(rated.clone()));
    assert_ne!(rated.digest(), base.digest());
    let other_burst = SecurityPolicy {
        credential_rate: Some(CredentialRate {
            per_sec: 100,
            burst: 21,
        }),
        ..base.clone()
    };
    assert_ne!(rated.digest(), other_burst.digest());
    // Cut inside the rate: refused (cut before it: the policy without one).
    for cut in 1..8 {
        assert!(
            SecurityPolicy::decode(&e[..e.len() - cut]).is_err(),
            "{cut}"
        );
    }
    assert_eq!(SecurityPolicy::decode(&e[..e.len() - 8]), Ok(base.clone()));
    for (per_sec, burst) in [(0, 1), (1, 0), (0, 0)] {
        let mut z = base.encode();
        z.extend_from_slice(&u32::to_le_bytes(per_sec));
        z.extend_from_slice(&u32::to_le_bytes(burst));
        assert!(SecurityPolicy::decode(&z).is_err(), "{per_sec} {burst}");
    }
    let mut long = e.clone();
    long.push(0);
    assert!(SecurityPolicy::decode(&long).is_err());
}

#[test]
fn policy_wire_round_trips_and_keeps_its_digest() {
    assert_eq!(SecurityPolicy::default().digest(), [0; 32]);
    let p = SecurityPolicy {
        credential_rate: None,
        grants: vec![
            ("pay".into(), vec!["k".into(), "seed".into()]),
            ("other".into(), vec![]),
        ],
        ..Default::default()
    };
    let e = p.encode();
    assert_eq!(SecurityPolicy::decode(&e), Ok(p.clone()));
    assert_eq!(p.digest(), policy::wire_digest(&e));
    for n in 0..e.len() {
        assert!(SecurityPolicy::decode(&e[..n]).is_err(), "{n}");
    }
    let mut long = e.clone();
    long.push(0);
    assert!(SecurityPolicy::decode(&long).is_err());
    let zero_fuel = SecurityPolicy {
        credential_rate: None,
        fuel_per_call: 0,
        ..Default::default()
    };
    assert!(SecurityPolicy::decode(&zero_fuel.encode()).is_err());
    // A huge grant count with no grants allocates nothing and fails.
    let mut huge = SecurityPolicy::default().encode();
    huge[20] = 0xff;
    huge[21] = 0xff;
    assert!(SecurityPolicy::decode(&huge).is_err());
    // The deadline is in the bytes: two policies that differ only in it
    // have different digests, and a zero deadline is refused.
    let short = SecurityPolicy {
        credential_rate: None,
        call_deadline_ms: 2000,
        ..p.clone()
    };
    assert_ne!(short.digest(), p.digest());
    assert_eq!(SecurityPolicy::decode(&short.encode()), Ok(short.clone()));
    let zero_deadline = SecurityPolicy {
        credential_rate: None,
        call_deadline_ms: 0,
        ..Default::default()
    };
    assert!(SecurityPolicy::decode(&zero_deadline.encode()).is_err());
}

#[test]
fn sealed_portion_call_round_trips() {
    let c = SealedPortionCall {
        bubble_id: "b-1",
        portion: "payments",
        function: "tokenize",
        seq: 0x0102_0304_0506_0708,
        sealed: &[9; 60],
    };
    let e = c.encode().unwrap();
    assert_eq!(e.len(), c.encoded_len());
    assert_eq!(SealedPortionCall::decode(&e), Ok(c));
    for n in 0..e.len() - 60 {
        assert!(SealedPortionCall::decode(&e[..n]).is_err(), "{n}");
    }
    assert!(SealedPortionCall { sealed: &[], ..c }.encode().is_err());
}

#[test]
fn names() {
    assert!(is_valid_name("sha256", MAX_OP_LEN));
    assert!(is_valid_name(&"a".repeat(64), MAX_OP_LEN));
    assert!(!is_valid_name(&"a".repeat(65), MAX_OP_LEN));
    assert!(!is_valid_name("a b", MAX_OP_LEN));
    assert!(!is_valid_name("", MAX_OP_LEN));
    assert!(!is_valid_name("sign:x", MAX_OP_LEN));
}
