//! Fault injection with real processes and real servers, all on loopback: worker processes
//! killed with SIGKILL or stopped with SIGTERM, PostgreSQL and SQS cut off behind a proxy,
//! an SQS response lost on the way back, and workers in other time zones. Each test counts
//! executions (a journal the workers append to) and completion writes (the request's
//! history), so a request that vanished, ran twice or stayed running would show.
//!
//! The worker processes are the `fault_worker` example, which `cargo test` builds next to
//! this test. Needs PostgreSQL (`DATABASE_URL`, or `postgres://postgres@127.0.0.1:5432/test`);
//! with the `sqs` feature also an SQS server at `AWS_ENDPOINT_URL_SQS`:
//! `bash .ci/with-sqs cargo test --features postgres,sqs --test faults`. A missing server
//! fails the tests that need it; none is skipped.

mod faults_support;
mod pg;

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use faults_support::proxy::{Mode, Proxy};
use faults_support::{
    WorkerProcess, WorkerSpec, claimed_by, init_logs, journal, tally, times_in_history, unix_ms,
    wait_until,
};
use root_orchestrator::{
    Configuration, NewRequest, PostgresStore, PostgresStoreOptions, Request, RequestId,
    RequestResults, RequestStatus, RequestStore, RequestType, RootOrchestrator, RunningWorkers,
    Source, SqliteStore, TableConfig, TableStrategy, WorkflowContext, WorkflowError,
    WorkflowExecutor,
};
use tokio::time::Instant;

const TYPE: &str = "semaglutide_intelligence";

/// A request the `fault_worker` runs for its `--short-ms` or, of kind `long`, `--long-ms`.
fn request(kind: &str) -> NewRequest {
    let mut configuration = Configuration::new(["semaglutide"]);
    configuration.sources.push(Source::new("FDA", "regulatory"));
    configuration.custom_params = serde_json::json!({ "kind": kind });
    NewRequest::new(
        "glp1-market-watch",
        "analyst-001",
        RequestType::new(TYPE).unwrap(),
        configuration,
    )
}

/// Stores a request of `kind` (4 attempts) straight into `store`; returns its id.
async fn stored(store: &dyn RequestStore, kind: &str) -> RequestId {
    store
        .insert(request(kind), 4)
        .await
        .unwrap()
        .into_request()
        .id
}

