//! The table strategy on a real PostgreSQL server, with real worker processes: exactly-once
//! execution across processes, rescue after SIGKILL, recovery from lost connections, and
//! notifications between processes.
//!
//! The worker processes are the `table_postgres` example, which `cargo test` builds next to
//! this test. Needs PostgreSQL: `DATABASE_URL`, or `postgres://postgres@127.0.0.1:5432/test`.

mod pg;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use root_orchestrator::{
    CancellationToken, Configuration, NewRequest, PostgresStore, Request, RequestId,
    RequestResults, RequestStatus, RequestStore, RequestType, RootOrchestrator, RunningWorkers,
    Source, TableConfig, TableStrategy, WorkflowContext, WorkflowError, WorkflowExecutor,
};
use tokio::time::Instant;

const TYPE: &str = "semaglutide_intelligence";

fn request() -> NewRequest {
    let mut configuration = Configuration::new(["semaglutide"]);
    configuration.sources.push(Source::new("FDA", "regulatory"));
    NewRequest::new(
        "glp1-market-watch",
        "analyst-001",
        RequestType::new(TYPE).unwrap(),
        configuration,
    )
}

/// The `table_postgres` example binary, built by `cargo test` beside this test.
fn worker_binary() -> PathBuf {
    let test_exe = std::env::current_exe().expect("the test's own path");
    // target/<profile>/deps/<this test> -> target/<profile>/examples/table_postgres
    let profile_dir = test_exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test binary sits in target/<profile>/deps");
    let binary = profile_dir.join("examples").join("table_postgres");
    assert!(
        binary.exists(),
        "{} is missing; build it with `cargo build --examples --features postgres`",
        binary.display()
    );
    binary
}

/// Starts a worker process on `schema` with extra arguments and `ROOT_ORCHESTRATOR_*`
/// settings.
fn spawn_worker(schema: &str, args: &[&str], settings: &[(&str, &str)]) -> Child {
    let mut command = Command::new(worker_binary());
    command
        .args(["--schema", schema])
        .args(args)
        .env("DATABASE_URL", pg::database_url())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (name, value) in settings {
        command.env(format!("ROOT_ORCHESTRATOR_{name}"), value);
    }
    command.spawn().expect("start a worker process")
}

