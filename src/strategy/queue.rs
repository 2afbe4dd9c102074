//! The queue strategy: each submit stores the request and sends it as a message; consumers
//! receive messages, claim the request each one names, and run it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::ProcessingStrategy;
use super::execution::{AttemptEnd, AttemptSettings, drain_attempts, run_attempt};
use super::writer::BatchWriter;
use crate::config::QueueConfig;
use crate::error::{Error, Result};
use crate::executor::ExecutorRegistry;
use crate::model::{MessageMetadata, NewRequest, Request, RequestId, RequestMessage};
use crate::queue::{MAX_BATCH_SIZE, MAX_DELAY, OutgoingMessage, QueueBackend, QueueDepth};
use crate::queue::{MAX_VISIBILITY_TIMEOUT, ReceivedMessage};
use crate::status::RequestStatus;
use crate::store::{CancelOutcome, InsertOutcome, ListFilter, RequestStore, now};

const STRATEGY: &str = "queue";

/// How often the queue's depth is published to metrics.
const DEPTH_INTERVAL: Duration = Duration::from_secs(15);

/// A request due this soon is run now rather than put back to wait.
const EARLY_TOLERANCE: Duration = Duration::from_secs(1);

/// Tries of a send at submit, and of a final queue action, before leaving it to the
/// outbox or to the message's visibility timeout.
const TRIES: u32 = 3;

/// How long a consumer without long polling (`long_polling_wait_time` 0) pauses after a
/// receive that found nothing.
const EMPTY_RECEIVE_PAUSE: Duration = Duration::from_secs(1);

/// Longest a submit spends sending its message, all tries together, before leaving it to
/// the outbox: a queue that does not answer must not hold the caller for minutes (the
/// SDK's own tries and timeouts add up to about 90 s).
const SUBMIT_SEND_BUDGET: Duration = Duration::from_secs(3);

/// Longest the queue action that settles a delivery may go on once running requests are
/// handed back at shutdown; an action cut short leaves the message to come back after its
/// visibility timeout, which is safe.
const SETTLE_AFTER_HAND_BACK: Duration = Duration::from_secs(2);

/// Longest pause between two attempts of the outbox to send what submit could not.
const OUTBOX_MAX_PAUSE: Duration = Duration::from_secs(30);

/// Separates the worker id from the message id in a queue consumer's lease owner.
const OWNER_SEPARATOR: char = '@';

/// What one reconciliation pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReconcileReport {
    /// In-flight requests returned to `PENDING` (or `FAILED`) because their lease had
    /// lapsed for longer than `reconcile_after`: their consumer and its message are gone.
    pub rescued: usize,
    /// `PENDING` requests sent a new message because none had delivered them for longer
    /// than `reconcile_after`.
    pub resent: usize,
}

/// Requests are stored, then delivered to consumers through a message queue ([`QueueBackend`]):
/// [`SqsQueue`](crate::SqsQueue) in production, [`MemoryQueue`](crate::MemoryQueue) in tests or a
/// single process.
///
/// **Submitting** stores the request as `PENDING`, then sends a message in the wire shape
/// ([`RequestMessage`]). A message that would be too large is refused with
/// [`Error::MessageTooLarge`] before anything is stored. A send that fails transiently is
/// tried up to twice more, within 3 s in all; after that the request is accepted anyway and
/// an outbox keeps sending it in the background, and the reconciler (below) is the net
/// under a process that dies first.
///
/// **Consuming**: up to [`QueueConfig::max_workers`] requests run at once. The consumer
/// receives batches of up to 10 messages (never more than it has free workers) with long
/// polls of [`QueueConfig::long_polling_wait_time`]. For each message it:
///
/// 1. parses and validates it; a body that is not a request message, has a bad field, or
///    names a request type with no executor is dead-lettered at once with the reason;
/// 2. finds the request by `request_id` (a message without one uses its message id), or
///    stores it from the message: messages from other producers run like the library's. A
///    message whose request is not stored and whose `metadata.submitted_at` is older than
///    [`QueueConfig::cleanup_completed_after`] is dead-lettered instead: its request may
///    have finished and been pruned;
/// 3. deletes the message if the request is already finished; claims it
///    ([`RequestStore::claim_request`]) if it is `PENDING` (putting it back for later if
///    its scheduled retry is not due); deletes it as a duplicate if another message's
///    consumer holds the request; waits for the lease if this message's earlier consumer
///    holds it; rescues the request if that lease has lapsed;
/// 4. runs the claimed request on the shared execution path, extending the message's
///    visibility and the request's lease every third of the visibility timeout;
/// 5. settles the message by the outcome: `COMPLETED` -> deleted; a retry scheduled ->
///    hidden for the backoff, without resetting its receive count; `FAILED` ->
///    dead-lettered with the last error; cancelled or taken over -> deleted once the
///    request is finished, made visible again if it is `PENDING`; handed back at shutdown
///    -> visible again at once; outcome not recorded (store down) -> left to come back
///    after its visibility timeout.
///
/// A consumer's lease owner is `<worker id>@<message id>`, so any consumer can tell
/// whether a delivery is the message an attempt is running for or a duplicate.
///
/// **Reconciling**: every [`QueueConfig::reconcile_interval`], requests that have been
/// `PENDING` for longer than [`QueueConfig::reconcile_after`] (counted from their last
/// change or their scheduled retry, whichever is later) are sent a new message, at most
/// once per `reconcile_after`; in-flight requests whose lease lapsed that long ago are
/// rescued first. Duplicate messages are harmless: the consumer drops them.
///
/// **Shutdown**: an open long poll is abandoned at once, and so are the reconciler's, the
/// depth refresh's and the extender's queue calls; running requests get
/// [`QueueConfig::shutdown_grace_period`]; those still running are handed back (`PENDING`,
/// message visible again), their queue action cut short after 2 s more.
///
/// # Examples
///
/// ```
/// use root_orchestrator::{MemoryQueue, MemoryStore, QueueConfig, QueueStrategy};
///
/// let config = QueueConfig::default();
/// let strategy = QueueStrategy::new(MemoryStore::new(), MemoryQueue::new(), config)?;
/// assert!(strategy.worker_id().starts_with("queue-"));
/// # Ok::<(), root_orchestrator::Error>(())
/// ```
#[derive(Clone)]
pub struct QueueStrategy {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn RequestStore>,
    /// Group commit for the attempts' writes.
    writer: BatchWriter,
    queue: Arc<dyn QueueBackend>,
    config: QueueConfig,
    worker_id: String,
    /// The deliveries this process is running, by request.
    running: Mutex<HashMap<RequestId, Arc<Delivery>>>,
    /// Stored `PENDING` requests whose message could not be sent yet (the outbox).
    unsent: Mutex<HashSet<RequestId>>,
    /// Whether the outbox task is running.
    outbox_active: AtomicBool,
    /// When the reconciler last sent each request a message, so that a slow queue does
    /// not get a copy per pass.
    resent: Mutex<HashMap<RequestId, Instant>>,
    /// Whether `run` is under way: a second consumer loop would break `max_workers`.
    active: AtomicBool,
}

