//! The table strategy: workers claim pending requests from a [`RequestStore`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::ProcessingStrategy;
use super::execution::{AttemptEnd, AttemptSettings, drain_attempts, run_attempt};
use super::writer::BatchWriter;
use crate::config::TableConfig;
use crate::error::Result;
use crate::executor::ExecutorRegistry;
use crate::model::{NewRequest, Request, RequestId};
use crate::status::RequestStatus;
use crate::store::{CancelOutcome, InsertOutcome, RequestStore, StoreEvent, now};

const STRATEGY: &str = "table";

/// Finished attempts per worker slot whose outcomes may wait to be written before the
/// claims pause. A write takes a commit or two, and a commit on a disk-flushing database
/// can take as long as several quick requests.
const UNWRITTEN_PER_SLOT: usize = 4;

/// Claims that may be under way at once.
const CLAIMS_IN_FLIGHT: usize = 2;

/// The longest pause between claims while the store keeps failing.
const CLAIM_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(10);

/// Requests live in a database table; this process's workers claim them.
///
/// - Up to [`TableConfig::max_concurrent_requests`] requests run at once, claimed by
///   priority, then age, then insertion order, once their `run_after` has passed.
/// - A submit through this strategy wakes idle workers at once; otherwise they look for
///   work every [`TableConfig::polling_interval`] (and whenever a slot frees up).
/// - A running request's lease is extended every [`TableConfig::status_update_interval`].
///   A rescuer returns requests whose lease lapsed (a crashed or stalled worker, in any
///   process) to `PENDING`, or to `FAILED` when their attempts are spent.
/// - Finished requests older than [`TableConfig::cleanup_completed_after`] are pruned.
///
/// Any number of processes may run workers on one database; each has its own worker id.
///
/// # Examples
///
/// ```
/// use root_orchestrator::{MemoryStore, TableConfig, TableStrategy};
///
/// let strategy = TableStrategy::new(MemoryStore::new(), TableConfig::default())?;
/// assert!(strategy.worker_id().starts_with("table-"));
/// # Ok::<(), root_orchestrator::Error>(())
/// ```
#[derive(Clone)]
pub struct TableStrategy {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn RequestStore>,
    /// Group commit for the attempts' writes.
    writer: BatchWriter,
    config: TableConfig,
    worker_id: String,
    /// Woken by local submits, finished attempts, rescues and due retries.
    wake: Notify,
    /// Cancellation handles of the requests this process is running; each attempt has its
    /// own handle, so a finished attempt removes only its own.
    running: Mutex<HashMap<RequestId, Arc<CancellationToken>>>,
    /// Whether `run` is under way: a second claim loop would break the concurrency limit.
    active: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for TableStrategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TableStrategy")
            .field("worker_id", &self.inner.worker_id)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl TableStrategy {
    /// A strategy over `store` with `config`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) naming the bad setting.
    pub fn new(store: impl RequestStore, config: TableConfig) -> Result<Self> {
        Self::with_shared_store(Arc::new(store), config)
    }

    /// Like [`new`](Self::new), for a store shared with other parts of the host.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) naming the bad setting.
    pub fn with_shared_store(store: Arc<dyn RequestStore>, config: TableConfig) -> Result<Self> {
        config.validate()?;
        Ok(TableStrategy {
            inner: Arc::new(Inner {
                writer: BatchWriter::new(store.clone()),
                store,
                config,
                worker_id: super::worker_id(STRATEGY),
                wake: Notify::new(),
                running: Mutex::new(HashMap::new()),
                active: std::sync::atomic::AtomicBool::new(false),
            }),
        })
    }

    /// This process's worker id, the owner recorded on its leases.
    pub fn worker_id(&self) -> &str {
        &self.inner.worker_id
    }

    /// The settings in force.
    pub fn config(&self) -> &TableConfig {
        &self.inner.config
    }

    fn attempt_settings(&self) -> AttemptSettings {
        let config = &self.inner.config;
        AttemptSettings {
            strategy: STRATEGY,
            heartbeat_interval: config.status_update_interval,
            lease_duration: config.lease_duration,
            cancel_grace_period: config.cancel_grace_period,
            execution_timeout: config.execution_timeout,
            backoff: config.backoff,
        }
    }
}

impl Inner {
    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<RequestId, Arc<CancellationToken>>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Returns lapsed leases to the queue. `failures` counts the rescues that failed in a
    /// row: an outage is warned about once and its end once, not at every poll.
    async fn rescue(&self, failures: &mut u32) {
        match self.store.rescue_expired().await {
            Ok(rescued) => {
                if *failures > 0 {
                    tracing::info!(failures = *failures, "rescue works again");
                    *failures = 0;
                }
                for r in &rescued {
                    metrics::counter!(
                        "root_orchestrator_requests_rescued_total",
                        "strategy" => STRATEGY
                    )
                    .increment(1);
                    tracing::warn!(
                        request_id = %r.request_id,
                        previous_owner = %r.previous_owner,
                        attempts = r.attempts,
                        status = %r.status,
                        "rescued a request whose lease expired"
                    );
                }
                if rescued.iter().any(|r| r.status == RequestStatus::Pending) {
                    self.wake.notify_one();
                }
            }
            Err(err) => {
                *failures += 1;
                if *failures == 1 {
                    tracing::warn!(error = %err, "rescue failed; will try again every poll");
                } else {
                    tracing::debug!(error = %err, failures = *failures, "rescue failed again");
                }
            }
        }
    }

