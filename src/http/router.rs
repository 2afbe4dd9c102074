//! The routes and their handlers.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequestParts, OriginalUri, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use utoipa::IntoParams;

use super::auth::{AuthError, Authenticator, Principal};
use super::problem::{self, Problem, kind};
use super::views::{
    Accepted, CancelledView, HealthView, Links, PageView, RequestView, ResultsView,
};
use crate::error::Error;
use crate::model::{NewRequest, Request, RequestId, RequestMessage, RequestType};
use crate::orchestrator::RootOrchestrator;
use crate::status::RequestStatus;
use crate::store::{CancelOutcome, InsertOutcome, ListCursor, ListFilter};

/// The requests collection; every request's routes hang below it.
pub(crate) const REQUESTS: &str = "/market-intelligence/requests";

/// What every handler shares.
pub(crate) struct ApiState {
    pub orchestrator: RootOrchestrator,
    pub authenticator: Arc<dyn Authenticator>,
    pub metrics: Option<PrometheusHandle>,
    pub default_page_size: usize,
    pub max_page_size: usize,
}

type Shared = State<Arc<ApiState>>;

impl ApiState {
    async fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, Problem> {
        self.authenticator
            .authenticate(headers)
            .await
            .map_err(|err| match err {
                AuthError::MissingCredentials => Problem::unauthenticated(err.to_string(), false),
                AuthError::InvalidCredentials => Problem::unauthenticated(err.to_string(), true),
                AuthError::AmbiguousCredentials => Problem::malformed_credentials(err.to_string()),
                AuthError::Unavailable(cause) => {
                    tracing::warn!(error = %cause, "authenticator unavailable");
                    Problem::unavailable("credentials cannot be checked now; try again shortly")
                }
            })
    }

    /// The request `raw_id` if it exists and `principal` may see it; 404 alike otherwise.
    async fn visible_request(
        &self,
        principal: &Principal,
        raw_id: &str,
    ) -> Result<Request, Problem> {
        // An id that could never have been stored is simply not found.
        let id = RequestId::parse(raw_id).map_err(|_| Problem::not_found(raw_id))?;
        match self.orchestrator.status(&id).await {
            Ok(request) if principal.can_see(&request) => Ok(request),
            Ok(_) | Err(Error::NotFound { .. }) => Err(Problem::not_found(raw_id)),
            Err(err) => Err(err.into()),
        }
    }
}

/// The authenticated caller of a request route.
///
/// Handlers take it before every other extractor but `State`: axum runs extractors in
/// order and the body's last, so a call without valid credentials is refused before its
/// body is read, and a client without a token can neither send the server a body nor
/// keep it waiting for one.
pub(crate) struct Caller(Principal);

impl FromRequestParts<Arc<ApiState>> for Caller {
    type Rejection = Problem;

    async fn from_request_parts(
        parts: &mut Parts,
        api: &Arc<ApiState>,
    ) -> Result<Self, Self::Rejection> {
        api.authenticate(&parts.headers).await.map(Caller)
    }
}

/// The `{id}` of a request route. A segment that is not UTF-8 once percent-decoded is no
/// id that could have been stored, so it is not found, like any other unknown id.
#[allow(clippy::result_large_err)] // as for `read_submission`
fn path_id(id: Result<Path<String>, PathRejection>) -> Result<String, Problem> {
    id.map(|Path(id)| id).map_err(|rejection| {
        tracing::debug!(%rejection, "unreadable request id in the path");
        Problem::unreadable_id()
    })
}

/// The requests collection as the caller addressed it: the path before
/// [`REQUESTS`] is the prefix the host nested the router under.
fn collection(uri: &OriginalUri) -> String {
    let path = uri.path();
    let prefix = path.find(REQUESTS).map_or("", |at| &path[..at]);
    format!("{prefix}{REQUESTS}")
}

