//! [`SqsQueue`]: a [`QueueBackend`] on Amazon SQS, or on any server that speaks its API.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::{BehaviorVersion, SdkConfig};
use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::timeout::TimeoutConfig;
use aws_sdk_sqs::error::{DisplayErrorContext, SdkError};
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
    MessageAttributeValue, MessageSystemAttributeName, QueueAttributeName,
    SendMessageBatchRequestEntry,
};

use super::{
    MAX_BATCH_SIZE, MAX_DELAY, MAX_MESSAGE_BYTES, MAX_VISIBILITY_TIMEOUT, MAX_WAIT_TIME,
    OutgoingMessage, QueueBackend, QueueDepth, ReceivedMessage, check_size, redriven_body,
    with_request_id,
};
use crate::error::{Error, Result};

/// How long one HTTP attempt may take, beyond a receive's long-poll wait.
const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long opening a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Longest dead-letter reason kept on the dead-lettered message, in bytes.
const MAX_REASON_BYTES: usize = 1024;

/// Message attributes set on a dead-lettered copy.
const REASON_ATTRIBUTE: &str = "dead_letter_reason";
const SOURCE_ID_ATTRIBUTE: &str = "source_message_id";
const RECEIVE_COUNT_ATTRIBUTE: &str = "receive_count";

/// How long a redrive keeps the dead-letter messages it is moving hidden.
const REDRIVE_VISIBILITY: Duration = Duration::from_secs(60);

/// Settings for [`SqsQueue`]; [`connect`](Self::connect) finishes it.
#[derive(Debug, Clone)]
#[must_use]
pub struct SqsQueueBuilder {
    queue: String,
    dead_letter_queue: Option<String>,
    attempt_timeout: Duration,
    create_missing: Option<u32>,
    max_message_bytes: Option<usize>,
    sdk_config: Option<SdkConfig>,
}

impl SqsQueueBuilder {
    /// The dead-letter queue, by URL or name. Without one, the queue's own redrive policy
    /// names it; a queue with neither is refused.
    pub fn dead_letter_queue(mut self, queue: impl Into<String>) -> Self {
        self.dead_letter_queue = Some(queue.into());
        self
    }

    /// How long one HTTP attempt may take before it is abandoned and retried (a receive
    /// gets its long-poll wait on top). Default 10 s. The SDK tries each call up to three
    /// times, so a server that never answers fails a call after about three timeouts.
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = timeout;
        self
    }

    /// Creates the queue and its dead-letter queue when they do not exist (named queues
    /// only): the dead-letter queue is the one given, or `<queue>-dlq`, and the queue gets a
    /// redrive policy that moves a message there after `max_receive_count` deliveries.
    ///
    /// Set `max_receive_count` above the consumers' attempts (`max_retries + 1`): the
    /// consumers dead-letter a request's message themselves, with its reason, once its
    /// retries are spent; the queue's own limit is the net for messages whose consumer
    /// crashes every time.
    pub fn create_if_missing(mut self, max_receive_count: u32) -> Self {
        self.create_missing = Some(max_receive_count);
        self
    }

    /// The largest message to send, in bytes, instead of the queues' `MaximumMessageSize`
    /// attribute (which is then not read).
    pub fn max_message_bytes(mut self, max_message_bytes: usize) -> Self {
        self.max_message_bytes = Some(max_message_bytes);
        self
    }

    /// AWS settings to use instead of the standard chain (`aws_config::defaults`).
    pub fn sdk_config(mut self, config: SdkConfig) -> Self {
        self.sdk_config = Some(config);
        self
    }

    /// Loads the AWS settings, finds (or creates) the queues and reads their size limit.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] when no region is configured or no dead-letter queue can be
    /// found, [`Error::Queue`] when a queue does not exist or cannot be reached.
    pub async fn connect(self) -> Result<SqsQueue> {
        // Checked before any call, so that `create_if_missing` does not create the queue
        // as its own dead-letter queue first.
        if let Some(dead_letter) = &self.dead_letter_queue {
            check_distinct(&self.queue, dead_letter)?;
        }
        let sdk_config = match self.sdk_config {
            Some(config) => config,
            None => aws_config::defaults(BehaviorVersion::latest()).load().await,
        };
        if sdk_config.region().is_none() {
            return Err(Error::InvalidConfig {
                name: "AWS_REGION".to_owned(),
                value: String::new(),
                expected: "an AWS region, from AWS_REGION or the profile's `region`".to_owned(),
            });
        }
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(CONNECT_TIMEOUT.min(self.attempt_timeout))
            .operation_attempt_timeout(self.attempt_timeout)
            .build();
        let client = Client::from_conf(
            aws_sdk_sqs::config::Builder::from(&sdk_config)
                .timeout_config(timeouts)
                .build(),
        );

        let dead_letter_name = match (&self.dead_letter_queue, self.create_missing) {
            (Some(queue), Some(_)) if !is_url(queue) => Some(queue.clone()),
            (None, Some(_)) if !is_url(&self.queue) => Some(format!("{}-dlq", self.queue)),
            _ => None,
        };
        let queue_url = match (self.create_missing, dead_letter_name) {
            (Some(max_receive_count), Some(dead_letter_name)) => {
                create_pair(&client, &self.queue, &dead_letter_name, max_receive_count).await?
            }
            _ => resolve_url(&client, &self.queue).await?,
        };
        let dead_letter_url = match &self.dead_letter_queue {
            Some(queue) => resolve_url(&client, queue).await?,
            None => redrive_target(&client, &queue_url).await?,
        };
        // Given by name one way and by URL the other, or named by the redrive policy.
        check_distinct(&queue_url, &dead_letter_url)?;

        let max_message_bytes = match self.max_message_bytes {
            Some(limit) => limit,
            None => {
                let main = size_limit(&client, &queue_url).await?;
                let dead = size_limit(&client, &dead_letter_url).await?;
                // A message that could not be dead-lettered must not be accepted either.
                main.min(dead)
            }
        };
        tracing::info!(
            queue = %queue_url,
            dead_letter_queue = %dead_letter_url,
            max_message_bytes,
            "connected to SQS"
        );
        Ok(SqsQueue {
            inner: Arc::new(Inner {
                client,
                queue_url,
                dead_letter_url,
                max_message_bytes,
                attempt_timeout: self.attempt_timeout,
            }),
        })
    }
}

