//! The bubble guest shim: a bare-metal `no_std` program entered by the VMM
//! in 64-bit mode at CPL 3, with identity-mapped memory and no interrupts.
//!
//! It speaks the guest contract of the `bubble-abi` crate (ABI v2,
//! `docs/guest-abi.md`): it announces READY_EARLY, makes its key pairs
//! when resumed, announces READY, then answers each CALL with
//! one doorbell access that both publishes the answer and waits for the
//! next request. Built-in ops, computed here, inside the guest: `echo`,
//! `sha256`, `sha256_chain`; with the bubble's own keys (made at boot from
//! RDRAND): `keys`, `attest`, `provision`, `hmac`; portions: `set_policy`,
//! `load_portion`, `portion`, `portion_sealed`, `portion_session`. A CALL with the SIGN flag
//! gets its result signed (and with SEAL, sealed) by the bubble.
//!
//! Code under grants is frozen: once `attest` answered or a credential was
//! provisioned or a sealed session opened, `load_portion` and `set_policy`
//! are refused (FROZEN), so the digests a custodian verified and sealed to stay the bubble's.

#![no_std]
#![no_main]

extern crate alloc;

mod awaits;
mod keys;
mod mem;
mod portions;
mod rate;
mod rng;
mod sessions;

use core::fmt::Write as _;
use core::panic::PanicInfo;
use core::sync::atomic::{compiler_fence, AtomicBool, Ordering};

use bubble_abi as abi;
use bubble_abi::ops::{
    self, AttestBinding, Hmac, LoadPortion, PortionCall, Provision, PublicKeys, SealedPortionCall,
};
use bubble_abi::{BootInfo, Call, Header, MsgType, Signing, HEADER_LEN};
use sha2::{Digest, Sha256};

/// The guest's view of its mailbox: a copyable handle (the mailbox memory
/// is only ever reached through its raw pointers, and the sequence number
/// is a global), so an awaiting host function can use one of its own.
#[derive(Clone, Copy)]
struct Mailbox {
    base: *mut u8,
    size: usize,
    doorbell: *mut u32,
}

/// The last message's sequence number.
static SEQ: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

impl Mailbox {
    fn capacity(&self) -> usize {
        self.size - HEADER_LEN
    }

    fn payload(&mut self) -> &mut [u8] {
        // SAFETY: the VMM reserved [base, base+size) for the mailbox; the
        // guest is single-threaded and the host only writes it while the
        // vCPU is stopped in a doorbell exit.
        unsafe { core::slice::from_raw_parts_mut(self.base.add(HEADER_LEN), self.capacity()) }
    }

    fn header(&self) -> Option<Header> {
        let mut h = [0u8; HEADER_LEN];
        for (i, b) in h.iter_mut().enumerate() {
            // SAFETY: within the mailbox; volatile because the host wrote it.
            *b = unsafe { core::ptr::read_volatile(self.base.add(i)) };
        }
        Header::decode(&h, self.capacity() as u64).ok()
    }

    /// Publishes a message whose payload is already in place, then rings
    /// the doorbell; returns when the host has placed the next request.
    fn send(&mut self, msg_type: MsgType, len: usize) {
        let seq = SEQ.fetch_add(1, Ordering::SeqCst) + 1;
        let h = Header {
            msg_type,
            length: len as u32,
            seq,
            host_time_ns: 0,
        }
        .encode();
        for (i, b) in h.iter().enumerate() {
            // SAFETY: within the mailbox.
            unsafe { core::ptr::write_volatile(self.base.add(i), *b) };
        }
        compiler_fence(Ordering::SeqCst);
        // SAFETY: the doorbell is an identity-mapped, unbacked guest-physical
        // address: the access exits to the VMM, which resumes us afterwards.
        unsafe { core::ptr::write_volatile(self.doorbell, seq as u32) };
        compiler_fence(Ordering::SeqCst);
    }

