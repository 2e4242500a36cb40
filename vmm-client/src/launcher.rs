//! One long-lived thread that starts every VMM process.
//!
//! The kernel sends a VMM its parent-death signal (`PR_SET_PDEATHSIG`)
//! when the *thread* that spawned it exits, not the broker process: a VMM
//! spawned from a short-lived thread (tokio's blocking pool retires idle
//! threads after seconds) would be killed with it. Every VMM is therefore
//! spawned from this thread, which lives as long as the process.

use std::io;
use std::sync::{mpsc, OnceLock};

use tokio::process::{Child, Command};
use tokio::sync::oneshot;

use bubble_vmm::priority;

struct Job {
    cmd: Command,
    /// Spawn at background priority (the child inherits it).
    low: bool,
    /// The runtime the child is registered with (for `wait`).
    handle: tokio::runtime::Handle,
    reply: oneshot::Sender<io::Result<Child>>,
}

static LAUNCHER: OnceLock<mpsc::Sender<Job>> = OnceLock::new();

fn launcher() -> &'static mpsc::Sender<Job> {
    LAUNCHER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        // If the thread cannot start, `rx` is dropped and every launch
        // reports it.
        let _ = std::thread::Builder::new()
            .name("vmm-launcher".into())
            .spawn(move || {
                for job in rx {
                    let _rt = job.handle.enter();
                    let mut cmd = job.cmd;
                    // A child starts with the nice value of the thread that
                    // spawns it.
                    if job.low {
                        priority::set_nice(0, priority::BACKGROUND_NICE);
                    }
                    let child = cmd.spawn();
                    if job.low {
                        priority::set_nice(0, 0);
                    }
                    let _ = job.reply.send(child);
                }
            });
        tx
    })
}

/// Spawns `cmd` on the launcher thread (at background priority if `low`).
pub(crate) async fn launch(cmd: Command, low: bool) -> io::Result<Child> {
    let (reply, answer) = oneshot::channel();
    let job = Job {
        cmd,
        low,
        handle: tokio::runtime::Handle::current(),
        reply,
    };
    let gone = || io::Error::other("the VMM launcher thread is not running");
    launcher().send(job).map_err(|_| gone())?;
    answer.await.map_err(|_| gone())?
}
