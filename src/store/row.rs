//! The shape in which SQL backends hand back a request row, and its conversion into the
//! model: one place that reads JSON columns and checks ranges, whatever the database.

#![cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]

use std::str::FromStr;

use chrono::{DateTime, Utc};

use crate::error::{Error, Result};
use crate::model::{Lease, Priority, Progress, Request, RequestId, RequestType, StatusChange};
use crate::status::RequestStatus;

/// A request row as the database stores it, before any JSON is parsed.
pub(crate) struct StoredRow {
    pub id: String,
    pub project_id: String,
    pub user_id: String,
    pub request_type: String,
    pub priority: i64,
    pub configuration: String,
    pub status: String,
    pub progress_stage: Option<String>,
    pub progress_percentage: i64,
    pub urls_found: i64,
    pub content_extracted: i64,
    pub estimated_completion: Option<DateTime<Utc>>,
    pub results: Option<String>,
    pub errors: String,
    pub history: String,
    pub attempts: i64,
    pub max_attempts: i64,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub run_after: DateTime<Utc>,
    pub lease_owner: Option<String>,
    pub lease_token: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
}

impl StoredRow {
    pub fn into_request(self) -> Result<Request> {
        let id = self.id;
        let corrupt = |field: &'static str, problem: String| Error::CorruptRecord {
            request_id: id.clone(),
            field,
            problem,
        };
        let json_err = |field: &'static str| move |e: serde_json::Error| (field, e.to_string());

        let priority = Priority::from_rank(self.priority).ok_or_else(|| {
            corrupt(
                "priority",
                format!("{} is not a priority rank", self.priority),
            )
        })?;
        let parsed = (|| {
            Ok::<_, (&'static str, String)>((
                serde_json::from_str(&self.configuration).map_err(json_err("configuration"))?,
                self.results
                    .as_deref()
                    .map(serde_json::from_str)
                    .transpose()
                    .map_err(json_err("results"))?,
                serde_json::from_str(&self.errors).map_err(json_err("errors"))?,
                serde_json::from_str::<Vec<StatusChange>>(&self.history)
                    .map_err(json_err("history"))?,
            ))
        })();
        let (configuration, results, errors, history) =
            parsed.map_err(|(field, problem)| corrupt(field, problem))?;
        let lease = self.lease_token.map(|token| Lease {
            owner: self.lease_owner.unwrap_or_default(),
            token,
            expires_at: self.lease_expires_at.unwrap_or(DateTime::<Utc>::MIN_UTC),
        });

        Ok(Request {
            id: RequestId::from_stored(id.clone()),
            project_id: self.project_id,
            user_id: self.user_id,
            request_type: RequestType::from_stored(self.request_type),
            priority,
            configuration,
            status: RequestStatus::from_str(&self.status)?,
            progress: Progress {
                current_stage: self.progress_stage,
                percentage: self.progress_percentage.clamp(0, 100) as u8,
                urls_found: self.urls_found.max(0) as u64,
                content_extracted: self.content_extracted.max(0) as u64,
                estimated_completion: self.estimated_completion,
            },
            results,
            errors,
            history,
            attempts: self.attempts.clamp(0, i64::from(u32::MAX)) as u32,
            max_attempts: self.max_attempts.clamp(1, i64::from(u32::MAX)) as u32,
            created_at: self.created_at,
            started_at: self.started_at,
            completed_at: self.completed_at,
            run_after: self.run_after,
            lease,
        })
    }
}

/// JSON text of a model value, for a JSON column.
pub(crate) fn to_json<T: serde::Serialize>(value: &T) -> String {
    // The model's types serialize infallibly: string keys only, and validation keeps
    // non-finite floats out, so the fallback is never taken.
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned())
}

/// A history entry as JSON text, stamped now.
pub(crate) fn history_entry(status: RequestStatus, worker: Option<&str>, reason: &str) -> String {
    to_json(&StatusChange {
        status,
        at: super::now(),
        worker: worker.map(str::to_owned),
        reason: reason.to_owned(),
    })
}

/// A column that could not be read, reported against its request.
pub(crate) fn unreadable(id: &str, field: &'static str, e: impl std::fmt::Display) -> Error {
    Error::CorruptRecord {
        request_id: id.to_owned(),
        field,
        problem: e.to_string(),
    }
}

/// The writes of one [`RequestStore::write_batch`](super::RequestStore::write_batch) call,
/// grouped by kind so that each kind is one set-based statement.
#[derive(Debug, Default)]
pub(crate) struct BatchRows {
    pub executing: Vec<BatchRow>,
    pub completing: Vec<BatchRow>,
}

/// One fenced write, as the batch statements take it.
#[derive(Debug, serde::Serialize)]
pub(crate) struct BatchRow {
    pub id: String,
    pub token: String,
    /// The history entry, as JSON text.
    pub entry: String,
    /// The results, as JSON text (completions only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub results: Option<String>,
}

