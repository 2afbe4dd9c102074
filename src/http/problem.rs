//! Error responses as RFC 9457 problem details (`application/problem+json`).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::Error;
use crate::model::{AttemptError, RequestId};
use crate::status::RequestStatus;

/// The media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// The `Retry-After` of a 503 that a later call may not meet, in seconds: long enough
/// not to hammer a store that is restarting, short enough for a brief outage.
pub const RETRY_AFTER_SECONDS: u32 = 5;

/// Longest part of a client's input (an id, a path) repeated in a `detail`, in characters.
const MAX_ECHO_CHARS: usize = 128;

/// Problem types: a URN per kind of problem, so that clients can branch on `type`
/// without parsing `title` or `detail`.
pub mod kind {
    /// A value in the body or the query is not accepted; `field` names it.
    pub const INVALID_REQUEST: &str = "urn:root-orchestrator:problem:invalid-request";
    /// The body is not JSON at all.
    pub const MALFORMED_JSON: &str = "urn:root-orchestrator:problem:malformed-json";
    /// The body is larger than the configured limit.
    pub const BODY_TOO_LARGE: &str = "urn:root-orchestrator:problem:body-too-large";
    /// The body is not sent as JSON.
    pub const UNSUPPORTED_MEDIA_TYPE: &str = "urn:root-orchestrator:problem:unsupported-media-type";
    /// No credentials, or credentials that are not accepted.
    pub const UNAUTHENTICATED: &str = "urn:root-orchestrator:problem:unauthenticated";
    /// The caller may not act for this user or project.
    pub const FORBIDDEN: &str = "urn:root-orchestrator:problem:forbidden";
    /// No such request, or none the caller may see.
    pub const NOT_FOUND: &str = "urn:root-orchestrator:problem:not-found";
    /// The route or method does not exist.
    pub const NO_ROUTE: &str = "urn:root-orchestrator:problem:no-route";
    /// The request has no results yet.
    pub const RESULTS_NOT_READY: &str = "urn:root-orchestrator:problem:results-not-ready";
    /// The request failed: it will never have results; `errors` lists every attempt's error.
    pub const REQUEST_FAILED: &str = "urn:root-orchestrator:problem:request-failed";
    /// The request was cancelled: it will never have results.
    pub const REQUEST_CANCELLED: &str = "urn:root-orchestrator:problem:request-cancelled";
    /// The request has already finished, so it cannot be cancelled.
    pub const ALREADY_FINISHED: &str = "urn:root-orchestrator:problem:already-finished";
    /// A caller-given `request_id` is already used by a request the caller may not see.
    /// Ids are one namespace across users, so this tells that the id is in use, and
    /// nothing else about that request.
    pub const ID_TAKEN: &str = "urn:root-orchestrator:problem:request-id-taken";
    /// The store or another dependency cannot be reached; try again later.
    pub const UNAVAILABLE: &str = "urn:root-orchestrator:problem:unavailable";
    /// A fault of the server; the details are in its log.
    pub const INTERNAL: &str = "urn:root-orchestrator:problem:internal";
}

/// One error response: an RFC 9457 problem with this API's extension members.
///
/// # Examples
///
/// ```
/// use root_orchestrator::http::Problem;
///
/// let problem = Problem::invalid("configuration.quality_threshold", "must be at most 1.0");
/// assert_eq!(problem.status, 422);
/// assert_eq!(problem.field.as_deref(), Some("configuration.quality_threshold"));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[non_exhaustive]
pub struct Problem {
    /// A URN naming the kind of problem (see [`kind`]).
    #[serde(rename = "type")]
    #[schema(value_type = String)]
    pub problem_type: &'static str,
    /// A short summary of the kind of problem.
    #[schema(value_type = String)]
    pub title: &'static str,
    /// The HTTP status code, repeated for clients that only keep the body.
    pub status: u16,
    /// What went wrong with this request.
    pub detail: String,
    /// Path of the offending field, such as `configuration.sources[1].type`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The request concerned, for problems about one request.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub request_id: Option<RequestId>,
    /// The status of that request when the problem arose.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_status: Option<RequestStatus>,
    /// Every failed attempt's error, for a request that failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<super::views::AttemptErrorView>>)]
    pub errors: Option<Vec<AttemptError>>,
    /// The `WWW-Authenticate` challenge sent with a 401; not part of the body.
    #[serde(skip)]
    challenge: Option<&'static str>,
    /// The `Retry-After` sent with a 503, in seconds; not part of the body.
    #[serde(skip)]
    retry_after: Option<u32>,
}

impl Problem {
    /// A problem of `problem_type` answered with `status`.
    pub fn new(
        status: StatusCode,
        problem_type: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Problem {
            problem_type,
            title,
            status: status.as_u16(),
            detail: detail.into(),
            field: None,
            request_id: None,
            request_status: None,
            errors: None,
            challenge: None,
            retry_after: None,
        }
    }

