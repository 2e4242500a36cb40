//! End to end on real KVM: a parent in Python (`grpcio`, stubs generated
//! from the proto here with `grpcio-tools`) creates, calls and deletes a
//! bubble over the Unix socket and over mutual TLS (as its certificate's
//! parent); a malformed message is INVALID_ARGUMENT and an oversized one
//! RESOURCE_EXHAUSTED naming max_payload.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use bubble_e2e_tests::*;

fn have_grpcio() -> bool {
    Command::new("python3")
        .args(["-c", "import grpc, grpc_tools.protoc"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn a_python_grpcio_parent_creates_calls_and_deletes() {
    if !have_grpcio() {
        missing_dependency(
            "python3 with grpcio and grpcio-tools (pip install grpcio grpcio-tools)",
        );
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let stubs = dir.path().join("stubs");
    std::fs::create_dir_all(&stubs).unwrap();
    let gen = Command::new("python3")
        .args(["-m", "grpc_tools.protoc"])
        .arg(format!("-I{}", root.join("proto/proto").display()))
        .arg(format!("--python_out={}", stubs.display()))
        .arg(format!("--grpc_python_out={}", stubs.display()))
        .arg("bubble/v1/broker.proto")
        .output()
        .unwrap();
    assert!(
        gen.status.success(),
        "{}",
        String::from_utf8_lossy(&gen.stderr)
    );

    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let broker = BrokerProc::start(&data, true);
    let run = |args: &[&str]| {
        let out = Command::new("python3")
            .arg(root.join("tests/python/grpc_client.py"))
            .arg(&stubs)
            .args(args)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{args:?}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    let stdout = run(&[broker.socket.to_str().unwrap()]);
    assert_eq!(stdout.matches("ok: ").count(), 5, "{stdout}");
    // Over mutual TLS, by the name in the server certificate.
    let target = format!("localhost:{}", broker.tls.unwrap().port());
    let pki = data.join("pki");
    let stdout = run(&["--tls", &target, pki.to_str().unwrap(), "parent-a"]);
    assert_eq!(stdout.matches("ok: ").count(), 6, "{stdout}");
    assert!(stdout.contains("ok: owned by cert:parent-a"), "{stdout}");
}
