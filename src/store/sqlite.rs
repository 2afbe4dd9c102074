//! A [`RequestStore`] in an SQLite file: the embedded default.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Acquire, Row, migrate::Migrator};

use super::row::{
    BatchRows, StoredRow, history_entry, insert_outcomes, needs_transaction, only, to_json,
    to_read_back, unique_runs, unreadable,
};
use super::{
    CancelOutcome, FencedWrite, InsertOutcome, LeaseRef, ListFilter, RequestPage, RequestStore,
    RescuedRequest, WriteOutcome, after, expired_lease_error, now,
};
use crate::error::{Error, Result};
use crate::model::{AttemptError, NewRequest, Progress, Request, RequestId, RequestResults};
use crate::status::RequestStatus;

/// The claim's assignments, shared by `claim` and `claim_request`. Parameters: ?1 now,
/// ?2 owner, ?3 lease expiry, ?4 history entry.
macro_rules! claim_set {
    () => {
        "UPDATE requests SET status = 'PROCESSING', attempts = attempts + 1, \
             started_at = ?1, progress_stage = NULL, progress_percentage = 0, \
             urls_found = 0, content_extracted = 0, estimated_completion = NULL, \
             lease_owner = ?2, lease_token = lower(hex(randomblob(16))), \
             lease_expires_at = ?3, history = json_insert(history, '$[#]', json(?4))"
    };
}

static MIGRATOR: Migrator = sqlx::migrate!("migrations/sqlite");

/// Tries at migrating before giving up (see [`SqliteStore::migrate`]).
const MIGRATION_ATTEMPTS: u32 = 5;

/// Tries at opening a file another process holds locked before giving up.
const OPEN_ATTEMPTS: u32 = 8;

/// Whether `err` is SQLite's `BUSY` or `LOCKED` (extended codes included).
fn is_lock_contention(err: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = err else {
        return false;
    };
    db.code()
        .and_then(|code| code.parse::<i32>().ok())
        .is_some_and(|code| matches!(code & 0xff, 5 | 6))
}

/// Columns every query that returns requests selects, in this order; a macro so that
/// `concat!` can build each query as one literal.
macro_rules! columns {
    () => {
        "seq, id, project_id, user_id, request_type, priority, configuration, \
    status, progress_stage, progress_percentage, urls_found, content_extracted, \
    estimated_completion, results, errors, history, attempts, max_attempts, created_at, \
    started_at, completed_at, run_after, lease_owner, lease_token, lease_expires_at"
    };
}

/// Requests in an SQLite database in WAL mode, shared safely by the tasks of one process
/// and by several processes on one machine.
///
/// Opening a database creates it when missing and applies the crate's migrations.
///
/// # Examples
///
/// ```
/// use root_orchestrator::{RequestStore, SqliteStore};
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
/// let dir = tempfile::tempdir()?;
/// let store = SqliteStore::open(dir.path().join("requests.db")).await?;
/// store.ping().await?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # })?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// Reads.
    pool: SqlitePool,
    /// Writes: one connection. SQLite takes one writer at a time anyway; queueing writers
    /// here, in order, beats having them collide on the file lock, where the loser sleeps
    /// in SQLite's busy handler for a millisecond or more.
    writer: SqlitePool,
}

impl SqliteStore {
    /// Connections opened at most by [`open`](Self::open).
    pub const DEFAULT_MAX_CONNECTIONS: u32 = 4;

