//! Code portions: WebAssembly modules run by wasmi inside the bubble.
//!
//! A portion imports host functions from module `bubble_v1` (ABI below).
//! It can *use* credentials by name (HMAC, Ed25519, AEAD) if the bubble's
//! security policy grants them to it, but no function ever returns
//! credential bytes, and errors and traps carry fixed texts only.
//!
//! Host functions (all return `i32`; negative values are errors):
//! - `input_len() -> len`, `input_read(ptr, len) -> copied`
//! - `output_write(ptr, len) -> 0` (traps past the policy's output limit)
//! - `log(ptr, len) -> 0` (at most 16 lines per call)
//! - `random(ptr, len) -> 0` (RDRAND)
//! - `hmac_sha256(name_ptr, name_len, data_ptr, data_len, out_ptr) -> 0` (32 bytes)
//! - `ed25519_sign(name_ptr, name_len, msg_ptr, msg_len, out_ptr) -> 0` (64 bytes; credential = 32-byte seed)
//! - `ed25519_public_key(name_ptr, name_len, out_ptr) -> 0` (32 bytes)
//! - `aead_seal(name_ptr, name_len, aad_ptr, aad_len, pt_ptr, pt_len, out_ptr, out_cap) -> len`
//!   (AES-256-GCM, 32-byte credential; out = nonce(12) ‖ ciphertext ‖ tag)
//! - `aead_open(name_ptr, name_len, aad_ptr, aad_len, ct_ptr, ct_len, out_ptr, out_cap) -> len`
//! - `await_event(key_ptr, key_len, timeout_ms, out_ptr, out_cap) -> len`:
//!   waits (the bubble may be frozen and resumed on another host) for the
//!   event `key`; its payload goes to `out`. -4: the timeout passed.
//!
//! Errors: -1 bad pointer or length (for `await_event` also a key outside
//! 1..=64 bytes of `A-Z a-z 0-9 . _ : -`, a timeout outside 1 ms..7 days,
//! or a call from a module's start function: only a portion call awaits),
//! -2 buffer too small (for `await_event`: the payload was dropped), -3
//! cryptographic failure (e.g. AEAD open), -4 the await timed out. Using a credential that the policy does not
//! grant to the portion (or that does not exist) traps: the call fails with
//! PERMISSION_DENIED. Using a granted credential faster than the policy's
//! `credential_rate` allows (`crate::rate`) traps too: the call fails with
//! RATE_LIMITED.

use alloc::collections::BTreeMap;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use sha2::{Digest, Sha384};
use wasmi::{
    Caller, Config, Engine, Extern, Instance, Linker, Module, Store, StoreLimits,
    StoreLimitsBuilder,
};

use crate::keys;
use bubble_abi::code;

/// ABI module name of the host functions.
pub const HOST_MODULE: &str = "bubble_v1";
/// Most portions a bubble holds.
pub const MAX_PORTIONS: usize = 16;
/// Most log lines per call.
const MAX_LOGS_PER_CALL: u32 = 16;

/// The bubble's security policy, enforced here (fuel, memory, output,
/// grants) and by the VMM (wall-clock deadline).
#[derive(Clone, Debug)]
pub struct Policy {
    /// Fuel per call.
    pub fuel_per_call: u64,
    /// Linear memory limit per portion, bytes.
    pub memory_limit: usize,
    /// Largest output, bytes.
    pub max_output: usize,
    /// Portion name → credentials it may use.
    pub grants: BTreeMap<String, Vec<String>>,
    /// Uses per second and burst of each credential (`crate::rate`).
    pub credential_rate: Option<bubble_abi::CredentialRate>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            fuel_per_call: 10_000_000,
            memory_limit: 1 << 20,
            max_output: 64 << 10,
            grants: BTreeMap::new(),
            credential_rate: None,
        }
    }
}

