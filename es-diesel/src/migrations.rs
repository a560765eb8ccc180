//! The store's own schema, as numbered migrations per backend, plus the
//! typed event views registered by `#[derive(Event)]`.

use crate::backend::rows::Number;
use crate::backend::{write_transaction, Backend, DbConnection, ListOf, Stmt};
use crate::error::{Error, Result};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer, Text};
use es_core::view::{event_views, ColumnType, EventView};

/// One step of the store's schema. Applied once, in order, in a transaction.
pub(crate) struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sqlite: &'static str,
    pub postgres: &'static str,
}

pub(crate) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "event log",
        sqlite: r#"
CREATE TABLE es_events (
    global_position INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id        TEXT    NOT NULL UNIQUE,
    stream_id       TEXT    NOT NULL,
    stream_version  INTEGER NOT NULL CHECK (stream_version > 0),
    event_type      TEXT    NOT NULL,
    event_version   INTEGER NOT NULL CHECK (event_version > 0),
    payload         TEXT    NOT NULL CHECK (json_valid(payload)),
    metadata        TEXT    NOT NULL CHECK (json_valid(metadata)),
    created_at      TEXT    NOT NULL,
    UNIQUE (stream_id, stream_version)
);
CREATE INDEX es_events_by_type ON es_events (event_type, global_position);
CREATE TRIGGER es_events_no_update BEFORE UPDATE ON es_events
BEGIN SELECT RAISE(ABORT, 'es_events is append-only: UPDATE is refused'); END;
CREATE TRIGGER es_events_no_delete BEFORE DELETE ON es_events
BEGIN SELECT RAISE(ABORT, 'es_events is append-only: DELETE is refused'); END;
"#,
        postgres: r#"
CREATE TABLE es_events (
    global_position BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        UUID        NOT NULL UNIQUE,
    stream_id       TEXT        NOT NULL,
    stream_version  BIGINT      NOT NULL CHECK (stream_version > 0),
    event_type      TEXT        NOT NULL,
    event_version   SMALLINT    NOT NULL CHECK (event_version > 0),
    payload         JSONB       NOT NULL,
    metadata        JSONB       NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    transaction_id  XID8        NOT NULL DEFAULT pg_current_xact_id()
);
-- Stream ids may be kilobytes long, beyond what a btree entry holds, so
-- uniqueness and stream lookups go through the md5 of the id.
CREATE UNIQUE INDEX es_events_stream ON es_events (md5(stream_id), stream_version);
CREATE INDEX es_events_by_type ON es_events (event_type, global_position);
CREATE FUNCTION es_events_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'es_events is append-only: % is refused', TG_OP
        USING ERRCODE = 'restrict_violation';
END $$;
CREATE TRIGGER es_events_append_only BEFORE UPDATE OR DELETE ON es_events
    FOR EACH ROW EXECUTE FUNCTION es_events_refuse_change();
CREATE TRIGGER es_events_no_truncate BEFORE TRUNCATE ON es_events
    FOR EACH STATEMENT EXECUTE FUNCTION es_events_refuse_change();
