//! [`RootOrchestrator`]: the facade a host holds.

use std::future::Future;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::executor::{ExecutorRegistry, WorkflowExecutor};
use crate::model::{NewRequest, Request, RequestId, RequestMessage, RequestResults, RequestType};
use crate::status::RequestStatus;
use crate::store::{CancelOutcome, InsertOutcome, ListFilter, RequestPage, RequestStore};
use crate::strategy::ProcessingStrategy;

/// Accepts, runs and tracks requests through one [`ProcessingStrategy`].
///
/// Cheap to clone: clones share the strategy and executors, so one clone can
/// [`run`](Self::run_until) the workers while others submit and answer queries.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use async_trait::async_trait;
/// use root_orchestrator::{
///     Configuration, MemoryStore, NewRequest, Request, RequestResults, RequestStatus,
///     RequestType, RootOrchestrator, Source, TableConfig, TableStrategy, WorkflowContext,
///     WorkflowError, WorkflowExecutor,
/// };
///
/// struct Echo;
///
/// #[async_trait]
/// impl WorkflowExecutor for Echo {
///     async fn execute(&self, r: &Request, _: &WorkflowContext)
///         -> Result<RequestResults, WorkflowError> {
///         let keywords = &r.configuration.keywords;
///         Ok(RequestResults::new(None, serde_json::json!({ "keywords": keywords })))
///     }
/// }
///
/// # tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(async {
/// let strategy = TableStrategy::new(MemoryStore::new(), TableConfig::default())?;
/// let orchestrator = RootOrchestrator::builder()
///     .strategy(strategy)
///     .executor(RequestType::SEMAGLUTIDE_INTELLIGENCE, Echo)
///     .build()?;
///
/// let workers = orchestrator.spawn();
///
/// let mut configuration = Configuration::new(["semaglutide"]);
/// configuration.sources.push(Source::new("FDA", "regulatory"));
/// let request_type = RequestType::new(RequestType::SEMAGLUTIDE_INTELLIGENCE)?;
/// let id = orchestrator
///     .submit(NewRequest::new("obesity", "analyst-7", request_type, configuration))
///     .await?
///     .id;
///
/// while !orchestrator.status(&id).await?.status.is_terminal() {
///     tokio::time::sleep(Duration::from_millis(10)).await;
/// }
/// assert_eq!(orchestrator.status(&id).await?.status, RequestStatus::Completed);
/// assert_eq!(orchestrator.results(&id).await?.summary["keywords"][0], "semaglutide");
///
/// workers.shutdown().await?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # })?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct RootOrchestrator {
    strategy: Arc<dyn ProcessingStrategy>,
    executors: Arc<ExecutorRegistry>,
}

impl std::fmt::Debug for RootOrchestrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RootOrchestrator")
            .field("strategy", &self.strategy.name())
            .field("executors", &self.executors)
            .finish()
    }
}

impl RootOrchestrator {
    /// Starts building an orchestrator.
    pub fn builder() -> RootOrchestratorBuilder {
        RootOrchestratorBuilder::default()
    }

    /// The strategy's store, for queries the facade does not offer.
    pub fn store(&self) -> Arc<dyn RequestStore> {
        self.strategy.store()
    }

