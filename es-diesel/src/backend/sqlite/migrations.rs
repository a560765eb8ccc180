//! The store's schema on SQLite, by migration version (see
//! `crate::schema::migrations`). A version a backend needs nothing for is empty.

/// (version, statements).
pub(crate) const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        r#"
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
    ),
    (
        2,
        r#"
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
    ),
    (
        3,
        r#"
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
    ),
    (4, ""),
    (
        5,
        r#"
ALTER TABLE es_checkpoints ADD COLUMN transaction_id INTEGER NOT NULL DEFAULT 0;
ALTER TABLE es_checkpoints ADD COLUMN state TEXT NOT NULL DEFAULT 'idle';
ALTER TABLE es_checkpoints ADD COLUMN holder TEXT;
ALTER TABLE es_checkpoints ADD COLUMN lease_expires_ms INTEGER;
ALTER TABLE es_checkpoints ADD COLUMN failed_position INTEGER;
"#,
    ),
    (6, ""),
    // `INSERT OR REPLACE` deletes the row it conflicts with without
    // firing delete triggers (unless `recursive_triggers` is on), and an
    // upsert turns into an update: refuse the insert before either can
    // happen, whatever the connection's pragmas. `NEW.global_position`
    // is -1 here when the position is left to AUTOINCREMENT.
    (
        7,
        r#"
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
    ),
    (
        8,
        r#"
ALTER TABLE es_read_models ADD COLUMN rebuild_holder TEXT;
ALTER TABLE es_read_models ADD COLUMN rebuild_expires_ms INTEGER;
"#,
    ),
    (
        9,
        r#"
CREATE TABLE es_event_tags (
    tag             TEXT    NOT NULL,
    global_position INTEGER NOT NULL,
    event_type      TEXT    NOT NULL,
    PRIMARY KEY (tag, global_position)
) WITHOUT ROWID;
CREATE INDEX es_event_tags_type ON es_event_tags (event_type);
CREATE TABLE es_tag_declarations (
    event_type TEXT PRIMARY KEY,
    spec       TEXT NOT NULL
);
"#,
    ),
    (10, ""),
    // Migration 7's three checks in one trigger (one sub-program per insert
    // instead of three), plus the rule that makes an append with an
    // expected version a single INSERT: a stream's versions follow each
    // other, so writing version v + 1 succeeds only on a stream at v. The
    // stream's last version is one probe of the (stream_id,
    // stream_version) index, which also answers "already exists". The
    // version is checked before the event id, so that resending an append
    // that committed is a conflict, as on the other backends.
    (
        11,
        r#"
DROP TRIGGER IF EXISTS es_events_no_overwrite;
DROP TRIGGER IF EXISTS es_events_no_overwrite_version;
DROP TRIGGER IF EXISTS es_events_no_overwrite_position;
CREATE TRIGGER es_events_append_only BEFORE INSERT ON es_events
BEGIN
    SELECT CASE
        WHEN NEW.stream_version <= head.last
            THEN RAISE(ABORT, 'es_events is append-only: this stream_id and stream_version already exist')
        WHEN NEW.stream_version <> head.last + 1
            THEN RAISE(ABORT, 'es_events is append-only: a stream_version must follow the last version of its stream')
        WHEN EXISTS (SELECT 1 FROM es_events WHERE event_id = NEW.event_id)
            THEN RAISE(ABORT, 'es_events is append-only: an event with this event_id already exists')
        WHEN EXISTS (SELECT 1 FROM es_events WHERE global_position = NEW.global_position)
            THEN RAISE(ABORT, 'es_events is append-only: this global_position already exists')
    END
    FROM (SELECT COALESCE(MAX(stream_version), 0) AS last FROM es_events WHERE stream_id = NEW.stream_id) AS head;
END;
"#,
    ),
    (12, ""),
];