    fn send_bytes(&mut self, msg_type: MsgType, data: &[u8]) {
        let n = data.len().min(self.capacity());
        self.payload()[..n].copy_from_slice(&data[..n]);
        self.send(msg_type, n);
    }

    fn send_error(&mut self, code: u16, text: &str) {
        // The mailbox holds at least MAX_TEXT_LEN + 2 bytes (layout.rs).
        let n = abi::encode_error(code, text, self.payload()).unwrap_or(0);
        self.send(MsgType::ErrorReply, n);
    }
}

static mut MAILBOX: Option<Mailbox> = None;

/// A copy of the mailbox handle (None before boot set it).
fn mailbox() -> Option<Mailbox> {
    // SAFETY: single-threaded; written once at boot, then only read.
    unsafe { *core::ptr::addr_of!(MAILBOX) }
}

/// Log lines produced while serving a request; sent before its answer.
struct PendingLogs(core::cell::RefCell<alloc::vec::Vec<alloc::string::String>>);

// SAFETY: one vCPU, no interrupts: never accessed concurrently.
unsafe impl Sync for PendingLogs {}

static PENDING_LOGS: PendingLogs = PendingLogs(core::cell::RefCell::new(alloc::vec::Vec::new()));

fn log_line(text: &str) {
    PENDING_LOGS
        .0
        .borrow_mut()
        .push(alloc::string::String::from(text));
}

const BAD: u16 = abi::code::BAD_INPUT;

/// Whether the code is frozen: set when `attest` answers or a credential
/// is provisioned, never cleared (it is in guest memory, so a frozen copy
/// keeps it).
static CODE_FROZEN: AtomicBool = AtomicBool::new(false);

const FROZEN: keys::OpError = (
    abi::code::FROZEN,
    "the code is frozen: the bubble attested or holds a credential",
);

/// The bubble's current portions and policy digests.
fn code_digests() -> keys::CodeDigests {
    keys::CodeDigests {
        portions: portions_if_any().map(|p| p.digest).unwrap_or([0u8; 48]),
        // SAFETY: single-threaded read.
        policy: unsafe { *core::ptr::addr_of!(POLICY_DIGEST) },
    }
}

/// Runs a portion function on `input` and queues its log lines.
fn run_portion(
    portion: &str,
    function: &str,
    input: &[u8],
) -> Result<alloc::vec::Vec<u8>, keys::OpError> {
    let p = portions().ok_or((abi::code::INTERNAL, "no portion runtime"))?;
    let (out, logs) = p.call(portion, function, input)?;
    for l in logs {
        log_line(&l);
    }
    Ok(out)
}