    /// The strategy's name, such as `"table"`.
    pub fn strategy_name(&self) -> &'static str {
        self.strategy.name()
    }

    /// Validates and stores a request; workers will pick it up.
    ///
    /// A request whose caller-given id was submitted before is not stored again: the
    /// first request is returned as it is now.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRequest`] naming the bad field, [`Error::UnknownRequestType`] when no
    /// executor is registered for its type (nothing is stored in either case), or a store
    /// error.
    pub async fn submit(&self, request: NewRequest) -> Result<Request> {
        self.submit_detailed(request)
            .await
            .map(InsertOutcome::into_request)
    }

    /// Like [`submit`](Self::submit), telling a new request from an existing one.
    ///
    /// # Errors
    ///
    /// As [`submit`](Self::submit).
    pub async fn submit_detailed(&self, request: NewRequest) -> Result<InsertOutcome> {
        request.validate()?;
        if !self.executors.contains(&request.request_type) {
            return Err(Error::UnknownRequestType {
                request_type: request.request_type,
            });
        }
        let outcome = self.strategy.submit(request).await?;
        match &outcome {
            InsertOutcome::Inserted(r) => {
                tracing::info!(
                    request_id = %r.id,
                    request_type = %r.request_type,
                    priority = %r.priority,
                    "request submitted"
                )
            }
            InsertOutcome::Existing(r) => {
                tracing::info!(
                    request_id = %r.id,
                    status = %r.status,
                    "request already submitted; returning it"
                )
            }
        }
        Ok(outcome)
    }

    /// Submits several requests at once: all are validated first, and an invalid one
    /// refuses the whole batch with an error whose field path starts with its position
    /// (`requests[3].configuration.keywords`). On the SQL stores the batch is stored in one
    /// transaction, all or none, which makes it many times faster than one submit each.
    /// Outcomes come back in the order given; see [`submit_detailed`](Self::submit_detailed).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRequest`] naming the first invalid request and field, or a store
    /// error (nothing was stored).
    ///
    /// # Examples
    ///
    /// ```
    /// # use root_orchestrator::*;
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
    /// # struct Noop;
    /// # #[async_trait::async_trait]
    /// # impl WorkflowExecutor for Noop {
    /// #     async fn execute(&self, _: &Request, _: &WorkflowContext)
    /// #         -> std::result::Result<RequestResults, WorkflowError> {
    /// #         Ok(RequestResults::new(None, serde_json::Value::Null))
    /// #     }
    /// # }
    /// let orchestrator = RootOrchestrator::builder()
    ///     .strategy(TableStrategy::new(MemoryStore::new(), TableConfig::default())?)
    ///     .executor("market_intelligence", Noop)
    ///     .build()?;
    /// let kind = RequestType::new("market_intelligence")?;
    /// let batch = ["semaglutide", "tirzepatide"].map(|drug| {
    ///     let mut configuration = Configuration::new([drug]);
    ///     configuration.sources.push(Source::new("FDA", "regulatory"));
    ///     NewRequest::new("proj-1", "analyst-7", kind.clone(), configuration)
    /// });
    ///
    /// let outcomes = orchestrator.submit_many(batch).await?;
    /// assert_eq!(outcomes.len(), 2);
    /// assert!(matches!(outcomes[0], InsertOutcome::Inserted(_)));
    /// # Ok::<(), Error>(())
    /// # })?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub async fn submit_many(
        &self,
        requests: impl IntoIterator<Item = NewRequest>,
    ) -> Result<Vec<InsertOutcome>> {
        let requests: Vec<NewRequest> = requests.into_iter().collect();
        for (position, request) in requests.iter().enumerate() {
            let in_batch = |field: &str| format!("requests[{position}].{field}");
            if let Err(err) = request.validate() {
                return Err(match err {
                    Error::InvalidRequest { field, problem } => Error::InvalidRequest {
                        field: in_batch(&field),
                        problem,
                    },
                    other => other,
                });
            }
            if !self.executors.contains(&request.request_type) {
                return Err(Error::invalid(
                    in_batch("request_type"),
                    format!("`{}` has no registered executor", request.request_type),
                ));
            }
        }
        if requests.is_empty() {
            return Ok(Vec::new());
        }

        let count = requests.len();
        let outcomes = self.strategy.submit_many(requests).await?;
        let inserted = outcomes
            .iter()
            .filter(|o| matches!(o, InsertOutcome::Inserted(_)))
            .count();
        tracing::info!(
            submitted = count,
            inserted,
            existing = count - inserted,
            "batch submitted"
        );
        Ok(outcomes)
    }

    /// Parses a request in the wire shape ([`RequestMessage`]) and submits it.
    ///
    /// # Errors
    ///
    /// As [`submit`](Self::submit); a body that does not parse names the JSON path.
    pub async fn submit_json(&self, body: &str) -> Result<Request> {
        let request = RequestMessage::from_json(body)?.into_new_request()?;
        self.submit(request).await
    }

    /// The request with this id, with its status, progress, errors and history.
    ///
    /// # Errors
    ///
    /// [`Error::NotFound`] when there is no such request, or a store error.
    pub async fn status(&self, id: &RequestId) -> Result<Request> {
        self.strategy
            .status(id)
            .await?
            .ok_or_else(|| Error::NotFound {
                request_id: id.clone(),
            })
    }

    /// The results of a completed request.
    ///
    /// # Errors
    ///
    /// [`Error::ResultsUnavailable`] with the current status until the request is
    /// `COMPLETED` (its errors are in [`status`](Self::status)), [`Error::NotFound`], or a
    /// store error.
    pub async fn results(&self, id: &RequestId) -> Result<RequestResults> {
        let request = self.status(id).await?;
        match (request.status, request.results) {
            (RequestStatus::Completed, Some(results)) => Ok(results),
            (status, _) => Err(Error::ResultsUnavailable {
                request_id: id.clone(),
                status,
            }),
        }
    }

    /// Requests matching `filter`, newest first, a page at a time.
    ///
    /// # Errors
    ///
    /// A store error.
    pub async fn list(&self, filter: &ListFilter) -> Result<RequestPage> {
        self.strategy.store().list(filter).await
    }

    /// Cancels a pending or running request.
    ///
    /// # Errors
    ///
    /// A store error. An unknown id or a finished request is reported in the outcome.
    pub async fn cancel(&self, id: &RequestId) -> Result<CancelOutcome> {
        self.strategy.cancel(id).await
    }

    /// Runs the workers until `shutdown` completes, then shuts down gracefully.
    ///
    /// # Errors
    ///
    /// A fault that stops the strategy as a whole; per-request failures are recorded on
    /// the requests instead.
    pub async fn run_until<F>(self, shutdown: F) -> Result<()>
    where
        F: Future<Output = ()> + Send,
    {
        let token = CancellationToken::new();
        let run = self.strategy.run(self.executors.clone(), token.clone());
        tokio::pin!(run);
        tokio::select! {
            result = &mut run => result,
            () = shutdown => {
                token.cancel();
                run.await
            }
        }
    }

    /// Starts the workers on a task of their own, as [`run_with_token`](Self::run_with_token)
    /// would run them, and returns the handle that stops them. Call it inside a Tokio
    /// runtime, beside whatever else the host serves.
    ///
    /// # Examples
    ///
    /// ```
    /// # use root_orchestrator::*;
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
    /// # struct Noop;
    /// # #[async_trait::async_trait]
    /// # impl WorkflowExecutor for Noop {
    /// #     async fn execute(&self, _: &Request, _: &WorkflowContext)
    /// #         -> std::result::Result<RequestResults, WorkflowError> {
    /// #         Ok(RequestResults::new(None, serde_json::Value::Null))
    /// #     }
    /// # }
    /// let orchestrator = RootOrchestrator::builder()
    ///     .strategy(TableStrategy::new(MemoryStore::new(), TableConfig::default())?)
    ///     .executor("market_intelligence", Noop)
    ///     .build()?;
    ///
    /// let workers = orchestrator.spawn();
    /// assert!(!workers.is_finished());
    ///
    /// // Stop claiming, give running requests their grace period, and wait.
    /// workers.shutdown().await?;
    /// # Ok::<(), Error>(())
    /// # })?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn spawn(&self) -> RunningWorkers {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let orchestrator = self.clone();
            let shutdown = shutdown.clone();
            async move { orchestrator.run_with_token(shutdown).await }
        });
        RunningWorkers { shutdown, task }
    }

    /// Runs the workers until `token` is cancelled, then shuts down gracefully.
    ///
    /// # Errors
    ///
    /// As [`run_until`](Self::run_until).
    pub async fn run_with_token(&self, token: CancellationToken) -> Result<()> {
        self.strategy.run(self.executors.clone(), token).await
    }

    /// Whether the strategy's store (and queue, where it has one) answers, within
    /// [`READY_TIMEOUT`](Self::READY_TIMEOUT): readiness probes have short deadlines of
    /// their own, so a slow answer counts as none.
    ///
    /// # Errors
    ///
    /// The store's error when it cannot be reached, or [`Error::Store`] for `ping` when it
    /// does not answer in time.
    pub async fn ready(&self) -> Result<()> {
        match tokio::time::timeout(Self::READY_TIMEOUT, self.strategy.ready()).await {
            Ok(answer) => answer,
            Err(_) => Err(Error::store(
                "ping",
                format!("no answer within {} s", Self::READY_TIMEOUT.as_secs_f64()),
            )),
        }
    }

    /// How long [`ready`](Self::ready) waits for the store.
    pub const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
}