    /// Opens the database file at `path`, creating it and its folder if needed, and
    /// migrates it.
    ///
    /// # Errors
    ///
    /// [`Error::Store`] when the file cannot be opened, [`Error::Migration`] when its schema
    /// cannot be brought up to date.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, Self::DEFAULT_MAX_CONNECTIONS).await
    }

    /// Like [`open`](Self::open) with at most `max_connections` pooled connections for
    /// reads; writes have one more connection of their own.
    ///
    /// # Errors
    ///
    /// As [`open`](Self::open).
    pub async fn open_with(path: impl AsRef<Path>, max_connections: u32) -> Result<Self> {
        let path = path.as_ref();
        if let Some(folder) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(folder).map_err(|e| Error::store("open", e))?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // WAL with NORMAL keeps every commit atomic and durable against a process
            // crash; only a power loss may undo the last transactions.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);

        // Switching a new file to WAL takes an exclusive lock that the busy timeout does
        // not cover, so processes opening one file together can see "database is locked"
        // for a moment; that clears as soon as the first one is done.
        let mut attempt = 1;
        let pool = loop {
            let connected = SqlitePoolOptions::new()
                .max_connections(max_connections.max(1))
                .connect_with(options.clone())
                .await;
            match connected {
                Ok(pool) => break pool,
                Err(err) if is_lock_contention(&err) && attempt < OPEN_ATTEMPTS => {
                    tracing::debug!(error = %err, attempt, "database busy while opening; retrying");
                    tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
                    attempt += 1;
                }
                Err(err) => return Err(Error::store("open", err)),
            }
        };
        let mut store = Self::from_pool(pool).await?;
        store.writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_lazy_with(options);
        Ok(store)
    }

    /// Uses an existing pool, migrating its database first.
    ///
    /// # Errors
    ///
    /// [`Error::Migration`] when the schema cannot be brought up to date.
    pub async fn from_pool(pool: SqlitePool) -> Result<Self> {
        let store = SqliteStore {
            writer: pool.clone(),
            pool,
        };
        store.migrate().await?;
        Ok(store)
    }

    /// Applies the migrations the database lacks. Safe to call again.
    ///
    /// # Errors
    ///
    /// [`Error::Migration`] when a migration fails.
    pub async fn migrate(&self) -> Result<()> {
        // SQLite has no advisory lock, so two processes opening a new file at once may
        // both try the first migration; the loser fails on the table the winner created.
        // Each migration is one transaction, so trying again finds it recorded as applied.
        let mut attempt = 1;
        loop {
            match MIGRATOR.run(&self.pool).await {
                Ok(()) => return Ok(()),
                Err(err) if attempt < MIGRATION_ATTEMPTS => {
                    tracing::debug!(
                        error = %err,
                        attempt,
                        "migration raced another process; retrying",
                    );
                    tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
                    attempt += 1;
                }
                Err(err) => {
                    return Err(Error::Migration {
                        source: Box::new(err),
                    });
                }
            }
        }
    }

    /// The underlying connection pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Closes every connection; later calls fail.
    pub async fn close(&self) {
        self.writer.close().await;
        self.pool.close().await;
    }

    /// Fails a just-claimed request whose row cannot be read back, so that it neither
    /// breaks the claim of the healthy requests beside it nor returns when its lease
    /// lapses, only to break the next claim.
    async fn quarantine(&self, row: &SqliteRow, problem: &Error) {
        let id = row.try_get::<String, _>("id").unwrap_or_default();
        let token = row.try_get::<String, _>("lease_token").unwrap_or_default();
        tracing::error!(
            request_id = %id,
            error = %problem,
            "claimed request cannot be read; failing it",
        );
        let failed = sqlx::query(
            "UPDATE requests SET status = 'FAILED', completed_at = ?, lease_owner = NULL, \
                 lease_token = NULL, lease_expires_at = NULL WHERE id = ? AND lease_token = ?",
        )
        .bind(micros(now()))
        .bind(&id)
        .bind(&token)
        .execute(&self.writer)
        .await;
        if let Err(err) = failed {
            tracing::error!(
                request_id = %id,
                error = %err,
                "could not fail the unreadable request",
            );
        }
    }

    /// Runs a fenced write whose last two parameters are the request id and the lease
    /// token, and reports whether it applied.
    async fn fenced_write(
        &self,
        operation: &'static str,
        query: sqlx::query::Query<'_, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>,
        lease: &LeaseRef,
    ) -> Result<WriteOutcome> {
        let rows = query
            .bind(lease.request_id.as_str())
            .bind(&lease.token)
            .execute(&self.writer)
            .await
            .map_err(|e| Error::store(operation, e))?
            .rows_affected();
        self.outcome(operation, rows, &lease.request_id).await
    }

    /// Stores `requests` in one statement over the batch as a JSON array: one round trip
    /// and one commit. `operation` names the caller in errors.
    async fn insert_batch(
        &self,
        operation: &'static str,
        requests: Vec<NewRequest>,
        max_attempts: u32,
    ) -> Result<Vec<InsertOutcome>> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }

        // The batch shares one creation time and is inserted in array order, so it is claimed
        // in the order given.
        #[derive(serde::Serialize)]
        struct Row<'a> {
            id: &'a str,
            project_id: &'a str,
            user_id: &'a str,
            request_type: &'a str,
            priority: i64,
            configuration: String,
            max_attempts: u32,
            run_after: i64,
        }
        let created_at = now();
        let ids: Vec<RequestId> = requests
            .iter()
            .map(|r| r.request_id.clone().unwrap_or_else(RequestId::generate))
            .collect();
        let rows: Vec<Row<'_>> = requests
            .iter()
            .zip(&ids)
            .map(|(new, id)| Row {
                id: id.as_str(),
                project_id: &new.project_id,
                user_id: &new.user_id,
                request_type: new.request_type.as_str(),
                priority: new.priority.rank(),
                configuration: to_json(&new.configuration),
                max_attempts: new.max_attempts.unwrap_or(max_attempts),
                run_after: micros(new.run_after.unwrap_or(created_at)),
            })
            .collect();
        let history = format!(
            "[{}]",
            history_entry(RequestStatus::Pending, None, "submitted")
        );

        // ON CONFLICT DO NOTHING makes a repeated caller-given id a no-op, atomically, even
        // when two submits of the same id race; `WHERE true` keeps SQLite from reading it as
        // a join constraint.
        let inserted = sqlx::query(concat!(
            "INSERT INTO requests (id, project_id, user_id, request_type, priority, \
             configuration, status, history, max_attempts, created_at, run_after) \
             SELECT value ->> 'id', value ->> 'project_id', value ->> 'user_id', \
                 value ->> 'request_type', value ->> 'priority', value ->> 'configuration', \
                 'PENDING', ?2, value ->> 'max_attempts', ?3, value ->> 'run_after' \
             FROM json_each(?1) WHERE true ORDER BY key \
             ON CONFLICT (id) DO NOTHING RETURNING ",
            columns!(),
            ""
        ))
        .bind(to_json(&rows))
        .bind(history)
        .bind(micros(created_at))
        .fetch_all(&self.writer)
        .await
        .map_err(|e| Error::store(operation, e))?;

        let stored = inserted
            .iter()
            .map(request_from_row)
            .collect::<Result<Vec<_>>>()?;
        let read_back = self
            .get_many(operation, &to_read_back(&ids, &stored))
            .await?;
        insert_outcomes(self, ids, requests, stored, read_back, max_attempts).await
    }

    /// The requests with these ids, in one query.
    async fn get_many(&self, operation: &'static str, ids: &[&str]) -> Result<Vec<Request>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM requests WHERE id IN (SELECT value FROM json_each(?))"
        ))
        .bind(to_json(&ids))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| Error::store(operation, e))?;
        rows.iter().map(request_from_row).collect()
    }

    /// Applies fenced writes run by run (see `unique_runs`) on the write connection, in a
    /// transaction when there is more than one statement. `operation` names the caller in
    /// errors.
    async fn write(
        &self,
        operation: &'static str,
        writes: &[FencedWrite],
    ) -> Result<Vec<WriteOutcome>> {
        let fail = |e| Error::store(operation, e);
        let runs = unique_runs(writes);
        let mut conn = self.writer.acquire().await.map_err(fail)?;
        if !needs_transaction(&runs) {
            return apply_runs(&mut conn, operation, &runs).await;
        }
        let mut tx = conn.begin().await.map_err(fail)?;
        let outcomes = apply_runs(&mut tx, operation, &runs).await?;
        tx.commit().await.map_err(fail)?;
        Ok(outcomes)
    }

    /// Turns the number of rows a fenced write touched into its outcome.
    async fn outcome(
        &self,
        operation: &'static str,
        rows: u64,
        id: &RequestId,
    ) -> Result<WriteOutcome> {
        if rows > 0 {
            return Ok(WriteOutcome::Applied);
        }
        let current: Option<String> =
            sqlx::query_scalar("SELECT status FROM requests WHERE id = ?")
                .bind(id.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| Error::store(operation, e))?;
        let current = current.map(|s| s.parse()).transpose()?;
        Ok(WriteOutcome::Rejected { current })
    }
}