/// Whether a `Content-Type` names JSON: `application/json` or any `application/*+json`,
/// parameters such as `charset` allowed.
fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Reads a submitted body into a checked submission for `principal`.
// A problem is built at most once per call and answered at once: boxing it buys nothing.
#[allow(clippy::result_large_err)]
fn read_submission(
    principal: &Principal,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<NewRequest, Problem> {
    if !is_json(headers) {
        return Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            kind::UNSUPPORTED_MEDIA_TYPE,
            "Unsupported media type",
            "send the request as JSON, with `Content-Type: application/json`",
        ));
    }
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                kind::BODY_TOO_LARGE,
                "Body too large",
                "the body is larger than this server accepts",
            )
        } else {
            Problem::new(
                StatusCode::BAD_REQUEST,
                kind::MALFORMED_JSON,
                "Unreadable body",
                rejection.body_text(),
            )
        }
    })?;

    // Syntax first (400), then shape and values (422): a client that sends broken JSON
    // has a different bug from one that sends a wrong value.
    let mut value: serde_json::Value = serde_json::from_slice(&body).map_err(|err| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            kind::MALFORMED_JSON,
            "Malformed JSON",
            format!("the body is not valid JSON: {err}"),
        )
    })?;

    // Serde would take a positional array for the message's fields; the wire shape is an
    // object, as `RequestMessage::from_json` insists too.
    let Some(fields) = value.as_object_mut() else {
        return Err(Problem::invalid(
            ".",
            "must be a JSON object: the request in the wire shape",
        ));
    };
    // The caller is known, so `user_id` may be left out; one that is given is checked below.
    fields
        .entry("user_id")
        .or_insert_with(|| principal.user_id.clone().into());

    let message: RequestMessage = serde_path_to_error::deserialize(value).map_err(|err| {
        let mut field = crate::model::field_path(err.path());
        let problem = err.into_inner().to_string();
        // serde names a missing field in its message and the object holding it in the
        // path; the field's own path is what a client needs.
        if let Some(missing) = problem
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split('`').next())
        {
            field = match field.as_str() {
                "." => missing.to_owned(),
                parent => format!("{parent}.{missing}"),
            };
            return Problem::invalid(field, "is required");
        }
        Problem::invalid(field, format!("is not accepted: {problem}"))
    })?;
    let request = message.into_new_request()?;

    // Acting for someone else is refused rather than silently rewritten: a client that
    // names another user has a bug or an intent worth surfacing.
    if request.user_id != principal.user_id {
        return Err(Problem::forbidden(
            "user_id",
            format!(
                "you are authenticated as `{}` and may submit only as that user",
                principal.user_id
            ),
        ));
    }
    if !principal.may_use_project(&request.project_id) {
        return Err(Problem::forbidden(
            "project_id",
            format!("you may not submit to project `{}`", request.project_id),
        ));
    }
    Ok(request)
}

