//! The strike ledger (`core::strikes` applies it): recent strikes by
//! module and by parent, throttles and quarantines, and the registry
//! changes each strike makes, so that counts survive a restart.
//!
//! Bounds: a window keeps at most its threshold's number of strikes (only
//! the latest ones can make the count), expired strikes are dropped when
//! the window is touched and when the broker starts, and a parent has at
//! most [`MAX_MODULE_WINDOWS`] module windows (a new one evicts the window
//! whose latest strike is oldest).

use std::collections::{BTreeMap, HashMap, VecDeque};

use super::security::{SecurityEvent, SecurityKind};
use crate::config::SecurityConfig;
use crate::store::registry::{Quarantine, StrikeEntry};

/// Module strike windows kept per parent.
pub(crate) const MAX_MODULE_WINDOWS: usize = 64;

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
            | SecurityKind::CredentialRate
            | SecurityKind::HostCallForbidden
            | SecurityKind::MemoryLimit
            | SecurityKind::FuelExhausted
            | SecurityKind::DeadlineKill
    )
}

/// Where a piece of the ledger is kept in the registry.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Key {
    /// Strikes of `kind` by module `digest` in `owner`'s bubbles.
    Module {
        owner: String,
        digest: String,
        kind: SecurityKind,
    },
    /// Refusals of `kind` of `parent`.
    Parent { parent: String, kind: SecurityKind },
    /// `parent`'s throttle.
    Throttle { parent: String },
}

impl Key {
    /// `m\0owner\0digest\0kind`, `p\0parent\0kind` or `t\0parent`: the
    /// parent may hold any byte, so it is parsed from both ends.
    fn encode(&self) -> String {
        match self {
            Key::Module {
                owner,
                digest,
                kind,
            } => format!("m\0{owner}\0{digest}\0{kind}"),
            Key::Parent { parent, kind } => format!("p\0{parent}\0{kind}"),
            Key::Throttle { parent } => format!("t\0{parent}"),
        }
    }

    fn decode(s: &str) -> Option<Self> {
        if let Some(rest) = s.strip_prefix("m\0") {
            let (rest, kind) = rest.rsplit_once('\0')?;
            let (owner, digest) = rest.rsplit_once('\0')?;
            return Some(Key::Module {
                owner: owner.to_string(),
                digest: digest.to_string(),
                kind: SecurityKind::from_label(kind)?,
            });
        }
        if let Some(rest) = s.strip_prefix("p\0") {
            let (parent, kind) = rest.rsplit_once('\0')?;
            return Some(Key::Parent {
                parent: parent.to_string(),
                kind: SecurityKind::from_label(kind)?,
            });
        }
        s.strip_prefix("t\0").map(|p| Key::Throttle {
            parent: p.to_string(),
        })
    }
}

/// Registry changes not yet written: key → new entry (`None`: remove).
pub(crate) type Pending = BTreeMap<String, Option<StrikeEntry>>;

/// Recent strikes, throttles and quarantined module digests.
pub(crate) struct Ledger {
    th: SecurityConfig,
    /// By owner, then (module digest, kind).
    strikes: HashMap<String, HashMap<(String, SecurityKind), VecDeque<u64>>>,
    /// By (owner, module digest).
    pub(crate) quarantined: HashMap<(String, String), Quarantine>,
    by_parent: HashMap<(String, SecurityKind), VecDeque<u64>>,
    pub(crate) throttled_until: HashMap<String, u64>,
    pending: Pending,
}

/// Drops the strikes of `q` older than `window_s` before `now_ms` and all
/// but the latest `cap`.
fn prune(q: &mut VecDeque<u64>, now_ms: u64, window_s: u64, cap: usize) {
    let window_ms = window_s.saturating_mul(1000);
    while q
        .front()
        .is_some_and(|t| t.saturating_add(window_ms) < now_ms)
    {
        q.pop_front();
    }
    while q.len() > cap {
        q.pop_front();
    }
}

/// Pushes `at_ms` on a window of strikes; how many are within the last
/// `window_s` seconds (at most `cap`).
fn within_window(q: &mut VecDeque<u64>, at_ms: u64, window_s: u64, cap: usize) -> usize {
    q.push_back(at_ms);
    prune(q, at_ms, window_s, cap);
    q.len()
}

fn window(q: &VecDeque<u64>) -> Option<StrikeEntry> {
    Some(StrikeEntry::Window(q.iter().copied().collect()))
}

impl Ledger {
    /// A ledger with these thresholds, the quarantines in force (parent,
    /// digest, quarantine) and the strike entries the registry keeps, as
    /// of `now_ms`: expired and unreadable entries are dropped (the
    /// removals are [pending](Self::take_pending)).
    pub(crate) fn new(
        th: SecurityConfig,
        quarantined: Vec<(String, String, Quarantine)>,
        entries: Vec<(String, StrikeEntry)>,
        now_ms: u64,
    ) -> Self {
        let mut l = Self {
            th,
            strikes: HashMap::new(),
            quarantined: quarantined
                .into_iter()
                .map(|(p, d, q)| ((p, d), q))
                .collect(),
            by_parent: HashMap::new(),
            throttled_until: HashMap::new(),
            pending: Pending::new(),
        };
        for (k, e) in entries {
            if !l.load(&k, e, now_ms) {
                l.pending.insert(k, None);
            }
        }
        l
    }

