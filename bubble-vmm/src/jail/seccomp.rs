//! System-call allowlists, one per VMM thread, built with `seccompiler`
//! and installed by each thread on itself before the guest first runs
//! (the vCPU thread waits until every other living thread has sealed
//! itself: threads share memory, so one unfiltered thread would undo the
//! others' filters). A call outside a thread's list kills the whole
//! process with SIGSYS (`SECCOMP_RET_KILL_PROCESS`); the broker reports
//! that as a failure whose reason names seccomp.
//!
//! The lists were built by tracing the VMM (`strace -f`) through fresh
//! starts, spares, calls, failures, suspend, restore and shutdown, and
//! keeping, per thread, only what it issues after its filter is in place.
//! `docs/jail.md` has the same lists with the reasons.

use std::collections::BTreeMap;

use parking_lot::{Condvar, Mutex};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

use super::JailError;

/// The threads of a VMM, each with its own list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Thread {
    /// Runs the guest (KVM_RUN) and serves the broker's requests.
    Vcpu,
    /// Kicks the vCPU out of KVM_RUN when a deadline passes.
    Watchdog,
    /// Accepts the broker's (re)connections and hands them on.
    Control,
    /// Ends the process a moment after a failure was reported.
    Linger,
}

/// KVM ioctl request numbers the vCPU thread issues once the guest runs.
pub mod kvm {
    /// Run the guest until its next exit.
    pub const RUN: u64 = 0xae80;
    /// Read the registers (doorbell exits; snapshots).
    pub const GET_REGS: u64 = 0x8090_ae81;
    /// Read the segment and control registers (snapshots).
    pub const GET_SREGS: u64 = 0x8138_ae83;
    /// Read the FPU state (snapshots).
    pub const GET_FPU: u64 = 0x81a0_ae8c;
    /// Read the extended state (snapshots).
    pub const GET_XSAVE: u64 = 0x9000_aea4;
    /// Read XCR0 (snapshots).
    pub const GET_XCRS: u64 = 0x8188_aea6;
}

/// Allocation as glibc's malloc and Rust's std do it, without ever
/// making memory executable: `mmap`/`mprotect` only with `PROT_EXEC`
/// clear.
fn memory(rules: &mut Rules) -> Result<(), JailError> {
    let no_exec = || cond(2, Len::Dword, Op::MaskedEq(libc::PROT_EXEC as u64), 0);
    rules.insert(libc::SYS_mmap, vec![rule(vec![no_exec()?])?]);
    rules.insert(libc::SYS_mprotect, vec![rule(vec![no_exec()?])?]);
    for nr in [
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_brk,
    ] {
        rules.insert(nr, vec![]);
    }
    Ok(())
}

