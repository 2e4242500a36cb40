//! The embedded durable queue: events in a redb database in the broker's
//! data directory, each commit fsynced before `publish`, `ack`, `retry` or
//! `dead_letter` returns.
//!
//! Delivery is by *lease*: a fetch takes each ready event (oldest first),
//! counts an attempt and hides it until `ack_wait` has passed. The
//! delivery carries the attempt number it was handed out as; an ack,
//! retry or dead-letter of a delivery whose event has since been handed
//! out again (its lease ran out) is refused as [`EventError::Stale`] and
//! changes nothing, so one event is never settled twice. An event handed
//! out more than `max_deliver` times goes to the dead-letter table instead.
//! Publishing a key seen within `dedup_window` stores nothing (a
//! publisher's retry); results are stored once per key.
//!
//! Each subject's pending count (events waiting or in flight) is a row of
//! its own, changed in the same transaction as the event it counts, so
//! reading it is one lookup and a publish can be refused at a limit
//! (`publish_bounded`) without a scan, exactly under concurrency (write
//! transactions are serialised) and across a crash.
//!
//! Times are wall-clock milliseconds, so leases survive a restart: events
//! a crashed broker held come back when their lease ends.

mod dead;
mod handoff;
mod record;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTableMetadata, TableDefinition};
use tokio::sync::Notify;

use crate::event::{
    check_event, Completed, Delivery, EventError, EventKey, Outcome, Published, Results, Source,
    SourceEvent, MAX_REASON_LEN,
};
use handoff::Waiters;
use record::Record;

const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events_v1");
const SEEN: TableDefinition<&str, &[u8]> = TableDefinition::new("seen_keys_v1");
const ORDER: TableDefinition<u64, &str> = TableDefinition::new("seen_order_v1");
const DEAD: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters_v1");
const RESULTS: TableDefinition<&str, &[u8]> = TableDefinition::new("results_v1");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta_v1");
/// Pending events per subject (rows of zero are removed).
const DEPTH: TableDefinition<&str, u64> = TableDefinition::new("subject_depth_v1");
const NEXT_SEQ: &str = "next_seq";
/// Set once DEPTH was counted from EVENTS (a queue made before DEPTH).
const DEPTH_COUNTED: &str = "depth_counted";
const NEXT_RESULT: &str = "next_result";

/// How the queue hands events out.
#[derive(Clone, Copy, Debug)]
pub struct QueueConfig {
    /// How long a delivery may stay unsettled before the event is handed
    /// out again.
    pub ack_wait: Duration,
    /// Deliveries before an event goes to the dead-letter table.
    pub max_deliver: u32,
    /// How long a published key is remembered to drop duplicates.
    pub dedup_window: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            ack_wait: Duration::from_secs(30),
            max_deliver: 5,
            dedup_window: Duration::from_secs(120),
        }
    }
}

/// A dead-lettered event.
#[derive(Debug)]
pub struct DeadLetter {
    /// Its key.
    pub key: EventKey,
    /// Its subject.
    pub subject: String,
    /// How many times it was delivered.
    pub attempts: u32,
    /// Why it was given up.
    pub reason: String,
}

fn storage<E: std::error::Error + Send + Sync + 'static>(
    op: &'static str,
) -> impl FnOnce(E) -> EventError {
    move |e| EventError::Storage {
        op,
        source: Box::new(e),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

struct Inner {
    db: Database,
    cfg: QueueConfig,
    arrived: Notify,
    /// Fetches waiting for an event (see `handoff`).
    waiters: std::sync::Mutex<Waiters>,
}

impl std::fmt::Debug for EmbeddedQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedQueue")
            .field("cfg", &self.inner.cfg)
            .finish()
    }
}

impl std::fmt::Debug for EmbeddedDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedDelivery")
            .field("key", &self.event.key)
            .field("attempt", &self.event.attempt)
            .finish_non_exhaustive()
    }
}

/// The embedded queue (cheap to clone; clones share the database).
#[derive(Clone)]
pub struct EmbeddedQueue {
    inner: Arc<Inner>,
}

