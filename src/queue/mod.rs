//! Message queues behind the queue strategy: the [`QueueBackend`] trait and its backends.
//!
//! A backend gives SQS semantics: a received message stays invisible to other consumers
//! for a visibility timeout and comes back if it is not deleted in time; each delivery
//! counts towards a receive limit, past which the message is moved to a dead-letter queue.

use std::time::Duration;

use async_trait::async_trait;

use crate::error::Result;

#[cfg(feature = "queue")]
mod memory;
#[cfg(feature = "sqs")]
mod sqs;

#[cfg(feature = "queue")]
pub use memory::{DeadLetter, MemoryQueue};
#[cfg(feature = "sqs")]
pub use sqs::{SqsQueue, SqsQueueBuilder};

/// Most messages one receive or one batch call handles (SQS's limit).
#[cfg(feature = "queue")]
pub(crate) const MAX_BATCH_SIZE: usize = 10;

/// Longest delay a message can be sent with (SQS's limit: 15 minutes).
#[cfg(feature = "queue")]
pub(crate) const MAX_DELAY: Duration = Duration::from_secs(900);

/// Longest a received message can be kept invisible (SQS's limit: 12 hours).
#[cfg(feature = "queue")]
pub(crate) const MAX_VISIBILITY_TIMEOUT: Duration = Duration::from_secs(43_200);

/// Longest a receive can wait for a message (SQS's long-polling limit: 20 seconds).
#[cfg(feature = "queue")]
pub(crate) const MAX_WAIT_TIME: Duration = Duration::from_secs(20);

/// Largest message body SQS accepts, in UTF-8 bytes: 1 MiB, since SQS raised its limit
/// from 256 KiB in 2025. A queue may be configured to accept less
/// ([`QueueBackend::max_message_bytes`]).
pub(crate) const MAX_MESSAGE_BYTES: usize = 1_048_576;

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

/// A message to send with [`QueueBackend::send_batch`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct OutgoingMessage {
    /// The body, UTF-8 text.
    pub body: String,
    /// How long the message stays undeliverable after it is sent (at most 15 minutes).
    pub delay: Duration,
}

impl OutgoingMessage {
    /// A message with `body`, deliverable at once.
    pub fn new(body: impl Into<String>) -> Self {
        OutgoingMessage {
            body: body.into(),
            delay: Duration::ZERO,
        }
    }

    /// The same message, deliverable only after `delay`.
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
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
///
/// Values beyond what SQS allows are clamped by the backends: delays to 15 minutes,
/// visibility timeouts to 12 hours, long-poll waits to 20 seconds, receives to 10 messages.
/// The batch calls take any number of entries and return one result per entry, in order; a
/// backend splits them into calls it accepts. Message sizes are UTF-8 bytes, at most 1 MiB
/// (SQS's limit since 2025; a queue may be set to accept less).
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait QueueBackend: Send + Sync + 'static {
    /// Sends `body`, deliverable after `delay`; returns the message id.
    ///
    /// # Errors
    ///
    /// [`Error::MessageTooLarge`](crate::Error::MessageTooLarge) when the body is over
    /// [`max_message_bytes`](Self::max_message_bytes), [`Error::Queue`](crate::Error::Queue) when
    /// the queue refuses or cannot be reached.
    async fn send(&self, body: &str, delay: Duration) -> Result<String>;

    /// Sends several messages; returns each one's id or error, in order.
    ///
    /// The default sends them one at a time.
    ///
    /// # Errors
    ///
    /// [`Error::Queue`](crate::Error::Queue) when the call as a whole fails; a message the queue
    /// refused has its own error in the result.
    async fn send_batch(&self, messages: &[OutgoingMessage]) -> Result<Vec<Result<String>>> {
        let mut results = Vec::with_capacity(messages.len());
        for message in messages {
            results.push(self.send(&message.body, message.delay).await);
        }
        Ok(results)
    }

    /// Receives up to `max_messages` messages, waiting up to `wait` for the first one
    /// (long polling); each stays invisible to other consumers for `visibility_timeout`.
    ///
    /// A message whose receive count would pass the queue's receive limit is moved to the
    /// dead-letter queue instead of being delivered.
    ///
    /// # Errors
    ///
    /// [`Error::Queue`](crate::Error::Queue) when the queue cannot be reached or does not answer in
    /// time.
    async fn receive(
        &self,
        max_messages: usize,
        wait: Duration,
        visibility_timeout: Duration,
    ) -> Result<Vec<ReceivedMessage>>;

