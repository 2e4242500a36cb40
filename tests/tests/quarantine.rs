//! End to end on real KVM: module quarantine (after repeated security
//! events, per parent), kept across restarts, listed and lifted only by an
//! operator through the admin RPCs (`bubblectl admin quarantine`); the
//! unauthenticated HTTP admin endpoint lifts nothing and binds to loopback
//! only unless told otherwise.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;
use sha2::{Digest, Sha384};
use tonic::Code;

use bubble_e2e_tests::payments::HOSTILE;

/// `bubblectl --json ARGS` on the broker's Unix socket (as this uid, the
/// test's admin).
fn ctl(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(ctl_bin())
        .arg("--socket")
        .arg(dir.join("bubbled.sock"))
        .arg("--json")
        .args(args)
        .output()
        .unwrap()
}

fn opts(admin: &str) -> Opts {
    Opts {
        tls: true,
        admin: true,
        config: Some(format!("admins = [\"{admin}\"]\n")),
        ..Opts::default()
    }
}

fn digest() -> String {
    Sha384::digest(wat::parse_str(HOSTILE).unwrap())
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// Every admin RPC refuses a parent that is not an admin, whatever it
/// asks (even a malformed digest: who asks is checked first).
async fn refused_to_non_admin(c: &mut Client, digest: &str) {
    let e = c
        .admin_quarantine_list(pb::AdminQuarantineListRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    for (d, parent) in [
        (digest, ""),
        (digest, "cert:parent-a"),
        ("not-a-digest", ""),
    ] {
        let e = c
            .admin_quarantine_lift(pb::AdminQuarantineLiftRequest {
                portion_digest: d.into(),
                parent: parent.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{d} {parent}: {e:?}");
    }
}

/// A hostile portion that keeps asking for a credential it was not
/// granted: after three strikes its bubble is FAILED with the reason and
/// its module cannot be loaded into that parent's bubbles, also after a
/// broker restart, until an operator lifts it with the admin RPC; parents
/// cannot list or lift (not even their own), the HTTP endpoint cannot lift,
/// and another parent loads the module throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarantine_survives_restarts_and_only_an_admin_lifts_it() {
    let dir = tempfile::tempdir().unwrap();
    // SAFETY: getuid has no preconditions and cannot fail.
    let me = format!("uid:{}", unsafe { libc::getuid() });
    let mut broker = BrokerProc::start_with(dir.path(), opts(&me));
    let mut c = broker.tls_client("parent-a").await;
    let mut victim = broker.tls_client("parent-b").await;
    let digest = digest();
    // The operator watches every parent's security events; a parent may not.
    let mut admin = broker.client().await;
    let mut watch = admin
        .admin_watch_events(pb::AdminWatchEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    for p in [&mut c, &mut victim] {
        let e = p
            .admin_watch_events(pb::AdminWatchEventsRequest {})
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    }
    let id = payments::hostile_bubble(&mut c).await;
    payments::load_hostile(&mut c, &id).await.unwrap();
    for _ in 0..3 {
        let e = c
            .call(pb::CallRequest {
                bubble_id: id.clone(),
                op: "steal".into(),
                portion: "hostile".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    }
    let failed = wait_for(&mut c, &id, Duration::from_secs(5), |b| {
        b.state == pb::BubbleState::Failed as i32
    })
    .await;
    assert!(
        failed
            .failure_reason
            .contains("quarantined after 3 credential_denied"),
        "{failed:?}"
    );
    // The operator saw all three, naming the parent and the module.
    let mut denied = 0;
    while denied < 3 {
        let ev = tokio::time::timeout(Duration::from_secs(5), watch.message())
            .await
            .expect("the operator's stream stayed silent")
            .unwrap()
            .expect("stream open");
        if ev.kind == "credential_denied" {
            assert_eq!(
                (ev.owner.as_str(), ev.parent.as_str(), ev.bubble_id.as_str()),
                ("cert:parent-a", "cert:parent-a", id.as_str()),
                "{ev:?}"
            );
            assert_eq!(ev.portion_digest, digest);
            denied += 1;
        }
    }
    drop(watch);
    let other = payments::hostile_bubble(&mut c).await;
    let e = payments::load_hostile(&mut c, &other).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("quarantined"), "{e:?}");
    let theirs = payments::hostile_bubble(&mut victim).await;
    payments::load_hostile(&mut victim, &theirs).await.unwrap();

    // Neither the quarantined parent nor the other may list or lift.
    refused_to_non_admin(&mut c, &digest).await;
    refused_to_non_admin(&mut victim, &digest).await;
    // From bubblectl over mutual TLS as a parent: PERMISSION_DENIED (17).
    let url = format!("https://localhost:{}", broker.tls.unwrap().port());
    let pki = dir.path().join("pki");
    for args in [
        &["admin", "quarantine", "list"][..],
        &["admin", "events", "--count", "1"][..],
        &["--admin", "events", "--count", "1"][..],
        &["admin", "quarantine", "lift", &digest][..],
    ] {
        let out = std::process::Command::new(ctl_bin())
            .args(["--endpoint", &url, "--pki", pki.to_str().unwrap()])
            .args(["--parent", "parent-a"])
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(17), "{args:?}: {out:?}");
    }
    // `events` without --admin is a usage error (exit 2).
    let out = std::process::Command::new(ctl_bin())
        .args(["--endpoint", &url, "--pki", pki.to_str().unwrap()])
        .args(["--parent", "parent-a", "events"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    // The HTTP admin endpoint has no lift any more (unauthenticated).
    let r = admin_post(&broker, &format!("/quarantine/lift?digest={digest}"));
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    assert!(payments::load_hostile(&mut c, &other).await.is_err());

    // The admin sees it, for parent-a only.
    let list = |dir: &std::path::Path| {
        let out = ctl(dir, &["admin", "quarantine", "list"]);
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let v = list(dir.path());
    assert_eq!(v.as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v[0]["parent"], "cert:parent-a", "{v}");
    assert_eq!(v[0]["portion_digest"], digest.as_str(), "{v}");
    assert!(
        v[0]["reason"]
            .as_str()
            .unwrap()
            .contains("quarantined after 3"),
        "{v}"
    );

    // A restart keeps it.
    drop((c, victim, admin));
    assert!(broker.terminate().unwrap().success());
    let mut broker = BrokerProc::start_with(dir.path(), opts(&me));
    let mut c = broker.tls_client("parent-a").await;
    let e = payments::load_hostile(&mut c, &other).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("quarantined after 3"), "{e:?}");
    assert_eq!(list(dir.path()), v);

    // Lifting for another parent lifts nothing (NOT_FOUND, exit 15); for
    // parent-a it lifts.
    let out = ctl(
        dir.path(),
        &[
            "admin",
            "quarantine",
            "lift",
            &digest,
            "--parent",
            "cert:parent-b",
        ],
    );
    assert_eq!(out.status.code(), Some(15), "{out:?}");
    let out = ctl(dir.path(), &["admin", "quarantine", "lift", &digest]);
    assert!(out.status.success(), "{out:?}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["lifted"], 1, "{r}");
    payments::load_hostile(&mut c, &other).await.unwrap();
    assert_eq!(list(dir.path()), serde_json::json!([]));
    let out = ctl(dir.path(), &["admin", "quarantine", "lift", &digest]);
    assert_eq!(out.status.code(), Some(15), "{out:?}");

    // And the lift survives a restart too.
    drop(c);
    assert!(broker.terminate().unwrap().success());
    let broker = BrokerProc::start_with(dir.path(), opts(&me));
    let mut c = broker.tls_client("parent-a").await;
    let fresh = payments::hostile_bubble(&mut c).await;
    payments::load_hostile(&mut c, &fresh).await.unwrap();
}

/// The admin endpoint is unauthenticated, so the broker refuses to serve
/// it on a non-loopback address unless told to, and says why.
#[test]
fn the_admin_endpoint_binds_to_loopback_unless_told_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(broker_bin())
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--admin-listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a loopback address") && err.contains("--admin-listen-public"),
        "a clear reason: {err}"
    );
    assert!(
        !dir.path().join("registry.redb").exists(),
        "refused before anything started"
    );
    let broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            args: vec![
                "--admin-listen".into(),
                "0.0.0.0:0".into(),
                "--admin-listen-public".into(),
            ],
            ..Opts::default()
        },
    );
    let a = broker.admin.unwrap();
    let r = admin_get_at(a, "/healthz");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}

fn admin_get_at(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let addr = std::net::SocketAddr::new([127, 0, 0, 1].into(), addr.port());
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn admin_post(broker: &BrokerProc, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(broker.admin.unwrap()).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}
