//! The HTTP API in front of market-intelligence workers, on SQLite.
//!
//! ```sh
//! ROOT_ORCHESTRATOR_TOKENS="alice-token=alice:glp1-market-watch;bob-token=bob:oncology" \
//!     cargo run --example server --features http
//! ```
//!
//! `ROOT_ORCHESTRATOR_TOKENS` holds the bearer tokens: entries separated by `;` or line
//! breaks, each `token=user:project,project` (the projects that user may submit to and
//! see), split at the last `=`. A malformed entry stops the server at startup. Without
//! it, the server uses two development tokens, `dev-alice` (user `alice`, project
//! `glp1-market-watch`) and `dev-bob` (user `bob`, project `oncology`), and says so; it
//! refuses to do that on an address other than loopback.
//!
//! Requests are kept in `server-data/requests.db` (`--db`), reports are written to
//! `server-data/reports/` (`--reports`). Built with `--features http,postgres` and with
//! `DATABASE_URL` set, it keeps requests in PostgreSQL instead. Worker settings come from
//! the `ROOT_ORCHESTRATOR_*` variables. Ctrl-C stops it gracefully.
//!
//! A client cannot hold a connection forever: one that takes over 10 s to send a request's
//! headers (or to start its next request on a kept-alive connection) is disconnected, and a
//! call not answered within 30 s, body upload included, is answered 408.

#[path = "support/market_intel.rs"]
mod market_intel;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use clap::Parser;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use market_intel::MarketIntelligenceWorkflow;
use root_orchestrator::http::{HttpApi, Principal, StaticTokens};
use root_orchestrator::{RequestType, RootOrchestrator, SqliteStore, TableConfig, TableStrategy};
use tokio::net::TcpListener;
use tower_http::timeout::TimeoutLayer;
use tracing_subscriber::EnvFilter;

/// How long a client may take to send a request's headers, and how long a kept-alive
/// connection may sit idle before its next request: past that, the connection is closed.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a call may take from its headers to its answer, reading the body included;
/// past that it is answered 408. No route of the API waits on anything slower than the
/// store, so only a client that sends its body slowly gets there.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

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
        .router()
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ));
    let listener = TcpListener::bind(args.bind).await?;
    let address = listener.local_addr()?;

    let workers = orchestrator.spawn();

    println!("requests are kept in {store_name}");
    println!("listening on http://{address} (Ctrl-C to stop)");

    let stop = workers.shutdown_token();
    serve(listener, app, async move {
        // A failing signal handler would leave no way to stop but killing the process;
        // stopping at once is the better of the two.
        tokio::signal::ctrl_c().await.ok();
        println!("stopping: finishing open calls, handing back running requests");
        stop.cancel();
    })
    .await;

    workers.shutdown().await?;
    println!("stopped");
    Ok(())
}

/// Serves `app` on `listener` until `stop` completes, then lets open calls finish.
///
/// This is `axum::serve` with a header-read timeout: hyper has one, but it only runs
/// with a timer, and `axum::serve` gives its connections none.
async fn serve(listener: TcpListener, app: Router, stop: impl Future<Output = ()>) {
    let graceful = GracefulShutdown::new();
    let mut stop = std::pin::pin!(stop);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(err) => {
                    // Out of file descriptors, or a peer gone before it was accepted: the
                    // listener still works, so wait a moment rather than stop serving.
                    tracing::warn!(error = %err, "could not accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            // Timeouts and peers that hang up end connections with an error; that is normal.
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "connection closed");
            }
        });
    }
    // Calls end within REQUEST_TIMEOUT; a connection still open after that is stuck.
    let drained = tokio::time::timeout(REQUEST_TIMEOUT, graceful.shutdown()).await;
    if drained.is_err() {
        tracing::warn!("some connections did not close in time; leaving them");
    }
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