/// Workers started by [`RootOrchestrator::spawn`], running on a task of their own.
///
/// Dropping the handle leaves them running until the runtime ends; stop them with
/// [`shutdown`](Self::shutdown), or cancel the [`shutdown_token`](Self::shutdown_token) from
/// elsewhere (a signal handler) and [`wait`](Self::wait).
#[derive(Debug)]
#[must_use = "workers whose handle is dropped cannot be stopped gracefully"]
pub struct RunningWorkers {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl RunningWorkers {
    /// The token whose cancellation stops the workers gracefully.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Whether the workers have stopped: after a shutdown, or a fault that ended the run.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Stops claiming, lets running requests finish within the strategy's grace period,
    /// hands back the rest, and returns how the run ended.
    ///
    /// # Errors
    ///
    /// As [`RootOrchestrator::run_with_token`].
    ///
    /// # Panics
    ///
    /// When the workers' task panicked: the panic goes on here.
    pub async fn shutdown(self) -> Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }

    /// Waits until the workers stop, without asking them to.
    ///
    /// # Errors
    ///
    /// As [`RootOrchestrator::run_with_token`].
    ///
    /// # Panics
    ///
    /// When the workers' task panicked: the panic goes on here.
    pub async fn wait(self) -> Result<()> {
        match self.task.await {
            Ok(result) => result,
            Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
            // Nothing aborts the task; it is cancelled only when its runtime shuts down, in
            // which case nobody is left to wait here.
            Err(err) => panic!("the workers' task was cancelled: {err}"),
        }
    }
}

