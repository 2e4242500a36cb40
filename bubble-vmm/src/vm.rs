//! One KVM VM with one vCPU entered at CPL 3 in long mode.

use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kvm_bindings::{kvm_dtable, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::doorbell::{self, Doorbell};
pub use crate::launch::Launch;
use crate::layout::{InitialVcpu, Layout};
use crate::load::{self, Source};
pub use crate::memory::{anon_memory, host_span, populate};
pub use crate::vm_error::VmError;

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// A bubble's VM: guest memory, the VM and its single vCPU.
pub struct Vm {
    _kvm: Kvm,
    _vm: VmFd,
    vcpu: VcpuFd,
    mem: GuestMemoryMmap<()>,
    layout: Layout,
    /// Time spent inside KVM_RUN.
    run_time: Duration,
    /// The launch measurement.
    launch: Launch,
    /// How long building it took, step by step (for the VMM's log).
    built: BuildSteps,
}

/// How long each step of [`Vm::new`] (and the other constructors) took.
#[derive(Clone, Copy, Debug, Default)]
pub struct BuildSteps {
    /// Guest memory mapped, image placed, boot pages written, measured.
    pub load: Duration,
    /// KVM_CREATE_VM, KVM_CREATE_VCPU and CPUID (or taking a prepared
    /// [`VmShell`]).
    pub shell: Duration,
    /// Memory region registered, initial vCPU registers set.
    pub setup: Duration,
}

/// A KVM VM with its vCPU (CPUID set) and no memory yet: what can be made
/// before knowing the bubble (a restore prepares it while the frozen copy
/// is fetched).
pub struct VmShell {
    kvm: Kvm,
    vm: VmFd,
    vcpu: VcpuFd,
}

/// A VM and its vCPU made ahead of need by a spare (see [`prepare_shell`]).
static PREPARED_SHELL: parking_lot::Mutex<Option<VmShell>> = parking_lot::Mutex::new(None);

/// Creates the KVM VM and its vCPU (CPUID set: `KVM_CREATE_VM`,
/// `KVM_CREATE_VCPU`, `KVM_SET_CPUID2`) for the next [`VmShell::new`] of
/// this process. A spare VMM process does this while it waits for its
/// bubble: none of it depends on the request (no guest memory exists, no
/// register is set, the vCPU never ran), so the guest still executes no
/// instruction before the request arrives. What the kernel allocates for
/// the VM here is charged to the cgroup the spare is in then (the
/// broker's), not the bubble's; guest memory and the MMU's pages are
/// allocated after CONFIGURE, in the bubble's.
pub fn prepare_shell() -> Result<(), VmError> {
    if PREPARED_SHELL.lock().is_some() {
        return Ok(());
    }
    let shell = VmShell::new()?;
    *PREPARED_SHELL.lock() = Some(shell);
    Ok(())
}

/// `/dev/kvm` opened and the host's supported CPUID queried ahead of need
/// (see [`prepare_kvm`]).
static PREPARED: parking_lot::Mutex<Option<(Kvm, kvm_bindings::CpuId)>> =
    parking_lot::Mutex::new(None);

/// Opens `/dev/kvm` and queries the CPUID the host supports (~0.4 ms on
/// this kind of host: more than creating the VM itself) for the next
/// [`VmShell::new`] of this process. Process-level facts, not a VM: a spare
/// VMM process does this while it waits for its bubble, whose VM is still
/// created only then.
pub fn prepare_kvm() -> Result<(), VmError> {
    // Already done (by the jail, before `/dev/kvm` went out of reach).
    if PREPARED.lock().is_some() {
        return Ok(());
    }
    let prepared = open_kvm()?;
    {
        let mut p = PREPARED.lock();
        *p = Some(prepared);
    }
    Ok(())
}

/// Opens `/dev/kvm` and queries the CPUID the host supports.
fn open_kvm() -> Result<(Kvm, kvm_bindings::CpuId), VmError> {
    let kvm_fd = Kvm::new().map_err(kvm("open /dev/kvm"))?;
    let cpuid = kvm_fd
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("get supported CPUID"))?;
    Ok((kvm_fd, cpuid))
}

impl VmShell {
    /// The VM and its vCPU [`prepare_shell`] made, else new ones (with
    /// `/dev/kvm` and the supported CPUID from [`prepare_kvm`] if this
    /// process prepared them, else fresh).
    pub fn new() -> Result<Self, VmError> {
        if let Some(shell) = PREPARED_SHELL.lock().take() {
            return Ok(shell);
        }
        let prepared = PREPARED.lock().take();
        let (kvm_fd, cpuid) = match prepared {
            Some(p) => p,
            None => open_kvm()?,
        };
        let vm = kvm_fd.create_vm().map_err(kvm("create VM"))?;
        let vcpu = vm.create_vcpu(0).map_err(kvm("create vCPU"))?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm("set CPUID"))?;
        Ok(Self {
            kvm: kvm_fd,
            vm,
            vcpu,
        })
    }
}