/// A [`QueueBackend`] on Amazon SQS (standard queues), or on any server that speaks the SQS
/// API, such as a local test server.
///
/// - AWS settings come from the standard chain (`aws_config::defaults`): credentials and
///   region from the environment, the shared config files, or the instance's role;
///   `AWS_ENDPOINT_URL_SQS` (or `AWS_ENDPOINT_URL`) points the client at another server.
/// - The queue is given by URL or by name. Its dead-letter queue is the one given, or the
///   target of the queue's redrive policy.
/// - Dead-lettering sends the message to the dead-letter queue with the attributes
///   `dead_letter_reason`, `source_message_id` and `receive_count`, then deletes it from
///   the queue. The body is unchanged, except that a request message without a `request_id`
///   gets the message id as its `request_id`, as a redriven copy does: a copy has a new
///   message id, and must still name the request its original was delivered as.
/// - Message sizes are checked before sending, in UTF-8 bytes, against the smaller of the
///   two queues' `MaximumMessageSize` (at most 1 MiB).
/// - Every HTTP attempt has a timeout (a receive's long-poll wait plus
///   [`attempt_timeout`](SqsQueueBuilder::attempt_timeout)), so a server that stops
///   answering fails the call instead of hanging it.
/// - SQS counts time in whole seconds: delays and visibility timeouts are rounded up.
///
/// # Examples
///
/// ```no_run
/// use root_orchestrator::{MemoryStore, QueueConfig, QueueStrategy, SqsQueue};
///
/// # async fn example() -> Result<(), root_orchestrator::Error> {
/// // AWS_REGION, credentials and (for a local server) AWS_ENDPOINT_URL_SQS from the
/// // environment; the queue and its dead-letter queue are created when missing.
/// let queue = SqsQueue::builder("market-intel")
///     .create_if_missing(10)
///     .connect()
///     .await?;
/// let strategy = QueueStrategy::new(MemoryStore::new(), queue, QueueConfig::from_env()?)?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct SqsQueue {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    queue_url: String,
    dead_letter_url: String,
    max_message_bytes: usize,
    attempt_timeout: Duration,
}

impl std::fmt::Debug for SqsQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqsQueue")
            .field("queue_url", &self.inner.queue_url)
            .field("dead_letter_url", &self.inner.dead_letter_url)
            .field("max_message_bytes", &self.inner.max_message_bytes)
            .finish_non_exhaustive()
    }
}

