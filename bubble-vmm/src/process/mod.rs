//! The VMM process: one per bubble. It creates the VM, boots the guest,
//! and serves the control protocol ([`crate::control`]) on the bubble's
//! Unix socket, one connection at a time, so that a restarted broker can
//! reconnect to a running bubble.
//!
//! Threads: the main (leading) thread owns the VM, runs the vCPU and
//! serves requests, so that a call runs the guest without a thread
//! hand-off; the control thread accepts connections (a restarted
//! broker's) and hands them to it; a watchdog thread stops the vCPU
//! (signal + `immediate_exit`) when a call or the boot overruns its
//! deadline; the linger thread ends a failed VMM after a grace period.
//! Any guest misbehaviour fails the bubble: the VMM reports the reason,
//! then exits, freeing guest memory.

use std::io;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use crate::abi::ABI_VERSION;
use crate::bubble::{Boot, Bubble, BubbleError};
use crate::control::{Event, FailureKind, FailureReason, Reply, Status};
use crate::images::{self, GuestImage};
use crate::jail;
use crate::priority;
use crate::vm::{self, Vm, VmError};

mod args;
mod linger;
mod restore;
mod serve;
mod spare;
mod watchdog;

pub use args::{VmmArgs, DEFAULT_RESTORE_DEADLINE};
use linger::{seal_vcpu, start_linger, LINGER};
use serve::{serve_all, Guest};
#[cfg(feature = "fault-injection")]
pub use serve::{FAULT_ERROR_OP, FAULT_LINGER_OP};
pub use spare::SpareArgs;
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
                // In its own pid namespace a VMM cannot name its host
                // pid (the broker has it from SO_PEERCRED): 0, unknown.
                pid: if jail::in_jail() {
                    0
                } else {
                    std::process::id()
                },
                abi_version: ABI_VERSION,
                ..Status::default()
            }),
            conn: Mutex::new(None),
        })
    }

    /// Writes to the current connection (dropped if the write fails);
    /// whether it was written.
    fn send(&self, write: impl FnOnce(&mut UnixStream) -> io::Result<()>) -> bool {
        let mut c = self.conn.lock();
        match c.as_mut().map(write) {
            Some(Ok(())) => true,
            Some(Err(_)) => {
                *c = None;
                false
            }
            None => false,
        }
    }

    fn reply(&self, id: u64, r: &Reply) {
        self.send(|s| r.write_to(id, s));
    }

    fn event(&self, e: &Event) {
        self.send(|s| e.write_to(s));
    }

    fn fail(&self, reason: FailureReason) {
        eprintln!("bubble failed ({}): {}", reason.kind, reason.detail);
        {
            let mut s = self.status.lock();
            if s.failed.is_none() {
                s.failed = Some(reason.clone());
            }
        }
        self.event(&Event::Failed(reason));
    }
}