"#,
    },
    Migration {
        version: 2,
        name: "read models and checkpoints",
        sqlite: r#"
CREATE TABLE es_read_models (
    name        TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    ddl         TEXT NOT NULL,
    created_at  TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,
    rebuilt_at  TEXT
);
CREATE TABLE es_checkpoints (
    projection  TEXT PRIMARY KEY,
    position    INTEGER NOT NULL DEFAULT 0,
    updated_at  TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,
    last_error  TEXT
);
"#,
        postgres: r#"
CREATE TABLE es_read_models (
    name        TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    ddl         TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    rebuilt_at  TIMESTAMPTZ
);
CREATE TABLE es_checkpoints (
    projection  TEXT PRIMARY KEY,
    position    BIGINT NOT NULL DEFAULT 0,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_error  TEXT
);
"#,
    },
    Migration {
        version: 3,
        name: "aggregate snapshots",
        sqlite: r#"
CREATE TABLE es_snapshots (
    aggregate_type TEXT    NOT NULL,
    stream_id      TEXT    NOT NULL,
    shape          INTEGER NOT NULL,
    stream_version INTEGER NOT NULL CHECK (stream_version > 0),
    state          TEXT    NOT NULL CHECK (json_valid(state)),
    created_at     TEXT    NOT NULL,
    PRIMARY KEY (aggregate_type, stream_id)
);
"#,
        postgres: r#"
CREATE TABLE es_snapshots (
    aggregate_type TEXT        NOT NULL,
    stream_id      TEXT        NOT NULL,
    shape          BIGINT      NOT NULL,
    stream_version BIGINT      NOT NULL CHECK (stream_version > 0),
    state          JSONB       NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- As for es_events: stream ids may exceed what a btree entry holds.
CREATE UNIQUE INDEX es_snapshots_stream ON es_snapshots (aggregate_type, md5(stream_id));
"#,
    },
    Migration {
        version: 4,
        name: "gap-safe following",
        sqlite: "",
        postgres: r#"
CREATE INDEX es_events_follow ON es_events (transaction_id, global_position);
CREATE FUNCTION es_events_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('es_events', current_schema());
    RETURN NULL;
END $$;
CREATE TRIGGER es_events_notify AFTER INSERT ON es_events
    FOR EACH STATEMENT EXECUTE FUNCTION es_events_notify();
"#,
    },
    Migration {
        version: 5,
        name: "asynchronous projection runners",
        sqlite: r#"
ALTER TABLE es_checkpoints ADD COLUMN transaction_id INTEGER NOT NULL DEFAULT 0;
ALTER TABLE es_checkpoints ADD COLUMN state TEXT NOT NULL DEFAULT 'idle';
ALTER TABLE es_checkpoints ADD COLUMN holder TEXT;
ALTER TABLE es_checkpoints ADD COLUMN lease_expires_ms INTEGER;
ALTER TABLE es_checkpoints ADD COLUMN failed_position INTEGER;
"#,
        postgres: r#"
ALTER TABLE es_checkpoints
    ADD COLUMN transaction_id BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN state TEXT NOT NULL DEFAULT 'idle',
    ADD COLUMN holder TEXT,
    ADD COLUMN lease_expires_ms BIGINT,
    ADD COLUMN failed_position BIGINT;
"#,
    },
    Migration {
        version: 6,
        name: "follow order keys",
        sqlite: "",
        // See follow.rs for why these keys and locks make followers gap-safe
        // without being held back by transactions that never append.
        postgres: r#"
ALTER TABLE es_events ALTER COLUMN transaction_id DROP DEFAULT;
ALTER TABLE es_events ALTER COLUMN transaction_id TYPE BIGINT USING (transaction_id::text::bigint);
ALTER TABLE es_events RENAME COLUMN transaction_id TO order_key;
CREATE SEQUENCE es_order_keys MINVALUE 1 MAXVALUE 281474976710655;
SELECT setval('es_order_keys', GREATEST(
    (SELECT COALESCE(MAX(order_key), 0) FROM es_events),
    (SELECT COALESCE(MAX(transaction_id), 0) FROM es_checkpoints),
    pg_current_xact_id()::text::bigint) + 1, false);
CREATE FUNCTION es_append_key() RETURNS bigint LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT AS $$
DECLARE k bigint;
BEGIN
    IF COALESCE(current_setting('es.append_key', true), '') = '' THEN
        -- Announce the append before drawing its first key, then publish the key.
        PERFORM pg_advisory_xact_lock_shared(1163067394, 'es_order_keys'::regclass::oid::integer);
        k := nextval('es_order_keys');
        PERFORM pg_advisory_xact_lock_shared((17747::bigint << 48) | k);
        PERFORM set_config('es.append_key', k::text, true);
        RETURN k;
    END IF;
    RETURN nextval('es_order_keys');
END $$;
-- Rows inserted by hand get a key, and are followed like any other.
ALTER TABLE es_events ALTER COLUMN order_key SET DEFAULT es_append_key();
CREATE FUNCTION es_follow_horizon() RETURNS bigint LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT AS $$
DECLARE
    bound bigint;
    lowest bigint;
    pending boolean;
BEGIN
    -- First the bound every later key exceeds, then one consistent look at the
    -- appends in flight.
    SELECT last_value + CASE WHEN is_called THEN 1 ELSE 0 END INTO bound FROM es_order_keys;
    WITH l AS MATERIALIZED (
        SELECT pid, classid, objid, objsubid FROM pg_locks
        WHERE locktype = 'advisory'
          AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
    ), writers AS (
        SELECT pid FROM l
        WHERE objsubid = 2 AND classid = 1163067394::oid AND objid = 'es_order_keys'::regclass::oid
    ), keys AS (
        SELECT pid, ((classid::bigint << 32) | objid::bigint) & 281474976710655 AS k FROM l
        WHERE objsubid = 1 AND (classid::bigint >> 16) = 17747
    )
    SELECT bool_or(k.pid IS NULL), MIN(k.k) INTO pending, lowest
    FROM writers w LEFT JOIN keys k ON k.pid = w.pid;
    IF pending THEN
        RETURN NULL;
    END IF;
    RETURN LEAST(bound, lowest);
END $$;
"#,
    },
    Migration {
        version: 7,
        name: "no rewriting through insert conflicts",
        // `INSERT OR REPLACE` deletes the row it conflicts with without
        // firing delete triggers (unless `recursive_triggers` is on), and an
        // upsert turns into an update: refuse the insert before either can
        // happen, whatever the connection's pragmas. `NEW.global_position`
        // is -1 here when the position is left to AUTOINCREMENT.
        sqlite: r#"
CREATE TRIGGER es_events_no_overwrite BEFORE INSERT ON es_events
WHEN EXISTS (SELECT 1 FROM es_events WHERE event_id = NEW.event_id)
BEGIN SELECT RAISE(ABORT, 'es_events is append-only: an event with this event_id already exists'); END;
CREATE TRIGGER es_events_no_overwrite_version BEFORE INSERT ON es_events
WHEN EXISTS (SELECT 1 FROM es_events WHERE stream_id = NEW.stream_id AND stream_version = NEW.stream_version)
BEGIN SELECT RAISE(ABORT, 'es_events is append-only: this stream_id and stream_version already exist'); END;
CREATE TRIGGER es_events_no_overwrite_position BEFORE INSERT ON es_events
WHEN EXISTS (SELECT 1 FROM es_events WHERE global_position = NEW.global_position)
BEGIN SELECT RAISE(ABORT, 'es_events is append-only: this global_position already exists'); END;
"#,
        // An upsert's DO UPDATE fires the UPDATE trigger of migration 1.
        postgres: "",
    },
    Migration {
        version: 8,
        name: "exclusive rebuilds",
        sqlite: r#"
ALTER TABLE es_read_models ADD COLUMN rebuild_holder TEXT;
ALTER TABLE es_read_models ADD COLUMN rebuild_expires_ms INTEGER;
"#,
        postgres: r#"
ALTER TABLE es_read_models
    ADD COLUMN rebuild_holder TEXT,
    ADD COLUMN rebuild_expires_ms BIGINT;
"#,
    },
];

