//! RFC 9180 test vectors (Appendix A.1.1 and A.2.1) and the CFRG vector
//! for our default suite, as hex strings. The key schedule's `key` and
//! `base_nonce` are not listed: `ct0` and `ct1` (sequence numbers 0 and 1)
//! pin both.

use super::AeadId;

/// One base-mode vector of RFC 9180 (DHKEM(X25519, HKDF-SHA256),
/// HKDF-SHA256) with its first two encryptions.
pub(super) struct Vector {
    pub(super) aead: AeadId,
    pub(super) info: &'static str,
    pub(super) ikm_r: &'static str,
    pub(super) ikm_e: &'static str,
    pub(super) sk_rm: &'static str,
    pub(super) pk_rm: &'static str,
    pub(super) pk_em: &'static str,
    pub(super) shared_secret: &'static str,
    pub(super) pt: &'static str,
    pub(super) aad0: &'static str,
    pub(super) ct0: &'static str,
    /// Sequence 1: nonce = base_nonce XOR 1 (checks the nonce handling
    /// of the key schedule outputs; our API only uses sequence 0).
    pub(super) aad1: &'static str,
    pub(super) ct1: &'static str,
}

pub(super) const INFO: &str = "4f6465206f6e2061204772656369616e2055726e";
pub(super) const PT: &str = "4265617574792069732074727574682c20747275746820626561757479";

/// RFC 9180 Appendix A.1.1: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256,
/// AES-128-GCM, base mode.
pub(super) const A1: Vector = Vector {
    aead: AeadId::Aes128Gcm,
    info: INFO,
    ikm_r: "6db9df30aa07dd42ee5e8181afdb977e538f5e1fec8a06223f33f7013e525037",
    ikm_e: "7268600d403fce431561aef583ee1613527cff655c1343f29812e66706df3234",
    sk_rm: "4612c550263fc8ad58375df3f557aac531d26850903e55a9f23f21d8534e8ac8",
    pk_rm: "3948cfe0ad1ddb695d780e59077195da6c56506b027329794ab02bca80815c4d",
    pk_em: "37fda3567bdbd628e88668c3c8d7e97d1d1253b6d4ea6d44c150f741f1bf4431",
    shared_secret: "fe0e18c9f024ce43799ae393c7e8fe8fce9d218875e8227b0187c04e7d2ea1fc",
    pt: PT,
    aad0: "436f756e742d30",
    ct0:
        "f938558b5d72f1a23810b4be2ab4f84331acc02fc97babc53a52ae8218a355a96d8770ac83d07bea87e13c512a",
    aad1: "436f756e742d31",
    ct1:
        "af2d7e9ac9ae7e270f46ba1f975be53c09f8d875bdc8535458c2494e8a6eab251c03d0c22a56b8ca42c2063b84",
};

/// RFC 9180 Appendix A.2.1: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256,
/// ChaCha20-Poly1305, base mode.
pub(super) const A2: Vector = Vector {
    aead: AeadId::ChaCha20Poly1305,
    info: INFO,
    ikm_r: "1ac01f181fdf9f352797655161c58b75c656a6cc2716dcb66372da835542e1df",
    ikm_e: "909a9b35d3dc4713a5e72a4da274b55d3d3821a37e5d099e74a647db583a904b",
    sk_rm: "8057991eef8f1f1af18f4a9491d16a1ce333f695d4db8e38da75975c4478e0fb",
    pk_rm: "4310ee97d88cc1f088a5576c77ab0cf5c3ac797f3d95139c6c84b5429c59662a",
    pk_em: "1afa08d3dec047a643885163f1180476fa7ddb54c6a8029ea33f95796bf2ac4a",
    shared_secret: "0bbe78490412b4bbea4812666f7916932b828bba79942424abb65244930d69a7",
    pt: PT,
    aad0: "436f756e742d30",
    ct0:
        "1c5250d8034ec2b784ba2cfd69dbdb8af406cfe3ff938e131f0def8c8b60b4db21993c62ce81883d2dd1b51a28",
    aad1: "436f756e742d31",
    ct1:
        "6b53c051e4199c518de79594e1c4ab18b96f081549d45ce015be002090bb119e85285337cc95ba5f59992dc98c",
};

/// The CFRG HPKE test vectors (the RFC's companion JSON): base mode,
/// DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM: our default.
pub(super) const CFRG_AES256: Vector = Vector {
    aead: AeadId::Aes256Gcm,
    info: INFO,
    ikm_r: "dac33b0e9db1b59dbbea58d59a14e7b5896e9bdf98fad6891e99d1686492b9ee",
    ikm_e: "2cd7c601cefb3d42a62b04b7a9041494c06c7843818e0ce28a8f704ae7ab20f9",
    sk_rm: "497b4502664cfea5d5af0b39934dac72242a74f8480451e1aee7d6a53320333d",
    pk_rm: "430f4b9859665145a6b1ba274024487bd66f03a2dd577d7753c68d7d7d00c00c",
    pk_em: "6c93e09869df3402d7bf231bf540fadd35cd56be14f97178f0954db94b7fc256",
    shared_secret: "3101c54c3a4f87439eaac080699ed9bbcc726ffe44e860c0424ccb7e3e2ead7b",
    pt: PT,
    aad0: "436f756e742d30",
    ct0:
        "e5d84cd531cfb583096e7cfa9641bd3079cf3a91cda813c52deb5f512be9931980a41de125a925cdad859d5b7a",
    aad1: "",
    ct1: "",
};
