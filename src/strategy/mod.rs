//! Processing strategies: how submitted requests reach workers.

use std::sync::Arc;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::executor::ExecutorRegistry;
use crate::model::{NewRequest, Request, RequestId};
use crate::store::{CancelOutcome, InsertOutcome, RequestStore};

mod execution;
#[cfg(feature = "queue")]
mod queue;
#[cfg(feature = "table")]
mod table;
mod writer;

#[cfg(feature = "queue")]
pub use queue::{QueueStrategy, ReconcileReport};
#[cfg(feature = "table")]
pub use table::TableStrategy;

/// One way of getting submitted requests to workers and running them.
///
/// A strategy owns a [`RequestStore`]; [`RootOrchestrator`](crate::RootOrchestrator)
/// validates input before calling it, so a strategy may assume valid requests.
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait ProcessingStrategy: Send + Sync + 'static {
    /// A short name for logs and metrics, such as `"table"`.
    fn name(&self) -> &'static str;

    /// The store holding this strategy's requests.
    fn store(&self) -> Arc<dyn RequestStore>;

    /// Stores a validated request as `PENDING` and makes sure a worker will see it.
    async fn submit(&self, request: NewRequest) -> Result<InsertOutcome>;

    /// Stores several validated requests, as [`submit`](Self::submit) would one by one;
    /// outcomes come back in the order given. The default submits them one at a time.
    async fn submit_many(&self, requests: Vec<NewRequest>) -> Result<Vec<InsertOutcome>> {
        let mut outcomes = Vec::with_capacity(requests.len());
        for request in requests {
            outcomes.push(self.submit(request).await?);
        }
        Ok(outcomes)
    }

    /// The request with this id.
    async fn status(&self, id: &RequestId) -> Result<Option<Request>>;

    /// Cancels a pending or running request; a running one's executor is told to stop and
    /// whatever it returns is discarded.
    async fn cancel(&self, id: &RequestId) -> Result<CancelOutcome>;

    /// Succeeds when everything the strategy depends on answers: its store, and its queue
    /// where it has one. The default checks the store.
    async fn ready(&self) -> Result<()> {
        self.store().ping().await
    }

    /// Runs the workers until `shutdown` is cancelled, then shuts down gracefully: no new
    /// work is taken, running requests get a grace period, the rest are handed back.
    async fn run(
        &self,
        executors: Arc<ExecutorRegistry>,
        shutdown: CancellationToken,
    ) -> Result<()>;
}

/// A worker identity unique to this process and strategy instance: restarts of the same
/// host never reuse one, so a restarted worker cannot mistake an old lease for its own.
#[cfg_attr(not(any(feature = "table", feature = "queue")), allow(dead_code))]
pub(crate) fn worker_id(strategy: &str) -> String {
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    format!("{strategy}-{}-{}", std::process::id(), &nonce[..12])
}
