//! Starting VMM processes: spares kept ahead of need, fresh starts.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use tokio::net::UnixStream;

use bubble_vmm::control::Request;
use bubble_vmm::jail::JailArgs;
use bubble_vmm::priority;
use bubble_vmm::process::SpareArgs;

use crate::cgroups::{self, Cgroups};
use crate::client::{socket_path, Hello, SpawnSteps, VmmClient};
use crate::exit::{ExitWatch, MemcgSlot};
use crate::fresh::{connect_child, spawn_jailed};
use crate::setup::{confine, hold_claim, prepare_dir, remove_after_exit, SpawnConfig};

use crate::launcher;
use crate::uids::{UidLease, UidPool};
use crate::vmm_error::VmmError;

/// How the broker jails the VMMs it starts (see `docs/jail.md`).
#[derive(Clone, Debug, Default)]
pub struct JailSpec {
    /// New mount, pid, net, ipc and uts namespaces and an empty root.
    pub namespaces: bool,
    /// The unprivileged path: a user namespace mapping one id (always
    /// when the broker is not root; forced with `[jail] userns = true`).
    pub userns: bool,
    /// Ids to give VMMs one each (when the broker is root).
    pub uids: Option<Arc<UidPool>>,
    /// The bubbles' cgroups, or why there are none (then every VMM's
    /// [`VmmClient::jail_warning`] says so).
    pub cgroups: Option<Result<Arc<Cgroups>, String>>,
}

impl JailSpec {
    /// Prepares `cfg`'s bubble cgroup; the files to move its VMM into,
    /// or why it cannot have one.
    fn cgroup_for(&self, cfg: &SpawnConfig) -> Result<Vec<PathBuf>, String> {
        match &self.cgroups {
            None => Ok(Vec::new()),
            Some(Err(why)) => Err(why.clone()),
            Some(Ok(cg)) => cg
                .prepare(&cfg.parent, &cfg.bubble_id, u64::from(cfg.memory_mib) << 20)
                .map_err(|e| format!("no cgroup: {e}")),
        }
    }

    /// The jail options of one VMM and the id it is lent.
    fn for_vmm(&self) -> Result<(Option<JailArgs>, Option<UidLease>), VmmError> {
        if !self.namespaces {
            return Ok((None, None));
        }
        let lease = match &self.uids {
            Some(pool) => Some(pool.lease().ok_or(VmmError::NoUid)?),
            None => None,
        };
        let args = JailArgs {
            id: lease.as_ref().map(|l| (l.uid(), l.uid())),
            userns: self.userns,
            hold_fd: None,
        };
        Ok((Some(args), lease))
    }
}

/// A spare VMM process waiting for its bubble.
struct Spare {
    stream: UnixStream,
    pid: u32,
    /// The process group of the process spawned for it (0: unknown).
    group: u32,
    exit: ExitWatch,
    /// Where its memory cgroup is, once it has one (see [`MemcgSlot`]).
    memcg: MemcgSlot,
    /// Its own directory with its socket and log (see [`give_dir`]).
    dir: PathBuf,
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
    jail: JailSpec,
}

impl Spawner {
    /// A spawner keeping `want` spares (0: none) with sockets in `dir`,
    /// jailing every VMM as `jail` says.
    pub fn new(
        program: PathBuf,
        prefix: Vec<String>,
        dir: PathBuf,
        want: usize,
        jail: JailSpec,
    ) -> Arc<Self> {
        let _ = std::fs::remove_dir_all(&dir);
        // Made before any VMM process starts, so that all inherit it.
        let _ = bubble_vmm::images::shared_shim_fd();
        Arc::new(Self {
            program,
            prefix,
            dir,
            want,
            spares: Mutex::new(Vec::new()),
            refilling: std::sync::atomic::AtomicBool::new(false),
            low_start: want > 0 && priority::can_raise(),
            jail,
        })
    }

    /// Whether a re-adopted VMM's socket peer uid is one a VMM of this
    /// broker may run as (see [`UidPool::adopt`]); without a uid pool,
    /// the broker's own.
    pub fn adopt_uid(&self, uid: u32) -> bool {
        match &self.jail.uids {
            Some(pool) => pool.adopt(uid),
            // SAFETY: getuid has no preconditions.
            None => uid == unsafe { libc::getuid() },
        }
    }

    /// The bubbles' cgroups, if this broker has them.
    pub(crate) fn cgroups(&self) -> Option<&Arc<Cgroups>> {
        self.jail.cgroups.as_ref()?.as_ref().ok()
    }

    /// Spares ready now, and how many are wanted.
    pub fn spares(&self) -> (usize, usize) {
        (self.spares.lock().len(), self.want)
    }

