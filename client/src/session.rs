//! Sealed sessions on the parent's side: one HPKE setup per bubble handle,
//! then one AES-256-GCM seal per portion call (see `bubble_keys::session`
//! and docs/portions.md, "Sealed sessions").

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bubble_keys::{OsRng, SessionKey};
use bubble_proto::v1 as pb;

use crate::{Bubble, ClientError};

/// A handle's open session with its bubble.
pub(crate) struct ClientSession {
    id: u64,
    key: SessionKey,
    /// The setup (the session key sealed to the bubble), sent until the
    /// bubble accepted a call of this session.
    setup: Vec<u8>,
    last_seq: AtomicU64,
    accepted: AtomicBool,
}

/// The handle's current session, if any.
#[derive(Default)]
pub(crate) struct SessionSlot(Mutex<Option<Arc<ClientSession>>>);

impl Bubble {
    /// The current session, opened (locally: the setup travels with the
    /// first call) if there is none. Needs the attested keys and code.
    fn session(&self) -> Result<Arc<ClientSession>, ClientError> {
        let keys = self.keys.ok_or(ClientError::NotAttested)?;
        let code = self.code.ok_or(ClientError::NotAttested)?;
        let mut slot = self
            .session
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = slot.as_ref() {
            return Ok(s.clone());
        }
        // Numbered like sealed inputs (max(last + 1, Unix ns)): a bubble
        // opens each id once, and ids from one handle only grow.
        let id = self.next_seq();
        let aad = bubble_keys::session_aad(
            &self.id,
            &keys.kem_pk,
            &code.portions_digest,
            &code.policy_digest,
            id,
        );
        let (key, setup) = SessionKey::generate_sealed(&mut OsRng, &keys.kem_pk, &aad)
            .map_err(|e| ClientError::Seal(e.to_string()))?;
        let s = Arc::new(ClientSession {
            id,
            key,
            setup: setup.encode(),
            last_seq: AtomicU64::new(0),
            accepted: AtomicBool::new(false),
        });
        *slot = Some(s.clone());
        Ok(s)
    }

    /// Encrypts a portion call's input under the handle's session (opening
    /// one if needed): AES-256-GCM, nonce from a fresh `seq`, AAD binding
    /// bubble id, portion, function, session id and `seq`. Carries the
    /// session's setup until [`Bubble::session_accepted`] was called for
    /// it.
    pub fn seal_session_input(
        &self,
        portion: &str,
        function: &str,
        input: &[u8],
    ) -> Result<pb::SessionInput, ClientError> {
        let s = self.session()?;
        let seq = s.last_seq.fetch_add(1, Ordering::SeqCst) + 1;
        let aad = bubble_keys::session_call_aad(&self.id, portion, function, s.id, seq);
        Ok(pb::SessionInput {
            session_id: s.id,
            seq,
            ciphertext: s.key.seal(seq, &aad, input),
            setup: if s.accepted.load(Ordering::SeqCst) {
                Vec::new()
            } else {
                s.setup.clone()
            },
        })
    }

    /// Records that the bubble ran a call of session `session_id` (it holds
    /// the session): later calls leave the setup out.
    pub fn session_accepted(&self, session_id: u64) {
        let slot = self
            .session
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = slot.as_ref().filter(|s| s.id == session_id) {
            s.accepted.store(true, Ordering::SeqCst);
        }
    }

    /// Forgets session `session_id` (the bubble refused it: evicted, or
    /// never opened); the next call opens a new one.
    pub fn drop_session(&self, session_id: u64) {
        let mut slot = self
            .session
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if slot.as_ref().is_some_and(|s| s.id == session_id) {
            *slot = None;
        }
    }
}
