//! What a bubble runs on a `portion_session` call, as the guest runs it:
//! the frame decoder, the setup's sealed box (HPKE open with the AAD the
//! frame names, a fixed key pair), the AES-GCM open under a fixed session
//! key, and the per-session sequence window checked against a plain model.
//! Nothing may panic; a decoded frame re-encodes byte for byte; nothing
//! forged opens; the window accepts exactly what the model accepts.
#![no_main]

use std::collections::BTreeSet;
use std::sync::OnceLock;

use bubble_abi::session::{SeqWindow, SessionCall, SESSION_WINDOW};
use bubble_keys::{session_aad, session_call_aad, KemKeyPair, OsRng, SealedBox, SessionKey};
use libfuzzer_sys::fuzz_target;

fn fixed() -> &'static (KemKeyPair, SessionKey) {
    static K: OnceLock<(KemKeyPair, SessionKey)> = OnceLock::new();
    K.get_or_init(|| {
        let kem = KemKeyPair::derive(&[7u8; 32]).expect("32 bytes of ikm");
        let aad = session_aad("b-fuzz", &kem.public_key(), &[0; 48], &[0; 32], 1);
        let (key, _) = SessionKey::generate_sealed(&mut OsRng, &kem.public_key(), &aad)
            .expect("seals to a valid key");
        (kem, key)
    })
}

fuzz_target!(|data: &[u8]| {
    let (kem, key) = fixed();
    if let Ok(c) = SessionCall::decode(data) {
        assert_eq!(c.encode().expect("re-encodes"), data);
        if let Ok(b) = SealedBox::decode(c.setup) {
            let aad = session_aad(c.bubble_id, &kem.public_key(), &[0; 48], &[0; 32], c.session_id);
            assert!(SessionKey::open_setup(kem, &b, &aad).is_err());
        }
        let aad = session_call_aad(c.bubble_id, c.portion, c.function, c.session_id, c.seq);
        assert!(key.open(c.seq, &aad, c.ciphertext).is_err());
    }
    // The window against a model: each 3-byte step moves a cursor by up to
    // ±2^15 and offers the number under it.
    let (mut w, mut seen, mut highest) = (SeqWindow::new(), BTreeSet::new(), 0u64);
    let mut at: u64 = 1 << 20;
    for step in data.chunks_exact(3) {
        let delta = i64::from(i16::from_le_bytes([step[0], step[1]]));
        at = at.saturating_add_signed(delta * i64::from(step[2] % 4 + 1));
        let model_ok = at != 0 && !seen.contains(&at) && at + SESSION_WINDOW > highest;
        assert_eq!(w.check(at).is_ok(), model_ok, "check {at}");
        assert_eq!(w.accept(at).is_ok(), model_ok, "accept {at}");
        if model_ok {
            seen.insert(at);
            highest = highest.max(at);
        }
        assert_eq!(w.highest(), highest);
    }
});
