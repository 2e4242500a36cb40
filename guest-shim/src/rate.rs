//! The credential rate limit of the policy (`credential_rate`): one token
//! bucket per credential name (`bubble_abi::rate`), shared by every
//! portion that is granted it, on the host's clock (the `host_time_ns` of
//! the CALL being served). Only granted names get a bucket, so there are
//! at most as many as the policy names.

use alloc::collections::BTreeMap;
use alloc::string::String;
use core::cell::RefCell;

use bubble_abi::{CredentialRate, TokenBucket};

struct State {
    rate: Option<CredentialRate>,
    now_ns: u64,
    buckets: BTreeMap<String, TokenBucket>,
}

struct Shared(RefCell<State>);

// SAFETY: one vCPU, no interrupts: never accessed concurrently.
unsafe impl Sync for Shared {}

static STATE: Shared = Shared(RefCell::new(State {
    rate: None,
    now_ns: 0,
    buckets: BTreeMap::new(),
}));

/// Sets the rate of the policy (once, with the policy).
pub fn configure(rate: Option<CredentialRate>) {
    let mut s = STATE.0.borrow_mut();
    s.rate = rate;
    s.buckets.clear();
}

/// The host time of the CALL being served.
pub fn set_now(now_ns: u64) {
    STATE.0.borrow_mut().now_ns = now_ns;
}

/// Takes one use of credential `name`: `false` if its bucket is empty.
/// Always `true` without a rate.
pub fn take(name: &str) -> bool {
    let mut s = STATE.0.borrow_mut();
    let Some(rate) = s.rate else { return true };
    let now = s.now_ns;
    match s.buckets.get_mut(name) {
        Some(b) => b.take(now),
        None => {
            let mut b = TokenBucket::new(rate);
            let ok = b.take(now);
            s.buckets.insert(String::from(name), b);
            ok
        }
    }
}
