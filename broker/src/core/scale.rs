//! Rate matching for a trigger: how many dispatcher workers (each with a
//! bubble of its own from the trigger's pool) it runs. Every
//! [`SCALE_TICK`] the scaler reads the subject's backlog (the embedded
//! queue's pending count, or the NATS consumer's `num_pending`: the
//! events no broker has taken yet, so every broker sharing the consumer
//! sizes itself from the same backlog) and the observed service time per
//! event (a moving average the workers
//! feed), and asks for `ceil(backlog × service time / target latency)`
//! workers, between 1 and `max_concurrency`. Extra workers start at once;
//! a worker leaves when there are more than asked for, or when its fetch
//! finds nothing (idle), deleting its bubble. An attach refused by the
//! parent's quota caps the workers at what runs for [`QUOTA_BACKOFF`]:
//! never beyond the quota. A trigger on a named bubble has one worker
//! (calls into one bubble are serialised anyway).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use bubble_events::embedded::{EmbeddedQueue, Subscription};
use bubble_events::nats::NatsSource;

use super::triggers::queue_subject;
use super::Broker;
use crate::store::registry::triggers::{TriggerRecord, TriggerSource, TriggerTarget};

/// How often the scaler looks at the backlog.
const SCALE_TICK: Duration = Duration::from_millis(100);
/// How long a quota refusal caps the workers.
const QUOTA_BACKOFF: Duration = Duration::from_secs(5);
/// Assumed service time before any was observed, µs.
const FIRST_GUESS_US: u64 = 10_000;

/// The workers of one trigger.
#[derive(Default)]
pub(crate) struct Scale {
    workers: AtomicUsize,
    want: AtomicUsize,
    service_us: AtomicU64,
    quota_cap: parking_lot::Mutex<Option<(usize, Instant)>>,
}

impl Scale {
    /// Feeds one event's service time.
    pub(crate) fn observe(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let old = self.service_us.load(Ordering::Relaxed);
        let new = if old == 0 { us } else { old - old / 8 + us / 8 };
        self.service_us.store(new, Ordering::Relaxed);
    }

    /// Leaves if more than `floor` workers run (at least one stays);
    /// true when this worker is to stop.
    pub(crate) fn try_leave(&self, floor: usize) -> bool {
        let floor = floor.max(1);
        let mut w = self.workers.load(Ordering::SeqCst);
        while w > floor {
            match self
                .workers
                .compare_exchange(w, w - 1, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return true,
                Err(now) => w = now,
            }
        }
        false
    }

    /// Leaves unconditionally (the worker could not get a bubble).
    pub(crate) fn leave(&self) {
        self.workers.fetch_sub(1, Ordering::SeqCst);
    }

    /// Workers asked for now.
    pub(crate) fn wanted(&self) -> usize {
        self.want.load(Ordering::SeqCst)
    }

    /// An attach was refused by the quota: cap the workers at those
    /// running (this one has left) for a while.
    pub(crate) fn quota_hit(&self) {
        let running = self.workers.load(Ordering::SeqCst).max(1);
        *self.quota_cap.lock() = Some((running, Instant::now() + QUOTA_BACKOFF));
    }

    fn cap(&self) -> usize {
        match *self.quota_cap.lock() {
            Some((n, until)) if Instant::now() < until => n,
            _ => usize::MAX,
        }
    }
}

/// Workers for a backlog, from the service time and the target latency.
pub(crate) fn wanted(backlog: u64, service_us: u64, target_us: u64, max: usize) -> usize {
    let work = u128::from(backlog) * u128::from(service_us.max(1));
    let n = work.div_ceil(u128::from(target_us.max(1)));
    usize::try_from(n)
        .unwrap_or(usize::MAX)
        .clamp(1, max.max(1))
}

/// Where a trigger's workers take events from and store results.
#[derive(Clone)]
enum Feed {
    Embedded(Subscription, EmbeddedQueue),
    Nats(Box<NatsSource>),
}