impl BatchRows {
    pub fn of(writes: &[super::FencedWrite]) -> Self {
        let mut rows = BatchRows::default();
        for write in writes {
            let lease = write.lease();
            let row = |entry: String, results: Option<String>| BatchRow {
                id: lease.request_id.as_str().to_owned(),
                token: lease.token.clone(),
                entry,
                results,
            };
            match write {
                super::FencedWrite::MarkExecuting(_) => rows.executing.push(row(
                    history_entry(
                        RequestStatus::Executing,
                        Some(&lease.owner),
                        "executor started",
                    ),
                    None,
                )),
                super::FencedWrite::Complete(_, results) => rows.completing.push(row(
                    history_entry(
                        RequestStatus::Completed,
                        Some(&lease.owner),
                        "workflow completed",
                    ),
                    Some(to_json(results)),
                )),
            }
        }
        rows
    }
}

/// Whether `write_batch` must open a transaction: one run of one kind is a single
/// statement, atomic on its own; anything more must apply all or none.
pub(crate) fn needs_transaction(runs: &[&[super::FencedWrite]]) -> bool {
    use super::FencedWrite::{Complete, MarkExecuting};

    let mixes_kinds = |run: &[super::FencedWrite]| {
        let executing = run.iter().any(|w| matches!(w, MarkExecuting(_)));
        let completing = run.iter().any(|w| matches!(w, Complete(..)));
        executing && completing
    };
    runs.len() > 1 || runs.first().is_some_and(|run| mixes_kinds(run))
}

/// Splits a batch into consecutive runs in which no request is written twice. Within a run
/// each request's row is touched once, so a set-based statement per kind gives every write
/// the outcome it would have alone; a request written again (a stale attempt's write beside
/// the current one's, or one write repeated) must see the run before it, as writes made one
/// by one would.
pub(crate) fn unique_runs(writes: &[super::FencedWrite]) -> Vec<&[super::FencedWrite]> {
    let mut runs = Vec::new();
    let mut start = 0;
    let mut seen = std::collections::HashSet::new();
    for (i, write) in writes.iter().enumerate() {
        let id = write.lease().request_id.as_str();
        if !seen.insert(id) {
            runs.push(&writes[start..i]);
            start = i;
            seen.clear();
            seen.insert(id);
        }
    }
    runs.push(&writes[start..]);
    runs
}

/// The ids of a batch insert to read back after it: those it did not store (stored before),
/// and those given more than once (a repeat reports the request the batch stored), each
/// once.
pub(crate) fn to_read_back<'a>(ids: &'a [RequestId], inserted: &[Request]) -> Vec<&'a str> {
    use std::collections::HashSet;

    let inserted: HashSet<&str> = inserted.iter().map(|r| r.id.as_str()).collect();
    let mut seen = HashSet::new();
    let mut read_back = HashSet::new();
    for id in ids {
        let id = id.as_str();
        if !seen.insert(id) || !inserted.contains(id) {
            read_back.insert(id);
        }
    }
    read_back.into_iter().collect()
}

/// Pairs what a batch insert stored, and what it read back ([`to_read_back`]), with the
/// batch as given, in its order: the first occurrence of an id stored by the batch is
/// `Inserted`; a repeat, or an id stored before, is `Existing`; one pruned between the
/// insert and the read is stored anew.
pub(crate) async fn insert_outcomes(
    store: &dyn super::RequestStore,
    ids: Vec<RequestId>,
    requests: Vec<crate::model::NewRequest>,
    inserted: Vec<Request>,
    read_back: Vec<Request>,
    max_attempts: u32,
) -> Result<Vec<super::InsertOutcome>> {
    use super::InsertOutcome;
    use std::collections::HashMap;

    let by_id = |requests: Vec<Request>| -> HashMap<RequestId, Request> {
        requests.into_iter().map(|r| (r.id.clone(), r)).collect()
    };
    let mut inserted = by_id(inserted);
    let read_back = by_id(read_back);
    let mut outcomes = Vec::with_capacity(requests.len());
    for (id, new) in ids.into_iter().zip(requests) {
        outcomes.push(match inserted.remove(&id) {
            Some(request) => InsertOutcome::Inserted(request),
            None => match read_back.get(&id) {
                Some(existing) => InsertOutcome::Existing(existing.clone()),
                None => store.insert(new, max_attempts).await?,
            },
        });
    }
    Ok(outcomes)
}

/// The outcome of a batch of one, as its single-request method returns it.
pub(crate) fn only<T>(mut outcomes: Vec<T>) -> T {
    debug_assert_eq!(outcomes.len(), 1, "one outcome per request or write");
    outcomes
        .pop()
        .expect("a batch answers every request or write in it")
}
