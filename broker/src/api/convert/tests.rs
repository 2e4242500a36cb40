//! Request validation, unit by unit.

use super::*;

#[test]
fn ids_and_ops_are_validated() {
    assert!(validate_bubble_id("b-0123456789abcdef0123456789abcdef").is_ok());
    for bad in [
        "",
        "b-",
        "b-0123456789ABCDEF0123456789abcdef",
        "x-0123456789abcdef0123456789abcdef",
        "b-0123456789abcdef0123456789abcdef0",
    ] {
        assert!(validate_bubble_id(bad).is_err(), "{bad}");
    }
    assert!(validate_op("sha256").is_ok());
    assert!(validate_op("").is_err());
    assert!(validate_op("a b").is_err());
    assert!(validate_op(&"x".repeat(65)).is_err());
    assert!(validate_op(&"x".repeat(bubble_abi::MAX_OP_LEN)).is_ok());
    assert!(validate_request_id("").is_ok());
    assert!(validate_request_id("retry-1:a.b_c").is_ok());
    assert!(validate_request_id("no spaces").is_err());
    assert!(validate_request_id(&"k".repeat(129)).is_err());
}

#[test]
fn errors_map_to_status_codes() {
    let s: tonic::Status = invalid("memory_mib", "too big").into();
    assert_eq!(s.code(), tonic::Code::InvalidArgument);
    assert!(s.message().starts_with("memory_mib:"));
    let s: tonic::Status = BrokerError::NotAccessible("b-x".into()).into();
    assert_eq!(s.code(), tonic::Code::PermissionDenied);
    let s: tonic::Status = BrokerError::Queued("b-x".into()).into();
    assert_eq!(s.code(), tonic::Code::DeadlineExceeded);
}

#[test]
fn a_call_request_becomes_a_bounded_command() {
    let cfg = BrokerConfig::new("/nonexistent".into()).expect("config");
    let mut req = pb::CallRequest {
        bubble_id: "b-0123456789abcdef0123456789abcdef".into(),
        op: "tokenize".into(),
        portion: "payments".into(),
        seal_to: vec![7; 32],
        ..Default::default()
    };
    let c = call(req.clone(), &cfg).expect("valid");
    assert_eq!(c.target, Target::Portion("payments".into()));
    assert_eq!(c.seal_to, Some([7; 32]));
    assert_eq!(c.deadline, None);
    req.seal_to = vec![1; 31];
    assert!(call(req.clone(), &cfg).is_err());
    req.seal_to.clear();
    req.portion = "bad name".into();
    assert!(call(req.clone(), &cfg).is_err());
    for op in RESERVED_OPS {
        let mut raw = req.clone();
        raw.portion.clear();
        raw.op = op.into();
        assert!(call(raw, &cfg).is_err(), "{op} is reserved");
    }
    // As a portion's function name it is just a name.
    let mut named = req.clone();
    named.portion = "payments".into();
    named.op = "provision".into();
    assert!(call(named, &cfg).is_ok());
    // A sealed input: portion calls only, no plaintext beside it, seq > 0.
    let sealed = pb::SealedInput {
        seq: 7,
        sealed: vec![1; 60],
    };
    let mut s = req.clone();
    s.portion = "payments".into();
    s.sealed_input = Some(sealed.clone());
    let c = call(s.clone(), &cfg).expect("valid sealed");
    let want = Target::SealedPortion {
        portion: "payments".into(),
        seq: 7,
    };
    assert_eq!((c.target, c.input), (want, sealed.sealed.clone()));
    for bad in [
        pb::CallRequest {
            input: vec![1],
            ..s.clone()
        },
        pb::CallRequest {
            portion: String::new(),
            ..s.clone()
        },
        pb::CallRequest {
            sealed_input: Some(pb::SealedInput {
                seq: 0,
                ..sealed.clone()
            }),
            ..s.clone()
        },
        pb::CallRequest {
            sealed_input: Some(pb::SealedInput {
                sealed: vec![1; 50],
                ..sealed
            }),
            ..s
        },
    ] {
        assert!(call(bad, &cfg).is_err());
    }
    req.portion.clear();
    req.input = vec![0; cfg.max_payload + 1];
    assert!(call(req.clone(), &cfg).is_err());
    req.input.clear();
    req.deadline_ms = u32::MAX;
    assert!(call(req, &cfg).is_err());
}

