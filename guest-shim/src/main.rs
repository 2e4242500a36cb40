//! The bubble guest shim: a bare-metal `no_std` program entered by the VMM
//! in 64-bit mode at CPL 3, with identity-mapped memory and no interrupts.
//!
//! It speaks guest ABI v1 (`bubble-vmm/src/abi.rs`, compiled into this
//! binary): it announces READY, then answers each CALL with one doorbell
//! access that both publishes the answer and waits for the next request.
//! Built-in ops, computed here, inside the guest: `echo`, `sha256`,
//! `sha256_chain`; with the bubble's own keys (made at boot from RDRAND):
//! `keys`, `attest`, `provision`, `hmac`; and `sign:<op>` for results
//! signed (and optionally sealed) by the bubble.

#![no_std]
#![no_main]

extern crate alloc;

#[path = "../../bubble-vmm/src/abi.rs"]
#[allow(dead_code)]
mod abi;
mod keys;
mod mem;
mod portions;
mod rng;

use core::fmt::Write as _;
use core::panic::PanicInfo;
use core::sync::atomic::{compiler_fence, Ordering};

use abi::{BootInfo, Header, MsgType, HEADER_LEN};
use sha2::{Digest, Sha256};

/// The guest's view of its mailbox.
struct Mailbox {
    base: *mut u8,
    size: usize,
    doorbell: *mut u32,
    seq: u64,
}

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
        self.seq += 1;
        let h = Header {
            msg_type,
            length: len as u32,
            seq: self.seq,
        }
        .encode();
        for (i, b) in h.iter().enumerate() {
            // SAFETY: within the mailbox.
            unsafe { core::ptr::write_volatile(self.base.add(i), *b) };
        }
        compiler_fence(Ordering::SeqCst);
        // SAFETY: the doorbell is an identity-mapped, unbacked guest-physical
        // address: the access exits to the VMM, which resumes us afterwards.
        unsafe { core::ptr::write_volatile(self.doorbell, self.seq as u32) };
        compiler_fence(Ordering::SeqCst);
    }

    fn send_bytes(&mut self, msg_type: MsgType, data: &[u8]) {
        let n = data.len().min(self.capacity());
        self.payload()[..n].copy_from_slice(&data[..n]);
        self.send(msg_type, n);
    }

    fn send_error(&mut self, code: u16, text: &str) {
        let t = text.as_bytes();
        let n = t.len().min(abi::MAX_TEXT_LEN);
        let p = self.payload();
        p[..2].copy_from_slice(&code.to_le_bytes());
        p[2..2 + n].copy_from_slice(&t[..n]);
        self.send(MsgType::ErrorReply, 2 + n);
    }
}

static mut MAILBOX: Option<Mailbox> = None;

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

/// Splits `[len u8][bytes]` off the front of `b`.
fn take_field(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let n = *b.first()? as usize;
    let f = b.get(1..1 + n)?;
    Some((f, &b[1 + n..]))
}

fn take_str(b: &[u8]) -> Option<(&str, &[u8])> {
    let (f, rest) = take_field(b)?;
    Some((core::str::from_utf8(f).ok()?, rest))
}

const BAD: u16 = abi::code::BAD_INPUT;

