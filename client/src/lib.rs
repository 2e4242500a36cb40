//! Parent-side library for bubbles.
//!
//! A parent connects to its host's `bubbled`, creates (or attaches) a
//! bubble, loads its portions, learns the bubble's public keys and code
//! digests from a verified attestation (which freezes its code), seals
//! credentials to the bubble and that code (HPKE, RFC 9180 base mode; the
//! broker relays only ciphertext), and calls it, verifying each result's
//! Ed25519 signature and optionally opening results sealed to the parent's
//! own key. Portion calls encrypt their input to the bubble by default, in
//! a sealed session (one HPKE setup per handle, then AES-256-GCM per call;
//! the broker sees ciphertext only; the bubble refuses a replayed call).
//!
//! ```no_run
//! # async fn demo() -> Result<(), bubble_client::ClientError> {
//! use bubble_client::Parent;
//! let parent = Parent::connect_unix("/var/lib/bubbled/bubbled.sock".as_ref()).await?;
//! let mut bubble = parent.create(64).await?;
//! // The launch digest `bubblectl measure` prints for the image.
//! let measurement = [0u8; 48];
//! let expect = bubble_client::Expectations::new(measurement, bubble.id(), "uid:1000").allow_sim();
//! let operator_ark = std::fs::read("/var/lib/bubbled/psp/ark.der").unwrap();
//! // Load the code first: attesting (or provisioning) freezes it.
//! bubble.attest(&expect, Some(&operator_ark)).await?;
//! bubble.provision("tokenization_key", b"secret bytes").await?;
//! let token = bubble.call_verified("hmac", b"\x10tokenization_key4111111111111111").await?;
//! # let _ = token; Ok(()) }
//! ```

#![forbid(unsafe_code)]

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

pub mod attest;
pub mod connect;
mod portion;
mod session;

pub use attest::{verify_attestation, Attested, Expectations};
use bubble_keys::{KemKeyPair, OsRng, SecretBytes};
use bubble_proto::v1 as pb;
pub use connect::{connect_tls, connect_tls_named, connect_unix, Client, ConnectError};
use portion::InputMode;
pub use portion::{PortionHandle, SealedResult};

/// Errors of the client library.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The broker could not be reached.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The broker refused the request.
    #[error("broker: {code:?}: {message}")]
    Status {
        /// gRPC code.
        code: tonic::Code,
        /// Message.
        message: String,
    },
    /// The bubble's keys are not known (attest first).
    #[error("the bubble's keys are not trusted yet: attest it first")]
    NotAttested,
    /// A result's signature or sealing did not verify.
    #[error("result does not verify: {0}")]
    BadResult(String),
    /// Sealing failed.
    #[error("sealing failed: {0}")]
    Seal(String),
    /// The bubble answered something malformed.
    #[error("malformed answer: {0}")]
    Malformed(&'static str),
    /// The attestation was refused (chain, signature, policy or binding).
    #[error("attestation refused: {0}")]
    Attestation(String),
    /// The bubble does not hold the call's sealed session (evicted, never
    /// opened, or its id used before); the call did not run.
    #[error("sealed session refused: {0}")]
    SessionRefused(String),
    /// The portion awaits an event: the bubble is frozen with the call
    /// pending, so there is no result (nor signature) yet. An event with
    /// `key` on one of the parent's triggers resumes it; its signed answer
    /// is then that event's result (docs/awaits.md).
    #[error("the call awaits the event {key:?} (bubble frozen at generation {generation}; times out at {deadline_ms} ms)")]
    Awaiting {
        /// The key the portion awaits.
        key: String,
        /// When the await times out, Unix ms.
        deadline_ms: u64,
        /// The frozen generation.
        generation: u64,
    },
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        let session = s.metadata().get(bubble_proto::SESSION_REFUSED_KEY);
        if s.code() == tonic::Code::FailedPrecondition
            && session.is_some_and(|v| v == bubble_proto::SESSION_REFUSED_VALUE)
        {
            return ClientError::SessionRefused(s.message().to_string());
        }
        ClientError::Status {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}

/// A bubble's public keys, as bound by its attestation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BubbleKeys {
    /// X25519 HPKE public key (credentials are sealed to it).
    pub kem_pk: [u8; 32],
    /// Ed25519 public key (results are signed with it).
    pub sig_pk: [u8; 32],
}

