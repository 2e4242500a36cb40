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
            if let Some(files) = cgroups {
                join_cgroups(&files);
            }
            if let Err(e) = jail::seccomp::seal(jail::seccomp::Thread::Linger) {
                eprintln!("bubble-vmm: {e}");
                std::process::exit(2);
            }
            if rx.recv().is_ok() {
                std::thread::sleep(FAILED_LINGER);
                std::process::exit(3);
            }
        })
        .map_err(|e| format!("cannot start the linger thread: {e}"))?;
    Ok(())
}

/// Waits for the bubble's cgroup files and moves the calling (non-leader)
/// thread into them; ends the process if it cannot. Returns at once if the
/// spare is never given a bubble (its broker is gone: it dies with it).
pub(super) fn join_cgroups(files: &mpsc::Receiver<Vec<File>>) {
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