impl SqsQueue {
    /// Starts configuring a connection to `queue`, a queue URL or name.
    pub fn builder(queue: impl Into<String>) -> SqsQueueBuilder {
        SqsQueueBuilder {
            queue: queue.into(),
            dead_letter_queue: None,
            attempt_timeout: DEFAULT_ATTEMPT_TIMEOUT,
            create_missing: None,
            max_message_bytes: None,
            sdk_config: None,
        }
    }

    /// Connects to `queue` (URL or name) with the standard AWS settings; its redrive policy
    /// names the dead-letter queue.
    ///
    /// # Errors
    ///
    /// As [`SqsQueueBuilder::connect`].
    pub async fn connect(queue: impl Into<String>) -> Result<Self> {
        Self::builder(queue).connect().await
    }

    /// The queue's URL.
    pub fn queue_url(&self) -> &str {
        &self.inner.queue_url
    }

    /// The dead-letter queue's URL.
    pub fn dead_letter_queue_url(&self) -> &str {
        &self.inner.dead_letter_url
    }

    /// The SQS client, for calls this type does not make.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    fn fail<E>(&self, operation: &'static str, err: SdkError<E>) -> Error
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        sdk_error(operation, &self.inner.queue_url, err)
    }

    /// Sends `messages` (at most ten, within the batch size limit) in one call.
    async fn send_chunk(
        &self,
        queue_url: &str,
        messages: &[&OutgoingMessage],
    ) -> Result<Vec<Result<String>>> {
        let mut entries = Vec::with_capacity(messages.len());
        for (i, message) in messages.iter().enumerate() {
            let entry = SendMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .message_body(message.body.clone())
                .delay_seconds(whole_seconds(message.delay, MAX_DELAY))
                .build()
                .map_err(|e| Error::queue("send_batch", queue_url, e))?;
            entries.push(entry);
        }
        let output = self
            .inner
            .client
            .send_message_batch()
            .queue_url(queue_url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| sdk_error("send_batch", queue_url, e))?;

        let mut results: Vec<Option<Result<String>>> = messages.iter().map(|_| None).collect();
        for ok in output.successful() {
            if let Some(slot) = ok
                .id()
                .parse::<usize>()
                .ok()
                .and_then(|i| results.get_mut(i))
            {
                *slot = Some(Ok(ok.message_id().to_owned()));
            }
        }
        for failed in output.failed() {
            if let Some(slot) = failed
                .id()
                .parse::<usize>()
                .ok()
                .and_then(|i| results.get_mut(i))
            {
                *slot = Some(Err(entry_error("send_batch", queue_url, failed)));
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(unanswered("send_batch", queue_url))))
            .collect())
    }

    /// Deletes up to ten messages of `queue_url` in one call.
    async fn delete_chunk(&self, queue_url: &str, handles: &[String]) -> Result<Vec<Result<()>>> {
        let mut entries = Vec::with_capacity(handles.len());
        for (i, handle) in handles.iter().enumerate() {
            let entry = DeleteMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(handle)
                .build()
                .map_err(|e| Error::queue("delete_batch", queue_url, e))?;
            entries.push(entry);
        }
        let output = self
            .inner
            .client
            .delete_message_batch()
            .queue_url(queue_url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| sdk_error("delete_batch", queue_url, e))?;
        let succeeded: Vec<&str> = output.successful().iter().map(|e| e.id()).collect();
        let failed = failures(output.failed());
        Ok(merge_outcomes(
            "delete_batch",
            queue_url,
            handles.len(),
            &succeeded,
            failed,
        ))
    }
}

#[async_trait]
impl QueueBackend for SqsQueue {
    async fn send(&self, body: &str, delay: Duration) -> Result<String> {
        check_size(body, self.inner.max_message_bytes)?;
        let output = self
            .inner
            .client
            .send_message()
            .queue_url(&self.inner.queue_url)
            .message_body(body)
            .delay_seconds(whole_seconds(delay, MAX_DELAY))
            .send()
            .await
            .map_err(|e| self.fail("send", e))?;
        Ok(output.message_id().unwrap_or_default().to_owned())
    }

