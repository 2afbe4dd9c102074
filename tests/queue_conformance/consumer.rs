//! The queue strategy's consumers end to end on one backend, with a SQLite store.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use root_orchestrator::{
    BackoffPolicy, Configuration, NewRequest, QueueBackend, QueueConfig, QueueStrategy, Request,
    RequestId, RequestMessage, RequestResults, RequestStatus, RequestStore, RequestType,
    RootOrchestrator, RunningWorkers, Source, SqliteStore, WorkflowContext, WorkflowError,
    WorkflowExecutor,
};
use tokio::time::Instant;

use super::{QueueHarness, receive_one};

pub const TYPE: &str = "semaglutide_intelligence";

/// Expands to one test per consumer scenario, each with a fresh harness from `$make`.
#[macro_export]
macro_rules! consumer_suite {
    ($make:expr) => {
        $crate::consumer_suite!(@tests $make;
            submit_sends_the_request_in_the_wire_shape,
            submitted_requests_complete_and_leave_no_message,
            a_request_that_always_fails_is_retried_then_dead_lettered,
            malformed_messages_are_dead_lettered_without_stalling_valid_ones,
            a_request_running_past_its_visibility_timeout_runs_once,
            shutdown_abandons_the_long_poll_and_takes_nothing_after,
            shutdown_hands_back_what_is_still_running,
            messages_from_other_producers_are_stored_and_run,
            a_delivery_of_a_finished_request_is_deleted_without_running,
            a_redriven_message_without_request_id_is_not_run_again,
            a_late_message_whose_request_may_be_pruned_is_dead_lettered,
        );
    };
    (@tests $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let harness = $make;
                queue_conformance::consumer::$name(&harness).await;
            }
        )*
    };
}

type Outcome = Result<RequestResults, WorkflowError>;
type Run = dyn Fn(Request, WorkflowContext) -> BoxFuture<'static, Outcome> + Send + Sync;

/// An executor whose behaviour each test writes as a closure.
#[derive(Clone)]
pub struct Scripted(Arc<Run>);

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

pub fn scripted<F, Fut>(f: F) -> Scripted
where
    F: Fn(Request, WorkflowContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<RequestResults, WorkflowError>> + Send + 'static,
{
    Scripted(Arc::new(move |r, c| Box::pin(f(r, c))))
}

pub fn done() -> RequestResults {
    RequestResults::new(None, serde_json::json!({"ok": true}))
}

/// An executor that counts its calls and succeeds.
pub fn counting(calls: Arc<AtomicUsize>) -> Scripted {
    scripted(move |_, _| {
        let calls = calls.clone();
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok(done())
        }
    })
}

/// Settings scaled to the backend: no redelivery a test did not ask for, quick retries.
pub fn config(tick: Duration) -> QueueConfig {
    let mut config = QueueConfig::default();
    config.max_workers = 4;
    config.visibility_timeout = tick * 30;
    config.long_polling_wait_time = Duration::from_secs(1);
    config.backoff = BackoffPolicy::new(tick, tick * 20);
    config.shutdown_grace_period = Duration::from_secs(10);
    config.cancel_grace_period = Duration::from_secs(2);
    config.reconcile_after = Duration::from_secs(3600);
    config
}

pub fn new_request(keyword: &str) -> NewRequest {
    let mut configuration = Configuration::new([keyword]);
    configuration.sources.push(Source::new("FDA", "regulatory"));
    NewRequest::new(
        "glp1-market-watch",
        "analyst-001",
        RequestType::new(TYPE).unwrap(),
        configuration,
    )
}

/// A request in the wire shape, as another producer would send it, submitted just now.
pub fn wire(id: &str, keyword: &str, max_retries: u32) -> String {
    wire_submitted(id, keyword, max_retries, chrono::Utc::now())
}

/// A request in the wire shape, submitted `at`.
pub fn wire_submitted(
    id: &str,
    keyword: &str,
    max_retries: u32,
    at: chrono::DateTime<chrono::Utc>,
) -> String {
    serde_json::json!({
        "request_id": id,
        "project_id": "glp1-market-watch",
        "user_id": "analyst-001",
        "request_type": TYPE,
        "priority": "high",
        "configuration": {
            "keywords": [keyword],
            "sources": [{"name": "FDA", "type": "regulatory"}],
            "extraction_mode": "comprehensive",
            "quality_threshold": 0.7,
            "custom_params": {}
        },
        "metadata": {
            "submitted_at": at.to_rfc3339(),
            "retry_count": 0,
            "max_retries": max_retries
        }
    })
    .to_string()
}

