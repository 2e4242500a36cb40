//! Await and freeze (resumable executions) end to end on real KVM: a
//! portion that calls `await_event` leaves its call pending inside the
//! bubble, the broker freezes the bubble to the store, and an event with
//! the awaited key (or the timeout) restores it — on this broker or
//! another sharing the store — and the portion continues inside the same
//! call; its signed result carries what it wrote before and after.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bubble_e2e_tests::awaits::*;
use bubble_e2e_tests::triggers::{publish, sig_pk};
use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn await_freezes_and_an_event_resumes_the_same_call() {
    let dir = tempfile::tempdir().unwrap();
    let _broker = BrokerProc::start(dir.path(), true);
    let mut a = _broker.tls_client("parent-a").await;
    let mut b = _broker.tls_client("parent-b").await;
    let bubble = await_bubble(&mut a).await;
    let pk = sig_pk(&mut a, &bubble).await;
    let t = trigger(&mut a, "pay", &bubble, "pay").await;

    assert!(publish(&mut a, "pay", "order-1", b"cap-1").await);
    // The call awaits: the bubble is frozen and its VMM gone; no result yet.
    wait_frozen(&mut a, dir.path(), &bubble).await;
    assert_eq!(result(&mut a, &t, "order-1").await.outcome, "pending");

    // Another parent publishing the same key, on its own trigger, does not
    // resume it (its key lives in its own namespace): its event runs its
    // own portion, and a's bubble stays frozen.
    let other = await_bubble(&mut b).await;
    let tb = trigger(&mut b, "pay", &other, "pay_short").await;
    assert!(publish(&mut b, "pay", "cap-1", b"x-1").await);
    let rb = wait_result(&mut b, &tb, "cap-1", LIMIT).await;
    assert_eq!(rb.outcome, "ok", "{rb:?}");
    assert_eq!(rb.bubble_id, other);
    assert_eq!(describe(&mut a, &bubble).await.state, SUSPENDED);
    assert_eq!(result(&mut a, &t, "order-1").await.outcome, "pending");

    // The owner's event with the key resumes the call, inside the same
    // call: the result has what it wrote before and after the await.
    assert!(publish(&mut a, "pay", "cap-1", b"captured-100").await);
    let r = wait_result(&mut a, &t, "order-1", LIMIT).await;
    verify(&pk, &r, "pay", b"cap-1", b"cap-1|captured-100");
    assert_eq!(
        describe(&mut a, &bubble).await.state,
        pb::BubbleState::Ready as i32
    );
    // The resuming event has the same result; the bubble takes calls again.
    let rc = wait_result(&mut a, &t, "cap-1", LIMIT).await;
    assert_eq!(rc.output, r.output);
    a.call(call_req(&bubble, "echo", b"hi"))
        .await
        .expect("a call after the resume");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn await_times_out_with_an_error_code() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start(dir.path(), false);
    let mut a = broker.client().await;
    let bubble = await_bubble(&mut a).await;
    let pk = sig_pk(&mut a, &bubble).await;
    let t = trigger(&mut a, "pay", &bubble, "pay_short").await;
    let started = Instant::now();
    assert!(publish(&mut a, "pay", "order-2", b"cap-2").await);
    wait_frozen(&mut a, dir.path(), &bubble).await;
    let r = wait_result(&mut a, &t, "order-2", LIMIT).await;
    // The portion saw await_event's timeout code (-4), after its timeout.
    verify(&pk, &r, "pay_short", b"cap-2", b"cap-2|timeout");
    assert!(started.elapsed() >= Duration::from_millis(1500));
    // A late event with the ended await's key runs nothing and gets a
    // typed failure (the await ended): the next event, published after it
    // on the same subject and run after it by the one worker, is the one
    // that awaits.
    assert!(publish(&mut a, "pay", "cap-2", b"late").await);
    assert!(publish(&mut a, "pay", "order-5", b"cap-5").await);
    let late = wait_result(&mut a, &t, "cap-2", LIMIT).await;
    assert_eq!(late.outcome, "failed", "{late:?}");
    assert!(late.reason.contains("has ended"), "{late:?}");
    assert!(late.output.is_empty() && late.signature.is_empty());
    wait_frozen(&mut a, dir.path(), &bubble).await;
    assert_eq!(result(&mut a, &t, "order-5").await.outcome, "pending");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_broker_resumes_exactly_once_even_with_eight_racing_events() {
    let Some(p) = pair() else { return };
    let mut a = p.brokers[0].client().await;
    let mut b = p.brokers[1].client().await;
    let bubble = await_bubble(&mut a).await;
    let pk = sig_pk(&mut a, &bubble).await;
    let ta = trigger(&mut a, "pay", &bubble, "pay").await;
    let b_bubble = await_bubble(&mut b).await;
    let tb = trigger(&mut b, "pay", &b_bubble, "pay").await;

    assert!(publish(&mut a, "pay", "order-3", b"cap-3").await);
    wait_frozen(&mut a, p.dirs[0].path(), &bubble).await;

    // 8 events with the awaited key at once, 4 to each broker.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let mut c = if i % 2 == 0 {
            p.brokers[0].client().await
        } else {
            p.brokers[1].client().await
        };
        tasks.push(tokio::spawn(async move {
            publish(&mut c, "pay", "cap-3", b"captured-300").await
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Exactly one broker resumed it: one result (on the broker that did),
    // one VMM for the bubble across both brokers.
    let end = Instant::now() + LIMIT;
    let (winner, r) = loop {
        let ra = result(&mut a, &ta, "order-3").await;
        let rb = result(&mut b, &tb, "order-3").await;
        match (ra.outcome.as_str(), rb.outcome.as_str()) {
            ("pending", "pending") => {}
            (_, "pending") => break (0, ra),
            ("pending", _) => break (1, rb),
            _ => panic!("both brokers resumed the await: {ra:?} {rb:?}"),
        }
        assert!(Instant::now() < end, "nobody resumed the await");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    verify(&pk, &r, "pay", b"cap-3", b"cap-3|captured-300");
    let loser = 1 - winner;
    let running = |i: usize| vmm_pids_under(p.dirs[i].path()).len();
    // The winner runs the resumed bubble (and B its own trigger bubble);
    // the loser started no VMM for it. If B won, A (whose trigger started
    // the call) gets the same result, relayed through the store; if A
    // won, B has none.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ta_, tb_) = (ta.clone(), tb.clone());
    let mut cs = [a, b];
    let trig = [ta_, tb_];
    if loser == 0 {
        let relayed = wait_result(&mut cs[0], &trig[0], "order-3", LIMIT).await;
        assert_eq!(relayed, r);
    } else {
        assert_eq!(
            result(&mut cs[loser], &trig[loser], "order-3")
                .await
                .outcome,
            "pending"
        );
    }
    assert_eq!(
        running(0) + running(1),
        2,
        "one VMM for the resumed bubble, one for B's own"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_after_the_freeze_loses_nothing() {
    let Some(mut p) = pair() else { return };
    let mut a = p.brokers[0].client().await;
    let mut b = p.brokers[1].client().await;
    let bubble = await_bubble(&mut a).await;
    let pk = sig_pk(&mut a, &bubble).await;
    trigger(&mut a, "pay", &bubble, "pay").await;
    let b_bubble = await_bubble(&mut b).await;
    let tb = trigger(&mut b, "pay", &b_bubble, "pay").await;

    assert!(publish(&mut a, "pay", "order-4", b"cap-4").await);
    wait_frozen(&mut a, p.dirs[0].path(), &bubble).await;
    p.brokers[0].kill();
    // The event reaches B only: B finds the await in the store, restores
    // the copy A froze, and the call ends there.
    assert!(publish(&mut b, "pay", "cap-4", b"captured-400").await);
    let r = wait_result_in(&mut b, &tb, "order-4", LIMIT, Some(p.dirs[1].path())).await;
    verify(&pk, &r, "pay", b"cap-4", b"cap-4|captured-400");
    assert_eq!(r.bubble_id, bubble);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_call_that_awaits_answers_awaiting_and_freezes() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start(dir.path(), false);
    let mut a = broker.client().await;
    let bubble = await_bubble(&mut a).await;
    let pk = sig_pk(&mut a, &bubble).await;
    let r = signed_await(&mut a, &bubble, "pay", "cap-6").await;
    let w = r.awaiting.expect("an awaiting outcome");
    assert_eq!(w.key, "cap-6");
    assert!(r.output.is_empty() && r.signature.is_empty());
    wait_frozen(&mut a, dir.path(), &bubble).await;
    assert_eq!(describe(&mut a, &bubble).await.generation, w.generation);
    // An event with the key, through any of the parent's triggers,
    // resumes the call; the resuming event's result is the call's signed
    // answer, and the bubble runs again.
    let t = trigger(&mut a, "captures", &bubble, "pay").await;
    assert!(publish(&mut a, "captures", "cap-6", b"captured-600").await);
    let r = wait_result(&mut a, &t, "cap-6", LIMIT).await;
    verify(&pk, &r, "pay", b"cap-6", b"cap-6|captured-600");
    wait_for(&mut a, &bubble, LIMIT, |b| {
        b.state == pb::BubbleState::Ready as i32
    })
    .await;
    a.call(call_req(&bubble, "echo", b"hi"))
        .await
        .expect("a call after the resume");
}

/// The payments example: `authorize_capture` signs the authorisation,
/// awaits the gateway's capture notification (key: the order id) frozen
/// on broker A, and the notification published to broker B resumes it
/// there: the settlement is signed with the same gateway key the parent
/// never held, over the order and the notification.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payments_authorize_on_one_broker_and_settle_on_another() {
    use bubble_e2e_tests::payments::{module, payments_bubble, PAYMENTS};
    use ed25519_dalek::{Signer, SigningKey};
    let Some(p) = pair() else { return };
    let parent = bubble_client::Parent::from_client(p.brokers[0].client().await);
    let mut bubble = payments_bubble(&parent).await;
    bubble
        .load_portion("payments", &module(PAYMENTS))
        .await
        .unwrap();
    bubble.trust_unverified().await.unwrap();
    let seed = [0x42u8; 32];
    bubble.provision("gateway_key", &seed).await.unwrap();
    let id = bubble.id().to_string();
    let mut a = p.brokers[0].client().await;
    let mut b = p.brokers[1].client().await;
    let ta = a
        .create_trigger(pb::CreateTriggerRequest {
            subject: "orders".into(),
            bubble_id: id.clone(),
            portion: "payments".into(),
            function: "authorize_capture".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .trigger_id;
    // B consumes the same subject (any bubble of its own: the capture
    // notification resumes the frozen call before anything runs there).
    let b_bubble = await_bubble(&mut b).await;
    let tb = trigger(&mut b, "orders", &b_bubble, "pay").await;

    let mut order = 12_345u64.to_le_bytes().to_vec();
    order.extend_from_slice(b"order-77");
    assert!(publish(&mut a, "orders", "auth-77", &order).await);
    wait_frozen(&mut a, p.dirs[0].path(), &id).await;
    let capture = 12_345u64.to_le_bytes();
    assert!(publish(&mut b, "orders", "order-77", &capture).await);
    let r = wait_result_in(&mut b, &tb, "auth-77", LIMIT, Some(p.dirs[1].path())).await;
    assert_eq!(r.outcome, "ok", "{r:?}");
    assert_eq!(r.bubble_id, id);
    let key = SigningKey::from_bytes(&seed);
    let mut settled = order.clone();
    settled.extend_from_slice(&capture);
    let mut want = key.sign(&order).to_bytes().to_vec();
    want.extend_from_slice(&key.sign(&settled).to_bytes());
    assert_eq!(
        r.output, want,
        "authorisation ‖ settlement, by the gateway key"
    );
    // The owner reads the settlement on A too, where its trigger is
    // (relayed through the moto store).
    let ra = wait_result_in(&mut a, &ta, "auth-77", LIMIT, Some(p.dirs[0].path())).await;
    assert_eq!(ra, r);
}

/// Broker A dies right after committing the freeze, still holding the
/// frozen copy's claim (and before marking the await FROZEN). A suspend's
/// claim is never taken over by another broker (it cannot tell whether A
/// recorded the suspend, and a copy not recorded SUSPENDED restored
/// elsewhere would be a clone: docs/frozen-format.md), so broker B, given
/// the event, is refused even past A's lease; once A is back, it gives
/// the claim back and B resumes the call, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_holding_the_suspend_claim_blocks_others_until_it_is_back() {
    let Some(mut p) = pair_with(Some("suspend.committed=60000")) else {
        return;
    };
    let mut a = p.brokers[0].client().await;
    let mut b = p.brokers[1].client().await;
    let bubble = await_bubble(&mut a).await;
    let pk = sig_pk(&mut a, &bubble).await;
    trigger(&mut a, "pay", &bubble, "pay").await;
    let b_bubble = await_bubble(&mut b).await;
    let tb = trigger(&mut b, "pay", &b_bubble, "pay").await;

    assert!(publish(&mut a, "pay", "order-8", b"cap-8").await);
    log_line(
        p.dirs[0].path(),
        &["fault point reached", "suspend.committed"],
    )
    .await;
    p.brokers[0].kill();
    assert!(publish(&mut b, "pay", "cap-8", b"captured-800").await);
    // Twice A's 3 s lease: still not resumed (a bounded wait for
    // something that must not happen).
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        let r = result(&mut b, &tb, "order-8").await;
        assert_eq!(
            r.outcome, "pending",
            "resumed while A's suspend claim was held"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    p.brokers[0] = BrokerProc::start_with(p.dirs[0].path(), p.opts.clone());
    let r = wait_result_in(&mut b, &tb, "order-8", LIMIT, Some(p.dirs[1].path())).await;
    verify(&pk, &r, "pay", b"cap-8", b"cap-8|captured-800");
    assert_eq!(r.bubble_id, bubble);
    kill_vmms_under(p.dirs[0].path());
}
