//! The queue strategy on Amazon SQS: the seed market-intelligence request travels as a
//! message, a consumer runs it, and the embedded SQLite store keeps its record.
//!
//! Against a local SQS-compatible server (any that speaks the SQS API):
//!
//! ```sh
//! export AWS_ENDPOINT_URL_SQS=http://127.0.0.1:5000 AWS_REGION=us-east-1 \
//!        AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_EC2_METADATA_DISABLED=true
//! cargo run --example sqs --features sqs -- --exit-when-drained
//! ```
//!
//! Against AWS, leave `AWS_ENDPOINT_URL_SQS` unset: region and credentials come from the
//! standard chain. The queue (`--queue`, a name or URL) and its dead-letter queue
//! (`<name>-dlq`) are created when missing, unless `--no-create`.
//!
//! It submits the seed request from `examples/requests/semaglutide_intelligence.json`
//! (its fixed id makes a second run find it finished instead of running it again), plus
//! `--copies` more under fresh ids, and runs consumers that also take any message other
//! producers send in the wire shape, for instance:
//!
//! ```sh
//! aws sqs send-message --endpoint-url "$AWS_ENDPOINT_URL_SQS" \
//!     --queue-url "$AWS_ENDPOINT_URL_SQS/123456789012/root-orchestrator-example" \
//!     --message-body file://examples/requests/semaglutide_intelligence.json
//! ```
//!
//! With `--exit-when-drained` it stops once the queue is empty and no request is left
//! unfinished, and prints each request it saw with its final status. Consumer settings
//! come from the `ROOT_ORCHESTRATOR_*` variables (see `QueueConfig`).
//!
//! Exit code: 0 when every request it saw completed, 1 otherwise, 130 on Ctrl-C.

#[path = "support/market_intel.rs"]
mod market_intel;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use market_intel::MarketIntelligenceWorkflow;
use root_orchestrator::{
    ListFilter, QueueBackend, QueueConfig, QueueStrategy, Request, RequestId, RequestMessage,
    RequestStatus, RequestStore, RequestType, RootOrchestrator, SqliteStore, SqsQueue,
};
use tracing_subscriber::EnvFilter;

const SEED_REQUEST: &str = include_str!("requests/semaglutide_intelligence.json");

/// How often the example looks at the requests and the queue.
const LOOK_EVERY: Duration = Duration::from_millis(500);

/// Run market-intelligence requests through an SQS queue.
#[derive(Debug, Parser)]
#[command(name = "sqs")]
struct Args {
    /// The queue: a name or a URL.
    #[arg(long, default_value = "root-orchestrator-example")]
    queue: String,

    /// Do not create the queue and its dead-letter queue when they are missing.
    #[arg(long)]
    no_create: bool,

    /// Deliveries after which SQS itself moves a message to the dead-letter queue (for
    /// created queues); above the consumers' attempts, which dead-letter first.
    #[arg(long, default_value_t = 10)]
    max_receive_count: u32,

    /// Submit this many copies of the seed request under fresh ids, besides the seed.
    #[arg(long, default_value_t = 0)]
    copies: usize,

    /// Exit once the queue is drained and every request has finished.
    #[arg(long)]
    exit_when_drained: bool,

    /// SQLite database file; created, with its folder, when missing.
    #[arg(long, default_value = "sqs-data/requests.db")]
    db: PathBuf,

    /// Folder of documents the workflow searches.
    #[arg(long)]
    corpus: Option<PathBuf>,

    /// Folder the workflow writes its reports to.
    #[arg(long, default_value = "sqs-data/reports")]
    reports: PathBuf,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,root_orchestrator=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();

