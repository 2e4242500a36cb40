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
//! banned for the victim, nor learn that anyone else runs it. Quarantines
//! are kept in the registry: a restarted broker keeps them (strike counts
//! and throttles live in memory only).
//!
//! A parent with `probe_strikes` refusals of one kind (a foreign or
//! unknown bubble id, a foreign attestation, a wrong restore key) within
//! `probe_window_s` (default 10 within 60 s) is throttled for
//! `throttle_s` (default 60 s): every request it makes is answered
//! RESOURCE_EXHAUSTED with the time to wait, and a `probing` event is
//! raised.

use std::collections::{HashMap, VecDeque};

use super::security::{SecurityEvent, SecurityKind};
use super::Broker;
use crate::config::SecurityConfig;
use crate::error::BrokerError;
use crate::store::registry::Quarantine;

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
pub(crate) struct Ledger {
    th: SecurityConfig,
    /// By (owner, module digest, kind).
    strikes: HashMap<(String, String, SecurityKind), VecDeque<u64>>,
    /// By (owner, module digest).
    quarantined: HashMap<(String, String), Quarantine>,
    by_parent: HashMap<(String, SecurityKind), VecDeque<u64>>,
    throttled_until: HashMap<String, u64>,
}

/// Pushes `at_ms` on a window of strikes; how many are within the last
/// `window_s` seconds.
fn within_window(q: &mut VecDeque<u64>, at_ms: u64, window_s: u64) -> usize {
    let window_ms = window_s.saturating_mul(1000);
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
    /// A ledger with these thresholds and the quarantines in force
    /// (parent, digest, quarantine), as the registry keeps them.
    pub(crate) fn new(th: SecurityConfig, quarantined: Vec<(String, String, Quarantine)>) -> Self {
        Self {
            th,
            strikes: HashMap::new(),
            quarantined: quarantined
                .into_iter()
                .map(|(p, d, q)| ((p, d), q))
                .collect(),
            by_parent: HashMap::new(),
            throttled_until: HashMap::new(),
        }
    }

    /// Counts `ev`; returns the quarantine when this strike is the one that
    /// quarantines its module.
    fn strike(&mut self, ev: &SecurityEvent) -> Option<Quarantine> {
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
        let n = within_window(q, ev.at_ms, self.th.strike_window_s);
        if n < self.th.strikes {
            return None;
        }
        let q = Quarantine {
            reason: format!(
                "module {} quarantined after {} {} events within {} s",
                ev.portion_digest, n, ev.kind, self.th.strike_window_s
            ),
            since_ms: ev.at_ms,
        };
        self.strikes
            .retain(|(o, d, _), _| *o != module.0 || *d != module.1);
        self.quarantined.insert(module, q.clone());
        Some(q)
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
        if within_window(q, ev.at_ms, self.th.probe_window_s) < self.th.probe_strikes {
            return false;
        }
        q.clear();
        let until = ev.at_ms + self.th.throttle_s.saturating_mul(1000);
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
    /// bubble down when the module is now quarantined. The quarantine
    /// holds in memory at once and is written to the registry (a failed
    /// write is logged: it then holds until this broker stops).
    pub(crate) fn strike(&self, ev: &SecurityEvent) -> Option<String> {
        let q = self.ledger.lock().strike(ev)?;
        tracing::warn!(bubble = %ev.bubble_id, reason = %q.reason, "module quarantined");
        if let Err(e) = self
            .registry
            .put_quarantine(&ev.owner, &ev.portion_digest, &q)
        {
            tracing::error!(error = %e, digest = %ev.portion_digest,
                "quarantine not persisted: it holds only until this broker stops");
        }
        Some(q.reason)
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

    fn ledger() -> Ledger {
        Ledger::new(SecurityConfig::default(), Vec::new())
    }

    #[test]
    fn n_strikes_of_a_kind_within_the_window_quarantine_the_module() {
        let mut l = ledger();
        let k = SecurityKind::CredentialDenied;
        let w = SecurityConfig::default().strike_window_s * 1000;
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
        let q = l.strike(&ev(k, "d", 6 * w + 3)).unwrap();
        assert!(q.reason.contains("3 credential_denied"), "{q:?}");
        assert_eq!(q.since_ms, 6 * w + 3);
        assert_eq!(l.quarantined.get(&("a".into(), "d".into())), Some(&q));
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
        let mut l = ledger();
        let th = SecurityConfig::default();
        let mut e = ev(SecurityKind::ForeignAccess, "", 0);
        e.parent = "mallory".into();
        for i in 0..th.probe_strikes as u64 - 1 {
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
            Some(&(100 + th.throttle_s * 1000))
        );
    }

    /// Configured thresholds are the ones applied, and quarantines given
    /// at start (from the registry) are in force.
    #[test]
    fn configured_thresholds_and_persisted_quarantines_apply() {
        let th = SecurityConfig {
            strikes: 2,
            strike_window_s: 5,
            probe_strikes: 2,
            probe_window_s: 5,
            throttle_s: 7,
        };
        let kept = Quarantine {
            reason: "earlier".into(),
            since_ms: 1,
        };
        let mut l = Ledger::new(th, vec![("a".into(), "old".into(), kept.clone())]);
        assert_eq!(l.quarantined.get(&("a".into(), "old".into())), Some(&kept));
        let k = SecurityKind::FuelExhausted;
        assert!(l.strike(&ev(k, "d", 0)).is_none());
        // Outside a 5 s window: the first no longer counts.
        assert!(l.strike(&ev(k, "d", 5_001)).is_none());
        let q = l.strike(&ev(k, "d", 5_002)).unwrap();
        assert!(
            q.reason.contains("2 fuel_exhausted events within 5 s"),
            "{q:?}"
        );
        let mut e = ev(SecurityKind::RestoreWrongKey, "", 0);
        assert!(!l.parent_strike(&e));
        e.at_ms = 10;
        assert!(l.parent_strike(&e));
        assert_eq!(l.throttled_until.get("a"), Some(&7_010));
    }
}
