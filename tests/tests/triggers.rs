//! Triggers end to end on real KVM: owned like bubbles (a foreign parent
//! gets the same PERMISSION_DENIED as for an unknown id, and its subjects
//! and keys live in its own namespace), validated, persisted across a
//! broker restart; events published through the broker run the portion
//! and leave one signed result per key.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bubble_e2e_tests::triggers::*;
use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;
use tonic::Code;

const LIMIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn triggers_are_owned_validated_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProc::start(dir.path(), true);
    let mut a = broker.tls_client("parent-a").await;
    let mut b = broker.tls_client("parent-b").await;
    let bubble = bubble_with_portion(&mut a).await;
    let pk = sig_pk(&mut a, &bubble).await;

    // Validation, typed: each refusal names its field.
    for (req, code, field) in [
        (
            trigger_req("a..b", &bubble),
            Code::InvalidArgument,
            "subject",
        ),
        (
            trigger_req("a.*", &bubble),
            Code::InvalidArgument,
            "subject",
        ),
        (
            pb::CreateTriggerRequest {
                profile: "p".into(),
                ..trigger_req("orders", &bubble)
            },
            Code::InvalidArgument,
            "bubble_id",
        ),
        (
            pb::CreateTriggerRequest {
                batch_size: 1000,
                ..trigger_req("orders", &bubble)
            },
            Code::InvalidArgument,
            "batch_size",
        ),
        (
            pb::CreateTriggerRequest {
                max_deliver: 101,
                ..trigger_req("orders", &bubble)
            },
            Code::InvalidArgument,
            "max_deliver",
        ),
        (
            pb::CreateTriggerRequest {
                source: "kafka".into(),
                ..trigger_req("orders", &bubble)
            },
            Code::InvalidArgument,
            "source",
        ),
        (
            pb::CreateTriggerRequest {
                portion: "a b".into(),
                ..trigger_req("orders", &bubble)
            },
            Code::InvalidArgument,
            "portion",
        ),
        (
            pb::CreateTriggerRequest {
                source: "nats".into(),
                ..trigger_req("orders", &bubble)
            },
            Code::FailedPrecondition,
            "nats",
        ),
    ] {
        let e = a.create_trigger(req).await.unwrap_err();
        assert_eq!(e.code(), code, "{e:?}");
        assert!(e.message().contains(field), "{field}: {e:?}");
    }

    let t = a
        .create_trigger(trigger_req("orders", &bubble))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (t.batch_size, t.max_deliver, t.source.as_str()),
        (1, 5, "embedded")
    );
    let e = a
        .create_trigger(trigger_req("orders", &bubble))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");

    // Parent b: a's bubble cannot be named in a trigger; a's trigger is
    // neither listed, deletable nor readable, and every refusal is the one
    // an unknown id gets.
    let e = b
        .create_trigger(trigger_req("orders", &bubble))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(b
        .list_triggers(pb::ListTriggersRequest {})
        .await
        .unwrap()
        .into_inner()
        .triggers
        .is_empty());
    let unknown = format!("t-{}", "0".repeat(32));
    let foreign = b
        .delete_trigger(pb::TriggerRef {
            trigger_id: t.trigger_id.clone(),
        })
        .await
        .unwrap_err();
    let none = b
        .delete_trigger(pb::TriggerRef {
            trigger_id: unknown.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(foreign.code(), Code::PermissionDenied);
    assert_eq!(none.code(), Code::PermissionDenied);
    assert_eq!(
        foreign.message().replace(&t.trigger_id, "ID"),
        none.message().replace(&unknown, "ID")
    );
    let e = b
        .get_result(pb::GetResultRequest {
            trigger_id: t.trigger_id.clone(),
            key: "k1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // No trigger of b's consumes "orders": b cannot publish there.
    let e = b
        .publish_event(pb::PublishEventRequest {
            subject: "orders".into(),
            key: "k1".into(),
            payload: b"from b".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    // With its own trigger on "orders", b's events land in b's namespace:
    // they neither reach a's trigger nor swallow a's event of the same key
    // as a duplicate, and each trigger's result is its own parent's.
    let b_bubble = bubble_with_portion(&mut b).await;
    let b_pk = sig_pk(&mut b, &b_bubble).await;
    let bt = b
        .create_trigger(trigger_req("orders", &b_bubble))
        .await
        .unwrap()
        .into_inner();
    assert!(publish(&mut b, "orders", "k1", b"from b").await);
    assert!(publish(&mut a, "orders", "k1", b"from a").await);
    assert!(!publish(&mut a, "orders", "k1", b"again").await);
    let r = results(&mut a, &t.trigger_id, &["k1".into()], LIMIT).await;
    verify(&pk, &r[0], b"from a");
    assert_eq!(r[0].bubble_id, bubble);
    let r = results(&mut b, &bt.trigger_id, &["k1".into()], LIMIT).await;
    verify(&b_pk, &r[0], b"from b");
    assert_eq!(r[0].bubble_id, b_bubble);
    // Neither parent can read the other's result by naming its trigger.
    let e = a
        .get_result(pb::GetResultRequest {
            trigger_id: bt.trigger_id.clone(),
            key: "k1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // Oversized payloads and bad keys are refused before the queue.
    let e = a
        .publish_event(pb::PublishEventRequest {
            subject: "orders".into(),
            key: "a b".into(),
            payload: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = a
        .publish_event(pb::PublishEventRequest {
            subject: "orders".into(),
            key: "big".into(),
            payload: vec![0; 5 << 20],
        })
        .await
        .unwrap_err();
    assert!(
        matches!(e.code(), Code::InvalidArgument | Code::ResourceExhausted),
        "{e:?}"
    );

    // A broker killed and restarted: the trigger is still there and runs
    // again.
    broker.kill();
    let broker = BrokerProc::start(dir.path(), true);
    let mut a = broker.tls_client("parent-a").await;
    let listed = a
        .list_triggers(pb::ListTriggersRequest {})
        .await
        .unwrap()
        .into_inner()
        .triggers;
    assert_eq!(listed, vec![t.clone()]);
    assert!(publish(&mut a, "orders", "k2", b"after restart").await);
    let r = results(&mut a, &t.trigger_id, &["k1".into(), "k2".into()], LIMIT).await;
    verify(&pk, &r[0], b"from a");
    verify(&pk, &r[1], b"after restart");

    // Deleted: gone from the list, its results no longer readable, and a
    // restart does not bring it back.
    a.delete_trigger(pb::TriggerRef {
        trigger_id: t.trigger_id.clone(),
    })
    .await
    .unwrap();
    assert!(a
        .list_triggers(pb::ListTriggersRequest {})
        .await
        .unwrap()
        .into_inner()
        .triggers
        .is_empty());
    let e = a
        .get_result(pb::GetResultRequest {
            trigger_id: t.trigger_id.clone(),
            key: "k1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = a
        .publish_event(pb::PublishEventRequest {
            subject: "orders".into(),
            key: "k3".into(),
            payload: b"nobody takes this".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let mut broker = broker;
    broker.kill();
    let broker = BrokerProc::start(dir.path(), true);
    let mut a = broker.tls_client("parent-a").await;
    assert!(a
        .list_triggers(pb::ListTriggersRequest {})
        .await
        .unwrap()
        .into_inner()
        .triggers
        .is_empty());
}

/// Eight concurrent publishes of one key: one event, one result (the
/// payload of the publish that was not a duplicate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_of_one_key_make_one_result() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start(dir.path(), false);
    let mut c = broker.client().await;
    let bubble = bubble_with_portion(&mut c).await;
    let pk = sig_pk(&mut c, &bubble).await;
    let t = c
        .create_trigger(trigger_req("pay", &bubble))
        .await
        .unwrap()
        .into_inner();
    let mut tasks = Vec::new();
    for i in 0..8u8 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let payload = vec![b'a' + i; 10];
            (publish(&mut c, "pay", "same", &payload).await, payload)
        }));
    }
    let mut firsts = Vec::new();
    for t in tasks {
        let (new, payload) = t.await.unwrap();
        if new {
            firsts.push(payload);
        }
    }
    assert_eq!(firsts.len(), 1, "exactly one publish stored the event");
    let r = results(&mut c, &t.trigger_id, &["same".into()], LIMIT).await;
    verify(&pk, &r[0], &firsts[0]);
    // The portion ran once: the bubble counted the load, the `keys` call
    // and one portion call.
    let calls = describe(&mut c, &bubble).await.calls;
    assert_eq!(calls, 3, "load, keys and one portion call");
}

/// Runs `bubblectl --json ARGS` (stdin from `input`), expects success and
/// parses its output.
fn ctl_json(socket: &std::path::Path, args: &[&str], input: &[u8]) -> serde_json::Value {
    use std::io::Write;
    let mut child = std::process::Command::new(ctl_bin())
        .arg("--socket")
        .arg(socket)
        .arg("--json")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The whole flow from bubblectl alone: trigger create (pool and module
/// file), publish from stdin and from a file, results, list, delete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bubblectl_creates_publishes_reads_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            config: Some("[[pool]]\nname = \"ev\"\nmemory_mib = 16\nsize = 1\n".into()),
            ..Opts::default()
        },
    );
    let wat = dir.path().join("ev.wat");
    std::fs::write(&wat, EVENTS_WAT).unwrap();
    let s = &broker.socket;
    let wat_arg = wat.to_str().unwrap();
    let t = ctl_json(
        s,
        &[
            "trigger",
            "create",
            "cli.events",
            "ev",
            "echo",
            "--profile",
            "ev",
            "--module",
            wat_arg,
            "--batch-size",
            "4",
        ],
        b"",
    );
    let id = t["trigger_id"].as_str().unwrap().to_string();
    assert_eq!(t["batch_size"], 4);
    let listed = ctl_json(s, &["trigger", "list"], b"");
    assert_eq!(listed[0]["trigger_id"], id.as_str());
    let p = ctl_json(
        s,
        &["publish", "cli.events", "--key", "k-stdin"],
        b"from stdin",
    );
    assert_eq!(p["duplicate"], false);
    let file = dir.path().join("payload");
    std::fs::write(&file, b"from a file").unwrap();
    let f = file.to_str().unwrap();
    ctl_json(
        s,
        &["publish", "cli.events", "--key", "k-file", "--file", f],
        b"",
    );
    let again = ctl_json(
        s,
        &["publish", "cli.events", "--key", "k-file", "--file", f],
        b"",
    );
    assert_eq!(again["duplicate"], true);
    let mut c = broker.client().await;
    results(&mut c, &id, &["k-stdin".into(), "k-file".into()], LIMIT).await;
    for (k, want) in [("k-stdin", "from stdin"), ("k-file", "from a file")] {
        let r = ctl_json(s, &["results", &id, k], b"");
        assert_eq!(r["outcome"], "ok", "{r}");
        assert_eq!(r["output"], hex_of(want.as_bytes()), "{r}");
        assert_eq!(r["signature"].as_str().unwrap().len(), 128, "{r}");
    }
    let pending = ctl_json(s, &["results", &id, "never"], b"");
    assert_eq!(pending["outcome"], "pending");
    ctl_json(s, &["trigger", "delete", &id], b"");
    assert_eq!(
        ctl_json(s, &["trigger", "list"], b""),
        serde_json::json!([])
    );
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A parent cannot make triggers (each a dispatcher) without bound: 64 are
/// allowed, concurrent creates past that are refused with
/// RESOURCE_EXHAUSTED, another parent is not affected, and deleting one
/// makes room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn triggers_per_parent_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start(dir.path(), true);
    let mut c = broker.tls_client("parent-a").await;
    let bubble = bubble_with_portion(&mut c).await;
    // 80 concurrent creates on distinct subjects: exactly 64 succeed.
    let mut tasks = Vec::new();
    for i in 0..80 {
        let mut c = c.clone();
        let req = trigger_req(&format!("s{i}"), &bubble);
        tasks.push(tokio::spawn(async move { c.create_trigger(req).await }));
    }
    let (mut made, mut refused) = (Vec::new(), 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(t) => made.push(t.into_inner().trigger_id),
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                refused += 1;
            }
        }
    }
    assert_eq!((made.len(), refused), (64, 16));
    let listed = c
        .list_triggers(pb::ListTriggersRequest {})
        .await
        .unwrap()
        .into_inner()
        .triggers;
    assert_eq!(listed.len(), 64);
    // Another parent still may.
    let mut other = broker.tls_client("parent-b").await;
    let theirs = bubble_with_portion(&mut other).await;
    other
        .create_trigger(trigger_req("s0", &theirs))
        .await
        .unwrap();
    // Room again after a delete.
    c.delete_trigger(pb::TriggerRef {
        trigger_id: made[0].clone(),
    })
    .await
    .unwrap();
    c.create_trigger(trigger_req("again", &bubble))
        .await
        .unwrap();
}
