//! The embedded queue's direct hand-off and one-commit completion,
//! attacked: a waiting fetch is handed the event leased to it (first
//! delivery); concurrent publishers racing waiting consumers settle every
//! event exactly once; a fetch dropped while waiting loses nothing (the
//! event is ready again at once, its delivery not counted); a queue that
//! "crashes" (is dropped and reopened) holding a handed-over event gives it
//! back when its lease ends; `complete` stores the result and acks in one
//! commit, keeps the first result per key, and a stale delivery's
//! `complete` stores nothing new and acks nothing.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bubble_events::embedded::{EmbeddedQueue, QueueConfig};
use bubble_events::{Delivery, EventKey, Outcome, Source};
use tokio::sync::Mutex;

fn key(s: &str) -> EventKey {
    EventKey::new(s).unwrap()
}

fn open(dir: &tempfile::TempDir, cfg: QueueConfig) -> EmbeddedQueue {
    EmbeddedQueue::open(&dir.path().join("events.redb"), cfg).unwrap()
}

const LONG: Duration = Duration::from_secs(60);

/// Waits until a fetch on `q`'s subject is registered as a waiter: its
/// fetch found nothing; proven by publishing nothing and polling the
/// queue's waiter count.
async fn until_waiting(q: &EmbeddedQueue, n: usize) {
    let end = Instant::now() + Duration::from_secs(10);
    while q.waiting() < n {
        assert!(Instant::now() < end, "the fetch never waited");
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_fetch_is_handed_the_event_leased_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(
        &dir,
        QueueConfig {
            ack_wait: LONG,
            ..Default::default()
        },
    );
    let sub = q.subscribe("a.b").unwrap();
    let f = tokio::spawn(async move { sub.fetch(8, LONG).await.unwrap() });
    until_waiting(&q, 1).await;
    // Another subject's event is not handed to it.
    q.publish("a.c", &key("other"), b"x").await.unwrap();
    q.publish("a.b", &key("k1"), b"hello").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.len(), 1);
    let d = got.into_iter().next().unwrap();
    assert_eq!(d.event().key.as_str(), "k1");
    assert_eq!(d.event().attempt, 1);
    assert_eq!(&d.event().payload[..], b"hello");
    // It is leased: nobody else gets it.
    let other = q.subscribe("a.b").unwrap();
    assert!(other
        .fetch(8, Duration::from_millis(100))
        .await
        .unwrap()
        .is_empty());
    let done = d.complete(&Outcome::Ok(b"r".to_vec())).await.unwrap();
    assert!(done.acked && !done.result.duplicate);
    assert_eq!(q.depth_of("a.b").await.unwrap(), 0);
    assert_eq!(
        q.result(&key("k1")).await.unwrap(),
        Some(Outcome::Ok(b"r".to_vec()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_publishers_and_waiting_consumers_settle_each_event_once() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(
        &dir,
        QueueConfig {
            ack_wait: LONG,
            ..Default::default()
        },
    );
    let seen: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let mut consumers = Vec::new();
    for _ in 0..4 {
        let (sub, seen) = (q.subscribe("pay.x").unwrap(), Arc::clone(&seen));
        consumers.push(tokio::spawn(async move {
            loop {
                let batch = sub.fetch(4, Duration::from_millis(500)).await.unwrap();
                if batch.is_empty() {
                    return;
                }
                for d in batch {
                    let k = d.event().key.to_string();
                    *seen.lock().await.entry(k).or_default() += 1;
                    let done = d.complete(&Outcome::Ok(vec![1])).await.unwrap();
                    assert!(done.acked);
                }
            }
        }));
    }
    let mut pubs = Vec::new();
    for p in 0..4 {
        let q = q.clone();
        pubs.push(tokio::spawn(async move {
            for i in 0..60 {
                q.publish("pay.x", &key(&format!("p{p}-{i}")), b"e")
                    .await
                    .unwrap();
            }
        }));
    }
    for p in pubs {
        p.await.unwrap();
    }
    for c in consumers {
        c.await.unwrap();
    }
    let seen = seen.lock().await;
    assert_eq!(seen.len(), 240, "an event was lost");
    assert!(seen.values().all(|&n| n == 1), "an event ran twice");
    assert_eq!(q.depth().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_dropped_while_waiting_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(
        &dir,
        QueueConfig {
            ack_wait: LONG,
            ..Default::default()
        },
    );
    // Many rounds: a waiting fetch is cancelled while a publish races to
    // hand it an event (before, during or after the hand-off). The event
    // is never stuck behind the 60 s lease: the next fetch gets it at once,
    // as its first counted delivery.
    for i in 0..50 {
        let sub = q.subscribe("s.t").unwrap();
        let f = tokio::spawn(async move { sub.fetch(1, LONG).await });
        until_waiting(&q, 1).await;
        let k = key(&format!("k{i}"));
        let (q2, k2) = (q.clone(), k.clone());
        let p = tokio::spawn(async move { q2.publish("s.t", &k2, b"x").await });
        if i % 2 == 0 {
            tokio::task::yield_now().await;
        }
        f.abort();
        let handed = match f.await {
            Ok(r) => r.unwrap(),
            Err(_) => Vec::new(), // cancelled
        };
        p.await.unwrap().unwrap();
        let d = if let Some(d) = handed.into_iter().next() {
            d
        } else {
            let got = q
                .subscribe("s.t")
                .unwrap()
                .fetch(1, Duration::from_secs(10))
                .await
                .unwrap();
            assert_eq!(got.len(), 1, "round {i}: the event was stuck");
            got.into_iter().next().unwrap()
        };
        assert_eq!(d.event().key, k);
        assert_eq!(d.event().attempt, 1, "round {i}: a lost hand-off counted");
        assert!(d.complete(&Outcome::Ok(vec![])).await.unwrap().acked);
    }
    assert_eq!(q.depth().await.unwrap(), 0);
    assert_eq!(q.waiting(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_holding_a_handed_event_gives_it_back_after_the_lease() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = QueueConfig {
        ack_wait: Duration::from_millis(300),
        ..Default::default()
    };
    let q = open(&dir, cfg);
    let sub = q.subscribe("c.d").unwrap();
    let f = tokio::spawn(async move { sub.fetch(1, LONG).await.unwrap() });
    until_waiting(&q, 1).await;
    q.publish("c.d", &key("held"), b"p").await.unwrap();
    let held = f.await.unwrap();
    assert_eq!(held.len(), 1);
    // The broker dies holding it: the delivery is dropped unsettled (as
    // a crash leaves it) and the queue is reopened from its file.
    drop(held);
    drop(q);
    let q = open(&dir, cfg);
    let got = q
        .subscribe("c.d")
        .unwrap()
        .fetch(1, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(got.len(), 1, "the handed-over event was lost");
    let d = got.into_iter().next().unwrap();
    assert_eq!((d.event().key.as_str(), d.event().attempt), ("held", 2));
    assert!(d.complete(&Outcome::Ok(vec![2])).await.unwrap().acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_keeps_the_first_result_and_a_stale_delivery_acks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(
        &dir,
        QueueConfig {
            ack_wait: Duration::from_millis(200),
            ..Default::default()
        },
    );
    q.publish("e.f", &key("k"), b"p").await.unwrap();
    let first = q.fetch(1, LONG).await.unwrap().pop().unwrap();
    // Its lease runs out and a second consumer takes it.
    let second = q.fetch(1, Duration::from_secs(10)).await.unwrap().pop();
    let second = second.expect("the lease never ran out");
    assert_eq!(second.event().attempt, 2);
    // The first (stale) finishes first: its result is the key's, but it
    // does not ack the second one's delivery.
    let done = first.complete(&Outcome::Ok(b"one".to_vec())).await.unwrap();
    assert!(!done.acked && !done.result.duplicate);
    assert_eq!(q.depth().await.unwrap(), 1);
    let done = second
        .complete(&Outcome::Ok(b"two".to_vec()))
        .await
        .unwrap();
    assert!(done.acked && done.result.duplicate);
    assert_eq!(q.depth().await.unwrap(), 0);
    assert_eq!(
        q.result(&key("k")).await.unwrap(),
        Some(Outcome::Ok(b"one".to_vec()))
    );
    // An oversized result is refused before anything is stored, and the
    // delivery comes back to be settled otherwise.
    q.publish("e.f", &key("big"), b"p").await.unwrap();
    let d = q.fetch(1, LONG).await.unwrap().pop().unwrap();
    let huge = Outcome::Refused("r".repeat(bubble_events::MAX_REASON_LEN + 1));
    let (d, _) = d.complete(&huge).await.unwrap_err();
    assert_eq!(q.result(&key("big")).await.unwrap(), None);
    d.dead_letter("too big").await.unwrap();
}
