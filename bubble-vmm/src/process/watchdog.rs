//! The watchdog thread: stops the vCPU when a deadline passes.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::vm::{Kicker, Vm};

/// Arms a deadline; when it passes, kicks the vCPU until disarmed.
///
/// Arming and disarming only take an uncontended lock: the watchdog thread
/// is woken only when a deadline is earlier than the time it already sleeps
/// until (e.g. it sleeps with nothing armed). A waiting thread costs a
/// cross-CPU wake-up, which on a nested VM takes tens of µs of the vCPU
/// thread's time; calls back to back therefore never wake it, and it wakes
/// on its own at most once per deadline to find the call long finished.
pub(super) struct Watchdog {
    state: Mutex<DogState>,
    cv: Condvar,
    pub(super) fired: AtomicBool,
}

/// What the watchdog guards and when it will next look.
struct DogState {
    /// Armed deadline (`None`: disarmed).
    deadline: Option<Instant>,
    /// When the watchdog thread wakes on its own (`None`: only when told).
    wakes_at: Option<Instant>,
    /// The vCPU to stop and its thread (set before any deadline is armed).
    target: Option<(Kicker, libc::pthread_t)>,
}

/// A spare's watchdog, started ahead of need (see [`Watchdog::ahead`]).
static AHEAD: Mutex<Option<Arc<Watchdog>>> = Mutex::new(None);

impl Watchdog {
    pub(super) fn arm(&self, d: Duration) {
        self.fired.store(false, Ordering::SeqCst);
        let at = Instant::now() + d;
        let wake = {
            let mut s = self.state.lock();
            s.deadline = Some(at);
            // A thread that wakes no later than `at` will see it then.
            s.wakes_at.is_none_or(|w| w > at)
        };
        if wake {
            self.cv.notify_all();
        }
    }

    fn new() -> Arc<Self> {
        Arc::new(Watchdog {
            state: Mutex::new(DogState {
                deadline: None,
                wakes_at: None,
                target: None,
            }),
            cv: Condvar::new(),
            fired: AtomicBool::new(false),
        })
    }

    /// A watchdog for the calling thread, which runs `vm`'s vCPU: the one
    /// a spare started ahead of need if there is one, else a new one.
    pub(super) fn start(vm: &mut Vm) -> Arc<Self> {
        let kicker = vm.kicker();
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        if let Some(dog) = AHEAD.lock().take() {
            dog.state.lock().target = Some((kicker, me));
            return dog;
        }
        let dog = Self::new();
        dog.state.lock().target = Some((kicker, me));
        let d = dog.clone();
        std::thread::spawn(move || d.run(None));
        dog
    }

    /// Starts a spare's watchdog thread ahead of need: it seals itself
    /// at once, joins the bubble's cgroups when given their files and
    /// only then counts as settled (see [`super::linger::seal_then_join`]);
    /// [`Watchdog::start`] then hands it its vCPU. Saves the thread's start
    /// and seal on the way from CONFIGURE to the guest.
    pub(super) fn ahead(cgroups: mpsc::Receiver<Vec<File>>) -> Result<(), String> {
        let dog = Self::new();
        let d = dog.clone();
        std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || d.run(Some(cgroups)))
            .map_err(|e| format!("cannot start the watchdog thread: {e}"))?;
        *AHEAD.lock() = Some(dog);
        Ok(())
    }

    /// Disarms; the sleeping thread is not woken (it finds nothing armed
    /// when it next looks).
    pub(super) fn disarm(&self) {
        self.state.lock().deadline = None;
    }

    fn run(self: Arc<Self>, cgroups: Option<mpsc::Receiver<Vec<File>>>) {
        // The vCPU thread waits for this seal before the guest runs.
        super::linger::seal_then_join(crate::jail::seccomp::Thread::Watchdog, cgroups);
        let mut g = self.state.lock();
        loop {
            let now = Instant::now();
            let sleep = match g.deadline {
                None => None,
                Some(at) if now < at => Some(at - now),
                Some(_) => {
                    // Overrun: kick until the vCPU thread disarms us.
                    self.fired.store(true, Ordering::SeqCst);
                    if let Some((kicker, thread)) = &g.target {
                        kicker.kick(*thread);
                    }
                    Some(Duration::from_millis(2))
                }
            };
            g.wakes_at = sleep.map(|d| now + d);
            match sleep {
                None => self.cv.wait(&mut g),
                Some(d) => {
                    self.cv.wait_for(&mut g, d);
                }
            }
        }
    }
}