/// Submit a market-intelligence request.
///
/// The body is a request in the wire shape, a JSON object. `user_id` may be left out (it
/// is the caller); if given it must be the caller. A caller-given `request_id` makes the
/// call idempotent: the same id again answers with the request stored the first time.
/// Ids are one namespace across all users, so an id someone else already used answers 409
/// (without any detail of that request): use random ids such as UUIDs, or leave the id
/// out and let the server generate one.
#[utoipa::path(
    post,
    path = "/market-intelligence/requests",
    tag = "requests",
    request_body(content = RequestMessage, content_type = "application/json"),
    responses(
        (status = 202, description = "Stored (or, for a repeated `request_id`, found)",
            body = Accepted,
            headers(("Location" = String, description = "The request's status URL"))),
        (status = 400, description = "The body is not JSON",
            body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid credentials (checked before the body is read)",
            body = Problem, content_type = "application/problem+json",
            headers(("WWW-Authenticate" = String, description = "A `Bearer` challenge"))),
        (status = 403, description = "`user_id` is not the caller, or `project_id` is not \
            one of the caller's projects",
            body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`request-id-taken`: the caller-given `request_id` is \
            already used by a request the caller may not see (nothing else about it is told)",
            body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The body is larger than the server accepts",
            body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "The body is not sent as JSON",
            body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The body is not a JSON object, or a value is not \
            accepted; `field` names it (`.` for the whole body)",
            body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The store or the queue cannot be reached",
            body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u32, description = "Seconds to wait before trying again"))),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn submit(
    State(api): Shared,
    Caller(principal): Caller,
    uri: OriginalUri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    let request = read_submission(&principal, &headers, body)?;

    let (stored, replayed) = match api.orchestrator.submit_detailed(request).await? {
        InsertOutcome::Inserted(request) => (request, false),
        InsertOutcome::Existing(request) if principal.can_see(&request) => (request, true),
        // Ids are one namespace, so that the id is in use cannot be hidden without
        // redesigning them; everything else about the other request is.
        InsertOutcome::Existing(_) => {
            return Err(Problem::new(
                StatusCode::CONFLICT,
                kind::ID_TAKEN,
                "Request id taken",
                "this request_id is already used; choose another, such as a random UUID, \
                 or leave it out to have one generated",
            )
            .with_field("request_id"));
        }
    };

    let links = Links::new(&collection(&uri), &stored.id);
    let location = HeaderValue::from_str(&links.status).ok();
    let accepted = Accepted {
        request_id: stored.id.clone(),
        status: stored.status,
        replayed,
        created_at: stored.created_at,
        links,
    };
    let mut response = (StatusCode::ACCEPTED, Json(accepted)).into_response();
    if let Some(location) = location {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// A request's status, progress, attempts, timestamps and errors.
#[utoipa::path(
    get,
    path = "/market-intelligence/requests/{id}/status",
    tag = "requests",
    params(("id" = String, Path, description = "The request's id")),
    responses(
        (status = 200, description = "The request", body = RequestView),
        (status = 401, description = "No valid credentials",
            body = Problem, content_type = "application/problem+json",
            headers(("WWW-Authenticate" = String, description = "A `Bearer` challenge"))),
        (status = 404, description = "No such request visible to the caller",
            body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The store cannot be reached",
            body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u32, description = "Seconds to wait before trying again"))),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn status(
    State(api): Shared,
    Caller(principal): Caller,
    uri: OriginalUri,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<RequestView>, Problem> {
    let request = api.visible_request(&principal, &path_id(id)?).await?;
    Ok(Json(RequestView::new(&request, &collection(&uri))))
}

/// A completed request's results.
///
/// Before the request completes this answers 409 with its current status; a failed
/// request answers 409 with every attempt's error, a cancelled one 409 as well.
#[utoipa::path(
    get,
    path = "/market-intelligence/requests/{id}/results",
    tag = "requests",
    params(("id" = String, Path, description = "The request's id")),
    responses(
        (status = 200, description = "The results", body = ResultsView),
        (status = 401, description = "No valid credentials",
            body = Problem, content_type = "application/problem+json",
            headers(("WWW-Authenticate" = String, description = "A `Bearer` challenge"))),
        (status = 404, description = "No such request visible to the caller",
            body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "No results: not completed yet (`results-not-ready`, \
            with `request_status`), failed (`request-failed`, with `errors`) or cancelled \
            (`request-cancelled`)",
            body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The store cannot be reached",
            body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u32, description = "Seconds to wait before trying again"))),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn results(
    State(api): Shared,
    Caller(principal): Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<ResultsView>, Problem> {
    let request = api.visible_request(&principal, &path_id(id)?).await?;
    match (request.status, request.results.clone()) {
        (RequestStatus::Completed, Some(results)) => Ok(Json(ResultsView::new(&request, results))),
        (status, _) => Err(problem::results_unavailable(
            &request.id,
            status,
            request.errors,
        )),
    }
}

/// Cancel a pending or running request.
#[utoipa::path(
    post,
    path = "/market-intelligence/requests/{id}/cancel",
    tag = "requests",
    params(("id" = String, Path, description = "The request's id")),
    responses(
        (status = 200, description = "Cancelled", body = CancelledView),
        (status = 401, description = "No valid credentials",
            body = Problem, content_type = "application/problem+json",
            headers(("WWW-Authenticate" = String, description = "A `Bearer` challenge"))),
        (status = 404, description = "No such request visible to the caller",
            body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The request has already finished; `request_status` says how",
            body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The store cannot be reached",
            body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u32, description = "Seconds to wait before trying again"))),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn cancel(
    State(api): Shared,
    Caller(principal): Caller,
    uri: OriginalUri,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<CancelledView>, Problem> {
    let id = path_id(id)?;
    let request = api.visible_request(&principal, &id).await?;
    match api.orchestrator.cancel(&request.id).await? {
        CancelOutcome::Cancelled { previous } => Ok(Json(CancelledView {
            links: Links::new(&collection(&uri), &request.id),
            request_id: request.id,
            status: RequestStatus::Cancelled,
            previous_status: previous,
        })),
        CancelOutcome::AlreadyTerminal(status) => Err(Problem::new(
            StatusCode::CONFLICT,
            kind::ALREADY_FINISHED,
            "Request already finished",
            format!(
                "request `{}` is {status} and can no longer be cancelled",
                request.id
            ),
        )
        .with_request(&request.id, status)),
        // Pruned between the two calls.
        CancelOutcome::NotFound => Err(Problem::not_found(&id)),
    }
}

/// Filters and paging of a listing. Each parameter may be given once; an empty value
/// (`?status=`) is the same as leaving the parameter out, as HTML forms send unset fields.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListParams {
    /// Only requests in this status (`PENDING`, `PROCESSING`, `EXECUTING`, `COMPLETED`,
    /// `FAILED` or `CANCELLED`; any case). Empty: any status.
    #[param(value_type = Option<String>)]
    status: Option<String>,
    /// Only requests of this project. Empty: every project the caller may see.
    project_id: Option<String>,
    /// Only requests of this type. Empty: any type.
    request_type: Option<String>,
    /// Continue after this position: a previous page's `next_cursor`. Empty: the first page.
    cursor: Option<String>,
    /// Page size, 1 to 100 (20 when left out or empty).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 100)]
    limit: Option<String>,
}

/// A query value, with an empty one taken as left out.
fn given(value: &Option<String>) -> Option<&str> {
    value.as_deref().filter(|v| !v.is_empty())
}

impl ListParams {
    /// The store filter these parameters ask for, limited to what `principal` may see.
    #[allow(clippy::result_large_err)] // as for `read_submission`
    fn filter(&self, principal: &Principal, api: &ApiState) -> Result<ListFilter, Problem> {
        let mut filter = ListFilter::new().visible_to(principal.visibility());
        if let Some(status) = given(&self.status) {
            filter = filter.with_status(status.parse()?);
        }
        if let Some(project_id) = given(&self.project_id) {
            filter = filter.with_project(project_id);
        }
        if let Some(request_type) = given(&self.request_type) {
            filter = filter.with_request_type(RequestType::new(request_type)?);
        }
        if let Some(cursor) = given(&self.cursor) {
            filter = filter.after(cursor.parse::<ListCursor>()?);
        }
        let limit = match given(&self.limit) {
            None => api.default_page_size,
            Some(text) => text
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=api.max_page_size).contains(n))
                .ok_or_else(|| {
                    Problem::invalid(
                        "limit",
                        format!(
                            "must be a whole number from 1 to {}, got `{}`",
                            api.max_page_size,
                            problem::echo(text)
                        ),
                    )
                })?,
        };
        Ok(filter.with_limit(limit))
    }

    /// The query string of the page after `cursor`, with the same filters.
    fn next_query(&self, cursor: &str) -> String {
        let pairs = [
            ("status", given(&self.status)),
            ("project_id", given(&self.project_id)),
            ("request_type", given(&self.request_type)),
            ("limit", given(&self.limit)),
            ("cursor", Some(cursor)),
        ];
        pairs
            .into_iter()
            .filter_map(|(name, value)| value.map(|v| format!("{name}={}", encode(v))))
            .collect::<Vec<_>>()
            .join("&")
    }
}

