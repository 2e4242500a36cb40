//! Triggers on NATS JetStream, real KVM and a real `nats-server -js`: two
//! brokers (one store, one NATS) each with a trigger of the same parent on
//! the same subject share the events through one durable consumer; 200
//! events, one broker killed mid-run, the other finishes; every key has
//! exactly one result, signed by the bubble that ran it.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bubble_e2e_tests::triggers::*;
use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;
use tonic::Code;

const LIMIT: Duration = Duration::from_secs(60);

/// Publishes through a broker, waiting (with a deadline) until the
/// trigger's NATS connection is up.
async fn publish_nats(c: &mut Client, key: &str) {
    let end = Instant::now() + LIMIT;
    loop {
        match c
            .publish_event(pb::PublishEventRequest {
                subject: "orders".into(),
                key: key.into(),
                payload: key.as_bytes().to_vec(),
            })
            .await
        {
            Ok(r) => {
                assert!(!r.into_inner().duplicate, "{key}");
                return;
            }
            Err(e) if e.code() == Code::Unavailable && Instant::now() < end => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("publish {key}: {e:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_brokers_share_one_stream_and_one_finishes_after_the_other_dies() {
    let Some(nats) = bubble_e2e_tests::nats::start() else {
        return;
    };
    let store = tempfile::tempdir().unwrap();
    let config = format!(
        "store = {:?}\n[events]\nnats_url = {:?}\nack_wait_ms = 1500\nretry_delay_ms = 20\n",
        store.path().display().to_string(),
        nats.url
    );
    let opts = Opts {
        config: Some(config),
        ..Opts::default()
    };
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = BrokerProc::start_with(da.path(), opts.clone());
    let mut b = BrokerProc::start_with(db.path(), opts);
    let mut ca = a.client().await;
    let mut cb = b.client().await;
    let mut keys_of = std::collections::HashMap::new();
    let mut triggers = Vec::new();
    for c in [&mut ca, &mut cb] {
        let bubble = bubble_with_portion(c).await;
        keys_of.insert(bubble.clone(), sig_pk(c, &bubble).await);
        let t = c
            .create_trigger(pb::CreateTriggerRequest {
                source: "nats".into(),
                batch_size: 8,
                function: "slow".into(),
                ..trigger_req("orders", &bubble)
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(t.source, "nats");
        triggers.push(t.trigger_id);
    }
    let keys: Vec<String> = (0..200).map(|i| format!("n-{i}")).collect();
    // A first wave; broker b is killed once some of it is done (while it
    // holds leased events), then the rest is published, so the run cannot
    // have ended before the kill however fast this host is.
    for k in &keys[..50] {
        publish_nats(&mut ca, k).await;
    }
    wait_done(&mut ca, &triggers[0], &keys, 20, LIMIT).await;
    b.kill();
    for k in &keys[50..] {
        publish_nats(&mut ca, k).await;
    }
    assert!(
        any_pending(&mut ca, &triggers[0], &keys).await,
        "the kill came after the run ended"
    );
    let r = results(&mut ca, &triggers[0], &keys, LIMIT).await;
    let mut signed = HashSet::new();
    let mut by = HashSet::new();
    for (k, r) in keys.iter().zip(&r) {
        let pk = keys_of.get(&r.bubble_id).expect("one of the two bubbles");
        verify_fn(pk, r, "slow", k.as_bytes());
        assert!(signed.insert((r.bubble_id.clone(), r.call_id)), "{r:?}");
        by.insert(r.bubble_id.clone());
    }
    assert_eq!(by.len(), 2, "both brokers took events: {by:?}");
    // A duplicate publish through the surviving broker stores nothing.
    let dup = ca
        .publish_event(pb::PublishEventRequest {
            subject: "orders".into(),
            key: "n-0".into(),
            payload: b"n-0".to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(dup.duplicate);
}
