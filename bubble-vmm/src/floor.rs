//! Performance floors measured without the broker: what KVM itself costs on
//! this host, so that broker numbers can be reported as ratios.

use std::time::{Duration, Instant};

use crate::images::floor_code;
use crate::vm::{Vm, VmError};

/// Guest memory of the floor VM (same as the benchmark's bubbles).
const FLOOR_MEM: u64 = 64 << 20;

/// Creates a VM with a vCPU and memory, enters a minimal CPL-3 guest and
/// returns the time until its first exit.
pub fn raw_kvm_floor() -> Result<Duration, VmError> {
    let t = Instant::now();
    let mut vm = Vm::with_code(&floor_code(), FLOOR_MEM, 4096)?;
    vm.run_to_doorbell()?;
    Ok(t.elapsed())
}

/// [`raw_kvm_floor`] with `/dev/kvm` opened and the supported CPUID
/// queried beforehand, untimed (as a spare VMM process does ahead of its
/// bubble: see [`crate::vm::prepare_kvm`]).
pub fn raw_kvm_floor_prepared() -> Result<Duration, VmError> {
    crate::vm::prepare_kvm()?;
    raw_kvm_floor()
}

/// Average time of one CPL-3 exit round trip (guest doorbell write, exit to
/// user space, re-entry) over `iterations` exits.
pub fn raw_exit_rtt(iterations: u32) -> Result<Duration, VmError> {
    let mut vm = Vm::with_code(&floor_code(), FLOOR_MEM, 4096)?;
    vm.run_to_doorbell()?;
    let t = Instant::now();
    for _ in 0..iterations {
        vm.run_to_doorbell()?;
    }
    Ok(t.elapsed() / iterations.max(1))
}
