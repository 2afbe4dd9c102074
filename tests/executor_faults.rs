//! Executors that misbehave — panic, never return, ignore a cancel, return after their
//! lease was rescued — on the table strategy (SQLite, and PostgreSQL with the `postgres`
//! feature) and on the queue strategy (`MemoryQueue`). Each scenario checks the final
//! status, the attempt count, that the status history has its terminal status once, and
//! that the worker's only slot is free again afterwards.

#[cfg(feature = "postgres")]
mod pg;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use root_orchestrator::{
    AttemptError, BackoffPolicy, CancelOutcome, CancellationToken, Configuration, Error,
    InsertOutcome, LeaseRef, ListFilter, MemoryQueue, NewRequest, Progress, QueueBackend,
    QueueConfig, QueueDepth, QueueStrategy, ReceivedMessage, Request, RequestId, RequestPage,
    RequestResults, RequestStatus, RequestStore, RequestType, RescuedRequest, RootOrchestrator,
    RunningWorkers, Source, SqliteStore, TableConfig, TableStrategy, WorkflowContext,
    WorkflowError, WorkflowExecutor, WriteOutcome,
};
use tokio::time::Instant;

const TYPE: &str = "semaglutide_intelligence";

// ---------------------------------------------------------------------------------------
// Executors written as closures, with an optional per-request timeout.

type Outcome = Result<RequestResults, WorkflowError>;
type Run = dyn Fn(Request, WorkflowContext) -> BoxFuture<'static, Outcome> + Send + Sync;
type Limit = dyn Fn(&Request) -> Option<Duration> + Send + Sync;

#[derive(Clone)]
struct Scripted {
    run: Arc<Run>,
    limit: Option<Arc<Limit>>,
}

#[async_trait]
impl WorkflowExecutor for Scripted {
    async fn execute(&self, request: &Request, ctx: &WorkflowContext) -> Outcome {
        (self.run)(request.clone(), ctx.clone()).await
    }

    fn timeout(&self, request: &Request) -> Option<Duration> {
        self.limit.as_ref().and_then(|limit| limit(request))
    }
}

fn scripted<F, Fut>(f: F) -> Scripted
where
    F: Fn(Request, WorkflowContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    Scripted {
        run: Arc::new(move |r, c| Box::pin(f(r, c))),
        limit: None,
    }
}

impl Scripted {
    fn with_timeout(
        mut self,
        limit: impl Fn(&Request) -> Option<Duration> + Send + Sync + 'static,
    ) -> Self {
        self.limit = Some(Arc::new(limit));
        self
    }
}

fn keyword(request: &Request) -> &str {
    &request.configuration.keywords[0]
}

/// Results that say which attempt made them.
fn results_of(attempt: u32) -> RequestResults {
    RequestResults::new(None, serde_json::json!({ "attempt": attempt }))
}

fn request(keyword: &str) -> NewRequest {
    let mut configuration = Configuration::new([keyword]);
    configuration.sources.push(Source::new("FDA", "regulatory"));
    NewRequest::new(
        "glp1-market-watch",
        "analyst-001",
        RequestType::new(TYPE).unwrap(),
        configuration,
    )
}

// ---------------------------------------------------------------------------------------
// A store and a queue that a test can cut off from one worker, as a network partition or
// a long stall of that worker's process would.

#[derive(Clone)]
struct Partitioned {
    inner: Arc<dyn RequestStore>,
    cut_off: Arc<AtomicBool>,
    /// Cuts the store off as soon as the next claim has returned.
    cut_after_claim: Arc<AtomicBool>,
    completions: Arc<Mutex<Vec<(RequestId, WriteOutcome)>>>,
}

impl Partitioned {
    fn new(inner: Arc<dyn RequestStore>) -> Self {
        Partitioned {
            inner,
            cut_off: Arc::default(),
            cut_after_claim: Arc::default(),
            completions: Arc::default(),
        }
    }

    fn after_claim(&self, claimed: bool) {
        if claimed && self.cut_after_claim.swap(false, Ordering::SeqCst) {
            self.cut_off.store(true, Ordering::SeqCst);
        }
    }

