//! The batched hot path under attack, on real SQLite files and the real PostgreSQL:
//! `write_batch` and `insert_many` at the store, and the workers that start the executor
//! beside the write marking it `EXECUTING` and free their slot before the outcome is
//! written.
//!
//! The PostgreSQL cases need a server: `DATABASE_URL`, or
//! `postgres://postgres@127.0.0.1:5432/test`. An unreachable server fails them.

#[cfg(feature = "postgres")]
mod pg;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use root_orchestrator::{
    AttemptError, BackoffPolicy, CancelOutcome, Configuration, FencedWrite, InsertOutcome,
    LeaseRef, ListFilter, NewRequest, Priority, Progress, Request, RequestId, RequestPage,
    RequestResults, RequestStatus, RequestStore, RequestType, RescuedRequest, Result,
    RootOrchestrator, RunningWorkers, Source, SqliteStore, TableConfig, TableStrategy,
    WorkflowContext, WorkflowError, WorkflowExecutor, WriteOutcome,
};
use tokio::time::Instant;

const TYPE: &str = "semaglutide_intelligence";
const LEASE: Duration = Duration::from_secs(30);

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

fn with_id(keyword: &str, id: &str) -> NewRequest {
    request(keyword).with_id(RequestId::parse(id).unwrap())
}

fn results(tag: &str) -> RequestResults {
    RequestResults::new(None, serde_json::json!({ "tag": tag }))
}

fn rejected(current: Option<RequestStatus>) -> WriteOutcome {
    WriteOutcome::Rejected { current }
}

async fn status_of(store: &dyn RequestStore, id: &RequestId) -> Option<RequestStatus> {
    store.get(id).await.unwrap().map(|r| r.status)
}

/// Claims everything claimable and returns the leases by request id.
async fn claim_all(store: &dyn RequestStore, owner: &str) -> BTreeMap<String, LeaseRef> {
    store
        .claim(owner, 100, LEASE)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.id.to_string(), LeaseRef::of(r).unwrap()))
        .collect()
}

/// The statuses a request's history went through, in order.
fn path(request: &Request) -> Vec<RequestStatus> {
    request.history.iter().map(|h| h.status).collect()
}

// ---------------------------------------------------------------------------------------
// Store-level cases, run against every SQL backend.
// ---------------------------------------------------------------------------------------

/// Outcomes come back in input order, each rejection naming the status the request had.
async fn outcomes_in_order_with_the_right_rejections(store: &dyn RequestStore) {
    let ids = ["ord-a", "ord-b", "ord-c", "ord-d", "ord-e", "ord-f"];
    for id in ids {
        store.insert(with_id(id, id), 3).await.unwrap();
    }
    let leases = claim_all(store, "w1").await;
    // b is already executing, d is cancelled, e completed and pruned.
    assert_eq!(
        store.mark_executing(&leases["ord-b"]).await.unwrap(),
        WriteOutcome::Applied
    );
    store
        .cancel(&leases["ord-d"].request_id, "test")
        .await
        .unwrap();
    assert!(
        store
            .mark_executing(&leases["ord-e"])
            .await
            .unwrap()
            .is_applied()
    );
    assert!(
        store
            .complete(&leases["ord-e"], &results("e"))
            .await
            .unwrap()
            .is_applied()
    );
    let pruned = store
        .prune_finished(Utc::now() + chrono::Duration::days(1))
        .await
        .unwrap();
    assert_eq!(pruned, 2, "the cancelled and the completed request");
    let mut stale_c = leases["ord-c"].clone();
    stale_c.token = "not-the-token".to_owned();
    let missing = LeaseRef {
        request_id: RequestId::parse("never-stored").unwrap(),
        owner: "w1".to_owned(),
        token: "t".to_owned(),
    };

    let outcomes = store
        .write_batch(&[
            FencedWrite::Complete(leases["ord-f"].clone(), results("f")),
            FencedWrite::Complete(leases["ord-b"].clone(), results("b")),
            FencedWrite::MarkExecuting(stale_c),
            FencedWrite::MarkExecuting(leases["ord-a"].clone()),
            FencedWrite::MarkExecuting(leases["ord-d"].clone()),
            FencedWrite::Complete(leases["ord-e"].clone(), results("e")),
            FencedWrite::MarkExecuting(missing),
        ])
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        vec![
            // f was never marked executing.
            rejected(Some(RequestStatus::Processing)),
            WriteOutcome::Applied,
            rejected(Some(RequestStatus::Processing)),
            WriteOutcome::Applied,
            rejected(None),
            rejected(None),
            rejected(None),
        ]
    );
    let a = store
        .get(&leases["ord-a"].request_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.status, RequestStatus::Executing);
    assert_eq!(a.results, None);
    let b = store
        .get(&leases["ord-b"].request_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(b.status, RequestStatus::Completed);
    assert_eq!(b.results, Some(results("b")));
    assert_eq!(b.lease, None);
    for id in ["ord-c", "ord-f"] {
        let stored = store.get(&leases[id].request_id).await.unwrap().unwrap();
        assert_eq!(stored.status, RequestStatus::Processing, "{id}");
        assert_eq!(stored.results, None, "{id}");
    }
}

