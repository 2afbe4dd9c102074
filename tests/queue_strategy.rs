//! The queue strategy's consumer logic on the in-memory queue: the outbox and the
//! reconciler, duplicates, redeliveries, take-overs, retries, schedules, cancels, limits.

mod queue_conformance;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use queue_conformance::consumer::{
    Consumers, TYPE, config, counting, done, new_request, scripted, unique_id, wait_depth, wire,
};
use root_orchestrator::{
    CancelOutcome, CancellationToken, Error, InsertOutcome, MemoryQueue, MemoryStore,
    OutgoingMessage, QueueBackend, QueueConfig, QueueDepth, QueueStrategy, ReceivedMessage,
    ReconcileReport, RequestId, RequestStatus, RequestStore, RootOrchestrator, WorkflowError,
};
use tokio::time::Instant;

const TICK: Duration = Duration::from_millis(200);

/// A `MemoryQueue` that can fail sends, pretend to extend visibility, and logs deliveries.
#[derive(Clone, Default)]
struct Faulty {
    inner: MemoryQueue,
    failing_sends: Arc<AtomicUsize>,
    ignore_extensions: Arc<AtomicBool>,
    deliveries: Arc<Mutex<Vec<(String, u32)>>>,
    /// Failing sends fail as a queue that does not exist, not as a dropped connection.
    permanent_failures: Arc<AtomicBool>,
    /// Sends, and depth reads, wait without answering while set.
    hang_sends: Arc<AtomicBool>,
    hang_depth: Arc<AtomicBool>,
    receives: Arc<AtomicUsize>,
}