/// Runs an op that produces a fresh output (everything but the in-place
/// fast paths of unsigned `echo` and `sha256`).
fn run_op(op: &str, input: &[u8]) -> Result<alloc::vec::Vec<u8>, keys::OpError> {
    const NO_KEYS: keys::OpError = (abi::code::INTERNAL, "no RDRAND: this bubble has no keys");
    match op {
        ops::OP_ECHO => Ok(input.to_vec()),
        ops::OP_SHA256 => Ok(Sha256::digest(input).to_vec()),
        ops::OP_SHA256_CHAIN => sha256_chain(input).map(|d| d.to_vec()),
        ops::OP_KEYS => keys::KEYS
            .with(|k| {
                PublicKeys {
                    kem_pk: k.kem_public(),
                    sig_pk: k.sig_public(),
                }
                .encode()
                .to_vec()
            })
            .ok_or(NO_KEYS),
        ops::OP_ATTEST => {
            // The nonce from the verifier; REPORT_DATA binds it and our keys.
            if ops::check_nonce(input).is_err() {
                return Err((BAD, "attest needs a nonce of 16 to 64 bytes"));
            }
            let (kem, sig) = keys::KEYS
                .with(|k| (k.kem_public(), k.sig_public()))
                .ok_or(NO_KEYS)?;
            let keys::CodeDigests {
                portions: portions_digest,
                policy: policy_digest,
            } = code_digests();
            // From here on the code is what this binding reports.
            CODE_FROZEN.store(true, Ordering::SeqCst);
            // The binding covers the nonce, the loaded portions and the
            // policy: nonce' = nonce ‖ portions_digest ‖ policy_digest.
            let mut bound = alloc::vec::Vec::with_capacity(input.len() + 80);
            bound.extend_from_slice(input);
            bound.extend_from_slice(&portions_digest);
            bound.extend_from_slice(&policy_digest);
            let report_data = bubble_keys::report_data(&bound, &kem, &sig);
            Ok(AttestBinding {
                kem_pk: kem,
                sig_pk: sig,
                report_data,
                portions_digest,
                policy_digest,
            }
            .encode()
            .to_vec())
        }
        ops::OP_PROVISION => {
            let p = Provision::decode(input).map_err(|_| (BAD, "provision needs [id][name][sealed]"))?;
            let code = code_digests();
            keys::KEYS.with(|k| k.provision(p.bubble_id, p.name, p.sealed, &code)).ok_or(NO_KEYS)??;
            // The credential opened for this code: it stays this code.
            CODE_FROZEN.store(true, Ordering::SeqCst);
            Ok(alloc::vec::Vec::new())
        }
        ops::OP_HMAC => {
            let Hmac { name, data } = Hmac::decode(input).map_err(|_| (BAD, "hmac needs [name][data]"))?;
            // Credentials granted to portions are theirs alone.
            if portions_if_any().is_some_and(|p| p.policy.grants.values().any(|g| g.iter().any(|c| c == name))) {
                return Err((abi::code::DENIED, "credential is reserved to a portion by the policy"));
            }
            keys::KEYS.with(|k| k.hmac(name, data)).ok_or(NO_KEYS)?.map(|m| m.to_vec())
        }
        ops::OP_SET_POLICY => {
            if CODE_FROZEN.load(Ordering::SeqCst) {
                return Err(FROZEN);
            }
            let p = portions().ok_or((abi::code::INTERNAL, "no portion runtime"))?;
            if p.policy_set || p.digest != [0u8; 48] {
                return Err((abi::code::STATE, "the policy is set once, before any portion is loaded"));
            }
            p.policy = portions::Policy::decode(input).ok_or((BAD, "malformed policy"))?;
            p.policy_set = true;
            rate::configure(p.policy.credential_rate);
            let d = abi::policy::wire_digest(input);
            // SAFETY: single-threaded write.
            unsafe { *core::ptr::addr_of_mut!(POLICY_DIGEST) = d };
            Ok(d.to_vec())
        }
        ops::OP_LOAD_PORTION => {
            let l = LoadPortion::decode(input).map_err(|_| (BAD, "load_portion needs [name][module]"))?;
            if CODE_FROZEN.load(Ordering::SeqCst) {
                return Err(FROZEN);
            }
            let p = portions().ok_or((abi::code::INTERNAL, "no portion runtime"))?;
            p.load(l.name, l.module).map(|d| d.to_vec())
        }
        ops::OP_PORTION => {
            let c = PortionCall::decode(input)
                .map_err(|_| (BAD, "portion call needs [portion][function][input]"))?;
            run_portion(c.portion, c.function, c.input)
        }
        ops::OP_PORTION_SEALED => {
            let c = SealedPortionCall::decode(input)
                .map_err(|_| (BAD, "portion_sealed needs [id][portion][function][seq][sealed]"))?;
            // Zeroized when it drops, after the call.
            let plain = keys::KEYS.with(|k| k.open_input(&c)).ok_or(NO_KEYS)??;
            run_portion(c.portion, c.function, plain.expose())
        }
        abi::OP_PORTION_SESSION => {
            let c = abi::SessionCall::decode(input).map_err(|_| {
                (BAD, "portion_session needs [id][portion][function][session u64][seq u64][setup][ciphertext]")
            })?;
            let code = code_digests();
            if keys::KEYS.with(|k| k.session_setup(&c, &code)).ok_or(NO_KEYS)?? {
                // The session is bound to this code: it stays this code.
                CODE_FROZEN.store(true, Ordering::SeqCst);
            }
            // Zeroized when it drops, after the call.
            let plain = keys::KEYS.with(|k| k.session_input(&c)).ok_or(NO_KEYS)??;
            run_portion(c.portion, c.function, plain.expose())
        }
        _ => Err((
            abi::code::UNKNOWN_OP,
            "unknown op (known: echo, sha256, sha256_chain, keys, attest, provision, hmac, set_policy, load_portion, portion, portion_sealed, portion_session)",
        )),
    }
}

