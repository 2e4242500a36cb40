//! The gRPC face of a [`Broker`]: each request is authenticated (the
//! parent identity), turned into a typed core command by [`convert`], run,
//! and its result rendered. Protobuf types stop here.

pub mod audit;
pub mod convert;
pub mod triggers;

use std::pin::Pin;
use std::sync::Arc;

use bubble_proto::v1 as pb;
use bubble_proto::v1::broker_server::Broker as BrokerApi;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use tracing::{info_span, Instrument};

use crate::core::{AuditQuery, Broker};
use crate::error::BrokerError;
use crate::identity::parent_of;
use convert::{bubble_to_pb, validate_bubble_id};

/// The gRPC service of a [`Broker`].
#[derive(Clone)]
pub struct BrokerService {
    broker: Arc<Broker>,
}

impl BrokerService {
    /// Wraps a broker.
    pub fn new(broker: Arc<Broker>) -> Self {
        Self { broker }
    }

    /// The caller's identity, unless it is throttled for probing.
    fn parent<T>(&self, request: &Request<T>) -> Result<String, Status> {
        let parent = parent_of(request)?;
        match self.broker.throttled(&parent) {
            Some(ms) => Err(BrokerError::Throttled(ms).into()),
            None => Ok(parent),
        }
    }

    /// A refusal for `id`, raising the security event of a
    /// PERMISSION_DENIED (see `core::security`).
    fn deny(&self, parent: &str, id: &str, e: BrokerError) -> Status {
        self.broker.denied(parent, id, false, e).into()
    }