    fn check(&self, operation: &'static str) -> root_orchestrator::Result<()> {
        if self.cut_off.load(Ordering::SeqCst) {
            return Err(Error::store(operation, "network unreachable"));
        }
        Ok(())
    }
}

#[async_trait]
impl RequestStore for Partitioned {
    async fn insert(
        &self,
        request: NewRequest,
        max_attempts: u32,
    ) -> root_orchestrator::Result<InsertOutcome> {
        self.check("insert")?;
        self.inner.insert(request, max_attempts).await
    }

    async fn get(&self, id: &RequestId) -> root_orchestrator::Result<Option<Request>> {
        self.check("get")?;
        self.inner.get(id).await
    }

    async fn list(&self, filter: &ListFilter) -> root_orchestrator::Result<RequestPage> {
        self.check("list")?;
        self.inner.list(filter).await
    }

    async fn claim(
        &self,
        owner: &str,
        limit: usize,
        lease_duration: Duration,
    ) -> root_orchestrator::Result<Vec<Request>> {
        self.check("claim")?;
        let claimed = self.inner.claim(owner, limit, lease_duration).await?;
        self.after_claim(!claimed.is_empty());
        Ok(claimed)
    }

    async fn claim_request(
        &self,
        id: &RequestId,
        owner: &str,
        lease_duration: Duration,
    ) -> root_orchestrator::Result<Option<Request>> {
        self.check("claim_request")?;
        let claimed = self.inner.claim_request(id, owner, lease_duration).await?;
        self.after_claim(claimed.is_some());
        Ok(claimed)
    }

    async fn mark_executing(&self, lease: &LeaseRef) -> root_orchestrator::Result<WriteOutcome> {
        self.check("mark_executing")?;
        self.inner.mark_executing(lease).await
    }

    async fn record_progress(
        &self,
        lease: &LeaseRef,
        progress: &Progress,
    ) -> root_orchestrator::Result<WriteOutcome> {
        self.check("record_progress")?;
        self.inner.record_progress(lease, progress).await
    }

    async fn extend_lease(
        &self,
        lease: &LeaseRef,
        lease_duration: Duration,
    ) -> root_orchestrator::Result<WriteOutcome> {
        self.check("extend_lease")?;
        self.inner.extend_lease(lease, lease_duration).await
    }

    async fn complete(
        &self,
        lease: &LeaseRef,
        results: &RequestResults,
    ) -> root_orchestrator::Result<WriteOutcome> {
        self.check("complete")?;
        let outcome = self.inner.complete(lease, results).await?;
        self.completions
            .lock()
            .unwrap()
            .push((lease.request_id.clone(), outcome));
        Ok(outcome)
    }

    async fn fail_attempt(
        &self,
        lease: &LeaseRef,
        error: &AttemptError,
        retry_at: Option<DateTime<Utc>>,
    ) -> root_orchestrator::Result<WriteOutcome> {
        self.check("fail_attempt")?;
        self.inner.fail_attempt(lease, error, retry_at).await
    }

    async fn release(
        &self,
        lease: &LeaseRef,
        reason: &str,
    ) -> root_orchestrator::Result<WriteOutcome> {
        self.check("release")?;
        self.inner.release(lease, reason).await
    }

    async fn cancel(
        &self,
        id: &RequestId,
        reason: &str,
    ) -> root_orchestrator::Result<CancelOutcome> {
        self.check("cancel")?;
        self.inner.cancel(id, reason).await
    }

    async fn rescue_expired(&self) -> root_orchestrator::Result<Vec<RescuedRequest>> {
        self.check("rescue_expired")?;
        self.inner.rescue_expired().await
    }

    async fn prune_finished(&self, before: DateTime<Utc>) -> root_orchestrator::Result<u64> {
        self.check("prune_finished")?;
        self.inner.prune_finished(before).await
    }

    async fn count_by_status(&self) -> root_orchestrator::Result<BTreeMap<RequestStatus, u64>> {
        self.check("count_by_status")?;
        self.inner.count_by_status().await
    }

    async fn ping(&self) -> root_orchestrator::Result<()> {
        self.check("ping")?;
        self.inner.ping().await
    }
}