/// Waits while `flag` is set, as a server that does not answer.
async fn hang_while(flag: &AtomicBool) {
    while flag.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Faulty {
    fn deliveries_of(&self, message_id: &str) -> Vec<u32> {
        self.deliveries
            .lock()
            .unwrap()
            .iter()
            .filter(|(id, _)| id == message_id)
            .map(|(_, count)| *count)
            .collect()
    }
}

#[async_trait]
impl QueueBackend for Faulty {
    async fn send(&self, body: &str, delay: Duration) -> root_orchestrator::Result<String> {
        let failing = self
            .failing_sends
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if failing.is_ok() {
            let problem = if self.permanent_failures.load(Ordering::SeqCst) {
                "AWS.SimpleQueueService.NonExistentQueue (QueueDoesNotExist): no such queue"
            } else {
                "connection reset by peer"
            };
            return Err(Error::queue("send", "faulty", problem));
        }
        hang_while(&self.hang_sends).await;
        self.inner.send(body, delay).await
    }

    async fn receive(
        &self,
        max_messages: usize,
        wait: Duration,
        visibility_timeout: Duration,
    ) -> root_orchestrator::Result<Vec<ReceivedMessage>> {
        self.receives.fetch_add(1, Ordering::SeqCst);
        let received = self
            .inner
            .receive(max_messages, wait, visibility_timeout)
            .await?;
        self.deliveries.lock().unwrap().extend(
            received
                .iter()
                .map(|m| (m.message_id.clone(), m.receive_count)),
        );
        Ok(received)
    }

    async fn delete(&self, receipt_handle: &str) -> root_orchestrator::Result<()> {
        self.inner.delete(receipt_handle).await
    }

    async fn change_visibility(
        &self,
        receipt_handle: &str,
        timeout: Duration,
    ) -> root_orchestrator::Result<()> {
        self.inner.change_visibility(receipt_handle, timeout).await
    }

    async fn change_visibility_batch(
        &self,
        changes: &[(String, Duration)],
    ) -> root_orchestrator::Result<Vec<root_orchestrator::Result<()>>> {
        if self.ignore_extensions.load(Ordering::SeqCst) {
            // Claims success and does nothing, like a queue that lost the calls.
            return Ok(changes.iter().map(|_| Ok(())).collect());
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
        hang_while(&self.hang_depth).await;
        self.inner.depth().await
    }
}

fn fast() -> QueueConfig {
    config(TICK)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_send_that_fails_at_submit_is_delivered_by_the_outbox() {
    let calls = Arc::new(AtomicUsize::new(0));
    let queue = Faulty::default();
    // Three tries at submit, then the outbox's first: it gets through on its second.
    queue.failing_sends.store(4, Ordering::SeqCst);
    let consumers =
        Consumers::start(Arc::new(queue.clone()), fast(), counting(calls.clone())).await;

    let submitted = consumers
        .orchestrator
        .submit(new_request("outbox"))
        .await
        .expect("a stored request is accepted even when its send fails");
    assert_eq!(submitted.status, RequestStatus::Pending);
    assert_eq!(queue.failing_sends.load(Ordering::SeqCst), 1);

    let finished = consumers.wait_terminal(submitted.id.as_str()).await;
    assert_eq!(finished.status, RequestStatus::Completed);
    assert_eq!(queue.failing_sends.load(Ordering::SeqCst), 0);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    consumers.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_reconciler_sends_a_message_for_a_request_left_pending() {
    let calls = Arc::new(AtomicUsize::new(0));
    let dir = tempfile::tempdir().unwrap();
    let store = root_orchestrator::SqliteStore::open(dir.path().join("requests.db"))
        .await
        .unwrap();
    // Stored by a producer that died before it could send the message.
    let orphan = store.insert(new_request("orphan"), 4).await.unwrap();

    let mut config = fast();
    config.visibility_timeout = TICK * 2;
    config.reconcile_after = TICK * 2;
    config.reconcile_interval = TICK;
    let consumers = Consumers::start_on(
        dir,
        store,
        Arc::new(MemoryQueue::new()),
        config,
        counting(calls.clone()),
    );

    let finished = consumers.wait_terminal(orphan.request().id.as_str()).await;
    assert_eq!(finished.status, RequestStatus::Completed);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    consumers.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciling_resends_only_stale_requests_and_each_once() {
    let store = MemoryStore::new();
    let queue = MemoryQueue::new();
    let mut config = fast();
    config.visibility_timeout = TICK;
    config.reconcile_after = TICK * 2;
    let strategy = QueueStrategy::new(store.clone(), queue.clone(), config).unwrap();

    let stale = store.insert(new_request("stale"), 4).await.unwrap();
    tokio::time::sleep(TICK * 3).await;
    let fresh = store.insert(new_request("fresh"), 4).await.unwrap();

    let report = strategy.reconcile().await.unwrap();
    assert_eq!(report, expected(0, 1));
    let sent = queue
        .receive(10, Duration::ZERO, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(sent.len(), 1);
    assert!(sent[0].body.contains(stale.request().id.as_str()));
    assert!(!sent[0].body.contains(fresh.request().id.as_str()));

    // Sent lately: not again before another `reconcile_after`, however slow the queue.
    assert_eq!(strategy.reconcile().await.unwrap(), expected(0, 0));
}

fn expected(rescued: usize, resent: usize) -> ReconcileReport {
    let mut report = ReconcileReport::default();
    report.rescued = rescued;
    report.resent = resent;
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciling_rescues_leases_that_lapsed_long_ago() {
    let store = MemoryStore::new();
    let queue = MemoryQueue::new();
    let mut config = fast();
    config.visibility_timeout = TICK;
    config.reconcile_after = TICK * 2;
    let strategy = QueueStrategy::new(store.clone(), queue.clone(), config).unwrap();

    let lost = store.insert(new_request("lost"), 4).await.unwrap();
    let id = lost.request().id.clone();
    store
        .claim_request(&id, "queue-1-dead@gone-message", TICK / 4)
        .await
        .unwrap()
        .expect("claimed");

    // Lapsed, but not long enough ago: the message's next delivery would handle it.
    tokio::time::sleep(TICK).await;
    assert_eq!(strategy.reconcile().await.unwrap(), expected(0, 0));
    assert_eq!(
        store.get(&id).await.unwrap().unwrap().status,
        RequestStatus::Processing
    );

    tokio::time::sleep(TICK * 2).await;
    assert_eq!(strategy.reconcile().await.unwrap(), expected(1, 0));
    let rescued = store.get(&id).await.unwrap().unwrap();
    assert_eq!(rescued.status, RequestStatus::Pending);
    assert!(
        rescued.errors[0]
            .message
            .contains("queue-1-dead@gone-message")
    );

    // Pending since the rescue; once that is stale too, it gets a message.
    tokio::time::sleep(TICK * 3).await;
    assert_eq!(strategy.reconcile().await.unwrap(), expected(0, 1));
    assert_eq!(queue.depth().await.unwrap().visible, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_duplicate_message_for_a_running_request_is_dropped() {
    let calls = Arc::new(AtomicUsize::new(0));
    let release = CancellationToken::new();
    let executor = scripted({
        let calls = calls.clone();
        let release = release.clone();
        move |_, _| {
            let calls = calls.clone();
            let release = release.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                release.cancelled().await;
                Ok(done())
            }
        }
    });
    let queue = Faulty::default();
    let consumers = Consumers::start(Arc::new(queue.clone()), fast(), executor).await;

    let id = unique_id("dup");
    let body = wire(&id, "Mounjaro", 3);
    queue.send(&body, Duration::ZERO).await.unwrap();
    consumers
        .wait_for(&id, |r| r.status == RequestStatus::Executing)
        .await;

    let duplicate = queue.send(&body, Duration::ZERO).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while queue.deliveries_of(&duplicate).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the duplicate was never delivered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Only the running request's own message is left.
    let depth = wait_depth(&consumers.queue, |d| d.visible == 0 && d.in_flight == 1).await;
    assert_eq!(depth.dead_lettered, 0);

    release.cancel();
    assert_eq!(
        consumers.wait_terminal(&id).await.status,
        RequestStatus::Completed
    );
    wait_depth(&consumers.queue, |d| d.visible + d.in_flight == 0).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    consumers.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redelivery_of_the_running_message_hands_over_its_new_handle() {
    let calls = Arc::new(AtomicUsize::new(0));
    let mut config = fast();
    config.visibility_timeout = TICK * 2;
    let runtime = TICK * 8;
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
    let queue = Faulty::default();
    // Extensions go nowhere: the message keeps coming back while its request runs.
    queue.ignore_extensions.store(true, Ordering::SeqCst);
    let consumers = Consumers::start(Arc::new(queue.clone()), config, executor).await;

    let id = unique_id("redelivered");
    let message_id = queue
        .send(&wire(&id, "Zepbound", 3), Duration::ZERO)
        .await
        .unwrap();
    let finished = consumers.wait_terminal(&id).await;
    assert_eq!(finished.status, RequestStatus::Completed);
    assert_eq!(finished.attempts, 1);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(
        queue.deliveries_of(&message_id).len() >= 3,
        "{:?}",
        queue.deliveries_of(&message_id)
    );

    // Deleted with the newest handle: gone for good.
    wait_depth(&consumers.queue, |d| d.visible + d.in_flight == 0).await;
    assert!(
        queue
            .receive(10, TICK * 4, Duration::from_secs(60))
            .await
            .unwrap()
            .is_empty()
    );
    consumers.stop().await;
}

/// Leaves `id` claimed by a consumer that died holding `message`, lease `lease` long.
async fn dead_consumer(
    store: &dyn RequestStore,
    queue: &MemoryQueue,
    body: &str,
    id: &str,
    lease: Duration,
) -> String {
    queue.send(body, Duration::ZERO).await.unwrap();
    let message = queue
        .receive(1, Duration::ZERO, TICK)
        .await
        .unwrap()
        .pop()
        .unwrap();
    let request = RequestMessage::from_json(body)
        .unwrap()
        .into_new_request()
        .unwrap();
    store.insert(request, 4).await.unwrap();
    let owner = format!("queue-1-dead@{}", message.message_id);
    store
        .claim_request(&RequestId::parse(id).unwrap(), &owner, lease)
        .await
        .unwrap()
        .expect("claimed by the dead consumer");
    owner
}

use root_orchestrator::RequestMessage;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lapsed_consumer_is_taken_over_once_its_lease_expires() {
    let calls = Arc::new(AtomicUsize::new(0));
    let dir = tempfile::tempdir().unwrap();
    let store = root_orchestrator::SqliteStore::open(dir.path().join("requests.db"))
        .await
        .unwrap();
    let queue = MemoryQueue::new();
    let id = unique_id("orphaned");
    // The message comes back after one tick; the lease holds for five.
    let owner = dead_consumer(&store, &queue, &wire(&id, "Rybelsus", 3), &id, TICK * 5).await;
    let started = Instant::now();

    let consumers = Consumers::start_on(
        dir,
        store,
        Arc::new(queue.clone()),
        fast(),
        counting(calls.clone()),
    );
    let finished = consumers.wait_terminal(&id).await;
    assert!(
        started.elapsed() >= TICK * 5,
        "taken over before the lease lapsed"
    );
    assert_eq!(finished.status, RequestStatus::Completed);
    assert_eq!(finished.attempts, 2);
    assert_eq!(finished.errors.len(), 1);
    assert!(
        finished.errors[0].message.contains(&owner),
        "{:?}",
        finished.errors
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    wait_depth(&consumers.queue, |d| d.visible + d.in_flight == 0).await;
    consumers.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lapsed_consumer_that_spent_the_last_attempt_sends_the_message_to_dead_letters() {
    let calls = Arc::new(AtomicUsize::new(0));
    let dir = tempfile::tempdir().unwrap();
    let store = root_orchestrator::SqliteStore::open(dir.path().join("requests.db"))
        .await
        .unwrap();
    let queue = MemoryQueue::new();
    let id = unique_id("last-chance");
    let body = wire(&id, "Saxenda", 0);
    dead_consumer(&store, &queue, &body, &id, TICK).await;

    let consumers = Consumers::start_on(
        dir,
        store,
        Arc::new(queue.clone()),
        fast(),
        counting(calls.clone()),
    );
    let failed = consumers.wait_terminal(&id).await;
    assert_eq!(failed.status, RequestStatus::Failed);
    assert_eq!(failed.attempts, 1);
    wait_depth(&consumers.queue, |d| d.dead_lettered == 1).await;
    let letter = &queue.dead_letters()[0];
    assert_eq!(letter.body, body);
    assert!(
        letter.reason.contains("lease of worker queue-1-dead@"),
        "{}",
        letter.reason
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    consumers.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_re_times_the_same_message() {
    let executor = scripted(|_, ctx| async move {
        if ctx.attempt() < 3 {
            Err(WorkflowError::retryable("trial registry timed out"))
        } else {
            Ok(done())
        }
    });
    let queue = Faulty::default();
    let consumers = Consumers::start(Arc::new(queue.clone()), fast(), executor).await;

    let id = unique_id("flaky");
    let message_id = queue
        .send(&wire(&id, "semaglutide", 3), Duration::ZERO)
        .await
        .unwrap();
    let finished = consumers.wait_terminal(&id).await;
    assert_eq!(finished.status, RequestStatus::Completed);
    assert_eq!(finished.attempts, 3);

    // One message throughout, its receive count growing: never deleted and re-sent.
    assert_eq!(queue.deliveries_of(&message_id), [1, 2, 3]);
    let ids: HashSet<_> = queue
        .deliveries
        .lock()
        .unwrap()
        .iter()
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(ids.len(), 1);
    consumers.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scheduled_request_waits_for_its_time_even_when_a_copy_comes_early() {
    let starts = Arc::new(Mutex::new(Vec::new()));
    let executor = scripted({
        let starts = starts.clone();
        move |_, _| {
            let starts = starts.clone();
            async move {
                starts.lock().unwrap().push(chrono::Utc::now());
                Ok(done())
            }
        }
    });
    let queue = MemoryQueue::new();
    let consumers = Consumers::start(Arc::new(queue.clone()), fast(), executor).await;

    let run_after = chrono::Utc::now() + chrono::Duration::milliseconds(2500);
    let request = consumers
        .orchestrator
        .submit(new_request("later").with_run_after(run_after))
        .await
        .unwrap();
    // A copy without the delay, as a reconciler or another producer might send it.
    queue
        .send(
            &serde_json::to_string(&RequestMessage::from_request(&request)).unwrap(),
            Duration::ZERO,
        )
        .await
        .unwrap();

    let finished = consumers.wait_terminal(request.id.as_str()).await;
    assert_eq!(finished.status, RequestStatus::Completed);
    let starts = starts.lock().unwrap().clone();
    assert_eq!(starts.len(), 1);
    // Claims tolerate being up to a second early.
    assert!(
        starts[0] >= run_after - chrono::Duration::seconds(1),
        "ran at {} for {run_after}",
        starts[0]
    );
    wait_depth(&consumers.queue, |d| {
        d.visible + d.in_flight + d.delayed == 0
    })
    .await;
    consumers.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelled_requests_never_run_and_their_messages_go() {
    let calls = Arc::new(AtomicUsize::new(0));
    let queue: Arc<dyn QueueBackend> = Arc::new(MemoryQueue::new());
    let dir = tempfile::tempdir().unwrap();
    let store = root_orchestrator::SqliteStore::open(dir.path().join("requests.db"))
        .await
        .unwrap();

    // Submitted and cancelled before any consumer runs.
    let strategy =
        QueueStrategy::with_shared(Arc::new(store.clone()), queue.clone(), fast()).unwrap();
    let producer = RootOrchestrator::builder()
        .strategy(strategy)
        .executor(TYPE, counting(calls.clone()))
        .build()
        .unwrap();
    let id = producer.submit(new_request("cancel me")).await.unwrap().id;
    assert_eq!(
        producer.cancel(&id).await.unwrap(),
        CancelOutcome::Cancelled {
            previous: RequestStatus::Pending
        }
    );
    assert_eq!(queue.depth().await.unwrap().visible, 1);

    let consumers = Consumers::start_on(dir, store, queue.clone(), fast(), counting(calls.clone()));
    wait_depth(&queue, |d| d.visible + d.in_flight == 0).await;
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(
        consumers.wait_terminal(id.as_str()).await.status,
        RequestStatus::Cancelled
    );
    consumers.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelling_a_running_request_stops_it_and_deletes_its_message() {
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
    let consumers = Consumers::start(Arc::new(MemoryQueue::new()), fast(), executor).await;
    let id = consumers.submit(new_request("stop me")).await;
    consumers
        .wait_for(id.as_str(), |r| r.status == RequestStatus::Executing)
        .await;

    consumers.orchestrator.cancel(&id).await.unwrap();
    wait_depth(&consumers.queue, |d| d.visible + d.in_flight == 0).await;
    assert_eq!(saw_cancel.load(Ordering::SeqCst), 1);
    let request = consumers.wait_terminal(id.as_str()).await;
    assert_eq!(request.status, RequestStatus::Cancelled);
    assert!(request.errors.is_empty());
    assert_eq!(consumers.queue.depth().await.unwrap().dead_lettered, 0);
    consumers.stop().await;
}

#[tokio::test]
async fn a_message_too_large_for_the_queue_is_refused_before_it_is_stored() {
    let store = MemoryStore::new();
    // A small request's message is about 420 bytes.
    let queue = MemoryQueue::new().with_max_message_bytes(600);
    let strategy = QueueStrategy::new(store.clone(), queue.clone(), fast()).unwrap();
    let orchestrator = RootOrchestrator::builder()
        .strategy(strategy)
        .executor(TYPE, counting(Arc::default()))
        .build()
        .unwrap();

    let mut request = new_request("a keyword long enough to push the message past its limit");
    request.configuration.keywords.push("x".repeat(250));
    match orchestrator.submit(request).await {
        Err(Error::MessageTooLarge { size, limit }) => {
            assert_eq!(limit, 600);
            assert!(size > 600, "{size}");
        }
        other => panic!("expected MessageTooLarge, got {other:?}"),
    }
    assert!(store.count_by_status().await.unwrap().is_empty());
    assert_eq!(queue.depth().await.unwrap(), QueueDepth::default());

    // A small one still goes through.
    let small = orchestrator.submit(new_request("ok")).await.unwrap();
    assert_eq!(small.status, RequestStatus::Pending);
}

#[tokio::test]
async fn resubmitting_a_request_whose_send_failed_sends_it() {
    let store = MemoryStore::new();
    let queue = Faulty::default();
    queue.failing_sends.store(3, Ordering::SeqCst);
    let strategy = QueueStrategy::new(store.clone(), queue.clone(), fast()).unwrap();
    let orchestrator = RootOrchestrator::builder()
        .strategy(strategy)
        .executor(TYPE, counting(Arc::default()))
        .build()
        .unwrap();
    let id = RequestId::parse(unique_id("resubmitted")).unwrap();

    let first = orchestrator
        .submit_detailed(new_request("again").with_id(id.clone()))
        .await
        .unwrap();
    assert!(matches!(first, InsertOutcome::Inserted(_)));
    assert_eq!(queue.depth().await.unwrap().visible, 0);

    let second = orchestrator
        .submit_detailed(new_request("again").with_id(id.clone()))
        .await
        .unwrap();
    assert!(matches!(second, InsertOutcome::Existing(_)));
    assert_eq!(queue.depth().await.unwrap().visible, 1);

    // Sent once it went through: a third submit sends nothing more.
    orchestrator
        .submit(new_request("again").with_id(id))
        .await
        .unwrap();
    assert_eq!(queue.depth().await.unwrap().visible, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_of_one_strategy_is_refused() {
    let strategy = QueueStrategy::new(MemoryStore::new(), MemoryQueue::new(), fast()).unwrap();
    let orchestrator = RootOrchestrator::builder()
        .strategy(strategy)
        .executor(TYPE, counting(Arc::default()))
        .build()
        .unwrap();
    let first = orchestrator.spawn();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let second = orchestrator.run_with_token(CancellationToken::new()).await;
    assert!(
        matches!(second, Err(Error::AlreadyRunning { strategy: "queue" })),
        "{second:?}"
    );
    first.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redriven_dead_letters_run_once_their_cause_is_fixed() {
    let queue = MemoryQueue::new();
    let shared: Arc<dyn QueueBackend> = Arc::new(queue.clone());
    let dir = tempfile::tempdir().unwrap();
    let store = root_orchestrator::SqliteStore::open(dir.path().join("requests.db"))
        .await
        .unwrap();
    let consumers = Consumers::start_on(
        dir,
        store.clone(),
        shared.clone(),
        fast(),
        counting(Arc::default()),
    );

    // A type this deployment does not run yet.
    let id = unique_id("pricing");
    let body = wire(&id, "list price", 3).replace(TYPE, "pricing_watch");
    queue.send(&body, Duration::ZERO).await.unwrap();
    wait_depth(&shared, |d| d.dead_lettered == 1).await;
    let (_, _, dir) = consumers.stop().await;

    // The next deployment runs it: redrive, and the request completes.
    let calls = Arc::new(AtomicUsize::new(0));
    let strategy =
        QueueStrategy::with_shared(Arc::new(store.clone()), shared.clone(), fast()).unwrap();
    let orchestrator = RootOrchestrator::builder()
        .strategy(strategy.clone())
        .executor(TYPE, counting(Arc::default()))
        .executor("pricing_watch", counting(calls.clone()))
        .build()
        .unwrap();
    let workers = orchestrator.spawn();
    assert_eq!(strategy.redrive_dead_letters(10).await.unwrap(), 1);
    assert_eq!(strategy.depth().await.unwrap().dead_lettered, 0);

    let deadline = Instant::now() + Duration::from_secs(20);
    let id = RequestId::parse(&id).unwrap();
    loop {
        if let Some(request) = store.get(&id).await.unwrap()
            && request.status.is_terminal()
        {
            assert_eq!(request.status, RequestStatus::Completed);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the redriven request never finished"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    workers.shutdown().await.unwrap();
    drop(dir);
}

#[tokio::test]
async fn batch_sends_report_each_message() {
    let queue = MemoryQueue::new().with_max_message_bytes(10);
    let outcomes = queue
        .send_batch(&[
            OutgoingMessage::new("fits"),
            OutgoingMessage::new("does not fit"),
            OutgoingMessage::new("later").with_delay(Duration::from_secs(30)),
        ])
        .await
        .unwrap();
    assert!(outcomes[0].is_ok());
    assert!(matches!(
        outcomes[1],
        Err(Error::MessageTooLarge {
            size: 12,
            limit: 10
        })
    ));
    assert!(outcomes[2].is_ok());
    let depth = queue.depth().await.unwrap();
    assert_eq!((depth.visible, depth.delayed), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_submit_to_a_queue_that_does_not_answer_returns_within_seconds() {
    let calls = Arc::new(AtomicUsize::new(0));
    let queue = Faulty::default();
    queue.hang_sends.store(true, Ordering::SeqCst);
    let consumers =
        Consumers::start(Arc::new(queue.clone()), fast(), counting(calls.clone())).await;

    let started = Instant::now();
    let submitted = tokio::time::timeout(
        Duration::from_secs(30),
        consumers.orchestrator.submit(new_request("silent")),
    )
    .await
    .expect("submit hung on a queue that does not answer")
    .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(submitted.status, RequestStatus::Pending);

    // The outbox delivers it once the queue answers again.
    queue.hang_sends.store(false, Ordering::SeqCst);
    let finished = consumers.wait_terminal(submitted.id.as_str()).await;
    assert_eq!(finished.status, RequestStatus::Completed);
    consumers.stop().await;
}

#[tokio::test]
async fn a_send_refused_for_good_is_not_retried_at_submit() {
    let store = MemoryStore::new();
    let queue = Faulty::default();
    queue.permanent_failures.store(true, Ordering::SeqCst);
    queue.failing_sends.store(5, Ordering::SeqCst);
    let strategy = QueueStrategy::new(store.clone(), queue.clone(), fast()).unwrap();
    let orchestrator = RootOrchestrator::builder()
        .strategy(strategy)
        .executor(TYPE, counting(Arc::default()))
        .build()
        .unwrap();

    let submitted = orchestrator.submit(new_request("nowhere")).await.unwrap();
    assert_eq!(submitted.status, RequestStatus::Pending);
    // One try, then the outbox (which keeps trying: the queue may be created later).
    assert_eq!(queue.failing_sends.load(Ordering::SeqCst), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_does_not_wait_for_a_queue_that_stopped_answering() {
    let queue = Faulty::default();
    queue.hang_depth.store(true, Ordering::SeqCst);
    let mut config = fast();
    config.shutdown_grace_period = Duration::from_secs(1);
    let consumers =
        Consumers::start(Arc::new(queue.clone()), config, counting(Arc::default())).await;
    // The depth refresh runs at start and never returns.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (took, _, _) = tokio::time::timeout(Duration::from_secs(30), consumers.stop())
        .await
        .expect("shutdown waited for a depth refresh that never returns");
    assert!(took < Duration::from_secs(3), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_consumer_without_long_polling_does_not_spin() {
    let queue = Faulty::default();
    let mut config = fast();
    config.long_polling_wait_time = Duration::ZERO;
    let consumers =
        Consumers::start(Arc::new(queue.clone()), config, counting(Arc::default())).await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    consumers.stop().await;
    // One receive a second, not thousands.
    let receives = queue.receives.load(Ordering::SeqCst);
    assert!((1..=4).contains(&receives), "{receives} receives in 2.5 s");
}

#[tokio::test]
async fn readiness_needs_the_queue_as_well_as_the_store() {
    let queue = Faulty::default();
    let strategy = QueueStrategy::new(MemoryStore::new(), queue.clone(), fast()).unwrap();
    let orchestrator = RootOrchestrator::builder()
        .strategy(strategy)
        .executor(TYPE, counting(Arc::default()))
        .build()
        .unwrap();
    orchestrator.ready().await.expect("store and queue answer");

    queue.hang_depth.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let err = orchestrator.ready().await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(started.elapsed() < RootOrchestrator::READY_TIMEOUT + Duration::from_secs(1));

    queue.hang_depth.store(false, Ordering::SeqCst);
    orchestrator
        .ready()
        .await
        .expect("ready again once the queue answers");
}

/// A request message without `request_id`, padded by `pad` bytes, submitted `at`.
fn unnamed_message(pad: usize, at: chrono::DateTime<chrono::Utc>) -> String {
    let wire = queue_conformance::consumer::wire_submitted("x", "kw", 0, at);
    let mut message: serde_json::Value = serde_json::from_str(&wire).unwrap();
    message.as_object_mut().unwrap().remove("request_id");
    message["configuration"]["custom_params"]["pad"] = serde_json::json!("a".repeat(pad));
    message.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_too_close_to_the_limit_to_name_its_request_stays_dead_lettered() {
    // The body fits, but not once it carries the request id it was known by.
    let limit = unnamed_message(0, chrono::Utc::now()).len() + 210;
    let body = unnamed_message(200, chrono::Utc::now());
    let queue = MemoryQueue::new().with_max_message_bytes(limit);
    let shared: Arc<dyn QueueBackend> = Arc::new(queue.clone());
    let calls = Arc::new(AtomicUsize::new(0));
    let executor = scripted({
        let calls = calls.clone();
        move |_, _| {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(WorkflowError::permanent("boom"))
            }
        }
    });
    let consumers = Consumers::start(shared.clone(), fast(), executor).await;
    queue.send(&body, Duration::ZERO).await.unwrap();
    wait_depth(&shared, |d| d.dead_lettered == 1).await;

    assert_eq!(
        consumers.strategy.redrive_dead_letters(10).await.unwrap(),
        0
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let depth = shared.depth().await.unwrap();
    assert_eq!((depth.dead_lettered, depth.visible), (1, 0));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "never run again under a new id"
    );
    assert_eq!(
        consumers
            .store
            .count_by_status()
            .await
            .unwrap()
            .values()
            .sum::<u64>(),
        1
    );
    consumers.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_redriven_after_the_retention_window_runs_as_a_resubmission() {
    let queue = MemoryQueue::new();
    let shared: Arc<dyn QueueBackend> = Arc::new(queue.clone());
    let store = MemoryStore::new();
    let mut config = fast();
    config.cleanup_completed_after = Duration::from_secs(1);

    // Dead-lettered for a type nobody runs yet, then left longer than the window.
    let id = unique_id("pricing");
    let body = wire(&id, "list price", 3).replace(TYPE, "pricing_watch");
    let strategy =
        QueueStrategy::with_shared(Arc::new(store.clone()), shared.clone(), config.clone())
            .unwrap();
    let orchestrator = RootOrchestrator::builder()
        .strategy(strategy.clone())
        .executor(TYPE, counting(Arc::default()))
        .build()
        .unwrap();
    let workers = orchestrator.spawn();
    queue.send(&body, Duration::ZERO).await.unwrap();
    wait_depth(&shared, |d| d.dead_lettered == 1).await;
    workers.shutdown().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await;

    // The executor is deployed, and the operator redrives.
    let calls = Arc::new(AtomicUsize::new(0));
    let orchestrator = RootOrchestrator::builder()
        .strategy(strategy.clone())
        .executor(TYPE, counting(Arc::default()))
        .executor("pricing_watch", counting(calls.clone()))
        .build()
        .unwrap();
    let workers = orchestrator.spawn();
    assert_eq!(strategy.redrive_dead_letters(10).await.unwrap(), 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while calls.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the redriven message never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    workers.shutdown().await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let request = store
        .get(&RequestId::parse(&id).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(request.status, RequestStatus::Completed);
}

/// A batch with one request whose message the queue would refuse stores none of them: every
/// message is measured before anything is stored.
#[tokio::test]
async fn a_batch_with_one_message_too_large_stores_none() {
    use root_orchestrator::ProcessingStrategy;

    let store = MemoryStore::new();
    let queue = MemoryQueue::new().with_max_message_bytes(2048);
    let strategy = QueueStrategy::with_shared(
        Arc::new(store.clone()),
        Arc::new(queue.clone()),
        config(TICK),
    )
    .unwrap();
    let mut big = new_request("big");
    big.configuration.custom_params = serde_json::json!({ "notes": "x".repeat(4_000) });
    let batch = vec![new_request("a"), new_request("b"), big, new_request("c")];

    let err = strategy.submit_many(batch).await.unwrap_err();

    assert!(matches!(err, Error::MessageTooLarge { .. }), "{err}");
    let stored: u64 = store.count_by_status().await.unwrap().values().sum();
    assert_eq!(stored, 0, "a refused batch stores nothing");
    assert_eq!(queue.depth().await.unwrap().visible, 0, "and sends nothing");
}