    async fn send_batch(&self, messages: &[OutgoingMessage]) -> Result<Vec<Result<String>>> {
        let limit = self.inner.max_message_bytes;
        let mut results: Vec<Option<Result<String>>> = messages.iter().map(|_| None).collect();

        // Pack the messages into calls of at most ten whose bodies together stay within the
        // size limit, which SQS applies to a batch as a whole too.
        let mut chunk: Vec<usize> = Vec::new();
        let mut chunk_bytes = 0;
        let mut chunks = Vec::new();
        for (i, message) in messages.iter().enumerate() {
            if let Err(err) = check_size(&message.body, limit) {
                results[i] = Some(Err(err));
                continue;
            }
            if chunk.len() == MAX_BATCH_SIZE || chunk_bytes + message.body.len() > limit {
                chunks.push(std::mem::take(&mut chunk));
                chunk_bytes = 0;
            }
            chunk.push(i);
            chunk_bytes += message.body.len();
        }
        if !chunk.is_empty() {
            chunks.push(chunk);
        }

        for indices in chunks {
            let batch: Vec<&OutgoingMessage> = indices.iter().map(|&i| &messages[i]).collect();
            match self.send_chunk(&self.inner.queue_url, &batch).await {
                Ok(outcomes) => {
                    for (&i, outcome) in indices.iter().zip(outcomes) {
                        results[i] = Some(outcome);
                    }
                }
                Err(err) => {
                    // One call failing says nothing about the others: report it per entry.
                    let text = chain(&err);
                    for &i in &indices {
                        results[i] = Some(Err(Error::queue(
                            "send_batch",
                            &self.inner.queue_url,
                            text.clone(),
                        )));
                    }
                }
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(unanswered("send_batch", &self.inner.queue_url))))
            .collect())
    }

    async fn receive(
        &self,
        max_messages: usize,
        wait: Duration,
        visibility_timeout: Duration,
    ) -> Result<Vec<ReceivedMessage>> {
        let wait_seconds = whole_seconds(wait, MAX_WAIT_TIME);
        // The attempt may take the whole long poll; only time beyond it means a hung call.
        let attempt_timeout = self.inner.attempt_timeout + secs(wait_seconds);
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(CONNECT_TIMEOUT.min(self.inner.attempt_timeout))
            .operation_attempt_timeout(attempt_timeout)
            .build();
        let output = self
            .inner
            .client
            .receive_message()
            .queue_url(&self.inner.queue_url)
            .max_number_of_messages(max_messages.clamp(1, MAX_BATCH_SIZE) as i32)
            .wait_time_seconds(wait_seconds)
            .visibility_timeout(whole_seconds(visibility_timeout, MAX_VISIBILITY_TIMEOUT))
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .customize()
            .config_override(aws_sdk_sqs::config::Builder::new().timeout_config(timeouts))
            .send()
            .await
            .map_err(|e| self.fail("receive", e))?;

        let mut received = Vec::new();
        for message in output.messages() {
            let (Some(message_id), Some(handle)) = (message.message_id(), message.receipt_handle())
            else {
                tracing::warn!("SQS returned a message without an id or receipt handle; skipped");
                continue;
            };
            let receive_count = message
                .attributes()
                .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                .and_then(|n| n.parse().ok())
                .unwrap_or(1);
            received.push(ReceivedMessage::new(
                message_id,
                handle,
                message.body().unwrap_or_default(),
                receive_count,
            ));
        }
        Ok(received)
    }

    async fn delete(&self, receipt_handle: &str) -> Result<()> {
        self.inner
            .client
            .delete_message()
            .queue_url(&self.inner.queue_url)
            .receipt_handle(receipt_handle)
            .send()
            .await
            .map_err(|e| self.fail("delete", e))?;
        Ok(())
    }

    async fn delete_batch(&self, receipt_handles: &[String]) -> Result<Vec<Result<()>>> {
        let mut results = Vec::with_capacity(receipt_handles.len());
        for chunk in receipt_handles.chunks(MAX_BATCH_SIZE) {
            results.extend(self.delete_chunk(&self.inner.queue_url, chunk).await?);
        }
        Ok(results)
    }

    async fn change_visibility(&self, receipt_handle: &str, timeout: Duration) -> Result<()> {
        self.inner
            .client
            .change_message_visibility()
            .queue_url(&self.inner.queue_url)
            .receipt_handle(receipt_handle)
            .visibility_timeout(whole_seconds(timeout, MAX_VISIBILITY_TIMEOUT))
            .send()
            .await
            .map_err(|e| self.fail("change_visibility", e))?;
        Ok(())
    }

    async fn change_visibility_batch(
        &self,
        changes: &[(String, Duration)],
    ) -> Result<Vec<Result<()>>> {
        let queue_url = &self.inner.queue_url;
        let mut results = Vec::with_capacity(changes.len());
        for chunk in changes.chunks(MAX_BATCH_SIZE) {
            let mut entries = Vec::with_capacity(chunk.len());
            for (i, (handle, timeout)) in chunk.iter().enumerate() {
                let entry = ChangeMessageVisibilityBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(handle)
                    .visibility_timeout(whole_seconds(*timeout, MAX_VISIBILITY_TIMEOUT))
                    .build()
                    .map_err(|e| Error::queue("change_visibility_batch", queue_url, e))?;
                entries.push(entry);
            }
            let output = self
                .inner
                .client
                .change_message_visibility_batch()
                .queue_url(queue_url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| self.fail("change_visibility_batch", e))?;
            let succeeded: Vec<&str> = output.successful().iter().map(|e| e.id()).collect();
            results.extend(merge_outcomes(
                "change_visibility_batch",
                queue_url,
                chunk.len(),
                &succeeded,
                failures(output.failed()),
            ));
        }
        Ok(results)
    }

    async fn dead_letter(&self, message: &ReceivedMessage, reason: &str) -> Result<()> {
        let dead_letter_url = &self.inner.dead_letter_url;
        let reason = truncate(reason, MAX_REASON_BYTES);
        let attributes = [
            (REASON_ATTRIBUTE, "String", reason.to_owned()),
            (SOURCE_ID_ATTRIBUTE, "String", message.message_id.clone()),
            (
                RECEIVE_COUNT_ATTRIBUTE,
                "Number",
                message.receive_count.to_string(),
            ),
        ];
        // SQS counts attributes (name, type and value) towards the message size.
        let attribute_bytes: usize = attributes
            .iter()
            .map(|(name, kind, value)| name.len() + kind.len() + value.len())
            .sum();
        let limit = self.inner.max_message_bytes;
        // The copy has a new message id: a body that named its request by the message id
        // names it in the body from now on, so that a redrive does not make a new request.
        let body = with_request_id(&message.body, &message.message_id, limit)
            .unwrap_or_else(|| message.body.clone());
        check_size(&body, limit)?;
        let keep_attributes = body.len() + attribute_bytes <= limit;
        if !keep_attributes {
            tracing::warn!(
                message_id = %message.message_id,
                reason,
                "message too close to the size limit to carry its dead-letter reason"
            );
        }

        let mut send = self
            .inner
            .client
            .send_message()
            .queue_url(dead_letter_url)
            .message_body(body);
        if keep_attributes {
            for (name, kind, value) in attributes {
                let value = MessageAttributeValue::builder()
                    .data_type(kind)
                    .string_value(value)
                    .build()
                    .map_err(|e| Error::queue("dead_letter", dead_letter_url, e))?;
                send = send.message_attributes(name, value);
            }
        }
        send.send()
            .await
            .map_err(|e| sdk_error("dead_letter", dead_letter_url, e))?;

        // Deleted only once the copy is safe: a failure here leaves the message to come
        // back, and a second copy in the dead-letter queue is the worst outcome.
        self.inner
            .client
            .delete_message()
            .queue_url(&self.inner.queue_url)
            .receipt_handle(&message.receipt_handle)
            .send()
            .await
            .map_err(|e| self.fail("dead_letter", e))?;
        Ok(())
    }

    async fn redrive_dead_letters(&self, max_messages: usize) -> Result<usize> {
        let dead_letter_url = &self.inner.dead_letter_url;
        let mut moved = 0;
        while moved < max_messages {
            let want = (max_messages - moved).min(MAX_BATCH_SIZE) as i32;
            let output = self
                .inner
                .client
                .receive_message()
                .queue_url(dead_letter_url)
                .max_number_of_messages(want)
                .wait_time_seconds(0)
                .visibility_timeout(whole_seconds(REDRIVE_VISIBILITY, MAX_VISIBILITY_TIMEOUT))
                .message_attribute_names(SOURCE_ID_ATTRIBUTE)
                .send()
                .await
                .map_err(|e| sdk_error("redrive_dead_letters", dead_letter_url, e))?;
            let limit = self.inner.max_message_bytes;
            let letters: Vec<(String, String)> = output
                .messages()
                .iter()
                .filter_map(|m| {
                    let body = m.body()?;
                    // The copy sent back gets a new message id: a body that named its
                    // request by a message id keeps naming that request. The id is the
                    // one the consumer knew (dead-lettered by it), or the message's own
                    // (moved unchanged by the queue's redrive policy).
                    let known_as = m
                        .message_attributes()
                        .and_then(|a| a.get(SOURCE_ID_ATTRIBUTE))
                        .and_then(|v| v.string_value())
                        .or(m.message_id());
                    let Some(body) = redriven_body(body, known_as?, limit) else {
                        // Left alone, it reappears in the dead-letter queue after the
                        // redrive's visibility timeout.
                        tracing::warn!(
                            message_id = known_as.unwrap_or_default(),
                            "too close to the size limit to be redriven as the same \
                             request; kept"
                        );
                        return None;
                    };
                    Some((body, m.receipt_handle()?.to_owned()))
                })
                .collect();
            if letters.is_empty() {
                break;
            }

            let outgoing: Vec<OutgoingMessage> = letters
                .iter()
                .map(|(body, _)| OutgoingMessage::new(body.clone()))
                .collect();
            let refs: Vec<&OutgoingMessage> = outgoing.iter().collect();
            let sent = self.send_chunk(&self.inner.queue_url, &refs).await?;
            // Only the messages now safely back in the queue leave the dead-letter queue;
            // the others reappear there after the redrive's visibility timeout.
            let handles: Vec<String> = letters
                .iter()
                .zip(&sent)
                .filter(|(_, outcome)| outcome.is_ok())
                .map(|((_, handle), _)| handle.clone())
                .collect();
            if handles.is_empty() {
                if let Some(Err(err)) = sent.into_iter().find(Result::is_err) {
                    return Err(err);
                }
                break;
            }
            for outcome in self.delete_chunk(dead_letter_url, &handles).await? {
                if let Err(err) = outcome {
                    tracing::warn!(
                        error = %chain(&err),
                        "a redriven message stays in the dead-letter queue too",
                    );
                }
            }
            moved += handles.len();
        }
        Ok(moved)
    }

    async fn depth(&self) -> Result<QueueDepth> {
        let main = counts(&self.inner.client, &self.inner.queue_url).await?;
        let dead = counts(&self.inner.client, &self.inner.dead_letter_url).await?;
        Ok(QueueDepth {
            visible: main[0],
            in_flight: main[1],
            delayed: main[2],
            dead_lettered: dead.iter().sum(),
        })
    }

    fn max_message_bytes(&self) -> usize {
        self.inner.max_message_bytes
    }
}

