//! The RFC 9180 vectors against the `hpke` crate through this module's
//! API, and the wire format's and API's behaviour on bad input.

use super::vectors::{Vector, A1, A2, CFRG_AES256, INFO, PT};
use super::*;
use crate::test_util::{h, h32, FixedRng, TestRng};
use alloc::format;
use alloc::vec;

/// X25519 private key clamping (RFC 7748 §5), which RFC 9180 §7.1.2 asks
/// of `SerializePrivateKey`: the vectors list `skRm` unclamped.
fn clamped(mut sk: [u8; 32]) -> [u8; 32] {
    sk[0] &= 248;
    sk[31] &= 127;
    sk[31] |= 64;
    sk
}

/// The sender's context with the vector's ephemeral key: `enc` and the
/// ciphertexts of sequence numbers 0 and 1 (the second pins the nonce
/// handling of the key schedule; our API only uses sequence 0).
fn sender_sequence<A: Aead>(v: &Vector) -> ([u8; 32], Vec<u8>, Vec<u8>) {
    let pk = PublicKey::from_bytes(&h(v.pk_rm)).unwrap();
    let mut fixed = FixedRng::new(&h(v.ikm_e));
    let (enc, mut ctx) = hpke::setup_sender_with_rng::<A, HkdfSha256, Kem>(
        &OpModeS::Base,
        &pk,
        &h(v.info),
        &mut Rng010(&mut fixed),
    )
    .unwrap();
    let ct0 = ctx.seal(&h(v.pt), &h(v.aad0)).unwrap();
    let ct1 = ctx.seal(&h(v.pt), &h(v.aad1)).unwrap();
    let mut enc_bytes = [0u8; 32];
    enc.write_exact(&mut enc_bytes);
    (enc_bytes, ct0, ct1)
}

fn check_vector(v: &Vector) {
    let info = h(v.info);
    let pt = h(v.pt);
    let aad0 = h(v.aad0);

    // DeriveKeyPair(ikmR) gives the vector's receiver key pair.
    let recipient = KemKeyPair::derive(&h(v.ikm_r)).unwrap();
    assert_eq!(hex::encode(recipient.public_key()), v.pk_rm);
    assert_eq!(*recipient.secret_bytes(), clamped(h32(v.sk_rm)));

    // The public seal path, with the RNG yielding ikmE, reproduces enc
    // and the first ciphertext byte for byte.
    let pk_r = h32(v.pk_rm);
    let mut rng = FixedRng::new(&h(v.ikm_e));
    let sealed = seal_credential_with(v.aead, &mut rng, &pk_r, &info, &aad0, &pt).unwrap();
    assert_eq!(hex::encode(sealed.enc), v.pk_em);
    assert_eq!(hex::encode(&sealed.ciphertext), v.ct0);

    // The KEM's shared secret, on both sides.
    let pk = PublicKey::from_bytes(&pk_r).unwrap();
    let mut fixed = FixedRng::new(&h(v.ikm_e));
    let (shared, enc) = Kem::encap_with_rng(&pk, None, &mut Rng010(&mut fixed)).unwrap();
    assert_eq!(hex::encode(enc.to_bytes()), v.pk_em);
    assert_eq!(hex::encode(shared.0), v.shared_secret);
    let decapped = Kem::decap(&recipient.secret, None, &enc).unwrap();
    assert_eq!(decapped.0, shared.0);

    // Sequence numbers 0 and 1 of the sender's context.
    let (enc, ct0, ct1) = with_aead!(v.aead, sender_sequence(v));
    assert_eq!(hex::encode(enc), v.pk_em);
    assert_eq!(hex::encode(ct0), v.ct0);
    if !v.ct1.is_empty() {
        assert_eq!(hex::encode(ct1), v.ct1);
    }

    // The receiver opens the vector's ciphertext (decoded from wire).
    let wire = SealedBox {
        aead: v.aead,
        enc: h32(v.pk_em),
        ciphertext: h(v.ct0),
    }
    .encode();
    let parsed = SealedBox::decode(&wire).unwrap();
    let opened = open_credential(&recipient, &parsed, &info, &aad0).unwrap();
    assert_eq!(opened.expose(), &pt[..]);
}

#[test]
fn rfc9180_a1_x25519_sha256_aes128gcm() {
    check_vector(&A1);
}

#[test]
fn rfc9180_a2_x25519_sha256_chacha20poly1305() {
    check_vector(&A2);
}

