//! Dead letters through the API, end to end on real KVM: a poison event
//! lands in its trigger's dead letters (attempts counted) while a good
//! one goes through; another parent listing or replaying them gets the
//! PERMISSION_DENIED of an unknown id; a replay puts it back as a fresh
//! event, drops its `failed` result, runs it `max_deliver` times again and
//! dead-letters it again; a key that is not dead-lettered is NOT_FOUND;
//! the CLI lists and replays.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bubble_e2e_tests::triggers::*;
use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;

const LIMIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_events_are_listed_replayed_by_their_owner_only_and_counted_again() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            tls: true,
            config: Some("[events]\nretry_delay_ms = 20\n".into()),
            ..Opts::default()
        },
    );
    let mut a = broker.tls_client("parent-a").await;
    let mut b = broker.tls_client("parent-b").await;
    let bubble = bubble_with_portion(&mut a).await;
    let t = a
        .create_trigger(pb::CreateTriggerRequest {
            max_deliver: 2,
            ..trigger_req("orders", &bubble)
        })
        .await
        .unwrap()
        .into_inner();
    let before = describe(&mut a, &bubble).await.calls;
    assert!(publish(&mut a, "orders", "bad-1", b"poison").await);
    assert!(publish(&mut a, "orders", "good-1", b"fine").await);
    let keys = ["bad-1".to_string(), "good-1".to_string()];
    poison_dead_lettered_for_its_owner_only(&mut a, &mut b, &t.trigger_id, &bubble, before, LIMIT)
        .await;

    // The owner replays it (through the CLI, over its TLS identity): it
    // runs max_deliver times again and is dead-lettered again.
    let pki = dir.path().join("pki");
    let ctl = |args: &[&str]| {
        let out = std::process::Command::new(ctl_bin())
            .arg("--endpoint")
            .arg(format!("https://localhost:{}", broker.tls.unwrap().port()))
            .arg("--pki")
            .arg(&pki)
            .args(["--parent", "parent-a", "--json"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let listed = ctl(&["trigger", "dead-letters", &t.trigger_id]);
    assert_eq!(listed[0]["key"], "bad-1", "{listed}");
    let replayed = ctl(&["trigger", "replay", &t.trigger_id, "bad-1"]);
    assert_eq!(replayed["key"], "bad-1", "{replayed}");
    let end = Instant::now() + LIMIT;
    loop {
        let d = dead_letters(&mut a, &t.trigger_id).await;
        let r = results(&mut a, &t.trigger_id, &keys[..1], LIMIT).await;
        if d.len() == 1 && r[0].outcome == "failed" {
            assert_eq!(d[0].attempts, 2, "{d:?}");
            break;
        }
        assert!(
            Instant::now() < end,
            "the replayed event was not dead-lettered again: {d:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        describe(&mut a, &bubble).await.calls,
        before + 5,
        "the replay ran it max_deliver (2) more times"
    );
}
