//! The broker's side of a bubble's VMM process: spawning, re-adoption,
//! calls and notices, on top of the `bubble-vmm-client` crate.

use std::path::Path;
use std::time::Duration;

use bubble_vmm_client as vc;
pub use bubble_vmm_client::{FailureKind, FailureReason};
use tokio::sync::mpsc;

use crate::config::BrokerConfig;
use crate::error::BrokerError;

/// Guest image a bubble boots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageSpec {
    /// The measured guest shim.
    Shim,
    /// A hostile test guest (only with `allow_test_images`).
    Test(vc::HostileKind),
}

impl ImageSpec {
    /// Parses the `image` field of a create request.
    pub fn parse(s: &str, allow_test: bool) -> Result<Self, String> {
        match s {
            "" | "shim" => Ok(ImageSpec::Shim),
            t if t.starts_with("test:") => {
                if !allow_test {
                    return Err("test images are disabled on this broker".into());
                }
                let kind = &t["test:".len()..];
                vc::HostileKind::from_name(kind)
                    .map(ImageSpec::Test)
                    .ok_or_else(|| {
                        format!(
                            "unknown test image {kind:?} (known: {})",
                            vc::HostileKind::ALL
                                .iter()
                                .map(|k| k.name())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    })
            }
            other => Err(format!("unknown image {other:?} (known: shim)")),
        }
    }

    /// The name stored in the registry.
    pub fn name(&self) -> String {
        match self {
            ImageSpec::Shim => "shim".into(),
            ImageSpec::Test(k) => format!("test:{}", k.name()),
        }
    }
}

/// Something a VMM reported on its own.
#[derive(Clone, Debug)]
pub enum VmmNotice {
    /// A (rate-limited) guest log line.
    Log(String),
    /// The guest failed; the VMM stopped it.
    Failed(FailureReason),
    /// The VMM process or its connection is gone.
    Gone(FailureReason),
}

/// How a call failed.
#[derive(Clone, Debug)]
pub enum CallFailure {
    /// The guest refused the request (ABI error code, text); the bubble is fine.
    Rejected(u16, String),
    /// The VMM refused the request (it did not decode, or the VMM cannot
    /// serve it now); the guest never saw it and the bubble is fine.
    Refused(String),
    /// The guest overran the deadline and was stopped.
    Deadline(String),
    /// The bubble died.
    Failed(FailureReason),
    /// A portion awaits the event `key` (checked by the control decoder):
    /// the call is pending inside the guest until a RESUME.
    Awaiting {
        /// The guest's await key (not yet namespaced).
        key: String,
        /// Timeout, ms.
        timeout_ms: u32,
    },
}

/// A running VMM process.
pub struct Vmm {
    client: vc::VmmClient,
}

impl Vmm {
    /// Spawns a VMM process for bubble `rec` with its files in `dir`.
    pub async fn spawn(
        spawner: &std::sync::Arc<vc::Spawner>,
        cfg: &BrokerConfig,
        dir: &Path,
        rec: &crate::store::registry::BubbleRecord,
        image: &ImageSpec,
    ) -> Result<Self, String> {
        Self::start(spawner, cfg, dir, rec, image, false).await
    }

    /// Spawns a VMM in restore mode (it waits for [`Vmm::restore`]).
    pub async fn spawn_restore(
        spawner: &std::sync::Arc<vc::Spawner>,
        cfg: &BrokerConfig,
        dir: &Path,
        rec: &crate::store::registry::BubbleRecord,
        image: &ImageSpec,
    ) -> Result<Self, String> {
        Self::start(spawner, cfg, dir, rec, image, true).await
    }

    async fn start(
        spawner: &std::sync::Arc<vc::Spawner>,
        cfg: &BrokerConfig,
        dir: &Path,
        rec: &crate::store::registry::BubbleRecord,
        image: &ImageSpec,
        restore: bool,
    ) -> Result<Self, String> {
        let spawn = vc::SpawnConfig {
            bubble_id: rec.id.clone(),
            parent: rec.owner.clone(),
            memory_mib: rec.memory_mib,
            vcpus: 1,
            image: match image {
                ImageSpec::Shim => vc::GuestImage::Shim,
                ImageSpec::Test(k) => vc::GuestImage::Hostile(*k),
            },
            dir: dir.to_path_buf(),
            program: cfg.vmm_program.clone(),
            program_args_prefix: cfg.vmm_args_prefix.clone(),
            max_payload: cfg.max_payload,
            restore,
            poll: Duration::from_micros(u64::from(cfg.vmm_poll_us)),
            die_with_broker: cfg.jail.die_with_broker,
            boot_timeout: cfg.boot_timeout,
        };
        let client = spawner.spawn(&spawn).await.map_err(|e| e.to_string())?;
        Ok(Self { client })
    }

