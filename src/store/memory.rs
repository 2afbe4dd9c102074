//! A [`RequestStore`] in process memory, for tests and for hosts that need no durability.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{
    CancelOutcome, InsertOutcome, LeaseRef, ListFilter, RequestPage, RequestStore, RescuedRequest,
    WriteOutcome, after, expired_lease_error, now,
};
use crate::error::Result;
use crate::model::{
    AttemptError, Lease, NewRequest, Progress, Request, RequestId, RequestResults, StatusChange,
};
use crate::status::RequestStatus;

#[derive(Debug, Default)]
struct State {
    requests: HashMap<RequestId, (u64, Request)>,
    next_seq: u64,
}

/// Requests kept in a `HashMap` behind a mutex. Clones share the same requests.
///
/// Nothing survives the process; use [`SqliteStore`](crate::SqliteStore) for that.
///
/// # Examples
///
/// ```
/// use root_orchestrator::{MemoryStore, RequestStore};
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
/// let store = MemoryStore::new();
/// assert!(store.count_by_status().await?.is_empty());
/// # Ok::<(), root_orchestrator::Error>(())
/// # })?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryStore::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while the lock was held cannot leave a request half-written: every
        // method checks first and mutates last, so the state is still consistent.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl State {
    /// Applies `write` to the request when it is in one of `expected` statuses under
    /// `lease`; reports the refusal otherwise.
    fn fenced(
        &mut self,
        lease: &LeaseRef,
        expected: &[RequestStatus],
        write: impl FnOnce(&mut Request),
    ) -> WriteOutcome {
        let Some((_, request)) = self.requests.get_mut(&lease.request_id) else {
            return WriteOutcome::Rejected { current: None };
        };
        let holds = request
            .lease
            .as_ref()
            .is_some_and(|held| held.token == lease.token);
        if !expected.contains(&request.status) || !holds {
            return WriteOutcome::Rejected {
                current: Some(request.status),
            };
        }
        write(request);
        WriteOutcome::Applied
    }
}

fn enter(request: &mut Request, status: RequestStatus, worker: Option<&str>, reason: &str) {
    let at = now();
    debug_assert!(request.status.can_transition_to(status));
    request.status = status;
    request.history.push(StatusChange {
        status,
        at,
        worker: worker.map(str::to_owned),
        reason: reason.to_owned(),
    });
    if status.is_terminal() {
        request.completed_at = Some(at);
    }
    if !status.is_in_flight() {
        request.lease = None;
    }
}

/// Moves a pending request to `PROCESSING` under a fresh lease of `owner`.
fn take_lease(request: &mut Request, owner: &str, lease_duration: Duration) {
    let at = now();
    enter(request, RequestStatus::Processing, Some(owner), "claimed");
    request.attempts += 1;
    request.started_at = Some(at);
    request.progress = Progress::default();
    request.lease = Some(Lease {
        owner: owner.to_owned(),
        token: uuid::Uuid::new_v4().simple().to_string(),
        expires_at: after(at, lease_duration),
    });
}

#[async_trait]
impl RequestStore for MemoryStore {
    async fn insert(&self, new: NewRequest, max_attempts: u32) -> Result<InsertOutcome> {
        let mut state = self.lock();
        if let Some((_, existing)) = new
            .request_id
            .as_ref()
            .and_then(|id| state.requests.get(id))
        {
            return Ok(InsertOutcome::Existing(existing.clone()));
        }

        let request = Request::pending(new, max_attempts);
        let seq = state.next_seq;
        state.next_seq += 1;
        state
            .requests
            .insert(request.id.clone(), (seq, request.clone()));
        Ok(InsertOutcome::Inserted(request))
    }

    async fn get(&self, id: &RequestId) -> Result<Option<Request>> {
        Ok(self.lock().requests.get(id).map(|(_, r)| r.clone()))
    }

    async fn list(&self, filter: &ListFilter) -> Result<RequestPage> {
        let state = self.lock();
        let mut rows: Vec<&Request> = state
            .requests
            .values()
            .map(|(_, r)| r)
            .filter(|r| filter.matches(r))
            .collect();
        rows.sort_by(|a, b| (b.created_at, &b.id).cmp(&(a.created_at, &a.id)));

        let limit = filter.effective_limit();
        let rows = rows.into_iter().take(limit + 1).cloned().collect();
        Ok(RequestPage::from_rows(rows, limit))
    }

    async fn claim(
        &self,
        owner: &str,
        limit: usize,
        lease_duration: Duration,
    ) -> Result<Vec<Request>> {
        let mut state = self.lock();
        let at = now();
        let mut ready: Vec<(i64, DateTime<Utc>, u64, RequestId)> = state
            .requests
            .values()
            .filter(|(_, r)| r.status == RequestStatus::Pending && r.run_after <= at)
            .map(|(seq, r)| (r.priority.rank(), r.created_at, *seq, r.id.clone()))
            .collect();
        ready.sort();

        let mut claimed = Vec::new();
        for (_, _, _, id) in ready.into_iter().take(limit) {
            if let Some((_, request)) = state.requests.get_mut(&id) {
                take_lease(request, owner, lease_duration);
                claimed.push(request.clone());
            }
        }
        Ok(claimed)
    }

