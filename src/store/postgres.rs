//! A [`RequestStore`] on PostgreSQL: worker processes on many machines share one database.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{Acquire, Row, migrate::Migrator};
use tokio::sync::mpsc;

use super::row::{
    BatchRow, BatchRows, StoredRow, history_entry, insert_outcomes, needs_transaction, only,
    to_json, to_read_back, unique_runs, unreadable,
};
use super::{
    CancelOutcome, FencedWrite, InsertOutcome, LeaseRef, ListFilter, RequestPage, RequestStore,
    RescuedRequest, StoreEvent, StoreEvents, WriteOutcome, expired_lease_error,
};
use crate::error::{Error, Result};
use crate::model::{AttemptError, NewRequest, Progress, Request, RequestId, RequestResults};
use crate::status::RequestStatus;

/// The claim's assignments, shared by `claim` and `claim_request`. Parameters: $2 owner,
/// $3 lease seconds, $4 history entry.
macro_rules! claim_set {
    () => {
        "UPDATE requests SET status = 'PROCESSING', attempts = attempts + 1, \
             started_at = now(), progress_stage = NULL, progress_percentage = 0, \
             urls_found = 0, content_extracted = 0, estimated_completion = NULL, \
             lease_owner = $2, lease_token = replace(gen_random_uuid()::text, '-', ''), \
             lease_expires_at = now() + make_interval(secs => $3), \
             history = history || jsonb_build_array($4::jsonb)"
    };
}

static MIGRATOR: Migrator = sqlx::migrate!("migrations/postgres");

/// Columns every query that returns requests selects, in this order; JSON columns come
/// back as text so that one parser serves every SQL backend.
macro_rules! columns {
    () => {
        "id, project_id, user_id, request_type, priority, \
         configuration::text AS configuration, status, progress_stage, progress_percentage, \
         urls_found, content_extracted, estimated_completion, results::text AS results, \
         errors::text AS errors, history::text AS history, attempts, max_attempts, \
         created_at, started_at, completed_at, run_after, lease_owner, lease_token, \
         lease_expires_at"
    };
}

/// How [`PostgresStore::connect_with`] connects.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PostgresStoreOptions {
    /// Connections the pool opens at most, the notification listener's included (it holds
    /// one for as long as workers run). Default 10; at least 2.
    pub max_connections: u32,
    /// How long a query waits for a free connection before failing. Default 5 s.
    pub acquire_timeout: Duration,
    /// The schema holding the tables, created if missing; the connection's default
    /// (`public`) when `None`. Lowercase letters, digits and `_`, at most 45 bytes (the
    /// notification channel is named after it), not starting with a digit or `pg_`.
    pub schema: Option<String>,
    /// `application_name` of every connection, as shown in `pg_stat_activity`.
    pub application_name: String,
}

impl Default for PostgresStoreOptions {
    fn default() -> Self {
        PostgresStoreOptions {
            max_connections: 10,
            acquire_timeout: Duration::from_secs(5),
            schema: None,
            application_name: "root-orchestrator".to_owned(),
        }
    }
}

/// Requests in a PostgreSQL table.
///
/// - Claims take many rows in one statement with `FOR UPDATE SKIP LOCKED`, so any number
///   of worker processes share the table without ever receiving the same request.
/// - Timestamps that leases depend on come from the database's clock, so workers on
///   machines whose clocks disagree still agree on when a lease expires.
/// - [`subscribe`](RequestStore::subscribe) turns `LISTEN/NOTIFY` into wake-ups for idle
///   workers and cancels for running requests, reconnecting by itself.
/// - Migrations are applied on connect under an advisory lock, so processes starting
///   together migrate once.
///
/// # Examples
///
/// ```no_run
/// use root_orchestrator::{PostgresStore, PostgresStoreOptions};
///
/// # async fn connect() -> root_orchestrator::Result<()> {
/// let mut options = PostgresStoreOptions::default();
/// options.max_connections = 20;
/// let store = PostgresStore::connect_with("postgres://localhost/orchestrator", options).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
    channel: String,
}