    /// 422: `field` holds a value that is not accepted.
    pub fn invalid(field: impl Into<String>, detail: impl Into<String>) -> Self {
        let field = field.into();
        let detail = format!("`{field}` {}", detail.into());
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            kind::INVALID_REQUEST,
            "Invalid request",
            detail,
        )
        .with_field(field)
    }

    /// 404 for an id that does not exist or that the caller may not see: the two are
    /// answered alike, so that the answer never tells that someone else's request exists.
    /// A long id is cut in `detail`.
    pub fn not_found(id: &str) -> Self {
        Problem::new(
            StatusCode::NOT_FOUND,
            kind::NOT_FOUND,
            "Request not found",
            format!("no request `{}` is visible to you", echo(id)),
        )
    }

    /// 404 for a path whose id cannot even be read (not UTF-8 once decoded): answered like
    /// any unknown id.
    pub(crate) fn unreadable_id() -> Self {
        Problem::new(
            StatusCode::NOT_FOUND,
            kind::NOT_FOUND,
            "Request not found",
            "no request with that id is visible to you",
        )
    }

    /// 401 with a bearer challenge; `invalid_token` when credentials were sent but refused.
    pub fn unauthenticated(detail: impl Into<String>, invalid_token: bool) -> Self {
        let mut problem = Problem::new(
            StatusCode::UNAUTHORIZED,
            kind::UNAUTHENTICATED,
            "Authentication required",
            detail,
        );
        problem.challenge = Some(if invalid_token {
            "Bearer realm=\"root-orchestrator\", error=\"invalid_token\""
        } else {
            "Bearer realm=\"root-orchestrator\""
        });
        problem
    }

    /// 401 for an `Authorization` that cannot be read as one credential (such as two
    /// headers): a bearer challenge with `invalid_request`.
    pub(crate) fn malformed_credentials(detail: impl Into<String>) -> Self {
        let mut problem = Problem::unauthenticated(detail, false);
        problem.challenge = Some("Bearer realm=\"root-orchestrator\", error=\"invalid_request\"");
        problem
    }

    /// 403: the caller may not act for `field`'s value.
    pub fn forbidden(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Problem::new(
            StatusCode::FORBIDDEN,
            kind::FORBIDDEN,
            "Not permitted",
            detail,
        )
        .with_field(field)
    }

    /// 500 for a fault of the server. The cause is logged, never sent to the client.
    pub fn internal() -> Self {
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            kind::INTERNAL,
            "Internal error",
            "the server could not answer; the cause is in its log",
        )
    }

    /// 503: the store (or another dependency) cannot be reached now; answered with
    /// `Retry-After` ([`RETRY_AFTER_SECONDS`]).
    pub fn unavailable(detail: impl Into<String>) -> Self {
        let mut problem = Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            kind::UNAVAILABLE,
            "Service unavailable",
            detail,
        );
        problem.retry_after = Some(RETRY_AFTER_SECONDS);
        problem
    }

    /// The same problem without `Retry-After`, for a 503 that waiting will not cure.
    pub(crate) fn without_retry_after(mut self) -> Self {
        self.retry_after = None;
        self
    }

    /// Names the offending field.
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// Names the request concerned and its status.
    pub fn with_request(mut self, id: &RequestId, status: RequestStatus) -> Self {
        self.request_id = Some(id.clone());
        self.request_status = Some(status);
        self
    }

    /// Attaches the errors of a failed request's attempts.
    pub fn with_errors(mut self, errors: Vec<AttemptError>) -> Self {
        self.errors = Some(errors);
        self
    }

    /// The HTTP status.
    pub fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl From<Error> for Problem {
    /// Maps the library's errors onto HTTP: input faults are 4xx, backend faults 503 or 500.
    fn from(err: Error) -> Self {
        match err {
            Error::InvalidRequest { field, problem } => Problem::invalid(field, problem),
            Error::UnknownRequestType { request_type } => Problem::invalid(
                "request_type",
                format!("`{request_type}` is not a request type this service runs"),
            ),
            Error::UnknownStatus { value } => Problem::invalid(
                "status",
                format!(
                    "`{value}` is not a status; one of {} is accepted",
                    RequestStatus::ALL.map(|s| s.as_str()).join(", ")
                ),
            ),
            Error::NotFound { request_id } => Problem::not_found(request_id.as_str()),
            Error::ResultsUnavailable { request_id, status } => {
                results_unavailable(&request_id, status, Vec::new())
            }
            // The request would not fit in a queue message: its content is the problem.
            Error::MessageTooLarge { size, limit } => Problem::invalid(
                "configuration",
                format!("makes a queue message of {size} bytes; the queue accepts at most {limit}"),
            ),
            err if err.is_transient() => {
                tracing::warn!(error = %chain(&err), "store unavailable");
                Problem::unavailable("the request store cannot be reached; try again shortly")
            }
            err => {
                tracing::error!(error = %chain(&err), "internal error");
                Problem::internal()
            }
        }
    }
}

