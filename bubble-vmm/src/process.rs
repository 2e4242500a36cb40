//! The VMM process: one per bubble. It creates the VM, boots the guest,
//! and serves the control protocol ([`crate::control`]) on the bubble's
//! Unix socket, one connection at a time, so that a restarted broker can
//! reconnect to a running bubble.
//!
//! Threads: the main thread accepts connections and reads requests; the
//! vCPU thread owns the VM and runs calls; a watchdog thread stops the vCPU
//! (signal + `immediate_exit`) when a call or the boot overruns its
//! deadline. Any guest misbehaviour fails the bubble: the VMM reports the
//! reason, then exits, freeing guest memory.

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::abi::ABI_VERSION;
use crate::bubble::{Answer, Bubble, BubbleError};
use crate::control::{self, kind, CallErrKind, Frame, Status};
use crate::images::{self, GuestImage};
use crate::layout::Layout;
use crate::priority;
use crate::vm::{self, Kicker, Vm, VmError};

/// Options of a VMM process.
#[derive(Clone, Debug)]
pub struct VmmArgs {
    /// Bubble id.
    pub bubble_id: String,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// Guest image.
    pub image: GuestImage,
    /// Control socket path.
    pub socket: PathBuf,
    /// Maximum call payload, bytes.
    pub max_payload: usize,
    /// Time allowed from VM creation to READY.
    pub boot_timeout: Duration,
    /// Restore a snapshot (sent as the first RESTORE request) instead of
    /// booting the image.
    pub restore: bool,
    /// Inherited descriptor of the shim laid out in a sealed memfd
    /// ([`crate::shared_image`]), mapped instead of loading a copy.
    pub image_fd: Option<i32>,
    /// How long to poll for the next request after answering one.
    pub poll: Duration,
}

/// Default deadline when a CALL carries none.
const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);
/// How long a failed VMM lingers to deliver its failure before exiting.
const FAILED_LINGER: Duration = Duration::from_secs(2);

impl VmmArgs {
    /// Parses `--bubble-id ID --memory-mib N --image IMG --socket PATH
    /// [--max-payload N] [--boot-timeout-ms N]`.
    pub fn parse(args: impl Iterator<Item = String>) -> Result<Self, String> {
        let mut a = VmmArgs {
            bubble_id: String::new(),
            memory_mib: 0,
            image: GuestImage::Shim,
            socket: PathBuf::new(),
            max_payload: 1 << 20,
            boot_timeout: Duration::from_secs(20),
            restore: false,
            image_fd: None,
            poll: DEFAULT_POLL,
        };
        let mut it = args;
        while let Some(k) = it.next() {
            let v = it.next().ok_or_else(|| format!("{k} needs a value"))?;
            match k.as_str() {
                "--bubble-id" => a.bubble_id = v,
                "--memory-mib" => a.memory_mib = v.parse().map_err(|_| "bad --memory-mib")?,
                "--image" => a.image = GuestImage::from_arg(&v).ok_or("bad --image")?,
                "--socket" => a.socket = v.into(),
                "--max-payload" => a.max_payload = v.parse().map_err(|_| "bad --max-payload")?,
                "--restore" => a.restore = v == "1",
                "--poll-us" => {
                    let us: u64 = v.parse().map_err(|_| "bad --poll-us")?;
                    a.poll = Duration::from_micros(us.min(10_000));
                }
                "--image-fd" => {
                    let fd: i32 = v.parse().map_err(|_| "bad --image-fd")?;
                    a.image_fd = (fd >= 0).then_some(fd);
                }
                "--boot-timeout-ms" => {
                    a.boot_timeout =
                        Duration::from_millis(v.parse().map_err(|_| "bad --boot-timeout-ms")?)
                }
                other => return Err(format!("unknown option {other}")),
            }
        }
        if a.bubble_id.is_empty() || a.socket.as_os_str().is_empty() || a.memory_mib == 0 {
            return Err("--bubble-id, --memory-mib and --socket are required".into());
        }
        Ok(a)
    }