/// A request written twice in one batch — a stale attempt's write beside the current
/// attempt's, or the same write twice — gets the outcomes the writes one by one would.
async fn one_request_twice_in_a_batch(store: &dyn RequestStore) {
    store.insert(with_id("x", "twice"), 3).await.unwrap();
    let old = claim_all(store, "w-old").await.remove("twice").unwrap();
    assert!(store.release(&old, "test").await.unwrap().is_applied());
    let new = claim_all(store, "w-new").await.remove("twice").unwrap();
    assert_ne!(old.token, new.token);

    let marks = store
        .write_batch(&[
            FencedWrite::MarkExecuting(old.clone()),
            FencedWrite::MarkExecuting(new.clone()),
        ])
        .await
        .unwrap();
    assert_eq!(
        marks,
        vec![
            rejected(Some(RequestStatus::Processing)),
            WriteOutcome::Applied
        ],
        "the stale lease's write must not be reported as applied"
    );

    let completes = store
        .write_batch(&[
            FencedWrite::Complete(new.clone(), results("new")),
            FencedWrite::Complete(old.clone(), results("old")),
            FencedWrite::Complete(new.clone(), results("again")),
        ])
        .await
        .unwrap();
    assert_eq!(
        completes,
        vec![
            WriteOutcome::Applied,
            rejected(Some(RequestStatus::Completed)),
            rejected(Some(RequestStatus::Completed)),
        ]
    );
    let stored = store.get(&new.request_id).await.unwrap().unwrap();
    assert_eq!(stored.results, Some(results("new")));
    let completed = path(&stored)
        .into_iter()
        .filter(|s| *s == RequestStatus::Completed)
        .count();
    assert_eq!(completed, 1, "COMPLETED written once: {:?}", path(&stored));

    // Completion before marking, for one lease: as one by one, the completion finds the
    // request still PROCESSING and is refused; the mark then applies.
    store.insert(with_id("y", "reversed"), 3).await.unwrap();
    let lease = claim_all(store, "w").await.remove("reversed").unwrap();
    let outcomes = store
        .write_batch(&[
            FencedWrite::Complete(lease.clone(), results("early")),
            FencedWrite::MarkExecuting(lease.clone()),
        ])
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        vec![
            rejected(Some(RequestStatus::Processing)),
            WriteOutcome::Applied
        ]
    );
    let stored = store.get(&lease.request_id).await.unwrap().unwrap();
    assert_eq!(stored.status, RequestStatus::Executing);
    assert_eq!(stored.results, None);
}

/// Results right under the size limit, several to a batch, with the escaping-heavy
/// characters that grow when a batch is encoded, come back byte for byte.
async fn huge_results_in_one_batch(store: &dyn RequestStore) {
    let mut writes = Vec::new();
    let mut expected = Vec::new();
    for n in 0..4 {
        let id = format!("huge-{n}");
        store.insert(with_id("h", &id), 3).await.unwrap();
        let lease = claim_all(store, "w").await.remove(&id).unwrap();
        assert!(store.mark_executing(&lease).await.unwrap().is_applied());
        // Quotes and backslashes take two bytes each as JSON; fill to just under the limit.
        let unit = "\"\\é\u{1F600}\t";
        let size = |units: usize| {
            let summary = serde_json::json!({ "n": n, "text": unit.repeat(units) });
            serde_json::to_string(&RequestResults::new(Some(format!("/r/{n}")), summary))
                .unwrap()
                .len()
        };
        let per_unit = size(1) - size(0);
        let units = (root_orchestrator::MAX_RESULTS_BYTES - size(0)) / per_unit;
        assert!(root_orchestrator::MAX_RESULTS_BYTES - size(units) < per_unit);
        let summary = serde_json::json!({ "n": n, "text": unit.repeat(units) });
        let big = RequestResults::new(Some(format!("/r/{n}")), summary);
        big.validate().expect("under the limit");
        writes.push(FencedWrite::Complete(lease.clone(), big.clone()));
        expected.push((lease.request_id, big));
    }
    let outcomes = store.write_batch(&writes).await.unwrap();
    assert_eq!(outcomes, vec![WriteOutcome::Applied; 4]);
    for (id, big) in expected {
        let stored = store.get(&id).await.unwrap().unwrap();
        assert_eq!(stored.status, RequestStatus::Completed);
        assert_eq!(stored.results.as_ref(), Some(&big));
    }
}

