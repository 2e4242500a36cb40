//! Spare mode: a VMM process started ahead of need.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc;

use super::{start_linger, vcpu_thread, Shared, VmmArgs};
use crate::control::{Head, Kind, Request};
use crate::{images, jail, priority, vm};

/// A spare's command line: `--spare --socket PATH --parent-pid PID
/// [--image-fd FD]`.
pub struct SpareArgs {
    /// Where to listen for the broker.
    pub(super) socket: String,
    /// The broker, which a spare always dies with.
    pub(super) parent_pid: u32,
    /// The shared shim image, inherited on purpose.
    pub(super) image_fd: Option<i32>,
}

impl SpareArgs {
    pub(super) fn parse(args: &[String]) -> Result<Self, String> {
        const USAGE: &str = "usage: --spare --socket PATH --parent-pid PID [--image-fd FD]";
        let mut a = SpareArgs {
            socket: String::new(),
            parent_pid: 0,
            image_fd: None,
        };
        let mut it = args.iter();
        while let Some(k) = it.next() {
            let v = it.next().ok_or(USAGE)?;
            match k.as_str() {
                "--socket" => a.socket = v.clone(),
                "--parent-pid" => a.parent_pid = v.parse().map_err(|_| USAGE)?,
                "--image-fd" => {
                    let fd: i32 = v.parse().map_err(|_| USAGE)?;
                    a.image_fd = (fd >= 0).then_some(fd);
                }
                _ => return Err(USAGE.into()),
            }
        }
        if a.socket.is_empty() || a.parent_pid == 0 {
            return Err(USAGE.into());
        }
        Ok(a)
    }

    /// The arguments [`SpareArgs::parse`] reads back, `--spare` first.
    pub fn to_args(socket: &str, parent_pid: u32, image_fd: Option<i32>) -> Vec<String> {
        vec![
            "--spare".into(),
            "--socket".into(),
            socket.into(),
            "--parent-pid".into(),
            parent_pid.to_string(),
            "--image-fd".into(),
            image_fd.unwrap_or(-1).to_string(),
        ]
    }
}

/// When this spare's CONFIGURE was read (for the VMM's step log).
pub(super) static CONFIGURED: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

/// Most descriptors a CONFIGURE frame may carry: one cgroup `tasks` file
/// per cgroup v1 controller the broker limits (memory, pids, cpu).
pub const MAX_CONFIGURE_FDS: usize = 4;

/// What a spare is given to become a bubble's VMM.
pub(super) struct Configured {
    pub(super) args: VmmArgs,
    pub(super) conn: UnixStream,
    /// The `tasks` files of the bubble's cgroups (see [`move_into`]),
    /// empty when the broker places the process itself.
    pub(super) cgroups: Vec<File>,
}

/// Reads the first bytes of a connection with `recvmsg`, keeping the
/// descriptors sent with them, and the rest with plain reads.
struct FirstRead<'a> {
    conn: &'a UnixStream,
    fds: Option<Vec<OwnedFd>>,
}

impl Read for FirstRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
        if self.fds.is_some() {
            return (&mut &*self.conn).read(buf);
        }
        let mut space = nix::cmsg_space!([RawFd; MAX_CONFIGURE_FDS]);
        let mut iov = [io::IoSliceMut::new(buf)];
        let msg = recvmsg::<()>(
            self.conn.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let mut fds = Vec::new();
        // Truncated control data (more descriptors than allowed): refused.
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for fd in raw {
                    // SAFETY: the kernel just installed `fd` in this
                    // process for this message; nothing else owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        let n = msg.bytes;
        self.fds = Some(fds);
        Ok(n)
    }
}

