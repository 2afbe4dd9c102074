//! The one execution path every strategy shares: claimed request -> `EXECUTING` ->
//! executor -> fenced final write, with a heartbeat, cancellation and panic capture.

#![cfg_attr(not(feature = "table"), allow(dead_code))]

use std::any::Any;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::FutureExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::writer::BatchWriter;
use crate::backoff::BackoffPolicy;
use crate::error::Result;
use crate::executor::{ExecutorRegistry, StartedWrite, WorkflowContext, WorkflowError, describe};
use crate::model::{AttemptError, Request, RequestResults};
use crate::store::{LeaseRef, RequestStore, WriteOutcome, after, now};

/// How an attempt is run.
#[derive(Debug, Clone)]
pub(crate) struct AttemptSettings {
    pub strategy: &'static str,
    pub heartbeat_interval: Duration,
    pub lease_duration: Duration,
    pub cancel_grace_period: Duration,
    /// How long an attempt may run when its executor does not set its own limit.
    pub execution_timeout: Duration,
    pub backoff: BackoffPolicy,
}

/// A worker slot, held while the attempt's executor runs and released (dropped) as soon as
/// it has returned, before the outcome is written.
pub(crate) type Slot = Box<dyn Send>;

/// How an attempt ended, as far as this worker knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AttemptEnd {
    Completed,
    RetryScheduled(DateTime<Utc>),
    Failed,
    /// Handed back as `PENDING` at shutdown.
    HandedBack,
    /// The request was cancelled, rescued or otherwise taken from this worker; nothing of
    /// this attempt was kept.
    Superseded,
    /// A store fault kept the outcome from being written; the lease will expire and the
    /// rescuer will return the request.
    Unrecorded,
}

/// Why the wait for the executor ended.
enum Wake {
    Finished(std::result::Result<std::result::Result<RequestResults, WorkflowError>, String>),
    Cancelled,
    HandBack,
    /// The attempt ran past its execution timeout.
    TimedOut,
    /// The write marking the request `EXECUTING` could not be made.
    Unmarked,
}

/// Runs one claimed attempt to its end.
///
/// `cancel` stops the executor (a cancel of the request, or a lost lease); `hand_back`
/// fires when a shutdown's grace period is over and the request must be returned.
#[allow(clippy::too_many_arguments)] // each is a distinct part of the attempt's context
pub(crate) async fn run_attempt(
    store: Arc<dyn RequestStore>,
    writer: BatchWriter,
    executors: Arc<ExecutorRegistry>,
    request: Request,
    settings: AttemptSettings,
    cancel: CancellationToken,
    hand_back: CancellationToken,
    slot: Option<Slot>,
) -> AttemptEnd {
    let Some(lease) = LeaseRef::of(&request) else {
        tracing::error!(request_id = %request.id, "claimed request carries no lease; skipped");
        return AttemptEnd::Superseded;
    };
    let span = tracing::info_span!(
        "request",
        request_id = %request.id,
        request_type = %request.request_type,
        attempt = request.attempts,
        worker = %lease.owner,
        strategy = settings.strategy,
    );
    run_leased(
        store, writer, executors, request, lease, settings, cancel, hand_back, slot,
    )
    .instrument(span)
    .await
}