/// A message whose request this process is running.
struct Delivery {
    message_id: String,
    cancel: CancellationToken,
    state: tokio::sync::Mutex<DeliveryState>,
}

struct DeliveryState {
    /// The newest delivery of the message: its receipt handle is the one that works.
    message: ReceivedMessage,
    /// The attempt has ended and its queue action is taken or under way.
    settled: bool,
}

impl std::fmt::Debug for QueueStrategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueStrategy")
            .field("worker_id", &self.inner.worker_id)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl QueueStrategy {
    /// A strategy over `store` and `queue` with `config`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the bad setting.
    pub fn new(
        store: impl RequestStore,
        queue: impl QueueBackend,
        config: QueueConfig,
    ) -> Result<Self> {
        Self::with_shared(Arc::new(store), Arc::new(queue), config)
    }

    /// Like [`new`](Self::new), for a store and queue shared with other parts of the host.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the bad setting.
    pub fn with_shared(
        store: Arc<dyn RequestStore>,
        queue: Arc<dyn QueueBackend>,
        config: QueueConfig,
    ) -> Result<Self> {
        config.validate()?;
        Ok(QueueStrategy {
            inner: Arc::new(Inner {
                writer: BatchWriter::new(store.clone()),
                store,
                queue,
                config,
                worker_id: super::worker_id(STRATEGY),
                running: Mutex::new(HashMap::new()),
                unsent: Mutex::new(HashSet::new()),
                outbox_active: AtomicBool::new(false),
                resent: Mutex::new(HashMap::new()),
                active: AtomicBool::new(false),
            }),
        })
    }

    /// This process's worker id; its leases are owned by `<worker id>@<message id>`.
    pub fn worker_id(&self) -> &str {
        &self.inner.worker_id
    }

    /// The settings in force.
    pub fn config(&self) -> &QueueConfig {
        &self.inner.config
    }

    /// The queue requests travel through.
    pub fn queue(&self) -> Arc<dyn QueueBackend> {
        self.inner.queue.clone()
    }

    /// How many messages the queue and its dead-letter queue hold.
    ///
    /// # Errors
    ///
    /// [`Error::Queue`] when the queue cannot be reached.
    pub async fn depth(&self) -> Result<QueueDepth> {
        self.inner.queue.depth().await
    }

    /// Moves up to `max_messages` dead-lettered messages back to the queue, to be
    /// delivered again; returns how many were moved.
    ///
    /// Useful once the cause is fixed: a request type that now has an executor, a
    /// consumer that no longer crashes. A redrive is a resubmission: the copy names the
    /// request it was known by and counts as submitted now. A message whose request has
    /// finished (`FAILED` included) is dropped on delivery: the request's outcome stands;
    /// one whose request was never stored, or was pruned since, runs. A message too close to
    /// the size limit to carry its request id stays dead-lettered (and is not counted).
    ///
    /// # Errors
    ///
    /// [`Error::Queue`] when a queue cannot be reached; messages moved before stay moved.
    pub async fn redrive_dead_letters(&self, max_messages: usize) -> Result<usize> {
        let moved = self.inner.queue.redrive_dead_letters(max_messages).await?;
        if moved > 0 {
            metrics::counter!(
                "root_orchestrator_queue_messages_redriven_total",
                "strategy" => STRATEGY,
            )
            .increment(moved as u64);
            tracing::info!(moved, "dead-lettered messages moved back to the queue");
        }
        Ok(moved)
    }

    /// Runs one reconciliation pass now (the consumers run one every
    /// [`QueueConfig::reconcile_interval`]): rescues requests whose lease lapsed more than
    /// `reconcile_after` ago, then sends a new message for each request `PENDING` for
    /// longer than `reconcile_after`.
    ///
    /// # Errors
    ///
    /// A store error when the requests cannot be listed; failed sends are logged and tried
    /// again on the next pass.
    pub async fn reconcile(&self) -> Result<ReconcileReport> {
        self.inner.reconcile().await
    }
}

