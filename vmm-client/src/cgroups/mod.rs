//! A cgroup per bubble, nested under a cgroup per parent: memory (guest
//! memory plus the VMM's own), process count and CPU weight. cgroup v2
//! where it is mounted with controllers, v1 controllers otherwise.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

mod moving;
pub mod parents;
mod strays;
mod sweep;
pub use moving::Moved;
pub use strays::Strays;
pub use sweep::HOST_CLAIMS;

/// Where the host's cgroup file systems are mounted.
const ROOT: &str = "/sys/fs/cgroup";

/// Memory a VMM uses beyond its guest's (code, stacks, buffers), bytes.
pub const VMM_OVERHEAD: u64 = 64 << 20;
/// Most tasks (threads) in a bubble's cgroup: a VMM runs five at most.
pub const PIDS_MAX: u32 = 16;

/// Why a bubble's cgroup could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No cgroup file system with a memory controller is mounted.
    #[error("no cgroup memory controller is mounted (neither v2 nor v1)")]
    NotMounted,
    /// The blocking task that moved a process did not finish.
    #[error("the cgroup move did not finish: {0}")]
    Task(String),
    /// The process to move had exited.
    #[error("the VMM exited before it could be moved")]
    Gone,
    /// A cgroup file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The kernel's answer.
        source: std::io::Error,
    },
}

#[derive(Debug)]
enum Layout {
    /// The broker's cgroup in the unified hierarchy.
    V2(PathBuf),
    /// The broker's cgroup in each v1 controller's hierarchy.
    V1 {
        memory: PathBuf,
        pids: PathBuf,
        cpu: PathBuf,
    },
}

/// The cgroups of one broker's bubbles.
#[derive(Debug)]
pub struct Cgroups {
    layout: Layout,
    /// Memory limit of each parent's cgroup, bytes.
    parent_memory: u64,
    /// This broker's claim on its hierarchy name (see [`sweep`]).
    _claim: Option<sweep::HierarchyClaim>,
    /// Whether what is in its hierarchy is this broker's to kill and
    /// remove: it holds the claim (or, in unit tests, none was wanted).
    owned: bool,
    /// The parents whose cgroups are in place.
    parents: parents::Parents,
}

fn write(path: &Path, text: &str) -> Result<(), CgroupError> {
    std::fs::write(path, text).map_err(|source| CgroupError::Write {
        path: path.to_path_buf(),
        source,
    })
}

