//! Error codes of an ERROR_REPLY.

/// Why the guest refused a CALL (the `code` of an ERROR_REPLY).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// The op is not known to the guest.
    UnknownOp = 1,
    /// The input is malformed for the op.
    BadInput = 2,
    /// The guest could not complete the op.
    Internal = 3,
    /// The output would not fit the mailbox.
    TooLarge = 4,
    /// A portion used a credential its policy does not grant.
    Denied = 5,
    /// A portion call ran out of fuel.
    Fuel = 6,
    /// A portion exceeded its linear-memory limit.
    MemoryLimit = 7,
    /// A portion's output exceeded the policy's limit.
    OutputLimit = 8,
    /// A portion trapped.
    Trap = 9,
    /// A portion returned a non-zero status (refused the request).
    PortionRefused = 10,
    /// The operation is not allowed in the bubble's current state.
    State = 11,
    /// The bubble's code is frozen: a credential was provisioned or the
    /// bubble attested, so no portion may be loaded or replaced and the
    /// policy cannot change.
    Frozen = 12,
    /// A sealed input's sequence number was used already, or is at or below
    /// the bubble's replay floor.
    Replay = 13,
    /// A sealed credential or input does not open for this bubble, its code
    /// and policy, and the request it claims to be.
    NotOpened = 14,
    /// A session call names a session the bubble does not hold (never
    /// opened, or evicted by newer sessions), or a setup for a session id
    /// the bubble has seen before.
    NoSession = 15,
    /// A portion call of this bubble awaits an event: nothing but a
    /// RESUME is taken until it is resumed.
    Awaiting = 16,
    /// A RESUME came while no portion call awaits.
    NotAwaiting = 17,
    /// A portion used a credential faster than the policy's
    /// `credential_rate` allows (the token bucket of that credential is
    /// empty).
    RateLimited = 18,
}

impl ErrorCode {
    /// Every code, in numeric order.
    pub const ALL: [ErrorCode; 18] = [
        ErrorCode::UnknownOp,
        ErrorCode::BadInput,
        ErrorCode::Internal,
        ErrorCode::TooLarge,
        ErrorCode::Denied,
        ErrorCode::Fuel,
        ErrorCode::MemoryLimit,
        ErrorCode::OutputLimit,
        ErrorCode::Trap,
        ErrorCode::PortionRefused,
        ErrorCode::State,
        ErrorCode::Frozen,
        ErrorCode::Replay,
        ErrorCode::NotOpened,
        ErrorCode::NoSession,
        ErrorCode::Awaiting,
        ErrorCode::NotAwaiting,
        ErrorCode::RateLimited,
    ];

    /// The code's wire value.
    pub const fn as_u16(self) -> u16 {
        self as u16
    }

    /// The code's name in the documentation.
    pub const fn name(self) -> &'static str {
        match self {
            ErrorCode::UnknownOp => "UNKNOWN_OP",
            ErrorCode::BadInput => "BAD_INPUT",
            ErrorCode::Internal => "INTERNAL",
            ErrorCode::TooLarge => "TOO_LARGE",
            ErrorCode::Denied => "DENIED",
            ErrorCode::Fuel => "FUEL",
            ErrorCode::MemoryLimit => "MEMORY_LIMIT",
            ErrorCode::OutputLimit => "OUTPUT_LIMIT",
            ErrorCode::Trap => "TRAP",
            ErrorCode::PortionRefused => "PORTION_REFUSED",
            ErrorCode::State => "STATE",
            ErrorCode::Frozen => "FROZEN",
            ErrorCode::Replay => "REPLAY",
            ErrorCode::NotOpened => "NOT_OPENED",
            ErrorCode::NoSession => "NO_SESSION",
            ErrorCode::Awaiting => "AWAITING",
            ErrorCode::NotAwaiting => "NOT_AWAITING",
            ErrorCode::RateLimited => "RATE_LIMITED",
        }
    }

    /// What the code means.
    pub const fn meaning(self) -> &'static str {
        match self {
            ErrorCode::UnknownOp => "the op (or portion, or portion function) is not known",
            ErrorCode::BadInput => "the input is malformed for the op",
            ErrorCode::Internal => "the guest could not complete the op",
            ErrorCode::TooLarge => "the output does not fit the mailbox",
            ErrorCode::Denied => "a credential is not granted by the policy",
            ErrorCode::Fuel => "a portion call ran out of fuel",
            ErrorCode::MemoryLimit => "a portion exceeded its memory limit",
            ErrorCode::OutputLimit => "a portion's output exceeded the policy's limit",
            ErrorCode::Trap => "a portion trapped",
            ErrorCode::PortionRefused => "a portion returned a non-zero status",
            ErrorCode::State => "not allowed in the bubble's current state",
            ErrorCode::Frozen => {
                "the code is frozen (a credential was provisioned or the bubble attested): no load or policy change"
            }
            ErrorCode::Replay => "a sealed input's sequence number was used or is below the replay floor",
            ErrorCode::NotOpened => {
                "a sealed credential or input does not open for this bubble, code, policy and request"
            }
            ErrorCode::NoSession => {
                "the session is not held (never opened or evicted), or its id was used before: open a new one"
            }
            ErrorCode::Awaiting => "a portion call awaits an event: only a RESUME is taken",
            ErrorCode::NotAwaiting => "a RESUME came while no portion call awaits",
            ErrorCode::RateLimited => {
                "a portion used a credential faster than the policy's credential_rate allows"
            }
        }
    }
}