    /// Takes in one persisted entry; false when it is to be removed.
    fn load(&mut self, k: &str, e: StrikeEntry, now_ms: u64) -> bool {
        let (key, e) = match (Key::decode(k), e) {
            (Some(Key::Throttle { parent }), StrikeEntry::ThrottledUntil(until)) => {
                if until <= now_ms {
                    return false;
                }
                self.throttled_until.insert(parent, until);
                return true;
            }
            (Some(key), StrikeEntry::Window(times)) => (key, times),
            _ => {
                tracing::warn!(key = ?k, "unreadable strike entry dropped");
                return false;
            }
        };
        let mut q: VecDeque<u64> = e.into_iter().collect();
        match key {
            Key::Module {
                owner,
                digest,
                kind,
            } => {
                prune(&mut q, now_ms, self.th.strike_window_s, self.th.strikes);
                let windows = self.strikes.entry(owner.clone()).or_default();
                if q.is_empty()
                    || self.quarantined.contains_key(&(owner, digest.clone()))
                    || windows.len() >= MAX_MODULE_WINDOWS
                {
                    return false;
                }
                windows.insert((digest, kind), q);
            }
            Key::Parent { parent, kind } => {
                prune(
                    &mut q,
                    now_ms,
                    self.th.probe_window_s,
                    self.th.probe_strikes,
                );
                if q.is_empty() {
                    return false;
                }
                self.by_parent.insert((parent, kind), q);
            }
            Key::Throttle { .. } => return false,
        }
        true
    }

    /// The registry changes made since the last call.
    pub(crate) fn take_pending(&mut self) -> Pending {
        std::mem::take(&mut self.pending)
    }

    /// Puts back changes that could not be written, unless newer ones
    /// replace them.
    pub(crate) fn requeue(&mut self, p: Pending) {
        for (k, e) in p {
            self.pending.entry(k).or_insert(e);
        }
    }

    /// Counts `ev`; returns the quarantine when this strike is the one that
    /// quarantines its module.
    pub(crate) fn strike(&mut self, ev: &SecurityEvent) -> Option<Quarantine> {
        if ev.portion_digest.is_empty() || !counts_against_module(ev.kind) {
            return None;
        }
        let module = (ev.owner.clone(), ev.portion_digest.clone());
        if self.quarantined.contains_key(&module) {
            return None;
        }
        let key = |digest: &str, kind| {
            Key::Module {
                owner: ev.owner.clone(),
                digest: digest.to_string(),
                kind,
            }
            .encode()
        };
        let windows = self.strikes.entry(ev.owner.clone()).or_default();
        let wk = (ev.portion_digest.clone(), ev.kind);
        if !windows.contains_key(&wk) && windows.len() >= MAX_MODULE_WINDOWS {
            let oldest = windows
                .iter()
                .min_by_key(|(_, q)| q.back().copied().unwrap_or(0))
                .map(|(k, _)| k.clone());
            if let Some((d, k)) = oldest {
                windows.remove(&(d.clone(), k));
                self.pending.insert(key(&d, k), None);
            }
        }
        let q = windows.entry(wk).or_default();
        let n = within_window(q, ev.at_ms, self.th.strike_window_s, self.th.strikes);
        if n < self.th.strikes {
            self.pending
                .insert(key(&ev.portion_digest, ev.kind), window(q));
            return None;
        }
        let q = Quarantine {
            reason: format!(
                "module {} quarantined after {} {} events within {} s",
                ev.portion_digest, n, ev.kind, self.th.strike_window_s
            ),
            since_ms: ev.at_ms,
        };
        let gone: Vec<SecurityKind> = windows
            .keys()
            .filter(|(d, _)| *d == module.1)
            .map(|(_, k)| *k)
            .collect();
        for k in gone {
            windows.remove(&(module.1.clone(), k));
            self.pending.insert(key(&module.1, k), None);
        }
        self.quarantined.insert(module, q.clone());
        Some(q)
    }

    /// Counts a refusal against its parent; true when this one throttles
    /// the parent.
    pub(crate) fn parent_strike(&mut self, ev: &SecurityEvent) -> bool {
        if ev.parent.is_empty() || !counts_against_parent(ev.kind) {
            return false;
        }
        let wkey = Key::Parent {
            parent: ev.parent.clone(),
            kind: ev.kind,
        }
        .encode();
        let q = self
            .by_parent
            .entry((ev.parent.clone(), ev.kind))
            .or_default();
        let n = within_window(q, ev.at_ms, self.th.probe_window_s, self.th.probe_strikes);
        if n < self.th.probe_strikes {
            self.pending.insert(wkey, window(q));
            return false;
        }
        self.by_parent.remove(&(ev.parent.clone(), ev.kind));
        self.pending.insert(wkey, None);
        let until = ev.at_ms + self.th.throttle_s.saturating_mul(1000);
        self.throttled_until.insert(ev.parent.clone(), until);
        let tkey = Key::Throttle {
            parent: ev.parent.clone(),
        };
        self.pending
            .insert(tkey.encode(), Some(StrikeEntry::ThrottledUntil(until)));
        true
    }

    /// How long `parent` must still wait at `now_ms`, ms, if throttled.
    pub(crate) fn throttled(&mut self, parent: &str, now_ms: u64) -> Option<u64> {
        match self.throttled_until.get(parent) {
            Some(&until) if until > now_ms => Some(until - now_ms),
            Some(_) => {
                self.throttled_until.remove(parent);
                let k = Key::Throttle {
                    parent: parent.to_string(),
                };
                self.pending.insert(k.encode(), None);
                None
            }
            None => None,
        }
    }
}

#[cfg(test)]
#[path = "ledger_tests.rs"]
mod tests;