/// Applies run after run (see `unique_runs`) on `conn`; a refused write reports the
/// status its request had when the write came, not one a later run gave it.
async fn apply_runs(
    conn: &mut sqlx::SqliteConnection,
    operation: &'static str,
    runs: &[&[FencedWrite]],
) -> Result<Vec<WriteOutcome>> {
    let fail = |e| Error::store(operation, e);
    let mut outcomes = Vec::new();
    for run in runs {
        let applied = apply_batch(&mut *conn, &BatchRows::of(run))
            .await
            .map_err(fail)?;
        for write in *run {
            let id = write.lease().request_id.as_str();
            if applied.contains(id) {
                outcomes.push(WriteOutcome::Applied);
                continue;
            }
            let current: Option<String> =
                sqlx::query_scalar("SELECT status FROM requests WHERE id = ?")
                    .bind(id)
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(fail)?;
            let current = current.map(|s| s.parse()).transpose()?;
            outcomes.push(WriteOutcome::Rejected { current });
        }
    }
    Ok(outcomes)
}

/// Applies a batch's writes as one statement per kind; returns the ids whose write applied.
///
/// The rows travel as one JSON array, so a batch of any size is one round trip.
async fn apply_batch(
    conn: &mut sqlx::SqliteConnection,
    rows: &BatchRows,
) -> std::result::Result<std::collections::HashSet<String>, sqlx::Error> {
    let mut applied = std::collections::HashSet::new();
    if !rows.executing.is_empty() {
        let ids: Vec<String> = sqlx::query_scalar(
            "UPDATE requests SET status = 'EXECUTING', \
                 history = json_insert(history, '$[#]', json(batch.entry)) \
             FROM (SELECT value ->> 'id' AS id, value ->> 'token' AS token, \
                       value ->> 'entry' AS entry FROM json_each(?)) AS batch \
             WHERE requests.id = batch.id AND requests.lease_token = batch.token \
                 AND requests.status = 'PROCESSING' \
             RETURNING requests.id",
        )
        .bind(to_json(&rows.executing))
        .fetch_all(&mut *conn)
        .await?;
        applied.extend(ids);
    }
    if !rows.completing.is_empty() {
        let ids: Vec<String> = sqlx::query_scalar(
            "UPDATE requests SET status = 'COMPLETED', results = batch.results, \
                 completed_at = ?, progress_percentage = 100, lease_owner = NULL, \
                 lease_token = NULL, lease_expires_at = NULL, \
                 history = json_insert(history, '$[#]', json(batch.entry)) \
             FROM (SELECT value ->> 'id' AS id, value ->> 'token' AS token, \
                       value ->> 'entry' AS entry, value ->> 'results' AS results \
                   FROM json_each(?)) AS batch \
             WHERE requests.id = batch.id AND requests.lease_token = batch.token \
                 AND requests.status = 'EXECUTING' \
             RETURNING requests.id",
        )
        .bind(micros(now()))
        .bind(to_json(&rows.completing))
        .fetch_all(&mut *conn)
        .await?;
        applied.extend(ids);
    }
    Ok(applied)
}

