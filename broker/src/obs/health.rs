//! Active health of the broker's dependencies: whether `/dev/kvm` can
//! create a VM, the registry can commit, and the store answers. Checked
//! every [`CHECK_INTERVAL`] by [`Broker::health_loop`]; gRPC health and
//! `/healthz` follow the result and name what is broken.

use std::sync::Arc;
use std::time::Duration;

use crate::core::Broker;

/// How often the dependencies are checked.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How long the store may take to answer a probe.
pub const STORE_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// A dependency the broker cannot serve without.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dependency {
    /// `/dev/kvm` (a VM can be created).
    Kvm,
    /// The registry (a write transaction commits).
    Registry,
    /// The frozen-bubble store (it answers a read).
    Store,
}

impl Dependency {
    /// Its name as reported.
    pub fn name(self) -> &'static str {
        match self {
            Dependency::Kvm => "kvm",
            Dependency::Registry => "registry",
            Dependency::Store => "store",
        }
    }
}

/// The last check's result: every broken dependency and why.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Health {
    /// Empty when all is well.
    pub broken: Vec<(Dependency, String)>,
}

impl Health {
    /// Whether the broker can serve.
    pub fn serving(&self) -> bool {
        self.broken.is_empty()
    }

    /// `ok`, or `not serving: kvm: ...; store: ...`.
    pub fn describe(&self) -> String {
        if self.serving() {
            return "ok".into();
        }
        let parts: Vec<String> = self
            .broken
            .iter()
            .map(|(d, why)| format!("{}: {why}", d.name()))
            .collect();
        format!("not serving: {}", parts.join("; "))
    }
}

/// Opens `/dev/kvm` and creates (and drops) one VM.
pub fn probe_kvm() -> Result<(), String> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("/dev/kvm: {e}"))?;
    // KVM_CREATE_VM = _IO(0xAE, 0x01), machine type 0.
    // SAFETY: an ioctl on a descriptor we own, with an integer argument.
    let fd = unsafe { libc::ioctl(kvm.as_raw_fd(), 0xAE01, 0) };
    if fd < 0 {
        return Err(format!(
            "KVM_CREATE_VM: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: the ioctl returned a new descriptor that nothing else owns.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
    Ok(())
}

/// A test-only broken dependency: the file `DATA_DIR/fault-<name>` exists.
#[cfg(feature = "fault-injection")]
fn injected(b: &Broker, d: Dependency) -> Option<String> {
    b.config()
        .data_dir
        .join(format!("fault-{}", d.name()))
        .exists()
        .then(|| "fault injected".to_string())
}

#[cfg(not(feature = "fault-injection"))]
fn injected(_: &Broker, _: Dependency) -> Option<String> {
    None
}

impl Broker {
    /// Checks every dependency once.
    pub async fn check_health(self: &Arc<Self>) -> Health {
        let mut broken = Vec::new();
        let b = self.clone();
        let (kvm, registry) = tokio::task::spawn_blocking(move || {
            let kvm = match injected(&b, Dependency::Kvm) {
                Some(f) => Err(f),
                None => probe_kvm(),
            };
            let registry = match injected(&b, Dependency::Registry) {
                Some(f) => Err(f),
                None => b.registry_probe().map_err(|e| e.to_string()),
            };
            (kvm, registry)
        })
        .await
        .unwrap_or_else(|e| (Err(e.to_string()), Err(e.to_string())));
        let store = match injected(self, Dependency::Store) {
            Some(f) => Err(f),
            None => tokio::time::timeout(STORE_PROBE_TIMEOUT, self.store_probe())
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {STORE_PROBE_TIMEOUT:?}"))),
        };
        for (d, r) in [
            (Dependency::Kvm, kvm),
            (Dependency::Registry, registry),
            (Dependency::Store, store),
        ] {
            if let Err(why) = r {
                broken.push((d, why));
            }
        }
        Health { broken }
    }

    /// Checks the dependencies every [`CHECK_INTERVAL`] and publishes the
    /// result (see [`Broker::health`]) while the broker lives.
    pub(crate) async fn health_loop(me: std::sync::Weak<Self>) {
        loop {
            let Some(b) = me.upgrade() else { return };
            let h = b.check_health().await;
            if h != *b.health.borrow() {
                tracing::warn!(health = %h.describe(), "broker health changed");
            }
            b.health.send_replace(h);
            drop(b);
            tokio::time::sleep(CHECK_INTERVAL).await;
        }
    }

    /// Follows the broker's health.
    pub fn health(&self) -> tokio::sync::watch::Receiver<Health> {
        self.health.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_what_is_broken() {
        assert_eq!(Health::default().describe(), "ok");
        let h = Health {
            broken: vec![
                (Dependency::Registry, "disk full".into()),
                (Dependency::Store, "timeout".into()),
            ],
        };
        assert!(!h.serving());
        assert_eq!(
            h.describe(),
            "not serving: registry: disk full; store: timeout"
        );
    }
}