#[async_trait]
impl ProcessingStrategy for QueueStrategy {
    fn name(&self) -> &'static str {
        STRATEGY
    }

    fn store(&self) -> Arc<dyn RequestStore> {
        self.inner.store.clone()
    }

    /// Both halves must answer: a request can neither be stored nor delivered without them.
    async fn ready(&self) -> Result<()> {
        self.inner.store.ping().await?;
        self.inner.queue.depth().await.map(|_| ())
    }

    async fn submit(&self, request: NewRequest) -> Result<InsertOutcome> {
        let inner = &self.inner;
        inner.check_fits(&request)?;

        let outcome = inner
            .store
            .insert(request, inner.config.default_max_attempts())
            .await?;
        inner.deliver(&outcome).await?;
        Ok(outcome)
    }

    async fn submit_many(&self, requests: Vec<NewRequest>) -> Result<Vec<InsertOutcome>> {
        let inner = &self.inner;
        // Every message must fit before any request is stored: the batch is all or none.
        for request in &requests {
            inner.check_fits(request)?;
        }

        let outcomes = inner
            .store
            .insert_many(requests, inner.config.default_max_attempts())
            .await?;
        for outcome in &outcomes {
            inner.deliver(outcome).await?;
        }
        Ok(outcomes)
    }

    async fn status(&self, id: &RequestId) -> Result<Option<Request>> {
        self.inner.store.get(id).await
    }

    async fn cancel(&self, id: &RequestId) -> Result<CancelOutcome> {
        let outcome = self.inner.store.cancel(id, "cancelled by caller").await?;
        if let CancelOutcome::Cancelled { previous } = outcome {
            tracing::info!(request_id = %id, previous = %previous, "request cancelled");
            // A pending request's message is dropped when it is delivered; one running in
            // another process learns of the cancel from its next heartbeat.
            if let Some(delivery) = self.inner.running().get(id) {
                delivery.cancel.cancel();
            }
        }
        Ok(outcome)
    }

    async fn run(
        &self,
        executors: Arc<ExecutorRegistry>,
        shutdown: CancellationToken,
    ) -> Result<()> {
        let inner = self.inner.clone();
        if inner.active.swap(true, Ordering::SeqCst) {
            return Err(Error::AlreadyRunning { strategy: STRATEGY });
        }
        let result = inner.clone().consume(executors, shutdown).await;
        inner.active.store(false, Ordering::SeqCst);
        result
    }
}