/// Waits for a worker process to exit by itself, returning its standard output.
async fn wait_for_exit(child: Child, limit: Duration) -> String {
    let pid = child.id();
    let waited = tokio::time::timeout(
        limit,
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await;
    let output = match waited {
        Ok(joined) => joined.expect("join").expect("wait for the worker"),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("worker process {pid} did not finish within {limit:?}");
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "worker {pid} failed: {stdout}");
    stdout
}

/// The count in a worker's "worker X executed N requests" line.
fn executed_count(stdout: &str) -> u64 {
    stdout
        .lines()
        .find_map(|line| {
            let rest = line.split(" executed ").nth(1)?;
            rest.strip_suffix(" requests")?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no executed count in: {stdout}"))
}

async fn wait_until<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn count(store: &PostgresStore, status: RequestStatus) -> u64 {
    store
        .count_by_status()
        .await
        .unwrap()
        .get(&status)
        .copied()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_processes_execute_two_thousand_requests_exactly_once() {
    let schema = pg::fresh_schema("ro_work");
    let store = pg::connect(&schema, 4).await;
    for _ in 0..2000 {
        store.insert(request(), 4).await.unwrap();
    }

    let settings = [
        ("MAX_CONCURRENT_REQUESTS", "4"),
        ("POLLING_INTERVAL", "0.2"),
    ];
    let args = [
        "--exit-when-drained",
        "--work",
        "pause",
        "--work-ms",
        "2",
        "--max-connections",
        "6",
    ];
    let workers: Vec<Child> = (0..3)
        .map(|_| spawn_worker(&schema, &args, &settings))
        .collect();
    let mut per_process = Vec::new();
    for worker in workers {
        let stdout = wait_for_exit(worker, Duration::from_secs(300)).await;
        per_process.push(executed_count(&stdout));
    }

    assert_eq!(
        per_process.iter().sum::<u64>(),
        2000,
        "per process: {per_process:?}"
    );
    assert!(
        per_process.iter().all(|&n| n > 0),
        "every process took a share: {per_process:?}"
    );
    let (executions, distinct): (i64, i64) =
        sqlx::query_as("SELECT COUNT(*), COUNT(DISTINCT request_id) FROM example_executions")
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert_eq!(
        (executions, distinct),
        (2000, 2000),
        "no request executed twice"
    );
    assert_eq!(count(&store, RequestStatus::Completed).await, 2000);

    store.close().await;
    pg::drop_schema(&schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_of_a_killed_process_is_rescued_by_another_and_completes_once() {
    let schema = pg::fresh_schema("ro_work");
    let store = pg::connect(&schema, 4).await;
    let id = store.insert(request(), 4).await.unwrap().into_request().id;

    let settings = [
        ("LEASE_DURATION", "2"),
        ("STATUS_UPDATE_INTERVAL", "0.5"),
        ("POLLING_INTERVAL", "0.2"),
    ];
    // The first process would take a minute per request: it is killed long before.
    let mut doomed = spawn_worker(
        &schema,
        &["--work", "pause", "--work-ms", "60000"],
        &settings,
    );
    let doomed_pid = doomed.id();
    wait_until(
        "the first process runs the request",
        Duration::from_secs(30),
        || async {
            let r = store.get(&id).await.unwrap().unwrap();
            r.status == RequestStatus::Executing
        },
    )
    .await;
    let doomed_worker = store.get(&id).await.unwrap().unwrap().lease.unwrap().owner;
    assert!(
        doomed_worker.contains(&format!("-{doomed_pid}-")),
        "{doomed_worker}"
    );

    doomed.kill().expect("SIGKILL the first process");
    doomed.wait().expect("reap it");

    let rescuer = spawn_worker(
        &schema,
        &["--exit-when-drained", "--work", "pause", "--work-ms", "100"],
        &settings,
    );
    wait_for_exit(rescuer, Duration::from_secs(60)).await;

    let finished = store.get(&id).await.unwrap().unwrap();
    assert_eq!(finished.status, RequestStatus::Completed);
    assert_eq!(finished.attempts, 2);
    let completions: Vec<_> = finished
        .history
        .iter()
        .filter(|change| change.status == RequestStatus::Completed)
        .collect();
    assert_eq!(completions.len(), 1, "one completion write");
    assert_ne!(
        completions[0].worker.as_deref(),
        Some(doomed_worker.as_str())
    );
    assert_eq!(finished.errors.len(), 1);
    assert!(
        finished.errors[0].message.contains(&doomed_worker),
        "{:?}",
        finished.errors
    );
    let workers: Vec<String> =
        sqlx::query_scalar("SELECT worker FROM example_executions ORDER BY at")
            .fetch_all(store.pool())
            .await
            .unwrap();
    assert_eq!(workers.len(), 2, "one killed execution, one that completed");
    assert_eq!(workers[0], doomed_worker);
    assert_ne!(workers[1], doomed_worker);
    assert_eq!(count(&store, RequestStatus::Processing).await, 0);
    assert_eq!(count(&store, RequestStatus::Executing).await, 0);

    store.close().await;
    pg::drop_schema(&schema).await;
}

/// Pauses, counting executions per request.
struct Counting {
    pause: Duration,
    executions: Arc<Mutex<HashMap<RequestId, usize>>>,
    cancels_seen: Arc<AtomicUsize>,
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
            _ = ctx.cancelled() => {
                self.cancels_seen.fetch_add(1, Ordering::SeqCst);
                Err(WorkflowError::cancelled())
            }
            _ = tokio::time::sleep(self.pause) => {
                Ok(RequestResults::new(None, serde_json::Value::Null))
            }
        }
    }
}

struct Workers {
    orchestrator: RootOrchestrator,
    run: RunningWorkers,
    executions: Arc<Mutex<HashMap<RequestId, usize>>>,
    cancels_seen: Arc<AtomicUsize>,
}

fn start_workers(store: PostgresStore, config: TableConfig, pause: Duration) -> Workers {
    let executions = Arc::new(Mutex::new(HashMap::new()));
    let cancels_seen = Arc::new(AtomicUsize::new(0));
    let orchestrator = RootOrchestrator::builder()
        .strategy(TableStrategy::new(store, config).unwrap())
        .executor(
            TYPE,
            Counting {
                pause,
                executions: executions.clone(),
                cancels_seen: cancels_seen.clone(),
            },
        )
        .build()
        .unwrap();
    let run = orchestrator.spawn();
    Workers {
        orchestrator,
        run,
        executions,
        cancels_seen,
    }
}

impl Workers {
    async fn stop(self) {
        self.run.shutdown().await.unwrap();
    }
}

/// Ends every connection named `application_name`, as a server restart would; returns
/// how many there were.
async fn terminate_connections(application_name: &str) -> i64 {
    let mut admin = pg::admin().await;
    sqlx::query_scalar(
        "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE application_name = $1",
    )
    .bind(application_name)
    .fetch_one(&mut admin)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_recover_by_themselves_when_every_connection_is_terminated() {
    let schema = pg::fresh_schema("ro_work");
    let application_name = format!("ro-recovery-{}", &schema[8..]);
    let max_connections = 4;
    let store = pg::connect_named(&schema, max_connections, &application_name).await;

    let mut config = TableConfig::default();
    config.max_concurrent_requests = 3;
    config.polling_interval = Duration::from_millis(200);
    config.status_update_interval = Duration::from_millis(500);
    config.lease_duration = Duration::from_secs(2);
    let workers = start_workers(store.clone(), config, Duration::from_millis(20));
    let mut ids = Vec::new();
    for _ in 0..300 {
        ids.push(workers.orchestrator.submit(request()).await.unwrap().id);
    }

    // Watch the pool's size in the server's own view of connections.
    let watching = CancellationToken::new();
    let watcher = tokio::spawn({
        let application_name = application_name.clone();
        let watching = watching.clone();
        async move {
            let mut admin = pg::admin().await;
            let mut most = 0i64;
            while !watching.is_cancelled() {
                let now: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM pg_stat_activity WHERE application_name = $1",
                )
                .bind(&application_name)
                .fetch_one(&mut admin)
                .await
                .unwrap();
                most = most.max(now);
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            most
        }
    });

    for threshold in [60, 150] {
        wait_until("requests complete", Duration::from_secs(60), || async {
            count(&store, RequestStatus::Completed).await >= threshold
        })
        .await;
        let terminated = terminate_connections(&application_name).await;
        assert!(terminated > 0, "there were connections to terminate");
    }
    wait_until(
        "every request completes",
        Duration::from_secs(120),
        || async { count(&store, RequestStatus::Completed).await == 300 },
    )
    .await;

    watching.cancel();
    let most = watcher.await.unwrap();
    assert!(
        most <= i64::from(max_connections),
        "the pool opened {most} connections, more than its {max_connections}"
    );
    assert!(most > 0);
    workers
        .orchestrator
        .ready()
        .await
        .expect("ready again after the outage");
    assert_eq!(count(&store, RequestStatus::Processing).await, 0);
    assert_eq!(count(&store, RequestStatus::Executing).await, 0);
    let executions = workers.executions.lock().unwrap().clone();
    assert!(
        ids.iter()
            .all(|id| executions.get(id).copied().unwrap_or(0) >= 1)
    );
    workers.stop().await;

    store.close().await;
    assert!(
        RequestStore::ping(&store).await.is_err(),
        "a closed store is not ready"
    );
    pg::drop_schema(&schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn notifications_reach_idle_workers_of_another_process_even_after_a_reconnect() {
    let schema = pg::fresh_schema("ro_work");
    let application_name = format!("ro-notify-{}", &schema[8..]);
    let worker_store = pg::connect_named(&schema, 4, &application_name).await;
    // Another process's store: its inserts and cancels reach the workers only by NOTIFY.
    let other_process = pg::connect(&schema, 2).await;

    let mut config = TableConfig::default();
    // Neither a poll nor a heartbeat can explain a reaction within seconds.
    config.polling_interval = Duration::from_secs(600);
    config.status_update_interval = Duration::from_secs(300);
    config.lease_duration = Duration::from_secs(900);
    let workers = start_workers(worker_store.clone(), config, Duration::from_secs(3600));
    // Let the workers go idle after their first look.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let first = other_process
        .insert(request(), 4)
        .await
        .unwrap()
        .into_request()
        .id;
    wait_until(
        "the NOTIFY wakes the idle workers",
        Duration::from_secs(10),
        || async {
            other_process.get(&first).await.unwrap().unwrap().status == RequestStatus::Executing
        },
    )
    .await;

    other_process
        .cancel(&first, "cancelled from another process")
        .await
        .unwrap();
    wait_until(
        "the cancel reaches the executor",
        Duration::from_secs(10),
        || async { workers.cancels_seen.load(Ordering::SeqCst) == 1 },
    )
    .await;

    // Drop every connection of the workers' process, then notify again.
    assert!(terminate_connections(&application_name).await > 0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let second = other_process
        .insert(request(), 4)
        .await
        .unwrap()
        .into_request()
        .id;
    wait_until(
        "the re-established listener wakes the workers",
        Duration::from_secs(20),
        || async {
            other_process.get(&second).await.unwrap().unwrap().status == RequestStatus::Executing
        },
    )
    .await;

    other_process
        .cancel(&second, "done with the test")
        .await
        .unwrap();
    wait_until(
        "the second cancel reaches the executor",
        Duration::from_secs(10),
        || async { workers.cancels_seen.load(Ordering::SeqCst) == 2 },
    )
    .await;
    workers.stop().await;

    worker_store.close().await;
    other_process.close().await;
    pg::drop_schema(&schema).await;
}
