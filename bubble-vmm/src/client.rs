//! The broker's async client of a VMM process: spawn, (re)connect, calls,
//! events, shutdown.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot, watch};

use crate::control::{self, kind, CallErrKind, Frame, Status, COALESCE_MAX, HEAD_LEN};
pub use crate::images::{GuestImage, HostileKind};
use crate::priority;
use crate::process::VmmArgs;

/// How to start a VMM process.
#[derive(Clone, Debug)]
pub struct SpawnConfig {
    /// Bubble id.
    pub bubble_id: String,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// vCPUs (only 1).
    pub vcpus: u32,
    /// Guest image.
    pub image: GuestImage,
    /// Directory for the socket and log (created 0700).
    pub dir: PathBuf,
    /// Program to run.
    pub program: PathBuf,
    /// Arguments before the VMM's own (e.g. `["__vmm"]`).
    pub program_args_prefix: Vec<String>,
    /// Maximum call payload.
    pub max_payload: usize,
    /// Start in restore mode (see [`VmmClient::restore`]).
    pub restore: bool,
    /// How long the VMM polls for the next request before sleeping.
    pub poll: Duration,
}

/// Errors talking to a VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The process could not be started.
    #[error("cannot start the VMM process: {0}")]
    Spawn(String),
    /// The socket could not be reached.
    #[error("cannot reach the VMM at {path}: {detail}")]
    Connect {
        /// Socket path.
        path: String,
        /// Cause.
        detail: String,
    },
    /// The VMM runs another bubble or spoke out of protocol.
    #[error("VMM protocol: {0}")]
    Protocol(String),
    /// The VMM is gone.
    #[error("VMM connection closed")]
    Closed,
    /// Waiting timed out.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The bubble failed.
    #[error("{0}")]
    Failed(String),
    /// A snapshot to restore is malformed.
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// The VMM has no launch measurement to give (its text says why).
    #[error("no launch measurement: {0}")]
    NoMeasurement(String),
}

/// Errors of a call.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The guest refused the request (ABI error code, text); the bubble is
    /// fine. Codes: [`crate::abi::code`].
    #[error("{1} (code {0})")]
    Guest(u16, String),
    /// The request could not be delivered (too large for the mailbox).
    #[error("{0}")]
    BadRequest(String),
    /// The guest overran the deadline; the VMM stopped it.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The bubble died.
    #[error("{0}")]
    Failed(String),
}

/// Something the VMM reported on its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmmEvent {
    /// The guest is READY.
    Ready {
        /// Boot time, µs.
        boot_us: u64,
    },
    /// A guest log line.
    Log(String),
    /// The bubble failed.
    Failed(String),
    /// The connection (and usually the process) ended.
    Exited(String),
}

/// Readiness as seen by the client.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Readiness {
    Booting,
    Ready(u64),
    Failed(String),
}

