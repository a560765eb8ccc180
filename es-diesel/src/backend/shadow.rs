//! The shadow table a rebuild builds the new version of a read model in,
//! while the live one keeps serving, and the swap that replaces it.
//!
//! Projectors write to their table by its plain name, so the shadow is a
//! table of the same name that the rebuilding connection sees first: on
//! PostgreSQL in a schema of its own (`<schema>_es_shadow_<token>`, one per
//! rebuild) put at the front of `search_path`, on SQLite and MySQL a
//! TEMPORARY table (private to the connection; temporary tables hide the
//! permanent ones of the same name).

use super::rows::{Name, Number};
use super::{quote_ident, quote_literal, write_transaction, Backend, Bind, DbConnection, Stmt};
use crate::error::Result;
use diesel::connection::SimpleConnection;

/// PostgreSQL truncates longer identifiers.
const MAX_IDENTIFIER: usize = 63;
const TOKEN_LEN: usize = 8;

/// The comment on every shadow schema of the schema `live`: names are cut
/// to fit PostgreSQL's identifiers, so only the comment tells whose it is.
pub(crate) fn schema_comment(live: &str) -> String {
    format!("es-diesel rebuild shadow of schema {live}")
}

/// The start of the name of every shadow schema of the schema `live`.
pub(crate) fn schema_prefix(live: &str) -> String {
    const SUFFIX: &str = "_es_shadow_";
    let mut end = live.len().min(MAX_IDENTIFIER - SUFFIX.len() - TOKEN_LEN);
    while !live.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{SUFFIX}", &live[..end])
}

pub(crate) enum Shadow {
    Postgres {
        name: &'static str,
        live: String,
        schema: String,
        search_path: String,
        /// The shadow table, to tell it from the live one of the same name.
        oid: i64,
    },
    Sqlite {
        name: &'static str,
    },
    Mysql {
        name: &'static str,
    },
}

/// Where the MySQL swap parks the shadow's rows while the plain name is
/// made to mean the live table again.
const MYSQL_SWAP: &str = "\"es_rebuild_swap\"";