/// Runs an op that produces a fresh output (everything but the in-place
/// fast paths of unsigned `echo` and `sha256`).
fn run_op(op: &[u8], input: &[u8]) -> Result<alloc::vec::Vec<u8>, keys::OpError> {
    const NO_KEYS: keys::OpError = (abi::code::INTERNAL, "no RDRAND: this bubble has no keys");
    match op {
        b"echo" => Ok(input.to_vec()),
        b"sha256" => Ok(Sha256::digest(input).to_vec()),
        b"sha256_chain" => sha256_chain(input).map(|d| d.to_vec()),
        b"keys" => keys::KEYS
            .with(|k| {
                let mut v = alloc::vec::Vec::with_capacity(64);
                v.extend_from_slice(&k.kem_public());
                v.extend_from_slice(&k.sig_public());
                v
            })
            .ok_or(NO_KEYS),
        b"attest" => {
            // The nonce from the verifier; REPORT_DATA binds it and our keys.
            if !(16..=64).contains(&input.len()) {
                return Err((BAD, "attest needs a nonce of 16 to 64 bytes"));
            }
            let (kem, sig) = keys::KEYS
                .with(|k| (k.kem_public(), k.sig_public()))
                .ok_or(NO_KEYS)?;
            let portions_digest = portions_if_any().map(|p| p.digest).unwrap_or([0u8; 48]);
            // SAFETY: single-threaded read.
            let policy_digest = unsafe { *core::ptr::addr_of!(POLICY_DIGEST) };
            // The binding covers the nonce, the loaded portions and the
            // policy: nonce' = nonce ‖ portions_digest ‖ policy_digest.
            let mut bound = alloc::vec::Vec::with_capacity(input.len() + 80);
            bound.extend_from_slice(input);
            bound.extend_from_slice(&portions_digest);
            bound.extend_from_slice(&policy_digest);
            let rd = bubble_keys::report_data(&bound, &kem, &sig);
            let mut v = alloc::vec::Vec::with_capacity(32 + 32 + 64 + 48 + 32);
            v.extend_from_slice(&kem);
            v.extend_from_slice(&sig);
            v.extend_from_slice(&rd);
            v.extend_from_slice(&portions_digest);
            v.extend_from_slice(&policy_digest);
            Ok(v)
        }
        b"provision" => {
            let (id, rest) = take_str(input).ok_or((BAD, "provision needs [id][name][sealed]"))?;
            let (name, sealed) = take_str(rest).ok_or((BAD, "provision needs [id][name][sealed]"))?;
            keys::KEYS.with(|k| k.provision(id, name, sealed)).ok_or(NO_KEYS)??;
            Ok(alloc::vec::Vec::new())
        }
        b"hmac" => {
            let (name, data) = take_str(input).ok_or((BAD, "hmac needs [name][data]"))?;
            // Credentials granted to portions are theirs alone.
            if portions_if_any().is_some_and(|p| p.policy.grants.values().any(|g| g.iter().any(|c| c == name))) {
                return Err((abi::code::DENIED, "credential is reserved to a portion by the policy"));
            }
            keys::KEYS.with(|k| k.hmac(name, data)).ok_or(NO_KEYS)?.map(|m| m.to_vec())
        }
        b"set_policy" => {
            let p = portions().ok_or((abi::code::INTERNAL, "no portion runtime"))?;
            if p.policy_set || p.digest != [0u8; 48] {
                return Err((abi::code::STATE, "the policy is set once, before any portion is loaded"));
            }
            p.policy = portions::Policy::decode(input).ok_or((BAD, "malformed policy"))?;
            p.policy_set = true;
            let d: [u8; 32] = Sha256::digest(input).into();
            // SAFETY: single-threaded write.
            unsafe { *core::ptr::addr_of_mut!(POLICY_DIGEST) = d };
            Ok(d.to_vec())
        }
        b"load_portion" => {
            let (name, module) = take_str(input).ok_or((BAD, "load_portion needs [name][module]"))?;
            let p = portions().ok_or((abi::code::INTERNAL, "no portion runtime"))?;
            p.load(name, module).map(|d| d.to_vec())
        }
        b"portion" => {
            let (name, rest) = take_str(input).ok_or((BAD, "portion call needs [portion][function][input]"))?;
            let (function, data) = take_str(rest).ok_or((BAD, "portion call needs [portion][function][input]"))?;
            let p = portions().ok_or((abi::code::INTERNAL, "no portion runtime"))?;
            let (out, logs) = p.call(name, function, data)?;
            for l in logs {
                log_line(&l);
            }
            Ok(out)
        }
        _ => Err((
            abi::code::UNKNOWN_OP,
            "unknown op (known: echo, sha256, sha256_chain, keys, attest, provision, hmac, set_policy, load_portion, portion, sign:<op>)",
        )),
    }
}

fn sha256_chain(input: &[u8]) -> Result<[u8; 32], keys::OpError> {
    // [rounds u32 LE][data]: SHA-256 of the data, then of the digest,
    // `rounds` times in all: much guest work for little I/O.
    let r = input
        .get(..4)
        .ok_or((BAD, "sha256_chain needs [rounds u32 LE][data]"))?;
    let rounds = u32::from_le_bytes([r[0], r[1], r[2], r[3]]);
    let mut d = Sha256::digest(&input[4..]);
    for _ in 1..rounds {
        d = Sha256::digest(d);
    }
    Ok(d.into())
}