/// Boot information once READY.
#[derive(Clone, Copy, Debug)]
pub struct ReadyInfo {
    /// Boot time (VM creation to READY), µs.
    pub boot_us: u64,
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Frame>>>>;

/// A connection to one VMM process.
pub struct VmmClient {
    writer: tokio::sync::Mutex<bubble_uds::WriteHalf>,
    /// The socket, for answer polling without taking `writer`.
    poll_handle: bubble_uds::PollHandle,
    /// How long the last request waited for its answer, µs.
    last_answer_us: AtomicU64,
    pending: Pending,
    next_id: AtomicU64,
    events: broadcast::Sender<VmmEvent>,
    readiness: watch::Receiver<Readiness>,
    pid: u32,
}

/// How long a request waits for its VMM's answer by polling before its
/// thread sleeps, µs (0: never poll). Process-wide: see [`set_answer_poll`].
static ANSWER_POLL_US: AtomicU64 = AtomicU64::new(0);

/// Requests awaiting a VMM's answer, over all VMMs of this process.
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Sets how long a small call polls for its VMM's answer before
/// its thread sleeps (zero: never). Waking a sleeping thread costs tens of
/// µs on nested hosts, about as much as the guest exit the call waits for.
/// A request polls only when it is the only one in flight in this process
/// (a busy broker never spends a thread on it) and its VMM answered the
/// previous request within the budget (a slow bubble is not polled for).
pub fn set_answer_poll(budget: Duration) {
    ANSWER_POLL_US.store(budget.as_micros() as u64, Ordering::Relaxed);
}

/// Counts a request in flight until dropped.
struct InFlight(usize);

impl InFlight {
    fn enter() -> Self {
        InFlight(IN_FLIGHT.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// No other request was in flight when this one started.
    fn alone(&self) -> bool {
        self.0 == 1
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Path of the control socket in a bubble directory.
pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join("vmm.sock")
}

/// A spare VMM process waiting for its bubble.
struct Spare {
    stream: UnixStream,
    pid: u32,
}

/// Starts VMM processes, keeping a few spares started ahead of need so that
/// creating a bubble does not wait for a process to exec. A spare creates
/// its VM only when it is given a bubble, so every VM is still created cold
/// and every bubble still has a process of its own.
pub struct Spawner {
    program: PathBuf,
    prefix: Vec<String>,
    dir: PathBuf,
    want: usize,
    spares: Mutex<Vec<Spare>>,
    refilling: std::sync::atomic::AtomicBool,
    /// Whether this process may raise priorities again (root, CAP_SYS_NICE
    /// or a generous RLIMIT_NICE): then spares start at low priority.
    low_start: bool,
}

impl Spawner {
    /// A spawner keeping `want` spares (0: none) with sockets in `dir`.
    pub fn new(program: PathBuf, prefix: Vec<String>, dir: PathBuf, want: usize) -> Arc<Self> {
        let _ = std::fs::remove_dir_all(&dir);
        // Made before any VMM process starts, so that all inherit it.
        let _ = crate::images::shared_shim_fd();
        Arc::new(Self {
            program,
            prefix,
            dir,
            want,
            spares: Mutex::new(Vec::new()),
            refilling: std::sync::atomic::AtomicBool::new(false),
            low_start: want > 0 && priority::can_raise(),
        })
    }

    /// Spares ready now, and how many are wanted.
    pub fn spares(&self) -> (usize, usize) {
        (self.spares.lock().map(|s| s.len()).unwrap_or(0), self.want)
    }

    /// Tops the spares up in the background.
    pub fn refill(self: &Arc<Self>) {
        if self.want == 0 || self.refilling.swap(true, Ordering::SeqCst) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let have = me.spares.lock().map(|s| s.len()).unwrap_or(me.want);
                if have >= me.want {
                    break;
                }
                match me.start_spare().await {
                    Ok(sp) => {
                        if let Ok(mut s) = me.spares.lock() {
                            s.push(sp);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot start a spare VMM");
                        break;
                    }
                }
            }
            me.refilling.store(false, Ordering::SeqCst);
        });
    }

    async fn start_spare(&self) -> Result<Spare, VmmError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|e| VmmError::Spawn(format!("{}: {e}", self.dir.display())))?;
        let name = format!(
            "spare-{}",
            std::process::id() as u64 * 1_000_000 + NEXT_SPARE.fetch_add(1, Ordering::Relaxed)
        );
        let sock = self.dir.join(format!("{name}.sock"));
        let log = std::fs::File::create(self.dir.join(format!("{name}.log")))
            .map_err(|e| VmmError::Spawn(e.to_string()))?;
        let log2 = log
            .try_clone()
            .map_err(|e| VmmError::Spawn(e.to_string()))?;
        let mut cmd = tokio::process::Command::new(&self.program);
        cmd.args(&self.prefix)
            .arg("--spare")
            .arg("--socket")
            .arg(&sock)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(false)
            .process_group(0);
        // A child starts with the nice value of the thread that spawns it:
        // spawned from a blocking thread at low priority, the spare's whole
        // start-up (exec, dynamic loading, preparation) yields to bubbles
        // booting meanwhile; it gets normal priority back when it is given
        // its bubble.
        let low = self.low_start;
        let child = tokio::task::spawn_blocking(move || {
            if low {
                priority::set_nice(0, priority::BACKGROUND_NICE);
            }
            let child = cmd.spawn();
            if low {
                priority::set_nice(0, 0);
            }
            child
        })
        .await
        .map_err(|e| VmmError::Spawn(e.to_string()))?
        .map_err(|e| VmmError::Spawn(e.to_string()))?;
        let (stream, pid) =
            connect_child(child, &sock, &self.dir.join(format!("{name}.log"))).await?;
        Ok(Spare { stream, pid })
    }