    /// Tops the spares up in the background.
    pub fn refill(self: &Arc<Self>) {
        if self.want == 0 || self.refilling.swap(true, Ordering::SeqCst) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let have = me.spares.lock().len();
                if have >= me.want {
                    break;
                }
                match me.start_spare().await {
                    Ok(sp) => {
                        let mut s = me.spares.lock();
                        s.push(sp);
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
        // A directory of its own, which becomes the bubble's directory
        // in one rename when the spare is given a new bubble.
        let own = self.dir.join(&name);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&own)
            .map_err(|e| VmmError::Spawn(format!("{}: {e}", own.display())))?;
        let sock = socket_path(&own);
        let log = std::fs::File::create(own.join("vmm.log"))
            .map_err(|e| VmmError::Spawn(e.to_string()))?;
        let log2 = log
            .try_clone()
            .map_err(|e| VmmError::Spawn(e.to_string()))?;
        let (jail, lease) = self.jail.for_vmm()?;
        let (jail, held) = hold_claim(jail, lease.as_ref());
        let mut cmd = tokio::process::Command::new(&self.program);
        cmd.args(&self.prefix)
            .args(SpareArgs::to_args(
                &sock.display().to_string(),
                std::process::id(),
                bubble_vmm::images::shared_shim_fd(),
            ))
            .args(jail.iter().flat_map(JailArgs::to_args))
            .env_clear()
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(false)
            .process_group(0);
        // Spawned at low priority, the spare's whole start-up (exec,
        // dynamic loading, preparation) yields to bubbles booting
        // meanwhile; it gets normal priority back when it is given its
        // bubble.
        let child = launcher::launch(cmd, self.low_start)
            .await
            .map_err(|e| VmmError::Spawn(e.to_string()))?;
        drop(held);
        // Its process group (the process spawned here leads it): in a jail,
        // the waiter's (the VMM itself starts a session of its own).
        let group = child.id().unwrap_or(0);
        let log = own.join("vmm.log");
        let (stream, pid, exit, memcg) = connect_child(child, &sock, &log, lease).await?;
        Ok(Spare {
            stream,
            pid,
            group,
            exit,
            memcg,
            dir: own,
        })
    }

    /// Starts a VMM for `cfg`: a spare if one is ready, else a new process.
    pub async fn spawn(self: &Arc<Self>, cfg: &SpawnConfig) -> Result<VmmClient, VmmError> {
        let t0 = Instant::now();
        // The oldest spare: it has had the most time to prepare (its
        // preparation runs at low priority, and the bubble waits for it
        // to finish; the newest was often started by the previous create).
        let spare = {
            let mut s = self.spares.lock();
            (!s.is_empty()).then(|| s.remove(0))
        };
        let when = refill_after();
        if when == RefillAfter::Taken || spare.is_none() {
            self.refill();
        }
        let Some(mut sp) = spare else {
            return self.spawn_fresh(cfg).await;
        };
        // Whatever ends this create early starts the next spare too.
        let mut refill = RefillGuard((when != RefillAfter::Taken).then(|| self.clone()));
        give_dir(&sp.dir, cfg)?;
        let args = cfg.vmm_args();
        if self.low_start {
            priority::set_process_nice(Some(sp.pid), 0);
            // Its waiter too: it must get the CPU soon to stop dying with
            // the broker (the VMM asks it right after CONFIGURE); at nice
            // 19 on a busy host a broker killed just after READY could
            // take the bubble with it (now only a matter of promptness:
            // the waiter reads the VMM's request before it dies with the
            // broker). Not if the spare is known to be gone: its group id
            // could be reused by then.
            if sp.group != 0 && sp.exit.borrow().is_none() {
                // SAFETY: setpriority only changes a scheduling attribute
                // of the processes of a group this broker spawned.
                unsafe {
                    libc::setpriority(libc::PRIO_PGRP, sp.group, 0);
                }
            }
        }
        // Into its bubble's cgroups before its guest memory is touched:
        // on cgroup v1 the spare moves itself with the files sent along
        // with CONFIGURE, else it is placed from here.
        let t_cgroup = Instant::now();
        let (warning, tasks) = match self.jail.cgroup_for(cfg) {
            Ok(procs) if !procs.is_empty() => match cgroups::open_tasks(&procs) {
                Ok(Some(tasks)) => {
                    remove_after_exit(procs, &sp.exit, &sp.memcg);
                    (None, tasks)
                }
                _ => (confine(Ok(procs), sp.pid, &sp.exit, &sp.memcg), Vec::new()),
            },
            other => (confine(other, sp.pid, &sp.exit, &sp.memcg), Vec::new()),
        };
        let args = args.to_args();
        let frame = Request::Configure {
            args: args.iter().map(String::as_str).collect(),
        }
        .frame(0)
        .map_err(|e| VmmError::Spawn(format!("CONFIGURE: {e}")))?;
        let t_send = Instant::now();
        let sent = crate::fds::send_with(&mut sp.stream, &frame, &tasks).await;
        drop(tasks);
        let t_sent = Instant::now();
        if when == RefillAfter::Configured || sent.is_err() {
            drop(refill);
            refill = RefillGuard(None);
        }
        if sent.is_err() {
            // The spare died: start one the slow way.
            return self.spawn_fresh(cfg).await;
        }
        // No HELLO round trip for a spare that boots: its peer uid was
        // checked when it was connected, and it runs the bubble it was
        // just given; its READY (sent at the guest's READY_EARLY) and
        // any failure come as events on this connection. (A HELLO would
        // be answered only once the guest finished its start-up.) A
        // restore still says HELLO: its VMM answers at once.
        let hello = if cfg.restore {
            Hello::Check
        } else {
            Hello::Skip
        };
        let c = VmmClient::handshake(sp.stream, &cfg.bubble_id, sp.pid, Some(sp.exit), hello).await;
        if let (Some(me), Ok(c)) = (refill.0.take(), &c) {
            // Once its guest is READY (or failed, or the VMM is gone),
            // or at the latest after REFILL_WAIT.
            let settled = c.settled();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(REFILL_WAIT, settled).await;
                me.refill();
            });
        }
        let mut c = c?;
        c.jail_warning = warning;
        c.cgroups = Some(sp.memcg);
        c.started_by = Some(t0 + cfg.boot_timeout);
        c.steps = SpawnSteps {
            taken: Some(t0),
            dir: Some(t_cgroup),
            cgroup: Some(t_send),
            sent: Some(t_sent),
        };
        tracing::debug!(
            dir_us = (t_cgroup - t0).as_micros() as u64,
            cgroup_us = (t_send - t_cgroup).as_micros() as u64,
            configure_us = (t_sent - t_send).as_micros() as u64,
            handshake_us = t_sent.elapsed().as_micros() as u64,
            "spare given its bubble"
        );
        Ok(c)
    }

    /// Starts a new VMM process for `cfg`, jailed.
    async fn spawn_fresh(&self, cfg: &SpawnConfig) -> Result<VmmClient, VmmError> {
        let (jail, lease) = self.jail.for_vmm()?;
        spawn_jailed(cfg, jail, lease, self.jail.cgroup_for(cfg)).await
    }
}

