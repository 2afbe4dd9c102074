//! The store conformance suite against `SqliteStore`, each test on its own database file.

mod conformance;

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use root_orchestrator::{RequestStore, SqliteStore};

struct SqliteHarness {
    dir: tempfile::TempDir,
    opened: Mutex<Vec<SqliteStore>>,
}

#[async_trait]
impl conformance::Harness for SqliteHarness {
    async fn open(&self) -> Arc<dyn RequestStore> {
        let store = SqliteStore::open(self.dir.path().join("requests.db"))
            .await
            .expect("open the test database");
        self.opened.lock().unwrap().push(store.clone());
        Arc::new(store)
    }

    async fn close_all(&self) {
        let opened: Vec<_> = self.opened.lock().unwrap().drain(..).collect();
        for store in opened {
            store.close().await;
        }
    }

    fn durable(&self) -> bool {
        true
    }

    fn property_cases(&self) -> u32 {
        48
    }

    fn concurrent_cases(&self) -> u32 {
        32
    }
}

fn sqlite() -> SqliteHarness {
    SqliteHarness {
        dir: tempfile::tempdir().expect("a temporary directory"),
        opened: Mutex::new(Vec::new()),
    }
}

store_suite!(sqlite());

/// Nested JSON deep enough that reading it back fails.
fn unreadably_deep_json() -> String {
    format!("{}1{}", "[".repeat(300), "]".repeat(300))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_row_is_failed_without_breaking_the_claim_of_its_neighbours() {
    use root_orchestrator::{Priority, RequestStatus};

    let harness = sqlite();
    let store = SqliteStore::open(harness.dir.path().join("requests.db"))
        .await
        .unwrap();
    for id in ["healthy-1", "damaged", "healthy-2"] {
        store
            .insert(conformance::new_request(id, Priority::Medium), 3)
            .await
            .unwrap();
    }
    // Damage one row behind the store's back, as a faulty tool or migration might.
    sqlx::query(
        "UPDATE requests SET configuration = \
         json_set(configuration, '$.custom_params.x', json(?)) WHERE id = 'damaged'",
    )
    .bind(unreadably_deep_json())
    .execute(store.pool())
    .await
    .unwrap();

    let claimed = store
        .claim("worker", 10, std::time::Duration::from_secs(60))
        .await
        .unwrap();
    let ids: Vec<_> = claimed.iter().map(|r| r.id.to_string()).collect();
    assert_eq!(ids, ["healthy-1", "healthy-2"]);

    let status: String = sqlx::query_scalar("SELECT status FROM requests WHERE id = 'damaged'")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(status, RequestStatus::Failed.as_str());
    assert!(
        store
            .claim("worker", 10, std::time::Duration::from_secs(60))
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn processes_opening_a_new_database_at_once_all_succeed() {
    let harness = sqlite();
    let path = harness.dir.path().join("fresh").join("requests.db");
    let opens: Vec<_> = (0..6)
        .map(|_| {
            let path = path.clone();
            tokio::spawn(async move { SqliteStore::open_with(path, 1).await })
        })
        .collect();
    for open in opens {
        let store = open
            .await
            .unwrap()
            .expect("every concurrent open migrates or waits");
        store.ping().await.unwrap();
    }
}
