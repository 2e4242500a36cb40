//! The VMM process through its control protocol: spawn, calls, deadline,
//! suspend to a snapshot and restore into a new process.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bubble_vmm_client::{
    socket_path, spawn, CallError, FailureKind, GuestImage, HostileKind, SpawnConfig, VmmClient,
    VmmEvent,
};

fn cfg(dir: &std::path::Path, id: &str, image: GuestImage, restore: bool) -> SpawnConfig {
    SpawnConfig {
        parent: String::new(),
        bubble_id: id.into(),
        memory_mib: 16,
        vcpus: 1,
        image,
        dir: dir.join(id),
        program: env!("CARGO_BIN_EXE_bubble-vmm").into(),
        program_args_prefix: vec![],
        max_payload: 1 << 20,
        restore,
        poll: bubble_vmm::process::DEFAULT_POLL,
        die_with_broker: true,
        boot_timeout: Duration::from_secs(20),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_call_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let c = spawn(&cfg(dir.path(), "b-1", GuestImage::Shim, false))
        .await
        .unwrap();
    c.wait_ready(Duration::from_secs(10)).await.unwrap();
    assert_eq!(
        c.call("echo", b"hi", Duration::from_secs(5)).await.unwrap(),
        b"hi"
    );
    let st = c.status().await.unwrap();
    assert!(st.ready && st.vcpu_us > 0);
    c.shutdown(Duration::from_secs(2)).await;

    let s = spawn(&cfg(
        dir.path(),
        "b-2",
        GuestImage::Hostile(HostileKind::Spin),
        false,
    ))
    .await
    .unwrap();
    s.wait_ready(Duration::from_secs(10)).await.unwrap();
    let mut events = s.events();
    let e = s
        .call("echo", b"x", Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(matches!(e, CallError::DeadlineExceeded(_)), "{e:?}");
    assert!(e.to_string().contains("call deadline exceeded"), "{e}");
    // The bubble is FAILED with that reason, in events and in its status.
    let failed = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match events.recv().await {
                Ok(VmmEvent::Failed(r)) => break r,
                Ok(_) => continue,
                Err(e) => panic!("no FAILED event: {e}"),
            }
        }
    })
    .await
    .unwrap();
    assert!(failed.detail.contains("within 200 ms"), "{failed}");
    assert_eq!(failed.kind, FailureKind::Deadline);
    let st = s.status().await.unwrap();
    assert_eq!(st.failed.as_ref(), Some(&failed));
    // Further calls are refused as failed, not run.
    let e = s
        .call("echo", b"x", Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(e, CallError::Failed(_)), "{e:?}");
    s.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_limits_and_reconnection() {
    let dir = tempfile::tempdir().unwrap();
    let c = spawn(&cfg(dir.path(), "b-r", GuestImage::Shim, false))
        .await
        .unwrap();
    c.wait_ready(Duration::from_secs(10)).await.unwrap();
    let d = Duration::from_secs(5);
    // Exactly the maximum payload passes through the guest and back.
    let max: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    assert_eq!(c.call("echo", &max, d).await.unwrap(), max);
    // Over the maximum is refused before reaching the guest; the bubble
    // keeps serving.
    let over = vec![7u8; (1 << 20) + 4096];
    let e = c.call("echo", &over, d).await.unwrap_err();
    assert!(matches!(e, CallError::BadRequest(_)), "{e:?}");
    // An unknown op is the guest's refusal, not a failure.
    let e = c.call("no-such-op", b"", d).await.unwrap_err();
    assert!(
        matches!(e, CallError::Guest(bubble_vmm::abi::code::UNKNOWN_OP, _)),
        "{e:?}"
    );
    assert_eq!(c.call("echo", b"still", d).await.unwrap(), b"still");
    let pid = c.pid();
    drop(c);

    // Re-adoption: a new connection to the same socket, as a restarted
    // broker would make; the wrong bubble id is refused.
    let sock = socket_path(&dir.path().join("b-r"));
    assert!(VmmClient::connect(&sock, "someone-else", |_| true)
        .await
        .is_err());
    let c = VmmClient::connect(&sock, "b-r", |_| true).await.unwrap();
    assert_eq!(c.pid(), pid);
    c.wait_ready(Duration::from_secs(1)).await.unwrap();
    assert_eq!(c.call("echo", b"again", d).await.unwrap(), b"again");
    let st = c.status().await.unwrap();
    assert_eq!(st.bubble_id, "b-r");
    assert_eq!(st.abi_version, bubble_vmm::abi::ABI_VERSION);
    assert!(st.ready && st.boot_us > 0);
    c.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_guest_fails_only_its_own_vmm() {
    let dir = tempfile::tempdir().unwrap();
    let h = spawn(&cfg(
        dir.path(),
        "b-t",
        GuestImage::Hostile(HostileKind::TripleFault),
        false,
    ))
    .await
    .unwrap();
    let e = h.wait_ready(Duration::from_secs(10)).await.unwrap_err();
    assert!(e.to_string().contains("triple fault"), "{e}");
    // The VMM process exits after reporting.
    let pid = h.pid() as i32;
    let gone = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            // SAFETY: probing a pid with signal 0 has no effect.
            if unsafe { libc::kill(pid, 0) } != 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(gone.is_ok(), "the failed VMM still runs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_and_restore_continue_identically() {
    use bubble_keys::OsRng;
    let dir = tempfile::tempdir().unwrap();
    let a = spawn(&cfg(dir.path(), "b-s", GuestImage::Shim, false))
        .await
        .unwrap();
    a.wait_ready(Duration::from_secs(10)).await.unwrap();
    let d = Duration::from_secs(5);
    let keys = a.call("keys", b"", d).await.unwrap();
    let kem: [u8; 32] = keys[..32].try_into().unwrap();
    let secret = b"credential that must survive";
    let aad = bubble_keys::credential_aad("b-s", "k", &[0; 48], &[0; 32]);
    let sealed =
        bubble_keys::seal_credential(&mut OsRng, &kem, bubble_keys::INFO_CREDENTIAL, &aad, secret)
            .unwrap()
            .encode();
    let mut req = vec![3u8];
    req.extend(b"b-s");
    req.push(1);
    req.extend(b"k");
    req.extend(&sealed);
    a.call("provision", &req, d).await.unwrap();
    let mut h = vec![1u8, b'k'];
    h.extend(b"data");
    let mac = a.call("hmac", &h, d).await.unwrap();

    let snap = a.suspend(Duration::from_secs(10)).await.unwrap().to_vec();
    assert!(snap.len() > 4096);
    a.shutdown(Duration::from_secs(2)).await;

    let b = spawn(&cfg(dir.path(), "b-s2", GuestImage::Shim, true))
        .await
        .unwrap();
    // Sent in uneven parts (as the broker sends decrypted chunks).
    let (x, rest) = snap.split_at(1000);
    let (y, z) = rest.split_at(rest.len() / 2 + 3);
    // Streamed over the socket.
    b.restore(&[x, y, z], None, Duration::from_secs(10))
        .await
        .unwrap();
    b.wait_ready(Duration::from_secs(5)).await.unwrap();
    // Same keys, same credential, same answers.
    assert_eq!(b.call("keys", b"", d).await.unwrap(), keys);
    assert_eq!(b.call("hmac", &h, d).await.unwrap(), mac);
    assert_eq!(b.call("echo", b"after", d).await.unwrap(), b"after");
    b.shutdown(Duration::from_secs(2)).await;

    // Pages faulted in ahead, then written straight into guest memory.
    let runs = bubble_vmm::snapshot::page_runs(&snap).unwrap();
    assert!(!runs.is_empty());
    let b = spawn(&cfg(dir.path(), "b-s2d", GuestImage::Shim, true))
        .await
        .unwrap();
    let span = b.prefault(&runs, Duration::from_secs(5)).await.unwrap();
    let span = span.expect("guest memory span");
    assert_eq!(span.len, 16 << 20);
    b.restore(&[x, y, z], Some(span), Duration::from_secs(10))
        .await
        .unwrap();
    b.wait_ready(Duration::from_secs(5)).await.unwrap();
    assert_eq!(b.call("keys", b"", d).await.unwrap(), keys);
    assert_eq!(b.call("hmac", &h, d).await.unwrap(), mac);
    b.shutdown(Duration::from_secs(2)).await;

    // A corrupted snapshot is refused and starts nothing.
    let c = spawn(&cfg(dir.path(), "b-s3", GuestImage::Shim, true))
        .await
        .unwrap();
    let mut bad = snap.clone();
    bad.truncate(100);
    assert!(c
        .restore(&[&bad], None, Duration::from_secs(5))
        .await
        .is_err());
    c.kill();

    // A page address outside guest memory is refused.
    let n = u32::from_le_bytes(snap[..4].try_into().unwrap()) as usize;
    let mut bad = snap.clone();
    bad[8 + n..16 + n].copy_from_slice(&(16u64 << 20).to_le_bytes());
    let c = spawn(&cfg(dir.path(), "b-s4", GuestImage::Shim, true))
        .await
        .unwrap();
    assert!(c
        .restore(&[&bad], None, Duration::from_secs(5))
        .await
        .is_err());
    c.kill();
    // ... on the direct path too, and page runs outside memory as well.
    let c = spawn(&cfg(dir.path(), "b-s6", GuestImage::Shim, true))
        .await
        .unwrap();
    assert!(c
        .prefault(&[(16 << 20, 1)], Duration::from_secs(5))
        .await
        .is_err());
    let span = c.prefault(&[], Duration::from_secs(5)).await.unwrap();
    let e = c
        .restore(&[&bad], span, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(format!("{e}").contains("snapshot"), "{e}");
    c.kill();

    // A snapshot of another memory size is refused by a VM prepared for
    // this one.
    let mut other = cfg(dir.path(), "b-s5", GuestImage::Shim, true);
    other.memory_mib *= 2;
    let c = spawn(&other).await.unwrap();
    let e = c
        .restore(&[&snap], None, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(format!("{e}").contains("memory"), "{e}");
    c.kill();
}

/// A spawner with one spare ready (the path a create takes).
async fn spawner_with_a_spare(dir: &std::path::Path) -> std::sync::Arc<bubble_vmm_client::Spawner> {
    let sp = bubble_vmm_client::Spawner::new(
        env!("CARGO_BIN_EXE_bubble-vmm").into(),
        vec![],
        dir.join("spares"),
        1,
        bubble_vmm_client::JailSpec::default(),
    );
    sp.refill();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while sp.spares().0 < 1 {
        assert!(std::time::Instant::now() < deadline, "no spare started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    sp
}

/// READY comes at the guest's READY_EARLY; a call sent at once is held
/// until the guest's start-up is over, so its answer always sees the
/// keys: from a spare (no HELLO round trip) and from a fresh process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_right_after_ready_sees_the_keys() {
    let dir = tempfile::tempdir().unwrap();
    let sp = spawner_with_a_spare(dir.path()).await;
    for (i, from_spare) in [true, false, true].into_iter().enumerate() {
        let id = format!("b-k{i}");
        let c = if from_spare {
            sp.spawn(&cfg(dir.path(), &id, GuestImage::Shim, false))
                .await
                .unwrap()
        } else {
            spawn(&cfg(dir.path(), &id, GuestImage::Shim, false))
                .await
                .unwrap()
        };
        c.wait_ready(Duration::from_secs(10)).await.unwrap();
        // Sent the moment READY is known, with no wait of any kind.
        let nonce = [7u8; 32];
        let (keys, bound) = tokio::join!(
            c.call("keys", b"", Duration::from_secs(5)),
            c.call("attest", &nonce, Duration::from_secs(5)),
        );
        let keys = keys.unwrap();
        let b = bubble_vmm::abi::ops::AttestBinding::decode(&bound.unwrap()).unwrap();
        assert_ne!(&keys[..32], &[0u8; 32][..], "zero KEM key");
        assert_ne!(&keys[32..], &[0u8; 32][..], "zero signing key");
        assert_eq!((&keys[..32], &keys[32..]), (&b.kem_pk[..], &b.sig_pk[..]));
        let mut want_bound = nonce.to_vec();
        want_bound.extend_from_slice(&b.portions_digest);
        want_bound.extend_from_slice(&b.policy_digest);
        assert_eq!(
            b.report_data,
            bubble_keys::report_data(&want_bound, &b.kem_pk, &b.sig_pk)
        );
        // Its VMM logged both phases.
        let log = std::fs::read_to_string(dir.path().join(&id).join("vmm.log")).unwrap();
        assert!(
            log.lines()
                .any(|l| l.contains("guest_us=") && l.contains("keys_us=")),
            "{log}"
        );
        c.shutdown(Duration::from_secs(2)).await;
    }
}

/// A guest that says READY_EARLY and never finishes its start-up: READY
/// is reported, but a call never reaches it; the boot deadline fails it
/// (`boot_timeout`), and the held call gets that failure. One that says
/// READY_EARLY and then garbage fails as an ABI breach. Either way
/// another bubble keeps answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_does_not_finish_its_start_up_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let sp = spawner_with_a_spare(dir.path()).await;
    let good = spawn(&cfg(dir.path(), "b-good", GuestImage::Shim, false))
        .await
        .unwrap();
    good.wait_ready(Duration::from_secs(10)).await.unwrap();
    for (i, kind, want) in [
        (0, HostileKind::EarlySpin, FailureKind::BootTimeout),
        (1, HostileKind::EarlyGarbage, FailureKind::GuestAbi),
    ] {
        let mut c = cfg(
            dir.path(),
            &format!("b-e{i}"),
            GuestImage::Hostile(kind),
            false,
        );
        c.boot_timeout = Duration::from_millis(1500);
        let h = sp.spawn(&c).await.unwrap();
        let mut events = h.events();
        let started = std::time::Instant::now();
        // READY_EARLY is READY to the broker.
        h.wait_ready(Duration::from_secs(10)).await.unwrap();
        let e = h
            .call("echo", b"x", Duration::from_secs(5))
            .await
            .unwrap_err();
        let CallError::Failed(r) = e else {
            panic!("{kind:?}: {e:?}")
        };
        assert_eq!(r.kind, want, "{kind:?}: {r}");
        if kind == HostileKind::EarlySpin {
            // The boot deadline, not the call's (5 s).
            assert!(r.detail.contains("within 1500 ms"), "{r}");
            assert!(started.elapsed() < Duration::from_secs(4), "{r}");
        }
        // The failure was an event too, and the status says it.
        let failed = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match events.recv().await {
                    Ok(VmmEvent::Failed(r)) => break r,
                    Ok(_) => continue,
                    Err(e) => panic!("no FAILED event: {e}"),
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(failed.kind, want);
        assert_eq!(h.ended().map(|r| r.kind), Some(want));
        assert_eq!(
            good.call("echo", b"fine", Duration::from_secs(5))
                .await
                .unwrap(),
            b"fine"
        );
        h.kill();
    }
    good.shutdown(Duration::from_secs(2)).await;
}
