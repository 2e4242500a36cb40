//! Security events and the audit log: what the broker learns of hostile
//! or failing code and parents, typed; streamed to the bubble's owner on
//! `WatchEvents`, counted in Prometheus by kind, and written (with every
//! credential provision and use and every lifecycle change) to the
//! broker's hash-chained audit log (`bubble-audit`).
//!
//! An event carries ids, a portion digest, a kind and a time; never a
//! secret, an input or an output.

use std::sync::Arc;

use bubble_abi::ops::{Hmac, PortionCall, OP_HMAC, OP_PORTION};
use bubble_audit::{CredentialAction, Entry, Outcome, What};

use super::{now_ms, Broker, Event};
use crate::error::BrokerError;
use crate::store::registry::BubbleRecord;
use crate::vmm::{CallFailure, FailureKind, FailureReason};

macro_rules! kinds {
    ($($(#[doc = $doc:expr])* $name:ident => $label:literal,)*) => {
        /// What kind of security event happened.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum SecurityKind {
            $($(#[doc = $doc])* $name,)*
        }

        impl SecurityKind {
            /// Every kind (metrics start each at zero).
            pub const ALL: &'static [SecurityKind] = &[$(SecurityKind::$name,)*];

            /// A short stable name (metrics label, audit records, events).
            pub fn label(self) -> &'static str {
                match self {
                    $(SecurityKind::$name => $label,)*
                }
            }

            /// The kind of a [`label`](Self::label), if any.
            pub fn from_label(label: &str) -> Option<Self> {
                match label {
                    $($label => Some(SecurityKind::$name),)*
                    _ => None,
                }
            }
        }
    };
}

kinds! {
    /// A credential use that its grants refuse (the built-in `hmac` of a
    /// credential reserved to a portion, or a portion using a credential
    /// not granted to it): the guest's DENIED.
    CredentialDenied => "credential_denied",
    /// A portion used a credential faster than its policy's
    /// `credential_rate` allows: the guest's RATE_LIMITED.
    CredentialRate => "credential_rate",
    /// A portion called a host function its policy forbids. No source
    /// yet: the guest shim refuses such a module at load with a generic
    /// PORTION_REFUSED, which the broker cannot tell from other refusals.
    HostCallForbidden => "host_call_forbidden",
    /// A portion call ran out of fuel.
    FuelExhausted => "fuel_exhausted",
    /// A portion hit its linear-memory limit.
    MemoryLimit => "memory_limit",
    /// A call overran its deadline and the VMM stopped the guest.
    DeadlineKill => "deadline_kill",
    /// The guest broke the ABI (bad message, exit flood, triple fault).
    GuestAbiViolation => "guest_abi_violation",
    /// The VMM was killed by its seccomp filter.
    SeccompKill => "seccomp_kill",
    /// A parent asked for the attestation of a bubble it does not own
    /// (or that does not exist).
    ForeignAttestation => "foreign_attestation",
    /// A parent named a bubble it does not own (or that does not exist)
    /// in any other request: PERMISSION_DENIED.
    ForeignAccess => "foreign_access",
    /// Repeated PERMISSION_DENIED from one parent: raised when the strike
    /// ledger throttles it (`core::strikes`).
    Probing => "probing",
    /// A restore with a key that does not open the frozen copy.
    RestoreWrongKey => "restore_wrong_key",
    /// An event of one of the owner's triggers failed `max_deliver` times
    /// and went to the dead-letter table (`core::dispatch`).
    DeadLetter => "dead_letter",
}

impl SecurityKind {
    /// The kind of a bubble failure, if it is a security matter.
    pub fn of_failure(kind: FailureKind) -> Option<Self> {
        match kind {
            FailureKind::Deadline => Some(Self::DeadlineKill),
            FailureKind::GuestAbi | FailureKind::ExitFlood | FailureKind::TripleFault => {
                Some(Self::GuestAbiViolation)
            }
            FailureKind::Seccomp => Some(Self::SeccompKill),
            FailureKind::MemoryLimit => Some(Self::MemoryLimit),
            _ => None,
        }
    }

    /// The kind of a guest's error code, if it is a security matter.
    pub fn of_guest_code(code: u16) -> Option<Self> {
        use bubble_abi::code as c;
        match code {
            c::DENIED => Some(Self::CredentialDenied),
            c::RATE_LIMITED => Some(Self::CredentialRate),
            c::FUEL => Some(Self::FuelExhausted),
            c::MEMORY_LIMIT => Some(Self::MemoryLimit),
            _ => None,
        }
    }
}

impl std::fmt::Display for SecurityKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// One security event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecurityEvent {
    /// The bubble concerned (as named by the parent, for foreign access).
    pub bubble_id: String,
    /// Its owner, when the bubble exists and has one (the only parent the
    /// event is streamed to).
    pub owner: String,
    /// The parent that acted (empty: none, e.g. a guest failing alone).
    pub parent: String,
    /// SHA-384 (hex) of the portion module concerned, when known.
    pub portion_digest: String,
    /// What happened.
    pub kind: SecurityKind,
    /// When, Unix milliseconds.
    pub at_ms: u64,
}

/// What a call's outcome told the security manager: the portion that ran
/// (for a failure that follows).
#[derive(Clone, Debug, Default)]
pub(crate) struct CallSeen {
    portion_digest: String,
    /// Set when this call's event quarantined its module: why the bubble
    /// must now be shut down.
    pub(crate) quarantine: Option<String>,
}

/// The module digest of portion `name` of a bubble, if loaded.
fn digest_of(rec: &BubbleRecord, name: &str) -> String {
    rec.portions
        .iter()
        .rev()
        .find(|(n, _)| n == name)
        .map(|(_, d)| d.clone())
        .unwrap_or_default()
}

impl Broker {
    /// Raises a security event: counted by kind, streamed to the bubble's
    /// owner (if any) and written to the audit log.
    pub(crate) fn raise(&self, ev: SecurityEvent) {
        self.metrics.security_event(ev.kind);
        tracing::warn!(
            bubble = %ev.bubble_id,
            parent = %ev.parent,
            kind = %ev.kind,
            portion = %ev.portion_digest,
            "security event"
        );
        self.audit.append(
            Entry {
                bubble: ev.bubble_id.clone(),
                owner: ev.owner.clone(),
                parent: ev.parent.clone(),
                portion_digest: ev.portion_digest.clone(),
                at_ms: ev.at_ms,
            },
            What::Security {
                kind: ev.kind.label().to_string(),
            },
        );
        // Operators' watchers, if any (no receiver is not an error).
        let _ = self.admin_events.send(ev.clone());
        if !ev.owner.is_empty() {
            self.emit(Event {
                owner: ev.owner.clone(),
                bubble_id: ev.bubble_id.clone(),
                state: self
                    .table
                    .get(&ev.bubble_id)
                    .map_or(super::State::Deleted, |r| r.state),
                reason: String::new(),
                at_ms: ev.at_ms,
                security: Some(ev),
            });
        }
    }

    /// Writes a state change to the audit log (READY ↔ BUSY flips of calls
    /// are not written: they are never persisted either).
    pub(crate) fn audit_state(&self, ev: &Event) {
        self.audit.append(
            Entry {
                bubble: ev.bubble_id.clone(),
                owner: ev.owner.clone(),
                parent: String::new(),
                portion_digest: String::new(),
                at_ms: ev.at_ms,
            },
            What::Lifecycle {
                state: super::lifecycle::name(ev.state).to_string(),
                reason: ev.reason.clone(),
            },
        );
    }

    /// Writes a credential provision or use to the audit log.
    pub(crate) fn audit_credential(
        &self,
        rec: &BubbleRecord,
        parent: &str,
        action: CredentialAction,
        name: &str,
        portion_digest: String,
        outcome: Outcome,
    ) {
        self.audit.append(
            Entry {
                bubble: rec.id.clone(),
                owner: rec.owner.clone(),
                parent: parent.to_string(),
                portion_digest,
                at_ms: now_ms(),
            },
            What::Credential {
                action,
                name: name.to_string(),
                outcome,
            },
        );
    }

    /// Audits a credential provision (its name and outcome, never the
    /// sealed value).
    pub(crate) fn audit_provision(
        &self,
        rec: &BubbleRecord,
        parent: &str,
        name: &str,
        r: &Result<(), BrokerError>,
    ) {
        let outcome = match r {
            Ok(()) => Outcome::Ok,
            Err(BrokerError::GuestDenied(_)) => Outcome::Denied,
            Err(_) => Outcome::Failed,
        };
        let action = CredentialAction::Provision;
        self.audit_credential(rec, parent, action, name, String::new(), outcome);
    }

    /// Looks at a call's outcome in bubble `rec` (its permit held): audits
    /// a built-in `hmac` (credential use) and raises the security events
    /// the guest reported (denied credential, fuel, memory). Returns the
    /// portion concerned, for a failure that the caller applies next.
    pub(crate) fn observe_call(
        &self,
        rec: &BubbleRecord,
        call: &bubble_abi::Call<'_>,
        result: &Result<Vec<u8>, CallFailure>,
    ) -> CallSeen {
        let portion_digest = match call.op {
            OP_PORTION => PortionCall::decode(call.input)
                .map(|c| digest_of(rec, c.portion))
                .unwrap_or_default(),
            _ => String::new(),
        };
        let code = match result {
            Err(CallFailure::Rejected(code, _)) => Some(*code),
            _ => None,
        };
        if call.op == OP_HMAC {
            if let Ok(h) = Hmac::decode(call.input) {
                let outcome = match (result, code) {
                    (Ok(_), _) => Outcome::Ok,
                    (_, Some(bubble_abi::code::DENIED)) => Outcome::Denied,
                    _ => Outcome::Failed,
                };
                self.audit_credential(
                    rec,
                    &rec.owner,
                    CredentialAction::Use,
                    h.name,
                    String::new(),
                    outcome,
                );
            }
        }
        if let Some(kind) = code.and_then(SecurityKind::of_guest_code) {
            if kind == SecurityKind::CredentialDenied && call.op == OP_PORTION {
                // The guest does not say which credential: audited unnamed.
                self.audit_credential(
                    rec,
                    &rec.owner,
                    CredentialAction::Use,
                    "",
                    portion_digest.clone(),
                    Outcome::Denied,
                );
            }
            let ev = SecurityEvent {
                bubble_id: rec.id.clone(),
                owner: rec.owner.clone(),
                parent: rec.owner.clone(),
                portion_digest: portion_digest.clone(),
                kind,
                at_ms: now_ms(),
            };
            let quarantine = self.strike(&ev);
            self.raise(ev);
            return CallSeen {
                portion_digest,
                quarantine,
            };
        }
        CallSeen {
            portion_digest,
            quarantine: None,
        }
    }

    /// Fails a bubble whose call ended its life (deadline, guest failure);
    /// the security event, if any, names the portion that ran.
    pub(crate) fn fail_seen(self: &Arc<Self>, id: &str, reason: &FailureReason, seen: CallSeen) {
        self.fail_with(id, None, reason, seen.portion_digest);
    }

    /// Raises the event of an applied failure, if it is a security matter.
    pub(crate) fn failure_event(&self, rec: &BubbleRecord, kind: FailureKind, digest: String) {
        if let Some(kind) = SecurityKind::of_failure(kind) {
            let ev = SecurityEvent {
                bubble_id: rec.id.clone(),
                owner: rec.owner.clone(),
                parent: String::new(),
                portion_digest: digest,
                kind,
                at_ms: now_ms(),
            };
            // The bubble has failed already; the module may be quarantined.
            let _ = self.strike(&ev);
            self.raise(ev);
        }
    }

    /// Raises the event of a request refused with PERMISSION_DENIED for
    /// `bubble_id` (foreign or unknown id, or a wrong restore key), then
    /// hands the error back. The event goes to the bubble's owner, if the
    /// bubble exists; the asking parent is told nothing more than before.
    pub(crate) fn denied(
        &self,
        parent: &str,
        bubble_id: &str,
        attestation: bool,
        e: BrokerError,
    ) -> BrokerError {
        let kind = match &e {
            BrokerError::NotAccessible(_) if attestation => SecurityKind::ForeignAttestation,
            BrokerError::NotAccessible(_) => SecurityKind::ForeignAccess,
            BrokerError::WrongKey => SecurityKind::RestoreWrongKey,
            _ => return e,
        };
        let owner = self
            .table
            .get(bubble_id)
            .map(|r| r.owner)
            .unwrap_or_default();
        if kind != SecurityKind::RestoreWrongKey && owner == parent {
            // Its own bubble, gone meanwhile: not an attempt on another's.
            return e;
        }
        let ev = SecurityEvent {
            bubble_id: bubble_id.to_string(),
            owner,
            parent: parent.to_string(),
            portion_digest: String::new(),
            kind,
            at_ms: now_ms(),
        };
        self.parent_strike(&ev);
        self.raise(ev);
        e
    }
}

/// Which call [`Broker::time_call_accounting`] accounts for.
#[doc(hidden)]
#[derive(Clone, Copy, Debug)]
pub enum AccountedCall {
    /// A successful call of a loaded portion (what most calls are).
    Portion,
    /// A successful built-in `hmac` (a credential use: one audit record).
    Hmac,
}

impl Broker {
    /// For `bubble-bench`'s `security_accounting` only: times, `n` times,
    /// the security accounting that every call through the API does on
    /// this broker for bubble `id` (called by its owner): the throttle
    /// check of the caller (`api::Api::parent`), then [`Broker::observe_call`] of a
    /// successful outcome (`core::calls::invoke_then`). Neither the guest
    /// nor the registry is involved: this is the accounting's own cost.
    /// `None` if the bubble is unknown.
    #[doc(hidden)]
    pub fn time_call_accounting(
        &self,
        id: &str,
        portion: &str,
        which: AccountedCall,
        n: usize,
    ) -> Option<Vec<std::time::Duration>> {
        let rec = self.table.get(id)?;
        let input = match which {
            AccountedCall::Portion => PortionCall {
                portion,
                function: "f",
                input: &[0u8; 64],
            }
            .encode()
            .ok()?,
            AccountedCall::Hmac => Hmac {
                name: "bench_key",
                data: &[0u8; 64],
            }
            .encode()
            .ok()?,
        };
        let op = match which {
            AccountedCall::Portion => OP_PORTION,
            AccountedCall::Hmac => OP_HMAC,
        };
        let call = bubble_abi::Call::plain(op, &input);
        let result: Result<Vec<u8>, CallFailure> = Ok(vec![0u8; 32]);
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let t = std::time::Instant::now();
            let throttled = self.throttled(&rec.owner);
            let seen = self.observe_call(&rec, &call, &result);
            std::hint::black_box((throttled, seen));
            v.push(t.elapsed());
        }
        Some(v)
    }
}