/// Builds a [`RootOrchestrator`]: a strategy plus an executor per request type.
#[derive(Default)]
#[must_use]
pub struct RootOrchestratorBuilder {
    strategy: Option<Arc<dyn ProcessingStrategy>>,
    executors: ExecutorRegistry,
    error: Option<Error>,
}

impl RootOrchestratorBuilder {
    /// The strategy that stores and runs requests.
    pub fn strategy(mut self, strategy: impl ProcessingStrategy) -> Self {
        self.strategy = Some(Arc::new(strategy));
        self
    }

    /// Like [`strategy`](Self::strategy), for a strategy shared with other parts of the host.
    pub fn shared_strategy(mut self, strategy: Arc<dyn ProcessingStrategy>) -> Self {
        self.strategy = Some(strategy);
        self
    }

    /// Registers `executor` for requests of type `request_type`.
    pub fn executor(
        self,
        request_type: impl Into<String>,
        executor: impl WorkflowExecutor,
    ) -> Self {
        self.shared_executor(request_type, Arc::new(executor))
    }

    /// Like [`executor`](Self::executor), for an executor shared with other parts of the host.
    pub fn shared_executor(
        mut self,
        request_type: impl Into<String>,
        executor: Arc<dyn WorkflowExecutor>,
    ) -> Self {
        match RequestType::new(request_type) {
            Ok(request_type) => self.executors.register(request_type, executor),
            Err(err) => {
                self.error.get_or_insert(err);
            }
        }
        self
    }