    /// The arguments that [`VmmArgs::parse`] reads back.
    pub fn to_args(&self) -> Vec<String> {
        vec![
            "--bubble-id".into(),
            self.bubble_id.clone(),
            "--memory-mib".into(),
            self.memory_mib.to_string(),
            "--image".into(),
            self.image.to_arg(),
            "--socket".into(),
            self.socket.display().to_string(),
            "--max-payload".into(),
            self.max_payload.to_string(),
            "--boot-timeout-ms".into(),
            self.boot_timeout.as_millis().to_string(),
            "--restore".into(),
            if self.restore { "1" } else { "0" }.into(),
            "--image-fd".into(),
            self.image_fd.unwrap_or(-1).to_string(),
            "--poll-us".into(),
            self.poll.as_micros().to_string(),
        ]
    }
}

/// Builds the VM for an image; the shim is mapped from `image_fd` (see
/// [`crate::shared_image`]) when given, else loaded as a copy. Either way
/// the VM records its launch measurement as it is loaded ([`crate::load`]).
pub fn build_vm(
    image: &GuestImage,
    mem: u64,
    max_payload: u64,
    image_fd: Option<i32>,
) -> Result<Vm, VmError> {
    match image {
        GuestImage::Shim => match image_fd {
            Some(fd) => {
                let shared = crate::shared_image::SharedImage::adopt(fd, images::SHIM_ELF)?;
                Vm::with_shared_image(&shared, mem, max_payload)
            }
            None => Vm::new(images::SHIM_ELF, mem, max_payload),
        },
        GuestImage::Elf(p) => {
            let elf = std::fs::read(p)
                .map_err(|e| VmError::Memory(format!("reading {}: {e}", p.display())))?;
            Vm::new(&elf, mem, max_payload)
        }
        GuestImage::Hostile(k) => Vm::with_code(
            &images::hostile_code_for(*k, mem, max_payload)?,
            mem,
            max_payload,
        ),
    }
}

/// State shared by the VMM's threads.
struct Shared {
    status: Mutex<Status>,
    /// Writer of the current broker connection.
    conn: Mutex<Option<UnixStream>>,
    /// How long to poll for the next request after answering one.
    poll: Duration,
}

impl Shared {
    fn new(args: &VmmArgs) -> Arc<Self> {
        Arc::new(Shared {
            poll: args.poll,
            status: Mutex::new(Status {
                bubble_id: args.bubble_id.clone(),
                pid: std::process::id(),
                abi_version: ABI_VERSION,
                ..Status::default()
            }),
            conn: Mutex::new(None),
        })
    }

    fn send(&self, f: &Frame) {
        if let Ok(mut c) = self.conn.lock() {
            if let Some(s) = c.as_mut() {
                if f.write_to(s).is_err() {
                    *c = None;
                }
            }
        }
    }

    fn event(&self, k: u8, body: Vec<u8>) {
        self.send(&Frame {
            kind: k,
            id: 0,
            body,
        });
    }

    fn fail(&self, reason: &str) {
        eprintln!("bubble failed: {reason}");
        if let Ok(mut s) = self.status.lock() {
            if s.failed.is_none() {
                s.failed = Some(reason.to_string());
            }
        }
        self.event(kind::EV_FAILED, reason.as_bytes().to_vec());
    }
}

/// Arms a deadline; when it passes, kicks the vCPU until disarmed.
///
/// Arming and disarming only take an uncontended lock: the watchdog thread
/// is woken only when a deadline is earlier than the time it already sleeps
/// until (e.g. it sleeps with nothing armed). A waiting thread costs a
/// cross-CPU wake-up, which on a nested VM takes tens of µs of the vCPU
/// thread's time; calls back to back therefore never wake it, and it wakes
/// on its own at most once per deadline to find the call long finished.
struct Watchdog {
    state: Mutex<DogState>,
    cv: Condvar,
    fired: AtomicBool,
}

/// What the watchdog guards and when it will next look.
struct DogState {
    /// Armed deadline (`None`: disarmed).
    deadline: Option<Instant>,
    /// When the watchdog thread wakes on its own (`None`: only when told).
    wakes_at: Option<Instant>,
}

