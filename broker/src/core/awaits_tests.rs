//! Unit tests of `awaits`.

use super::*;

#[test]
fn await_ids_are_per_owner_and_key() {
    assert_ne!(await_id("uid:1", "k"), await_id("uid:2", "k"));
    assert_ne!(await_id("uid:1", "k"), await_id("uid:1", "k2"));
    // The owner's length is hashed in: no ("ab","c") / ("a","bc") clash.
    assert_ne!(await_id("ab", "c"), await_id("a", "bc"));
    assert_eq!(await_id("uid:1", "k").len(), 32);
}

#[test]
fn outcomes_carry_the_signed_output_or_the_reason() {
    let ok = outcome_of(
        "b-1",
        (true, [9; 32]),
        Ok(CallOutput {
            output: b"settled".to_vec(),
            vmm_us: 1,
            signed: Some((7, vec![1; 64])),
            started: None,
        }),
    );
    let Outcome::Ok(b) = ok else { unreachable!() };
    let s = SignedOutput::decode(&b).unwrap_or_else(|| unreachable!());
    assert_eq!(
        (s.bubble_id.as_str(), s.call_id, s.output.as_slice()),
        ("b-1", 7, &b"settled"[..])
    );
    // The resumed result says it is sealed and carries the frame digest.
    assert!(s.sealed);
    assert_eq!(s.input_sha256, [9; 32]);
    assert!(matches!(
        outcome_of(
            "b",
            (false, [0; 32]),
            Err(BrokerError::GuestRefused("no".into()))
        ),
        Outcome::Refused(_)
    ));
    let long = BrokerError::BubbleFailed("x".repeat(4000));
    let Outcome::Failed(r) = outcome_of("b", (false, [0; 32]), Err(long)) else {
        unreachable!()
    };
    assert!(r.len() <= MAX_REASON_LEN.min(255));
}
