//! A bubble survives its broker killed right after its create, even when
//! its jail's waiter had not yet heard the VMM ask to outlive the broker
//! (issue 12). The waiter dies with the broker while its VMM is a spare;
//! at low priority on a loaded host it can read the VMM's "outlive the
//! broker" byte later than the broker answers the create. Until the fix,
//! its parent-death signal was SIGKILL, and a broker killed in that
//! window took a READY bubble down with it.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;

const READY: i32 = pb::BubbleState::Ready as i32;

/// The parent pid and command name of `pid`.
fn parent_and_comm(pid: i32) -> (i32, String) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let open = stat.find('(').expect("(");
    let close = stat.rfind(')').expect(")");
    let ppid = stat[close + 2..]
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("ppid");
    (ppid, stat[open + 1..close].to_string())
}

fn signal(pid: i32, sig: libc::c_int) {
    // SAFETY: sending a signal to a pid has no memory-safety effects.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "signal {sig} to {pid}");
}

/// Every spare's waiter is stopped (SIGSTOP) before the create, so the
/// VMM's byte waits unread in the pipe; the broker is killed (the kernel
/// then also sends the stopped waiters SIGHUP: their process groups are
/// orphaned); the waiters continue. The bubble must be re-adopted by the next broker, on the same
/// VMM, and answer; the old broker's idle spare (which never asked) must
/// be gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bubble_outlives_a_broker_killed_before_its_waiter_heard_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProc::start(dir.path(), false);
    let mut c = broker.client().await;
    wait_spares_ready(dir.path(), 2, Duration::from_secs(10)).await;
    let spares = spare_pids_under(dir.path());
    assert!(spares.len() >= 2, "{spares:?}");
    let waiters: Vec<i32> = spares
        .iter()
        .map(|p| {
            let w = parent_and_comm(*p).0;
            assert_eq!(parent_and_comm(w).1, "vmm:jail", "the waiter of spare {p}");
            w
        })
        .collect();
    for w in &waiters {
        signal(*w, libc::SIGSTOP);
    }
    let b = c.create_bubble(create_req(16)).await.unwrap().into_inner();
    assert_eq!(b.state, READY, "{}", b.failure_reason);
    assert!(
        spares.contains(&(b.vmm_pid as i32)),
        "the bubble was not given one of the stopped spares"
    );
    let idle: Vec<i32> = spares
        .iter()
        .copied()
        .filter(|p| *p != b.vmm_pid as i32)
        .collect();
    drop(c);
    broker.kill();
    for w in &waiters {
        signal(*w, libc::SIGCONT);
    }
    // The idle spare never asked to outlive the broker: it goes.
    for p in idle {
        wait_pid_gone(p, Duration::from_secs(10)).await;
    }
    let broker2 = BrokerProc::start(dir.path(), false);
    let mut c = broker2.client().await;
    let k = wait_for(&mut c, &b.bubble_id, Duration::from_secs(5), |x| {
        x.state == READY
    })
    .await;
    assert_eq!(k.vmm_pid, b.vmm_pid, "the bubble's VMM was replaced");
    let out = c
        .call(call_req(&b.bubble_id, "echo", b"still here"))
        .await
        .unwrap()
        .into_inner()
        .output;
    assert_eq!(out, b"still here");
}
