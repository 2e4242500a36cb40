//! Prometheus metrics of the broker, served on the admin address.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::vmm::FailureKind;

/// Label of a per-state gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// BOOTING, READY, ...
    pub state: String,
}

/// Label of a per-profile gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProfileLabel {
    /// Warm-pool profile.
    pub profile: String,
}

/// Label of a per-parent gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ParentLabel {
    /// The parent id (`uid:1000`, `cert:shop`).
    pub parent: String,
}

/// Label of the failure counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Failure kind ([`FailureKind::label`]).
    pub reason: &'static str,
}

/// All broker metrics.
pub struct Metrics {
    registry: Registry,
    /// Bubbles by state (set at scrape time).
    pub bubbles: Family<StateLabel, Gauge>,
    /// Ready bubbles waiting in each warm pool (set at scrape time).
    pub pool_depth: Family<ProfileLabel, Gauge>,
    /// CreateBubble latency, seconds.
    pub create_seconds: Histogram,
    /// AttachBubble latency, seconds.
    pub attach_seconds: Histogram,
    /// Call latency through the broker, seconds.
    pub call_seconds: Histogram,
    /// SuspendBubble latency (successful suspends), seconds.
    pub suspend_seconds: Histogram,
    /// RestoreBubble latency (successful restores), seconds.
    pub restore_seconds: Histogram,
    /// Live (not DELETED or FAILED) bubbles per parent (set at scrape time).
    pub parent_bubbles: Family<ParentLabel, Gauge>,
    /// Guest memory of live bubbles per parent, MiB (set at scrape time).
    pub parent_memory_mib: Family<ParentLabel, Gauge>,
    /// Bubble failures by category.
    pub failures: Family<ReasonLabel, Counter>,
    /// Warm-pool misses (attach had to boot a bubble).
    pub pool_misses: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("bubbled");
        let bubbles = Family::<StateLabel, Gauge>::default();
        let pool_depth = Family::<ProfileLabel, Gauge>::default();
        // 10 µs .. ~40 s.
        let h = || Histogram::new(exponential_buckets(1e-5, 2.0, 22));
        let create_seconds = h();
        let attach_seconds = h();
        let call_seconds = h();
        let suspend_seconds = h();
        let restore_seconds = h();
        let parent_bubbles = Family::<ParentLabel, Gauge>::default();
        let parent_memory_mib = Family::<ParentLabel, Gauge>::default();
        let failures = Family::<ReasonLabel, Counter>::default();
        let pool_misses = Counter::default();
        registry.register("bubbles", "Bubbles by state", bubbles.clone());
        registry.register(
            "pool_depth",
            "Ready bubbles in each warm pool",
            pool_depth.clone(),
        );
        registry.register(
            "create_seconds",
            "CreateBubble latency",
            create_seconds.clone(),
        );
        registry.register(
            "attach_seconds",
            "AttachBubble latency",
            attach_seconds.clone(),
        );
        registry.register(
            "call_seconds",
            "Call latency through the broker",
            call_seconds.clone(),
        );
        registry.register(
            "suspend_seconds",
            "SuspendBubble latency",
            suspend_seconds.clone(),
        );
        registry.register(
            "restore_seconds",
            "RestoreBubble latency",
            restore_seconds.clone(),
        );
        registry.register(
            "parent_bubbles",
            "Live bubbles of each parent",
            parent_bubbles.clone(),
        );
        registry.register(
            "parent_memory_mib",
            "Guest memory of each parent's live bubbles",
            parent_memory_mib.clone(),
        );
        registry.register("failures", "Bubble failures by reason", failures.clone());
        // Every reason is present (at zero) from the start, so that rates
        // and alerts need no special case for a series that is absent.
        for kind in FailureKind::ALL {
            let _ = failures.get_or_create(&ReasonLabel {
                reason: kind.label(),
            });
        }
        registry.register(
            "build",
            "The broker's build (value 1)",
            prometheus_client::metrics::info::Info::new(vec![(
                "version",
                env!("CARGO_PKG_VERSION"),
            )]),
        );
        registry.register(
            "pool_misses",
            "Attaches that found the pool empty",
            pool_misses.clone(),
        );
        Self {
            registry,
            bubbles,
            pool_depth,
            create_seconds,
            attach_seconds,
            call_seconds,
            suspend_seconds,
            restore_seconds,
            parent_bubbles,
            parent_memory_mib,
            failures,
            pool_misses,
        }
    }

    /// Counts a failure under its kind.
    pub fn failed(&self, kind: FailureKind) {
        self.failures
            .get_or_create(&ReasonLabel {
                reason: kind.label(),
            })
            .inc();
    }

    /// Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
