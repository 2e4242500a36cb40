//! A merchant's checkout split in two: this process (the parent) handles
//! the order, and the credential-bearing half — card tokenization and
//! gateway request signing — runs as the `payments` portion inside a bubble
//! that only this parent can talk to. The checkout never holds either key.
//!
//! Run a broker (`bubbled --data-dir /tmp/b`), then:
//!
//! ```text
//! cargo run -p bubble-client --example checkout -- /tmp/b "$(bubblectl measure --memory-mib 32)"
//! ```
//!
//! The second argument is the launch measurement the bubble must report
//! (96 hex digits): the client refuses to attest without one.
//!
//! For the demo, a "key custodian" step in this same program seals the two
//! keys to the attested bubble; in production that is the security team or
//! the gateway, and the checkout only relays ciphertext. The order matters:
//! load the portion, attest, then provision (the bubble's code is frozen
//! from the attestation on, and the keys open only for that code).

use bubble_client::Parent;
use bubble_keys::RngCore;
use bubble_proto::v1 as pb;

const PAYMENTS_WAT: &str = include_str!("payments/payments.wat");

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let data_dir = std::path::PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "/var/lib/bubbled".into()),
    );
    let measurement: [u8; 48] = std::env::args()
        .nth(2)
        .and_then(|h| {
            let h = h.trim();
            (0..h.len())
                .step_by(2)
                .map(|i| h.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
                .collect::<Option<Vec<u8>>>()
        })
        .and_then(|v| v.try_into().ok())
        .ok_or("second argument: the expected measurement (bubblectl measure --memory-mib 32)")?;
    let parent = Parent::connect_unix(&data_dir.join("bubbled.sock")).await?;

    // 1. A bubble whose policy lets only the payments portion use the keys.
    let b = parent
        .grpc()
        .create_bubble(pb::CreateBubbleRequest {
            memory_mib: 32,
            vcpus: 1,
            policy: Some(pb::SecurityPolicy {
                credential_rate: None,
                grants: vec![pb::CredentialGrant {
                    portion: "payments".into(),
                    credentials: vec!["tokenization_key".into(), "gateway_key".into()],
                }],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut bubble = parent.bubble(&b.bubble_id);

    // 2. Load the code that will hold the keys. Attesting (or provisioning)
    // freezes it: from then on no portion can be loaded or replaced.
    let module = wat::parse_str(PAYMENTS_WAT)?;
    bubble.load_portion("payments", &module).await?;

    // 3. Attest it: the expected measurement, security policy, portions
    // and HOST_DATA of this bubble and owner (on the Unix socket the broker
    // names a parent `uid:<n>`). This host simulates the TEE: accept that
    // explicitly.
    let owner = {
        use std::os::unix::fs::MetadataExt;
        format!("uid:{}", std::fs::metadata("/proc/self")?.uid())
    };
    let expect = bubble_client::Expectations::new(measurement, bubble.id(), &owner)
        .allow_sim()
        .with_security_policy(bubble_attestation::SecurityPolicy {
            credential_rate: None,
            grants: vec![(
                "payments".into(),
                vec!["tokenization_key".into(), "gateway_key".into()],
            )],
            ..Default::default()
        })
        .with_portion("payments", &module);
    let operator_ark = std::fs::read(data_dir.join("psp/ark.der"))?;
    let att = bubble.attest(&expect, Some(&operator_ark)).await?;
    println!(
        "bubble {} attested with the payments portion (simulated TEE: {})",
        bubble.id(),
        att.simulated
    );

    // 4. Key custodian: seal the keys to the attested bubble and its code
    // (the AAD binds the portions and policy digests the report showed).
    let (mut tok, mut gw) = ([0u8; 32], [0u8; 32]);
    bubble_keys::OsRng.fill_bytes(&mut tok);
    bubble_keys::OsRng.fill_bytes(&mut gw);
    bubble.provision("tokenization_key", &tok).await?;
    bubble.provision("gateway_key", &gw).await?;
    tok.fill(0);
    gw.fill(0);

    // 5. The checkout: tokenize (the card number is encrypted for the
    // bubble in this handle's sealed session: one HPKE setup with the first
    // call, AES-256-GCM per call; the broker relays ciphertext) and get the
    // charge signed.
    let payments = bubble.portion("payments");
    let token = payments.call("tokenize", b"4111111111111111").await?;
    println!(
        "card token: {}",
        token.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    let mut charge = 1_999u64.to_le_bytes().to_vec();
    charge.extend(b"order=7;amount=19.99;currency=EUR");
    let sig = payments.call("sign_charge", &charge).await?;
    println!(
        "gateway signature: {} bytes, verified as signed by the bubble",
        sig.len()
    );
    bubble.delete().await?;
    Ok(())
}
