//! The JSON bodies the API answers with: views of stored requests for their owners.
//!
//! Views leave out what only workers need (lease tokens, worker ids): a lease token is a
//! write credential, and worker names describe the deployment, not the request.

use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use crate::model::{Configuration, Priority, Request, RequestId, RequestResults};
use crate::status::RequestStatus;

/// Where a request's resources are, relative to the server's root.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct Links {
    /// `GET` this for status, progress, attempts and errors.
    pub status: String,
    /// `GET` this for the results once the request is `COMPLETED`.
    pub results: String,
    /// `POST` to this to cancel the request while it is pending or running.
    pub cancel: String,
}

impl Links {
    /// Links of request `id` under `collection`, the path of the requests collection as
    /// the caller reached it (so links stay right when the router is nested).
    pub fn new(collection: &str, id: &RequestId) -> Self {
        Links {
            status: format!("{collection}/{id}/status"),
            results: format!("{collection}/{id}/results"),
            cancel: format!("{collection}/{id}/cancel"),
        }
    }
}

/// The answer to a submit: the request as stored.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct Accepted {
    /// The request's id: the caller's, or a generated UUIDv7.
    #[schema(value_type = String)]
    pub request_id: RequestId,
    /// Its status now (`PENDING` for a new request).
    pub status: RequestStatus,
    /// Whether the id had been submitted before: the request returned is that first one,
    /// and nothing new was stored.
    pub replayed: bool,
    /// When it was first stored.
    pub created_at: DateTime<Utc>,
    /// Where to follow it.
    pub links: Links,
}

/// How far a running request has come.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct ProgressView {
    /// The workflow stage running now, such as `discovery`.
    pub current_stage: Option<String>,
    /// 0 to 100; never goes down within an attempt.
    pub percentage: u8,
    /// Documents or pages found so far.
    pub urls_found: u64,
    /// Pieces of content extracted so far.
    pub content_extracted: u64,
    /// When the workflow expects to finish.
    pub estimated_completion: Option<DateTime<Utc>>,
}

/// Why one attempt failed.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct AttemptErrorView {
    /// The attempt, counting from 1.
    pub attempt: u32,
    /// What went wrong.
    pub message: String,
    /// Whether the failure was worth another attempt.
    pub retryable: bool,
    /// When it was recorded.
    pub at: DateTime<Utc>,
}

/// One status change.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct HistoryEntry {
    /// The status entered.
    pub status: RequestStatus,
    /// When.
    pub at: DateTime<Utc>,
    /// Why, in a few words.
    pub reason: String,
}

/// A request as its owner sees it: status, progress, attempts, timestamps and errors.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct RequestView {
    /// The request's id.
    #[schema(value_type = String)]
    pub request_id: RequestId,
    /// The project it belongs to.
    pub project_id: String,
    /// The user who submitted it.
    pub user_id: String,
    /// Which workflow runs it.
    pub request_type: String,
    /// Claim priority.
    pub priority: Priority,
    /// Where it is in its lifecycle.
    pub status: RequestStatus,
    /// Progress of the current or last attempt.
    pub progress: ProgressView,
    /// Attempts started so far, the running one included.
    pub attempts: u32,
    /// Attempts allowed before the request fails.
    pub max_attempts: u32,
    /// When it was stored.
    pub created_at: DateTime<Utc>,
    /// When its latest attempt started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it reached `COMPLETED`, `FAILED` or `CANCELLED`.
    pub completed_at: Option<DateTime<Utc>>,
    /// For a `PENDING` request: the earliest time of its next attempt (a retry waits out
    /// its backoff).
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// One entry per failed attempt, oldest first.
    pub errors: Vec<AttemptErrorView>,
    /// Every status change, oldest first.
    pub history: Vec<HistoryEntry>,
    /// What it was asked to do.
    pub configuration: Configuration,
    /// Where to follow it.
    pub links: Links,
}

impl RequestView {
    pub fn new(request: &Request, collection: &str) -> Self {
        RequestView {
            request_id: request.id.clone(),
            project_id: request.project_id.clone(),
            user_id: request.user_id.clone(),
            request_type: request.request_type.to_string(),
            priority: request.priority,
            status: request.status,
            progress: ProgressView {
                current_stage: request.progress.current_stage.clone(),
                percentage: request.progress.percentage,
                urls_found: request.progress.urls_found,
                content_extracted: request.progress.content_extracted,
                estimated_completion: request.progress.estimated_completion,
            },
            attempts: request.attempts,
            max_attempts: request.max_attempts,
            created_at: request.created_at,
            started_at: request.started_at,
            completed_at: request.completed_at,
            next_attempt_at: (request.status == RequestStatus::Pending)
                .then_some(request.run_after),
            errors: request
                .errors
                .iter()
                .map(|e| AttemptErrorView {
                    attempt: e.attempt,
                    message: e.message.clone(),
                    retryable: e.retryable,
                    at: e.at,
                })
                .collect(),
            history: request
                .history
                .iter()
                .map(|h| HistoryEntry {
                    status: h.status,
                    at: h.at,
                    reason: h.reason.clone(),
                })
                .collect(),
            configuration: request.configuration.clone(),
            links: Links::new(collection, &request.id),
        }
    }
}

/// The results of a completed request.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct ResultsView {
    /// The request's id.
    #[schema(value_type = String)]
    pub request_id: RequestId,
    /// Always `COMPLETED`.
    pub status: RequestStatus,
    /// When it completed.
    pub completed_at: Option<DateTime<Utc>>,
    /// Where the workflow wrote its report, if it wrote one.
    pub report_path: Option<String>,
    /// The workflow's JSON summary of its findings.
    #[schema(value_type = Object)]
    pub summary: serde_json::Value,
}

impl ResultsView {
    pub fn new(request: &Request, results: RequestResults) -> Self {
        ResultsView {
            request_id: request.id.clone(),
            status: request.status,
            completed_at: request.completed_at,
            report_path: results.report_path,
            summary: results.summary,
        }
    }
}

/// The answer to a successful cancel.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct CancelledView {
    /// The request's id.
    #[schema(value_type = String)]
    pub request_id: RequestId,
    /// Always `CANCELLED`.
    pub status: RequestStatus,
    /// Its status before: `PENDING`, or `PROCESSING` / `EXECUTING` when a worker was
    /// running it (the worker is told to stop; whatever it returns is discarded).
    pub previous_status: RequestStatus,
    /// Where to follow it.
    pub links: Links,
}

/// One page of a listing, newest first.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct PageView {
    /// The requests on this page.
    pub requests: Vec<RequestView>,
    /// Pass as `cursor` to get the next page; `null` on the last page.
    pub next_cursor: Option<String>,
    /// The next page's URL, with the same filters; `null` on the last page.
    pub next: Option<String>,
}

/// The answer of `/health` and `/ready`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct HealthView {
    /// `ok` (alive) or `ready` (the store answers).
    pub status: &'static str,
}