    /// Publishes the table's depth for dashboards: requests per status.
    async fn publish_depth(&self) {
        if let Ok(counts) = self.store.count_by_status().await {
            for status in RequestStatus::ALL {
                let n = counts.get(&status).copied().unwrap_or(0);
                metrics::gauge!(
                    "root_orchestrator_requests",
                    "strategy" => STRATEGY,
                    "status" => status.as_str(),
                )
                .set(n as f64);
            }
        }
    }

    async fn prune(&self) {
        let cutoff = now()
            - chrono::Duration::from_std(self.config.cleanup_completed_after)
                .unwrap_or(chrono::Duration::MAX);
        match self.store.prune_finished(cutoff).await {
            Ok(0) => {}
            Ok(pruned) => tracing::info!(pruned, "pruned finished requests"),
            Err(err) => tracing::warn!(error = %err, "pruning failed; will try again"),
        }
    }

    /// Turns the store's push notifications into wake-ups and cancels, until `stop`.
    async fn follow_events(
        self: Arc<Self>,
        mut events: crate::store::StoreEvents,
        stop: CancellationToken,
    ) {
        use futures::StreamExt;

        loop {
            let event = tokio::select! {
                _ = stop.cancelled() => return,
                event = events.next() => event,
            };
            match event {
                Some(StoreEvent::Cancelled(id)) => {
                    if let Some(token) = self.running().get(&id) {
                        tracing::info!(
                            request_id = %id,
                            "cancelled elsewhere; stopping its executor",
                        );
                        token.cancel();
                    }
                }
                // After a reconnect, notifications may have been missed: look for work.
                Some(_) => self.wake.notify_one(),
                None => return,
            }
        }
    }

    /// The rescuer and the pruner, until `stop`.
    async fn maintain(self: Arc<Self>, stop: CancellationToken) {
        let mut rescue_tick = tokio::time::interval(self.config.polling_interval);
        // Pruning waits one interval: a host that has just started has better things to do,
        // and counts it reads right after start stay put.
        let mut prune_tick = tokio::time::interval_at(
            tokio::time::Instant::now() + self.config.prune_interval,
            self.config.prune_interval,
        );
        rescue_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        prune_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rescue_failures = 0;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = rescue_tick.tick() => {
                    self.rescue(&mut rescue_failures).await;
                    self.publish_depth().await;
                }
                _ = prune_tick.tick() => self.prune().await,
            }
        }
    }
}