    /// Deletes a delivered message for good.
    ///
    /// # Errors
    ///
    /// [`Error::Queue`](crate::Error::Queue) when the queue cannot be reached or refuses the
    /// handle.
    async fn delete(&self, receipt_handle: &str) -> Result<()>;

    /// Deletes several delivered messages; returns each one's outcome, in order.
    ///
    /// The default deletes them one at a time.
    ///
    /// # Errors
    ///
    /// [`Error::Queue`](crate::Error::Queue) when the call as a whole fails.
    async fn delete_batch(&self, receipt_handles: &[String]) -> Result<Vec<Result<()>>> {
        let mut results = Vec::with_capacity(receipt_handles.len());
        for handle in receipt_handles {
            results.push(self.delete(handle).await);
        }
        Ok(results)
    }

    /// Makes a delivered message visible again after `timeout` (zero: at once). The
    /// message's receive count does not change.
    ///
    /// # Errors
    ///
    /// [`Error::Queue`](crate::Error::Queue) when the queue cannot be reached, the handle is no
    /// longer valid, or the message is not in flight.
    async fn change_visibility(&self, receipt_handle: &str, timeout: Duration) -> Result<()>;

    /// Re-times several delivered messages, each by its own `(receipt handle, timeout)`;
    /// returns each one's outcome, in order.
    ///
    /// The default re-times them one at a time.
    ///
    /// # Errors
    ///
    /// [`Error::Queue`](crate::Error::Queue) when the call as a whole fails.
    async fn change_visibility_batch(
        &self,
        changes: &[(String, Duration)],
    ) -> Result<Vec<Result<()>>> {
        let mut results = Vec::with_capacity(changes.len());
        for (handle, timeout) in changes {
            results.push(self.change_visibility(handle, *timeout).await);
        }
        Ok(results)
    }

    /// Moves a delivered message to the dead-letter queue, noting `reason`.
    ///
    /// The body is unchanged, except that a request message without a `request_id` gets the
    /// message id as its `request_id`: consumers name such a request by the message id,
    /// and a copy of the message has a new one.
    ///
    /// # Errors
    ///
    /// [`Error::Queue`](crate::Error::Queue) when either queue cannot be reached; the message then
    /// stays where it was and comes back after its visibility timeout.
    async fn dead_letter(&self, message: &ReceivedMessage, reason: &str) -> Result<()>;

    /// Moves up to `max_messages` messages from the dead-letter queue back to the queue;
    /// returns how many were moved.
    ///
    /// Bodies are unchanged, except that a request message without a `request_id` gets the id
    /// the message had before it was dead-lettered, as in [`dead_letter`](Self::dead_letter).
    ///
    /// # Errors
    ///
    /// [`Error::Queue`](crate::Error::Queue) when either queue cannot be reached; messages moved
    /// before the fault stay moved.
    async fn redrive_dead_letters(&self, max_messages: usize) -> Result<usize>;

    /// How many messages the queue and its dead-letter queue hold.
    ///
    /// # Errors
    ///
    /// [`Error::Queue`](crate::Error::Queue) when the queue cannot be reached.
    async fn depth(&self) -> Result<QueueDepth>;

    /// The largest message the queue accepts, in UTF-8 bytes; 1 MiB unless the backend
    /// says otherwise.
    fn max_message_bytes(&self) -> usize {
        MAX_MESSAGE_BYTES
    }
}

/// Refuses `body` when it is over `limit` bytes of UTF-8.
#[cfg(feature = "queue")]
pub(crate) fn check_size(body: &str, limit: usize) -> Result<()> {
    // `str::len` is the UTF-8 length, which is what SQS counts (not characters).
    if body.len() > limit {
        return Err(crate::error::Error::MessageTooLarge {
            size: body.len(),
            limit,
        });
    }
    Ok(())
}

/// `body` with `"request_id": message_id` added when it is a request message
/// ([`RequestMessage`](crate::RequestMessage)) without a `request_id`, and the result still
/// fits in `limit` bytes; otherwise `None`, and the body is to be kept as it is.
///
/// A consumer names a request without a `request_id` by the message's id; a copy of the
/// message (dead-lettered, then redriven) has a new id and would make a second request,
/// so the copy carries the id it was known by in its body.
#[cfg(feature = "queue")]
pub(crate) fn with_request_id(body: &str, message_id: &str, limit: usize) -> Option<String> {
    // Only request messages are touched: any other body never made a request, and stays
    // byte-identical for whoever inspects the dead-letter queue.
    let message = crate::model::RequestMessage::from_json(body).ok()?;
    if message.request_id.is_some() {
        return None;
    }
    let serde_json::Value::Object(mut object) = serde_json::from_str(body).ok()? else {
        return None;
    };
    object.insert(
        "request_id".to_owned(),
        serde_json::Value::String(message_id.to_owned()),
    );
    let stamped = serde_json::to_string(&object).ok()?;
    (stamped.len() <= limit).then_some(stamped)
}