    async fn claim_request(
        &self,
        id: &RequestId,
        owner: &str,
        lease_duration: Duration,
    ) -> Result<Option<Request>> {
        let mut state = self.lock();
        match state.requests.get_mut(id) {
            Some((_, request)) if request.status == RequestStatus::Pending => {
                take_lease(request, owner, lease_duration);
                Ok(Some(request.clone()))
            }
            _ => Ok(None),
        }
    }

    async fn mark_executing(&self, lease: &LeaseRef) -> Result<WriteOutcome> {
        Ok(self
            .lock()
            .fenced(lease, &[RequestStatus::Processing], |request| {
                enter(
                    request,
                    RequestStatus::Executing,
                    Some(&lease.owner),
                    "executor started",
                );
            }))
    }

    async fn record_progress(&self, lease: &LeaseRef, progress: &Progress) -> Result<WriteOutcome> {
        Ok(self
            .lock()
            .fenced(lease, &[RequestStatus::Executing], |request| {
                let highest = request.progress.percentage.max(progress.percentage);
                request.progress = progress.clone();
                request.progress.percentage = highest.min(100);
            }))
    }

    async fn extend_lease(
        &self,
        lease: &LeaseRef,
        lease_duration: Duration,
    ) -> Result<WriteOutcome> {
        Ok(self
            .lock()
            .fenced(lease, &RequestStatus::IN_FLIGHT, |request| {
                if let Some(held) = request.lease.as_mut() {
                    held.expires_at = after(now(), lease_duration);
                }
            }))
    }

    async fn complete(&self, lease: &LeaseRef, results: &RequestResults) -> Result<WriteOutcome> {
        Ok(self
            .lock()
            .fenced(lease, &[RequestStatus::Executing], |request| {
                enter(
                    request,
                    RequestStatus::Completed,
                    Some(&lease.owner),
                    "workflow completed",
                );
                request.results = Some(results.clone());
                request.progress.percentage = 100;
            }))
    }

    async fn fail_attempt(
        &self,
        lease: &LeaseRef,
        error: &AttemptError,
        retry_at: Option<DateTime<Utc>>,
    ) -> Result<WriteOutcome> {
        Ok(self
            .lock()
            .fenced(lease, &RequestStatus::IN_FLIGHT, |request| {
                request.errors.push(error.clone());
                match retry_at.filter(|_| request.attempts < request.max_attempts) {
                    Some(at) => {
                        enter(
                            request,
                            RequestStatus::Pending,
                            Some(&lease.owner),
                            "retry scheduled",
                        );
                        request.run_after = at;
                    }
                    None => enter(
                        request,
                        RequestStatus::Failed,
                        Some(&lease.owner),
                        "attempt failed; no retry",
                    ),
                }
            }))
    }

    async fn release(&self, lease: &LeaseRef, reason: &str) -> Result<WriteOutcome> {
        Ok(self
            .lock()
            .fenced(lease, &RequestStatus::IN_FLIGHT, |request| {
                enter(request, RequestStatus::Pending, Some(&lease.owner), reason);
                request.attempts = request.attempts.saturating_sub(1);
                request.run_after = now();
            }))
    }

    async fn cancel(&self, id: &RequestId, reason: &str) -> Result<CancelOutcome> {
        let mut state = self.lock();
        let Some((_, request)) = state.requests.get_mut(id) else {
            return Ok(CancelOutcome::NotFound);
        };
        if request.status.is_terminal() {
            return Ok(CancelOutcome::AlreadyTerminal(request.status));
        }
        let previous = request.status;
        enter(request, RequestStatus::Cancelled, None, reason);
        Ok(CancelOutcome::Cancelled { previous })
    }

    async fn rescue_expired(&self) -> Result<Vec<RescuedRequest>> {
        let mut state = self.lock();
        let at = now();
        let mut rescued = Vec::new();
        for (_, request) in state.requests.values_mut() {
            let Some(lease) = request.lease.clone() else {
                continue;
            };
            if !request.status.is_in_flight() || lease.expires_at > at {
                continue;
            }

            request
                .errors
                .push(expired_lease_error(request.attempts, &lease.owner));
            let status = if request.attempts >= request.max_attempts {
                RequestStatus::Failed
            } else {
                RequestStatus::Pending
            };
            enter(request, status, None, "lease expired; rescued");
            request.run_after = at;
            rescued.push(RescuedRequest {
                request_id: request.id.clone(),
                status,
                attempts: request.attempts,
                previous_owner: lease.owner,
            });
        }
        Ok(rescued)
    }

    async fn prune_finished(&self, finished_before: DateTime<Utc>) -> Result<u64> {
        let mut state = self.lock();
        let before = state.requests.len();
        state.requests.retain(|_, (_, r)| {
            !(r.status.is_terminal() && r.completed_at.is_some_and(|at| at < finished_before))
        });
        Ok((before - state.requests.len()) as u64)
    }

    async fn count_by_status(&self) -> Result<BTreeMap<RequestStatus, u64>> {
        let mut counts = BTreeMap::new();
        for (_, request) in self.lock().requests.values() {
            *counts.entry(request.status).or_insert(0) += 1;
        }
        Ok(counts)
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }
}