/// The problem for a query string that does not read as [`ListParams`], from the text of
/// axum's rejection (serde's message names an unknown or repeated field between backticks).
fn query_problem(rejection: &str) -> Problem {
    let named = |marker: &str| {
        rejection
            .split_once(marker)
            .and_then(|(_, rest)| rest.split('`').next())
            .map(|name| problem::echo(name).into_owned())
    };
    if let Some(field) = named("unknown field `") {
        Problem::invalid(field, "is not a query parameter of this listing")
    } else if let Some(field) = named("duplicate field `") {
        Problem::invalid(field, "is given more than once; give each parameter once")
    } else {
        Problem::invalid("query", "could not be read as this listing's parameters")
    }
}

/// Percent-encodes a query value: everything but unreserved characters.
fn encode(value: &str) -> String {
    let mut encoded = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// The requests the caller may see, newest first, a page at a time.
///
/// The caller sees the requests they submitted and every request of their projects;
/// the filters narrow that down. Each parameter may be given once; an empty value is the
/// same as leaving it out. Follow `next` (or pass `next_cursor` as `cursor`) until it is
/// `null`.
#[utoipa::path(
    get,
    path = "/market-intelligence/requests",
    tag = "requests",
    params(ListParams),
    responses(
        (status = 200, description = "One page", body = PageView),
        (status = 401, description = "No valid credentials",
            body = Problem, content_type = "application/problem+json",
            headers(("WWW-Authenticate" = String, description = "A `Bearer` challenge"))),
        (status = 422, description = "A query parameter is unknown, repeated or not \
            accepted; `field` names it",
            body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The store cannot be reached",
            body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u32, description = "Seconds to wait before trying again"))),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn list(
    State(api): Shared,
    Caller(principal): Caller,
    uri: OriginalUri,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<PageView>, Problem> {
    let Query(params) = params.map_err(|rejection| query_problem(&rejection.body_text()))?;
    let filter = params.filter(&principal, &api)?;

    let page = api.orchestrator.list(&filter).await?;
    let collection = collection(&uri);
    let next_cursor = page.next.map(|cursor| cursor.to_string());
    Ok(Json(PageView {
        requests: page
            .requests
            .iter()
            .map(|request| RequestView::new(request, &collection))
            .collect(),
        next: next_cursor
            .as_deref()
            .map(|cursor| format!("{collection}?{}", params.next_query(cursor))),
        next_cursor,
    }))
}

/// Liveness: the process answers.
#[utoipa::path(
    get,
    path = "/health",
    tag = "operations",
    responses((status = 200, description = "Alive", body = HealthView))
)]
pub(crate) async fn health() -> Json<HealthView> {
    Json(HealthView { status: "ok" })
}