impl PostgresStore {
    /// Connects to `url` with the default options and migrates the database.
    ///
    /// # Errors
    ///
    /// [`Error::Store`] when the server cannot be reached, [`Error::Migration`] when the
    /// schema cannot be brought up to date.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, PostgresStoreOptions::default()).await
    }

    /// Connects to `url` with `options` and migrates the database.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for a bad option, [`Error::Store`] when the server cannot be
    /// reached, [`Error::Migration`] when the schema cannot be brought up to date.
    pub async fn connect_with(url: &str, options: PostgresStoreOptions) -> Result<Self> {
        if options.max_connections < 2 {
            return Err(Error::InvalidConfig {
                name: "max_connections".into(),
                value: options.max_connections.to_string(),
                expected: "at least 2 (one is held by the notification listener)".into(),
            });
        }
        let mut connect: PgConnectOptions = url.parse().map_err(|e| Error::InvalidConfig {
            name: "url".into(),
            value: redact(url),
            expected: format!("a PostgreSQL connection URL ({e})"),
        })?;
        connect = connect.application_name(&options.application_name);
        if let Some(schema) = &options.schema {
            check_schema_name(schema)?;
            connect = connect.options([("search_path", schema.as_str())]);
        }

        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect)
            .await
            .map_err(|e| Error::store("connect", e))?;
        if let Some(schema) = &options.schema {
            create_schema(&pool, schema)
                .await
                .map_err(|e| Error::store("connect", e))?;
        }
        Self::from_pool(pool).await
    }

    /// Uses an existing pool (at least 2 connections), migrating its database first.
    ///
    /// # Errors
    ///
    /// [`Error::Migration`] when the schema cannot be brought up to date.
    pub async fn from_pool(pool: PgPool) -> Result<Self> {
        MIGRATOR.run(&pool).await.map_err(|e| Error::Migration {
            source: Box::new(e),
        })?;
        let schema: String = sqlx::query_scalar("SELECT current_schema()")
            .fetch_one(&pool)
            .await
            .map_err(|e| Error::store("connect", e))?;
        Ok(PostgresStore {
            pool,
            channel: format!("{CHANNEL_PREFIX}{schema}"),
        })
    }

    /// The underlying connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Closes every connection; later calls fail.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Fails a just-claimed request whose row cannot be read back, so that it neither
    /// breaks the claim of the healthy requests beside it nor returns when its lease
    /// lapses, only to break the next claim.
    async fn quarantine(&self, row: &PgRow, problem: &Error) {
        let id = row.try_get::<String, _>("id").unwrap_or_default();
        let token = row.try_get::<String, _>("lease_token").unwrap_or_default();
        tracing::error!(
            request_id = %id,
            error = %problem,
            "claimed request cannot be read; failing it"
        );
        let failed = sqlx::query(
            "UPDATE requests SET status = 'FAILED', completed_at = now(), lease_owner = NULL, \
                 lease_token = NULL, lease_expires_at = NULL WHERE id = $1 AND lease_token = $2",
        )
        .bind(&id)
        .bind(&token)
        .execute(&self.pool)
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
        query: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
        lease: &LeaseRef,
    ) -> Result<WriteOutcome> {
        let rows = query
            .bind(lease.request_id.as_str())
            .bind(&lease.token)
            .execute(&self.pool)
            .await
            .map_err(|e| Error::store(operation, e))?
            .rows_affected();
        self.outcome(operation, rows, &lease.request_id).await
    }

    /// Stores `requests` in one statement over arrays: one round trip and one commit.
    /// `operation` names the caller in errors.
    async fn insert_batch(
        &self,
        operation: &'static str,
        requests: Vec<NewRequest>,
        max_attempts: u32,
    ) -> Result<Vec<InsertOutcome>> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<RequestId> = requests
            .iter()
            .map(|r| r.request_id.clone().unwrap_or_else(RequestId::generate))
            .collect();

        // ON CONFLICT DO NOTHING makes a repeated caller-given id a no-op, atomically,
        // even when two submits of the same id race from different processes.
        // WITH ORDINALITY keeps the batch's order in `position`, and the batch shares the
        // transaction's `now()`, so it is claimed in the order given.
        // Two batches that share ids can deadlock, each waiting on the other's uncommitted
        // rows; PostgreSQL aborts one, which then finds the other's rows and runs again.
        let mut deadlocks = 0;
        let rows = loop {
            let attempt = sqlx::query(concat!(
                "INSERT INTO requests (id, project_id, user_id, request_type, priority, \
             configuration, status, history, max_attempts, created_at, run_after) \
             SELECT id, project_id, user_id, request_type, priority, configuration::jsonb, \
                 'PENDING', jsonb_build_array($7::jsonb), max_attempts, now(), \
                 COALESCE(run_after, now()) \
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int2[], \
                 $6::text[], $8::int4[], $9::timestamptz[]) WITH ORDINALITY \
                 AS batch(id, project_id, user_id, request_type, priority, configuration, \
                     max_attempts, run_after, position) \
             ORDER BY position \
             ON CONFLICT (id) DO NOTHING RETURNING ",
                columns!()
            ))
            .bind(ids.iter().map(RequestId::as_str).collect::<Vec<_>>())
            .bind(
                requests
                    .iter()
                    .map(|r| r.project_id.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(
                requests
                    .iter()
                    .map(|r| r.user_id.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(
                requests
                    .iter()
                    .map(|r| r.request_type.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(
                requests
                    .iter()
                    .map(|r| r.priority.rank() as i16)
                    .collect::<Vec<_>>(),
            )
            .bind(
                requests
                    .iter()
                    .map(|r| to_json(&r.configuration))
                    .collect::<Vec<_>>(),
            )
            .bind(history_entry(RequestStatus::Pending, None, "submitted"))
            .bind(
                requests
                    .iter()
                    .map(|r| r.max_attempts.unwrap_or(max_attempts) as i32)
                    .collect::<Vec<_>>(),
            )
            .bind(requests.iter().map(|r| r.run_after).collect::<Vec<_>>())
            .fetch_all(&self.pool)
            .await;
            match attempt {
                Err(sqlx::Error::Database(e))
                    if e.code().as_deref() == Some(DEADLOCK_DETECTED) && deadlocks < 5 =>
                {
                    deadlocks += 1;
                    tracing::debug!(deadlocks, "batch insert deadlocked; running it again");
                }
                other => break other.map_err(|e| Error::store(operation, e))?,
            }
        };

        let stored = rows
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
            " FROM requests WHERE id = ANY($1::text[])"
        ))
        .bind(ids)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| Error::store(operation, e))?;
        rows.iter().map(request_from_row).collect()
    }

    /// Applies fenced writes run by run (see `unique_runs`) on one connection, in a
    /// transaction when there is more than one statement. `operation` names the caller in
    /// errors.
    async fn write(
        &self,
        operation: &'static str,
        writes: &[FencedWrite],
    ) -> Result<Vec<WriteOutcome>> {
        let fail = |e| Error::store(operation, e);
        let runs = unique_runs(writes);
        let mut conn = self.pool.acquire().await.map_err(fail)?;
        if !needs_transaction(&runs) {
            return apply_runs(&mut conn, operation, &runs).await;
        }
        let mut tx = conn.begin().await.map_err(fail)?;
        let outcomes = apply_runs(&mut tx, operation, &runs).await?;
        tx.commit().await.map_err(fail)?;
        Ok(outcomes)
    }

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
            sqlx::query_scalar("SELECT status FROM requests WHERE id = $1")
                .bind(id.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| Error::store(operation, e))?;
        let current = current.map(|s| s.parse()).transpose()?;
        Ok(WriteOutcome::Rejected { current })
    }
}

