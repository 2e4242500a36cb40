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
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::abi::ABI_VERSION;
use crate::bubble::{Answer, Bubble, BubbleError};
use crate::control::{self, kind, CallErrKind, Frame, Status};
use crate::images::{self, GuestImage};
use crate::jail;
use crate::priority;
use crate::vm::{self, Vm, VmError};

mod args;
mod linger;
mod restore;
mod spare;
mod watchdog;

pub use args::{VmmArgs, DEFAULT_RESTORE_DEADLINE};
use linger::{seal_vcpu, start_linger, LINGER};
pub(crate) use spare::SpareArgs;
use watchdog::Watchdog;

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

fn vcpu_thread(args: VmmArgs, shared: Arc<Shared>, conns: mpsc::Receiver<UnixStream>) {
    if args.restore {
        return restore::restore_thread(args, shared, conns);
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
    if let Err(e) = seal_vcpu() {
        fail_then_exit(&shared, &format!("jail: {e}"));
        return serve_all(conns, None, &args.bubble_id, &shared);
    }
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

/// Default deadline when a CALL carries none.
const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);
/// How long a failed VMM lingers to deliver its failure before exiting.
const FAILED_LINGER: Duration = Duration::from_secs(2);

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
    match LINGER.get() {
        Some(linger) => {
            let _ = linger.send(());
        }
        // Only before the linger thread exists (no filter yet either).
        None => {
            std::thread::spawn(|| {
                std::thread::sleep(FAILED_LINGER);
                std::process::exit(3);
            });
        }
    }
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
        call: &crate::abi::Call<'_>,
        deadline: Duration,
    ) -> (Option<CallErrKind>, Vec<u8>, bool) {
        let op = call.op;
        let cap = self.bubble.capacity();
        if call.encoded_len() > cap {
            return (
                Some(CallErrKind::BadRequest),
                format!("request does not fit the mailbox ({cap} bytes)").into_bytes(),
                false,
            );
        }
        let sh = self.shared.clone();
        let mut log = move |line: &str| sh.event(kind::EV_LOG, line.as_bytes().to_vec());
        self.dog.arm(deadline);
        let r = self.bubble.call_with(call, &mut log);
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
                let Some((deadline_ms, call)) = control::decode_call(&f.body) else {
                    reply(kind::ERROR, b"malformed CALL".to_vec());
                    continue;
                };
                #[cfg(feature = "fault-injection")]
                if call.op == jail::seccomp::FAULT_OP {
                    jail::seccomp::forbidden_syscall();
                }
                let deadline = match deadline_ms {
                    0 => DEFAULT_DEADLINE,
                    ms => Duration::from_millis(u64::from(ms)),
                };
                let failed = shared.status.lock().ok().and_then(|s| s.failed.clone());
                let (k, body) = match (failed, guest.as_deref_mut()) {
                    (None, Some(g)) => {
                        let (k, body, fatal) = g.call(&call, deadline);
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
    priority::set_own_group_nice(priority::BACKGROUND_NICE);
    std::process::exit(0)
}
/// The VMM process's main; returns the exit code.
pub fn run_from_args(args: impl Iterator<Item = String>) -> i32 {
    let args: Vec<String> = args.collect();
    vm::install_kick_handler();
    let (tx, rx) = mpsc::channel();
    let vcpu = std::thread::Builder::new().name("vcpu0".into());
    let args = if args.first().map(String::as_str) == Some("--spare") {
        let sa = match spare::SpareArgs::parse(&args[1..]) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("bubble-vmm: spare: {e}");
                return 2;
            }
        };
        // A spare always dies with its broker: nobody could adopt it.
        let jailed = jail::harden(&[sa.image_fd.unwrap_or(-1)])
            .and_then(|()| jail::die_with_parent(sa.parent_pid));
        if let Err(e) = jailed {
            eprintln!("bubble-vmm: spare: {e}");
            return 2;
        }
        jail::set_title("vmm:spare");
        if let Err(e) = start_linger() {
            eprintln!("bubble-vmm: {e}");
            return 2;
        }
        // The thread that will run the vCPU waits for CONFIGURE itself and
        // builds the VM the moment it arrives; this thread meanwhile moves
        // the log and binds the bubble's socket (used only to reconnect).
        let spare = match spare::bind_spare(&sa.socket) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("bubble-vmm: spare: {e}");
                return 2;
            }
        };
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let first_conn = tx.clone();
        let spawned = vcpu.spawn(move || match spare::wait_as_spare(spare) {
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
        spare::prewarm();
        match ready_rx.recv() {
            Ok(Ok(a)) => {
                // This thread set the parent-death signal: it clears it
                // for a bubble that must outlive its broker.
                if a.parent_pid.is_none() {
                    if let Err(e) = jail::survive_parent() {
                        eprintln!("bubble-vmm: {e}");
                        return 2;
                    }
                }
                jail::set_title(&jail::bubble_title(&a.bubble_id));
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
        let t_jail = Instant::now();
        let jailed = jail::harden(&[a.image_fd.unwrap_or(-1)]).and_then(|()| match a.parent_pid {
            Some(p) => jail::die_with_parent(p),
            None => Ok(()),
        });
        if let Err(e) = jailed {
            eprintln!("bubble-vmm: {e}");
            return 2;
        }
        jail::set_title(&jail::bubble_title(&a.bubble_id));
        if let Err(e) = start_linger() {
            eprintln!("bubble-vmm: {e}");
            return 2;
        }
        eprintln!(
            "bubble-vmm: jail_setup_us={} (hygiene, parent death, linger thread)",
            t_jail.elapsed().as_micros()
        );
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
    if let Err(e) = jail::seccomp::seal(jail::seccomp::Thread::Control) {
        eprintln!("bubble-vmm: {e}");
        return 2;
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
