//! How many requests per second the table strategy moves from submitted to COMPLETED, on
//! SQLite and in memory, with an executor that does no work: the orchestrator's own cost.
//!
//! Run with `cargo bench --bench throughput`; `THROUGHPUT_REQUESTS` sets the batch size.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use root_orchestrator::{
    CancellationToken, Configuration, MemoryStore, NewRequest, Request, RequestResults,
    RequestStatus, RequestStore, RequestType, RootOrchestrator, Source, SqliteStore, TableConfig,
    TableStrategy, WorkflowContext, WorkflowError, WorkflowExecutor,
};

struct NoWork;

#[async_trait]
impl WorkflowExecutor for NoWork {
    async fn execute(
        &self,
        _: &Request,
        _: &WorkflowContext,
    ) -> Result<RequestResults, WorkflowError> {
        Ok(RequestResults::new(None, serde_json::Value::Null))
    }
}

fn request(i: usize) -> NewRequest {
    let mut configuration = Configuration::new([format!("keyword-{i}")]);
    configuration.sources.push(Source::new("FDA", "regulatory"));
    NewRequest::new(
        "bench",
        "bench",
        RequestType::new("bench").expect("valid type"),
        configuration,
    )
}

async fn measure(name: &str, store: Arc<dyn RequestStore>, requests: usize, workers: usize) {
    let mut config = TableConfig::default();
    config.max_concurrent_requests = workers;
    config.polling_interval = Duration::from_millis(50);
    let strategy = TableStrategy::with_shared_store(store.clone(), config).expect("config");
    let orchestrator = RootOrchestrator::builder()
        .strategy(strategy)
        .executor("bench", NoWork)
        .build()
        .expect("orchestrator");

    let started = Instant::now();
    for i in 0..requests {
        orchestrator.submit(request(i)).await.expect("submit");
    }
    let submitted = started.elapsed();

    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let orchestrator = orchestrator.clone();
        let stop = stop.clone();
        async move { orchestrator.run_with_token(stop).await }
    });
    let processing = Instant::now();
    loop {
        let counts = store.count_by_status().await.expect("counts");
        if counts.get(&RequestStatus::Completed).copied().unwrap_or(0) == requests as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let processed = processing.elapsed();
    stop.cancel();
    run.await.expect("join").expect("workers");

    println!(
        "{name:<8} workers={workers:<2} requests={requests:<5} submit={:>8.0}/s  \
         submit->completed={:>7.0}/s  slot time per request={:>6.2} ms",
        requests as f64 / submitted.as_secs_f64(),
        requests as f64 / processed.as_secs_f64(),
        processed.as_secs_f64() * 1000.0 / requests as f64 * workers as f64,
    );
}

fn main() {
    let requests: usize = std::env::var("THROUGHPUT_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");

    runtime.block_on(async {
        for workers in [1, 8] {
            measure("memory", Arc::new(MemoryStore::new()), requests, workers).await;

            let dir = tempfile::tempdir().expect("temporary directory");
            let sqlite = SqliteStore::open(dir.path().join("bench.db"))
                .await
                .expect("open");
            measure("sqlite", Arc::new(sqlite), requests, workers).await;
        }
    });
}
