//! The table strategy's workers on a real SQLite database: retries, panics, cancellation,
//! shutdown, wake-ups, concurrency, rescue and pruning.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use root_orchestrator::{
    BackoffPolicy, CancelOutcome, CancellationToken, Configuration, NewRequest, Priority, Request,
    RequestId, RequestResults, RequestStatus, RequestStore, RequestType, RootOrchestrator,
    RunningWorkers, Source, SqliteStore, TableConfig, TableStrategy, WorkflowContext,
    WorkflowError, WorkflowExecutor,
};
use tokio::time::Instant;

const TYPE: &str = "semaglutide_intelligence";

type Outcome = Result<RequestResults, WorkflowError>;
type Run = dyn Fn(Request, WorkflowContext) -> BoxFuture<'static, Outcome> + Send + Sync;

/// An executor whose behaviour each test writes as a closure.
struct Scripted(Arc<Run>);

#[async_trait]
impl WorkflowExecutor for Scripted {
    async fn execute(
        &self,
        request: &Request,
        ctx: &WorkflowContext,
    ) -> Result<RequestResults, WorkflowError> {
        (self.0)(request.clone(), ctx.clone()).await
    }
}

fn scripted<F, Fut>(f: F) -> Scripted
where
    F: Fn(Request, WorkflowContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<RequestResults, WorkflowError>> + Send + 'static,
{
    Scripted(Arc::new(move |r, c| Box::pin(f(r, c))))
}

fn done() -> RequestResults {
    RequestResults::new(None, serde_json::json!({"ok": true}))
}

fn fast_config() -> TableConfig {
    let mut config = TableConfig::default();
    config.polling_interval = Duration::from_millis(100);
    config.status_update_interval = Duration::from_millis(100);
    config.lease_duration = Duration::from_secs(5);
    config.shutdown_grace_period = Duration::from_secs(5);
    config.cancel_grace_period = Duration::from_secs(5);
    config.backoff = BackoffPolicy::new(Duration::from_millis(50), Duration::from_secs(1));
    config
}

fn request(keyword: &str) -> NewRequest {
    let mut configuration = Configuration::new([keyword]);
    configuration.sources.push(Source::new("FDA", "regulatory"));
    NewRequest::new(
        "project",
        "analyst",
        RequestType::new(TYPE).unwrap(),
        configuration,
    )
}

struct Running {
    orchestrator: RootOrchestrator,
    store: SqliteStore,
    workers: RunningWorkers,
    _dir: tempfile::TempDir,
}

impl Running {
    async fn start(config: TableConfig, executor: Scripted) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("requests.db"))
            .await
            .unwrap();
        Self::start_on(dir, store, config, executor)
    }

    fn start_on(
        dir: tempfile::TempDir,
        store: SqliteStore,
        config: TableConfig,
        executor: Scripted,
    ) -> Self {
        let orchestrator = RootOrchestrator::builder()
            .strategy(TableStrategy::new(store.clone(), config).unwrap())
            .executor(TYPE, executor)
            .build()
            .unwrap();
        let workers = orchestrator.spawn();
        Running {
            orchestrator,
            store,
            workers,
            _dir: dir,
        }
    }

    async fn submit(&self, request: NewRequest) -> RequestId {
        self.orchestrator.submit(request).await.unwrap().id
    }

    async fn wait_for(&self, id: &RequestId, wanted: impl Fn(&Request) -> bool) -> Request {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let request = self.orchestrator.status(id).await.unwrap();
            if wanted(&request) {
                return request;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting on {id}, last seen {:?} after {} attempts",
                request.status,
                request.attempts
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_terminal(&self, id: &RequestId) -> Request {
        self.wait_for(id, |r| r.status.is_terminal()).await
    }

    async fn shutdown(self) -> Stopped {
        self.workers.shutdown().await.unwrap();
        Stopped {
            store: self.store,
            _dir: self._dir,
        }
    }
}

/// The store after the workers stopped, with its folder kept for as long as it is read.
struct Stopped {
    store: SqliteStore,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for Stopped {
    type Target = SqliteStore;

    fn deref(&self) -> &SqliteStore {
        &self.store
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retries_wait_at_least_the_backoff_and_then_complete() {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let executor = scripted({
        let calls = calls.clone();
        move |_, ctx| {
            let calls = calls.clone();
            async move {
                calls.lock().unwrap().push(Instant::now());
                if ctx.attempt() < 3 {
                    Err(WorkflowError::retryable(format!(
                        "flaky source on attempt {}",
                        ctx.attempt()
                    )))
                } else {
                    Ok(done())
                }
            }
        }
    });
    let mut config = fast_config();
    // Retries must be woken by their own timer, not found by a poll.
    config.polling_interval = Duration::from_secs(30);
    config.backoff = BackoffPolicy::new(Duration::from_millis(300), Duration::from_secs(5));
    let policy = config.backoff;
    let running = Running::start(config, executor).await;

    let id = running.submit(request("retry")).await;
    let finished = running.wait_terminal(&id).await;

    assert_eq!(finished.status, RequestStatus::Completed);
    assert_eq!(finished.attempts, 3);
    assert_eq!(finished.errors.len(), 2);
    assert_eq!(finished.errors[1].message, "flaky source on attempt 2");
    assert!(finished.errors.iter().all(|e| e.retryable));

    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 3);
    for (retry, pair) in calls.windows(2).enumerate() {
        let gap = pair[1] - pair[0];
        let minimum = policy.minimum_delay(retry as u32 + 1);
        assert!(
            gap >= minimum,
            "retry {} came after {gap:?}, policy says {minimum:?}",
            retry + 1
        );
        assert!(
            gap < minimum + Duration::from_secs(10),
            "retry {} waited {gap:?}",
            retry + 1
        );
    }
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_that_always_fails_ends_failed_with_every_error() {
    let executor = scripted(|_, _| async { Err(WorkflowError::retryable("always down")) });
    let mut config = fast_config();
    config.max_retries = 2;
    let running = Running::start(config, executor).await;

    let id = running.submit(request("doomed")).await;
    let failed = running.wait_terminal(&id).await;

    assert_eq!(failed.status, RequestStatus::Failed);
    assert_eq!(failed.attempts, 3);
    assert_eq!(failed.errors.len(), 3);
    assert_eq!(
        failed.errors.iter().map(|e| e.attempt).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert!(failed.completed_at.is_some());
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_permanent_failure_is_not_retried() {
    let executor = scripted(|_, _| async { Err(WorkflowError::permanent("corpus missing")) });
    let running = Running::start(fast_config(), executor).await;

    let id = running.submit(request("broken")).await;
    let failed = running.wait_terminal(&id).await;

    assert_eq!(failed.status, RequestStatus::Failed);
    assert_eq!(failed.attempts, 1);
    assert!(!failed.errors[0].retryable);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_panicking_executor_fails_its_attempt_and_the_worker_lives_on() {
    let executor = scripted(|request, _| async move {
        if request.configuration.keywords[0] == "explode" {
            panic!("corpus parser blew up");
        }
        Ok(done())
    });
    let mut config = fast_config();
    config.max_retries = 1;
    let running = Running::start(config, executor).await;

    let bad = running.submit(request("explode")).await;
    let good: Vec<_> =
        futures::future::join_all((0..5).map(|i| running.submit(request(&format!("fine-{i}")))))
            .await;

    let failed = running.wait_terminal(&bad).await;
    assert_eq!(failed.status, RequestStatus::Failed);
    assert_eq!(failed.attempts, 2);
    assert!(
        failed.errors[0]
            .message
            .contains("executor panicked: corpus parser blew up"),
        "{:?}",
        failed.errors
    );
    for id in &good {
        assert_eq!(
            running.wait_terminal(id).await.status,
            RequestStatus::Completed
        );
    }
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelling_a_running_request_discards_the_result_of_an_executor_that_ignores_it() {
    let finished = Arc::new(AtomicUsize::new(0));
    let executor = scripted({
        let finished = finished.clone();
        move |_, _| {
            let finished = finished.clone();
            async move {
                // Never looks at the context.
                tokio::time::sleep(Duration::from_millis(600)).await;
                finished.fetch_add(1, Ordering::SeqCst);
                Ok(done())
            }
        }
    });
    let running = Running::start(fast_config(), executor).await;

    let id = running.submit(request("cancel")).await;
    running
        .wait_for(&id, |r| r.status == RequestStatus::Executing)
        .await;
    let outcome = running.orchestrator.cancel(&id).await.unwrap();
    assert_eq!(
        outcome,
        CancelOutcome::Cancelled {
            previous: RequestStatus::Executing
        }
    );

    // Wait until the executor has returned its (late) result.
    let deadline = Instant::now() + Duration::from_secs(5);
    while finished.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "executor never finished");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    let request = running.orchestrator.status(&id).await.unwrap();
    assert_eq!(request.status, RequestStatus::Cancelled);
    assert_eq!(request.results, None);
    assert!(running.orchestrator.results(&id).await.is_err());
    assert_eq!(
        request.history.last().map(|c| c.reason.as_str()),
        Some("cancelled by caller")
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_executor_that_never_stops_is_dropped_after_the_cancel_grace_period() {
    let executor = scripted(|_, _| async {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok(done())
    });
    let mut config = fast_config();
    config.cancel_grace_period = Duration::from_millis(200);
    let running = Running::start(config, executor).await;

    let stuck = running.submit(request("stuck")).await;
    running
        .wait_for(&stuck, |r| r.status == RequestStatus::Executing)
        .await;
    running.orchestrator.cancel(&stuck).await.unwrap();

    // The only slot frees up, so the next request runs... and is stuck too, which shows
    // it started. Cancel it and stop.
    let next = running.submit(request("next")).await;
    running
        .wait_for(&next, |r| r.status == RequestStatus::Executing)
        .await;
    running.orchestrator.cancel(&next).await.unwrap();
    let store = running.shutdown().await;
    assert_eq!(
        store.get(&stuck).await.unwrap().unwrap().status,
        RequestStatus::Cancelled
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cooperative_executor_sees_the_cancel() {
    let saw_cancel = Arc::new(AtomicUsize::new(0));
    let executor = scripted({
        let saw_cancel = saw_cancel.clone();
        move |_, ctx| {
            let saw_cancel = saw_cancel.clone();
            async move {
                tokio::select! {
                    _ = ctx.cancelled() => {
                        saw_cancel.fetch_add(1, Ordering::SeqCst);
                        Err(WorkflowError::cancelled())
                    }
                    _ = tokio::time::sleep(Duration::from_secs(60)) => Ok(done()),
                }
            }
        }
    });
    let running = Running::start(fast_config(), executor).await;

    let id = running.submit(request("cooperative")).await;
    running
        .wait_for(&id, |r| r.status == RequestStatus::Executing)
        .await;
    running.orchestrator.cancel(&id).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while saw_cancel.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "executor never saw the cancel");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let request = running.orchestrator.status(&id).await.unwrap();
    assert_eq!(request.status, RequestStatus::Cancelled);
    // The executor's "cancelled" error arrived after the cancel: not recorded as a failure.
    assert!(request.errors.is_empty());
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancel_made_through_another_handle_reaches_the_executor_by_heartbeat() {
    let saw_cancel = Arc::new(AtomicUsize::new(0));
    let executor = scripted({
        let saw_cancel = saw_cancel.clone();
        move |_, ctx| {
            let saw_cancel = saw_cancel.clone();
            async move {
                ctx.cancelled().await;
                saw_cancel.fetch_add(1, Ordering::SeqCst);
                Err(WorkflowError::cancelled())
            }
        }
    });
    let running = Running::start(fast_config(), executor).await;
    let id = running.submit(request("remote-cancel")).await;
    running
        .wait_for(&id, |r| r.status == RequestStatus::Executing)
        .await;

    // As another process would: straight on the database, not through this strategy.
    let path = running._dir.path().join("requests.db");
    let other_process = SqliteStore::open(path).await.unwrap();
    other_process
        .cancel(&id, "cancelled elsewhere")
        .await
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(5);
    while saw_cancel.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the heartbeat never delivered the cancel"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        running.orchestrator.status(&id).await.unwrap().status,
        RequestStatus::Cancelled
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_waits_for_quick_requests_and_hands_back_slow_ones() {
    let executor = scripted(|request, _| async move {
        let slow = request.configuration.keywords[0] == "slow";
        tokio::time::sleep(if slow {
            Duration::from_secs(3600)
        } else {
            Duration::from_millis(300)
        })
        .await;
        Ok(done())
    });
    let mut config = fast_config();
    config.max_concurrent_requests = 3;
    config.shutdown_grace_period = Duration::from_millis(800);
    let running = Running::start(config, executor).await;

    let quick = running.submit(request("quick")).await;
    let slow_a = running.submit(request("slow")).await;
    let slow_b = running.submit(request("slow")).await;
    for id in [&quick, &slow_a, &slow_b] {
        running
            .wait_for(id, |r| r.status == RequestStatus::Executing)
            .await;
    }

    let started = Instant::now();
    let store = running.shutdown().await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");

    assert_eq!(
        store.get(&quick).await.unwrap().unwrap().status,
        RequestStatus::Completed
    );
    for id in [&slow_a, &slow_b] {
        let request = store.get(id).await.unwrap().unwrap();
        assert_eq!(request.status, RequestStatus::Pending);
        assert_eq!(request.attempts, 0, "a handed-back attempt is not counted");
        assert_eq!(request.lease, None);
        assert_eq!(
            request.history.last().map(|c| c.reason.as_str()),
            Some("handed back at shutdown")
        );
    }
    let counts = store.count_by_status().await.unwrap();
    assert_eq!(counts.get(&RequestStatus::Processing), None);
    assert_eq!(counts.get(&RequestStatus::Executing), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_submit_wakes_idle_workers_without_waiting_for_the_poll() {
    let executor = scripted(|_, _| async { Ok(done()) });
    let mut config = fast_config();
    config.polling_interval = Duration::from_secs(60);
    let running = Running::start(config, executor).await;
    // Let the workers find nothing and go idle.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let submitted = Instant::now();
    let id = running.submit(request("wake")).await;
    let request = running.wait_terminal(&id).await;

    assert_eq!(request.status, RequestStatus::Completed);
    assert!(
        submitted.elapsed() < Duration::from_secs(30),
        "the request waited for the 60 s poll"
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_more_than_max_concurrent_requests_run_at_once() {
    let now_running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let executor = scripted({
        let now_running = now_running.clone();
        let most = most.clone();
        move |_, _| {
            let now_running = now_running.clone();
            let most = most.clone();
            async move {
                let n = now_running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(150)).await;
                now_running.fetch_sub(1, Ordering::SeqCst);
                Ok(done())
            }
        }
    });
    let mut config = fast_config();
    config.max_concurrent_requests = 3;
    let running = Running::start(config, executor).await;

    let mut ids = Vec::new();
    for i in 0..12 {
        ids.push(running.submit(request(&format!("batch-{i}"))).await);
    }
    for id in &ids {
        assert_eq!(
            running.wait_terminal(id).await.status,
            RequestStatus::Completed
        );
    }
    assert_eq!(most.load(Ordering::SeqCst), 3);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_run_in_priority_order() {
    let order = Arc::new(Mutex::new(Vec::new()));
    let executor = scripted({
        let order = order.clone();
        move |request, _| {
            let order = order.clone();
            async move {
                order
                    .lock()
                    .unwrap()
                    .push(request.configuration.keywords[0].clone());
                Ok(done())
            }
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("requests.db"))
        .await
        .unwrap();
    // Stored before any worker runs, so all three compete for the first claim.
    for (keyword, priority) in [
        ("low", Priority::Low),
        ("medium", Priority::Medium),
        ("high", Priority::High),
    ] {
        store
            .insert(request(keyword).with_priority(priority), 1)
            .await
            .unwrap();
    }
    let running = Running::start_on(dir, store, fast_config(), executor);

    let deadline = Instant::now() + Duration::from_secs(10);
    while order.lock().unwrap().len() < 3 {
        assert!(Instant::now() < deadline, "requests did not all run");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(*order.lock().unwrap(), ["high", "medium", "low"]);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_abandoned_by_a_dead_worker_is_rescued_and_completed() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("requests.db"))
        .await
        .unwrap();
    store.insert(request("orphan"), 3).await.unwrap();
    // A worker that claims and then dies: its lease lapses after 200 ms.
    let claimed = store
        .claim("dead-worker", 1, Duration::from_millis(200))
        .await
        .unwrap();
    let id = claimed[0].id.clone();

    let executor = scripted(|_, _| async { Ok(done()) });
    let running = Running::start_on(dir, store, fast_config(), executor);
    let finished = running.wait_terminal(&id).await;

    assert_eq!(finished.status, RequestStatus::Completed);
    assert_eq!(finished.attempts, 2);
    assert_eq!(finished.errors.len(), 1);
    assert!(finished.errors[0].message.contains("dead-worker"));
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn finished_requests_are_pruned_after_the_retention_period() {
    let executor = scripted(|_, _| async { Ok(done()) });
    let mut config = fast_config();
    config.cleanup_completed_after = Duration::from_secs(1);
    config.prune_interval = Duration::from_millis(100);
    let running = Running::start(config, executor).await;

    let id = running.submit(request("short-lived")).await;
    running.wait_terminal(&id).await;
    let pending = running
        .orchestrator
        .submit(request("future").with_run_after(chrono::Utc::now() + chrono::Duration::hours(1)))
        .await
        .unwrap()
        .id;

    let deadline = Instant::now() + Duration::from_secs(10);
    while running.store.get(&id).await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "the finished request was never pruned"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(running.store.get(&pending).await.unwrap().is_some());
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_of_a_type_this_process_cannot_run_fails_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("requests.db"))
        .await
        .unwrap();
    let mut foreign = request("foreign");
    foreign.request_type = RequestType::new("patent_watch").unwrap();
    let id = store.insert(foreign, 3).await.unwrap().into_request().id;

    let executor = scripted(|_, _| async { Ok(done()) });
    let running = Running::start_on(dir, store, fast_config(), executor);
    let failed = running.wait_terminal(&id).await;

    assert_eq!(failed.status, RequestStatus::Failed);
    assert!(failed.errors[0].message.contains("patent_watch"));
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_or_unroutable_submissions_store_nothing() {
    let executor = scripted(|_, _| async { Ok(done()) });
    let running = Running::start(fast_config(), executor).await;

    let mut bad = request("x");
    bad.configuration.quality_threshold = 1.5;
    match running.orchestrator.submit(bad).await {
        Err(root_orchestrator::Error::InvalidRequest { field, .. }) => {
            assert_eq!(field, "configuration.quality_threshold")
        }
        other => panic!("expected a validation error, got {other:?}"),
    }

    let mut unknown = request("x");
    unknown.request_type = RequestType::new("nobody_runs_this").unwrap();
    assert!(matches!(
        running.orchestrator.submit(unknown).await,
        Err(root_orchestrator::Error::UnknownRequestType { .. })
    ));

    assert!(running.store.count_by_status().await.unwrap().is_empty());
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_run_of_the_same_workers_is_refused_while_the_first_runs() {
    let executor = scripted(|_, _| async { Ok(done()) });
    let running = Running::start(fast_config(), executor).await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    let second = running
        .orchestrator
        .run_with_token(CancellationToken::new())
        .await;
    assert!(
        matches!(
            second,
            Err(root_orchestrator::Error::AlreadyRunning { strategy: "table" })
        ),
        "{second:?}"
    );

    // The first run is unaffected, and once it stops the workers can run again.
    let id = running.submit(request("still-served")).await;
    assert_eq!(
        running.wait_terminal(&id).await.status,
        RequestStatus::Completed
    );
    let orchestrator = running.orchestrator.clone();
    running.shutdown().await;
    let again = CancellationToken::new();
    again.cancel();
    orchestrator.run_with_token(again).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn results_no_store_could_keep_fail_the_request_at_once_with_the_reason() {
    let executor = scripted(|_, _| async {
        let mut deep = serde_json::json!(1);
        for _ in 0..100 {
            deep = serde_json::json!([deep]);
        }
        Ok(RequestResults::new(
            None,
            serde_json::json!({ "tree": deep }),
        ))
    });
    let running = Running::start(fast_config(), executor).await;

    let id = running.submit(request("deep")).await;
    let failed = running.wait_terminal(&id).await;

    assert_eq!(failed.status, RequestStatus::Failed);
    assert_eq!(failed.attempts, 1, "not worth a retry");
    assert!(
        failed.errors[0].message.contains("results.summary.tree"),
        "{:?}",
        failed.errors
    );
    // The listing, which reads every row, still works.
    let page = running
        .orchestrator
        .list(&root_orchestrator::ListFilter::new())
        .await
        .unwrap();
    assert_eq!(page.requests.len(), 1);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn submit_many_refuses_the_whole_batch_naming_the_bad_request() {
    let running = Running::start(fast_config(), scripted(|_, _| async { Ok(done()) })).await;

    let mut no_keywords = request("x");
    no_keywords.configuration.keywords.clear();
    let refused = running
        .orchestrator
        .submit_many([request("a"), no_keywords, request("c")])
        .await
        .unwrap_err();
    let root_orchestrator::Error::InvalidRequest { field, .. } = &refused else {
        panic!("expected an invalid-request error, got {refused:?}");
    };
    assert_eq!(field, "requests[1].configuration.keywords");

    let mut unknown = request("d");
    unknown.request_type = RequestType::new("no_such_type").unwrap();
    let refused = running
        .orchestrator
        .submit_many([request("a"), request("b"), unknown])
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("requests[2].request_type"),
        "{refused}"
    );

    // Neither batch stored anything.
    let store = running.shutdown().await;
    assert!(store.count_by_status().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_submitted_batch_wakes_the_workers_and_runs_each_request_once() {
    let runs = Arc::new(Mutex::new(Vec::new()));
    let executor = scripted({
        let runs = runs.clone();
        move |request: Request, ctx: WorkflowContext| {
            let runs = runs.clone();
            async move {
                // The executor starts beside the write that marks its request EXECUTING;
                // progress reported at once must still be accepted.
                ctx.report_progress(root_orchestrator::Progress::at_stage("start", 5))
                    .await
                    .map_err(|e| WorkflowError::permanent(e.to_string()))?;
                runs.lock().unwrap().push(request.id.to_string());
                Ok(done())
            }
        }
    });
    let mut config = fast_config();
    config.polling_interval = Duration::from_secs(60);
    config.max_concurrent_requests = 4;
    let running = Running::start(config, executor).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let outcomes = running
        .orchestrator
        .submit_many((0..60).map(|i| request(&format!("batch-{i}"))))
        .await
        .unwrap();
    let ids: Vec<RequestId> = outcomes.iter().map(|o| o.request().id.clone()).collect();
    for id in &ids {
        let finished = running.wait_terminal(id).await;
        assert_eq!(finished.status, RequestStatus::Completed, "{id}");
        assert_eq!(finished.attempts, 1, "{id}");
    }

    let mut ran = runs.lock().unwrap().clone();
    ran.sort();
    let mut expected: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
    expected.sort();
    assert_eq!(ran, expected, "each request ran exactly once");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shutdown_amid_quick_requests_leaves_none_in_flight() {
    for round in 0..4u64 {
        let executor = scripted(|_, _| async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            Ok(done())
        });
        let mut config = fast_config();
        config.max_concurrent_requests = 4;
        config.lease_duration = Duration::from_secs(60);
        let running = Running::start(config, executor).await;
        let mut ids = Vec::new();
        for i in 0..40 {
            ids.push(running.submit(request(&format!("quick-{i}"))).await);
        }
        tokio::time::sleep(Duration::from_millis(10 * round)).await;
        let stopped = running.shutdown().await;

        for id in &ids {
            let request = stopped.get(id).await.unwrap().expect("stored");
            assert!(
                matches!(
                    request.status,
                    RequestStatus::Completed | RequestStatus::Pending
                ),
                "round {round}: {id} left {:?}",
                request.status
            );
            assert!(request.lease.is_none(), "round {round}: {id} keeps a lease");
        }
    }
}