/// Creates `schema` if it is missing. `IF NOT EXISTS` alone still fails when two processes
/// create the same schema at once, so creation is serialised by an advisory lock.
async fn create_schema(pool: &PgPool, schema: &str) -> std::result::Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('root_orchestrator:create_schema'))")
        .execute(&mut *tx)
        .await?;
    // The name was checked to be a plain identifier, so quoting it is enough.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE SCHEMA IF NOT EXISTS \"{schema}\""
    )))
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// Longest schema name: the notification channel `root_orchestrator:<schema>` must fit
/// PostgreSQL's 63-byte identifiers.
const MAX_SCHEMA_LEN: usize = 63 - CHANNEL_PREFIX.len();
const CHANNEL_PREFIX: &str = "root_orchestrator:";

/// Schema names are kept to what PostgreSQL leaves unchanged when unquoted (lowercase), so
/// that `search_path` and `CREATE SCHEMA` mean the same schema; `pg_` names are reserved.
fn check_schema_name(schema: &str) -> Result<()> {
    let plain = !schema.is_empty()
        && schema.len() <= MAX_SCHEMA_LEN
        && schema
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !schema.starts_with(|c: char| c.is_ascii_digit())
        && !schema.starts_with("pg_");
    if plain {
        return Ok(());
    }
    Err(Error::InvalidConfig {
        name: "schema".into(),
        value: schema.to_owned(),
        expected: format!(
            "1 to {MAX_SCHEMA_LEN} lowercase ASCII letters, digits or _, not starting with a \
             digit or pg_"
        ),
    })
}

