//! The store's own schema, as numbered migrations (their statements per
//! backend are in `crate::backend`), and `migrate`, which also creates the
//! typed event views and the tables of read models.

use crate::backend::rows::Number;
use crate::backend::{write_transaction, Bind, DbConnection, Stmt};
use crate::error::{Error, Result};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{Integer, Text};
use es_core::view::event_views;

/// One step of the store's schema. Applied once, in order, in a
/// transaction. Its statements per backend are the dialect's
/// [`migration`](crate::backend::Dialect::migration).
pub(crate) struct Migration {
    pub version: i32,
    pub name: &'static str,
}

pub(crate) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "event log",
    },
    Migration {
        version: 2,
        name: "read models and checkpoints",
    },
    Migration {
        version: 3,
        name: "aggregate snapshots",
    },
    Migration {
        version: 4,
        name: "gap-safe following",
    },
    Migration {
        version: 5,
        name: "asynchronous projection runners",
    },
    Migration {
        version: 6,
        name: "follow order keys",
    },
    Migration {
        version: 7,
        name: "no rewriting through insert conflicts",
    },
    Migration {
        version: 8,
        name: "exclusive rebuilds",
    },
    Migration {
        version: 9,
        name: "event tags",
    },
    Migration {
        version: 10,
        name: "appends commit without NOTIFY",
    },
    Migration {
        version: 11,
        name: "stream versions follow each other",
    },
    Migration {
        version: 12,
        name: "read-model rows written with their append",
    },
];

#[derive(QueryableByName)]
struct Applied {
    #[diesel(sql_type = Integer)]
    version: i32,
}

/// Applies pending migrations, (re)creates the typed event views and the
/// tables of read models, then builds the inline read models that need it.
/// Safe to call from many processes at once.
///
/// The schema changes commit in one transaction; the builds run after it,
/// each as a [rebuild](crate::EventStore::rebuild) in short transactions, so
/// that appends go on meanwhile. A build that another process is running is
/// waited for.
pub(crate) fn migrate(conn: &mut DbConnection) -> Result<()> {
    // Two event types or views with one name, among others, refuse before
    // anything is created.
    crate::projection::registry()?;
    let dialect = conn.dialect();
    let migrated = write_transaction(conn, |conn| {
        dialect.lock_migrations(conn)?;
        conn.batch_execute(
            "CREATE TABLE IF NOT EXISTS es_schema_migrations (
                version INTEGER PRIMARY KEY,
                name TEXT NOT NULL,
                applied_at TEXT NOT NULL
            )",
        )?;
        let applied: Vec<i32> = Stmt::new("SELECT version FROM es_schema_migrations")
            .load::<Applied>(conn)?
            .into_iter()
            .map(|a| a.version)
            .collect();
        for m in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
            let sql = dialect.migration(m.version);
            let run = |conn: &mut DbConnection| -> QueryResult<()> {
                // PostgreSQL refuses an empty query string.
                if !sql.trim().is_empty() {
                    conn.batch_execute(sql)?;
                }
                let stamp = chrono::Utc::now().to_rfc3339();
                Stmt::new(
                    "INSERT INTO es_schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                )
                .bind(Bind::Int(m.version))
                .bind(Bind::Text(m.name))
                .bind(Bind::Text(&stamp))
                .execute(conn)?;
                Ok(())
            };
            run(conn).map_err(|source| Error::Migration {
                version: m.version,
                name: m.name,
                source,
            })?;
            tracing::info!(version = m.version, name = m.name, "applied migration");
        }
        for view in event_views() {
            super::views::create_view(conn, view)?;
        }
        super::tags::sync_tags(conn)?;
        super::read_models::sync_read_models(conn)
    });
    dialect.unlock_migrations(conn);
    migrated?;
    crate::rebuild::build_pending(conn)
}

#[derive(QueryableByName)]
struct StoredReadModel {
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = Text)]
    fingerprint: String,
}

/// Whether a table or view of this name is visible to the connection (on
/// PostgreSQL, through its `search_path`, as queries see it).
fn relation_exists(conn: &mut DbConnection, name: &str) -> Result<bool> {
    Ok(conn
        .dialect()
        .relation_exists(name)
        .get_result::<Number>(conn)?
        .n
        > 0)
}

/// What [`migrate`] would still create or change, read without writing:
/// store migrations not applied, read models missing or of another shape,
/// event views missing. Empty when the database is up to date.
pub(crate) fn missing(conn: &mut DbConnection) -> Result<Vec<String>> {
    if !relation_exists(conn, "es_schema_migrations")? {
        return Ok(vec!["the store's tables (no migration has run)".to_owned()]);
    }
    let backend = conn.backend();
    let mut missing = Vec::new();
    let applied: Vec<i32> = Stmt::new("SELECT version FROM es_schema_migrations")
        .load::<Applied>(conn)?
        .into_iter()
        .map(|a| a.version)
        .collect();
    for m in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
        missing.push(format!("store migration {} ({})", m.version, m.name));
    }
    let stored = if applied.contains(&2) {
        Stmt::new("SELECT name, fingerprint FROM es_read_models").load::<StoredReadModel>(conn)?
    } else {
        Vec::new()
    };
    for entry in &crate::projection::registry()?.read_models {
        let schema = entry.schema;
        match stored.iter().find(|s| s.name == schema.name) {
            None => missing.push(format!("read model `{}`", schema.name)),
            Some(s) if s.fingerprint != schema.fingerprint(backend) => missing.push(format!(
                "read model `{}` in its current shape (its struct changed)",
                schema.name
            )),
            Some(_) => {}
        }
    }
    for view in event_views() {
        if !relation_exists(conn, view.name)? {
            missing.push(format!("event view `{}`", view.name));
        }
    }
    if applied.contains(&9) {
        missing.extend(super::tags::missing(conn)?);
    }
    Ok(missing)
}

/// The newest schema version this code knows, and the one the database has.
pub(crate) fn schema_versions(conn: &mut DbConnection) -> Result<(i32, i64)> {
    let latest = MIGRATIONS.last().map(|m| m.version).unwrap_or(0);
    let have = Stmt::new("SELECT COUNT(*) AS n FROM es_schema_migrations")
        .get_result::<Number>(conn)
        .map(|c| c.n)
        .unwrap_or(0);
    Ok((latest, have))
}

#[cfg(test)]
mod tests {
    use super::MIGRATIONS;
    use crate::Backend;

    #[test]
    fn every_backend_lists_every_migration_in_order() {
        let versions: Vec<i32> = MIGRATIONS.iter().map(|m| m.version).collect();
        for backend in Backend::ALL {
            let listed: Vec<i32> = backend
                .dialect()
                .migrations()
                .iter()
                .map(|(v, _)| *v)
                .collect();
            assert_eq!(listed, versions, "{backend}");
        }
    }
}
