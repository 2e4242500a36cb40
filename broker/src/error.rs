//! Broker errors and their gRPC status codes.

use tonic::{Code, Status};

use crate::store::registry::RegistryError;

/// The built-in ops a parent may call (the others are the broker's own:
/// provisioning, portions and the policy have their own requests).
pub const PUBLIC_OPS: [&str; 6] = [
    bubble_abi::ops::OP_ECHO,
    bubble_abi::ops::OP_SHA256,
    bubble_abi::ops::OP_SHA256_CHAIN,
    bubble_abi::ops::OP_KEYS,
    bubble_abi::ops::OP_ATTEST,
    bubble_abi::ops::OP_HMAC,
];

/// Everything a broker operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// A request field is invalid; the message names the field.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// Field name as in the proto.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The bubble does not exist or belongs to another parent (same error
    /// for both so that ids cannot be probed).
    #[error("bubble {0} is not accessible to this parent")]
    NotAccessible(String),
    /// The bubble is in a state that does not allow the operation.
    #[error("bubble {id} is {state}{detail}")]
    WrongState {
        /// Bubble id.
        id: String,
        /// Its state name.
        state: &'static str,
        /// Failure reason, if any, prefixed with ": ".
        detail: String,
    },
    /// The operation waited for the bubble (behind another operation on
    /// it) past its deadline; nothing was done and the bubble is unchanged.
    #[error("bubble {0} is busy with another operation; nothing was done")]
    Queued(String),
    /// The bubble has no such built-in op (the message lists the public
    /// ones, never the broker's internal ops).
    #[error(
        "unknown op; the built-in ops are {}, and a loaded portion's functions are called \
         with the portion field",
        PUBLIC_OPS.join(", ")
    )]
    UnknownOp,
    /// The guest rejected the call (bad input).
    #[error("guest rejected the call: {0}")]
    GuestRejected(String),
    /// A policy or credential grant refused the call inside the bubble.
    #[error("denied inside the bubble: {0}")]
    GuestDenied(String),
    /// A resource limit of the bubble's policy stopped the call.
    #[error("limit reached inside the bubble: {0}")]
    GuestLimit(String),
    /// A portion used a credential faster than the policy's
    /// `credential_rate` allows (the guest's RATE_LIMITED).
    #[error("credential rate limit reached inside the bubble: {0}")]
    GuestRateLimited(String),
    /// The portion trapped (the bubble stays usable).
    #[error("portion trapped: {0}")]
    GuestTrap(String),
    /// The portion refused the request, or the bubble's state forbids it.
    #[error("refused inside the bubble: {0}")]
    GuestRefused(String),
    /// The bubble's code is frozen under a grant or an attestation: no
    /// portion may be loaded or replaced.
    #[error("the bubble's code is frozen: {0}")]
    CodeFrozen(String),
    /// A sealed input's sequence number was used already (a replay).
    #[error("sealed input refused as a replay: {0}")]
    Replayed(String),
    /// A sealed credential or input does not open inside the bubble (sealed
    /// for another bubble, code set, policy or request).
    #[error("sealed data does not open in this bubble: {0}")]
    NotOpened(String),
    /// A session call named a session the bubble does not hold (never
    /// opened, evicted) or a setup for a session id used before.
    #[error("sealed session refused: {0}")]
    NoSession(String),
    /// The guest failed internally.
    #[error("guest internal error: {0}")]
    GuestInternal(String),
    /// The VMM refused the request (it did not decode, or the VMM cannot
    /// serve it now); the bubble is unaffected.
    #[error("the VMM refused the request: {0}")]
    VmmRefused(String),
    /// The call ran past its deadline; the bubble was stopped.
    #[error("call deadline exceeded: {0}")]
    DeadlineExceeded(String),
    /// The bubble died during the operation.
    #[error("bubble failed: {0}")]
    BubbleFailed(String),
    /// The output exceeds the configured payload limit.
    #[error("output of {0} bytes exceeds the payload limit of {1} bytes")]
    OutputTooLarge(usize, usize),
    /// A quota or host admission limit refuses the request; the message
    /// carries the numbers.
    #[error("quota exceeded: {0}")]
    Quota(String),
    /// The bubble could not be started.
    #[error("bubble could not be started: {0}")]
    Spawn(String),
    /// A frozen copy is corrupt, truncated or missing.
    #[error("frozen bubble is damaged: {0}")]
    DataLoss(String),
    /// Another broker sharing the store holds the frozen copy's claim.
    #[error("bubble {0}: its frozen copy is being restored by another broker")]
    ClaimedElsewhere(String),
    /// This broker's claim on the frozen copy was taken over (its lease
    /// ran out) before the restore or suspend committed: nothing was
    /// committed and the VMM it started is stopped.
    #[error("bubble {0}: the claim on its frozen copy was lost before the commit")]
    ClaimLost(String),
    /// The frozen copy (its manifest) is not in the store.
    #[error("frozen bubble is damaged: its manifest is missing")]
    FrozenMissing,
    /// The key does not unwrap the frozen copy.
    #[error("the key does not open this frozen bubble")]
    WrongKey,
    /// The module is quarantined broker-wide (see `core::strikes`).
    #[error("refused: {0}; an operator can lift the quarantine")]
    Quarantined(String),
    /// An operator asked to lift a quarantine that is not in force.
    #[error("module {0} is not quarantined (for the parent named, if any)")]
    NotQuarantined(String),
    /// Attach with a policy: pooled bubbles failed to take the policy this
    /// many times in a row; none was handed over (`core::pools`).
    #[error("no pooled bubble took the security policy ({0} attempts); try again")]
    PolicyNotApplied(u32),
    /// The parent is throttled for probing (see `core::strikes`).
    #[error("too many refused requests: throttled; retry after {0} ms")]
    Throttled(u64),
    /// The store failed.
    #[error("store: {0}")]
    Store(String),
    /// The broker cannot serve this now (e.g. its disk is not answering).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// An idempotency key was reused with different parameters; names the
    /// first field that differs.
    #[error(
        "client_request_id was already used for a different request ({field} differs); \
         use a new request id"
    )]
    RequestIdReused {
        /// The request field that differs.
        field: &'static str,
    },
    /// The broker is draining (an operator asked): no new bubbles.
    #[error("the broker is draining: it accepts no new bubbles; use another broker")]
    Draining,
    /// An operator-only request from a parent that is not a configured admin.
    #[error("this needs an admin identity (the broker's `admins` configuration)")]
    NotAdmin,
    /// The parent already has a trigger on this subject (one per subject:
    /// each event of a subject goes to one trigger).
    #[error("a trigger on subject {0:?} exists already ({1}); delete it first")]
    TriggerExists(String, String),
    /// An event published on a subject none of the parent's triggers
    /// consumes.
    #[error("no trigger of yours consumes subject {0:?}; create one first")]
    NoTrigger(String),
    /// A trigger on a named bubble was given a security policy other than
    /// the bubble's (fixed at its create or attach, and attested).
    #[error("the trigger's policy differs from bubble {0}'s; give the bubble's policy or none")]
    TriggerPolicyDiffers(String),
    /// A trigger's pending events are at its limit: the event was not
    /// stored.
    #[error(
        "{pending} events of this trigger are pending, its limit is {limit}: nothing stored; \
         retry after {retry_after_ms} ms"
    )]
    Backlog {
        /// Pending now.
        pending: u64,
        /// The trigger's limit.
        limit: u64,
        /// When to try again (the `retry-after-ms` metadata).
        retry_after_ms: u64,
    },
    /// The trigger has no dead letter with this key.
    #[error("no dead letter with key {0:?} on this trigger")]
    NoDeadLetter(String),
    /// The trigger's source is not configured on this broker.
    #[error("event source {0:?} is not configured on this broker")]
    SourceNotConfigured(&'static str),
    /// A portion of the call awaits an event: the call is pending inside
    /// the bubble (`core::awaits` freezes it).
    #[error("a portion of bubble {bubble_id} awaits the event {key:?}")]
    Awaiting {
        /// The bubble.
        bubble_id: String,
        /// The portion's key (not namespaced).
        key: String,
        /// Its timeout, ms.
        timeout_ms: u32,
    },
    /// The bubble refused the call: one of its portion calls awaits an
    /// event.
    #[error("refused: {0}")]
    GuestAwaiting(String),
    /// Another await of the parent holds the key.
    #[error("an await on key {0:?} exists already")]
    AwaitTaken(String),
    /// The await on this key ended already (resumed, timed out or
    /// cancelled): an event with its key resumes nothing.
    #[error("the await on key {0:?} has ended; this event resumed nothing")]
    AwaitEnded(String),
    /// The awaiting bubble was deleted by its owner before an event or
    /// the timeout resumed its call.
    #[error("the awaiting bubble {0} was deleted before its call was resumed")]
    AwaitCancelled(String),
    /// The parent has as many live awaits (frozen by this broker) as it
    /// may: another portion call cannot wait frozen.
    #[error("too many awaits: this parent already has {limit} live awaits on this broker (events.max_awaits_per_owner); end some first")]
    AwaitLimit {
        /// The limit.
        limit: usize,
    },
    /// The event queue failed.
    #[error("event queue: {0}")]
    Events(#[from] bubble_events::EventError),
    /// The registry failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A bubble frozen under its parent's key cannot wait frozen for an
    /// event (it would have to be frozen under the broker's key).
    #[error("bubble {0} is kept under its parent's key and cannot be frozen to await an event")]
    ParentKeyedAwait(String),
    /// An action that must be audited first could not be made durable in
    /// the audit log; it was not taken.
    #[error("the audit log could not record this action, so it was not taken: {0}")]
    AuditUnavailable(#[from] bubble_audit::AuditError),
}

impl From<BrokerError> for Status {
    fn from(e: BrokerError) -> Self {
        let code = match &e {
            BrokerError::InvalidArgument { .. }
            | BrokerError::GuestRejected(_)
            | BrokerError::UnknownOp => Code::InvalidArgument,
            BrokerError::NotAccessible(_) | BrokerError::GuestDenied(_) | BrokerError::NotAdmin => {
                Code::PermissionDenied
            }
            BrokerError::GuestLimit(_) | BrokerError::GuestRateLimited(_) => {
                Code::ResourceExhausted
            }
            BrokerError::GuestTrap(_) => Code::Aborted,
            BrokerError::GuestRefused(_) | BrokerError::CodeFrozen(_) => Code::FailedPrecondition,
            BrokerError::Replayed(_) => Code::AlreadyExists,
            BrokerError::NotOpened(_) => Code::InvalidArgument,
            BrokerError::NoSession(_) => Code::FailedPrecondition,
            BrokerError::GuestInternal(_) | BrokerError::VmmRefused(_) => Code::Internal,
            BrokerError::WrongState { .. }
            | BrokerError::ClaimedElsewhere(_)
            | BrokerError::ClaimLost(_) => Code::FailedPrecondition,
            BrokerError::DeadlineExceeded(_) | BrokerError::Queued(_) => Code::DeadlineExceeded,
            BrokerError::BubbleFailed(_) => Code::Aborted,
            BrokerError::OutputTooLarge(..)
            | BrokerError::Quota(_)
            | BrokerError::Throttled(_)
            | BrokerError::Backlog { .. }
            | BrokerError::AwaitLimit { .. } => Code::ResourceExhausted,
            BrokerError::Spawn(_) | BrokerError::PolicyNotApplied(_) => Code::Unavailable,
            BrokerError::NotQuarantined(_) | BrokerError::NoDeadLetter(_) => Code::NotFound,
            BrokerError::Registry(_) | BrokerError::AuditUnavailable(_) => Code::Internal,
            BrokerError::TriggerExists(..) => Code::AlreadyExists,
            BrokerError::SourceNotConfigured(_)
            | BrokerError::NoTrigger(_)
            | BrokerError::TriggerPolicyDiffers(_)
            | BrokerError::ParentKeyedAwait(_)
            | BrokerError::Awaiting { .. }
            | BrokerError::GuestAwaiting(_)
            | BrokerError::AwaitTaken(_)
            | BrokerError::AwaitEnded(_)
            | BrokerError::AwaitCancelled(_) => Code::FailedPrecondition,
            BrokerError::Events(e) => match e {
                bubble_events::EventError::InvalidKey
                | bubble_events::EventError::InvalidSubject => Code::InvalidArgument,
                bubble_events::EventError::TooLarge => Code::ResourceExhausted,
                _ => Code::Unavailable,
            },
            BrokerError::RequestIdReused { .. } => Code::AlreadyExists,
            BrokerError::DataLoss(_) | BrokerError::FrozenMissing => Code::DataLoss,
            BrokerError::WrongKey | BrokerError::Quarantined(_) => Code::PermissionDenied,
            BrokerError::Store(_) | BrokerError::Unavailable(_) | BrokerError::Draining => {
                Code::Unavailable
            }
        };
        let mut s = Status::new(code, e.to_string());
        if let BrokerError::NoSession(_) = e {
            s.metadata_mut().insert(
                bubble_proto::SESSION_REFUSED_KEY,
                tonic::metadata::MetadataValue::from_static(bubble_proto::SESSION_REFUSED_VALUE),
            );
        }
        let retry_after = match e {
            BrokerError::Throttled(ms) => Some(ms),
            BrokerError::Backlog { retry_after_ms, .. } => Some(retry_after_ms),
            _ => None,
        };
        if let Some(ms) = retry_after {
            if let Ok(v) = ms.to_string().parse() {
                s.metadata_mut().insert("retry-after-ms", v);
            }
        }
        s
    }
}

impl BrokerError {
    /// Maps a guest ABI error code to the broker error (and so the gRPC code).
    pub fn from_guest(code: u16, msg: String) -> Self {
        use bubble_vmm::abi::code as c;
        match code {
            c::DENIED => BrokerError::GuestDenied(msg),
            c::FUEL | c::MEMORY_LIMIT | c::OUTPUT_LIMIT | c::TOO_LARGE => {
                BrokerError::GuestLimit(msg)
            }
            c::RATE_LIMITED => BrokerError::GuestRateLimited(msg),
            c::TRAP => BrokerError::GuestTrap(msg),
            c::PORTION_REFUSED | c::STATE => BrokerError::GuestRefused(msg),
            c::FROZEN => BrokerError::CodeFrozen(msg),
            c::REPLAY => BrokerError::Replayed(msg),
            c::NOT_OPENED => BrokerError::NotOpened(msg),
            c::NO_SESSION => BrokerError::NoSession(msg),
            c::AWAITING => BrokerError::GuestAwaiting(msg),
            c::NOT_AWAITING => BrokerError::GuestRefused(msg),
            // The guest's own list names internal ops too.
            c::UNKNOWN_OP => BrokerError::UnknownOp,
            c::INTERNAL => BrokerError::GuestInternal(msg),
            _ => BrokerError::GuestRejected(msg),
        }
    }
}

/// Shorthand for an invalid-argument error.
pub fn invalid(field: &'static str, reason: impl Into<String>) -> BrokerError {
    BrokerError::InvalidArgument {
        field,
        reason: reason.into(),
    }
}
