//! The linger thread (ends a failed VMM after a grace period) and the
//! vCPU thread's seal.

use std::fs::File;
use std::sync::mpsc;
use std::time::Instant;

use super::FAILED_LINGER;
use crate::jail;

/// Tells the linger thread to end the process after [`FAILED_LINGER`]: a
/// thread started (and sealed) before the guest runs, so that the vCPU
/// thread needs no right to create threads.
pub(super) static LINGER: std::sync::OnceLock<mpsc::Sender<()>> = std::sync::OnceLock::new();

/// Starts the linger thread; it seals itself first thing. A spare's is
/// started ahead of need and first waits for the bubble's cgroup files
/// (`cgroups`), moving itself into them (see [`super::spare::move_into`]).
pub(super) fn start_linger(cgroups: Option<mpsc::Receiver<Vec<File>>>) -> Result<(), String> {
    let (tx, rx) = mpsc::channel::<()>();
    // Set before the thread seals itself: the vCPU thread runs the guest
    // only once it has, and a failure from then on must find it.
    if LINGER.set(tx).is_err() {
        return Err("the linger thread was started twice".into());
    }
    std::thread::Builder::new()
        .name("linger".into())
        .spawn(move || {
            seal_then_join(jail::seccomp::Thread::Linger, cgroups);
            if rx.recv().is_ok() {
                std::thread::sleep(FAILED_LINGER);
                std::process::exit(3);
            }
        })
        .map_err(|e| format!("cannot start the linger thread: {e}"))?;
    Ok(())
}

/// Seals the calling thread as `thread`; a spare's (`cgroups` given)
/// ahead of need, then waits for the bubble's cgroup files, moves itself
/// into them and closes them before it counts as settled (the guest runs
/// only once every other thread has). Ends the process if it cannot.
pub(super) fn seal_then_join(
    thread: jail::seccomp::Thread,
    cgroups: Option<mpsc::Receiver<Vec<File>>>,
) {
    let Some(files) = cgroups else {
        if let Err(e) = jail::seccomp::seal(thread) {
            eprintln!("bubble-vmm: {e}");
            std::process::exit(2);
        }
        return;
    };
    if let Err(e) = jail::seccomp::seal_ahead(thread) {
        eprintln!("bubble-vmm: {e}");
        std::process::exit(2);
    }
    join_cgroups(&files);
    jail::seccomp::settled();
}

/// Waits for the bubble's cgroup files and moves the calling (non-leader)
/// thread into them, closing them; ends the process if it cannot. Never
/// returns if the spare is never given a bubble (it dies with its broker).
fn join_cgroups(files: &mpsc::Receiver<Vec<File>>) {
    let Ok(files) = files.recv() else {
        // Never configured: block until the process ends.
        loop {
            std::thread::park();
        }
    };
    if let Err(e) = super::spare::move_into(&files, false) {
        eprintln!("bubble-vmm: cannot enter the bubble's cgroups: {e}");
        std::process::exit(2);
    }
}

/// Seals the vCPU thread (the calling one) once every other thread has
/// sealed itself: from here on the guest may run.
pub(super) fn seal_vcpu() -> Result<(), jail::JailError> {
    let t = Instant::now();
    jail::seccomp::wait_sealed(jail::seccomp::OTHER_THREADS);
    let waited = t.elapsed();
    jail::seccomp::seal(jail::seccomp::Thread::Vcpu)?;
    eprintln!(
        "bubble-vmm: vcpu_seal_us={} (waited {} µs for the other threads)",
        t.elapsed().as_micros(),
        waited.as_micros()
    );
    Ok(())
}
