//! A pooled bubble's VMM moved under the parent that attached it.
//!
//! A pooled bubble boots with no owner, in a bubble cgroup under the
//! pool's parent cgroup (parent `""`). Once a parent attaches it, its VMM
//! is moved into a new bubble cgroup under that parent's, so that what it
//! uses from then on counts against the parent's limit. Memory it was
//! charged for before the move follows it only where the kernel moves
//! charges with a task: cgroup v1 with `memory.move_charge_at_immigrate`
//! set on the destination (refused by recent kernels, this host's
//! included); never on cgroup v2. Where the charges stay behind, the move
//! says so (see [`Moved::warning`]), never silently.

use std::path::{Path, PathBuf};

use super::{place, remove, write, CgroupError, Cgroups};

/// Where a VMM was moved, and what could not follow it.
#[derive(Debug)]
pub struct Moved {
    /// The `cgroup.procs` files of its new cgroups (the memory
    /// controller's first, as [`Cgroups::prepare`] returns them).
    pub procs: Vec<PathBuf>,
    /// Why the memory it was charged for before the move still counts
    /// against the cgroup it left and not against its new parent's, if
    /// it does (for the bubble's `jail_warning`).
    pub warning: Option<String>,
}

/// The memory a memory cgroup is charged for, bytes, if it can be read.
fn charged(memory_dir: &Path) -> Option<u64> {
    ["memory.usage_in_bytes", "memory.current"]
        .iter()
        .find_map(|f| std::fs::read_to_string(memory_dir.join(f)).ok())
        .and_then(|t| t.trim().parse().ok())
}

impl Cgroups {
    /// Moves process `pid`, which runs in the bubble cgroups `from` (as
    /// `cgroup.procs` files, memory first), into new cgroups of `bubble`
    /// under `parent`'s, with the limits [`Cgroups::prepare`] gives. On
    /// cgroup v1 it asks the kernel first to move the process's memory
    /// charges along (`memory.move_charge_at_immigrate` = 3, anonymous
    /// and file pages, on the destination). `gone` says whether the
    /// process has exited; it is asked right before the pid is written,
    /// so that a number the process left is not moved (the window left
    /// is the write itself). The cgroups of `from` are not removed here.
    pub fn move_process(
        &self,
        from: &[PathBuf],
        parent: &str,
        bubble: &str,
        guest_memory: u64,
        pid: u32,
        gone: &dyn Fn() -> bool,
    ) -> Result<Moved, CgroupError> {
        let before = from
            .first()
            .and_then(|f| f.parent())
            .and_then(charged)
            .unwrap_or(0);
        let procs = self.prepare(parent, bubble, guest_memory)?;
        let refused = if self.v2() {
            Some("cgroup v2 never moves memory charges with a process".to_string())
        } else {
            let dir = procs.first().and_then(|f| f.parent());
            match dir.map(|d| write(&d.join("memory.move_charge_at_immigrate"), "3")) {
                Some(Ok(())) => None,
                Some(Err(CgroupError::Write { source, .. })) => Some(format!(
                    "the kernel refused memory.move_charge_at_immigrate ({source})"
                )),
                Some(Err(e)) => Some(e.to_string()),
                None => Some("no memory cgroup to move charges to".to_string()),
            }
        };
        if gone() {
            remove(&procs);
            return Err(CgroupError::Gone);
        }
        if let Err(e) = place(&procs, pid) {
            // Where the process was in part moved, `remove` keeps that
            // cgroup (it has a task); the broker's next start sweeps it.
            remove(&procs);
            return Err(match e {
                CgroupError::Write { source, .. } if source.raw_os_error() == Some(libc::ESRCH) => {
                    CgroupError::Gone
                }
                e => e,
            });
        }
        let warning = refused.map(|why| {
            format!(
                "memory charged while pooled ({} KiB) stays with the pool's cgroup, not the parent's: {why}",
                before >> 10
            )
        });
        Ok(Moved { procs, warning })
    }
}
