//! Durable records of requests: the [`RequestStore`] trait and its backends.
//!
//! Every write that moves a request forward is *fenced*: it names the status it expects
//! and, for in-flight requests, the lease token the writer holds. A write whose
//! expectation no longer holds (the request was cancelled, rescued or claimed by another
//! worker meanwhile) changes nothing and returns [`WriteOutcome::Rejected`].

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};

use crate::error::{Error, Result};
use crate::model::{
    AttemptError, NewRequest, Progress, Request, RequestId, RequestResults, RequestType,
};
use crate::status::RequestStatus;

mod memory;
#[cfg(feature = "postgres")]
mod postgres;
mod row;
#[cfg(feature = "sqlite")]
mod sqlite;

pub use memory::MemoryStore;
#[cfg(feature = "postgres")]
pub use postgres::{PostgresStore, PostgresStoreOptions};
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteStore;

/// The proof of a claim that every write of an in-flight request must present.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LeaseRef {
    /// The claimed request.
    pub request_id: RequestId,
    /// The worker holding the lease.
    pub owner: String,
    /// The fencing token handed out by the claim.
    pub token: String,
}

impl LeaseRef {
    /// The lease of a request as returned by [`RequestStore::claim`], if it has one.
    pub fn of(request: &Request) -> Option<Self> {
        request.lease.as_ref().map(|lease| LeaseRef {
            request_id: request.id.clone(),
            owner: lease.owner.clone(),
            token: lease.token.clone(),
        })
    }
}

/// What became of a fenced write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a rejected write changed nothing; the caller must stop acting on the request"]
pub enum WriteOutcome {
    /// The write happened.
    Applied,
    /// The request was no longer in the expected status or under the given lease; nothing
    /// changed. `current` is its status when the write was refused (`None`: it is gone).
    Rejected {
        /// The request's status at the time, if it still exists.
        current: Option<RequestStatus>,
    },
}

impl WriteOutcome {
    /// Whether the write happened.
    pub fn is_applied(self) -> bool {
        matches!(self, WriteOutcome::Applied)
    }
}

/// One fenced write of [`RequestStore::write_batch`].
#[derive(Debug, Clone, PartialEq)]
pub enum FencedWrite {
    /// As [`RequestStore::mark_executing`].
    MarkExecuting(LeaseRef),
    /// As [`RequestStore::complete`].
    Complete(LeaseRef, RequestResults),
}

impl FencedWrite {
    /// The lease the write presents.
    pub fn lease(&self) -> &LeaseRef {
        match self {
            FencedWrite::MarkExecuting(lease) | FencedWrite::Complete(lease, _) => lease,
        }
    }
}

/// What [`RequestStore::insert`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum InsertOutcome {
    /// A new request was stored.
    Inserted(Request),
    /// A request with the same id already existed; it is returned unchanged.
    Existing(Request),
}

impl InsertOutcome {
    /// The stored request, new or existing.
    pub fn request(&self) -> &Request {
        match self {
            InsertOutcome::Inserted(request) | InsertOutcome::Existing(request) => request,
        }
    }

    /// Takes the stored request, new or existing.
    pub fn into_request(self) -> Request {
        match self {
            InsertOutcome::Inserted(request) | InsertOutcome::Existing(request) => request,
        }
    }
}

/// What [`RequestStore::cancel`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The request is now `CANCELLED`; `previous` says whether a worker was running it.
    Cancelled {
        /// Its status before the cancel.
        previous: RequestStatus,
    },
    /// The request had already finished; nothing changed.
    AlreadyTerminal(RequestStatus),
    /// No such request.
    NotFound,
}

/// A request the rescuer took back from a worker whose lease expired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RescuedRequest {
    /// The request.
    pub request_id: RequestId,
    /// `PENDING` when attempts remain, `FAILED` when they are spent.
    pub status: RequestStatus,
    /// Attempts spent, the rescued one included.
    pub attempts: u32,
    /// The worker whose lease expired.
    pub previous_owner: String,
}

/// Position in a [`RequestStore::list`] listing: the listing continues after it.
///
/// Rendered as text (`"<micros>.<id>"`) so it can travel in a URL.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ListCursor {
    /// `created_at` of the last request of the previous page.
    pub created_at: DateTime<Utc>,
    /// Id of that request.
    pub request_id: RequestId,
}

impl fmt::Display for ListCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{}",
            self.created_at.timestamp_micros(),
            self.request_id
        )
    }
}

