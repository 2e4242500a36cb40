//! The embedded queue's promises, attacked: N concurrent consumers settle
//! each event exactly once; a crashed consumer's events come back, and
//! its late ack is refused; nothing is lost across a reopen; poison events
//! are dead-lettered; publisher retries and results are stored once per
//! key; the file is private.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bubble_events::embedded::{EmbeddedQueue, QueueConfig};
use bubble_events::{Delivery, EventError, EventKey, Outcome, Results, Source};
use tokio::sync::Mutex;

fn key(s: &str) -> EventKey {
    EventKey::new(s).unwrap()
}

fn open(dir: &tempfile::TempDir, cfg: QueueConfig) -> EmbeddedQueue {
    EmbeddedQueue::open(&dir.path().join("events.redb"), cfg).unwrap()
}

const LONG: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_consumers_settle_each_event_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(
        &dir,
        QueueConfig {
            ack_wait: LONG,
            ..Default::default()
        },
    );
    // Four publishers, 100 keys each, every key sent twice (a retry).
    let mut pubs = Vec::new();
    for p in 0..4 {
        let q = q.clone();
        pubs.push(tokio::spawn(async move {
            let mut fresh = 0;
            for i in 0..100 {
                for _ in 0..2 {
                    let r = q
                        .publish("pay.tokenize", &key(&format!("p{p}-{i}")), b"4111")
                        .await
                        .unwrap();
                    fresh += usize::from(!r.duplicate);
                }
            }
            fresh
        }));
    }
    let mut fresh = 0;
    for p in pubs {
        fresh += p.await.unwrap();
    }
    assert_eq!(fresh, 400, "each key stored once");
    let seen: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let mut consumers = Vec::new();
    for _ in 0..4 {
        let (q, seen) = (q.clone(), Arc::clone(&seen));
        consumers.push(tokio::spawn(async move {
            loop {
                let batch = q.fetch(16, Duration::from_millis(200)).await.unwrap();
                if batch.is_empty() {
                    return;
                }
                for d in batch {
                    *seen
                        .lock()
                        .await
                        .entry(d.event().key.to_string())
                        .or_default() += 1;
                    d.ack().await.unwrap();
                }
            }
        }));
    }
    for c in consumers {
        c.await.unwrap();
    }
    let seen = seen.lock().await;
    assert_eq!(seen.len(), 400);
    assert!(
        seen.values().all(|&n| n == 1),
        "an event was handed out twice"
    );
    assert_eq!(q.depth().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_consumer_s_events_come_back_and_its_late_ack_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(
        &dir,
        QueueConfig {
            ack_wait: Duration::from_millis(300),
            ..Default::default()
        },
    );
    for i in 0..10 {
        q.publish("pay.x", &key(&format!("k{i}")), &[i])
            .await
            .unwrap();
    }
    let mut first = q.fetch(10, LONG).await.unwrap();
    assert_eq!(first.len(), 10);
    let late = first.pop().unwrap();
    drop(first); // the consumer dies holding nine of them
                 // Another consumer gets all ten once the leases end (fetch waits for
                 // them; the deadline fails the test if they never come).
    let mut again = Vec::new();
    while again.len() < 10 {
        let got = q.fetch(10, Duration::from_secs(10)).await.unwrap();
        assert!(!got.is_empty(), "leased events never came back");
        again.extend(got);
    }
    assert!(again.iter().all(|d| d.event().attempt == 2));
    // The dead consumer's late ack changes nothing.
    assert!(matches!(late.ack().await, Err(EventError::Stale)));
    assert_eq!(q.depth().await.unwrap(), 10);
    for d in again {
        d.ack().await.unwrap();
    }
    assert_eq!(q.depth().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = QueueConfig {
        ack_wait: Duration::from_millis(200),
        ..Default::default()
    };
    {
        let q = open(&dir, cfg);
        for i in 0..6 {
            q.publish("pay.x", &key(&format!("k{i}")), b"v")
                .await
                .unwrap();
        }
        let got = q.fetch(6, LONG).await.unwrap();
        let mut got = got.into_iter();
        for d in got.by_ref().take(2) {
            d.ack().await.unwrap();
        }
        // The broker stops with four unacked.
    }
    let q = open(&dir, cfg);
    let mut keys = Vec::new();
    while keys.len() < 4 {
        let got = q.fetch(10, Duration::from_secs(10)).await.unwrap();
        assert!(!got.is_empty(), "unacked events lost across the reopen");
        for d in got {
            keys.push(d.event().key.to_string());
            d.ack().await.unwrap();
        }
    }
    keys.sort();
    assert_eq!(keys, ["k2", "k3", "k4", "k5"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_events_are_dead_lettered_after_max_deliver() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(
        &dir,
        QueueConfig {
            ack_wait: LONG,
            max_deliver: 3,
            ..Default::default()
        },
    );
    q.publish("pay.x", &key("poison"), b"boom").await.unwrap();
    q.publish("pay.x", &key("fine"), b"ok").await.unwrap();
    for attempt in 1..=3 {
        for d in q.fetch(10, LONG).await.unwrap() {
            assert_eq!(d.event().attempt, attempt);
            if d.event().key.as_str() == "fine" {
                d.ack().await.unwrap();
            } else {
                d.retry(Duration::ZERO).await.unwrap();
            }
        }
    }
    assert!(q
        .fetch(10, Duration::from_millis(100))
        .await
        .unwrap()
        .is_empty());
    let dead = q.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!((dead[0].key.as_str(), dead[0].attempts), ("poison", 3));
    assert_eq!(dead[0].reason, "max deliveries reached");
    // Explicit dead-lettering, with a reason, settles once.
    q.publish("pay.x", &key("bad-input"), b"?").await.unwrap();
    let d = q.fetch(1, LONG).await.unwrap().pop().unwrap();
    d.dead_letter("refused by the portion").await.unwrap();
    assert_eq!(q.dead_letters().await.unwrap().len(), 2);
    assert_eq!(q.depth().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn results_are_stored_once_per_key_under_concurrency() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(&dir, QueueConfig::default());
    let k = key("order-7");
    let mut tasks = Vec::new();
    for i in 0..8u8 {
        let (q, k) = (q.clone(), k.clone());
        tasks.push(tokio::spawn(async move {
            q.publish_result(&k, &Outcome::Ok(vec![i])).await.unwrap()
        }));
    }
    let mut first = 0;
    for t in tasks {
        first += usize::from(!t.await.unwrap().duplicate);
    }
    assert_eq!(first, 1, "exactly one result per key");
    assert!(matches!(q.result(&k).await.unwrap(), Some(Outcome::Ok(_))));
    assert!(q.result(&key("other")).await.unwrap().is_none());
}

#[tokio::test]
async fn bad_input_is_refused_and_the_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let q = open(&dir, QueueConfig::default());
    let mode = std::fs::metadata(dir.path().join("events.redb"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(matches!(
        q.publish("a.*", &key("k"), b"").await,
        Err(EventError::InvalidSubject)
    ));
    let big = vec![0u8; bubble_events::MAX_PAYLOAD + 1];
    assert!(matches!(
        q.publish("a.b", &key("k"), &big).await,
        Err(EventError::TooLarge)
    ));
    assert_eq!(q.depth().await.unwrap(), 0);
}

/// A subscription sees only its own subject: two consumers of two
/// subjects, interleaved events, each gets exactly its own; a subject's
/// waiting consumer is woken by a publish on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_see_only_their_subject() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(&dir, QueueConfig::default());
    let a = q.subscribe("orders.a").unwrap();
    let b = q.subscribe("orders.b").unwrap();
    assert!(q.subscribe("orders.*").is_err());
    for i in 0..20 {
        let s = if i % 2 == 0 { "orders.a" } else { "orders.b" };
        q.publish(s, &key(&format!("k{i}")), s.as_bytes())
            .await
            .unwrap();
    }
    let got_a = a.fetch(100, Duration::ZERO).await.unwrap();
    let got_b = b.fetch(100, Duration::ZERO).await.unwrap();
    assert_eq!((got_a.len(), got_b.len()), (10, 10));
    assert!(got_a.iter().all(|d| d.event().subject == "orders.a"));
    assert!(got_b.iter().all(|d| d.event().subject == "orders.b"));
    for d in got_a.into_iter().chain(got_b) {
        d.ack().await.unwrap();
    }
    // A waiting consumer of a: a publish on b does not hand it anything;
    // one on a does.
    let waiter = tokio::spawn(async move { a.fetch(1, LONG).await.unwrap() });
    q.publish("orders.b", &key("late-b"), b"b").await.unwrap();
    q.publish("orders.a", &key("late-a"), b"a").await.unwrap();
    let got = tokio::time::timeout(LONG, waiter).await.unwrap().unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].event().key, key("late-a"));
    assert_eq!(q.depth().await.unwrap(), 2);
}
