//! The HTTP API (feature `http`): an axum [`Router`] over a [`RootOrchestrator`] that host
//! services mount or serve.
//!
//! | route | answers |
//! |---|---|
//! | `POST /market-intelligence/requests` | 202: the stored request's id, status and links |
//! | `GET /market-intelligence/requests` | the caller's visible requests, newest first, in pages |
//! | `GET .../requests/{id}/status` | status, progress, attempts, timestamps, errors |
//! | `GET .../requests/{id}/results` | 200 once `COMPLETED`, 409 before or on failure |
//! | `POST .../requests/{id}/cancel` | 200 when cancelled, 409 once finished |
//! | `GET /health`, `GET /ready` | liveness; readiness (the store, and any queue, answer) |
//! | `GET /metrics` | Prometheus text |
//! | `GET /openapi.json` | the OpenAPI 3.1 document of all of the above |
//!
//! # Who sees what
//!
//! Request routes need credentials, which an [`Authenticator`] turns into a [`Principal`]:
//! a user and the projects they may access ([`StaticTokens`] reads fixed bearer tokens).
//! Credentials are checked before the body is read, so a caller without them can neither
//! send a body nor keep the server waiting for one. A principal sees, lists and cancels the
//! requests it submitted and every request of its projects; reading or cancelling any other
//! request answers 404 exactly as a missing one does. A submit must be for one of the
//! principal's projects, and as the principal: `user_id` may be left out (it is filled in),
//! and naming another user is refused with 403 rather than rewritten, so that a client's
//! mistake shows. Listings are limited to what the principal may see inside the store (see
//! [`ListFilter::visible_to`]), so pages and cursors stay exact.
//!
//! One thing does show across users: request ids are a single namespace, so a submit with
//! a caller-given `request_id` that another user already used answers 409
//! (`request-id-taken`), which tells that the id is in use, though nothing else about that
//! request. Ids are generated (UUIDv7) when left out, which is the default; clients that
//! give their own, for idempotent retries, should use random ones such as UUIDs.
//!
//! The operational routes (`/health`, `/ready`, `/metrics`, `/openapi.json`) need no
//! credentials; expose them only where your network policy allows.
//!
//! # Errors
//!
//! Every error the router answers is an RFC 9457 problem (`application/problem+json`, see
//! [`Problem`]): 400 malformed JSON, 401 no valid credentials (none, a wrong token, or
//! more than one `Authorization` header), 403 another user or project, 404 an unknown (or
//! invisible, or unreadable) id, 409 results not ready, a failed or cancelled request's
//! results, a finished request's cancel or a `request_id` taken by someone else, 413 a
//! body over the limit, 415 not JSON, 422 a body that is not a JSON object or a value that
//! is not accepted (`field` names it; a repeated query parameter too), 503 the store is
//! unreachable (with `Retry-After`). Nothing is stored for a refused request. An empty
//! query value (`?status=`) is the same as leaving the parameter out.
//!
//! Errors raised by the HTTP server before the router sees a call are not problems: hyper
//! answers a header section over its limit with a bare 431, for example.
//!
//! [`ListFilter::visible_to`]: crate::ListFilter::visible_to
//!
//! # Examples
//!
//! ```no_run
//! use root_orchestrator::http::{HttpApi, StaticTokens};
//! # use root_orchestrator::RootOrchestrator;
//!
//! # async fn serve(orchestrator: RootOrchestrator) -> Result<(), Box<dyn std::error::Error>> {
//! let tokens = StaticTokens::from_env(StaticTokens::ENV_VAR)?;
//! let app = HttpApi::new(orchestrator, tokens).router();
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! axum::serve(listener, app).await?;
//! # Ok(())
//! # }
//! ```

mod auth;
mod metrics;
mod openapi;
mod problem;
mod router;
mod views;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;

pub use auth::{AuthError, Authenticator, Principal, StaticTokens, bearer_token};
pub use metrics::{PROCESSING_SECONDS, PROCESSING_SECONDS_BUCKETS, QUEUE_DEPTH, install_recorder};
pub use openapi::openapi;
pub use problem::{PROBLEM_JSON, Problem, RETRY_AFTER_SECONDS, kind};

use crate::orchestrator::RootOrchestrator;
use router::{ApiState, REQUESTS};

