//! End to end on real KVM: warm pool and attach, idle policy, quotas,
//! metering, metrics, graceful shutdown and a bounded load run.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;
use sha2::{Digest, Sha256};
use tonic::Code;

const READY: i32 = pb::BubbleState::Ready as i32;
const DELETED: i32 = pb::BubbleState::Deleted as i32;

/// What the guest's `sha256_chain` op answers: SHA-256 of `data`, then of
/// the digest, `rounds` times in all.
fn sha256_chain(data: &[u8], rounds: u32) -> Vec<u8> {
    let mut d = Sha256::digest(data);
    for _ in 1..rounds {
        d = Sha256::digest(d);
    }
    d.to_vec()
}

fn attach_req(profile: &str) -> pb::AttachBubbleRequest {
    pb::AttachBubbleRequest {
        profile: profile.into(),
        wait_ms: 0,
        idle: None,
        client_request_id: String::new(),
        policy: None,
    }
}

/// Value of the first metric line starting with `prefix`.
fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.trim().parse().ok())
}

/// Waits until the pool `profile` holds at least `depth` bubbles (its
/// depth gauge; fails the test after 20 s) and returns the depth.
async fn wait_pool(broker: &BrokerProc, profile: &str, depth: f64) -> f64 {
    let key = format!("bubbled_pool_depth{{profile=\"{profile}\"}}");
    wait_until(
        &format!("pool {profile} at depth {depth}"),
        Duration::from_secs(20),
        || metric(&broker.admin_get("/metrics"), &key).unwrap_or(-1.0),
        |d| *d >= depth,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_pool_attach_refill_and_no_reuse_across_parents() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            tls: true,
            admin: true,
            config: Some("[[pool]]\nname = \"small\"\nmemory_mib = 8\nsize = 2\n".into()),
            ..Opts::default()
        },
    );
    assert_eq!(wait_pool(&broker, "small", 2.0).await, 2.0);
    let mut a = broker.tls_client("parent-a").await;
    let mut b = broker.tls_client("parent-b").await;

    let got = a
        .attach_bubble(attach_req("small"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.state, READY);
    assert_eq!(got.owner, "cert:parent-a");
    assert_eq!(got.profile, "small");
    let out = a
        .call(call_req(&got.bubble_id, "echo", b"pooled"))
        .await
        .unwrap()
        .into_inner()
        .output;
    assert_eq!(out, b"pooled");
    // The pool refills in the background.
    assert_eq!(wait_pool(&broker, "small", 2.0).await, 2.0);

    // A's bubble is never handed to B, neither while A holds it nor after
    // A deletes it.
    let mut seen = vec![got.bubble_id.clone()];
    a.delete_bubble(pb::BubbleRef {
        bubble_id: got.bubble_id.clone(),
    })
    .await
    .unwrap();
    for _ in 0..4 {
        let x = b
            .attach_bubble(attach_req("small"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(x.owner, "cert:parent-b");
        assert!(
            !seen.contains(&x.bubble_id),
            "bubble {} reused",
            x.bubble_id
        );
        seen.push(x.bubble_id);
    }
    let e = b.attach_bubble(attach_req("nope")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("profile"));
    let m = broker.admin_get("/metrics");
    assert!(metric(&m, "bubbled_attach_seconds_count").unwrap() >= 5.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_bubbles_are_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start(dir.path(), false);
    let mut c = broker.client().await;
    let mut req = create_req(8);
    req.idle = Some(pb::IdlePolicy {
        idle_timeout_s: 1,
        action: pb::IdleAction::Delete as i32,
    });
    let idle = c.create_bubble(req).await.unwrap().into_inner();
    let busy = c.create_bubble(create_req(8)).await.unwrap().into_inner();
    let b = wait_for(&mut c, &idle.bubble_id, Duration::from_secs(10), |b| {
        b.state == DELETED
    })
    .await;
    assert_eq!(b.state, DELETED);
    // The deleted bubble's VMM exits; the other one keeps running.
    wait_only_vmm(dir.path(), busy.vmm_pid, Duration::from_secs(10)).await;
    let b = describe(&mut c, &busy.bubble_id).await;
    assert_eq!(b.state, READY);
    // An idle action without a timeout is refused.
    let mut req = create_req(8);
    req.idle = Some(pb::IdlePolicy {
        idle_timeout_s: 0,
        action: pb::IdleAction::Delete as i32,
    });
    let e = c.create_bubble(req).await.unwrap_err();
    assert!(
        e.message().starts_with("idle.idle_timeout_s"),
        "{}",
        e.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_refuse_with_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            config: Some(
                "[quota]\nmax_bubbles_per_parent = 2\nmax_memory_mib_per_parent = 24\n".into(),
            ),
            ..Opts::default()
        },
    );
    let mut c = broker.client().await;
    let first = c.create_bubble(create_req(16)).await.unwrap().into_inner();
    let e = c.create_bubble(create_req(16)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(
        e.message().contains("16 MiB") && e.message().contains("24 MiB"),
        "{}",
        e.message()
    );
    c.create_bubble(create_req(8)).await.unwrap();
    let e = c.create_bubble(create_req(4)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(e.message().contains("2 of 2 bubbles"), "{}", e.message());
    // Deleting frees quota.
    c.delete_bubble(pb::BubbleRef {
        bubble_id: first.bubble_id,
    })
    .await
    .unwrap();
    c.create_bubble(create_req(16)).await.unwrap();
}

/// User+system CPU time of a VMM's vCPU thread, µs (from /proc; 10 ms
/// ticks), measured independently of the VMM's own accounting.
fn vcpu_thread_cpu_us(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(vcpu_task(pid).join("stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    ticks * 1_000_000 / hz
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metering_matches_independent_measurements() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start(dir.path(), false);
    let mut c = broker.client().await;
    // The bubble runs from some moment inside CreateBubble until some
    // moment inside GetUsage: its metered memory-time lies between the
    // intervals these instants bound.
    let before_create = Instant::now();
    let b = c.create_bubble(create_req(32)).await.unwrap().into_inner();
    let ready_seen = Instant::now();
    // Keep the guest busy with little I/O, so that nearly all of the vCPU
    // thread's CPU time is guest time, well above /proc's 10 ms resolution.
    let mut input = 20_000u32.to_le_bytes().to_vec();
    input.extend(b"metering");
    let expect = sha256_chain(b"metering", 20_000);
    let mut out_bytes = 0u64;
    let t = Instant::now();
    let mut n = 0u64;
    while t.elapsed() < Duration::from_millis(1500) {
        let out = c
            .call(call_req(&b.bubble_id, "sha256_chain", &input))
            .await
            .unwrap()
            .into_inner()
            .output;
        assert_eq!(out, expect);
        out_bytes += out.len() as u64;
        n += 1;
    }
    let before_usage = Instant::now();
    let r = c
        .get_usage(pb::BubbleRef {
            bubble_id: b.bubble_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let after_usage = Instant::now();
    let proc_us = vcpu_thread_cpu_us(b.vmm_pid);
    let key: [u8; 32] = r.broker_public_key.clone().try_into().unwrap();
    bubbled::obs::usage::verify(&r, &key).unwrap();
    let u = r.usage.unwrap();
    assert_eq!(u.calls, n);
    assert_eq!(u.bytes_in, n * input.len() as u64);
    assert_eq!(u.bytes_out, out_bytes);
    // The broker's clock has 1 ms steps: each end of its interval may be
    // off by one.
    let step = 0.001;
    let shortest = (before_usage - ready_seen).as_secs_f64() - 2.0 * step;
    let longest = (after_usage - before_create).as_secs_f64() + 2.0 * step;
    assert!(
        32.0 * shortest <= u.memory_mib_seconds && u.memory_mib_seconds <= 32.0 * longest,
        "memory {} MiB-s not within 32 MiB x [{shortest}, {longest}] s",
        u.memory_mib_seconds
    );
    // The VMM counts the vCPU thread's CPU time inside KVM_RUN: part of the
    // thread's CPU time, which /proc counts in whole ticks (utime + stime,
    // each rounded down). The thread's other work (copying requests into
    // the mailbox) is small here: most of its time is the guest's.
    // SAFETY: sysconf has no memory-safety preconditions.
    let tick_us = 1_000_000 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    assert!(
        u.vcpu_us <= proc_us + 2 * tick_us && u.vcpu_us * 5 >= proc_us * 4,
        "vcpu {} µs vs the thread's {} µs in /proc",
        u.vcpu_us,
        proc_us
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_scrapes() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            admin: true,
            config: Some("[[pool]]\nname = \"warm\"\nmemory_mib = 8\nsize = 1\n".into()),
            ..Opts::default()
        },
    );
    assert_eq!(wait_pool(&broker, "warm", 1.0).await, 1.0);
    let mut c = broker.client().await;
    let b = c.create_bubble(create_req(8)).await.unwrap().into_inner();
    for _ in 0..3 {
        c.call(call_req(&b.bubble_id, "echo", b"m")).await.unwrap();
    }
    suspend_and_restore(&mut c, &b.bubble_id).await;
    let resp = broker.admin_get("/metrics");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    // The pooled bubble is POOLED, not READY: READY is the parent's one.
    assert_eq!(metric(&resp, "bubbled_bubbles{state=\"READY\"}"), Some(1.0));
    assert_eq!(
        metric(&resp, "bubbled_bubbles{state=\"POOLED\"}"),
        Some(1.0)
    );
    assert_eq!(metric(&resp, "bubbled_call_seconds_count"), Some(3.0));
    assert_eq!(metric(&resp, "bubbled_create_seconds_count"), Some(1.0));
    assert_eq!(metric(&resp, "bubbled_suspend_seconds_count"), Some(1.0));
    assert_eq!(metric(&resp, "bubbled_restore_seconds_count"), Some(1.0));
    let me = format!("{{parent=\"uid:{}\"}}", own_uid());
    assert_eq!(
        metric(&resp, &format!("bubbled_parent_bubbles{me}")),
        Some(1.0)
    );
    assert_eq!(
        metric(&resp, &format!("bubbled_parent_memory_mib{me}")),
        Some(8.0)
    );
    assert!(resp.contains("# EOF"));
    assert!(broker.admin_get("/healthz").contains("ok"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_finishes_calls_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProc::start(dir.path(), false);
    let c = broker.client().await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let mut c = c.clone();
        ids.push(
            c.create_bubble(create_req(8))
                .await
                .unwrap()
                .into_inner()
                .bubble_id,
        );
    }
    // Calls of tens of ms of guest work each (four queue on each bubble),
    // with small requests: once every bubble runs one, all twelve requests
    // have reached the broker and most calls are still to run.
    let rounds = 100_000u32;
    let mut input = rounds.to_le_bytes().to_vec();
    input.extend(b"in flight");
    let mut calls = Vec::new();
    for i in 0..12 {
        let mut c = c.clone();
        let req = call_req(&ids[i % 3], "sha256_chain", &input);
        calls.push(tokio::spawn(async move { c.call(req).await }));
    }
    let mut probe = c.clone();
    let until = Instant::now() + Duration::from_secs(10);
    for id in &ids {
        wait_for(
            &mut probe,
            id,
            until.saturating_duration_since(Instant::now()),
            |b| b.state == pb::BubbleState::Busy as i32,
        )
        .await;
    }
    let status = tokio::task::spawn_blocking(move || {
        let s = broker.terminate();
        (s, broker)
    });
    let expect = sha256_chain(b"in flight", rounds);
    for t in calls {
        let r = t.await.unwrap().expect("a call in flight was lost");
        assert_eq!(r.into_inner().output, expect);
    }
    let (s, _broker) = status.await.unwrap();
    assert!(s.unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_load_has_no_errors_and_leaks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            tls: true,
            admin: true,
            config: Some("[[pool]]\nname = \"load\"\nmemory_mib = 8\nsize = 2\n".into()),
            ..Opts::default()
        },
    );
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", broker.pid()))
            .unwrap()
            .count()
    };
    // Let the pool fill and the spares start, then take the baseline.
    wait_pool(&broker, "load", 2.0).await;
    wait_spares_ready(dir.path(), 2, Duration::from_secs(20)).await;
    let fds_before = fds();
    let url = format!("https://localhost:{}", broker.tls.unwrap().port());
    let out = std::process::Command::new(ctl_bin())
        .args(["--endpoint", &url, "--pki"])
        .arg(dir.path().join("pki"))
        .args([
            "--json",
            "load",
            "--parents",
            "8",
            "--rounds",
            "2",
            "--calls-per-round",
            "3",
            "--steady-calls",
            "40",
            "--profile",
            "load",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "load failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let rep: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rep["errors"], 0, "{rep}");
    assert!(rep["ops"].as_u64().unwrap() >= 8 * (2 * 5 + 42));
    // Only the pool's bubbles remain (the pool refilled, the load's bubbles
    // are gone); the broker's fds come back to the baseline.
    wait_pool(&broker, "load", 2.0).await;
    wait_until(
        "only the pool's two VMMs left",
        Duration::from_secs(10),
        || vmm_pids_under(dir.path()),
        |pids| pids.len() == 2,
    )
    .await;
    wait_spares_ready(dir.path(), 2, Duration::from_secs(20)).await;
    wait_until(
        &format!("the broker's fds back to {fds_before} (+2)"),
        Duration::from_secs(10),
        fds,
        |n| *n <= fds_before + 2,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_survives_a_broker_crash_and_pooled_bubbles_are_discarded() {
    let dir = tempfile::tempdir().unwrap();
    let opts = || Opts {
        admin: true,
        config: Some("[[pool]]\nname = \"small\"\nmemory_mib = 8\nsize = 2\n".into()),
        ..Opts::default()
    };
    let mut broker = BrokerProc::start_with(dir.path(), opts());
    assert_eq!(wait_pool(&broker, "small", 2.0).await, 2.0);
    let mut c = broker.client().await;
    let got = c
        .attach_bubble(attach_req("small"))
        .await
        .unwrap()
        .into_inner();
    // The first operation on it waits until the new owner is on disk.
    c.call(call_req(&got.bubble_id, "echo", b"mine"))
        .await
        .unwrap();
    assert_eq!(wait_pool(&broker, "small", 2.0).await, 2.0);
    let pooled: Vec<i32> = vmm_pids_under(dir.path())
        .into_iter()
        .filter(|p| *p != got.vmm_pid as i32)
        .collect();
    assert_eq!(pooled.len(), 2, "{pooled:?}");
    drop(c);
    broker.kill();

    let broker2 = BrokerProc::start_with(dir.path(), opts());
    let mut c = broker2.client().await;
    let k = wait_for(&mut c, &got.bubble_id, Duration::from_secs(5), |b| {
        b.state == READY
    })
    .await;
    assert_eq!(k.state, READY, "{}", k.failure_reason);
    assert_eq!(k.vmm_pid, got.vmm_pid);
    let out = c
        .call(call_req(&got.bubble_id, "echo", b"still mine"))
        .await
        .unwrap()
        .into_inner()
        .output;
    assert_eq!(out, b"still mine");
    // The pooled bubbles of the crashed broker are never pooled again:
    // their VMMs are stopped and a fresh pool is booted.
    let end = Instant::now() + Duration::from_secs(5);
    while pooled
        .iter()
        .any(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
        && Instant::now() < end
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for p in &pooled {
        assert!(
            !std::path::Path::new(&format!("/proc/{p}")).exists(),
            "pooled VMM {p} still runs"
        );
    }
    let log = std::fs::read_to_string(dir.path().join("broker.log")).unwrap();
    assert!(log.contains("pooled bubble discarded after restart"));
    assert_eq!(wait_pool(&broker2, "small", 2.0).await, 2.0);
    let fresh = c
        .attach_bubble(attach_req("small"))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(fresh.bubble_id, got.bubble_id);
}

/// This process's uid (the broker's parent id for it is `uid:<n>`).
fn own_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").unwrap().uid()
}
