//! The embedded queue's pending counts, attacked: 64 concurrent publishes
//! against a limit of 10 store exactly 10 (the others store nothing); the
//! count follows acks, retries and dead letters, survives a reopen, and a
//! queue file made before the counts existed is counted once on open.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bubble_events::embedded::{EmbeddedQueue, QueueConfig};
use bubble_events::{Delivery, EventError, EventKey, Source};

fn key(s: &str) -> EventKey {
    EventKey::new(s).unwrap()
}

fn cfg() -> QueueConfig {
    QueueConfig {
        ack_wait: Duration::from_secs(60),
        max_deliver: 2,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_publishes_stop_exactly_at_the_limit_and_the_count_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.redb");
    let q = EmbeddedQueue::open(&path, cfg()).unwrap();
    let mut tasks = Vec::new();
    for i in 0..64 {
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            q.publish_bounded("a", &key(&format!("k{i}")), b"x", Some(10))
                .await
        }));
    }
    let (mut ok, mut refused) = (Vec::new(), 0);
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.unwrap() {
            Ok(p) => {
                assert!(!p.duplicate);
                ok.push(i);
            }
            Err(EventError::Backlog { pending, limit }) => {
                assert_eq!((pending, limit), (10, 10));
                refused += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!((ok.len(), refused), (10, 54));
    assert_eq!(q.depth_of("a").await.unwrap(), 10);
    // Nothing of the refused ones was stored: 10 events in the table.
    assert_eq!(q.depth().await.unwrap(), 10);
    // Another subject has its own count; a duplicate of an accepted key
    // is a duplicate, not a refusal.
    assert!(
        !q.publish_bounded("b", &key("b0"), b"x", Some(1))
            .await
            .unwrap()
            .duplicate
    );
    let again = q
        .publish_bounded("a", &key(&format!("k{}", ok[0])), b"x", Some(10))
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(q.depth_of("b").await.unwrap(), 1);

    // Settling moves the count: 2 acked, 1 retried (still pending),
    // 1 dead-lettered.
    let sub = q.subscribe("a").unwrap();
    let mut d = sub.fetch(4, Duration::ZERO).await.unwrap().into_iter();
    d.next().unwrap().ack().await.unwrap();
    d.next().unwrap().ack().await.unwrap();
    d.next().unwrap().retry(Duration::ZERO).await.unwrap();
    d.next().unwrap().dead_letter("poison").await.unwrap();
    assert_eq!(q.depth_of("a").await.unwrap(), 7);
    // Dead-lettered by max_deliver in a fetch (each taken twice, then a
    // third fetch gives them up).
    for _ in 0..2 {
        for d in sub.fetch(100, Duration::ZERO).await.unwrap() {
            d.retry(Duration::ZERO).await.unwrap();
        }
    }
    assert!(sub.fetch(100, Duration::ZERO).await.unwrap().is_empty());
    assert_eq!(q.depth_of("a").await.unwrap(), 0);
    assert_eq!(q.depth().await.unwrap(), 1, "b's event only");
    for i in 0..3 {
        q.publish_bounded("a", &key(&format!("n{i}")), b"x", Some(10))
            .await
            .unwrap();
    }
    drop((sub, q));

    // Reopened: the same counts.
    let q = EmbeddedQueue::open(&path, cfg()).unwrap();
    assert_eq!(q.depth_of("a").await.unwrap(), 3);
    assert_eq!(q.depth_of("b").await.unwrap(), 1);
    drop(q);

    // A queue file from before the counts: no counts, no flag. Opening it
    // counts them from the events once.
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.delete_table(redb::TableDefinition::<&str, u64>::new("subject_depth_v1"))
            .unwrap();
        txn.open_table(redb::TableDefinition::<&str, u64>::new("meta_v1"))
            .unwrap()
            .remove("depth_counted")
            .unwrap();
        txn.commit().unwrap();
    }
    let q = EmbeddedQueue::open(&path, cfg()).unwrap();
    assert_eq!(q.depth_of("a").await.unwrap(), 3);
    assert_eq!(q.depth_of("b").await.unwrap(), 1);
    let e = q
        .publish_bounded("a", &key("late"), b"x", Some(3))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            EventError::Backlog {
                pending: 3,
                limit: 3
            }
        ),
        "{e}"
    );
}