fn args(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

fn path_arg(path: &Path) -> String {
    path.to_str().expect("a UTF-8 temp path").to_owned()
}

async fn get(store: &dyn RequestStore, id: &RequestId) -> Request {
    store.get(id).await.unwrap().expect("the request is stored")
}

async fn count(store: &dyn RequestStore, status: RequestStatus) -> u64 {
    let counts = store.count_by_status().await.unwrap();
    counts.get(&status).copied().unwrap_or(0)
}

/// Nothing may be left in a running state.
async fn assert_nothing_running(store: &dyn RequestStore) {
    assert_eq!(count(store, RequestStatus::Processing).await, 0);
    assert_eq!(count(store, RequestStatus::Executing).await, 0);
}

/// Short timings for table workers: leases lapse within seconds.
const TABLE_SETTINGS: [(&str, &str); 4] = [
    ("LEASE_DURATION", "1.5"),
    ("STATUS_UPDATE_INTERVAL", "0.3"),
    ("POLLING_INTERVAL", "0.1"),
    ("SHUTDOWN_GRACE_PERIOD", "2"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_request_of_a_killed_worker_is_rerun_by_another_process_and_completes_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("requests.db");
    let journal_path = dir.path().join("journal");
    let store = SqliteStore::open(&db).await.unwrap();
    let id = stored(&store, "long").await;

    let worker_args = |long_ms: &str| {
        args(&[
            "--sqlite",
            &path_arg(&db),
            "--journal",
            &path_arg(&journal_path),
            "--long-ms",
            long_ms,
        ])
    };
    // The first process would pause for a minute: it is killed long before.
    let mut doomed = WorkerProcess::start(WorkerSpec {
        args: worker_args("60000"),
        settings: &TABLE_SETTINGS,
        env: Vec::new(),
    })
    .await;
    wait_until(
        "the first process starts the request",
        Duration::from_secs(10),
        || async { journal(&journal_path).len() == 1 },
    )
    .await;
    let running = get(&store, &id).await;
    assert_eq!(running.status, RequestStatus::Executing);
    let lease = running.lease.expect("a running request has a lease");
    assert_eq!(lease.owner, doomed.worker_id);

    doomed.kill();
    let killed_at = unix_ms();
    let rescuer = WorkerProcess::start(WorkerSpec {
        args: worker_args("300"),
        settings: &TABLE_SETTINGS,
        env: Vec::new(),
    })
    .await;
    wait_until("the request completes", Duration::from_secs(15), || async {
        get(&store, &id).await.status == RequestStatus::Completed
    })
    .await;

    let finished = get(&store, &id).await;
    assert_eq!(finished.attempts, 2, "the killed attempt counts");
    assert_eq!(times_in_history(&finished, RequestStatus::Completed), 1);
    assert_eq!(finished.errors.len(), 1, "{:?}", finished.errors);
    assert!(
        finished.errors[0].message.contains(&doomed.worker_id),
        "the rescue names the lost worker: {:?}",
        finished.errors
    );
    let executions = journal(&journal_path);
    let starts: Vec<_> = executions.iter().filter(|e| e.started).collect();
    let ends: Vec<_> = executions.iter().filter(|e| !e.started).collect();
    assert_eq!(starts.len(), 2, "{executions:?}");
    assert_eq!(
        (starts[0].worker.as_str(), starts[0].attempt),
        (doomed.worker_id.as_str(), 1)
    );
    assert_eq!(
        (starts[1].worker.as_str(), starts[1].attempt),
        (rescuer.worker_id.as_str(), 2)
    );
    assert_eq!(ends.len(), 1, "only the second execution ran to its end");
    assert_eq!(ends[0].worker, rescuer.worker_id);
    // Not rerun before the lease it saw could have lapsed, nor long after.
    assert!(
        starts[1].at_ms >= lease.expires_at.timestamp_millis(),
        "rerun at {} before the lease's expiry {}",
        starts[1].at_ms,
        lease.expires_at
    );
    assert!(
        starts[1].at_ms <= killed_at + 1_500 + 3_000,
        "rerun too late"
    );
    assert_nothing_running(&store).await;
    rescuer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_what_fits_the_grace_period_hands_back_the_rest_and_claims_nothing_new() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("requests.db");
    let journal_path = dir.path().join("journal");
    let store = SqliteStore::open(&db).await.unwrap();
    let mut short = Vec::new();
    let mut long = Vec::new();
    for _ in 0..2 {
        short.push(stored(&store, "short").await);
        long.push(stored(&store, "long").await);
    }

    // Five slots for four requests: a claim loop still running after the signal would take
    // a new request at its next poll, 0.1 s later.
    let mut settings = TABLE_SETTINGS.to_vec();
    settings.push(("MAX_CONCURRENT_REQUESTS", "5"));
    settings.push(("LEASE_DURATION", "5"));
    let worker_args = |short_ms: &str, long_ms: &str| {
        args(&[
            "--sqlite",
            &path_arg(&db),
            "--journal",
            &path_arg(&journal_path),
            "--short-ms",
            short_ms,
            "--long-ms",
            long_ms,
        ])
    };
    let mut first = WorkerProcess::start(WorkerSpec {
        args: worker_args("1000", "60000"),
        settings: &settings,
        env: Vec::new(),
    })
    .await;
    wait_until(
        "the first process runs all four",
        Duration::from_secs(10),
        || async { journal(&journal_path).iter().filter(|e| e.started).count() == 4 },
    )
    .await;

    first.terminate();
    let signalled = Instant::now();
    let mut after_signal = Vec::new();
    for _ in 0..3 {
        after_signal.push(stored(&store, "short").await);
    }
    let status = first.wait(Duration::from_secs(10)).await;
    let took = signalled.elapsed();
    assert!(status.success(), "graceful shutdown exits 0, not {status}");
    assert!(
        took >= Duration::from_millis(1_900) && took < Duration::from_secs(5),
        "the long requests held the shutdown for the 2 s grace period, not {took:?}"
    );
    assert!(first.lines().iter().any(|l| l.ends_with(" stopped")));

    for id in &short {
        let r = get(&store, id).await;
        assert_eq!(
            r.status,
            RequestStatus::Completed,
            "finished within the grace period"
        );
        assert_eq!(times_in_history(&r, RequestStatus::Completed), 1);
        let completion = r.history.last().unwrap();
        assert_eq!(completion.worker.as_deref(), Some(first.worker_id.as_str()));
    }
    for id in &long {
        let r = get(&store, id).await;
        assert_eq!(r.status, RequestStatus::Pending, "handed back");
        assert_eq!(r.attempts, 0, "a hand-back does not count the attempt");
        assert!(r.lease.is_none());
        assert_eq!(r.history.last().unwrap().reason, "handed back at shutdown");
    }
    for id in &after_signal {
        let r = get(&store, id).await;
        assert_eq!(r.status, RequestStatus::Pending);
        assert!(
            !claimed_by(&r, &first.worker_id),
            "claimed after the signal: {r:?}"
        );
    }
    assert_nothing_running(&store).await;

    let second = WorkerProcess::start(WorkerSpec {
        args: worker_args("100", "100"),
        settings: &settings,
        env: Vec::new(),
    })
    .await;
    wait_until(
        "the second process finishes the rest",
        Duration::from_secs(15),
        || async { count(&store, RequestStatus::Completed).await == 7 },
    )
    .await;
    let second_id = second.worker_id.clone();
    second.stop().await;

    let executions = journal(&journal_path);
    let by_request = tally(&executions);
    let ran = |id: &RequestId, worker: &str| {
        executions
            .iter()
            .filter(|e| e.started && e.request_id == id.as_str() && e.worker == worker)
            .count()
    };
    for id in &short {
        assert_eq!(by_request[id.as_str()], (1, 1), "short ones ran once");
        assert_eq!(ran(id, &first.worker_id), 1);
    }
    for id in long.iter().chain(&after_signal) {
        let r = get(&store, id).await;
        assert_eq!(times_in_history(&r, RequestStatus::Completed), 1);
        assert_eq!(
            r.history.last().unwrap().worker.as_deref(),
            Some(second_id.as_str())
        );
        assert_eq!(ran(id, &second_id), 1);
    }
    for id in &long {
        assert_eq!(
            by_request[id.as_str()],
            (2, 1),
            "started by both, finished by the second"
        );
        assert_eq!(get(&store, id).await.attempts, 1);
    }
    for id in &after_signal {
        assert_eq!(
            ran(id, &first.worker_id),
            0,
            "the signalled process never started it"
        );
        assert_eq!(by_request[id.as_str()], (1, 1));
    }
}

/// Pauses, counting executions per request.
#[derive(Clone, Default)]
struct Counting {
    pause: Duration,
    executions: Arc<Mutex<HashMap<RequestId, usize>>>,
}

#[async_trait]
impl WorkflowExecutor for Counting {
    async fn execute(
        &self,
        request: &Request,
        ctx: &WorkflowContext,
    ) -> Result<RequestResults, WorkflowError> {
        *self
            .executions
            .lock()
            .unwrap()
            .entry(request.id.clone())
            .or_default() += 1;
        tokio::select! {
            _ = ctx.cancelled() => Err(WorkflowError::cancelled()),
            _ = tokio::time::sleep(self.pause) => {
                Ok(RequestResults::new(None, serde_json::Value::Null))
            }
        }
    }
}

impl Counting {
    fn executions(&self) -> HashMap<RequestId, usize> {
        self.executions.lock().unwrap().clone()
    }
}

/// Runs `orchestrator`'s workers until the token is cancelled.
struct Running {
    orchestrator: RootOrchestrator,
    run: RunningWorkers,
}

impl Running {
    fn start(orchestrator: RootOrchestrator) -> Running {
        let run = orchestrator.spawn();
        Running { orchestrator, run }
    }

    async fn stop(self) {
        self.run.shutdown().await.expect("workers stop cleanly");
    }
}

/// `url` with its host and port replaced by `address`, and the address it named.
fn through(url: &str, address: SocketAddr) -> (String, SocketAddr) {
    let start = url
        .find('@')
        .or_else(|| url.find("://").map(|i| i + 2))
        .unwrap()
        + 1;
    let end = start + url[start..].find('/').unwrap_or(url.len() - start);
    let upstream = url[start..end]
        .to_socket_addrs()
        .expect("DATABASE_URL names host:port")
        .next()
        .unwrap();
    assert!(
        upstream.ip().is_loopback(),
        "the database must be on loopback"
    );
    (
        format!("{}{address}{}", &url[..start], &url[end..]),
        upstream,
    )
}

/// Waits until `ready()` answers `expected` (true: Ok), for up to `limit`.
async fn wait_ready(orchestrator: &RootOrchestrator, expected: bool, limit: Duration) {
    let what = if expected { "ready again" } else { "not ready" };
    wait_until(what, limit, || async {
        orchestrator.ready().await.is_ok() == expected
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_behind_a_proxy_loses_nothing_and_workers_recover_by_themselves() {
    init_logs();
    let schema = pg::fresh_schema("ro_fault");
    let direct = pg::connect(&schema, 3).await;
    let (_, upstream) = through(&pg::database_url(), "127.0.0.1:1".parse().unwrap());
    let proxy = Proxy::start(upstream, Mode::Raw).await;
    let (proxied_url, _) = through(&pg::database_url(), proxy.address());

    let mut config = TableConfig::default();
    config.max_concurrent_requests = 3;
    config.polling_interval = Duration::from_millis(200);
    config.status_update_interval = Duration::from_millis(500);
    // Longer than the outage: a lease must survive it, or its request would rightly rerun.
    config.lease_duration = Duration::from_secs(8);
    config.shutdown_grace_period = Duration::from_secs(5);
    let executor = Counting {
        pause: Duration::from_millis(150),
        ..Counting::default()
    };
    let mut processes = Vec::new();
    for _ in 0..2 {
        let mut options = PostgresStoreOptions::default();
        options.schema = Some(schema.clone());
        options.max_connections = 4;
        options.acquire_timeout = Duration::from_secs(1);
        let store = PostgresStore::connect_with(&proxied_url, options)
            .await
            .expect("connect through the proxy");
        let orchestrator = RootOrchestrator::builder()
            .strategy(TableStrategy::new(store, config.clone()).unwrap())
            .executor(TYPE, executor.clone())
            .build()
            .unwrap();
        processes.push(Running::start(orchestrator));
    }

    let mut ids = Vec::new();
    for _ in 0..60 {
        ids.push(stored(&direct, "short").await);
    }
    wait_until("work is under way", Duration::from_secs(20), || async {
        count(&direct, RequestStatus::Completed).await >= 10
    })
    .await;

    proxy.stop();
    let outage = Instant::now();
    for process in &processes {
        wait_ready(&process.orchestrator, false, Duration::from_secs(3)).await;
    }
    // Another process submits meanwhile: its notifications cannot reach the workers.
    for _ in 0..20 {
        ids.push(stored(&direct, "short").await);
    }
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(outage.elapsed())).await;
    for process in &processes {
        assert!(
            !process.run.is_finished(),
            "a worker gave up during the outage"
        );
        assert!(
            process.orchestrator.ready().await.is_err(),
            "ready while cut off"
        );
    }
    proxy.resume().await;

    for process in &processes {
        wait_ready(&process.orchestrator, true, Duration::from_secs(10)).await;
    }
    wait_until(
        "every request completes",
        Duration::from_secs(30),
        || async { count(&direct, RequestStatus::Completed).await == 80 },
    )
    .await;
    assert_nothing_running(&direct).await;
    let executions = executor.executions();
    for id in &ids {
        assert_eq!(executions.get(id), Some(&1), "{id} ran once");
        let r = get(&direct, id).await;
        assert_eq!(times_in_history(&r, RequestStatus::Completed), 1);
        // A claim that committed while its reply was lost to the cut leaves its requests
        // leased to nobody until the lease lapses; the rescue then counts that attempt.
        // Nothing else may fail an attempt here.
        assert!(
            r.errors
                .iter()
                .all(|e| e.message.contains("expired before the attempt finished")),
            "{:?}",
            r.errors
        );
        assert_eq!(r.attempts as usize, 1 + r.errors.len(), "{:?}", r.errors);
    }
    for process in processes {
        process.stop().await;
    }
    direct.close().await;
    pg::drop_schema(&schema).await;
}

/// The offsets a zone may have (standard and daylight time), in seconds east of UTC.
fn offsets(zone: &str) -> [i32; 2] {
    match zone {
        "Pacific/Chatham" => [12 * 3600 + 45 * 60, 13 * 3600 + 45 * 60],
        "America/Los_Angeles" => [-8 * 3600, -7 * 3600],
        other => panic!("no offsets known for {other}"),
    }
}

/// A worker in time zone `zone` submits a request due in 2 s, and the test submits another
/// (from a UTC process): both run within the poll interval after they are due, never
/// early, and the timestamps each side stored read back equal on the other.
async fn delayed_requests_run_on_time(
    store: &dyn RequestStore,
    zone: &str,
    store_args: Vec<String>,
    journal_path: &Path,
) -> WorkerProcess {
    let due_in = chrono::Duration::seconds(2);
    let ours = store
        .insert(
            request("short").with_run_after(chrono::Utc::now() + due_in),
            4,
        )
        .await
        .unwrap()
        .into_request();
    let mut worker_args = store_args;
    worker_args.extend(args(&[
        "--journal",
        &path_arg(journal_path),
        "--submit-due-in-ms",
        "2000",
    ]));
    let mut worker = WorkerProcess::start(WorkerSpec {
        args: worker_args,
        settings: &[
            ("POLLING_INTERVAL", "0.1"),
            ("MAX_CONCURRENT_REQUESTS", "2"),
        ],
        env: vec![
            ("TZ".to_owned(), zone.to_owned()),
            ("DATABASE_URL".to_owned(), pg::database_url()),
        ],
    })
    .await;
    let offset: i32 = worker
        .wait_for_line("local offset ", "", Duration::from_secs(1))
        .await["local offset ".len()..]
        .parse()
        .unwrap();
    assert!(
        offsets(zone).contains(&offset),
        "TZ={zone} gave offset {offset}"
    );

    let submitted = worker
        .wait_for_line("submitted ", "", Duration::from_secs(1))
        .await;
    let fields: Vec<&str> = submitted.split(' ').collect();
    let theirs = RequestId::parse(fields[1]).unwrap();
    let due = chrono::DateTime::parse_from_rfc3339(fields[3]).unwrap();
    let theirs_stored = get(store, &theirs).await;
    assert_eq!(
        theirs_stored.run_after.timestamp_micros(),
        due.timestamp_micros(),
        "the worker's run_after reads back equal here"
    );
    assert_eq!(
        fields[6],
        theirs_stored.run_after.to_rfc3339(),
        "what the worker stored is what it read"
    );
    let created_gap = (theirs_stored.created_at + due_in - due.to_utc()).num_milliseconds();
    assert!(
        created_gap.abs() < 1_000,
        "created_at off by {created_gap} ms"
    );

    wait_until(
        "both requests complete",
        Duration::from_secs(10),
        || async { count(store, RequestStatus::Completed).await == 2 },
    )
    .await;
    let executions = journal(journal_path);
    for request in [&ours, &theirs_stored] {
        let start = executions
            .iter()
            .find(|e| e.started && e.request_id == request.id.as_str())
            .expect("the request ran");
        let due_ms = request.run_after.timestamp_millis();
        assert!(
            start.at_ms >= due_ms,
            "ran {} ms early",
            due_ms - start.at_ms
        );
        assert!(
            start.at_ms < due_ms + 1_500,
            "ran {} ms late",
            start.at_ms - due_ms
        );
        assert_eq!(
            start.run_after.as_deref(),
            Some(request.run_after.to_rfc3339().as_str()),
            "the worker read the same run_after"
        );
        let done = get(store, &request.id).await;
        assert_eq!(done.created_at, request.created_at);
        let started_at = done.started_at.unwrap().timestamp_millis();
        assert!(
            (started_at - start.at_ms).abs() < 1_000,
            "started_at {started_at}"
        );
        assert!(done.completed_at.unwrap() >= done.started_at.unwrap());
    }
    worker
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_worker_in_pacific_chatham_runs_delayed_requests_on_time() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("requests.db");
    let store = SqliteStore::open(&db).await.unwrap();
    let worker = delayed_requests_run_on_time(
        &store,
        "Pacific/Chatham",
        args(&["--sqlite", &path_arg(&db)]),
        &dir.path().join("journal"),
    )
    .await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_worker_in_los_angeles_with_a_kathmandu_session_runs_delayed_requests_on_time() {
    let dir = tempfile::tempdir().unwrap();
    let schema = pg::fresh_schema("ro_fault");
    let store = pg::connect(&schema, 3).await;
    let mut worker = delayed_requests_run_on_time(
        &store,
        "America/Los_Angeles",
        args(&[
            "--postgres-schema",
            &schema,
            "--pg-session-timezone",
            "Asia/Kathmandu",
        ]),
        &dir.path().join("journal"),
    )
    .await;
    worker
        .wait_for_line(
            "session time zone Asia/Kathmandu",
            "",
            Duration::from_secs(1),
        )
        .await;
    worker.stop().await;
    store.close().await;
    pg::drop_schema(&schema).await;
}

#[cfg(feature = "sqs")]
#[path = "faults_support/sqs.rs"]
mod sqs;
