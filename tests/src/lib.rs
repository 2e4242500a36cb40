//! Harness for end-to-end tests: starts a real `bubbled` process on a temp
//! data dir and connects to it as one or more parents.

// The test harness: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod awaits;
mod frozen;
pub mod moto;
pub mod nats;
pub mod payments;
mod procs;
pub mod spy;
pub mod triggers;

pub use frozen::{portion_call, shared_store, suspend_and_restore};
pub use procs::*;
use procs::{spare_socket_bound, vmm_procs_under};

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bubble_proto::v1 as pb;
use bubble_proto::v1::broker_client::BrokerClient;
use tonic::transport::Channel;

/// A gRPC client of the broker.
pub type Client = BrokerClient<Channel>;

/// A running `bubbled` process owned by a test.
pub struct BrokerProc {
    child: Option<Child>,
    /// Data directory.
    pub dir: PathBuf,
    /// Unix socket.
    pub socket: PathBuf,
    /// mTLS address, when started with TLS.
    pub tls: Option<SocketAddr>,
    /// Admin (metrics) address, when started with one.
    pub admin: Option<SocketAddr>,
}

/// How to start a test broker.
#[derive(Clone, Debug, Default)]
pub struct Opts {
    /// Also serve mutual TLS (a PKI with parent-a and parent-b is made).
    pub tls: bool,
    /// Serve /metrics on a loopback port.
    pub admin: bool,
    /// TOML configuration written to DATA_DIR/bubbled.toml.
    pub config: Option<String>,
    /// Extra command-line arguments.
    pub args: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// A program (and its arguments) that runs the broker, e.g. `setpriv`
    /// with what a service manager would restrict.
    pub wrapper: Vec<String>,
}

/// Path of a binary of this package, next to the test executable's
/// `deps/` directory (where cargo puts `CARGO_BIN_EXE_*`).
fn sibling_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir");
    let p = dir.join(name);
    assert!(p.exists(), "{} not built", p.display());
    p
}

/// Path of the broker binary built for the tests.
pub fn broker_bin() -> PathBuf {
    sibling_bin("bubbled-e2e")
}

/// Path of the CLI binary built for the tests.
pub fn ctl_bin() -> PathBuf {
    sibling_bin("bubblectl-e2e")
}

impl BrokerProc {
    /// Starts a broker on `dir` (allowing test images, small payload limit
    /// untouched) and waits until it serves.
    pub fn start(dir: &Path, tls: bool) -> Self {
        Self::start_with(
            dir,
            Opts {
                tls,
                ..Opts::default()
            },
        )
    }

