//! Quickstart: submit, run, watch, cancel and resume market-intelligence requests on an
//! embedded SQLite database, with no other service.
//!
//! ```text
//! cargo run --example quickstart
//! cargo run --example quickstart -- --db /tmp/qs/requests.db
//! RUST_LOG=root_orchestrator=info cargo run --example quickstart
//! ```
//!
//! It submits a seed request from `examples/requests/` (twice, to show that a caller-given
//! id makes submits idempotent), three more of other priorities, one invalid request that
//! is refused, and one slow request that it cancels while it runs. Workers run them
//! against the documents of `examples/corpus/` and write a Markdown report per request.
//!
//! Requests are durable: if a run is killed, the next one finds the requests it left
//! unfinished, runs the pending ones, and rescues the ones that were running once their
//! lease expires (6 s here), then waits for them as well. Run one quickstart at a time
//! per database: a concurrent run's requests would look like leftovers.
//!
//! Exit code: 0 when every request ended as expected, 1 otherwise (with the reason
//! printed), 130 when interrupted with Ctrl-C.

#[path = "support/market_intel.rs"]
mod market_intel;

use std::collections::BTreeMap;
use std::error::Error as StdError;
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use root_orchestrator::{
    CancellationToken, Configuration, Error, ExtractionMode, InsertOutcome, ListFilter, NewRequest,
    Priority, Request, RequestId, RequestMessage, RequestStatus, RequestStore, RequestType,
    RootOrchestrator, Source, SqliteStore, TableConfig, TableStrategy,
};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;

use market_intel::MarketIntelligenceWorkflow;

/// The seed request, in the wire shape producers send.
const SEED_REQUEST: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/requests/semaglutide_intelligence.json"
);
const PROJECT: &str = "glp1-market-watch";
/// How often the progress bars are refreshed from the store.
const REFRESH: Duration = Duration::from_millis(150);
/// A safety net: requests that are still running after this long mean something is wrong.
const WATCH_LIMIT: Duration = Duration::from_secs(180);