impl EmbeddedQueue {
    /// Opens (or creates) the queue at `path`. The file is created 0600.
    pub fn open(path: &Path, cfg: QueueConfig) -> Result<Self, EventError> {
        let db = Database::create(path).map_err(storage("open"))?;
        set_private(path)?;
        let txn = db.begin_write().map_err(storage("begin"))?;
        for t in [EVENTS, DEAD] {
            txn.open_table(t).map_err(storage("create tables"))?;
        }
        for t in [SEEN, RESULTS] {
            txn.open_table(t).map_err(storage("create tables"))?;
        }
        txn.open_table(ORDER).map_err(storage("create tables"))?;
        ops::count_depths(&txn)?;
        dead::index_once(&txn)?;
        txn.commit().map_err(storage("commit"))?;
        Ok(EmbeddedQueue {
            inner: Arc::new(Inner {
                db,
                cfg,
                arrived: Notify::new(),
                waiters: Default::default(),
            }),
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, EventError> + Send + 'static,
    ) -> Result<T, EventError> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(storage("worker"))?
    }

    /// Publishes an event; a key seen within the dedup window stores
    /// nothing and answers `duplicate` with the first event's position.
    pub async fn publish(
        &self,
        subject: &str,
        key: &EventKey,
        payload: &[u8],
    ) -> Result<Published, EventError> {
        self.publish_bounded(subject, key, payload, None).await
    }

    /// [`EmbeddedQueue::publish`], refused with [`EventError::Backlog`]
    /// (nothing stored) when `limit` events of the subject are pending
    /// already. A duplicate key answers `duplicate` even then.
    pub async fn publish_bounded(
        &self,
        subject: &str,
        key: &EventKey,
        payload: &[u8],
        limit: Option<u64>,
    ) -> Result<Published, EventError> {
        check_event(subject, payload)?;
        let rec = Record {
            attempts: 0,
            not_before: 0,
            published: now_ms(),
            key: key.clone(),
            subject: subject.to_owned(),
            payload: payload.to_vec(),
        };
        let (published, wake) = self.blocking(move |q| q.publish(rec, limit)).await?;
        if wake {
            self.inner.arrived.notify_waiters();
        }
        Ok(published)
    }

    /// Events waiting or in flight (not yet acked or dead-lettered).
    pub async fn depth(&self) -> Result<u64, EventError> {
        self.blocking(|q| {
            let txn = q.db.begin_read().map_err(storage("begin"))?;
            let t = txn.open_table(EVENTS).map_err(storage("open"))?;
            t.len().map_err(storage("count"))
        })
        .await
    }

    /// How many fetches are waiting for an event now (each is handed the
    /// next event of its subject directly).
    pub fn waiting(&self) -> usize {
        Waiters::count(&self.inner.waiters)
    }

    /// Events of one subject waiting or in flight: one lookup of its
    /// counter.
    pub async fn depth_of(&self, subject: &str) -> Result<u64, EventError> {
        let subject = subject.to_owned();
        self.blocking(move |q| {
            let txn = q.db.begin_read().map_err(storage("begin"))?;
            let t = txn.open_table(DEPTH).map_err(storage("open"))?;
            Ok(t.get(subject.as_str())
                .map_err(storage("read"))?
                .map_or(0, |v| v.value()))
        })
        .await
    }

    /// The dead-lettered events, oldest first.
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>, EventError> {
        self.dead_letters_on(None).await
    }

    /// The dead-lettered events of `subject`, oldest first.
    pub async fn dead_letters_of(&self, subject: &str) -> Result<Vec<DeadLetter>, EventError> {
        self.dead_letters_on(Some(subject.to_owned())).await
    }

    /// Puts the dead-lettered event `key` of `subject` back into the queue
    /// as a fresh event (no attempts) and drops its `failed` result (a
    /// result of another outcome stays), in one transaction; its new
    /// position, or `None` when no such dead letter exists.
    pub async fn replay(&self, subject: &str, key: &EventKey) -> Result<Option<u64>, EventError> {
        let (subject, key) = (subject.to_owned(), key.clone());
        let out = self.blocking(move |q| q.replay(&subject, &key)).await?;
        if out.is_some() {
            self.inner.arrived.notify_waiters();
        }
        Ok(out)
    }

    async fn dead_letters_on(
        &self,
        subject: Option<String>,
    ) -> Result<Vec<DeadLetter>, EventError> {
        self.blocking(move |q| {
            let txn = q.db.begin_read().map_err(storage("begin"))?;
            dead::list(&txn, subject.as_deref())
        })
        .await
    }

    /// The stored result of `key`, if one.
    pub async fn result(&self, key: &EventKey) -> Result<Option<Outcome>, EventError> {
        let key = key.clone();
        self.blocking(move |q| {
            let txn = q.db.begin_read().map_err(storage("begin"))?;
            let t = txn.open_table(RESULTS).map_err(storage("open"))?;
            let v = t.get(key.as_str()).map_err(storage("read"))?;
            v.map(|v| v.value().get(8..).map(Outcome::decode))
                .map(|o| o.ok_or(EventError::Corrupt("result"))?)
                .transpose()
        })
        .await
    }
}

/// A result row's position (its first 8 bytes).
fn record_position(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    u64::from_le_bytes(a)
}

fn set_private(path: &Path) -> Result<(), EventError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(storage("chmod 0600"))
}

