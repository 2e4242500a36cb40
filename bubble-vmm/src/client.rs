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

pub use crate::direct::GuestSpan;
use crate::direct::{write_pages, WriteError};
pub(crate) use crate::exit::ExitWatch;
pub use crate::exit::VmmExit;
pub use crate::spawn::{spawn, SpawnConfig, Spawner};
pub use crate::vmm_error::{CallError, VmmError};

/// How long a closed connection waits for its process's exit status.
const EXIT_GRACE: Duration = Duration::from_secs(1);

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
    Exited(VmmExit),
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
    /// How the process ended, once its connection closed.
    exit: Arc<std::sync::OnceLock<VmmExit>>,
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
        Self::handshake(stream, expected_bubble_id, 0, None).await
    }

    pub(crate) async fn handshake(
        stream: UnixStream,
        bubble_id: &str,
        pid: u32,
        exit_watch: Option<ExitWatch>,
    ) -> Result<Self, VmmError> {
        // Registered for read readiness only: the VMM consuming a request
        // must not wake the broker's thread (see bubble-uds).
        let (mut rd, wr) = bubble_uds::UnixConn::from_tokio(stream)
            .map_err(|e| VmmError::Protocol(format!("cannot register the VMM socket: {e}")))?
            .into_split();
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        let (events, _) = broadcast::channel(256);
        let (ready_tx, ready_rx) = watch::channel(Readiness::Booting);
        let exit = Arc::new(std::sync::OnceLock::new());
        {
            let (pending, events, exit) = (pending.clone(), events.clone(), exit.clone());
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
                // A process we spawned: say how it ended (a seccomp kill
                // above all) before waking anyone waiting on it.
                let cause = match exit_watch {
                    Some(mut rx) => tokio::time::timeout(EXIT_GRACE, rx.wait_for(Option::is_some))
                        .await
                        .ok()
                        .and_then(|r| r.ok().and_then(|v| v.clone())),
                    None => None,
                };
                let cause = cause.unwrap_or(VmmExit::Closed(reason));
                let _ = exit.set(cause.clone());
                let reason = cause.to_string();
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
                let _ = events.send(VmmEvent::Exited(cause));
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
            exit,
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
                return Err(self.closed());
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
            Ok(Err(_)) => Err(self.closed()),
            Err(_) => {
                if let Ok(mut p) = self.pending.lock() {
                    p.remove(&id);
                }
                Err(VmmError::Timeout(timeout))
            }
        }
    }

    /// The error for a connection that closed: how the process ended
    /// when known.
    fn closed(&self) -> VmmError {
        match self.exit.get() {
            Some(VmmExit::Closed(_)) | None => VmmError::Closed,
            Some(e) => VmmError::Exited(e.clone()),
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
        self.call_with(&crate::abi::Call::plain(op, input), deadline)
            .await
    }

    /// Sends a CALL with its flags (SIGN, SEAL) and waits for the answer.
    pub async fn call_with(
        &self,
        call: &crate::abi::Call<'_>,
        deadline: Duration,
    ) -> Result<Vec<u8>, CallError> {
        let ms = deadline.as_millis().clamp(1, u128::from(u32::MAX)) as u32;
        let body = control::encode_call(ms, call)
            .map_err(|e| CallError::BadRequest(format!("malformed CALL: {e}")))?;
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