/// The queue side of the partition: while cut off, receives find nothing and visibility
/// extensions are lost, so the running message comes back for another consumer.
#[derive(Clone)]
struct PartitionedQueue {
    inner: MemoryQueue,
    cut_off: Arc<AtomicBool>,
}

#[async_trait]
impl QueueBackend for PartitionedQueue {
    async fn send(&self, body: &str, delay: Duration) -> root_orchestrator::Result<String> {
        self.inner.send(body, delay).await
    }

    async fn receive(
        &self,
        max_messages: usize,
        wait: Duration,
        visibility_timeout: Duration,
    ) -> root_orchestrator::Result<Vec<ReceivedMessage>> {
        if self.cut_off.load(Ordering::SeqCst) {
            tokio::time::sleep(wait.max(Duration::from_millis(20))).await;
            return Ok(Vec::new());
        }
        self.inner
            .receive(max_messages, wait, visibility_timeout)
            .await
    }

    async fn delete(&self, receipt_handle: &str) -> root_orchestrator::Result<()> {
        self.inner.delete(receipt_handle).await
    }

    async fn change_visibility(
        &self,
        receipt_handle: &str,
        timeout: Duration,
    ) -> root_orchestrator::Result<()> {
        if self.cut_off.load(Ordering::SeqCst) {
            return Err(Error::queue(
                "change_visibility",
                "partitioned",
                "timed out",
            ));
        }
        self.inner.change_visibility(receipt_handle, timeout).await
    }

    async fn change_visibility_batch(
        &self,
        changes: &[(String, Duration)],
    ) -> root_orchestrator::Result<Vec<root_orchestrator::Result<()>>> {
        if self.cut_off.load(Ordering::SeqCst) {
            return Err(Error::queue(
                "change_visibility_batch",
                "partitioned",
                "timed out",
            ));
        }
        self.inner.change_visibility_batch(changes).await
    }

    async fn dead_letter(
        &self,
        message: &ReceivedMessage,
        reason: &str,
    ) -> root_orchestrator::Result<()> {
        self.inner.dead_letter(message, reason).await
    }

    async fn redrive_dead_letters(&self, max_messages: usize) -> root_orchestrator::Result<usize> {
        self.inner.redrive_dead_letters(max_messages).await
    }

    async fn depth(&self) -> root_orchestrator::Result<QueueDepth> {
        self.inner.depth().await
    }
}

// ---------------------------------------------------------------------------------------
// One backing store (and queue) shared by any number of worker sets.

#[derive(Clone, Copy, Debug)]
enum Backend {
    TableSqlite,
    #[cfg(feature = "postgres")]
    TablePostgres,
    QueueMemory,
}

/// Timing shared by every worker set of a scenario.
#[derive(Clone, Copy)]
struct Timing {
    execution_timeout: Duration,
    cancel_grace_period: Duration,
    /// The table lease, or the queue's visibility timeout (which the queue's lease follows).
    lease: Duration,
    max_retries: u32,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            execution_timeout: Duration::from_secs(3600),
            cancel_grace_period: Duration::from_secs(2),
            lease: Duration::from_secs(3),
            max_retries: 2,
        }
    }
}

struct Cluster {
    backend: Backend,
    store: Arc<dyn RequestStore>,
    queue: MemoryQueue,
    _dir: tempfile::TempDir,
    #[cfg(feature = "postgres")]
    schema: Option<String>,
}

impl Cluster {
    async fn new(backend: Backend) -> Self {
        let dir = tempfile::tempdir().unwrap();
        #[cfg(feature = "postgres")]
        let mut schema = None;
        let store: Arc<dyn RequestStore> = match backend {
            Backend::TableSqlite | Backend::QueueMemory => Arc::new(
                SqliteStore::open(dir.path().join("requests.db"))
                    .await
                    .unwrap(),
            ),
            #[cfg(feature = "postgres")]
            Backend::TablePostgres => {
                let name = pg::fresh_schema("ro_faults");
                let store = pg::connect(&name, 6).await;
                schema = Some(name);
                Arc::new(store)
            }
        };
        Cluster {
            backend,
            store,
            queue: MemoryQueue::new(),
            _dir: dir,
            #[cfg(feature = "postgres")]
            schema,
        }
    }

