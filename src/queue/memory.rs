//! [`MemoryQueue`]: a queue with SQS semantics kept in this process, for tests and for hosts
//! that run producers and consumers side by side without a queue service.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{
    MAX_BATCH_SIZE, MAX_DELAY, MAX_MESSAGE_BYTES, MAX_VISIBILITY_TIMEOUT, MAX_WAIT_TIME,
    QueueBackend, QueueDepth, ReceivedMessage, check_size, redriven_body, with_request_id,
};
use crate::error::{Error, Result};

/// A message that was moved to a [`MemoryQueue`]'s dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The id the message had in the queue.
    pub message_id: String,
    /// Its body, unchanged, except that a request message without a `request_id` gets the
    /// message id as its `request_id`: the request it was delivered as stays the same.
    pub body: String,
    /// Why it was dead-lettered.
    pub reason: String,
    /// How many times it had been delivered.
    pub receive_count: u32,
}

/// An in-memory queue with SQS semantics, and its dead-letter queue.
///
/// - A received message is invisible for the receive's visibility timeout; unless it is
///   deleted or re-timed in time, it becomes visible again and its next delivery has a
///   higher receive count and a new receipt handle. Only the newest handle of a message
///   can re-time it; deleting with an older handle succeeds without deleting anything.
/// - Sends can be delayed; receives wait (long polling) until a message is visible or the
///   wait is over.
/// - With [`with_max_receive_count`](Self::with_max_receive_count), a message whose
///   receive count would pass the limit goes to the dead-letter queue instead of being
///   delivered, as an SQS redrive policy does.
/// - Bodies over [`with_max_message_bytes`](Self::with_max_message_bytes) (1 MiB by
///   default) are refused with [`Error::MessageTooLarge`].
///
/// Clones share the same queue. Time is tokio's, so tests may pause and advance it.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use root_orchestrator::{MemoryQueue, QueueBackend};
///
/// # tokio::runtime::Builder::new_current_thread().enable_time().build()?.block_on(async {
/// let queue = MemoryQueue::new().with_max_receive_count(3);
/// queue.send(r#"{"hello": "queue"}"#, Duration::ZERO).await?;
///
/// let received = queue.receive(10, Duration::ZERO, Duration::from_secs(30)).await?;
/// assert_eq!(received[0].receive_count, 1);
///
/// queue.dead_letter(&received[0], "could not be parsed").await?;
/// assert_eq!(queue.dead_letters()[0].reason, "could not be parsed");
/// assert_eq!(queue.depth().await?.dead_lettered, 1);
/// # Ok::<(), root_orchestrator::Error>(())
/// # })?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct MemoryQueue {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Woken whenever a message may have become receivable.
    changed: Notify,
    max_receive_count: Option<u32>,
    max_message_bytes: usize,
}

#[derive(Default)]
struct State {
    /// Messages by send order, which is the order receives hand them out.
    messages: BTreeMap<u64, Stored>,
    /// The newest receipt handle of each in-flight message, to its key in `messages`.
    handles: HashMap<String, u64>,
    dead: VecDeque<DeadLetter>,
    next_key: u64,
}

struct Stored {
    message_id: String,
    body: String,
    visible_at: Instant,
    receive_count: u32,
    /// The newest delivery's handle and when it was received; `None` until first received.
    delivery: Option<(String, Instant)>,
}

impl std::fmt::Debug for MemoryQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.state();
        f.debug_struct("MemoryQueue")
            .field("messages", &state.messages.len())
            .field("dead_letters", &state.dead.len())
            .field("max_receive_count", &self.shared.max_receive_count)
            .finish()
    }
}

impl Default for MemoryQueue {
    fn default() -> Self {
        MemoryQueue::new()
    }
}

impl MemoryQueue {
    /// An empty queue without a receive limit, accepting messages up to 1 MiB.
    pub fn new() -> Self {
        MemoryQueue::build(None, MAX_MESSAGE_BYTES)
    }

    /// The same settings with a receive limit: a message delivered `max_receive_count`
    /// times goes to the dead-letter queue instead of being delivered again. Applies to a
    /// new queue; call it before sending.
    pub fn with_max_receive_count(self, max_receive_count: u32) -> Self {
        MemoryQueue::build(Some(max_receive_count), self.shared.max_message_bytes)
    }