/// Empty batches are no-ops that answer with nothing.
async fn empty_batches(store: &dyn RequestStore) {
    assert_eq!(store.write_batch(&[]).await.unwrap(), vec![]);
    assert_eq!(store.insert_many(Vec::new(), 3).await.unwrap(), vec![]);
    assert!(store.count_by_status().await.unwrap().is_empty());
}

/// Repeated ids within one batch and ids stored before: Inserted for the first occurrence
/// of a new id, Existing (the stored request, unchanged) otherwise, in input order.
async fn insert_many_with_repeats(store: &dyn RequestStore) {
    let before = store
        .insert(with_id("first", "known").with_priority(Priority::Low), 3)
        .await
        .unwrap();
    assert!(matches!(before, InsertOutcome::Inserted(_)));

    let batch = vec![
        with_id("one", "dup"),
        request("anonymous"),
        with_id("clash", "known"),
        with_id("two", "dup").with_priority(Priority::High),
        with_id("three", "dup"),
        with_id("fresh", "fresh").with_max_attempts(7),
    ];
    let outcomes = store.insert_many(batch, 3).await.unwrap();
    let kinds: Vec<(&str, &str, String)> = outcomes
        .iter()
        .map(|o| {
            let r = o.request();
            let kind = match o {
                InsertOutcome::Inserted(_) => "inserted",
                InsertOutcome::Existing(_) => "existing",
            };
            (kind, r.id.as_str(), r.configuration.keywords[0].clone())
        })
        .collect();
    let anonymous = outcomes[1].request().id.to_string();
    assert_eq!(
        kinds,
        vec![
            ("inserted", "dup", "one".to_owned()),
            ("inserted", anonymous.as_str(), "anonymous".to_owned()),
            ("existing", "known", "first".to_owned()),
            ("existing", "dup", "one".to_owned()),
            ("existing", "dup", "one".to_owned()),
            ("inserted", "fresh", "fresh".to_owned()),
        ]
    );
    // The repeats see the request as the first occurrence stored it.
    assert_eq!(outcomes[3].request().priority, Priority::Medium);
    assert_eq!(outcomes[2].request().priority, Priority::Low);
    assert_eq!(outcomes[5].request().max_attempts, 7);
    assert_eq!(outcomes[1].request().max_attempts, 3);
    let counts = store.count_by_status().await.unwrap();
    assert_eq!(counts.get(&RequestStatus::Pending), Some(&4));
}

/// A batch is claimed by priority, then in the order given; a `run_after` in the future
/// holds its request back, one in the past does not.
async fn insert_many_claim_order(store: &dyn RequestStore) {
    let later = Utc::now() + chrono::Duration::hours(1);
    let earlier = Utc::now() - chrono::Duration::hours(1);
    let batch = vec![
        with_id("k", "m1"),
        with_id("k", "l1").with_priority(Priority::Low),
        with_id("k", "h-later")
            .with_priority(Priority::High)
            .with_run_after(later),
        with_id("k", "m2").with_run_after(earlier),
        with_id("k", "h1").with_priority(Priority::High),
        with_id("k", "m3"),
        with_id("k", "h2").with_priority(Priority::High),
        with_id("k", "l2").with_priority(Priority::Low),
    ];
    let outcomes = store.insert_many(batch, 3).await.unwrap();
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, InsertOutcome::Inserted(_)))
    );
    let held = outcomes[2].request();
    assert_eq!(held.run_after.timestamp_micros(), later.timestamp_micros());

    let mut order = Vec::new();
    // Claim in small bites, as busy workers do, to see the order across claims too.
    loop {
        let claimed = store.claim("w", 2, LEASE).await.unwrap();
        if claimed.is_empty() {
            break;
        }
        order.extend(claimed.into_iter().map(|r| r.id.to_string()));
    }
    assert_eq!(order, ["h1", "h2", "m1", "m2", "m3", "l1", "l2"]);
    assert_eq!(
        status_of(store, &RequestId::parse("h-later").unwrap()).await,
        Some(RequestStatus::Pending)
    );
}