    /// When this VMM's start passed its steps (see `core::create`).
    pub fn spawn_steps(&self) -> vc::SpawnSteps {
        self.client.spawn_steps()
    }

    /// When READY was read from the VMM's socket, if it was.
    pub fn ready_received_at(&self) -> Option<std::time::Instant> {
        self.client.ready_received_at()
    }

    /// What of the jail could not be set up for this VMM (empty: all).
    pub fn jail_warning(&self) -> String {
        self.client.jail_warning().unwrap_or_default().to_string()
    }

    /// Moves this VMM (a pooled bubble's) under `parent`'s cgroup, see
    /// [`vc::Spawner::move_to_parent`]: what could not follow it, as a
    /// jail warning (None: nothing to say).
    pub async fn move_to_parent(
        &self,
        spawner: &vc::Spawner,
        parent: &str,
        bubble: &str,
        memory_mib: u32,
    ) -> Option<String> {
        match spawner
            .move_to_parent(&self.client, parent, bubble, u64::from(memory_mib) << 20)
            .await
        {
            Ok(warning) => warning,
            // Gone: nothing is charged to anyone any more.
            Err(vc::cgroups::CgroupError::Gone) => None,
            Err(e) => Some(format!("not moved to its parent's cgroup: {e}")),
        }
    }

    /// Captures the VM (vCPU state and non-zero pages) at a safe point,
    /// as a stream of pieces: each due within a minute of the last, the
    /// whole snapshot within a minute plus a second per 16 MiB of guest
    /// memory (a VMM trickling bytes cannot hold a suspend for long).
    pub async fn suspend(&self, memory_mib: u32) -> Result<vc::SnapshotStream, String> {
        let total = Duration::from_secs(60 + u64::from(memory_mib) / 16);
        self.client
            .suspend_stream(Duration::from_secs(60), total)
            .await
            .map_err(|e| e.to_string())
    }

    /// Has a VMM spawned in restore mode fault in the snapshot's pages
    /// (runs of guest address, pages) before the snapshot arrives.
    pub async fn prefault(&self, runs: &[(u64, u64)]) -> Result<Option<vc::GuestSpan>, String> {
        self.client
            .prefault(runs, Duration::from_secs(10))
            .await
            .map_err(|e| e.to_string())
    }

    /// A writer of a snapshot's pages into this VMM's guest memory, as
    /// they arrive (see [`vc::PageWriter`]).
    pub fn page_writer(&self, span: vc::GuestSpan, mem_size: u64) -> vc::PageWriter {
        self.client.page_writer(span, mem_size)
    }

    /// Sends the vCPU state of a snapshot whose pages a
    /// [`vc::PageWriter`] wrote; returns how long the VMM took.
    pub async fn restore_state(&self, state: &[u8]) -> Result<Duration, BrokerError> {
        match self
            .client
            .restore_state(state, Duration::from_secs(60))
            .await
        {
            Ok(d) => Ok(d),
            Err(vc::VmmError::Snapshot(e)) => Err(BrokerError::DataLoss(format!(
                "snapshot does not decode: {e}"
            ))),
            Err(e) => Err(BrokerError::Spawn(format!("restore: {e}"))),
        }
    }

    /// Sends a snapshot (its parts, in order) to a VMM spawned in restore
    /// mode; returns how long the VMM took to rebuild the VM.
    pub async fn restore(
        &self,
        snapshot: &[&[u8]],
        direct: Option<vc::GuestSpan>,
    ) -> Result<Duration, BrokerError> {
        match self
            .client
            .restore(snapshot, direct, Duration::from_secs(60))
            .await
        {
            Ok(d) => Ok(d),
            // Authenticated, yet it does not lay out: damaged, not transient.
            Err(vc::VmmError::Snapshot(e)) => Err(BrokerError::DataLoss(format!(
                "snapshot does not decode: {e}"
            ))),
            Err(e) => Err(BrokerError::Spawn(format!("restore: {e}"))),
        }
    }

    /// Starts sending a snapshot of `len` bytes over the socket to a VMM
    /// spawned in restore mode (see [`vc::RestoreUpload`]).
    pub async fn restore_upload(&self, len: u64) -> Result<vc::RestoreUpload<'_>, BrokerError> {
        self.client
            .restore_upload(len)
            .await
            .map_err(|e| BrokerError::Spawn(format!("restore: {e}")))
    }

