//! A bubble's lifecycle: the only way its [`State`] changes.
//!
//! ```text
//!  BOOTING ──Booted──▶ READY ──CallBegan──▶ BUSY
//!                      ▲   │ ◀──CallEnded──
//!               Thawed │   │ Froze
//!                      │   ▼
//!                    SUSPENDED
//!
//!  Failed:  BOOTING | READY | BUSY        ──▶ FAILED
//!  Deleted: every state but DELETED       ──▶ DELETED
//!  Adopted: BOOTING | READY | BUSY        ──▶ READY   (broker restart)
//! ```
//!
//! [`apply`] is a total function of (state, step): every pair not listed is
//! refused with [`Illegal`], so a step that arrives late (a call ending
//! after its bubble failed, a second restore after the first one won, a
//! VMM's failure notice after its bubble was suspended) changes nothing.
//! BUSY exists only while a call holds its bubble's permit (see
//! [`super::table`]); it is never persisted.

pub use crate::store::registry::State;

/// Something that happens to a bubble.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Step {
    /// The guest answered READY after a cold boot.
    Booted,
    /// A restarted broker found the bubble's VMM running and ready.
    Adopted,
    /// A call took the bubble's permit.
    CallBegan,
    /// That call ended (with any answer that leaves the bubble usable).
    CallEnded,
    /// The bubble's frozen copy is durable; its VMM may stop.
    Froze,
    /// A frozen copy runs again in a new VMM.
    Thawed,
    /// The bubble died (its VMM or guest failed, or it was lost).
    Failed,
    /// The owner (or an idle policy) deleted it.
    Deleted,
}

impl Step {
    /// Every step, for exhaustive tests.
    pub const ALL: [Step; 8] = [
        Step::Booted,
        Step::Adopted,
        Step::CallBegan,
        Step::CallEnded,
        Step::Froze,
        Step::Thawed,
        Step::Failed,
        Step::Deleted,
    ];
}

/// A step that the bubble's state does not allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{step:?} is not allowed while the bubble is {}", name(*from))]
pub struct Illegal {
    /// The state the bubble is in.
    pub from: State,
    /// The refused step.
    pub step: Step,
}

/// The state after `step`, or [`Illegal`].
pub fn apply(from: State, step: Step) -> Result<State, Illegal> {
    use State as S;
    use Step as E;
    let to = match (from, step) {
        (S::Booting, E::Booted) => S::Ready,
        (S::Booting | S::Ready | S::Busy, E::Adopted) => S::Ready,
        (S::Ready, E::CallBegan) => S::Busy,
        (S::Busy, E::CallEnded) => S::Ready,
        (S::Ready, E::Froze) => S::Suspended,
        (S::Suspended, E::Thawed) => S::Ready,
        (S::Booting | S::Ready | S::Busy, E::Failed) => S::Failed,
        (S::Booting | S::Ready | S::Busy | S::Suspended | S::Failed, E::Deleted) => S::Deleted,
        (S::Booting, E::CallBegan | E::CallEnded | E::Froze | E::Thawed)
        | (S::Ready, E::Booted | E::CallEnded | E::Thawed)
        | (S::Busy, E::Booted | E::CallBegan | E::Froze | E::Thawed)
        | (
            S::Suspended,
            E::Booted | E::Adopted | E::CallBegan | E::CallEnded | E::Froze | E::Failed,
        )
        | (S::Failed, _)
        | (S::Deleted, _) => return Err(Illegal { from, step }),
    };
    Ok(to)
}

/// The state's name as users see it.
pub fn name(s: State) -> &'static str {
    match s {
        State::Booting => "BOOTING",
        State::Ready => "READY",
        State::Busy => "BUSY",
        State::Suspended => "SUSPENDED",
        State::Failed => "FAILED",
        State::Deleted => "DELETED",
    }
}

/// Every state, for exhaustive tests and metrics.
pub const STATES: [State; 6] = [
    State::Booting,
    State::Ready,
    State::Busy,
    State::Suspended,
    State::Failed,
    State::Deleted,
];

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole table, written out: any change to `apply` must change it.
    #[test]
    fn every_pair_is_decided_as_specified() {
        use State as S;
        use Step as E;
        let allowed = [
            (S::Booting, E::Booted, S::Ready),
            (S::Booting, E::Adopted, S::Ready),
            (S::Ready, E::Adopted, S::Ready),
            (S::Busy, E::Adopted, S::Ready),
            (S::Ready, E::CallBegan, S::Busy),
            (S::Busy, E::CallEnded, S::Ready),
            (S::Ready, E::Froze, S::Suspended),
            (S::Suspended, E::Thawed, S::Ready),
            (S::Booting, E::Failed, S::Failed),
            (S::Ready, E::Failed, S::Failed),
            (S::Busy, E::Failed, S::Failed),
            (S::Booting, E::Deleted, S::Deleted),
            (S::Ready, E::Deleted, S::Deleted),
            (S::Busy, E::Deleted, S::Deleted),
            (S::Suspended, E::Deleted, S::Deleted),
            (S::Failed, E::Deleted, S::Deleted),
        ];
        let mut n = 0;
        for from in STATES {
            for step in Step::ALL {
                let want = allowed
                    .iter()
                    .find(|(f, s, _)| *f == from && *s == step)
                    .map(|(_, _, to)| *to);
                match (apply(from, step), want) {
                    (Ok(to), Some(w)) => {
                        assert_eq!(to, w, "{from:?} + {step:?}");
                        n += 1;
                    }
                    (Err(e), None) => {
                        assert_eq!(e, Illegal { from, step });
                        assert!(e.to_string().contains(name(from)));
                    }
                    (got, want) => panic!("{from:?} + {step:?}: got {got:?}, want {want:?}"),
                }
            }
        }
        assert_eq!(n, allowed.len());
    }

    #[test]
    fn terminal_states_accept_nothing_but_deletion_of_failed() {
        for step in Step::ALL {
            assert!(apply(State::Deleted, step).is_err());
            assert_eq!(
                apply(State::Failed, step).is_ok(),
                step == Step::Deleted,
                "{step:?}"
            );
        }
    }

    #[test]
    fn a_suspended_bubble_takes_no_call_and_cannot_fail_by_notice() {
        // A call queued behind a suspend, or the old VMM's exit notice,
        // must leave the frozen bubble as it is.
        assert!(apply(State::Suspended, Step::CallBegan).is_err());
        assert!(apply(State::Suspended, Step::Failed).is_err());
        // A second restore of the same generation finds it READY.
        assert!(apply(State::Ready, Step::Thawed).is_err());
        // A suspend while a call runs is refused (the permit prevents it).
        assert!(apply(State::Busy, Step::Froze).is_err());
    }
}