/// What every thread may do: wait on and wake locks and condition
/// variables (`futex`), read clocks (`clock_gettime` when the vDSO
/// cannot), return from a signal handler, write diagnostics to stderr
/// (`write`), leave (`exit` for the thread, `exit_group` for the
/// process), and tear down its signal stack on the way out
/// (`sigaltstack`).
fn common(rules: &mut Rules) -> Result<(), JailError> {
    memory(rules)?;
    for nr in [
        libc::SYS_futex,
        libc::SYS_clock_gettime,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_write,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_sigaltstack,
        libc::SYS_sched_yield,
    ] {
        rules.insert(nr, vec![]);
    }
    Ok(())
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

fn cond(arg: u8, len: Len, op: Op, value: u64) -> Result<SeccompCondition, JailError> {
    SeccompCondition::new(arg, len, op, value).map_err(|e| JailError::Seccomp(e.to_string()))
}

fn rule(conds: Vec<SeccompCondition>) -> Result<SeccompRule, JailError> {
    SeccompRule::new(conds).map_err(|e| JailError::Seccomp(e.to_string()))
}

/// Closing descriptors: `close`, and `fcntl(F_GETFD)` (std's check that a
/// descriptor it closes is open).
fn closing(r: &mut Rules) -> Result<(), JailError> {
    r.insert(libc::SYS_close, vec![]);
    r.insert(
        libc::SYS_fcntl,
        vec![rule(vec![cond(
            1,
            Len::Dword,
            Op::Eq,
            libc::F_GETFD as u64,
        )?])?],
    );
    Ok(())
}

/// The rules of one thread.
fn rules(thread: Thread) -> Result<Rules, JailError> {
    let mut r = Rules::new();
    common(&mut r)?;
    match thread {
        Thread::Vcpu => {
            // The guest and snapshots: only these KVM requests.
            let ioctls = [
                kvm::RUN,
                kvm::GET_REGS,
                kvm::GET_SREGS,
                kvm::GET_FPU,
                kvm::GET_XSAVE,
                kvm::GET_XCRS,
            ]
            .into_iter()
            .map(|req| rule(vec![cond(1, Len::Dword, Op::Eq, req)?]))
            .collect::<Result<Vec<_>, _>>()?;
            r.insert(libc::SYS_ioctl, ioctls);
            // A new broker connection's second handle (`try_clone`:
            // F_DUPFD_CLOEXEC), and std's check that a descriptor it
            // closes is open (F_GETFD).
            let fcntls = [libc::F_DUPFD_CLOEXEC, libc::F_GETFD]
                .into_iter()
                .map(|c| rule(vec![cond(1, Len::Dword, Op::Eq, c as u64)?]))
                .collect::<Result<Vec<_>, _>>()?;
            r.insert(libc::SYS_fcntl, fcntls);
            for nr in [
                // Requests in, answers and events out (control socket).
                libc::SYS_read,
                libc::SYS_recvfrom,
                libc::SYS_sendto,
                libc::SYS_sendmsg,
                libc::SYS_writev,
                // A finished connection's handles; refusing the rest of a
                // bad RESTORE body.
                libc::SYS_close,
                libc::SYS_shutdown,
                // Which guest pages are resident (snapshots).
                libc::SYS_mincore,
                // Exiting at background priority (whole process group:
                // the VMM is its own group).
                libc::SYS_setpriority,
                libc::SYS_getpgrp,
                libc::SYS_getpid,
            ] {
                r.insert(nr, vec![]);
            }
        }
        Thread::Watchdog => {
            // A spare's: closing the bubble's cgroup files once joined
            // (see `seal_ahead`).
            closing(&mut r)?;
            // Kicking the vCPU thread (`pthread_kill`).
            r.insert(libc::SYS_tgkill, vec![]);
            r.insert(libc::SYS_getpid, vec![]);
            r.insert(libc::SYS_gettid, vec![]);
        }
        Thread::Control => {
            // New broker connections (reconnection after a broker restart).
            r.insert(libc::SYS_accept4, vec![]);
            r.insert(libc::SYS_accept, vec![]);
            closing(&mut r)?;
        }
        Thread::Linger => {
            // A spare's: closing the bubble's cgroup files once joined
            // (see `seal_ahead`).
            closing(&mut r)?;
            // Waiting out the grace period before exiting.
            r.insert(libc::SYS_clock_nanosleep, vec![]);
            r.insert(libc::SYS_nanosleep, vec![]);
            r.insert(libc::SYS_restart_syscall, vec![]);
        }
    }
    Ok(r)
}

/// The compiled filter of `thread`.
pub fn program(thread: Thread) -> Result<BpfProgram, JailError> {
    let mut r = rules(thread)?;
    // Let `open`/`openat` through this filter: [`no_files`] answers them.
    r.insert(libc::SYS_open, vec![]);
    r.insert(libc::SYS_openat, vec![]);
    compile(r, SeccompAction::KillProcess, SeccompAction::Allow)
}

/// Opening any file fails with `EACCES` instead of killing the VMM: glibc's
/// `malloc` opens `/proc/sys/vm/overcommit_memory` the first time it trims
/// a thread's heap (seen on the vCPU thread after a large call), and copes
/// with the open failing. Stacked on [`program`] (the kernel applies the
/// stricter answer of the two), so no file can be opened either way.
pub fn no_files() -> Result<BpfProgram, JailError> {
    let mut r = Rules::new();
    r.insert(libc::SYS_open, vec![]);
    r.insert(libc::SYS_openat, vec![]);
    r.insert(libc::SYS_openat2, vec![]);
    compile(
        r,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
    )
}

fn compile(
    rules: Rules,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, JailError> {
    let filter = SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64)
        .map_err(|e| JailError::Seccomp(e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| JailError::Seccomp(e.to_string()))
}

/// How many threads have sealed themselves.
static SEALED: Mutex<u32> = Mutex::new(0);
static SEALED_CV: Condvar = Condvar::new();

/// Every filter, compiled ahead of need (see [`precompile`]).
struct Compiled {
    no_files: BpfProgram,
    threads: [(Thread, BpfProgram); 4],
}

static COMPILED: std::sync::OnceLock<Compiled> = std::sync::OnceLock::new();

fn compile_all() -> Result<Compiled, JailError> {
    let t = |th| Ok::<_, JailError>((th, program(th)?));
    Ok(Compiled {
        no_files: no_files()?,
        threads: [
            t(Thread::Vcpu)?,
            t(Thread::Watchdog)?,
            t(Thread::Control)?,
            t(Thread::Linger)?,
        ],
    })
}

/// Compiles every thread's filter now (a spare does it ahead of need,
/// ~100 µs it then does not spend on the create path); a failure is
/// reported again by [`seal`].
pub fn precompile() {
    if COMPILED.get().is_none() {
        if let Ok(c) = compile_all() {
            let _ = COMPILED.set(c);
        }
    }
}

/// Installs `thread`'s filter on the calling thread (it stays for the
/// thread's life and is inherited by threads it creates) and, but for the
/// vCPU thread, counts the thread as settled (see [`wait_sealed`]).
pub fn seal(thread: Thread) -> Result<(), JailError> {
    seal_ahead(thread)?;
    if thread != Thread::Vcpu {
        settled();
    }
    Ok(())
}

/// [`seal`] without counting the thread as settled: a spare's control and
/// linger threads seal themselves ahead of need, then join the bubble's
/// cgroups and close their cgroup files when it arrives (which their
/// filters allow: `write`, `close`), and only then call [`settled`].
pub fn seal_ahead(thread: Thread) -> Result<(), JailError> {
    let compiled = match COMPILED.get() {
        Some(c) => c,
        None => {
            let c = compile_all()?;
            COMPILED.get_or_init(|| c)
        }
    };
    let prog = compiled
        .threads
        .iter()
        .find(|(t, _)| *t == thread)
        .map(|(_, p)| p)
        .ok_or_else(|| JailError::Seccomp(format!("no filter for {thread:?}")))?;
    seccompiler::apply_filter(&compiled.no_files).map_err(|e| JailError::Seccomp(e.to_string()))?;
    seccompiler::apply_filter(prog).map_err(|e| JailError::Seccomp(e.to_string()))
}

/// Counts the calling thread as sealed and done with everything that must
/// happen before the guest runs.
pub fn settled() {
    *SEALED.lock() += 1;
    SEALED_CV.notify_all();
}

/// Threads other than the vCPU's that seal themselves: control, linger,
/// watchdog.
pub const OTHER_THREADS: u32 = 3;

/// Waits until `n` threads other than the calling one have sealed
/// themselves and settled (they do so first thing, or right after the few
/// steps they take before the guest runs).
pub fn wait_sealed(n: u32) {
    let mut g = SEALED.lock();
    while *g < n {
        SEALED_CV.wait(&mut g);
    }
}

/// The op that makes a VMM built with the `fault-injection` feature issue
/// a system call outside its vCPU list (tests only; never in a default
/// build).
#[cfg(feature = "fault-injection")]
pub const FAULT_OP: &str = "fault-injection.forbidden-syscall";

/// Creates an Internet socket from the vCPU thread (a network escape
/// attempt), which its list forbids: the kernel kills the process with
/// SIGSYS.
#[cfg(feature = "fault-injection")]
pub fn forbidden_syscall() {
    // SAFETY: socket takes integers only; the descriptor, if the call were
    // ever allowed, would simply leak.
    unsafe {
        libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
    }
}
