//! The claim's lease and fence on a local store (the same code runs
//! against S3 in `tests/tests/leases.rs`), as the attack: concurrent
//! takers, a holder that outlives its lease, a stale commit.

use std::time::Duration;

use object_store::path::Path as ObjPath;
use object_store::{ObjectStoreExt, PutPayload};

use super::*;

async fn store(lease_ms: u64) -> (tempfile::TempDir, FrozenStore, FrozenStore) {
    let dir = tempfile::tempdir().unwrap();
    // Two handles on one directory: two brokers sharing it.
    let mut a = FrozenStore::local(dir.path()).unwrap();
    let mut b = FrozenStore::local(dir.path()).unwrap();
    a.set_lease(Duration::from_millis(lease_ms));
    b.set_lease(Duration::from_millis(lease_ms));
    // A copy to claim: its manifest exists.
    a.store
        .put(
            &ObjPath::from("frozen/b1/g1/manifest"),
            PutPayload::from("m"),
        )
        .await
        .unwrap();
    (dir, a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_many_concurrent_claimants_one_wins() {
    let (_d, a, b) = store(60_000).await;
    let mut tasks = Vec::new();
    for i in 0..16 {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            s.claim("b1", 1, &format!("broker-{i}")).await
        }));
    }
    let mut won = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(c) => {
                assert_eq!(c.token(), 1);
                won += 1;
            }
            Err(ClaimError::Taken) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(won, 1);
}

#[tokio::test]
async fn a_live_claim_is_refused_an_expired_one_taken_over_and_the_stale_holder_fenced() {
    let (_d, a, b) = store(300).await;
    let mut old = a.claim("b1", 1, "A").await.unwrap();
    // Renewed within its lease, it stays A's.
    a.renew(&mut old).await.unwrap();
    assert!(matches!(
        b.claim("b1", 1, "B").await,
        Err(ClaimError::Taken)
    ));
    // A stops renewing; past the lease B takes it with the next token.
    let until = std::time::Instant::now() + Duration::from_secs(10);
    let mut new = loop {
        match b.claim("b1", 1, "B").await {
            Ok(c) => break c,
            Err(ClaimError::Taken) => {
                assert!(std::time::Instant::now() < until, "never taken over");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(new.token(), old.token() + 1);
    // A, back, can neither renew nor commit; giving back changes nothing.
    assert!(matches!(a.renew(&mut old).await, Err(ClaimError::Lost)));
    assert!(matches!(a.commit(&mut old).await, Err(ClaimError::Lost)));
    a.release(old).await;
    b.commit(&mut new).await.unwrap();
    // A committed claim is nobody's to take, however old.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(matches!(
        a.claim("b1", 1, "A").await,
        Err(ClaimError::Taken)
    ));
}

#[tokio::test]
async fn a_given_back_claim_is_taken_at_once_and_a_removed_one_fences() {
    let (_d, a, b) = store(60_000).await;
    let c = a.claim("b1", 1, "A").await.unwrap();
    a.release(c).await;
    let mut c = b.claim("b1", 1, "B").await.unwrap();
    assert_eq!(c.token(), 2);
    // The copy is purged under it (a delete): B cannot commit.
    a.purge_generation("b1", 1).await.unwrap();
    assert!(matches!(b.commit(&mut c).await, Err(ClaimError::Lost)));
    // And a claim on a copy without manifest is refused as missing.
    assert!(matches!(
        a.claim("b1", 1, "A").await,
        Err(ClaimError::Store(BrokerError::FrozenMissing))
    ));
}

#[tokio::test]
async fn a_broker_takes_its_own_claim_back_after_a_restart() {
    let (_d, a, b) = store(60_000).await;
    let c = a.claim("b1", 1, "A").await.unwrap();
    let again = b.claim("b1", 1, "A").await.unwrap();
    assert_eq!(again.token(), c.token() + 1);
    assert!(matches!(
        b.claim("b1", 1, "B").await,
        Err(ClaimError::Taken)
    ));
}

#[tokio::test]
async fn a_suspend_claim_never_expires_for_another_broker() {
    let (_d, a, b) = store(100).await;
    // A stores generation 1 of a bubble that still runs on A.
    let mut held = a.reserve("b1", 1, "A").await.unwrap();
    a.store
        .put(
            &ObjPath::from("frozen/b1/g1/manifest"),
            PutPayload::from("m"),
        )
        .await
        .unwrap();
    // Long past the lease (A paused), B can neither restore nor reserve it,
    // and B's restart-time give-back leaves another broker's claim alone.
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert!(matches!(
        b.claim("b1", 1, "B").await,
        Err(ClaimError::Taken)
    ));
    assert!(matches!(
        b.reserve("b1", 1, "B").await,
        Err(ClaimError::Taken)
    ));
    b.release_suspended("b1", 1, "B").await.unwrap();
    assert!(matches!(
        b.claim("b1", 1, "B").await,
        Err(ClaimError::Taken)
    ));
    // A, back, still holds it: the fence passes and the copy is given out.
    a.renew(&mut held).await.unwrap();
    a.release(held).await;
    let c = b.claim("b1", 1, "B").await.unwrap();
    assert_eq!(c.token(), 2);
}

#[tokio::test]
async fn a_restarted_broker_gives_back_its_own_suspend_claim_only() {
    let (_d, a, b) = store(60_000).await;
    // A recorded the suspend and died before giving the claim back.
    let _held = a.reserve("b1", 1, "A").await.unwrap();
    a.store
        .put(
            &ObjPath::from("frozen/b1/g1/manifest"),
            PutPayload::from("m"),
        )
        .await
        .unwrap();
    assert!(matches!(
        b.claim("b1", 1, "B").await,
        Err(ClaimError::Taken)
    ));
    // A restarted (a new handle, the same identity) gives it back.
    let restarted = FrozenStore::local(_d.path()).unwrap();
    restarted.release_suspended("b1", 1, "A").await.unwrap();
    let mut c = b.claim("b1", 1, "B").await.unwrap();
    // A restore claim is not a suspend claim: A's give-back leaves it.
    restarted.release_suspended("b1", 1, "A").await.unwrap();
    b.commit(&mut c).await.unwrap();
}

/// A consumed copy's directories are removed in the background (and by a
/// purge) while the bubble's next suspend creates its next generation's:
/// a removal must never take the bubble's directory from under the new
/// claim (CI saw `frozen/ID/gN: No such file or directory` on a suspend,
/// two removals of the bubble's directory around the claim's
/// `create_dir_all`). Here two threads remove empty directories of the
/// bubble without pause while claims are written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_consumed_copies_never_breaks_the_next_suspend() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (d, a, _b) = store(60_000).await;
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let removers: Vec<_> = (0..2)
        .map(|_| {
            let (root, stop) = (d.path().to_path_buf(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    super::super::cas::remove_empty_local_dirs(&root, "frozen/b2/g0");
                }
            })
        })
        .collect();
    let mut failed = None;
    for g in 1..=400u64 {
        match a.reserve("b2", g, "A").await {
            Ok(c) => a.release(c).await,
            Err(e) => {
                failed = Some(format!("generation {g}: {e}"));
                break;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for r in removers {
        r.join().unwrap();
    }
    assert_eq!(failed, None);
}