/// The code a bubble runs, as its attestation binds it: credentials are
/// sealed to it and open for no other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodeBinding {
    /// The portions digest (zero: no portion loaded).
    pub portions_digest: [u8; 48],
    /// The security-policy digest (zero: the default policy).
    pub policy_digest: [u8; 32],
}

/// A parent's connection to its broker.
#[derive(Clone)]
pub struct Parent {
    client: Client,
}

impl Parent {
    /// Connects over the broker's Unix socket.
    pub async fn connect_unix(path: &Path) -> Result<Self, ClientError> {
        Ok(Self {
            client: connect::connect_unix(path).await?,
        })
    }

    /// Connects with mutual TLS.
    pub async fn connect_tls(
        url: &str,
        ca: &Path,
        cert: &Path,
        key: &Path,
    ) -> Result<Self, ClientError> {
        Ok(Self {
            client: connect::connect_tls(url, ca, cert, key).await?,
        })
    }

    /// Wraps an existing gRPC client.
    pub fn from_client(client: Client) -> Self {
        Self { client }
    }

    /// The raw gRPC client.
    pub fn grpc(&self) -> Client {
        self.client.clone()
    }

    /// Creates a bubble with `memory_mib` of memory.
    pub async fn create(&self, memory_mib: u32) -> Result<Bubble, ClientError> {
        let b = self
            .client
            .clone()
            .create_bubble(pb::CreateBubbleRequest {
                memory_mib,
                vcpus: 1,
                ..Default::default()
            })
            .await?
            .into_inner();
        if b.state != pb::BubbleState::Ready as i32 {
            return Err(ClientError::Status {
                code: tonic::Code::Unavailable,
                message: format!("bubble did not become ready: {}", b.failure_reason),
            });
        }
        Ok(self.bubble(&b.bubble_id))
    }

    /// A handle to an existing bubble (keys not yet trusted).
    pub fn bubble(&self, id: &str) -> Bubble {
        Bubble {
            client: self.client.clone(),
            id: id.to_string(),
            keys: None,
            code: None,
            last_seq: AtomicU64::new(0),
            session: Default::default(),
        }
    }
}

/// One of the parent's bubbles.
pub struct Bubble {
    client: Client,
    id: String,
    keys: Option<BubbleKeys>,
    code: Option<CodeBinding>,
    /// The last sealed-input sequence number used.
    last_seq: AtomicU64,
    /// The sealed session portion calls use.
    session: session::SessionSlot,
}

impl Bubble {
    /// The bubble id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The trusted keys, once attested.
    pub fn keys(&self) -> Option<BubbleKeys> {
        self.keys
    }

    /// Attests the bubble with a fresh nonce against `expect` and, if it
    /// verifies, trusts the keys its report binds.
    pub async fn attest(
        &mut self,
        expect: &Expectations,
        trusted_sim_ark: Option<&[u8]>,
    ) -> Result<Attested, ClientError> {
        use bubble_keys::RngCore;
        let mut nonce = [0u8; 32];
        OsRng.fill_bytes(&mut nonce);
        let a = self
            .client
            .clone()
            .get_attestation(pb::GetAttestationRequest {
                bubble_id: self.id.clone(),
                nonce: nonce.to_vec(),
            })
            .await?
            .into_inner();
        let att = verify_attestation(&a, &nonce, expect, trusted_sim_ark)?;
        self.keys = Some(att.keys);
        self.code = Some(CodeBinding {
            portions_digest: att.portions_digest,
            policy_digest: att.policy_digest,
        });
        Ok(att)
    }

