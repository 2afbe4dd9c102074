//! Message queues behind the queue strategy: the [`QueueBackend`] trait.
//!
//! A backend gives SQS semantics: a received message stays invisible to other consumers
//! for a visibility timeout and comes back if it is not deleted in time; each delivery
//! counts towards a receive limit, past which the message is moved to a dead-letter queue.

use std::time::Duration;

use async_trait::async_trait;

use crate::error::Result;

/// A message handed to a consumer by [`QueueBackend::receive`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReceivedMessage {
    /// The queue's id of the message; the same on every delivery.
    pub message_id: String,
    /// The handle that deletes or re-times this delivery; new on every delivery.
    pub receipt_handle: String,
    /// The message body, UTF-8 text.
    pub body: String,
    /// How many times the message has been delivered, this delivery included.
    pub receive_count: u32,
}

impl ReceivedMessage {
    /// A delivery of `body` with the given ids, delivered `receive_count` times.
    pub fn new(
        message_id: impl Into<String>,
        receipt_handle: impl Into<String>,
        body: impl Into<String>,
        receive_count: u32,
    ) -> Self {
        ReceivedMessage {
            message_id: message_id.into(),
            receipt_handle: receipt_handle.into(),
            body: body.into(),
            receive_count,
        }
    }
}

/// How many messages a queue holds, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueDepth {
    /// Messages ready to be received.
    pub visible: u64,
    /// Messages received and not yet deleted or returned.
    pub in_flight: u64,
    /// Messages sent with a delay that has not passed.
    pub delayed: u64,
    /// Messages in the dead-letter queue.
    pub dead_lettered: u64,
}

/// A message queue with SQS semantics.
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait QueueBackend: Send + Sync + 'static {
    /// Sends `body`, deliverable after `delay`; returns the message id.
    async fn send(&self, body: &str, delay: Duration) -> Result<String>;

    /// Receives up to `max_messages` messages, waiting up to `wait` for the first one
    /// (long polling); each stays invisible to other consumers for `visibility_timeout`.
    async fn receive(
        &self,
        max_messages: usize,
        wait: Duration,
        visibility_timeout: Duration,
    ) -> Result<Vec<ReceivedMessage>>;

    /// Deletes a delivered message for good.
    async fn delete(&self, receipt_handle: &str) -> Result<()>;

    /// Makes a delivered message visible again after `timeout` (zero: at once).
    async fn change_visibility(&self, receipt_handle: &str, timeout: Duration) -> Result<()>;

    /// Moves a delivered message to the dead-letter queue, noting `reason`.
    async fn dead_letter(&self, message: &ReceivedMessage, reason: &str) -> Result<()>;

    /// How many messages the queue and its dead-letter queue hold.
    async fn depth(&self) -> Result<QueueDepth>;
}
