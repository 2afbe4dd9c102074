//! Host-supplied workflows: the [`WorkflowExecutor`] trait, the context it runs in, and the
//! registry that maps request types to executors.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::error::{BoxError, Error};
use crate::model::{Progress, Request, RequestId, RequestResults, RequestType};
use crate::status::RequestStatus;
use crate::store::{LeaseRef, RequestStore, WriteOutcome};

/// The outcome of the write that marks an attempt's request `EXECUTING`, awaitable by
/// everyone who must come after it (`None`: the store could not be reached).
pub(crate) type StartedWrite =
    futures::future::Shared<futures::future::BoxFuture<'static, Option<WriteOutcome>>>;

/// Why a workflow attempt failed, and whether another attempt may succeed.
///
/// # Examples
///
/// ```
/// use root_orchestrator::WorkflowError;
///
/// let timeout = WorkflowError::retryable("source timed out");
/// assert!(timeout.is_retryable());
///
/// let bad_input = WorkflowError::permanent("corpus folder does not exist");
/// assert!(!bad_input.is_retryable());
/// ```
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct WorkflowError {
    message: String,
    retryable: bool,
    #[source]
    source: Option<BoxError>,
}

impl WorkflowError {
    /// A failure worth retrying (a timeout, an unavailable source).
    pub fn retryable(message: impl Into<String>) -> Self {
        WorkflowError {
            message: message.into(),
            retryable: true,
            source: None,
        }
    }

    /// A failure no retry can fix (bad input, a missing resource).
    pub fn permanent(message: impl Into<String>) -> Self {
        WorkflowError {
            message: message.into(),
            retryable: false,
            source: None,
        }
    }

    /// The executor stopped because its context was cancelled.
    pub fn cancelled() -> Self {
        WorkflowError::permanent("cancelled")
    }

    /// Attaches the underlying error.
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Whether another attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// The failure's description.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl From<Error> for WorkflowError {
    /// Store faults are worth retrying; a lost lease or bad input is not.
    fn from(err: Error) -> Self {
        let retryable = err.is_transient();
        WorkflowError {
            message: err.to_string(),
            retryable,
            source: Some(Box::new(err)),
        }
    }
}

/// Runs one request type's workflow.
///
/// An executor reports progress and checks for cancellation through its
/// [`WorkflowContext`]. It returns [`RequestResults`] on success, or a [`WorkflowError`]
/// saying whether a retry could help. A panic is caught and counts as a failed attempt.
///
/// # Examples
///
/// ```
/// use async_trait::async_trait;
/// use root_orchestrator::{
///     Progress, Request, RequestResults, WorkflowContext, WorkflowError, WorkflowExecutor,
/// };
///
/// struct CountKeywords;
///
/// #[async_trait]
/// impl WorkflowExecutor for CountKeywords {
///     async fn execute(
///         &self,
///         request: &Request,
///         ctx: &WorkflowContext,
///     ) -> Result<RequestResults, WorkflowError> {
///         if ctx.is_cancelled() {
///             return Err(WorkflowError::cancelled());
///         }
///         ctx.report_progress(Progress::at_stage("counting", 50)).await?;
///         let count = request.configuration.keywords.len();
///         Ok(RequestResults::new(None, serde_json::json!({ "keywords": count })))
///     }
/// }
/// ```
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait WorkflowExecutor: Send + Sync + 'static {
    /// Runs `request`'s workflow once.
    async fn execute(
        &self,
        request: &Request,
        ctx: &WorkflowContext,
    ) -> Result<RequestResults, WorkflowError>;

    /// Whether `error` deserves another attempt (if attempts remain). Defaults to
    /// [`WorkflowError::is_retryable`].
    fn should_retry(&self, error: &WorkflowError) -> bool {
        error.is_retryable()
    }

    /// How long one attempt at `request` may run, overriding the strategy's
    /// `execution_timeout`; `None` (the default) keeps the strategy's. When the time is up
    /// the context is cancelled, the executor gets the strategy's `cancel_grace_period` to
    /// return, and the attempt fails as retryable whatever it returns.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use async_trait::async_trait;
    /// use root_orchestrator::{
    ///     ExtractionMode, Request, RequestResults, WorkflowContext, WorkflowError,
    ///     WorkflowExecutor,
    /// };
    ///
    /// struct Scan;
    ///
    /// #[async_trait]
    /// impl WorkflowExecutor for Scan {
    ///     async fn execute(
    ///         &self,
    ///         _request: &Request,
    ///         _ctx: &WorkflowContext,
    ///     ) -> Result<RequestResults, WorkflowError> {
    ///         Ok(RequestResults::new(None, serde_json::json!({})))
    ///     }
    ///
    ///     // A summary scan is quick; anything slower than a minute is stuck.
    ///     fn timeout(&self, request: &Request) -> Option<Duration> {
    ///         (request.configuration.extraction_mode == ExtractionMode::Summary)
    ///             .then(|| Duration::from_secs(60))
    ///     }
    /// }
    /// ```
    fn timeout(&self, request: &Request) -> Option<Duration> {
        let _ = request;
        None
    }
}

