//! The tables of read models: created by `migrate`, re-created when their
//! shape (fingerprint) changes.

use crate::backend::rows::{Name, Number};
use crate::backend::{quote_ident, Bind, DbConnection, ListOf, Stmt};
use crate::error::Result;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;

/// Creates each registered read model's table, and drops and re-creates
/// every one whose fingerprint (its DDL) differs from the stored one.
///
/// An asynchronous one is then built by its runner from the start of the
/// log; an inline one is left with `rebuilt_at` NULL, which tells
/// [`crate::rebuild::build_pending`] to build it after this transaction,
/// unless the log holds no event it handles.
pub(super) fn sync_read_models(conn: &mut DbConnection) -> Result<()> {
    let backend = conn.backend();
    let reg = crate::projection::registry()?;
    for entry in &reg.read_models {
        let schema = entry.schema;
        let fingerprint = schema.fingerprint(backend);
        let stored = Stmt::new("SELECT fingerprint AS name FROM es_read_models WHERE name = ?")
            .bind(Bind::Text(schema.name))
            .get_result::<Name>(conn)
            .optional()?;
        match &stored {
            Some(s) if s.name == fingerprint => continue,
            Some(s) => tracing::warn!(
                read_model = schema.name,
                old = %s.name,
                new = %fingerprint,
                "read model changed shape: dropping its table and rebuilding it from the log"
            ),
            None => tracing::info!(
                read_model = schema.name,
                "creating read model and building it from the log"
            ),
        }
        let ddl = schema.ddl(backend);
        conn.batch_execute(&format!(
            "DROP TABLE IF EXISTS {}",
            quote_ident(schema.name)
        ))?;
        for stmt in ddl {
            conn.batch_execute(stmt)?;
        }
        let ddl_text = ddl.join(";\n");
        // The new table is empty; it stays so until built, even as inline
        // projectors of concurrent appends write to it after this commits.
        let built = !schema.asynchronous
            && !any_event_of(conn, &crate::projection::handled_types(reg, schema.name))?;
        let rebuilt_at = if built { "CURRENT_TIMESTAMP" } else { "NULL" };
        let record = if stored.is_some() {
            Stmt::new(format!(
                "UPDATE es_read_models SET fingerprint = ?, ddl = ?, rebuilt_at = {rebuilt_at} WHERE name = ?"
            ))
            .bind(Bind::Text(&fingerprint))
            .bind(Bind::Text(&ddl_text))
            .bind(Bind::Text(schema.name))
        } else {
            Stmt::new(format!(
                "INSERT INTO es_read_models (name, fingerprint, ddl, rebuilt_at) VALUES (?, ?, ?, {rebuilt_at})"
            ))
            .bind(Bind::Text(schema.name))
            .bind(Bind::Text(&fingerprint))
            .bind(Bind::Text(&ddl_text))
        };
        record.execute(conn)?;
        if schema.asynchronous {
            // Its runner builds it from the start of the log.
            crate::runner::restart(conn, schema.name)?;
        }
    }
    Ok(())
}

/// Whether the log holds any committed event of `types`.
fn any_event_of(conn: &mut DbConnection, types: &[&str]) -> Result<bool> {
    if types.is_empty() {
        return Ok(false);
    }
    let (any, binds) = conn.dialect().any_of(types, ListOf::Text);
    let mut q = Stmt::new(format!(
        "SELECT COUNT(*) AS n FROM (SELECT 1 FROM es_events WHERE event_type {any} LIMIT 1) t"
    ))
    .uncached();
    binds.into_iter().for_each(|b| q.push(b));
    Ok(q.get_result::<Number>(conn)?.n > 0)
}