impl FromStr for ListCursor {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let invalid = || Error::invalid("cursor", "is not a cursor returned by a listing");
        let (micros, id) = s.split_once('.').ok_or_else(invalid)?;
        let micros: i64 = micros.parse().map_err(|_| invalid())?;
        // Every store can compare timestamps in this range; cursors outside it were never
        // handed out.
        if !(0..=CURSOR_MAX_MICROS).contains(&micros) {
            return Err(invalid());
        }
        let created_at = Utc.timestamp_micros(micros).single().ok_or_else(invalid)?;
        let request_id = RequestId::parse(id).map_err(|_| invalid())?;
        Ok(ListCursor {
            created_at,
            request_id,
        })
    }
}

/// Who may see a request: the user who submitted it, and everyone who may access its
/// project. A listing limited to a [`Visibility`] is filtered in the store, so its pages and
/// cursors only ever count requests the viewer may see.
///
/// # Examples
///
/// ```
/// use root_orchestrator::{ListFilter, Visibility};
///
/// let filter = ListFilter::new().visible_to(Visibility::new("alice", ["proj-a", "proj-b"]));
/// assert_eq!(filter.visible_to.map(|v| v.project_ids.len()), Some(2));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Visibility {
    /// Requests submitted by this user are visible.
    pub user_id: String,
    /// Requests of these projects are visible, whoever submitted them.
    pub project_ids: Vec<String>,
}

impl Visibility {
    /// What `user_id` may see: their own requests and those of `project_ids`.
    pub fn new<P: Into<String>>(
        user_id: impl Into<String>,
        project_ids: impl IntoIterator<Item = P>,
    ) -> Self {
        Visibility {
            user_id: user_id.into(),
            project_ids: project_ids.into_iter().map(Into::into).collect(),
        }
    }

    /// Whether `request` is visible.
    pub fn allows(&self, request: &Request) -> bool {
        request.user_id == self.user_id || self.project_ids.contains(&request.project_id)
    }
}

/// 9999-12-31T23:59:59.999999Z, the last instant a cursor may name.
const CURSOR_MAX_MICROS: i64 = 253_402_300_799_999_999;

/// Which requests [`RequestStore::list`] returns: all filters must match.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct ListFilter {
    /// Only requests in this status.
    pub status: Option<RequestStatus>,
    /// Only requests of this project.
    pub project_id: Option<String>,
    /// Only requests of this user.
    pub user_id: Option<String>,
    /// Only requests of this type.
    pub request_type: Option<RequestType>,
    /// Only requests this viewer may see (see [`Visibility`]).
    pub visible_to: Option<Visibility>,
    /// Continue after this position.
    pub after: Option<ListCursor>,
    /// Page size; [`ListFilter::DEFAULT_LIMIT`] when `None`, at most [`ListFilter::MAX_LIMIT`].
    pub limit: Option<usize>,
}

impl ListFilter {
    /// Page size when none is given.
    pub const DEFAULT_LIMIT: usize = 50;
    /// Largest page.
    pub const MAX_LIMIT: usize = 500;

    /// Every request, newest first, in pages of [`ListFilter::DEFAULT_LIMIT`].
    pub fn new() -> Self {
        ListFilter::default()
    }

    /// Only requests in `status`.
    pub fn with_status(mut self, status: RequestStatus) -> Self {
        self.status = Some(status);
        self
    }

    /// Only requests of `project_id`.
    pub fn with_project(mut self, project_id: impl Into<String>) -> Self {
        self.project_id = Some(project_id.into());
        self
    }

    /// Only requests of `user_id`.
    pub fn with_user(mut self, user_id: impl Into<String>) -> Self {
        self.user_id = Some(user_id.into());
        self
    }

    /// Only requests of `request_type`.
    pub fn with_request_type(mut self, request_type: RequestType) -> Self {
        self.request_type = Some(request_type);
        self
    }

    /// Only requests that `visibility` allows: the viewer's own and their projects'.
    pub fn visible_to(mut self, visibility: Visibility) -> Self {
        self.visible_to = Some(visibility);
        self
    }

    /// Pages of `limit` requests.
    pub fn with_limit(mut self, limit: usize) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Continue after `cursor`.
    pub fn after(mut self, cursor: ListCursor) -> Self {
        self.after = Some(cursor);
        self
    }

    /// The page size to use: the given limit within 1..=MAX_LIMIT.
    pub fn effective_limit(&self) -> usize {
        self.limit
            .unwrap_or(Self::DEFAULT_LIMIT)
            .clamp(1, Self::MAX_LIMIT)
    }

