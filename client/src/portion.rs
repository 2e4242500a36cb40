//! Portion calls and signed calls: how the input travels (plaintext,
//! single-shot sealed, or in the handle's sealed session) and the
//! verification of the signed result.

use bubble_keys::{KemKeyPair, OsRng, SecretBytes};
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
        // A session the bubble no longer holds (evicted by newer ones) is
        // refused before the call runs: open a new one and retry once.
        match self
            .call_signed_once(portion, op, input, mode, open_with)
            .await
        {
            Err(ClientError::SessionRefused(_)) if mode == InputMode::Session => {
                self.call_signed_once(portion, op, input, mode, open_with)
                    .await
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
        open_with: Option<&KemKeyPair>,
    ) -> Result<SecretBytes, ClientError> {
        let keys = self.keys.ok_or(ClientError::NotAttested)?;
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
                seal_to: open_with
                    .map(|k| k.public_key().to_vec())
                    .unwrap_or_default(),
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
        bubble_keys::verify_and_open_result(
            &keys.sig_pk,
            &self.id,
            r.call_id,
            &signed_input,
            &r.output,
            &r.signature,
            open_with,
        )
        .map_err(|e| ClientError::BadResult(e.to_string()))
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
