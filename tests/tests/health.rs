//! End to end: the broker's active health. gRPC health and `/healthz` go
//! NOT_SERVING, naming the dependency, when the registry cannot commit,
//! `/dev/kvm` cannot create a VM (both broken by the `fault-injection`
//! feature: tests run as root, whom permissions do not stop) or the store
//! stops answering (a real moto server, stopped), and SERVING again after
//! each repair.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bubble_e2e_tests::moto::{http, s3_env, start_moto, start_moto_on};
use bubble_e2e_tests::*;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

async fn grpc_status(broker: &BrokerProc) -> ServingStatus {
    let p = broker.socket.clone();
    let ch = tonic::transport::Endpoint::from_static("http://bubbled.local")
        .connect_with_connector(tower::service_fn(move |_| {
            let p = p.clone();
            async move {
                let s = tokio::net::UnixStream::connect(p).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
        .unwrap();
    let r = HealthClient::new(ch)
        .check(HealthCheckRequest {
            service: "bubble.v1.Broker".into(),
        })
        .await
        .unwrap()
        .into_inner();
    ServingStatus::try_from(r.status).unwrap()
}

/// Waits until both views agree on `serving`, `/healthz` naming `what`
/// when not; fails the test after 15 s.
async fn expect(broker: &BrokerProc, serving: bool, what: &str) {
    let want = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    let limit = Duration::from_secs(15);
    let end = std::time::Instant::now() + limit;
    loop {
        let body = broker.admin_get("/healthz");
        let http_ok = if serving {
            body.starts_with("HTTP/1.1 200") && body.ends_with("ok\n")
        } else {
            body.starts_with("HTTP/1.1 503") && body.contains(&format!("{what}: "))
        };
        let grpc = grpc_status(broker).await;
        if http_ok && grpc == want {
            return;
        }
        assert!(
            std::time::Instant::now() < end,
            "waited {limit:?} for serving={serving} ({what}); /healthz: {body:?}, gRPC: {grpc:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_each_broken_dependency_and_its_repair() {
    let (moto, port) = match start_moto() {
        Ok(m) => m,
        Err(e) => {
            missing_dependency(&format!("no S3-compatible server: {e}"));
            return;
        }
    };
    assert!(http(port, "PUT", "/bubbles")
        .unwrap_or_default()
        .starts_with("HTTP/1.1 200"));
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            admin: true,
            args: vec![
                "--store".into(),
                format!("s3://bubbles/h?endpoint=http://127.0.0.1:{port}"),
            ],
            env: s3_env(),
            ..Opts::default()
        },
    );
    expect(&broker, true, "").await;

    for dep in ["registry", "kvm"] {
        let flag = dir.path().join(format!("fault-{dep}"));
        std::fs::write(&flag, b"").unwrap();
        expect(&broker, false, dep).await;
        std::fs::remove_file(&flag).unwrap();
        expect(&broker, true, "").await;
    }

    // The store: moto stopped, then started again on the same port.
    drop(moto);
    expect(&broker, false, "store").await;
    let _moto = start_moto_on(port).unwrap();
    assert!(http(port, "PUT", "/bubbles")
        .unwrap_or_default()
        .starts_with("HTTP/1.1 200"));
    expect(&broker, true, "").await;
    // And the broker serves again.
    let mut c = broker.client().await;
    let b = c.create_bubble(create_req(8)).await.unwrap().into_inner();
    assert_eq!(b.state, bubble_proto::v1::BubbleState::Ready as i32);
}

/// VMMs of bubbles (spares aside) of the broker on `dir`.
fn bubble_vmms(dir: &std::path::Path) -> Vec<i32> {
    let spares = spare_pids_under(dir);
    vmm_pids_under(dir)
        .into_iter()
        .filter(|p| !spares.contains(p))
        .collect()
}

fn healthy_probes(broker: &BrokerProc) -> u64 {
    broker
        .admin_get("/metrics")
        .lines()
        .find_map(|l| l.strip_prefix("bubbled_pool_probes_total{result=\"healthy\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// A pooled bubble whose VMM hangs (SIGSTOP: alive, never answering) or
/// dies (SIGKILL) is replaced before anyone attaches it; the bubble attach
/// then hands out answers, and DescribeBubble shows its last probe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhealthy_pool_entries_are_replaced_before_attach() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            admin: true,
            config: Some("[[pool]]\nname = \"p\"\nmemory_mib = 8\nsize = 1\n".into()),
            ..Opts::default()
        },
    );
    let limit = Duration::from_secs(20);
    // The pool entry's VMM, once a probe found it healthy (so it is READY
    // and its jail has forked: never the waiter of a VMM still starting).
    let settled = |after: u64| {
        let broker = &broker;
        let dir = dir.path();
        async move {
            wait_until(
                "a healthy probe of the pool entry",
                limit,
                || healthy_probes(broker),
                |n| *n > after,
            )
            .await;
            wait_until(
                "one pooled VMM",
                limit,
                || bubble_vmms(dir),
                |v| v.len() == 1,
            )
            .await[0]
        }
    };
    let mut pid = settled(0).await;
    for signal in [libc::SIGSTOP, libc::SIGKILL] {
        // SAFETY: signalling a VMM process this test's broker started.
        unsafe {
            libc::kill(pid, signal);
        }
        let old = pid;
        // A stopped VMM is killed by the broker, a killed one reaped: the
        // old process is gone either way, and a new entry is probed
        // healthy (the replacement, then attached).
        wait_until(
            &format!("the pool entry {old} gone after signal {signal}"),
            limit,
            || bubble_vmms(dir.path()),
            |v| !v.contains(&old),
        )
        .await;
        pid = settled(healthy_probes(&broker)).await;
        assert_ne!(pid, old);
    }
    let mut c = broker.client().await;
    let b = c
        .attach_bubble(bubble_proto::v1::AttachBubbleRequest {
            profile: "p".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.vmm_pid, pid as u32);
    let out = c
        .call(call_req(&b.bubble_id, "echo", b"healthy"))
        .await
        .unwrap()
        .into_inner()
        .output;
    assert_eq!(out, b"healthy");
    let d = describe(&mut c, &b.bubble_id).await;
    assert!(d.health.starts_with("healthy (probed at "), "{d:?}");
}