/// Refuses a dead-letter queue that is the queue itself: each dead-lettered message would
/// be delivered again, fail again and be dead-lettered again, for ever.
fn check_distinct(queue: &str, dead_letter: &str) -> Result<()> {
    // A URL ends in `<account>/<name>`; its host may be spelt several ways (legacy
    // endpoints), so only the name (and the account, where both are URLs) is compared.
    let tail = |q: &str| -> (Option<String>, String) {
        let q = q.trim_end_matches('/');
        if !is_url(q) {
            return (None, q.to_owned());
        }
        let mut parts = q.rsplit('/');
        let name = parts.next().unwrap_or_default().to_owned();
        (parts.next().map(str::to_owned), name)
    };
    let ((queue_account, queue_name), (dead_account, dead_name)) = (tail(queue), tail(dead_letter));
    let same_account = match (queue_account, dead_account) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    };
    if same_account && queue_name == dead_name {
        return Err(Error::InvalidConfig {
            name: "dead_letter_queue".to_owned(),
            value: dead_letter.to_owned(),
            expected: format!(
                "a queue other than {queue}: messages dead-lettered into their own queue \
                 would come back and fail for ever"
            ),
        });
    }
    Ok(())
}

fn is_url(queue: &str) -> bool {
    queue.starts_with("https://") || queue.starts_with("http://")
}

