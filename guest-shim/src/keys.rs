//! The bubble's own keys and the credentials provisioned into it.
//!
//! At boot the shim makes an X25519 key pair (HPKE KEM) and an Ed25519
//! signing key pair from RDRAND. The private keys never leave this module:
//! no op returns them, and they are zeroized on drop. Credentials arrive
//! sealed to the KEM key (HPKE, RFC 9180 base mode) and are opened here;
//! ops can use them (HMAC) but never read them out.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::RefCell;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use bubble_keys::RngCore;

use bubble_keys::{KemKeyPair, SealedBox, SecretBytes, SigningKeyPair};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::rng::RdRand;

/// Most credentials a bubble holds.
pub const MAX_CREDENTIALS: usize = 64;
/// Longest credential (bytes of plaintext).
pub const MAX_CREDENTIAL_LEN: usize = 4096;

/// The bubble's keys, reachable from ops and from portion host functions.
/// The guest is single-threaded; the `RefCell` turns any re-entrant misuse
/// into a panic (a failed bubble) rather than aliasing.
pub struct Global(RefCell<Option<Keys>>);

// SAFETY: one vCPU, no interrupts: never accessed concurrently.
unsafe impl Sync for Global {}

/// The global keys.
pub static KEYS: Global = Global(RefCell::new(None));

impl Global {
    /// Installs the keys (at boot).
    pub fn set(&self, k: Option<Keys>) {
        *self.0.borrow_mut() = k;
    }

    /// Runs `f` with the keys, if there are any.
    pub fn with<R>(&self, f: impl FnOnce(&mut Keys) -> R) -> Option<R> {
        self.0.borrow_mut().as_mut().map(f)
    }
}

/// Runs `f` on the bytes of credential `name` (never returned to callers).
pub fn with_credential<R>(name: &str, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
    KEYS.with(|k| k.creds.get(name).map(|c| f(c.expose())))
        .flatten()
}

/// Fills `buf` from RDRAND.
pub fn fill_random(buf: &mut [u8]) {
    if KEYS.with(|k| k.rng.fill_bytes(buf)).is_none() {
        buf.fill(0);
    }
}

/// HMAC-SHA256 under `key`.
pub fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(key) {
        Ok(m) => m,
        // HMAC takes keys of any length.
        Err(_) => return [0u8; 32],
    };
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// Ed25519 signature with a 32-byte seed credential.
pub fn ed25519_sign(seed: &[u8], msg: &[u8]) -> Option<[u8; 64]> {
    use ed25519_dalek::Signer;
    let seed: &[u8; 32] = seed.try_into().ok()?;
    let sk = ed25519_dalek::SigningKey::from_bytes(seed);
    Some(sk.sign(msg).to_bytes())
}

/// Ed25519 public key of a 32-byte seed credential.
pub fn ed25519_public(seed: &[u8]) -> Option<[u8; 32]> {
    let seed: &[u8; 32] = seed.try_into().ok()?;
    Some(
        ed25519_dalek::SigningKey::from_bytes(seed)
            .verifying_key()
            .to_bytes(),
    )
}

/// AES-256-GCM seal with a random nonce: `nonce ‖ ciphertext ‖ tag`.
pub fn aead_seal(key: &[u8], aad: &[u8], pt: &[u8]) -> Option<Vec<u8>> {
    let c = Aes256Gcm::new_from_slice(key).ok()?;
    let mut n = [0u8; 12];
    fill_random(&mut n);
    let ct = c
        .encrypt(Nonce::from_slice(&n), Payload { msg: pt, aad })
        .ok()?;
    let mut out = Vec::with_capacity(12 + ct.len());
    out.extend_from_slice(&n);
    out.extend_from_slice(&ct);
    Some(out)
}

/// AES-256-GCM open of `nonce ‖ ciphertext ‖ tag`.
pub fn aead_open(key: &[u8], aad: &[u8], data: &[u8]) -> Option<Vec<u8>> {
    let c = Aes256Gcm::new_from_slice(key).ok()?;
    let (n, ct) = (data.get(..12)?, data.get(12..)?);
    c.decrypt(Nonce::from_slice(n), Payload { msg: ct, aad })
        .ok()
}

/// Keys and credentials of this bubble.
pub struct Keys {
    rng: RdRand,
    kem: KemKeyPair,
    sig: SigningKeyPair,
    creds: BTreeMap<String, SecretBytes>,
    next_call_id: u64,
    /// Sequence numbers of sealed inputs still accepted.
    replay: bubble_abi::ReplayWindow,
    /// Sealed sessions.
    sessions: crate::sessions::Sessions,
}

/// The code a credential or sealed input is bound to: the bubble's current
/// portions digest and policy digest.
pub struct CodeDigests {
    /// Portions digest (zero: none loaded).
    pub portions: [u8; 48],
    /// Policy digest (zero: default policy).
    pub policy: [u8; 32],
}

