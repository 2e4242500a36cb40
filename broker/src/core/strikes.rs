//! Strikes and quarantine: `strikes` security events of one kind caused
//! by one module (portion digest) in one parent's bubbles within
//! `strike_window_s` (the `[security]` configuration, default 3 within
//! 60 s) shut the bubble down (FAILED, reason given) and quarantine the
//! digest *for that parent*: its loads of the module are refused with
//! PERMISSION_DENIED and the reason until an operator lifts it (the admin
//! RPC `AdminQuarantineLift`, `bubblectl admin quarantine lift`).
//! Strikes and quarantine are per parent because a parent controls what
//! makes a module misbehave (its inputs, its call deadlines): a hostile
//! parent running a victim's public module into the ground must not get it
//! banned for the victim, nor learn that anyone else runs it. Quarantines,
//! strike counts and throttles are kept in the registry (strike windows
//! and throttles are written when a strike is counted, before the refusal
//! or failure that caused it is reported), so a restarted broker keeps
//! them: waiting for, or causing, a restart resets nothing. The ledger
//! itself, its bounds and its registry form are in `core::ledger`.
//!
//! A parent with `probe_strikes` refusals of one kind (a foreign or
//! unknown bubble id, a foreign attestation, a wrong restore key) within
//! `probe_window_s` (default 10 within 60 s) is throttled for
//! `throttle_s` (default 60 s): every request it makes is answered
//! RESOURCE_EXHAUSTED with the time to wait, and a `probing` event is
//! raised.

use super::ledger::Pending;
use super::security::{SecurityEvent, SecurityKind};
use super::Broker;
use crate::error::BrokerError;
use crate::store::registry::Quarantine;

impl Broker {
    /// Counts a refusal against the parent that asked; when this throttles
    /// it, raises the `probing` event. The window (or throttle) is durable
    /// in the registry when this returns.
    pub(crate) fn parent_strike(&self, ev: &SecurityEvent) {
        let _w = self.strike_writes.lock();
        let (throttled, pending) = {
            let mut l = self.ledger.lock();
            (l.parent_strike(ev), l.take_pending())
        };
        self.write_strikes(pending);
        if throttled {
            self.raise(SecurityEvent {
                bubble_id: String::new(),
                owner: String::new(),
                parent: ev.parent.clone(),
                portion_digest: String::new(),
                kind: SecurityKind::Probing,
                at_ms: ev.at_ms,
            });
        }
    }

    /// Writes the ledger's changes to the registry; the caller holds
    /// `strike_writes` from before it changed the ledger, so writes land
    /// in the order of the changes. A failed write is logged and its
    /// changes go out with the next strike (until then, a restart forgets
    /// them).
    fn write_strikes(&self, pending: Pending) {
        if pending.is_empty() {
            return;
        }
        let mut puts = Vec::new();
        let mut dels = Vec::new();
        for (k, e) in &pending {
            match e {
                Some(e) => puts.push((k.clone(), e.clone())),
                None => dels.push(k.clone()),
            }
        }
        if let Err(e) = self.registry.update_strikes(&puts, &dels) {
            tracing::error!(error = %e, "strike counts not persisted: retried with the next strike");
            self.ledger.lock().requeue(pending);
        }
    }

    /// How long `parent` must still wait, ms, if it is throttled.
    pub fn throttled(&self, parent: &str) -> Option<u64> {
        self.ledger.lock().throttled(parent, super::now_ms())
    }

    /// Counts a security event against its module; the reason to shut its
    /// bubble down when the module is now quarantined. The strike window is
    /// durable in the registry when this returns; a quarantine holds in
    /// memory at once and is written to the registry (a failed write is
    /// logged: it then holds until this broker stops).
    pub(crate) fn strike(&self, ev: &SecurityEvent) -> Option<String> {
        let _w = self.strike_writes.lock();
        let (q, pending) = {
            let mut l = self.ledger.lock();
            (l.strike(ev), l.take_pending())
        };
        // The quarantine is durable before the strikes that led to it are
        // dropped: a crash in between leaves both, never neither.
        if let Some(q) = &q {
            tracing::warn!(bubble = %ev.bubble_id, reason = %q.reason, "module quarantined");
            if let Err(e) = self
                .registry
                .put_quarantine(&ev.owner, &ev.portion_digest, q)
            {
                tracing::error!(error = %e, digest = %ev.portion_digest,
                    "quarantine not persisted: it holds only until this broker stops");
            }
        }
        self.write_strikes(pending);
        q.map(|q| q.reason)
    }

    /// Why module `digest` (SHA-384 hex) may not be loaded into `owner`'s
    /// bubbles, if it is quarantined for that parent.
    pub fn quarantined(&self, owner: &str, digest: &str) -> Option<String> {
        self.ledger
            .lock()
            .quarantined
            .get(&(owner.to_string(), digest.to_string()))
            .map(|q| q.reason.clone())
    }

    /// Every quarantine in force, sorted by parent then digest (operator
    /// only).
    pub fn quarantine_list(
        &self,
        admin: &str,
    ) -> Result<Vec<(String, String, Quarantine)>, BrokerError> {
        self.require_admin(admin)?;
        let mut out: Vec<_> = self
            .ledger
            .lock()
            .quarantined
            .iter()
            .map(|((p, d), q)| (p.clone(), d.clone(), q.clone()))
            .collect();
        out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        Ok(out)
    }

    /// Lifts module `digest`'s quarantine for `parent` (`None`: for every
    /// parent) (operator only); for how many parents it was lifted. The
    /// registry forgets it before the broker does, so a lift that reports
    /// success survives a restart.
    pub fn lift_quarantine(
        &self,
        admin: &str,
        digest: &str,
        parent: Option<&str>,
    ) -> Result<u32, BrokerError> {
        self.require_admin(admin)?;
        let parents: Vec<String> = self
            .ledger
            .lock()
            .quarantined
            .keys()
            .filter(|(p, d)| d == digest && parent.is_none_or(|want| want == p))
            .map(|(p, _)| p.clone())
            .collect();
        if parents.is_empty() {
            return Err(BrokerError::NotQuarantined(digest.to_string()));
        }
        self.registry.remove_quarantine(&parents, digest)?;
        let mut l = self.ledger.lock();
        for p in &parents {
            l.quarantined.remove(&(p.clone(), digest.to_string()));
        }
        drop(l);
        tracing::warn!(digest, parents = ?parents, admin, "quarantine lifted by an operator");
        Ok(parents.len() as u32)
    }

    /// Refuses a parent that is not one of the configured admins.
    pub(crate) fn require_admin(&self, who: &str) -> Result<(), BrokerError> {
        if self.cfg.admins.iter().any(|a| a == who) {
            Ok(())
        } else {
            Err(BrokerError::NotAdmin)
        }
    }
}
