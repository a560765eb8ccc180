//! Blue/green rebuilds of asynchronous read models: the new version is built
//! in a shadow table while the live one keeps serving, then swapped in.
//!
//! Projectors write to their table by its plain name, so the shadow is a
//! table of the same name that the rebuilding connection sees first: in a
//! schema of its own at the front of `search_path` on PostgreSQL, a TEMP
//! table on SQLite (temporary tables hide main ones of the same name).

use crate::connection::{write_transaction, Backend, DbConnection};
use crate::error::Result;
use crate::follow::{read_after, Checkpoint};
use crate::migrations::{quote_ident, quote_literal};
use crate::projection::{handled_types, registry};
use crate::read_model::ReadModelEntry;
use crate::rebuild::{project_batch, RebuildOptions, RebuildProgress, RebuildReport};
use crate::runner::{ensure_checkpoint_row, now_ms_sql, sql};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use std::time::Instant;

#[derive(QueryableByName)]
struct Name {
    #[diesel(sql_type = Text)]
    name: String,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Where the shadow lives and how the rebuilding connection is pointed at it.
enum Shadow {
    Postgres {
        live: String,
        shadow: String,
        search_path: String,
    },
    Sqlite,
}

impl Shadow {
    fn prepare(conn: &mut DbConnection, entry: &ReadModelEntry) -> Result<Self> {
        let table = quote_ident(entry.schema.name);
        match conn.backend() {
            Backend::Postgres => {
                let live = diesel::sql_query("SELECT current_schema() AS name")
                    .get_result::<Name>(conn)?
                    .name;
                let search_path =
                    diesel::sql_query("SELECT current_setting('search_path') AS name")
                        .get_result::<Name>(conn)?
                        .name;
                let shadow = format!("{live}_es_shadow");
                let s = Shadow::Postgres {
                    live,
                    shadow,
                    search_path,
                };
                conn.batch_execute(&format!(
                    "CREATE SCHEMA IF NOT EXISTS {0}; DROP TABLE IF EXISTS {0}.{table}",
                    quote_ident(s.shadow_schema())
                ))?;
                write_transaction(conn, |c| -> Result<()> {
                    s.enter(c)?;
                    for stmt in entry.schema.postgres {
                        c.batch_execute(stmt)?;
                    }
                    Ok(())
                })?;
                Ok(s)
            }
            Backend::Sqlite => {
                conn.batch_execute(&format!("DROP TABLE IF EXISTS temp.{table}"))?;
                // The table alone: the shadow only lives through the rebuild,
                // and its primary key is all projectors look rows up by.
                let create = entry.schema.sqlite.first().copied().unwrap_or_default();
                let create = create.replacen("CREATE TABLE", "CREATE TEMP TABLE", 1);
                conn.batch_execute(&create)?;
                Ok(Shadow::Sqlite)
            }
        }
    }

    fn shadow_schema(&self) -> &str {
        match self {
            Shadow::Postgres { shadow, .. } => shadow,
            Shadow::Sqlite => "temp",
        }
    }

    /// Inside a transaction: make the plain table name mean the shadow.
    fn enter(&self, conn: &mut DbConnection) -> Result<()> {
        if let Shadow::Postgres {
            shadow,
            search_path,
            ..
        } = self
        {
            conn.batch_execute(&format!(
                "SET LOCAL search_path TO {}, {search_path}",
                quote_ident(shadow)
            ))?;
        }
        Ok(())
    }

    /// First in the final transaction: wait for the runner's batch in flight
    /// and hold its writes off, before touching the checkpoint it will also
    /// update (the other order deadlocks).
    fn lock_live(&self, conn: &mut DbConnection, name: &str) -> Result<()> {
        if let Shadow::Postgres { live, .. } = self {
            conn.batch_execute(&format!(
                "LOCK TABLE {}.{} IN ACCESS EXCLUSIVE MODE",
                quote_ident(live),
                quote_ident(name)
            ))?;
        }
        Ok(())
    }

    /// Inside the final transaction: the shadow replaces the live table.
    fn swap(&self, conn: &mut DbConnection, name: &str) -> Result<()> {
        let table = quote_ident(name);
        match self {
            Shadow::Postgres {
                live,
                shadow,
                search_path,
            } => {
                conn.batch_execute(&format!(
                    "SET LOCAL search_path TO {search_path}; \
                     DROP TABLE IF EXISTS {live}.{table}; \
                     ALTER TABLE {shadow}.{table} SET SCHEMA {live}",
                    live = quote_ident(live),
                    shadow = quote_ident(shadow),
                ))?;
            }
            Shadow::Sqlite => {
                conn.batch_execute(&format!(
                    "DELETE FROM main.{table}; INSERT INTO main.{table} SELECT * FROM temp.{table}; DROP TABLE temp.{table}"
                ))?;
            }
        }
        Ok(())
    }

