//! What the broker tells its operators and billing: Prometheus metrics and
//! signed usage reports.

pub mod health;
pub mod metrics;
pub mod usage;