#[async_trait]
impl ProcessingStrategy for TableStrategy {
    fn name(&self) -> &'static str {
        STRATEGY
    }

    fn store(&self) -> Arc<dyn RequestStore> {
        self.inner.store.clone()
    }

    async fn submit(&self, request: NewRequest) -> Result<InsertOutcome> {
        let outcome = self
            .inner
            .store
            .insert(request, self.inner.config.default_max_attempts())
            .await?;
        if let InsertOutcome::Inserted(request) = &outcome {
            metrics::counter!(
                "root_orchestrator_requests_submitted_total",
                "strategy" => STRATEGY,
                "request_type" => request.request_type.to_string(),
            )
            .increment(1);
            self.inner.wake.notify_one();
        }
        Ok(outcome)
    }

    async fn submit_many(&self, requests: Vec<NewRequest>) -> Result<Vec<InsertOutcome>> {
        let outcomes = self
            .inner
            .store
            .insert_many(requests, self.inner.config.default_max_attempts())
            .await?;
        let mut inserted = 0;
        for outcome in &outcomes {
            if let InsertOutcome::Inserted(request) = outcome {
                metrics::counter!(
                    "root_orchestrator_requests_submitted_total",
                    "strategy" => STRATEGY,
                    "request_type" => request.request_type.to_string(),
                )
                .increment(1);
                inserted += 1;
            }
        }
        if inserted > 0 {
            self.inner.wake.notify_one();
        }
        Ok(outcomes)
    }

    async fn status(&self, id: &RequestId) -> Result<Option<Request>> {
        self.inner.store.get(id).await
    }

    async fn cancel(&self, id: &RequestId) -> Result<CancelOutcome> {
        let outcome = self.inner.store.cancel(id, "cancelled by caller").await?;
        if let CancelOutcome::Cancelled { previous } = outcome {
            tracing::info!(request_id = %id, previous = %previous, "request cancelled");
            // A request running in another process learns of the cancel from its next
            // heartbeat, which the voided lease refuses.
            if let Some(token) = self.inner.running().get(id) {
                token.cancel();
            }
        }
        Ok(outcome)
    }

    async fn run(
        &self,
        executors: Arc<ExecutorRegistry>,
        shutdown: CancellationToken,
    ) -> Result<()> {
        let inner = self.inner.clone();
        if inner.active.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Err(crate::Error::AlreadyRunning { strategy: STRATEGY });
        }
        let result = self.run_workers(executors, shutdown).await;
        inner
            .active
            .store(false, std::sync::atomic::Ordering::SeqCst);
        result
    }
}