/// Run market-intelligence requests on an embedded SQLite database and watch them.
#[derive(Debug, Parser)]
#[command(name = "quickstart")]
struct Args {
    /// SQLite database file; created, with its folder, when missing.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "quickstart-data/quickstart.db"
    )]
    db: PathBuf,

    /// Folder of `.md` / `.txt` documents the workflow searches.
    #[arg(
        long,
        value_name = "DIR",
        default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/corpus")
    )]
    corpus: PathBuf,

    /// Folder for the Markdown reports [default: `reports` next to the database].
    #[arg(long, value_name = "DIR")]
    reports: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("quickstart failed: {}", chain(err.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// A request the quickstart watches until it is finished.
struct Tracked {
    label: &'static str,
    id: RequestId,
    priority: Priority,
    /// The status it must end in: `COMPLETED` (with its report on disk) or `CANCELLED`.
    expect: RequestStatus,
    /// Cancel it once it is executing and has made progress.
    cancel_when_running: bool,
    cancel_sent: bool,
    bar: ProgressBar,
    /// Status and stage last shown, to print only changes.
    last_seen: Option<(RequestStatus, Option<String>)>,
    finished: bool,
}

/// Where lines go: above the progress bars on a terminal, plainly otherwise (indicatif
/// draws nothing, and drops `println`, when stderr is not a terminal).
struct Console {
    bars: MultiProgress,
    started: Instant,
}

impl Console {
    fn say(&self, text: impl AsRef<str>) {
        if self.bars.is_hidden() || self.bars.println(text.as_ref()).is_err() {
            println!("{}", text.as_ref());
        }
    }

    /// A line stamped with the time since start, for events of the watch.
    fn event(&self, text: impl AsRef<str>) {
        self.say(format!(
            "[{:>6.2}s] {}",
            self.started.elapsed().as_secs_f64(),
            text.as_ref()
        ));
    }
}

async fn run(args: Args) -> Result<ExitCode, Box<dyn StdError>> {
    let console = Console {
        bars: MultiProgress::new(),
        started: Instant::now(),
    };
    init_tracing(&console.bars);

    if let Some(parent) = args.db.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    let reports = args.reports.clone().unwrap_or_else(|| {
        args.db
            .parent()
            .map_or_else(|| PathBuf::from("reports"), |p| p.join("reports"))
    });
    if !args.corpus.is_dir() {
        return Err(format!("the corpus folder {} does not exist", args.corpus.display()).into());
    }

    let store = SqliteStore::open(&args.db)
        .await
        .map_err(|e| format!("cannot open {}: {}", args.db.display(), chain(&e)))?;
    console.say(format!("database: {}", args.db.display()));
    console.say(format!("corpus:   {}", args.corpus.display()));
    console.say(format!("reports:  {}", reports.display()));

    let mut config = TableConfig::default();
    config.max_concurrent_requests = 2;
    config.polling_interval = Duration::from_secs(1);
    config.status_update_interval = Duration::from_secs(2);
    // Short, so that a request left running by a killed run is rescued ~6 s after restart.
    config.lease_duration = Duration::from_secs(6);
    config.shutdown_grace_period = Duration::from_secs(5);
    config.backoff.base = Duration::from_secs(1);
    let lease_secs = config.lease_duration.as_secs();

    let orchestrator = RootOrchestrator::builder()
        .strategy(TableStrategy::new(store.clone(), config)?)
        .executor(
            RequestType::SEMAGLUTIDE_INTELLIGENCE,
            MarketIntelligenceWorkflow::new(&args.corpus, &reports),
        )
        .build()?;

    let mut tracked = Vec::new();
    let mut issues = Vec::new();

    // Requests a previous run left unfinished: they are resumed, and waited for.
    let leftovers = unfinished_requests(&store).await?;
    announce_leftovers(&console, &leftovers, lease_secs);
    for request in &leftovers {
        tracked.push(track(
            &console,
            "leftover",
            request,
            RequestStatus::Completed,
            false,
        ));
    }

    // Everything is submitted before the workers start, so that the claim order shows the
    // priorities, and so that no worker (whose pruning of old finished requests runs when
    // it starts) changes the stored count while the refused submit below is checked.
    console.say("\nsubmitting");
    submit_seed(&orchestrator, &console, &mut tracked, &mut issues).await?;
    for (label, request) in more_requests()? {
        let request = orchestrator.submit(request).await?;
        console.say(format!(
            "  {label:<13} {} priority {:<6} keywords {:?}",
            request.id,
            request.priority.as_str(),
            request.configuration.keywords
        ));
        tracked.push(track(
            &console,
            label,
            &request,
            RequestStatus::Completed,
            false,
        ));
    }
    let refused = submit_invalid(&orchestrator, &store, &console, &mut issues).await?;
    let slow = orchestrator.submit(slow_request()?).await?;
    console.say(format!(
        "  {:<13} {} priority {:<6} stage_delay_ms 1500; will be cancelled while it runs",
        "slow",
        slow.id,
        slow.priority.as_str()
    ));
    tracked.push(track(
        &console,
        "slow",
        &slow,
        RequestStatus::Cancelled,
        true,
    ));

    console.say("\nworkers started (2 at a time); watching:");
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let mut workers = tokio::spawn(
        orchestrator
            .clone()
            .run_until(async move { stop.cancelled().await }),
    );

    let interrupted = watch(
        &orchestrator,
        &console,
        &mut tracked,
        &mut workers,
        &mut issues,
    )
    .await;

    console.say("shutting down the workers");
    shutdown.cancel();
    match workers.await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => issues.push(format!(
            "the workers stopped with an error: {}",
            chain(&err)
        )),
        Err(err) => issues.push(format!("the workers' task failed: {err}")),
    }

    print_summary(&orchestrator, &tracked, &refused, &mut issues, interrupted).await?;

    let counts = store.count_by_status().await?;
    let counts_text: Vec<String> = counts.iter().map(|(s, n)| format!("{s} {n}")).collect();
    println!("\nstore now holds: {}", counts_text.join(", "));
    let in_flight: u64 = RequestStatus::IN_FLIGHT
        .iter()
        .filter_map(|s| counts.get(s))
        .sum();
    if in_flight > 0 && !interrupted {
        issues.push(format!(
            "{in_flight} request(s) left PROCESSING or EXECUTING"
        ));
    }
    store.close().await;

    if interrupted {
        println!("interrupted: unfinished requests stay in the database; run again to finish them");
        return Ok(ExitCode::from(130));
    }
    if issues.is_empty() {
        println!("every request ended as expected");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("unexpected:");
        for issue in &issues {
            println!("  - {issue}");
        }
        Ok(ExitCode::FAILURE)
    }
}

/// Logs at `warn` unless `RUST_LOG` says otherwise, printed above the progress bars.
fn init_tracing(bars: &MultiProgress) {
    let filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::WARN.into())
        .from_env_lossy();
    let bars = bars.clone();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(io::stderr().is_terminal())
        .with_writer(move || LogWriter(bars.clone()))
        .init();
}

