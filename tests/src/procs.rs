//! The processes of a broker under test: its VMMs (spares included),
//! their jail waiters, threads and cgroups, found through `/proc`.

use std::path::Path;
use std::time::{Duration, Instant};

/// VMM processes started for `dir` (spares included): pid and command
/// line (NUL-separated).
pub(crate) fn vmm_procs_under(dir: &Path) -> Vec<(i32, String)> {
    let needle = dir.to_string_lossy().into_owned();
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).into_owned();
            if cmd.contains(crate::VMM_MARK) && cmd.contains(&needle) && !is_jail_waiter(pid, &cmd)
            {
                out.push((pid, cmd));
            }
        }
    }
    out
}

/// Whether `pid` is the waiter of a jailed VMM: the process the broker
/// spawned, whose child (forked into the new pid namespace, same command
/// line) is the VMM.
fn is_jail_waiter(pid: i32, cmd: &str) -> bool {
    // The waiter names itself right after the fork; before that, and
    // whenever its child's command line cannot be read, the child test
    // below decides.
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim_end() == "vmm:jail" {
        return true;
    }
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    children.split_whitespace().any(|c| {
        std::fs::read(format!("/proc/{c}/cmdline"))
            .is_ok_and(|child| String::from_utf8_lossy(&child) == cmd)
    })
}

/// Pids of the VMMs of a broker on `dir` but idle spares.
pub fn vmm_pids_under(dir: &Path) -> Vec<i32> {
    vmm_procs_under(dir)
        .into_iter()
        .filter(|(pid, cmd)| !is_idle_spare(*pid, cmd))
        .map(|(pid, _)| pid)
        .collect()
}

/// Waits up to `limit` for every VMM process of a broker on `dir` but idle
/// spares to be gone (a VMM told to shut down exits by itself, after it
/// acknowledged); returns whether they are.
pub async fn no_vmms_within(dir: &Path, limit: Duration) -> bool {
    let until = Instant::now() + limit;
    loop {
        if vmm_pids_under(dir).is_empty() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits up to `limit` until exactly `n` VMM processes of a broker on
/// `dir` run bubbles (idle spares aside; VMMs told to stop exit on their
/// own shortly after they acknowledge); panics with the count otherwise.
pub async fn wait_bubble_vmms(dir: &Path, n: usize, limit: Duration) {
    let until = Instant::now() + limit;
    loop {
        let now = vmm_pids_under(dir).len();
        if now == n {
            return;
        }
        assert!(
            Instant::now() < until,
            "{now} VMM processes run bubbles after {limit:?}, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The task directory of a VMM's vCPU thread: the process's leading
/// thread (see `bubble-vmm`'s `process` module).
pub fn vcpu_task(pid: u32) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("/proc/{pid}/task/{pid}"))
}

/// The nice value of a VMM's vCPU thread, if it is alive.
pub fn vcpu_nice(pid: u32) -> Option<i32> {
    let stat = std::fs::read_to_string(vcpu_task(pid).join("stat")).ok()?;
    stat_field(&stat[stat.rfind(')')? + 1..], 19)
}

/// Field `n` (1-based, as in proc(5)) of a `stat` line, given the part
/// after the command name's closing parenthesis (which starts at field 3).
fn stat_field<T: std::str::FromStr>(after_name: &str, n: usize) -> Option<T> {
    after_name.split_whitespace().nth(n - 3)?.parse().ok()
}

/// Whether a VMM process is an idle spare: its spare socket exists (a
/// spare removes it when it is given a bubble), or it has no KVM VM yet (a
/// spare still starting up, before it binds its socket).
fn is_idle_spare(pid: i32, cmdline: &str) -> bool {
    is_spare(cmdline) && (spare_socket_bound(cmdline) || !has_kvm_vm(pid))
}

/// Whether a VMM process was started as a spare.
fn is_spare(cmdline: &str) -> bool {
    cmdline.split('\0').any(|a| a == "--spare")
}

/// Whether a spare VMM's spare socket exists: it is ready to be given a
/// bubble and has not been given one yet.
pub(crate) fn spare_socket_bound(cmdline: &str) -> bool {
    let args: Vec<&str> = cmdline.split('\0').collect();
    let Some(i) = args.iter().position(|a| *a == "--spare") else {
        return false;
    };
    args.get(i + 2)
        .is_some_and(|sock| std::path::Path::new(sock).exists())
}

/// Whether process `pid` holds a KVM VM descriptor.
fn has_kvm_vm(pid: i32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|t| t.to_string_lossy().contains("kvm-vm"))
        })
}

/// Pids of idle spare VMMs of a broker on `dir`.
pub fn spare_pids_under(dir: &Path) -> Vec<i32> {
    vmm_procs_under(dir)
        .into_iter()
        .filter(|(pid, cmd)| is_idle_spare(*pid, cmd))
        .map(|(pid, _)| pid)
        .collect()
}

/// Marker in a VMM process's command line.
pub const VMM_MARK: &str = "__vmm";

/// Kills every VMM process started for `dir` (spares included), until
/// none is left (one may be starting while the broker dies).
pub fn kill_vmms_under(dir: &Path) {
    for _ in 0..50 {
        let pids: Vec<i32> = vmm_procs_under(dir).into_iter().map(|(p, _)| p).collect();
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            // SAFETY: sending a signal to a pid has no memory-safety effects.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The cgroup path of process `pid` for controller `ctl` (v1), or the
/// unified one ("").
pub fn cgroup_of(pid: u32, ctl: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, ctls, path) = (f.next()?, f.next()?, f.next()?);
        ctls.split(',').any(|c| c == ctl).then(|| path.to_string())
    })
}