impl Policy {
    /// Decodes the policy's wire form (`bubble_abi::SecurityPolicy`).
    pub fn decode(b: &[u8]) -> Option<Self> {
        let p = bubble_abi::SecurityPolicy::decode(b).ok()?;
        Some(Policy {
            fuel_per_call: p.fuel_per_call,
            memory_limit: p.memory_limit_bytes as usize,
            max_output: p.max_output_bytes as usize,
            grants: p.grants.into_iter().collect(),
            credential_rate: p.credential_rate,
        })
    }
}

/// Per-call state visible to host functions.
pub struct HostState {
    /// The call's input (a sealed input's plaintext): zeroized when the
    /// call ends.
    input: bubble_keys::SecretBytes,
    output: Vec<u8>,
    max_output: usize,
    granted: Vec<String>,
    limits: StoreLimits,
    logs: u32,
    log_lines: Vec<String>,
    failure: Option<(u16, &'static str)>,
    /// Inside a portion call (not while a module starts at load): only
    /// then may it await an event.
    may_await: bool,
}

struct Portion {
    store: Store<HostState>,
    instance: Instance,
}

/// The loaded portions and their running digest.
pub struct Portions {
    engine: Engine,
    linker: Linker<HostState>,
    loaded: BTreeMap<String, Portion>,
    /// SHA-384 chain over (name, SHA-384(module)) of every load.
    pub digest: [u8; 48],
    /// The policy in force.
    pub policy: Policy,
    /// Whether the policy was set (it can be set once, before any load).
    pub policy_set: bool,
}

type HostResult = Result<i32, wasmi::Error>;

fn memory(caller: &Caller<'_, HostState>) -> Option<wasmi::Memory> {
    caller.get_export("memory").and_then(Extern::into_memory)
}

fn read_mem(caller: &Caller<'_, HostState>, ptr: i32, len: i32) -> Option<Vec<u8>> {
    if ptr < 0 || !(0..=(1 << 20)).contains(&len) {
        return None;
    }
    let mut buf = alloc::vec![0u8; len as usize];
    memory(caller)?.read(caller, ptr as usize, &mut buf).ok()?;
    Some(buf)
}

fn write_mem(caller: &mut Caller<'_, HostState>, ptr: i32, data: &[u8]) -> bool {
    if ptr < 0 {
        return false;
    }
    match memory(caller) {
        Some(m) => m.write(caller, ptr as usize, data).is_ok(),
        None => false,
    }
}

fn deny(caller: &mut Caller<'_, HostState>) -> wasmi::Error {
    caller.data_mut().failure = Some((code::DENIED, "credential not granted to this portion"));
    wasmi::Error::new("credential not granted to this portion")
}

/// Reads a credential name and checks the grant; traps if not granted.
fn granted_name(
    caller: &mut Caller<'_, HostState>,
    ptr: i32,
    len: i32,
) -> Result<Option<String>, wasmi::Error> {
    let Some(raw) = read_mem(caller, ptr, len) else {
        return Ok(None);
    };
    let Ok(name) = String::from_utf8(raw) else {
        return Ok(None);
    };
    if !caller.data().granted.iter().any(|g| *g == name) {
        return Err(deny(caller));
    }
    if !crate::rate::take(&name) {
        caller.data_mut().failure = Some((code::RATE_LIMITED, "credential rate limit reached"));
        return Err(wasmi::Error::new("credential rate limit reached"));
    }
    Ok(Some(name))
}

fn with_credential<R>(
    caller: &mut Caller<'_, HostState>,
    name: &str,
    f: impl FnOnce(&[u8]) -> R,
) -> Result<R, wasmi::Error> {
    match keys::with_credential(name, f) {
        Some(r) => Ok(r),
        None => Err(deny(caller)),
    }
}

fn define(linker: &mut Linker<HostState>) -> Result<(), wasmi::errors::LinkerError> {
    let m = HOST_MODULE;
    linker.func_wrap(m, "input_len", |c: Caller<'_, HostState>| -> i32 {
        c.data().input.len() as i32
    })?;
    linker.func_wrap(
        m,
        "input_read",
        |mut c: Caller<'_, HostState>, ptr: i32, len: i32| -> i32 {
            if len < 0 || ptr < 0 {
                return -1;
            }
            let Some(mem) = memory(&c) else { return -1 };
            // Straight from the input into linear memory: no other copy of
            // a sealed input's plaintext.
            let (linear, st) = mem.data_and_store_mut(&mut c);
            let src = st.input.expose();
            let n = (len as usize).min(src.len());
            let start = ptr as usize;
            match start
                .checked_add(n)
                .and_then(|end| linear.get_mut(start..end))
            {
                Some(dst) => {
                    dst.copy_from_slice(&src[..n]);
                    n as i32
                }
                None => -1,
            }
        },
    )?;
    linker.func_wrap(
        m,
        "output_write",
        |mut c: Caller<'_, HostState>, ptr: i32, len: i32| -> HostResult {
            let Some(data) = read_mem(&c, ptr, len) else {
                return Ok(-1);
            };
            let st = c.data_mut();
            if st.output.len() + data.len() > st.max_output {
                st.failure = Some((code::OUTPUT_LIMIT, "output exceeds the policy's limit"));
                return Err(wasmi::Error::new("output exceeds the policy's limit"));
            }
            st.output.extend_from_slice(&data);
            Ok(0)
        },
    )?;
    linker.func_wrap(
        m,
        "log",
        |mut c: Caller<'_, HostState>, ptr: i32, len: i32| -> i32 {
            let Some(data) = read_mem(&c, ptr, len.min(256)) else {
                return -1;
            };
            let st = c.data_mut();
            if st.logs < MAX_LOGS_PER_CALL {
                st.logs += 1;
                st.log_lines
                    .push(String::from_utf8_lossy(&data).into_owned());
            }
            0
        },
    )?;
    linker.func_wrap(
        m,
        "random",
        |mut c: Caller<'_, HostState>, ptr: i32, len: i32| -> i32 {
            if !(0..=4096).contains(&len) {
                return -1;
            }
            let mut buf = alloc::vec![0u8; len as usize];
            keys::fill_random(&mut buf);
            if write_mem(&mut c, ptr, &buf) {
                0
            } else {
                -1
            }
        },
    )?;
    linker.func_wrap(
        m,
        "hmac_sha256",
        |mut c: Caller<'_, HostState>,
         np: i32,
         nl: i32,
         dp: i32,
         dl: i32,
         out: i32|
         -> HostResult {
            let Some(name) = granted_name(&mut c, np, nl)? else {
                return Ok(-1);
            };
            let Some(data) = read_mem(&c, dp, dl) else {
                return Ok(-1);
            };
            let mac = with_credential(&mut c, &name, |k| keys::hmac_sha256(k, &data))?;
            Ok(if write_mem(&mut c, out, &mac) { 0 } else { -1 })
        },
    )?;
    linker.func_wrap(
        m,
        "ed25519_sign",
        |mut c: Caller<'_, HostState>,
         np: i32,
         nl: i32,
         mp: i32,
         ml: i32,
         out: i32|
         -> HostResult {
            let Some(name) = granted_name(&mut c, np, nl)? else {
                return Ok(-1);
            };
            let Some(msg) = read_mem(&c, mp, ml) else {
                return Ok(-1);
            };
            let sig = with_credential(&mut c, &name, |k| keys::ed25519_sign(k, &msg))?;
            match sig {
                Some(s) => Ok(if write_mem(&mut c, out, &s) { 0 } else { -1 }),
                None => Ok(-3),
            }
        },
    )?;
    linker.func_wrap(
        m,
        "ed25519_public_key",
        |mut c: Caller<'_, HostState>, np: i32, nl: i32, out: i32| -> HostResult {
            let Some(name) = granted_name(&mut c, np, nl)? else {
                return Ok(-1);
            };
            let pk = with_credential(&mut c, &name, keys::ed25519_public)?;
            match pk {
                Some(p) => Ok(if write_mem(&mut c, out, &p) { 0 } else { -1 }),
                None => Ok(-3),
            }
        },
    )?;
    #[allow(clippy::too_many_arguments)]
    fn aead(
        mut c: Caller<'_, HostState>,
        seal: bool,
        np: i32,
        nl: i32,
        ap: i32,
        al: i32,
        dp: i32,
        dl: i32,
        out: i32,
        cap: i32,
    ) -> HostResult {
        let Some(name) = granted_name(&mut c, np, nl)? else {
            return Ok(-1);
        };
        let (Some(aad), Some(data)) = (read_mem(&c, ap, al), read_mem(&c, dp, dl)) else {
            return Ok(-1);
        };
        let r = with_credential(&mut c, &name, |k| {
            if seal {
                keys::aead_seal(k, &aad, &data)
            } else {
                keys::aead_open(k, &aad, &data)
            }
        })?;
        let Some(bytes) = r else { return Ok(-3) };
        if cap < 0 || bytes.len() > cap as usize {
            return Ok(-2);
        }
        Ok(if write_mem(&mut c, out, &bytes) {
            bytes.len() as i32
        } else {
            -1
        })
    }
    linker.func_wrap(
        m,
        "await_event",
        |mut c: Caller<'_, HostState>,
         kp: i32,
         kl: i32,
         timeout_ms: i32,
         out: i32,
         cap: i32|
         -> i32 {
            if !(1..=bubble_abi::MAX_AWAIT_KEY_LEN as i32).contains(&kl)
                || timeout_ms <= 0
                || cap < 0
                || !c.data().may_await
            {
                return -1;
            }
            let Some(key) = read_mem(&c, kp, kl) else {
                return -1;
            };
            let Ok(key) = core::str::from_utf8(&key) else {
                return -1;
            };
            // The output buffer must be valid before the await starts.
            let Some(mem) = memory(&c) else { return -1 };
            let fits = (out as usize)
                .checked_add(cap as usize)
                .is_some_and(|end| out >= 0 && end <= mem.data_size(&c));
            if !fits {
                return -1;
            }
            match crate::awaits::await_event(key, timeout_ms as u32) {
                None => -1,
                Some(crate::awaits::AwaitEnd::Timeout) => -4,
                Some(crate::awaits::AwaitEnd::Event(p)) if p.len() > cap as usize => -2,
                Some(crate::awaits::AwaitEnd::Event(p)) => {
                    if write_mem(&mut c, out, &p) {
                        p.len() as i32
                    } else {
                        -1
                    }
                }
            }
        },
    )?;
    linker.func_wrap(
        m,
        "aead_seal",
        |c: Caller<'_, HostState>,
         np: i32,
         nl: i32,
         ap: i32,
         al: i32,
         dp: i32,
         dl: i32,
         out: i32,
         cap: i32| { aead(c, true, np, nl, ap, al, dp, dl, out, cap) },
    )?;
    linker.func_wrap(
        m,
        "aead_open",
        |c: Caller<'_, HostState>,
         np: i32,
         nl: i32,
         ap: i32,
         al: i32,
         dp: i32,
         dl: i32,
         out: i32,
         cap: i32| { aead(c, false, np, nl, ap, al, dp, dl, out, cap) },
    )?;
    Ok(())
}