    fn discard(&self, conn: &mut DbConnection, name: &str) {
        let _ = conn.batch_execute(&format!(
            "DROP TABLE IF EXISTS {}.{}",
            quote_ident(self.shadow_schema()),
            quote_ident(name)
        ));
    }
}

/// See [`EventStore::rebuild`](crate::EventStore::rebuild) for asynchronous read models.
pub(crate) fn rebuild_blue_green(
    conn: &mut DbConnection,
    entry: &'static ReadModelEntry,
    options: &RebuildOptions,
    progress: &mut dyn FnMut(&RebuildProgress),
) -> Result<RebuildReport> {
    let started = Instant::now();
    let name = entry.schema.name;
    let shadow = Shadow::prepare(conn, entry)?;
    let result = build_and_swap(conn, entry, &shadow, options, progress);
    if result.is_err() {
        shadow.discard(conn, name);
    }
    let (events, rows) = result?;
    let report = RebuildReport {
        read_model: name,
        events,
        rows,
        elapsed: started.elapsed(),
    };
    tracing::info!(read_model = name, events, rows, elapsed = ?report.elapsed, "rebuilt read model blue/green");
    Ok(report)
}

fn build_and_swap(
    conn: &mut DbConnection,
    entry: &'static ReadModelEntry,
    shadow: &Shadow,
    options: &RebuildOptions,
    progress: &mut dyn FnMut(&RebuildProgress),
) -> Result<(u64, i64)> {
    let name = entry.schema.name;
    let types = handled_types(registry()?, name);
    let batch_size = options.batch_size.max(1);
    let head = crate::read::head(conn)?;
    let mut rows = (entry.new_rows)();
    // The shadow starts empty.
    let mut only_in_memory = true;
    let mut checkpoint = Checkpoint::default();
    let mut events = 0u64;

    // Blue: build batch by batch while the live table serves.
    loop {
        let n = write_transaction(conn, |c| -> Result<usize> {
            shadow.enter(c)?;
            let batch = read_after(c, checkpoint, Some(&types), batch_size)?;
            let Some(last) = batch.last() else {
                return Ok(0);
            };
            let last = last.checkpoint;
            let recorded: Vec<_> = batch.into_iter().map(|f| f.event).collect();
            project_batch(c, name, rows.as_mut(), &recorded, true, &mut only_in_memory)?;
            checkpoint = last;
            Ok(recorded.len())
        })?;
        events += n as u64;
        progress(&RebuildProgress {
            read_model: name,
            events,
            position: checkpoint.position,
            head,
        });
        if n < batch_size {
            break;
        }
    }

    // Green: take the projection from its runner, catch up and swap, in one
    // transaction. The runner's next batch fails its checkpoint guard and
    // rolls back; afterwards it continues from the shadow's checkpoint.
    let backend = conn.backend();
    let rebuilder = format!("rebuild:{}", uuid::Uuid::new_v4().simple());
    let rows_after = write_transaction(conn, |c| -> Result<i64> {
        shadow.lock_live(c, name)?;
        ensure_checkpoint_row(c, name)?;
        diesel::sql_query(sql(
            backend,
            &format!(
                "UPDATE es_checkpoints SET holder = ?, lease_expires_ms = {} + 600000, state = 'rebuilding' \
                 WHERE projection = ?",
                now_ms_sql(backend)
            ),
        ))
        .bind::<Text, _>(&rebuilder)
        .bind::<Text, _>(name)
        .execute(c)?;
        shadow.enter(c)?;
        loop {
            let batch = read_after(c, checkpoint, Some(&types), batch_size)?;
            let Some(last) = batch.last() else { break };
            let last = last.checkpoint;
            let recorded: Vec<_> = batch.into_iter().map(|f| f.event).collect();
            project_batch(c, name, rows.as_mut(), &recorded, true, &mut only_in_memory)?;
            events += recorded.len() as u64;
            checkpoint = last;
        }
        shadow.swap(c, name)?;
        diesel::sql_query(sql(
            backend,
            "UPDATE es_checkpoints SET position = ?, transaction_id = ?, holder = NULL, lease_expires_ms = NULL, \
             state = 'idle', last_error = NULL, failed_position = NULL, updated_at = CURRENT_TIMESTAMP \
             WHERE projection = ?",
        ))
        .bind::<BigInt, _>(checkpoint.position)
        .bind::<BigInt, _>(checkpoint.transaction)
        .bind::<Text, _>(name)
        .execute(c)?;
        c.batch_execute(&format!(
            "UPDATE es_read_models SET rebuilt_at = CURRENT_TIMESTAMP WHERE name = {}",
            quote_literal(name)
        ))?;
        Ok(
            diesel::sql_query(format!("SELECT COUNT(*) AS n FROM {}", quote_ident(name)))
                .get_result::<Count>(c)?
                .n,
        )
    })?;
    progress(&RebuildProgress {
        read_model: name,
        events,
        position: checkpoint.position,
        head,
    });
    Ok((events, rows_after))
}