impl Broker {
    fn spawn_worker(
        me: &Weak<Self>,
        t: &TriggerRecord,
        stop: &watch::Receiver<bool>,
        scale: &Arc<Scale>,
        permanent: bool,
        feed: &Feed,
    ) {
        let (me, t, stop, scale) = (me.clone(), t.clone(), stop.clone(), scale.clone());
        match feed.clone() {
            Feed::Embedded(sub, q) => {
                tokio::spawn(Self::dispatch_loop(me, t, stop, scale, permanent, sub, q));
            }
            Feed::Nats(src) => {
                let src = *src;
                tokio::spawn(Self::dispatch_loop(
                    me,
                    t,
                    stop,
                    scale,
                    permanent,
                    src.clone(),
                    src,
                ));
            }
        }
    }

    /// Runs a trigger: its first worker, and for a pool trigger on the
    /// embedded queue the scaler that adds and removes the others.
    pub(super) async fn scale_loop(
        me: Weak<Self>,
        t: TriggerRecord,
        stop: watch::Receiver<bool>,
        nats: Arc<tokio::sync::OnceCell<NatsSource>>,
    ) {
        let feed = {
            let Some(b) = me.upgrade() else { return };
            match t.source {
                TriggerSource::Embedded => {
                    match b.queue.subscribe(&queue_subject(&t.owner, &t.subject)) {
                        Ok(s) => Feed::Embedded(s, b.queue.clone()),
                        Err(e) => {
                            tracing::warn!(trigger = %t.id, error = %e, "trigger not started");
                            return;
                        }
                    }
                }
                TriggerSource::Nats => match b.connect_nats(&t, &nats).await {
                    Some(s) => Feed::Nats(Box::new(s)),
                    None => return,
                },
            }
        };
        let scale = Arc::new(Scale::default());
        scale.workers.store(1, Ordering::SeqCst);
        scale.want.store(1, Ordering::SeqCst);
        Self::spawn_worker(&me, &t, &stop, &scale, true, &feed);
        // One worker on a named bubble (its calls are serialised anyway).
        let max = match &t.target {
            TriggerTarget::Pool { .. } => t.max_concurrency as usize,
            TriggerTarget::Bubble(_) => 1,
        };
        if max <= 1 {
            return;
        }
        let subject = queue_subject(&t.owner, &t.subject);
        let mut stop_rx = stop.clone();
        loop {
            tokio::select! {
                _ = stop_rx.changed() => return,
                () = tokio::time::sleep(SCALE_TICK) => {}
            }
            let Some(b) = me.upgrade() else { return };
            if *stop_rx.borrow() || b.closing() || !b.trigger_alive(&t.id) {
                return;
            }
            let backlog = match &feed {
                Feed::Embedded(..) => b.queue.depth_of(&subject).await.unwrap_or(0),
                Feed::Nats(src) => src.pending().await.unwrap_or(0),
            };
            let service = match scale.service_us.load(Ordering::Relaxed) {
                0 => FIRST_GUESS_US,
                us => us,
            };
            let target = b.cfg.events.target_latency_ms.saturating_mul(1000);
            let want = wanted(backlog, service, target, max).min(scale.cap());
            scale.want.store(want, Ordering::SeqCst);
            while scale.workers.load(Ordering::SeqCst) < want {
                scale.workers.fetch_add(1, Ordering::SeqCst);
                Self::spawn_worker(&me, &t, &stop, &scale, false, &feed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_follow_backlog_service_time_and_limits() {
        // 200 events of 10 ms within 1 s: 2 workers; never above max.
        assert_eq!(wanted(200, 10_000, 1_000_000, 8), 2);
        assert_eq!(wanted(201, 10_000, 1_000_000, 8), 3);
        assert_eq!(wanted(10_000, 10_000, 1_000_000, 8), 8);
        assert_eq!(wanted(0, 10_000, 1_000_000, 8), 1);
        assert_eq!(wanted(u64::MAX, u64::MAX, 0, 4), 4);
        let s = Scale::default();
        s.workers.store(3, Ordering::SeqCst);
        assert!(s.try_leave(2));
        assert!(!s.try_leave(2));
        assert!(s.try_leave(0));
        assert!(!s.try_leave(0), "the last worker stays");
        s.quota_hit();
        assert_eq!(s.cap(), 1);
    }
}
