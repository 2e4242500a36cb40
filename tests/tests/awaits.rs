//! Await and freeze (resumable executions) end to end on real KVM: a
//! portion that calls `await_event` leaves its call pending inside the
//! bubble, the broker freezes the bubble to the store, and an event with
//! the awaited key (or the timeout) restores it — on this broker or
//! another sharing the store — and the portion continues inside the same
//! call; its signed result carries what it wrote before and after.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use bubble_e2e_tests::moto::{http, s3_env, start_moto, Moto};
use bubble_e2e_tests::triggers::{publish, sig_pk};
use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;

const LIMIT: Duration = Duration::from_secs(30);
const SUSPENDED: i32 = pb::BubbleState::Suspended as i32;

/// `pay`: writes its input (the key it then awaits) to the output, awaits
/// that key (60 s; `pay_short`: 1.5 s), then writes `|` and the event's
/// payload, or `|timeout`. A key the host function refuses: status 3.
const AWAIT_WAT: &str = r#"
(module
  (import "bubble_v1" "input_len" (func $input_len (result i32)))
  (import "bubble_v1" "input_read" (func $input_read (param i32 i32) (result i32)))
  (import "bubble_v1" "output_write" (func $output_write (param i32 i32) (result i32)))
  (import "bubble_v1" "await_event" (func $await (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 900) "|timeout")
  (data (i32.const 920) "|")
  (func $run (param $t i32) (result i32)
    (local $n i32) (local $r i32)
    (local.set $n (call $input_len))
    (if (i32.gt_s (local.get $n) (i32.const 800)) (then (return (i32.const 2))))
    (drop (call $input_read (i32.const 0) (local.get $n)))
    (drop (call $output_write (i32.const 0) (local.get $n)))
    (local.set $r (call $await (i32.const 0) (local.get $n) (local.get $t)
                            (i32.const 1024) (i32.const 4096)))
    (if (i32.eq (local.get $r) (i32.const -4))
      (then (drop (call $output_write (i32.const 900) (i32.const 8)))
            (return (i32.const 0))))
    (if (i32.lt_s (local.get $r) (i32.const 0)) (then (return (i32.const 3))))
    (drop (call $output_write (i32.const 920) (i32.const 1)))
    (drop (call $output_write (i32.const 1024) (local.get $r)))
    (i32.const 0))
  (func (export "pay") (result i32) (call $run (i32.const 60000)))
  (func (export "pay_short") (result i32) (call $run (i32.const 1500)))
)
"#;

/// A 16 MiB bubble with the await portion loaded as `aw`.
async fn await_bubble(c: &mut Client) -> String {
    let b = c
        .create_bubble(create_req(16))
        .await
        .expect("create")
        .into_inner();
    assert_eq!(
        b.state,
        pb::BubbleState::Ready as i32,
        "{}",
        b.failure_reason
    );
    c.load_portion(pb::LoadPortionRequest {
        bubble_id: b.bubble_id.clone(),
        name: "aw".into(),
        module: wat::parse_str(AWAIT_WAT).unwrap(),
    })
    .await
    .expect("load portion");
    b.bubble_id
}

/// A trigger on `subject` running `aw.<function>` in `bubble`.
async fn trigger(c: &mut Client, subject: &str, bubble: &str, function: &str) -> String {
    c.create_trigger(pb::CreateTriggerRequest {
        subject: subject.into(),
        bubble_id: bubble.into(),
        portion: "aw".into(),
        function: function.into(),
        ..Default::default()
    })
    .await
    .expect("create trigger")
    .into_inner()
    .trigger_id
}

/// The result of `key` (outcome "pending" until there is one).
async fn result(c: &mut Client, trigger: &str, key: &str) -> pb::EventResult {
    c.get_result(pb::GetResultRequest {
        trigger_id: trigger.into(),
        key: key.into(),
    })
    .await
    .expect("get result")
    .into_inner()
}

/// Waits for a result of `key` other than pending; fails after `limit`.
async fn wait_result(c: &mut Client, trigger: &str, key: &str, limit: Duration) -> pb::EventResult {
    wait_result_in(c, trigger, key, limit, None).await
}

/// [`wait_result`], showing the log of the broker on `dir` on failure.
async fn wait_result_in(
    c: &mut Client,
    trigger: &str,
    key: &str,
    limit: Duration,
    dir: Option<&Path>,
) -> pb::EventResult {
    let end = Instant::now() + limit;
    loop {
        let r = result(c, trigger, key).await;
        if r.outcome != "pending" {
            return r;
        }
        assert!(
            Instant::now() < end,
            "no result for {key} within {limit:?}; broker log:\n{}",
            dir.map(|d| std::fs::read_to_string(d.join("broker.log")).unwrap_or_default())
                .unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Checks an ok result: signed by the bubble (key `pk`) over the original
/// call (`aw.<function>` with `input`), output `want`.
fn verify(pk: &[u8; 32], r: &pb::EventResult, function: &str, input: &[u8], want: &[u8]) {
    assert_eq!(r.outcome, "ok", "{r:?}");
    let frame = bubble_abi::ops::PortionCall {
        portion: "aw",
        function,
        input,
    }
    .encode()
    .unwrap();
    let plain = bubble_keys::verify_and_open_result(
        pk,
        &r.bubble_id,
        r.call_id,
        &frame,
        &r.output,
        &r.signature,
        None,
    )
    .expect("the resumed result's signature verifies");
    assert_eq!(plain.expose(), want);
}

/// Waits until `bubble` is SUSPENDED and no VMM runs under `dir`.
async fn wait_frozen(c: &mut Client, dir: &Path, bubble: &str) {
    wait_for(c, bubble, LIMIT, |b| b.state == SUSPENDED).await;
    assert!(
        no_vmms_within(dir, LIMIT).await,
        "the awaiting bubble's VMM still runs"
    );
}

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
    // A late event with the ended await's key is dropped (acked, no run,
    // no result): the next event, published after it on the same subject
    // and run after it by the one worker, is the one that awaits.
    assert!(publish(&mut a, "pay", "cap-2", b"late").await);
    assert!(publish(&mut a, "pay", "order-5", b"cap-5").await);
    wait_frozen(&mut a, dir.path(), &bubble).await;
    assert_eq!(result(&mut a, &t, "cap-2").await.outcome, "pending");
    assert_eq!(result(&mut a, &t, "order-5").await.outcome, "pending");
}

/// A moto S3 server with bucket `awaits`, or `None` after reporting the
/// missing dependency.
fn moto() -> Option<(Moto, u16)> {
    match start_moto() {
        Ok((m, port)) => {
            let created = http(port, "PUT", "/awaits").unwrap_or_default();
            assert!(created.starts_with("HTTP/1.1 200"), "{created}");
            Some((m, port))
        }
        Err(e) => {
            missing_dependency(&format!("no S3-compatible server: {e}"));
            None
        }
    }
}

/// Two brokers on one moto store, sharing the key-encryption key (B gets a
/// copy of A's), each with the same trigger on `pay` (B's on a bubble of
/// its own, which never sees the await).
struct Pair {
    _moto: Moto,
    dirs: [tempfile::TempDir; 2],
    brokers: [BrokerProc; 2],
    /// How to start either broker again (no fault point).
    opts: Opts,
}

fn pair() -> Option<Pair> {
    pair_with(None)
}

/// [`pair`], broker A pausing at fault point `pause_a` (`point=ms`).
fn pair_with(pause_a: Option<&str>) -> Option<Pair> {
    let (moto, port) = moto()?;
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let opts = || Opts {
        args: vec![
            "--store".into(),
            format!("s3://awaits/shared?endpoint=http://127.0.0.1:{port}"),
        ],
        env: s3_env(),
        config: Some("claim_lease_ms = 3000\n".into()),
        ..Default::default()
    };
    let mut oa = opts();
    if let Some(p) = pause_a {
        oa.env.push(("BUBBLED_TEST_PAUSE".into(), p.into()));
    }
    let a = BrokerProc::start_with(dirs[0].path(), oa);
    let kek = dirs[1].path().join("kek");
    std::fs::copy(dirs[0].path().join("kek"), &kek).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o600)).unwrap();
    let b = BrokerProc::start_with(dirs[1].path(), opts());
    Some(Pair {
        _moto: moto,
        dirs,
        brokers: [a, b],
        opts: opts(),
    })
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
    // the loser started no VMM for it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ta_, tb_) = (ta.clone(), tb.clone());
    let mut cs = [a, b];
    let trig = [ta_, tb_];
    assert_eq!(
        result(&mut cs[loser], &trig[loser], "order-3")
            .await
            .outcome,
        "pending"
    );
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
    let r = a
        .call(pb::CallRequest {
            portion: "aw".into(),
            sign: true,
            ..call_req(&bubble, "pay", b"cap-6")
        })
        .await
        .expect("call")
        .into_inner();
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
    a.create_trigger(pb::CreateTriggerRequest {
        subject: "orders".into(),
        bubble_id: id.clone(),
        portion: "payments".into(),
        function: "authorize_capture".into(),
        ..Default::default()
    })
    .await
    .unwrap();
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
}

/// The first line of the broker log on `dir` with every one of `words`;
/// waits for it (fails the test after 30 s).
async fn log_line(dir: &Path, words: &[&str]) -> String {
    let until = Instant::now() + LIMIT;
    loop {
        let log = std::fs::read_to_string(dir.join("broker.log")).unwrap_or_default();
        if let Some(l) = log.lines().find(|l| words.iter().all(|w| l.contains(w))) {
            return l.to_string();
        }
        assert!(Instant::now() < until, "the broker never logged {words:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
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
