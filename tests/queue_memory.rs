//! The queue conformance suite against `MemoryQueue`: its SQS semantics, and the queue
//! strategy's consumers running on it.

mod queue_conformance;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use queue_conformance::{Letter, QueueHarness};
use root_orchestrator::{MemoryQueue, QueueBackend};

/// Hands out fresh in-memory queues and keeps a handle on each to read its dead letters.
#[derive(Default)]
struct MemoryHarness {
    opened: Mutex<Vec<(Arc<dyn QueueBackend>, MemoryQueue)>>,
}

impl MemoryHarness {
    fn keep(&self, queue: MemoryQueue) -> Arc<dyn QueueBackend> {
        let shared: Arc<dyn QueueBackend> = Arc::new(queue.clone());
        self.opened.lock().unwrap().push((shared.clone(), queue));
        shared
    }
}

#[async_trait]
impl QueueHarness for MemoryHarness {
    async fn open(&self) -> Arc<dyn QueueBackend> {
        self.keep(MemoryQueue::new())
    }

    async fn open_with_receive_limit(&self, max_receive_count: u32) -> Arc<dyn QueueBackend> {
        self.keep(MemoryQueue::new().with_max_receive_count(max_receive_count))
    }

    async fn dead_letters(&self, queue: &Arc<dyn QueueBackend>) -> Vec<Letter> {
        let opened = self.opened.lock().unwrap();
        let (_, memory) = opened
            .iter()
            .find(|(shared, _)| Arc::ptr_eq(shared, queue))
            .expect("a queue opened by this harness");
        memory
            .dead_letters()
            .into_iter()
            .map(|letter| Letter {
                body: letter.body,
                reason: Some(letter.reason),
                receive_count: Some(letter.receive_count),
            })
            .collect()
    }

    fn tick(&self) -> Duration {
        Duration::from_millis(200)
    }
}

queue_suite!(MemoryHarness::default());

mod consumers {
    use super::*;

    consumer_suite!(MemoryHarness::default());
}
