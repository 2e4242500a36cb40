//! Triggers under failure, real KVM: a poison event dead-letters after
//! `max_deliver` with a security event and an audit record while the
//! others go through; a broker killed mid-stream loses no event and
//! stores no second result; a pool trigger's bubble killed mid-batch is
//! replaced and the batch goes on from its checkpoint.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bubble_e2e_tests::triggers::*;
use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;

const LIMIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_event_dead_letters_with_a_security_event_and_blocks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            admin: true,
            config: Some("[events]\nretry_delay_ms = 20\n".into()),
            ..Opts::default()
        },
    );
    let mut c = broker.client().await;
    let bubble = bubble_with_portion(&mut c).await;
    let pk = sig_pk(&mut c, &bubble).await;
    let mut watch = c
        .watch_events(pb::WatchEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let t = c
        .create_trigger(pb::CreateTriggerRequest {
            batch_size: 4,
            max_deliver: 3,
            ..trigger_req("jobs", &bubble)
        })
        .await
        .unwrap()
        .into_inner();
    assert!(publish(&mut c, "jobs", "bad", b"poison!").await);
    assert!(publish(&mut c, "jobs", "no", b"refuse this").await);
    let keys: Vec<String> = (0..10).map(|i| format!("good-{i}")).collect();
    for k in &keys {
        assert!(publish(&mut c, "jobs", k, k.as_bytes()).await);
    }
    let r = results(&mut c, &t.trigger_id, &keys, LIMIT).await;
    for (k, r) in keys.iter().zip(&r) {
        verify(&pk, r, k.as_bytes());
    }
    let r = results(&mut c, &t.trigger_id, &["bad".into(), "no".into()], LIMIT).await;
    assert_eq!(r[0].outcome, "failed", "{:?}", r[0]);
    assert!(r[0].reason.contains("trapped"), "{:?}", r[0]);
    assert!(r[0].output.is_empty() && r[0].signature.is_empty());
    assert_eq!(r[1].outcome, "refused", "{:?}", r[1]);

    // The owner is told, once, with the bubble named.
    let end = Instant::now() + LIMIT;
    let ev = loop {
        let left = end.saturating_duration_since(Instant::now());
        let ev = tokio::time::timeout(left, watch.message())
            .await
            .expect("a dead_letter security event in time")
            .unwrap()
            .expect("stream open");
        if ev
            .security
            .as_ref()
            .is_some_and(|s| s.kind == "dead_letter")
        {
            break ev;
        }
    };
    assert_eq!(ev.bubble_id, bubble);
    let m = broker.admin_get("/metrics");
    assert!(
        m.contains("bubbled_security_events_total{kind=\"dead_letter\"} 1"),
        "{m}"
    );
    // And it is in the audit log.
    let audit = c
        .list_audit(pb::ListAuditRequest {
            bubble_id: bubble.clone(),
            since_ms: 0,
            // One page holds them all here (a handful of records).
            page_size: 1000,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    assert_eq!(
        audit
            .iter()
            .filter(|r| r.security_kind == "dead_letter")
            .count(),
        1
    );
    // Tried exactly max_deliver times: load, keys, 10 good, 1 refused and
    // 3 poisoned calls.
    assert_eq!(describe(&mut c, &bubble).await.calls, 2 + 10 + 1 + 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_mid_stream_loses_nothing_and_duplicates_no_result() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Opts {
        config: Some("[events]\nack_wait_ms = 1500\n".into()),
        ..Opts::default()
    };
    let mut broker = BrokerProc::start_with(dir.path(), opts.clone());
    let mut c = broker.client().await;
    let bubble = bubble_with_portion(&mut c).await;
    let pk = sig_pk(&mut c, &bubble).await;
    let t = c
        .create_trigger(pb::CreateTriggerRequest {
            batch_size: 16,
            function: "slow".into(),
            ..trigger_req("stream", &bubble)
        })
        .await
        .unwrap()
        .into_inner();
    let keys: Vec<String> = (0..240).map(|i| format!("e-{i}")).collect();
    for k in &keys {
        assert!(publish(&mut c, "stream", k, k.as_bytes()).await);
    }
    wait_done(&mut c, &t.trigger_id, &keys, 5, LIMIT).await;
    let mid_stream = any_pending(&mut c, &t.trigger_id, &keys).await;
    broker.kill();
    assert!(mid_stream, "the kill came after the stream ended");
    let broker = BrokerProc::start_with(dir.path(), opts);
    let mut c = broker.client().await;
    let r = results(&mut c, &t.trigger_id, &keys, LIMIT).await;
    let mut calls = HashSet::new();
    for (k, r) in keys.iter().zip(&r) {
        verify_fn(&pk, r, "slow", k.as_bytes());
        assert!(calls.insert(r.call_id), "call {} signed twice", r.call_id);
    }
    // Redelivery may run an event twice (the broker died between a run
    // and its ack); each key still has exactly the one result stored
    // first (distinct signed calls above, the payload's own output).
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_bubble_killed_mid_batch_is_replaced_and_the_batch_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            config: Some(
                "[events]\nretry_delay_ms = 20\n[[pool]]\nname = \"ev\"\nmemory_mib = 16\nsize = 1\n"
                    .into(),
            ),
            ..Opts::default()
        },
    );
    let mut c = broker.client().await;
    let t = c
        .create_trigger(pb::CreateTriggerRequest {
            subject: "batch".into(),
            profile: "ev".into(),
            module: events_module(),
            portion: "ev".into(),
            function: "slow".into(),
            batch_size: 32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t.profile, "ev");
    assert_eq!(t.module_sha384.len(), 96);
    let keys: Vec<String> = (0..60).map(|i| format!("b-{i}")).collect();
    for k in &keys {
        assert!(publish(&mut c, "batch", k, k.as_bytes()).await);
    }
    wait_done(&mut c, &t.trigger_id, &keys, 3, LIMIT).await;
    let first = results(&mut c, &t.trigger_id, &keys[..1], LIMIT).await;
    let victim = first[0].bubble_id.clone();
    let pid = describe(&mut c, &victim).await.vmm_pid;
    assert!(pid > 0);
    // SAFETY: killing the VMM this test's broker started for its bubble.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
    assert!(
        any_pending(&mut c, &t.trigger_id, &keys).await,
        "the kill came after the batch ended"
    );
    let r = results(&mut c, &t.trigger_id, &keys, LIMIT).await;
    let bubbles: HashSet<&str> = r.iter().map(|r| r.bubble_id.as_str()).collect();
    assert!(
        bubbles.len() >= 2,
        "the batch went on in a new bubble: {bubbles:?}"
    );
    let mut signed = HashSet::new();
    for (k, r) in keys.iter().zip(&r) {
        assert_eq!(r.outcome, "ok", "{r:?}");
        assert_eq!(r.output, k.as_bytes());
        assert!(signed.insert((r.bubble_id.clone(), r.call_id)));
    }
    // The live bubble's results verify with its key.
    let live: Vec<&pb::EventResult> = r.iter().filter(|r| r.bubble_id != victim).collect();
    let pk = sig_pk(&mut c, &live[0].bubble_id).await;
    for (k, r) in keys.iter().zip(&r).filter(|(_, r)| r.bubble_id != victim) {
        verify_fn(&pk, r, "slow", k.as_bytes());
    }
    // Deleting the trigger deletes the bubble it attached.
    let current = live[0].bubble_id.clone();
    c.delete_trigger(pb::TriggerRef {
        trigger_id: t.trigger_id.clone(),
    })
    .await
    .unwrap();
    wait_for(&mut c, &current, LIMIT, |b| {
        b.state == pb::BubbleState::Deleted as i32
    })
    .await;
}

/// Rate matching under a quota: a backlog of 200 slow events with
/// `max_concurrency` 8 asks for more bubbles than the parent's quota of
/// 2 allows; the trigger never holds more than 2, uses both, finishes
/// every event, and scales back down to one bubble once idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_matching_scales_up_within_the_quota_and_back_down() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            config: Some(
                "[quota]\nmax_bubbles_per_parent = 2\n[events]\ntarget_latency_ms = 10\n\
                 [[pool]]\nname = \"ev\"\nmemory_mib = 16\nsize = 1\n"
                    .into(),
            ),
            ..Opts::default()
        },
    );
    let mut c = broker.client().await;
    let t = c
        .create_trigger(pb::CreateTriggerRequest {
            subject: "load".into(),
            profile: "ev".into(),
            module: events_module(),
            portion: "ev".into(),
            function: "slow".into(),
            batch_size: 4,
            max_concurrency: 8,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // A backlog: 600 events from four concurrent publishers (a fetch now
    // costs no commit of its own, so one publisher alone may not outrun
    // one worker for long).
    let keys: Vec<String> = (0..600).map(|i| format!("l-{i}")).collect();
    let mut pubs = Vec::new();
    for part in keys.chunks(150) {
        let (mut c, part) = (c.clone(), part.to_vec());
        pubs.push(tokio::spawn(async move {
            for k in &part {
                assert!(publish(&mut c, "load", k, k.as_bytes()).await);
            }
        }));
    }
    for p in pubs {
        p.await.unwrap();
    }
    async fn live(c: &mut Client) -> usize {
        c.list_bubbles(pb::ListBubblesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .bubbles
            .len()
    }
    // A sampler watches the parent's bubbles all along.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (stop, c) = (stop.clone(), c.clone());
        tokio::spawn(async move {
            let mut most = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let mut c = c.clone();
                most = most.max(live(&mut c).await);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            most
        })
    };
    let r = results(&mut c, &t.trigger_id, &keys, LIMIT).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let most = sampler.await.unwrap();
    assert_eq!(
        most, 2,
        "bubbles at once under a quota of 2 (never more, and both used)"
    );
    for (k, r) in keys.iter().zip(&r) {
        assert_eq!(r.outcome, "ok", "{r:?}");
        assert_eq!(r.output, k.as_bytes());
    }
    // More than one bubble worked the backlog (none died here, so more
    // than one id means more than one worker; an idle worker leaving and
    // a new one attaching later gives a further id).
    let by: HashSet<&str> = r.iter().map(|r| r.bubble_id.as_str()).collect();
    assert!(by.len() >= 2, "{by:?}");
    // Idle: back to one bubble.
    let end = Instant::now() + LIMIT;
    while live(&mut c).await > 1 {
        assert!(
            Instant::now() < end,
            "still more than one bubble after {LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