    /// A bubble as DescribeBubble shows it: its record and its health.
    fn described(&self, rec: &crate::store::registry::BubbleRecord) -> pb::Bubble {
        let mut b = bubble_to_pb(rec);
        b.health = self
            .broker
            .probed(&rec.id)
            .map(|p| p.describe())
            .unwrap_or_default();
        b
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::BubbleEvent, Status>> + Send>>;
type LogStream = Pin<Box<dyn Stream<Item = Result<pb::LogLine, Status>> + Send>>;
type AdminEventStream = Pin<Box<dyn Stream<Item = Result<pb::AdminSecurityEvent, Status>> + Send>>;

#[tonic::async_trait]
impl BrokerApi for BrokerService {
    async fn create_bubble(
        &self,
        request: Request<pb::CreateBubbleRequest>,
    ) -> Result<Response<pb::Bubble>, Status> {
        let parent = self.parent(&request)?;
        let cmd = convert::create(request.into_inner(), self.broker.config())?;
        let rec = self.broker.create(&parent, cmd).await?;
        Ok(Response::new(bubble_to_pb(&rec)))
    }

    async fn describe_bubble(
        &self,
        request: Request<pb::BubbleRef>,
    ) -> Result<Response<pb::Bubble>, Status> {
        let parent = self.parent(&request)?;
        let id = &request.get_ref().bubble_id;
        validate_bubble_id(id)?;
        let rec = self
            .broker
            .describe(&parent, id)
            .map_err(|e| self.deny(&parent, id, e))?;
        Ok(Response::new(self.described(&rec)))
    }

    async fn list_bubbles(
        &self,
        request: Request<pb::ListBubblesRequest>,
    ) -> Result<Response<pb::ListBubblesResponse>, Status> {
        let parent = self.parent(&request)?;
        let req = request.get_ref();
        let page = if req.all_parents {
            self.broker.list_all(
                &parent,
                req.include_deleted,
                req.page_size as usize,
                &req.page_token,
            )?
        } else {
            self.broker.list(
                &parent,
                req.include_deleted,
                req.page_size as usize,
                &req.page_token,
            )?
        };
        Ok(Response::new(pb::ListBubblesResponse {
            bubbles: page.bubbles.iter().map(bubble_to_pb).collect(),
            next_page_token: page.next,
        }))
    }

    async fn call(
        &self,
        request: Request<pb::CallRequest>,
    ) -> Result<Response<pb::CallResponse>, Status> {
        let parent = self.parent(&request)?;
        let req = request.into_inner();
        let span = info_span!("call", bubble = %req.bubble_id, parent = %parent, op = %req.op);
        let id = req.bubble_id.clone();
        let cmd = convert::call(req, self.broker.config())?;
        let signed = cmd.sign || cmd.seal_to.is_some();
        let out = match self.broker.call(&parent, cmd).instrument(span).await {
            // The portion awaits: freeze the bubble (or end the call).
            Err(crate::error::BrokerError::Awaiting {
                bubble_id,
                key,
                timeout_ms,
            }) => self
                .broker
                .call_awaits(&parent, &bubble_id, &key, timeout_ms, signed)
                .await
                .map_err(|e| self.deny(&parent, &id, e))?,
            r => crate::core::CallEnd::Done(r.map_err(|e| self.deny(&parent, &id, e))?),
        };
        let out = match out {
            crate::core::CallEnd::Done(o) => o,
            crate::core::CallEnd::Frozen(a) => {
                return Ok(Response::new(pb::CallResponse {
                    awaiting: Some(pb::AwaitingCall {
                        key: a.key,
                        deadline_ms: a.deadline_ms,
                        generation: a.generation,
                    }),
                    ..Default::default()
                }))
            }
        };
        let (call_id, signature) = out.signed.unwrap_or_default();
        Ok(Response::new(pb::CallResponse {
            output: out.output,
            vmm_us: out.vmm_us,
            call_id,
            signature,
            awaiting: None,
        }))
    }

    async fn delete_bubble(
        &self,
        request: Request<pb::BubbleRef>,
    ) -> Result<Response<pb::Bubble>, Status> {
        let parent = self.parent(&request)?;
        let id = &request.get_ref().bubble_id;
        validate_bubble_id(id)?;
        let rec = self
            .broker
            .delete_ending_awaits(&parent, id)
            .await
            .map_err(|e| self.deny(&parent, id, e))?;
        Ok(Response::new(bubble_to_pb(&rec)))
    }

    async fn attach_bubble(
        &self,
        request: Request<pb::AttachBubbleRequest>,
    ) -> Result<Response<pb::Bubble>, Status> {
        let parent = self.parent(&request)?;
        let cmd = convert::attach(request.into_inner(), self.broker.config())?;
        let rec = self.broker.attach(&parent, cmd).await?;
        Ok(Response::new(bubble_to_pb(&rec)))
    }

    async fn get_usage(
        &self,
        request: Request<pb::BubbleRef>,
    ) -> Result<Response<pb::UsageReport>, Status> {
        let parent = self.parent(&request)?;
        let id = &request.get_ref().bubble_id;
        validate_bubble_id(id)?;
        let facts = self
            .broker
            .usage(&parent, id)
            .await
            .map_err(|e| self.deny(&parent, id, e))?;
        let report = self.broker.usage_signer().sign(convert::usage_to_pb(facts));
        Ok(Response::new(report))
    }

    async fn get_attestation(
        &self,
        request: Request<pb::GetAttestationRequest>,
    ) -> Result<Response<pb::Attestation>, Status> {
        let parent = self.parent(&request)?;
        let req = request.into_inner();
        validate_bubble_id(&req.bubble_id)?;
        let span = info_span!("attest", bubble = %req.bubble_id, parent = %parent);
        let a = self
            .broker
            .attestation(&parent, &req.bubble_id, &req.nonce)
            .instrument(span)
            .await
            .map_err(|e| Status::from(self.broker.denied(&parent, &req.bubble_id, true, e)))?;
        Ok(Response::new(convert::attestation_to_pb(a)))
    }

    async fn provision_credential(
        &self,
        request: Request<pb::ProvisionCredentialRequest>,
    ) -> Result<Response<pb::ProvisionCredentialResponse>, Status> {
        let parent = self.parent(&request)?;
        let req = request.into_inner();
        let span = info_span!("provision", bubble = %req.bubble_id, parent = %parent, credential = %req.name);
        let id = req.bubble_id.clone();
        let cmd = convert::provision(req)?;
        self.broker
            .provision(&parent, cmd)
            .instrument(span)
            .await
            .map_err(|e| self.deny(&parent, &id, e))?;
        Ok(Response::new(pb::ProvisionCredentialResponse {}))
    }

    async fn load_portion(
        &self,
        request: Request<pb::LoadPortionRequest>,
    ) -> Result<Response<pb::LoadPortionResponse>, Status> {
        let parent = self.parent(&request)?;
        let req = request.into_inner();
        let span = info_span!("load_portion", bubble = %req.bubble_id, parent = %parent, portion = %req.name);
        let id = req.bubble_id.clone();
        let cmd = convert::load_portion(req, self.broker.config())?;
        let r = self
            .broker
            .load_portion(&parent, cmd)
            .instrument(span)
            .await
            .map_err(|e| self.deny(&parent, &id, e))?;
        Ok(Response::new(pb::LoadPortionResponse {
            portions_digest: r.portions_digest,
            module_sha384: r.module_sha384,
        }))
    }

    async fn suspend_bubble(
        &self,
        request: Request<pb::SuspendBubbleRequest>,
    ) -> Result<Response<pb::Bubble>, Status> {
        let parent = self.parent(&request)?;
        let req = request.into_inner();
        let span = info_span!("suspend", bubble = %req.bubble_id, parent = %parent);
        let id = req.bubble_id.clone();
        let cmd = convert::suspend(req)?;
        let r = self
            .broker
            .suspend(&parent, cmd)
            .instrument(span)
            .await
            .map_err(|e| self.deny(&parent, &id, e))?;
        Ok(Response::new(bubble_to_pb(&r)))
    }

    async fn restore_bubble(
        &self,
        request: Request<pb::RestoreBubbleRequest>,
    ) -> Result<Response<pb::Bubble>, Status> {
        let parent = self.parent(&request)?;
        let req = request.into_inner();
        let span = info_span!("restore", bubble = %req.bubble_id, parent = %parent);
        let id = req.bubble_id.clone();
        let cmd = convert::restore(req)?;
        let r = self
            .broker
            .restore_ending_awaits(&parent, cmd)
            .instrument(span)
            .await
            .map_err(|e| self.deny(&parent, &id, e))?;
        Ok(Response::new(bubble_to_pb(&r)))
    }

    async fn list_audit(
        &self,
        request: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        let parent = self.parent(&request)?;
        let req = request.into_inner();
        if !req.bubble_id.is_empty() {
            validate_bubble_id(&req.bubble_id)?;
        }
        let q = AuditQuery {
            bubble_id: req.bubble_id,
            since_ms: req.since_ms,
        };
        let from = audit::parse_page_token(&req.page_token)?;
        let page = self
            .broker
            .audit_records(&parent, q, from, req.page_size as usize)
            .await?;
        Ok(Response::new(pb::ListAuditResponse {
            records: page.records.into_iter().map(audit::record_to_pb).collect(),
            next_page_token: page.next.map(audit::page_token).unwrap_or_default(),
        }))
    }

    async fn create_trigger(
        &self,
        request: Request<pb::CreateTriggerRequest>,
    ) -> Result<Response<pb::Trigger>, Status> {
        let parent = self.parent(&request)?;
        let req = request.into_inner();
        let named = req.bubble_id.clone();
        let cmd = triggers::create(req, self.broker.config())?;
        let t = self
            .broker
            .create_trigger(&parent, cmd)
            .await
            .map_err(|e| self.deny(&parent, &named, e))?;
        Ok(Response::new(self.trigger_pb(&t).await?))
    }

    async fn list_triggers(
        &self,
        request: Request<pb::ListTriggersRequest>,
    ) -> Result<Response<pb::ListTriggersResponse>, Status> {
        let parent = self.parent(&request)?;
        let mut out = Vec::new();
        for t in self.broker.list_triggers(&parent) {
            out.push(self.trigger_pb(&t).await?);
        }
        Ok(Response::new(pb::ListTriggersResponse { triggers: out }))
    }

    async fn delete_trigger(
        &self,
        request: Request<pb::TriggerRef>,
    ) -> Result<Response<pb::Trigger>, Status> {
        let parent = self.parent(&request)?;
        let id = request.into_inner().trigger_id;
        triggers::validate_trigger_id(&id)?;
        let t = self
            .broker
            .delete_trigger(&parent, &id)
            .await
            .map_err(|e| self.deny(&parent, &id, e))?;
        Ok(Response::new(triggers::trigger_to_pb(&t)))
    }

    async fn publish_event(
        &self,
        request: Request<pb::PublishEventRequest>,
    ) -> Result<Response<pb::PublishEventResponse>, Status> {
        let parent = self.parent(&request)?;
        let req = request.into_inner();
        let p = self
            .broker
            .publish_event(&parent, &req.subject, &req.key, &req.payload)
            .await?;
        Ok(Response::new(pb::PublishEventResponse {
            position: p.position,
            duplicate: p.duplicate,
        }))
    }

    async fn get_result(
        &self,
        request: Request<pb::GetResultRequest>,
    ) -> Result<Response<pb::EventResult>, Status> {
        self.get_result_rpc(request).await
    }

    async fn get_await_result(
        &self,
        request: Request<pb::GetAwaitResultRequest>,
    ) -> Result<Response<pb::EventResult>, Status> {
        self.await_result_rpc(request).await
    }

    async fn list_dead_letters(
        &self,
        request: Request<pb::TriggerRef>,
    ) -> Result<Response<pb::ListDeadLettersResponse>, Status> {
        let parent = self.parent(&request)?;
        let id = request.into_inner().trigger_id;
        triggers::validate_trigger_id(&id)?;
        let v = self
            .broker
            .dead_letters(&parent, &id)
            .await
            .map_err(|e| self.deny(&parent, &id, e))?;
        Ok(Response::new(pb::ListDeadLettersResponse {
            dead_letters: v
                .into_iter()
                .map(|d| pb::DeadLetter {
                    key: d.key,
                    attempts: d.attempts,
                    reason: d.reason,
                })
                .collect(),
        }))
    }

    async fn replay_dead_letter(
        &self,
        request: Request<pb::ReplayDeadLetterRequest>,
    ) -> Result<Response<pb::ReplayDeadLetterResponse>, Status> {
        let parent = self.parent(&request)?;
        let req = request.into_inner();
        triggers::validate_trigger_id(&req.trigger_id)?;
        let position = self
            .broker
            .replay_dead_letter(&parent, &req.trigger_id, &req.key)
            .await
            .map_err(|e| self.deny(&parent, &req.trigger_id, e))?;
        Ok(Response::new(pb::ReplayDeadLetterResponse { position }))
    }

    async fn admin_quarantine_list(
        &self,
        request: Request<pb::AdminQuarantineListRequest>,
    ) -> Result<Response<pb::AdminQuarantineListResponse>, Status> {
        let admin = self.parent(&request)?;
        let modules = self
            .broker
            .quarantine_list(&admin)?
            .into_iter()
            .map(|(parent, portion_digest, q)| pb::QuarantinedModule {
                parent,
                portion_digest,
                reason: q.reason,
                since_ms: q.since_ms,
            })
            .collect();
        Ok(Response::new(pb::AdminQuarantineListResponse { modules }))
    }

    async fn admin_quarantine_lift(
        &self,
        request: Request<pb::AdminQuarantineLiftRequest>,
    ) -> Result<Response<pb::AdminQuarantineLiftResponse>, Status> {
        let admin = self.parent(&request)?;
        let req = request.into_inner();
        // Who may ask is checked before what is asked, so that a parent
        // learns nothing from the validation either.
        self.broker.require_admin(&admin)?;
        convert::validate_digest("portion_digest", &req.portion_digest)?;
        let parent = (!req.parent.is_empty()).then_some(req.parent.as_str());
        let lifted = self
            .broker
            .lift_quarantine(&admin, &req.portion_digest, parent)?;
        Ok(Response::new(pb::AdminQuarantineLiftResponse { lifted }))
    }

    type AdminWatchEventsStream = AdminEventStream;

    async fn admin_watch_events(
        &self,
        request: Request<pb::AdminWatchEventsRequest>,
    ) -> Result<Response<Self::AdminWatchEventsStream>, Status> {
        let admin = self.parent(&request)?;
        let rx = self.broker.admin_subscribe(&admin)?;
        let stream = tokio_stream::wrappers::BroadcastStream::new(rx).map(|ev| match ev {
            Ok(e) => Ok(pb::AdminSecurityEvent {
                kind: e.kind.label().to_string(),
                bubble_id: e.bubble_id,
                owner: e.owner,
                parent: e.parent,
                portion_digest: e.portion_digest,
                at_ms: e.at_ms,
            }),
            Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => Err(
                Status::data_loss(format!("watcher too slow: {n} events dropped; watch again")),
            ),
        });
        Ok(Response::new(Box::pin(stream)))
    }

    type StreamLogsStream = LogStream;

    async fn stream_logs(
        &self,
        request: Request<pb::StreamLogsRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, Status> {
        let parent = self.parent(&request)?;
        let req = request.into_inner();
        validate_bubble_id(&req.bubble_id)?;
        let (kept, rx) = self
            .broker
            .stream_logs(&parent, &req.bubble_id, req.follow)
            .map_err(|e| self.deny(&parent, &req.bubble_id, e))?;
        let to_pb = |l: crate::core::LogLine| pb::LogLine {
            seq: l.seq,
            at_ms: l.at_ms,
            text: l.text,
        };
        let kept = tokio_stream::iter(kept.into_iter().map(move |l| Ok(to_pb(l))));
        let Some(rx) = rx else {
            return Ok(Response::new(Box::pin(kept)));
        };
        let new = tokio_stream::wrappers::BroadcastStream::new(rx).map(move |l| match l {
            Ok(l) => Ok(to_pb(l)),
            Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => Err(
                Status::data_loss(format!("follower too slow: {n} lines dropped")),
            ),
        });
        Ok(Response::new(Box::pin(kept.chain(new))))
    }

    async fn admin_describe_bubble(
        &self,
        request: Request<pb::BubbleRef>,
    ) -> Result<Response<pb::Bubble>, Status> {
        let parent = self.parent(&request)?;
        let id = &request.get_ref().bubble_id;
        validate_bubble_id(id)?;
        let rec = self
            .broker
            .admin_describe(&parent, id)
            .map_err(|e| self.deny(&parent, id, e))?;
        Ok(Response::new(self.described(&rec)))
    }

    async fn admin_delete_bubble(
        &self,
        request: Request<pb::BubbleRef>,
    ) -> Result<Response<pb::Bubble>, Status> {
        let parent = self.parent(&request)?;
        let id = &request.get_ref().bubble_id;
        validate_bubble_id(id)?;
        let rec = self
            .broker
            .admin_delete(&parent, id)
            .await
            .map_err(|e| self.deny(&parent, id, e))?;
        Ok(Response::new(bubble_to_pb(&rec)))
    }

    async fn admin_drain(
        &self,
        request: Request<pb::AdminDrainRequest>,
    ) -> Result<Response<pb::AdminDrainResponse>, Status> {
        let parent = self.parent(&request)?;
        let live = self.broker.admin_drain(&parent, request.get_ref().drain)?;
        Ok(Response::new(pb::AdminDrainResponse {
            draining: self.broker.draining(),
            live_bubbles: live,
        }))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let parent = self.parent(&request)?;
        let only = request.into_inner().bubble_id;
        if !only.is_empty() {
            validate_bubble_id(&only)?;
            self.broker
                .owned(&parent, &only)
                .map_err(|e| self.deny(&parent, &only, e))?;
        }
        let rx = self.broker.subscribe(&parent);
        let stream =
            tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(move |ev| match ev {
                Ok(ev) if ev.owner == parent && (only.is_empty() || ev.bubble_id == only) => {
                    Some(Ok(convert::event_to_pb(&ev)))
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