mod ops;

impl Source for EmbeddedQueue {
    type Delivery = EmbeddedDelivery;

    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<EmbeddedDelivery>, EventError> {
        self.fetch_on(None, max, wait).await
    }
}

/// The events of one subject of an [`EmbeddedQueue`]: a consumer of this
/// subscription is handed only events published on exactly that subject.
#[derive(Clone, Debug)]
pub struct Subscription {
    queue: EmbeddedQueue,
    subject: Arc<str>,
}

impl EmbeddedQueue {
    /// A source of the events published on `subject` only.
    pub fn subscribe(&self, subject: &str) -> Result<Subscription, EventError> {
        crate::event::check_subject(subject)?;
        Ok(Subscription {
            queue: self.clone(),
            subject: Arc::from(subject),
        })
    }
}

impl Source for Subscription {
    type Delivery = EmbeddedDelivery;

    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<EmbeddedDelivery>, EventError> {
        self.queue
            .fetch_on(Some(self.subject.clone()), max, wait)
            .await
    }
}

impl EmbeddedQueue {
    async fn fetch_on(
        &self,
        subject: Option<Arc<str>>,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<EmbeddedDelivery>, EventError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Register for wake-ups before looking, so a publish between
            // the look and the wait is not missed.
            let arrived = self.inner.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            let max = max.max(1);
            let only = subject.clone();
            let (taken, next_due) = self.blocking(move |q| q.take(max, only.as_deref())).await?;
            if !taken.is_empty() {
                return Ok(taken
                    .into_iter()
                    .map(|event| EmbeddedDelivery {
                        queue: self.clone(),
                        event,
                    })
                    .collect());
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            let mut until = deadline;
            if let Some(due) = next_due {
                let in_ms = due.saturating_sub(now_ms());
                until = until.min(now + Duration::from_millis(in_ms));
            }
            // Nothing ready: wait as a waiter, so the next publish on the
            // subject hands its event straight here (`handoff`).
            let mut wait = WaitGuard::new(self, subject.clone());
            tokio::select! {
                got = wait.recv() => {
                    if let Some(event) = got {
                        return Ok(vec![self.delivery(event)]);
                    }
                }
                () = &mut arrived => {}
                () = tokio::time::sleep_until(until) => {}
            }
            if let Some(event) = wait.finish() {
                return Ok(vec![self.delivery(event)]);
            }
        }
    }

    fn delivery(&self, event: SourceEvent) -> EmbeddedDelivery {
        EmbeddedDelivery {
            queue: self.clone(),
            event,
        }
    }
}

