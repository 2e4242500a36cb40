//! A signed `bubblectl call` whose portion awaits, on real KVM: the CLI
//! attests the bubble, sends the input in a sealed session, and the
//! answer is "awaiting" (no result and no signature yet) — reported as
//! such with exit 0, not as a failed verification; the bubble is frozen,
//! and the awaited key's event resumes the call with a signed result.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use bubble_e2e_tests::awaits::*;
use bubble_e2e_tests::triggers::publish;
use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;

fn ctl(socket: &Path, args: &[&str]) -> std::process::Output {
    Command::new(ctl_bin())
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .unwrap()
}

fn ctl_json(socket: &Path, args: &[&str]) -> serde_json::Value {
    let mut argv = vec!["--json"];
    argv.extend_from_slice(args);
    let out = ctl(socket, &argv);
    assert!(
        out.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_cli_call_that_awaits_says_awaiting_and_is_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start(dir.path(), false);
    let s = broker.socket.as_path();
    let wat = dir.path().join("aw.wat");
    std::fs::write(&wat, AWAIT_WAT).unwrap();
    let key_file = dir.path().join("key.txt");
    std::fs::write(&key_file, "cap-14").unwrap();
    let m = ctl_json(s, &["measure", "--memory-mib", "16"]);
    let measurement = m["measurement"].as_str().unwrap().to_string();
    let id = ctl_json(s, &["create", "--memory-mib", "16"])["bubble_id"]
        .as_str()
        .unwrap()
        .to_string();
    ctl_json(s, &["portion", "load", &id, "aw", wat.to_str().unwrap()]);
    let ark = dir.path().join("psp/ark.der");
    let expect = format!("aw={}", wat.display());
    let trust = [
        "--measurement",
        measurement.as_str(),
        "--allow-sim",
        "--ark",
        ark.to_str().unwrap(),
        "--expect-portion",
        &expect,
    ];
    let mut args = vec![
        "call",
        &id,
        "pay",
        "--portion",
        "aw",
        "--input-file",
        key_file.to_str().unwrap(),
        "--sign",
    ];
    args.extend_from_slice(&trust);
    // JSON: the awaiting outcome, exit 0.
    let v = ctl_json(s, &args);
    assert_eq!(v["awaiting"]["key"], "cap-14", "{v}");
    assert!(v["awaiting"]["generation"].as_u64().unwrap() >= 1, "{v}");
    let mut c = broker.client().await;
    wait_frozen(&mut c, dir.path(), &id).await;

    // The event resumes it: the answer comes, signed by the bubble (over
    // the session frame the CLI sent, which only the CLI knew).
    let t = trigger(&mut c, "captures", &id, "pay").await;
    assert!(publish(&mut c, "captures", "cap-14", b"captured-1400").await);
    let r = wait_result(&mut c, &t, "cap-14", LIMIT).await;
    assert_eq!(r.outcome, "ok", "{r:?}");
    assert_eq!(r.bubble_id, id);
    assert_eq!(r.signature.len(), 64);
    assert_eq!(r.output, b"cap-14|captured-1400");
    // The direct call's answer is kept: `bubblectl await-result` reads it.
    let v = ctl_json(s, &["await-result", "cap-14"]);
    assert_eq!(v["outcome"], "ok", "{v}");
    assert_eq!(v["output"], hex(b"cap-14|captured-1400"), "{v}");
    assert_eq!(v["signature"], hex(&r.signature), "{v}");

    // Text output: the same outcome, said in words.
    let mut args = vec![
        "call",
        &id,
        "pay",
        "--portion",
        "aw",
        "--input-file",
        key_file.to_str().unwrap(),
        "--sign",
    ];
    args.extend_from_slice(&trust);
    std::fs::write(&key_file, "cap-15").unwrap();
    let out = ctl(s, &args);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("awaiting cap-15 (frozen at generation"),
        "{text}"
    );
    wait_for(&mut c, &id, LIMIT, |b| {
        b.state == pb::BubbleState::Suspended as i32
    })
    .await;
    let v = ctl_json(s, &["await-result", "cap-15"]);
    assert_eq!(v["outcome"], "pending", "{v}");
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
