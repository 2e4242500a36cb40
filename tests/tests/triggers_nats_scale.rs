//! Rate matching on NATS, real KVM and a real `nats-server -js`: two
//! brokers share one stream; each sizes its pool trigger's workers from
//! the shared consumer's pending count, so under a backlog of 400 slow
//! events both run more than one bubble (seen through ListBubbles,
//! sampled all along), never more than `max_concurrency`, and every
//! event ends with one `ok` result.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bubble_e2e_tests::triggers::*;
use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;
use tonic::Code;

const LIMIT: Duration = Duration::from_secs(90);
const CAP: usize = 3;

async fn live(c: &mut Client) -> usize {
    c.list_bubbles(pb::ListBubblesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .bubbles
        .len()
}

/// Publishes `key` through `c`, waiting (with a deadline) until the
/// trigger's NATS connection is up.
async fn publish_nats(mut c: Client, key: String) {
    let end = Instant::now() + LIMIT;
    loop {
        match c
            .publish_event(pb::PublishEventRequest {
                subject: "load".into(),
                key: key.clone(),
                payload: key.as_bytes().to_vec(),
            })
            .await
        {
            Ok(_) => return,
            Err(e) if e.code() == Code::Unavailable && Instant::now() < end => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("publish {key}: {e:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_brokers_scale_up_from_the_shared_backlog_within_the_cap() {
    let Some(nats) = bubble_e2e_tests::nats::start() else {
        return;
    };
    let config = format!(
        "[events]\nnats_url = {:?}\ntarget_latency_ms = 10\n\
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
    let mut clients = vec![a.client().await, b.client().await];
    let mut triggers = Vec::new();
    for c in &mut clients {
        let t = c
            .create_trigger(pb::CreateTriggerRequest {
                source: "nats".into(),
                subject: "load".into(),
                profile: "ev".into(),
                module: events_module(),
                portion: "ev".into(),
                function: "slow".into(),
                batch_size: 4,
                max_concurrency: CAP as u32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        triggers.push(t.trigger_id);
    }
    // Samplers watch each broker's bubbles (the parent's, all the
    // trigger's) all along.
    let stop = Arc::new(AtomicBool::new(false));
    let mut samplers = Vec::new();
    for c in &clients {
        let (stop, c) = (stop.clone(), c.clone());
        samplers.push(tokio::spawn(async move {
            let mut most = 0;
            while !stop.load(Ordering::SeqCst) {
                let mut c = c.clone();
                most = most.max(live(&mut c).await);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            most
        }));
    }
    let keys: Vec<String> = (0..400).map(|i| format!("s-{i}")).collect();
    let mut pubs = Vec::new();
    for chunk in keys.chunks(50) {
        let (c, chunk) = (clients[0].clone(), chunk.to_vec());
        pubs.push(tokio::spawn(async move {
            for k in chunk {
                publish_nats(c.clone(), k).await;
            }
        }));
    }
    for p in pubs {
        p.await.unwrap();
    }
    let r = results(&mut clients[1], &triggers[1], &keys, LIMIT).await;
    stop.store(true, Ordering::SeqCst);
    for (k, r) in keys.iter().zip(&r) {
        assert_eq!(
            (r.outcome.as_str(), r.output.as_slice()),
            ("ok", k.as_bytes())
        );
    }
    for (i, s) in samplers.into_iter().enumerate() {
        let most = s.await.unwrap();
        assert!(
            (2..=CAP).contains(&most),
            "broker {i}: at most {most} bubbles at once (want 2..={CAP})"
        );
    }
}