/// The URL of `queue`, given as a URL or a name.
async fn resolve_url(client: &Client, queue: &str) -> Result<String> {
    if is_url(queue) {
        return Ok(queue.to_owned());
    }
    let output = client
        .get_queue_url()
        .queue_name(queue)
        .send()
        .await
        .map_err(|e| sdk_error("connect", queue, e))?;
    output
        .queue_url()
        .map(str::to_owned)
        .ok_or_else(|| Error::queue("connect", queue, "SQS returned no URL for the queue"))
}

/// Creates (or finds) `dead_letter` and `queue`, the latter with a redrive policy to the
/// former; returns the queue's URL.
async fn create_pair(
    client: &Client,
    queue: &str,
    dead_letter: &str,
    max_receive_count: u32,
) -> Result<String> {
    let dead_letter_url = match resolve_url(client, dead_letter).await {
        Ok(url) => url,
        Err(_) => client
            .create_queue()
            .queue_name(dead_letter)
            .send()
            .await
            .map_err(|e| sdk_error("connect", dead_letter, e))?
            .queue_url()
            .map(str::to_owned)
            .ok_or_else(|| Error::queue("connect", dead_letter, "SQS returned no queue URL"))?,
    };
    if let Ok(url) = resolve_url(client, queue).await {
        return Ok(url);
    }

    let arn = attribute(client, &dead_letter_url, QueueAttributeName::QueueArn)
        .await?
        .ok_or_else(|| Error::queue("connect", &dead_letter_url, "the queue has no ARN"))?;
    let policy = serde_json::json!({
        "deadLetterTargetArn": arn,
        "maxReceiveCount": max_receive_count.to_string(),
    });
    let url = client
        .create_queue()
        .queue_name(queue)
        .attributes(QueueAttributeName::RedrivePolicy, policy.to_string())
        .send()
        .await
        .map_err(|e| sdk_error("connect", queue, e))?
        .queue_url()
        .map(str::to_owned)
        .ok_or_else(|| Error::queue("connect", queue, "SQS returned no queue URL"))?;
    tracing::info!(
        queue = %url,
        dead_letter_queue = %dead_letter_url,
        max_receive_count,
        "created SQS queues",
    );
    Ok(url)
}