    /// Starts a worker set on the shared store and queue.
    fn workers(&self, timing: Timing, executor: Scripted) -> Workers {
        self.workers_on(
            self.store.clone(),
            Arc::new(self.queue.clone()),
            timing,
            executor,
        )
    }

    /// Starts a worker set that reaches the store and queue through the given handles.
    fn workers_on(
        &self,
        store: Arc<dyn RequestStore>,
        queue: Arc<dyn QueueBackend>,
        timing: Timing,
        executor: Scripted,
    ) -> Workers {
        let backoff = BackoffPolicy::new(Duration::from_millis(50), Duration::from_millis(200));
        let builder = RootOrchestrator::builder().executor(TYPE, executor);
        let orchestrator = match self.backend {
            Backend::QueueMemory => {
                let mut config = QueueConfig::default();
                config.max_workers = 1;
                config.visibility_timeout = timing.lease;
                config.long_polling_wait_time = Duration::from_millis(100);
                config.max_retries = timing.max_retries;
                config.backoff = backoff;
                config.shutdown_grace_period = Duration::from_secs(3);
                config.cancel_grace_period = timing.cancel_grace_period;
                config.execution_timeout = timing.execution_timeout;
                config.reconcile_interval = Duration::from_millis(200);
                config.reconcile_after = timing.lease.max(Duration::from_secs(1));
                builder.strategy(QueueStrategy::with_shared(store, queue, config).unwrap())
            }
            _ => {
                let mut config = TableConfig::default();
                config.max_concurrent_requests = 1;
                config.polling_interval = Duration::from_millis(50);
                config.status_update_interval = timing.lease / 6;
                config.lease_duration = timing.lease;
                config.max_retries = timing.max_retries;
                config.backoff = backoff;
                config.shutdown_grace_period = Duration::from_secs(3);
                config.cancel_grace_period = timing.cancel_grace_period;
                config.execution_timeout = timing.execution_timeout;
                builder.strategy(TableStrategy::with_shared_store(store, config).unwrap())
            }
        }
        .build()
        .unwrap();
        let run = orchestrator.spawn();
        Workers { orchestrator, run }
    }

    async fn get(&self, id: &RequestId) -> Request {
        self.store.get(id).await.unwrap().expect("request stored")
    }