/// Readiness: the request store answers, and the queue where the strategy has one.
#[utoipa::path(
    get,
    path = "/ready",
    tag = "operations",
    responses(
        (status = 200, description = "Ready to take requests", body = HealthView),
        (status = 503, description = "The store cannot be reached",
            body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u32, description = "Seconds to wait before trying again"))),
    )
)]
pub(crate) async fn ready(State(api): Shared) -> Result<Json<HealthView>, Problem> {
    match api.orchestrator.ready().await {
        Ok(()) => Ok(Json(HealthView { status: "ready" })),
        Err(err) => {
            tracing::warn!(error = %err, "not ready: the store or queue does not answer");
            Err(Problem::unavailable(
                "the request store or queue cannot be reached",
            ))
        }
    }
}

/// Metrics in the Prometheus text format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses(
        (status = 200, description = "Every metric", body = String,
            content_type = "text/plain; version=0.0.4"),
        (status = 503, description = "This server has no Prometheus recorder",
            body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn metrics(State(api): Shared) -> Result<Response, Problem> {
    // Waiting will not install a recorder, so no `Retry-After`.
    let handle = api.metrics.as_ref().ok_or_else(|| {
        Problem::unavailable("metrics are not exported by this server's recorder")
            .without_retry_after()
    })?;
    let text = super::metrics::scrape(handle, &api.orchestrator).await;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
    )
        .into_response())
}

/// This API's OpenAPI 3.1 document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI document", body = Object))
)]
pub(crate) async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(super::openapi::document())
}

/// Unknown routes answer 404 as a problem, like everything else.
pub(crate) async fn no_route(uri: OriginalUri) -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        kind::NO_ROUTE,
        "No such route",
        format!("nothing is served at `{}`", problem::echo(uri.path())),
    )
}

/// Known routes called with another method answer 405 as a problem.
pub(crate) async fn wrong_method() -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        kind::NO_ROUTE,
        "Method not allowed",
        "this route does not answer that method; see /openapi.json",
    )
}
