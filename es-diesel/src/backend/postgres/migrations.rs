//! The store's schema on PostgreSQL, by migration version (see
//! `crate::schema::migrations`). A version a backend needs nothing for is empty.

/// (version, statements).
pub(crate) const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        r#"
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
    ),
    (
        2,
        r#"
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
    ),
    (
        3,
        r#"
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
    ),
    (
        4,
        r#"
CREATE INDEX es_events_follow ON es_events (transaction_id, global_position);
CREATE FUNCTION es_events_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('es_events', current_schema());
    RETURN NULL;
END $$;
CREATE TRIGGER es_events_notify AFTER INSERT ON es_events
    FOR EACH STATEMENT EXECUTE FUNCTION es_events_notify();
"#,
    ),
    (
        5,
        r#"
ALTER TABLE es_checkpoints
    ADD COLUMN transaction_id BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN state TEXT NOT NULL DEFAULT 'idle',
    ADD COLUMN holder TEXT,
    ADD COLUMN lease_expires_ms BIGINT,
    ADD COLUMN failed_position BIGINT;
"#,
    ),
    // See log/follow.rs for why these keys and locks make followers gap-safe
    // without being held back by transactions that never append.
    (
        6,
        r#"
ALTER TABLE es_events ALTER COLUMN transaction_id DROP DEFAULT;
ALTER TABLE es_events ALTER COLUMN transaction_id TYPE BIGINT USING (transaction_id::text::bigint);
ALTER TABLE es_events RENAME COLUMN transaction_id TO order_key;
CREATE SEQUENCE es_order_keys MINVALUE 1 MAXVALUE 281474976710655;
SELECT setval('es_order_keys', GREATEST(
    (SELECT COALESCE(MAX(order_key), 0) FROM es_events),
    (SELECT COALESCE(MAX(transaction_id), 0) FROM es_checkpoints),
    pg_current_xact_id()::text::bigint) + 1, false);
-- The functions are pinned to this schema: resolving names through a
-- search_path at call time could reach another store's sequence.
DO $migration$
BEGIN
EXECUTE format($create$
CREATE FUNCTION %1$I.es_append_key() RETURNS bigint LANGUAGE plpgsql VOLATILE
SET search_path = %1$I AS $body$
DECLARE
    k bigint;
    -- Per log: a transaction may append to the logs of several schemas.
    announced text := 'es.append_key_' || 'es_order_keys'::regclass::oid;
BEGIN
    IF COALESCE(current_setting(announced, true), '') = '' THEN
        -- Announce the append before drawing its first key, then publish the key.
        PERFORM pg_advisory_xact_lock_shared(1163067394, 'es_order_keys'::regclass::oid::integer);
        k := nextval('es_order_keys');
        PERFORM pg_advisory_xact_lock_shared((17747::bigint << 48) | k);
        PERFORM set_config(announced, k::text, true);
        RETURN k;
    END IF;
    RETURN nextval('es_order_keys');
END $body$;
$create$, current_schema());
EXECUTE format($create$
CREATE FUNCTION %1$I.es_follow_horizon() RETURNS bigint LANGUAGE plpgsql VOLATILE
SET search_path = %1$I AS $body$
DECLARE
    bound bigint;
    lowest bigint;
    pending boolean;
BEGIN
    -- A cached sequence hands out keys below its last value.
    IF (SELECT seqcache FROM pg_sequence WHERE seqrelid = 'es_order_keys'::regclass) <> 1 THEN
        RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
            MESSAGE = 'the sequence es_order_keys must not be cached (ALTER SEQUENCE es_order_keys CACHE 1)';
    END IF;
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
END $body$;
$create$, current_schema());
END $migration$;
-- Rows inserted by hand get a key, and are followed like any other.
ALTER TABLE es_events ALTER COLUMN order_key SET DEFAULT es_append_key();
"#,
    ),
    // An upsert's DO UPDATE fires the UPDATE trigger of migration 1.
    (7, ""),
    (
        8,
        r#"
ALTER TABLE es_read_models
    ADD COLUMN rebuild_holder TEXT,
    ADD COLUMN rebuild_expires_ms BIGINT;
"#,
    ),
    (
        9,
        r#"
-- What each event is about (`#[event(tag = ..)]`), written with it: the
-- index of queries across streams and of conditional appends.
CREATE TABLE es_event_tags (
    tag             TEXT   NOT NULL,
    global_position BIGINT NOT NULL,
    event_type      TEXT   NOT NULL,
    PRIMARY KEY (tag, global_position)
);
-- `migrate` re-tags the events of one type.
CREATE INDEX es_event_tags_type ON es_event_tags (event_type);
-- The tag declaration each event type's stored tags were computed with.
CREATE TABLE es_tag_declarations (
    event_type TEXT PRIMARY KEY,
    spec       TEXT NOT NULL
);
"#,
    ),
    // A NOTIFY makes its transaction take the database's notify lock at
    // commit and hold it through the commit's flush: appends to different
    // streams would commit one at a time. Runners watch the order keys
    // instead (see `Listener` in backend/connection.rs).
    (
        10,
        r#"
DROP TRIGGER IF EXISTS es_events_notify ON es_events;
DROP FUNCTION IF EXISTS es_events_notify();
"#,
    ),
    (11, ""),
    // An append that writes read-model rows in the statement of its insert
    // (`insert_guarded` in backend/postgres.rs) fails whole through this
    // when a row changed since it was read.
    (
        12,
        r#"
CREATE FUNCTION es_rows_unchanged(unchanged boolean) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF unchanged IS NOT TRUE THEN
        RAISE EXCEPTION USING ERRCODE = 'serialization_failure',
            MESSAGE = 'a read-model row changed between its read and the append that writes it';
    END IF;
    RETURN TRUE;
END $$;
"#,
    ),
];
