//! The HTTP API in front of market-intelligence workers, on SQLite.
//!
//! ```sh
//! ROOT_ORCHESTRATOR_TOKENS="alice-token=alice:glp1-market-watch;bob-token=bob:oncology" \
//!     cargo run --example server --features http
//! ```
//!
//! `ROOT_ORCHESTRATOR_TOKENS` holds the bearer tokens: entries separated by `;`, each
//! `token=user:project,project` (the projects that user may submit to and see). Without
//! it, the server uses two development tokens, `dev-alice` (user `alice`, project
//! `glp1-market-watch`) and `dev-bob` (user `bob`, project `oncology`), and says so; it
//! refuses to do that on an address other than loopback.
//!
//! Requests are kept in `server-data/requests.db` (`--db`), reports are written to
//! `server-data/reports/` (`--reports`). Built with `--features http,postgres` and with
//! `DATABASE_URL` set, it keeps requests in PostgreSQL instead. Worker settings come from
//! the `ROOT_ORCHESTRATOR_*` variables. Ctrl-C stops it gracefully.

#[path = "support/market_intel.rs"]
mod market_intel;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use market_intel::MarketIntelligenceWorkflow;
use root_orchestrator::http::{HttpApi, Principal, StaticTokens};
use root_orchestrator::{
    CancellationToken, RequestType, RootOrchestrator, SqliteStore, TableConfig, TableStrategy,
};
use tracing_subscriber::EnvFilter;

/// Serve the root-orchestrator HTTP API with market-intelligence workers.
#[derive(Debug, Parser)]
#[command(name = "server")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    bind: SocketAddr,

    /// SQLite database file; created, with its folder, when missing.
    #[arg(long, value_name = "PATH", default_value = "server-data/requests.db")]
    db: PathBuf,

    /// Folder of `.md` / `.txt` documents the workflow searches.
    #[arg(
        long,
        value_name = "DIR",
        default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/corpus")
    )]
    corpus: PathBuf,

    /// Folder for the Markdown reports.
    #[arg(long, value_name = "DIR", default_value = "server-data/reports")]
    reports: PathBuf,

    /// Largest accepted request body, in bytes.
    #[arg(long, default_value_t = HttpApi::DEFAULT_BODY_LIMIT)]
    body_limit: usize,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("warn,root_orchestrator=info")),
        )
        .init();

    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("server failed: {err}");
            let mut source = err.source();
            while let Some(cause) = source {
                eprintln!("  caused by: {cause}");
                source = cause.source();
            }
            ExitCode::FAILURE
        }
    }
}

/// The bearer tokens: from the environment, or development tokens on loopback only.
fn tokens(bind: &SocketAddr) -> Result<StaticTokens, Box<dyn std::error::Error>> {
    if std::env::var_os(StaticTokens::ENV_VAR).is_some() {
        return Ok(StaticTokens::from_env(StaticTokens::ENV_VAR)?);
    }
    if !bind.ip().is_loopback() {
        return Err(format!(
            "{} is not set; development tokens are only used on a loopback address, \
             and {bind} is not one",
            StaticTokens::ENV_VAR
        )
        .into());
    }
    println!(
        "{} is not set: using development tokens dev-alice (alice: glp1-market-watch) \
         and dev-bob (bob: oncology)",
        StaticTokens::ENV_VAR
    );
    Ok(StaticTokens::new()
        .with_token("dev-alice", Principal::new("alice", ["glp1-market-watch"]))?
        .with_token("dev-bob", Principal::new("bob", ["oncology"]))?)
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let tokens = tokens(&args.bind)?;
    let config = TableConfig::from_env()?;
    let workflow = MarketIntelligenceWorkflow::new(&args.corpus, &args.reports);

    let (strategy, store_name) = strategy(&args, config).await?;
    let orchestrator = RootOrchestrator::builder()
        .strategy(strategy)
        .executor(RequestType::SEMAGLUTIDE_INTELLIGENCE, workflow)
        .build()?;

    let app = HttpApi::new(orchestrator.clone(), tokens)
        .with_body_limit(args.body_limit)
        .router();
    let listener = tokio::net::TcpListener::bind(args.bind).await?;
    let address = listener.local_addr()?;

    let shutdown = CancellationToken::new();
    let workers = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { orchestrator.run_with_token(shutdown).await }
    });

    println!("requests are kept in {store_name}");
    println!("listening on http://{address} (Ctrl-C to stop)");

    let stop = shutdown.clone();
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            // A failing signal handler would leave no way to stop but killing the process;
            // stopping at once is the better of the two.
            tokio::signal::ctrl_c().await.ok();
            println!("stopping: finishing open calls, handing back running requests");
            stop.cancel();
        })
        .await;

    shutdown.cancel();
    workers.await??;
    served?;
    println!("stopped");
    Ok(())
}

/// The table strategy on PostgreSQL when built for it and `DATABASE_URL` is set, on the
/// SQLite file otherwise; with a description of where requests are kept.
async fn strategy(
    args: &Args,
    config: TableConfig,
) -> Result<(TableStrategy, String), Box<dyn std::error::Error>> {
    #[cfg(feature = "postgres")]
    if let Ok(url) = std::env::var("DATABASE_URL") {
        let store = root_orchestrator::PostgresStore::connect(&url).await?;
        return Ok((
            TableStrategy::new(store, config)?,
            "PostgreSQL (DATABASE_URL)".to_owned(),
        ));
    }

    let store = SqliteStore::open(&args.db).await?;
    Ok((
        TableStrategy::new(store, config)?,
        format!("SQLite at {}", args.db.display()),
    ))
}
