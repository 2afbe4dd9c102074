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
}

fn postgres() -> PostgresHarness {
    PostgresHarness {
        schema: pg::fresh_schema("ro_conf"),
        opened: Mutex::new(Vec::new()),
    }
}

store_suite!(postgres());