/// Spare mode: a VMM process started ahead of need, so that creating a
/// bubble does not wait for a process to start. It waits for one
/// connection carrying a `CONFIGURE` frame (the normal arguments, and
/// the bubble's cgroup files as descriptors), then becomes that bubble's
/// VMM. Its KVM VM and vCPU exist already (see [`prewarm`]); its guest
/// memory, image, measurement and vCPU registers are made only then, and
/// its guest runs only then, cold, as for any bubble. An unused
/// spare dies with its broker (`PR_SET_PDEATHSIG`, set by the main thread
/// before this runs).
pub(super) fn wait_as_spare(listener: &UnixListener) -> Result<Configured, String> {
    let (conn, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
    let mut r = FirstRead {
        conn: &conn,
        fds: None,
    };
    let head = Head::read(&mut r).map_err(|e| format!("reading CONFIGURE: {e}"))?;
    let _ = CONFIGURED.set(std::time::Instant::now());
    let body = head
        .read_body(&mut r)
        .map_err(|e| format!("reading CONFIGURE: {e}"))?;
    let fds = r.fds.unwrap_or_default();
    if head.kind != Kind::Configure as u8 {
        return Err(format!(
            "expected CONFIGURE, got frame kind {:#x}",
            head.kind
        ));
    }
    let args = match Request::decode(head.kind, &body) {
        Ok(Request::Configure { args }) => args,
        Ok(_) => return Err("expected CONFIGURE".into()),
        Err(e) => return Err(format!("CONFIGURE: {e}")),
    };
    let args = VmmArgs::parse(args.into_iter().map(str::to_string))?;
    Ok(Configured {
        args,
        conn,
        cgroups: fds.into_iter().map(File::from).collect(),
    })
}

/// Moves the calling thread into the cgroups whose v1 `tasks` files are
/// `files` (`files[0]`, the memory controller's, only when `leader`).
///
/// A thread writing `0` to `tasks` moves itself without the kernel's
/// thread-group lock, whose first writer after a quiet spell waits a whole
/// RCU grace period (measured 8–16 ms on these loaded hosts); the broker
/// writing the pid to `cgroup.procs` paid it on every create. Memory is
/// charged to the cgroup of the process's leader thread (`mm->owner`), so
/// only the leader needs to be in the memory cgroup, and must be before
/// the guest's memory is touched.
pub(super) fn move_into(files: &[File], leader: bool) -> io::Result<()> {
    for (i, f) in files.iter().enumerate() {
        if i == 0 && !leader {
            continue;
        }
        (&mut &*f).write_all(b"0")?;
    }
    Ok(())
}

/// Duplicates `files` for another thread.
fn dup_all(files: &[File]) -> io::Result<Vec<File>> {
    files.iter().map(File::try_clone).collect()
}

/// The spare's main: enters the jail, prepares at low priority on a
/// thread of its own, waits for CONFIGURE, moves into the bubble's
/// cgroups and then runs the bubble's vCPU itself (this thread leads the
/// process, whose memory is charged where its leader is). The control,
/// linger and watchdog threads exist ahead of need, sealed, and each moves
/// itself into the bubble's cgroups when given their files, while this
/// thread builds the VM: nothing on the way from CONFIGURE to the guest
/// waits for another thread to wake up. Returns the exit code.
pub(super) fn run(
    args: &[String],
    jail_args: Option<&crate::jail::JailArgs>,
    conns: mpsc::Sender<UnixStream>,
    rx: mpsc::Receiver<UnixStream>,
) -> i32 {
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        eprintln!("bubble-vmm: spare: {what}{e}");
        2
    };
    let sa = match SpareArgs::parse(args) {
        Ok(a) => a,
        Err(e) => return fail("", &e),
    };
    // A spare always dies with its broker: nobody could adopt it.
    let listener = match jail::enter(
        &[
            sa.image_fd.unwrap_or(-1),
            jail_args.and_then(|j| j.hold_fd).unwrap_or(-1),
        ],
        std::path::Path::new(&sa.socket),
        jail_args,
        Some(sa.parent_pid),
    ) {
        Ok(l) => l,
        Err(e) => return fail("", &e),
    };
    jail::set_title("vmm:spare");
    // Preparation runs at low priority on a thread of its own, so that a
    // spare starting up does not slow down a bubble booting next to it;
    // a bubble that arrives first simply finds less prepared.
    let prewarming = match std::thread::Builder::new()
        .name("prewarm".into())
        .spawn(|| {
            priority::set_nice(0, priority::BACKGROUND_NICE);
            prewarm();
        }) {
        Ok(t) => t,
        Err(e) => return fail("prewarm thread: ", &e),
    };
    // The preparing thread has no seccomp filter and would be outside
    // the bubble's cgroups: it is gone before anything else starts (a
    // CONFIGURE arriving meanwhile waits in the socket's backlog, as it
    // would wait for the preparation anyway), and the next thread reuses
    // its stack (one thread's dirty stack less per bubble).
    if prewarming.join().is_err() {
        return fail("", &"the prewarm thread panicked");
    }
    // The control thread accepts later connections (a restarted broker's)
    // on a second handle of the listener; the socket stays the bubble's.
    let (ctl_go, ctl_files) = mpsc::sync_channel::<Vec<File>>(1);
    let started = listener
        .try_clone()
        .map_err(|e| e.to_string())
        .and_then(|l| super::start_control(l, conns.clone(), Some(ctl_files)));
    if let Err(e) = started {
        return fail("", &e);
    }
    let (linger_go, linger_files) = mpsc::sync_channel::<Vec<File>>(1);
    if let Err(e) = start_linger(Some(linger_files)) {
        return fail("", &e);
    }
    let (dog_go, dog_files) = mpsc::sync_channel::<Vec<File>>(1);
    if let Err(e) = super::Watchdog::ahead(dog_files) {
        return fail("", &e);
    }
    let Configured {
        args: a,
        conn,
        cgroups,
    } = match wait_as_spare(&listener) {
        Ok(c) => c,
        Err(e) => return fail("", &e),
    };
    if let Err(e) = move_into(&cgroups, true) {
        return fail("cannot enter the bubble's cgroups: ", &e);
    }
    // The broker's connection is served first, before any the control
    // thread may accept.
    if conns.send(conn).is_err() {
        return 3;
    }
    for go in [ctl_go, linger_go, dog_go] {
        let files = match dup_all(&cgroups) {
            Ok(f) => f,
            Err(e) => return fail("", &e),
        };
        if go.send(files).is_err() {
            return fail("", &"a thread of the spare is gone");
        }
    }
    // Closed before the guest runs: opened by the broker, these files
    // would let whoever holds them move any process.
    drop(cgroups);
    drop(listener);
    // This thread set the parent-death signal: it clears it for a bubble
    // that must outlive its broker.
    if a.parent_pid.is_none() {
        if let Err(e) = jail::survive_parent() {
            return fail("", &e);
        }
    }
    jail::set_title(&jail::bubble_title(&a.bubble_id));
    let shared = Shared::new(&a);
    vcpu_thread(a, shared, rx);
    0
}

/// Work a spare does before it is needed: create the KVM VM and its vCPU
/// (no memory, no registers: see [`vm::prepare_shell`]), fault in the
/// embedded guest image and the code paths that check it, so that the
/// bubble's VM (its memory loaded and measured, its vCPU set up only after
/// CONFIGURE) is built without those process-level and first-touch costs.
fn prewarm() {
    // Failure is not fatal here: VM creation tries again after CONFIGURE
    // and reports the error.
    let _ = vm::prepare_shell();
    jail::seccomp::precompile();
    let _ = crate::layout::Image::parse_bounds(images::SHIM_ELF);
    let sum = images::SHIM_ELF
        .iter()
        .step_by(4096)
        .fold(0u8, |a, b| a.wrapping_add(*b));
    std::hint::black_box(sum);
    let _ = crate::layout::Layout::new(64 << 20, crate::layout::IMAGE_BASE + 4096, 1 << 20)
        .map(|l| crate::layout::boot_pages(&l));
}