#[derive(QueryableByName)]
struct Applied {
    #[diesel(sql_type = Integer)]
    version: i32,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
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
    write_transaction(conn, |conn| {
        let backend = conn.backend();
        if backend == Backend::Postgres {
            conn.batch_execute(
                "SELECT pg_advisory_xact_lock(hashtextextended('es_diesel.migrate.' || current_schema(), 0))",
            )?;
        }
        conn.batch_execute(
            "CREATE TABLE IF NOT EXISTS es_schema_migrations (
                version INTEGER PRIMARY KEY,
                name TEXT NOT NULL,
                applied_at TEXT NOT NULL
            )",
        )?;
        let applied: Vec<i32> = diesel::sql_query("SELECT version FROM es_schema_migrations")
            .load::<Applied>(conn)?
            .into_iter()
            .map(|a| a.version)
            .collect();
        for m in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
            let sql = match backend {
                Backend::Sqlite => m.sqlite,
                Backend::Postgres => m.postgres,
            };
            let run = |conn: &mut DbConnection| -> QueryResult<()> {
                // PostgreSQL refuses an empty query string.
                if !sql.trim().is_empty() {
                    conn.batch_execute(sql)?;
                }
                let stamp = chrono::Utc::now().to_rfc3339();
                conn.batch_execute(&format!(
                    "INSERT INTO es_schema_migrations (version, name, applied_at) VALUES ({}, {}, {})",
                    m.version,
                    quote_literal(m.name),
                    quote_literal(&stamp)
                ))
            };
            run(conn).map_err(|source| Error::Migration {
                version: m.version,
                name: m.name,
                source,
            })?;
            tracing::info!(version = m.version, name = m.name, "applied migration");
        }
        for view in event_views() {
            create_view(conn, view)?;
        }
        sync_read_models(conn)
    })?;
    crate::rebuild::build_pending(conn)
}

#[derive(QueryableByName)]
struct Stored {
    #[diesel(sql_type = Text)]
    fingerprint: String,
}

