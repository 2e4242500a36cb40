//! Event sources for event-driven portions.
//!
//! A *source* hands out events, each at least once, to whichever consumer
//! pulls it first; a consumer *acks* an event only after its result is
//! durable, so a consumer (or broker) that dies mid-batch leaves every
//! unacked event to be delivered again, from its last checkpoint (the
//! acked prefix), never from the start. Results are published once per
//! event key, so at-least-once delivery gives exactly-once results.
//!
//! Two sources share one interface ([`Source`], [`Delivery`], [`Results`]):
//!
//! - [`embedded::EmbeddedQueue`]: a durable queue in an embedded database
//!   (redb, fsynced commits) — the default on one machine;
//! - [`nats::NatsSource`]: NATS JetStream, a durable pull consumer shared by
//!   brokers on several hosts; JetStream gives each event to one puller at
//!   a time.
//!
//! Events wait in the source, never in a consumer's memory without bound:
//! a fetch asks for at most `max` events.

mod event;

pub mod embedded;
pub mod nats;
mod nats_dead;

pub use nats_dead::{NatsDeadLetter, MAX_LISTED};

pub use event::{
    check_subject, Completed, Delivery, EventError, EventKey, Outcome, Published, Results, Source,
    SourceEvent, MAX_KEY_LEN, MAX_PAYLOAD, MAX_REASON_LEN,
};