/// Writes log lines to stderr with the progress bars lifted out of the way.
struct LogWriter(MultiProgress);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.suspend(|| io::stderr().write_all(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

/// Every request in a non-terminal status, each once.
async fn unfinished_requests(store: &SqliteStore) -> Result<Vec<Request>, Error> {
    let mut found: BTreeMap<RequestId, Request> = BTreeMap::new();
    for status in [
        RequestStatus::Pending,
        RequestStatus::Processing,
        RequestStatus::Executing,
    ] {
        let mut filter = ListFilter::new()
            .with_status(status)
            .with_limit(ListFilter::MAX_LIMIT);
        loop {
            let page = store.list(&filter).await?;
            for request in page.requests {
                // A request may move between statuses while the pages are read; keep one.
                found.entry(request.id.clone()).or_insert(request);
            }
            match page.next {
                Some(cursor) => filter = filter.after(cursor),
                None => break,
            }
        }
    }
    Ok(found.into_values().collect())
}

/// Says what an earlier run left unfinished and what will become of it.
fn announce_leftovers(console: &Console, leftovers: &[Request], lease_secs: u64) {
    if leftovers.is_empty() {
        console.say("\nno unfinished requests from an earlier run");
        return;
    }
    let mut by_status: BTreeMap<RequestStatus, usize> = BTreeMap::new();
    for request in leftovers {
        *by_status.entry(request.status).or_default() += 1;
    }
    let counts: Vec<String> = by_status.iter().map(|(s, n)| format!("{n} {s}")).collect();
    console.say(format!(
        "\nfound {} unfinished request(s) from an earlier run: {}",
        leftovers.len(),
        counts.join(", ")
    ));
    console.say(format!(
        "  PENDING ones run as soon as the workers start; PROCESSING/EXECUTING ones whose \
         worker is gone are rescued when its lease expires (lease_duration {lease_secs} s \
         here). Waiting for all of them."
    ));
    for request in leftovers {
        let lease = request.lease.as_ref().map_or(String::new(), |lease| {
            let left = (lease.expires_at - chrono::Utc::now()).num_milliseconds();
            let expiry = if left > 0 {
                format!("expires in {:.1} s", left as f64 / 1000.0)
            } else {
                "has expired".to_owned()
            };
            format!(", lease of {} {expiry}", lease.owner)
        });
        console.say(format!(
            "  {} {:<10} attempt {}/{}{lease}",
            request.id,
            request.status.as_str(),
            request.attempts,
            request.max_attempts
        ));
    }
}

/// (a) The seed request from its JSON file, under a fresh id, submitted twice.
async fn submit_seed(
    orchestrator: &RootOrchestrator,
    console: &Console,
    tracked: &mut Vec<Tracked>,
    issues: &mut Vec<String>,
) -> Result<(), Box<dyn StdError>> {
    let body = std::fs::read_to_string(SEED_REQUEST)
        .map_err(|e| format!("cannot read {SEED_REQUEST}: {e}"))?;
    let mut message = RequestMessage::from_json(&body)
        .map_err(|e| format!("{SEED_REQUEST} is not a valid request: {e}"))?;
    let fresh = RequestId::generate();
    let file_id = message.request_id.replace(fresh.to_string());
    console.say(format!(
        "  seed          {} from {} (its id {} replaced, so every run submits new requests)",
        fresh,
        Path::new(SEED_REQUEST)
            .file_name()
            .map_or_else(|| SEED_REQUEST.into(), |n| n.to_string_lossy()),
        file_id.as_deref().unwrap_or("(none)")
    ));
    let request = message
        .into_new_request()
        .map_err(|e| format!("{SEED_REQUEST} is not a valid request: {e}"))?;

    let first = orchestrator.submit_detailed(request.clone()).await?;
    let InsertOutcome::Inserted(seed) = first else {
        return Err(format!("the fresh id {fresh} was already stored").into());
    };
    tracked.push(track(
        console,
        "seed",
        &seed,
        RequestStatus::Completed,
        false,
    ));

    match orchestrator.submit_detailed(request).await? {
        InsertOutcome::Existing(again) if again.id == seed.id => console.say(format!(
            "  seed again    {} -> InsertOutcome::Existing: the same request comes back \
             (status {}, created {}), nothing new stored",
            again.id,
            again.status,
            again.created_at.format("%H:%M:%S%.3f")
        )),
        other => issues.push(format!(
            "re-submitting the seed under the same id gave {} {} instead of Existing {}",
            match other {
                InsertOutcome::Inserted(_) => "Inserted",
                InsertOutcome::Existing(_) => "Existing",
            },
            other.request().id,
            seed.id
        )),
    }
    Ok(())
}

/// (b) Three more requests built in code, of different priorities and extraction modes.
fn more_requests() -> Result<Vec<(&'static str, NewRequest)>, Error> {
    let request_type = RequestType::new(RequestType::SEMAGLUTIDE_INTELLIGENCE)?;
    let fda = Source::new("FDA", "regulatory");
    let nejm = Source::new("NEJM", "academic");

    let mut tirzepatide = Configuration::new(["tirzepatide"]);
    tirzepatide.sources = vec![fda.clone(), nejm];
    tirzepatide.extraction_mode = ExtractionMode::Standard;
    tirzepatide.quality_threshold = 0.5;
    tirzepatide.custom_params = serde_json::json!({ "stage_delay_ms": 300 });

    let mut adolescents = Configuration::new(["adolescent", "pediatric"]);
    adolescents.sources = vec![fda.clone()];
    adolescents.extraction_mode = ExtractionMode::Summary;
    adolescents.custom_params = serde_json::json!({ "stage_delay_ms": 300 });

    let mut shortage = Configuration::new(["shortage"]);
    shortage.sources = vec![fda];
    shortage.extraction_mode = ExtractionMode::Comprehensive;
    shortage.quality_threshold = 0.8;
    shortage.custom_params = serde_json::json!({ "stage_delay_ms": 300 });

    Ok(vec![
        (
            "tirzepatide",
            NewRequest::new(PROJECT, "analyst-002", request_type.clone(), tirzepatide)
                .with_priority(Priority::Low),
        ),
        (
            "adolescents",
            NewRequest::new(PROJECT, "analyst-003", request_type.clone(), adolescents)
                .with_priority(Priority::Medium),
        ),
        (
            "shortage",
            NewRequest::new(PROJECT, "analyst-001", request_type, shortage)
                .with_priority(Priority::High),
        ),
    ])
}

/// The invalid request, for the summary.
struct Refused {
    priority: Priority,
    outcome: String,
}

/// (c) A request with a quality threshold above 1.0: refused, and nothing stored.
async fn submit_invalid(
    orchestrator: &RootOrchestrator,
    store: &SqliteStore,
    console: &Console,
    issues: &mut Vec<String>,
) -> Result<Refused, Box<dyn StdError>> {
    let mut configuration = Configuration::new(["semaglutide"]);
    configuration.sources = vec![Source::new("FDA", "regulatory")];
    configuration.quality_threshold = 1.5;
    let id = RequestId::generate();
    let request = NewRequest::new(
        PROJECT,
        "analyst-004",
        RequestType::new(RequestType::SEMAGLUTIDE_INTELLIGENCE)?,
        configuration,
    )
    .with_id(id.clone());
    let priority = request.priority;

    let before = stored_total(store).await?;
    let outcome = orchestrator.submit(request).await;
    let after = stored_total(store).await?;
    let absent = matches!(orchestrator.status(&id).await, Err(Error::NotFound { .. }));

    let summary = match &outcome {
        Ok(request) => format!("accepted as {}", request.id),
        Err(err) => format!("refused: {err}"),
    };
    match &outcome {
        Err(err @ Error::InvalidRequest { field, .. }) => {
            console.say(format!(
                "  {:<13} refused: {err}; requests stored before {before}, after {after}{}",
                "invalid",
                if absent { ", id not found" } else { "" }
            ));
            if field != "configuration.quality_threshold" {
                issues.push(format!(
                    "the invalid request was refused for another field: {err}"
                ));
            }
        }
        Err(err) => issues.push(format!(
            "the invalid request failed otherwise: {}",
            chain(err)
        )),
        Ok(request) => issues.push(format!(
            "the invalid request was accepted as {}",
            request.id
        )),
    }
    if before != after || !absent {
        issues.push(format!(
            "the refused request changed the store: {before} requests before, {after} after, \
             its id {}",
            if absent { "absent" } else { "present" }
        ));
    }
    Ok(Refused {
        priority,
        outcome: summary,
    })
}

async fn stored_total(store: &SqliteStore) -> Result<u64, Error> {
    Ok(store.count_by_status().await?.values().sum())
}

/// (d) A slow request, which the watch cancels once it runs.
fn slow_request() -> Result<NewRequest, Error> {
    let mut configuration = Configuration::new(["semaglutide", "tirzepatide"]);
    configuration.sources = vec![
        Source::new("FDA", "regulatory"),
        Source::new("NEJM", "academic"),
    ];
    configuration.custom_params = serde_json::json!({ "stage_delay_ms": 1500 });
    Ok(NewRequest::new(
        PROJECT,
        "analyst-005",
        RequestType::new(RequestType::SEMAGLUTIDE_INTELLIGENCE)?,
        configuration,
    )
    .with_priority(Priority::Medium))
}

fn track(
    console: &Console,
    label: &'static str,
    request: &Request,
    expect: RequestStatus,
    cancel_when_running: bool,
) -> Tracked {
    let style = ProgressStyle::with_template("{prefix:<12} [{bar:20}] {pos:>3}% {msg}")
        .map(|style| style.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    let bar = console.bars.add(
        ProgressBar::new(100)
            .with_style(style)
            .with_prefix(label)
            .with_message(format!("{} {}", short_id(&request.id), request.status)),
    );
    Tracked {
        label,
        id: request.id.clone(),
        priority: request.priority,
        expect,
        cancel_when_running,
        cancel_sent: false,
        bar,
        last_seen: None,
        finished: false,
    }
}

/// The id's last eight characters: generated ids begin with a timestamp, so requests made
/// in the same second share their first characters, not their last ones.
fn short_id(id: &RequestId) -> String {
    let chars: Vec<char> = id.as_str().chars().collect();
    chars[chars.len().saturating_sub(8)..].iter().collect()
}

/// Refreshes the bars until every tracked request is finished; cancels the slow one once
/// it runs. Returns whether Ctrl-C interrupted the watch.
async fn watch(
    orchestrator: &RootOrchestrator,
    console: &Console,
    tracked: &mut [Tracked],
    workers: &mut tokio::task::JoinHandle<Result<(), Error>>,
    issues: &mut Vec<String>,
) -> bool {
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut ctrl_c_available = true;
    let mut tick = tokio::time::interval(REFRESH);
    let deadline = tokio::time::sleep(WATCH_LIMIT);
    tokio::pin!(deadline);

    loop {
        tokio::select! {
            signal = &mut ctrl_c, if ctrl_c_available => match signal {
                Ok(()) => {
                    console.say(
                        "\nCtrl-C: stopping; running requests get the shutdown grace period, \
                         then are handed back",
                    );
                    return true;
                }
                Err(err) => {
                    // Without a handler Ctrl-C ends the process the default way; the
                    // requests stay durable and the next run resumes them.
                    tracing::warn!(error = %err, "cannot listen for Ctrl-C");
                    ctrl_c_available = false;
                }
            },
            () = &mut deadline => {
                issues.push(format!("requests still unfinished after {} s", WATCH_LIMIT.as_secs()));
                return false;
            }
            _ = tick.tick() => {}
        }
        if workers.is_finished() {
            issues.push("the workers stopped before every request finished".to_owned());
            return false;
        }

        for request in tracked.iter_mut().filter(|t| !t.finished) {
            match orchestrator.status(&request.id).await {
                Ok(current) => refresh(orchestrator, console, request, &current, issues).await,
                Err(err) => console.event(format!(
                    "{} {}: status unavailable: {}",
                    request.label,
                    short_id(&request.id),
                    chain(&err)
                )),
            }
        }
        if tracked.iter().all(|t| t.finished) {
            return false;
        }
    }
}

/// Shows `current` on the request's bar, prints what changed, and cancels the slow
/// request once it has made progress.
async fn refresh(
    orchestrator: &RootOrchestrator,
    console: &Console,
    request: &mut Tracked,
    current: &Request,
    issues: &mut Vec<String>,
) {
    let progress = &current.progress;
    let stage = progress.current_stage.clone();
    let attempt = format!("attempt {}/{}", current.attempts, current.max_attempts);
    // A request waiting for another attempt (a retry, or rescued from a dead worker) still
    // carries the progress its last attempt reached; the next attempt starts from zero.
    let waiting_again = current.status == RequestStatus::Pending && current.attempts > 0;
    let position = if waiting_again {
        0
    } else {
        progress.percentage
    };
    request.bar.set_position(u64::from(position));
    // Kept short so that a bar fits on an 80-column line.
    request.bar.set_message(format!(
        "{} {:<11} {} #{}",
        short_id(&request.id),
        if waiting_again {
            "-"
        } else {
            stage.as_deref().unwrap_or("-")
        },
        current.status,
        current.attempts
    ));

    let seen = (current.status, stage.clone());
    if request.last_seen.as_ref() != Some(&seen) {
        let status_changed = request.last_seen.as_ref().map(|(s, _)| *s) != Some(current.status);
        // On a terminal the bars show stages; printed lines are kept for status changes.
        if waiting_again && status_changed {
            console.event(format!(
                "{:<12} {} {:<10} waiting for attempt {}/{}; attempt {} stopped at {} {}%{}",
                request.label,
                short_id(&request.id),
                current.status.as_str(),
                current.attempts + 1,
                current.max_attempts,
                current.attempts,
                stage.as_deref().unwrap_or("-"),
                progress.percentage,
                current
                    .errors
                    .last()
                    .map_or(String::new(), |e| format!(" ({})", e.message))
            ));
        } else if status_changed || console.bars.is_hidden() {
            console.event(format!(
                "{:<12} {} {:<10} {:<11} {:>3}%  {attempt}, {} docs, {} sentences",
                request.label,
                short_id(&request.id),
                current.status.as_str(),
                stage.as_deref().unwrap_or("-"),
                progress.percentage,
                progress.urls_found,
                progress.content_extracted
            ));
        }
        request.last_seen = Some(seen);
    }

    if request.cancel_when_running
        && !request.cancel_sent
        && current.status == RequestStatus::Executing
        && progress.percentage > 0
    {
        request.cancel_sent = true;
        match orchestrator.cancel(&request.id).await {
            Ok(outcome) => console.event(format!(
                "{:<12} {} cancel requested at {} {}% -> {outcome:?}",
                request.label,
                short_id(&request.id),
                stage.as_deref().unwrap_or("-"),
                progress.percentage
            )),
            Err(err) => issues.push(format!("cancelling {} failed: {}", request.id, chain(&err))),
        }
    }

    if current.status.is_terminal() {
        request.finished = true;
        let text = format!("{} {}", short_id(&request.id), current.status);
        if current.status == RequestStatus::Completed {
            request.bar.finish_with_message(text);
        } else {
            request.bar.abandon_with_message(text);
        }
    }
}

/// The final table, read back from the store after the workers stopped, and the checks.
async fn print_summary(
    orchestrator: &RootOrchestrator,
    tracked: &[Tracked],
    refused: &Refused,
    issues: &mut Vec<String>,
    interrupted: bool,
) -> Result<(), Error> {
    println!(
        "\n{:<12} {:<36} {:<8} {:<10} {:>8}  outcome",
        "request", "id", "priority", "status", "attempts"
    );
    for request in tracked {
        let current = orchestrator.status(&request.id).await?;
        let last_error = current.errors.last().map(|e| e.message.as_str());
        let outcome = match (current.status, &current.results) {
            (RequestStatus::Completed, Some(results)) => {
                let summary = &results.summary;
                format!(
                    "{} (documents: {}, sentences: {})",
                    results.report_path.as_deref().unwrap_or("no report"),
                    summary["documents_matched"],
                    summary["sentences_extracted"]
                )
            }
            (RequestStatus::Cancelled, _) => "cancelled".to_owned(),
            (_, _) => last_error.unwrap_or("-").to_owned(),
        };
        println!(
            "{:<12} {:<36} {:<8} {:<10} {:>8}  {outcome}",
            request.label,
            request.id,
            request.priority.as_str(),
            current.status.as_str(),
            format!("{}/{}", current.attempts, current.max_attempts)
        );

        if interrupted {
            continue;
        }
        let has_report = current
            .results
            .as_ref()
            .and_then(|r| r.report_path.as_deref())
            .is_some_and(|path| Path::new(path).is_file());
        let as_expected = current.status == request.expect
            && (request.expect != RequestStatus::Completed || has_report);
        if !as_expected {
            issues.push(format!(
                "{} {}: expected {}{}, got {}{}",
                request.label,
                request.id,
                request.expect,
                if request.expect == RequestStatus::Completed {
                    " with its report on disk"
                } else {
                    ""
                },
                current.status,
                last_error.map_or(String::new(), |e| format!(" (last error: {e})"))
            ));
        }
    }
    println!(
        "{:<12} {:<36} {:<8} {:<10} {:>8}  {}",
        "invalid",
        "(not stored)",
        refused.priority.as_str(),
        "REFUSED",
        "-",
        refused.outcome
    );
    Ok(())
}

/// An error followed by its causes, on one line.
fn chain(err: &dyn StdError) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
