//! The throughput harness: how many requests per second the table strategy stores and
//! runs, how fast an idle worker picks a new request up, and how much memory a process
//! needs, on SQLite and (with `DATABASE_URL`) PostgreSQL. It prints one table.
//!
//! ```text
//! cargo bench --bench throughput                                    # SQLite
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/test \
//!     cargo bench --bench throughput --features postgres            # SQLite and PostgreSQL
//! ```
//!
//! Scenarios, with executors that do no work unless stated:
//!
//! - S1 enqueue: 10,000 requests one `submit` each, and 10 `submit_many` calls of 1,000.
//! - S2 burn-down: 10,000 stored requests drained by 16 and by 100 concurrent workers.
//! - S3 pick-up latency: 1,000 submits one after another on an idle system, each timed
//!   from the submit's return (the request is committed) until its executor starts. On
//!   PostgreSQL the submits come from another store, so the worker learns of them through
//!   LISTEN/NOTIFY.
//! - S4 real work: 1,000 requests that sleep 50 ms each, 16 at a time: the wall time
//!   against the 3.125 s the sleeps alone take (63 whole rounds of 16 make it 3.15 s).
//! - On PostgreSQL, two ceilings: the same burn-down as raw SQL with no library (one
//!   statement and commit per step, 16 connections), and the commit latency itself (from
//!   S1's one-submit-each rate), which bounds every latency that needs a commit.
//! - Memory: the peak resident set of a fresh process that stores a 100,000-request
//!   backlog and drains it with 16 workers.
//!
//! `THROUGHPUT_SCALE` (default 1) divides every request count, for a quick look.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use root_orchestrator::{
    Configuration, NewRequest, Request, RequestResults, RequestStatus, RequestStore, RequestType,
    RootOrchestrator, Source, SqliteStore, TableConfig, TableStrategy, WorkflowContext,
    WorkflowError, WorkflowExecutor,
};
use tokio::sync::mpsc;

const REQUEST_TYPE: &str = "bench";

/// Counts executions, optionally sleeps, and reports each start.
struct Probe {
    work: Duration,
    started: AtomicUsize,
    starts: Option<mpsc::UnboundedSender<Instant>>,
}

impl Probe {
    fn new(work: Duration) -> Arc<Self> {
        Arc::new(Probe {
            work,
            started: AtomicUsize::new(0),
            starts: None,
        })
    }
}

#[async_trait]
impl WorkflowExecutor for Probe {
    async fn execute(
        &self,
        _: &Request,
        _: &WorkflowContext,
    ) -> Result<RequestResults, WorkflowError> {
        if let Some(starts) = &self.starts {
            let _ = starts.send(Instant::now());
        }
        self.started.fetch_add(1, Ordering::Relaxed);
        if !self.work.is_zero() {
            tokio::time::sleep(self.work).await;
        }
        Ok(RequestResults::new(None, serde_json::Value::Null))
    }
}

fn request(i: usize) -> NewRequest {
    let mut configuration = Configuration::new([format!("keyword-{i}")]);
    configuration.sources.push(Source::new("FDA", "regulatory"));
    NewRequest::new(
        "bench-project",
        "bench-user",
        RequestType::new(REQUEST_TYPE).expect("valid type"),
        configuration,
    )
}