/// `sign:<op>`: input `[id_len u8][bubble id][seal_len u8][seal_to (0 or 32)][op input]`.
fn run_signed(op: &[u8], input: &[u8]) -> Result<alloc::vec::Vec<u8>, keys::OpError> {
    let (id, rest) = take_str(input).ok_or((BAD, "signed call needs [id][seal_to][input]"))?;
    let (seal, inner) = take_field(rest).ok_or((BAD, "signed call needs [id][seal_to][input]"))?;
    let seal_to: Option<[u8; 32]> = match seal.len() {
        0 => None,
        32 => {
            let mut k = [0u8; 32];
            k.copy_from_slice(seal);
            Some(k)
        }
        _ => return Err((BAD, "seal_to must be 32 bytes")),
    };
    let out = run_op(op, inner)?;
    keys::KEYS
        .with(|k| k.sign_result(id, inner, &out, seal_to.as_ref()))
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

/// Entry point: the VMM sets RSP and jumps here at CPL 3.
#[no_mangle]
#[link_section = ".text._start"]
pub extern "C" fn _start() -> ! {
    let info = boot_info();
    mem::init_heap(info.heap_start as usize, info.heap_end as usize);
    keys::KEYS.set(keys::Keys::generate());
    let mb = Mailbox {
        base: info.mailbox_gpa as *mut u8,
        size: info.mailbox_size as usize,
        doorbell: info.doorbell_gpa as *mut u32,
        seq: 0,
    };
    // SAFETY: single-threaded; set once before any use.
    let mb = unsafe {
        MAILBOX = Some(mb);
        (*core::ptr::addr_of_mut!(MAILBOX))
            .as_mut()
            .unwrap_unchecked()
    };
    mb.send_bytes(MsgType::Ready, b"bubble-guest-shim 0.1.0 abi 1");
    loop {
        serve(mb);
    }
}

/// Handles the request in the mailbox and answers it (which waits for the
/// next request).
fn serve(mb: &mut Mailbox) {
    let Some(h) = mb.header() else {
        mb.send_error(abi::code::BAD_INPUT, "malformed request header");
        return;
    };
    if h.msg_type != MsgType::Call {
        mb.send_error(abi::code::BAD_INPUT, "expected a CALL");
        return;
    }
    let len = h.length as usize;
    let payload = mb.payload();
    let (op_len, input_len) = match abi::decode_call(&payload[..len]) {
        Ok((op, input)) => (op.len(), input.len()),
        Err(_) => {
            mb.send_error(abi::code::BAD_INPUT, "malformed CALL payload");
            return;
        }
    };
    let start = 1 + op_len;
    let mut op_buf = [0u8; abi::MAX_OP_LEN];
    op_buf[..op_len].copy_from_slice(&payload[1..start]);
    let op = &op_buf[..op_len];
    match op {
        b"echo" => {
            payload.copy_within(start..start + input_len, 0);
            mb.send(MsgType::Reply, input_len);
        }
        b"sha256" => {
            let d = Sha256::digest(&payload[start..start + input_len]);
            payload[..32].copy_from_slice(&d);
            mb.send(MsgType::Reply, 32);
        }
        _ => {
            // Copy the request out: the mailbox carries log lines and the
            // answer next.
            let input = payload[start..start + input_len].to_vec();
            let r = match op.strip_prefix(b"sign:") {
                Some(inner) => run_signed(inner, &input),
                None => run_op(op, &input),
            };
            let logs = core::mem::take(&mut *PENDING_LOGS.0.borrow_mut());
            for l in logs {
                let n = l.len().min(abi::MAX_TEXT_LEN);
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
                    let _ = write!(msg, "{}: {}", core::str::from_utf8(op).unwrap_or("?"), text);
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
    // SAFETY: single-threaded; MAILBOX is set before anything can panic
    // except boot_info, which faults instead.
    if let Some(mb) = unsafe { (*core::ptr::addr_of_mut!(MAILBOX)).as_mut() } {
        mb.send_bytes(MsgType::Panic, msg.as_str().as_bytes());
    }
    fault()
}