/// A registered waiter; dropping it unregisters it, and releases an event
/// handed to it that nobody took (a fetch dropped mid-wait).
struct WaitGuard {
    queue: EmbeddedQueue,
    id: u64,
    rx: Option<tokio::sync::oneshot::Receiver<SourceEvent>>,
}

impl WaitGuard {
    fn new(queue: &EmbeddedQueue, subject: Option<Arc<str>>) -> Self {
        let (id, rx) = Waiters::register(&queue.inner.waiters, subject);
        WaitGuard {
            queue: queue.clone(),
            id,
            rx: Some(rx),
        }
    }

    /// The event handed over (None: the publisher could not commit it).
    async fn recv(&mut self) -> Option<SourceEvent> {
        let rx = self.rx.as_mut()?;
        let got = rx.await.ok();
        self.rx = None;
        got
    }

    /// Unregisters; an event handed over meanwhile.
    fn finish(&mut self) -> Option<SourceEvent> {
        Waiters::remove(&self.queue.inner.waiters, self.id);
        let mut rx = self.rx.take()?;
        // After close, a publisher that still holds the slot finds it gone
        // and releases its event itself; one sent before is here.
        rx.close();
        rx.try_recv().ok()
    }
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        let Some(event) = self.finish() else { return };
        let (position, attempt) = (event.position, event.attempt);
        drop(event);
        let queue = self.queue.clone();
        let release = move || {
            // Best effort: if this fails, the lease runs out instead.
            if queue
                .inner
                .settle(position, attempt, ops::Settle::Release)
                .is_ok()
            {
                queue.inner.arrived.notify_waiters();
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn_blocking(release);
            }
            Err(_) => release(),
        }
    }
}

/// One delivery from the embedded queue.
pub struct EmbeddedDelivery {
    queue: EmbeddedQueue,
    event: SourceEvent,
}

impl EmbeddedDelivery {
    fn settle(
        self,
        how: ops::Settle,
    ) -> impl std::future::Future<Output = Result<(), EventError>> + Send {
        let position = self.event.position;
        let attempt = self.event.attempt;
        async move {
            let woke = matches!(how, ops::Settle::Retry(_));
            self.queue
                .blocking(move |q| q.settle(position, attempt, how))
                .await?;
            if woke {
                self.queue.inner.arrived.notify_waiters();
            }
            Ok(())
        }
    }
}

impl Delivery for EmbeddedDelivery {
    fn event(&self) -> &SourceEvent {
        &self.event
    }

    fn ack(self) -> impl std::future::Future<Output = Result<(), EventError>> + Send {
        self.settle(ops::Settle::Ack)
    }

    fn retry(
        self,
        delay: Duration,
    ) -> impl std::future::Future<Output = Result<(), EventError>> + Send {
        self.settle(ops::Settle::Retry(ms(delay)))
    }

    fn dead_letter(
        self,
        reason: &str,
    ) -> impl std::future::Future<Output = Result<(), EventError>> + Send {
        let mut reason = reason.as_bytes().to_vec();
        reason.truncate(MAX_REASON_LEN.min(255));
        self.settle(ops::Settle::Dead(reason))
    }

    /// The result and the ack in one committed transaction.
    fn complete(
        self,
        outcome: &Outcome,
    ) -> impl std::future::Future<Output = Result<Completed, (Self, EventError)>> + Send {
        let checked = outcome.check().map(|()| outcome.encode());
        async move {
            let bytes = match checked {
                Ok(b) => b,
                Err(e) => return Err((self, e)),
            };
            let (position, attempt) = (self.event.position, self.event.attempt);
            let key = self.event.key.clone();
            match self
                .queue
                .blocking(move |q| q.complete(position, attempt, &key, &bytes))
                .await
            {
                Ok(done) => Ok(done),
                Err(e) => Err((self, e)),
            }
        }
    }
}

impl Results for EmbeddedQueue {
    async fn publish_result(
        &self,
        key: &EventKey,
        outcome: &Outcome,
    ) -> Result<Published, EventError> {
        outcome.check()?;
        let key = key.clone();
        let bytes = outcome.encode();
        self.blocking(move |q| q.put_result(&key, &bytes)).await
    }
}
