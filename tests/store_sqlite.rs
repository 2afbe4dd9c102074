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
}

fn sqlite() -> SqliteHarness {
    SqliteHarness {
        dir: tempfile::tempdir().expect("a temporary directory"),
        opened: Mutex::new(Vec::new()),
    }
}

store_suite!(sqlite());