impl Watchdog {
    fn arm(&self, d: Duration) {
        self.fired.store(false, Ordering::SeqCst);
        let at = Instant::now() + d;
        let wake = match self.state.lock() {
            Ok(mut s) => {
                s.deadline = Some(at);
                // A thread that wakes no later than `at` will see it then.
                s.wakes_at.is_none_or(|w| w > at)
            }
            Err(_) => false,
        };
        if wake {
            self.cv.notify_all();
        }
    }

    /// A watchdog for the calling thread, which runs `vm`'s vCPU.
    fn start(vm: &mut Vm) -> Arc<Self> {
        let dog = Arc::new(Watchdog {
            state: Mutex::new(DogState {
                deadline: None,
                wakes_at: None,
            }),
            cv: Condvar::new(),
            fired: AtomicBool::new(false),
        });
        let kicker = vm.kicker();
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        let d = dog.clone();
        std::thread::spawn(move || d.run(kicker, me));
        dog
    }

    /// Disarms; the sleeping thread is not woken (it finds nothing armed
    /// when it next looks).
    fn disarm(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.deadline = None;
        }
    }

    fn run(self: Arc<Self>, kicker: Kicker, thread: libc::pthread_t) {
        let Ok(mut g) = self.state.lock() else { return };
        loop {
            let now = Instant::now();
            let sleep = match g.deadline {
                None => None,
                Some(at) if now < at => Some(at - now),
                Some(_) => {
                    // Overrun: kick until the vCPU thread disarms us.
                    self.fired.store(true, Ordering::SeqCst);
                    kicker.kick(thread);
                    Some(Duration::from_millis(2))
                }
            };
            g.wakes_at = sleep.map(|d| now + d);
            g = match sleep {
                None => match self.cv.wait(g) {
                    Ok(g) => g,
                    Err(_) => return,
                },
                Some(d) => match self.cv.wait_timeout(g, d) {
                    Ok((g, _)) => g,
                    Err(_) => return,
                },
            };
        }
    }
}

fn vcpu_thread(args: VmmArgs, shared: Arc<Shared>, conns: mpsc::Receiver<UnixStream>) {
    if args.restore {
        return restore_thread(args, shared, conns);
    }
    let started = Instant::now();
    let mut vm = match build_vm(
        &args.image,
        u64::from(args.memory_mib) << 20,
        args.max_payload as u64,
        args.image_fd,
    ) {
        Ok(vm) => vm,
        Err(e) => {
            fail_then_exit(&shared, &format!("VM setup failed: {e}"));
            return serve_all(conns, None, &args.bubble_id, &shared);
        }
    };
    let dog = Watchdog::start(&mut vm);
    let mut guest = Guest {
        bubble: Bubble::new(vm),
        dog,
        shared: shared.clone(),
    };
    guest.dog.arm(args.boot_timeout);
    let sh = shared.clone();
    let booted = guest
        .bubble
        .boot(&mut |line: &str| sh.event(kind::EV_LOG, line.as_bytes().to_vec()));
    guest.dog.disarm();
    match booted {
        Ok(_) => {
            let boot_us = started.elapsed().as_micros() as u64;
            if let Ok(mut s) = shared.status.lock() {
                s.ready = true;
                s.boot_us = boot_us;
                s.vcpu_us = guest.bubble.run_time().as_micros() as u64;
            }
            shared.event(kind::EV_READY, boot_us.to_le_bytes().to_vec());
        }
        Err(e) => {
            let reason = match e {
                BubbleError::Vm(VmError::Interrupted) if guest.dog.fired.load(Ordering::SeqCst) => {
                    format!(
                        "guest did not boot within {} ms",
                        args.boot_timeout.as_millis()
                    )
                }
                e => format!("boot failed: {e}"),
            };
            fail_then_exit(&shared, &reason);
            return serve_all(conns, None, &args.bubble_id, &shared);
        }
    }
    serve_all(conns, Some(&mut guest), &args.bubble_id, &shared);
}

