//! Thread priorities: work done beside bubbles (a spare VMM starting up, a
//! VMM exiting) runs at low priority, so that bubbles booting meanwhile go
//! first. Lowering is always allowed; raising again needs privileges (see
//! [`can_raise`]).

/// Nice value of work done beside bubbles.
pub const BACKGROUND_NICE: libc::c_int = 19;

/// Sets the nice value of thread `tid` (0: the calling thread); returns
/// whether it took.
pub fn set_nice(tid: libc::id_t, nice: libc::c_int) -> bool {
    // SAFETY: on Linux, PRIO_PROCESS names one thread (0: the caller);
    // setpriority only changes a scheduling attribute, no memory.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) == 0 }
}

/// Sets the nice value of every thread of process `pid` (`None`: this one).
pub fn set_process_nice(pid: Option<u32>, nice: libc::c_int) {
    let dir = match pid {
        Some(p) => format!("/proc/{p}/task"),
        None => "/proc/self/task".to_string(),
    };
    for t in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if let Ok(tid) = t.file_name().to_string_lossy().parse::<libc::id_t>() {
            set_nice(tid, nice);
        }
    }
}

/// Whether this process may raise priorities again after lowering them
/// (root, CAP_SYS_NICE or a generous RLIMIT_NICE), tried on a throwaway
/// thread.
pub fn can_raise() -> bool {
    std::thread::spawn(|| set_nice(0, BACKGROUND_NICE) && set_nice(0, 0))
        .join()
        .unwrap_or(false)
}

/// Sets the nice value of every thread of this process without reading
/// `/proc` (which a sealed VMM may not open): the whole process group when
/// this process leads its own (a VMM always does), else the calling
/// thread only.
pub fn set_own_group_nice(nice: libc::c_int) {
    // SAFETY: getpgrp and getpid have no preconditions; setpriority only
    // changes a scheduling attribute of our own group.
    unsafe {
        if libc::getpgrp() == libc::getpid() {
            libc::setpriority(libc::PRIO_PGRP, 0, nice);
        } else {
            set_nice(0, nice);
        }
    }
}