    /// Polls the store until `id` satisfies `wanted`.
    async fn wait_for(&self, id: &RequestId, wanted: impl Fn(&Request) -> bool) -> Request {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let request = self.get(id).await;
            if wanted(&request) {
                return request;
            }
            assert!(
                Instant::now() < deadline,
                "{:?}: timed out waiting on {id}; last seen {} after {} attempts",
                self.backend,
                request.status,
                request.attempts
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_terminal(&self, id: &RequestId) -> Request {
        self.wait_for(id, |r| r.status.is_terminal()).await
    }

    async fn finish(self) {
        #[cfg(feature = "postgres")]
        if let Some(schema) = &self.schema {
            pg::drop_schema(schema).await;
        }
    }
}

struct Workers {
    orchestrator: RootOrchestrator,
    run: RunningWorkers,
}

impl Workers {
    async fn submit(&self, request: NewRequest) -> RequestId {
        self.orchestrator.submit(request).await.unwrap().id
    }

    async fn stop(self) {
        let stopped = tokio::time::timeout(Duration::from_secs(15), self.run.shutdown())
            .await
            .expect("workers stop within their shutdown grace period");
        stopped.unwrap();
    }
}

/// The status history ends in the request's status, and its terminal status was entered
/// exactly once: nothing was written after it, and no second terminal write happened.
fn assert_terminal_once(request: &Request) {
    let terminal: Vec<_> = request
        .history
        .iter()
        .filter(|change| change.status.is_terminal())
        .map(|change| (change.status, change.reason.as_str()))
        .collect();
    assert_eq!(
        terminal.len(),
        1,
        "{}: terminal entries {terminal:?}",
        request.id
    );
    assert_eq!(
        request.history.last().map(|c| c.status),
        Some(request.status)
    );
    for pair in request.history.windows(2) {
        assert!(
            pair[0].status.can_transition_to(pair[1].status),
            "{}: {} -> {} is not a lifecycle step",
            request.id,
            pair[0].status,
            pair[1].status
        );
    }
}

/// Submits a request that completes at once and waits for it: the worker's only slot is
/// free again.
async fn assert_slot_free(cluster: &Cluster, workers: &Workers) {
    let id = workers.submit(request("after")).await;
    let after = cluster.wait_terminal(&id).await;
    assert_eq!(
        after.status,
        RequestStatus::Completed,
        "{:?}: the slot was not freed",
        cluster.backend
    );
    assert_eq!(after.attempts, 1);
}

/// How every scenario's executor treats the follow-up request of `assert_slot_free`.
async fn quick(request: &Request, ctx: &WorkflowContext) -> Option<Outcome> {
    (keyword(request) == "after").then(|| Ok(results_of(ctx.attempt())))
}

// ---------------------------------------------------------------------------------------
// Scenarios, each run on every backend.

/// A panic fails the attempt as retryable; the retry completes.
async fn a_panic_fails_the_attempt_and_the_retry_completes(backend: Backend) {
    let cluster = Cluster::new(backend).await;
    let executor = scripted(|request, ctx| async move {
        if let Some(outcome) = quick(&request, &ctx).await {
            return outcome;
        }
        if ctx.attempt() == 1 {
            panic!("extraction index out of bounds");
        }
        Ok(results_of(ctx.attempt()))
    });
    let workers = cluster.workers(Timing::default(), executor);

    let id = workers.submit(request("panics-once")).await;
    let finished = cluster.wait_terminal(&id).await;
    assert_eq!(finished.status, RequestStatus::Completed, "{backend:?}");
    assert_eq!(finished.attempts, 2);
    assert_eq!(finished.results, Some(results_of(2)));
    assert_eq!(finished.errors.len(), 1);
    assert_eq!(finished.errors[0].attempt, 1);
    assert!(finished.errors[0].retryable);
    assert!(
        finished.errors[0]
            .message
            .contains("executor panicked: extraction index out of bounds"),
        "{:?}",
        finished.errors
    );
    assert_terminal_once(&finished);

    assert_slot_free(&cluster, &workers).await;
    workers.stop().await;
    cluster.finish().await;
}

/// An executor that never returns is stopped by the execution timeout: once it returns a
/// (late, discarded) result within the cancel grace period, once it ignores the cancel and
/// is dropped. Both attempts fail as retryable timeouts, so the request ends `FAILED`.
/// A request whose executor sets a longer limit of its own runs past the strategy's.
async fn an_executor_that_never_returns_times_out_on_every_attempt(backend: Backend) {
    let cluster = Cluster::new(backend).await;
    let timeout = Duration::from_millis(400);
    let starts = Arc::new(Mutex::new(Vec::new()));
    let executor = scripted({
        let starts = starts.clone();
        move |request, ctx| {
            let starts = starts.clone();
            async move {
                if let Some(outcome) = quick(&request, &ctx).await {
                    return outcome;
                }
                if keyword(&request) == "unbounded" {
                    return Ok(results_of(ctx.attempt()));
                }
                if keyword(&request) == "slow-but-allowed" {
                    tokio::time::sleep(Duration::from_millis(900)).await;
                    return Ok(results_of(ctx.attempt()));
                }
                starts.lock().unwrap().push(Instant::now());
                if ctx.attempt() == 1 {
                    // Hears the cancel, but answers with a result nobody asked for any more.
                    ctx.cancelled().await;
                    return Ok(results_of(1));
                }
                // Deaf to the cancel: only dropping it ends it.
                std::future::pending::<()>().await;
                unreachable!()
            }
        }
    })
    .with_timeout(|request| match request.configuration.keywords[0].as_str() {
        "slow-but-allowed" => Some(Duration::from_secs(5)),
        // Too far off to add to an instant: no limit at all.
        "unbounded" => Some(Duration::MAX),
        _ => None,
    });
    let timing = Timing {
        execution_timeout: timeout,
        cancel_grace_period: Duration::from_millis(300),
        max_retries: 1,
        ..Timing::default()
    };
    let workers = cluster.workers(timing, executor);

    let id = workers.submit(request("hangs")).await;
    let submitted = Instant::now();
    let failed = cluster.wait_terminal(&id).await;
    let took = submitted.elapsed();

    assert_eq!(failed.status, RequestStatus::Failed, "{backend:?}");
    assert_eq!(failed.attempts, 2);
    assert_eq!(
        failed.results, None,
        "the late result of attempt 1 was kept"
    );
    assert_eq!(failed.errors.len(), 2, "{:?}", failed.errors);
    for (i, error) in failed.errors.iter().enumerate() {
        assert_eq!(error.attempt, i as u32 + 1);
        assert!(error.retryable, "a timeout is worth a retry");
        assert_eq!(error.message, "execution timed out after 400ms");
    }
    assert_terminal_once(&failed);
    // Two attempts of at least the timeout each; the second waits out the grace period too.
    assert!(took >= timeout * 2, "failed after {took:?}");
    assert!(took < Duration::from_secs(10), "failed after {took:?}");
    let starts = starts.lock().unwrap().clone();
    assert_eq!(starts.len(), 2);
    assert!(starts[1] - starts[0] >= timeout, "retried too soon");

    let allowed = workers.submit(request("slow-but-allowed")).await;
    let allowed = cluster.wait_terminal(&allowed).await;
    assert_eq!(allowed.status, RequestStatus::Completed, "{backend:?}");
    assert_eq!(allowed.attempts, 1);
    let unbounded = workers.submit(request("unbounded")).await;
    let unbounded = cluster.wait_terminal(&unbounded).await;
    assert_eq!(unbounded.status, RequestStatus::Completed, "{backend:?}");
    assert_eq!(unbounded.attempts, 1, "{:?}", unbounded.errors);

    assert_slot_free(&cluster, &workers).await;
    workers.stop().await;
    cluster.finish().await;
}

/// A running request is cancelled. One executor hears the cancel and returns a result
/// anyway, within the grace period; another never returns and is dropped after it. Both
/// requests stay `CANCELLED` with the cancel written once and no results.
async fn an_executor_that_ignores_a_cancel_changes_nothing(backend: Backend) {
    let cluster = Cluster::new(backend).await;
    let returned = Arc::new(AtomicUsize::new(0));
    let executor = scripted({
        let returned = returned.clone();
        move |request, ctx| {
            let returned = returned.clone();
            async move {
                if let Some(outcome) = quick(&request, &ctx).await {
                    return outcome;
                }
                if keyword(&request) == "answers-late" {
                    ctx.cancelled().await;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    returned.fetch_add(1, Ordering::SeqCst);
                    return Ok(results_of(ctx.attempt()));
                }
                std::future::pending::<()>().await;
                unreachable!()
            }
        }
    });
    let timing = Timing {
        cancel_grace_period: Duration::from_millis(500),
        ..Timing::default()
    };
    let workers = cluster.workers(timing, executor);

    for name in ["answers-late", "deaf"] {
        let id = workers.submit(request(name)).await;
        cluster
            .wait_for(&id, |r| r.status == RequestStatus::Executing)
            .await;
        assert_eq!(
            workers.orchestrator.cancel(&id).await.unwrap(),
            CancelOutcome::Cancelled {
                previous: RequestStatus::Executing
            }
        );
        // The slot frees once the executor has returned or been dropped; the follow-up
        // request then runs, so by its completion this one's outcome has been settled.
        assert_slot_free(&cluster, &workers).await;

        let cancelled = cluster.get(&id).await;
        assert_eq!(
            cancelled.status,
            RequestStatus::Cancelled,
            "{backend:?} {name}"
        );
        assert_eq!(cancelled.attempts, 1);
        assert_eq!(cancelled.results, None);
        assert!(cancelled.errors.is_empty(), "{:?}", cancelled.errors);
        assert_terminal_once(&cancelled);
        assert_eq!(
            cancelled.history.last().map(|c| c.reason.as_str()),
            Some("cancelled by caller")
        );
    }
    assert_eq!(returned.load(Ordering::SeqCst), 1, "the late answer came");
    workers.stop().await;
    cluster.finish().await;
}

/// Worker set A loses the store and the queue while it runs a request; its lease lapses,
/// worker set B rescues the request and completes it. When A's executor returns, A's
/// completion reaches the store and is refused: the request keeps B's results.
async fn a_result_returned_after_a_rescue_is_refused(backend: Backend) {
    let cluster = Cluster::new(backend).await;
    let release = CancellationToken::new();
    let executor = scripted({
        let release = release.clone();
        move |request, ctx| {
            let release = release.clone();
            async move {
                if let Some(outcome) = quick(&request, &ctx).await {
                    return outcome;
                }
                if ctx.attempt() == 1 {
                    release.cancelled().await;
                }
                Ok(results_of(ctx.attempt()))
            }
        }
    });
    let timing = Timing {
        lease: Duration::from_millis(600),
        ..Timing::default()
    };
    let a_store = Partitioned::new(cluster.store.clone());
    let a_queue = PartitionedQueue {
        inner: cluster.queue.clone(),
        cut_off: a_store.cut_off.clone(),
    };
    let a = cluster.workers_on(
        Arc::new(a_store.clone()),
        Arc::new(a_queue),
        timing,
        executor.clone(),
    );

    let id = a.submit(request("outlived")).await;
    let running = cluster
        .wait_for(&id, |r| r.status == RequestStatus::Executing)
        .await;
    let a_owner = running.lease.expect("leased").owner;
    a_store.cut_off.store(true, Ordering::SeqCst);

    let b = cluster.workers(timing, executor);
    let finished = cluster.wait_terminal(&id).await;
    assert_eq!(finished.status, RequestStatus::Completed, "{backend:?}");
    assert_eq!(finished.results, Some(results_of(2)));

    // A comes back and its executor returns its result.
    a_store.cut_off.store(false, Ordering::SeqCst);
    release.cancel();
    let deadline = Instant::now() + Duration::from_secs(10);
    while a_store.completions.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "A never wrote its late result");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        a_store.completions.lock().unwrap()[0],
        (
            id.clone(),
            WriteOutcome::Rejected {
                current: Some(RequestStatus::Completed)
            }
        )
    );