/// Where an attempt's progress reports go.
#[derive(Clone)]
enum ProgressSink {
    /// Fenced writes to the store under the attempt's lease.
    Store {
        store: Arc<dyn RequestStore>,
        lease: LeaseRef,
        /// The write that marks the request `EXECUTING`, which progress must follow.
        started: StartedWrite,
    },
    /// Kept in memory, for testing executors without a store.
    Detached(Arc<Mutex<Vec<Progress>>>),
}

/// What an executor can see and do during one attempt: report progress, learn that the
/// request was cancelled (or that its worker is shutting down).
#[derive(Clone)]
pub struct WorkflowContext {
    request_id: RequestId,
    attempt: u32,
    worker: String,
    cancel: CancellationToken,
    sink: ProgressSink,
    highest_percentage: Arc<Mutex<u8>>,
}

impl fmt::Debug for WorkflowContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkflowContext")
            .field("request_id", &self.request_id)
            .field("attempt", &self.attempt)
            .field("worker", &self.worker)
            .field("cancelled", &self.cancel.is_cancelled())
            .finish_non_exhaustive()
    }
}

impl WorkflowContext {
    pub(crate) fn for_lease(
        store: Arc<dyn RequestStore>,
        lease: LeaseRef,
        started: StartedWrite,
        attempt: u32,
        cancel: CancellationToken,
    ) -> Self {
        WorkflowContext {
            request_id: lease.request_id.clone(),
            attempt,
            worker: lease.owner.clone(),
            cancel,
            sink: ProgressSink::Store {
                store,
                lease,
                started,
            },
            highest_percentage: Arc::new(Mutex::new(0)),
        }
    }