/// Lets another thread stop a running vCPU (see [`Vm::kicker`]).
#[derive(Clone)]
pub struct Kicker {
    immediate_exit: Arc<AtomicPtr<u8>>,
}

impl Kicker {
    /// Asks the vCPU to leave KVM_RUN: sets `immediate_exit` (so a vCPU
    /// about to enter returns at once) and signals the vCPU thread (so a
    /// running one exits with EINTR).
    pub fn kick(&self, thread: libc::pthread_t) {
        let p = self.immediate_exit.load(Ordering::SeqCst);
        if !p.is_null() {
            // SAFETY: `p` points into the vCPU's mmapped kvm_run structure,
            // which lives as long as the Vm (the kicker is only used while
            // the vCPU thread owns the Vm); a byte store is what KVM expects.
            unsafe { std::ptr::write_volatile(p, 1) };
        }
        // SAFETY: signalling a live thread of this process; the handler is
        // a no-op installed by `install_kick_handler`.
        unsafe {
            libc::pthread_kill(thread, kick_signal());
        }
    }
}

/// Signal used to kick a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN() + 1
}

extern "C" fn noop_handler(_: libc::c_int) {}

/// Installs a no-op handler (without SA_RESTART) for [`kick_signal`], so the
/// signal interrupts KVM_RUN with EINTR instead of killing the process.
pub fn install_kick_handler() {
    // SAFETY: sigaction with a valid, async-signal-safe handler.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = noop_handler as *const () as usize;
        sa.sa_flags = 0;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(kick_signal(), &sa, std::ptr::null_mut());
    }
}

/// CPU time consumed by the calling thread.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe {
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts);
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

impl Vm {
    /// Creates the VM, loads `elf` and prepares the vCPU at its entry point.
    pub fn new(elf: &[u8], mem_size: u64, max_payload: u64) -> Result<Self, VmError> {
        Self::load_and_start(Source::Elf(elf), mem_size, max_payload)
    }

    /// Creates the VM with `image` mapped copy-on-write (see
    /// [`crate::shared_image`]) and prepares the vCPU at its entry point.
    /// Guest memory content and measurement equal [`Vm::new`]'s for the
    /// same ELF.
    pub fn with_shared_image(
        image: &crate::shared_image::SharedImage,
        mem_size: u64,
        max_payload: u64,
    ) -> Result<Self, VmError> {
        Self::load_and_start(Source::Shared(image), mem_size, max_payload)
    }

    /// A VM running raw machine code at [`crate::layout::IMAGE_BASE`] (floors and
    /// hostile test guests).
    pub fn with_code(code: &[u8], mem_size: u64, max_payload: u64) -> Result<Self, VmError> {
        Self::load_and_start(Source::Code(code), mem_size, max_payload)
    }

    /// Loads `src` into new guest memory, then puts it into a new VM and
    /// its vCPU at the initial state; the VM keeps the launch record.
    fn load_and_start(src: Source<'_>, mem_size: u64, max_payload: u64) -> Result<Self, VmError> {
        let t = std::time::Instant::now();
        let l = load::load(src, mem_size, max_payload)?;
        let loaded = t.elapsed();
        let shell = VmShell::new()?;
        let shelled = t.elapsed();
        let mut vm = Self::from_shell(shell, l.mem, &l.layout)?;
        vm.setup_vcpu(&l.vcpu)?;
        vm.launch = Launch::Measured(l.log);
        vm.built = BuildSteps {
            load: loaded,
            shell: shelled - loaded,
            setup: t.elapsed() - shelled,
        };
        Ok(vm)
    }

    /// How long building this VM took, step by step.
    pub fn build_steps(&self) -> BuildSteps {
        self.built
    }