    let finished = cluster.get(&id).await;
    assert_eq!(finished.status, RequestStatus::Completed);
    assert_eq!(finished.results, Some(results_of(2)), "B's results stay");
    assert_eq!(finished.attempts, 2);
    assert_eq!(finished.errors.len(), 1);
    assert!(
        finished.errors[0].message.contains(&a_owner),
        "{:?}",
        finished.errors
    );
    assert_terminal_once(&finished);
    let completer = finished.history.last().and_then(|c| c.worker.clone());
    assert!(
        completer.is_some_and(|w| !w.starts_with(&a_owner)),
        "{:?}",
        finished.history
    );

    // B leaves; A's slot is free and takes the next request.
    b.stop().await;
    assert_slot_free(&cluster, &a).await;
    a.stop().await;
    cluster.finish().await;
}

/// An executor that ignores the timeout's cancel and takes longer than the lease to
/// return, within a grace period longer than the lease: the worker keeps the lease while it
/// waits, so the request never starts again beside it, and each attempt fails as a timeout.
async fn a_grace_period_longer_than_the_lease_keeps_each_attempt_alone(backend: Backend) {
    let cluster = Cluster::new(backend).await;
    let runs = Arc::new(Mutex::new(Vec::new()));
    let executor = scripted({
        let runs = runs.clone();
        move |request, ctx| {
            let runs = runs.clone();
            async move {
                if let Some(outcome) = quick(&request, &ctx).await {
                    return outcome;
                }
                let began = Instant::now();
                // Deaf to the cancel, for longer than the lease.
                tokio::time::sleep(Duration::from_millis(1_000)).await;
                runs.lock().unwrap().push((began, Instant::now()));
                Ok(results_of(ctx.attempt()))
            }
        }
    });
    let timing = Timing {
        execution_timeout: Duration::from_millis(300),
        cancel_grace_period: Duration::from_millis(1_500),
        lease: Duration::from_millis(600),
        max_retries: 1,
    };
    let workers = cluster.workers(timing, executor);

    let id = workers.submit(request("overruns")).await;
    let failed = cluster.wait_terminal(&id).await;

    assert_eq!(failed.status, RequestStatus::Failed, "{backend:?}");
    assert_eq!(failed.attempts, 2, "{:?}", failed.errors);
    let messages: Vec<&str> = failed.errors.iter().map(|e| e.message.as_str()).collect();
    assert_eq!(
        messages, ["execution timed out after 300ms"; 2],
        "{backend:?}: a lapsed lease re-ran the request"
    );
    assert_terminal_once(&failed);
    let runs = runs.lock().unwrap().clone();
    assert_eq!(runs.len(), 2, "{backend:?}");
    assert!(
        runs[1].0 >= runs[0].1,
        "attempt 2 started while attempt 1 still ran"
    );

    workers.stop().await;
    cluster.finish().await;
}

