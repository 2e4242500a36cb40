//! The decoders a bubble runs on a sealed credential or a sealed input, as
//! the guest runs them: the `portion_sealed` frame, the sealed box inside
//! it, the replay-window check and HPKE open with the AAD the frame names
//! (a fixed key pair), and a provisioning's sealed box. Nothing may panic;
//! a decoded sealed box re-encodes byte for byte; nothing forged opens.
#![no_main]

use bubble_abi::ops::SealedPortionCall;
use bubble_abi::ReplayWindow;
use bubble_keys::{
    credential_aad, open_credential, sealed_input_aad, KemKeyPair, SealedBox, INFO_CREDENTIAL,
    INFO_SEALED_INPUT,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let kem = KemKeyPair::derive(&[7u8; 32]).expect("32 bytes of ikm");
    if let Ok(b) = SealedBox::decode(data) {
        assert_eq!(b.encode(), data);
        let aad = credential_aad("b-fuzz", "k", &[0; 48], &[0; 32]);
        assert!(open_credential(&kem, &b, INFO_CREDENTIAL, &aad).is_err());
    }
    if let Ok(c) = SealedPortionCall::decode(data) {
        assert_eq!(c.encode().expect("re-encodes"), data);
        let mut w = ReplayWindow::new();
        if w.check(c.seq).is_ok() {
            if let Ok(b) = SealedBox::decode(c.sealed) {
                let aad = sealed_input_aad(c.bubble_id, c.portion, c.function, c.seq);
                assert!(open_credential(&kem, &b, INFO_SEALED_INPUT, &aad).is_err());
            }
            assert!(w.accept(c.seq).is_ok());
            assert!(w.accept(c.seq).is_err());
        }
    }
});
