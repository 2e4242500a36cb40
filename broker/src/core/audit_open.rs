//! Opening the broker's audit log against the registry's pin and staged
//! batch (`bubble_audit::staged`), and keeping them there as it is written.

use std::sync::Arc;
use std::time::Duration;

use tracing::warn;

use crate::config::BrokerConfig;
use crate::error::BrokerError;
use crate::obs::usage::UsageSigner;
use crate::store::registry::Registry;

/// The longest lifecycle records wait for a signed, staged checkpoint
/// (security-relevant records never wait: each write holding one has it).
pub const AUDIT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// The audit log's pin and staged batch, in the registry. A registry error
/// is logged: the batch is still written to the log, and only the
/// protection against its later removal is lost.
struct AuditPins(Arc<Registry>);

impl bubble_audit::PinStore for AuditPins {
    fn stage(&self, durable: Option<bubble_audit::Pin>, batch: Option<&bubble_audit::Staged>) {
        if let Err(e) = self.0.stage_audit(durable, batch) {
            tracing::error!(error = %e, "audit batch not staged in the registry");
        }
    }

    fn pinned(&self, _: bubble_audit::Pin) {
        // Pinned by the next stage (one commit per checkpointed batch), or
        // at the next open.
    }
}

/// Opens the audit log, refusing one that does not reach the checkpoint
/// pinned in the registry (cut back, replaced or deleted); each new durable
/// checkpoint is pinned there in turn.
pub(super) fn open_audit(
    cfg: &BrokerConfig,
    registry: &Arc<Registry>,
    signer: &UsageSigner,
) -> Result<bubble_audit::AuditLog, BrokerError> {
    let mut pinned = registry
        .audit_pin()?
        .map(|(seq, hash)| bubble_audit::Pin { seq, hash });
    let path = cfg.audit_path();
    let mut replaced = None;
    if cfg.audit_new_log {
        let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if len > 0 {
            return Err(BrokerError::Spawn(format!(
                "--audit-new-log: {} is not empty; move it aside first",
                path.display()
            )));
        }
        replaced = pinned.take();
    }
    let reg = registry.clone();
    if replaced.is_some() {
        registry.clear_audit_pin()?;
    }
    let staged = match replaced {
        Some(_) => None,
        None => registry.audit_staged()?,
    };
    let log = bubble_audit::AuditLog::open_staged(
        &path,
        Arc::new(signer.checkpoint_signer()),
        bubble_audit::Options {
            checkpoint_interval: AUDIT_CHECKPOINT_INTERVAL,
            ..bubble_audit::Options::default()
        },
        pinned,
        staged,
        Box::new(AuditPins(reg)),
    )
    .map_err(|e| BrokerError::Spawn(e.to_string()))?;
    if let Some(old) = replaced {
        warn!(
            seq = old.seq,
            "a new audit log replaces one whose checkpoint was pinned"
        );
        log.append(
            bubble_audit::Entry::default(),
            bubble_audit::What::Lifecycle {
                state: "audit_log_replaced".into(),
                reason: format!(
                    "started with --audit-new-log; the previous log's pinned checkpoint was \
                     seq {} (frame SHA-256 {})",
                    old.seq,
                    hex::encode(old.hash)
                ),
            },
        );
        // Pinned by the first checkpoint, which signs this record.
        log.checkpoint()
            .map_err(|e| BrokerError::Spawn(e.to_string()))?;
    }
    Ok(log)
}
