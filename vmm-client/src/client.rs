//! The broker's async client of a VMM process: spawn, (re)connect, calls,
//! events, shutdown.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use bubble_vmm::control::{
    Call, CallErr, DecodeError, FailureReason, Kind, LaunchMeasurement, Reply, Request, Status,
    COALESCE_MAX, HEAD_LEN, SNAPSHOT_PIECE,
};

use crate::exit::{ExitWatch, VmmExit};
use crate::inflight::InFlight;
use crate::vmm_error::{CallError, VmmError};

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
    Failed(FailureReason),
    /// The connection (and usually the process) ended.
    Exited(VmmExit),
}

/// Readiness as seen by the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Readiness {
    Booting,
    Ready(u64),
    Failed(FailureReason),
}

/// Boot information once READY.
#[derive(Clone, Copy, Debug)]
pub struct ReadyInfo {
    /// Boot time (VM creation to READY), µs.
    pub boot_us: u64,
}

/// Whether a new client checks its VMM with a HELLO round trip.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Hello {
    /// HELLO: the VMM must say it runs the expected bubble (answered once
    /// its guest has started). Always for re-adoption.
    Check,
    /// None: a spare the broker connected to (peer uid checked) and just
    /// configured with the bubble.
    Skip,
}

/// A reply as it came: decoded, or why it did not decode.
pub(crate) type Answer = Result<Reply, DecodeError>;

/// Who waits for the answers to a request.
pub(crate) enum Waiter {
    /// One answer.
    One(oneshot::Sender<Answer>),
    /// A stream of `SNAPSHOT` pieces ending with any other answer; the
    /// channel is bounded, so a slow receiver slows the VMM down.
    Stream(mpsc::Sender<Answer>),
}

pub(crate) type Pending = Arc<Mutex<HashMap<u64, Waiter>>>;

/// A connection to one VMM process.
pub struct VmmClient {
    pub(crate) writer: tokio::sync::Mutex<bubble_uds::WriteHalf>,
    /// The socket, for answer polling without taking `writer`.
    poll_handle: bubble_uds::PollHandle,
    /// How long the last request waited for its answer, µs.
    last_answer_us: AtomicU64,
    pub(crate) pending: Pending,
    pub(crate) next_id: AtomicU64,
    events: broadcast::Sender<VmmEvent>,
    readiness: watch::Receiver<Readiness>,
    pub(crate) pid: u32,
    /// The VMM process, held by a pidfd (guest memory writes go only
    /// there).
    pub(crate) proc: crate::ProcHandle,
    /// How the process ended, once its connection closed.
    exit: Arc<std::sync::OnceLock<VmmExit>>,
    /// A SUSPEND is in flight: only then may the VMM send a snapshot.
    pub(crate) suspending: Arc<AtomicBool>,
    /// What of the jail could not be set up (e.g. its cgroup).
    pub(crate) jail_warning: Option<String>,
    /// The bubble cgroups a VMM this broker spawned runs in (`None` for a
    /// re-adopted one).
    pub(crate) cgroups: Option<crate::exit::MemcgSlot>,
    /// When the guest's start-up must be over (its VMM's boot deadline),
    /// for a VMM this client spawned: READY comes at the guest's
    /// READY_EARLY, and calls made before the rest of its start-up is
    /// over wait for it in the VMM (docs/guest-abi.md, "Start-up").
    pub(crate) started_by: Option<Instant>,
    /// When its steps toward the bubble happened (see [`SpawnSteps`]).
    pub(crate) steps: SpawnSteps,
    /// When READY was read from the socket.
    ready_at: Arc<std::sync::OnceLock<Instant>>,
}

/// When a VMM's start passed its steps (for the create path's debug
/// breakdown; see docs/performance.md). All `None` for a re-connected VMM.
#[derive(Clone, Copy, Debug, Default)]
pub struct SpawnSteps {
    /// A spare was taken (`None`: a fresh process was started).
    pub taken: Option<Instant>,
    /// The spare's socket and log were in the bubble's directory.
    pub dir: Option<Instant>,
    /// The bubble's cgroups were ready.
    pub cgroup: Option<Instant>,
    /// CONFIGURE (spare) or the process spawn (fresh) was done.
    pub sent: Option<Instant>,
}

