//! The table strategy on PostgreSQL: start this several times side by side (on one machine
//! or many) and the processes share the work, each request executed by exactly one of them.
//!
//! ```sh
//! export DATABASE_URL=postgres://postgres@127.0.0.1:5432/test
//! cargo run --example table_postgres --features postgres -- --submit 60 --exit-when-drained &
//! cargo run --example table_postgres --features postgres -- --exit-when-drained &
//! cargo run --example table_postgres --features postgres -- --exit-when-drained
//! ```
//!
//! Every execution is recorded in an `example_executions` table; each process prints how
//! many requests it executed, and the last one to finish prints whether any request ran
//! twice. Worker settings come from the `ROOT_ORCHESTRATOR_*` variables.

#[path = "support/market_intel.rs"]
mod market_intel;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use clap::{Parser, ValueEnum};
use market_intel::MarketIntelligenceWorkflow;
use root_orchestrator::{
    PostgresStore, PostgresStoreOptions, Request, RequestId, RequestMessage, RequestResults,
    RequestStatus, RequestStore, RootOrchestrator, TableConfig, TableStrategy, WorkflowContext,
    WorkflowError, WorkflowExecutor,
};

#[derive(Parser)]
#[command(about = "Run table-strategy workers on PostgreSQL (DATABASE_URL).")]
struct Args {
    /// Submit this many requests (copies of the seed request) before working.
    #[arg(long, default_value_t = 0)]
    submit: usize,

    /// Exit once no request is pending or running.
    #[arg(long)]
    exit_when_drained: bool,

    /// What each request runs: the market-intelligence workflow, or a pause of
    /// `--work-ms` (for load and failure tests).
    #[arg(long, value_enum, default_value_t = Work::MarketIntelligence)]
    work: Work,

    /// Milliseconds each request of `--work pause` takes.
    #[arg(long, default_value_t = 50)]
    work_ms: u64,

    /// The schema holding the tables (created if missing).
    #[arg(long)]
    schema: Option<String>,

    /// Connections this process opens at most.
    #[arg(long, default_value_t = 10)]
    max_connections: u32,

    /// Folder of documents the workflow searches.
    #[arg(long)]
    corpus: Option<PathBuf>,