    /// The same settings with another size limit, in bytes. Applies to a new queue; call it
    /// before sending.
    pub fn with_max_message_bytes(self, max_message_bytes: usize) -> Self {
        MemoryQueue::build(self.shared.max_receive_count, max_message_bytes)
    }

    fn build(max_receive_count: Option<u32>, max_message_bytes: usize) -> Self {
        MemoryQueue {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                changed: Notify::new(),
                max_receive_count,
                max_message_bytes,
            }),
        }
    }

    /// The messages in the dead-letter queue, oldest first.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.state().dead.iter().cloned().collect()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic: every change is made in one go.
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn refused(operation: &'static str, problem: &str) -> Error {
        Error::queue(operation, "memory", problem.to_owned())
    }

    /// Takes up to `max` visible messages, dead-lettering those past the receive limit.
    fn take_visible(&self, max: usize, visibility_timeout: Duration) -> Vec<ReceivedMessage> {
        let now = Instant::now();
        let mut state = self.state();
        let state = &mut *state;
        let mut taken = Vec::new();
        let mut exhausted = Vec::new();
        for (&key, stored) in state.messages.iter_mut() {
            if taken.len() == max {
                break;
            }
            if stored.visible_at > now {
                continue;
            }
            stored.receive_count += 1;
            if let Some((old, _)) = stored.delivery.take() {
                state.handles.remove(&old);
            }
            if self
                .shared
                .max_receive_count
                .is_some_and(|limit| stored.receive_count > limit)
            {
                exhausted.push(key);
                continue;
            }
            let handle = format!(
                "{}#{}#{}",
                stored.message_id,
                stored.receive_count,
                uuid::Uuid::new_v4().simple()
            );
            stored.visible_at = now + visibility_timeout.min(MAX_VISIBILITY_TIMEOUT);
            stored.delivery = Some((handle.clone(), now));
            state.handles.insert(handle.clone(), key);
            taken.push(ReceivedMessage::new(
                stored.message_id.clone(),
                handle,
                stored.body.clone(),
                stored.receive_count,
            ));
        }
        for key in exhausted {
            if let Some(stored) = state.messages.remove(&key) {
                state.dead.push_back(DeadLetter {
                    reason: format!(
                        "received {} times, more than the queue's limit",
                        stored.receive_count
                    ),
                    message_id: stored.message_id,
                    body: stored.body,
                    receive_count: stored.receive_count,
                });
            }
        }
        taken
    }

    /// When the next hidden message becomes visible, if any is hidden.
    fn next_visible_at(&self) -> Option<Instant> {
        let now = Instant::now();
        self.state()
            .messages
            .values()
            .map(|m| m.visible_at)
            .filter(|at| *at > now)
            .min()
    }

    fn push(&self, body: String, delay: Duration) -> String {
        let message_id = uuid::Uuid::new_v4().to_string();
        let mut state = self.state();
        let key = state.next_key;
        state.next_key += 1;
        state.messages.insert(
            key,
            Stored {
                message_id: message_id.clone(),
                body,
                visible_at: Instant::now() + delay.min(MAX_DELAY),
                receive_count: 0,
                delivery: None,
            },
        );
        drop(state);
        self.shared.changed.notify_waiters();
        message_id
    }
}

#[async_trait]
impl QueueBackend for MemoryQueue {
    async fn send(&self, body: &str, delay: Duration) -> Result<String> {
        check_size(body, self.shared.max_message_bytes)?;
        if body.is_empty() {
            return Err(Self::refused("send", "a message body must not be empty"));
        }
        Ok(self.push(body.to_owned(), delay))
    }