#[test]
fn cfrg_vector_x25519_sha256_aes256gcm() {
    check_vector(&CFRG_AES256);
    // The default suite is AES-256-GCM: seal_credential reproduces it.
    let mut rng = FixedRng::new(&h(CFRG_AES256.ikm_e));
    let sealed = seal_credential(
        &mut rng,
        &h32(CFRG_AES256.pk_rm),
        &h(INFO),
        &h(CFRG_AES256.aad0),
        &h(PT),
    )
    .unwrap();
    assert_eq!(sealed.aead, AeadId::Aes256Gcm);
    assert_eq!(hex::encode(&sealed.ciphertext), CFRG_AES256.ct0);
}

/// The sample credential sealed to `kp`.
fn seal_sample(rng: &mut TestRng, kp: &KemKeyPair, aad: &[u8]) -> SealedBox {
    seal_credential(
        rng,
        &kp.public_key(),
        INFO_CREDENTIAL,
        aad,
        b"sk_live_secret",
    )
    .unwrap()
}

fn sample() -> (KemKeyPair, SealedBox, Vec<u8>) {
    let mut rng = TestRng::new(1);
    let kp = KemKeyPair::generate(&mut rng);
    let aad = credential_aad("bub-1234", "stripe-key", &[1; 48], &[2; 32]);
    let sealed = seal_sample(&mut rng, &kp, &aad);
    (kp, sealed, aad)
}

#[test]
fn round_trip_every_suite_and_size() {
    let mut rng = TestRng::new(2);
    let kp = KemKeyPair::generate(&mut rng);
    for aead in AeadId::ALL {
        for len in [0usize, 1, 15, 16, 17, 1000, 70_000] {
            let pt: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let sealed =
                seal_credential_with(aead, &mut rng, &kp.public_key(), b"i", b"a", &pt).unwrap();
            assert_eq!(sealed.ciphertext.len(), len + TAG_LEN);
            let wire = sealed.encode();
            assert_eq!(wire.len(), sealed.encoded_len());
            let back = SealedBox::decode(&wire).unwrap();
            assert_eq!(back, sealed);
            let opened = open_credential(&kp, &back, b"i", b"a").unwrap();
            assert_eq!(opened.expose(), &pt[..]);
        }
    }
}

#[test]
fn fresh_ephemeral_key_each_seal() {
    let (kp, a, aad) = sample();
    let mut rng = TestRng::new(99);
    let b = seal_sample(&mut rng, &kp, &aad);
    assert_ne!(a.enc, b.enc);
    assert_ne!(a.ciphertext, b.ciphertext);
}

#[test]
fn every_bit_flip_of_the_wire_encoding_is_rejected() {
    let (kp, sealed, aad) = sample();
    let wire = sealed.encode();
    for byte in 0..wire.len() {
        for bit in 0..8 {
            let mut t = wire.clone();
            t[byte] ^= 1 << bit;
            let res =
                SealedBox::decode(&t).and_then(|b| open_credential(&kp, &b, INFO_CREDENTIAL, &aad));
            let err = res.expect_err("tampered box opened");
            match byte {
                0 => assert!(matches!(err, Error::UnsupportedVersion { .. })),
                // Flipping AEAD id bits may land on another valid id: then
                // the key schedule differs and opening fails.
                1 | 2 => assert!(matches!(err, Error::UnsupportedAead(_) | Error::OpenFailed)),
                3..=34 => assert!(matches!(err, Error::OpenFailed | Error::InvalidPublicKey)),
                _ => assert_eq!(err, Error::OpenFailed),
            }
        }
    }
}

#[test]
fn wrong_aad_info_or_key_is_rejected() {
    let (kp, sealed, aad) = sample();
    assert!(open_credential(&kp, &sealed, INFO_CREDENTIAL, &aad).is_ok());
    let other_name = credential_aad("bub-1234", "other-key", &[1; 48], &[2; 32]);
    let other_bubble = credential_aad("bub-1235", "stripe-key", &[1; 48], &[2; 32]);
    let other_code = credential_aad("bub-1234", "stripe-key", &[3; 48], &[2; 32]);
    let other_policy = credential_aad("bub-1234", "stripe-key", &[1; 48], &[4; 32]);
    for bad in [
        &other_name[..],
        &other_bubble[..],
        &other_code[..],
        &other_policy[..],
        b"",
        &aad[..aad.len() - 1],
    ] {
        assert_eq!(
            open_credential(&kp, &sealed, INFO_CREDENTIAL, bad).unwrap_err(),
            Error::OpenFailed
        );
    }
    assert_eq!(
        open_credential(&kp, &sealed, b"bubble-v1 result", &aad).unwrap_err(),
        Error::OpenFailed
    );
    let other = KemKeyPair::generate(&mut TestRng::new(3));
    assert_eq!(
        open_credential(&other, &sealed, INFO_CREDENTIAL, &aad).unwrap_err(),
        Error::OpenFailed
    );
    // Same box relabelled with another AEAD.
    for aead in [AeadId::Aes128Gcm, AeadId::ChaCha20Poly1305] {
        let relabelled = SealedBox {
            aead,
            ..sealed.clone()
        };
        assert_eq!(
            open_credential(&kp, &relabelled, INFO_CREDENTIAL, &aad).unwrap_err(),
            Error::OpenFailed
        );
    }
}