/// `text`, cut to [`MAX_ECHO_CHARS`] characters (marked with `…`), for repeating client
/// input in a `detail` without letting the client decide how large the answer is.
pub(crate) fn echo(text: &str) -> std::borrow::Cow<'_, str> {
    match text.char_indices().nth(MAX_ECHO_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]).into(),
        None => text.into(),
    }
}

/// An error and its causes on one line, for the log.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// 409 for results asked of a request that has none: not yet, or never (failed or
/// cancelled), told apart by `type`.
pub(crate) fn results_unavailable(
    id: &RequestId,
    status: RequestStatus,
    errors: Vec<AttemptError>,
) -> Problem {
    let problem = match status {
        RequestStatus::Failed => Problem::new(
            StatusCode::CONFLICT,
            kind::REQUEST_FAILED,
            "Request failed",
            format!("request `{id}` failed and has no results; `errors` lists each attempt"),
        )
        .with_errors(errors),
        RequestStatus::Cancelled => Problem::new(
            StatusCode::CONFLICT,
            kind::REQUEST_CANCELLED,
            "Request cancelled",
            format!("request `{id}` was cancelled and has no results"),
        ),
        _ => Problem::new(
            StatusCode::CONFLICT,
            kind::RESULTS_NOT_READY,
            "Results not ready",
            format!("request `{id}` is {status}; results exist once it is COMPLETED"),
        ),
    };
    problem.with_request(id, status)
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = self.status_code();
        let body = match serde_json::to_vec(&self) {
            Ok(body) => body,
            // Every field serialises; this only guards against a future field that does not.
            Err(_) => br#"{"title":"Internal error","status":500}"#.to_vec(),
        };
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(challenge) = self.challenge {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        if let Some(seconds) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_errors_map_to_client_and_server_statuses() {
        let cases = [
            (
                Error::invalid("configuration.keywords", "must not be empty"),
                422,
            ),
            (
                Error::UnknownStatus {
                    value: "DONE".into(),
                },
                422,
            ),
            (
                Error::NotFound {
                    request_id: RequestId::generate(),
                },
                404,
            ),
            (
                Error::ResultsUnavailable {
                    request_id: RequestId::generate(),
                    status: RequestStatus::Pending,
                },
                409,
            ),
            (
                Error::store("get", std::io::Error::other("connection reset")),
                503,
            ),
            (
                Error::MessageTooLarge {
                    size: 2_000_000,
                    limit: 1_048_576,
                },
                422,
            ),
            (Error::Incomplete { what: "a strategy" }, 500),
        ];
        for (err, status) in cases {
            let text = err.to_string();
            assert_eq!(Problem::from(err).status, status, "{text}");
        }
    }

    #[test]
    fn backend_details_never_reach_the_body() {
        let err = Error::store("get", std::io::Error::other("password=hunter2"));
        let body = serde_json::to_string(&Problem::from(err)).unwrap();
        assert!(!body.contains("hunter2"), "{body}");
    }

    #[test]
    fn unauthenticated_problems_carry_a_bearer_challenge() {
        let response = Problem::unauthenticated("token refused", true).into_response();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let challenge = response.headers()[header::WWW_AUTHENTICATE]
            .to_str()
            .unwrap();
        assert!(challenge.contains("invalid_token"), "{challenge}");
        assert_eq!(response.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
    }

    #[test]
    fn unavailable_problems_say_when_to_retry() {
        let err = Error::store("get", std::io::Error::other("connection reset"));
        let response = Problem::from(err).into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "5");

        let response = Problem::unavailable("no recorder")
            .without_retry_after()
            .into_response();
        assert!(response.headers().get(header::RETRY_AFTER).is_none());
        let response = Problem::not_found("x").into_response();
        assert!(response.headers().get(header::RETRY_AFTER).is_none());
    }

    #[test]
    fn a_long_unknown_id_is_cut_in_the_detail() {
        let id = "é".repeat(5000);
        let detail = Problem::not_found(&id).detail;
        assert!(
            detail.chars().count() < 200,
            "{} chars",
            detail.chars().count()
        );
        assert!(
            detail.contains(&format!("`{}…`", "é".repeat(128))),
            "{detail}"
        );
        let short = Problem::not_found("req-1").detail;
        assert_eq!(short, "no request `req-1` is visible to you");
    }
}
