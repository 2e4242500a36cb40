//! Connection hygiene on the broker's Unix socket, written as the attack:
//! one uid holds many idle connections; past its cap new ones are closed at
//! once while another uid's client still works, and the slots come back
//! when the idle connections go. A connection that never sends the HTTP/2
//! preface is closed after the handshake deadline.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use bubble_e2e_tests::*;

/// Whether the broker admitted a fresh connection: it then sends its HTTP/2
/// SETTINGS at once; a refused one is closed (end of stream or reset).
fn admitted(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 64];
    matches!(s.read(&mut b), Ok(n) if n > 0)
}

fn list_as(uid: Option<u32>, socket: &Path) -> Output {
    let mut c = Command::new(ctl_bin());
    c.args(["--json", "--socket"]).arg(socket).arg("list");
    if let Some(u) = uid {
        c.uid(u).gid(u);
    }
    c.output().unwrap()
}

/// A broker whose socket lives in a directory every uid can reach.
fn broker(dir: &Path, config: &str) -> (BrokerProc, std::path::PathBuf) {
    let pub_dir = dir.join("pub");
    std::fs::create_dir_all(&pub_dir).unwrap();
    std::fs::set_permissions(&pub_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = pub_dir.join("bubbled.sock");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let b = BrokerProc::start_with(
        &data,
        Opts {
            config: Some(config.to_string()),
            args: vec!["--socket".into(), socket.display().to_string()],
            ..Default::default()
        },
    );
    (b, socket)
}

#[test]
fn idle_connections_past_the_per_uid_cap_are_refused_while_others_work() {
    if not_root() {
        missing_dependency("root (to run a second client as another uid)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_broker, socket) = broker(
        dir.path(),
        "max_connections_per_uid = 8\nhandshake_timeout_ms = 60000\n",
    );
    // Eight idle connections from this uid are admitted.
    let mut held = Vec::new();
    for i in 0..8 {
        let mut s = UnixStream::connect(&socket).unwrap();
        assert!(admitted(&mut s), "connection {i} refused under the cap");
        held.push(s);
    }
    // The ninth is closed at once, and this uid's client is refused.
    let mut s = UnixStream::connect(&socket).unwrap();
    assert!(!admitted(&mut s), "a connection past the cap was admitted");
    let out = list_as(None, &socket);
    assert_eq!(out.status.code(), Some(24), "{out:?}");
    // Another uid is not affected.
    let out = list_as(Some(65534), &socket);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The idle connections go: their slots come back.
    drop(held);
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let out = list_as(None, &socket);
        if out.status.success() {
            break;
        }
        assert!(Instant::now() < end, "the slots did not come back: {out:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_connection_without_a_preface_is_closed_at_the_handshake_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let (_broker, socket) = broker(dir.path(), "handshake_timeout_ms = 300\n");
    let mut s = UnixStream::connect(&socket).unwrap();
    let started = Instant::now();
    assert!(admitted(&mut s));
    // Nothing sent: the broker closes it (end of stream or reset) well
    // before the 10 s read timeout.
    let mut b = [0u8; 256];
    let closed = loop {
        match s.read(&mut b) {
            Ok(0) => break true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break false,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => break false,
            Err(_) => break true,
        }
    };
    assert!(
        closed,
        "an idle connection was held past the handshake deadline"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

fn not_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() != 0 }
}
