//! The raw KVM floors run on real KVM and give plausible numbers.

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