static NEXT_SPARE: AtomicU64 = AtomicU64::new(0);

/// Starts the next spare when dropped still armed (a create that took a
/// spare and ended before it was due to).
struct RefillGuard(Option<Arc<Spawner>>);

impl Drop for RefillGuard {
    fn drop(&mut self) {
        if let Some(me) = self.0.take() {
            me.refill();
        }
    }
}

/// When a create that took a spare starts the next one (see
/// [`set_refill_after`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefillAfter {
    /// As soon as the spare is taken: the new process's exec and VM
    /// creation then compete with the bubble's boot for the CPUs.
    Taken,
    /// Once its CONFIGURE is sent.
    Configured,
    /// Once its guest is READY or failed (at the latest [`REFILL_WAIT`]
    /// after CONFIGURE).
    Ready,
}

/// The longest a create that took a spare delays starting the next one.
pub const REFILL_WAIT: Duration = Duration::from_secs(1);

static REFILL_AFTER: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(2);

/// Sets, process-wide, when a create that took a spare starts the next
/// one (default: [`RefillAfter::Ready`]; the bench compares them). A
/// create that found no spare starts one at once.
pub fn set_refill_after(when: RefillAfter) {
    REFILL_AFTER.store(when as u8, Ordering::Relaxed);
}

fn refill_after() -> RefillAfter {
    match REFILL_AFTER.load(Ordering::Relaxed) {
        0 => RefillAfter::Taken,
        1 => RefillAfter::Configured,
        _ => RefillAfter::Ready,
    }
}

/// Gives a spare's directory (its socket and log) to the bubble of `cfg`
/// (a jailed VMM cannot reach the bubble's directory; the VMM's
/// descriptors follow the files): one rename for a new bubble, whose
/// directory does not exist yet; else (a restore, into the bubble's
/// existing directory) a rename of each file.
fn give_dir(spare: &std::path::Path, cfg: &SpawnConfig) -> Result<(), VmmError> {
    use std::os::unix::fs::DirBuilderExt;
    if cfg.vcpus != 1 {
        return Err(VmmError::Spawn("only 1 vCPU is supported".into()));
    }
    let whole = std::fs::rename(spare, &cfg.dir).or_else(|e| match cfg.dir.parent() {
        // The first bubble: its parent directory is made first.
        Some(up) if e.kind() == std::io::ErrorKind::NotFound && spare.exists() => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(up)?;
            std::fs::rename(spare, &cfg.dir)
        }
        _ => Err(e),
    });
    if whole.is_ok() {
        return Ok(());
    }
    prepare_dir(cfg)?;
    for name in ["vmm.sock", "vmm.log"] {
        let to = cfg.dir.join(name);
        std::fs::rename(spare.join(name), &to)
            .map_err(|e| VmmError::Spawn(format!("moving {}: {e}", to.display())))?;
    }
    let _ = std::fs::remove_dir(spare);
    Ok(())
}