// ---------------------------------------------------------------------------------------
// SQLite stores: opened on a file, or over a pool the host already has.
// ---------------------------------------------------------------------------------------

async fn sqlite_open() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("requests.db"))
        .await
        .unwrap();
    (dir, store)
}

/// A store over a host's own pool of one connection: reads and writes share it, and
/// nothing may wait for a second one.
async fn sqlite_shared_pool() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(dir.path().join("shared.db"))
        .create_if_missing(true)
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal);
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await
        .unwrap();
    (dir, SqliteStore::from_pool(pool).await.unwrap())
}

macro_rules! sqlite_cases {
    ($($name:ident),* $(,)?) => {
        mod sqlite_open {
            $(
                #[tokio::test]
                async fn $name() {
                    let (_dir, store) = super::sqlite_open().await;
                    super::$name(&store).await;
                }
            )*
        }
        mod sqlite_shared_pool {
            $(
                #[tokio::test]
                async fn $name() {
                    let (_dir, store) = super::sqlite_shared_pool().await;
                    super::$name(&store).await;
                }
            )*
        }
    };
}

sqlite_cases!(
    outcomes_in_order_with_the_right_rejections,
    one_request_twice_in_a_batch,
    huge_results_in_one_batch,
    empty_batches,
    insert_many_with_repeats,
    insert_many_claim_order,
);

#[cfg(feature = "postgres")]
mod postgres {
    macro_rules! postgres_cases {
        ($($name:ident),* $(,)?) => {
            $(
                #[tokio::test]
                async fn $name() {
                    let schema = crate::pg::fresh_schema("batching");
                    let store = crate::pg::connect(&schema, 4).await;
                    super::$name(&store).await;
                    store.close().await;
                    crate::pg::drop_schema(&schema).await;
                }
            )*
        };
    }

    postgres_cases!(
        outcomes_in_order_with_the_right_rejections,
        one_request_twice_in_a_batch,
        huge_results_in_one_batch,
        empty_batches,
        insert_many_with_repeats,
        insert_many_claim_order,
    );
}

// ---------------------------------------------------------------------------------------
// Workers on a real store, with faults placed where the new path is thin: between the
// claim and the write that marks the request EXECUTING, and while outcomes are written.
// ---------------------------------------------------------------------------------------

type Hook =
    Arc<dyn Fn(Arc<dyn RequestStore>, Vec<FencedWrite>) -> BoxFuture<'static, ()> + Send + Sync>;

/// A real store whose `write_batch` first runs a hook: another process's cancel landing
/// just before a write, or a slow disk.
struct Intercepted {
    inner: Arc<dyn RequestStore>,
    before_batch: Hook,
    /// How long each claim's answer takes to come back from the store: a slow round trip,
    /// during which the claim has already taken its requests.
    claim_delay: Duration,
}

