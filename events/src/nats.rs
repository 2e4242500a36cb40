//! NATS JetStream as an event source: brokers on several hosts share one
//! durable pull consumer on one stream; JetStream hands each event to one
//! puller at a time and hands it out again if it is not acked within
//! `ack_wait` (a broker that died). An event is acked (and the ack
//! confirmed by the server, `double_ack`) only after its result is stored
//! in the results stream.
//!
//! - **Keys**: the publisher sets `Nats-Msg-Id` to the event key, so a
//!   publisher's retry within the stream's duplicate window is dropped by
//!   the server. An event without one gets `seq-<stream sequence>`.
//! - **Results** go to `<results_prefix>.<key>` in their own stream,
//!   published with `Nats-Expected-Last-Subject-Sequence: 0`: the server
//!   stores the first result for a key and refuses every later one (a
//!   conditional write, not a time window), which this module reports as
//!   `duplicate`.
//! - **Dead letters**: an event delivered more than `max_deliver` times is
//!   published to `<dead_letter_subject>` (with its key and the reason in
//!   headers) and terminated; the same happens on [`Delivery::dead_letter`].

use std::time::Duration;

use async_nats::header::{NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, NATS_MESSAGE_ID};
use async_nats::jetstream::consumer::{pull, AckPolicy, Consumer};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::{self, stream, Context};
use async_nats::HeaderMap;
use futures::StreamExt;
use zeroize::Zeroizing;

use crate::event::{
    check_event, check_subject, Completed, Delivery, EventError, EventKey, Outcome, Published,
    Results, Source, SourceEvent, MAX_PAYLOAD,
};

/// Header carrying a dead letter's reason.
pub const REASON_HEADER: &str = "Bubble-Dead-Reason";
/// Header carrying a dead letter's key (and a replayed event's).
pub const KEY_HEADER: &str = "Bubble-Event-Key";
/// Header carrying a dead letter's deliveries.
pub const ATTEMPTS_HEADER: &str = "Bubble-Dead-Attempts";

/// Where the stream, consumer and results live.
#[derive(Clone, Debug)]
pub struct NatsConfig {
    /// Server URL (`nats://host:port`).
    pub url: String,
    /// The events stream (created if missing).
    pub stream: String,
    /// Its subjects (`payments.>`).
    pub subjects: Vec<String>,
    /// The durable consumer every broker shares.
    pub consumer: String,
    /// Unacked for this long, an event is handed out again.
    pub ack_wait: Duration,
    /// Deliveries before an event is dead-lettered.
    pub max_deliver: u32,
    /// Where dead letters go (a subject of the dead-letter stream).
    pub dead_letter_subject: String,
    /// The results stream (created if missing).
    pub results_stream: String,
    /// Results go to `<results_prefix>.<key>`.
    pub results_prefix: String,
    /// How long the events stream drops a repeated `Nats-Msg-Id`.
    pub dedup_window: Duration,
    /// Most events the stream holds unsettled (published, not yet acked
    /// or dead-lettered): the server refuses a publish beyond it
    /// ([`EventError::Backlog`]). `None` leaves an existing stream's limit
    /// as it is (a new stream: unlimited).
    pub max_pending: Option<u64>,
}

pub(crate) fn nats_err<E: Into<Box<dyn std::error::Error + Send + Sync>>>(
    op: &'static str,
) -> impl FnOnce(E) -> EventError {
    nats(op)
}

fn nats<E: Into<Box<dyn std::error::Error + Send + Sync>>>(
    op: &'static str,
) -> impl FnOnce(E) -> EventError {
    move |e| EventError::Nats {
        op,
        source: e.into(),
    }
}

/// A connection to JetStream: the shared consumer and the results stream.
#[derive(Clone)]
pub struct NatsSource {
    js: Context,
    consumer: Consumer<pull::Config>,
    cfg: NatsConfig,
}