fn micros(at: DateTime<Utc>) -> i64 {
    at.timestamp_micros()
}

fn from_micros(id: &str, field: &'static str, value: i64) -> Result<DateTime<Utc>> {
    Utc.timestamp_micros(value)
        .single()
        .ok_or_else(|| Error::CorruptRecord {
            request_id: id.to_owned(),
            field,
            problem: format!("{value} is not a timestamp"),
        })
}

fn request_from_row(row: &SqliteRow) -> Result<Request> {
    let id: String = column(row, "", "id")?;
    let time = |field: &'static str| from_micros(&id, field, column(row, &id, field)?);
    let opt_time = |field: &'static str| {
        column::<Option<i64>>(row, &id, field)?
            .map(|v| from_micros(&id, field, v))
            .transpose()
    };

    StoredRow {
        project_id: column(row, &id, "project_id")?,
        user_id: column(row, &id, "user_id")?,
        request_type: column(row, &id, "request_type")?,
        priority: column(row, &id, "priority")?,
        configuration: column(row, &id, "configuration")?,
        status: column(row, &id, "status")?,
        progress_stage: column(row, &id, "progress_stage")?,
        progress_percentage: column(row, &id, "progress_percentage")?,
        urls_found: column(row, &id, "urls_found")?,
        content_extracted: column(row, &id, "content_extracted")?,
        estimated_completion: opt_time("estimated_completion")?,
        results: column(row, &id, "results")?,
        errors: column(row, &id, "errors")?,
        history: column(row, &id, "history")?,
        attempts: column(row, &id, "attempts")?,
        max_attempts: column(row, &id, "max_attempts")?,
        created_at: time("created_at")?,
        started_at: opt_time("started_at")?,
        completed_at: opt_time("completed_at")?,
        run_after: time("run_after")?,
        lease_owner: column(row, &id, "lease_owner")?,
        lease_token: column(row, &id, "lease_token")?,
        lease_expires_at: opt_time("lease_expires_at")?,
        id: id.clone(),
    }
    .into_request()
}