    /// Starts a broker with options and waits until it serves. On a data
    /// dir whose broker was killed, it first waits until no process of
    /// that broker holds the registry any more (a VMM it was spawning
    /// holds the broker's descriptors until it executes).
    pub fn start_with(dir: &Path, opts: Opts) -> Self {
        wait_registry_unlocked(dir, Duration::from_secs(10));
        let tls = opts.tls;
        let socket = dir.join("bubbled.sock");
        let mut cmd = match opts.wrapper.split_first() {
            Some((prog, args)) => {
                let mut c = Command::new(prog);
                c.args(args).arg(broker_bin());
                c
            }
            None => Command::new(broker_bin()),
        };
        cmd.arg("--data-dir")
            .arg(dir)
            .arg("--allow-test-images")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join("broker.log"))
                    .expect("broker log"),
            ));
        if tls {
            let pki = dir.join("pki");
            if !pki.join("ca.pem").exists() {
                bubbled::pki::init(&pki, &["parent-a".into(), "parent-b".into()]).expect("pki");
            }
            cmd.arg("--tls-listen").arg("127.0.0.1:0");
        }
        if opts.admin {
            cmd.arg("--admin-listen").arg("127.0.0.1:0");
        }
        if let Some(toml) = &opts.config {
            let p = dir.join("bubbled.toml");
            std::fs::write(&p, toml).expect("write config");
            cmd.arg("--config").arg(p);
        }
        cmd.args(&opts.args);
        cmd.envs(opts.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let mut child = cmd.spawn().expect("spawn bubbled");
        let out = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(out)
            .read_line(&mut line)
            .expect("ready line");
        assert!(
            line.starts_with("bubbled ready"),
            "broker did not start: {line:?}; log:\n{}",
            std::fs::read_to_string(dir.join("broker.log")).unwrap_or_default()
        );
        let tls = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("tls="))
            .map(|a| a.parse().expect("tls addr"));
        let admin = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("admin="))
            .map(|a| a.parse().expect("admin addr"));
        Self {
            child: Some(child),
            dir: dir.to_path_buf(),
            socket,
            tls,
            admin,
        }
    }

    /// Connects over the Unix socket (parent `uid:<uid>`).
    pub async fn client(&self) -> Client {
        bubbled::client::connect_unix(&self.socket)
            .await
            .expect("connect unix")
    }

    /// Connects with mutual TLS as parent `name`.
    pub async fn tls_client(&self, name: &str) -> Client {
        let pki = self.dir.join("pki");
        let (cert, key) = bubbled::pki::parent_files(&pki, name);
        let url = format!("https://localhost:{}", self.tls.expect("tls").port());
        bubbled::client::connect_tls(&url, &pki.join("ca.pem"), &cert, &key)
            .await
            .expect("connect tls")
    }

    /// Pid of the broker process.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Sends SIGTERM and waits for the broker to exit; returns its status.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        // SAFETY: signalling our own child has no memory-safety effects.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        c.wait().ok()
    }

    /// Fetches `path` from the admin endpoint with a minimal HTTP/1.1 GET.
    pub fn admin_get(&self, path: &str) -> String {
        use std::io::{Read, Write};
        let mut s =
            std::net::TcpStream::connect(self.admin.expect("admin")).expect("connect admin");
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    /// Kills the broker with SIGKILL (its bubbles keep running).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for BrokerProc {
    fn drop(&mut self) {
        self.kill();
        kill_vmms_under(&self.dir);
    }
}