/// Creates each registered read model's table, and drops and re-creates
/// every one whose fingerprint (its DDL) differs from the stored one.
///
/// An asynchronous one is then built by its runner from the start of the
/// log; an inline one is left with `rebuilt_at` NULL, which tells
/// [`crate::rebuild::build_pending`] to build it after this transaction,
/// unless the log holds no event it handles.
fn sync_read_models(conn: &mut DbConnection) -> Result<()> {
    let backend = conn.backend();
    let reg = crate::projection::registry()?;
    for entry in &reg.read_models {
        let schema = entry.schema;
        let fingerprint = schema.fingerprint(backend);
        let stored = diesel::sql_query(format!(
            "SELECT fingerprint FROM es_read_models WHERE name = {}",
            quote_literal(schema.name)
        ))
        .get_result::<Stored>(conn)
        .optional()?;
        match &stored {
            Some(s) if s.fingerprint == fingerprint => continue,
            Some(s) => tracing::warn!(
                read_model = schema.name,
                old = %s.fingerprint,
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
            format!(
                "UPDATE es_read_models SET fingerprint = {}, ddl = {}, rebuilt_at = {rebuilt_at} WHERE name = {}",
                quote_literal(&fingerprint),
                quote_literal(&ddl_text),
                quote_literal(schema.name)
            )
        } else {
            format!(
                "INSERT INTO es_read_models (name, fingerprint, ddl, rebuilt_at) VALUES ({}, {}, {}, {rebuilt_at})",
                quote_literal(schema.name),
                quote_literal(&fingerprint),
                quote_literal(&ddl_text)
            )
        };
        conn.batch_execute(&record)?;
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
    let sql = match conn.backend() {
        Backend::Sqlite => format!(
            "SELECT COUNT(*) AS n FROM sqlite_master WHERE type IN ('table', 'view') AND name = {}",
            quote_literal(name)
        ),
        Backend::Postgres => format!(
            "SELECT CASE WHEN to_regclass({}) IS NULL THEN 0 ELSE 1 END::bigint AS n",
            quote_literal(&quote_ident(name))
        ),
    };
    Ok(diesel::sql_query(sql).get_result::<Count>(conn)?.n > 0)
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
    let applied: Vec<i32> = diesel::sql_query("SELECT version FROM es_schema_migrations")
        .load::<Applied>(conn)?
        .into_iter()
        .map(|a| a.version)
        .collect();
    for m in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
        missing.push(format!("store migration {} ({})", m.version, m.name));
    }
    let stored = if applied.contains(&2) {
        diesel::sql_query("SELECT name, fingerprint FROM es_read_models")
            .load::<StoredReadModel>(conn)?
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
    Ok(missing)
}

/// The newest schema version this code knows, and the one the database has.
pub(crate) fn schema_versions(conn: &mut DbConnection) -> Result<(i32, i64)> {
    let latest = MIGRATIONS.last().map(|m| m.version).unwrap_or(0);
    let have = diesel::sql_query("SELECT COUNT(*) AS n FROM es_schema_migrations")
        .get_result::<Count>(conn)
        .map(|c| c.n)
        .unwrap_or(0);
    Ok((latest, have))
}

pub(crate) fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

pub(crate) fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn create_view(conn: &mut DbConnection, view: &EventView) -> Result<()> {
    let backend = conn.backend();
    let mut cols = vec![
        "e.global_position AS global_position".to_owned(),
        "e.stream_id AS stream_id".to_owned(),
        "e.stream_version AS stream_version".to_owned(),
        match backend {
            Backend::Postgres => "(e.created_at AT TIME ZONE 'UTC') AS created_at".to_owned(),
            Backend::Sqlite => "e.created_at AS created_at".to_owned(),
        },
    ];
    for c in view.columns {
        let expr = match backend {
            Backend::Postgres => {
                let key = quote_literal(c.json_key);
                match c.ty {
                    ColumnType::Text => format!("(e.payload->>{key})"),
                    ColumnType::Json => format!("(e.payload->{key})::text"),
                    ty => format!("(e.payload->>{key})::{}", pg_type(ty)),
                }
            }
            Backend::Sqlite => {
                let path = quote_literal(&format!("$.{}", quote_ident(c.json_key)));
                match c.ty {
                    ColumnType::Json => format!("(e.payload -> {path})"),
                    ColumnType::Float | ColumnType::Double => {
                        format!("CAST(json_extract(e.payload, {path}) AS REAL)")
                    }
                    _ => format!("json_extract(e.payload, {path})"),
                }
            }
        };
        cols.push(format!("{expr} AS {}", quote_ident(c.name)));
    }
    let name = quote_ident(view.name);
    // Rows of other versions may lack a field or hold it in another type,
    // which would make every query on the view fail.
    let sql = format!(
        "DROP VIEW IF EXISTS {name}; CREATE VIEW {name} AS SELECT {} FROM es_events e \
         WHERE e.event_type = {} AND e.event_version = {}",
        cols.join(", "),
        quote_literal(view.event_type),
        view.event_version
    );
    conn.batch_execute(&sql)?;
    Ok(())
}

fn pg_type(ty: ColumnType) -> &'static str {
    match ty {
        ColumnType::SmallInt => "smallint",
        ColumnType::Integer => "integer",
        ColumnType::BigInt => "bigint",
        ColumnType::Float => "real",
        ColumnType::Double => "double precision",
        ColumnType::Bool => "boolean",
        ColumnType::Text | ColumnType::Json => "text",
    }
}