#[async_trait]
impl RequestStore for Intercepted {
    async fn insert(&self, request: NewRequest, max_attempts: u32) -> Result<InsertOutcome> {
        self.inner.insert(request, max_attempts).await
    }
    async fn insert_many(
        &self,
        requests: Vec<NewRequest>,
        max_attempts: u32,
    ) -> Result<Vec<InsertOutcome>> {
        self.inner.insert_many(requests, max_attempts).await
    }
    async fn get(&self, id: &RequestId) -> Result<Option<Request>> {
        self.inner.get(id).await
    }
    async fn list(&self, filter: &ListFilter) -> Result<RequestPage> {
        self.inner.list(filter).await
    }
    async fn claim(&self, owner: &str, limit: usize, lease: Duration) -> Result<Vec<Request>> {
        let claimed = self.inner.claim(owner, limit, lease).await;
        tokio::time::sleep(self.claim_delay).await;
        claimed
    }
    async fn claim_request(
        &self,
        id: &RequestId,
        owner: &str,
        lease: Duration,
    ) -> Result<Option<Request>> {
        self.inner.claim_request(id, owner, lease).await
    }
    async fn mark_executing(&self, lease: &LeaseRef) -> Result<WriteOutcome> {
        self.write_batch(&[FencedWrite::MarkExecuting(lease.clone())])
            .await
            .map(|o| o[0])
    }
    async fn record_progress(&self, lease: &LeaseRef, progress: &Progress) -> Result<WriteOutcome> {
        self.inner.record_progress(lease, progress).await
    }
    async fn extend_lease(&self, lease: &LeaseRef, duration: Duration) -> Result<WriteOutcome> {
        self.inner.extend_lease(lease, duration).await
    }
    async fn complete(&self, lease: &LeaseRef, results: &RequestResults) -> Result<WriteOutcome> {
        self.write_batch(&[FencedWrite::Complete(lease.clone(), results.clone())])
            .await
            .map(|o| o[0])
    }
    async fn write_batch(&self, writes: &[FencedWrite]) -> Result<Vec<WriteOutcome>> {
        (self.before_batch)(self.inner.clone(), writes.to_vec()).await;
        self.inner.write_batch(writes).await
    }
    async fn fail_attempt(
        &self,
        lease: &LeaseRef,
        error: &AttemptError,
        retry_at: Option<DateTime<Utc>>,
    ) -> Result<WriteOutcome> {
        self.inner.fail_attempt(lease, error, retry_at).await
    }
    async fn release(&self, lease: &LeaseRef, reason: &str) -> Result<WriteOutcome> {
        self.inner.release(lease, reason).await
    }
    async fn cancel(&self, id: &RequestId, reason: &str) -> Result<CancelOutcome> {
        self.inner.cancel(id, reason).await
    }
    async fn rescue_expired(&self) -> Result<Vec<RescuedRequest>> {
        self.inner.rescue_expired().await
    }
    async fn prune_finished(&self, before: DateTime<Utc>) -> Result<u64> {
        self.inner.prune_finished(before).await
    }
    async fn count_by_status(&self) -> Result<BTreeMap<RequestStatus, u64>> {
        self.inner.count_by_status().await
    }
    async fn ping(&self) -> Result<()> {
        self.inner.ping().await
    }
}

type Outcome = std::result::Result<RequestResults, WorkflowError>;
type Run = dyn Fn(Request, WorkflowContext) -> BoxFuture<'static, Outcome> + Send + Sync;

/// An executor whose behaviour each test writes as a closure.
struct Scripted(Arc<Run>);

#[async_trait]
impl WorkflowExecutor for Scripted {
    async fn execute(&self, request: &Request, ctx: &WorkflowContext) -> Outcome {
        (self.0)(request.clone(), ctx.clone()).await
    }
}

fn scripted<F, Fut>(f: F) -> Scripted
where
    F: Fn(Request, WorkflowContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    Scripted(Arc::new(move |r, c| Box::pin(f(r, c))))
}

fn fast_config(max_concurrent_requests: usize) -> TableConfig {
    let mut config = TableConfig::default();
    config.max_concurrent_requests = max_concurrent_requests;
    config.polling_interval = Duration::from_millis(50);
    config.status_update_interval = Duration::from_secs(10);
    config.lease_duration = LEASE;
    config.shutdown_grace_period = Duration::from_secs(10);
    config.cancel_grace_period = Duration::from_secs(10);
    config.backoff = BackoffPolicy::new(Duration::from_millis(50), Duration::from_secs(1));
    config
}

struct Workers {
    orchestrator: RootOrchestrator,
    run: RunningWorkers,
}

fn start(store: Arc<dyn RequestStore>, config: TableConfig, executor: Scripted) -> Workers {
    let orchestrator = RootOrchestrator::builder()
        .strategy(TableStrategy::with_shared_store(store, config).unwrap())
        .executor(TYPE, executor)
        .build()
        .unwrap();
    let run = orchestrator.spawn();
    Workers { orchestrator, run }
}

impl Workers {
    async fn stop(self) {
        self.run.shutdown().await.unwrap();
    }
}