fn mkdir(path: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(path) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(CgroupError::Write {
            path: path.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// A file-name-safe name for a parent (owner names are free text).
fn parent_name(parent: &str) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parent.hash(&mut h);
    format!("p-{:016x}", h.finish())
}

fn bubble_name(bubble: &str) -> String {
    bubble
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl Cgroups {
    /// Finds the mounted cgroup hierarchy; this broker's cgroups are
    /// named `name` under its root. `parent_memory`: each parent's
    /// memory limit, bytes.
    pub fn detect(name: &str, parent_memory: u64) -> Result<Self, CgroupError> {
        Self::detect_at(Path::new(ROOT), name, parent_memory, true)
    }

    /// [`Cgroups::detect`] under `root` (the unit tests give a directory
    /// laid out as a v1 or v2 hierarchy); `claim`: take and honour the
    /// host-wide claim on the hierarchy's name (see [`sweep`]).
    fn detect_at(
        root: &Path,
        name: &str,
        parent_memory: u64,
        claim: bool,
    ) -> Result<Self, CgroupError> {
        let v2 = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        let layout = if v2.split_whitespace().any(|c| c == "memory") {
            Layout::V2(root.join(name))
        } else if root.join("memory/memory.limit_in_bytes").exists() {
            Layout::V1 {
                memory: root.join("memory").join(name),
                pids: root.join("pids").join(name),
                cpu: root.join("cpu").join(name),
            }
        } else {
            return Err(CgroupError::NotMounted);
        };
        // Claimed before anything is made in it, and cleared of what an
        // earlier broker on this data directory left (cgroups with a
        // process in them, such as a re-adoptable VMM's, stay).
        let claim_wanted = claim;
        let claim = if claim { sweep::claim(name) } else { None };
        let claimed = claim.is_some();
        let cg = Self {
            layout,
            parent_memory,
            _claim: claim,
            owned: claimed || !claim_wanted,
            parents: parents::Parents::default(),
        };
        if claimed {
            for base in cg.bases() {
                sweep::remove_empty(&base);
            }
        } else if claim_wanted {
            // Unclaimed, another broker's sweeper could take this
            // hierarchy for a dead one's: sweep nothing from here either.
            tracing::warn!(
                dir = sweep::HOST_CLAIMS,
                "cannot claim this broker's cgroup hierarchy; leftover cgroups are not swept"
            );
        }
        Ok(cg)
    }

    /// Whether this is the unified (v2) hierarchy.
    fn v2(&self) -> bool {
        matches!(self.layout, Layout::V2(_))
    }

    /// This broker's hierarchy in each controller's tree.
    fn bases(&self) -> Vec<PathBuf> {
        match &self.layout {
            Layout::V2(b) => vec![b.clone()],
            Layout::V1 { memory, pids, cpu } => vec![memory.clone(), pids.clone(), cpu.clone()],
        }
    }

    /// Removes the empty cgroups of hierarchies that brokers of this host
    /// left behind and no running broker claims (see `sweep`); how many
    /// were removed entirely. Slow with many (each `rmdir` of a memory
    /// cgroup waits for the kernel): run it off the serving path.
    pub fn sweep_stale(&self) -> usize {
        if self._claim.is_none() {
            return 0;
        }
        let bases = self.bases();
        let Some(own) = bases
            .first()
            .and_then(|b| b.file_name())
            .and_then(|n| n.to_str())
        else {
            return 0;
        };
        let roots: Vec<PathBuf> = bases
            .iter()
            .filter_map(|b| b.parent().map(Path::to_path_buf))
            .collect();
        sweep::sweep_stale(&roots, own)
    }

    /// The bubble cgroups of this broker's hierarchy that process `pid`
    /// runs in, as the `cgroup.procs` files [`remove`] takes (memory
    /// controller first, as [`Cgroups::prepare`] returns them). Only
    /// cgroups exactly two levels below this broker's (`<parent>/<VMM>`)
    /// are named, never another broker's or a parent's.
    pub fn of_process(&self, pid: u32) -> Vec<PathBuf> {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
            return Vec::new();
        };
        // `ID:CONTROLLERS:PATH`; v2's line is `0::PATH`.
        let path_of = |ctl: &str| {
            text.lines().find_map(|l| {
                let mut f = l.splitn(3, ':');
                let (_, ctls, path) = (f.next()?, f.next()?, f.next()?);
                ctls.split(',').any(|c| c == ctl).then(|| path.to_string())
            })
        };
        let wanted = match &self.layout {
            Layout::V2(base) => vec![(base, path_of(""))],
            Layout::V1 { memory, pids, cpu } => vec![
                (memory, path_of("memory")),
                (pids, path_of("pids")),
                (cpu, path_of("cpu")),
            ],
        };
        wanted
            .into_iter()
            .filter_map(|(base, path)| {
                let dir = base.parent()?.join(path?.trim_start_matches('/'));
                let below = dir.strip_prefix(base).ok()?.components();
                let normal = below
                    .map(|c| matches!(c, std::path::Component::Normal(_)))
                    .collect::<Vec<_>>();
                (normal.len() == 2 && normal.iter().all(|n| *n)).then(|| dir.join("cgroup.procs"))
            })
            .collect()
    }

    /// Creates the cgroups of `parent`'s `bubble` with their limits,
    /// and the parent's own (with its limit) unless they are in place
    /// already (see [`parents`]); returns the files a VMM's pid is
    /// written to (see [`place`]).
    pub fn prepare(
        &self,
        parent: &str,
        bubble: &str,
        guest_memory: u64,
    ) -> Result<Vec<PathBuf>, CgroupError> {
        // One cgroup per VMM, not per bubble: a restored bubble's new VMM
        // must not share a memory cgroup (and its limit) with the previous
        // VMM of the same bubble while that one is still exiting.
        static INSTANCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = INSTANCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (p, b) = (parent_name(parent), format!("{}.v{n}", bubble_name(bubble)));
        let memory = guest_memory + VMM_OVERHEAD;
        self.parents.with_parent(
            &p,
            || self.make_parent(&p),
            || self.make_bubble(&p, &b, memory),
        )
    }

    /// Makes `p`'s cgroups (and this broker's) with the parent's limit.
    fn make_parent(&self, p: &str) -> Result<(), CgroupError> {
        match &self.layout {
            Layout::V2(base) => {
                let enable = "+memory +pids +cpu";
                if let Some(root) = base.parent() {
                    write(&root.join("cgroup.subtree_control"), enable)?;
                }
                mkdir(base)?;
                write(&base.join("cgroup.subtree_control"), enable)?;
                let pdir = base.join(p);
                mkdir(&pdir)?;
                write(&pdir.join("memory.max"), &self.parent_memory.to_string())?;
                write(&pdir.join("cgroup.subtree_control"), enable)
            }
            Layout::V1 { memory, pids, cpu } => {
                for base in [memory, pids, cpu] {
                    mkdir(base)?;
                    mkdir(&base.join(p))?;
                }
                let limit = memory.join(p).join("memory.limit_in_bytes");
                write(&limit, &self.parent_memory.to_string())
            }
        }
    }

    /// Makes bubble cgroup `b` in parent `p`'s (which must exist) with
    /// its limits: `memory` bytes, [`PIDS_MAX`] tasks, the default CPU
    /// weight.
    fn make_bubble(&self, p: &str, b: &str, memory: u64) -> Result<Vec<PathBuf>, CgroupError> {
        // Never mkdir -p: a parent's cgroup is made only with its limit.
        let leaf = |dir: &Path| match std::fs::create_dir(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(CgroupError::Write {
                path: dir.to_path_buf(),
                source: e,
            }),
            _ => Ok(()),
        };
        match &self.layout {
            Layout::V2(base) => {
                let bdir = base.join(p).join(b);
                leaf(&bdir)?;
                write(&bdir.join("memory.max"), &memory.to_string())?;
                write(&bdir.join("pids.max"), &PIDS_MAX.to_string())?;
                write(&bdir.join("cpu.weight"), "100")?;
                Ok(vec![bdir.join("cgroup.procs")])
            }
            Layout::V1 {
                memory: m,
                pids,
                cpu,
            } => {
                let mut procs = Vec::with_capacity(3);
                for (base, file, value) in [
                    (m, "memory.limit_in_bytes", memory.to_string()),
                    (pids, "pids.max", PIDS_MAX.to_string()),
                    (cpu, "cpu.shares", "1024".to_string()),
                ] {
                    let bdir = base.join(p).join(b);
                    leaf(&bdir)?;
                    write(&bdir.join(file), &value)?;
                    procs.push(bdir.join("cgroup.procs"));
                }
                Ok(procs)
            }
        }
    }

    /// Removes the parent cgroups no bubble was made in since the last
    /// call and that are empty (run every [`parents::GRACE`]); how many
    /// parents' cgroups went.
    pub fn sweep_parents(&self) -> usize {
        let bases = self.bases();
        let mut on_disk: Vec<String> = bases
            .iter()
            .filter_map(|b| std::fs::read_dir(b).ok())
            .flat_map(|rd| rd.flatten())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.starts_with("p-"))
            .collect();
        on_disk.sort();
        on_disk.dedup();
        self.parents.sweep(&on_disk, |p| {
            // Every controller's, even after one kept its cgroup.
            let kept = bases
                .iter()
                .filter(|b| {
                    let dir = b.join(p);
                    std::fs::remove_dir(&dir).is_err() && dir.exists()
                })
                .count();
            kept == 0
        })
    }
}

/// The `tasks` files beside `procs` (cgroup v1; memory controller first,
/// as [`Cgroups::prepare`] orders them), opened for writing: a spare VMM
/// given them with CONFIGURE moves its own threads in by writing `0`,
/// which costs microseconds where writing its pid to `cgroup.procs` here
/// waits for an RCU grace period (milliseconds) on most creates. `None`
/// on cgroup v2 (no `tasks` files): then use [`place`].
pub fn open_tasks(procs: &[PathBuf]) -> Result<Option<Vec<std::fs::File>>, CgroupError> {
    let mut out = Vec::with_capacity(procs.len());
    for p in procs {
        let path = p.with_file_name("tasks");
        match std::fs::OpenOptions::new().write(true).open(&path) {
            Ok(f) => out.push(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && out.is_empty() => {
                return Ok(None)
            }
            Err(source) => return Err(CgroupError::Write { path, source }),
        }
    }
    Ok((!out.is_empty()).then_some(out))
}

/// Moves process `pid` (all its threads) into the cgroups of `procs`.
pub fn place(procs: &[PathBuf], pid: u32) -> Result<(), CgroupError> {
    for f in procs {
        write(f, &pid.to_string())?;
    }
    Ok(())
}

/// Whether the kernel killed a task of the memory cgroup `dir` because
/// `dir`'s own limit was reached. The kill counters (v1
/// `memory.oom_control`, v2 `memory.events`: `oom_kill N`) count kills by
/// any OOM killer, a host-wide one and an ancestor's limit included (which
/// a hostile tenant could cause), so the cgroup must also have hit its own
/// limit: v2 `memory.events.local` `oom N`, v1 `memory.failcnt`.
pub fn oom_killed(dir: &Path) -> bool {
    let count = |file: &str, key: &str| -> Option<u64> {
        let text = std::fs::read_to_string(dir.join(file)).ok()?;
        text.lines().find_map(|l| {
            l.strip_prefix(key)
                .and_then(|r| r.strip_prefix(' '))
                .and_then(|n| n.trim().parse().ok())
        })
    };
    let own_limit_hit = match count("memory.events.local", "oom") {
        Some(n) => n > 0,
        None => std::fs::read_to_string(dir.join("memory.failcnt"))
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
            .is_some_and(|n| n > 0),
    };
    let killed = count("memory.events", "oom_kill")
        .or_else(|| count("memory.oom_control", "oom_kill"))
        .is_some_and(|n| n > 0);
    own_limit_hit && killed
}

/// [`remove`], retried for up to `patience` until the bubble cgroups of
/// `procs` are gone (the kernel may still count a task that has just
/// exited or left); whether they are.
pub fn remove_patiently(procs: &[PathBuf], patience: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + patience;
    loop {
        remove(procs);
        let left = procs.iter().filter_map(|f| f.parent()).any(Path::exists);
        if !left {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Removes the bubble cgroups of `procs` once their VMM is gone. Its
/// parent's stay for the next bubble of that parent, until
/// [`Cgroups::sweep_parents`] finds them unused; the broker's stay while
/// it runs (a broker's next start removes them if empty).
pub fn remove(procs: &[PathBuf]) {
    for f in procs {
        if let Some(dir) = f.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

#[cfg(test)]
mod tests;
