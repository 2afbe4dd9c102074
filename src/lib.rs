//! Accept, run and track long-running user requests.
//!
//! A host service embeds `root-orchestrator` to store each submitted request, move it
//! through its lifecycle (`PENDING -> PROCESSING -> EXECUTING -> COMPLETED / FAILED`, or
//! `CANCELLED`), run the host's workflow for it with progress reporting, retry what failed
//! with exponential backoff, and keep the results.
//!
//! | piece | role |
//! |---|---|
//! | [`RootOrchestrator`] | the facade: submit, status, results, list, cancel, run workers |
//! | [`WorkflowExecutor`] | the host's workflow for one request type |
//! | [`RequestStore`] | durable records with fenced (lease-checked) writes |
//! | [`ProcessingStrategy`] | how requests reach workers ([`TableStrategy`], `QueueStrategy`) |
//! | [`QueueBackend`] | a message queue with SQS semantics, for queue-based strategies |
//! | [`RequestStatus`] | the lifecycle and its one transition table |
//!
//! # Cargo features
//!
//! | feature | default | gives |
//! |---|---|---|
//! | `table` | yes | [`TableStrategy`]: workers that claim requests from a store |
//! | `sqlite` | yes | [`SqliteStore`]: an embedded SQLite file (WAL), migrations included |
//! | `postgres` | no | `PostgresStore`: one PostgreSQL database shared by many worker processes |
//! | `mock` | no | `mock::*`: mockall mocks of the core traits for host tests |
//! | `queue` | no | `QueueStrategy`: consumers of a message queue; `MemoryQueue` |
//! | `sqs` | no | `SqsQueue`: the queue strategy on Amazon SQS (implies `queue`) |
//! | `http` | no | [`http`]: an axum router with auth, problem+json errors, OpenAPI, metrics |
//!
//! [`MemoryStore`] is always available.
//!
//! # Guarantees
//!
//! - A request is stored before submit returns; invalid input is refused with the field
//!   named and nothing stored; a caller-given id makes submit idempotent. Unknown fields
//!   are refused wherever JSON input enters (`submit_json`, the HTTP body, queue messages,
//!   the model's types read with serde), so a misspelt field never falls back to its
//!   default in silence; only `custom_params` is free-form.
//! - An attempt runs at most `execution_timeout` (or the executor's own
//!   [`WorkflowExecutor::timeout`]) plus `cancel_grace_period`; then it fails as retryable.
//! - Each claim hands out a fresh lease token; every later write of that attempt must
//!   present it, so a cancelled, rescued or re-claimed request never takes a stale write.
//!   Results are stored in the same write as `COMPLETED`, exactly once.
//! - Executors run at least once per attempt: a worker that dies mid-request leaves a lease
//!   that expires, and the rescuer gives the request another attempt (or fails it when its
//!   attempts are spent). Nothing stays `PROCESSING` or `EXECUTING`.

#![warn(missing_docs)]

mod backoff;
mod config;
mod error;
mod executor;
mod model;
mod orchestrator;
mod queue;
mod status;
mod store;
mod strategy;

#[cfg(feature = "http")]
pub mod http;

pub use backoff::BackoffPolicy;
pub use config::{ENV_PREFIX, QueueConfig, TableConfig};
pub use error::{BoxError, Error, Result};
pub use executor::{ExecutorRegistry, WorkflowContext, WorkflowError, WorkflowExecutor};
pub use model::{
    AttemptError, Configuration, ExtractionMode, Lease, MAX_ATTEMPTS_LIMIT,
    MAX_CONFIGURATION_BYTES, MAX_ERROR_MESSAGE_BYTES, MAX_JSON_DEPTH, MAX_RESULTS_BYTES,
    MAX_RUN_AFTER_DAYS, MessageMetadata, NewRequest, Priority, Progress, Request, RequestId,
    RequestMessage, RequestResults, RequestType, Source, StatusChange,
};
pub use orchestrator::{RootOrchestrator, RootOrchestratorBuilder, RunningWorkers};
#[cfg(feature = "queue")]
pub use queue::{DeadLetter, MemoryQueue};
pub use queue::{OutgoingMessage, QueueBackend, QueueDepth, ReceivedMessage};
#[cfg(feature = "sqs")]
pub use queue::{SqsQueue, SqsQueueBuilder};
pub use status::RequestStatus;
#[cfg(feature = "sqlite")]
pub use store::SqliteStore;
pub use store::{
    CancelOutcome, FencedWrite, InsertOutcome, LeaseRef, ListCursor, ListFilter, MemoryStore,
    RequestPage, RequestStore, RescuedRequest, StoreEvent, StoreEvents, Visibility, WriteOutcome,
};
#[cfg(feature = "postgres")]
pub use store::{PostgresStore, PostgresStoreOptions};
pub use strategy::ProcessingStrategy;
#[cfg(feature = "table")]
pub use strategy::TableStrategy;
#[cfg(feature = "queue")]
pub use strategy::{QueueStrategy, ReconcileReport};
/// The token that tells workers to shut down; re-exported from `tokio-util`.
pub use tokio_util::sync::CancellationToken;

/// mockall mocks of the core traits, for testing host code without a database or queue.
///
/// # Examples
///
/// ```
/// use root_orchestrator::mock::MockRequestStore;
/// use root_orchestrator::RequestStore;
///
/// # tokio::runtime::Builder::new_current_thread().build()?.block_on(async {
/// let mut store = MockRequestStore::new();
/// store.expect_ping().returning(|| Ok(()));
/// store.ping().await?;
/// # Ok::<(), root_orchestrator::Error>(())
/// # })?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[cfg(feature = "mock")]
pub mod mock {
    pub use crate::executor::MockWorkflowExecutor;
    pub use crate::queue::MockQueueBackend;
    pub use crate::store::MockRequestStore;
    pub use crate::strategy::MockProcessingStrategy;
}

/// The README's examples, compiled and run as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