    /// Starts a VMM for `cfg`: a spare if one is ready, else a new process.
    pub async fn spawn(self: &Arc<Self>, cfg: &SpawnConfig) -> Result<VmmClient, VmmError> {
        let spare = self.spares.lock().ok().and_then(|mut s| s.pop());
        self.refill();
        let Some(mut sp) = spare else {
            return spawn(cfg).await;
        };
        prepare_dir(cfg)?;
        let args = VmmArgs {
            bubble_id: cfg.bubble_id.clone(),
            memory_mib: cfg.memory_mib,
            image: cfg.image.clone(),
            socket: socket_path(&cfg.dir),
            max_payload: cfg.max_payload,
            boot_timeout: Duration::from_secs(20),
            restore: cfg.restore,
            image_fd: image_fd_for(&cfg.image),
            poll: cfg.poll,
        };
        if self.low_start {
            priority::set_process_nice(Some(sp.pid), 0);
        }
        let body = args.to_args().join("\0").into_bytes();
        let frame = Frame {
            kind: kind::CONFIGURE,
            id: 0,
            body,
        };
        if sp.stream.write_all(&frame.encode()).await.is_err() {
            // The spare died: start one the slow way.
            return spawn(cfg).await;
        }
        VmmClient::handshake(sp.stream, &cfg.bubble_id, sp.pid).await
    }
}

static NEXT_SPARE: AtomicU64 = AtomicU64::new(0);

/// The shared shim descriptor for a VMM that boots the shim.
fn image_fd_for(image: &GuestImage) -> Option<i32> {
    match image {
        GuestImage::Shim => crate::images::shared_shim_fd(),
        _ => None,
    }
}

/// Where a restoring VMM keeps guest memory (in its address space).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestSpan {
    /// Host address of guest-physical 0.
    pub host: u64,
    /// Bytes.
    pub len: u64,
}

/// Why pages could not be written into a VMM directly.
enum WriteError {
    /// The snapshot is malformed.
    Snapshot(String),
    /// The kernel refused (or wrote short); the caller streams instead.
    Refused(std::io::Error),
}

/// Pages written by one `process_vm_writev` call at most.
const PAGES_PER_WRITEV: usize = 512;

/// Writes a snapshot's pages into the guest memory of VMM `pid` (at
/// `span`); returns the encoded vCPU state. Every address is checked
/// against the snapshot's memory size and the span first.
fn write_pages(pid: u32, span: GuestSpan, snapshot: &[&[u8]]) -> Result<Vec<u8>, WriteError> {
    let (state, pages) =
        crate::snapshot::split_pages(snapshot).map_err(|e| WriteError::Snapshot(e.to_string()))?;
    let page = crate::layout::PAGE;
    for chunk in pages.chunks(PAGES_PER_WRITEV) {
        let mut local = Vec::with_capacity(chunk.len());
        let mut remote = Vec::with_capacity(chunk.len());
        for (gpa, data) in chunk {
            if gpa.checked_add(page).is_none_or(|e| e > span.len) || data.len() as u64 != page {
                return Err(WriteError::Snapshot("page outside guest memory".into()));
            }
            local.push(libc::iovec {
                iov_base: data.as_ptr() as *mut libc::c_void,
                iov_len: data.len(),
            });
            remote.push(libc::iovec {
                iov_base: (span.host + gpa) as *mut libc::c_void,
                iov_len: page as usize,
            });
        }
        let want = chunk.len() * page as usize;
        // SAFETY: `local` points at live page buffers owned by `pages`;
        // `remote` names addresses in the VMM's guest memory mapping (each
        // page checked to lie within its length). The kernel checks that
        // we may write the other process's memory.
        let n = unsafe {
            libc::process_vm_writev(
                pid as libc::pid_t,
                local.as_ptr(),
                local.len() as libc::c_ulong,
                remote.as_ptr(),
                remote.len() as libc::c_ulong,
                0,
            )
        };
        if n < 0 {
            return Err(WriteError::Refused(std::io::Error::last_os_error()));
        }
        if n as usize != want {
            return Err(WriteError::Refused(std::io::Error::other("short write")));
        }
    }
    Ok(state)
}

