//! Records and frozen copies do not pile up, end to end: listings page,
//! ended records are collected after their retention, a deleted bubble
//! leaves nothing in the store, suspend/restore cycles leave no empty
//! directories, and the store is private to the broker's uid.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;
use tonic::Code;

const READY: i32 = pb::BubbleState::Ready as i32;
const DELETED: i32 = pb::BubbleState::Deleted as i32;

async fn create(c: &mut Client) -> String {
    let b = c.create_bubble(create_req(16)).await.unwrap().into_inner();
    assert_eq!(b.state, READY, "{}", b.failure_reason);
    b.bubble_id
}

fn list_req(page_size: u32, page_token: &str, include_deleted: bool) -> pb::ListBubblesRequest {
    pb::ListBubblesRequest {
        include_deleted,
        page_size,
        page_token: page_token.into(),
        ..Default::default()
    }
}

/// Every file and directory under `dir` (relative paths).
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            out.push(p.strip_prefix(dir).unwrap().display().to_string());
            if p.is_dir() {
                todo.push(p);
            }
        }
    }
    out
}

/// `paths` without the store's broker-level files, which hold nothing of
/// any bubble: the claim lock of a local store and the decoy copy every
/// broker writes so that refusing an unknown copy costs what refusing a
/// real one does (docs/frozen-format.md).
fn per_bubble(paths: Vec<String>) -> Vec<String> {
    paths
        .into_iter()
        .filter(|p| p != ".claims.lock" && p != "frozen-decoy")
        .collect()
}

/// Waits until the store under `dir` holds nothing (chunks of consumed
/// copies are deleted in the background).
async fn store_empties(dir: &Path) {
    let store = dir.join("store");
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let left = per_bubble(tree(&store));
        if left.is_empty() || left == ["frozen"] {
            return;
        }
        assert!(Instant::now() < until, "store still holds {left:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_pages_through_every_bubble_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start(dir.path(), false);
    let mut c = broker.client().await;
    let mut made = Vec::new();
    for _ in 0..5 {
        made.push(create(&mut c).await);
    }
    let gone = made[1].clone();
    c.delete_bubble(pb::BubbleRef {
        bubble_id: gone.clone(),
    })
    .await
    .unwrap();
    for (deleted, want) in [(false, 4usize), (true, 5)] {
        let mut seen = Vec::new();
        let mut token = String::new();
        let mut pages = 0;
        loop {
            let r = c
                .list_bubbles(list_req(2, &token, deleted))
                .await
                .unwrap()
                .into_inner();
            assert!(r.bubbles.len() <= 2);
            seen.extend(r.bubbles.into_iter().map(|b| b.bubble_id));
            pages += 1;
            if r.next_page_token.is_empty() {
                break;
            }
            token = r.next_page_token;
        }
        assert_eq!(seen.len(), want, "no bubble twice");
        assert_eq!(pages, want.div_ceil(2));
        let set: HashSet<_> = seen.iter().cloned().collect();
        assert_eq!(set.len(), want);
        assert_eq!(set.contains(&gone), deleted);
        // Oldest first, as created.
        let order: Vec<_> = made
            .iter()
            .filter(|id| set.contains(*id))
            .cloned()
            .collect();
        assert_eq!(seen, order);
    }
    let all = c
        .list_bubbles(list_req(0, "", true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.bubbles.len(), 5);
    assert!(all.next_page_token.is_empty());
    for bad in ["garbage", "12", ".b-", "x.b-0"] {
        let st = c.list_bubbles(list_req(2, bad, false)).await.unwrap_err();
        assert_eq!(st.code(), Code::InvalidArgument, "{bad}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_records_are_collected_after_their_retention() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            config: Some("record_retention_s = 1\n".into()),
            ..Default::default()
        },
    );
    let mut c = broker.client().await;
    let keep = create(&mut c).await;
    let gone = create(&mut c).await;
    let d = c
        .delete_bubble(pb::BubbleRef {
            bubble_id: gone.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.state, DELETED);
    // Visible as DELETED until collected, then unknown like any id.
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        match c
            .describe_bubble(pb::BubbleRef {
                bubble_id: gone.clone(),
            })
            .await
        {
            Ok(b) => assert_eq!(b.into_inner().state, DELETED),
            Err(st) => {
                assert_eq!(st.code(), Code::PermissionDenied);
                break;
            }
        }
        assert!(
            Instant::now() < until,
            "the DELETED record was never collected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all = c
        .list_bubbles(list_req(0, "", true))
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = all.bubbles.iter().map(|b| b.bubble_id.clone()).collect();
    assert_eq!(ids, vec![keep.clone()], "the running bubble is kept");
    // Gone from the registry too: a restarted broker does not know it.
    drop(c);
    drop(broker);
    let broker = BrokerProc::start(dir.path(), false);
    let mut c = broker.client().await;
    let st = c
        .describe_bubble(pb::BubbleRef { bubble_id: gone })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_suspended_bubble_leaves_nothing_in_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start(dir.path(), false);
    let mut c = broker.client().await;
    let id = create(&mut c).await;
    c.call(call_req(&id, "echo", b"state")).await.unwrap();
    c.suspend_bubble(suspend_req(&id, b"")).await.unwrap();
    let store = dir.path().join("store");
    let mode = std::fs::metadata(&store).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "the store is private to the broker");
    assert!(tree(&store).iter().any(|p| p.ends_with("manifest")));
    let d = c
        .delete_bubble(pb::BubbleRef {
            bubble_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.state, DELETED);
    assert_eq!(
        per_bubble(tree(&store)),
        vec!["frozen".to_string()],
        "nothing left"
    );
    // Another broker on the same store cannot import it.
    let other = tempfile::tempdir().unwrap();
    let b2 = BrokerProc::start_with(
        other.path(),
        Opts {
            args: vec!["--store".into(), store.display().to_string()],
            ..Default::default()
        },
    );
    let mut c2 = b2.client().await;
    let st = c2
        .restore_bubble(restore_req(&id, b"", 1))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_restore_cycles_leave_no_empty_directories() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start(dir.path(), false);
    let mut c = broker.client().await;
    let id = create(&mut c).await;
    for _ in 0..5 {
        suspend_and_restore(&mut c, &id).await;
    }
    store_empties(dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_registry_refuses_to_start_instead_of_stopping_bubbles() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProc::start(dir.path(), false);
    let mut c = broker.client().await;
    let id = create(&mut c).await;
    // The bubble's VMM, as the broker knows it (its host pid).
    let vmm = describe(&mut c, &id).await.vmm_pid as i32;
    assert!(vmm > 0);
    let alive = |pid: i32| {
        // SAFETY: signal 0 only checks that the process exists.
        unsafe { libc::kill(pid, 0) == 0 }
    };
    drop(c);
    // The broker dies; its bubble runs on (to be re-adopted).
    broker.kill();
    assert!(alive(vmm), "the VMM died with its broker");
    std::fs::remove_file(dir.path().join("registry.redb")).unwrap();
    let out = std::process::Command::new(broker_bin())
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("registry") && err.contains("bubble director"),
        "a clear reason: {err}"
    );
    assert!(alive(vmm), "the bubble still runs");
    assert!(dir.path().join("bubbles").join(&id).exists());
    drop(broker);
}
