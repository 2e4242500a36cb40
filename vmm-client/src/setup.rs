//! What every way of starting a VMM shares: its configuration and
//! arguments, its directory, its uid claim and its cgroups.

use std::path::PathBuf;
use std::time::Duration;

use bubble_vmm::images::GuestImage;
use bubble_vmm::jail::JailArgs;
use bubble_vmm::process::{VmmArgs, DEFAULT_RESTORE_DEADLINE};

use crate::cgroups;
use crate::client::socket_path;
use crate::exit::{ExitWatch, MemcgSlot};
use crate::uids::UidLease;
use crate::vmm_error::VmmError;

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

impl SpawnConfig {
    /// The VMM's arguments for this bubble (its socket in its directory).
    pub(crate) fn vmm_args(&self) -> VmmArgs {
        VmmArgs {
            bubble_id: self.bubble_id.clone(),
            memory_mib: self.memory_mib,
            image: self.image.clone(),
            socket: socket_path(&self.dir),
            max_payload: self.max_payload,
            boot_timeout: self.boot_timeout,
            restore: self.restore,
            image_fd: image_fd_for(&self.image),
            poll: self.poll,
            parent_pid: self.die_with_broker.then(std::process::id),
            restore_deadline: DEFAULT_RESTORE_DEADLINE,
        }
    }
}

/// `jail` with the descriptor of `lease`'s host-wide claim for the VMM to
/// hold (see [`UidLease::inheritable`]), and that descriptor, to be
/// dropped once the VMM is spawned.
pub(crate) fn hold_claim(
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

pub(crate) fn prepare_dir(cfg: &SpawnConfig) -> Result<(), VmmError> {
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

/// Moves VMM `pid` into the cgroups `procs` lists and removes them once
/// it has exited; returns what went wrong, as the VMM's jail warning.
pub(crate) fn confine(
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
pub(crate) fn remove_after_exit(procs: Vec<PathBuf>, exit: &ExitWatch, memcg: &MemcgSlot) {
    // The memory controller's comes first (see `Cgroups::prepare`).
    memcg.set(procs);
    let mut exit = exit.clone();
    let memcg = memcg.clone();
    tokio::spawn(async move {
        let _ = exit.wait_for(Option::is_some).await;
        cgroups::remove(&memcg.procs());
    });
}