fn encode_snapshot(vm: &Vm) -> Result<Vec<u8>, VmError> {
    let state = vm.capture()?.encode();
    let pages = vm.nonzero_pages()?;
    let mut b = Vec::with_capacity(8 + state.len() + pages.len() * (8 + 4096));
    b.extend((state.len() as u32).to_le_bytes());
    b.extend(&state);
    b.extend((pages.len() as u32).to_le_bytes());
    let mut buf = vec![0u8; 4096];
    for gpa in pages {
        vm.read(gpa, &mut buf)?;
        b.extend(gpa.to_le_bytes());
        b.extend(&buf);
    }
    Ok(b)
}

/// Restore mode: map guest memory and create the KVM VM (on a helper
/// thread) at once, while the broker fetches and verifies the frozen
/// copy; fault in the pages it names (PREFAULT); then stream the snapshot
/// from the first connection straight into guest memory (no boot: the
/// guest resumes where it stopped, in its doorbell exit), then serve as
/// usual.
fn restore_thread(args: VmmArgs, shared: Arc<Shared>, conns: mpsc::Receiver<UnixStream>) {
    let started = Instant::now();
    let mem_size = u64::from(args.memory_mib) << 20;
    // Guest memory now (prefaulting needs it); the KVM VM and vCPU on a
    // helper thread meanwhile (about a millisecond of work).
    let shell = std::thread::spawn(vm::VmShell::new);
    let memory = vm::anon_memory(mem_size);
    let Ok(conn) = conns.recv() else { return };
    let Ok(reader) = conn.try_clone() else {
        return;
    };
    // Large socket reads: the snapshot is the one big message.
    let mut reader = io::BufReader::with_capacity(256 << 10, reader);
    if let Ok(mut c) = shared.conn.lock() {
        *c = Some(conn.try_clone().unwrap_or(conn));
    }
    let mut prepared = Some((shell, memory));
    let guest = loop {
        let Ok((fkind, fid, body_len)) = Frame::read_head(&mut reader) else {
            return;
        };
        let reply = |k: u8, body: Vec<u8>| {
            shared.send(&Frame {
                kind: k,
                id: fid,
                body,
            })
        };
        let mut state_only = None;
        if fkind != kind::RESTORE {
            let mut body = vec![0u8; body_len];
            if io::Read::read_exact(&mut reader, &mut body).is_err() {
                return;
            }
            match fkind {
                kind::HELLO | kind::STATUS => {
                    if fkind == kind::HELLO && body != args.bubble_id.as_bytes() {
                        reply(kind::ERROR, b"this VMM runs another bubble".to_vec());
                        return;
                    }
                    let st = shared.status.lock().map(|s| s.clone()).unwrap_or_default();
                    reply(kind::STATUS_OK, st.encode());
                }
                kind::PREFAULT => {
                    // Fault in the pages the snapshot will fill while the
                    // broker still fetches and verifies it.
                    match (
                        crate::snapshot::decode_runs(&body, mem_size),
                        prepared.as_ref().map(|p| &p.1),
                    ) {
                        (Some(runs), Some(Ok(memory))) => {
                            for (g, n) in runs {
                                vm::populate(memory, (0..n).map(|k| g + k * crate::layout::PAGE));
                            }
                            let mut where_ = Vec::with_capacity(16);
                            if let Some((host, len)) = vm::host_span(memory) {
                                where_.extend((host as u64).to_le_bytes());
                                where_.extend((len as u64).to_le_bytes());
                            }
                            reply(kind::PREFAULT_OK, where_);
                        }
                        _ => reply(kind::ERROR, b"malformed PREFAULT".to_vec()),
                    }
                }
                kind::SHUTDOWN => {
                    // The restore was called off (e.g. the frozen copy did
                    // not verify): no guest byte was ever received.
                    reply(kind::SHUTDOWN_OK, Vec::new());
                    exit_in_background();
                }
                kind::RESTORE_STATE => state_only = Some(body),
                _ => reply(kind::ERROR, b"expected RESTORE".to_vec()),
            }
            if state_only.is_none() {
                continue;
            }
        }
        let t_restore = Instant::now();
        let built = match prepared.take() {
            Some((shell, memory)) => (|| {
                let shell = shell
                    .join()
                    .map_err(|_| VmError::Memory("VM creation panicked".into()))??;
                let placeholder = Layout::new(
                    mem_size,
                    crate::layout::IMAGE_BASE + crate::layout::PAGE,
                    4096,
                )
                .map_err(VmError::from)?;
                let mut vm = Vm::from_shell(shell, memory?, &placeholder)?;
                match &state_only {
                    // The broker wrote the verified pages into guest memory.
                    Some(state) => crate::snapshot::restore_state(&mut vm, state)?,
                    None => crate::snapshot::restore_from(&mut vm, &mut reader, body_len)?,
                }
                Ok(vm)
            })(),
            None => Err(crate::snapshot::RestoreError::Malformed("second RESTORE")),
        };
        let mut vm = match built {
            Ok(vm) => vm,
            Err(e) => {
                // The stream position is lost (or the VM is unusable): fail.
                // Refuse the rest of the body so the sender stops at once.
                let _ = reader.get_ref().shutdown(std::net::Shutdown::Read);
                reply(kind::ERROR, format!("restore failed: {e}").into_bytes());
                fail_then_exit(&shared, &format!("restore failed: {e}"));
                return;
            }
        };
        let dog = Watchdog::start(&mut vm);
        let boot_us = started.elapsed().as_micros() as u64;
        if let Ok(mut s) = shared.status.lock() {
            s.ready = true;
            s.boot_us = boot_us;
        }
        // The answer carries how long the VMM took (µs), for the logs.
        let took = t_restore.elapsed().as_micros() as u64;
        reply(kind::RESTORE_OK, took.to_le_bytes().to_vec());
        shared.event(kind::EV_READY, boot_us.to_le_bytes().to_vec());
        break Guest {
            bubble: Bubble::new(vm),
            dog,
            shared: shared.clone(),
        };
    };
    let mut guest = guest;
    // The broker sends nothing before RESTORE_OK, so nothing is buffered.
    if !reader.buffer().is_empty() {
        fail_then_exit(&shared, "protocol error: request pipelined behind RESTORE");
        return;
    }
    // The rest of this connection, then any later ones.
    let (tx, rx) = mpsc::channel();
    if let Ok(c) = reader.get_ref().try_clone() {
        let _ = tx.send(c);
    }
    drop(tx);
    serve_all(rx, Some(&mut guest), &args.bubble_id, &shared);
    serve_all(conns, Some(&mut guest), &args.bubble_id, &shared);
}