/// Where a scenario's requests live: a fresh database (file or schema) per scenario.
#[derive(Clone, Copy, PartialEq)]
enum Backend {
    Sqlite,
    #[cfg(feature = "postgres")]
    Postgres,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "SQLite",
            #[cfg(feature = "postgres")]
            Backend::Postgres => "PostgreSQL",
        }
    }

    fn arg(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            #[cfg(feature = "postgres")]
            Backend::Postgres => "postgres",
        }
    }

    fn parse(arg: &str) -> Option<Self> {
        match arg {
            "sqlite" => Some(Backend::Sqlite),
            #[cfg(feature = "postgres")]
            "postgres" => Some(Backend::Postgres),
            _ => None,
        }
    }

    async fn fresh(self) -> Database {
        match self {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temporary directory");
                let store = SqliteStore::open(dir.path().join("bench.db"))
                    .await
                    .expect("open SQLite");
                Database {
                    store: Arc::new(store),
                    _dir: Some(dir),
                    #[cfg(feature = "postgres")]
                    schema: None,
                }
            }
            #[cfg(feature = "postgres")]
            Backend::Postgres => {
                let schema = format!("bench_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
                Database {
                    store: Arc::new(postgres_store(&schema).await),
                    _dir: None,
                    schema: Some(schema),
                }
            }
        }
    }
}

#[cfg(feature = "postgres")]
fn database_url() -> String {
    std::env::var("DATABASE_URL").expect("DATABASE_URL names the PostgreSQL database")
}

#[cfg(feature = "postgres")]
async fn postgres_store(schema: &str) -> root_orchestrator::PostgresStore {
    let mut options = root_orchestrator::PostgresStoreOptions::default();
    options.schema = Some(schema.to_owned());
    options.application_name = "root-orchestrator-bench".into();
    root_orchestrator::PostgresStore::connect_with(&database_url(), options)
        .await
        .expect("connect to PostgreSQL")
}

struct Database {
    store: Arc<dyn RequestStore>,
    _dir: Option<tempfile::TempDir>,
    #[cfg(feature = "postgres")]
    schema: Option<String>,
}

impl Database {
    async fn drop_schema(&self) {
        #[cfg(feature = "postgres")]
        if let Some(schema) = &self.schema {
            let store = postgres_store(schema).await;
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
            )))
            .execute(store.pool())
            .await
            .expect("drop the bench schema");
            store.close().await;
        }
    }
}

fn table_orchestrator(
    store: Arc<dyn RequestStore>,
    concurrency: usize,
    probe: Arc<Probe>,
) -> RootOrchestrator {
    let mut config = TableConfig::default();
    config.max_concurrent_requests = concurrency;
    let strategy = TableStrategy::with_shared_store(store, config).expect("config");
    RootOrchestrator::builder()
        .strategy(strategy)
        .shared_executor(REQUEST_TYPE, probe)
        .build()
        .expect("orchestrator")
}

async fn store_backlog(orchestrator: &RootOrchestrator, count: usize) {
    let mut next = 0;
    while next < count {
        let end = (next + 1000).min(count);
        orchestrator
            .submit_many((next..end).map(request))
            .await
            .expect("store the backlog");
        next = end;
    }
}

