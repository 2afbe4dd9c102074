//! The store conformance suite against `MemoryStore`.

mod conformance;

use std::sync::Arc;

use async_trait::async_trait;
use root_orchestrator::{MemoryStore, RequestStore};

/// One shared map; "reopening" hands out another handle on it.
struct MemoryHarness {
    store: MemoryStore,
}

#[async_trait]
impl conformance::Harness for MemoryHarness {
    async fn open(&self) -> Arc<dyn RequestStore> {
        Arc::new(self.store.clone())
    }

    async fn close_all(&self) {}

    fn durable(&self) -> bool {
        false
    }

    fn property_cases(&self) -> u32 {
        256
    }

    fn concurrent_cases(&self) -> u32 {
        128
    }
}

fn memory() -> MemoryHarness {
    MemoryHarness {
        store: MemoryStore::new(),
    }
}

store_suite!(memory());
