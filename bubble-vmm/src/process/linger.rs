//! The linger thread (ends a failed VMM after a grace period) and the
//! vCPU thread's seal.

use std::sync::mpsc;
use std::time::Instant;

use super::FAILED_LINGER;
use crate::jail;

/// Tells the linger thread to end the process after [`FAILED_LINGER`]: a
/// thread started (and sealed) before the guest runs, so that the vCPU
/// thread needs no right to create threads.
pub(super) static LINGER: std::sync::OnceLock<mpsc::Sender<()>> = std::sync::OnceLock::new();

/// Starts the linger thread; it seals itself first thing.
pub(super) fn start_linger() -> Result<(), String> {
    let (tx, rx) = mpsc::channel::<()>();
    // Set before the thread seals itself: the vCPU thread runs the guest
    // only once it has, and a failure from then on must find it.
    if LINGER.set(tx).is_err() {
        return Err("the linger thread was started twice".into());
    }
    std::thread::Builder::new()
        .name("linger".into())
        .spawn(move || {
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