/// Serves broker connections one at a time, on the vCPU thread: a call
/// runs the guest right here, without a thread hand-off. Without a guest
/// (it failed), status requests report the failure until the VMM exits.
fn serve_all(
    conns: mpsc::Receiver<UnixStream>,
    mut guest: Option<&mut Guest>,
    bubble_id: &str,
    shared: &Arc<Shared>,
) {
    for conn in conns {
        if let Err(e) = serve(conn, guest.as_deref_mut(), bubble_id, shared) {
            if e.kind() != io::ErrorKind::UnexpectedEof {
                eprintln!("bubble-vmm: connection ended: {e}");
            }
        }
        if let Ok(mut c) = shared.conn.lock() {
            *c = None;
        }
    }
}

/// How long the vCPU thread polls for the next request after answering
/// one, before it sleeps in `read` (unless told otherwise): a sleeping
/// thread's wake-up costs tens of microseconds on hosts like these (nested
/// virtualization), more than a call's guest work; back-to-back calls then
/// never wait for it.
pub const DEFAULT_POLL: Duration = Duration::from_micros(300);

/// Records the failure and ends the process after a short grace period in
/// which the broker can still learn why.
fn fail_then_exit(shared: &Shared, reason: &str) {
    shared.fail(reason);
    std::thread::spawn(|| {
        std::thread::sleep(FAILED_LINGER);
        std::process::exit(3);
    });
}

/// The booted guest and what guards it.
struct Guest {
    bubble: Bubble,
    dog: Arc<Watchdog>,
    shared: Arc<Shared>,
}