/// The dead-letter queue named by `queue_url`'s redrive policy.
async fn redrive_target(client: &Client, queue_url: &str) -> Result<String> {
    let missing = || Error::InvalidConfig {
        name: "dead_letter_queue".to_owned(),
        value: String::new(),
        expected: format!("a dead-letter queue: give one, or set a redrive policy on {queue_url}"),
    };
    let policy = attribute(client, queue_url, QueueAttributeName::RedrivePolicy)
        .await?
        .ok_or_else(missing)?;
    let arn = serde_json::from_str::<serde_json::Value>(&policy)
        .ok()
        .and_then(|p| p.get("deadLetterTargetArn")?.as_str().map(str::to_owned))
        .ok_or_else(missing)?;
    // arn:aws:sqs:<region>:<account>:<name>
    let mut parts = arn.rsplitn(3, ':');
    let (Some(name), Some(account)) = (parts.next(), parts.next()) else {
        return Err(missing());
    };
    let output = client
        .get_queue_url()
        .queue_name(name)
        .queue_owner_aws_account_id(account)
        .send()
        .await
        .map_err(|e| sdk_error("connect", &arn, e))?;
    output
        .queue_url()
        .map(str::to_owned)
        .ok_or_else(|| Error::queue("connect", &arn, "SQS returned no URL for the queue"))
}

async fn attribute(
    client: &Client,
    queue_url: &str,
    name: QueueAttributeName,
) -> Result<Option<String>> {
    let output = client
        .get_queue_attributes()
        .queue_url(queue_url)
        .attribute_names(name.clone())
        .send()
        .await
        .map_err(|e| sdk_error("connect", queue_url, e))?;
    Ok(output.attributes().and_then(|a| a.get(&name)).cloned())
}

/// The queue's `MaximumMessageSize`, or SQS's limit when it does not say.
async fn size_limit(client: &Client, queue_url: &str) -> Result<usize> {
    Ok(
        attribute(client, queue_url, QueueAttributeName::MaximumMessageSize)
            .await?
            .and_then(|n| n.parse().ok())
            .unwrap_or(MAX_MESSAGE_BYTES)
            .min(MAX_MESSAGE_BYTES),
    )
}

/// Visible, in-flight and delayed messages of a queue.
async fn counts(client: &Client, queue_url: &str) -> Result<[u64; 3]> {
    let names = [
        QueueAttributeName::ApproximateNumberOfMessages,
        QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
        QueueAttributeName::ApproximateNumberOfMessagesDelayed,
    ];
    let output = client
        .get_queue_attributes()
        .queue_url(queue_url)
        .set_attribute_names(Some(names.to_vec()))
        .send()
        .await
        .map_err(|e| sdk_error("depth", queue_url, e))?;
    let attributes = output.attributes().cloned().unwrap_or_default();
    Ok(names.map(|name| {
        attributes
            .get(&name)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }))
}

/// A duration in whole seconds, rounded up (SQS takes seconds; a delay must not shrink),
/// at most `max`.
fn whole_seconds(duration: Duration, max: Duration) -> i32 {
    let duration = duration.min(max);
    let seconds = duration.as_secs() + u64::from(duration.subsec_nanos() > 0);
    i32::try_from(seconds).unwrap_or(i32::MAX)
}

