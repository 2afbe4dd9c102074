//! Access to the PostgreSQL server the Postgres suites run against.

#![allow(dead_code)]

use root_orchestrator::{PostgresStore, PostgresStoreOptions};
use sqlx::Connection;

/// The server's URL: `DATABASE_URL`, or the local test database.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A schema name no other test uses; `prefix` groups one suite's schemas.
pub fn fresh_schema(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..16]
    )
}

/// A store in `schema` (created and migrated), with at most `max_connections` connections.
pub async fn connect(schema: &str, max_connections: u32) -> PostgresStore {
    connect_named(schema, max_connections, "root-orchestrator-tests").await
}

/// Like [`connect`], with connections named `application_name` in `pg_stat_activity`.
pub async fn connect_named(
    schema: &str,
    max_connections: u32,
    application_name: &str,
) -> PostgresStore {
    let mut options = PostgresStoreOptions::default();
    options.schema = Some(schema.to_owned());
    options.max_connections = max_connections;
    options.application_name = application_name.to_owned();
    let url = database_url();
    PostgresStore::connect_with(&url, options)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "PostgreSQL is needed for this suite and could not be used at {url} ({e}); \
                 start it or set DATABASE_URL"
            )
        })
}

/// An administrative connection, outside any store's pool.
pub async fn admin() -> sqlx::PgConnection {
    let url = database_url();
    sqlx::PgConnection::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL unreachable at {url}: {e}"))
}

/// Drops a test's schema and everything in it.
pub async fn drop_schema(schema: &str) {
    let mut conn = admin().await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
    )))
    .execute(&mut conn)
    .await
    .expect("drop the test schema");
}
