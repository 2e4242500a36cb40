//! Portion calls and signed calls: how the input travels (plaintext,
//! single-shot sealed, or in the handle's sealed session) and the
//! verification of the signed result.

use bubble_keys::{KemKeyPair, OsRng, SecretBytes};

/// Where a signed call's result is sealed.
#[derive(Clone, Copy)]
pub(crate) enum Seal<'a> {
    /// Not sealed.
    No,
    /// To this key of ours: opened once verified.
    OpenWith(&'a KemKeyPair),
    /// To someone else's public key: verified, returned still sealed.
    To(&'a [u8; 32]),
}

/// A result a bubble sealed to a public key the caller does not hold
/// (`--seal-to`): its signature was checked against the bubble's attested
/// key over exactly these bytes, and it opens only with the private key,
/// with `bubble_keys::open_result(key, bubble_id, call_id, input_sha256,
/// sealed)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedResult {
    /// The bubble that sealed and signed it.
    pub bubble_id: String,
    /// The call id the bubble chose (bound into the seal).
    pub call_id: u64,
    /// SHA-256 of what the bubble signed as the call's input (bound too).
    pub input_sha256: [u8; 32],
    /// The sealed box (bubble-keys wire format).
    pub sealed: Vec<u8>,
}
use bubble_proto::v1 as pb;

use crate::{Bubble, ClientError};

impl Bubble {
    pub(crate) async fn call_signed_req(
        &self,
        portion: &str,
        op: &str,
        input: &[u8],
        mode: InputMode,
        open_with: Option<&KemKeyPair>,
    ) -> Result<SecretBytes, ClientError> {
        let seal = open_with.map_or(Seal::No, Seal::OpenWith);
        let (r, signed_input) = self
            .call_signed_retry(portion, op, input, mode, seal)
            .await?;
        bubble_keys::verify_and_open_result(
            &self.keys.ok_or(ClientError::NotAttested)?.sig_pk,
            &self.id,
            r.call_id,
            &signed_input,
            &r.output,
            &r.signature,
            open_with,
        )
        .map_err(|e| ClientError::BadResult(e.to_string()))
    }

    /// A signed call (`portion` empty: a built-in op) whose result the
    /// bubble seals to `recipient`, a public key this client need not
    /// hold; verified, returned sealed.
    pub(crate) async fn call_sealed_to_req(
        &self,
        portion: &str,
        op: &str,
        input: &[u8],
        mode: InputMode,
        recipient: &[u8; 32],
    ) -> Result<SealedResult, ClientError> {
        let (r, signed_input) = self
            .call_signed_retry(portion, op, input, mode, Seal::To(recipient))
            .await?;
        let input_sha256 = bubble_keys::sha256(&signed_input);
        let statement = bubble_keys::ResultStatement {
            bubble_id: &self.id,
            call_id: r.call_id,
            input_sha256,
            sealed: true,
            output: &r.output,
        };
        let keys = self.keys.ok_or(ClientError::NotAttested)?;
        bubble_keys::verify_result(&keys.sig_pk, &statement, &r.signature)
            .map_err(|e| ClientError::BadResult(e.to_string()))?;
        Ok(SealedResult {
            bubble_id: self.id.clone(),
            call_id: r.call_id,
            input_sha256,
            sealed: r.output,
        })
    }

    /// [`Self::call_signed_once`], again once if the bubble no longer holds
    /// the handle's session (evicted by newer ones: refused before the
    /// call runs).
    async fn call_signed_retry(
        &self,
        portion: &str,
        op: &str,
        input: &[u8],
        mode: InputMode,
        seal: Seal<'_>,
    ) -> Result<(pb::CallResponse, Vec<u8>), ClientError> {
        match self.call_signed_once(portion, op, input, mode, seal).await {
            Err(ClientError::SessionRefused(_)) if mode == InputMode::Session => {
                self.call_signed_once(portion, op, input, mode, seal).await
            }
            r => r,
        }
    }