impl TableStrategy {
    /// The claim loop, the rescuer and the pruner, until `shutdown`; then the drain.
    async fn run_workers(
        &self,
        executors: Arc<ExecutorRegistry>,
        shutdown: CancellationToken,
    ) -> Result<()> {
        let inner = self.inner.clone();
        let config = inner.config.clone();
        let span = tracing::info_span!("table_workers", worker = %inner.worker_id);

        let slots = Arc::new(Semaphore::new(config.max_concurrent_requests));
        let hand_back = CancellationToken::new();
        let maintenance_stop = CancellationToken::new();
        let maintenance = tokio::spawn(
            inner
                .clone()
                .maintain(maintenance_stop.clone())
                .instrument(span.clone()),
        );
        let events = inner.store.subscribe().map(|events| {
            tokio::spawn(
                inner
                    .clone()
                    .follow_events(events, maintenance_stop.clone())
                    .instrument(span.clone()),
            )
        });
        let mut attempts = JoinSet::new();
        tracing::info!(
            parent: &span,
            max_concurrent_requests = config.max_concurrent_requests,
            polling_interval_secs = config.polling_interval.as_secs_f64(),
            "workers started"
        );

        let mut claim_failures = 0u32;
        // Claims under way, each holding the slots it may fill. A second claim may start
        // while the first waits for its commit, so slots that free up meanwhile do not
        // wait a whole round trip for it.
        let mut claims = FuturesUnordered::new();
        let mut reserved = 0usize;
        // Whether a claim may find work: not after one came back short, until a wake-up
        // or the poll says otherwise; an idle worker must not claim in a loop. A short
        // claim only counts if it began after the last wake-up: one that began before may
        // have looked before the new work was there.
        let mut may_find_work = true;
        let mut wake_ups = 0u64;
        while !shutdown.is_cancelled() {
            while attempts.try_join_next().is_some() {}

            // A slot frees up when its executor returns, before the outcome is written; the
            // claims pause while too many outcomes wait to be written, so a store slower to
            // write than the executors are to finish cannot pile up leases.
            let running = config
                .max_concurrent_requests
                .saturating_sub(slots.available_permits() + reserved);
            let unwritten = attempts.len().saturating_sub(running);
            let free = slots.available_permits().min(
                (config.max_concurrent_requests * UNWRITTEN_PER_SLOT).saturating_sub(unwritten),
            );
            if free > 0 && claims.len() < CLAIMS_IN_FLIGHT && may_find_work {
                let permits = slots
                    .clone()
                    .try_acquire_many_owned(free as u32)
                    .expect("only this loop takes permits, and `free` are available");
                reserved += free;
                let store = inner.store.clone();
                let owner = inner.worker_id.clone();
                let lease = config.lease_duration;
                let began_after = wake_ups;
                claims.push(async move {
                    let claimed = store.claim(&owner, free, lease).await;
                    (claimed, permits, began_after)
                });
            }

            // While the store fails, wait longer each time (up to 10 s, or the polling
            // interval if that is longer), so an outage is not met with a claim and a
            // warning every interval; wake-ups still cut the wait short.
            let pause = if claim_failures == 0 {
                config.polling_interval
            } else {
                config
                    .polling_interval
                    .saturating_mul(1 << claim_failures.min(10))
                    .min(CLAIM_BACKOFF_MAX.max(config.polling_interval))
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(done) = claims.next(), if !claims.is_empty() => {
                    let (claimed, mut permits, began_after) = done;
                    let asked = permits.num_permits();
                    reserved -= asked;
                    match claimed {
                        Ok(claimed) => {
                            claim_failures = 0;
                            if claimed.len() < asked && began_after == wake_ups {
                                may_find_work = false;
                            }
                            for request in claimed {
                                let Some(permit) = permits.split(1) else { break };
                                self.start_attempt(
                                    &mut attempts,
                                    &executors,
                                    &hand_back,
                                    &span,
                                    request,
                                    permit,
                                );
                            }
                        }
                        Err(err) => {
                            claim_failures += 1;
                            may_find_work = false;
                            tracing::warn!(
                                parent: &span,
                                error = %err,
                                failures = claim_failures,
                                "claim failed; will try again",
                            );
                        }
                    }
                }
                _ = inner.wake.notified() => {
                    may_find_work = true;
                    wake_ups += 1;
                }
                _ = tokio::time::sleep(pause) => {
                    may_find_work = true;
                    wake_ups += 1;
                }
            }
        }

        // Claims still under way finish, and what they took is handed back unrun: the
        // shutdown began before these requests could start. All of them finish first: a
        // claim left unpolled would keep its connection, which a hand-back may need.
        let mut taken = Vec::new();
        while let Some((claimed, _permits, _)) = claims.next().await {
            taken.extend(claimed.unwrap_or_default());
        }
        for request in taken {
            let Some(lease) = crate::store::LeaseRef::of(&request) else {
                continue;
            };
            if let Err(err) = inner.store.release(&lease, "handed back at shutdown").await {
                tracing::warn!(
                    parent: &span,
                    request_id = %request.id,
                    error = %err,
                    "could not hand back a request claimed as shutdown began",
                );
            }
        }

        drain_attempts(
            &mut attempts,
            config.shutdown_grace_period,
            &hand_back,
            &span,
        )
        .await;

        maintenance_stop.cancel();
        let _ = maintenance.await;
        if let Some(events) = events {
            let _ = events.await;
        }
        tracing::info!(parent: &span, "workers stopped");
        Ok(())
    }
}

impl TableStrategy {
    /// Runs a claimed request in `permit`'s slot.
    fn start_attempt(
        &self,
        attempts: &mut JoinSet<()>,
        executors: &Arc<ExecutorRegistry>,
        hand_back: &CancellationToken,
        span: &tracing::Span,
        request: Request,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        let inner = self.inner.clone();
        let cancel = CancellationToken::new();
        let handle = Arc::new(cancel.clone());
        inner.running().insert(request.id.clone(), handle.clone());
        let executors = executors.clone();
        let hand_back = hand_back.clone();
        let settings = self.attempt_settings();
        attempts.spawn(
            async move {
                let id = request.id.clone();
                let slot = SlotGuard {
                    permit: Some(permit),
                    inner: inner.clone(),
                };
                let end = run_attempt(
                    inner.store.clone(),
                    inner.writer.clone(),
                    executors,
                    request,
                    settings,
                    cancel,
                    hand_back,
                    Some(Box::new(slot)),
                )
                .await;
                // The request may be running again already, as a retry this process
                // claimed while this attempt's outcome was being written: keep that one's
                // handle.
                {
                    let mut running = inner.running();
                    if running.get(&id).is_some_and(|h| Arc::ptr_eq(h, &handle)) {
                        running.remove(&id);
                    }
                }
                inner.wake.notify_one();
                if let AttemptEnd::RetryScheduled(at) = end {
                    wake_at(inner, at);
                }
            }
            .instrument(span.clone()),
        );
    }
}

