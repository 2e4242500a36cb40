//! The frozen-copy manifest decoder (`bubble_frozen::decode_manifest`),
//! past its authentication too: the first byte picks what the rest is.
//! - 0: the manifest's raw bytes;
//! - 1: the plaintext of the sealed header inside an otherwise valid
//!   manifest (so the header's parser and checks see arbitrary bytes);
//! - 2: the plaintext `kek` field of a valid manifest;
//! - else: a valid manifest with bytes overwritten (pairs of position,
//!   value).
//! No input may panic; a manifest that opens must name the bubble and
//! generation asked for and a chunk count that fits its length.
#![no_main]

use bubble_frozen::{decode_manifest, Manifest, CHUNK, FORMAT, HEADER_INDEX};
use bubble_keys::envelope::ChunkCipher;
use bubble_keys::{CryptoRng, DataKey, Kek, RngCore};
use libfuzzer_sys::fuzz_target;

/// A fixed "random" source: the fuzzer's runs stay reproducible.
struct Fixed(u8);
impl RngCore for Fixed {
    fn next_u32(&mut self) -> u32 {
        self.0 = self.0.wrapping_add(1);
        u32::from(self.0)
    }
    fn next_u64(&mut self) -> u64 {
        u64::from(self.next_u32())
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for b in dest {
            self.0 = self.0.wrapping_add(1);
            *b = self.0;
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), bubble_keys::rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}
impl CryptoRng for Fixed {}

const ID: &str = "b-fuzz";
const GEN: u64 = 3;

fn manifest(kek: &Kek, header: &[u8], kek_kind: &str) -> Vec<u8> {
    let sid = [7u8; bubble_keys::SNAPSHOT_ID_LEN];
    let dk = DataKey::from_bytes([9u8; 32]);
    let wrapped = bubble_keys::envelope::wrap_key_with_rng(&mut Fixed(1), kek, &dk, &sid);
    let cipher = ChunkCipher::new(&dk, &sid);
    let sealed = cipher.encrypt_with_rng(&mut Fixed(2), HEADER_INDEX, header);
    let m = Manifest {
        format: FORMAT,
        snapshot_id: hex::encode(sid),
        wrapped_key: hex::encode(wrapped),
        kek: kek_kind.into(),
        kek_id: hex::encode(kek.key_id()),
        header: hex::encode(sealed),
    };
    serde_json::to_vec(&m).unwrap_or_default()
}

fn valid_header() -> Vec<u8> {
    format!(
        r#"{{"bubble_id":"{ID}","owner":"o","generation":{GEN},"memory_mib":16,"image":"shim","total_len":5000,"chunks":1,"page_runs":[[0,1]],"kek":"broker"}}"#
    )
    .into_bytes()
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let kek = Kek::from_bytes([5u8; 32]);
    let raw = match mode {
        0 => rest.to_vec(),
        1 => manifest(&kek, rest, "broker"),
        2 => manifest(&kek, &valid_header(), &String::from_utf8_lossy(rest)),
        _ => {
            let mut m = manifest(&kek, &valid_header(), "broker");
            for pair in rest.chunks_exact(3) {
                let at = usize::from(u16::from_le_bytes([pair[0], pair[1]]));
                let n = m.len().max(1);
                if let Some(b) = m.get_mut(at % n) {
                    *b = pair[2];
                }
            }
            m
        }
    };
    if let Ok((h, _)) = decode_manifest(&raw, ID, GEN, &kek) {
        assert_eq!(h.bubble_id, ID);
        assert_eq!(h.generation, GEN);
        assert_eq!(h.chunks, h.total_len.div_ceil(CHUNK as u64));
    }
});