    async fn call_signed_once(
        &self,
        portion: &str,
        op: &str,
        input: &[u8],
        mode: InputMode,
        seal: Seal<'_>,
    ) -> Result<(pb::CallResponse, Vec<u8>), ClientError> {
        let (sealed_input, session_input) = match mode {
            _ if portion.is_empty() => (None, None),
            InputMode::Plain => (None, None),
            InputMode::SealedOnce => (
                Some(self.seal_input(portion, op, self.next_seq(), input)?),
                None,
            ),
            InputMode::Session => (None, Some(self.seal_session_input(portion, op, input)?)),
        };
        let plain = sealed_input.is_none() && session_input.is_none();
        let r = self
            .client
            .clone()
            .call(pb::CallRequest {
                bubble_id: self.id.clone(),
                op: op.to_string(),
                input: if plain { input.to_vec() } else { Vec::new() },
                sign: true,
                seal_to: match seal {
                    Seal::No => Vec::new(),
                    Seal::OpenWith(k) => k.public_key().to_vec(),
                    Seal::To(pk) => pk.to_vec(),
                },
                portion: portion.to_string(),
                sealed_input: sealed_input.clone(),
                session_input: session_input.clone(),
                ..Default::default()
            })
            .await;
        let r = match (r, &session_input) {
            (Ok(r), Some(s)) => {
                self.session_accepted(s.session_id);
                r.into_inner()
            }
            (Ok(r), None) => r.into_inner(),
            (Err(e), s) => {
                let e = ClientError::from(e);
                if let (ClientError::SessionRefused(_), Some(s)) = (&e, s) {
                    self.drop_session(s.session_id);
                }
                return Err(e);
            }
        };
        // An awaiting call has no result to verify yet.
        if let Some(w) = r.awaiting {
            return Err(ClientError::Awaiting {
                key: w.key,
                deadline_ms: w.deadline_ms,
                generation: w.generation,
            });
        }
        // For a portion call the bubble signs over the exact request it
        // ran, the portion-call frame, which binds the portion and function
        // too (and for a sealed input, the bubble id, seq and ciphertext).
        let frame = if portion.is_empty() {
            Ok(input.to_vec())
        } else if let Some(s) = &session_input {
            bubble_abi::SessionCall {
                bubble_id: &self.id,
                portion,
                function: op,
                session_id: s.session_id,
                seq: s.seq,
                setup: &s.setup,
                ciphertext: &s.ciphertext,
            }
            .encode()
        } else if let Some(s) = &sealed_input {
            bubble_abi::ops::SealedPortionCall {
                bubble_id: &self.id,
                portion,
                function: op,
                seq: s.seq,
                sealed: &s.sealed,
            }
            .encode()
        } else {
            bubble_abi::ops::PortionCall {
                portion,
                function: op,
                input,
            }
            .encode()
        };
        let signed_input = frame.map_err(|e| ClientError::BadResult(e.to_string()))?;
        Ok((r, signed_input))
    }
}

/// A loaded portion of a bubble: the parent's typed view of the
/// credential-bearing half of its program.
pub struct PortionHandle<'a> {
    pub(crate) bubble: &'a Bubble,
    pub(crate) name: &'a str,
}

impl PortionHandle<'_> {
    /// Calls `function` with `input` sealed to the bubble (the broker sees
    /// ciphertext only); the result is signed by the bubble and verified
    /// with its attested key before it is returned.
    pub async fn call(&self, function: &str, input: &[u8]) -> Result<Vec<u8>, ClientError> {
        self.bubble
            .call_verified_portion(self.name, function, input)
            .await
    }

    /// Like [`PortionHandle::call`] with the input HPKE-sealed in a single
    /// shot instead of in the handle's session: for a one-off call, it
    /// takes no session slot in the bubble (a bubble holds at most 64 and
    /// evicts the oldest).
    pub async fn call_sealed_once(
        &self,
        function: &str,
        input: &[u8],
    ) -> Result<Vec<u8>, ClientError> {
        self.bubble
            .call_signed_req(self.name, function, input, InputMode::SealedOnce, None)
            .await
            .map(|s| s.expose().to_vec())
    }

    /// Like [`PortionHandle::call`] with the input in plaintext: the broker
    /// sees it. For inputs that are not secret.
    pub async fn call_plain_input(
        &self,
        function: &str,
        input: &[u8],
    ) -> Result<Vec<u8>, ClientError> {
        self.bubble
            .call_signed_req(self.name, function, input, InputMode::Plain, None)
            .await
            .map(|s| s.expose().to_vec())
    }

    /// Like [`PortionHandle::call`], with the output sealed inside the
    /// bubble to `recipient`'s public key (another party's, or the
    /// parent's own kept elsewhere): verified, returned still sealed.
    pub async fn call_sealed_to(
        &self,
        function: &str,
        input: &[u8],
        recipient: &[u8; 32],
    ) -> Result<SealedResult, ClientError> {
        self.bubble
            .call_sealed_to_req(self.name, function, input, InputMode::Session, recipient)
            .await
    }

    /// Like [`PortionHandle::call`], with the output sealed to a fresh
    /// parent key inside the bubble too.
    pub async fn call_sealed(
        &self,
        function: &str,
        input: &[u8],
    ) -> Result<SecretBytes, ClientError> {
        let kp = KemKeyPair::generate(&mut OsRng);
        self.bubble
            .call_signed_req(self.name, function, input, InputMode::Session, Some(&kp))
            .await
    }
}

/// How a portion call's input travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum InputMode {
    /// In plaintext (the broker sees it).
    Plain,
    /// Sealed to the bubble in a single shot (one HPKE seal per call).
    SealedOnce,
    /// Encrypted under the handle's sealed session (the default for
    /// portion calls).
    Session,
}
