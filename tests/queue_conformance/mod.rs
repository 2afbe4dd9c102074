//! The queue conformance suite: written once, run against every `QueueBackend` (the
//! in-memory queue and SQS on a real SQS-compatible server).
//!
//! A backend's test file implements [`QueueHarness`] and calls [`queue_suite!`] (the
//! backend's SQS semantics) and [`consumer_suite!`] (the queue strategy's consumers on
//! that backend, end to end with a SQLite store).

#![allow(dead_code)]

pub mod consumer;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use root_orchestrator::{Error, OutgoingMessage, QueueBackend, QueueDepth};
use tokio::time::Instant;

/// A dead-lettered message as the harness can read it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Letter {
    pub body: String,
    /// The reason the consumer gave; `None` when the queue moved it on its own.
    pub reason: Option<String>,
    /// Deliveries before it was dead-lettered, where recorded.
    pub receive_count: Option<u32>,
}

/// Opens fresh queues on one backend; each test gets its own queue pair.
#[async_trait]
pub trait QueueHarness: Send + Sync + 'static {
    /// A new queue with a dead-letter queue, and no receive limit that a test could reach.
    async fn open(&self) -> Arc<dyn QueueBackend>;

    /// A new queue that dead-letters a message instead of delivering it more than
    /// `max_receive_count` times.
    async fn open_with_receive_limit(&self, max_receive_count: u32) -> Arc<dyn QueueBackend>;

    /// What the dead-letter queue of `queue` (opened by this harness) holds.
    async fn dead_letters(&self, queue: &Arc<dyn QueueBackend>) -> Vec<Letter>;

    /// The time unit the backend honours: delays and visibility timeouts in tests are
    /// multiples of it (SQS counts whole seconds).
    fn tick(&self) -> Duration;
}

/// Expands to one test per backend behaviour, each with a fresh harness from `$make`.
#[macro_export]
macro_rules! queue_suite {
    ($make:expr) => {
        $crate::queue_suite!(@tests $make;
            bodies_arrive_intact_with_their_message_id,
            a_received_message_is_hidden_until_its_visibility_timeout_lapses,
            deleted_messages_never_come_back,
            visibility_zero_returns_a_message_at_once_with_its_count,
            extending_visibility_keeps_a_message_hidden,
            delayed_messages_are_held_back,
            a_long_poll_returns_as_soon_as_a_message_arrives,
            receives_hand_out_batches_and_every_message_once,
            batch_calls_report_each_entry,
            dead_lettering_keeps_the_body_and_the_reason,
            redriving_returns_dead_letters_to_the_queue,
            a_receive_limit_dead_letters_instead_of_delivering,
            sizes_are_counted_in_utf8_bytes,
            depth_counts_each_state,
        );
    };
    (@tests $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let harness = $make;
                queue_conformance::$name(&harness).await;
            }
        )*
    };
}

const LONG: Duration = Duration::from_secs(60);

/// Receives until a message arrives or `within` passes.
pub async fn receive_one(
    queue: &Arc<dyn QueueBackend>,
    visibility: Duration,
    within: Duration,
) -> Option<root_orchestrator::ReceivedMessage> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let wait = left.min(Duration::from_secs(2));
        let mut got = queue.receive(1, wait, visibility).await.unwrap();
        if let Some(message) = got.pop() {
            return Some(message);
        }
        if Instant::now() >= deadline {
            return None;
        }
    }
}

pub async fn bodies_arrive_intact_with_their_message_id(h: &impl QueueHarness) {
    let queue = h.open().await;
    let body = "{\"text\": \"semaglutide é 😀 \\\"quoted\\\"\\nnext line\"}";
    let id = queue.send(body, Duration::ZERO).await.unwrap();

    let message = receive_one(&queue, LONG, Duration::from_secs(10))
        .await
        .expect("the message arrives");
    assert_eq!(message.body, body);
    assert_eq!(message.message_id, id);
    assert_eq!(message.receive_count, 1);
    assert!(!message.receipt_handle.is_empty());
}