fn secs(seconds: i32) -> Duration {
    Duration::from_secs(u64::try_from(seconds).unwrap_or(0))
}

/// The longest prefix of `text` of at most `max` bytes that ends on a character boundary.
fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// An SDK error with everything it knows in its message: the service's code and text, or
/// the transport fault.
fn sdk_error<E>(operation: &'static str, queue: &str, err: SdkError<E>) -> Error
where
    E: std::error::Error + Send + Sync + 'static,
{
    Error::queue(operation, queue, DisplayErrorContext(err).to_string())
}

fn entry_error(
    operation: &'static str,
    queue: &str,
    entry: &aws_sdk_sqs::types::BatchResultErrorEntry,
) -> Error {
    Error::queue(
        operation,
        queue,
        format!(
            "{}: {}",
            entry.code(),
            entry.message().unwrap_or("no message")
        ),
    )
}

fn unanswered(operation: &'static str, queue: &str) -> Error {
    Error::queue(operation, queue, "SQS did not report on this entry")
}

/// The failed entries of a batch call, by entry id.
fn failures(failed: &[aws_sdk_sqs::types::BatchResultErrorEntry]) -> HashMap<String, String> {
    failed
        .iter()
        .map(|e| {
            (
                e.id().to_owned(),
                format!("{}: {}", e.code(), e.message().unwrap_or("no message")),
            )
        })
        .collect()
}

/// One outcome per entry (ids are the entries' indices), from a batch call's report.
fn merge_outcomes(
    operation: &'static str,
    queue: &str,
    len: usize,
    succeeded: &[&str],
    mut failed: HashMap<String, String>,
) -> Vec<Result<()>> {
    (0..len)
        .map(|i| {
            let id = i.to_string();
            if let Some(problem) = failed.remove(&id) {
                Err(Error::queue(operation, queue, problem))
            } else if succeeded.contains(&id.as_str()) {
                Ok(())
            } else {
                Err(unanswered(operation, queue))
            }
        })
        .collect()
}

/// An error and its causes on one line, for the log.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_round_up_to_whole_seconds_within_the_limit() {
        assert_eq!(whole_seconds(Duration::ZERO, MAX_DELAY), 0);
        assert_eq!(whole_seconds(Duration::from_millis(1), MAX_DELAY), 1);
        assert_eq!(whole_seconds(Duration::from_millis(2_500), MAX_DELAY), 3);
        assert_eq!(whole_seconds(Duration::from_secs(5_000), MAX_DELAY), 900);
    }

    #[test]
    fn the_queue_cannot_be_its_own_dead_letter_queue() {
        let url = "http://127.0.0.1:5000/123456789012/jobs";
        for (queue, dead) in [
            ("jobs", "jobs"),
            (url, url),
            (url, "jobs"),
            (
                "jobs",
                "https://sqs.us-east-1.amazonaws.com/123456789012/jobs/",
            ),
        ] {
            let err = check_distinct(queue, dead).unwrap_err();
            assert!(
                matches!(err, Error::InvalidConfig { ref name, .. } if name == "dead_letter_queue"),
                "{queue} / {dead}: {err:?}"
            );
        }
        check_distinct("jobs", "jobs-dlq").unwrap();
        check_distinct(url, "http://127.0.0.1:5000/210987654321/jobs").unwrap();
    }

    #[test]
    fn reasons_are_cut_on_a_character_boundary() {
        let reason = "é".repeat(600); // 1200 bytes
        let cut = truncate(&reason, MAX_REASON_BYTES);
        assert_eq!(cut.len(), 1024);
        assert!(cut.chars().all(|c| c == 'é'));
        assert_eq!(truncate("short", 1024), "short");
    }

    #[test]
    fn batch_reports_become_one_outcome_per_entry() {
        let mut failed = HashMap::new();
        failed.insert("1".to_owned(), "ReceiptHandleIsInvalid: gone".to_owned());
        let outcomes = merge_outcomes("delete_batch", "q", 3, &["0"], failed);
        assert!(outcomes[0].is_ok());
        let second = outcomes[1].as_ref().unwrap_err();
        assert!(
            chain(second).contains("ReceiptHandleIsInvalid: gone"),
            "{second}"
        );
        let third = outcomes[2].as_ref().unwrap_err();
        assert!(chain(third).contains("did not report"), "{third}");
    }
}