/// The answer to RESTORE or RESTORE_STATE: the VMM's rebuild time.
fn restore_answer(f: Frame) -> Result<Duration, VmmError> {
    match f.kind {
        kind::RESTORE_OK => Ok(Duration::from_micros(
            f.body
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
                .unwrap_or(0),
        )),
        _ => Err(VmmError::Protocol(
            String::from_utf8_lossy(&f.body).into_owned(),
        )),
    }
}

/// How long a request whose sending failed waits for the VMM's reason.
const REFUSAL_GRACE: Duration = Duration::from_millis(500);

fn prepare_dir(cfg: &SpawnConfig) -> Result<(), VmmError> {
    use std::os::unix::fs::DirBuilderExt;
    if cfg.vcpus != 1 {
        return Err(VmmError::Spawn("only 1 vCPU is supported".into()));
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&cfg.dir)
        .map_err(|e| VmmError::Spawn(format!("{}: {e}", cfg.dir.display())))?;
    let _ = std::fs::remove_file(socket_path(&cfg.dir));
    Ok(())
}

/// Waits for a freshly spawned VMM's socket and connects; reaps the child
/// in the background.
async fn connect_child(
    mut child: tokio::process::Child,
    sock: &Path,
    log_path: &Path,
) -> Result<(UnixStream, u32), VmmError> {
    let pid = child.id().unwrap_or(0);
    let start = std::time::Instant::now();
    // Poll quickly at first (a VMM binds its socket within a few ms), then
    // back off: a spare starting at low priority may take much longer, and
    // polling every 50 µs meanwhile keeps waking a broker thread.
    let mut pause = Duration::from_micros(50);
    let stream = loop {
        match UnixStream::connect(sock).await {
            Ok(s) => break s,
            Err(e) => {
                if let Ok(Some(st)) = child.try_wait() {
                    let tail = std::fs::read_to_string(log_path).unwrap_or_default();
                    return Err(VmmError::Spawn(format!(
                        "VMM exited ({st}) before listening: {}",
                        tail.lines().last().unwrap_or("")
                    )));
                }
                if start.elapsed() > Duration::from_secs(10) {
                    let _ = child.start_kill();
                    return Err(VmmError::Connect {
                        path: sock.display().to_string(),
                        detail: e.to_string(),
                    });
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(5));
            }
        }
    };
    // Reap the child when it exits (it stays our child while we live).
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    Ok((stream, pid))
}

