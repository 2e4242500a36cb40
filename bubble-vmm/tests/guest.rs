//! The guest shim and hostile guests on real KVM, in-process.

use bubble_vmm::bubble::{Answer, Bubble, BubbleError};
use bubble_vmm::images::{GuestImage, HostileKind};
use bubble_vmm::process::build_vm;
use bubble_vmm::vm::VmError;
use sha2::{Digest, Sha256};

fn boot(image: GuestImage, mib: u64) -> (Bubble, Result<String, BubbleError>) {
    let vm = build_vm(&image, mib << 20, 1 << 20).expect("vm");
    let mut b = Bubble::new(vm);
    let r = b.boot(&mut |_| {});
    (b, r)
}

#[test]
fn shim_boots_and_computes_inside() {
    let (mut b, r) = boot(GuestImage::Shim, 16);
    assert!(r.unwrap().starts_with("bubble-guest-shim"));
    let mut nolog = |_: &str| {};
    for input in [&b""[..], b"abc", &[0x5a; 64][..]] {
        assert_eq!(
            b.call("echo", input, &mut nolog).unwrap(),
            Answer::Output(input.to_vec())
        );
        assert_eq!(
            b.call("sha256", input, &mut nolog).unwrap(),
            Answer::Output(Sha256::digest(input).to_vec())
        );
    }
    // Maximum payload.
    let big: Vec<u8> = (0..1u32 << 20).map(|i| (i % 253) as u8).collect();
    assert_eq!(
        b.call("echo", &big, &mut nolog).unwrap(),
        Answer::Output(big.clone())
    );
    assert_eq!(
        b.call("sha256", &big, &mut nolog).unwrap(),
        Answer::Output(Sha256::digest(&big).to_vec())
    );
    match b.call("nope", b"", &mut nolog).unwrap() {
        Answer::Rejected(code, text) => {
            assert_eq!(code, bubble_vmm::abi::code::UNKNOWN_OP);
            assert!(text.contains("unknown op"), "{text}");
        }
        other => panic!("{other:?}"),
    }
    // Still serving after a refusal.
    assert_eq!(
        b.call("echo", b"x", &mut nolog).unwrap(),
        Answer::Output(b"x".to_vec())
    );
}

#[test]
fn smallest_bubble_boots() {
    let (_b, r) = boot(GuestImage::Shim, 4);
    r.unwrap();
}

#[test]
fn hostile_guests_fail_precisely() {
    for &kind in HostileKind::ALL {
        let (mut b, r) = boot(GuestImage::Hostile(kind), 8);
        let err = match kind {
            HostileKind::Spin => {
                r.unwrap();
                // Spinning is caught by the VMM's watchdog, tested through
                // the process; here only READY is checked.
                continue;
            }
            _ => r.unwrap_err(),
        };
        let msg = err.to_string();
        match kind {
            HostileKind::Garbage => assert!(msg.contains("bad message magic"), "{msg}"),
            HostileKind::Oversized => assert!(msg.contains("exceeds the mailbox"), "{msg}"),
            HostileKind::Flood => assert!(matches!(err, BubbleError::Flood), "{msg}"),
            HostileKind::TripleFault => {
                assert!(
                    matches!(err, BubbleError::Vm(VmError::TripleFault { .. })),
                    "{msg}"
                )
            }
            HostileKind::StrayMmio => assert!(msg.contains("not part of the bubble ABI"), "{msg}"),
            HostileKind::Spin => unreachable!(),
        }
        let _ = b.vm();
    }
}