    /// A context not tied to any store, for testing an executor on its own: progress is
    /// kept in memory ([`reported_progress`](Self::reported_progress)) and
    /// [`cancel`](Self::cancel) simulates a cancellation.
    ///
    /// # Examples
    ///
    /// ```
    /// use root_orchestrator::{Progress, RequestId, WorkflowContext};
    ///
    /// # tokio::runtime::Builder::new_current_thread().build()?.block_on(async {
    /// let ctx = WorkflowContext::detached(RequestId::generate(), 1);
    /// ctx.report_progress(Progress::at_stage("discovery", 20)).await?;
    /// assert_eq!(ctx.reported_progress()[0].percentage, 20);
    ///
    /// ctx.cancel();
    /// assert!(ctx.is_cancelled());
    /// # Ok::<(), root_orchestrator::Error>(())
    /// # })?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn detached(request_id: RequestId, attempt: u32) -> Self {
        WorkflowContext {
            request_id,
            attempt,
            worker: "detached".to_owned(),
            cancel: CancellationToken::new(),
            sink: ProgressSink::Detached(Arc::default()),
            highest_percentage: Arc::new(Mutex::new(0)),
        }
    }

    /// The request being run.
    pub fn request_id(&self) -> &RequestId {
        &self.request_id
    }

    /// This attempt's number, counting from 1.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The worker running the attempt.
    pub fn worker(&self) -> &str {
        &self.worker
    }

    /// Whether the request was cancelled, or the attempt must stop for another reason (its
    /// lease was lost, its worker is shutting down). A stopped attempt's result is discarded.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Completes when the attempt must stop; for use in `tokio::select!`.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await;
    }

    /// Tells the executor to stop, as a cancel of the request does.
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    /// Records how far the attempt has come. A percentage lower than one reported earlier
    /// in this attempt is raised to it: progress never goes backwards.
    ///
    /// A store fault is logged and does not fail the attempt.
    ///
    /// # Errors
    ///
    /// [`Error::LeaseLost`] when the request was cancelled, rescued or taken over: the
    /// executor should stop, as nothing it does will be kept. The context is cancelled too.
    pub async fn report_progress(&self, mut progress: Progress) -> Result<(), Error> {
        {
            let mut highest = self
                .highest_percentage
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            progress.percentage = progress.percentage.clamp(*highest, 100);
            *highest = progress.percentage;
        }

        match &self.sink {
            ProgressSink::Detached(log) => {
                log.lock().unwrap_or_else(|p| p.into_inner()).push(progress);
                Ok(())
            }
            ProgressSink::Store {
                store,
                lease,
                started,
            } => {
                // A progress write may only follow the write that marks the request
                // EXECUTING, which runs beside the executor's first steps.
                let written = match started.clone().await {
                    Some(WriteOutcome::Applied) => store.record_progress(lease, &progress).await,
                    Some(refused) => Ok(refused),
                    None => Err(Error::store(
                        "record_progress",
                        "the request could not be marked executing",
                    )),
                };
                match written {
                    Ok(WriteOutcome::Applied) => Ok(()),
                    Ok(WriteOutcome::Rejected { current }) => {
                        self.cancel.cancel();
                        Err(Error::LeaseLost {
                            request_id: self.request_id.clone(),
                            status: current,
                        })
                    }
                    Err(err) => {
                        tracing::warn!(
                            request_id = %self.request_id,
                            error = %err,
                            "could not record progress; the attempt goes on"
                        );
                        Ok(())
                    }
                }
            }
        }
    }

    /// Progress reported so far through a [`detached`](Self::detached) context (empty for
    /// contexts that write to a store).
    pub fn reported_progress(&self) -> Vec<Progress> {
        match &self.sink {
            ProgressSink::Detached(log) => log.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            ProgressSink::Store { .. } => Vec::new(),
        }
    }
}

/// The executors of an orchestrator, keyed by request type.
#[derive(Clone, Default)]
pub struct ExecutorRegistry {
    executors: HashMap<RequestType, Arc<dyn WorkflowExecutor>>,
}

impl fmt::Debug for ExecutorRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.executors.keys()).finish()
    }
}

impl ExecutorRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        ExecutorRegistry::default()
    }

    /// Registers `executor` for `request_type`, replacing any earlier one.
    pub fn register(&mut self, request_type: RequestType, executor: Arc<dyn WorkflowExecutor>) {
        self.executors.insert(request_type, executor);
    }

    /// The executor for `request_type`.
    pub fn get(&self, request_type: &RequestType) -> Option<Arc<dyn WorkflowExecutor>> {
        self.executors.get(request_type).cloned()
    }

    /// Whether an executor is registered for `request_type`.
    pub fn contains(&self, request_type: &RequestType) -> bool {
        self.executors.contains_key(request_type)
    }

    /// The registered types.
    pub fn request_types(&self) -> impl Iterator<Item = &RequestType> {
        self.executors.keys()
    }

    /// Whether nothing is registered.
    pub fn is_empty(&self) -> bool {
        self.executors.is_empty()
    }
}

/// Status names for log fields and errors.
pub(crate) fn describe(status: Option<RequestStatus>) -> &'static str {
    status.map_or("deleted", RequestStatus::as_str)
}
