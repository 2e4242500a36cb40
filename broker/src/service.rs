//! The broker: bubble lifecycle, ownership checks and the `bubble.v1.Broker`
//! gRPC service.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bubble_proto::v1 as pb;
use bubble_proto::v1::broker_server::Broker as BrokerApi;
use tokio::sync::broadcast;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use tracing::{info, info_span, warn, Instrument};

use crate::config::{self, BrokerConfig};
use crate::error::{invalid, BrokerError};
use crate::identity::parent_of;
use crate::registry::{BubbleRecord, Registry, State};
use crate::vmm::{CallFailure, ImageSpec, Vmm, VmmNotice};

/// Capacity of the event broadcast channel; slow watchers skip events.
const EVENT_CAPACITY: usize = 4096;

/// A state change, as broadcast to watchers.
#[derive(Clone, Debug)]
pub struct Event {
    /// Owner of the bubble (events are only shown to it).
    pub owner: String,
    /// The change.
    pub event: pb::BubbleEvent,
}

/// A bubble whose VMM process runs.
struct Live {
    vmm: Vmm,
    /// Serializes calls: a bubble has one vCPU.
    call_lock: tokio::sync::Mutex<()>,
}

/// Broker state shared by all connections.
pub struct Broker {
    cfg: BrokerConfig,
    registry: Registry,
    /// In-memory view of every record (authoritative copy is the registry;
    /// BUSY and call counters live only here).
    records: Mutex<HashMap<String, BubbleRecord>>,
    live: Mutex<HashMap<String, Arc<Live>>>,
    events: broadcast::Sender<Event>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Proto state of a registry state.
pub fn state_to_pb(s: State) -> pb::BubbleState {
    match s {
        State::Booting => pb::BubbleState::Booting,
        State::Ready => pb::BubbleState::Ready,
        State::Busy => pb::BubbleState::Busy,
        State::Suspended => pb::BubbleState::Suspended,
        State::Failed => pb::BubbleState::Failed,
        State::Deleted => pb::BubbleState::Deleted,
    }
}

fn state_name(s: State) -> &'static str {
    match s {
        State::Booting => "BOOTING",
        State::Ready => "READY",
        State::Busy => "BUSY",
        State::Suspended => "SUSPENDED",
        State::Failed => "FAILED",
        State::Deleted => "DELETED",
    }
}

fn to_pb(r: &BubbleRecord) -> pb::Bubble {
    pb::Bubble {
        bubble_id: r.id.clone(),
        owner: r.owner.clone(),
        state: state_to_pb(r.state) as i32,
        failure_reason: r.failure_reason.clone(),
        memory_mib: r.memory_mib,
        vcpus: r.vcpus,
        image: r.image.clone(),
        client_request_id: r.client_request_id.clone(),
        created_at_ms: r.created_at_ms,
        boot_us: r.boot_us,
        vmm_pid: r.vmm_pid,
        calls: r.calls,
    }
}

/// Checks a bubble id's shape (`b-` + 32 lowercase hex digits).
fn validate_bubble_id(id: &str) -> Result<(), BrokerError> {
    let ok = id.len() == 34
        && id.starts_with("b-")
        && id[2..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "bubble_id",
            "must be 'b-' followed by 32 hex digits",
        ))
    }
}

fn validate_request_id(id: &str) -> Result<(), BrokerError> {
    if id.len() > 128 {
        return Err(invalid("client_request_id", "longer than 128 characters"));
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._:-".contains(c))
    {
        return Err(invalid(
            "client_request_id",
            "may only contain A-Z a-z 0-9 . _ : -",
        ));
    }
    Ok(())
}

fn validate_op(op: &str) -> Result<(), BrokerError> {
    if op.is_empty() || op.len() > 64 {
        return Err(invalid("op", "must be 1 to 64 characters"));
    }
    if !op
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(invalid("op", "may only contain A-Z a-z 0-9 . _ -"));
    }
    Ok(())
}

impl Broker {
    /// Opens the registry in `cfg.data_dir` and reconciles it with the VMM
    /// processes that still run (see [`Broker::reconcile`]).
    pub async fn open(cfg: BrokerConfig) -> Result<Arc<Self>, BrokerError> {
        std::fs::create_dir_all(cfg.data_dir.join("bubbles"))
            .map_err(|e| BrokerError::Spawn(format!("data dir {:?}: {e}", cfg.data_dir)))?;
        let registry = Registry::open(&cfg.registry_path())?;
        let records = registry
            .all()?
            .into_iter()
            .map(|r| (r.id.clone(), r))
            .collect();
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let broker = Arc::new(Self {
            cfg,
            registry,
            records: Mutex::new(records),
            live: Mutex::new(HashMap::new()),
            events,
        });
        broker.reconcile().await?;
        Ok(broker)
    }