    /// Folder the workflow writes its reports to.
    #[arg(long, default_value = "table-postgres-data/reports")]
    reports: PathBuf,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Work {
    MarketIntelligence,
    Pause,
}

/// Records every execution in `example_executions` before running the real workflow, so
/// that duplicates across processes can be counted afterwards.
struct Audited {
    pool: sqlx::PgPool,
    inner: Arc<dyn WorkflowExecutor>,
}

#[async_trait]
impl WorkflowExecutor for Audited {
    async fn execute(
        &self,
        request: &Request,
        ctx: &WorkflowContext,
    ) -> Result<RequestResults, WorkflowError> {
        sqlx::query(
            "INSERT INTO example_executions (request_id, worker, attempt) VALUES ($1, $2, $3)",
        )
        .bind(request.id.as_str())
        .bind(ctx.worker())
        .bind(ctx.attempt() as i32)
        .execute(&self.pool)
        .await
        .map_err(|e| WorkflowError::retryable("could not record the execution").with_source(e))?;
        self.inner.execute(request, ctx).await
    }
}

/// Sleeps for a while, then reports success: the orchestrator's cost without real work.
struct Pause(Duration);

#[async_trait]
impl WorkflowExecutor for Pause {
    async fn execute(
        &self,
        _: &Request,
        ctx: &WorkflowContext,
    ) -> Result<RequestResults, WorkflowError> {
        tokio::select! {
            _ = ctx.cancelled() => Err(WorkflowError::cancelled()),
            _ = tokio::time::sleep(self.0) => {
                let paused_ms = self.0.as_millis() as u64;
                Ok(RequestResults::new(None, serde_json::json!({ "paused_ms": paused_ms })))
            }
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,root_orchestrator=info".into()),
        )
        .init();

    match run(Args::parse()).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err}");
            let mut source = std::error::Error::source(&*err);
            while let Some(cause) = source {
                eprintln!("  caused by: {cause}");
                source = cause.source();
            }
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL").map_err(|_| {
        "DATABASE_URL is not set; for example: \
         export DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
    })?;
    let mut options = PostgresStoreOptions::default();
    options.schema = args.schema.clone();
    options.max_connections = args.max_connections;
    let store = PostgresStore::connect_with(&url, options).await?;
    // Processes started together would race on CREATE TABLE; the lock serialises them.
    let mut tx = store.pool().begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('table_postgres example'))")
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS example_executions ( \
             request_id TEXT NOT NULL, worker TEXT NOT NULL, attempt INTEGER NOT NULL, \
             at TIMESTAMPTZ NOT NULL DEFAULT now())",
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;

    let config = TableConfig::from_env()?;
    let strategy = TableStrategy::new(store.clone(), config)?;
    let worker = strategy.worker_id().to_owned();
    let work: Arc<dyn WorkflowExecutor> = match args.work {
        Work::MarketIntelligence => {
            let corpus = args.corpus.clone().unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/corpus")
            });
            Arc::new(MarketIntelligenceWorkflow::new(
                corpus,
                args.reports.clone(),
            ))
        }
        Work::Pause => Arc::new(Pause(Duration::from_millis(args.work_ms))),
    };
    let orchestrator = RootOrchestrator::builder()
        .strategy(strategy)
        .executor(
            "semaglutide_intelligence",
            Audited {
                pool: store.pool().clone(),
                inner: work,
            },
        )
        .build()?;
    println!("worker {worker} started");

    let seed = include_str!("requests/semaglutide_intelligence.json");
    for _ in 0..args.submit {
        let mut message = RequestMessage::from_json(seed)?;
        message.request_id = Some(RequestId::generate().to_string());
        orchestrator.submit(message.into_new_request()?).await?;
    }
    if args.submit > 0 {
        println!("worker {worker} submitted {} requests", args.submit);
    }

    let workers = orchestrator.spawn();

    // A process started next to the one that submits may look before anything is there:
    // it only counts the table as drained once it has seen work, or after a few seconds.
    let started = tokio::time::Instant::now();
    let mut seen_work = args.submit > 0;
    // SIGTERM (what service managers and `kill` send) stops as gracefully as Ctrl-C.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        if !args.exit_when_drained {
            continue;
        }
        let unfinished = unfinished(&store).await?;
        seen_work |= unfinished > 0;
        if unfinished == 0 && (seen_work || started.elapsed() > Duration::from_secs(5)) {
            break;
        }
    }
    workers.shutdown().await?;

    let mine: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM example_executions WHERE worker = $1")
        .bind(&worker)
        .fetch_one(store.pool())
        .await?;
    println!("worker {worker} executed {mine} requests");

    let (executions, distinct): (i64, i64) =
        sqlx::query_as("SELECT COUNT(*), COUNT(DISTINCT request_id) FROM example_executions")
            .fetch_one(store.pool())
            .await?;
    let completed = store
        .count_by_status()
        .await?
        .get(&RequestStatus::Completed)
        .copied()
        .unwrap_or(0);
    println!(
        "all workers so far: {executions} executions of {distinct} distinct requests; \
         {completed} completed"
    );
    if executions > distinct {
        println!(
            "{} executions were repeats: attempts of crashed or stalled workers, retried",
            executions - distinct
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// How many requests are pending or running.
async fn unfinished(store: &PostgresStore) -> Result<u64, root_orchestrator::Error> {
    let counts = store.count_by_status().await?;
    Ok([
        RequestStatus::Pending,
        RequestStatus::Processing,
        RequestStatus::Executing,
    ]
    .iter()
    .filter_map(|s| counts.get(s))
    .sum())
}