impl Inner {
    fn running(&self) -> MutexGuard<'_, HashMap<RequestId, Arc<Delivery>>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn unsent(&self) -> MutexGuard<'_, HashSet<RequestId>> {
        self.unsent.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn resent(&self) -> MutexGuard<'_, HashMap<RequestId, Instant>> {
        self.resent.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn attempt_settings(&self) -> AttemptSettings {
        AttemptSettings {
            strategy: STRATEGY,
            heartbeat_interval: self.config.heartbeat_interval(),
            // The lease lapses when the message would: whoever gets the message next finds
            // the lease expired and can take the request over.
            lease_duration: self.config.visibility_timeout,
            cancel_grace_period: self.config.cancel_grace_period,
            execution_timeout: self.config.execution_timeout,
            backoff: self.config.backoff,
        }
    }

    fn owner(&self, message: &ReceivedMessage) -> String {
        format!("{}{OWNER_SEPARATOR}{}", self.worker_id, message.message_id)
    }

    /// Sends the message of a request a submit has just stored.
    async fn deliver(self: &Arc<Self>, outcome: &InsertOutcome) -> Result<()> {
        match outcome {
            InsertOutcome::Inserted(request) => {
                metrics::counter!(
                    "root_orchestrator_requests_submitted_total",
                    "strategy" => STRATEGY,
                    "request_type" => request.request_type.to_string(),
                )
                .increment(1);
                self.send_new(request).await?;
            }
            // A repeated submit of a request whose send failed is a good moment to try again.
            InsertOutcome::Existing(request)
                if request.status == RequestStatus::Pending
                    && self.unsent().contains(&request.id) =>
            {
                self.send_new(request).await?;
            }
            InsertOutcome::Existing(_) => {}
        }
        Ok(())
    }

    /// Refuses a request whose message the queue would not take, before it is stored.
    fn check_fits(&self, request: &NewRequest) -> Result<()> {
        let max_attempts = request
            .max_attempts
            .unwrap_or(self.config.default_max_attempts());
        // The id and timestamp are as long as the stored ones can be, so the estimate never
        // falls short of the message that is sent.
        let message = RequestMessage {
            request_id: Some(
                request
                    .request_id
                    .as_ref()
                    .map_or_else(|| RequestId::generate().to_string(), ToString::to_string),
            ),
            project_id: request.project_id.clone(),
            user_id: request.user_id.clone(),
            request_type: request.request_type.to_string(),
            priority: request.priority,
            configuration: request.configuration.clone(),
            metadata: Some(MessageMetadata {
                submitted_at: Utc::now(),
                retry_count: 0,
                max_retries: max_attempts.saturating_sub(1),
            }),
        };
        let body = body_of(&message)?;
        crate::queue::check_size(&body, self.queue.max_message_bytes())
    }

    /// Sends the message of a newly stored request, trying a few times within
    /// [`SUBMIT_SEND_BUDGET`]; what still fails goes to the outbox. A message the queue can
    /// never take cancels the request.
    async fn send_new(self: &Arc<Self>, request: &Request) -> Result<()> {
        let body = body_of(&RequestMessage::from_request(request))?;
        let delay = until(request.run_after).min(MAX_DELAY);
        let deadline = Instant::now() + SUBMIT_SEND_BUDGET;
        let mut pause = Duration::from_millis(100);
        for attempt in 1..=TRIES {
            // A send cut short may still have arrived: the outbox's copy is then a
            // duplicate, which consumers drop.
            let sent = tokio::time::timeout_at(deadline, self.queue.send(&body, delay))
                .await
                .unwrap_or_else(|_| {
                    Err(Error::queue(
                        "send",
                        "queue",
                        format!(
                            "no answer within {} s at submit",
                            SUBMIT_SEND_BUDGET.as_secs()
                        ),
                    ))
                });
            match sent {
                Ok(message_id) => {
                    self.unsent().remove(&request.id);
                    tracing::debug!(request_id = %request.id, %message_id, "request sent");
                    return Ok(());
                }
                Err(err @ Error::MessageTooLarge { .. }) => {
                    let reason = format!("its message could not be sent: {err}");
                    if let Err(cancel_err) = self.store.cancel(&request.id, &reason).await {
                        tracing::error!(
                            request_id = %request.id,
                            error = %chain(&cancel_err),
                            "could not cancel an unsendable request",
                        );
                    }
                    return Err(err);
                }
                // Only what may pass on a second try, and only while the budget lasts.
                Err(err)
                    if attempt < TRIES
                        && err.is_transient()
                        && Instant::now() + pause < deadline =>
                {
                    tracing::warn!(
                        request_id = %request.id,
                        attempt,
                        error = %chain(&err),
                        "send failed; trying again",
                    );
                    tokio::time::sleep(pause).await;
                    pause *= 4;
                }
                Err(err) => {
                    metrics::counter!(
                        "root_orchestrator_queue_send_failures_total",
                        "strategy" => STRATEGY,
                    )
                    .increment(1);
                    tracing::warn!(
                        request_id = %request.id,
                        error = %chain(&err),
                        "send failed; the request is stored and the outbox will keep sending it"
                    );
                    self.unsent().insert(request.id.clone());
                    self.schedule_outbox();
                    break;
                }
            }
        }
        Ok(())
    }

    /// Starts the outbox task unless it runs already.
    fn schedule_outbox(self: &Arc<Self>) {
        if self.outbox_active.swap(true, Ordering::SeqCst) {
            return;
        }
        let inner = self.clone();
        let span = tracing::info_span!("queue_outbox", worker = %self.worker_id);
        tokio::spawn(inner.drain_outbox().instrument(span));
    }

    /// Sends the outbox's requests until it is empty, backing off while the queue fails.
    async fn drain_outbox(self: Arc<Self>) {
        let mut pause = Duration::from_secs(1);
        loop {
            tokio::time::sleep(pause).await;
            let ids: Vec<RequestId> = self.unsent().iter().cloned().collect();
            if ids.is_empty() {
                self.outbox_active.store(false, Ordering::SeqCst);
                // A send that failed between the look and the flag would otherwise wait
                // for the reconciler.
                if self.unsent().is_empty() || self.outbox_active.swap(true, Ordering::SeqCst) {
                    return;
                }
                continue;
            }
            let mut pending = Vec::new();
            for id in ids {
                match self.store.get(&id).await {
                    Ok(Some(request)) if request.status == RequestStatus::Pending => {
                        pending.push(request)
                    }
                    // Claimed through a message after all, cancelled, or gone.
                    Ok(_) => {
                        self.unsent().remove(&id);
                    }
                    Err(err) => {
                        tracing::warn!(
                            request_id = %id,
                            error = %chain(&err),
                            "outbox cannot read the request",
                        )
                    }
                }
            }
            let sent = self.send_messages(&pending, "outbox").await;
            pause = if sent == pending.len() {
                Duration::from_secs(1)
            } else {
                (pause * 2).min(OUTBOX_MAX_PAUSE)
            };
        }
    }

    /// Sends a message for each request; returns how many were sent.
    async fn send_messages(&self, requests: &[Request], why: &'static str) -> usize {
        let mut sent = 0;
        for chunk in requests.chunks(MAX_BATCH_SIZE) {
            let mut batch = Vec::new();
            let mut ids = Vec::new();
            for request in chunk {
                match body_of(&RequestMessage::from_request(request)) {
                    Ok(body) => {
                        batch.push(OutgoingMessage::new(body));
                        ids.push(request.id.clone());
                    }
                    Err(err) => {
                        tracing::error!(
                            request_id = %request.id,
                            error = %chain(&err),
                            "cannot render the request's message",
                        )
                    }
                }
            }
            let outcomes = match self.queue.send_batch(&batch).await {
                Ok(outcomes) => outcomes,
                Err(err) => {
                    tracing::warn!(
                        error = %chain(&err),
                        why,
                        "could not send messages; will try again",
                    );
                    continue;
                }
            };
            for (id, outcome) in ids.into_iter().zip(outcomes) {
                match outcome {
                    Ok(message_id) => {
                        sent += 1;
                        self.unsent().remove(&id);
                        self.resent().insert(id.clone(), Instant::now());
                        metrics::counter!(
                            "root_orchestrator_queue_messages_resent_total",
                            "strategy" => STRATEGY,
                            "why" => why,
                        )
                        .increment(1);
                        tracing::info!(
                            request_id = %id,
                            %message_id,
                            why,
                            "sent the request a new message",
                        );
                    }
                    Err(err) => {
                        tracing::warn!(
                            request_id = %id,
                            error = %chain(&err),
                            why,
                            "could not send the request's message; will try again",
                        )
                    }
                }
            }
        }
        sent
    }

    async fn reconcile(&self) -> Result<ReconcileReport> {
        let mut report = ReconcileReport::default();

        // Leases whose message went missing: the consumer that held both died after its
        // message was dropped. Ordinary lapses are handled by the message's next delivery,
        // which also decides whether the message is dead-lettered.
        let lapsed_long_ago = after_now(-signed(self.config.reconcile_after));
        let mut lost = false;
        for status in RequestStatus::IN_FLIGHT {
            lost |= self.all(status).await?.iter().any(|r| {
                r.lease
                    .as_ref()
                    .is_none_or(|l| l.expires_at < lapsed_long_ago)
            });
        }
        if lost {
            for rescued in self.store.rescue_expired().await? {
                report.rescued += 1;
                metrics::counter!(
                    "root_orchestrator_requests_rescued_total",
                    "strategy" => STRATEGY,
                )
                .increment(1);
                tracing::warn!(
                    request_id = %rescued.request_id,
                    previous_owner = %rescued.previous_owner,
                    status = %rescued.status,
                    "rescued a request whose lease lapsed long ago"
                );
            }
        }

        let stale_since = after_now(-signed(self.config.reconcile_after));
        let mut stale = Vec::new();
        {
            let pending = self.all(RequestStatus::Pending).await?;
            let running = self.running();
            let resent = self.resent();
            for request in pending {
                let last_change = request.history.last().map_or(request.created_at, |c| c.at);
                let quiet_since = last_change.max(request.run_after);
                let resent_lately = resent
                    .get(&request.id)
                    .is_some_and(|at| at.elapsed() < self.config.reconcile_after);
                if quiet_since < stale_since && !running.contains_key(&request.id) && !resent_lately
                {
                    stale.push(request);
                }
            }
        }
        if !stale.is_empty() {
            tracing::warn!(
                stale = stale.len(),
                "requests pending with no delivery for longer than reconcile_after"
            );
            report.resent = self.send_messages(&stale, "reconciler").await;
        }

        // Forget what cannot matter any more, so the map does not grow without end.
        let horizon = self.config.reconcile_after * 2;
        self.resent().retain(|_, at| at.elapsed() < horizon);
        Ok(report)
    }

    /// Every request in `status`, page by page.
    async fn all(&self, status: RequestStatus) -> Result<Vec<Request>> {
        let mut filter = ListFilter::new()
            .with_status(status)
            .with_limit(ListFilter::MAX_LIMIT);
        let mut requests = Vec::new();
        loop {
            let page = self.store.list(&filter).await?;
            requests.extend(page.requests);
            match page.next {
                Some(cursor) => filter = filter.after(cursor),
                None => return Ok(requests),
            }
        }
    }

    async fn prune(&self) {
        let cutoff = after_now(-signed(self.config.cleanup_completed_after));
        match self.store.prune_finished(cutoff).await {
            Ok(0) => {}
            Ok(pruned) => tracing::info!(pruned, "pruned finished requests"),
            Err(err) => tracing::warn!(error = %chain(&err), "pruning failed; will try again"),
        }
    }

    /// Publishes the queue's depth and the requests per status, for dashboards.
    async fn publish_depth(&self) {
        match self.queue.depth().await {
            Ok(depth) => {
                for (state, n) in [
                    ("visible", depth.visible),
                    ("in_flight", depth.in_flight),
                    ("delayed", depth.delayed),
                ] {
                    metrics::gauge!(
                        "root_orchestrator_queue_depth",
                        "strategy" => STRATEGY,
                        "state" => state,
                    )
                    .set(n as f64);
                }
                metrics::gauge!("root_orchestrator_queue_dead_letter_depth", "strategy" => STRATEGY)
                    .set(depth.dead_lettered as f64);
            }
            Err(err) => tracing::warn!(error = %chain(&err), "could not read the queue's depth"),
        }
        if let Ok(counts) = self.store.count_by_status().await {
            for status in RequestStatus::ALL {
                let n = counts.get(&status).copied().unwrap_or(0);
                metrics::gauge!(
                    "root_orchestrator_requests",
                    "strategy" => STRATEGY,
                    "status" => status.as_str(),
                )
                .set(n as f64);
            }
        }
    }

    /// The reconciler, the pruner and the metrics, until `stop`.
    async fn maintain(self: Arc<Self>, stop: CancellationToken) {
        // The first pass runs at once: a process that starts after a crash finds what the
        // crash left without a message.
        let mut reconcile_tick = tokio::time::interval(self.config.reconcile_interval);
        let mut prune_tick = tokio::time::interval_at(
            Instant::now() + self.config.prune_interval,
            self.config.prune_interval,
        );
        let mut depth_tick = tokio::time::interval(DEPTH_INTERVAL);
        for tick in [&mut reconcile_tick, &mut prune_tick, &mut depth_tick] {
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        // Each pass is raced against `stop` too: a queue or store that stops answering must
        // not hold up shutdown. A pass cut short is safe: the next process redoes it.
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = reconcile_tick.tick() => {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        result = self.reconcile() => if let Err(err) = result {
                            tracing::warn!(
                                error = %chain(&err),
                                "reconciliation failed; will try again",
                            );
                        }
                    }
                }
                _ = prune_tick.tick() => tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = self.prune() => {}
                },
                _ = depth_tick.tick() => tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = self.publish_depth() => {}
                },
            }
        }
    }

    /// Keeps the messages of running requests hidden, until `stop`.
    async fn extend_visibility(self: Arc<Self>, stop: CancellationToken) {
        let every = self.config.heartbeat_interval();
        let mut tick = tokio::time::interval_at(Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let deliveries: Vec<Arc<Delivery>> = self.running().values().cloned().collect();
            // A delivery being settled is skipped: its final action must not be undone by
            // an extension that lands after it.
            let held: Vec<_> = deliveries
                .iter()
                .filter_map(|d| d.state.try_lock().ok())
                .filter(|state| !state.settled)
                .collect();
            if held.is_empty() {
                continue;
            }
            let changes: Vec<(String, Duration)> = held
                .iter()
                .map(|s| {
                    (
                        s.message.receipt_handle.clone(),
                        self.config.visibility_timeout,
                    )
                })
                .collect();
            // Raced against `stop`, as in `maintain`: an extension that never returns must not
            // hold up shutdown.
            let extended = tokio::select! {
                _ = stop.cancelled() => return,
                extended = self.queue.change_visibility_batch(&changes) => extended,
            };
            match extended {
                Ok(outcomes) => {
                    for (state, outcome) in held.iter().zip(outcomes) {
                        if let Err(err) = outcome {
                            // It comes back to this or another consumer, which sees the
                            // request still leased to this message and waits.
                            tracing::warn!(
                                message_id = %state.message.message_id,
                                error = %chain(&err),
                                "could not extend a running request's message"
                            );
                        }
                    }
                }
                Err(err) => {
                    tracing::warn!(
                        error = %chain(&err),
                        "could not extend running requests' messages",
                    )
                }
            }
        }
    }

    /// The consumer loop and its helpers until `shutdown`, then the drain.
    async fn consume(
        self: Arc<Self>,
        executors: Arc<ExecutorRegistry>,
        shutdown: CancellationToken,
    ) -> Result<()> {
        let config = self.config.clone();
        let span = tracing::info_span!("queue_consumers", worker = %self.worker_id);

        let slots = Arc::new(Semaphore::new(config.max_workers));
        let hand_back = CancellationToken::new();
        let helpers_stop = CancellationToken::new();
        let maintenance = tokio::spawn(
            self.clone()
                .maintain(helpers_stop.clone())
                .instrument(span.clone()),
        );
        let extender = tokio::spawn(
            self.clone()
                .extend_visibility(helpers_stop.clone())
                .instrument(span.clone()),
        );
        let mut deliveries = JoinSet::new();
        tracing::info!(
            parent: &span,
            max_workers = config.max_workers,
            long_polling_wait_secs = config.long_polling_wait_time.as_secs_f64(),
            visibility_timeout_secs = config.visibility_timeout.as_secs_f64(),
            "consumers started"
        );

        let mut failures = 0u32;
        loop {
            while deliveries.try_join_next().is_some() {}

            // Only receive what free workers can start: a message held without a worker
            // would sit out its visibility timeout.
            let first = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                permit = slots.clone().acquire_owned() => permit,
            };
            let Ok(first) = first else { break };
            let mut permits = vec![first];
            while permits.len() < MAX_BATCH_SIZE {
                match slots.clone().try_acquire_owned() {
                    Ok(permit) => permits.push(permit),
                    Err(_) => break,
                }
            }

            let received = tokio::select! {
                biased;
                // Abandons an open long poll: shutdown must not wait up to 20 s for it.
                _ = shutdown.cancelled() => break,
                received = self.queue.receive(
                    permits.len(),
                    config.long_polling_wait_time,
                    config.visibility_timeout,
                ) => received,
            };
            match received {
                Ok(messages) => {
                    failures = 0;
                    if messages.is_empty() && config.long_polling_wait_time.is_zero() {
                        // Without long polling an empty queue answers at once: pause, or an
                        // idle consumer would call the queue in a hot loop.
                        drop(permits);
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = tokio::time::sleep(EMPTY_RECEIVE_PAUSE) => {}
                        }
                        continue;
                    }
                    if !messages.is_empty() {
                        metrics::counter!(
                            "root_orchestrator_queue_messages_received_total",
                            "strategy" => STRATEGY,
                        )
                        .increment(messages.len() as u64);
                    }
                    for (message, permit) in messages.into_iter().zip(permits) {
                        let inner = self.clone();
                        let executors = executors.clone();
                        let hand_back = hand_back.clone();
                        deliveries.spawn(
                            async move {
                                inner.handle(executors, message, hand_back).await;
                                drop(permit);
                            }
                            .instrument(span.clone()),
                        );
                    }
                }
                Err(err) => {
                    failures += 1;
                    let pause = Duration::from_millis(200)
                        .saturating_mul(2u32.saturating_pow(failures.min(6)))
                        .min(Duration::from_secs(10));
                    tracing::warn!(
                        parent: &span,
                        error = %chain(&err),
                        retry_in_secs = pause.as_secs_f64(),
                        "receive failed",
                    );
                    drop(permits);
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }

        drain_attempts(
            &mut deliveries,
            config.shutdown_grace_period,
            &hand_back,
            &span,
        )
        .await;

        helpers_stop.cancel();
        let _ = maintenance.await;
        let _ = extender.await;
        tracing::info!(parent: &span, "consumers stopped");
        Ok(())
    }

    /// Handles one delivery from parsing to the queue action that settles it.
    async fn handle(
        self: Arc<Self>,
        executors: Arc<ExecutorRegistry>,
        message: ReceivedMessage,
        hand_back: CancellationToken,
    ) {
        let span = tracing::info_span!(
            "delivery",
            message_id = %message.message_id,
            receive_count = message.receive_count,
        );
        async {
            let (new_request, submitted_at) = match parse(&message, &executors) {
                Ok(parsed) => parsed,
                Err((reason, kind)) => {
                    self.dead_letter(&message, &reason, kind).await;
                    return;
                }
            };
            let Some(request) = self
                .find_or_insert(new_request, submitted_at, &message)
                .await
            else {
                return;
            };
            self.dispatch(executors, request, message, hand_back).await;
        }
        .instrument(span)
        .await
    }

    /// The request a message names, stored from the message when it is new. A message
    /// submitted longer than `cleanup_completed_after` ago whose request is not stored is
    /// dead-lettered instead: its request may have finished and been pruned since, and
    /// storing it again would run it a second time.
    async fn find_or_insert(
        &self,
        new_request: NewRequest,
        submitted_at: Option<DateTime<Utc>>,
        message: &ReceivedMessage,
    ) -> Option<Request> {
        let id = new_request.request_id.clone()?;
        match self.store.get(&id).await {
            Ok(Some(request)) => return Some(request),
            Ok(None) => {
                let prunable = after_now(-signed(self.config.cleanup_completed_after));
                if let Some(at) = submitted_at.filter(|at| *at < prunable) {
                    let reason = format!(
                        "request {id} is not stored and was submitted at {}, longer than \
                         cleanup_completed_after ago: it may have finished and been pruned, \
                         so it is not run again",
                        at.to_rfc3339()
                    );
                    self.dead_letter(message, &reason, "expired").await;
                    return None;
                }
            }
            Err(err) => {
                // The message comes back after its visibility timeout.
                tracing::warn!(
                    request_id = %id,
                    error = %chain(&err),
                    "cannot read the request; leaving the message",
                );
                return None;
            }
        }
        match self
            .store
            .insert(new_request, self.config.default_max_attempts())
            .await
        {
            Ok(InsertOutcome::Inserted(request)) => {
                metrics::counter!(
                    "root_orchestrator_requests_submitted_total",
                    "strategy" => STRATEGY,
                    "request_type" => request.request_type.to_string(),
                )
                .increment(1);
                tracing::info!(
                    request_id = %request.id,
                    "stored a request sent by another producer",
                );
                Some(request)
            }
            Ok(InsertOutcome::Existing(request)) => Some(request),
            Err(err) => {
                tracing::warn!(
                    request_id = %id,
                    error = %chain(&err),
                    "cannot store the request; leaving the message",
                );
                None
            }
        }
    }

    /// Decides what a delivery of `request`'s message means, from the request's status.
    async fn dispatch(
        &self,
        executors: Arc<ExecutorRegistry>,
        mut request: Request,
        message: ReceivedMessage,
        hand_back: CancellationToken,
    ) {
        let id = request.id.clone();
        // Set when this delivery rescued the request from its own lapsed attempt: if that
        // spent the last attempt, this message carries the failure to the dead-letter queue.
        let mut rescued_own_attempt = false;

        // A few rounds at most: each one follows a race lost to another consumer or a
        // rescue that changed the status.
        for _ in 0..3 {
            match request.status {
                RequestStatus::Failed if rescued_own_attempt => {
                    let reason = failure_reason(&request);
                    self.dead_letter(&message, &reason, "failed").await;
                    return;
                }
                status if status.is_terminal() => {
                    tracing::info!(
                        request_id = %id,
                        %status,
                        "request already finished; message deleted",
                    );
                    self.drop_message(&message, "finished").await;
                    return;
                }
                RequestStatus::Pending => {
                    let due_in = until(request.run_after);
                    if due_in > EARLY_TOLERANCE {
                        // A copy that arrived before the retry it carries is due.
                        self.hide(&message, due_in, "not due yet").await;
                        return;
                    }
                    let owner = self.owner(&message);
                    match self
                        .store
                        .claim_request(&id, &owner, self.config.visibility_timeout)
                        .await
                    {
                        Ok(Some(claimed)) => {
                            self.run(executors, claimed, message, hand_back).await;
                            return;
                        }
                        // Claimed or cancelled by someone else meanwhile: look again.
                        Ok(None) => {}
                        Err(err) => {
                            tracing::warn!(
                                request_id = %id,
                                error = %chain(&err),
                                "claim failed; leaving the message",
                            );
                            return;
                        }
                    }
                }
                _ => {
                    let lease = request.lease.clone();
                    let lease_message = lease.as_ref().and_then(|l| message_of(&l.owner));
                    let same_message = lease_message == Some(message.message_id.as_str());
                    if same_message && self.adopt(&id, &message).await {
                        return;
                    }
                    let expires_at = lease.as_ref().map(|l| l.expires_at);
                    match expires_at {
                        Some(at) if at > now() && same_message => {
                            // The consumer running it stopped keeping the message hidden
                            // (it crashed, or lost the queue but not the store): wait for
                            // the lease, which tells which.
                            self.hide(&message, until(at) + EARLY_TOLERANCE, "lease held")
                                .await;
                            return;
                        }
                        Some(at) if at > now() => {
                            // The consumer running it holds its own message, which comes
                            // back should that consumer die: this one is a duplicate.
                            tracing::info!(
                                request_id = %id,
                                "request running for another message; duplicate deleted",
                            );
                            self.drop_message(&message, "duplicate").await;
                            return;
                        }
                        _ => {
                            match self.store.rescue_expired().await {
                                Ok(rescued) => {
                                    for r in rescued {
                                        metrics::counter!(
                                            "root_orchestrator_requests_rescued_total",
                                            "strategy" => STRATEGY,
                                        )
                                        .increment(1);
                                        tracing::warn!(
                                            request_id = %r.request_id,
                                            previous_owner = %r.previous_owner,
                                            status = %r.status,
                                            "rescued a request whose lease lapsed"
                                        );
                                    }
                                }
                                Err(err) => {
                                    tracing::warn!(
                                        error = %chain(&err),
                                        "rescue failed; leaving the message",
                                    );
                                    return;
                                }
                            }
                            rescued_own_attempt = same_message;
                        }
                    }
                }
            }

            request = match self.store.get(&id).await {
                Ok(Some(request)) => request,
                Ok(None) => {
                    self.drop_message(&message, "finished").await;
                    return;
                }
                Err(err) => {
                    tracing::warn!(
                        request_id = %id,
                        error = %chain(&err),
                        "cannot read the request; leaving the message",
                    );
                    return;
                }
            };
        }
        tracing::warn!(
            request_id = %id,
            "request kept changing under this delivery; leaving the message",
        );
    }

    /// Gives a running attempt of this process the newest handle of its message, which
    /// was delivered again (its visibility lapsed). Returns whether such an attempt runs.
    async fn adopt(&self, id: &RequestId, message: &ReceivedMessage) -> bool {
        let delivery = self.running().get(id).cloned();
        let Some(delivery) = delivery else {
            return false;
        };
        if delivery.message_id != message.message_id {
            return false;
        }
        let mut state = delivery.state.lock().await;
        if state.settled {
            return false;
        }
        state.message = message.clone();
        tracing::info!(
            request_id = %id,
            "message delivered again while running; took its new handle",
        );
        true
    }

    /// Runs a claimed request and settles its message by the outcome.
    async fn run(
        &self,
        executors: Arc<ExecutorRegistry>,
        request: Request,
        message: ReceivedMessage,
        hand_back: CancellationToken,
    ) {
        let id = request.id.clone();
        let cancel = CancellationToken::new();
        let delivery = Arc::new(Delivery {
            message_id: message.message_id.clone(),
            cancel: cancel.clone(),
            state: tokio::sync::Mutex::new(DeliveryState {
                message,
                settled: false,
            }),
        });
        self.running().insert(id.clone(), delivery.clone());

        let end = run_attempt(
            self.store.clone(),
            self.writer.clone(),
            executors,
            request,
            self.attempt_settings(),
            cancel,
            hand_back.clone(),
            None,
        )
        .await;

        let mut state = delivery.state.lock().await;
        state.settled = true;
        let message = state.message.clone();
        let cut_off = async {
            hand_back.cancelled().await;
            tokio::time::sleep(SETTLE_AFTER_HAND_BACK).await;
        };
        tokio::select! {
            _ = self.settle(&id, &message, end) => {}
            _ = cut_off => tracing::warn!(
                request_id = %id,
                "queue action still under way after the hand-back; the message comes back \
                 after its visibility timeout",
            ),
        }
        drop(state);
        self.running().remove(&id);
    }

    /// The queue action for an attempt's end.
    async fn settle(&self, id: &RequestId, message: &ReceivedMessage, end: AttemptEnd) {
        match end {
            AttemptEnd::Completed => self.drop_message(message, "completed").await,
            AttemptEnd::RetryScheduled(at) => {
                // Same message, hidden for the backoff: its receive count keeps growing, so
                // the queue's own receive limit still applies.
                self.hide(message, until(at), "retry scheduled").await;
            }
            AttemptEnd::Failed => {
                let reason = match self.store.get(id).await {
                    Ok(Some(request)) => failure_reason(&request),
                    _ => format!("request {id} failed"),
                };
                self.dead_letter(message, &reason, "failed").await;
            }
            AttemptEnd::HandedBack => self.hide(message, Duration::ZERO, "handed back").await,
            AttemptEnd::Superseded => match self.store.get(id).await {
                Ok(Some(request)) if request.status.is_terminal() => {
                    self.drop_message(message, "finished").await
                }
                Ok(Some(request)) if request.status == RequestStatus::Pending => {
                    // Rescued from this attempt: deliver again so a consumer claims it.
                    self.hide(message, Duration::ZERO, "rescued").await
                }
                Ok(Some(request)) => {
                    let holder = request.lease.as_ref().and_then(|l| message_of(&l.owner));
                    // Another consumer runs it: for this very message (whose newer handle
                    // it holds), or for a duplicate, whose own message stands in for this.
                    if holder != Some(message.message_id.as_str()) {
                        self.drop_message(message, "duplicate").await;
                    }
                }
                Ok(None) => self.drop_message(message, "finished").await,
                Err(err) => {
                    tracing::warn!(
                        request_id = %id,
                        error = %chain(&err),
                        "cannot read the superseded request; its message comes back later",
                    )
                }
            },
            AttemptEnd::Unrecorded => {
                tracing::warn!(
                    request_id = %id,
                    "outcome not recorded; the message comes back after its visibility timeout",
                );
            }
        }
    }

    async fn drop_message(&self, message: &ReceivedMessage, why: &'static str) {
        let deleted = self
            .with_tries("delete", || self.queue.delete(&message.receipt_handle))
            .await;
        if deleted && why != "completed" {
            metrics::counter!(
                "root_orchestrator_queue_messages_dropped_total",
                "strategy" => STRATEGY,
                "why" => why,
            )
            .increment(1);
        }
    }

    /// Makes the message visible again after `delay` (at most 12 hours).
    async fn hide(&self, message: &ReceivedMessage, delay: Duration, why: &'static str) {
        let delay = delay.min(MAX_VISIBILITY_TIMEOUT);
        tracing::debug!(delay_secs = delay.as_secs_f64(), why, "message put back");
        self.with_tries("change_visibility", || {
            self.queue.change_visibility(&message.receipt_handle, delay)
        })
        .await;
    }

    async fn dead_letter(&self, message: &ReceivedMessage, reason: &str, kind: &'static str) {
        tracing::warn!(reason, kind, "message dead-lettered");
        if self
            .with_tries("dead_letter", || self.queue.dead_letter(message, reason))
            .await
        {
            metrics::counter!(
                "root_orchestrator_queue_messages_dead_lettered_total",
                "strategy" => STRATEGY,
                "reason" => kind,
            )
            .increment(1);
        }
    }

    /// Runs a queue action a few times on failure; returns whether it succeeded. A failed
    /// action is safe to leave: the message comes back after its visibility timeout and
    /// its delivery is judged again from the request's status.
    async fn with_tries<F, Fut>(&self, operation: &'static str, mut action: F) -> bool
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<()>>,
    {
        let mut pause = Duration::from_millis(200);
        for attempt in 1..=TRIES {
            match action().await {
                Ok(()) => return true,
                Err(err) if attempt < TRIES && err.is_transient() => {
                    tracing::debug!(
                        operation,
                        attempt,
                        error = %chain(&err),
                        "queue action failed; trying again",
                    );
                    tokio::time::sleep(pause).await;
                    pause *= 4;
                }
                Err(err) => {
                    tracing::warn!(
                        operation,
                        error = %chain(&err),
                        "queue action failed; the message comes back after its visibility timeout",
                    );
                    return false;
                }
            }
        }
        false
    }
}