impl Guest {
    /// Runs one call; a fatal outcome fails the bubble and ends the process
    /// after the answer is sent.
    fn call(
        &mut self,
        op: &str,
        input: &[u8],
        deadline: Duration,
    ) -> (Option<CallErrKind>, Vec<u8>, bool) {
        let cap = self.bubble.capacity();
        if 1 + op.len() + input.len() > cap {
            return (
                Some(CallErrKind::BadRequest),
                format!("request does not fit the mailbox ({cap} bytes)").into_bytes(),
                false,
            );
        }
        let sh = self.shared.clone();
        let mut log = move |line: &str| sh.event(kind::EV_LOG, line.as_bytes().to_vec());
        self.dog.arm(deadline);
        let r = self.bubble.call(op, input, &mut log);
        self.dog.disarm();
        if let Ok(mut s) = self.shared.status.lock() {
            s.vcpu_us = self.bubble.run_time().as_micros() as u64;
        }
        match r {
            Ok(Answer::Output(out)) => (None, out, false),
            Ok(Answer::Rejected(code, text)) => {
                // Body: [guest error code u16 LE][text].
                let mut b = code.to_le_bytes().to_vec();
                b.extend(text.as_bytes());
                (Some(CallErrKind::Rejected), b, false)
            }
            Err(BubbleError::Vm(VmError::Interrupted)) if self.dog.fired.load(Ordering::SeqCst) => {
                let reason = format!(
                    "call deadline exceeded: guest did not answer {op:?} within {} ms",
                    deadline.as_millis()
                );
                fail_then_exit(&self.shared, &reason);
                (Some(CallErrKind::Deadline), reason.into_bytes(), true)
            }
            Err(e) => {
                let reason = e.to_string();
                fail_then_exit(&self.shared, &reason);
                (Some(CallErrKind::Failed), reason.into_bytes(), true)
            }
        }
    }
}

fn serve(
    stream: UnixStream,
    mut guest: Option<&mut Guest>,
    bubble_id: &str,
    shared: &Arc<Shared>,
) -> io::Result<()> {
    let mut reader = io::BufReader::new(stream.try_clone()?);
    if let Ok(mut c) = shared.conn.lock() {
        *c = Some(stream);
    }
    // Poll only while requests keep coming back to back: one that took
    // longer than the budget turns polling off until one comes quickly.
    let budget = shared.poll;
    let mut poll = !budget.is_zero();
    loop {
        let idle_since = Instant::now();
        if poll && reader.buffer().is_empty() {
            poll = bubble_uds::spin_readable(reader.get_ref(), budget);
        }
        let f = Frame::read_from(&mut reader)?;
        if !poll && !budget.is_zero() {
            poll = idle_since.elapsed() < budget;
        }
        let reply = |k: u8, body: Vec<u8>| {
            shared.send(&Frame {
                kind: k,
                id: f.id,
                body,
            })
        };
        match f.kind {
            kind::HELLO | kind::STATUS => {
                if f.kind == kind::HELLO && f.body != bubble_id.as_bytes() {
                    reply(kind::ERROR, b"this VMM runs another bubble".to_vec());
                    return Ok(());
                }
                let st = shared.status.lock().map(|s| s.clone()).unwrap_or_default();
                reply(kind::STATUS_OK, st.encode());
            }
            kind::CALL => {
                let Some((deadline_ms, op, input)) = control::decode_call(&f.body) else {
                    reply(kind::ERROR, b"malformed CALL".to_vec());
                    continue;
                };
                let deadline = match deadline_ms {
                    0 => DEFAULT_DEADLINE,
                    ms => Duration::from_millis(u64::from(ms)),
                };
                let failed = shared.status.lock().ok().and_then(|s| s.failed.clone());
                let (k, body) = match (failed, guest.as_deref_mut()) {
                    (None, Some(g)) => {
                        let (k, body, fatal) = g.call(op, input, deadline);
                        if fatal {
                            guest = None;
                        }
                        (k, body)
                    }
                    (reason, _) => (
                        Some(CallErrKind::Failed),
                        reason
                            .unwrap_or_else(|| "the bubble has no guest".into())
                            .into_bytes(),
                    ),
                };
                match k {
                    None => reply(kind::CALL_OK, body),
                    Some(k) => {
                        let mut b = vec![k as u8];
                        b.extend(body);
                        reply(kind::CALL_ERR, b);
                    }
                }
            }
            kind::SHUTDOWN => {
                reply(kind::SHUTDOWN_OK, Vec::new());
                exit_in_background();
            }
            kind::MEASUREMENT => match guest
                .as_deref_mut()
                .map(|g| g.bubble.vm().launch().answer())
            {
                Some(Some(m)) => reply(kind::MEASUREMENT_OK, m.encode()),
                Some(None) => reply(kind::ERROR, b"launch measurement unknown".to_vec()),
                None => reply(kind::ERROR, b"the bubble has no guest".to_vec()),
            },
            kind::SUSPEND => {
                // The vCPU is stopped in its doorbell exit (this thread runs
                // it): a safe point. The VMM keeps running until the broker
                // has stored the snapshot and sends SHUTDOWN.
                match guest.as_deref_mut() {
                    Some(g) => match encode_snapshot(g.bubble.vm()) {
                        Ok(b) => reply(kind::SNAPSHOT, b),
                        Err(e) => reply(kind::ERROR, format!("snapshot failed: {e}").into_bytes()),
                    },
                    None => reply(kind::ERROR, b"the bubble has no guest".to_vec()),
                }
            }
            _ => reply(kind::ERROR, b"unknown request".to_vec()),
        }
    }
}