    /// Finishes the orchestrator.
    ///
    /// # Errors
    ///
    /// [`Error::Incomplete`] without a strategy or without any executor,
    /// [`Error::InvalidRequest`] when an executor's request type is not a valid name.
    pub fn build(self) -> Result<RootOrchestrator> {
        if let Some(err) = self.error {
            return Err(err);
        }
        let strategy = self
            .strategy
            .ok_or(Error::Incomplete { what: "a strategy" })?;
        if self.executors.is_empty() {
            return Err(Error::Incomplete {
                what: "an executor for at least one request type",
            });
        }
        Ok(RootOrchestrator {
            strategy,
            executors: Arc::new(self.executors),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::MockWorkflowExecutor;
    use crate::model::{Configuration, Source};
    use crate::strategy::MockProcessingStrategy;

    fn orchestrator(strategy: MockProcessingStrategy) -> RootOrchestrator {
        RootOrchestrator::builder()
            .strategy(strategy)
            .executor("known", MockWorkflowExecutor::new())
            .build()
            .unwrap()
    }

    fn request(request_type: &str) -> NewRequest {
        let mut configuration = Configuration::new(["semaglutide"]);
        configuration.sources.push(Source::new("FDA", "regulatory"));
        NewRequest::new(
            "project",
            "user",
            RequestType::new(request_type).unwrap(),
            configuration,
        )
    }

    #[tokio::test]
    async fn refused_input_never_reaches_the_strategy() {
        let mut strategy = MockProcessingStrategy::new();
        strategy.expect_submit().never();
        let orchestrator = orchestrator(strategy);

        let mut invalid = request("known");
        invalid.configuration.keywords.clear();
        let err = orchestrator.submit(invalid).await.unwrap_err();
        assert!(matches!(
            err,
            Error::InvalidRequest { ref field, .. } if field == "configuration.keywords"
        ));

        let err = orchestrator.submit(request("unknown")).await.unwrap_err();
        assert!(matches!(err, Error::UnknownRequestType { .. }));
    }

    #[tokio::test]
    async fn results_are_refused_until_the_request_completes() {
        let mut strategy = MockProcessingStrategy::new();
        strategy.expect_status().returning(|id| {
            Ok(Some(Request {
                id: id.clone(),
                project_id: "p".into(),
                user_id: "u".into(),
                request_type: RequestType::new("known").unwrap(),
                priority: crate::model::Priority::Medium,
                configuration: Configuration::new(["x"]),
                status: RequestStatus::Executing,
                progress: Default::default(),
                results: None,
                errors: Vec::new(),
                history: Vec::new(),
                attempts: 1,
                max_attempts: 4,
                created_at: chrono::Utc::now(),
                started_at: None,
                completed_at: None,
                run_after: chrono::Utc::now(),
                lease: None,
            }))
        });
        let orchestrator = orchestrator(strategy);

        let id = RequestId::generate();
        match orchestrator.results(&id).await {
            Err(Error::ResultsUnavailable { status, .. }) => {
                assert_eq!(status, RequestStatus::Executing)
            }
            other => panic!("expected ResultsUnavailable, got {other:?}"),
        }
    }

    #[test]
    fn a_builder_without_executors_or_strategy_names_what_is_missing() {
        let err = RootOrchestrator::builder().build().unwrap_err();
        assert!(err.to_string().contains("strategy"), "{err}");

        let err = RootOrchestrator::builder()
            .strategy(MockProcessingStrategy::new())
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("executor"), "{err}");

        let err = RootOrchestrator::builder()
            .strategy(MockProcessingStrategy::new())
            .executor("bad type/with slash", MockWorkflowExecutor::new())
            .build()
            .unwrap_err();
        assert!(matches!(err, Error::InvalidRequest { ref field, .. } if field == "request_type"));
    }
}