    async fn receive(
        &self,
        max_messages: usize,
        wait: Duration,
        visibility_timeout: Duration,
    ) -> Result<Vec<ReceivedMessage>> {
        let max = max_messages.clamp(1, MAX_BATCH_SIZE);
        let deadline = Instant::now() + wait.min(MAX_WAIT_TIME);
        loop {
            // Registered before looking, so a send between the look and the wait wakes us.
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();

            let taken = self.take_visible(max, visibility_timeout);
            if !taken.is_empty() || Instant::now() >= deadline {
                return Ok(taken);
            }
            let wake = self
                .next_visible_at()
                .map_or(deadline, |at| at.min(deadline));
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    async fn delete(&self, receipt_handle: &str) -> Result<()> {
        let mut state = self.state();
        // An old handle (the message was delivered again since) deletes nothing, as in SQS.
        if let Some(key) = state.handles.remove(receipt_handle) {
            state.messages.remove(&key);
        }
        Ok(())
    }

    async fn change_visibility(&self, receipt_handle: &str, timeout: Duration) -> Result<()> {
        let now = Instant::now();
        let mut state = self.state();
        let state = &mut *state;
        let stored = state
            .handles
            .get(receipt_handle)
            .and_then(|key| state.messages.get_mut(key))
            .ok_or_else(|| {
                Self::refused(
                    "change_visibility",
                    "the receipt handle is not valid: the message was deleted or delivered again",
                )
            })?;
        if stored.visible_at <= now {
            return Err(Self::refused(
                "change_visibility",
                "the message is not in flight: its visibility timeout has passed",
            ));
        }
        let received_at = stored.delivery.as_ref().map_or(now, |(_, at)| *at);
        if now + timeout > received_at + MAX_VISIBILITY_TIMEOUT {
            return Err(Self::refused(
                "change_visibility",
                "a message cannot stay hidden for more than 12 hours after it was received",
            ));
        }
        stored.visible_at = now + timeout;
        // A waiting receive planned its wake-up from the old time; this one may be sooner.
        self.shared.changed.notify_waiters();
        Ok(())
    }

    async fn dead_letter(&self, message: &ReceivedMessage, reason: &str) -> Result<()> {
        let mut state = self.state();
        let current = state
            .handles
            .remove(&message.receipt_handle)
            .and_then(|key| state.messages.remove(&key));
        // With an old handle the message stays queued and a copy is dead-lettered, as a
        // send to the dead-letter queue followed by a delete that misses would do in SQS.
        let (body, receive_count) = match current {
            Some(stored) => (stored.body, stored.receive_count),
            None => (message.body.clone(), message.receive_count),
        };
        let limit = self.shared.max_message_bytes;
        let body = with_request_id(&body, &message.message_id, limit).unwrap_or(body);
        state.dead.push_back(DeadLetter {
            message_id: message.message_id.clone(),
            body,
            reason: reason.to_owned(),
            receive_count,
        });
        Ok(())
    }

    async fn redrive_dead_letters(&self, max_messages: usize) -> Result<usize> {
        let moved: Vec<DeadLetter> = {
            let mut state = self.state();
            let n = max_messages.min(state.dead.len());
            state.dead.drain(..n).collect()
        };
        let limit = self.shared.max_message_bytes;
        let mut redriven = 0;
        let mut kept = Vec::new();
        for letter in moved {
            // The redriven copy gets a new message id; the request stays the one named by
            // the dead-lettered message's id (a queue's own receive limit moves a message
            // unchanged).
            match redriven_body(&letter.body, &letter.message_id, limit) {
                Some(body) => {
                    self.push(body, Duration::ZERO);
                    redriven += 1;
                }
                None => {
                    tracing::warn!(
                        message_id = %letter.message_id,
                        "too close to the size limit to be redriven as the same request; kept"
                    );
                    kept.push(letter);
                }
            }
        }
        self.state().dead.extend(kept);
        Ok(redriven)
    }

    async fn depth(&self) -> Result<QueueDepth> {
        let now = Instant::now();
        let state = self.state();
        let mut depth = QueueDepth {
            dead_lettered: state.dead.len() as u64,
            ..QueueDepth::default()
        };
        for stored in state.messages.values() {
            if stored.visible_at <= now {
                depth.visible += 1;
            } else if stored.delivery.is_some() {
                depth.in_flight += 1;
            } else {
                depth.delayed += 1;
            }
        }
        Ok(depth)
    }

    fn max_message_bytes(&self) -> usize {
        self.shared.max_message_bytes
    }
}