#[allow(clippy::too_many_arguments)]
async fn run_leased(
    store: Arc<dyn RequestStore>,
    writer: BatchWriter,
    executors: Arc<ExecutorRegistry>,
    request: Request,
    lease: LeaseRef,
    settings: AttemptSettings,
    cancel: CancellationToken,
    hand_back: CancellationToken,
    slot: Option<Slot>,
) -> AttemptEnd {
    let labels = [
        ("strategy", settings.strategy.to_owned()),
        ("request_type", request.request_type.to_string()),
    ];

    let Some(executor) = executors.get(&request.request_type) else {
        // Submit refuses unknown types, so this is a request stored by another process
        // with other executors. Retrying here cannot help.
        let error = WorkflowError::permanent(format!(
            "no executor is registered for request type `{}` in worker {}",
            request.request_type, lease.owner
        ));
        return record_failure(&*store, &request, &lease, &settings, error, false).await;
    };

    // The executor starts at once, and the write that marks the request EXECUTING runs
    // beside it, batched with other workers' writes: on a database that flushes every
    // commit to disk, waiting for it would put a whole commit on every request's path.
    // Progress and the outcome wait for it, and if it is refused (the request was
    // cancelled or taken back since the claim) the executor is told to stop.
    let marked: StartedWrite = {
        let writer = writer.clone();
        let lease = lease.clone();
        let patience = settings.lease_duration;
        async move { write_final(|| writer.mark_executing(&lease), patience).await }
            .in_current_span()
            .boxed()
            .shared()
    };
    tokio::spawn(marked.clone());
    let mut marking = marked.clone();
    let mut marking_pending = true;
    tracing::info!("executing");
    let started = Instant::now();

    let ctx = WorkflowContext::for_lease(
        store.clone(),
        lease.clone(),
        marked.clone(),
        request.attempts,
        cancel.clone(),
    );
    let run_request = request.clone();
    let run_executor = executor.clone();
    let mut task = tokio::spawn(
        async move { run_executor.execute(&run_request, &ctx).await }.in_current_span(),
    );

    let mut heartbeat = tokio::time::interval_at(
        Instant::now() + settings.heartbeat_interval,
        settings.heartbeat_interval,
    );
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let limit = executor
        .timeout(&request)
        .unwrap_or(settings.execution_timeout);
    // A limit too far off to add to an instant (an executor's `Duration::MAX`) is none.
    let deadline = tokio::time::sleep_until(started + limit.min(NO_LIMIT));
    tokio::pin!(deadline);

    let wake = loop {
        tokio::select! {
            // A finished executor wins over a cancel or hand-back that fires at the same
            // moment: its outcome still goes through the fenced write.
            biased;
            joined = &mut task => break Wake::Finished(joined.map_err(panic_message)),
            _ = cancel.cancelled() => break Wake::Cancelled,
            _ = hand_back.cancelled() => break Wake::HandBack,
            _ = &mut deadline => break Wake::TimedOut,
            marked = &mut marking, if marking_pending => {
                marking_pending = false;
                match marked {
                    Some(WriteOutcome::Applied) => {}
                    Some(WriteOutcome::Rejected { current }) => {
                        tracing::info!(
                            status = describe(current),
                            "request taken away as it started; stopping the executor",
                        );
                        // Told, as a cancel tells it, so that it stops cleanly instead of
                        // running on until its grace period is over and being dropped.
                        cancel.cancel();
                        break Wake::Cancelled;
                    }
                    None => {
                        tracing::warn!(
                            "could not mark the request executing; stopping the executor"
                        );
                        cancel.cancel();
                        break Wake::Unmarked;
                    }
                }
            }
            _ = heartbeat.tick() => {
                match store.extend_lease(&lease, settings.lease_duration).await {
                    Ok(WriteOutcome::Applied) => {}
                    Ok(WriteOutcome::Rejected { current }) => {
                        // Cancelled elsewhere (another process), or rescued after a stall:
                        // the executor must stop, and nothing it returns will be kept.
                        tracing::info!(
                            status = describe(current),
                            "lease lost; stopping the executor",
                        );
                        cancel.cancel();
                    }
                    Err(err) => tracing::warn!(error = %err, "heartbeat failed; will try again"),
                }
            }
        }
    };

    let finished = match wake {
        Wake::Finished(finished) => finished,
        Wake::HandBack => {
            cancel.cancel();
            task.abort();
            return hand_back_request(&*store, &lease, "handed back at shutdown").await;
        }
        Wake::TimedOut => {
            // Whatever the executor returns once told to stop is not kept: the attempt
            // failed by running too long, and a retry may fare better.
            cancel.cancel();
            // The failure is written after the EXECUTING write, as every outcome is.
            let _ = marked.clone().await;
            let keep = keep_lease(&*store, &lease, &mut heartbeat, settings.lease_duration);
            let _ =
                stop_within_grace(&mut task, settings.cancel_grace_period, &hand_back, keep).await;
            let error = WorkflowError::retryable(format!("execution timed out after {limit:?}"));
            let worth_retrying = executor.should_retry(&error);
            return record_failure(&*store, &request, &lease, &settings, error, worth_retrying)
                .await;
        }
        Wake::Unmarked => {
            // This worker stopped the executor, not its work: what it returns is not kept.
            // The request goes back to PENDING, or, with the store still away, its lease
            // lapses and the rescuer returns it.
            let keep = keep_lease(&*store, &lease, &mut heartbeat, settings.lease_duration);
            let _ =
                stop_within_grace(&mut task, settings.cancel_grace_period, &hand_back, keep).await;
            return hand_back_request(&*store, &lease, "could not be marked executing").await;
        }
        Wake::Cancelled => {
            // Give a cooperative executor the chance to stop cleanly; drop one that
            // ignores the cancel. Either way its outcome goes through the fenced write,
            // which a cancelled or rescued request refuses.
            let keep = keep_lease(&*store, &lease, &mut heartbeat, settings.lease_duration);
            match stop_within_grace(&mut task, settings.cancel_grace_period, &hand_back, keep).await
            {
                Some(joined) => joined.map_err(panic_message),
                None => return AttemptEnd::Superseded,
            }
        }
    };

    // The executor is done: its slot goes to the next request while the outcome is
    // written, and that write follows the one marking the request EXECUTING.
    drop(slot);
    let _ = marked.await;

    let elapsed = started.elapsed();
    metrics::histogram!("root_orchestrator_processing_seconds", &labels)
        .record(elapsed.as_secs_f64());

    // Results no store could keep fail the attempt for good, instead of a write that can
    // never succeed and a lease left to lapse.
    let finished = match finished {
        Ok(Ok(results)) => match results.validate() {
            Ok(()) => Ok(Ok(results)),
            Err(problem) => Ok(Err(WorkflowError::permanent(format!(
                "the executor's results cannot be stored: {problem}"
            )))),
        },
        other => other,
    };

    match finished {
        Ok(Ok(results)) => {
            match write_final(
                || writer.complete(&lease, &results),
                settings.lease_duration,
            )
            .await
            {
                Some(WriteOutcome::Applied) => {
                    metrics::counter!("root_orchestrator_requests_completed_total", &labels)
                        .increment(1);
                    tracing::info!(elapsed_secs = elapsed.as_secs_f64(), "completed");
                    AttemptEnd::Completed
                }
                Some(WriteOutcome::Rejected { current }) => {
                    tracing::info!(status = describe(current), "late result discarded");
                    AttemptEnd::Superseded
                }
                None => AttemptEnd::Unrecorded,
            }
        }
        Ok(Err(error)) => {
            let worth_retrying = executor.should_retry(&error);
            record_failure(&*store, &request, &lease, &settings, error, worth_retrying).await
        }
        Err(panic) => {
            let error = WorkflowError::retryable(format!("executor panicked: {panic}"));
            let worth_retrying = executor.should_retry(&error);
            record_failure(&*store, &request, &lease, &settings, error, worth_retrying).await
        }
    }
}

