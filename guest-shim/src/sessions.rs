//! Sealed sessions held by the bubble (see `bubble_abi::session` and
//! `bubble_keys::session`).
//!
//! At most [`MAX_SESSIONS`] live at once; opening one more evicts the
//! session opened longest ago (its caller gets NO_SESSION and opens a new
//! one). Every session id ever opened is remembered in a
//! `bubble_abi::ReplayWindow` (the same bounded floor-and-set as
//! single-shot sealed inputs), so an evicted session can never be opened
//! again from a replayed setup: its replay window would start empty. All of
//! it is guest memory, so it is in a suspended bubble's frozen copy.

use alloc::collections::BTreeMap;

use bubble_abi::{ReplayWindow, SeqWindow, SessionCall};
use bubble_keys::{KemKeyPair, SealedBox, SecretBytes, SessionKey};

use crate::keys::{CodeDigests, OpError};

/// Most sessions a bubble holds.
pub const MAX_SESSIONS: usize = 64;

struct Session {
    key: SessionKey,
    window: SeqWindow,
    /// Opening order (smallest: opened longest ago).
    order: u64,
}

/// The bubble's sessions.
pub struct Sessions {
    live: BTreeMap<u64, Session>,
    /// Session ids ever opened.
    opened: ReplayWindow,
    next_order: u64,
}

impl Sessions {
    /// No sessions.
    pub const fn new() -> Self {
        Self {
            live: BTreeMap::new(),
            opened: ReplayWindow::new(),
            next_order: 0,
        }
    }

    /// Opens the session of a `portion_session` call from the frame's
    /// setup, if it has one and the session is not held (AAD: bubble id,
    /// our KEM key, the current code digests, session id). Returns whether
    /// a session was opened now: the caller then freezes the code.
    pub fn setup(
        &mut self,
        kem: &KemKeyPair,
        c: &SessionCall<'_>,
        code: &CodeDigests,
    ) -> Result<bool, OpError> {
        use bubble_abi::code::{BAD_INPUT, NOT_OPENED, NO_SESSION};
        const USED: OpError = (NO_SESSION, "session id used before: open a new session");
        if c.setup.is_empty() || self.live.contains_key(&c.session_id) {
            return Ok(false);
        }
        self.opened.check(c.session_id).map_err(|_| USED)?;
        let setup =
            SealedBox::decode(c.setup).map_err(|_| (BAD_INPUT, "malformed session setup"))?;
        let aad = bubble_keys::session_aad(
            c.bubble_id,
            &kem.public_key(),
            &code.portions,
            &code.policy,
            c.session_id,
        );
        let key = SessionKey::open_setup(kem, &setup, &aad).map_err(|_| {
            (
                NOT_OPENED,
                "session setup does not open for this bubble, key, portions and policy",
            )
        })?;
        self.opened.accept(c.session_id).map_err(|_| USED)?;
        self.insert(c.session_id, key);
        Ok(true)
    }

    /// Opens a `portion_session` call's input: refuses a `seq` the session
    /// has seen, decrypts (AAD: bubble id, portion, function, session id,
    /// seq), and only then records `seq`.
    pub fn open_input(&mut self, c: &SessionCall<'_>) -> Result<SecretBytes, OpError> {
        use bubble_abi::code::{NOT_OPENED, NO_SESSION, REPLAY};
        const REPLAYED: OpError = (REPLAY, "session sequence number already used or too old");
        let s = self.live.get_mut(&c.session_id).ok_or((
            NO_SESSION,
            "no such session (never opened, or evicted): open a new one",
        ))?;
        s.window.check(c.seq).map_err(|_| REPLAYED)?;
        let aad =
            bubble_keys::session_call_aad(c.bubble_id, c.portion, c.function, c.session_id, c.seq);
        let input = s.key.open(c.seq, &aad, c.ciphertext).map_err(|_| {
            (
                NOT_OPENED,
                "session input does not open for this session, bubble, portion, function and sequence number",
            )
        })?;
        s.window.accept(c.seq).map_err(|_| REPLAYED)?;
        Ok(input)
    }

    /// Adds a session, evicting the one opened longest ago beyond
    /// [`MAX_SESSIONS`].
    fn insert(&mut self, id: u64, key: SessionKey) {
        let order = self.next_order;
        self.next_order = self.next_order.wrapping_add(1);
        self.live.insert(
            id,
            Session {
                key,
                window: SeqWindow::new(),
                order,
            },
        );
        while self.live.len() > MAX_SESSIONS {
            let oldest = self
                .live
                .iter()
                .min_by_key(|(_, s)| s.order)
                .map(|(k, _)| *k);
            match oldest {
                // Dropping the session zeroizes its key schedule.
                Some(k) => drop(self.live.remove(&k)),
                None => break,
            }
        }
    }
}
