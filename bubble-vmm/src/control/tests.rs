//! Round trips of every message, and hostile bodies into every decoder.

use super::*;
use std::io::Read;

fn all_requests() -> Vec<Request<'static>> {
    vec![
        Request::Hello { bubble_id: "b-1" },
        Request::Hello { bubble_id: "" },
        Request::Status,
        Request::Call(Call {
            deadline_ms: 250,
            call: bubble_abi::Call::plain("sha256", b"abc"),
        }),
        Request::Call(Call {
            deadline_ms: 0,
            call: bubble_abi::Call::plain("x", b""),
        }),
        Request::Shutdown,
        Request::Configure {
            args: vec!["--bubble-id", "b", "", "x"],
        },
        Request::Suspend,
        Request::Prefault {
            runs: vec![(0, 1), (4096 * 8, 3)],
        },
        Request::Prefault { runs: vec![] },
        Request::RestoreState { state: b"state" },
        Request::Restore { len: 5 << 30 },
        Request::RestoreData { bytes: b"piece" },
        Request::Measurement,
    ]
}

fn reason(kind: FailureKind) -> FailureReason {
    FailureReason::new(kind, format!("because {kind}"))
}

fn all_replies() -> Vec<Reply> {
    let mut v = vec![
        Reply::StatusOk(Status::default()),
        Reply::StatusOk(Status {
            bubble_id: "b-1".into(),
            ready: true,
            failed: Some(reason(FailureKind::TripleFault)),
            boot_us: 5,
            vcpu_us: 6,
            pid: 7,
            abi_version: 1,
        }),
        Reply::CallOk(b"out".to_vec()),
        Reply::CallOk(vec![]),
        Reply::CallErr(CallErr::Rejected {
            code: 3,
            text: "no".into(),
        }),
        Reply::CallErr(CallErr::Deadline("slow".into())),
        Reply::CallErr(CallErr::BadRequest("big".into())),
        Reply::ShutdownOk,
        Reply::Snapshot(vec![1, 2, 3]),
        Reply::SnapshotEnd {
            pieces: 4097,
            len: 5 << 30,
        },
        Reply::RestoreOk { took_us: 42 },
        Reply::PrefaultOk(None),
        Reply::PrefaultOk(Some(GuestSpan { host: 1, len: 2 })),
        Reply::MeasurementOk(LaunchMeasurement {
            origin: LaunchOrigin::Restored,
            digest: [7; 48],
        }),
    ];
    for k in FailureKind::ALL {
        v.push(Reply::CallErr(CallErr::Failed(reason(*k))));
    }
    for code in [
        ErrorCode::Malformed,
        ErrorCode::Unexpected,
        ErrorCode::WrongBubble,
        ErrorCode::NoGuest,
        ErrorCode::NoMeasurement,
        ErrorCode::Snapshot,
        ErrorCode::Restore,
    ] {
        v.push(Reply::error(code, "why"));
    }
    v
}

fn all_events() -> Vec<Event> {
    let mut v = vec![Event::Ready { boot_us: 9 }, Event::Log("line".into())];
    v.extend(FailureKind::ALL.iter().map(|k| Event::Failed(reason(*k))));
    v
}

/// Reads one frame back from bytes written by the codec.
fn read_back(bytes: &[u8]) -> (Head, Vec<u8>) {
    let mut r = bytes;
    let h = Head::read(&mut r).unwrap();
    let body = h.read_body(&mut r).unwrap();
    assert!(r.is_empty());
    (h, body)
}

#[test]
fn requests_round_trip() {
    for req in all_requests() {
        let f = req.frame(11).unwrap();
        let (h, body) = read_back(&f);
        assert_eq!((h.kind, h.id), (req.kind() as u8, 11));
        assert_eq!(Request::decode(h.kind, &body).unwrap(), req);
    }
}

#[test]
fn snapshots_travel_in_bounded_pieces() {
    // Pieces are 1..=SNAPSHOT_PIECE bytes, both ways.
    let over = vec![1u8; SNAPSHOT_PIECE + 1];
    assert!(Reply::decode(Kind::Snapshot as u8, over.clone()).is_err());
    assert!(Reply::decode(Kind::Snapshot as u8, Vec::new()).is_err());
    assert!(Request::decode(Kind::RestoreData as u8, &over).is_err());
    assert!(Request::decode(Kind::RestoreData as u8, b"").is_err());
    assert!(Request::RestoreData { bytes: &over }.frame(1).is_err());
    // A snapshot of any length (past 4 GiB) streams through a reader of
    // its pieces; a piece of another request or kind, or past the
    // announced length, is refused.
    let mut wire = Vec::new();
    for p in [&b"abc"[..], b"defg"] {
        wire.extend(Request::RestoreData { bytes: p }.frame(9).unwrap());
    }
    let mut r = &wire[..];
    let mut got = Vec::new();
    PieceReader::new(&mut r, Kind::RestoreData, 9, 7)
        .read_to_end(&mut got)
        .unwrap();
    assert_eq!(got, b"abcdefg");
    for (id, len) in [(8, 7), (9, 5)] {
        let mut r = &wire[..];
        let mut got = Vec::new();
        let e = PieceReader::new(&mut r, Kind::RestoreData, id, len).read_to_end(&mut got);
        assert!(e.is_err(), "id {id} len {len}");
    }
}