/// The graceful end of a shutdown, shared by the strategies: running attempts get `grace`
/// to finish; then `hand_back` tells the rest to return their requests, and they are
/// awaited until they have.
pub(crate) async fn drain_attempts(
    attempts: &mut tokio::task::JoinSet<()>,
    grace: Duration,
    hand_back: &CancellationToken,
    span: &tracing::Span,
) {
    while attempts.try_join_next().is_some() {}
    tracing::info!(parent: span, in_flight = attempts.len(), "shutting down: taking no new work");

    let drained = tokio::time::timeout(grace, async {
        while attempts.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            parent: span,
            in_flight = attempts.len(),
            "grace period over; handing back running requests"
        );
        hand_back.cancel();
        while attempts.join_next().await.is_some() {}
    }
}

/// Records a failed attempt: a retry after the backoff while attempts remain and the
/// failure is worth it, `FAILED` otherwise.
async fn record_failure(
    store: &dyn RequestStore,
    request: &Request,
    lease: &LeaseRef,
    settings: &AttemptSettings,
    error: WorkflowError,
    worth_retrying: bool,
) -> AttemptEnd {
    let labels = [
        ("strategy", settings.strategy.to_owned()),
        ("request_type", request.request_type.to_string()),
    ];
    let message = error_chain(&error);
    let retry_at = (worth_retrying && request.attempts < request.max_attempts)
        .then(|| after(now(), settings.backoff.delay(request.attempts)));
    let attempt_error = AttemptError::new(request.attempts, message.clone(), worth_retrying);

    let outcome = write_final(
        || store.fail_attempt(lease, &attempt_error, retry_at),
        settings.lease_duration,
    )
    .await;
    match (outcome, retry_at) {
        (Some(WriteOutcome::Applied), Some(at)) => {
            metrics::counter!("root_orchestrator_requests_retried_total", &labels).increment(1);
            tracing::warn!(error = %message, retry_at = %at, "attempt failed; retry scheduled");
            AttemptEnd::RetryScheduled(at)
        }
        (Some(WriteOutcome::Applied), None) => {
            metrics::counter!("root_orchestrator_requests_failed_total", &labels).increment(1);
            tracing::warn!(error = %message, retryable = worth_retrying, "request failed");
            AttemptEnd::Failed
        }
        (Some(WriteOutcome::Rejected { current }), _) => {
            tracing::info!(
                status = describe(current),
                error = %message,
                "failure of a superseded attempt discarded",
            );
            AttemptEnd::Superseded
        }
        (None, _) => AttemptEnd::Unrecorded,
    }
}