    /// Puts `mem` (guest-physical 0..) into the VM `shell`; the vCPU is not
    /// set up (a restore loads its state, [`Vm::new`] its entry point).
    pub fn from_shell(
        shell: VmShell,
        mem: GuestMemoryMmap<()>,
        layout: &Layout,
    ) -> Result<Self, VmError> {
        if mem.iter().map(|r| r.len()).sum::<u64>() != layout.mem_size {
            return Err(VmError::Memory(
                "guest memory differs from the layout".into(),
            ));
        }
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| VmError::Memory(e.to_string()))?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which the
            // Vm keeps alive for as long as the VM exists.
            unsafe { shell.vm.set_user_memory_region(r) }.map_err(kvm("set memory region"))?;
        }
        Ok(Self {
            _kvm: shell.kvm,
            _vm: shell.vm,
            vcpu: shell.vcpu,
            mem,
            layout: *layout,
            run_time: Duration::ZERO,
            launch: Launch::Unknown,
            built: BuildSteps::default(),
        })
    }

    fn setup_vcpu(&mut self, s0: &InitialVcpu) -> Result<(), VmError> {
        let mut s = self.vcpu.get_sregs().map_err(kvm("get sregs"))?;
        s.cr0 = s0.cr0;
        s.cr3 = s0.cr3;
        s.cr4 = s0.cr4;
        s.efer = s0.efer;
        let segs = crate::launch::segments(s0);
        s.cs = segs.cs;
        let d = segs.data;
        (s.ds, s.es, s.fs, s.gs, s.ss) = (d, d, d, d, d);
        s.gdt = kvm_dtable {
            base: s0.gdt_base,
            limit: s0.gdt_limit,
            padding: [0; 3],
        };
        s.idt = kvm_dtable {
            base: 0,
            limit: 0,
            padding: [0; 3],
        };
        s.tr = segs.tr;
        self.vcpu.set_sregs(&s).map_err(kvm("set sregs"))?;
        let mut f = self.vcpu.get_fpu().map_err(kvm("get fpu"))?;
        f.fcw = s0.fcw;
        f.mxcsr = s0.mxcsr;
        self.vcpu.set_fpu(&f).map_err(kvm("set fpu"))?;
        let mut r = self.vcpu.get_regs().map_err(kvm("get regs"))?;
        r.rip = s0.rip;
        r.rsp = s0.rsp;
        r.rflags = s0.rflags;
        self.vcpu.set_regs(&r).map_err(kvm("set regs"))?;
        Ok(())
    }

    /// The launch measurement.
    pub fn launch(&self) -> &Launch {
        &self.launch
    }

    /// Sets the launch measurement (restore: the one the snapshot carries).
    pub(crate) fn set_launch(&mut self, l: Launch) {
        self.launch = l;
    }

    /// The memory layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The vCPU.
    pub(crate) fn vcpu(&self) -> &VcpuFd {
        &self.vcpu
    }

    /// Host address and length of guest memory (one region).
    pub(crate) fn host_range(&self) -> Result<(*mut u8, usize), VmError> {
        host_span(&self.mem).ok_or_else(|| VmError::Memory("no guest memory".into()))
    }

    /// Replaces the layout (restore only: the memory size must not change).
    pub(crate) fn set_layout(&mut self, l: Layout) {
        debug_assert_eq!(l.mem_size, self.layout.mem_size);
        self.layout = l;
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap<()> {
        &self.mem
    }

    /// Total time the vCPU spent in KVM_RUN.
    pub fn run_time(&self) -> Duration {
        self.run_time
    }

    /// A handle another thread can use to stop the vCPU.
    pub fn kicker(&mut self) -> Kicker {
        let p = &mut self.vcpu.get_kvm_run().immediate_exit as *mut u8;
        Kicker {
            immediate_exit: Arc::new(AtomicPtr::new(p)),
        }
    }

    /// Runs the vCPU until the guest rings the doorbell.
    ///
    /// Returns [`VmError::Interrupted`] when kicked; any exit other than a
    /// doorbell write ends the bubble with a precise error. The CPU time
    /// this thread spends here is added to [`Vm::run_time`].
    pub fn run_to_doorbell(&mut self) -> Result<Doorbell, VmError> {
        let t = thread_cpu_time();
        let r = self.run_inner();
        self.run_time += thread_cpu_time().saturating_sub(t);
        r
    }

    fn run_inner(&mut self) -> Result<Doorbell, VmError> {
        loop {
            match self.vcpu.run() {
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    return doorbell::doorbell_write(addr, data).ok_or(VmError::UnexpectedAccess {
                        what: "MMIO write",
                        addr,
                    })
                }
                Ok(VcpuExit::MmioRead(addr, _)) => {
                    return Err(VmError::UnexpectedAccess {
                        what: "MMIO read",
                        addr,
                    })
                }
                Ok(VcpuExit::IoIn(port, _)) | Ok(VcpuExit::IoOut(port, _)) => {
                    return Err(VmError::UnexpectedAccess {
                        what: "port I/O",
                        addr: u64::from(port),
                    })
                }
                Ok(VcpuExit::Shutdown) => {
                    let rip = self.vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                    return Err(VmError::TripleFault { rip });
                }
                Ok(VcpuExit::Intr) => continue,
                Ok(other) => return Err(VmError::UnexpectedExit(format!("{other:?}"))),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    let ie = &mut self.vcpu.get_kvm_run().immediate_exit;
                    *ie = 0;
                    return Err(VmError::Interrupted);
                }
                Err(e) => return Err(kvm("run vCPU")(e)),
            }
        }
    }

    /// Reads guest memory (bounds-checked against guest RAM).
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), VmError> {
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|e| VmError::Memory(e.to_string()))
    }

    /// Writes guest memory (bounds-checked against guest RAM).
    pub fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), VmError> {
        self.mem
            .write_slice(buf, GuestAddress(gpa))
            .map_err(|e| VmError::Memory(e.to_string()))
    }
}