fn sha256_chain(input: &[u8]) -> Result<[u8; 32], keys::OpError> {
    // SHA-256 of the data, then of the digest, `rounds` times in all: much
    // guest work for little I/O.
    let c = ops::Sha256Chain::decode(input)
        .map_err(|_| (BAD, "sha256_chain needs [rounds u32 LE][data]"))?;
    let mut d = Sha256::digest(c.data);
    for _ in 1..c.rounds {
        d = Sha256::digest(d);
    }
    Ok(d.into())
}

/// A CALL with the SIGN flag: runs the op, then signs (and with SEAL,
/// seals) its result; answers a `SignedResult`.
fn run_signed(
    op: &str,
    sign: &Signing<'_>,
    input: &[u8],
) -> Result<alloc::vec::Vec<u8>, keys::OpError> {
    let out = run_op(op, input)?;
    keys::KEYS
        .with(|k| k.sign_result(sign.bubble_id, input, &out, sign.seal_to.as_ref()))
        .ok_or((abi::code::INTERNAL, "no RDRAND: this bubble has no keys"))?
}

static mut PORTIONS: Option<portions::Portions> = None;

/// The portion runtime, created on first use (not at boot: most bubbles
/// never load a portion, and creating the engine costs boot time).
fn portions() -> Option<&'static mut portions::Portions> {
    // SAFETY: single-threaded; only the request loop touches PORTIONS, and
    // host functions never do.
    unsafe {
        let p = &mut *core::ptr::addr_of_mut!(PORTIONS);
        if p.is_none() {
            *p = portions::Portions::new();
        }
        p.as_mut()
    }
}

/// The portion runtime if it exists (without creating it).
fn portions_if_any() -> Option<&'static portions::Portions> {
    // SAFETY: as above.
    unsafe { (*core::ptr::addr_of!(PORTIONS)).as_ref() }
}

/// The policy digest: SHA-256 of the policy bytes the broker set (zero
/// when the default policy is in force).
static mut POLICY_DIGEST: [u8; 32] = [0u8; 32];

fn boot_info() -> BootInfo {
    let mut b = [0u8; abi::BOOT_INFO_LEN];
    for (i, x) in b.iter_mut().enumerate() {
        // SAFETY: the VMM writes the boot information page before entry.
        *x = unsafe { core::ptr::read_volatile((abi::BOOT_INFO_GPA as *const u8).add(i)) };
    }
    match BootInfo::decode(&b) {
        Ok(i) => i,
        // Nothing to report to without a mailbox: fault, which the VMM sees
        // as a triple fault.
        Err(_) => fault(),
    }
}

fn fault() -> ! {
    // SAFETY: ud2 raises #UD; with no IDT the VMM sees a triple fault.
    unsafe { core::arch::asm!("ud2", options(noreturn)) }
}

/// The greeting of READY_EARLY and READY.
const GREETING: &[u8] = b"bubble-guest-shim 0.1.0 abi 2";