#[test]
fn truncations_never_open_and_never_panic() {
    let (kp, sealed, aad) = sample();
    let wire = sealed.encode();
    for n in 0..wire.len() {
        let res = SealedBox::decode(&wire[..n])
            .and_then(|b| open_credential(&kp, &b, INFO_CREDENTIAL, &aad));
        let err = res.expect_err("truncated box opened");
        if n < SEALED_BOX_MIN_LEN {
            assert!(matches!(err, Error::Truncated { .. }), "{n}: {err:?}");
        } else {
            assert_eq!(err, Error::OpenFailed);
        }
    }
    // A struct built by hand with a too-short ciphertext.
    let short = SealedBox {
        ciphertext: vec![0; TAG_LEN - 1],
        ..sealed.clone()
    };
    assert!(matches!(
        open_credential(&kp, &short, INFO_CREDENTIAL, &aad),
        Err(Error::Truncated { .. })
    ));
    // Extra trailing bytes are part of the ciphertext and fail the tag.
    let mut long = wire.clone();
    long.push(0);
    let b = SealedBox::decode(&long).unwrap();
    assert_eq!(
        open_credential(&kp, &b, INFO_CREDENTIAL, &aad).unwrap_err(),
        Error::OpenFailed
    );
}

#[test]
fn decode_rejects_bad_headers() {
    assert!(matches!(
        SealedBox::decode(&[]),
        Err(Error::Truncated { got: 0, .. })
    ));
    let mut wire = vec![SEALED_BOX_VERSION, 0x00, 0x02];
    wire.extend_from_slice(&[9; 32 + 16]);
    assert!(SealedBox::decode(&wire).is_ok());
    wire[0] = 2;
    assert_eq!(
        SealedBox::decode(&wire).unwrap_err(),
        Error::UnsupportedVersion {
            what: "sealed box",
            version: 2
        }
    );
    wire[0] = SEALED_BOX_VERSION;
    for id in [0x0000u16, 0x0004, 0xffff] {
        wire[1..3].copy_from_slice(&id.to_be_bytes());
        assert_eq!(
            SealedBox::decode(&wire).unwrap_err(),
            Error::UnsupportedAead(id)
        );
    }
}

#[test]
fn random_garbage_never_panics() {
    let (kp, _, aad) = sample();
    let mut rng = TestRng::new(4);
    for i in 0..300 {
        let len = (rng.next_u32() % 120) as usize;
        let mut buf = vec![0u8; len];
        rng.fill_bytes(&mut buf);
        if i % 2 == 0 && !buf.is_empty() {
            buf[0] = SEALED_BOX_VERSION;
        }
        if i % 4 == 0 && buf.len() >= 3 {
            buf[1] = 0;
            buf[2] = 2;
        }
        let res =
            SealedBox::decode(&buf).and_then(|b| open_credential(&kp, &b, INFO_CREDENTIAL, &aad));
        assert!(res.is_err());
    }
}

#[test]
fn low_order_keys_are_rejected() {
    let mut rng = TestRng::new(5);
    // The identity point and another low-order point (order 8).
    let zero = [0u8; 32];
    let order8 = h32("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800");
    for pk in [zero, order8] {
        assert_eq!(
            seal_credential(&mut rng, &pk, b"", b"", b"x").unwrap_err(),
            Error::InvalidPublicKey
        );
    }
    let (kp, sealed, aad) = sample();
    let bad = SealedBox {
        enc: zero,
        ..sealed
    };
    assert_eq!(
        open_credential(&kp, &bad, INFO_CREDENTIAL, &aad).unwrap_err(),
        Error::InvalidPublicKey
    );
}

