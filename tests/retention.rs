//! Retention under a steady load: rounds of requests are submitted, completed by the
//! table strategy's workers and pruned by its pruner after a short
//! `cleanup_completed_after`. After each round the library's counts (`count_by_status`)
//! equal the rows in the table, counted with SQL behind the store's back, and the table
//! stays bounded: its row count by two rounds' requests, SQLite's file by its early size.

#[cfg(feature = "postgres")]
mod pg;

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use root_orchestrator::{
    BackoffPolicy, Configuration, NewRequest, Request, RequestResults, RequestStatus, RequestStore,
    RequestType, RootOrchestrator, Source, SqliteStore, TableConfig, TableStrategy,
    WorkflowContext, WorkflowError, WorkflowExecutor,
};
use tokio::time::Instant;

const TYPE: &str = "semaglutide_intelligence";
const ROUNDS: usize = 8;
const BATCH: usize = 40;

struct Report;

#[async_trait]
impl WorkflowExecutor for Report {
    async fn execute(
        &self,
        request: &Request,
        _ctx: &WorkflowContext,
    ) -> Result<RequestResults, WorkflowError> {
        // Results of some size, so that pruning has pages to give back.
        let summary = serde_json::json!({
            "keywords": request.configuration.keywords,
            "findings": vec!["semaglutide supply remains constrained in the EU"; 20],
        });
        Ok(RequestResults::new(None, summary))
    }
}

fn request(round: usize, n: usize) -> NewRequest {
    let mut configuration = Configuration::new([format!("round-{round}-{n}")]);
    configuration.sources.push(Source::new("FDA", "regulatory"));
    NewRequest::new(
        "glp1-market-watch",
        "analyst-001",
        RequestType::new(TYPE).unwrap(),
        configuration,
    )
}

fn config() -> TableConfig {
    let mut config = TableConfig::default();
    config.max_concurrent_requests = 8;
    config.polling_interval = Duration::from_millis(50);
    config.status_update_interval = Duration::from_millis(200);
    config.lease_duration = Duration::from_secs(5);
    config.backoff = BackoffPolicy::new(Duration::from_millis(50), Duration::from_millis(200));
    config.cleanup_completed_after = Duration::from_secs(1);
    config.prune_interval = Duration::from_millis(100);
    config
}

/// Direct SQL on the store's own database.
#[async_trait]
trait Table: Send + Sync {
    /// Rows per status, counted with SQL.
    async fn rows_by_status(&self) -> BTreeMap<RequestStatus, u64>;
    /// The database's size in pages, where the backend has such a notion.
    async fn pages(&self) -> Option<u64>;
}

#[async_trait]
impl Table for SqliteStore {
    async fn rows_by_status(&self) -> BTreeMap<RequestStatus, u64> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, COUNT(*) FROM requests GROUP BY status")
                .fetch_all(self.pool())
                .await
                .unwrap();
        rows.into_iter()
            .map(|(status, n)| (status.parse().unwrap(), n as u64))
            .collect()
    }

    async fn pages(&self) -> Option<u64> {
        let pages: i64 = sqlx::query_scalar("PRAGMA page_count")
            .fetch_one(self.pool())
            .await
            .unwrap();
        Some(pages as u64)
    }
}

#[cfg(feature = "postgres")]
#[async_trait]
impl Table for root_orchestrator::PostgresStore {
    async fn rows_by_status(&self) -> BTreeMap<RequestStatus, u64> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, COUNT(*) FROM requests GROUP BY status")
                .fetch_all(self.pool())
                .await
                .unwrap();
        rows.into_iter()
            .map(|(status, n)| (status.parse().unwrap(), n as u64))
            .collect()
    }

    async fn pages(&self) -> Option<u64> {
        None
    }
}

/// The library's counts and the table's rows, read at one quiet moment: the library is
/// read before and after the SQL count, and the three must agree.
async fn assert_counts_match(store: &(impl RequestStore + Table), round: usize) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let before = store.count_by_status().await.unwrap();
        let rows = store.rows_by_status().await;
        let after = store.count_by_status().await.unwrap();
        if before == after {
            assert_eq!(before, rows, "round {round}: counts differ from the table");
            return rows.values().sum();
        }
        // The pruner ran in between; read again.
        assert!(
            Instant::now() < deadline,
            "round {round}: counts never settled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn steady_load_is_pruned_and_counted_exactly<S>(store: S)
where
    S: RequestStore + Table + Clone,
{
    let orchestrator = RootOrchestrator::builder()
        .strategy(TableStrategy::new(store.clone(), config()).unwrap())
        .executor(TYPE, Report)
        .build()
        .unwrap();
    let workers = orchestrator.spawn();

    let mut most_rows = 0;
    let mut pages = Vec::new();
    for round in 0..ROUNDS {
        let mut ids = Vec::new();
        for n in 0..BATCH {
            ids.push(orchestrator.submit(request(round, n)).await.unwrap().id);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for id in &ids {
            loop {
                // A completed request may be pruned before it is looked at: gone is done.
                match store.get(id).await.unwrap() {
                    Some(r) if r.status != RequestStatus::Completed => {
                        assert!(!r.status.is_terminal(), "{id} ended {}", r.status);
                        assert!(Instant::now() < deadline, "round {round}: {id} never ran");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    _ => break,
                }
            }
        }
        let rows = assert_counts_match(&store, round).await;
        most_rows = most_rows.max(rows);
        // This round's requests and at most the previous round's, which are due for
        // pruning: nothing older piles up.
        assert!(rows <= 2 * BATCH as u64, "round {round}: {rows} rows kept");
        pages.extend(store.pages().await);

        // Let this round age past the retention before the next one.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }

    // Once the load stops, everything is pruned.
    let deadline = Instant::now() + Duration::from_secs(10);
    while assert_counts_match(&store, ROUNDS).await > 0 {
        assert!(
            Instant::now() < deadline,
            "finished requests were never pruned"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    workers.shutdown().await.unwrap();

    assert!(
        most_rows > 0,
        "the counts were never checked with rows in the table"
    );
    if !pages.is_empty() {
        // Pruned pages are reused: the file stops growing once the load is steady.
        let early = pages[..3].iter().copied().max().unwrap();
        let late = pages[3..].iter().copied().max().unwrap();
        assert!(
            late <= early + early / 10,
            "the database kept growing under a steady load: {pages:?} pages"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_steady_load_is_pruned_and_counted_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("requests.db"))
        .await
        .unwrap();
    steady_load_is_pruned_and_counted_exactly(store).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_steady_load_is_pruned_and_counted_exactly() {
    let schema = pg::fresh_schema("ro_retention");
    let store = pg::connect(&schema, 6).await;
    steady_load_is_pruned_and_counted_exactly(store.clone()).await;
    store.close().await;
    pg::drop_schema(&schema).await;
}
