//! Certificate revocation over real mutual TLS, as the attack: a parent's
//! key is replaced (`pki add-parent --force`) because the old one leaked;
//! whoever holds the old certificate and key is refused from the next
//! request on, also on a connection opened before the replacement, and
//! after a broker restart, while the new certificate works. `pki revoke`
//! then cuts the new one off too. `--days` bounds a certificate's validity.
//! `--tls-server-name` checks the broker's certificate against a name other
//! than the URL's host, and a name the certificate does not carry fails
//! with an error that says so.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;

fn run(args: &[&str]) -> Output {
    Command::new(ctl_bin())
        .arg("--json")
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> serde_json::Value {
    let out = run(args);
    assert!(
        out.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `bubblectl list` over mTLS as `parent-a` with the files in `pki`.
fn list_tls(port: u16, pki: &Path) -> Output {
    let url = format!("https://localhost:{port}");
    run(&[
        "--endpoint",
        &url,
        "--pki",
        pki.to_str().unwrap(),
        "--parent",
        "parent-a",
        "list",
    ])
}

fn assert_unauthenticated(out: &Output) {
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(out.status.code(), Some(26), "{v}");
    assert_eq!(v["error"]["code"], "UNAUTHENTICATED", "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("revoked"),
        "{v}"
    );
}

/// A copy of parent-a's current certificate and key (and the CA) in `to`.
fn copy_parent_a(pki: &Path, to: &Path) {
    std::fs::create_dir_all(to.join("parents")).unwrap();
    std::fs::copy(pki.join("ca.pem"), to.join("ca.pem")).unwrap();
    for ext in ["pem", "key"] {
        let f = format!("parents/parent-a.{ext}");
        std::fs::copy(pki.join(&f), to.join(&f)).unwrap();
    }
}

fn start(dir: &Path) -> BrokerProc {
    BrokerProc::start_with(
        dir,
        Opts {
            tls: true,
            ..Default::default()
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_certificate_is_refused_live_and_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let p = pki.to_str().unwrap();
    ok(&["pki", "init", p, "--parents", "parent-a,parent-b"]);
    let old = dir.path().join("old-pki");
    copy_parent_a(&pki, &old);
    let mut b = start(dir.path());
    let port = b.tls.unwrap().port();
    assert!(list_tls(port, &old).status.success());
    // A connection opened with the old certificate before the replacement.
    let (cert, key) = bubbled::pki::parent_files(&old, "parent-a");
    let url = format!("https://localhost:{port}");
    let mut held = bubbled::client::connect_tls(&url, &old.join("ca.pem"), &cert, &key)
        .await
        .unwrap();
    held.list_bubbles(pb::ListBubblesRequest::default())
        .await
        .unwrap();

    ok(&["pki", "add-parent", p, "parent-a", "--force"]);
    // The old certificate is refused, on a new connection and on the one
    // already open; the new one works; another parent is not affected.
    assert_unauthenticated(&list_tls(port, &old));
    let st = held
        .list_bubbles(pb::ListBubblesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::Unauthenticated, "{st:?}");
    assert!(list_tls(port, &pki).status.success());
    assert!(b
        .tls_client("parent-b")
        .await
        .list_bubbles(pb::ListBubblesRequest::default())
        .await
        .is_ok());

    // After a restart, the same.
    b.terminate();
    let b = start(dir.path());
    let port = b.tls.unwrap().port();
    assert_unauthenticated(&list_tls(port, &old));
    assert!(list_tls(port, &pki).status.success());

    // `pki revoke` cuts off the current certificate too, at once.
    let v = ok(&["pki", "revoke", p, "parent-a"]);
    assert_eq!(v["revoked"].as_str().unwrap().len(), 64);
    assert_unauthenticated(&list_tls(port, &pki));
    let text = std::fs::read_to_string(pki.join("revoked")).unwrap();
    assert_eq!(text.lines().count(), 2, "{text}");
    // A broken list: the broker refuses every certificate (fails closed).
    std::fs::write(pki.join("revoked"), "not a fingerprint\n").unwrap();
    let out = run(&[
        "--endpoint",
        &format!("https://localhost:{port}"),
        "--pki",
        p,
        "--parent",
        "parent-b",
        "list",
    ]);
    assert_eq!(out.status.code(), Some(24), "{out:?}");
}

#[test]
fn days_bounds_validity() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let p = pki.to_str().unwrap();
    ok(&["pki", "init", p, "--parents", "parent-a", "--days", "30"]);
    ok(&["pki", "add-parent", p, "parent-b", "--days", "2"]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let not_after = |f: &str| {
        let pem = std::fs::read(pki.join(f)).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        let cert = pem.parse_x509().unwrap();
        cert.validity().not_after.timestamp()
    };
    for (f, days) in [
        ("ca.pem", 30),
        ("server.pem", 30),
        ("parents/parent-a.pem", 30),
        ("parents/parent-b.pem", 2),
    ] {
        let left = not_after(f) - now;
        assert!(
            (days * 86_400 - 120..=days * 86_400 + 120).contains(&left),
            "{f}: {left} s left, expected {days} days"
        );
    }
    for bad in ["0", "36501"] {
        let out = run(&["pki", "add-parent", p, "parent-c", "--days", bad]);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
    }
}

#[test]
fn tls_server_name_is_checked_against_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let p = pki.to_str().unwrap();
    ok(&[
        "pki",
        "init",
        p,
        "--parents",
        "parent-a",
        "--san",
        "broker.test",
    ]);
    let b = start(dir.path());
    let url = format!("https://127.0.0.1:{}", b.tls.unwrap().port());
    let with_name = |name: Option<&str>| {
        let mut args = vec!["--endpoint", &url, "--pki", p, "--parent", "parent-a"];
        if let Some(n) = name {
            args.extend(["--tls-server-name", n]);
        }
        args.push("list");
        run(&args)
    };
    // The URL's host (127.0.0.1, in the certificate) by default; a name
    // the certificate carries; never a name it does not.
    assert!(with_name(None).status.success());
    let out = with_name(Some("broker.test"));
    assert!(out.status.success(), "{out:?}");
    let out = with_name(Some("other.test"));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(24), "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("certificate") && msg.contains("other.test"),
        "no clear name error: {msg}"
    );
}