/// The URL without its password, for error messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Applies run after run (see `unique_runs`) on `conn`; a refused write reports the
/// status its request had when the write came, not one a later run gave it.
async fn apply_runs(
    conn: &mut sqlx::PgConnection,
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
                sqlx::query_scalar("SELECT status FROM requests WHERE id = $1")
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

/// Applies a batch's writes as one statement per kind, over arrays; returns the ids whose
/// write applied.
async fn apply_batch(
    conn: &mut sqlx::PgConnection,
    rows: &BatchRows,
) -> std::result::Result<std::collections::HashSet<String>, sqlx::Error> {
    fn column<'r>(rows: &'r [BatchRow], field: fn(&'r BatchRow) -> &'r str) -> Vec<&'r str> {
        rows.iter().map(field).collect()
    }

    let mut applied = std::collections::HashSet::new();
    if !rows.executing.is_empty() {
        let ids: Vec<String> = sqlx::query_scalar(
            "UPDATE requests SET status = 'EXECUTING', \
                 history = history || jsonb_build_array(batch.entry::jsonb) \
             FROM UNNEST($1::text[], $2::text[], $3::text[]) AS batch(id, token, entry) \
             WHERE requests.id = batch.id AND requests.lease_token = batch.token \
                 AND requests.status = 'PROCESSING' \
             RETURNING requests.id",
        )
        .bind(column(&rows.executing, |r| &r.id))
        .bind(column(&rows.executing, |r| &r.token))
        .bind(column(&rows.executing, |r| &r.entry))
        .fetch_all(&mut *conn)
        .await?;
        applied.extend(ids);
    }
    if !rows.completing.is_empty() {
        let ids: Vec<String> = sqlx::query_scalar(
            "UPDATE requests SET status = 'COMPLETED', results = batch.results::jsonb, \
                 completed_at = now(), progress_percentage = 100, lease_owner = NULL, \
                 lease_token = NULL, lease_expires_at = NULL, \
                 history = history || jsonb_build_array(batch.entry::jsonb) \
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[]) \
                 AS batch(id, token, entry, results) \
             WHERE requests.id = batch.id AND requests.lease_token = batch.token \
                 AND requests.status = 'EXECUTING' \
             RETURNING requests.id",
        )
        .bind(column(&rows.completing, |r| &r.id))
        .bind(column(&rows.completing, |r| &r.token))
        .bind(column(&rows.completing, |r| &r.entry))
        .bind(column(&rows.completing, |r| {
            r.results.as_deref().unwrap_or("null")
        }))
        .fetch_all(&mut *conn)
        .await?;
        applied.extend(ids);
    }
    Ok(applied)
}

/// PostgreSQL's SQLSTATE for a transaction aborted to break a deadlock.
const DEADLOCK_DETECTED: &str = "40P01";

fn seconds(duration: Duration) -> f64 {
    duration.as_secs_f64()
}

