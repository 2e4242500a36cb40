//! End to end on real KVM: suspend a bubble with state to the encrypted
//! store and restore it; parent-held keys; tampering, truncation, rollback
//! and double restore are refused with the right errors.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bubble_client::Parent;
use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;
use tonic::Code;

const SUSPENDED: i32 = pb::BubbleState::Suspended as i32;
const READY: i32 = pb::BubbleState::Ready as i32;

fn hmac_input() -> Vec<u8> {
    let mut h = vec![5u8];
    h.extend(b"token");
    h.extend(b"challenge");
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_restore_and_every_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start(dir.path(), false);
    let mut c = broker.client().await;
    let parent = Parent::from_client(c.clone());
    let mut bubble = parent.create(16).await.unwrap();
    let id = bubble.id().to_string();
    let (keys, _) = bubble.trust_unverified().await.unwrap();
    bubble
        .provision("token", b"a credential that survives")
        .await
        .unwrap();
    let mac = bubble.call("hmac", &hmac_input()).await.unwrap();

    // Suspend: the VMM process goes away, the bubble is SUSPENDED.
    let s = c
        .suspend_bubble(suspend_req(&id, b""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.state, SUSPENDED);
    assert_eq!(s.generation, 1);
    assert!(no_vmms_within(dir.path(), Duration::from_secs(5)).await);
    let e = c.call(call_req(&id, "echo", b"x")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    // The plaintext credential is not in the store.
    let store = dir.path().join("store/frozen").join(&id).join("g1");
    for f in std::fs::read_dir(&store).unwrap().flatten() {
        let b = std::fs::read(f.path()).unwrap();
        assert!(!b.windows(26).any(|w| w == b"a credential that survives"));
    }

    // Restore: same keys, same credential, same answers.
    let r = c
        .restore_bubble(restore_req(&id, b"", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.state, READY);
    assert_eq!(bubble.fetch_keys_unverified().await.unwrap(), keys);
    assert_eq!(bubble.call("hmac", &hmac_input()).await.unwrap(), mac);
    assert_eq!(bubble.call("echo", b"after").await.unwrap(), b"after");
    // Restoring consumed the copy: a second restore is refused.
    let e = c
        .restore_bubble(restore_req(&id, b"", 0))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(!store.join("manifest").exists());

    // A parent-held key: required for restore.
    let kek = [7u8; 32];
    c.suspend_bubble(suspend_req(&id, &kek)).await.unwrap();
    let e = c
        .restore_bubble(restore_req(&id, b"", 0))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = c
        .restore_bubble(restore_req(&id, &[8u8; 32], 0))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = c
        .restore_bubble(restore_req(&id, &[1u8; 5], 0))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let g2 = dir.path().join("store/frozen").join(&id).join("g2");
    let saved: Vec<(std::path::PathBuf, Vec<u8>)> = std::fs::read_dir(&g2)
        .unwrap()
        .flatten()
        .map(|f| (f.path(), std::fs::read(f.path()).unwrap()))
        .collect();

    // A tampered chunk: DATA_LOSS, nothing starts, the copy is kept.
    let chunk = g2.join("chunk-0");
    let orig = std::fs::read(&chunk).unwrap();
    let mut bad = orig.clone();
    bad[100] ^= 1;
    std::fs::write(&chunk, &bad).unwrap();
    let e = c
        .restore_bubble(restore_req(&id, &kek, 0))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");
    assert!(no_vmms_within(dir.path(), Duration::from_secs(5)).await);
    // A truncated manifest: DATA_LOSS as well.
    std::fs::write(&chunk, &orig).unwrap();
    let manifest = g2.join("manifest");
    let m = std::fs::read(&manifest).unwrap();
    std::fs::write(&manifest, &m[..m.len() / 2]).unwrap();
    let e = c
        .restore_bubble(restore_req(&id, &kek, 0))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");
    std::fs::write(&manifest, &m).unwrap();
    // The manifest's plaintext key kind, changed: it is sealed too.
    let text = String::from_utf8(m.clone()).unwrap();
    assert!(text.contains(r#""kek":"parent""#), "{text}");
    std::fs::write(
        &manifest,
        text.replace(r#""kek":"parent""#, r#""kek":"broker""#),
    )
    .unwrap();
    let e = c
        .restore_bubble(restore_req(&id, &kek, 0))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");
    std::fs::write(&manifest, &m).unwrap();
    // An extra chunk placed in the copy: refused, not ignored.
    std::fs::write(g2.join("chunk-99"), &orig).unwrap();
    let e = c
        .restore_bubble(restore_req(&id, &kek, 0))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");
    assert!(e.message().contains("unexpected object"), "{e:?}");
    std::fs::remove_file(g2.join("chunk-99")).unwrap();
    let d = c
        .describe_bubble(pb::BubbleRef {
            bubble_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.state, SUSPENDED);
    // The intact copy restores.
    c.restore_bubble(restore_req(&id, &kek, 0)).await.unwrap();
    assert_eq!(bubble.call("hmac", &hmac_input()).await.unwrap(), mac);

    // Rollback: an older generation placed where the current one should be
    // is refused.
    c.suspend_bubble(suspend_req(&id, &kek)).await.unwrap();
    let g3 = dir.path().join("store/frozen").join(&id).join("g3");
    for e in std::fs::read_dir(&g3).unwrap().flatten() {
        std::fs::remove_file(e.path()).unwrap();
    }
    for (p, b) in &saved {
        std::fs::write(g3.join(p.file_name().unwrap()), b).unwrap();
    }
    let e = c
        .restore_bubble(restore_req(&id, &kek, 0))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");
    assert!(e.message().contains("generation"), "{}", e.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_bubbles_are_suspended() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start(dir.path(), false);
    let mut c = broker.client().await;
    let mut req = create_req(8);
    req.idle = Some(pb::IdlePolicy {
        idle_timeout_s: 1,
        action: pb::IdleAction::Suspend as i32,
    });
    let b = c.create_bubble(req).await.unwrap().into_inner();
    let s = wait_for(&mut c, &b.bubble_id, Duration::from_secs(10), |b| {
        b.state == SUSPENDED
    })
    .await;
    assert_eq!(s.state, SUSPENDED);
    let r = c
        .restore_bubble(restore_req(&b.bubble_id, b"", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.state, READY);
    let out = c
        .call(call_req(&b.bubble_id, "echo", b"woke"))
        .await
        .unwrap()
        .into_inner()
        .output;
    assert_eq!(out, b"woke");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_on_a_second_broker_sharing_the_store() {
    let store = tempfile::tempdir().unwrap();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let opts = || Opts {
        args: vec![
            "--store".into(),
            store.path().to_string_lossy().into_owned(),
        ],
        ..Opts::default()
    };
    let a = BrokerProc::start_with(da.path(), opts());
    let b = BrokerProc::start_with(db.path(), opts());
    let mut ca = a.client().await;
    let mut cb = b.client().await;
    let parent = Parent::from_client(ca.clone());
    let mut bubble = parent.create(16).await.unwrap();
    let id = bubble.id().to_string();
    bubble.trust_unverified().await.unwrap();
    bubble
        .provision("token", b"moves between hosts")
        .await
        .unwrap();
    let mac = bubble.call("hmac", &hmac_input()).await.unwrap();
    let kek = [3u8; 32];
    ca.suspend_bubble(suspend_req(&id, &kek)).await.unwrap();

    // Broker B does not know the bubble: without the generation and key it
    // is not accessible; with them it restores it.
    let e = cb
        .restore_bubble(restore_req(&id, &kek, 0))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let mut req = restore_req(&id, &kek, 0);
    req.generation = 1;
    let r = cb.restore_bubble(req.clone()).await.unwrap().into_inner();
    assert_eq!(r.state, READY);
    let on_b = Parent::from_client(cb.clone()).bubble(&id);
    assert_eq!(on_b.call("hmac", &hmac_input()).await.unwrap(), mac);
    // The copy was consumed: broker A cannot run the same generation.
    let e = ca
        .restore_bubble(restore_req(&id, &kek, 0))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");
}

/// A bubble whose snapshot is a few MiB (a 1 MiB echo touches the mailbox).
async fn bubble_with_state(c: &mut bubble_e2e_tests::Client) -> String {
    let b = c.create_bubble(create_req(16)).await.unwrap().into_inner();
    let big = vec![0x5au8; 1 << 20];
    c.call(call_req(&b.bubble_id, "echo", &big)).await.unwrap();
    b.bubble_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_the_suspend_and_the_bubble_keeps_running() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("small-store");
    std::fs::create_dir_all(&store).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&store)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !mounted {
        missing_dependency("cannot mount a 1 MiB tmpfs here (needs root) to fill the disk");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Unmount(store.clone());
    let broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            args: vec!["--store".into(), store.to_string_lossy().into_owned()],
            ..Opts::default()
        },
    );
    let mut c = broker.client().await;
    let id = bubble_with_state(&mut c).await;
    let e = c.suspend_bubble(suspend_req(&id, b"")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let d = c
        .describe_bubble(pb::BubbleRef {
            bubble_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.state, READY);
    let out = c
        .call(call_req(&id, "echo", b"still here"))
        .await
        .unwrap()
        .into_inner()
        .output;
    assert_eq!(out, b"still here");
    drop(broker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_chunk_writes_leaves_the_bubble_running() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            // Far longer than the test needs: it kills the broker during
            // the first pause.
            env: vec![("BUBBLED_TEST_CHUNK_PAUSE_MS".into(), "30000".into())],
            ..Opts::default()
        },
    );
    let mut c = broker.client().await;
    let id = bubble_with_state(&mut c).await;
    let mut c2 = c.clone();
    let id2 = id.clone();
    let suspending = tokio::spawn(async move { c2.suspend_bubble(suspend_req(&id2, b"")).await });
    // Kill the broker while it writes chunks: once the first chunk is in
    // the store (written atomically), it pauses before the next.
    let g1 = dir.path().join("store/frozen").join(&id).join("g1");
    wait_until(
        "the first chunk in the store",
        Duration::from_secs(10),
        || g1.join("chunk-0").exists(),
        |written| *written,
    )
    .await;
    broker.kill();
    assert!(suspending.await.unwrap().is_err());
    assert!(g1.join("chunk-0").exists(), "the crash came mid-write");
    assert!(!g1.join("chunk-1").exists(), "the crash came in the pause");
    assert!(!g1.join("manifest").exists());

    // After a restart the bubble is running, consistent, and suspends fine.
    let broker2 = BrokerProc::start(dir.path(), false);
    let mut c = broker2.client().await;
    let d = wait_for(&mut c, &id, Duration::from_secs(5), |b| b.state == READY).await;
    assert_eq!(d.state, READY, "{}", d.failure_reason);
    let out = c
        .call(call_req(&id, "echo", b"survived"))
        .await
        .unwrap()
        .into_inner()
        .output;
    assert_eq!(out, b"survived");
    suspend_and_restore(&mut c, &id).await;
}