    match run(Args::parse()).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err}");
            let mut source = err.source();
            while let Some(cause) = source {
                eprintln!("  caused by: {cause}");
                source = cause.source();
            }
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let mut builder = SqsQueue::builder(&args.queue);
    if !args.no_create {
        builder = builder.create_if_missing(args.max_receive_count);
    }
    let queue = builder.connect().await?;
    println!(
        "queue {} (dead letters: {})",
        queue.queue_url(),
        queue.dead_letter_queue_url()
    );

    if let Some(folder) = args.db.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(folder)?;
    }
    let store = SqliteStore::open(&args.db).await?;
    let strategy = QueueStrategy::new(store.clone(), queue.clone(), QueueConfig::from_env()?)?;
    let corpus = args
        .corpus
        .clone()
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/corpus"));
    let orchestrator = RootOrchestrator::builder()
        .strategy(strategy)
        .executor(
            RequestType::SEMAGLUTIDE_INTELLIGENCE,
            MarketIntelligenceWorkflow::new(corpus, args.reports.clone()),
        )
        .build()?;

    let started = chrono::Utc::now();
    let mut seen: BTreeMap<RequestId, RequestStatus> = BTreeMap::new();
    let seed = orchestrator.submit_json(SEED_REQUEST).await?;
    println!("submitted {} ({})", seed.id, seed.status);
    seen.insert(seed.id.clone(), seed.status);
    for _ in 0..args.copies {
        let mut message = RequestMessage::from_json(SEED_REQUEST)?;
        message.request_id = Some(RequestId::generate().to_string());
        let copy = orchestrator.submit(message.into_new_request()?).await?;
        println!("submitted {} ({})", copy.id, copy.status);
        seen.insert(copy.id.clone(), copy.status);
    }

    let consumers = orchestrator.spawn();

    let mut interrupted = false;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {
                interrupted = true;
                break;
            }
            _ = tokio::time::sleep(LOOK_EVERY) => {}
        }
        // Requests other producers sent show up in the store as they are delivered.
        for request in touched_since(&store, started).await? {
            seen.entry(request.id.clone()).or_insert(request.status);
        }
        let mut unfinished = 0;
        for (id, last) in seen.iter_mut() {
            let Some(request) = store.get(id).await? else {
                continue;
            };
            if request.status != *last {
                println!("{id}: {} -> {}{}", last, request.status, stage(&request));
                *last = request.status;
            }
            unfinished += usize::from(!request.status.is_terminal());
        }
        if args.exit_when_drained && unfinished == 0 {
            let depth = queue.depth().await?;
            if depth.visible + depth.in_flight + depth.delayed == 0 {
                println!("queue drained");
                break;
            }
        }
    }
    consumers.shutdown().await?;

    println!(
        "\n{:<38} {:<10} {:>8}  report",
        "request", "status", "attempts"
    );
    let mut all_completed = true;
    for id in seen.keys() {
        let Some(request) = store.get(id).await? else {
            continue;
        };
        all_completed &= request.status == RequestStatus::Completed;
        let report = request
            .results
            .as_ref()
            .and_then(|r| r.report_path.clone())
            .or_else(|| request.errors.last().map(|e| e.message.clone()))
            .unwrap_or_default();
        println!(
            "{:<38} {:<10} {:>8}  {report}",
            request.id, request.status, request.attempts
        );
    }
    let depth = queue.depth().await?;
    println!(
        "queue: {} visible, {} in flight, {} delayed, {} dead-lettered",
        depth.visible, depth.in_flight, depth.delayed, depth.dead_lettered
    );

    Ok(if interrupted {
        ExitCode::from(130)
    } else if all_completed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Requests created or changed since `since`, newest first.
async fn touched_since(
    store: &SqliteStore,
    since: chrono::DateTime<chrono::Utc>,
) -> Result<Vec<Request>, root_orchestrator::Error> {
    let mut filter = ListFilter::new().with_limit(ListFilter::MAX_LIMIT);
    let mut touched = Vec::new();
    loop {
        let page = store.list(&filter).await?;
        touched.extend(
            page.requests.into_iter().filter(|r| {
                r.created_at >= since || r.history.last().is_some_and(|c| c.at >= since)
            }),
        );
        match page.next {
            Some(cursor) => filter = filter.after(cursor),
            None => return Ok(touched),
        }
    }
}

/// The running stage of a request, for the status lines.
fn stage(request: &Request) -> String {
    match (&request.progress.current_stage, request.status) {
        (Some(stage), RequestStatus::Executing) => {
            format!(" ({stage}, {}%)", request.progress.percentage)
        }
        _ => String::new(),
    }
}