impl Shadow {
    /// Creates an empty shadow of the read model `name`'s table from its
    /// `ddl` on this backend, named after `token`
    /// (unique to this rebuild), and drops the shadows that interrupted
    /// rebuilds of this read model left behind.
    pub(crate) fn prepare(
        conn: &mut DbConnection,
        name: &'static str,
        ddl: &'static [&'static str],
        token: &str,
    ) -> Result<Self> {
        let table = quote_ident(name);
        match conn.backend() {
            Backend::Postgres => {
                let live = Stmt::new("SELECT current_schema() AS name")
                    .get_result::<Name>(conn)?
                    .name;
                let search_path = Stmt::new("SELECT current_setting('search_path') AS name")
                    .get_result::<Name>(conn)?
                    .name;
                let prefix = schema_prefix(&live);
                let token: String = token.chars().take(TOKEN_LEN).collect();
                let schema = format!("{prefix}{token}");
                let comment = schema_comment(&live);
                let stale = Stmt::new(
                    "SELECT n.nspname AS name FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE c.relname = ? AND obj_description(n.oid, 'pg_namespace') = ?",
                )
                .bind(Bind::Text(name))
                .bind(Bind::Text(&comment))
                .load::<Name>(conn)?;
                for s in stale {
                    tracing::warn!(read_model = name, schema = %s.name, "dropping the shadow table an interrupted rebuild left behind");
                    conn.batch_execute(&format!(
                        "DROP SCHEMA IF EXISTS {} CASCADE",
                        quote_ident(&s.name)
                    ))?;
                }
                let oid = write_transaction(conn, |c| -> Result<i64> {
                    c.batch_execute(&format!(
                        "CREATE SCHEMA {0}; COMMENT ON SCHEMA {0} IS {1}; SET LOCAL search_path TO {0}, {search_path}",
                        quote_ident(&schema),
                        quote_literal(&comment),
                    ))?;
                    for stmt in ddl {
                        c.batch_execute(stmt)?;
                    }
                    Ok(Stmt::new("SELECT ?::regclass::oid::bigint AS n")
                        .bind(Bind::Owned(format!("{}.{table}", quote_ident(&schema))))
                        .get_result::<Number>(c)?
                        .n)
                })?;
                Ok(Shadow::Postgres {
                    name,
                    live,
                    schema,
                    search_path,
                    oid,
                })
            }
            Backend::Sqlite => {
                conn.batch_execute(&format!("DROP TABLE IF EXISTS temp.{table}"))?;
                // The table alone: the shadow only lives through the rebuild,
                // and its primary key is all projectors look rows up by.
                let create = ddl.first().copied().unwrap_or_default();
                let create = create.replacen("CREATE TABLE", "CREATE TEMP TABLE", 1);
                conn.batch_execute(&create)?;
                Ok(Shadow::Sqlite { name })
            }
            Backend::Mysql => {
                // CREATE and DROP of TEMPORARY tables are the only DDL that
                // MySQL does not commit on the spot.
                conn.batch_execute(&format!(
                    "DROP TEMPORARY TABLE IF EXISTS {table}; DROP TEMPORARY TABLE IF EXISTS {MYSQL_SWAP}"
                ))?;
                let create = ddl.first().copied().unwrap_or_default();
                let create = create.replacen("CREATE TABLE", "CREATE TEMPORARY TABLE", 1);
                conn.batch_execute(&create)?;
                Ok(Shadow::Mysql { name })
            }
        }
    }

    /// Inside a transaction: makes the plain table name mean the shadow.
    /// `false` if the shadow is gone (another rebuild took over and dropped
    /// it): the name would then mean the live table.
    pub(crate) fn enter(&self, conn: &mut DbConnection) -> Result<bool> {
        let Shadow::Postgres {
            name,
            schema,
            search_path,
            oid,
            ..
        } = self
        else {
            return Ok(true);
        };
        conn.batch_execute(&format!(
            "SET LOCAL search_path TO {}, {search_path}",
            quote_ident(schema)
        ))?;
        let seen = Stmt::new("SELECT COALESCE(to_regclass(?)::oid::bigint, 0) AS n")
            .bind(Bind::Owned(quote_ident(name)))
            .get_result::<Number>(conn)?
            .n;
        Ok(seen == *oid)
    }

    /// First in the final transaction: waits for the writers of the live
    /// table in flight (inline projectors, a runner's batch) and holds
    /// off the others until the swap commits. On SQLite the write
    /// transaction already excludes every other writer; on MySQL the log's
    /// head, which every append holds until it commits, does the same for
    /// appends (a runner's batch in flight fails the checkpoint guard that
    /// the swap moves, and its row locks make the swap wait for it).
    pub(crate) fn lock_live(&self, conn: &mut DbConnection) -> Result<()> {
        match self {
            Shadow::Postgres { name, live, .. } => {
                conn.batch_execute(&format!(
                    "LOCK TABLE {}.{} IN ACCESS EXCLUSIVE MODE",
                    quote_ident(live),
                    quote_ident(name)
                ))?;
            }
            Shadow::Mysql { .. } => {
                Stmt::new("SELECT position AS n FROM es_log_head WHERE id = 1 FOR UPDATE")
                    .get_result::<Number>(conn)?;
            }
            Shadow::Sqlite { .. } => {}
        }
        Ok(())
    }

    /// Inside the final transaction: the shadow replaces the live table.
    pub(crate) fn swap(&self, conn: &mut DbConnection) -> Result<()> {
        match self {
            Shadow::Postgres {
                name,
                live,
                schema,
                search_path,
                ..
            } => {
                conn.batch_execute(&format!(
                    "SET LOCAL search_path TO {search_path}; \
                     DROP TABLE IF EXISTS {live}.{table}; \
                     ALTER TABLE {schema}.{table} SET SCHEMA {live}; \
                     DROP SCHEMA {schema}",
                    table = quote_ident(name),
                    live = quote_ident(live),
                    schema = quote_ident(schema),
                ))?;
            }
            Shadow::Sqlite { name } => {
                conn.batch_execute(&format!(
                    "DELETE FROM main.{table}; INSERT INTO main.{table} SELECT * FROM temp.{table}; DROP TABLE temp.{table}",
                    table = quote_ident(name)
                ))?;
            }
            Shadow::Mysql { name } => {
                // The temporary table hides the live one, and a temporary
                // table cannot be renamed without a commit: park its rows in
                // another one, drop it, and the name means the live table.
                conn.batch_execute(&format!(
                    "CREATE TEMPORARY TABLE {MYSQL_SWAP} AS SELECT * FROM {table}; \
                     DROP TEMPORARY TABLE {table}; \
                     DELETE FROM {table}; \
                     INSERT INTO {table} SELECT * FROM {MYSQL_SWAP}; \
                     DROP TEMPORARY TABLE {MYSQL_SWAP}",
                    table = quote_ident(name)
                ))?;
            }
        }
        Ok(())
    }

    /// Drops the shadow of a failed rebuild (outside any transaction).
    pub(crate) fn discard(&self, conn: &mut DbConnection) {
        let sql = match self {
            Shadow::Postgres { schema, .. } => {
                format!("DROP SCHEMA IF EXISTS {} CASCADE", quote_ident(schema))
            }
            Shadow::Sqlite { name } => format!("DROP TABLE IF EXISTS temp.{}", quote_ident(name)),
            Shadow::Mysql { name } => format!(
                "DROP TEMPORARY TABLE IF EXISTS {}; DROP TEMPORARY TABLE IF EXISTS {MYSQL_SWAP}",
                quote_ident(name)
            ),
        };
        if let Err(e) = conn.batch_execute(&sql) {
            tracing::warn!(error = %e, "could not drop the shadow table of a failed rebuild");
        }
    }
}