impl TryFrom<u16> for ErrorCode {
    type Error = u16;

    /// The code for a wire value; the value itself if it is unknown.
    fn try_from(v: u16) -> Result<Self, u16> {
        ErrorCode::ALL
            .iter()
            .copied()
            .find(|c| *c as u16 == v)
            .ok_or(v)
    }
}

impl From<ErrorCode> for u16 {
    fn from(c: ErrorCode) -> u16 {
        c as u16
    }
}

impl core::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{} ({})", self.name(), *self as u16)
    }
}

/// The codes as `u16` constants (for `match` on a received code).
pub mod code {
    use super::ErrorCode;

    /// [`ErrorCode::UnknownOp`].
    pub const UNKNOWN_OP: u16 = ErrorCode::UnknownOp as u16;
    /// [`ErrorCode::BadInput`].
    pub const BAD_INPUT: u16 = ErrorCode::BadInput as u16;
    /// [`ErrorCode::Internal`].
    pub const INTERNAL: u16 = ErrorCode::Internal as u16;
    /// [`ErrorCode::TooLarge`].
    pub const TOO_LARGE: u16 = ErrorCode::TooLarge as u16;
    /// [`ErrorCode::Denied`].
    pub const DENIED: u16 = ErrorCode::Denied as u16;
    /// [`ErrorCode::Fuel`].
    pub const FUEL: u16 = ErrorCode::Fuel as u16;
    /// [`ErrorCode::MemoryLimit`].
    pub const MEMORY_LIMIT: u16 = ErrorCode::MemoryLimit as u16;
    /// [`ErrorCode::OutputLimit`].
    pub const OUTPUT_LIMIT: u16 = ErrorCode::OutputLimit as u16;
    /// [`ErrorCode::Trap`].
    pub const TRAP: u16 = ErrorCode::Trap as u16;
    /// [`ErrorCode::PortionRefused`].
    pub const PORTION_REFUSED: u16 = ErrorCode::PortionRefused as u16;
    /// [`ErrorCode::State`].
    pub const STATE: u16 = ErrorCode::State as u16;
    /// [`ErrorCode::Frozen`].
    pub const FROZEN: u16 = ErrorCode::Frozen as u16;
    /// [`ErrorCode::Replay`].
    pub const REPLAY: u16 = ErrorCode::Replay as u16;
    /// [`ErrorCode::NotOpened`].
    pub const NOT_OPENED: u16 = ErrorCode::NotOpened as u16;
    /// [`ErrorCode::NoSession`].
    pub const NO_SESSION: u16 = ErrorCode::NoSession as u16;
    /// [`ErrorCode::Awaiting`].
    pub const AWAITING: u16 = ErrorCode::Awaiting as u16;
    /// [`ErrorCode::NotAwaiting`].
    pub const NOT_AWAITING: u16 = ErrorCode::NotAwaiting as u16;
    /// [`ErrorCode::RateLimited`].
    pub const RATE_LIMITED: u16 = ErrorCode::RateLimited as u16;
}
