//! Dead letters of a NATS trigger through the API, real KVM and a real
//! `nats-server -js`: a poison event lands in the trigger's dead letters
//! (attempts counted) while a good one goes through; another parent
//! listing or replaying them gets the PERMISSION_DENIED of an unknown id;
//! a key that is not dead-lettered is NOT_FOUND; the owner's replay drops
//! the `failed` result, runs the event `max_deliver` times again and
//! dead-letters it again (listed once, not twice).

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bubble_e2e_tests::triggers::*;
use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;
use tonic::Code;

const LIMIT: Duration = Duration::from_secs(60);

/// Publishes, waiting (with a deadline) until the trigger's NATS
/// connection is up.
async fn publish_nats(c: &mut Client, key: &str, payload: &[u8]) {
    let end = Instant::now() + LIMIT;
    loop {
        match c
            .publish_event(pb::PublishEventRequest {
                subject: "orders".into(),
                key: key.into(),
                payload: payload.to_vec(),
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
async fn nats_dead_letters_are_listed_and_replayed_by_their_owner_only() {
    let Some(nats) = bubble_e2e_tests::nats::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            tls: true,
            config: Some(format!(
                "[events]\nnats_url = {:?}\nretry_delay_ms = 20\n",
                nats.url
            )),
            ..Opts::default()
        },
    );
    let mut a = broker.tls_client("parent-a").await;
    let mut b = broker.tls_client("parent-b").await;
    let bubble = bubble_with_portion(&mut a).await;
    let t = a
        .create_trigger(pb::CreateTriggerRequest {
            source: "nats".into(),
            max_deliver: 2,
            ..trigger_req("orders", &bubble)
        })
        .await
        .unwrap()
        .into_inner();
    let before = describe(&mut a, &bubble).await.calls;
    publish_nats(&mut a, "bad-1", b"poison").await;
    publish_nats(&mut a, "good-1", b"fine").await;
    let keys = ["bad-1".to_string(), "good-1".to_string()];
    poison_dead_lettered_for_its_owner_only(&mut a, &mut b, &t.trigger_id, &bubble, before, LIMIT)
        .await;

    // The owner replays it: it runs max_deliver (2) more times and is
    // dead-lettered again, once.
    a.replay_dead_letter(pb::ReplayDeadLetterRequest {
        trigger_id: t.trigger_id.clone(),
        key: "bad-1".into(),
    })
    .await
    .unwrap();
    let end = Instant::now() + LIMIT;
    while describe(&mut a, &bubble).await.calls < before + 5 {
        assert!(Instant::now() < end, "the replayed event did not run twice");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    loop {
        let d = dead_letters(&mut a, &t.trigger_id).await;
        let r = results(&mut a, &t.trigger_id, &keys[..1], LIMIT).await;
        if d.len() == 1 && r[0].outcome == "failed" {
            assert_eq!((d[0].key.as_str(), d[0].attempts), ("bad-1", 2), "{d:?}");
            break;
        }
        assert!(
            d.len() <= 1 && Instant::now() < end,
            "not dead-lettered again once: {d:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(describe(&mut a, &bubble).await.calls, before + 5);
}
