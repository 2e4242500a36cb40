//! The guest shim and hostile guests on real KVM, in-process.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bubble_vmm::bubble::{Answer, Boot, Bubble, BubbleError};
use bubble_vmm::images::{GuestImage, HostileKind};
use bubble_vmm::launch::Launch;
use bubble_vmm::process::build_vm;
use bubble_vmm::shared_image::SharedImage;
use bubble_vmm::vm::{Vm, VmError};
use sha2::{Digest, Sha256};

fn boot(image: GuestImage, mib: u64) -> (Bubble, Result<String, BubbleError>) {
    let vm = build_vm(&image, mib << 20, 1 << 20, None).expect("vm");
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

/// The shim says READY_EARLY and makes its keys only when resumed: no
/// request reaches it before its READY, and once it is READY its keys
/// exist (never the zero key).
#[test]
fn shim_starts_in_two_phases_and_takes_no_call_in_between() {
    let vm = build_vm(&GuestImage::Shim, 16 << 20, 1 << 20, None).unwrap();
    let mut b = Bubble::new(vm);
    let mut nolog = |_: &str| {};
    match b.boot_early(&mut nolog).unwrap() {
        Boot::Early(g) => assert!(g.starts_with("bubble-guest-shim"), "{g}"),
        other => panic!("the shim should say READY_EARLY first: {other:?}"),
    }
    // In the window: refused by the host side, the guest never sees it.
    let e = b.call("keys", b"", &mut nolog).unwrap_err();
    assert!(matches!(e, BubbleError::NotStarted), "{e}");
    assert!(b
        .finish_start(&mut nolog)
        .unwrap()
        .starts_with("bubble-guest-shim"));
    let Answer::Output(keys) = b.call("keys", b"", &mut nolog).unwrap() else {
        panic!("no keys")
    };
    assert_eq!(keys.len(), 64);
    assert_ne!(&keys[..32], &[0u8; 32][..]);
    assert_ne!(&keys[32..], &[0u8; 32][..]);
    // A second finish_start is a misuse, refused.
    assert!(matches!(
        b.finish_start(&mut nolog),
        Err(BubbleError::NotStarted)
    ));
}

#[test]
fn smallest_bubble_boots() {
    let (_b, r) = boot(GuestImage::Shim, 4);
    r.unwrap();
}

#[test]
fn hostile_guests_fail_precisely() {
    for &kind in HostileKind::ALL {
        if kind == HostileKind::EarlySpin {
            // READY_EARLY, then it never finishes its start-up: caught by
            // the VMM's boot watchdog, tested through the process; here
            // only READY_EARLY, and that no call reaches it.
            let vm = build_vm(&GuestImage::Hostile(kind), 8 << 20, 1 << 20, None).unwrap();
            let mut b = Bubble::new(vm);
            assert!(matches!(b.boot_early(&mut |_| {}), Ok(Boot::Early(_))));
            let e = b.call("echo", b"x", &mut |_| {}).unwrap_err();
            assert!(matches!(e, BubbleError::NotStarted), "{e}");
            continue;
        }
        let (mut b, r) = boot(GuestImage::Hostile(kind), 8);
        let err = match kind {
            HostileKind::Spin => {
                r.unwrap();
                // Spinning is caught by the VMM's watchdog, tested through
                // the process; here only READY is checked.
                continue;
            }
            HostileKind::BadAwait => {
                r.unwrap();
                // Its answer to a call: an AWAITING with a 200-byte key.
                b.call("echo", b"x", &mut |_| {}).unwrap_err()
            }
            _ => r.unwrap_err(),
        };
        let msg = err.to_string();
        match kind {
            HostileKind::Garbage | HostileKind::EarlyGarbage => {
                assert!(msg.contains("bad message magic"), "{msg}")
            }
            HostileKind::Oversized => assert!(msg.contains("exceeds the mailbox"), "{msg}"),
            HostileKind::Flood => assert!(matches!(err, BubbleError::Flood), "{msg}"),
            HostileKind::TripleFault => {
                assert!(
                    matches!(err, BubbleError::Vm(VmError::TripleFault { .. })),
                    "{msg}"
                )
            }
            HostileKind::StrayMmio => assert!(msg.contains("not part of the bubble ABI"), "{msg}"),
            HostileKind::BadAwait => assert!(
                matches!(&err, BubbleError::Protocol(m) if m.starts_with("AWAITING")),
                "{msg}"
            ),
            HostileKind::Spin | HostileKind::EarlySpin => unreachable!(),
        }
        let _ = b.vm();
    }
}

/// A portion that writes its input, awaits it as a key (1 s), then writes
/// the event's payload, or `T` on a timeout.
const AWAIT_WAT: &str = r#"
(module
  (import "bubble_v1" "input_len" (func $input_len (result i32)))
  (import "bubble_v1" "input_read" (func $input_read (param i32 i32) (result i32)))
  (import "bubble_v1" "output_write" (func $output_write (param i32 i32) (result i32)))
  (import "bubble_v1" "await_event" (func $await (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 900) "T")
  (func (export "pay") (result i32)
    (local $n i32) (local $r i32)
    (local.set $n (call $input_len))
    (drop (call $input_read (i32.const 0) (local.get $n)))
    (drop (call $output_write (i32.const 0) (local.get $n)))
    (local.set $r (call $await (i32.const 0) (local.get $n) (i32.const 1000)
                            (i32.const 1024) (i32.const 16)))
    (if (i32.eq (local.get $r) (i32.const -4))
      (then (drop (call $output_write (i32.const 900) (i32.const 1))) (return (i32.const 0))))
    (if (i32.lt_s (local.get $r) (i32.const 0)) (then (return (i32.sub (i32.const 0) (local.get $r)))))
    (drop (call $output_write (i32.const 1024) (local.get $r)))
    (i32.const 0))
)
"#;

#[test]
fn an_awaiting_portion_call_is_pending_until_resume_and_refuses_other_calls() {
    use bubble_abi::ops::{LoadPortion, PortionCall};
    use bubble_abi::{code, Call, Resume, OP_RESUME};
    let (mut b, r) = boot(GuestImage::Shim, 16);
    r.unwrap();
    let mut nolog = |_: &str| {};
    let module = wat::parse_str(AWAIT_WAT).unwrap();
    let load = LoadPortion {
        name: "aw",
        module: &module,
    }
    .encode()
    .unwrap();
    assert!(matches!(
        b.call("load_portion", &load, &mut nolog).unwrap(),
        Answer::Output(_)
    ));
    let call = |input: &[u8]| {
        PortionCall {
            portion: "aw",
            function: "pay",
            input,
        }
        .encode()
        .unwrap()
    };
    let resume = |b: &mut Bubble, r: Resume<'_>| {
        let mut v = vec![0u8; r.encoded_len()];
        r.encode_into(&mut v).unwrap();
        b.call_with(&Call::plain(OP_RESUME, &v), &mut |_| {})
            .unwrap()
    };
    // A RESUME while nothing awaits is refused, typed.
    assert_eq!(
        resume(&mut b, Resume::Event(b"x")),
        Answer::Rejected(code::NOT_AWAITING, "RESUME: no portion call awaits".into())
    );
    for (key, end, want) in [
        (&b"cap-1"[..], Resume::Event(b"paid"), &b"cap-1paid"[..]),
        (b"cap-2", Resume::Timeout, b"cap-2T"),
    ] {
        let a = b.call("portion", &call(key), &mut nolog).unwrap();
        assert_eq!(
            a,
            Answer::Awaiting {
                key: String::from_utf8(key.to_vec()).unwrap(),
                timeout_ms: 1000
            }
        );
        // Any other call is refused while the portion awaits; it stays pending.
        for _ in 0..2 {
            match b.call("echo", b"hi", &mut nolog).unwrap() {
                Answer::Rejected(c, _) => assert_eq!(c, code::AWAITING),
                other => panic!("{other:?}"),
            }
        }
        // The same call continues: what it wrote before and after.
        assert_eq!(resume(&mut b, end), Answer::Output(want.to_vec()));
    }
    // A payload longer than the portion's buffer: -2 (the call refuses).
    b.call("portion", &call(b"cap-3"), &mut nolog).unwrap();
    match resume(&mut b, Resume::Event(&[7u8; 17])) {
        Answer::Rejected(c, _) => assert_eq!(c, code::PORTION_REFUSED),
        other => panic!("{other:?}"),
    }
    // A key the host function refuses (a space): -1, nothing awaited.
    match b.call("portion", &call(b"a b"), &mut nolog).unwrap() {
        Answer::Rejected(c, _) => assert_eq!(c, code::PORTION_REFUSED),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        b.call("echo", b"ok", &mut nolog).unwrap(),
        Answer::Output(b"ok".to_vec())
    );
}

fn field(v: &mut Vec<u8>, b: &[u8]) {
    v.push(b.len() as u8);
    v.extend_from_slice(b);
}

#[test]
fn keys_attest_provision_hmac_and_signed_results_inside_the_guest() {
    use bubble_keys::{KemKeyPair, OsRng};
    use hmac::{Hmac, Mac};
    let (mut b, r) = boot(GuestImage::Shim, 16);
    r.unwrap();
    let mut nolog = |_: &str| {};
    let out = |a: Answer| match a {
        Answer::Output(o) => o,
        other => panic!("{other:?}"),
    };
    let keys = out(b.call("keys", b"", &mut nolog).unwrap());
    assert_eq!(keys.len(), 64);
    let kem: [u8; 32] = keys[..32].try_into().unwrap();
    let sig: [u8; 32] = keys[32..].try_into().unwrap();
    assert_ne!(kem, [0u8; 32]);
    // Attestation binding.
    let nonce = [7u8; 32];
    let a = out(b.call("attest", &nonce, &mut nolog).unwrap());
    assert_eq!(&a[..64], &keys[..]);
    // The binding covers nonce ‖ portions digest ‖ policy digest (none yet).
    let mut bound = nonce.to_vec();
    bound.extend([0u8; 48 + 32]);
    assert_eq!(a.len(), 64 + 64 + 48 + 32);
    assert_eq!(
        &a[64..128],
        &bubble_keys::report_data(&bound, &kem, &sig)[..]
    );
    assert!(matches!(
        b.call("attest", b"short", &mut nolog).unwrap(),
        Answer::Rejected(..)
    ));
    // Provision a credential sealed to the bubble, then use it.
    let secret = b"gateway signing key material 0123456789";
    // No portions and the default policy: all-zero digests.
    let aad = bubble_keys::credential_aad("b-test", "tok", &[0; 48], &[0; 32]);
    let sealed =
        bubble_keys::seal_credential(&mut OsRng, &kem, bubble_keys::INFO_CREDENTIAL, &aad, secret)
            .unwrap()
            .encode();
    let mut req = Vec::new();
    field(&mut req, b"b-test");
    field(&mut req, b"tok");
    req.extend(&sealed);
    assert_eq!(
        out(b.call("provision", &req, &mut nolog).unwrap()),
        Vec::<u8>::new()
    );
    // Wrong bubble id in the AAD: refused.
    let mut bad = Vec::new();
    field(&mut bad, b"b-other");
    field(&mut bad, b"tok2");
    bad.extend(&sealed);
    assert!(matches!(
        b.call("provision", &bad, &mut nolog).unwrap(),
        Answer::Rejected(..)
    ));
    let mut h = Vec::new();
    field(&mut h, b"tok");
    h.extend(b"4111111111111111");
    let mac = out(b.call("hmac", &h, &mut nolog).unwrap());
    let mut m = <Hmac<sha2::Sha256> as Mac>::new_from_slice(secret).unwrap();
    m.update(b"4111111111111111");
    assert_eq!(mac, m.finalize().into_bytes().to_vec());
    // Signed, and signed + sealed results.
    let parent = KemKeyPair::generate(&mut OsRng);
    for seal in [None, Some(parent.public_key())] {
        let call = bubble_vmm::abi::Call {
            op: "echo",
            sign: Some(bubble_vmm::abi::Signing {
                bubble_id: "b-test",
                seal_to: seal,
            }),
            input: b"hello",
        };
        let raw = out(b.call_with(&call, &mut nolog).unwrap());
        let r = bubble_vmm::abi::ops::SignedResult::decode(&raw).unwrap();
        assert_eq!(r.sealed, seal.is_some());
        let plain = bubble_keys::verify_and_open_result(
            &sig,
            "b-test",
            r.call_id,
            b"hello",
            r.output,
            &r.signature,
            seal.map(|_| &parent),
        )
        .unwrap();
        assert_eq!(plain.expose(), b"hello");
    }
}

/// Checks a VM's launch record against its guest memory before it runs:
/// every NORMAL page hashes to what was recorded, ZERO pages are zero,
/// UNMEASURED pages are the mailbox, and every non-zero page of guest
/// memory is a measured NORMAL page.
fn record_matches_memory(vm: &Vm) -> bubble_vmm::launch::LaunchLog {
    use bubble_attestation::measure::{PageInfo, PageType, VMSA_GPA};
    let Launch::Measured(log) = vm.launch() else {
        panic!("a loaded VM carries its record")
    };
    let mut buf = vec![0u8; 4096];
    let mut normal = std::collections::BTreeSet::new();
    let l = *vm.layout();
    for p in log.pages() {
        match p.page_type {
            PageType::Normal => {
                vm.read(p.gpa, &mut buf).unwrap();
                assert_eq!(
                    PageInfo::of(p.gpa, PageType::Normal, &buf),
                    p,
                    "page {:#x}",
                    p.gpa
                );
                assert!(normal.insert(p.gpa), "page {:#x} measured twice", p.gpa);
            }
            PageType::Zero => {
                vm.read(p.gpa, &mut buf).unwrap();
                assert!(buf.iter().all(|b| *b == 0), "zero page {:#x}", p.gpa);
            }
            PageType::Unmeasured => {
                assert!((l.mailbox_gpa..l.mem_size).contains(&p.gpa));
            }
            PageType::Vmsa => assert_eq!(p.gpa, VMSA_GPA),
            other => panic!("unexpected page type {other:?}"),
        }
    }
    for gpa in vm.nonzero_pages().unwrap() {
        assert!(
            normal.contains(&gpa),
            "page {gpa:#x} is not zero but not measured"
        );
    }
    // A copy: the record's fold is lazy.
    let mut copy = bubble_vmm::launch::LaunchLog::new();
    for p in log.pages() {
        copy.hashed(p);
    }
    assert_eq!(copy.digest(), log.digest());
    copy
}

#[test]
fn the_launch_record_is_what_guest_memory_holds_at_boot() {
    let (mem, payload) = (16u64 << 20, 1u64 << 20);
    for image in [GuestImage::Shim, GuestImage::Hostile(HostileKind::Spin)] {
        let vm = build_vm(&image, mem, payload, None).unwrap();
        let log = record_matches_memory(&vm);
        // `bubblectl measure` (the same loader, no VM) agrees.
        let offline = bubble_vmm::load::measure_offline(&image, mem, payload).unwrap();
        assert_eq!(offline.digest(), log.digest(), "{image:?}");
    }
    // The shim mapped from its shared image: the same record.
    let offline = bubble_vmm::load::measure_offline(&GuestImage::Shim, mem, payload).unwrap();
    let shared = SharedImage::create(bubble_vmm::images::SHIM_ELF).unwrap();
    let vm = Vm::with_shared_image(&shared, mem, payload).unwrap();
    let Launch::Measured(log) = vm.launch() else {
        panic!("measured")
    };
    assert_eq!(log, &offline);
    record_matches_memory(&vm);
    // Another memory size or payload limit measures differently.
    let other = bubble_vmm::load::measure_offline(&GuestImage::Shim, 32 << 20, payload).unwrap();
    assert_ne!(other.digest(), offline.digest());
    let other = bubble_vmm::load::measure_offline(&GuestImage::Shim, mem, payload * 2).unwrap();
    assert_ne!(other.digest(), offline.digest());
}

#[test]
fn a_shared_image_is_copy_on_write_and_sealed() {
    let shared = SharedImage::create(bubble_vmm::images::SHIM_ELF).unwrap();
    let a = Vm::with_shared_image(&shared, 16 << 20, 1 << 20).unwrap();
    let b = Vm::with_shared_image(&shared, 16 << 20, 1 << 20).unwrap();
    let base = bubble_vmm::layout::IMAGE_BASE;
    let mut orig = vec![0u8; 64];
    b.read(base, &mut orig).unwrap();
    // One bubble writing its code page changes nothing for another, nor
    // for the file.
    a.write(base, &[0xcc; 64]).unwrap();
    let mut got = vec![0u8; 64];
    a.read(base, &mut got).unwrap();
    assert_eq!(got, vec![0xcc; 64]);
    b.read(base, &mut got).unwrap();
    assert_eq!(got, orig);
    let c = Vm::with_shared_image(&shared, 16 << 20, 1 << 20).unwrap();
    c.read(base, &mut got).unwrap();
    assert_eq!(got, orig);
    // Both boot and answer.
    for vm in [b, c] {
        let mut bubble = Bubble::new(vm);
        bubble.boot(&mut |_| {}).unwrap();
        let out = bubble.call("echo", b"shared", &mut |_| {}).unwrap();
        assert_eq!(out, Answer::Output(b"shared".to_vec()));
    }
    // The file cannot be written, grown or shrunk.
    let fd = shared.raw_fd();
    // SAFETY: plain system calls on a descriptor this test owns; each is
    // expected to fail because of the seals.
    unsafe {
        assert!(libc::pwrite(fd, [1u8].as_ptr().cast(), 1, 0) < 0);
        assert!(libc::ftruncate(fd, 0) != 0);
        assert!(libc::ftruncate(fd, 1 << 30) != 0);
    }
    // Adopting a descriptor that is not a sealed image is refused.
    let f = tempfile::tempfile().unwrap();
    use std::os::fd::IntoRawFd;
    assert!(SharedImage::adopt(f.into_raw_fd(), bubble_vmm::images::SHIM_ELF).is_err());
}

/// A snapshot body of a booted bubble, as the VMM encodes it.
fn snapshot_body(b: &mut Bubble) -> Vec<u8> {
    let vm = b.vm();
    let state = vm.capture().unwrap().encode();
    let pages = vm.nonzero_pages().unwrap();
    let mut body = Vec::new();
    body.extend((state.len() as u32).to_le_bytes());
    body.extend(&state);
    body.extend((pages.len() as u32).to_le_bytes());
    let mut buf = vec![0u8; 4096];
    for gpa in pages {
        vm.read(gpa, &mut buf).unwrap();
        body.extend(gpa.to_le_bytes());
        body.extend(&buf);
    }
    body
}

#[test]
fn snapshot_bodies_split_the_same_however_they_are_cut() {
    use bubble_vmm::snapshot::{decode_runs, encode_runs, page_runs, split_pages};
    let (mut b, r) = boot(GuestImage::Shim, 16);
    r.unwrap();
    let body = snapshot_body(&mut b);
    let whole = [&body[..]];
    let (state, pages) = split_pages(&whole).unwrap();
    let runs = page_runs(&body).unwrap();
    assert_eq!(
        runs.iter().map(|r| r.1).sum::<u64>() as usize,
        pages.len(),
        "runs cover every page"
    );
    assert_eq!(
        decode_runs(&encode_runs(&runs), 16 << 20),
        Some(runs.clone())
    );
    for cut in [1usize, 4, 4097, body.len() / 3, body.len() - 1] {
        let (x, y) = body.split_at(cut);
        let (z, w) = y.split_at(y.len() / 2);
        let parts = [x, &[][..], z, w];
        let (s2, p2) = split_pages(&parts).unwrap();
        assert_eq!(s2, state);
        assert_eq!(p2, pages, "cut {cut}");
    }
    // Truncations and hostile page addresses are refused without panics.
    for n in [0usize, 3, 8, 100, body.len() - 1] {
        assert!(split_pages(&[&body[..n]]).is_err(), "{n}");
        assert!(page_runs(&body[..n]).is_none(), "{n}");
    }
    let n = u32::from_le_bytes(body[..4].try_into().unwrap()) as usize;
    for gpa in [1u64, 16 << 20, u64::MAX - 4095] {
        let mut bad = body.clone();
        bad[8 + n..16 + n].copy_from_slice(&gpa.to_le_bytes());
        assert!(split_pages(&[&bad]).is_err(), "{gpa:#x}");
        assert!(page_runs(&bad).is_none(), "{gpa:#x}");
    }
    // Runs outside memory, overlapping, unaligned or empty are refused.
    for bad in [
        vec![(16u64 << 20, 1u64)],
        vec![(0, 2), (4096, 1)],
        vec![(1, 1)],
        vec![(0, 0)],
        vec![(0, u64::MAX)],
    ] {
        assert_eq!(decode_runs(&encode_runs(&bad), 16 << 20), None, "{bad:?}");
    }
    assert_eq!(decode_runs(&[1, 0, 0], 16 << 20), None);
}