    /// Reconnects to a running VMM after a broker restart; returns whether
    /// its guest is READY.
    /// Its socket's peer must run as a uid `spawner` may have given it.
    pub async fn adopt(
        spawner: &vc::Spawner,
        dir: &Path,
        id: &str,
    ) -> Result<(Self, bool), String> {
        let client = vc::VmmClient::connect(&vc::socket_path(dir), id, |u| spawner.adopt_uid(u))
            .await
            .map_err(|e| e.to_string())?;
        spawner.remove_cgroups_after_exit(&client);
        let st = client.status().await.map_err(|e| e.to_string())?;
        if let Some(reason) = st.failed {
            client.kill();
            return Err(format!("the bubble had failed: {reason}"));
        }
        Ok((Self { client }, st.ready))
    }

    /// Waits for the guest's READY; returns the boot time in µs.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<u64, FailureReason> {
        self.client
            .wait_ready(timeout)
            .await
            .map(|r| r.boot_us)
            .map_err(|e| match e {
                vc::VmmError::Timeout(_) => {
                    FailureReason::new(FailureKind::BootTimeout, e.to_string())
                }
                e => e.failure_reason(),
            })
    }

    /// Calls `op` in the guest (unsigned).
    pub async fn call(
        &self,
        op: &str,
        input: &[u8],
        deadline: Duration,
    ) -> Result<Vec<u8>, CallFailure> {
        self.call_with(&bubble_abi::Call::plain(op, input), deadline)
            .await
    }

    /// Sends a CALL (op, flags, signing context, input) to the guest.
    pub async fn call_with(
        &self,
        call: &bubble_abi::Call<'_>,
        deadline: Duration,
    ) -> Result<Vec<u8>, CallFailure> {
        self.client
            .call_with(call, deadline)
            .await
            .map_err(|e| match e {
                vc::CallError::Guest(code, m) => CallFailure::Rejected(code, m),
                vc::CallError::BadRequest(m) => {
                    CallFailure::Rejected(bubble_vmm::abi::code::TOO_LARGE, m)
                }
                vc::CallError::Refused { text, .. } => CallFailure::Refused(text),
                vc::CallError::DeadlineExceeded(m) => CallFailure::Deadline(m),
                vc::CallError::Failed(r) => CallFailure::Failed(r),
                vc::CallError::Awaiting { key, timeout_ms } => {
                    CallFailure::Awaiting { key, timeout_ms }
                }
            })
    }

    /// The bubble's SNP launch digest, as the VMM measured it while loading
    /// the guest (or carried it through a restore).
    pub async fn launch_measurement(&self) -> Result<[u8; 48], BrokerError> {
        self.client
            .launch_measurement()
            .await
            .map(|m| m.digest)
            .map_err(|e| BrokerError::GuestInternal(format!("launch measurement: {e}")))
    }

    /// vCPU time the guest has run, µs (None if the VMM does not answer).
    pub async fn vcpu_us(&self) -> Option<u64> {
        self.client.status().await.ok().map(|s| s.vcpu_us)
    }

    /// Pid of the VMM process.
    pub fn pid(&self) -> u32 {
        self.client.pid()
    }

    /// Kills the VMM process now (SIGKILL), without a shutdown request.
    pub fn kill(&self) {
        self.client.kill();
    }

    /// Notices the VMM sends on its own (logs, failure, exit).
    pub fn notices(&self) -> mpsc::UnboundedReceiver<VmmNotice> {
        let mut ev = self.client.events();
        let (tx, rx) = mpsc::unbounded_channel();
        // Subscribed first, then checked: a failure reported before this
        // (the guest's start-up continues after READY and can fail while
        // the create is still finishing) is not missed.
        if let Some(r) = self.client.ended() {
            let _ = tx.send(VmmNotice::Failed(r));
            return rx;
        }
        tokio::spawn(async move {
            loop {
                let n = match ev.recv().await {
                    Ok(vc::VmmEvent::Log(l)) => VmmNotice::Log(l),
                    Ok(vc::VmmEvent::Failed(r)) => VmmNotice::Failed(r),
                    Ok(vc::VmmEvent::Exited(r)) => VmmNotice::Gone(r.reason()),
                    Ok(_) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => VmmNotice::Gone(
                        FailureReason::new(FailureKind::VmmExited, "VMM connection closed"),
                    ),
                };
                let end = !matches!(n, VmmNotice::Log(_));
                if tx.send(n).is_err() || end {
                    return;
                }
            }
        });
        rx
    }

    /// Stops the VMM process (gracefully, then by force).
    pub async fn shutdown(&self) {
        self.client.shutdown(Duration::from_secs(2)).await;
    }
}