/// A worker slot: its release wakes the claim loop to fill it.
struct SlotGuard {
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    inner: Arc<Inner>,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        // Free the slot before waking the loop, or it could look and find none free.
        drop(self.permit.take());
        self.inner.wake.notify_one();
    }
}

/// Wakes the claim loop when a scheduled retry becomes due, so it does not wait for the
/// next poll.
fn wake_at(inner: Arc<Inner>, at: chrono::DateTime<chrono::Utc>) {
    let delay = (at - now()).to_std().unwrap_or_default();
    // The retry is durable in the store; this timer only shortens the wait for it.
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        inner.wake.notify_one();
    });
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::store::MockRequestStore;

    /// Runs workers polling every 100 ms over a store whose every claim answers `claim`
    /// and whose first `failed_rescues` rescues fail, for `running`; returns how many
    /// claims they made.
    async fn claims_made(
        claim: fn() -> Result<Vec<Request>>,
        failed_rescues: u32,
        running: Duration,
    ) -> u32 {
        let claims = Arc::new(AtomicU32::new(0));
        let mut store = MockRequestStore::new();
        store.expect_claim().returning({
            let claims = claims.clone();
            move |_, _, _| {
                claims.fetch_add(1, Ordering::SeqCst);
                claim()
            }
        });
        let rescues = AtomicU32::new(0);
        store.expect_rescue_expired().returning(move || {
            match rescues.fetch_add(1, Ordering::SeqCst) < failed_rescues {
                true => Err(crate::Error::store("rescue", "connection refused")),
                false => Ok(Vec::new()),
            }
        });
        store
            .expect_count_by_status()
            .returning(|| Ok(Default::default()));
        store.expect_subscribe().returning(|| None);

        let config = TableConfig {
            polling_interval: Duration::from_millis(100),
            max_concurrent_requests: 4,
            ..TableConfig::default()
        };
        let strategy = TableStrategy::new(store, config).unwrap();
        let shutdown = CancellationToken::new();
        let run = tokio::spawn({
            let strategy = strategy.clone();
            let shutdown = shutdown.clone();
            async move {
                strategy
                    .run(Arc::new(ExecutorRegistry::default()), shutdown)
                    .await
            }
        });
        tokio::time::sleep(running).await;
        shutdown.cancel();
        run.await.unwrap().unwrap();
        claims.load(Ordering::SeqCst)
    }

    /// An idle worker over a store that answers at once: it claims once per poll, not in a
    /// loop that would hammer the store and starve the runtime.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_worker_claims_once_per_poll() {
        let made = claims_made(|| Ok(Vec::new()), 0, Duration::from_secs(1)).await;
        assert!(
            (5..=15).contains(&made),
            "{made} claims in 1 s at a 100 ms poll"
        );
    }

    /// A store that is down: every claim fails, and the claim loop must slow down.
    #[tokio::test(start_paused = true)]
    async fn claims_back_off_while_the_store_fails() {
        let refused = || Err(crate::Error::store("claim", "connection refused"));

        // 60 s of outage: polling every 100 ms would claim 600 times; doubling pauses up
        // to 10 s claim 1 + 10 times to reach the cap (about 20 s), then every 10 s.
        let made = claims_made(refused, u32::MAX, Duration::from_secs(60)).await;
        assert!((10..=20).contains(&made), "{made} claims in 60 s");
    }

    /// A rescuer over a store that fails 30 polls in a row: one warning when the outage
    /// starts and one line when it ends, not a warning every poll.
    #[tokio::test(start_paused = true)]
    async fn a_rescue_outage_is_logged_when_it_starts_and_when_it_ends() {
        let log = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer({
                let log = log.clone();
                move || Captured(log.clone())
            })
            .finish();
        // This test's runtime has one thread, so the spawned workers log here too.
        let _logging = tracing::subscriber::set_default(subscriber);

        claims_made(|| Ok(Vec::new()), 30, Duration::from_secs(5)).await;

        let text = String::from_utf8(log.lock().unwrap().clone()).unwrap();
        assert_eq!(text.matches("rescue failed").count(), 1, "{text}");
        assert_eq!(text.matches("rescue works again").count(), 1, "{text}");
        assert!(text.contains("failures=30"), "{text}");
    }

    /// A log line sink shared with the test.
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
