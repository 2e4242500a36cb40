//! Bounded backlog, end to end on real KVM: a trigger that cannot run yet
//! (its parent's quota is full) takes exactly `max_pending` of 40
//! concurrent publishes, the rest RESOURCE_EXHAUSTED with a retry hint
//! and nothing stored; its pending count survives a broker SIGKILL (and
//! still refuses); once it can run, it drains to zero and takes events
//! again.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bubble_e2e_tests::triggers::*;
use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;
use tonic::Code;

const LIMIT: Duration = Duration::from_secs(30);

async fn the_trigger(c: &mut Client) -> pb::Trigger {
    let mut v = c
        .list_triggers(pb::ListTriggersRequest {})
        .await
        .unwrap()
        .into_inner()
        .triggers;
    assert_eq!(v.len(), 1, "{v:?}");
    v.pop().unwrap()
}

fn event(key: &str) -> pb::PublishEventRequest {
    pb::PublishEventRequest {
        subject: "orders".into(),
        key: key.into(),
        payload: key.as_bytes().to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_stop_exactly_at_the_limit_and_the_count_survives_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Opts {
        config: Some(
            "[quota]\nmax_bubbles_per_parent = 1\n\
             [events]\nmax_pending = 50\nretry_delay_ms = 20\ntarget_latency_ms = 700\n\
             [[pool]]\nname = \"ev\"\nmemory_mib = 16\nsize = 1\n"
                .into(),
        ),
        ..Opts::default()
    };
    let mut broker = BrokerProc::start_with(dir.path(), opts.clone());
    let mut c = broker.client().await;
    // The parent's one bubble: the pool trigger cannot attach one, so
    // nothing is processed until it is deleted.
    let blocker = c.create_bubble(create_req(16)).await.unwrap().into_inner();
    let req = pb::CreateTriggerRequest {
        subject: "orders".into(),
        profile: "ev".into(),
        module: events_module(),
        portion: "ev".into(),
        function: "echo".into(),
        ..Default::default()
    };
    // Above the broker's ceiling: refused by name.
    let e = c
        .create_trigger(pb::CreateTriggerRequest {
            max_pending: 51,
            ..req.clone()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("max_pending"), "{e:?}");
    let t = c
        .create_trigger(pb::CreateTriggerRequest {
            max_pending: 10,
            ..req
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((t.max_pending, t.pending), (10, 0));

    // 40 concurrent publishes: exactly 10 taken.
    let mut tasks = Vec::new();
    for i in 0..40 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            (i, c.publish_event(event(&format!("e-{i}"))).await)
        }));
    }
    let mut taken = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            (i, Ok(r)) => {
                assert!(!r.into_inner().duplicate);
                taken.push(format!("e-{i}"));
            }
            (_, Err(e)) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                assert!(e.message().contains("limit is 10"), "{e:?}");
                assert_eq!(
                    e.metadata()
                        .get("retry-after-ms")
                        .map(|v| v.to_str().unwrap()),
                    Some("700"),
                    "{e:?}"
                );
            }
        }
    }
    assert_eq!(taken.len(), 10, "{taken:?}");
    assert_eq!(the_trigger(&mut c).await.pending, 10);
    let refused: Vec<String> = (0..40)
        .map(|i| format!("e-{i}"))
        .filter(|k| !taken.contains(k))
        .collect();

    // SIGKILL: the count is in the queue file, committed with the events.
    broker.kill();
    let broker = BrokerProc::start_with(dir.path(), opts);
    let mut c = broker.client().await;
    assert_eq!(the_trigger(&mut c).await.pending, 10);
    let e = c.publish_event(event("after-kill")).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");

    // Room for the trigger's bubble: it drains the ten, and the refused
    // keys were never stored (they publish as new events now).
    c.delete_bubble(pb::BubbleRef {
        bubble_id: blocker.bubble_id,
    })
    .await
    .unwrap();
    let r = results(&mut c, &t.trigger_id, &taken, LIMIT).await;
    for (k, r) in taken.iter().zip(&r) {
        assert_eq!(
            (r.outcome.as_str(), r.output.as_slice()),
            ("ok", k.as_bytes())
        );
    }
    let end = Instant::now() + LIMIT;
    while the_trigger(&mut c).await.pending != 0 {
        assert!(
            Instant::now() < end,
            "the pending count never came back to 0"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for k in &refused[..3] {
        let p = c.publish_event(event(k)).await.unwrap().into_inner();
        assert!(!p.duplicate, "{k} was stored when it was refused");
    }
    let r = results(&mut c, &t.trigger_id, &refused[..3], LIMIT).await;
    assert!(r.iter().all(|r| r.outcome == "ok"), "{r:?}");
}