pub async fn a_received_message_is_hidden_until_its_visibility_timeout_lapses(
    h: &impl QueueHarness,
) {
    let queue = h.open().await;
    queue.send("hidden", Duration::ZERO).await.unwrap();
    let first = receive_one(&queue, h.tick(), Duration::from_secs(10))
        .await
        .expect("first delivery");
    let received_at = Instant::now();

    // Nothing else is queued: an immediate receive finds the queue empty.
    assert!(
        queue
            .receive(10, Duration::ZERO, LONG)
            .await
            .unwrap()
            .is_empty()
    );

    let second = receive_one(&queue, LONG, Duration::from_secs(15))
        .await
        .expect("the message comes back after its visibility timeout");
    assert!(
        received_at.elapsed() >= h.tick() / 2,
        "{:?}",
        received_at.elapsed()
    );
    assert_eq!(second.message_id, first.message_id);
    assert_eq!(second.receive_count, 2);
    assert_ne!(second.receipt_handle, first.receipt_handle);
}

pub async fn deleted_messages_never_come_back(h: &impl QueueHarness) {
    let queue = h.open().await;
    queue.send("delete me", Duration::ZERO).await.unwrap();
    let message = receive_one(&queue, h.tick(), Duration::from_secs(10))
        .await
        .unwrap();
    queue.delete(&message.receipt_handle).await.unwrap();

    // Longer than the visibility timeout: a message that was not deleted would be back.
    let again = queue.receive(10, h.tick() * 3, LONG).await.unwrap();
    assert!(again.is_empty(), "{again:?}");
    assert_eq!(queue.depth().await.unwrap(), QueueDepth::default());
}

pub async fn visibility_zero_returns_a_message_at_once_with_its_count(h: &impl QueueHarness) {
    let queue = h.open().await;
    queue.send("again", Duration::ZERO).await.unwrap();
    let first = receive_one(&queue, LONG, Duration::from_secs(10))
        .await
        .unwrap();
    queue
        .change_visibility(&first.receipt_handle, Duration::ZERO)
        .await
        .unwrap();

    let started = Instant::now();
    let second = receive_one(&queue, LONG, Duration::from_secs(10))
        .await
        .expect("visible again at once");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(second.message_id, first.message_id);
    // Re-timing never resets the count: a redrive policy still sees every delivery.
    assert_eq!(second.receive_count, 2);
}

pub async fn extending_visibility_keeps_a_message_hidden(h: &impl QueueHarness) {
    let queue = h.open().await;
    queue.send("extended", Duration::ZERO).await.unwrap();
    let message = receive_one(&queue, h.tick(), Duration::from_secs(10))
        .await
        .unwrap();
    queue
        .change_visibility(&message.receipt_handle, h.tick() * 4)
        .await
        .unwrap();

    // Past the first timeout, within the extended one.
    let early = queue.receive(10, h.tick() * 2, LONG).await.unwrap();
    assert!(
        early.is_empty(),
        "came back before the extension ran out: {early:?}"
    );

    let late = receive_one(&queue, LONG, Duration::from_secs(15))
        .await
        .expect("visible once the extension runs out");
    assert_eq!(late.message_id, message.message_id);
}