/// How long a request waits for its VMM's answer by polling before its
/// thread sleeps, µs (0: never poll). Process-wide: see [`set_answer_poll`].
static ANSWER_POLL_US: AtomicU64 = AtomicU64::new(0);

/// Sets how long a small call polls for its VMM's answer before
/// its thread sleeps (zero: never). Waking a sleeping thread costs tens of
/// µs on nested hosts, about as much as the guest exit the call waits for.
/// A request polls only when it is the only one in flight in this process
/// (a busy broker never spends a thread on it) and its VMM answered the
/// previous request within the budget (a slow bubble is not polled for).
pub fn set_answer_poll(budget: Duration) {
    ANSWER_POLL_US.store(budget.as_micros() as u64, Ordering::Relaxed);
}

/// Path of the control socket in a bubble directory.
pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join("vmm.sock")
}

/// The error for a reply that is not the one expected.
pub(crate) fn unexpected(r: Reply) -> VmmError {
    match r {
        Reply::Error { code, text } => VmmError::Refused { code, text },
        other => VmmError::Protocol(format!("unexpected {:?} reply", other.kind())),
    }
}

/// How long a request whose sending failed waits for the VMM's reason.
const REFUSAL_GRACE: Duration = Duration::from_millis(500);

impl VmmClient {
    /// Connects to a running VMM (after a broker restart) and checks that it
    /// runs `expected_bubble_id` as a uid `accept_uid` accepts (the socket
    /// peer's, as the kernel says).
    pub async fn connect(
        socket: &Path,
        expected_bubble_id: &str,
        accept_uid: impl Fn(u32) -> bool,
    ) -> Result<Self, VmmError> {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|e| VmmError::Connect {
                path: socket.display().to_string(),
                detail: e.to_string(),
            })?;
        // The pid this client may signal is the socket peer's, as the
        // kernel says, never what the VMM claims in its STATUS answer.
        let cred = stream.peer_cred().map_err(|e| VmmError::Connect {
            path: socket.display().to_string(),
            detail: format!("no peer credentials: {e}"),
        })?;
        if !accept_uid(cred.uid()) {
            return Err(VmmError::PeerUid {
                got: cred.uid(),
                // SAFETY: getuid has no preconditions.
                want: unsafe { libc::getuid() },
            });
        }
        let pid = cred.pid().and_then(|p| u32::try_from(p).ok()).unwrap_or(0);
        Self::handshake(stream, expected_bubble_id, pid, None, Hello::Check).await
    }

    pub(crate) async fn handshake(
        stream: UnixStream,
        bubble_id: &str,
        pid: u32,
        exit_watch: Option<ExitWatch>,
        hello: Hello,
    ) -> Result<Self, VmmError> {
        let proc = crate::ProcHandle::of_peer(&stream, pid);
        // Registered for read readiness only: the VMM consuming a request
        // must not wake the broker's thread (see bubble-uds).
        let (rd, wr) = bubble_uds::UnixConn::from_tokio(stream)
            .map_err(|e| VmmError::Protocol(format!("cannot register the VMM socket: {e}")))?
            .into_split();
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        let (events, _) = broadcast::channel(256);
        let (ready_tx, ready_rx) = watch::channel(Readiness::Booting);
        let exit = Arc::new(std::sync::OnceLock::new());
        let suspending = Arc::new(AtomicBool::new(false));
        let ready_at = Arc::new(std::sync::OnceLock::new());
        tokio::spawn(crate::reader::read_frames(
            rd,
            crate::reader::Reader {
                pending: pending.clone(),
                events: events.clone(),
                exit: exit.clone(),
                ready_stamp: ready_at.clone(),
                asked: suspending.clone(),
                ready_tx,
                exit_watch,
            },
        ));
        let c = VmmClient {
            poll_handle: wr.poll_handle(),
            last_answer_us: AtomicU64::new(0),
            writer: tokio::sync::Mutex::new(wr),
            pending,
            next_id: AtomicU64::new(1),
            events,
            readiness: ready_rx,
            pid,
            proc,
            exit,
            suspending,
            jail_warning: None,
            cgroups: None,
            started_by: None,
            steps: SpawnSteps::default(),
            ready_at,
        };
        if hello == Hello::Skip {
            return Ok(c);
        }
        let st = match c
            .request(&Request::Hello { bubble_id }, Duration::from_secs(5))
            .await?
        {
            Reply::StatusOk(st) => st,
            other => return Err(unexpected(other)),
        };
        if st.bubble_id != bubble_id {
            return Err(VmmError::Protocol("VMM runs another bubble".into()));
        }
        if c.pid != 0 && st.pid != 0 && st.pid != c.pid {
            return Err(VmmError::Protocol(format!(
                "VMM says it is pid {} but the socket's peer is pid {}",
                st.pid, c.pid
            )));
        }
        Ok(c)
    }

    pub(crate) async fn request(
        &self,
        req: &Request<'_>,
        timeout: Duration,
    ) -> Result<Reply, VmmError> {
        self.send(req, &[], timeout).await
    }

    /// Sends `req`, then (for `Restore`) the snapshot `tail` in
    /// `RESTORE_DATA` frames, without first joining its parts, and waits
    /// for the reply.
    pub(crate) async fn send(
        &self,
        req: &Request<'_>,
        tail: &[&[u8]],
        timeout: Duration,
    ) -> Result<Reply, VmmError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = req.frame(id).map_err(VmmError::Encode)?;
        let in_flight = InFlight::enter();
        let sent_at = Instant::now();
        let (tx, rx) = oneshot::channel();
        {
            let mut p = self.pending.lock();
            p.insert(id, Waiter::One(tx));
        }
        let is_call = req.kind() == Kind::Call;
        let small = tail.is_empty() && frame.len() <= HEAD_LEN + COALESCE_MAX;
        {
            let mut w = self.writer.lock().await;
            let mut sent = w.write_all(&frame).await;
            for p in tail.iter().flat_map(|p| p.chunks(SNAPSHOT_PIECE)) {
                if sent.is_ok() {
                    sent = crate::stream::write_piece(&mut w, id, p).await;
                }
            }
            if sent.is_err() {
                drop(w);
                // The VMM may have refused the request part-way (e.g. a
                // snapshot it cannot restore) and said why: prefer that.
                if let Ok(Ok(answer)) = tokio::time::timeout(REFUSAL_GRACE, rx).await {
                    return answer.map_err(|e| VmmError::Protocol(e.to_string()));
                }
                {
                    let mut p = self.pending.lock();
                    p.remove(&id);
                }
                return Err(self.closed());
            }
        }
        let spin = ANSWER_POLL_US.load(Ordering::Relaxed);
        if is_call
            && small
            && spin > 0
            && in_flight.alone()
            && self.last_answer_us.load(Ordering::Relaxed) <= spin
        {
            bubble_vmm::control::spin_readable(&self.poll_handle, Duration::from_micros(spin));
        }
        let answer = tokio::time::timeout(timeout, rx).await;
        self.last_answer_us
            .store(sent_at.elapsed().as_micros() as u64, Ordering::Relaxed);
        match answer {
            Ok(Ok(answer)) => answer.map_err(|e| VmmError::Protocol(e.to_string())),
            Ok(Err(_)) => Err(self.closed()),
            Err(_) => {
                {
                    let mut p = self.pending.lock();
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
        match self
            .request(&Request::Status, Duration::from_secs(5))
            .await?
        {
            Reply::StatusOk(st) => Ok(st),
            other => Err(unexpected(other)),
        }
    }

    /// The bubble's SNP launch digest as its VMM computed it while loading
    /// the guest (or, for a restored bubble, as its snapshot carried it).
    pub async fn launch_measurement(&self) -> Result<LaunchMeasurement, VmmError> {
        match self
            .request(&Request::Measurement, Duration::from_secs(5))
            .await?
        {
            Reply::MeasurementOk(m) => Ok(m),
            Reply::Error { text, .. } => Err(VmmError::NoMeasurement(text)),
            other => Err(unexpected(other)),
        }
    }

    /// Why the bubble is failed or its VMM gone, if it is: what a
    /// subscriber to [`VmmClient::events`] that came late would have
    /// missed (a failure after READY: the guest's start-up ends after it).
    pub fn ended(&self) -> Option<FailureReason> {
        if let Readiness::Failed(r) = &*self.readiness.borrow() {
            return Some(r.clone());
        }
        self.exit.get().map(VmmExit::reason)
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
    /// `deadline`. An op longer than 255 bytes is refused here
    /// ([`CallError::BadRequest`]); the bubble is untouched.
    pub async fn call(
        &self,
        op: &str,
        input: &[u8],
        deadline: Duration,
    ) -> Result<Vec<u8>, CallError> {
        self.call_with(&bubble_vmm::abi::Call::plain(op, input), deadline)
            .await
    }

    /// Sends a CALL with its flags (SIGN, SEAL) and waits for the answer.
    pub async fn call_with(
        &self,
        call: &bubble_vmm::abi::Call<'_>,
        deadline: Duration,
    ) -> Result<Vec<u8>, CallError> {
        let deadline_ms = deadline.as_millis().clamp(1, u128::from(u32::MAX)) as u32;
        let req = Request::Call(Call {
            deadline_ms,
            call: *call,
        });
        // The VMM enforces the deadline; allow it time to report. A call
        // made while the guest may still be starting waits in the VMM
        // until the start-up is over, which its boot deadline bounds (and
        // then reports as the failure it is).
        let starting = self.started_by.map_or(Duration::ZERO, |t| {
            t.saturating_duration_since(Instant::now())
        });
        let reply = self
            .request(&req, starting + deadline + Duration::from_secs(5))
            .await
            .map_err(|e| match e {
                VmmError::Encode(e) => CallError::BadRequest(e.to_string()),
                VmmError::Refused { code, text } => CallError::Refused { code, text },
                e => {
                    let r = e.failure_reason();
                    CallError::Failed(FailureReason::new(
                        r.kind,
                        format!("VMM did not answer: {}", r.detail),
                    ))
                }
            })?;
        match reply {
            Reply::CallOk(out) => Ok(out),
            Reply::CallErr(CallErr::Rejected { code, text }) => Err(CallError::Guest(code, text)),
            Reply::CallErr(CallErr::BadRequest(text)) => Err(CallError::BadRequest(text)),
            Reply::CallErr(CallErr::Deadline(text)) => Err(CallError::DeadlineExceeded(text)),
            Reply::CallErr(CallErr::Failed(r)) => Err(CallError::Failed(r)),
            Reply::CallErr(CallErr::Awaiting { key, timeout_ms }) => {
                Err(CallError::Awaiting { key, timeout_ms })
            }
            // A refused request: the guest never saw it.
            Reply::Error { code, text } => Err(CallError::Refused { code, text }),
            other => Err(CallError::Refused {
                code: bubble_vmm::control::ErrorCode::Unexpected,
                text: format!("unexpected {:?} reply to a call", other.kind()),
            }),
        }
    }

    /// Stops the VMM: a SHUTDOWN request, then SIGKILL after `grace`
    /// without an answer; with one, the VMM must exit within `grace`
    /// (checked in the background) or is killed.
    pub async fn shutdown(&self, grace: Duration) {
        let pidfd = self.proc.pidfd();
        match self.request(&Request::Shutdown, grace).await {
            Ok(Reply::ShutdownOk) => {
                if let Some(fd) = pidfd {
                    crate::linger::kill_unless_gone(fd, self.pid, grace);
                }
            }
            _ => self.kill(),
        }
    }

    /// What of the jail could not be set up for this VMM, if anything.
    pub fn jail_warning(&self) -> Option<&str> {
        self.jail_warning.as_deref()
    }

    /// Resolves once the guest is READY or FAILED (or the VMM is gone).
    pub(crate) fn settled(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.readiness.clone();
        async move {
            let _ = rx.wait_for(|r| *r != Readiness::Booting).await;
        }
    }

    /// When this VMM's start passed its steps.
    pub fn spawn_steps(&self) -> SpawnSteps {
        self.steps
    }

    /// When READY was read from the VMM's socket, if it was.
    pub fn ready_received_at(&self) -> Option<Instant> {
        self.ready_at.get().copied()
    }

    /// Kills the VMM process (if it still runs), through the pidfd held
    /// since connecting: never another process that took its pid.
    pub fn kill(&self) {
        self.proc.kill();
    }
}