/// A spare's listening socket (bound first thing, so the broker can
/// connect while the spare gets ready).
struct SpareSocket {
    listener: UnixListener,
    path: String,
}

/// Binds the spare socket named by `--socket PATH`.
fn bind_spare(args: &[String]) -> Result<SpareSocket, String> {
    let [flag, path] = args else {
        return Err("usage: --spare --socket PATH".into());
    };
    if flag != "--socket" {
        return Err("usage: --spare --socket PATH".into());
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(|e| format!("listen on {path}: {e}"))?;
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
    Ok(SpareSocket {
        listener,
        path: path.clone(),
    })
}

/// Spare mode (`--spare --socket PATH`): a VMM process started ahead of
/// need, so that creating a bubble does not wait for a process to start.
/// It waits for one connection carrying a `CONFIGURE` frame (the normal
/// arguments), then becomes that bubble's VMM: the VM is created only then,
/// cold, as for any bubble. An unused spare exits when its broker goes away.
fn wait_as_spare(spare: SpareSocket) -> Result<(VmmArgs, UnixStream), String> {
    let SpareSocket { listener, path } = spare;
    // Exit if the broker that started us dies before using us.
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() };
    let configured = Arc::new(AtomicBool::new(false));
    {
        let (configured, path) = (configured.clone(), path.clone());
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(200));
            if configured.load(Ordering::SeqCst) {
                return;
            }
            // SAFETY: as above.
            if unsafe { libc::getppid() } != parent {
                let _ = std::fs::remove_file(&path);
                std::process::exit(0);
            }
        });
    }
    let (mut conn, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
    let f = Frame::read_from(&mut conn).map_err(|e| format!("reading CONFIGURE: {e}"))?;
    if f.kind != kind::CONFIGURE {
        return Err(format!("expected CONFIGURE, got frame kind {:#x}", f.kind));
    }
    configured.store(true, Ordering::SeqCst);
    drop(listener);
    let _ = std::fs::remove_file(path);
    let text = String::from_utf8(f.body).map_err(|_| "CONFIGURE is not UTF-8")?;
    let a = VmmArgs::parse(text.split('\0').map(str::to_string))?;
    Ok((a, conn))
}

/// From now on this process is `args`' bubble's: log next to its socket.
fn log_next_to_socket(args: &VmmArgs) {
    if let Some(dir) = args.socket.parent() {
        if let Ok(log) = std::fs::File::create(dir.join("vmm.log")) {
            use std::os::fd::AsRawFd;
            // SAFETY: dup2 onto our own stdout/stderr descriptors.
            unsafe {
                libc::dup2(log.as_raw_fd(), 1);
                libc::dup2(log.as_raw_fd(), 2);
            }
        }
    }
}