fn column<'r, T>(row: &'r SqliteRow, id: &str, field: &'static str) -> Result<T>
where
    T: sqlx::Decode<'r, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>,
{
    row.try_get(field).map_err(|e| unreadable(id, field, e))
}

#[async_trait]
impl RequestStore for SqliteStore {
    async fn insert(&self, new: NewRequest, max_attempts: u32) -> Result<InsertOutcome> {
        // One request has a statement of its own: binding its values directly is markedly
        // cheaper than going through the batch's JSON array, and single submits are the
        // common case.
        let id = new.request_id.clone().unwrap_or_else(RequestId::generate);
        let created_at = now();
        let history = format!(
            "[{}]",
            history_entry(RequestStatus::Pending, None, "submitted")
        );

        // ON CONFLICT DO NOTHING makes a repeated caller-given id a no-op, atomically,
        // even when two submits of the same id race.
        let inserted = sqlx::query(concat!(
            "INSERT INTO requests (id, project_id, user_id, request_type, priority, \
             configuration, status, history, max_attempts, created_at, run_after) \
             VALUES (?, ?, ?, ?, ?, ?, 'PENDING', ?, ?, ?, ?) \
             ON CONFLICT (id) DO NOTHING RETURNING ",
            columns!(),
            ""
        ))
        .bind(id.as_str())
        .bind(&new.project_id)
        .bind(&new.user_id)
        .bind(new.request_type.as_str())
        .bind(new.priority.rank())
        .bind(to_json(&new.configuration))
        .bind(history)
        .bind(i64::from(new.max_attempts.unwrap_or(max_attempts)))
        .bind(micros(created_at))
        .bind(micros(new.run_after.unwrap_or(created_at)))
        .fetch_optional(&self.writer)
        .await
        .map_err(|e| Error::store("insert", e))?;

        if let Some(row) = inserted {
            return Ok(InsertOutcome::Inserted(request_from_row(&row)?));
        }
        match self.get(&id).await? {
            Some(existing) => Ok(InsertOutcome::Existing(existing)),
            // The conflicting row was pruned between the two statements: store it anew.
            None => Box::pin(self.insert(new, max_attempts)).await,
        }
    }

    async fn insert_many(
        &self,
        requests: Vec<NewRequest>,
        max_attempts: u32,
    ) -> Result<Vec<InsertOutcome>> {
        self.insert_batch("insert_many", requests, max_attempts)
            .await
    }

