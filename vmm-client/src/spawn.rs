//! Starting VMM processes: spares kept ahead of need, fresh starts.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use tokio::net::UnixStream;

use bubble_vmm::control::Request;
use bubble_vmm::images::GuestImage;
use bubble_vmm::jail::JailArgs;
use bubble_vmm::priority;
use bubble_vmm::process::{SpareArgs, VmmArgs, DEFAULT_RESTORE_DEADLINE};

use crate::cgroups::{self, Cgroups};
use crate::client::{socket_path, Hello, VmmClient};
use crate::exit::{ExitWatch, MemcgSlot, VmmExit};
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

/// How to start a VMM process.
#[derive(Clone, Debug)]
pub struct SpawnConfig {
    /// Bubble id.
    pub bubble_id: String,
    /// Its parent (owner), whose cgroup its own is nested in.
    pub parent: String,
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
    /// The VMM dies with this process (`PR_SET_PDEATHSIG`) instead of
    /// waiting to be re-adopted by a restarted broker.
    pub die_with_broker: bool,
    /// How long the guest may take to start (both phases: to READY_EARLY
    /// and on to READY) before its VMM fails it (`boot_timeout`).
    pub boot_timeout: Duration,
}

/// A spare VMM process waiting for its bubble.
struct Spare {
    stream: UnixStream,
    pid: u32,
    exit: ExitWatch,
    /// Where its memory cgroup is, once it has one (see [`MemcgSlot`]).
    memcg: MemcgSlot,
    /// Its socket and log, moved into the bubble's directory when it is
    /// given one (a jailed VMM cannot reach that directory).
    sock: PathBuf,
    log: PathBuf,
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
        let sock = self.dir.join(format!("{name}.sock"));
        let log = std::fs::File::create(self.dir.join(format!("{name}.log")))
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
        let log = self.dir.join(format!("{name}.log"));
        let (stream, pid, exit, memcg) = connect_child(child, &sock, &log, lease).await?;
        Ok(Spare {
            stream,
            pid,
            exit,
            memcg,
            sock,
            log,
        })
    }

    /// Starts a VMM for `cfg`: a spare if one is ready, else a new process.
    pub async fn spawn(self: &Arc<Self>, cfg: &SpawnConfig) -> Result<VmmClient, VmmError> {
        let t0 = std::time::Instant::now();
        // The oldest spare: it has had the most time to prepare (its
        // preparation runs at low priority, and the bubble waits for it
        // to finish; the newest was often started by the previous create).
        let spare = {
            let mut s = self.spares.lock();
            (!s.is_empty()).then(|| s.remove(0))
        };
        self.refill();
        let Some(mut sp) = spare else {
            return self.spawn_fresh(cfg).await;
        };
        prepare_dir(cfg)?;
        // The spare's socket and log become the bubble's, moved (a jailed
        // VMM cannot reach the bubble's directory; the VMM's descriptors
        // follow the files).
        for (from, to) in [
            (&sp.sock, socket_path(&cfg.dir)),
            (&sp.log, cfg.dir.join("vmm.log")),
        ] {
            std::fs::rename(from, &to)
                .map_err(|e| VmmError::Spawn(format!("moving {}: {e}", to.display())))?;
        }
        let args = VmmArgs {
            bubble_id: cfg.bubble_id.clone(),
            memory_mib: cfg.memory_mib,
            image: cfg.image.clone(),
            socket: socket_path(&cfg.dir),
            max_payload: cfg.max_payload,
            boot_timeout: cfg.boot_timeout,
            restore: cfg.restore,
            image_fd: image_fd_for(&cfg.image),
            poll: cfg.poll,
            parent_pid: cfg.die_with_broker.then(std::process::id),
            restore_deadline: DEFAULT_RESTORE_DEADLINE,
        };
        if self.low_start {
            priority::set_process_nice(Some(sp.pid), 0);
        }
        // Into its bubble's cgroups before its guest memory is touched:
        // on cgroup v1 the spare moves itself with the files sent along
        // with CONFIGURE, else it is placed from here.
        let t_cgroup = t0.elapsed();
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
        let t_send = t0.elapsed();
        if crate::fds::send_with(&mut sp.stream, &frame, &tasks)
            .await
            .is_err()
        {
            // The spare died: start one the slow way.
            return self.spawn_fresh(cfg).await;
        }
        drop(tasks);
        let t_sent = t0.elapsed();
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
        let mut c =
            VmmClient::handshake(sp.stream, &cfg.bubble_id, sp.pid, Some(sp.exit), hello).await?;
        c.jail_warning = warning;
        c.cgroups = Some(sp.memcg);
        c.started_by = Some(t0 + cfg.boot_timeout);
        tracing::debug!(
            dir_us = t_cgroup.as_micros() as u64,
            cgroup_us = (t_send - t_cgroup).as_micros() as u64,
            configure_us = (t_sent - t_send).as_micros() as u64,
            handshake_us = (t0.elapsed() - t_sent).as_micros() as u64,
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

/// `jail` with the descriptor of `lease`'s host-wide claim for the VMM to
/// hold (see [`UidLease::inheritable`]), and that descriptor, to be
/// dropped once the VMM is spawned.
fn hold_claim(
    jail: Option<JailArgs>,
    lease: Option<&UidLease>,
) -> (Option<JailArgs>, Option<std::os::fd::OwnedFd>) {
    use std::os::fd::AsRawFd;
    let held = lease.and_then(UidLease::inheritable);
    let jail = jail.map(|mut j| {
        j.hold_fd = held.as_ref().map(AsRawFd::as_raw_fd);
        j
    });
    (jail, held)
}

/// The shared shim descriptor for a VMM that boots the shim.
fn image_fd_for(image: &GuestImage) -> Option<i32> {
    match image {
        GuestImage::Shim => bubble_vmm::images::shared_shim_fd(),
        _ => None,
    }
}

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
    lease: Option<UidLease>,
) -> Result<(UnixStream, u32, ExitWatch, MemcgSlot), VmmError> {
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
    // The VMM is the process that listens on the socket, as the kernel
    // says: its host pid (in a jail, the child of the process spawned
    // here) and the uid it was given.
    // SAFETY: getuid has no preconditions.
    let want = lease
        .as_ref()
        .map_or(unsafe { libc::getuid() }, UidLease::uid);
    let cred = stream.peer_cred().map_err(|e| VmmError::Connect {
        path: sock.display().to_string(),
        detail: format!("no peer credentials: {e}"),
    })?;
    let pid = cred.pid().and_then(|p| u32::try_from(p).ok()).unwrap_or(0);
    if cred.uid() != want || pid == 0 {
        let _ = child.start_kill();
        return Err(VmmError::PeerUid {
            got: cred.uid(),
            want,
        });
    }
    // Reap the child when it exits (it stays our child while we live),
    // keeping how it ended for its client. Its uid is free again only
    // then (a jailed VMM's spawned process waits for the VMM).
    let (tx, rx) = tokio::sync::watch::channel(None);
    let memcg = MemcgSlot::default();
    let slot = memcg.clone();
    tokio::spawn(async move {
        let exit = match child.wait().await {
            Ok(st) => VmmExit::from_status(st),
            Err(e) => VmmExit::Closed(format!("cannot wait for the VMM: {e}")),
        };
        // A SIGKILL from the kernel's OOM killer, told apart by its
        // cgroup's count (read before the cgroup is removed: removal
        // waits for this exit).
        let exit = match (exit, slot.memory_dir()) {
            (VmmExit::Signal(libc::SIGKILL), Some(dir)) if cgroups::oom_killed(&dir) => {
                VmmExit::MemoryLimit
            }
            (e, _) => e,
        };
        drop(lease);
        let _ = tx.send(Some(exit));
    });
    Ok((stream, pid, rx, memcg))
}

/// Moves VMM `pid` into the cgroups `procs` lists and removes them once
/// it has exited; returns what went wrong, as the VMM's jail warning.
fn confine(
    procs: Result<Vec<PathBuf>, String>,
    pid: u32,
    exit: &ExitWatch,
    memcg: &MemcgSlot,
) -> Option<String> {
    let procs = match procs {
        Ok(p) if p.is_empty() => return None,
        Ok(p) => p,
        Err(why) => return Some(why),
    };
    if let Err(e) = cgroups::place(&procs, pid) {
        tracing::warn!(pid, error = %e, "VMM runs without its cgroup");
        return Some(format!("no cgroup: {e}"));
    }
    remove_after_exit(procs, exit, memcg);
    None
}

/// Notes that the VMM runs in the cgroups of `procs` and removes the
/// ones it runs in (these, or those it was moved to) once it has exited.
fn remove_after_exit(procs: Vec<PathBuf>, exit: &ExitWatch, memcg: &MemcgSlot) {
    // The memory controller's comes first (see `Cgroups::prepare`).
    memcg.set(procs);
    let mut exit = exit.clone();
    let memcg = memcg.clone();
    tokio::spawn(async move {
        let _ = exit.wait_for(Option::is_some).await;
        cgroups::remove(&memcg.procs());
    });
}

/// Spawns a VMM process (not jailed in namespaces) and connects to it
/// (READY comes later: see [`VmmClient::wait_ready`]).
pub async fn spawn(cfg: &SpawnConfig) -> Result<VmmClient, VmmError> {
    spawn_jailed(cfg, None, None, Ok(Vec::new())).await
}

async fn spawn_jailed(
    cfg: &SpawnConfig,
    jail: Option<JailArgs>,
    lease: Option<UidLease>,
    cgroup: Result<Vec<PathBuf>, String>,
) -> Result<VmmClient, VmmError> {
    let t0 = std::time::Instant::now();
    prepare_dir(cfg)?;
    let (jail, held) = hold_claim(jail, lease.as_ref());
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
        boot_timeout: cfg.boot_timeout,
        restore: cfg.restore,
        image_fd: image_fd_for(&cfg.image),
        poll: cfg.poll,
        parent_pid: cfg.die_with_broker.then(std::process::id),
        restore_deadline: DEFAULT_RESTORE_DEADLINE,
    };
    let mut cmd = tokio::process::Command::new(&cfg.program);
    cmd.args(&cfg.program_args_prefix)
        .args(args.to_args())
        .args(jail.iter().flat_map(JailArgs::to_args))
        .env_clear()
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log2)
        .kill_on_drop(false);
    // Its own process group: signals to the broker's group (Ctrl-C, a
    // service manager stopping the broker) do not reach the bubble, which
    // survives a broker restart. Unlike setsid in a pre_exec hook this
    // keeps the fast posix_spawn path.
    cmd.process_group(0);
    let child = launcher::launch(cmd, false)
        .await
        .map_err(|e| VmmError::Spawn(e.to_string()))?;
    drop(held);
    let (stream, pid, exit, memcg) = connect_child(child, &sock, &log_path, lease).await?;
    // Into its cgroup as soon as it is known (it builds its VM meanwhile:
    // pages it touched before stay charged where its spawner's are).
    let warning = confine(cgroup, pid, &exit, &memcg);
    let mut c = VmmClient::handshake(stream, &cfg.bubble_id, pid, Some(exit), Hello::Check).await?;
    c.jail_warning = warning;
    c.cgroups = Some(memcg);
    c.started_by = Some(t0 + cfg.boot_timeout);
    Ok(c)
}