/// Waits until the registry of a broker on `dir`, if there is one, is not
/// locked by any process; fails the test after `limit`.
fn wait_registry_unlocked(dir: &Path, limit: Duration) {
    use std::os::fd::AsRawFd;
    let Ok(file) = std::fs::File::open(dir.join("registry.redb")) else {
        return;
    };
    let end = Instant::now() + limit;
    loop {
        // SAFETY: flock on a descriptor we own; the lock goes with `file`.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return;
        }
        assert!(
            Instant::now() < end,
            "the registry in {} stayed locked for {limit:?} after its broker ended",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A create request for a shim bubble.
pub fn create_req(memory_mib: u32) -> pb::CreateBubbleRequest {
    pb::CreateBubbleRequest {
        idle: None,
        policy: None,
        client_request_id: String::new(),
        memory_mib,
        vcpus: 1,
        image: String::new(),
    }
}

/// A suspend request, under the broker's key (`kek` empty) or a parent's.
pub fn suspend_req(id: &str, kek: &[u8]) -> pb::SuspendBubbleRequest {
    pb::SuspendBubbleRequest {
        bubble_id: id.to_string(),
        kek: kek.to_vec(),
    }
}

/// A restore request: of a bubble this broker knows (`generation` 0), or
/// an import of that generation from the shared store.
pub fn restore_req(id: &str, kek: &[u8], generation: u64) -> pb::RestoreBubbleRequest {
    pb::RestoreBubbleRequest {
        bubble_id: id.to_string(),
        kek: kek.to_vec(),
        generation,
    }
}

/// A call request.
pub fn call_req(id: &str, op: &str, input: &[u8]) -> pb::CallRequest {
    pb::CallRequest {
        bubble_id: id.to_string(),
        op: op.to_string(),
        input: input.to_vec(),
        deadline_ms: 0,
        ..Default::default()
    }
}

/// DescribeBubble of `id` (panics if the broker refuses).
pub async fn describe(c: &mut Client, id: &str) -> pb::Bubble {
    c.describe_bubble(pb::BubbleRef {
        bubble_id: id.to_string(),
    })
    .await
    .unwrap_or_else(|e| panic!("describe {id}: {e:?}"))
    .into_inner()
}

/// Name of a bubble state, for messages.
fn state_name(state: i32) -> String {
    pb::BubbleState::try_from(state)
        .map(|s| format!("{s:?}"))
        .unwrap_or_else(|_| format!("state {state}"))
}

/// Polls DescribeBubble until `pred` holds and returns that description;
/// after `timeout` the test fails, naming the bubble, the waiting call
/// site and the last state seen.
#[track_caller]
pub fn wait_for<'a>(
    c: &'a mut Client,
    id: &'a str,
    timeout: Duration,
    pred: impl Fn(&pb::Bubble) -> bool + 'a,
) -> impl std::future::Future<Output = pb::Bubble> + 'a {
    let caller = std::panic::Location::caller();
    async move {
        let end = Instant::now() + timeout;
        loop {
            let b = describe(c, id).await;
            if pred(&b) {
                return b;
            }
            assert!(
                Instant::now() < end,
                "bubble {id}: the state awaited at {caller} did not come within {timeout:?}; \
                 last seen {} (reason {:?}, generation {})",
                state_name(b.state),
                b.failure_reason,
                b.generation,
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Polls `probe` every 10 ms until `done` holds for what it returns, and
/// returns that; after `limit` the test fails, naming `what` it waited for
/// and the last value seen.
pub async fn wait_until<T: std::fmt::Debug>(
    what: &str,
    limit: Duration,
    mut probe: impl FnMut() -> T,
    done: impl Fn(&T) -> bool,
) -> T {
    let end = Instant::now() + limit;
    loop {
        let v = probe();
        if done(&v) {
            return v;
        }
        assert!(
            Instant::now() < end,
            "waited {limit:?} for {what}; last seen: {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `n` spare VMMs of a broker on `dir` are ready to be given a
/// bubble (each has bound its spare socket); fails the test after `limit`.
pub async fn wait_spares_ready(dir: &Path, n: usize, limit: Duration) {
    wait_until(
        &format!("{n} spare VMMs ready"),
        limit,
        || {
            vmm_procs_under(dir)
                .into_iter()
                .filter(|(_, cmd)| spare_socket_bound(cmd))
                .map(|(pid, _)| pid)
                .collect::<Vec<_>>()
        },
        |ready| ready.len() >= n,
    )
    .await;
}

/// Waits until VMM `pid` is the only one of a broker on `dir` (idle spares
/// aside): the others have exited; fails the test after `limit`.
pub async fn wait_only_vmm(dir: &Path, pid: u32, limit: Duration) {
    wait_until(
        &format!("VMM {pid} to be the only one left"),
        limit,
        || vmm_pids_under(dir),
        |pids| *pids == [pid as i32],
    )
    .await;
}

/// Waits until process `pid` is gone (or a zombie, which is dead but not
/// yet reaped by its parent); fails the test after `limit`.
pub async fn wait_pid_gone(pid: i32, limit: Duration) {
    wait_until(
        &format!("process {pid} to end"),
        limit,
        || {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with("State:"))
                        .map(str::to_owned)
                })
        },
        |state| state.as_ref().is_none_or(|s| s.contains('Z')),
    )
    .await;
}

/// A test's dependency `what` is missing: under `CI=true` that fails the
/// test (CI installs every dependency, so a gap there is a bug); elsewhere
/// (a developer's machine) the test says it did not run, and why, and the
/// caller returns.
pub fn missing_dependency(what: &str) {
    assert_ne!(
        std::env::var("CI").ok().as_deref(),
        Some("true"),
        "missing under CI=true: {what}"
    );
    eprintln!("NOT RUN (outside CI; under CI=true this fails): missing {what}");
}
