//! Broker configuration and request limits.

use std::path::PathBuf;
use std::time::Duration;

/// Smallest guest memory a bubble may have, MiB.
pub const MIN_MEMORY_MIB: u32 = 4;
/// Largest guest memory a bubble may have, MiB.
pub const MAX_MEMORY_MIB: u32 = 4096;
/// Default maximum call payload (input or output), bytes.
pub const DEFAULT_MAX_PAYLOAD: usize = 1 << 20;
/// Default per-call deadline when the caller gives none.
pub const DEFAULT_CALL_DEADLINE: Duration = Duration::from_secs(10);
/// Largest per-call deadline a caller may ask for.
pub const MAX_CALL_DEADLINE: Duration = Duration::from_secs(300);
/// How long a cold create may take before the bubble is failed.
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(20);

/// How the broker runs.
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// Directory holding the registry, per-bubble directories and PKI.
    pub data_dir: PathBuf,
    /// Maximum call payload in bytes (input and output).
    pub max_payload: usize,
    /// Whether `test:<kind>` guest images (hostile guests) may be created.
    pub allow_test_images: bool,
    /// Program spawned as a bubble's VMM process.
    pub vmm_program: PathBuf,
    /// Arguments placed before the VMM's own arguments (e.g. `__vmm`).
    pub vmm_args_prefix: Vec<String>,
    /// Time allowed from spawn to READY.
    pub boot_timeout: Duration,
}

impl BrokerConfig {
    /// A configuration rooted at `data_dir` whose VMM is this very program
    /// re-executed with `__vmm` (see [`crate::vmm_entry_if_requested`]).
    pub fn new(data_dir: PathBuf) -> std::io::Result<Self> {
        Ok(Self {
            data_dir,
            max_payload: DEFAULT_MAX_PAYLOAD,
            allow_test_images: false,
            vmm_program: std::env::current_exe()?,
            vmm_args_prefix: vec![crate::VMM_SUBCOMMAND.to_string()],
            boot_timeout: DEFAULT_BOOT_TIMEOUT,
        })
    }

    /// Path of the registry database.
    pub fn registry_path(&self) -> PathBuf {
        self.data_dir.join("registry.redb")
    }

    /// Directory of one bubble's runtime files (socket, log).
    pub fn bubble_dir(&self, id: &str) -> PathBuf {
        self.data_dir.join("bubbles").join(id)
    }
}
