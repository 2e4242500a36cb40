//! Appraisal policy: what a verified report must also satisfy.
//!
//! A TOML file (or the same keys as a JSON object), every key optional:
//!
//! ```toml
//! allow_sim = false              # accept reports of the simulated PSP
//! allow_debug = false            # guest policy DEBUG bit
//! max_vmpl = 0                   # highest VMPL accepted
//! allow_smt = true               # guest policy SMT bit may be set
//! allow_migration_agent = false  # guest policy MIGRATE_MA bit
//! allowed_measurements = ["<96 hex>"]   # empty: refused unless...
//! allow_any_measurement = false  # ...this is written explicitly
//! expected_report_data = "<128 hex>"    # exact REPORT_DATA
//! expected_host_data = "<64 hex>"       # exact HOST_DATA
//! [min_tcb]
//! bootloader = 3
//! tee = 0
//! snp = 8
//! microcode = 115
//! ```

use serde::{Deserialize, Serialize};

use crate::report::{Report, Tcb};

/// Appraisal policy (defaults: no simulation, no debug, no migration agent,
/// VMPL 0, and a measurement allowlist is required).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// Accept reports of the simulated PSP.
    pub allow_sim: bool,
    /// Accept guests whose policy allows debugging.
    pub allow_debug: bool,
    /// Highest VMPL accepted.
    pub max_vmpl: u32,
    /// Accept guests whose policy allows SMT.
    pub allow_smt: bool,
    /// Accept guests whose policy allows a migration agent.
    pub allow_migration_agent: bool,
    /// Accepted measurements (hex); empty is refused unless
    /// `allow_any_measurement`.
    pub allowed_measurements: Vec<String>,
    /// Accept any measurement (must be written explicitly: the report is
    /// then not pinned to any code).
    pub allow_any_measurement: bool,
    /// The exact HOST_DATA expected (hex), if any.
    pub expected_host_data: Option<String>,
    /// The exact REPORT_DATA expected (hex), if any.
    pub expected_report_data: Option<String>,
    /// Minimum reported TCB.
    pub min_tcb: Option<Tcb>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            allow_sim: false,
            allow_debug: false,
            max_vmpl: 0,
            allow_smt: true,
            allow_migration_agent: false,
            allowed_measurements: Vec::new(),
            allow_any_measurement: false,
            expected_host_data: None,
            expected_report_data: None,
            min_tcb: None,
        }
    }
}

impl Policy {
    /// Parses a TOML policy.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Parses a JSON policy (same keys as the TOML form).
    pub fn from_json(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|e| e.to_string())
    }

    /// Parses a policy file's text: JSON if it starts with `{`, else TOML.
    pub fn from_text(text: &str) -> Result<Self, String> {
        if text.trim_start().starts_with('{') {
            Self::from_json(text)
        } else {
            Self::from_toml(text)
        }
    }

    /// Whether the policy pins anything about the guest (a measurement,
    /// REPORT_DATA or HOST_DATA).
    pub fn pins_something(&self) -> bool {
        !self.allowed_measurements.is_empty()
            || self.expected_report_data.is_some()
            || self.expected_host_data.is_some()
    }

    /// Every way `report` (with the TCB its VCEK certifies) breaks the
    /// policy; empty when it is met.
    pub fn violations(&self, report: &Report, tcb: &Tcb) -> Vec<String> {
        let mut v = Vec::new();
        if report.is_simulated() && !self.allow_sim {
            v.push("report is from the SIMULATED PSP (no hardware protection); the policy does not allow simulation".into());
        }
        if report.debug_allowed() && !self.allow_debug {
            v.push("guest policy allows debugging".into());
        }
        if report.vmpl > self.max_vmpl {
            v.push(format!("VMPL {} is above {}", report.vmpl, self.max_vmpl));
        }
        if report.smt_allowed() && !self.allow_smt {
            v.push("guest policy allows SMT".into());
        }
        if report.migrate_ma_allowed() && !self.allow_migration_agent {
            v.push("guest policy allows a migration agent".into());
        }
        let m = hex::encode(report.measurement);
        if self.allowed_measurements.is_empty() {
            if !self.allow_any_measurement {
                v.push(format!("measurement {m} is not pinned: the policy lists no allowed measurement (write allow_any_measurement = true to accept any)"));
            }
        } else if !self
            .allowed_measurements
            .iter()
            .any(|a| a.eq_ignore_ascii_case(&m))
        {
            v.push(format!("measurement {m} is not an allowed measurement"));
        }
        if let Some(rd) = &self.expected_report_data {
            if !rd.eq_ignore_ascii_case(&hex::encode(report.report_data)) {
                v.push("REPORT_DATA differs from the expected value (wrong nonce or keys)".into());
            }
        }
        if let Some(hd) = &self.expected_host_data {
            if !hd.eq_ignore_ascii_case(&hex::encode(report.host_data)) {
                v.push(
                    "HOST_DATA differs from the expected value (another bubble or owner)".into(),
                );
            }
        }
        if let Some(min) = &self.min_tcb {
            if !tcb.at_least(min) {
                v.push(format!("TCB {tcb:?} is below the minimum {min:?}"));
            }
        }
        v
    }
}