/// The store is cut off right after a claim, so the write marking the request `EXECUTING`
/// cannot be made, and stays cut off until the worker gives up on it and stops the
/// executor. The executor answers with its cancellation error; that answer is not the
/// request's outcome: with the store back, the request runs again and completes.
async fn a_store_lost_as_an_attempt_starts_does_not_fail_the_request(backend: Backend) {
    let cluster = Cluster::new(backend).await;
    let store = Partitioned::new(cluster.store.clone());
    let stopped = Arc::new(AtomicUsize::new(0));
    let executor = scripted({
        let cut_off = store.cut_off.clone();
        let stopped = stopped.clone();
        move |request, ctx| {
            let cut_off = cut_off.clone();
            let stopped = stopped.clone();
            async move {
                if let Some(outcome) = quick(&request, &ctx).await {
                    return outcome;
                }
                tokio::select! {
                    _ = ctx.cancelled() => {
                        // The worker gave up on the store: let it answer again, so that
                        // whatever the worker does next with this answer lands.
                        stopped.fetch_add(1, Ordering::SeqCst);
                        cut_off.store(false, Ordering::SeqCst);
                        Err(WorkflowError::cancelled())
                    }
                    _ = tokio::time::sleep(Duration::from_millis(1_500)) => {
                        Ok(results_of(ctx.attempt()))
                    }
                }
            }
        }
    });
    let timing = Timing {
        lease: Duration::from_secs(1),
        cancel_grace_period: Duration::from_millis(300),
        ..Timing::default()
    };
    let queue = PartitionedQueue {
        inner: cluster.queue.clone(),
        cut_off: store.cut_off.clone(),
    };
    let workers = cluster.workers_on(Arc::new(store.clone()), Arc::new(queue), timing, executor);

    store.cut_after_claim.store(true, Ordering::SeqCst);
    let id = workers.submit(request("unlucky")).await;
    let finished = cluster.wait_terminal(&id).await;

    assert_eq!(
        stopped.load(Ordering::SeqCst),
        1,
        "{backend:?}: stopped once"
    );
    assert_eq!(
        finished.status,
        RequestStatus::Completed,
        "{backend:?}: {:?}",
        finished.errors
    );
    assert!(
        finished.errors.iter().all(|e| e.message != "cancelled"),
        "{backend:?}: the stopped executor's answer was recorded: {:?}",
        finished.errors
    );
    assert_terminal_once(&finished);

    workers.stop().await;
    cluster.finish().await;
}

macro_rules! on_every_backend {
    ($($scenario:ident),* $(,)?) => {
        mod table_sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $scenario() {
                    super::$scenario(super::Backend::TableSqlite).await;
                }
            )*
        }

        #[cfg(feature = "postgres")]
        mod table_postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $scenario() {
                    super::$scenario(super::Backend::TablePostgres).await;
                }
            )*
        }

        mod queue_memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $scenario() {
                    super::$scenario(super::Backend::QueueMemory).await;
                }
            )*
        }
    };
}

on_every_backend!(
    a_panic_fails_the_attempt_and_the_retry_completes,
    an_executor_that_never_returns_times_out_on_every_attempt,
    an_executor_that_ignores_a_cancel_changes_nothing,
    a_result_returned_after_a_rescue_is_refused,
    a_grace_period_longer_than_the_lease_keeps_each_attempt_alone,
    a_store_lost_as_an_attempt_starts_does_not_fail_the_request,
);