#[test]
fn replies_and_events_round_trip() {
    for rep in all_replies() {
        let mut out = Vec::new();
        rep.write_to(5, &mut out).unwrap();
        let (h, body) = read_back(&out);
        assert_eq!((h.kind, h.id), (rep.kind() as u8, 5));
        assert!(!Kind::is_event(h.kind));
        assert_eq!(Reply::decode(h.kind, body).unwrap(), rep);
    }
    for ev in all_events() {
        let mut out = Vec::new();
        ev.write_to(&mut out).unwrap();
        let (h, body) = read_back(&out);
        assert_eq!(h.id, 0);
        assert!(Kind::is_event(h.kind));
        assert_eq!(Event::decode(h.kind, &body).unwrap(), ev);
    }
    for k in FailureKind::ALL {
        assert_eq!(FailureKind::from_code(*k as u8), Some(*k));
    }
    for k in Kind::ALL {
        assert_eq!(Kind::from_u8(*k as u8), Some(*k));
    }
}

#[test]
fn large_bodies_are_written_without_joining() {
    let big = vec![0xabu8; SNAPSHOT_PIECE];
    let rep = Reply::Snapshot(big.clone());
    assert!(matches!(rep.body(), std::borrow::Cow::Borrowed(_)));
    let mut out = Vec::new();
    rep.write_to(1, &mut out).unwrap();
    let (h, body) = read_back(&out);
    assert_eq!(Reply::decode(h.kind, body).unwrap(), Reply::Snapshot(big));
}

#[test]
fn encoder_refuses_what_the_wire_cannot_say() {
    let op = "x".repeat(bubble_abi::MAX_OP_LEN + 1);
    let call = Request::Call(Call {
        deadline_ms: 1,
        call: bubble_abi::Call::plain(&op, b""),
    });
    assert!(matches!(call.frame(1), Err(EncodeError::Call(_))));
    let ok = "x".repeat(bubble_abi::MAX_OP_LEN);
    let call = Request::Call(Call {
        deadline_ms: 1,
        call: bubble_abi::Call::plain(&ok, b""),
    });
    assert!(call.frame(1).is_ok());
    // Frame lengths are checked before they are cast to their u32 field.
    assert!(head(1, 1, MAX_FRAME - 9).is_ok());
    assert!(head(1, 1, MAX_FRAME - 8).is_err());
    assert!(head(1, 1, usize::MAX).is_err());
    assert!(head(1, 1, (u32::MAX as usize) + 10).is_err());
}

#[test]
fn hostile_heads_are_refused() {
    assert!(Head::read(&mut &[0u8, 0, 0, 0][..]).is_err());
    let mut h = [0u8; HEAD_LEN];
    h[..4].copy_from_slice(&8u32.to_le_bytes());
    assert_eq!(Head::parse(&h), Err(DecodeError::FrameLength(8)));
    h[..4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(Head::parse(&h).is_err());
    h[..4].copy_from_slice(&20u32.to_le_bytes());
    let mut r = &h[..];
    let head = Head::read(&mut r).unwrap();
    assert!(head.read_body(&mut r).is_err(), "truncated body");
}

/// Every truncation of every valid body, plus junk, into every decoder of
/// every kind byte: errors, never panics; truncations of fixed-size or
/// length-prefixed bodies are refused.
#[test]
fn hostile_bodies_never_panic() {
    let mut bodies: Vec<(u8, Vec<u8>)> = Vec::new();
    for req in all_requests() {
        let f = req.frame(1).unwrap();
        bodies.push((req.kind() as u8, f[HEAD_LEN..].to_vec()));
    }
    for rep in all_replies() {
        bodies.push((rep.kind() as u8, rep.body().into_owned()));
    }
    for ev in all_events() {
        bodies.push((ev.kind() as u8, ev.body().into_owned()));
    }
    for n in 0..80 {
        bodies.push((0, (0..n).map(|i| (i * 37 + 11) as u8).collect()));
        bodies.push((0, vec![0xff; n]));
    }
    for (_, body) in &bodies {
        for cut in 0..=body.len() {
            let b = &body[..cut];
            for kind in 0..=255u8 {
                let _ = Request::decode(kind, b);
                let _ = Reply::decode(kind, b.to_vec());
                let _ = Event::decode(kind, b);
            }
            let _ = decode_runs(b);
        }
    }
    // Fixed layouts: every strict prefix is refused.
    let fixed = [
        Reply::RestoreOk { took_us: 1 },
        Reply::MeasurementOk(LaunchMeasurement {
            origin: LaunchOrigin::Measured,
            digest: [1; 48],
        }),
        Reply::StatusOk(Status::default()),
    ];
    for rep in fixed {
        let body = rep.body().into_owned();
        for cut in 0..body.len() {
            assert!(Reply::decode(rep.kind() as u8, body[..cut].to_vec()).is_err());
        }
    }
    assert!(Event::decode(Kind::EvReady as u8, &[1, 2, 3]).is_err());
    assert!(Event::decode(Kind::EvFailed as u8, &[]).is_err());
    assert!(Event::decode(Kind::EvFailed as u8, &[0, b'x']).is_err());
    assert!(Event::decode(Kind::EvFailed as u8, &[200]).is_err());
    assert!(Request::decode(Kind::Status as u8, &[1]).is_err());
    assert!(Request::decode(Kind::Call as u8, &[1, 0, 0, 0, 5, b'a']).is_err());
    assert!(Request::decode(Kind::Call as u8, &[1, 0, 0, 0, 1, 0xff]).is_err());
    assert!(Request::decode(Kind::Hello as u8, &[0xff]).is_err());
    assert!(Request::decode(Kind::CallOk as u8, &[]).is_err());
    assert!(Reply::decode(Kind::Call as u8, vec![]).is_err());
    assert!(Reply::decode(Kind::CallErr as u8, vec![9]).is_err());
    assert!(Reply::decode(Kind::Error as u8, vec![0, b'x']).is_err());
    assert!(Reply::decode(Kind::PrefaultOk as u8, vec![0; 8]).is_err());
    // A huge run count without the runs is refused before allocating.
    assert!(decode_runs(&u32::MAX.to_le_bytes()).is_err());
}