/// Why an op on keys failed (text is safe to return: never secret).
pub type OpError = (u16, &'static str);

impl Keys {
    /// Generates the bubble's key pairs.
    pub fn generate() -> Option<Self> {
        let mut rng = RdRand::new()?;
        let kem = KemKeyPair::generate(&mut rng);
        let sig = SigningKeyPair::generate(&mut rng);
        Some(Self {
            rng,
            kem,
            sig,
            creds: BTreeMap::new(),
            next_call_id: 1,
            replay: bubble_abi::ReplayWindow::new(),
            sessions: crate::sessions::Sessions::new(),
        })
    }

    /// X25519 public key.
    pub fn kem_public(&self) -> [u8; 32] {
        self.kem.public_key()
    }

    /// Ed25519 public key.
    pub fn sig_public(&self) -> [u8; 32] {
        self.sig.public_key()
    }

    /// Opens a credential sealed to this bubble and its current code (the
    /// AAD binds bubble id, name, portions digest and policy digest) and
    /// keeps it under `name`.
    pub fn provision(
        &mut self,
        bubble_id: &str,
        name: &str,
        sealed: &[u8],
        code: &CodeDigests,
    ) -> Result<(), OpError> {
        use bubble_abi::code::{BAD_INPUT, STATE};
        // A name, once provisioned, keeps its value: a parent cannot swap in
        // a key of its choice under a name a portion is granted.
        if self.creds.contains_key(name) {
            return Err((
                STATE,
                "credential already provisioned; names cannot be replaced",
            ));
        }
        if self.creds.len() >= MAX_CREDENTIALS {
            return Err((BAD_INPUT, "too many credentials"));
        }
        let aad = bubble_keys::credential_aad(bubble_id, name, &code.portions, &code.policy);
        let secret = self.open(
            sealed,
            bubble_keys::INFO_CREDENTIAL,
            &aad,
            "sealed credential does not open for this bubble, name, portions and policy",
        )?;
        if secret.len() > MAX_CREDENTIAL_LEN {
            return Err((BAD_INPUT, "credential too long"));
        }
        self.creds.insert(String::from(name), secret);
        Ok(())
    }

    /// Opens the sealed input of a `portion_sealed` call: refuses a
    /// sequence number the replay window has seen, opens the box (AAD:
    /// bubble id, portion, function, seq), and only then records `seq`.
    pub fn open_input(
        &mut self,
        c: &bubble_abi::ops::SealedPortionCall<'_>,
    ) -> Result<SecretBytes, OpError> {
        const REPLAYED: OpError = (
            bubble_abi::code::REPLAY,
            "sealed input sequence number already used",
        );
        self.replay.check(c.seq).map_err(|_| REPLAYED)?;
        let aad = bubble_keys::sealed_input_aad(c.bubble_id, c.portion, c.function, c.seq);
        let input = self.open(
            c.sealed,
            bubble_keys::INFO_SEALED_INPUT,
            &aad,
            "sealed input does not open for this bubble, portion, function and sequence number",
        )?;
        self.replay.accept(c.seq).map_err(|_| REPLAYED)?;
        Ok(input)
    }

    /// Opens the session of a `portion_session` call from its setup (see
    /// [`crate::sessions::Sessions::setup`]); `true` if opened now.
    pub fn session_setup(
        &mut self,
        c: &bubble_abi::SessionCall<'_>,
        code: &CodeDigests,
    ) -> Result<bool, OpError> {
        self.sessions.setup(&self.kem, c, code)
    }

    /// Opens a `portion_session` call's input (see
    /// [`crate::sessions::Sessions::open_input`]).
    pub fn session_input(
        &mut self,
        c: &bubble_abi::SessionCall<'_>,
    ) -> Result<SecretBytes, OpError> {
        self.sessions.open_input(c)
    }

    /// Decodes a sealed box and opens it with the bubble's KEM key;
    /// `refusal` is the NOT_OPENED text when it does not open.
    fn open(
        &self,
        sealed: &[u8],
        info: &[u8],
        aad: &[u8],
        refusal: &'static str,
    ) -> Result<SecretBytes, OpError> {
        use bubble_abi::code::{BAD_INPUT, NOT_OPENED};
        let sealed = SealedBox::decode(sealed).map_err(|_| (BAD_INPUT, "malformed sealed box"))?;
        bubble_keys::open_credential(&self.kem, &sealed, info, aad)
            .map_err(|_| (NOT_OPENED, refusal))
    }

    /// HMAC-SHA256 of `data` under the credential `name`.
    pub fn hmac(&self, name: &str, data: &[u8]) -> Result<[u8; 32], OpError> {
        let key = self
            .creds
            .get(name)
            .ok_or((bubble_abi::code::BAD_INPUT, "no such credential"))?;
        Ok(hmac_sha256(key.expose(), data))
    }

    /// Signs (and optionally seals) a call's result; returns the encoded
    /// `bubble_abi::ops::SignedResult`.
    pub fn sign_result(
        &mut self,
        bubble_id: &str,
        input: &[u8],
        output: &[u8],
        seal_to: Option<&[u8; 32]>,
    ) -> Result<Vec<u8>, OpError> {
        let call_id = self.next_call_id;
        self.next_call_id += 1;
        let r = bubble_keys::produce_result(
            &mut self.rng,
            &self.sig,
            bubble_id,
            call_id,
            input,
            output,
            seal_to,
        )
        .map_err(|_| {
            (
                bubble_abi::code::BAD_INPUT,
                "cannot seal to that public key",
            )
        })?;
        Ok(bubble_abi::ops::SignedResult {
            call_id: r.call_id,
            sealed: r.sealed,
            signature: r.signature,
            output: &r.output,
        }
        .encode())
    }
}
