//! Strikes and quarantine: [`STRIKES`] security events of one kind caused
//! by one module (portion digest) in one parent's bubbles within
//! [`WINDOW`] shut the bubble down (FAILED, reason given) and quarantine
//! the digest *for that parent*: its loads of the module are refused with
//! PERMISSION_DENIED and the reason until an operator lifts it (`POST
//! /quarantine/lift?digest=HEX` on the admin endpoint, for every parent).
//! Strikes and quarantine are per parent because a parent controls what
//! makes a module misbehave (its inputs, its call deadlines): a hostile
//! parent running a victim's public module into the ground must not get it
//! banned for the victim, nor learn that anyone else runs it. The
//! quarantine list lives in memory (a restarted broker starts empty).
//!
//! A parent with [`PROBE_STRIKES`] refusals of one kind (a foreign or
//! unknown bubble id, a foreign attestation, a wrong restore key) within
//! [`WINDOW`] is throttled for [`WINDOW`]: every request it makes is
//! answered RESOURCE_EXHAUSTED with the time to wait, and a `probing`
//! event is raised.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use super::security::{SecurityEvent, SecurityKind};
use super::Broker;

/// Events of one kind by one module that trigger its quarantine…
pub const STRIKES: usize = 3;
/// …within this window.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Refusals of one kind by one parent that throttle it…
pub const PROBE_STRIKES: usize = 10;

/// Kinds that count as strikes against the parent that caused them.
fn counts_against_parent(k: SecurityKind) -> bool {
    matches!(
        k,
        SecurityKind::ForeignAccess
            | SecurityKind::ForeignAttestation
            | SecurityKind::RestoreWrongKey
    )
}

/// Kinds that count as strikes against the module that caused them.
fn counts_against_module(k: SecurityKind) -> bool {
    matches!(
        k,
        SecurityKind::CredentialDenied
            | SecurityKind::HostCallForbidden
            | SecurityKind::MemoryLimit
            | SecurityKind::FuelExhausted
            | SecurityKind::DeadlineKill
    )
}

/// Recent strikes and quarantined module digests.
#[derive(Default)]
pub(crate) struct Ledger {
    /// By (owner, module digest, kind).
    strikes: HashMap<(String, String, SecurityKind), VecDeque<u64>>,
    /// By (owner, module digest): the reason.
    quarantined: HashMap<(String, String), String>,
    by_parent: HashMap<(String, SecurityKind), VecDeque<u64>>,
    throttled_until: HashMap<String, u64>,
}

/// Pushes `at_ms` on a window of strikes; how many are within the window.
fn within_window(q: &mut VecDeque<u64>, at_ms: u64) -> usize {
    let window_ms = WINDOW.as_millis() as u64;
    q.push_back(at_ms);
    while q
        .front()
        .is_some_and(|t| t.saturating_add(window_ms) < at_ms)
    {
        q.pop_front();
    }
    q.len()
}

impl Ledger {
    /// Counts `ev`; returns the quarantine reason when this strike is the
    /// one that quarantines its module.
    fn strike(&mut self, ev: &SecurityEvent) -> Option<String> {
        if ev.portion_digest.is_empty() || !counts_against_module(ev.kind) {
            return None;
        }
        let module = (ev.owner.clone(), ev.portion_digest.clone());
        if self.quarantined.contains_key(&module) {
            return None;
        }
        let q = self
            .strikes
            .entry((ev.owner.clone(), ev.portion_digest.clone(), ev.kind))
            .or_default();
        let n = within_window(q, ev.at_ms);
        if n < STRIKES {
            return None;
        }
        let reason = format!(
            "module {} quarantined after {} {} events within {} s",
            ev.portion_digest,
            n,
            ev.kind,
            WINDOW.as_secs()
        );
        self.strikes
            .retain(|(o, d, _), _| *o != module.0 || *d != module.1);
        self.quarantined.insert(module, reason.clone());
        Some(reason)
    }
}

impl Ledger {
    /// Counts a refusal against its parent; true when this one throttles
    /// the parent.
    fn parent_strike(&mut self, ev: &SecurityEvent) -> bool {
        if ev.parent.is_empty() || !counts_against_parent(ev.kind) {
            return false;
        }
        let q = self
            .by_parent
            .entry((ev.parent.clone(), ev.kind))
            .or_default();
        if within_window(q, ev.at_ms) < PROBE_STRIKES {
            return false;
        }
        q.clear();
        let until = ev.at_ms + WINDOW.as_millis() as u64;
        self.throttled_until.insert(ev.parent.clone(), until);
        true
    }
}