/// A delivery's request and when it was submitted, if its message says.
type Parsed = (NewRequest, Option<DateTime<Utc>>);

/// Parses and validates a delivery, into the request and when it was submitted (from the
/// message's metadata); the error is the dead-letter reason and its kind.
fn parse(
    message: &ReceivedMessage,
    executors: &ExecutorRegistry,
) -> std::result::Result<Parsed, (String, &'static str)> {
    let mut wire = RequestMessage::from_json(&message.body)
        .map_err(|err| (format!("not a request message: {err}"), "invalid"))?;
    if wire.request_id.is_none() {
        // The message id is the same on every delivery, so a redelivery cannot make a
        // second request; the copies that dead-lettering and redriving make carry it in
        // their body (`queue::with_request_id`).
        wire.request_id = Some(message.message_id.clone());
    }
    let submitted_at = wire.metadata.as_ref().map(|m| m.submitted_at);
    let request = wire
        .into_new_request()
        .map_err(|err| (err.to_string(), "invalid"))?;
    if !executors.contains(&request.request_type) {
        return Err((
            format!(
                "unknown request type `{}`: no executor is registered for it",
                request.request_type
            ),
            "unknown_type",
        ));
    }
    Ok((request, submitted_at))
}

/// The dead-letter reason of a failed request: its attempts and last error.
fn failure_reason(request: &Request) -> String {
    let last = request
        .errors
        .last()
        .map_or("no error was recorded", |e| e.message.as_str());
    format!(
        "request {} failed after {} attempt(s): {last}",
        request.id, request.attempts
    )
}

/// The message id in a queue consumer's lease owner.
fn message_of(owner: &str) -> Option<&str> {
    owner.rsplit_once(OWNER_SEPARATOR).map(|(_, id)| id)
}

fn body_of(message: &RequestMessage) -> Result<String> {
    serde_json::to_string(message)
        .map_err(|err| Error::invalid("request", format!("cannot be rendered as JSON: {err}")))
}

/// How long until `at`; zero when it has passed.
fn until(at: DateTime<Utc>) -> Duration {
    (at - now()).to_std().unwrap_or_default()
}

fn signed(duration: Duration) -> chrono::Duration {
    chrono::Duration::from_std(duration).unwrap_or(chrono::Duration::MAX)
}

/// Now moved by `offset`, saturating.
fn after_now(offset: chrono::Duration) -> DateTime<Utc> {
    now()
        .checked_add_signed(offset)
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
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
    fn the_lease_owner_names_the_message() {
        assert_eq!(
            message_of("queue-12-abcdef@5f0c6c1e-8d4c-4b8e-9a51-0d1f2a3b4c5d"),
            Some("5f0c6c1e-8d4c-4b8e-9a51-0d1f2a3b4c5d")
        );
        assert_eq!(message_of("table-12-abcdef"), None);
    }
}