    /// Whether `request` passes the filters (the cursor included).
    pub fn matches(&self, request: &Request) -> bool {
        self.status.is_none_or(|s| s == request.status)
            && self
                .project_id
                .as_ref()
                .is_none_or(|p| *p == request.project_id)
            && self.user_id.as_ref().is_none_or(|u| *u == request.user_id)
            && self
                .request_type
                .as_ref()
                .is_none_or(|t| *t == request.request_type)
            && self.visible_to.as_ref().is_none_or(|v| v.allows(request))
            && self
                .after
                .as_ref()
                .is_none_or(|c| (request.created_at, &request.id) < (c.created_at, &c.request_id))
    }
}

/// One page of a listing, newest first.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestPage {
    /// The requests on this page.
    pub requests: Vec<Request>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<ListCursor>,
}

impl RequestPage {
    /// Builds a page from up to `limit + 1` rows: the extra row only says more exist.
    pub(crate) fn from_rows(mut rows: Vec<Request>, limit: usize) -> Self {
        let more = rows.len() > limit;
        rows.truncate(limit);
        let next = if more {
            rows.last().map(|last| ListCursor {
                created_at: last.created_at,
                request_id: last.id.clone(),
            })
        } else {
            None
        };
        RequestPage {
            requests: rows,
            next,
        }
    }
}

/// A push notification from a store whose database has them (PostgreSQL's LISTEN/NOTIFY).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreEvent {
    /// A request became claimable somewhere (submitted, retried, rescued, handed back).
    WorkAvailable,
    /// A running request was cancelled, possibly by another process.
    Cancelled(RequestId),
    /// The notification channel was lost and is back; notifications may have been missed.
    Reconnected,
}

/// A stream of [`StoreEvent`]s, as [`RequestStore::subscribe`] returns it.
pub type StoreEvents = futures::stream::BoxStream<'static, StoreEvent>;