/// Runs the workers until `count` requests are COMPLETED; returns the time it took.
async fn drain(orchestrator: &RootOrchestrator, probe: &Probe, count: usize) -> Duration {
    let started = Instant::now();
    let run = orchestrator.spawn();

    // Counting rows is not free; wait on the executions first, then on the last writes.
    while probe.started.load(Ordering::Relaxed) < count {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let store = orchestrator.store();
    loop {
        let counts = store.count_by_status().await.expect("count");
        if counts.get(&RequestStatus::Completed).copied().unwrap_or(0) >= count as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started.elapsed();
    run.shutdown().await.expect("workers");
    elapsed
}

fn per_second(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64()
}

/// S1: submits one at a time and in batches of 1,000.
async fn enqueue(backend: Backend, count: usize) -> (f64, f64) {
    let db = backend.fresh().await;
    let orchestrator = table_orchestrator(db.store.clone(), 16, Probe::new(Duration::ZERO));
    let started = Instant::now();
    for i in 0..count {
        orchestrator.submit(request(i)).await.expect("submit");
    }
    let single = per_second(count, started.elapsed());
    db.drop_schema().await;

    let db = backend.fresh().await;
    let orchestrator = table_orchestrator(db.store.clone(), 16, Probe::new(Duration::ZERO));
    let started = Instant::now();
    store_backlog(&orchestrator, count).await;
    let batched = per_second(count, started.elapsed());
    db.drop_schema().await;
    (single, batched)
}

/// S2: drains a stored backlog at `concurrency`.
async fn burn_down(backend: Backend, count: usize, concurrency: usize) -> f64 {
    let db = backend.fresh().await;
    let probe = Probe::new(Duration::ZERO);
    let orchestrator = table_orchestrator(db.store.clone(), concurrency, probe.clone());
    store_backlog(&orchestrator, count).await;
    let rate = per_second(count, drain(&orchestrator, &probe, count).await);
    db.drop_schema().await;
    rate
}

/// S3: pick-up latencies of one-at-a-time submits to idle workers, from the committed
/// submit to the executor's start, sorted.
async fn pick_up(backend: Backend, count: usize) -> Vec<Duration> {
    let db = backend.fresh().await;
    let (starts, mut started) = mpsc::unbounded_channel();
    let probe = Arc::new(Probe {
        work: Duration::ZERO,
        started: AtomicUsize::new(0),
        starts: Some(starts),
    });
    let workers = table_orchestrator(db.store.clone(), 16, probe.clone());

    // On PostgreSQL the submitter is another store, like another process: nothing but
    // the database's notification can tell the workers about the new request.
    #[cfg(feature = "postgres")]
    let submitter = match (backend, &db.schema) {
        (Backend::Postgres, Some(schema)) => {
            let other: Arc<dyn RequestStore> = Arc::new(postgres_store(schema).await);
            table_orchestrator(other, 16, Probe::new(Duration::ZERO))
        }
        _ => workers.clone(),
    };
    #[cfg(not(feature = "postgres"))]
    let submitter = workers.clone();

    let run = workers.spawn();
    // Let the workers reach their idle wait (and, on PostgreSQL, LISTEN) before timing.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut latencies = Vec::with_capacity(count);
    for i in 0..count {
        // Timed from the submit's return, when the request is committed and visible to
        // workers; an executor that started before the return counts as zero.
        submitter.submit(request(i)).await.expect("submit");
        let committed = Instant::now();
        let began = started.recv().await.expect("executor start");
        latencies.push(began.saturating_duration_since(committed));
        // The next submit finds the system idle again, its last request written.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    run.shutdown().await.expect("workers");
    db.drop_schema().await;
    latencies.sort();
    latencies
}

/// S4: wall time of `count` requests that sleep 50 ms each, 16 at a time.
async fn real_work(backend: Backend, count: usize) -> Duration {
    let db = backend.fresh().await;
    let probe = Probe::new(Duration::from_millis(50));
    let orchestrator = table_orchestrator(db.store.clone(), 16, probe.clone());
    store_backlog(&orchestrator, count).await;
    let elapsed = drain(&orchestrator, &probe, count).await;
    db.drop_schema().await;
    elapsed
}

/// The child side of the memory scenario: store and drain a backlog, print the peak RSS.
async fn memory_child(backend: Backend, count: usize) {
    let db = backend.fresh().await;
    let probe = Probe::new(Duration::ZERO);
    let orchestrator = table_orchestrator(db.store.clone(), 16, probe.clone());
    store_backlog(&orchestrator, count).await;
    drain(&orchestrator, &probe, count).await;
    db.drop_schema().await;
    println!(
        "peak_rss_kib {}",
        peak_rss_kib().expect("VmHWM in /proc/self/status")
    );
}

fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Runs the memory scenario in a fresh process, so that nothing else counts towards its
/// peak; returns the peak in MiB.
fn peak_memory(backend: Backend, count: usize) -> f64 {
    let output = std::process::Command::new(std::env::current_exe().expect("own path"))
        .args(["--memory-child", backend.arg(), &count.to_string()])
        .output()
        .expect("start the memory scenario's process");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "memory scenario failed: {}{}",
        stdout,
        String::from_utf8_lossy(&output.stderr)
    );
    let kib: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("peak_rss_kib "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the memory scenario prints its peak");
    kib / 1024.0
}

/// The S2 ceiling on PostgreSQL without the library: `clients` connections each claim one
/// request, mark it EXECUTING and complete it, in the library's table, one statement and one
/// commit each, as a hand-written worker would. Returns requests per second.
#[cfg(feature = "postgres")]
async fn raw_sql_burn_down(count: usize, clients: usize) -> f64 {
    let schema = format!("bench_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let mut options = root_orchestrator::PostgresStoreOptions::default();
    options.schema = Some(schema.clone());
    options.max_connections = clients as u32 + 1;
    let store = root_orchestrator::PostgresStore::connect_with(&database_url(), options)
        .await
        .expect("connect to PostgreSQL");
    let pool = store.pool().clone();
    let shared: Arc<dyn RequestStore> = Arc::new(store);
    let loader = table_orchestrator(shared, 16, Probe::new(Duration::ZERO));
    store_backlog(&loader, count).await;

    let entry = r#"{"status":"PROCESSING","at":"2026-01-01T00:00:00Z","reason":"claimed"}"#;
    let started = Instant::now();
    let mut clients_done = tokio::task::JoinSet::new();
    for client in 0..clients {
        let pool = pool.clone();
        clients_done.spawn(async move {
            let owner = format!("raw-{client}");
            loop {
                let claimed: Option<(String, String)> = sqlx::query_as(
                    "WITH next AS MATERIALIZED (SELECT seq FROM requests \
                         WHERE status = 'PENDING' AND run_after <= now() \
                         ORDER BY priority, created_at, seq LIMIT 1 FOR UPDATE SKIP LOCKED) \
                     UPDATE requests SET status = 'PROCESSING', attempts = attempts + 1, \
                         started_at = now(), lease_owner = $1, \
                         lease_token = replace(gen_random_uuid()::text, '-', ''), \
                         lease_expires_at = now() + interval '30 seconds', \
                         history = history || jsonb_build_array($2::jsonb) \
                     FROM next WHERE requests.seq = next.seq \
                     RETURNING requests.id, requests.lease_token",
                )
                .bind(&owner)
                .bind(entry)
                .fetch_optional(&pool)
                .await
                .expect("claim");
                let Some((id, token)) = claimed else { return };
                sqlx::query(
                    "UPDATE requests SET status = 'EXECUTING', \
                         history = history || jsonb_build_array($3::jsonb) \
                     WHERE id = $1 AND lease_token = $2 AND status = 'PROCESSING'",
                )
                .bind(&id)
                .bind(&token)
                .bind(entry)
                .execute(&pool)
                .await
                .expect("mark executing");
                sqlx::query(
                    "UPDATE requests SET status = 'COMPLETED', results = $3::jsonb, \
                         completed_at = now(), progress_percentage = 100, lease_owner = NULL, \
                         lease_token = NULL, lease_expires_at = NULL, \
                         history = history || jsonb_build_array($4::jsonb) \
                     WHERE id = $1 AND lease_token = $2 AND status = 'EXECUTING'",
                )
                .bind(&id)
                .bind(&token)
                .bind(r#"{"report_path":null,"summary":null}"#)
                .bind(entry)
                .execute(&pool)
                .await
                .expect("complete");
            }
        });
    }
    while clients_done.join_next().await.is_some() {}
    let rate = per_second(count, started.elapsed());

    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
    )))
    .execute(&pool)
    .await
    .expect("drop the bench schema");
    rate
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn verdict(ok: bool) -> &'static str {
    if ok { "yes" } else { "NO" }
}

async fn measure(backend: Backend, scale: usize) {
    let n = 10_000 / scale;
    let name = backend.name();
    let row = |scenario: &str, value: String, target: &str, ok: bool| {
        println!(
            "| {name} | {scenario} | {value} | {target} | {} |",
            verdict(ok)
        );
    };

    let (single, batched) = enqueue(backend, n).await;
    row(
        "S1 enqueue, one submit each",
        format!("{single:.0}/s"),
        "-",
        true,
    );
    row(
        "S1 enqueue, submit_many of 1,000",
        format!("{batched:.0}/s"),
        ">= 20,000/s",
        batched >= 20_000.0,
    );

    for concurrency in [16, 100] {
        let rate = burn_down(backend, n, concurrency).await;
        let (target, ok) = if concurrency == 16 {
            (">= 5,000/s", rate >= 5_000.0)
        } else {
            ("-", true)
        };
        row(
            &format!("S2 burn-down, concurrency {concurrency}"),
            format!("{rate:.0}/s"),
            target,
            ok,
        );
    }

    #[cfg(feature = "postgres")]
    if backend == Backend::Postgres {
        let rate = raw_sql_burn_down(n, 16).await;
        row(
            "S2 ceiling: raw SQL, 16 connections, 3 commits each",
            format!("{rate:.0}/s"),
            "-",
            true,
        );
    }

    let latencies = pick_up(backend, 1_000 / scale).await;
    let (p50, p99) = (percentile(&latencies, 0.50), percentile(&latencies, 0.99));
    let max = *latencies.last().expect("latencies");
    row(
        "S3 pick-up p50",
        ms(p50),
        "<= 2 ms",
        p50 <= Duration::from_millis(2),
    );
    row(
        "S3 pick-up p99",
        ms(p99),
        "<= 10 ms",
        p99 <= Duration::from_millis(10),
    );
    row("S3 pick-up max", ms(max), "-", true);

    let count = 1_000 / scale;
    // The floor the work itself sets: 50 ms per request over 16 slots (3.125 s for 1,000;
    // whole rounds of 16 make it 3.15 s in practice).
    let floor = Duration::from_millis(50) * count as u32 / 16;
    let wall = real_work(backend, count).await;
    let over = (wall.as_secs_f64() / floor.as_secs_f64() - 1.0) * 100.0;
    row(
        "S4 1,000 x 50 ms at concurrency 16",
        format!(
            "{:.3} s ({over:+.1}% over {:.3} s)",
            wall.as_secs_f64(),
            floor.as_secs_f64()
        ),
        "<= 5% over",
        over <= 5.0,
    );

    let peak = peak_memory(backend, 100_000 / scale);
    row(
        "peak RSS, 100,000 backlog drained",
        format!("{peak:.1} MiB"),
        "< 64 MiB",
        peak < 64.0,
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");

    if let Some(at) = args.iter().position(|a| a == "--memory-child") {
        let backend = Backend::parse(&args[at + 1]).expect("a backend name");
        let count = args[at + 2].parse().expect("a request count");
        runtime.block_on(memory_child(backend, count));
        return;
    }

    let scale: usize = std::env::var("THROUGHPUT_SCALE")
        .ok()
        .map(|v| v.parse().expect("THROUGHPUT_SCALE is a whole number"))
        .unwrap_or(1)
        .max(1);
    let with_postgres = std::env::var_os("DATABASE_URL").is_some();
    #[cfg(not(feature = "postgres"))]
    if with_postgres {
        eprintln!(
            "DATABASE_URL is set but PostgreSQL support is not built: add --features postgres"
        );
        std::process::exit(2);
    }
    #[cfg_attr(not(feature = "postgres"), allow(unused_mut))]
    let mut backends = vec![Backend::Sqlite];
    #[cfg(feature = "postgres")]
    if with_postgres {
        backends.push(Backend::Postgres);
    }

    println!("| store | scenario | measured | target | met |");
    println!("|---|---|---|---|---|");
    runtime.block_on(async {
        for backend in backends {
            measure(backend, scale).await;
        }
    });
}