    /// The code digests credentials are sealed to, once attested.
    pub fn code(&self) -> Option<CodeBinding> {
        self.code
    }

    /// Trusts `code` as the bubble's code digests (for credentials). Use
    /// digests a verified attestation report binds.
    pub fn trust_code(&mut self, code: CodeBinding) {
        self.code = Some(code);
    }

    /// Asks the bubble for its keys and code digests (its `attest` binding)
    /// without a report, and trusts them; like an attestation this freezes
    /// the bubble's code. The host could substitute them: for tests and
    /// trusted hosts only.
    pub async fn trust_unverified(&mut self) -> Result<(BubbleKeys, CodeBinding), ClientError> {
        use bubble_keys::RngCore;
        let mut nonce = [0u8; 32];
        OsRng.fill_bytes(&mut nonce);
        let out = self.call("attest", &nonce).await?;
        let b = bubble_abi::ops::AttestBinding::decode(&out)
            .map_err(|_| ClientError::Malformed("attest answer"))?;
        let keys = BubbleKeys {
            kem_pk: b.kem_pk,
            sig_pk: b.sig_pk,
        };
        let code = CodeBinding {
            portions_digest: b.portions_digest,
            policy_digest: b.policy_digest,
        };
        self.keys = Some(keys);
        self.code = Some(code);
        Ok((keys, code))
    }

    /// Trusts `keys` for sealing and verification. Use keys that a verified
    /// attestation report binds (see the attestation module); keys from
    /// [`Bubble::fetch_keys_unverified`] are only as trustworthy as the host.
    pub fn trust_keys(&mut self, keys: BubbleKeys) {
        self.keys = Some(keys);
    }

    /// Asks the bubble for its public keys without attestation (the host
    /// could substitute them: for tests and trusted hosts only).
    pub async fn fetch_keys_unverified(&self) -> Result<BubbleKeys, ClientError> {
        let out = self.call("keys", b"").await?;
        if out.len() != 64 {
            return Err(ClientError::Malformed("keys answer is not 64 bytes"));
        }
        let mut k = BubbleKeys {
            kem_pk: [0; 32],
            sig_pk: [0; 32],
        };
        k.kem_pk.copy_from_slice(&out[..32]);
        k.sig_pk.copy_from_slice(&out[32..]);
        Ok(k)
    }

    /// Seals `secret` to the bubble and its attested code (AAD binds bubble
    /// id, `name`, portions digest and policy digest) and provisions it; the
    /// broker only ever sees the ciphertext.
    pub async fn provision(&self, name: &str, secret: &[u8]) -> Result<(), ClientError> {
        let keys = self.keys.ok_or(ClientError::NotAttested)?;
        let code = self.code.ok_or(ClientError::NotAttested)?;
        let aad =
            bubble_keys::credential_aad(&self.id, name, &code.portions_digest, &code.policy_digest);
        let sealed = bubble_keys::seal_credential(
            &mut OsRng,
            &keys.kem_pk,
            bubble_keys::INFO_CREDENTIAL,
            &aad,
            secret,
        )
        .map_err(|e| ClientError::Seal(e.to_string()))?;
        self.client
            .clone()
            .provision_credential(pb::ProvisionCredentialRequest {
                bubble_id: self.id.clone(),
                name: name.to_string(),
                sealed: sealed.encode(),
            })
            .await?;
        Ok(())
    }

    /// Calls `op` (unsigned).
    pub async fn call(&self, op: &str, input: &[u8]) -> Result<Vec<u8>, ClientError> {
        let r = self
            .client
            .clone()
            .call(pb::CallRequest {
                bubble_id: self.id.clone(),
                op: op.to_string(),
                input: input.to_vec(),
                ..Default::default()
            })
            .await?
            .into_inner();
        Ok(r.output)
    }

    /// Calls `op` and verifies the bubble's signature over (bubble id, call
    /// id, SHA-256 of the input, output) with the attested key.
    pub async fn call_verified(&self, op: &str, input: &[u8]) -> Result<Vec<u8>, ClientError> {
        self.call_signed(op, input, None)
            .await
            .map(|s| s.expose().to_vec())
    }