fn request_from_row(row: &PgRow) -> Result<Request> {
    let id: String = column(row, "", "id")?;
    StoredRow {
        project_id: column(row, &id, "project_id")?,
        user_id: column(row, &id, "user_id")?,
        request_type: column(row, &id, "request_type")?,
        priority: i64::from(column::<i16>(row, &id, "priority")?),
        configuration: column(row, &id, "configuration")?,
        status: column(row, &id, "status")?,
        progress_stage: column(row, &id, "progress_stage")?,
        progress_percentage: i64::from(column::<i16>(row, &id, "progress_percentage")?),
        urls_found: column(row, &id, "urls_found")?,
        content_extracted: column(row, &id, "content_extracted")?,
        estimated_completion: column(row, &id, "estimated_completion")?,
        results: column(row, &id, "results")?,
        errors: column(row, &id, "errors")?,
        history: column(row, &id, "history")?,
        attempts: i64::from(column::<i32>(row, &id, "attempts")?),
        max_attempts: i64::from(column::<i32>(row, &id, "max_attempts")?),
        created_at: column(row, &id, "created_at")?,
        started_at: column(row, &id, "started_at")?,
        completed_at: column(row, &id, "completed_at")?,
        run_after: column(row, &id, "run_after")?,
        lease_owner: column(row, &id, "lease_owner")?,
        lease_token: column(row, &id, "lease_token")?,
        lease_expires_at: column(row, &id, "lease_expires_at")?,
        id: id.clone(),
    }
    .into_request()
}

fn column<'r, T>(row: &'r PgRow, id: &str, field: &'static str) -> Result<T>
where
    T: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    row.try_get(field).map_err(|e| unreadable(id, field, e))
}

