//! Awaits are bounded, on real KVM: a parent's live awaits on a broker are
//! capped (concurrent awaits past the cap are refused with
//! RESOURCE_EXHAUSTED, the bubbles over the cap take calls again, and a
//! slot comes back when an await ends; another parent is not affected),
//! and an ended await's index entry is collected after the retention.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use bubble_e2e_tests::awaits::*;
use bubble_e2e_tests::triggers::{publish, sig_pk};
use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;

/// A direct signed-less call of `aw.pay` awaiting `key`.
fn await_call(bubble: &str, key: &str) -> pb::CallRequest {
    pb::CallRequest {
        portion: "aw".into(),
        ..call_req(bubble, "pay", key.as_bytes())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_awaits_past_the_cap_are_refused_and_a_slot_comes_back() {
    const CAP: usize = 3;
    const N: usize = 6;
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            tls: true,
            config: Some(format!("[events]\nmax_awaits_per_owner = {CAP}\n")),
            ..Default::default()
        },
    );
    let mut a = broker.tls_client("parent-a").await;
    let mut bubbles = Vec::new();
    for _ in 0..N {
        bubbles.push(await_bubble(&mut a).await);
    }
    // N awaits at once, each in its own bubble.
    let mut tasks = Vec::new();
    for (i, id) in bubbles.iter().enumerate() {
        let mut c = a.clone();
        let req = await_call(id, &format!("cap-{i}"));
        tasks.push(tokio::spawn(async move { c.call(req).await }));
    }
    let mut frozen = Vec::new();
    let mut refused = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.unwrap() {
            Ok(r) => {
                let r = r.into_inner();
                assert!(r.awaiting.is_some(), "{r:?}");
                frozen.push(i);
            }
            Err(s) => {
                assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}");
                assert!(s.message().contains("too many awaits"), "{s:?}");
                refused.push(i);
            }
        }
    }
    assert_eq!(frozen.len(), CAP, "frozen {frozen:?}, refused {refused:?}");
    assert_eq!(refused.len(), N - CAP);
    for &i in &frozen {
        wait_for(&mut a, &bubbles[i], LIMIT, |b| b.state == SUSPENDED).await;
    }
    // A refused bubble's call was ended (timed out): it takes calls.
    for &i in &refused {
        a.call(call_req(&bubbles[i], "echo", b"hi"))
            .await
            .expect("a refused bubble takes calls again");
    }
    // Another parent has its own cap.
    let mut b = broker.tls_client("parent-b").await;
    let other = await_bubble(&mut b).await;
    let r = b
        .call(await_call(&other, "cap-b"))
        .await
        .expect("another parent's await")
        .into_inner();
    assert!(r.awaiting.is_some());
    // Ending one await (deleting its bubble) frees its slot.
    a.delete_bubble(pb::BubbleRef {
        bubble_id: bubbles[frozen[0]].clone(),
    })
    .await
    .expect("delete");
    let again = refused[0];
    let r = a
        .call(await_call(&bubbles[again], "cap-again"))
        .await
        .expect("an await after a slot came back")
        .into_inner();
    assert!(r.awaiting.is_some());
    let r = a
        .call(await_call(&bubbles[refused[1]], "cap-over"))
        .await
        .expect_err("at the cap again");
    assert_eq!(r.code(), tonic::Code::ResourceExhausted);
}

/// The index entries (`awaits/<id>` in the local store) whose JSON (after
/// the 32-byte MAC) contains `word`.
fn index_entries(dir: &Path, word: &str) -> usize {
    let Ok(rd) = std::fs::read_dir(dir.join("store/awaits")) else {
        return 0;
    };
    rd.filter_map(|e| std::fs::read(e.ok()?.path()).ok())
        .filter(|b| b.len() > 32 && String::from_utf8_lossy(&b[32..]).contains(word))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_await_is_collected_after_the_retention() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            config: Some("[events]\nawait_retention_ms = 1500\n".into()),
            ..Default::default()
        },
    );
    let mut a = broker.client().await;
    let bubble = await_bubble(&mut a).await;
    let pk = sig_pk(&mut a, &bubble).await;
    let t = trigger(&mut a, "pay", &bubble, "pay").await;
    assert!(publish(&mut a, "pay", "order-12", b"cap-12").await);
    wait_frozen(&mut a, dir.path(), &bubble).await;
    assert_eq!(index_entries(dir.path(), "\"Frozen\""), 1);
    assert!(publish(&mut a, "pay", "cap-12", b"captured").await);
    let r = wait_result(&mut a, &t, "order-12", LIMIT).await;
    verify(&pk, &r, "pay", b"cap-12", b"cap-12|captured");
    // Ended, kept for the retention (a late event is told it ended) ...
    let ended_at = Instant::now();
    assert_eq!(index_entries(dir.path(), "\"Ended\""), 1);
    // ... then collected.
    let end = Instant::now() + LIMIT;
    while index_entries(dir.path(), "") > 0 {
        assert!(Instant::now() < end, "the ended await was never collected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        ended_at.elapsed() >= Duration::from_millis(1000),
        "collected before its retention"
    );
}

/// On a moto store (no conditional DELETE: the e-tag is checked right
/// before it): a direct call's await times out, its answer is kept, and
/// after the retention both its index entry and its kept answer are
/// collected (the answer only because the entry was).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_direct_await_and_its_answer_are_collected_on_moto() {
    let Some((_moto, port)) = moto() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            args: vec![
                "--store".into(),
                format!("s3://awaits/shared?endpoint=http://127.0.0.1:{port}"),
            ],
            env: bubble_e2e_tests::moto::s3_env(),
            config: Some("[events]\nawait_retention_ms = 1500\n".into()),
            ..Default::default()
        },
    );
    let mut a = broker.client().await;
    let bubble = await_bubble(&mut a).await;
    let pk = sig_pk(&mut a, &bubble).await;
    signed_await(&mut a, &bubble, "pay_short", "cap-41").await;
    let objects = || {
        bubble_e2e_tests::moto::http(port, "GET", "/awaits?list-type=2&prefix=shared/await")
            .unwrap_or_default()
    };
    let get = |c: &mut Client| {
        let mut c = c.clone();
        async move {
            c.get_await_result(pb::GetAwaitResultRequest {
                key: "cap-41".into(),
            })
            .await
        }
    };
    // Timed out (1.5 s): the signed answer is kept, in the store.
    let end = Instant::now() + LIMIT;
    let kept = loop {
        let r = get(&mut a).await.expect("get await result").into_inner();
        if r.outcome != "pending" {
            break r;
        }
        assert!(Instant::now() < end, "no answer kept");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    verify(&pk, &kept, "pay_short", b"cap-41", b"cap-41|timeout");
    assert!(objects().contains("shared/await-results/"), "{}", objects());
    // Collected after the retention: the entry and the answer.
    let end = Instant::now() + LIMIT;
    while objects().contains("<Key>") {
        assert!(
            Instant::now() < end,
            "the ended await was never collected: {}",
            objects()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let e = get(&mut a).await.expect_err("collected");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
}