#[test]
fn a_session_input_is_checked_before_it_reaches_the_bubble() {
    let cfg = BrokerConfig::new("/nonexistent".into()).expect("config");
    let session = pb::SessionInput {
        session_id: 9,
        seq: 1,
        ciphertext: vec![3; 32],
        setup: vec![4; 83],
    };
    let req = pb::CallRequest {
        bubble_id: "b-0123456789abcdef0123456789abcdef".into(),
        op: "tokenize".into(),
        portion: "payments".into(),
        session_input: Some(session.clone()),
        ..Default::default()
    };
    let c = call(req.clone(), &cfg).expect("valid session call");
    let want = Target::SessionPortion {
        portion: "payments".into(),
        session_id: 9,
        seq: 1,
        setup: vec![4; 83],
    };
    assert_eq!((c.target, c.input), (want, session.ciphertext.clone()));
    // Without a setup (the session is held) it is valid too.
    let mut held = req.clone();
    held.session_input = Some(pb::SessionInput {
        setup: Vec::new(),
        ..session.clone()
    });
    assert!(call(held, &cfg).is_ok());
    let with = |f: &dyn Fn(&mut pb::CallRequest)| {
        let mut r = req.clone();
        f(&mut r);
        r
    };
    let edit = |f: &dyn Fn(&mut pb::SessionInput)| {
        with(&|r: &mut pb::CallRequest| {
            if let Some(s) = r.session_input.as_mut() {
                f(s)
            }
        })
    };
    for (what, bad) in [
        ("plaintext beside", with(&|r| r.input = vec![1])),
        (
            "single-shot beside",
            with(&|r| {
                r.sealed_input = Some(pb::SealedInput {
                    seq: 1,
                    sealed: vec![1; 60],
                })
            }),
        ),
        ("built-in op", with(&|r| r.portion.clear())),
        ("session 0", edit(&|s| s.session_id = 0)),
        ("seq 0", edit(&|s| s.seq = 0)),
        ("no tag", edit(&|s| s.ciphertext = vec![1; 15])),
        ("short setup", edit(&|s| s.setup = vec![1; 20])),
        ("long setup", edit(&|s| s.setup = vec![1; 257])),
        (
            "over the payload limit",
            edit(&|s| s.ciphertext = vec![1; cfg.max_payload]),
        ),
    ] {
        assert!(call(bad, &cfg).is_err(), "{what}");
    }
    let s: tonic::Status =
        BrokerError::from_guest(bubble_abi::code::NO_SESSION, "gone".into()).into();
    assert_eq!(s.code(), tonic::Code::FailedPrecondition);
    assert_eq!(
        s.metadata()
            .get(bubble_proto::SESSION_REFUSED_KEY)
            .map(|v| v.as_bytes()),
        Some(bubble_proto::SESSION_REFUSED_VALUE.as_bytes())
    );
}

#[test]
fn a_credential_rate_is_validated_and_kept() {
    let with = |per_sec, burst| pb::SecurityPolicy {
        credential_rate: Some(pb::CredentialRate { per_sec, burst }),
        ..Default::default()
    };
    let p = policy_from_pb(Some(&with(100, 20)), 1 << 20).expect("valid");
    assert_eq!(p.credential_rate, Some((100, 20)));
    assert_eq!(
        p.wire().credential_rate,
        Some(bubble_abi::CredentialRate {
            per_sec: 100,
            burst: 20
        })
    );
    for (per_sec, burst) in [(0, 1), (1, 0), (1_000_001, 1), (1, 1_000_001)] {
        match policy_from_pb(Some(&with(per_sec, burst)), 1 << 20) {
            Err(BrokerError::InvalidArgument { field, .. }) => {
                assert_eq!(field, "policy.credential_rate")
            }
            other => panic!("{per_sec}/{burst}: {other:?}"),
        }
    }
    let none = policy_from_pb(Some(&pb::SecurityPolicy::default()), 1 << 20).expect("valid");
    assert_eq!(none.credential_rate, None);
    // The broker's error for the guest's RATE_LIMITED is typed and is
    // RESOURCE_EXHAUSTED.
    let e = BrokerError::from_guest(bubble_abi::code::RATE_LIMITED, "x".into());
    assert!(matches!(e, BrokerError::GuestRateLimited(_)), "{e:?}");
    let s: tonic::Status = e.into();
    assert_eq!(s.code(), tonic::Code::ResourceExhausted);
}
