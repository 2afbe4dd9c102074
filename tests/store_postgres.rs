//! The store conformance suite against `PostgresStore`, each test in its own schema so
//! that tests run in parallel on one database.
//!
//! Needs a PostgreSQL server: `DATABASE_URL`, or `postgres://postgres@127.0.0.1:5432/test`.
//! An unreachable server fails the tests; it never skips them.

mod conformance;
mod pg;

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use root_orchestrator::{PostgresStore, RequestStore};

struct PostgresHarness {
    schema: String,
    opened: Mutex<Vec<PostgresStore>>,
}

#[async_trait]
impl conformance::Harness for PostgresHarness {
    async fn open(&self) -> Arc<dyn RequestStore> {
        let store = pg::connect(&self.schema, 6).await;
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

    async fn finish(&self) {
        self.close_all().await;
        pg::drop_schema(&self.schema).await;
    }

    fn property_cases(&self) -> u32 {
        24
    }

    fn concurrent_cases(&self) -> u32 {
        12
    }
}

fn postgres() -> PostgresHarness {
    PostgresHarness {
        schema: pg::fresh_schema("ro_conf"),
        opened: Mutex::new(Vec::new()),
    }
}

store_suite!(postgres());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_row_is_failed_without_breaking_the_claim_of_its_neighbours() {
    use root_orchestrator::{Priority, RequestStatus};

    let schema = pg::fresh_schema("ro_conf");
    let store = pg::connect(&schema, 3).await;
    for id in ["healthy-1", "damaged", "healthy-2"] {
        store
            .insert(conformance::new_request(id, Priority::Medium), 3)
            .await
            .unwrap();
    }
    // Valid JSONB, but nested deeper than a reader accepts: as a faulty tool might write.
    let deep = format!("{}1{}", "[".repeat(300), "]".repeat(300));
    sqlx::query(
        "UPDATE requests SET configuration = jsonb_set(configuration, '{custom_params,x}', \
         $1::jsonb) WHERE id = 'damaged'",
    )
    .bind(deep)
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

    store.close().await;
    pg::drop_schema(&schema).await;
}

#[tokio::test]
async fn schema_names_postgres_would_change_or_cannot_notify_on_are_refused() {
    for schema in ["Upper_Case", "pg_reserved", &"s".repeat(46)] {
        let mut options = root_orchestrator::PostgresStoreOptions::default();
        options.schema = Some(schema.to_owned());
        match root_orchestrator::PostgresStore::connect_with(&pg::database_url(), options).await {
            Err(root_orchestrator::Error::InvalidConfig { name, .. }) => assert_eq!(name, "schema"),
            other => panic!("{schema}: expected InvalidConfig, got {other:?}"),
        }
    }
}

/// Two batches that share their ids, stored at once in opposite orders, can deadlock in
/// PostgreSQL; the store runs the aborted one again, so both succeed and each id is stored
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_batches_stored_at_once_both_succeed() {
    use root_orchestrator::{Configuration, InsertOutcome, NewRequest, RequestId, RequestType};

    let schema = pg::fresh_schema("ro_overlap");
    let store = pg::connect(&schema, 4).await;
    let request = |id: &str| {
        NewRequest::new(
            "glp1-market-watch",
            "analyst-001",
            RequestType::new("semaglutide_intelligence").unwrap(),
            Configuration::new(["semaglutide"]),
        )
        .with_id(RequestId::parse(id).unwrap())
    };

    for round in 0..8 {
        let ids: Vec<String> = (0..300)
            .map(|i| format!("overlap-{round}-{i:03}"))
            .collect();
        let forward: Vec<NewRequest> = ids.iter().map(|id| request(id)).collect();
        let backward: Vec<NewRequest> = ids.iter().rev().map(|id| request(id)).collect();

        let (a, b) = tokio::join!(
            store.insert_many(forward, 4),
            store.insert_many(backward, 4)
        );
        let (a, b) = (a.unwrap(), b.unwrap());

        let inserted = a
            .iter()
            .chain(&b)
            .filter(|o| matches!(o, InsertOutcome::Inserted(_)))
            .count();
        assert_eq!(inserted, ids.len(), "round {round}: each id stored once");
        assert_eq!(a.len() + b.len(), 2 * ids.len());
    }
    pg::drop_schema(&schema).await;
}
