//! The broker's per-step breakdown of each create (its debug-level
//! "create steps" event, see `bubbled::core::create`), captured in this
//! process: only that event's callsite is enabled, so nothing else the
//! broker traces costs more than without a subscriber.

use std::collections::BTreeMap;

use parking_lot::Mutex;
use tracing::field::{Field, Visit};
use tracing_subscriber::filter::{filter_fn, LevelFilter};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

/// The `*_us` fields of each create's steps since the last [`take`].
static SEEN: Mutex<Vec<BTreeMap<String, u64>>> = Mutex::new(Vec::new());

struct Steps;

#[derive(Default)]
struct Fields(BTreeMap<String, u64>, bool);

impl Visit for Fields {
    fn record_u64(&mut self, f: &Field, v: u64) {
        self.0.insert(f.name().to_string(), v);
    }
    fn record_bool(&mut self, f: &Field, v: bool) {
        if f.name() == "spare" {
            self.1 = v;
        }
    }
    fn record_debug(&mut self, _: &Field, _: &dyn std::fmt::Debug) {}
}

impl<S: tracing::Subscriber> Layer<S> for Steps {
    fn on_event(&self, e: &tracing::Event<'_>, _: Context<'_, S>) {
        let mut f = Fields::default();
        e.record(&mut f);
        f.0.insert("spare".into(), u64::from(f.1));
        SEEN.lock().push(f.0);
    }
}

/// Installs the capture (when nothing else traces).
pub(crate) fn install() {
    let only =
        filter_fn(|m| m.target() == "bubbled::core::create" && *m.level() == tracing::Level::DEBUG);
    let sub = tracing_subscriber::registry()
        .with(Steps.with_filter(only).with_filter(LevelFilter::DEBUG));
    let _ = tracing::subscriber::set_global_default(sub);
}

/// The creates' steps seen since the last call.
pub(crate) fn take() -> Vec<BTreeMap<String, u64>> {
    std::mem::take(&mut *SEEN.lock())
}