pub fn unique_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// Consumers running on a queue, over a SQLite store of their own.
pub struct Consumers {
    pub orchestrator: RootOrchestrator,
    pub strategy: QueueStrategy,
    pub store: SqliteStore,
    pub queue: Arc<dyn QueueBackend>,
    workers: RunningWorkers,
    _dir: tempfile::TempDir,
}

impl Consumers {
    pub async fn start(
        queue: Arc<dyn QueueBackend>,
        config: QueueConfig,
        executor: Scripted,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("requests.db"))
            .await
            .unwrap();
        Self::start_on(dir, store, queue, config, executor)
    }

    pub fn start_on(
        dir: tempfile::TempDir,
        store: SqliteStore,
        queue: Arc<dyn QueueBackend>,
        config: QueueConfig,
        executor: Scripted,
    ) -> Self {
        let strategy =
            QueueStrategy::with_shared(Arc::new(store.clone()), queue.clone(), config).unwrap();
        let orchestrator = RootOrchestrator::builder()
            .strategy(strategy.clone())
            .executor(TYPE, executor)
            .build()
            .unwrap();
        let workers = orchestrator.spawn();
        Consumers {
            orchestrator,
            strategy,
            store,
            queue,
            workers,
            _dir: dir,
        }
    }

    pub async fn submit(&self, request: NewRequest) -> RequestId {
        self.orchestrator.submit(request).await.unwrap().id
    }

    /// Polls the store until the request exists and satisfies `wanted`.
    pub async fn wait_for(&self, id: &str, wanted: impl Fn(&Request) -> bool) -> Request {
        let id = RequestId::parse(id).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let seen = self.store.get(&id).await.unwrap();
            if let Some(request) = &seen
                && wanted(request)
            {
                return request.clone();
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting on {id}; last seen {:?}",
                seen.map(|r| (r.status, r.attempts))
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn wait_terminal(&self, id: &str) -> Request {
        self.wait_for(id, |r| r.status.is_terminal()).await
    }

    /// Stops the consumers; returns how long that took.
    pub async fn stop(self) -> (Duration, SqliteStore, tempfile::TempDir) {
        let started = Instant::now();
        self.workers.shutdown().await.unwrap();
        (started.elapsed(), self.store, self._dir)
    }
}

/// Polls the queue's depth until `wanted` holds.
pub async fn wait_depth(
    queue: &Arc<dyn QueueBackend>,
    wanted: impl Fn(&root_orchestrator::QueueDepth) -> bool,
) -> root_orchestrator::QueueDepth {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let depth = queue.depth().await.unwrap();
        if wanted(&depth) {
            return depth;
        }
        assert!(Instant::now() < deadline, "queue depth stuck at {depth:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn submit_sends_the_request_in_the_wire_shape(h: &impl QueueHarness) {
    let queue = h.open().await;
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("requests.db"))
        .await
        .unwrap();
    let strategy =
        QueueStrategy::with_shared(Arc::new(store.clone()), queue.clone(), config(h.tick()))
            .unwrap();
    // No consumers run: the message stays in the queue for this test to read.
    let orchestrator = RootOrchestrator::builder()
        .strategy(strategy)
        .executor(TYPE, counting(Arc::default()))
        .build()
        .unwrap();
    let request = orchestrator
        .submit(new_request("tirzepatide").with_max_attempts(6))
        .await
        .unwrap();
    assert_eq!(request.status, RequestStatus::Pending);

    let message = receive_one(&queue, Duration::from_secs(60), Duration::from_secs(10))
        .await
        .expect("submit sent a message");
    let raw: serde_json::Value = serde_json::from_str(&message.body).unwrap();
    assert_eq!(raw["request_id"], request.id.as_str());
    assert_eq!(raw["project_id"], "glp1-market-watch");
    assert_eq!(raw["user_id"], "analyst-001");
    assert_eq!(raw["request_type"], TYPE);
    assert_eq!(raw["priority"], "medium");
    assert_eq!(raw["configuration"]["keywords"][0], "tirzepatide");
    assert_eq!(raw["configuration"]["sources"][0]["type"], "regulatory");
    assert_eq!(raw["metadata"]["retry_count"], 0);
    assert_eq!(raw["metadata"]["max_retries"], 5);
    let parsed = RequestMessage::from_json(&message.body).unwrap();
    assert_eq!(
        parsed.metadata.map(|m| m.submitted_at),
        Some(request.created_at)
    );
}

pub async fn submitted_requests_complete_and_leave_no_message(h: &impl QueueHarness) {
    let calls = Arc::new(AtomicUsize::new(0));
    let consumers =
        Consumers::start(h.open().await, config(h.tick()), counting(calls.clone())).await;

    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(consumers.submit(new_request(&format!("keyword-{i}"))).await);
    }
    for id in &ids {
        let finished = consumers.wait_terminal(id.as_str()).await;
        assert_eq!(finished.status, RequestStatus::Completed);
        assert_eq!(finished.attempts, 1);
        assert_eq!(finished.results.unwrap().summary["ok"], true);
        // The lease owner names the worker and the message it ran for.
        let worker = finished
            .history
            .iter()
            .find(|c| c.status == RequestStatus::Processing)
            .and_then(|c| c.worker.clone())
            .unwrap();
        assert!(
            worker.starts_with(consumers.strategy.worker_id()),
            "{worker}"
        );
        assert!(worker.contains('@'), "{worker}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 6);
    wait_depth(&consumers.queue, |d| {
        d.visible + d.in_flight + d.delayed == 0
    })
    .await;
    consumers.stop().await;
}

pub async fn a_request_that_always_fails_is_retried_then_dead_lettered(h: &impl QueueHarness) {
    let starts = Arc::new(Mutex::new(Vec::new()));
    let executor = scripted({
        let starts = starts.clone();
        move |_, ctx| {
            let starts = starts.clone();
            async move {
                starts.lock().unwrap().push(Instant::now());
                Err(WorkflowError::retryable(format!(
                    "regulator API down on attempt {}",
                    ctx.attempt()
                )))
            }
        }
    });
    let queue = h.open().await;
    let mut config = config(h.tick());
    config.max_retries = 3;
    let policy = config.backoff;
    let consumers = Consumers::start(queue.clone(), config, executor).await;

    // Sent as another producer would, so the body in the dead-letter queue can be compared.
    let id = unique_id("doomed");
    let body = wire(&id, "doomed", 3);
    queue.send(&body, Duration::ZERO).await.unwrap();

    let failed = consumers.wait_terminal(&id).await;
    assert_eq!(failed.status, RequestStatus::Failed);
    assert_eq!(failed.attempts, 4);
    assert_eq!(
        failed.errors.iter().map(|e| e.attempt).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    assert_eq!(failed.errors[3].message, "regulator API down on attempt 4");

    // Dead-lettering sends the copy before it deletes the original: wait for both.
    wait_depth(&queue, |d| {
        d.dead_lettered == 1 && d.visible + d.in_flight + d.delayed == 0
    })
    .await;
    let letters = h.dead_letters(&queue).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(
        letters[0].body, body,
        "the body must reach the dead-letter queue intact"
    );
    let reason = letters[0].reason.clone().unwrap();
    assert!(reason.contains("after 4 attempt(s)"), "{reason}");
    assert!(
        reason.contains("regulator API down on attempt 4"),
        "{reason}"
    );
    // One message, re-timed between attempts and never re-sent: its count kept growing.
    assert_eq!(letters[0].receive_count, Some(4));

    let starts = starts.lock().unwrap().clone();
    assert_eq!(starts.len(), 4);
    let gaps: Vec<Duration> = starts.windows(2).map(|w| w[1] - w[0]).collect();
    for (i, gap) in gaps.iter().enumerate() {
        let minimum = policy.minimum_delay(i as u32 + 1);
        assert!(
            *gap >= minimum,
            "retry {} after {gap:?}, policy {minimum:?}",
            i + 1
        );
    }
    assert!(
        gaps[1] > gaps[0] && gaps[2] > gaps[1],
        "gaps do not grow: {gaps:?}"
    );
    consumers.stop().await;
}

pub async fn malformed_messages_are_dead_lettered_without_stalling_valid_ones(
    h: &impl QueueHarness,
) {
    let calls = Arc::new(AtomicUsize::new(0));
    let queue = h.open().await;
    let consumers =
        Consumers::start(queue.clone(), config(h.tick()), counting(calls.clone())).await;

    let not_json = "this is not JSON {".to_owned();
    let wrong_type = wire(&unique_id("wrong"), "x", 3).replace("0.7", "\"high\"");
    let unknown_type = wire(&unique_id("unknown"), "x", 3).replace(TYPE, "crystal_ball_forecast");
    for body in [&not_json, &wrong_type, &unknown_type] {
        queue.send(body, Duration::ZERO).await.unwrap();
    }
    let valid: Vec<String> = (0..10).map(|_| unique_id("valid")).collect();
    for id in &valid {
        queue
            .send(&wire(id, "semaglutide", 3), Duration::ZERO)
            .await
            .unwrap();
    }

    for id in &valid {
        assert_eq!(
            consumers.wait_terminal(id).await.status,
            RequestStatus::Completed
        );
    }
    assert_eq!(calls.load(Ordering::SeqCst), 10);
    wait_depth(&queue, |d| d.dead_lettered == 3).await;

    let letters = h.dead_letters(&queue).await;
    let reason_of = |body: &str| {
        letters
            .iter()
            .find(|l| l.body == body)
            .and_then(|l| l.reason.clone())
            .unwrap_or_else(|| panic!("{body} was not dead-lettered: {letters:?}"))
    };
    assert!(reason_of(&not_json).contains("not a request message"));
    assert!(reason_of(&wrong_type).contains("configuration.quality_threshold"));
    assert!(reason_of(&unknown_type).contains("unknown request type `crystal_ball_forecast`"));
    // Nothing was stored for them.
    assert_eq!(
        consumers
            .store
            .count_by_status()
            .await
            .unwrap()
            .values()
            .sum::<u64>(),
        10
    );
    consumers.stop().await;
}

pub async fn a_request_running_past_its_visibility_timeout_runs_once(h: &impl QueueHarness) {
    let calls = Arc::new(AtomicUsize::new(0));
    let mut config = config(h.tick());
    config.visibility_timeout = h.tick() * 2;
    let runtime = config.visibility_timeout * 3;
    let executor = scripted({
        let calls = calls.clone();
        move |_, _| {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(runtime).await;
                Ok(done())
            }
        }
    });
    let queue = h.open().await;
    let consumers = Consumers::start(queue.clone(), config, executor).await;

    let started = Instant::now();
    let id = consumers.submit(new_request("slow")).await;
    let finished = consumers.wait_terminal(id.as_str()).await;
    assert_eq!(finished.status, RequestStatus::Completed);
    assert!(started.elapsed() >= runtime);
    assert_eq!(finished.attempts, 1);
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    let depth = wait_depth(&queue, |d| d.visible + d.in_flight + d.delayed == 0).await;
    assert_eq!(depth.dead_lettered, 0);
    // Longer than a visibility timeout: a message that was not deleted would come back.
    assert!(
        queue
            .receive(10, h.tick() * 3, Duration::from_secs(60))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    consumers.stop().await;
}

pub async fn shutdown_abandons_the_long_poll_and_takes_nothing_after(h: &impl QueueHarness) {
    let calls = Arc::new(AtomicUsize::new(0));
    let mut config = config(h.tick());
    config.long_polling_wait_time = Duration::from_secs(20);
    config.visibility_timeout = h.tick() * 2;
    let queue = h.open().await;
    let consumers = Consumers::start(queue.clone(), config, counting(calls.clone())).await;
    let store = consumers.store.clone();

    // Let the consumer open its long poll on the empty queue.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (took, _store, _dir) = consumers.stop().await;
    assert!(took < Duration::from_secs(2), "shutdown took {took:?}");

    let id = unique_id("after-shutdown");
    let body = wire(&id, "late", 3);
    queue.send(&body, Duration::ZERO).await.unwrap();

    // The message is still there for the next consumer (an abandoned poll may have held it
    // for a visibility timeout), and nobody ran or stored its request.
    let message = receive_one(&queue, Duration::from_secs(60), Duration::from_secs(20))
        .await
        .expect("the message is still in the queue");
    assert_eq!(message.body, body);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert!(
        store
            .get(&RequestId::parse(&id).unwrap())
            .await
            .unwrap()
            .is_none()
    );
}

pub async fn shutdown_hands_back_what_is_still_running(h: &impl QueueHarness) {
    let started = Arc::new(AtomicUsize::new(0));
    let executor = scripted({
        let started = started.clone();
        move |_, _| {
            let started = started.clone();
            async move {
                started.fetch_add(1, Ordering::SeqCst);
                // Ignores its context: only the hand-back stops it.
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(done())
            }
        }
    });
    let mut config = config(h.tick());
    config.shutdown_grace_period = h.tick();
    let queue = h.open().await;
    let consumers = Consumers::start(queue.clone(), config, executor).await;

    let id = consumers.submit(new_request("long")).await;
    consumers
        .wait_for(id.as_str(), |r| r.status == RequestStatus::Executing)
        .await;
    let (took, store, _dir) = consumers.stop().await;
    assert!(
        took < h.tick() + Duration::from_secs(5),
        "shutdown took {took:?}"
    );

    let request = store.get(&id).await.unwrap().unwrap();
    assert_eq!(request.status, RequestStatus::Pending);
    assert!(request.errors.is_empty(), "{:?}", request.errors);
    assert_eq!(started.load(Ordering::SeqCst), 1);

    // The message is visible again at once, not after the 30-tick visibility timeout.
    let message = receive_one(&queue, Duration::from_secs(60), Duration::from_secs(10))
        .await
        .expect("the message was handed back");
    assert_eq!(message.receive_count, 2);
    assert!(message.body.contains(id.as_str()));
}

pub async fn messages_from_other_producers_are_stored_and_run(h: &impl QueueHarness) {
    let calls = Arc::new(AtomicUsize::new(0));
    let queue = h.open().await;
    let consumers =
        Consumers::start(queue.clone(), config(h.tick()), counting(calls.clone())).await;

    let id = unique_id("foreign");
    queue
        .send(&wire(&id, "Wegovy", 5), Duration::ZERO)
        .await
        .unwrap();
    // Without a request_id the message id names the request.
    let anonymous = r#"{"project_id": "p", "user_id": "u",
        "request_type": "semaglutide_intelligence",
        "configuration": {"keywords": ["Zepbound"],
                          "sources": [{"name": "NEJM", "type": "academic"}]}}"#;
    let message_id = queue.send(anonymous, Duration::ZERO).await.unwrap();

    let stored = consumers.wait_terminal(&id).await;
    assert_eq!(stored.status, RequestStatus::Completed);
    assert_eq!(stored.max_attempts, 6, "metadata.max_retries + 1");
    assert_eq!(stored.priority, root_orchestrator::Priority::High);
    assert_eq!(stored.configuration.keywords, ["Wegovy"]);

    let anonymous = consumers.wait_terminal(&message_id).await;
    assert_eq!(anonymous.status, RequestStatus::Completed);
    assert_eq!(anonymous.configuration.keywords, ["Zepbound"]);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    consumers.stop().await;
}

pub async fn a_delivery_of_a_finished_request_is_deleted_without_running(h: &impl QueueHarness) {
    let calls = Arc::new(AtomicUsize::new(0));
    let queue = h.open().await;
    let consumers =
        Consumers::start(queue.clone(), config(h.tick()), counting(calls.clone())).await;

    let id = unique_id("twice");
    let body = wire(&id, "Ozempic", 3);
    queue.send(&body, Duration::ZERO).await.unwrap();
    assert_eq!(
        consumers.wait_terminal(&id).await.status,
        RequestStatus::Completed
    );
    wait_depth(&queue, |d| d.visible + d.in_flight == 0).await;

    // The same request again (a producer retrying its send): dropped, not run.
    let copies: HashSet<String> =
        futures::future::join_all((0..3).map(|_| queue.send(&body, Duration::ZERO)))
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
    assert_eq!(copies.len(), 3);
    wait_depth(&queue, |d| d.visible + d.in_flight + d.delayed == 0).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let request = consumers.wait_terminal(&id).await;
    assert_eq!(request.attempts, 1);
    assert_eq!(queue.depth().await.unwrap().dead_lettered, 0);
    consumers.stop().await;
}

pub async fn a_redriven_message_without_request_id_is_not_run_again(h: &impl QueueHarness) {
    let calls = Arc::new(AtomicUsize::new(0));
    let executor = scripted({
        let calls = calls.clone();
        move |_, _| {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(WorkflowError::permanent("the source is gone"))
            }
        }
    });
    let queue = h.open().await;
    let consumers = Consumers::start(queue.clone(), config(h.tick()), executor).await;

    // Named by its message id: the dead-lettered copy and the redriven one get new ids.
    let anonymous = r#"{"project_id": "p", "user_id": "u",
        "request_type": "semaglutide_intelligence",
        "configuration": {"keywords": ["Zepbound"],
                          "sources": [{"name": "NEJM", "type": "academic"}]}}"#;
    let message_id = queue.send(anonymous, Duration::ZERO).await.unwrap();
    let failed = consumers.wait_terminal(&message_id).await;
    assert_eq!(failed.status, RequestStatus::Failed);
    wait_depth(&queue, |d| d.dead_lettered == 1).await;
    let letters = h.dead_letters(&queue).await;
    let letter: serde_json::Value = serde_json::from_str(&letters[0].body).unwrap();
    assert_eq!(letter["request_id"], message_id.as_str());

    assert_eq!(
        consumers.strategy.redrive_dead_letters(10).await.unwrap(),
        1
    );
    wait_depth(&queue, |d| {
        d.visible + d.in_flight + d.delayed + d.dead_lettered == 0
    })
    .await;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the job ran again");
    let all = consumers
        .store
        .list(&root_orchestrator::ListFilter::new())
        .await
        .unwrap();
    assert_eq!(all.requests.len(), 1, "a second request was made");
    assert_eq!(all.requests[0].status, RequestStatus::Failed);
    consumers.stop().await;
}