#[test]
fn key_pair_serialization_and_debug() {
    let mut rng = TestRng::new(6);
    let kp = KemKeyPair::generate(&mut rng);
    let sk = kp.secret_bytes();
    let again = KemKeyPair::from_secret_bytes(&sk).unwrap();
    assert_eq!(*again.secret_bytes(), *sk);
    assert_eq!(again.public_key(), kp.public_key());
    let d = format!("{kp:?}");
    assert!(d.contains(&hex::encode(kp.public_key())), "{d}");
    assert!(d.contains("REDACTED"));
    assert!(!d.contains(&hex::encode(*sk)), "{d}");
    assert!(!d.contains(&format!("{:?}", &sk[..4])), "{d}");
    // Distinct generations give distinct keys.
    assert_ne!(KemKeyPair::generate(&mut rng).public_key(), kp.public_key());
    assert!(KemKeyPair::derive(&[0u8; 31]).is_err());
}

#[test]
fn credential_aad_is_unambiguous() {
    let (p, q) = (&[5; 48], &[6; 32]);
    assert_ne!(
        credential_aad("ab", "c", p, q),
        credential_aad("a", "bc", p, q)
    );
    assert_ne!(
        credential_aad("", "ab", p, q),
        credential_aad("ab", "", p, q)
    );
    let aad = credential_aad("b1", "k", p, q);
    let mut want = vec![2, 0, 0, 0, 0, 0, 0, 0];
    want.extend_from_slice(b"b1");
    want.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
    want.extend_from_slice(b"k");
    want.extend_from_slice(p);
    want.extend_from_slice(q);
    assert_eq!(aad, want);
}

#[test]
fn sealed_input_aad_is_unambiguous_and_binds_every_field() {
    let base = sealed_input_aad("b1", "pay", "tok", 7);
    assert_ne!(base, sealed_input_aad("b2", "pay", "tok", 7));
    assert_ne!(base, sealed_input_aad("b1", "pax", "tok", 7));
    assert_ne!(base, sealed_input_aad("b1", "pay", "tox", 7));
    assert_ne!(base, sealed_input_aad("b1", "pay", "tok", 8));
    assert_ne!(
        sealed_input_aad("b1", "pa", "ytok", 7),
        sealed_input_aad("b1", "pay", "tok", 7)
    );
    let mut want = vec![2, 0, 0, 0, 0, 0, 0, 0];
    want.extend_from_slice(b"b1");
    want.extend_from_slice(&[3, 0, 0, 0, 0, 0, 0, 0]);
    want.extend_from_slice(b"pay");
    want.extend_from_slice(&[3, 0, 0, 0, 0, 0, 0, 0]);
    want.extend_from_slice(b"tok");
    want.extend_from_slice(&7u64.to_le_bytes());
    assert_eq!(base, want);
}

#[test]
fn aead_ids() {
    for a in AeadId::ALL {
        assert_eq!(AeadId::from_id(a.id()).unwrap(), a);
    }
    // Our ids are the `hpke` crate's (and RFC 9180's).
    assert_eq!(AeadId::Aes128Gcm.id(), AesGcm128::AEAD_ID);
    assert_eq!(AeadId::Aes256Gcm.id(), AesGcm256::AEAD_ID);
    assert_eq!(AeadId::ChaCha20Poly1305.id(), ChaCha20Poly1305::AEAD_ID);
    assert_eq!(
        [16, 32, 32],
        [
            AeadId::Aes128Gcm,
            AeadId::Aes256Gcm,
            AeadId::ChaCha20Poly1305
        ]
        .map(AeadId::key_len)
    );
}

#[test]
fn generated_key_is_the_clamped_random_bytes_and_its_public_key() {
    // The private key is the RNG's next 32 bytes, clamped; no HKDF.
    let mut want = [0u8; 32];
    TestRng::new(9).fill_bytes(&mut want);
    let kp = KemKeyPair::generate(&mut TestRng::new(9));
    assert_eq!(*kp.secret_bytes(), clamped(want));
    // Its public key is X25519(sk, 9), as a rebuild from the bytes says.
    let again = KemKeyPair::from_secret_bytes(&want).unwrap();
    assert_eq!(kp.public_key(), again.public_key());
    // And a box sealed to it opens with it.
    let aad = credential_aad("bub-9", "k", &[0; 48], &[0; 32]);
    let sealed = seal_sample(&mut TestRng::new(10), &kp, &aad);
    assert_eq!(
        open_credential(&kp, &sealed, INFO_CREDENTIAL, &aad)
            .unwrap()
            .expose(),
        b"sk_live_secret"
    );
}