    /// Calls `function` of a loaded portion with its input sealed to the
    /// bubble and verifies the bubble's signature over the result.
    pub async fn call_verified_portion(
        &self,
        portion: &str,
        function: &str,
        input: &[u8],
    ) -> Result<Vec<u8>, ClientError> {
        self.call_signed_req(portion, function, input, InputMode::Session, None)
            .await
            .map(|s| s.expose().to_vec())
    }

    /// The next sealed-input sequence number: `max(last + 1, Unix time in
    /// ns)`, so that handles of one bubble interleave by time (see
    /// `bubble_abi::replay`).
    pub fn next_seq(&self) -> u64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        let prev = self
            .last_seq
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| {
                Some(last.saturating_add(1).max(now))
            })
            .unwrap_or_else(|v| v);
        prev.saturating_add(1).max(now)
    }

    /// Seals a portion call's input to the bubble: HPKE to its attested KEM
    /// key, AAD binding bubble id, portion, function and `seq`.
    pub fn seal_input(
        &self,
        portion: &str,
        function: &str,
        seq: u64,
        input: &[u8],
    ) -> Result<pb::SealedInput, ClientError> {
        let keys = self.keys.ok_or(ClientError::NotAttested)?;
        let aad = bubble_keys::sealed_input_aad(&self.id, portion, function, seq);
        let sealed = bubble_keys::seal_credential(
            &mut OsRng,
            &keys.kem_pk,
            bubble_keys::INFO_SEALED_INPUT,
            &aad,
            input,
        )
        .map_err(|e| ClientError::Seal(e.to_string()))?;
        Ok(pb::SealedInput {
            seq,
            sealed: sealed.encode(),
        })
    }

    /// A typed handle on a loaded portion: `bubble.portion("payments").call("tokenize", pan)`.
    pub fn portion<'a>(&'a self, name: &'a str) -> PortionHandle<'a> {
        PortionHandle { bubble: self, name }
    }

    /// Loads a WebAssembly module as portion `name`; returns the bubble's
    /// new portions digest.
    pub async fn load_portion(&self, name: &str, module: &[u8]) -> Result<Vec<u8>, ClientError> {
        let r = self
            .client
            .clone()
            .load_portion(pb::LoadPortionRequest {
                bubble_id: self.id.clone(),
                name: name.to_string(),
                module: module.to_vec(),
            })
            .await?
            .into_inner();
        Ok(r.portions_digest)
    }

    /// Calls `op`, asking the bubble to seal the output to a fresh parent
    /// key, and verifies and opens the result; the broker sees only
    /// ciphertext.
    pub async fn call_sealed(&self, op: &str, input: &[u8]) -> Result<SecretBytes, ClientError> {
        let kp = KemKeyPair::generate(&mut OsRng);
        self.call_signed(op, input, Some(&kp)).await
    }

    /// Calls built-in `op`, asking the bubble to seal the output to
    /// `recipient`'s public key: verified, returned still sealed (see
    /// [`SealedResult`]).
    pub async fn call_sealed_to(
        &self,
        op: &str,
        input: &[u8],
        recipient: &[u8; 32],
    ) -> Result<SealedResult, ClientError> {
        self.call_sealed_to_req("", op, input, InputMode::Plain, recipient)
            .await
    }

    async fn call_signed(
        &self,
        op: &str,
        input: &[u8],
        open_with: Option<&KemKeyPair>,
    ) -> Result<SecretBytes, ClientError> {
        self.call_signed_req("", op, input, InputMode::Plain, open_with)
            .await
    }

    /// Deletes the bubble.
    pub async fn delete(self) -> Result<(), ClientError> {
        self.client
            .clone()
            .delete_bubble(pb::BubbleRef { bubble_id: self.id })
            .await?;
        Ok(())
    }
}