/// Builds the HTTP API's [`Router`] for one orchestrator.
///
/// # Examples
///
/// ```
/// use root_orchestrator::http::{HttpApi, Principal, StaticTokens};
/// # use root_orchestrator::{
/// #     MemoryStore, Request, RequestResults, RootOrchestrator, TableConfig, TableStrategy,
/// #     WorkflowContext, WorkflowError, WorkflowExecutor,
/// # };
/// # struct Noop;
/// # #[async_trait::async_trait]
/// # impl WorkflowExecutor for Noop {
/// #     async fn execute(&self, _: &Request, _: &WorkflowContext)
/// #         -> Result<RequestResults, WorkflowError> {
/// #         Ok(RequestResults::new(None, serde_json::json!({})))
/// #     }
/// # }
/// # fn orchestrator() -> root_orchestrator::Result<RootOrchestrator> {
/// #     let strategy = TableStrategy::new(MemoryStore::new(), TableConfig::default())?;
/// #     RootOrchestrator::builder()
/// #         .strategy(strategy)
/// #         .executor("semaglutide_intelligence", Noop)
/// #         .build()
/// # }
///
/// let tokens = StaticTokens::new()
///     .with_token("dev-token", Principal::new("alice", ["glp1-market-watch"]))?;
/// let router = HttpApi::new(orchestrator()?, tokens)
///     .with_body_limit(64 * 1024)
///     .router();
/// # drop(router);
/// # Ok::<(), root_orchestrator::Error>(())
/// ```
#[must_use]
pub struct HttpApi {
    orchestrator: RootOrchestrator,
    authenticator: Arc<dyn Authenticator>,
    metrics: Option<PrometheusHandle>,
    body_limit: usize,
    default_page_size: usize,
    max_page_size: usize,
}

impl std::fmt::Debug for HttpApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpApi")
            .field("orchestrator", &self.orchestrator)
            .field("body_limit", &self.body_limit)
            .field("default_page_size", &self.default_page_size)
            .field("max_page_size", &self.max_page_size)
            .finish_non_exhaustive()
    }
}

impl HttpApi {
    /// Largest accepted body when none is set: room for the largest configuration the
    /// model accepts ([`MAX_CONFIGURATION_BYTES`](crate::MAX_CONFIGURATION_BYTES)) and
    /// the envelope around it.
    pub const DEFAULT_BODY_LIMIT: usize = 128 * 1024;
    /// Page size of a listing that does not ask for one.
    pub const DEFAULT_PAGE_SIZE: usize = 20;
    /// Largest page a listing may ask for.
    pub const MAX_PAGE_SIZE: usize = 100;

    /// The API over `orchestrator`, authenticating callers with `authenticator`.
    pub fn new(orchestrator: RootOrchestrator, authenticator: impl Authenticator) -> Self {
        Self::with_shared_authenticator(orchestrator, Arc::new(authenticator))
    }

    /// Like [`new`](Self::new), for an authenticator shared with other parts of the host.
    pub fn with_shared_authenticator(
        orchestrator: RootOrchestrator,
        authenticator: Arc<dyn Authenticator>,
    ) -> Self {
        HttpApi {
            orchestrator,
            authenticator,
            metrics: None,
            body_limit: Self::DEFAULT_BODY_LIMIT,
            default_page_size: Self::DEFAULT_PAGE_SIZE,
            max_page_size: Self::MAX_PAGE_SIZE,
        }
    }

    /// Refuses bodies larger than `bytes` with 413.
    pub fn with_body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    /// Serves `/metrics` from `handle`, the handle of a Prometheus recorder the host
    /// installed itself. Without this, [`router`](Self::router) installs one with
    /// [`install_recorder`].
    pub fn with_metrics(mut self, handle: PrometheusHandle) -> Self {
        self.metrics = Some(handle);
        self
    }

    /// The router. Serve it with `axum::serve`, or nest it in the host's own router;
    /// links in answers follow the prefix it is nested under.
    ///
    /// Unless [`with_metrics`](Self::with_metrics) was called, this installs the process's
    /// Prometheus recorder ([`install_recorder`]); if the host installed another
    /// recorder, `/metrics` answers 503 and a warning is logged.
    pub fn router(self) -> Router {
        let metrics = self.metrics.or_else(|| match install_recorder() {
            Ok(handle) => Some(handle),
            Err(err) => {
                tracing::warn!(error = %err, "GET /metrics will answer 503");
                None
            }
        });
        let state = Arc::new(ApiState {
            orchestrator: self.orchestrator,
            authenticator: self.authenticator,
            metrics,
            default_page_size: self.default_page_size,
            max_page_size: self.max_page_size,
        });

        Router::new()
            .route(REQUESTS, post(router::submit).get(router::list))
            .route(&format!("{REQUESTS}/{{id}}/status"), get(router::status))
            .route(&format!("{REQUESTS}/{{id}}/results"), get(router::results))
            .route(&format!("{REQUESTS}/{{id}}/cancel"), post(router::cancel))
            .route("/health", get(router::health))
            .route("/ready", get(router::ready))
            .route("/metrics", get(router::metrics))
            .route("/openapi.json", get(router::openapi_json))
            .fallback(router::no_route)
            .method_not_allowed_fallback(router::wrong_method)
            .layer(DefaultBodyLimit::max(self.body_limit))
            .with_state(state)
    }
}