/// Durable record of every request.
///
/// Implementations must make each method atomic, and every write that changes status,
/// progress or results conditional as documented; the conformance suite in the crate's
/// tests checks both against every backend.
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait RequestStore: Send + Sync + 'static {
    /// Stores a new `PENDING` request with `max_attempts` attempts (when the request does not
    /// set its own). A request whose caller-given id exists already is returned unchanged.
    ///
    /// The request must already be validated ([`NewRequest::validate`]).
    async fn insert(&self, request: NewRequest, max_attempts: u32) -> Result<InsertOutcome>;

    /// Stores several new requests, as [`insert`](Self::insert) would one by one, in one
    /// transaction where the backend has them: all are stored or, on an error, none.
    /// Outcomes come back in the order of `requests`; an id given twice in one batch is
    /// stored once and reported as existing the second time.
    ///
    /// The default inserts one at a time, without the all-or-none guarantee.
    async fn insert_many(
        &self,
        requests: Vec<NewRequest>,
        max_attempts: u32,
    ) -> Result<Vec<InsertOutcome>> {
        let mut outcomes = Vec::with_capacity(requests.len());
        for request in requests {
            outcomes.push(self.insert(request, max_attempts).await?);
        }
        Ok(outcomes)
    }

    /// The request with this id.
    async fn get(&self, id: &RequestId) -> Result<Option<Request>>;

    /// Requests matching `filter`, newest first.
    async fn list(&self, filter: &ListFilter) -> Result<RequestPage>;

    /// Claims up to `limit` `PENDING` requests whose `run_after` has passed: highest
    /// priority first, then oldest, then first inserted. Each becomes `PROCESSING` under a
    /// fresh lease of `owner` lasting `lease_duration`, with `attempts` one higher and its
    /// progress reset. Concurrent claimers never receive the same request.
    async fn claim(
        &self,
        owner: &str,
        limit: usize,
        lease_duration: Duration,
    ) -> Result<Vec<Request>>;

    /// Claims one particular request, as a queue consumer does for the request a message
    /// names: if it is `PENDING` it becomes `PROCESSING` under a fresh lease of `owner`
    /// (whatever its `run_after`: the queue decides when to deliver), exactly as
    /// [`claim`](Self::claim) would. Returns `None` when it is not `PENDING` or not there.
    async fn claim_request(
        &self,
        id: &RequestId,
        owner: &str,
        lease_duration: Duration,
    ) -> Result<Option<Request>>;

    /// `PROCESSING` -> `EXECUTING` under `lease`.
    async fn mark_executing(&self, lease: &LeaseRef) -> Result<WriteOutcome>;

    /// Records progress of an `EXECUTING` request under `lease`. The stored percentage never
    /// goes down within an attempt: a lower one keeps the higher value.
    async fn record_progress(&self, lease: &LeaseRef, progress: &Progress) -> Result<WriteOutcome>;

    /// Pushes the lease's expiry to now + `lease_duration`, if `lease` still holds.
    async fn extend_lease(
        &self,
        lease: &LeaseRef,
        lease_duration: Duration,
    ) -> Result<WriteOutcome>;

    /// `EXECUTING` -> `COMPLETED` with `results`, in one write, under `lease`.
    async fn complete(&self, lease: &LeaseRef, results: &RequestResults) -> Result<WriteOutcome>;

    /// Applies several fenced writes, each exactly as its single-write method would, in one
    /// transaction where the backend has them; outcomes come back in the order of `writes`.
    /// Workers funnel their writes through this so that many requests finishing together
    /// cost one commit instead of one each.
    ///
    /// An error means none was applied. The default applies them one at a time.
    async fn write_batch(&self, writes: &[FencedWrite]) -> Result<Vec<WriteOutcome>> {
        let mut outcomes = Vec::with_capacity(writes.len());
        for write in writes {
            outcomes.push(match write {
                FencedWrite::MarkExecuting(lease) => self.mark_executing(lease).await?,
                FencedWrite::Complete(lease, results) => self.complete(lease, results).await?,
            });
        }
        Ok(outcomes)
    }

    /// Records a failed attempt under `lease`: back to `PENDING` until `retry_at` when one is
    /// given and attempts remain, `FAILED` otherwise.
    async fn fail_attempt(
        &self,
        lease: &LeaseRef,
        error: &AttemptError,
        retry_at: Option<DateTime<Utc>>,
    ) -> Result<WriteOutcome>;

    /// Hands an in-flight request back as `PENDING` without counting the attempt, as a
    /// clean shutdown does.
    async fn release(&self, lease: &LeaseRef, reason: &str) -> Result<WriteOutcome>;

    /// Cancels a request that has not finished. A running one's lease is voided, so its
    /// worker's later writes are rejected.
    async fn cancel(&self, id: &RequestId, reason: &str) -> Result<CancelOutcome>;

    /// Returns every in-flight request whose lease has expired to `PENDING` (the expired
    /// attempt counts), or to `FAILED` when its attempts are spent. Each update is
    /// conditional on the expired lease, so it never overwrites a write that committed first.
    async fn rescue_expired(&self) -> Result<Vec<RescuedRequest>>;

    /// Deletes finished requests that finished before `finished_before`; returns how many.
    async fn prune_finished(&self, finished_before: DateTime<Utc>) -> Result<u64>;

    /// How many requests are in each status (statuses with none are left out).
    async fn count_by_status(&self) -> Result<BTreeMap<RequestStatus, u64>>;

    /// Succeeds when the store can be reached.
    async fn ping(&self) -> Result<()>;

    /// Push notifications of new work and remote cancels, for stores whose database has
    /// them; `None` (the default) where workers must rely on polling and heartbeats.
    ///
    /// The stream keeps itself connected: after a lost connection it reconnects and
    /// yields [`StoreEvent::Reconnected`].
    fn subscribe(&self) -> Option<StoreEvents> {
        None
    }
}

/// The store's clock: now, at the microsecond precision every backend can keep.
pub(crate) fn now() -> DateTime<Utc> {
    let now = Utc::now();
    Utc.timestamp_micros(now.timestamp_micros())
        .single()
        .unwrap_or(now)
}

/// `now + duration`, saturating far in the future instead of overflowing.
pub(crate) fn after(now: DateTime<Utc>, duration: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(duration)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// The error recorded for attempt `attempt`, lost when `owner`'s lease expired.
pub(crate) fn expired_lease_error(attempt: u32, owner: &str) -> AttemptError {
    AttemptError::new(
        attempt,
        format!("lease of worker {owner} expired before the attempt finished"),
        true,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_as_text_and_refuse_what_no_listing_hands_out() {
        let cursor = ListCursor {
            created_at: Utc.timestamp_micros(1_733_300_000_123_456).unwrap(),
            request_id: RequestId::parse("req-10").unwrap(),
        };
        assert_eq!(cursor.to_string().parse::<ListCursor>().unwrap(), cursor);

        for text in [
            "-210866803200000001.a",
            "253402300800000000.a",
            "12.",
            "12",
            "x.a",
            "12.a/b",
        ] {
            assert!(text.parse::<ListCursor>().is_err(), "{text}");
        }
    }
}