    /// The configuration the broker runs with.
    pub fn config(&self) -> &BrokerConfig {
        &self.cfg
    }

    /// Subscribes to all state changes.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Makes the registry agree with reality after a (re)start: every bubble
    /// that should have a VMM is re-adopted if its VMM still answers on its
    /// socket, and marked FAILED with a reason otherwise.
    pub async fn reconcile(self: &Arc<Self>) -> Result<(), BrokerError> {
        let expected: Vec<BubbleRecord> = self
            .records
            .lock()
            .map(|m| {
                m.values()
                    .filter(|r| r.state.expects_vmm())
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        for rec in expected {
            let dir = self.cfg.bubble_dir(&rec.id);
            match Vmm::adopt(&dir, &rec.id).await {
                Ok((vmm, ready)) => {
                    let pid = vmm.pid();
                    info!(bubble = %rec.id, parent = %rec.owner, pid, "re-adopted running bubble");
                    let live = Arc::new(Live {
                        vmm,
                        call_lock: tokio::sync::Mutex::new(()),
                    });
                    self.live_insert(&rec.id, live.clone());
                    self.watch_vmm(rec.id.clone(), live);
                    if ready {
                        self.transition(&rec.id, State::Ready, "", |r| r.vmm_pid = pid)?;
                    } else {
                        self.fail(
                            &rec.id,
                            "bubble was still booting when the broker restarted",
                        );
                    }
                }
                Err(e) => {
                    warn!(bubble = %rec.id, parent = %rec.owner, error = %e, "bubble lost");
                    self.fail(
                        &rec.id,
                        &format!("VMM process not running after broker restart ({e})"),
                    );
                }
            }
        }
        Ok(())
    }

    fn live_insert(&self, id: &str, live: Arc<Live>) {
        if let Ok(mut m) = self.live.lock() {
            m.insert(id.to_string(), live);
        }
    }

    fn live_get(&self, id: &str) -> Option<Arc<Live>> {
        self.live.lock().ok().and_then(|m| m.get(id).cloned())
    }

    fn live_remove(&self, id: &str) -> Option<Arc<Live>> {
        self.live.lock().ok().and_then(|mut m| m.remove(id))
    }

    fn record(&self, id: &str) -> Option<BubbleRecord> {
        self.records.lock().ok().and_then(|m| m.get(id).cloned())
    }

    /// Returns the caller's record or the uniform not-accessible error.
    fn owned(&self, parent: &str, id: &str) -> Result<BubbleRecord, BrokerError> {
        validate_bubble_id(id)?;
        match self.record(id) {
            Some(r) if r.owner == parent => Ok(r),
            _ => Err(BrokerError::NotAccessible(id.to_string())),
        }
    }

    /// Changes a bubble's state, persists it (except BUSY, which is
    /// transient) and broadcasts the change.
    fn transition(
        &self,
        id: &str,
        state: State,
        reason: &str,
        update: impl FnOnce(&mut BubbleRecord),
    ) -> Result<BubbleRecord, BrokerError> {
        let rec = {
            let mut m = self
                .records
                .lock()
                .map_err(|_| BrokerError::Spawn("record table poisoned".into()))?;
            let Some(r) = m.get_mut(id) else {
                return Err(BrokerError::NotAccessible(id.to_string()));
            };
            // Terminal states stay terminal.
            if matches!(r.state, State::Deleted)
                || (r.state == State::Failed && state != State::Deleted)
            {
                return Ok(r.clone());
            }
            r.state = state;
            if state == State::Failed {
                r.failure_reason = reason.to_string();
            }
            update(r);
            r.clone()
        };
        if !matches!(state, State::Busy) {
            self.registry.put(&rec)?;
        }
        let _ = self.events.send(Event {
            owner: rec.owner.clone(),
            event: pb::BubbleEvent {
                bubble_id: id.to_string(),
                state: state_to_pb(state) as i32,
                reason: reason.to_string(),
                at_ms: now_ms(),
            },
        });
        Ok(rec)
    }

    /// Marks a bubble FAILED and stops its VMM process if one runs.
    fn fail(self: &Arc<Self>, id: &str, reason: &str) {
        warn!(bubble = %id, reason, "bubble failed");
        if let Err(e) = self.transition(id, State::Failed, reason, |r| r.vmm_pid = 0) {
            warn!(bubble = %id, error = %e, "could not record failure");
        }
        if let Some(live) = self.live_remove(id) {
            tokio::spawn(async move { live.vmm.shutdown().await });
        }
    }

    /// Follows a VMM's notices: a guest failure or a vanished process fails
    /// the bubble.
    fn watch_vmm(self: &Arc<Self>, id: String, live: Arc<Live>) {
        let broker = Arc::downgrade(self);
        let mut notices = live.vmm.notices();
        drop(live);
        tokio::spawn(async move {
            while let Some(n) = notices.recv().await {
                let Some(b) = broker.upgrade() else { return };
                match n {
                    VmmNotice::Log(line) => {
                        info!(bubble = %id, guest_log = %line, "guest log");
                    }
                    VmmNotice::Failed(reason) => {
                        b.fail(&id, &reason);
                        return;
                    }
                    VmmNotice::Gone(reason) => {
                        // Deleting a bubble also ends its process: not a failure.
                        if b.live_get(&id).is_some() {
                            b.fail(&id, &reason);
                        }
                        return;
                    }
                }
            }
        });
    }

    /// Creates a bubble for `parent` and waits until it is READY or FAILED.
    pub async fn create(
        self: &Arc<Self>,
        parent: &str,
        req: pb::CreateBubbleRequest,
    ) -> Result<BubbleRecord, BrokerError> {
        validate_request_id(&req.client_request_id)?;
        if !(config::MIN_MEMORY_MIB..=config::MAX_MEMORY_MIB).contains(&req.memory_mib) {
            return Err(invalid(
                "memory_mib",
                format!(
                    "must be {}..={} MiB, got {}",
                    config::MIN_MEMORY_MIB,
                    config::MAX_MEMORY_MIB,
                    req.memory_mib
                ),
            ));
        }
        let vcpus = match req.vcpus {
            0 | 1 => 1,
            n => {
                return Err(invalid(
                    "vcpus",
                    format!("only 1 vCPU is supported, got {n}"),
                ))
            }
        };
        let image = ImageSpec::parse(&req.image, self.cfg.allow_test_images)
            .map_err(|reason| invalid("image", reason))?;
        let client_request_id = if req.client_request_id.is_empty() {
            uuid::Uuid::new_v4().simple().to_string()
        } else {
            req.client_request_id.clone()
        };
        let id = format!("b-{}", uuid::Uuid::new_v4().simple());
        let rec = BubbleRecord {
            id: id.clone(),
            owner: parent.to_string(),
            client_request_id,
            state: State::Booting,
            failure_reason: String::new(),
            memory_mib: req.memory_mib,
            vcpus,
            image: image.name(),
            created_at_ms: now_ms(),
            boot_us: 0,
            vmm_pid: 0,
            calls: 0,
        };
        if let Some(existing) = self.registry.insert_new(&rec)? {
            // A retried create: hand back the bubble of the first attempt,
            // waiting for it if that attempt is still booting.
            return self.await_settled(&existing.id).await;
        }
        if let Ok(mut m) = self.records.lock() {
            m.insert(id.clone(), rec.clone());
        }
        let span = info_span!("create", bubble = %id, parent = %parent);
        self.boot(rec, image).instrument(span).await
    }

    async fn await_settled(&self, id: &str) -> Result<BubbleRecord, BrokerError> {
        let deadline = Instant::now() + self.cfg.boot_timeout + Duration::from_secs(5);
        loop {
            let r = self
                .record(id)
                .ok_or_else(|| BrokerError::NotAccessible(id.to_string()))?;
            if r.state != State::Booting || Instant::now() > deadline {
                return Ok(r);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn boot(
        self: &Arc<Self>,
        rec: BubbleRecord,
        image: ImageSpec,
    ) -> Result<BubbleRecord, BrokerError> {
        let id = rec.id.clone();
        let _ = self.events.send(Event {
            owner: rec.owner.clone(),
            event: pb::BubbleEvent {
                bubble_id: id.clone(),
                state: pb::BubbleState::Booting as i32,
                reason: String::new(),
                at_ms: now_ms(),
            },
        });
        let dir = self.cfg.bubble_dir(&id);
        let vmm = match Vmm::spawn(&self.cfg, &dir, &id, rec.memory_mib, &image).await {
            Ok(v) => v,
            Err(e) => {
                self.fail(&id, &format!("VMM did not start: {e}"));
                return Err(BrokerError::Spawn(e));
            }
        };
        let pid = vmm.pid();
        let live = Arc::new(Live {
            vmm,
            call_lock: tokio::sync::Mutex::new(()),
        });
        self.live_insert(&id, live.clone());
        match live.vmm.wait_ready(self.cfg.boot_timeout).await {
            Ok(boot_us) => {
                self.watch_vmm(id.clone(), live);
                let r = self.transition(&id, State::Ready, "", |r| {
                    r.boot_us = boot_us;
                    r.vmm_pid = pid;
                })?;
                info!(boot_us, pid, "bubble ready");
                Ok(r)
            }
            Err(reason) => {
                self.fail(&id, &reason);
                Ok(self.record(&id).unwrap_or(rec))
            }
        }
    }

    /// Describes one of `parent`'s bubbles.
    pub fn describe(&self, parent: &str, id: &str) -> Result<BubbleRecord, BrokerError> {
        self.owned(parent, id)
    }

    /// Lists `parent`'s bubbles, oldest first.
    pub fn list(&self, parent: &str, include_deleted: bool) -> Vec<BubbleRecord> {
        let mut v: Vec<BubbleRecord> = self
            .records
            .lock()
            .map(|m| {
                m.values()
                    .filter(|r| r.owner == parent && (include_deleted || r.state != State::Deleted))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        v.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        v
    }

    /// Calls `op` in one of `parent`'s bubbles.
    pub async fn call(
        self: &Arc<Self>,
        parent: &str,
        req: pb::CallRequest,
    ) -> Result<(Vec<u8>, u64), BrokerError> {
        let rec = self.owned(parent, &req.bubble_id)?;
        validate_op(&req.op)?;
        if req.input.len() > self.cfg.max_payload {
            return Err(invalid(
                "input",
                format!(
                    "{} bytes exceeds the payload limit of {} bytes",
                    req.input.len(),
                    self.cfg.max_payload
                ),
            ));
        }
        let deadline = match req.deadline_ms {
            0 => config::DEFAULT_CALL_DEADLINE,
            ms => Duration::from_millis(u64::from(ms)),
        };
        if deadline > config::MAX_CALL_DEADLINE {
            return Err(invalid(
                "deadline_ms",
                format!(
                    "at most {} ms, got {}",
                    config::MAX_CALL_DEADLINE.as_millis(),
                    req.deadline_ms
                ),
            ));
        }
        let id = rec.id;
        let live = match (rec.state, self.live_get(&id)) {
            (State::Ready | State::Busy, Some(l)) => l,
            (state, _) => {
                let r = self.record(&id);
                return Err(BrokerError::WrongState {
                    id,
                    state: state_name(state),
                    detail: r
                        .filter(|r| !r.failure_reason.is_empty())
                        .map(|r| format!(": {}", r.failure_reason))
                        .unwrap_or_default(),
                });
            }
        };
        let _guard = live.call_lock.lock().await;
        self.transition(&id, State::Busy, "", |_| {})?;
        let started = Instant::now();
        let result = live.vmm.call(&req.op, &req.input, deadline).await;
        let vmm_us = started.elapsed().as_micros() as u64;
        match result {
            Ok(out) if out.len() > self.cfg.max_payload => {
                self.transition(&id, State::Ready, "", |r| r.calls += 1)?;
                Err(BrokerError::OutputTooLarge(out.len(), self.cfg.max_payload))
            }
            Ok(out) => {
                self.transition(&id, State::Ready, "", |r| r.calls += 1)?;
                Ok((out, vmm_us))
            }
            Err(CallFailure::Rejected(msg)) => {
                self.transition(&id, State::Ready, "", |r| r.calls += 1)?;
                Err(BrokerError::GuestRejected(msg))
            }
            Err(CallFailure::Deadline(msg)) => {
                self.fail(&id, &format!("call deadline exceeded: {msg}"));
                Err(BrokerError::DeadlineExceeded(msg))
            }
            Err(CallFailure::Failed(msg)) => {
                self.fail(&id, &msg);
                Err(BrokerError::BubbleFailed(msg))
            }
        }
    }

    /// Deletes one of `parent`'s bubbles: stops its VMM and removes its files.
    pub async fn delete(
        self: &Arc<Self>,
        parent: &str,
        id: &str,
    ) -> Result<BubbleRecord, BrokerError> {
        let rec = self.owned(parent, id)?;
        if rec.state == State::Deleted {
            return Ok(rec);
        }
        if let Some(live) = self.live_remove(id) {
            // Wait for a running call to finish or fail first.
            let _guard = live.call_lock.lock().await;
            live.vmm.shutdown().await;
        }
        let _ = std::fs::remove_dir_all(self.cfg.bubble_dir(id));
        info!(bubble = %id, parent = %parent, "bubble deleted");
        self.transition(id, State::Deleted, "", |r| r.vmm_pid = 0)
    }

    /// Stops every VMM (used by tests and the demo; a production broker
    /// leaves them running so a restarted broker re-adopts them).
    pub async fn shutdown_all(&self) {
        let all: Vec<Arc<Live>> = self
            .live
            .lock()
            .map(|mut m| m.drain().map(|(_, v)| v).collect())
            .unwrap_or_default();
        for l in all {
            l.vmm.shutdown().await;
        }
    }
}

/// The gRPC face of a [`Broker`].
#[derive(Clone)]
pub struct BrokerService {
    broker: Arc<Broker>,
}

impl BrokerService {
    /// Wraps a broker.
    pub fn new(broker: Arc<Broker>) -> Self {
        Self { broker }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::BubbleEvent, Status>> + Send>>;

#[tonic::async_trait]
impl BrokerApi for BrokerService {
    async fn create_bubble(
        &self,
        request: Request<pb::CreateBubbleRequest>,
    ) -> Result<Response<pb::Bubble>, Status> {
        let parent = parent_of(&request)?;
        let rec = self.broker.create(&parent, request.into_inner()).await?;
        Ok(Response::new(to_pb(&rec)))
    }

    async fn describe_bubble(
        &self,
        request: Request<pb::BubbleRef>,
    ) -> Result<Response<pb::Bubble>, Status> {
        let parent = parent_of(&request)?;
        let rec = self
            .broker
            .describe(&parent, &request.get_ref().bubble_id)?;
        Ok(Response::new(to_pb(&rec)))
    }

    async fn list_bubbles(
        &self,
        request: Request<pb::ListBubblesRequest>,
    ) -> Result<Response<pb::ListBubblesResponse>, Status> {
        let parent = parent_of(&request)?;
        let bubbles = self
            .broker
            .list(&parent, request.get_ref().include_deleted)
            .iter()
            .map(to_pb)
            .collect();
        Ok(Response::new(pb::ListBubblesResponse { bubbles }))
    }

    async fn call(
        &self,
        request: Request<pb::CallRequest>,
    ) -> Result<Response<pb::CallResponse>, Status> {
        let parent = parent_of(&request)?;
        let req = request.into_inner();
        let span = info_span!("call", bubble = %req.bubble_id, parent = %parent, op = %req.op);
        let (output, vmm_us) = self.broker.call(&parent, req).instrument(span).await?;
        Ok(Response::new(pb::CallResponse { output, vmm_us }))
    }

    async fn delete_bubble(
        &self,
        request: Request<pb::BubbleRef>,
    ) -> Result<Response<pb::Bubble>, Status> {
        let parent = parent_of(&request)?;
        let rec = self
            .broker
            .delete(&parent, &request.get_ref().bubble_id)
            .await?;
        Ok(Response::new(to_pb(&rec)))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let parent = parent_of(&request)?;
        let only = request.into_inner().bubble_id;
        if !only.is_empty() {
            self.broker.owned(&parent, &only)?;
        }
        let rx = self.broker.subscribe();
        let stream =
            tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(move |ev| match ev {
                Ok(ev) if ev.owner == parent && (only.is_empty() || ev.event.bubble_id == only) => {
                    Some(Ok(ev.event))
                }
                Ok(_) => None,
                Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                    Some(Err(Status::data_loss(format!(
                        "watcher too slow: {n} events dropped; re-list and watch again"
                    ))))
                }
            });
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_ops_are_validated() {
        assert!(validate_bubble_id("b-0123456789abcdef0123456789abcdef").is_ok());
        for bad in [
            "",
            "b-",
            "b-0123456789ABCDEF0123456789abcdef",
            "x-0123456789abcdef0123456789abcdef",
            "b-0123456789abcdef0123456789abcdef0",
        ] {
            assert!(validate_bubble_id(bad).is_err(), "{bad}");
        }
        assert!(validate_op("sha256").is_ok());
        assert!(validate_op("").is_err());
        assert!(validate_op("a b").is_err());
        assert!(validate_op(&"x".repeat(65)).is_err());
        assert!(validate_request_id("").is_ok());
        assert!(validate_request_id("retry-1:a.b_c").is_ok());
        assert!(validate_request_id("no spaces").is_err());
        assert!(validate_request_id(&"k".repeat(129)).is_err());
    }

    #[test]
    fn errors_map_to_status_codes() {
        let s: Status = invalid("memory_mib", "too big").into();
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert!(s.message().starts_with("memory_mib:"));
        let s: Status = BrokerError::NotAccessible("b-x".into()).into();
        assert_eq!(s.code(), tonic::Code::PermissionDenied);
    }
}
