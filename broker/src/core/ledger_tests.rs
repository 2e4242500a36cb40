//! Unit tests of the strike ledger.

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
    Ledger::new(SecurityConfig::default(), Vec::new(), Vec::new(), 0)
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
    let mut l = Ledger::new(
        th,
        vec![("a".into(), "old".into(), kept.clone())],
        Vec::new(),
        0,
    );
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

/// Writes the ledger's pending changes to `r`.
fn flush(l: &mut Ledger, r: &crate::store::registry::Registry) {
    let mut puts = Vec::new();
    let mut dels = Vec::new();
    for (k, e) in l.take_pending() {
        match e {
            Some(e) => puts.push((k, e)),
            None => dels.push(k),
        }
    }
    r.update_strikes(&puts, &dels).unwrap();
}

/// A ledger as a restarted broker builds it from `r` at `now_ms`.
fn reload(th: &SecurityConfig, r: &crate::store::registry::Registry, now_ms: u64) -> Ledger {
    let mut l = Ledger::new(th.clone(), Vec::new(), r.strike_entries().unwrap(), now_ms);
    flush(&mut l, r);
    l
}

/// N−1 strikes, a restart (the ledger rebuilt from the registry), one
/// more: quarantined and throttled; but a restart after the window has
/// passed forgets them (and removes them from the registry), and a
/// throttle outlives a restart only until it ends.
#[test]
fn strikes_and_throttles_survive_a_reload_and_still_expire() {
    let dir = tempfile::tempdir().unwrap();
    let r = crate::store::registry::Registry::open(&dir.path().join("r.redb")).unwrap();
    let th = SecurityConfig::default();
    let w = th.strike_window_s * 1000;
    let k = SecurityKind::CredentialDenied;
    let mut probe = ev(SecurityKind::ForeignAccess, "", 0);
    probe.parent = "mallory".into();
    let mut l = ledger();
    for i in 0..th.strikes as u64 - 1 {
        assert!(l.strike(&ev(k, "d", 1_000 + i)).is_none());
    }
    for i in 0..th.probe_strikes as u64 - 1 {
        probe.at_ms = 1_000 + i;
        assert!(!l.parent_strike(&probe));
    }
    flush(&mut l, &r);
    assert_eq!(r.strike_entries().unwrap().len(), 2);

    // Within the window: the next strike of each counts with the old ones.
    let mut l = reload(&th, &r, 2_000);
    assert!(l.strike(&ev(k, "d", 2_000)).is_some());
    probe.at_ms = 2_000;
    assert!(l.parent_strike(&probe));
    flush(&mut l, &r);
    // Quarantine and throttle clear the windows; the throttle is kept.
    let entries = r.strike_entries().unwrap();
    assert_eq!(
        entries.iter().map(|(_, e)| e.clone()).collect::<Vec<_>>(),
        vec![StrikeEntry::ThrottledUntil(2_000 + th.throttle_s * 1000)]
    );
    let mut l = reload(&th, &r, 3_000);
    assert_eq!(
        l.throttled("mallory", 3_000),
        Some(th.throttle_s * 1000 - 1_000)
    );
    // After it ends, a reload drops it from the registry.
    let l2 = reload(&th, &r, 2_000 + th.throttle_s * 1000);
    assert!(l2.throttled_until.is_empty());
    assert!(r.strike_entries().unwrap().is_empty());
    drop(l);

    // N−1 again, then a restart after the window: the old ones are gone.
    let mut l = reload(&th, &r, 10_000);
    for i in 0..th.strikes as u64 - 1 {
        assert!(l.strike(&ev(k, "e", 10_000 + i)).is_none());
    }
    flush(&mut l, &r);
    let later = 10_000 + w + 100;
    let mut l = reload(&th, &r, later);
    assert!(r.strike_entries().unwrap().is_empty());
    assert!(l.strike(&ev(k, "e", later)).is_none());
}

/// A window keeps at most its threshold's strikes and a parent at most
/// MAX_MODULE_WINDOWS module windows (the stalest goes, also from the
/// registry); unreadable entries are dropped at load.
#[test]
fn the_ledger_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let r = crate::store::registry::Registry::open(&dir.path().join("r.redb")).unwrap();
    let th = SecurityConfig {
        strikes: 1000,
        ..SecurityConfig::default()
    };
    let mut l = Ledger::new(th.clone(), Vec::new(), Vec::new(), 0);
    let mut p = ev(SecurityKind::ForeignAccess, "", 0);
    for i in 0..th.probe_strikes as u64 - 1 {
        p.at_ms = i;
        l.parent_strike(&p);
    }
    for i in 0..(MAX_MODULE_WINDOWS as u64 + 10) {
        assert!(l
            .strike(&ev(SecurityKind::FuelExhausted, &format!("d{i}"), i))
            .is_none());
    }
    flush(&mut l, &r);
    let entries = r.strike_entries().unwrap();
    assert_eq!(entries.len(), MAX_MODULE_WINDOWS + 1, "{entries:?}");
    assert!(!entries
        .iter()
        .any(|(k, _)| k.ends_with("\0d0\0fuel_exhausted")));
    assert!(entries
        .iter()
        .any(|(k, _)| k.ends_with(&format!("\0d{}\0fuel_exhausted", MAX_MODULE_WINDOWS + 9))));
    r.update_strikes(
        &[
            ("junk".into(), StrikeEntry::ThrottledUntil(u64::MAX)),
            ("t\0x".into(), StrikeEntry::Window(vec![1])),
        ],
        &[],
    )
    .unwrap();
    let l = reload(&th, &r, 100);
    assert_eq!(
        l.strikes.get("a").map(HashMap::len),
        Some(MAX_MODULE_WINDOWS)
    );
    assert_eq!(r.strike_entries().unwrap().len(), MAX_MODULE_WINDOWS + 1);
    // A window never holds more than its threshold (here: one written
    // under a larger threshold), and the next refusal throttles.
    let th = SecurityConfig::default();
    let many = StrikeEntry::Window((0..50).collect());
    let k = "p\0a\0restore_wrong_key".to_string();
    let mut small = Ledger::new(th.clone(), Vec::new(), vec![(k, many)], 100);
    let n = small
        .by_parent
        .get(&("a".to_string(), SecurityKind::RestoreWrongKey))
        .map_or(0, VecDeque::len);
    assert_eq!(n, th.probe_strikes);
    assert!(small.parent_strike(&ev(SecurityKind::RestoreWrongKey, "", 100)));
}