/// Spawns a VMM process and connects to it (READY comes later: see
/// [`VmmClient::wait_ready`]).
pub async fn spawn(cfg: &SpawnConfig) -> Result<VmmClient, VmmError> {
    prepare_dir(cfg)?;
    let sock = socket_path(&cfg.dir);
    let log_path = cfg.dir.join("vmm.log");
    let log = std::fs::File::create(&log_path)
        .map_err(|e| VmmError::Spawn(format!("{}: {e}", log_path.display())))?;
    let log2 = log
        .try_clone()
        .map_err(|e| VmmError::Spawn(e.to_string()))?;
    let args = VmmArgs {
        bubble_id: cfg.bubble_id.clone(),
        memory_mib: cfg.memory_mib,
        image: cfg.image.clone(),
        socket: sock.clone(),
        max_payload: cfg.max_payload,
        boot_timeout: Duration::from_secs(20),
        restore: cfg.restore,
        image_fd: image_fd_for(&cfg.image),
        poll: cfg.poll,
    };
    let mut cmd = tokio::process::Command::new(&cfg.program);
    cmd.args(&cfg.program_args_prefix)
        .args(args.to_args())
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log2)
        .kill_on_drop(false);
    // Its own process group: signals to the broker's group (Ctrl-C, a
    // service manager stopping the broker) do not reach the bubble, which
    // survives a broker restart. Unlike setsid in a pre_exec hook this
    // keeps the fast posix_spawn path.
    cmd.process_group(0);
    let child = cmd.spawn().map_err(|e| VmmError::Spawn(e.to_string()))?;
    let (stream, pid) = connect_child(child, &sock, &log_path).await?;
    VmmClient::handshake(stream, &cfg.bubble_id, pid).await
}

