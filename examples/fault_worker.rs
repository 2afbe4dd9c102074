//! A worker process for fault-injection tests: it runs requests of the seed type by pausing,
//! journals every execution to a file, and shuts down gracefully on SIGTERM or Ctrl-C.
//!
//! The test suite `tests/faults.rs` starts it, kills it, signals it and starves it of its
//! database or queue; the journal then shows which process ran what, and when.
//!
//! ```sh
//! cargo run --example fault_worker --features postgres -- \
//!     --sqlite target/faults-demo.db --journal target/faults-demo.journal
//! ```
//!
//! Each request pauses for `--short-ms`, or `--long-ms` when its
//! `configuration.custom_params.kind` is `"long"`. Journal lines, one per event, with times
//! in Unix milliseconds (independent of the process's time zone):
//!
//! ```text
//! start <request id> <worker id> <attempt> <unix ms> <run_after as RFC 3339 UTC>
//! end <request id> <worker id> <attempt> <unix ms>
//! ```
//!
//! Worker settings come from the `ROOT_ORCHESTRATOR_*` variables. On standard output it
//! prints its UTC offset (`local offset <seconds>`), then `worker <id> running` once its
//! workers run, and `worker <id> stopped` after a graceful shutdown; the exit code is 0
//! then, 1 on any error.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use clap::Parser;
use root_orchestrator::{
    Configuration, NewRequest, PostgresStore, ProcessingStrategy, Request, RequestResults,
    RequestType, RootOrchestrator, Source, SqliteStore, TableConfig, TableStrategy,
    WorkflowContext, WorkflowError, WorkflowExecutor,
};

const REQUEST_TYPE: &str = "semaglutide_intelligence";

#[derive(Parser)]
#[command(about = "A journaling worker process for fault-injection tests.")]
struct Args {
    /// Keep requests in this SQLite file (shared with other processes).
    #[arg(long, conflicts_with = "postgres_schema")]
    sqlite: Option<PathBuf>,

    /// Keep requests in PostgreSQL (`DATABASE_URL`), in this schema.
    #[arg(long)]
    postgres_schema: Option<String>,

    /// The PostgreSQL session time zone of every connection (`SET TIME ZONE`).
    #[arg(long, requires = "postgres_schema")]
    pg_session_timezone: Option<String>,

    /// Take requests from this SQS queue (a URL; `AWS_ENDPOINT_URL_SQS` names the server)
    /// with the queue strategy, instead of claiming them from the table.
    #[arg(long)]
    sqs_queue: Option<String>,

    /// The file every execution is appended to.
    #[arg(long)]
    journal: PathBuf,

    /// Milliseconds a request pauses, unless it is of kind `long`.
    #[arg(long, default_value_t = 100)]
    short_ms: u64,

    /// Milliseconds a request of kind `long` pauses.
    #[arg(long, default_value_t = 60_000)]
    long_ms: u64,

    /// Submit one request due this many milliseconds from now, before working.
    #[arg(long)]
    submit_due_in_ms: Option<u64>,
}

/// Pauses, journaling the start and the end of every execution.
struct Journaled {
    journal: PathBuf,
    short: Duration,
    long: Duration,
}

impl Journaled {
    fn append(&self, line: &str) -> Result<(), WorkflowError> {
        // One write per line on an O_APPEND file: lines of concurrent processes never mix.
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.journal)
            .and_then(|mut file| file.write_all(format!("{line}\n").as_bytes()).map(|_| file))
            .map_err(|e| WorkflowError::retryable("cannot journal").with_source(e))?;
        file.flush()
            .map_err(|e| WorkflowError::retryable("cannot journal").with_source(e))
    }
}

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default()
}

