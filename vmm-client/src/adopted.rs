//! The cgroups of a re-adopted VMM (one a previous broker on this data
//! directory started): removed once it exits, as a spawned VMM's are;
//! the VMMs it could not re-adopt killed by their cgroups.

use std::path::PathBuf;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::{cgroups, Spawner, VmmClient};

/// How long a removal retries a cgroup the kernel still calls busy just
/// after its last task exited.
const REMOVE_PATIENCE: Duration = Duration::from_secs(2);

impl Spawner {
    /// Removes the bubble cgroups (of this broker's hierarchy) that the
    /// re-adopted VMM behind `client` runs in, once it has exited:
    /// watched through the pidfd its connection holds, so never another
    /// process that took its number. Without a pidfd (none could be
    /// opened: it had gone already) or cgroups, nothing is watched; the
    /// broker's next start sweeps what is left.
    pub fn remove_cgroups_after_exit(&self, client: &VmmClient) {
        let Some(cg) = self.cgroups() else {
            return;
        };
        let Some(pidfd) = client.proc.pidfd() else {
            return;
        };
        let procs = cg.of_process(client.pid);
        if procs.is_empty() {
            return;
        }
        tokio::spawn(async move {
            // SAFETY: the AsyncFd owns `pidfd` and deregisters it before
            // dropping (closing) it; nothing else holds that descriptor.
            let registered = unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) };
            let Ok(fd) = registered else {
                return;
            };
            // A pidfd is readable once its process has exited.
            let _ = fd.readable().await;
            drop(fd);
            let _ = tokio::task::spawn_blocking(move || remove_when_empty(&procs)).await;
        });
    }
}

/// How long a restarted broker waits for the VMMs it kills by their
/// cgroup to exit before it removes their cgroups.
const KILL_PATIENCE: Duration = Duration::from_secs(5);

impl Spawner {
    /// Kills, by their cgroups, the VMMs a previous broker on this data
    /// directory left that this one did not re-adopt (`keep`: the pids of
    /// those it did), and removes their cgroups: see
    /// [`cgroups::Cgroups::kill_strays`]. Run once at start, after
    /// re-adoption and before any VMM is placed in a bubble cgroup.
    pub async fn kill_stray_vmms(&self, keep: Vec<u32>) -> cgroups::Strays {
        let Some(cg) = self.cgroups().cloned() else {
            return cgroups::Strays::default();
        };
        tokio::task::spawn_blocking(move || cg.kill_strays(&keep, KILL_PATIENCE))
            .await
            .unwrap_or_default()
    }
}

/// Removes the bubble cgroups of `procs`, retrying while the kernel still
/// counts the exiting task.
fn remove_when_empty(procs: &[PathBuf]) {
    if !cgroups::remove_patiently(procs, REMOVE_PATIENCE) {
        tracing::warn!(cgroups = ?procs, "a re-adopted VMM's cgroup is still busy after it exited; left for the next start");
    }
}
