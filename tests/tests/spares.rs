//! A spare VMM creates its KVM VM and vCPU ahead of need (nothing that
//! depends on the request: no memory, no registers, the vCPU never ran),
//! and the bubble it is given runs on exactly those: no second VM is made
//! and none is left behind (see `docs/performance.md`, `create_to_ready`).

use std::time::Duration;

use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;

const READY: i32 = pb::BubbleState::Ready as i32;

/// How many KVM VM and vCPU descriptors process `pid` holds.
fn kvm_fds(pid: i32) -> (usize, usize) {
    let links: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let count = |what: &str| links.iter().filter(|l| l.contains(what)).count();
    (count("kvm-vm"), count("kvm-vcpu"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spare_prepares_its_vm_and_its_bubble_runs_on_it() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start(dir.path(), false);
    let mut c = broker.client().await;
    for _ in 0..2 {
        wait_spares_ready(dir.path(), 2, Duration::from_secs(30)).await;
        // Every idle spare holds one VM and one vCPU before any request.
        let prepared = wait_until(
            "two idle spares with their VM and vCPU made",
            Duration::from_secs(30),
            || {
                spare_pids_under(dir.path())
                    .into_iter()
                    .filter(|p| kvm_fds(*p) == (1, 1))
                    .collect::<Vec<_>>()
            },
            |s| s.len() >= 2,
        )
        .await;
        let b = c.create_bubble(create_req(16)).await.unwrap().into_inner();
        assert_eq!(b.state, READY, "{}", b.failure_reason);
        assert!(
            prepared.contains(&(b.vmm_pid as i32)),
            "bubble served by a prepared spare: {} not in {prepared:?}",
            b.vmm_pid
        );
        // The prepared VM itself: no second one was made.
        assert_eq!(kvm_fds(b.vmm_pid as i32), (1, 1));
        let r = c
            .call(call_req(&b.bubble_id, "echo", b"prepared"))
            .await
            .unwrap();
        assert_eq!(r.into_inner().output, b"prepared");
    }
}

/// Idle spares of a broker on `dir` once `n` of them hold their VM.
async fn prepared_spares(dir: &std::path::Path, n: usize) -> Vec<i32> {
    wait_spares_ready(dir, n, Duration::from_secs(30)).await;
    wait_until(
        &format!("{n} idle spares with their VM made"),
        Duration::from_secs(30),
        || {
            spare_pids_under(dir)
                .into_iter()
                .filter(|p| kvm_fds(*p) == (1, 1))
                .collect::<Vec<_>>()
        },
        |s| s.len() >= n,
    )
    .await
}

/// The next spare is started only once the bubble that took one is
/// READY (docs/performance.md), and the pool still refills: six creates
/// in a row, each once the pool is full again, are all served by a spare
/// (none waits for a fresh process), and the pool is full after the last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_to_back_creates_are_all_served_by_spares() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start(dir.path(), false);
    let mut c = broker.client().await;
    let mut pids = Vec::new();
    for i in 0..6 {
        let spares = prepared_spares(dir.path(), 2).await;
        let b = c.create_bubble(create_req(16)).await.unwrap().into_inner();
        assert_eq!(b.state, READY, "{}", b.failure_reason);
        assert!(
            spares.contains(&(b.vmm_pid as i32)),
            "create {i} not served by a spare: {} not in {spares:?}",
            b.vmm_pid
        );
        pids.push(b.vmm_pid);
    }
    pids.sort_unstable();
    pids.dedup();
    assert_eq!(pids.len(), 6, "one VMM per bubble");
    prepared_spares(dir.path(), 2).await;
}

/// A burst of creates larger than the pool: both idle spares serve one
/// each, the rest start fresh processes at once (they do not wait for a
/// spare), every bubble is READY on a VMM of its own and answers, and the
/// pool refills afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_larger_than_the_pool_falls_back_to_fresh_starts() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start(dir.path(), false);
    let c = broker.client().await;
    let spares = prepared_spares(dir.path(), 2).await;
    let mut creates = tokio::task::JoinSet::new();
    for _ in 0..5 {
        let mut c = c.clone();
        creates.spawn(async move { c.create_bubble(create_req(16)).await.unwrap().into_inner() });
    }
    let made = creates.join_all().await;
    let mut pids = Vec::new();
    for b in &made {
        assert_eq!(b.state, READY, "{}", b.failure_reason);
        let r = c
            .clone()
            .call(call_req(&b.bubble_id, "echo", b"burst"))
            .await
            .unwrap();
        assert_eq!(r.into_inner().output, b"burst");
        pids.push(b.vmm_pid as i32);
    }
    let from_spares = pids.iter().filter(|p| spares.contains(p)).count();
    assert_eq!(
        from_spares, 2,
        "both idle spares used: {pids:?} / {spares:?}"
    );
    pids.sort_unstable();
    pids.dedup();
    assert_eq!(pids.len(), 5, "one VMM per bubble");
    prepared_spares(dir.path(), 2).await;
}