#[async_trait]
impl WorkflowExecutor for Journaled {
    async fn execute(
        &self,
        request: &Request,
        ctx: &WorkflowContext,
    ) -> Result<RequestResults, WorkflowError> {
        let who = format!("{} {} {}", request.id, ctx.worker(), ctx.attempt());
        self.append(&format!(
            "start {who} {} {}",
            unix_ms(),
            request.run_after.to_rfc3339()
        ))?;
        let long = request.configuration.custom_params.get("kind")
            == Some(&serde_json::Value::from("long"));
        let pause = if long { self.long } else { self.short };
        tokio::select! {
            _ = ctx.cancelled() => return Err(WorkflowError::cancelled()),
            _ = tokio::time::sleep(pause) => {}
        }
        self.append(&format!("end {who} {}", unix_ms()))?;
        Ok(RequestResults::new(
            None,
            serde_json::json!({ "paused_ms": pause.as_millis() as u64 }),
        ))
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,root_orchestrator=info".into()),
        )
        .init();
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
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

type Failure = Box<dyn std::error::Error>;

async fn run(args: Args) -> Result<(), Failure> {
    let store: Arc<dyn root_orchestrator::RequestStore> =
        match (&args.sqlite, &args.postgres_schema) {
            (Some(path), None) => Arc::new(SqliteStore::open(path).await?),
            (None, Some(schema)) => {
                Arc::new(postgres(schema, args.pg_session_timezone.clone()).await?)
            }
            _ => return Err("give --sqlite PATH or --postgres-schema NAME".into()),
        };
    let (strategy, worker): (Arc<dyn ProcessingStrategy>, String) = match &args.sqs_queue {
        None => {
            let table = TableStrategy::with_shared_store(store, TableConfig::from_env()?)?;
            let worker = table.worker_id().to_owned();
            (Arc::new(table), worker)
        }
        Some(queue) => queue_strategy(store, queue).await?,
    };
    let orchestrator = RootOrchestrator::builder()
        .shared_strategy(strategy)
        .executor(
            REQUEST_TYPE,
            Journaled {
                journal: args.journal.clone(),
                short: Duration::from_millis(args.short_ms),
                long: Duration::from_millis(args.long_ms),
            },
        )
        .build()?;

    if let Some(due_in) = args.submit_due_in_ms {
        let due = chrono::Utc::now() + chrono::Duration::milliseconds(due_in as i64);
        let mut configuration = Configuration::new(["semaglutide"]);
        configuration.sources.push(Source::new("FDA", "regulatory"));
        let request = NewRequest::new(
            "glp1-market-watch",
            "analyst-001",
            RequestType::new(REQUEST_TYPE)?,
            configuration,
        )
        .with_run_after(due);
        let stored = orchestrator.submit(request).await?;
        println!(
            "submitted {} due {} stored due {}",
            stored.id,
            due.to_rfc3339(),
            stored.run_after.to_rfc3339()
        );
    }

    let workers = orchestrator.spawn();
    // The process's own time zone, so a test can see that its TZ took effect.
    println!(
        "local offset {}",
        chrono::Local::now().offset().local_minus_utc()
    );
    println!("worker {worker} running");

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = terminate.recv() => println!("worker {worker} got SIGTERM"),
        _ = tokio::signal::ctrl_c() => println!("worker {worker} got SIGINT"),
    }
    // The graceful shutdown: no new claims, running requests get the grace period, the
    // rest are handed back.
    workers.shutdown().await?;
    println!("worker {worker} stopped");
    Ok(())
}

/// A PostgreSQL store whose connections all use `timezone` as their session time zone.
async fn postgres(schema: &str, timezone: Option<String>) -> Result<PostgresStore, Failure> {
    use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

    let url = std::env::var("DATABASE_URL").map_err(|_| "DATABASE_URL is not set")?;
    let connect: PgConnectOptions = url.parse()?;
    let connect = connect
        .application_name("fault-worker")
        .options([("search_path", schema)]);
    let mut pool = PgPoolOptions::new().max_connections(6);
    if let Some(timezone) = timezone {
        pool = pool.after_connect(move |conn, _| {
            let set = format!("SET TIME ZONE '{}'", timezone.replace('\'', "''"));
            Box::pin(async move {
                sqlx::query(sqlx::AssertSqlSafe(set))
                    .execute(&mut *conn)
                    .await?;
                let shown: String = sqlx::query_scalar("SHOW TimeZone")
                    .fetch_one(&mut *conn)
                    .await?;
                println!("session time zone {shown}");
                Ok(())
            })
        });
    }
    Ok(PostgresStore::from_pool(pool.connect_with(connect).await?).await?)
}

#[cfg(feature = "sqs")]
async fn queue_strategy(
    store: Arc<dyn root_orchestrator::RequestStore>,
    queue: &str,
) -> Result<(Arc<dyn ProcessingStrategy>, String), Failure> {
    use root_orchestrator::{QueueConfig, QueueStrategy, SqsQueue};

    // Short attempts: the tests cut the server off, and a consumer should notice soon.
    let queue = SqsQueue::builder(queue)
        .attempt_timeout(Duration::from_secs(2))
        .connect()
        .await?;
    let strategy = QueueStrategy::with_shared(store, Arc::new(queue), QueueConfig::from_env()?)?;
    let worker = strategy.worker_id().to_owned();
    Ok((Arc::new(strategy), worker))
}

#[cfg(not(feature = "sqs"))]
async fn queue_strategy(
    _: Arc<dyn root_orchestrator::RequestStore>,
    _: &str,
) -> Result<(Arc<dyn ProcessingStrategy>, String), Failure> {
    Err("--sqs-queue needs the `sqs` feature".into())
}