fn vcpu_thread(args: VmmArgs, shared: Arc<Shared>, conns: mpsc::Receiver<UnixStream>) {
    if args.restore {
        return restore::restore_thread(args, shared, conns);
    }
    let started = Instant::now();
    // The broker's first connection, if it is there already (a spare's
    // always is: it came with CONFIGURE): the boot's events (READY,
    // FAILED) go to it as they happen, before any request is read.
    let mut first = take_conn(&conns, &shared, None);
    let mut vm = match build_vm(
        &args.image,
        u64::from(args.memory_mib) << 20,
        args.max_payload as u64,
        args.image_fd,
    ) {
        Ok(vm) => vm,
        Err(e) => {
            fail_then_exit(
                &shared,
                FailureReason::new(FailureKind::Setup, format!("VM setup failed: {e}")),
            );
            return serve_all(first, conns, None, &args.bubble_id, &shared);
        }
    };
    let built = started.elapsed();
    let steps = vm.build_steps();
    let dog = Watchdog::start(&mut vm);
    let dogged = started.elapsed();
    let mut guest = Guest {
        bubble: Bubble::new(vm),
        dog,
        shared: shared.clone(),
    };
    if let Err(e) = seal_vcpu() {
        fail_then_exit(
            &shared,
            FailureReason::new(FailureKind::Jail, format!("jail: {e}")),
        );
        return serve_all(first, conns, None, &args.bubble_id, &shared);
    }
    let sealed = started.elapsed();
    // One deadline for the whole start-up, both phases.
    guest.dog.arm(args.boot_timeout);
    let sh = shared.clone();
    let mut log = |line: &str| sh.event(&Event::Log(line.to_string()));
    let booted = guest.bubble.boot_early(&mut log);
    let ran = started.elapsed();
    // READY (or READY_EARLY: the guest runs; it makes its keys next,
    // before any request is read) goes to the broker now.
    if booted.is_ok() {
        let boot_us = ran.as_micros() as u64;
        {
            let mut s = shared.status.lock();
            s.ready = true;
            s.boot_us = boot_us;
        }
        first = take_conn(&conns, &shared, first.take());
        shared.event(&Event::Ready { boot_us });
    }
    let booted = match booted {
        Ok(Boot::Early(_)) => guest.bubble.finish_start(&mut log).map(|_| ()),
        Ok(Boot::Ready(_)) => Ok(()),
        Err(e) => Err(e),
    };
    guest.dog.disarm();
    match booted {
        Ok(()) => {
            // Each step's own duration, in µs (`configured`: from a
            // spare's CONFIGURE to the VM build's start; `guest`: the first
            // KVM_RUN to the guest's READY_EARLY (or READY); `keys`: from
            // there to READY, the guest making its key pairs).
            // `bubble-bench` reads this line.
            let us = |d: Duration| d.as_micros();
            eprintln!(
                "bubble-vmm: boot_us={} steps: configured_us={} \
                 load_us={} shell_us={} setup_us={} watchdog_us={} seal_us={} guest_us={} \
                 keys_us={}",
                us(ran),
                spare::CONFIGURED
                    .get()
                    .map_or(0, |c| us(started.saturating_duration_since(*c))),
                us(steps.load),
                us(steps.shell),
                us(steps.setup),
                us(dogged - built),
                us(sealed - dogged),
                us(ran - sealed),
                us(started.elapsed() - ran),
            );
            let mut s = shared.status.lock();
            s.vcpu_us = guest.bubble.run_time().as_micros() as u64;
            drop(s);
            // What building the VM allocated and freed goes back to the
            // kernel (a bubble's footprint: `density_1000`); after READY,
            // off the create's path.
            // SAFETY: malloc_trim only returns free heap memory to the
            // kernel (madvise, brk: allowed by this thread's filter).
            unsafe { libc::malloc_trim(0) };
        }
        Err(e) => {
            let reason = match e {
                BubbleError::Vm(VmError::Interrupted) if guest.dog.fired.load(Ordering::SeqCst) => {
                    FailureReason::new(
                        FailureKind::BootTimeout,
                        format!(
                            "guest did not boot within {} ms",
                            args.boot_timeout.as_millis()
                        ),
                    )
                }
                e => FailureReason::new(e.failure_kind(), format!("boot failed: {e}")),
            };
            fail_then_exit(&shared, reason);
            return serve_all(first, conns, None, &args.bubble_id, &shared);
        }
    }
    serve_all(first, conns, Some(&mut guest), &args.bubble_id, &shared);
}

/// `have`, or else the next broker connection if one is waiting; a
/// connection taken here becomes the one events go to (its requests are
/// read only once [`serve_all`] gets it).
fn take_conn(
    conns: &mpsc::Receiver<UnixStream>,
    shared: &Shared,
    have: Option<UnixStream>,
) -> Option<UnixStream> {
    if have.is_some() {
        return have;
    }
    let conn = conns.try_recv().ok()?;
    if let Ok(events) = conn.try_clone() {
        *shared.conn.lock() = Some(events);
    }
    Some(conn)
}

/// Default deadline when a CALL carries none.
const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);
/// How long a failed VMM lingers to deliver its failure before exiting.
const FAILED_LINGER: Duration = Duration::from_secs(2);

