//! Bounded backlog on NATS, real KVM and a real `nats-server -js`: two
//! brokers (one NATS) each run the same parent's pool trigger on one
//! subject with `max_pending = 10`, blocked (the parent's quota is full on
//! both, so nothing is consumed); 40 concurrent publishes through both
//! brokers store exactly what fits (the server enforces the limit on the
//! shared stream), the rest RESOURCE_EXHAUSTED with a retry hint; once one
//! broker can run its trigger, it drains every stored event.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bubble_e2e_tests::triggers::*;
use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;
use tonic::Code;

const LIMIT: Duration = Duration::from_secs(60);

fn event(key: &str) -> pb::PublishEventRequest {
    pb::PublishEventRequest {
        subject: "orders".into(),
        key: key.into(),
        payload: key.as_bytes().to_vec(),
    }
}

/// Publishes `key`, waiting (with a deadline) until the trigger's NATS
/// connection is up.
async fn publish_when_connected(c: &mut Client, key: &str) {
    let end = Instant::now() + LIMIT;
    loop {
        match c.publish_event(event(key)).await {
            Ok(_) => return,
            Err(e) if e.code() == Code::Unavailable && Instant::now() < end => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("publish {key}: {e:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_brokers_publishes_stop_exactly_at_the_shared_limit() {
    let Some(nats) = bubble_e2e_tests::nats::start() else {
        return;
    };
    let config = format!(
        "[quota]\nmax_bubbles_per_parent = 1\n\
         [events]\nnats_url = {:?}\nmax_pending = 50\nretry_delay_ms = 20\ntarget_latency_ms = 700\n\
         [[pool]]\nname = \"ev\"\nmemory_mib = 16\nsize = 1\n",
        nats.url
    );
    let opts = Opts {
        config: Some(config),
        ..Opts::default()
    };
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = BrokerProc::start_with(da.path(), opts.clone());
    let b = BrokerProc::start_with(db.path(), opts);
    let mut ca = a.client().await;
    let mut cb = b.client().await;
    // The parent's one bubble on each broker: neither pool trigger can
    // attach one, so nothing is consumed until a blocker is deleted.
    let blocker = ca.create_bubble(create_req(16)).await.unwrap().into_inner();
    cb.create_bubble(create_req(16)).await.unwrap();
    let mut triggers = Vec::new();
    for c in [&mut ca, &mut cb] {
        let t = c
            .create_trigger(pb::CreateTriggerRequest {
                source: "nats".into(),
                subject: "orders".into(),
                profile: "ev".into(),
                module: events_module(),
                portion: "ev".into(),
                function: "echo".into(),
                max_pending: 10,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(t.max_pending, 10);
        triggers.push(t.trigger_id);
    }
    // Both connected (each probe is stored: two of the ten).
    publish_when_connected(&mut ca, "probe-a").await;
    publish_when_connected(&mut cb, "probe-b").await;
    let mut tasks = Vec::new();
    for i in 0..40 {
        let mut c = if i % 2 == 0 { ca.clone() } else { cb.clone() };
        tasks.push(tokio::spawn(async move {
            (i, c.publish_event(event(&format!("e-{i}"))).await)
        }));
    }
    let mut taken = vec!["probe-a".to_string(), "probe-b".to_string()];
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
    // Room for broker a's trigger: it drains all ten (whichever broker
    // they were published through).
    ca.delete_bubble(pb::BubbleRef {
        bubble_id: blocker.bubble_id,
    })
    .await
    .unwrap();
    let r = results(&mut ca, &triggers[0], &taken, LIMIT).await;
    for (k, r) in taken.iter().zip(&r) {
        assert_eq!(
            (r.outcome.as_str(), r.output.as_slice()),
            ("ok", k.as_bytes())
        );
    }
    // Drained: the stream takes events again.
    publish_when_connected(&mut cb, "after").await;
}