async fn wait_until<F: Fn() -> bool>(what: &str, done: F) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_all_terminal(store: &dyn RequestStore, total: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let counts = store.count_by_status().await.unwrap();
        let finished: u64 = counts
            .iter()
            .filter(|(s, _)| s.is_terminal())
            .map(|(_, n)| n)
            .sum();
        if finished == total {
            return;
        }
        assert!(Instant::now() < deadline, "still unfinished: {counts:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A cancel from elsewhere (another process, straight on the store) lands after the claim
/// and before the write marking the request EXECUTING: that write is refused, and the
/// executor must be told to stop at once, not left running until its grace period is
/// over and then dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_between_claim_and_start_stops_the_executor() {
    let (_dir, sqlite) = sqlite_open().await;
    let store: Arc<dyn RequestStore> = Arc::new(Intercepted {
        inner: Arc::new(sqlite),
        claim_delay: Duration::ZERO,
        before_batch: Arc::new(|inner, writes| {
            Box::pin(async move {
                for write in writes {
                    if let FencedWrite::MarkExecuting(lease) = write {
                        let outcome = inner.cancel(&lease.request_id, "elsewhere").await;
                        assert!(matches!(outcome, Ok(CancelOutcome::Cancelled { .. })));
                    }
                }
            })
        }),
    });
    let saw_cancel = Arc::new(AtomicBool::new(false));
    let finished = Arc::new(AtomicBool::new(false));
    let executor = scripted({
        let saw_cancel = saw_cancel.clone();
        let finished = finished.clone();
        move |_, ctx| {
            let saw_cancel = saw_cancel.clone();
            let finished = finished.clone();
            async move {
                let outcome = tokio::select! {
                    _ = ctx.cancelled() => {
                        saw_cancel.store(true, Ordering::SeqCst);
                        Err(WorkflowError::cancelled())
                    }
                    _ = tokio::time::sleep(Duration::from_secs(20)) => Ok(results("kept")),
                };
                finished.store(true, Ordering::SeqCst);
                outcome
            }
        }
    });
    let workers = start(store.clone(), fast_config(2), executor);
    let id = workers.orchestrator.submit(request("x")).await.unwrap().id;

    let started = Instant::now();
    wait_until("the executor to stop", || finished.load(Ordering::SeqCst)).await;
    assert!(
        saw_cancel.load(Ordering::SeqCst),
        "the executor was dropped instead of being told to stop"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let stored = store.get(&id).await.unwrap().unwrap();
    assert_eq!(stored.status, RequestStatus::Cancelled);
    assert_eq!(stored.results, None);
    assert!(!path(&stored).contains(&RequestStatus::Executing));
    workers.stop().await;
}

/// Many requests submitted as one batch, run by a few workers whose executors report
/// progress at once, before the write marking them EXECUTING can have landed: every
/// request completes exactly once along PENDING -> PROCESSING -> EXECUTING -> COMPLETED,
/// no progress is refused, and never more executors run than there are slots.
async fn a_batch_runs_through_once_each(store: Arc<dyn RequestStore>) {
    const TOTAL: usize = 300;
    const SLOTS: usize = 6;
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(Mutex::new(Vec::new()));
    let executor = scripted({
        let (running, most, refused) = (running.clone(), most.clone(), refused.clone());
        move |request, ctx| {
            let (running, most, refused) = (running.clone(), most.clone(), refused.clone());
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                if let Err(err) = ctx.report_progress(Progress::at_stage("start", 10)).await {
                    refused.lock().unwrap().push(err.to_string());
                }
                tokio::time::sleep(Duration::from_millis(fastrand::u64(0..4))).await;
                if let Err(err) = ctx.report_progress(Progress::at_stage("end", 90)).await {
                    refused.lock().unwrap().push(err.to_string());
                }
                running.fetch_sub(1, Ordering::SeqCst);
                Ok(results(request.id.as_str()))
            }
        }
    });
    let workers = start(store.clone(), fast_config(SLOTS), executor);
    let batch: Vec<NewRequest> = (0..TOTAL).map(|n| request(&format!("k{n}"))).collect();
    let outcomes = workers.orchestrator.submit_many(batch).await.unwrap();
    assert_eq!(outcomes.len(), TOTAL);
    wait_all_terminal(&*store, TOTAL as u64).await;
    workers.stop().await;

    assert_eq!(refused.lock().unwrap().as_slice(), &[] as &[String]);
    let most = most.load(Ordering::SeqCst);
    assert!(
        (2..=SLOTS).contains(&most),
        "at most {most} executors at once"
    );
    let mut ids = HashSet::new();
    for outcome in &outcomes {
        let stored = store.get(&outcome.request().id).await.unwrap().unwrap();
        assert!(ids.insert(stored.id.clone()));
        assert_eq!(stored.status, RequestStatus::Completed, "{}", stored.id);
        assert_eq!(stored.results, Some(results(stored.id.as_str())));
        assert_eq!(stored.attempts, 1);
        assert_eq!(
            path(&stored),
            [
                RequestStatus::Pending,
                RequestStatus::Processing,
                RequestStatus::Executing,
                RequestStatus::Completed
            ],
            "{}",
            stored.id
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_runs_through_once_each_on_an_opened_sqlite_file() {
    let (_dir, store) = sqlite_open().await;
    a_batch_runs_through_once_each(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_runs_through_once_each_on_a_shared_one_connection_pool() {
    let (_dir, store) = sqlite_shared_pool().await;
    a_batch_runs_through_once_each(Arc::new(store)).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_runs_through_once_each_on_postgres() {
    let schema = pg::fresh_schema("batching");
    let store = pg::connect(&schema, 6).await;
    a_batch_runs_through_once_each(Arc::new(store.clone())).await;
    store.close().await;
    pg::drop_schema(&schema).await;
}

/// Shutdown while final writes are slow to commit: executors that returned before the
/// shutdown keep their outcome (the drain waits for the write, though their slot is
/// already free), the ones still running past the grace period are handed back, and
/// nothing is left PROCESSING or EXECUTING.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_keeps_pending_final_writes_and_hands_back_the_rest() {
    let (_dir, sqlite) = sqlite_open().await;
    let store: Arc<dyn RequestStore> = Arc::new(Intercepted {
        inner: Arc::new(sqlite),
        claim_delay: Duration::ZERO,
        before_batch: Arc::new(|_, writes| {
            Box::pin(async move {
                if writes
                    .iter()
                    .any(|w| matches!(w, FencedWrite::Complete(..)))
                {
                    tokio::time::sleep(Duration::from_millis(400)).await;
                }
            })
        }),
    });
    let returned = Arc::new(AtomicUsize::new(0));
    let executor = scripted({
        let returned = returned.clone();
        move |request, ctx| {
            let returned = returned.clone();
            async move {
                if request.configuration.keywords[0] == "slow" {
                    // Ignores the shutdown: only the hand-back stops it.
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
                ctx.report_progress(Progress::at_stage("done", 100)).await?;
                returned.fetch_add(1, Ordering::SeqCst);
                Ok(results(request.id.as_str()))
            }
        }
    });
    let mut config = fast_config(8);
    config.shutdown_grace_period = Duration::from_millis(300);
    let workers = start(store.clone(), config, executor);
    let mut batch: Vec<NewRequest> = (0..6).map(|n| request(&format!("quick{n}"))).collect();
    batch.extend((0..2).map(|_| request("slow")));
    let outcomes = workers.orchestrator.submit_many(batch).await.unwrap();
    wait_until("the quick executors to return", || {
        returned.load(Ordering::SeqCst) == 6
    })
    .await;
    // Their completions are now waiting on the slow commit.
    let stopped = Instant::now();
    workers.stop().await;
    assert!(stopped.elapsed() < Duration::from_secs(5));

    for outcome in outcomes {
        let stored = store.get(&outcome.request().id).await.unwrap().unwrap();
        if stored.configuration.keywords[0] == "slow" {
            assert_eq!(stored.status, RequestStatus::Pending, "{}", stored.id);
            assert_eq!(stored.attempts, 0, "a hand-back does not count the attempt");
            assert_eq!(stored.lease, None);
        } else {
            assert_eq!(stored.status, RequestStatus::Completed, "{}", stored.id);
            assert_eq!(stored.results, Some(results(stored.id.as_str())));
        }
    }
}

/// Where the second process of [`two_processes_share_one_sqlite_file`] finds the file.
const SHARED_FILE: &str = "ROOT_ORCHESTRATOR_BATCHING_SHARED_FILE";
const SHARED_TOTAL: u64 = 240;

/// Completes each request with the id of the process that ran it.
fn tagging_executor() -> Scripted {
    scripted(|request, ctx| async move {
        ctx.report_progress(Progress::at_stage("run", 50)).await?;
        tokio::time::sleep(Duration::from_millis(fastrand::u64(1..4))).await;
        Ok(RequestResults::new(
            None,
            serde_json::json!({ "id": request.id.as_str(), "pid": std::process::id() }),
        ))
    })
}

/// Two processes work one SQLite file, each with its own single writer connection: every
/// request runs once, by one of them, and both take part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_one_sqlite_file() {
    if let Ok(file) = std::env::var(SHARED_FILE) {
        // This is the second process, started by the test below: work until all is done.
        let store = SqliteStore::open(&file).await.unwrap();
        let workers = start(Arc::new(store.clone()), fast_config(4), tagging_executor());
        std::fs::write(format!("{file}.ready"), b"ready").unwrap();
        wait_all_terminal(&store, SHARED_TOTAL).await;
        workers.stop().await;
        return;
    }

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("shared.db");
    let store = SqliteStore::open(&file).await.unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "two_processes_share_one_sqlite_file",
            "--exact",
            "--test-threads=1",
        ])
        .env(SHARED_FILE, &file)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ready = file.with_extension("db.ready");
    wait_until("the second process to start", || ready.exists()).await;

    let workers = start(Arc::new(store.clone()), fast_config(4), tagging_executor());
    let mut ids = Vec::new();
    for chunk in 0..2 {
        let batch: Vec<NewRequest> = (0..SHARED_TOTAL / 2)
            .map(|n| request(&format!("c{chunk}n{n}")))
            .collect();
        let outcomes = workers.orchestrator.submit_many(batch).await.unwrap();
        ids.extend(outcomes.into_iter().map(|o| o.into_request().id));
    }
    wait_all_terminal(&store, SHARED_TOTAL).await;
    workers.stop().await;
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "the second process failed: {exit}");

    let mut pids = HashSet::new();
    for id in ids {
        let stored = store.get(&id).await.unwrap().unwrap();
        assert_eq!(stored.status, RequestStatus::Completed, "{id}");
        assert_eq!(stored.attempts, 1, "{id}");
        assert_eq!(
            path(&stored),
            [
                RequestStatus::Pending,
                RequestStatus::Processing,
                RequestStatus::Executing,
                RequestStatus::Completed
            ],
            "{id}"
        );
        let summary = stored.results.unwrap().summary;
        assert_eq!(summary["id"], id.as_str());
        pids.insert(summary["pid"].as_u64().unwrap());
    }
    assert_eq!(pids.len(), 2, "both processes ran requests: {pids:?}");
    assert!(pids.contains(&u64::from(std::process::id())));
}

/// A shutdown that begins while a claim is on its way to the store: whatever that claim
/// takes is handed back unrun, not started after the signal and not left PROCESSING.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_under_way_at_shutdown_hands_back_what_it_took() {
    let (_dir, sqlite) = sqlite_open().await;
    let sqlite: Arc<dyn RequestStore> = Arc::new(sqlite);
    let store: Arc<dyn RequestStore> = Arc::new(Intercepted {
        inner: sqlite.clone(),
        before_batch: Arc::new(|_, _| Box::pin(async {})),
        claim_delay: Duration::from_millis(400),
    });
    let started = Arc::new(AtomicUsize::new(0));
    let executor = scripted({
        let started = started.clone();
        move |_, _| {
            started.fetch_add(1, Ordering::SeqCst);
            async { Ok(results("ran")) }
        }
    });
    let ids: Vec<RequestId> = sqlite
        .insert_many((0..3).map(|i| request(&format!("late-{i}"))).collect(), 3)
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.request().id.clone())
        .collect();

    // The first claim takes all three at once; its answer is still on its way when the
    // shutdown begins.
    let workers = start(store, fast_config(4), executor);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        status_of(&*sqlite, &ids[0]).await,
        Some(RequestStatus::Processing),
        "the claim has taken the requests"
    );
    workers.stop().await;

    assert_eq!(
        started.load(Ordering::SeqCst),
        0,
        "nothing may start after the signal"
    );
    for id in &ids {
        let request = sqlite.get(id).await.unwrap().unwrap();
        assert_eq!(request.status, RequestStatus::Pending, "{id}");
        assert_eq!(
            request.attempts, 0,
            "{id}: a hand-back does not count the attempt"
        );
        assert!(request.lease.is_none(), "{id}");
    }
}
