//! End to end on real KVM: a restore (import) of an id this broker does
//! not know answers the same for an id with no frozen copy, a copy under
//! another broker's key and a damaged copy: PERMISSION_DENIED with one
//! message, so a parent cannot probe which ids exist in the shared store.
//! The time each answer takes is measured and printed (see
//! docs/frozen-format.md for what remains).

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bubble_e2e_tests::*;
use tonic::Code;

const KEK: [u8; 32] = [0x6b; 32];

async fn suspended(c: &mut Client, kek: &[u8]) -> (String, u64) {
    let b = c.create_bubble(create_req(8)).await.unwrap().into_inner();
    let s = c
        .suspend_bubble(suspend_req(&b.bubble_id, kek))
        .await
        .unwrap()
        .into_inner();
    (b.bubble_id, s.generation)
}

/// The answer to an import, with the id taken out of its message, and
/// how long it took.
async fn import(c: &mut Client, id: &str, kek: &[u8], generation: u64) -> (Code, String, Duration) {
    let t = Instant::now();
    let e = c
        .restore_bubble(restore_req(id, kek, generation))
        .await
        .unwrap_err();
    (e.code(), e.message().replace(id, "ID"), t.elapsed())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_foreign_and_damaged_copies_answer_alike() {
    let store = tempfile::tempdir().unwrap();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = BrokerProc::start_with(da.path(), shared_store(store.path()));
    let b = BrokerProc::start_with(db.path(), shared_store(store.path()));
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    // Under broker A's key: broker B cannot open it.
    let (foreign, gf) = suspended(&mut ca, b"").await;
    // Under the parent's key, then damaged: its sealed header is altered.
    let (damaged, gd) = suspended(&mut ca, &KEK).await;
    let manifest = store
        .path()
        .join(format!("frozen/{damaged}/g{gd}/manifest"));
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    let h = m["header"].as_str().unwrap().to_string();
    let flipped = if h.ends_with('0') { "1" } else { "0" };
    m["header"] = serde_json::Value::String(format!("{}{flipped}", &h[..h.len() - 1]));
    std::fs::write(&manifest, serde_json::to_vec(&m).unwrap()).unwrap();
    let unknown = format!("b-{}", "7".repeat(32));

    let cases: [(&str, &[u8], u64); 3] = [
        (&unknown, &KEK, 1),
        (&foreign, b"", gf),
        (&damaged, &KEK, gd),
    ];
    let mut times = vec![Vec::new(); 3];
    let mut answers = Vec::new();
    // Two rounds: the broker throttles a parent after ten refusals of
    // one kind within a minute (core::strikes).
    for round in 0..2 {
        for (k, (id, kek, g)) in cases.iter().enumerate() {
            let (code, msg, took) = import(&mut cb, id, kek, *g).await;
            assert_eq!(code, Code::PermissionDenied, "case {k}: {msg}");
            if round == 0 {
                answers.push(msg);
            }
            times[k].push(took);
        }
    }
    assert_eq!(answers[0], answers[1], "unknown and foreign differ");
    assert_eq!(answers[0], answers[2], "unknown and damaged differ");
    let least: Vec<u128> = times
        .iter()
        .map(|t| t.iter().min().unwrap().as_micros())
        .collect();
    let m: Vec<u128> = times.into_iter().map(|t| median(t).as_micros()).collect();
    eprintln!(
        "import refusals, median µs: unknown {} foreign {} damaged {}; least µs: {} {} {}",
        m[0], m[1], m[2], least[0], least[1], least[2]
    );
    // Nothing was imported: broker B knows none of them.
    for id in [&foreign, &damaged] {
        let e = cb
            .describe_bubble(bubble_proto::v1::BubbleRef {
                bubble_id: id.to_string(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
    }
}