pub async fn delayed_messages_are_held_back(h: &impl QueueHarness) {
    let queue = h.open().await;
    let sent_at = Instant::now();
    queue.send("later", h.tick() * 2).await.unwrap();

    assert!(
        queue
            .receive(10, Duration::ZERO, LONG)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(queue.depth().await.unwrap().delayed, 1);

    let message = receive_one(&queue, LONG, Duration::from_secs(15))
        .await
        .expect("delivered after its delay");
    assert!(sent_at.elapsed() >= h.tick(), "{:?}", sent_at.elapsed());
    assert_eq!(message.body, "later");
}

pub async fn a_long_poll_returns_as_soon_as_a_message_arrives(h: &impl QueueHarness) {
    let queue = h.open().await;
    let poll = tokio::spawn({
        let queue = queue.clone();
        async move {
            let started = Instant::now();
            let got = queue
                .receive(1, Duration::from_secs(15), LONG)
                .await
                .unwrap();
            (got, started.elapsed())
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    queue.send("wake up", Duration::ZERO).await.unwrap();

    let (got, waited) = poll.await.unwrap();
    assert_eq!(got.len(), 1, "the poll returned without the message");
    assert_eq!(got[0].body, "wake up");
    assert!(waited < Duration::from_secs(10), "waited {waited:?}");
}

pub async fn receives_hand_out_batches_and_every_message_once(h: &impl QueueHarness) {
    let queue = h.open().await;
    let outgoing: Vec<_> = (0..15)
        .map(|i| OutgoingMessage::new(format!("message {i}")))
        .collect();
    let sent: Vec<String> = queue
        .send_batch(&outgoing)
        .await
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(sent.iter().collect::<HashSet<_>>().len(), 15);

    let mut bodies = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while bodies.len() < 15 && Instant::now() < deadline {
        let batch = queue
            .receive(10, Duration::from_secs(1), LONG)
            .await
            .unwrap();
        assert!(
            batch.len() <= 10,
            "a receive returned {} messages",
            batch.len()
        );
        for message in batch {
            assert!(sent.contains(&message.message_id));
            assert!(
                bodies.insert(message.body.clone()),
                "{} twice",
                message.body
            );
        }
    }
    let expected: HashSet<_> = (0..15).map(|i| format!("message {i}")).collect();
    assert_eq!(bodies, expected);
}

pub async fn batch_calls_report_each_entry(h: &impl QueueHarness) {
    let queue = h.open().await;
    for i in 0..3 {
        queue
            .send(&format!("entry {i}"), Duration::ZERO)
            .await
            .unwrap();
    }
    let mut received = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while received.len() < 3 && Instant::now() < deadline {
        received.extend(
            queue
                .receive(10, Duration::from_secs(1), LONG)
                .await
                .unwrap(),
        );
    }
    assert_eq!(received.len(), 3);

    let changes = vec![
        (received[0].receipt_handle.clone(), Duration::ZERO),
        (received[1].receipt_handle.clone(), LONG),
        (received[2].receipt_handle.clone(), LONG),
    ];
    let outcomes = queue.change_visibility_batch(&changes).await.unwrap();
    assert_eq!(outcomes.len(), 3);
    assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");

    let back = receive_one(&queue, LONG, Duration::from_secs(10))
        .await
        .expect("the entry made visible again");
    assert_eq!(back.message_id, received[0].message_id);

    let handles = vec![
        back.receipt_handle.clone(),
        received[1].receipt_handle.clone(),
        received[2].receipt_handle.clone(),
    ];
    let deleted = queue.delete_batch(&handles).await.unwrap();
    assert_eq!(deleted.len(), 3);
    assert!(deleted.iter().all(Result::is_ok), "{deleted:?}");
    assert_eq!(queue.depth().await.unwrap(), QueueDepth::default());
}

pub async fn dead_lettering_keeps_the_body_and_the_reason(h: &impl QueueHarness) {
    let queue = h.open().await;
    let body = r#"{"not": "a request", "note": "ünïcødé"}"#;
    queue.send(body, Duration::ZERO).await.unwrap();
    let message = receive_one(&queue, LONG, Duration::from_secs(10))
        .await
        .unwrap();
    queue
        .dead_letter(
            &message,
            "not a request message: missing field `project_id`",
        )
        .await
        .unwrap();

    assert!(
        queue
            .receive(10, Duration::ZERO, LONG)
            .await
            .unwrap()
            .is_empty()
    );
    let depth = queue.depth().await.unwrap();
    assert_eq!(
        (depth.visible, depth.in_flight, depth.dead_lettered),
        (0, 0, 1)
    );

    let letters = h.dead_letters(&queue).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].body, body);
    assert_eq!(
        letters[0].reason.as_deref(),
        Some("not a request message: missing field `project_id`")
    );
    assert_eq!(letters[0].receive_count, Some(1));
}

pub async fn redriving_returns_dead_letters_to_the_queue(h: &impl QueueHarness) {
    let queue = h.open().await;
    for i in 0..3 {
        queue
            .send(&format!("poison {i}"), Duration::ZERO)
            .await
            .unwrap();
    }
    let mut dead = 0;
    let deadline = Instant::now() + Duration::from_secs(15);
    while dead < 3 && Instant::now() < deadline {
        for message in queue
            .receive(10, Duration::from_secs(1), LONG)
            .await
            .unwrap()
        {
            queue
                .dead_letter(&message, "cause fixed later")
                .await
                .unwrap();
            dead += 1;
        }
    }
    assert_eq!(queue.depth().await.unwrap().dead_lettered, 3);

    assert_eq!(queue.redrive_dead_letters(10).await.unwrap(), 3);
    assert_eq!(queue.depth().await.unwrap().dead_lettered, 0);

    let mut bodies = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while bodies.len() < 3 && Instant::now() < deadline {
        for message in queue
            .receive(10, Duration::from_secs(1), LONG)
            .await
            .unwrap()
        {
            bodies.insert(message.body);
        }
    }
    let expected: HashSet<_> = (0..3).map(|i| format!("poison {i}")).collect();
    assert_eq!(bodies, expected);
}

pub async fn a_receive_limit_dead_letters_instead_of_delivering(h: &impl QueueHarness) {
    let queue = h.open_with_receive_limit(2).await;
    queue
        .send("crashes its consumer", Duration::ZERO)
        .await
        .unwrap();
    for expected in 1..=2 {
        let message = receive_one(&queue, LONG, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(message.receive_count, expected);
        queue
            .change_visibility(&message.receipt_handle, Duration::ZERO)
            .await
            .unwrap();
    }

    // The third delivery would pass the limit: the queue moves the message instead.
    let third = queue
        .receive(10, Duration::from_secs(2), LONG)
        .await
        .unwrap();
    assert!(third.is_empty(), "{third:?}");
    let letters = h.dead_letters(&queue).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].body, "crashes its consumer");
}

pub async fn sizes_are_counted_in_utf8_bytes(h: &impl QueueHarness) {
    let queue = h.open().await;
    let limit = queue.max_message_bytes();
    assert!(limit <= 1_048_576, "{limit}");

    // Fewer characters than the limit, more bytes: refused before it is sent.
    let two_byte_chars = "é".repeat(limit / 2 + 1);
    assert!(two_byte_chars.chars().count() < limit);
    match queue.send(&two_byte_chars, Duration::ZERO).await {
        Err(Error::MessageTooLarge {
            size,
            limit: refused_at,
        }) => {
            assert_eq!(size, two_byte_chars.len());
            assert_eq!(refused_at, limit);
        }
        other => panic!("expected MessageTooLarge, got {other:?}"),
    }
    let batch = queue
        .send_batch(&[
            OutgoingMessage::new(two_byte_chars.clone()),
            OutgoingMessage::new("small"),
        ])
        .await
        .unwrap();
    assert!(
        matches!(batch[0], Err(Error::MessageTooLarge { .. })),
        "{:?}",
        batch[0]
    );
    assert!(batch[1].is_ok(), "{:?}", batch[1]);

    // Exactly at the limit is accepted and arrives whole.
    let at_limit = "a".repeat(limit);
    queue.send(&at_limit, Duration::ZERO).await.unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while seen.len() < 2 && Instant::now() < deadline {
        seen.extend(
            queue
                .receive(10, Duration::from_secs(1), LONG)
                .await
                .unwrap()
                .into_iter()
                .map(|m| m.body.len()),
        );
    }
    seen.sort_unstable();
    assert_eq!(seen, [5, limit]);
}

pub async fn depth_counts_each_state(h: &impl QueueHarness) {
    let queue = h.open().await;
    queue.send("visible", Duration::ZERO).await.unwrap();
    queue.send("taken", Duration::ZERO).await.unwrap();
    queue.send("delayed", LONG / 4).await.unwrap();
    let taken = receive_one(&queue, LONG, Duration::from_secs(10))
        .await
        .unwrap();

    let depth = queue.depth().await.unwrap();
    assert_eq!(
        (
            depth.visible,
            depth.in_flight,
            depth.delayed,
            depth.dead_lettered
        ),
        (1, 1, 1, 0),
        "{depth:?}"
    );
    queue.dead_letter(&taken, "counted").await.unwrap();
    let depth = queue.depth().await.unwrap();
    assert_eq!((depth.in_flight, depth.dead_lettered), (0, 1), "{depth:?}");
}
