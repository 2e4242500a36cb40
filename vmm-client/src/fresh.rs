//! Starting a VMM process the slow way (no spare): spawn, connect, check
//! its peer, reap it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::net::UnixStream;

use bubble_vmm::jail::JailArgs;

use crate::cgroups;
use crate::client::{socket_path, Hello, SpawnSteps, VmmClient};
use crate::exit::{ExitWatch, MemcgSlot, VmmExit};
use crate::launcher;
use crate::setup::{confine, hold_claim, prepare_dir, SpawnConfig};
use crate::uids::UidLease;
use crate::vmm_error::VmmError;

/// Waits for a freshly spawned VMM's socket and connects; reaps the child
/// in the background.
pub(crate) async fn connect_child(
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

/// Spawns a VMM process (not jailed in namespaces) and connects to it
/// (READY comes later: see [`VmmClient::wait_ready`]).
pub async fn spawn(cfg: &SpawnConfig) -> Result<VmmClient, VmmError> {
    spawn_jailed(cfg, None, None, Ok(Vec::new())).await
}

pub(crate) async fn spawn_jailed(
    cfg: &SpawnConfig,
    jail: Option<JailArgs>,
    lease: Option<UidLease>,
    cgroup: Result<Vec<PathBuf>, String>,
) -> Result<VmmClient, VmmError> {
    let t0 = Instant::now();
    prepare_dir(cfg)?;
    let (jail, held) = hold_claim(jail, lease.as_ref());
    let sock = socket_path(&cfg.dir);
    let log_path = cfg.dir.join("vmm.log");
    let log = std::fs::File::create(&log_path)
        .map_err(|e| VmmError::Spawn(format!("{}: {e}", log_path.display())))?;
    let log2 = log
        .try_clone()
        .map_err(|e| VmmError::Spawn(e.to_string()))?;
    let args = cfg.vmm_args();
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
    let t_sent = Instant::now();
    let warning = confine(cgroup, pid, &exit, &memcg);
    let t_cgroup = Instant::now();
    let mut c = VmmClient::handshake(stream, &cfg.bubble_id, pid, Some(exit), Hello::Check).await?;
    c.jail_warning = warning;
    c.cgroups = Some(memcg);
    c.started_by = Some(t0 + cfg.boot_timeout);
    c.steps = SpawnSteps {
        taken: None,
        dir: None,
        cgroup: Some(t_cgroup),
        sent: Some(t_sent),
    };
    Ok(c)
}