impl VmmClient {
    /// Connects to a running VMM (after a broker restart) and checks that it
    /// runs `expected_bubble_id`.
    pub async fn connect(socket: &Path, expected_bubble_id: &str) -> Result<Self, VmmError> {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|e| VmmError::Connect {
                path: socket.display().to_string(),
                detail: e.to_string(),
            })?;
        Self::handshake(stream, expected_bubble_id, 0).await
    }

    async fn handshake(stream: UnixStream, bubble_id: &str, pid: u32) -> Result<Self, VmmError> {
        // Registered for read readiness only: the VMM consuming a request
        // must not wake the broker's thread (see bubble-uds).
        let (mut rd, wr) = bubble_uds::UnixConn::from_tokio(stream)
            .map_err(|e| VmmError::Protocol(format!("cannot register the VMM socket: {e}")))?
            .into_split();
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        let (events, _) = broadcast::channel(256);
        let (ready_tx, ready_rx) = watch::channel(Readiness::Booting);
        {
            let (pending, events) = (pending.clone(), events.clone());
            tokio::spawn(async move {
                let reason = loop {
                    let mut h = [0u8; HEAD_LEN];
                    if rd.read_exact(&mut h).await.is_err() {
                        break "VMM connection closed".to_string();
                    }
                    let (kind, id, n) = match Frame::parse_head(&h) {
                        Ok(x) => x,
                        Err(e) => break format!("VMM sent a bad frame: {e}"),
                    };
                    // The body is read once, into its own buffer.
                    let mut body = vec![0u8; n];
                    if rd.read_exact(&mut body).await.is_err() {
                        break "VMM connection closed".to_string();
                    }
                    let f = Frame { kind, id, body };
                    match f.kind {
                        kind::EV_READY => {
                            let us = f
                                .body
                                .get(..8)
                                .and_then(|b| b.try_into().ok())
                                .map(u64::from_le_bytes)
                                .unwrap_or(0);
                            let _ = ready_tx.send(Readiness::Ready(us));
                            let _ = events.send(VmmEvent::Ready { boot_us: us });
                        }
                        kind::EV_LOG => {
                            let _ =
                                events.send(VmmEvent::Log(String::from_utf8_lossy(&f.body).into()));
                        }
                        kind::EV_FAILED => {
                            let r = String::from_utf8_lossy(&f.body).into_owned();
                            let _ = ready_tx.send(Readiness::Failed(r.clone()));
                            let _ = events.send(VmmEvent::Failed(r));
                        }
                        _ => {
                            if f.kind == kind::STATUS_OK {
                                if let Some(st) = Status::decode(&f.body) {
                                    if let Some(r) = st.failed {
                                        let _ = ready_tx.send(Readiness::Failed(r));
                                    } else if st.ready {
                                        ready_tx.send_if_modified(|v| {
                                            if *v == Readiness::Booting {
                                                *v = Readiness::Ready(st.boot_us);
                                                true
                                            } else {
                                                false
                                            }
                                        });
                                    }
                                }
                            }
                            let tx = pending.lock().ok().and_then(|mut p| p.remove(&f.id));
                            if let Some(tx) = tx {
                                let _ = tx.send(f);
                            }
                        }
                    }
                };
                if let Ok(mut p) = pending.lock() {
                    p.clear();
                }
                ready_tx.send_if_modified(|v| {
                    if *v == Readiness::Booting {
                        *v = Readiness::Failed(reason.clone());
                        true
                    } else {
                        false
                    }
                });
                let _ = events.send(VmmEvent::Exited(reason));
            });
        }
        let mut c = VmmClient {
            poll_handle: wr.poll_handle(),
            last_answer_us: AtomicU64::new(0),
            writer: tokio::sync::Mutex::new(wr),
            pending,
            next_id: AtomicU64::new(1),
            events,
            readiness: ready_rx,
            pid,
        };
        let f = c
            .request(
                kind::HELLO,
                bubble_id.as_bytes().to_vec(),
                Duration::from_secs(5),
            )
            .await?;
        if f.kind != kind::STATUS_OK {
            return Err(VmmError::Protocol(
                String::from_utf8_lossy(&f.body).into_owned(),
            ));
        }
        let st = Status::decode(&f.body).ok_or_else(|| VmmError::Protocol("bad status".into()))?;
        if st.bubble_id != bubble_id {
            return Err(VmmError::Protocol("VMM runs another bubble".into()));
        }
        if c.pid == 0 {
            c.pid = st.pid;
        }
        Ok(c)
    }

    async fn request(&self, k: u8, body: Vec<u8>, timeout: Duration) -> Result<Frame, VmmError> {
        self.request_parts(k, &[&body], timeout).await
    }

    /// A request whose body is the concatenation of `parts` (sent as they
    /// are, without first joining them).
    async fn request_parts(
        &self,
        k: u8,
        parts: &[&[u8]],
        timeout: Duration,
    ) -> Result<Frame, VmmError> {
        let in_flight = InFlight::enter();
        let sent_at = Instant::now();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if let Ok(mut p) = self.pending.lock() {
            p.insert(id, tx);
        }
        let body_len: usize = parts.iter().map(|p| p.len()).sum();
        let head = Frame::head(k, id, body_len);
        let small = (body_len <= COALESCE_MAX).then(|| {
            let mut v = Vec::with_capacity(HEAD_LEN + body_len);
            v.extend_from_slice(&head);
            for p in parts {
                v.extend_from_slice(p);
            }
            v
        });
        {
            let mut w = self.writer.lock().await;
            let sent = match &small {
                Some(bytes) => w.write_all(bytes).await,
                None => {
                    let mut r = w.write_all(&head).await;
                    for p in parts {
                        if r.is_ok() {
                            r = w.write_all(p).await;
                        }
                    }
                    r
                }
            };
            if sent.is_err() {
                drop(w);
                // The VMM may have refused the request part-way (e.g. a
                // snapshot it cannot restore) and said why: prefer that.
                if let Ok(Ok(f)) = tokio::time::timeout(REFUSAL_GRACE, rx).await {
                    return Ok(f);
                }
                if let Ok(mut p) = self.pending.lock() {
                    p.remove(&id);
                }
                return Err(VmmError::Closed);
            }
        }
        let spin = ANSWER_POLL_US.load(Ordering::Relaxed);
        if k == kind::CALL
            && small.is_some()
            && spin > 0
            && in_flight.alone()
            && self.last_answer_us.load(Ordering::Relaxed) <= spin
        {
            bubble_uds::spin_readable(&self.poll_handle, Duration::from_micros(spin));
        }
        let answer = tokio::time::timeout(timeout, rx).await;
        self.last_answer_us
            .store(sent_at.elapsed().as_micros() as u64, Ordering::Relaxed);
        match answer {
            Ok(Ok(f)) => Ok(f),
            Ok(Err(_)) => Err(VmmError::Closed),
            Err(_) => {
                if let Ok(mut p) = self.pending.lock() {
                    p.remove(&id);
                }
                Err(VmmError::Timeout(timeout))
            }
        }
    }

    /// Pid of the VMM process.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Subscribes to the VMM's events.
    pub fn events(&self) -> broadcast::Receiver<VmmEvent> {
        self.events.subscribe()
    }

    /// The VMM's status.
    pub async fn status(&self) -> Result<Status, VmmError> {
        let f = self
            .request(kind::STATUS, Vec::new(), Duration::from_secs(5))
            .await?;
        Status::decode(&f.body).ok_or_else(|| VmmError::Protocol("bad status".into()))
    }

    /// The bubble's SNP launch digest as its VMM computed it while loading
    /// the guest (or, for a restored bubble, as its snapshot carried it).
    pub async fn launch_measurement(&self) -> Result<control::LaunchMeasurement, VmmError> {
        let f = self
            .request(kind::MEASUREMENT, Vec::new(), Duration::from_secs(5))
            .await?;
        match f.kind {
            kind::MEASUREMENT_OK => control::LaunchMeasurement::decode(&f.body)
                .map_err(|e| VmmError::Protocol(e.to_string())),
            _ => Err(VmmError::NoMeasurement(
                String::from_utf8_lossy(&f.body).into_owned(),
            )),
        }
    }

    /// Waits until the guest is READY.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<ReadyInfo, VmmError> {
        let mut rx = self.readiness.clone();
        let r = tokio::time::timeout(timeout, rx.wait_for(|r| *r != Readiness::Booting)).await;
        match r {
            Ok(Ok(v)) => match &*v {
                Readiness::Ready(us) => Ok(ReadyInfo { boot_us: *us }),
                Readiness::Failed(reason) => Err(VmmError::Failed(reason.clone())),
                Readiness::Booting => Err(VmmError::Closed),
            },
            Ok(Err(_)) => Err(VmmError::Closed),
            Err(_) => Err(VmmError::Timeout(timeout)),
        }
    }

    /// Calls `op` in the guest; the VMM stops the guest if it overruns
    /// `deadline`.
    pub async fn call(
        &self,
        op: &str,
        input: &[u8],
        deadline: Duration,
    ) -> Result<Vec<u8>, CallError> {
        let ms = deadline.as_millis().clamp(1, u128::from(u32::MAX)) as u32;
        let body = control::encode_call(ms, op, input);
        // The VMM enforces the deadline; allow it time to report.
        let f = self
            .request(kind::CALL, body, deadline + Duration::from_secs(5))
            .await
            .map_err(|e| CallError::Failed(format!("VMM did not answer: {e}")))?;
        match f.kind {
            kind::CALL_OK => Ok(f.body),
            kind::CALL_ERR => {
                let text =
                    String::from_utf8_lossy(f.body.get(1..).unwrap_or_default()).into_owned();
                match f.body.first().copied().and_then(CallErrKind::from_u8) {
                    Some(CallErrKind::Rejected) => {
                        let b = f.body.get(1..).unwrap_or_default();
                        let code = b
                            .get(..2)
                            .map(|c| u16::from_le_bytes([c[0], c[1]]))
                            .unwrap_or(0);
                        let text =
                            String::from_utf8_lossy(b.get(2..).unwrap_or_default()).into_owned();
                        Err(CallError::Guest(code, text))
                    }
                    Some(CallErrKind::BadRequest) => Err(CallError::BadRequest(text)),
                    Some(CallErrKind::Deadline) => Err(CallError::DeadlineExceeded(text)),
                    _ => Err(CallError::Failed(text)),
                }
            }
            _ => Err(CallError::Failed(
                String::from_utf8_lossy(&f.body).into_owned(),
            )),
        }
    }

    /// Captures the VM at a safe point (between calls): vCPU state and every
    /// non-zero page. The VMM keeps running until [`VmmClient::shutdown`].
    pub async fn suspend(&self, timeout: Duration) -> Result<Vec<u8>, VmmError> {
        let f = self.request(kind::SUSPEND, Vec::new(), timeout).await?;
        match f.kind {
            kind::SNAPSHOT => Ok(f.body),
            _ => Err(VmmError::Protocol(
                String::from_utf8_lossy(&f.body).into_owned(),
            )),
        }
    }

    /// Asks a VMM in restore mode to fault in these page runs (guest
    /// address, pages) ahead of its snapshot; only zeroes are written.
    /// Returns where guest memory lies in the VMM (host address, length),
    /// for [`VmmClient::restore`] to write pages into directly.
    pub async fn prefault(
        &self,
        runs: &[(u64, u64)],
        timeout: Duration,
    ) -> Result<Option<GuestSpan>, VmmError> {
        let f = self
            .request(kind::PREFAULT, crate::snapshot::encode_runs(runs), timeout)
            .await?;
        let word = |i: usize| -> Option<u64> {
            Some(u64::from_le_bytes(f.body.get(i..i + 8)?.try_into().ok()?))
        };
        match f.kind {
            kind::PREFAULT_OK => Ok(word(0)
                .zip(word(8))
                .map(|(host, len)| GuestSpan { host, len })),
            _ => Err(VmmError::Protocol(
                String::from_utf8_lossy(&f.body).into_owned(),
            )),
        }
    }

    /// Sends the snapshot (the concatenation of `snapshot`'s parts) to a
    /// VMM started in restore mode; the guest is READY when this returns.
    /// Returns the time the VMM spent rebuilding the VM.
    ///
    /// With `direct` (from [`VmmClient::prefault`]) the pages are written
    /// straight into the VMM's guest memory with `process_vm_writev` (one
    /// copy, no socket) and only the vCPU state is sent; where the kernel
    /// refuses that (e.g. ptrace restrictions), the snapshot is streamed.
    pub async fn restore(
        &self,
        snapshot: &[&[u8]],
        direct: Option<GuestSpan>,
        timeout: Duration,
    ) -> Result<Duration, VmmError> {
        if let Some(span) = direct {
            let written = match tokio::runtime::Handle::current().runtime_flavor() {
                tokio::runtime::RuntimeFlavor::MultiThread => {
                    tokio::task::block_in_place(|| write_pages(self.pid, span, snapshot))
                }
                _ => write_pages(self.pid, span, snapshot),
            };
            match written {
                Ok(state) => {
                    let f = self.request(kind::RESTORE_STATE, state, timeout).await?;
                    return restore_answer(f);
                }
                Err(WriteError::Snapshot(e)) => return Err(VmmError::Snapshot(e)),
                // Not allowed here: stream it instead.
                Err(WriteError::Refused(e)) => {
                    tracing::info!(error = %e, "writing guest pages directly refused; streaming the snapshot");
                }
            }
        }
        let f = self.request_parts(kind::RESTORE, snapshot, timeout).await?;
        restore_answer(f)
    }

    /// Stops the VMM: a SHUTDOWN request, then SIGKILL after `grace`.
    pub async fn shutdown(&self, grace: Duration) {
        match self.request(kind::SHUTDOWN, Vec::new(), grace).await {
            // It acknowledged and exits by itself.
            Ok(f) if f.kind == kind::SHUTDOWN_OK => {}
            _ => self.kill(),
        }
    }

    /// Kills the VMM process (if it still runs).
    pub fn kill(&self) {
        if self.pid > 0 {
            // SAFETY: signalling a pid has no memory-safety effects. The pid
            // is the VMM's; after a clean shutdown it may be gone (ESRCH).
            unsafe {
                libc::kill(self.pid as i32, libc::SIGKILL);
            }
        }
    }
}