async fn hand_back_request(
    store: &dyn RequestStore,
    lease: &LeaseRef,
    reason: &'static str,
) -> AttemptEnd {
    match store.release(lease, reason).await {
        Ok(WriteOutcome::Applied) => {
            tracing::info!(reason, "handed back as PENDING");
            AttemptEnd::HandedBack
        }
        Ok(WriteOutcome::Rejected { current }) => {
            tracing::info!(
                status = describe(current),
                "not handed back: no longer held"
            );
            AttemptEnd::Superseded
        }
        Err(err) => {
            tracing::warn!(error = %err, "could not hand the request back; its lease will lapse");
            AttemptEnd::Unrecorded
        }
    }
}

/// Makes a final write, trying again on store faults for up to `patience` (the lease
/// would lapse after that anyway, and the rescuer takes over).
async fn write_final<F, Fut>(mut write: F, patience: Duration) -> Option<WriteOutcome>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<WriteOutcome>>,
{
    let deadline = Instant::now() + patience;
    let mut pause = Duration::from_millis(100);
    loop {
        match write().await {
            Ok(outcome) => return Some(outcome),
            Err(err) if Instant::now() + pause < deadline => {
                tracing::warn!(error = %err, "could not record the outcome; trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            Err(err) => {
                tracing::error!(
                    error = %err,
                    "gave up recording the outcome; the lease will lapse",
                );
                return None;
            }
        }
    }
}

/// Waits up to `grace` for an executor that was told to stop; one that ignores it is
/// aborted, and `None` says so. `keep` runs meanwhile: the lease must not lapse while the
/// executor still runs here, or the request would start again beside it.
///
/// Aborting takes effect at the executor's next await; one that blocks its thread runs on.
/// Its slot stays taken until it really ends, so the concurrency limit holds; only a
/// shutdown's hand-back stops the wait.
async fn stop_within_grace<T>(
    task: &mut tokio::task::JoinHandle<T>,
    grace: Duration,
    hand_back: &CancellationToken,
    keep: impl Future<Output = Infallible>,
) -> Option<std::result::Result<T, tokio::task::JoinError>> {
    tokio::pin!(keep);
    let waited = tokio::select! {
        waited = tokio::time::timeout(grace, &mut *task) => waited,
        never = &mut keep => match never {},
    };
    if let Ok(joined) = waited {
        return Some(joined);
    }
    task.abort();
    tracing::info!("executor ignored the cancel; dropping it");
    tokio::select! {
        _ = &mut *task => {}
        _ = hand_back.cancelled() => {
            tracing::warn!("executor still running at shutdown; left behind");
        }
        never = &mut keep => match never {},
    }
    None
}

/// Extends `lease` at every `heartbeat` tick, for as long as it is polled.
async fn keep_lease(
    store: &dyn RequestStore,
    lease: &LeaseRef,
    heartbeat: &mut tokio::time::Interval,
    lease_duration: Duration,
) -> Infallible {
    loop {
        heartbeat.tick().await;
        // A refusal (the request was cancelled or taken back) or a fault changes nothing
        // here: the executor is being stopped either way.
        if let Err(err) = store.extend_lease(lease, lease_duration).await {
            tracing::debug!(error = %err, "heartbeat failed while the executor stops");
        }
    }
}

/// Thirty years: longer than any attempt runs, short enough to add to any `Instant`.
const NO_LIMIT: Duration = Duration::from_secs(30 * 365 * 86_400);

fn panic_message(err: tokio::task::JoinError) -> String {
    if !err.is_panic() {
        return "executor task was cancelled".to_owned();
    }
    let payload: Box<dyn Any + Send> = err.into_panic();
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "a non-text panic payload".to_owned()
    }
}

/// The error's message followed by its causes.
fn error_chain(error: &WorkflowError) -> String {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}
