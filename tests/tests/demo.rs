//! `bubblectl demo` (the README's first command) runs end to end on real
//! KVM: bubbles created, called and deleted, the payments flow, and the
//! payments portion's await frozen on one broker and resumed on a second
//! broker sharing the store (the demo checks every signature itself and
//! fails otherwise); here we check it succeeded, said so, and left no
//! VMM behind.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use bubble_e2e_tests::*;

#[test]
fn the_demo_resumes_the_payments_await_on_a_second_broker() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(ctl_bin())
        .args(["demo", "--bubbles", "1", "--calls", "20"])
        // The demo's temp dirs go under ours, so its VMMs can be looked for.
        .env("TMPDIR", tmp.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "tokenized 4111…1111",
        "charge of 49.99 EUR signed with the gateway key; signature verifies",
        "the call awaits the capture",
        "frozen to the store",
        "broker B: data dir",
        "the capture notification restored",
        "bubble's signature and both gateway signatures verify",
        "capture -> settled (B)",
        "the owner reads the same settlement on A",
    ] {
        assert!(stdout.contains(line), "no {line:?} in:\n{stdout}");
    }
    // A and B ran in two data dirs; the bubble that awaited on A was
    // restored by B (the line names the same id A froze).
    let frozen = stdout
        .lines()
        .find(|l| l.contains("frozen to the store"))
        .and_then(|l| l.split_whitespace().find(|w| w.starts_with("b-")))
        .unwrap()
        .to_string();
    let resumed = stdout
        .lines()
        .find(|l| l.starts_with("B: the capture notification restored"))
        .unwrap();
    assert!(resumed.contains(&frozen), "{resumed} vs {frozen}");
    // The demo has exited: no VMM of either broker may outlive it.
    let end = Instant::now() + Duration::from_secs(10);
    while !vmm_pids_under(tmp.path()).is_empty() {
        assert!(Instant::now() < end, "the demo left VMMs running");
        std::thread::sleep(Duration::from_millis(20));
    }
}