    async fn get(&self, id: &RequestId) -> Result<Option<Request>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM requests WHERE id = ?"
        ))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| Error::store("get", e))?;
        row.as_ref().map(request_from_row).transpose()
    }

    async fn list(&self, filter: &ListFilter) -> Result<RequestPage> {
        let mut query = sqlx::QueryBuilder::<sqlx::Sqlite>::new(concat!(
            "SELECT ",
            columns!(),
            " FROM requests WHERE 1 = 1"
        ));
        if let Some(status) = filter.status {
            query.push(" AND status = ").push_bind(status.as_str());
        }
        if let Some(project_id) = &filter.project_id {
            query
                .push(" AND project_id = ")
                .push_bind(project_id.clone());
        }
        if let Some(user_id) = &filter.user_id {
            query.push(" AND user_id = ").push_bind(user_id.clone());
        }
        if let Some(request_type) = &filter.request_type {
            query
                .push(" AND request_type = ")
                .push_bind(request_type.as_str().to_owned());
        }
        if let Some(visibility) = &filter.visible_to {
            // In the query, not on the fetched rows, so that LIMIT and the cursor count
            // only what the viewer may see.
            query
                .push(" AND (user_id = ")
                .push_bind(visibility.user_id.clone());
            if !visibility.project_ids.is_empty() {
                query.push(" OR project_id IN (");
                let mut projects = query.separated(", ");
                for project_id in &visibility.project_ids {
                    projects.push_bind(project_id.clone());
                }
                projects.push_unseparated(")");
            }
            query.push(")");
        }
        if let Some(cursor) = &filter.after {
            query
                .push(" AND (created_at, id) < (")
                .push_bind(micros(cursor.created_at))
                .push(", ")
                .push_bind(cursor.request_id.as_str().to_owned())
                .push(")");
        }
        let limit = filter.effective_limit();
        query
            .push(" ORDER BY created_at DESC, id DESC LIMIT ")
            .push_bind((limit + 1) as i64);

        let rows = query
            .build()
            .fetch_all(&self.pool)
            .await
            .map_err(|e| Error::store("list", e))?;
        let rows = rows.iter().map(request_from_row).collect::<Result<_>>()?;
        Ok(RequestPage::from_rows(rows, limit))
    }

    async fn claim(
        &self,
        owner: &str,
        limit: usize,
        lease_duration: Duration,
    ) -> Result<Vec<Request>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let at = now();

        // One statement: SQLite runs it under its single write lock, so two claimers (in
        // this process or another) can never select the same pending row.
        let rows = sqlx::query(concat!(
            claim_set!(),
            " WHERE seq IN (SELECT seq FROM requests \
                 WHERE status = 'PENDING' AND run_after <= ?1 \
                 ORDER BY priority, created_at, seq LIMIT ?5) \
             RETURNING ",
            columns!()
        ))
        .bind(micros(at))
        .bind(owner)
        .bind(micros(after(at, lease_duration)))
        .bind(history_entry(
            RequestStatus::Processing,
            Some(owner),
            "claimed",
        ))
        .bind(limit as i64)
        .fetch_all(&self.writer)
        .await
        .map_err(|e| Error::store("claim", e))?;

        // RETURNING does not keep the subquery's order; restore claim order.
        let mut claimed = Vec::with_capacity(rows.len());
        for row in &rows {
            match request_from_row(row) {
                Ok(request) => claimed.push((column::<i64>(row, "", "seq")?, request)),
                Err(problem) => self.quarantine(row, &problem).await,
            }
        }
        claimed.sort_by_key(|(seq, r)| (r.priority.rank(), r.created_at, *seq));
        Ok(claimed.into_iter().map(|(_, r)| r).collect())
    }

    async fn claim_request(
        &self,
        id: &RequestId,
        owner: &str,
        lease_duration: Duration,
    ) -> Result<Option<Request>> {
        let at = now();
        let row = sqlx::query(concat!(
            claim_set!(),
            " WHERE id = ?5 AND status = 'PENDING' RETURNING ",
            columns!()
        ))
        .bind(micros(at))
        .bind(owner)
        .bind(micros(after(at, lease_duration)))
        .bind(history_entry(
            RequestStatus::Processing,
            Some(owner),
            "claimed",
        ))
        .bind(id.as_str())
        .fetch_optional(&self.writer)
        .await
        .map_err(|e| Error::store("claim_request", e))?;
        let Some(row) = row else {
            return Ok(None);
        };
        match request_from_row(&row) {
            Ok(request) => Ok(Some(request)),
            Err(problem) => {
                self.quarantine(&row, &problem).await;
                Err(problem)
            }
        }
    }

    async fn mark_executing(&self, lease: &LeaseRef) -> Result<WriteOutcome> {
        let write = FencedWrite::MarkExecuting(lease.clone());
        Ok(only(self.write("mark_executing", &[write]).await?))
    }

    async fn record_progress(&self, lease: &LeaseRef, progress: &Progress) -> Result<WriteOutcome> {
        let query = sqlx::query(
            "UPDATE requests SET progress_stage = ?, \
                 progress_percentage = MAX(progress_percentage, ?), \
                 urls_found = ?, content_extracted = ?, estimated_completion = ? \
             WHERE id = ? AND lease_token = ? AND status = 'EXECUTING'",
        )
        .bind(progress.current_stage.as_deref())
        .bind(i64::from(progress.percentage.min(100)))
        .bind(i64::try_from(progress.urls_found).unwrap_or(i64::MAX))
        .bind(i64::try_from(progress.content_extracted).unwrap_or(i64::MAX))
        .bind(progress.estimated_completion.map(micros));
        self.fenced_write("record_progress", query, lease).await
    }

    async fn extend_lease(
        &self,
        lease: &LeaseRef,
        lease_duration: Duration,
    ) -> Result<WriteOutcome> {
        let query = sqlx::query(
            "UPDATE requests SET lease_expires_at = ? \
             WHERE id = ? AND lease_token = ? AND status IN ('PROCESSING', 'EXECUTING')",
        )
        .bind(micros(after(now(), lease_duration)));
        self.fenced_write("extend_lease", query, lease).await
    }

    async fn complete(&self, lease: &LeaseRef, results: &RequestResults) -> Result<WriteOutcome> {
        let write = FencedWrite::Complete(lease.clone(), results.clone());
        Ok(only(self.write("complete", &[write]).await?))
    }

    async fn write_batch(&self, writes: &[FencedWrite]) -> Result<Vec<WriteOutcome>> {
        self.write("write_batch", writes).await
    }

    async fn fail_attempt(
        &self,
        lease: &LeaseRef,
        error: &AttemptError,
        retry_at: Option<DateTime<Utc>>,
    ) -> Result<WriteOutcome> {
        let at = now();

        // Whether the request goes back to PENDING is decided in the statement, from the
        // attempts it actually has: a retry is only ever scheduled while attempts remain.
        let query = sqlx::query(
            "UPDATE requests SET \
                 status = CASE WHEN ?1 AND attempts < max_attempts \
                     THEN 'PENDING' ELSE 'FAILED' END, \
                 run_after = CASE WHEN ?1 AND attempts < max_attempts \
                     THEN ?2 ELSE run_after END, \
                 completed_at = CASE WHEN ?1 AND attempts < max_attempts \
                     THEN NULL ELSE ?3 END, \
                 history = json_insert(history, '$[#]', json(CASE \
                     WHEN ?1 AND attempts < max_attempts THEN ?4 ELSE ?5 END)), \
                 errors = json_insert(errors, '$[#]', json(?6)), \
                 lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL \
             WHERE id = ?7 AND lease_token = ?8 AND status IN ('PROCESSING', 'EXECUTING')",
        )
        .bind(retry_at.is_some())
        .bind(retry_at.map(micros))
        .bind(micros(at))
        .bind(history_entry(
            RequestStatus::Pending,
            Some(&lease.owner),
            "retry scheduled",
        ))
        .bind(history_entry(
            RequestStatus::Failed,
            Some(&lease.owner),
            "attempt failed; no retry",
        ))
        .bind(to_json(error));
        self.fenced_write("fail_attempt", query, lease).await
    }

    async fn release(&self, lease: &LeaseRef, reason: &str) -> Result<WriteOutcome> {
        let query = sqlx::query(
            "UPDATE requests SET status = 'PENDING', attempts = MAX(attempts - 1, 0), \
                 run_after = ?, lease_owner = NULL, lease_token = NULL, \
                 lease_expires_at = NULL, history = json_insert(history, '$[#]', json(?)) \
             WHERE id = ? AND lease_token = ? AND status IN ('PROCESSING', 'EXECUTING')",
        )
        .bind(micros(now()))
        .bind(history_entry(
            RequestStatus::Pending,
            Some(&lease.owner),
            reason,
        ));
        self.fenced_write("release", query, lease).await
    }

    async fn cancel(&self, id: &RequestId, reason: &str) -> Result<CancelOutcome> {
        // RETURNING sees the row after the update, so the previous status is read first;
        // the update itself is still conditional on that status, and is retried if a worker
        // moved the request in between.
        loop {
            let Some(request) = self.get(id).await? else {
                return Ok(CancelOutcome::NotFound);
            };
            if request.status.is_terminal() {
                return Ok(CancelOutcome::AlreadyTerminal(request.status));
            }
            let rows = sqlx::query(
                "UPDATE requests SET status = 'CANCELLED', completed_at = ?, \
                     lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, \
                     history = json_insert(history, '$[#]', json(?)) \
                 WHERE id = ? AND status = ?",
            )
            .bind(micros(now()))
            .bind(history_entry(RequestStatus::Cancelled, None, reason))
            .bind(id.as_str())
            .bind(request.status.as_str())
            .execute(&self.writer)
            .await
            .map_err(|e| Error::store("cancel", e))?
            .rows_affected();
            if rows > 0 {
                return Ok(CancelOutcome::Cancelled {
                    previous: request.status,
                });
            }
        }
    }

    async fn rescue_expired(&self) -> Result<Vec<RescuedRequest>> {
        let at = now();
        let expired = sqlx::query(
            "SELECT id, lease_owner, lease_token, attempts, max_attempts FROM requests \
             WHERE status IN ('PROCESSING', 'EXECUTING') AND lease_expires_at <= ?",
        )
        .bind(micros(at))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| Error::store("rescue_expired", e))?;

        let mut rescued = Vec::new();
        for row in expired {
            let id: String = column(&row, "", "id")?;
            let owner: String =
                column::<Option<String>>(&row, &id, "lease_owner")?.unwrap_or_default();
            let token: String = column(&row, &id, "lease_token")?;
            let attempts = column::<i64>(&row, &id, "attempts")?.max(0) as u32;
            let max_attempts = column::<i64>(&row, &id, "max_attempts")?.max(1) as u32;
            let status = if attempts >= max_attempts {
                RequestStatus::Failed
            } else {
                RequestStatus::Pending
            };
            let error = expired_lease_error(attempts, &owner);

            // Conditional on the very lease that was seen expired: a completion, cancel or
            // heartbeat that committed since then makes this update match nothing.
            let rows = sqlx::query(
                "UPDATE requests SET status = ?, run_after = ?, completed_at = ?, \
                     lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, \
                     errors = json_insert(errors, '$[#]', json(?)), \
                     history = json_insert(history, '$[#]', json(?)) \
                 WHERE id = ? AND lease_token = ? AND lease_expires_at <= ? \
                     AND status IN ('PROCESSING', 'EXECUTING')",
            )
            .bind(status.as_str())
            .bind(micros(at))
            .bind(status.is_terminal().then(|| micros(at)))
            .bind(to_json(&error))
            .bind(history_entry(status, None, "lease expired; rescued"))
            .bind(&id)
            .bind(&token)
            .bind(micros(at))
            .execute(&self.writer)
            .await
            .map_err(|e| Error::store("rescue_expired", e))?
            .rows_affected();
            if rows > 0 {
                rescued.push(RescuedRequest {
                    request_id: RequestId::from_stored(id),
                    status,
                    attempts,
                    previous_owner: owner,
                });
            }
        }
        Ok(rescued)
    }

    async fn prune_finished(&self, finished_before: DateTime<Utc>) -> Result<u64> {
        let rows = sqlx::query(
            "DELETE FROM requests \
             WHERE status IN ('COMPLETED', 'FAILED', 'CANCELLED') AND completed_at < ?",
        )
        .bind(micros(finished_before))
        .execute(&self.writer)
        .await
        .map_err(|e| Error::store("prune_finished", e))?
        .rows_affected();
        Ok(rows)
    }

    async fn count_by_status(&self) -> Result<BTreeMap<RequestStatus, u64>> {
        let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM requests GROUP BY status")
            .fetch_all(&self.pool)
            .await
            .map_err(|e| Error::store("count_by_status", e))?;
        let mut counts = BTreeMap::new();
        for row in rows {
            let status: String = column(&row, "", "status")?;
            let n: i64 = column(&row, "", "n")?;
            counts.insert(status.parse()?, n.max(0) as u64);
        }
        Ok(counts)
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(|e| Error::store("ping", e))
    }
}