/// How long the vCPU thread polls for the next request after answering
/// one, before it sleeps in `read` (unless told otherwise): a sleeping
/// thread's wake-up costs tens of microseconds on hosts like these (nested
/// virtualization), more than a call's guest work; back-to-back calls then
/// never wait for it.
pub const DEFAULT_POLL: Duration = Duration::from_micros(300);

/// Records the failure and ends the process after a short grace period in
/// which the broker can still learn why.
fn fail_then_exit(shared: &Shared, reason: FailureReason) {
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

/// Exits the process with its threads at low priority: tearing down the VM
/// and its memory is kernel work of ~1 ms that then yields to bubbles
/// booting meanwhile (the broker has its acknowledgement already).
fn exit_in_background() -> ! {
    priority::set_own_group_nice(priority::BACKGROUND_NICE);
    std::process::exit(0)
}
/// The VMM process's main; returns the exit code.
pub fn run_from_args(args: impl Iterator<Item = String>) -> i32 {
    // One malloc arena for the whole VMM: its few threads allocate
    // rarely, and each extra arena costs a dirty heap of its own (~50 KiB
    // of every bubble's footprint, measured with `density_1000`).
    // SAFETY: mallopt only sets a glibc allocator parameter; no memory is
    // passed, and no other thread exists yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    let mut args: Vec<String> = args.collect();
    let jail_args = match jail::JailArgs::extract(&mut args) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("bubble-vmm: {e}");
            return 2;
        }
    };
    vm::install_kick_handler();
    let (tx, rx) = mpsc::channel();
    if args.first().map(String::as_str) == Some("--spare") {
        return spare::run(&args[1..], jail_args.as_ref(), tx, rx);
    }
    let a = match VmmArgs::parse(args.into_iter()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bubble-vmm: {e}");
            return 2;
        }
    };
    let t_jail = Instant::now();
    let jailed = jail::enter(
        &[
            a.image_fd.unwrap_or(-1),
            jail_args.as_ref().and_then(|j| j.hold_fd).unwrap_or(-1),
        ],
        &a.socket,
        jail_args.as_ref(),
        a.parent_pid,
    );
    let listener = match jailed {
        Ok(l) => l,
        Err(e) => {
            eprintln!("bubble-vmm: {e}");
            return 2;
        }
    };
    jail::set_title(&jail::bubble_title(&a.bubble_id));
    if let Err(e) = start_linger(None).and_then(|()| start_control(listener, tx, None)) {
        eprintln!("bubble-vmm: {e}");
        return 2;
    }
    eprintln!(
        "bubble-vmm: jail_setup_us={} (socket, {}hygiene, parent death, linger and control threads)",
        t_jail.elapsed().as_micros(),
        if jail_args.is_some() {
            "/dev/kvm, namespaces, fork, pivot_root, identity, "
        } else {
            ""
        }
    );
    // This (the leading) thread runs the vCPU, as in a spare.
    let shared = Shared::new(&a);
    vcpu_thread(a, shared, rx);
    0
}

/// Starts the control thread: it accepts broker connections (a restarted
/// broker's) and hands them to the vCPU thread, sealed with its own
/// filter. A spare's is started ahead of need and first waits for the
/// bubble's cgroup files (`cgroups`), moving itself into them.
fn start_control(
    listener: std::os::unix::net::UnixListener,
    conns: mpsc::Sender<UnixStream>,
    cgroups: Option<mpsc::Receiver<Vec<std::fs::File>>>,
) -> Result<(), String> {
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            linger::seal_then_join(jail::seccomp::Thread::Control, cgroups);
            for conn in listener.incoming() {
                match conn {
                    Ok(s) => {
                        if conns.send(s).is_err() {
                            std::process::exit(3);
                        }
                    }
                    Err(e) => eprintln!("bubble-vmm: accept: {e}"),
                }
            }
        })
        .map(drop)
        .map_err(|e| format!("cannot start the control thread: {e}"))
}
