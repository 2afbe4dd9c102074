//! Group commit for the writes every attempt makes: marking a request `EXECUTING` and
//! completing it. Workers hand their writes to one task, which applies whatever has queued
//! up in one [`RequestStore::write_batch`]; under load, many requests share a commit, and
//! on an idle system a write goes out at once, alone.

#![cfg_attr(not(any(feature = "table", feature = "queue")), allow(dead_code))]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

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
    incoming: Arc<Mutex<Option<mpsc::UnboundedReceiver<Queued>>>>,
    /// Set once the task is started, so later writes skip the lock.
    started: Arc<AtomicBool>,
}

impl BatchWriter {
    /// A writer to `store`.
    pub(crate) fn new(store: Arc<dyn RequestStore>) -> Self {
        let (queue, incoming) = mpsc::unbounded_channel();
        BatchWriter {
            store,
            queue,
            incoming: Arc::new(Mutex::new(Some(incoming))),
            started: Arc::new(AtomicBool::new(false)),
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
        if !self.started.load(Ordering::Acquire) {
            let incoming = self
                .incoming
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            if let Some(incoming) = incoming {
                tokio::spawn(write_batches(self.store.clone(), incoming));
            }
            self.started.store(true, Ordering::Release);
        }

        let (reply, outcome) = oneshot::channel();
        let write = match self.queue.send(Queued { write, reply }) {
            Ok(()) => match outcome.await {
                Ok(outcome) => return outcome,
                // The task was dropped (its runtime shut down) before it answered; the
                // write may or may not have landed, so it is reported as a store fault,
                // which a final write retries and a fenced write makes safe to retry.
                Err(_) => None,
            },
            Err(unsent) => Some(unsent.0.write),
        };
        match write {
            Some(write) => single(&*self.store, &write).await,
            None => Err(Error::store(
                "write_batch",
                "the batch writer stopped before answering",
            )),
        }
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
async fn apply(store: &dyn RequestStore, mut batch: Vec<Queued>) {
    let writes: Vec<FencedWrite> = batch.iter().map(|q| q.write.clone()).collect();
    match store.write_batch(&writes).await {
        Ok(outcomes) => {
            let mut outcomes = outcomes.into_iter();
            for queued in batch.drain(..) {
                let _ = queued.reply.send(outcomes.next().ok_or_else(|| {
                    Error::store("write_batch", "the store returned too few outcomes")
                }));
            }
        }
        Err(err) if batch.len() == 1 => {
            let _ = batch.pop().expect("one write").reply.send(Err(err));
        }
        // A batch that failed as a whole (one write the database refuses, a lost
        // connection) is tried again write by write, so that one bad write cannot hold
        // back the others and each caller gets its own answer.
        Err(err) => {
            tracing::debug!(error = %err, writes = batch.len(), "batch failed; writing one by one");
            for queued in batch.drain(..) {
                let outcome = single(store, &queued.write).await;
                let _ = queued.reply.send(outcome);
            }
        }
    }
}
