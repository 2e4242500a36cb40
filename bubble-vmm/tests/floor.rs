//! The raw KVM floors run on real KVM and give plausible numbers.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

#[test]
fn floors_are_measured() {
    let boot = bubble_vmm::floor::raw_kvm_floor().unwrap();
    assert!(
        boot > Duration::ZERO && boot < Duration::from_secs(2),
        "{boot:?}"
    );
    let rtt = bubble_vmm::floor::raw_exit_rtt(200).unwrap();
    eprintln!("raw_kvm_floor {boot:?}, raw_exit_rtt {rtt:?}");
    assert!(
        rtt > Duration::ZERO && rtt < Duration::from_millis(50),
        "{rtt:?}"
    );
}

/// A VM made after `prepare_kvm` (as in a spare VMM) runs like any other,
/// and the prepared handle serves one VM: the next one opens its own.
#[test]
fn a_prepared_floor_runs_and_the_next_vm_opens_kvm_afresh() {
    for _ in 0..2 {
        let d = bubble_vmm::floor::raw_kvm_floor_prepared().unwrap();
        assert!(d > Duration::ZERO && d < Duration::from_secs(2), "{d:?}");
    }
    bubble_vmm::vm::prepare_kvm().unwrap();
    let a = bubble_vmm::floor::raw_kvm_floor().unwrap();
    let b = bubble_vmm::floor::raw_kvm_floor().unwrap();
    assert!(a < Duration::from_secs(2) && b < Duration::from_secs(2));
}