impl std::fmt::Debug for NatsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSource")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl NatsSource {
    pub(crate) fn js(&self) -> &Context {
        &self.js
    }

    pub(crate) fn config(&self) -> &NatsConfig {
        &self.cfg
    }

    pub(crate) fn dead_stream(&self) -> String {
        format!("{}_DEAD", self.cfg.stream)
    }

    pub(crate) fn result_subject(&self, key: &EventKey) -> String {
        format!("{}.{}", self.cfg.results_prefix, key)
    }

    /// Connects and makes sure the events stream, the dead-letter and
    /// results streams and the durable consumer exist (idempotent: every
    /// broker calls it with the same configuration).
    pub async fn connect(cfg: NatsConfig) -> Result<Self, EventError> {
        check_subject(&cfg.dead_letter_subject)?;
        check_subject(&cfg.results_prefix)?;
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .connect(cfg.url.as_str())
            .await
            .map_err(nats("connect"))?;
        let js = jetstream::new(client);
        // A work queue: an event leaves the stream when it is acked or
        // dead-lettered, so the stream's message count is the events
        // pending, and `max_messages` with `DiscardPolicy::New` makes the
        // server refuse a publish beyond the limit, exactly, whichever
        // broker publishes.
        let events_cfg = stream::Config {
            name: cfg.stream.clone(),
            subjects: cfg.subjects.clone(),
            duplicate_window: cfg.dedup_window,
            max_message_size: i32::try_from(MAX_PAYLOAD).unwrap_or(i32::MAX),
            retention: stream::RetentionPolicy::WorkQueue,
            discard: stream::DiscardPolicy::New,
            max_messages: cfg
                .max_pending
                .map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX)),
            ..Default::default()
        };
        let events = js
            .get_or_create_stream(events_cfg.clone())
            .await
            .map_err(nats("events stream"))?;
        if let Some(limit) = cfg.max_pending {
            let have = events.cached_info().config.max_messages;
            if have != i64::try_from(limit).unwrap_or(i64::MAX) {
                // Another trigger (or broker) made it with another limit:
                // the last one set holds for all.
                js.update_stream(events_cfg)
                    .await
                    .map_err(nats("events stream limit"))?;
            }
        }
        js.get_or_create_stream(stream::Config {
            name: format!("{}_DEAD", cfg.stream),
            subjects: vec![cfg.dead_letter_subject.clone()],
            ..Default::default()
        })
        .await
        .map_err(nats("dead-letter stream"))?;
        js.get_or_create_stream(stream::Config {
            name: cfg.results_stream.clone(),
            subjects: vec![format!("{}.>", cfg.results_prefix)],
            ..Default::default()
        })
        .await
        .map_err(nats("results stream"))?;
        let consumer = events
            .get_or_create_consumer(
                &cfg.consumer,
                pull::Config {
                    durable_name: Some(cfg.consumer.clone()),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: cfg.ack_wait,
                    // Dead-lettering is ours (so it is published, not just
                    // dropped): the server never gives up on its own.
                    max_deliver: -1,
                    ..Default::default()
                },
            )
            .await
            .map_err(nats("consumer"))?;
        Ok(NatsSource { js, consumer, cfg })
    }

    /// Publishes an event with its key as `Nats-Msg-Id`; refused with
    /// [`EventError::Backlog`] (nothing stored) when the stream holds
    /// `max_pending` events already.
    pub async fn publish(
        &self,
        subject: &str,
        key: &EventKey,
        payload: &[u8],
    ) -> Result<Published, EventError> {
        check_event(subject, payload)?;
        let mut h = HeaderMap::new();
        h.insert(NATS_MESSAGE_ID, key.as_str());
        let sent = self
            .js
            .publish_with_headers(subject.to_owned(), h, payload.to_vec().into())
            .await
            .map_err(nats("publish"))?
            .await;
        let ack = match sent {
            Ok(a) => a,
            Err(e) if is_full(&e) => {
                let limit = self.cfg.max_pending.unwrap_or(0);
                return Err(EventError::Backlog {
                    pending: limit,
                    limit,
                });
            }
            Err(e) => return Err(nats("publish ack")(e)),
        };
        Ok(Published {
            position: ack.sequence,
            duplicate: ack.duplicate,
        })
    }

    /// Events of the stream not yet handed to any broker: the shared
    /// consumer's `num_pending` (one JetStream API request).
    pub async fn pending(&self) -> Result<u64, EventError> {
        let mut c = self.consumer.clone();
        let info = c.info().await.map_err(nats("consumer info"))?;
        Ok(info.num_pending)
    }

    /// The stored result of `key`, if one.
    pub async fn result(&self, key: &EventKey) -> Result<Option<Outcome>, EventError> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        let stream = self
            .js
            .get_stream(&self.cfg.results_stream)
            .await
            .map_err(nats("results stream"))?;
        let subject = format!("{}.{}", self.cfg.results_prefix, key);
        match stream.get_last_raw_message_by_subject(&subject).await {
            Ok(m) => Ok(Some(Outcome::decode(&m.payload)?)),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(nats("read result")(e)),
        }
    }

    async fn to_dead_letter(
        &self,
        msg: &jetstream::Message,
        key: &EventKey,
        reason: &str,
    ) -> Result<(), EventError> {
        let (seq, attempts) = msg
            .info()
            .map(|i| (i.stream_sequence, i.delivered))
            .unwrap_or((0, 0));
        let mut h = HeaderMap::new();
        h.insert(KEY_HEADER, key.as_str());
        h.insert(REASON_HEADER, reason);
        h.insert(ATTEMPTS_HEADER, attempts.to_string().as_str());
        // Dead-lettering the same event twice (a retry after a lost ack)
        // stores it once; a replayed copy (another sequence) again.
        h.insert(NATS_MESSAGE_ID, format!("dead:{key}:{seq}").as_str());
        self.js
            .publish_with_headers(
                self.cfg.dead_letter_subject.clone(),
                h,
                msg.message.payload.clone(),
            )
            .await
            .map_err(nats("dead-letter"))?
            .await
            .map_err(nats("dead-letter ack"))?;
        msg.double_ack_with(AckKind::Term)
            .await
            .map_err(nats("term"))
    }
}