/// Entry point: the VMM sets RSP and jumps here at CPL 3.
#[no_mangle]
#[link_section = ".text._start"]
pub extern "C" fn _start() -> ! {
    let info = boot_info();
    mem::init_heap(info.heap_start as usize, info.heap_end as usize);
    let mut mb = Mailbox {
        base: info.mailbox_gpa as *mut u8,
        size: info.mailbox_size as usize,
        doorbell: info.doorbell_gpa as *mut u32,
    };
    // SAFETY: single-threaded; set once, before any use, and only ever
    // copied out (see `mailbox`).
    unsafe { MAILBOX = Some(mb) };
    // Running: the host may say so now. It resumes us with no request
    // and serves none before READY, so no call ever finds us without
    // keys (docs/guest-abi.md, "Start-up").
    mb.send_bytes(MsgType::ReadyEarly, GREETING);
    keys::KEYS.set(keys::Keys::generate());
    mb.send_bytes(MsgType::Ready, GREETING);
    loop {
        serve(&mut mb);
    }
}

/// Handles the request in the mailbox and answers it (which waits for the
/// next request).
fn serve(mb: &mut Mailbox) {
    let Some(h) = mb.header() else {
        mb.send_error(abi::code::BAD_INPUT, "malformed request header");
        return;
    };
    if h.msg_type == MsgType::Resume {
        mb.send_error(abi::code::NOT_AWAITING, "RESUME: no portion call awaits");
        return;
    }
    if h.msg_type != MsgType::Call {
        mb.send_error(abi::code::BAD_INPUT, "expected a CALL");
        return;
    }
    rate::set_now(h.host_time_ns);
    let len = h.length as usize;
    let payload = mb.payload();
    let Ok(call) = Call::decode(&payload[..len]) else {
        mb.send_error(abi::code::BAD_INPUT, "malformed CALL payload");
        return;
    };
    /// The in-place fast paths (unsigned `echo` and `sha256`).
    enum Fast {
        Echo,
        Sha256,
        No,
    }
    let start = call.input_offset();
    let input_len = call.input.len();
    let fast = match (call.op, call.sign.is_some()) {
        (ops::OP_ECHO, false) => Fast::Echo,
        (ops::OP_SHA256, false) => Fast::Sha256,
        _ => Fast::No,
    };
    match fast {
        Fast::Echo => {
            payload.copy_within(start..start + input_len, 0);
            mb.send(MsgType::Reply, input_len);
        }
        Fast::Sha256 => {
            let d = Sha256::digest(&payload[start..start + input_len]);
            payload[..32].copy_from_slice(&d);
            mb.send(MsgType::Reply, 32);
        }
        Fast::No => {
            // Copy the request out: the mailbox carries log lines and the
            // answer next.
            let request = payload[..len].to_vec();
            let Ok(call) = Call::decode(&request) else {
                mb.send_error(abi::code::BAD_INPUT, "malformed CALL payload");
                return;
            };
            let r = match &call.sign {
                Some(sign) => run_signed(call.op, sign, call.input),
                None => run_op(call.op, call.input),
            };
            let logs = core::mem::take(&mut *PENDING_LOGS.0.borrow_mut());
            for l in logs {
                let mut n = l.len().min(abi::MAX_TEXT_LEN);
                while !l.is_char_boundary(n) {
                    n -= 1;
                }
                mb.send_bytes(MsgType::Log, &l.as_bytes()[..n]);
            }
            match r {
                Ok(out) if out.len() <= mb.capacity() => {
                    let n = out.len();
                    mb.payload()[..n].copy_from_slice(&out);
                    mb.send(MsgType::Reply, n);
                }
                Ok(_) => mb.send_error(abi::code::TOO_LARGE, "output does not fit the mailbox"),
                Err((code, text)) => {
                    let mut msg = mem::FixedBuf::<160>::new();
                    let _ = write!(msg, "{}: {}", call.op, text);
                    mb.send_error(code, msg.as_str());
                }
            }
        }
    }
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    let mut msg = mem::FixedBuf::<512>::new();
    let _ = write!(msg, "{}", info.message());
    if let Some(l) = info.location() {
        let _ = write!(msg, " at {}:{}", l.file(), l.line());
    }
    // MAILBOX is set before anything can panic except boot_info, which
    // faults instead.
    if let Some(mut mb) = mailbox() {
        mb.send_bytes(MsgType::Panic, msg.as_str().as_bytes());
    }
    fault()
}
