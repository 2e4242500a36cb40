//! Connection hygiene on the broker's Unix socket, written as the attack:
//! one uid holds many idle connections; past its cap new ones are closed at
//! once while another uid's client still works, and the slots come back
//! when the idle connections go. A connection that never sends the HTTP/2
//! preface is closed after the handshake deadline. At the descriptor limit
//! the accept loop logs and backs off instead of spinning, and serves again
//! once descriptors are free.

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

/// CPU time (user + system) of a process so far, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces): state is the
    // first; utime and stime are the 12th and 13th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn at_the_descriptor_limit_the_accept_loop_backs_off_and_recovers() {
    if Command::new("prlimit").arg("--version").output().is_err() {
        missing_dependency("prlimit (util-linux)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (broker, socket) = broker(dir.path(), "spare_vmms = 0\n");
    let pid = broker.pid();
    // Leave the broker a few descriptors beyond what it holds now.
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let limit = open + 8;
    let st = Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={limit}:{limit}"))
        .status()
        .unwrap();
    assert!(st.success());
    // Many idle connections: the broker runs out of descriptors; the rest
    // wait in the listen queue.
    let held: Vec<UnixStream> = (0..32)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    let log = broker.dir.join("broker.log");
    let end = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("out of descriptors")
    {
        assert!(Instant::now() < end, "no log line at the descriptor limit");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Not spinning: over a second at the limit the broker uses a small
    // part of a core (a spinning accept loop uses all of it).
    let before = cpu_ticks(pid);
    let window = Instant::now();
    while window.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    let used = cpu_ticks(pid) - before;
    assert!(
        used * 4 < hz,
        "{used} ticks of {hz} in a second at the limit"
    );
    // Descriptors come back: the broker serves again.
    drop(held);
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let out = list_as(None, &socket);
        if out.status.success() {
            break;
        }
        assert!(Instant::now() < end, "no recovery: {out:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