#[async_trait]
impl RequestStore for PostgresStore {
    async fn insert(&self, new: NewRequest, max_attempts: u32) -> Result<InsertOutcome> {
        // One request has a statement of its own, as cheap as a submit can be; single
        // submits are the common case.
        let id = new.request_id.clone().unwrap_or_else(RequestId::generate);

        // ON CONFLICT DO NOTHING makes a repeated caller-given id a no-op, atomically,
        // even when two submits of the same id race from different processes.
        let inserted = sqlx::query(concat!(
            "INSERT INTO requests (id, project_id, user_id, request_type, priority, \
             configuration, status, history, max_attempts, created_at, run_after) \
             VALUES ($1, $2, $3, $4, $5, $6::jsonb, 'PENDING', jsonb_build_array($7::jsonb), \
             $8, now(), COALESCE($9, now())) \
             ON CONFLICT (id) DO NOTHING RETURNING ",
            columns!()
        ))
        .bind(id.as_str())
        .bind(&new.project_id)
        .bind(&new.user_id)
        .bind(new.request_type.as_str())
        .bind(new.priority.rank() as i16)
        .bind(to_json(&new.configuration))
        .bind(history_entry(RequestStatus::Pending, None, "submitted"))
        .bind(new.max_attempts.unwrap_or(max_attempts) as i32)
        .bind(new.run_after)
        .fetch_optional(&self.pool)
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
            " FROM requests WHERE id = $1"
        ))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| Error::store("get", e))?;
        row.as_ref().map(request_from_row).transpose()
    }

    async fn list(&self, filter: &ListFilter) -> Result<RequestPage> {
        let mut query = sqlx::QueryBuilder::<sqlx::Postgres>::new(concat!(
            "SELECT ",
            columns!(),
            " FROM requests WHERE TRUE"
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
                .push_bind(visibility.user_id.clone())
                .push(" OR project_id = ANY(")
                .push_bind(visibility.project_ids.clone())
                .push("))");
        }
        if let Some(cursor) = &filter.after {
            query
                .push(" AND (created_at, id) < (")
                .push_bind(cursor.created_at)
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

        // Lock the next pending rows, skipping rows other claimers hold, and take them in
        // the same statement: no two claimers, in any process, can get the same request.
        let rows = sqlx::query(concat!(
            "WITH next AS MATERIALIZED ( \
                 SELECT seq AS claimed_seq FROM requests \
                 WHERE status = 'PENDING' AND run_after <= now() \
                 ORDER BY priority, created_at, seq \
                 LIMIT $1 FOR UPDATE SKIP LOCKED) \
             ",
            claim_set!(),
            " FROM next WHERE seq = next.claimed_seq RETURNING seq, ",
            columns!()
        ))
        .bind(limit as i64)
        .bind(owner)
        .bind(seconds(lease_duration))
        .bind(history_entry(
            RequestStatus::Processing,
            Some(owner),
            "claimed",
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| Error::store("claim", e))?;

        // RETURNING does not keep the CTE's order; restore claim order.
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
        let row = sqlx::query(concat!(
            claim_set!(),
            " WHERE id = $1 AND status = 'PENDING' RETURNING ",
            columns!()
        ))
        .bind(id.as_str())
        .bind(owner)
        .bind(seconds(lease_duration))
        .bind(history_entry(
            RequestStatus::Processing,
            Some(owner),
            "claimed",
        ))
        .fetch_optional(&self.pool)
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
            "UPDATE requests SET progress_stage = $1, \
                 progress_percentage = GREATEST(progress_percentage, $2), \
                 urls_found = $3, content_extracted = $4, estimated_completion = $5 \
             WHERE id = $6 AND lease_token = $7 AND status = 'EXECUTING'",
        )
        .bind(progress.current_stage.as_deref())
        .bind(i16::from(progress.percentage.min(100)))
        .bind(i64::try_from(progress.urls_found).unwrap_or(i64::MAX))
        .bind(i64::try_from(progress.content_extracted).unwrap_or(i64::MAX))
        .bind(progress.estimated_completion);
        self.fenced_write("record_progress", query, lease).await
    }

    async fn extend_lease(
        &self,
        lease: &LeaseRef,
        lease_duration: Duration,
    ) -> Result<WriteOutcome> {
        let query = sqlx::query(
            "UPDATE requests SET lease_expires_at = now() + make_interval(secs => $1) \
             WHERE id = $2 AND lease_token = $3 AND status IN ('PROCESSING', 'EXECUTING')",
        )
        .bind(seconds(lease_duration));
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
        // Whether the request goes back to PENDING is decided in the statement, from the
        // attempts it actually has: a retry is only ever scheduled while attempts remain.
        let query = sqlx::query(
            "UPDATE requests SET \
                 status = CASE WHEN $1 AND attempts < max_attempts \
                     THEN 'PENDING' ELSE 'FAILED' END, \
                 run_after = CASE WHEN $1 AND attempts < max_attempts \
                     THEN $2 ELSE run_after END, \
                 completed_at = CASE WHEN $1 AND attempts < max_attempts \
                     THEN NULL ELSE now() END, \
                 history = history || jsonb_build_array((CASE \
                     WHEN $1 AND attempts < max_attempts THEN $3 ELSE $4 END)::jsonb), \
                 errors = errors || jsonb_build_array($5::jsonb), \
                 lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL \
             WHERE id = $6 AND lease_token = $7 AND status IN ('PROCESSING', 'EXECUTING')",
        )
        .bind(retry_at.is_some())
        .bind(retry_at)
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
            "UPDATE requests SET status = 'PENDING', attempts = GREATEST(attempts - 1, 0), \
                 run_after = now(), lease_owner = NULL, lease_token = NULL, \
                 lease_expires_at = NULL, history = history || jsonb_build_array($1::jsonb) \
             WHERE id = $2 AND lease_token = $3 AND status IN ('PROCESSING', 'EXECUTING')",
        )
        .bind(history_entry(
            RequestStatus::Pending,
            Some(&lease.owner),
            reason,
        ));
        self.fenced_write("release", query, lease).await
    }

    async fn cancel(&self, id: &RequestId, reason: &str) -> Result<CancelOutcome> {
        // Conditional on the status just read; if a worker moved the request in between,
        // read again and retry.
        loop {
            let Some(request) = self.get(id).await? else {
                return Ok(CancelOutcome::NotFound);
            };
            if request.status.is_terminal() {
                return Ok(CancelOutcome::AlreadyTerminal(request.status));
            }
            let rows = sqlx::query(
                "UPDATE requests SET status = 'CANCELLED', completed_at = now(), \
                     lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, \
                     history = history || jsonb_build_array($1::jsonb) \
                 WHERE id = $2 AND status = $3",
            )
            .bind(history_entry(RequestStatus::Cancelled, None, reason))
            .bind(id.as_str())
            .bind(request.status.as_str())
            .execute(&self.pool)
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
        let expired = sqlx::query(
            "SELECT id, lease_owner, lease_token, attempts, max_attempts FROM requests \
             WHERE status IN ('PROCESSING', 'EXECUTING') AND lease_expires_at <= now()",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| Error::store("rescue_expired", e))?;

        let mut rescued = Vec::new();
        for row in expired {
            let id: String = column(&row, "", "id")?;
            let owner = column::<Option<String>>(&row, &id, "lease_owner")?.unwrap_or_default();
            let token: String = column(&row, &id, "lease_token")?;
            let attempts = column::<i32>(&row, &id, "attempts")?.max(0) as u32;
            let max_attempts = column::<i32>(&row, &id, "max_attempts")?.max(1) as u32;
            let status = if attempts >= max_attempts {
                RequestStatus::Failed
            } else {
                RequestStatus::Pending
            };
            let error = expired_lease_error(attempts, &owner);

            // Conditional on the very lease that was seen expired: a completion, cancel or
            // heartbeat that committed since then makes this update match nothing.
            let rows = sqlx::query(
                "UPDATE requests SET status = $1, run_after = now(), \
                     completed_at = CASE WHEN $1 = 'FAILED' THEN now() END, \
                     lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, \
                     errors = errors || jsonb_build_array($2::jsonb), \
                     history = history || jsonb_build_array($3::jsonb) \
                 WHERE id = $4 AND lease_token = $5 AND lease_expires_at <= now() \
                     AND status IN ('PROCESSING', 'EXECUTING')",
            )
            .bind(status.as_str())
            .bind(to_json(&error))
            .bind(history_entry(status, None, "lease expired; rescued"))
            .bind(&id)
            .bind(&token)
            .execute(&self.pool)
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
             WHERE status IN ('COMPLETED', 'FAILED', 'CANCELLED') AND completed_at < $1",
        )
        .bind(finished_before)
        .execute(&self.pool)
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

    fn subscribe(&self) -> Option<StoreEvents> {
        let (events, received) = mpsc::channel(256);
        tokio::spawn(listen(self.pool.clone(), self.channel.clone(), events));
        Some(Box::pin(futures::stream::unfold(
            received,
            |mut received| async move { received.recv().await.map(|event| (event, received)) },
        )))
    }
}

/// Forwards notifications on `channel` to `events` until the receiving side is dropped,
/// re-establishing the listener whenever its connection is lost.
async fn listen(pool: PgPool, channel: String, events: mpsc::Sender<StoreEvent>) {
    let mut connected_before = false;
    let mut pause = Duration::from_millis(100);
    loop {
        let listening = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(&channel).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = tokio::select! {
            _ = events.closed() => return,
            result = listening => match result {
                Ok(listener) => listener,
                Err(err) => {
                    tracing::warn!(
                        error = %err,
                        retry_in_secs = pause.as_secs_f64(),
                        "cannot listen for notifications",
                    );
                    tokio::select! {
                        _ = events.closed() => return,
                        _ = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(5));
                    continue;
                }
            },
        };
        if connected_before {
            tracing::info!("listening for notifications again");
            if events.send(StoreEvent::Reconnected).await.is_err() {
                return;
            }
        }
        connected_before = true;
        pause = Duration::from_millis(100);

        loop {
            let next = tokio::select! {
                _ = events.closed() => return,
                next = listener.try_recv() => next,
            };
            let event = match next {
                Ok(Some(notification)) => match notification.payload().split_once(':') {
                    Some(("cancelled", id)) => {
                        StoreEvent::Cancelled(RequestId::from_stored(id.to_owned()))
                    }
                    _ => StoreEvent::WorkAvailable,
                },
                // The listener reconnected by itself; what was sent meanwhile is lost.
                Ok(None) => StoreEvent::Reconnected,
                Err(err) => {
                    tracing::warn!(error = %err, "notification listener lost its connection");
                    break;
                }
            };
            if events.send(event).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_in_errors_hide_the_password() {
        assert_eq!(
            redact("postgres://app:s3cret@db.internal:5432/requests"),
            "postgres://app:***@db.internal:5432/requests"
        );
        assert_eq!(redact("postgres://localhost/x"), "postgres://localhost/x");
    }

    #[test]
    fn schema_names_are_plain_identifiers() {
        assert!(check_schema_name("tenant_7").is_ok());
        assert!(check_schema_name("Tenant").is_err());
        assert!(check_schema_name("pg_tenant").is_err());
        assert!(check_schema_name(&"a".repeat(MAX_SCHEMA_LEN)).is_ok());
        assert!(check_schema_name(&"a".repeat(MAX_SCHEMA_LEN + 1)).is_err());
        assert!(check_schema_name("7tenant").is_err());
        assert!(check_schema_name("a\"; DROP TABLE requests; --").is_err());
        assert!(check_schema_name("").is_err());
    }
}