/// Exits the process with its threads at low priority: tearing down the VM
/// and its memory is kernel work of ~1 ms that then yields to bubbles
/// booting meanwhile (the broker has its acknowledgement already).
fn exit_in_background() -> ! {
    priority::set_process_nice(None, priority::BACKGROUND_NICE);
    std::process::exit(0)
}

/// Work a spare does before it is needed: open /dev/kvm and query the
/// supported CPUID, fault in the embedded guest image and the code paths
/// that check it, so that the bubble's VM (still created only after
/// CONFIGURE) is built without those process-level and first-touch costs.
fn prewarm() {
    // Failure is not fatal here: VM creation opens /dev/kvm again and
    // reports the error.
    let _ = vm::prepare_kvm();
    let _ = crate::layout::Image::parse_bounds(images::SHIM_ELF);
    let sum = images::SHIM_ELF
        .iter()
        .step_by(4096)
        .fold(0u8, |a, b| a.wrapping_add(*b));
    std::hint::black_box(sum);
    let _ = crate::layout::Layout::new(64 << 20, crate::layout::IMAGE_BASE + 4096, 1 << 20)
        .map(|l| crate::layout::boot_pages(&l));
}

/// The VMM process's main; returns the exit code.
pub fn run_from_args(args: impl Iterator<Item = String>) -> i32 {
    let args: Vec<String> = args.collect();
    vm::install_kick_handler();
    let (tx, rx) = mpsc::channel();
    let vcpu = std::thread::Builder::new().name("vcpu0".into());
    let args = if args.first().map(String::as_str) == Some("--spare") {
        // The thread that will run the vCPU waits for CONFIGURE itself and
        // builds the VM the moment it arrives; this thread meanwhile moves
        // the log and binds the bubble's socket (used only to reconnect).
        let spare = match bind_spare(&args[1..]) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("bubble-vmm: spare: {e}");
                return 2;
            }
        };
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let first_conn = tx.clone();
        let spawned = vcpu.spawn(move || match wait_as_spare(spare) {
            Ok((a, conn)) => {
                let shared = Shared::new(&a);
                if first_conn.send(conn).is_err() {
                    return;
                }
                let _ = ready_tx.send(Ok(a.clone()));
                vcpu_thread(a, shared, rx)
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
            }
        });
        if let Err(e) = spawned {
            eprintln!("bubble-vmm: cannot start the vCPU thread: {e}");
            return 2;
        }
        // From here this thread only prepares (and later moves the log and
        // accepts reconnections): at low priority, so that a spare starting
        // up does not slow down a bubble booting next to it. A bubble that
        // arrives first simply finds nothing prepared.
        priority::set_nice(0, priority::BACKGROUND_NICE);
        prewarm();
        match ready_rx.recv() {
            Ok(Ok(a)) => {
                log_next_to_socket(&a);
                a
            }
            Ok(Err(e)) => {
                eprintln!("bubble-vmm: spare: {e}");
                return 2;
            }
            Err(_) => return 3,
        }
    } else {
        let a = match VmmArgs::parse(args.into_iter()) {
            Ok(a) => a,
            Err(e) => {
                eprintln!("bubble-vmm: {e}");
                return 2;
            }
        };
        let (a2, shared) = (a.clone(), Shared::new(&a));
        if let Err(e) = vcpu.spawn(move || vcpu_thread(a2, shared, rx)) {
            eprintln!("bubble-vmm: cannot start the vCPU thread: {e}");
            return 2;
        }
        a
    };
    let _ = std::fs::remove_file(&args.socket);
    let listener = match UnixListener::bind(&args.socket) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "bubble-vmm: cannot listen on {}: {e}",
                args.socket.display()
            );
            return 2;
        }
    };
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&args.socket, std::fs::Permissions::from_mode(0o600));
    }
    for conn in listener.incoming() {
        match conn {
            Ok(s) => {
                if tx.send(s).is_err() {
                    return 3;
                }
            }
            Err(e) => eprintln!("bubble-vmm: accept: {e}"),
        }
    }
    0
}
