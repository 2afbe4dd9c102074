//! Group commit for the writes every attempt makes: marking a request `EXECUTING` and
//! completing it. Workers hand their writes to one task, which applies whatever has queued
//! up in one [`RequestStore::write_batch`]; under load, many requests share a commit, and
//! on an idle system a write goes out at once, alone.

#![cfg_attr(not(any(feature = "table", feature = "queue")), allow(dead_code))]

use std::sync::{Arc, Mutex, Once};

use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};
use crate::model::RequestResults;
use crate::store::{FencedWrite, LeaseRef, RequestStore, WriteOutcome};

/// The most writes one commit carries: enough to amortise a commit, small enough that a
/// transaction stays short.
const MAX_BATCH: usize = 256;

struct Queued {
    write: FencedWrite,
    reply: oneshot::Sender<Result<WriteOutcome>>,
}

/// A handle for submitting fenced writes to the group-commit task; cheap to clone.
///
/// The task starts with the first write (inside the runtime that makes it) and ends when
/// the last handle is dropped. Should it be gone (its runtime shut down), writes go to the
/// store directly: batching is an optimisation, never a condition for a write to happen.
#[derive(Clone)]
pub(crate) struct BatchWriter {
    store: Arc<dyn RequestStore>,
    queue: mpsc::UnboundedSender<Queued>,
    /// Taken by the first write, which starts the task with it.
    incoming: Arc<Mutex<Option<mpsc::UnboundedReceiver<Queued>>>>,
    start: Arc<Once>,
}

impl BatchWriter {
    /// A writer to `store`.
    pub(crate) fn new(store: Arc<dyn RequestStore>) -> Self {
        let (queue, incoming) = mpsc::unbounded_channel();
        BatchWriter {
            store,
            queue,
            incoming: Arc::new(Mutex::new(Some(incoming))),
            start: Arc::new(Once::new()),
        }
    }

    /// As [`RequestStore::mark_executing`].
    pub(crate) async fn mark_executing(&self, lease: &LeaseRef) -> Result<WriteOutcome> {
        self.write(FencedWrite::MarkExecuting(lease.clone())).await
    }

    /// As [`RequestStore::complete`].
    pub(crate) async fn complete(
        &self,
        lease: &LeaseRef,
        results: &RequestResults,
    ) -> Result<WriteOutcome> {
        self.write(FencedWrite::Complete(lease.clone(), results.clone()))
            .await
    }

    async fn write(&self, write: FencedWrite) -> Result<WriteOutcome> {
        self.start.call_once(|| {
            let incoming = self
                .incoming
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            if let Some(incoming) = incoming {
                tokio::spawn(write_batches(self.store.clone(), incoming));
            }
        });

        let (reply, outcome) = oneshot::channel();
        if let Err(unsent) = self.queue.send(Queued { write, reply }) {
            // The task is gone (its runtime shut down): the write goes to the store itself.
            return single(&*self.store, &unsent.0.write).await;
        }
        // A task dropped before it answered may or may not have applied the write, so that
        // is reported as a store fault, which a final write retries and a fenced write
        // makes safe to retry.
        outcome.await.unwrap_or_else(|_| {
            Err(Error::store(
                "write_batch",
                "the batch writer stopped before answering",
            ))
        })
    }
}

/// One write on its own.
async fn single(store: &dyn RequestStore, write: &FencedWrite) -> Result<WriteOutcome> {
    store
        .write_batch(std::slice::from_ref(write))
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| Error::store("write_batch", "the store returned no outcome"))
}

async fn write_batches(
    store: Arc<dyn RequestStore>,
    mut incoming: mpsc::UnboundedReceiver<Queued>,
) {
    // One batch at a time: while it commits, the next one gathers. Measured on SQLite and
    // PostgreSQL, a few batches in flight at once only made each batch smaller.
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while incoming.recv_many(&mut batch, MAX_BATCH).await > 0 {
        apply(&*store, std::mem::take(&mut batch)).await;
    }
}

/// Applies one batch and answers each of its writers.
async fn apply(store: &dyn RequestStore, batch: Vec<Queued>) {
    let (writes, replies): (Vec<FencedWrite>, Vec<_>) =
        batch.into_iter().map(|q| (q.write, q.reply)).unzip();
    match store.write_batch(&writes).await {
        Ok(outcomes) => {
            let mut outcomes = outcomes.into_iter();
            for reply in replies {
                let _ = reply.send(outcomes.next().ok_or_else(|| {
                    Error::store("write_batch", "the store returned too few outcomes")
                }));
            }
        }
        Err(err) if writes.len() == 1 => {
            if let Some(reply) = replies.into_iter().next() {
                let _ = reply.send(Err(err));
            }
        }
        // A batch that failed as a whole (one write the database refuses, a lost
        // connection) is tried again write by write, so that one bad write cannot hold
        // back the others and each caller gets its own answer.
        Err(err) => {
            tracing::debug!(error = %err, writes = writes.len(), "batch failed; writing one by one");
            for (write, reply) in writes.iter().zip(replies) {
                let _ = reply.send(single(store, write).await);
            }
        }
    }
}
