//! A pooled bubble's VMM charged to the parent that attached it (see
//! `cgroups::moving`).

use std::time::Duration;

use crate::cgroups::{self, CgroupError};
use crate::{Spawner, VmmClient};

/// How long removing the pool cgroup a moved VMM left retries while the
/// kernel still counts it there.
const LEFT_PATIENCE: Duration = Duration::from_secs(2);

impl Spawner {
    /// Moves the VMM behind `client` (one this broker spawned for a pooled
    /// bubble) into a new bubble cgroup of `bubble` under `parent`'s, with
    /// its limits for `guest_memory`, and removes the cgroups it leaves.
    /// Blocking work (moving a whole process takes the kernel's
    /// thread-group lock, which can wait an RCU grace period) runs off the
    /// caller's thread. Returns what could not follow the VMM (its memory
    /// charges, where the kernel does not move them), for its bubble's
    /// jail warning; `Ok(None)` also where there is nothing to move: no
    /// cgroups on this broker (every bubble's warning says so already), a
    /// re-adopted VMM, or one that never got its cgroup.
    pub async fn move_to_parent(
        &self,
        client: &VmmClient,
        parent: &str,
        bubble: &str,
        guest_memory: u64,
    ) -> Result<Option<String>, CgroupError> {
        let (Some(cg), Some(slot)) = (self.cgroups().cloned(), client.cgroups.clone()) else {
            return Ok(None);
        };
        let from = slot.procs();
        if from.is_empty() {
            return Ok(None);
        }
        let (proc, pid) = (client.proc.clone(), client.pid);
        let (parent, bubble) = (parent.to_string(), bubble.to_string());
        let moved = tokio::task::spawn_blocking(move || {
            let moved = cg.move_process(&from, &parent, &bubble, guest_memory, pid, &|| {
                proc.exited()
            })?;
            slot.set(moved.procs.clone());
            cgroups::remove_patiently(&from, LEFT_PATIENCE);
            // Its reaper removes the cgroups it runs in when it exits; if
            // that came before the new ones were noted, remove them here.
            if proc.exited() {
                cgroups::remove_patiently(&moved.procs, LEFT_PATIENCE);
            }
            Ok::<_, CgroupError>(moved.warning)
        })
        .await
        .map_err(|e| CgroupError::Task(e.to_string()))??;
        Ok(moved)
    }
}