/// Outcome of a portion call: output and log lines, or an ABI error.
pub type CallOutcome = Result<(Vec<u8>, Vec<String>), (u16, &'static str)>;

impl Portions {
    /// An empty set with the default policy.
    pub fn new() -> Option<Self> {
        let mut config = Config::default();
        config.consume_fuel(true);
        let engine = Engine::new(&config);
        let mut linker = Linker::new(&engine);
        define(&mut linker).ok()?;
        Some(Self {
            engine,
            linker,
            loaded: BTreeMap::new(),
            digest: [0u8; 48],
            policy: Policy::default(),
            policy_set: false,
        })
    }

    /// Validates and instantiates `module` as portion `name`; extends the
    /// digest. Returns the new digest.
    pub fn load(&mut self, name: &str, module: &[u8]) -> Result<[u8; 48], (u16, &'static str)> {
        if name.is_empty() || name.len() > bubble_abi::MAX_NAME_LEN {
            return Err((code::BAD_INPUT, "portion name must be 1 to 64 bytes"));
        }
        if !self.loaded.contains_key(name) && self.loaded.len() >= MAX_PORTIONS {
            return Err((code::BAD_INPUT, "too many portions"));
        }
        let m = Module::new(&self.engine, module)
            .map_err(|_| (code::BAD_INPUT, "invalid WebAssembly module"))?;
        let state = HostState {
            input: bubble_keys::SecretBytes::new(Vec::new()),
            output: Vec::new(),
            max_output: self.policy.max_output,
            granted: self.policy.grants.get(name).cloned().unwrap_or_default(),
            limits: StoreLimitsBuilder::new()
                .memory_size(self.policy.memory_limit)
                .memories(1)
                .tables(4)
                .instances(1)
                .trap_on_grow_failure(true)
                .build(),
            logs: 0,
            log_lines: Vec::new(),
            failure: None,
            may_await: false,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        store
            .set_fuel(self.policy.fuel_per_call)
            .map_err(|_| (code::INTERNAL, "fuel"))?;
        let instance = self
            .linker
            .instantiate_and_start(&mut store, &m)
            .map_err(|e| {
                classify(
                    &e,
                    store.data().failure,
                    (code::BAD_INPUT, "portion does not link or start"),
                )
            })?;
        let mut h = Sha384::new();
        h.update(self.digest);
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(Sha384::digest(module));
        self.digest = h.finalize().into();
        self.loaded
            .insert(name.to_string(), Portion { store, instance });
        Ok(self.digest)
    }

    /// Calls `function` of portion `name` with `input`.
    pub fn call(&mut self, name: &str, function: &str, input: &[u8]) -> CallOutcome {
        let fuel = self.policy.fuel_per_call;
        let p = self
            .loaded
            .get_mut(name)
            .ok_or((code::UNKNOWN_OP, "no portion of that name is loaded"))?;
        let f = p
            .instance
            .get_typed_func::<(), i32>(&p.store, function)
            .map_err(|_| {
                (
                    code::UNKNOWN_OP,
                    "the portion exports no such function () -> i32",
                )
            })?;
        {
            let st = p.store.data_mut();
            st.input = bubble_keys::SecretBytes::from_slice(input);
            st.output.clear();
            st.logs = 0;
            st.log_lines.clear();
            st.failure = None;
            st.may_await = true;
        }
        p.store
            .set_fuel(fuel)
            .map_err(|_| (code::INTERNAL, "fuel"))?;
        let r = f.call(&mut p.store, ());
        let st = p.store.data_mut();
        st.may_await = false;
        // Dropping the old value zeroizes it.
        st.input = bubble_keys::SecretBytes::new(Vec::new());
        let logs = core::mem::take(&mut st.log_lines);
        match r {
            Ok(0) => Ok((core::mem::take(&mut st.output), logs)),
            Ok(_) => {
                st.output.clear();
                Err((code::PORTION_REFUSED, "the portion refused the request"))
            }
            Err(e) => {
                st.output.clear();
                Err(classify(
                    &e,
                    st.failure,
                    (code::TRAP, "the portion trapped"),
                ))
            }
        }
    }
}

/// Maps a wasmi error to a fixed, secret-free ABI error.
fn classify(
    e: &wasmi::Error,
    failure: Option<(u16, &'static str)>,
    other: (u16, &'static str),
) -> (u16, &'static str) {
    if let Some(f) = failure {
        return f;
    }
    match e.as_trap_code() {
        Some(wasmi::TrapCode::OutOfFuel) => (code::FUEL, "the call ran out of fuel"),
        Some(wasmi::TrapCode::GrowthOperationLimited) => {
            (code::MEMORY_LIMIT, "the portion exceeded its memory limit")
        }
        _ => other,
    }
}