/// Whether a publish was refused because the stream is at its message
/// limit (JetStream error 10077, "maximum messages exceeded", with
/// `DiscardPolicy::New`).
fn is_full(e: &async_nats::jetstream::context::PublishError) -> bool {
    use std::error::Error as _;
    e.kind() == PublishErrorKind::Other
        && e.source()
            .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>())
            .is_some_and(|j| {
                j.error_code() == async_nats::jetstream::ErrorCode::STREAM_STORE_FAILED
            })
}

fn key_of(msg: &jetstream::Message, seq: u64) -> EventKey {
    let h = msg.message.headers.as_ref();
    // A replayed event carries its key in KEY_HEADER (its message id is
    // the replay's own).
    h.and_then(|h| h.get(KEY_HEADER).or_else(|| h.get(NATS_MESSAGE_ID)))
        .and_then(|v| EventKey::new(v.as_str()).ok())
        .unwrap_or_else(|| {
            EventKey::new(&format!("seq-{seq}")).unwrap_or_else(|_| unreachable!("a valid key"))
        })
}

impl Source for NatsSource {
    type Delivery = NatsDelivery;

    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<NatsDelivery>, EventError> {
        let mut batch = self
            .consumer
            .fetch()
            .max_messages(max.max(1))
            .expires(wait.max(Duration::from_millis(10)))
            .messages()
            .await
            .map_err(nats("fetch"))?;
        let mut out = Vec::new();
        while let Some(msg) = batch.next().await {
            let msg = msg.map_err(nats("fetch message"))?;
            let (seq, delivered) = {
                let info = msg.info().map_err(nats("message info"))?;
                (info.stream_sequence, info.delivered)
            };
            let key = key_of(&msg, seq);
            let attempt = u32::try_from(delivered).unwrap_or(u32::MAX);
            if attempt > self.cfg.max_deliver {
                self.to_dead_letter(&msg, &key, "max deliveries reached")
                    .await?;
                continue;
            }
            out.push(NatsDelivery {
                source: self.clone(),
                event: SourceEvent {
                    key,
                    subject: msg.message.subject.to_string(),
                    payload: Zeroizing::new(msg.message.payload.to_vec()),
                    attempt,
                    position: seq,
                },
                msg,
            });
        }
        Ok(out)
    }
}

/// One delivery from JetStream.
pub struct NatsDelivery {
    source: NatsSource,
    event: SourceEvent,
    msg: jetstream::Message,
}

impl std::fmt::Debug for NatsDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsDelivery")
            .field("event", &self.event)
            .finish_non_exhaustive()
    }
}

impl Delivery for NatsDelivery {
    fn event(&self) -> &SourceEvent {
        &self.event
    }

    async fn ack(self) -> Result<(), EventError> {
        self.msg.double_ack().await.map_err(nats("ack"))
    }

    async fn retry(self, delay: Duration) -> Result<(), EventError> {
        self.msg
            .double_ack_with(AckKind::Nak(Some(delay)))
            .await
            .map_err(nats("nak"))
    }

    async fn dead_letter(self, reason: &str) -> Result<(), EventError> {
        self.source
            .to_dead_letter(&self.msg, &self.event.key, reason)
            .await
    }

    /// The result (a conditional publish to the results stream, confirmed)
    /// and then the ack (confirmed): two server round trips.
    async fn complete(self, outcome: &Outcome) -> Result<Completed, (Self, EventError)> {
        let result = match self.source.publish_result(&self.event.key, outcome).await {
            Ok(r) => r,
            Err(e) => return Err((self, e)),
        };
        let acked = self.msg.double_ack().await.is_ok();
        Ok(Completed { result, acked })
    }
}

impl Results for NatsSource {
    async fn publish_result(
        &self,
        key: &EventKey,
        outcome: &Outcome,
    ) -> Result<Published, EventError> {
        outcome.check()?;
        let mut h = HeaderMap::new();
        h.insert(NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, "0");
        let subject = format!("{}.{}", self.cfg.results_prefix, key);
        let sent = self
            .js
            .publish_with_headers(subject, h, outcome.encode().into())
            .await
            .map_err(nats("publish result"))?
            .await;
        match sent {
            Ok(ack) => Ok(Published {
                position: ack.sequence,
                duplicate: false,
            }),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(Published {
                position: 0,
                duplicate: true,
            }),
            Err(e) => Err(nats("publish result ack")(e)),
        }
    }
}