/// The body a redrive sends back for a dead-lettered `body` that consumers knew by the
/// message id `known_as`, or `None` when the message must stay dead-lettered.
///
/// A request message is a resubmission once redriven: it gets the `request_id` it was known
/// by (when it has none), so the copy still names the same request, and a
/// `metadata.submitted_at` of now, so a message that waited in the dead-letter queue longer
/// than finished requests are kept is not taken for the copy of a pruned one. A request
/// still stored then follows its status (a finished one is not run again). When the
/// rewritten body would not fit in `limit` the message stays where it is: sent unchanged,
/// it would come back as a different request. Any other body goes back byte-identical.
#[cfg(feature = "queue")]
pub(crate) fn redriven_body(body: &str, known_as: &str, limit: usize) -> Option<String> {
    if crate::model::RequestMessage::from_json(body).is_err() {
        return Some(body.to_owned());
    }
    let serde_json::Value::Object(mut object) = serde_json::from_str(body).ok()? else {
        return Some(body.to_owned());
    };

    if object
        .get("request_id")
        .is_none_or(serde_json::Value::is_null)
    {
        object.insert(
            "request_id".to_owned(),
            serde_json::Value::String(known_as.to_owned()),
        );
    }
    if let Some(serde_json::Value::Object(metadata)) = object.get_mut("metadata") {
        metadata.insert(
            "submitted_at".to_owned(),
            serde_json::Value::String(crate::store::now().to_rfc3339()),
        );
    }
    let rewritten = serde_json::to_string(&object).ok()?;
    (rewritten.len() <= limit).then_some(rewritten)
}

#[cfg(all(test, feature = "queue"))]
mod tests {
    use super::*;

    #[test]
    fn only_request_messages_without_a_request_id_get_one() {
        let message = r#"{"project_id": "p", "user_id": "u", "request_type": "t",
                          "configuration": {"keywords": ["x"]}}"#;
        let stamped = with_request_id(message, "m-1", 1024).unwrap();
        let value: serde_json::Value = serde_json::from_str(&stamped).unwrap();
        assert_eq!(value["request_id"], "m-1");
        assert_eq!(value["project_id"], "p");
        let null = message.replacen('{', r#"{"request_id": null, "#, 1);
        let null = with_request_id(&null, "m-1", 1024).unwrap();
        assert!(null.contains(r#""request_id":"m-1""#), "{null}");
        let named = message.replacen('{', r#"{"request_id": "r", "#, 1);
        assert_eq!(with_request_id(&named, "m-1", 1024), None);
        assert_eq!(with_request_id("not JSON {", "m-1", 1024), None);
        assert_eq!(
            with_request_id(r#"{"not": "a request"}"#, "m-1", 1024),
            None
        );
        // Too large once stamped: kept as it is.
        assert_eq!(with_request_id(message, "m-1", 64), None);
    }

    #[test]
    fn a_redriven_request_names_its_request_and_counts_as_submitted_now() {
        let old = r#"{"project_id": "p", "user_id": "u", "request_type": "t",
                      "configuration": {"keywords": ["x"]},
                      "metadata": {"submitted_at": "2020-01-01T00:00:00Z"}}"#;
        let redriven = redriven_body(old, "m-1", 1024).unwrap();
        let message = crate::model::RequestMessage::from_json(&redriven).unwrap();
        assert_eq!(message.request_id.as_deref(), Some("m-1"));
        let submitted = message.metadata.unwrap().submitted_at;
        assert!(chrono::Utc::now() - submitted < chrono::Duration::seconds(60));

        let named = old.replacen('{', r#"{"request_id": "r", "#, 1);
        let redriven = redriven_body(&named, "m-1", 1024).unwrap();
        assert!(redriven.contains(r#""request_id":"r""#), "{redriven}");

        // Too large once rewritten: it stays dead-lettered.
        assert_eq!(redriven_body(old, "m-1", 64), None);
        // Not a request: back as it was.
        assert_eq!(
            redriven_body("not JSON {", "m-1", 16).as_deref(),
            Some("not JSON {")
        );
    }
}