impl Broker {
    /// Counts a refusal against the parent that asked; when this throttles
    /// it, raises the `probing` event.
    pub(crate) fn parent_strike(&self, ev: &SecurityEvent) {
        let throttled = self.ledger.lock().parent_strike(ev);
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

    /// How long `parent` must still wait, ms, if it is throttled.
    pub fn throttled(&self, parent: &str) -> Option<u64> {
        let now = super::now_ms();
        let mut l = self.ledger.lock();
        match l.throttled_until.get(parent) {
            Some(&until) if until > now => Some(until - now),
            Some(_) => {
                l.throttled_until.remove(parent);
                None
            }
            None => None,
        }
    }

    /// Counts a security event against its module; the reason to shut its
    /// bubble down when the module is now quarantined.
    pub(crate) fn strike(&self, ev: &SecurityEvent) -> Option<String> {
        let r = self.ledger.lock().strike(ev);
        if let Some(why) = &r {
            tracing::warn!(bubble = %ev.bubble_id, reason = %why, "module quarantined");
        }
        r
    }

    /// Why module `digest` (SHA-384 hex) may not be loaded into `owner`'s
    /// bubbles, if it is quarantined for that parent.
    pub fn quarantined(&self, owner: &str, digest: &str) -> Option<String> {
        self.ledger
            .lock()
            .quarantined
            .get(&(owner.to_string(), digest.to_string()))
            .cloned()
    }

    /// Lifts a module's quarantine for every parent (operator); whether it
    /// was quarantined for any.
    pub fn lift_quarantine(&self, digest: &str) -> bool {
        let mut l = self.ledger.lock();
        let before = l.quarantined.len();
        l.quarantined.retain(|(_, d), _| d != digest);
        let lifted = l.quarantined.len() != before;
        drop(l);
        if lifted {
            tracing::warn!(digest, "quarantine lifted by the operator");
        }
        lifted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: SecurityKind, digest: &str, at_ms: u64) -> SecurityEvent {
        SecurityEvent {
            bubble_id: "b-1".into(),
            owner: "a".into(),
            parent: "a".into(),
            portion_digest: digest.into(),
            kind,
            at_ms,
        }
    }

    #[test]
    fn n_strikes_of_a_kind_within_the_window_quarantine_the_module() {
        let mut l = Ledger::default();
        let k = SecurityKind::CredentialDenied;
        let w = WINDOW.as_millis() as u64;
        // Spread wider than the window: never three at once.
        for i in 0..6 {
            assert!(l.strike(&ev(k, "d", i * w)).is_none());
        }
        // Other kinds, no digest, or kinds that are not the module's fault.
        assert!(l
            .strike(&ev(SecurityKind::FuelExhausted, "d", 6 * w))
            .is_none());
        assert!(l.strike(&ev(k, "", 6 * w)).is_none());
        assert!(l
            .strike(&ev(SecurityKind::ForeignAccess, "d", 6 * w))
            .is_none());
        assert!(l.strike(&ev(k, "d", 6 * w + 1)).is_none());
        assert!(l.strike(&ev(k, "d", 6 * w + 2)).is_none());
        let why = l.strike(&ev(k, "d", 6 * w + 3)).unwrap();
        assert!(why.contains("3 credential_denied"), "{why}");
        assert_eq!(l.quarantined.get(&("a".into(), "d".into())), Some(&why));
        // Once quarantined, no second shutdown reason.
        assert!(l.strike(&ev(k, "d", 6 * w + 4)).is_none());
        // Another parent's bubbles running the same module are neither
        // quarantined by it nor counted with it.
        let mut other = ev(k, "d", 6 * w + 5);
        other.owner = "victim".into();
        other.parent = "victim".into();
        assert!(l.strike(&other).is_none());
        assert!(!l.quarantined.contains_key(&("victim".into(), "d".into())));
    }

    #[test]
    fn a_parent_is_throttled_after_n_refusals_of_a_kind() {
        let mut l = Ledger::default();
        let mut e = ev(SecurityKind::ForeignAccess, "", 0);
        e.parent = "mallory".into();
        for i in 0..PROBE_STRIKES as u64 - 1 {
            e.at_ms = i;
            assert!(!l.parent_strike(&e));
        }
        // Another kind, or a module's, does not count here.
        let mut other = e.clone();
        other.kind = SecurityKind::FuelExhausted;
        assert!(!l.parent_strike(&other));
        e.at_ms = 100;
        assert!(l.parent_strike(&e));
        assert_eq!(
            l.throttled_until.get("mallory"),
            Some(&(100 + WINDOW.as_millis() as u64))
        );
    }
}