pub async fn a_late_message_whose_request_may_be_pruned_is_dead_lettered(h: &impl QueueHarness) {
    let calls = Arc::new(AtomicUsize::new(0));
    let queue = h.open().await;
    let mut config = config(h.tick());
    config.cleanup_completed_after = Duration::from_secs(60);
    let consumers = Consumers::start(queue.clone(), config, counting(calls.clone())).await;

    // Submitted an hour ago and not stored: finished and pruned, as far as anyone knows.
    let late = unique_id("late");
    let an_hour_ago = chrono::Utc::now() - chrono::Duration::hours(1);
    let body = wire_submitted(&late, "Mounjaro", 3, an_hour_ago);
    queue.send(&body, Duration::ZERO).await.unwrap();
    wait_depth(&queue, |d| d.dead_lettered == 1).await;
    let letters = h.dead_letters(&queue).await;
    assert_eq!(letters[0].body, body);
    if let Some(reason) = &letters[0].reason {
        assert!(reason.contains("pruned"), "{reason}");
    }
    let late_id = RequestId::parse(&late).unwrap();
    assert!(consumers.store.get(&late_id).await.unwrap().is_none());

    // A fresh one, and one without metadata, are new requests.
    let fresh = unique_id("fresh");
    queue
        .send(&wire(&fresh, "Mounjaro", 3), Duration::ZERO)
        .await
        .unwrap();
    let undated = r#"{"project_id": "p", "user_id": "u",
        "request_type": "semaglutide_intelligence",
        "configuration": {"keywords": ["Zepbound"],
                          "sources": [{"name": "NEJM", "type": "academic"}]}}"#;
    let undated_id = queue.send(undated, Duration::ZERO).await.unwrap();
    assert_eq!(
        consumers.wait_terminal(&fresh).await.status,
        RequestStatus::Completed
    );
    assert_eq!(
        consumers.wait_terminal(&undated_id).await.status,
        RequestStatus::Completed
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    consumers.stop().await;
}
