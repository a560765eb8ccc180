//! The store's schema on MySQL and MariaDB, by migration version (see
//! `crate::schema::migrations`).
//!
//! MySQL commits DDL on the spot, so no migration is atomic here: the whole
//! schema is migration 1, written to be run again after a crash half-way
//! (`IF NOT EXISTS` throughout), and concurrent `migrate`s wait for each
//! other on a named lock instead (`Mysql::lock_migrations`).
//!
//! JSON columns are LONGTEXT without a `JSON_VALID` check: the store
//! writes only JSON it has parsed, and MariaDB's JSON functions refuse
//! documents nested deeper than 32 levels, which the other backends (and
//! the store) accept.

/// (version, statements).
pub(crate) const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        r#"
CREATE TABLE IF NOT EXISTS es_events (
    global_position BIGINT      NOT NULL DEFAULT 0 PRIMARY KEY,
    event_id        CHAR(36) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    stream_id       MEDIUMTEXT  NOT NULL,
    -- Stream ids may be kilobytes long, beyond what an index entry holds, so
    -- uniqueness and stream lookups go through the md5 of the id.
    stream_hash     BINARY(16)  AS (UNHEX(MD5(stream_id))) STORED,
    stream_version  BIGINT      NOT NULL CHECK (stream_version > 0),
    -- Bytes, compared exactly: text collations pad with spaces, so types
    -- `A` and `A ` would match each other's filters.
    event_type      VARBINARY(2000) NOT NULL,
    event_version   SMALLINT    NOT NULL CHECK (event_version > 0),
    payload         LONGTEXT    NOT NULL,
    metadata        LONGTEXT    NOT NULL,
    created_at      DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    UNIQUE KEY es_events_event_id (event_id),
    UNIQUE KEY es_events_stream (stream_hash, stream_version),
    KEY es_events_by_type (event_type, global_position)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
-- The last position handed out. Every append locks this row until it
-- commits: appends queue here, so positions commit in order (see
-- backend/mysql.rs).
CREATE TABLE IF NOT EXISTS es_log_head (
    id       TINYINT NOT NULL PRIMARY KEY,
    position BIGINT  NOT NULL
) ENGINE = InnoDB;
INSERT IGNORE INTO es_log_head (id, position) VALUES (1, 0);
-- Rows inserted by hand without a position take the next one as appends do,
-- holding the head until they commit, and are followed like any other.
CREATE TRIGGER IF NOT EXISTS es_events_position BEFORE INSERT ON es_events FOR EACH ROW
BEGIN
    IF NEW.global_position = 0 THEN
        UPDATE es_log_head SET position = position + 1 WHERE id = 1;
        SET NEW.global_position = (SELECT position FROM es_log_head WHERE id = 1);
    END IF;
END;
-- REPLACE deletes the row it conflicts with and fires the delete trigger;
-- INSERT ... ON DUPLICATE KEY UPDATE fires the update trigger.
CREATE TRIGGER IF NOT EXISTS es_events_no_update BEFORE UPDATE ON es_events FOR EACH ROW
    SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'es_events is append-only: UPDATE is refused';
CREATE TRIGGER IF NOT EXISTS es_events_no_delete BEFORE DELETE ON es_events FOR EACH ROW
    SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'es_events is append-only: DELETE is refused';
-- TRUNCATE and DROP fire no trigger, but InnoDB refuses both on a table
-- that a foreign key references. The guard never holds a row.
CREATE TABLE IF NOT EXISTS es_events_guard (
    global_position BIGINT NULL,
    CONSTRAINT `es_events is append-only: no TRUNCATE or DROP` FOREIGN KEY (global_position)
        REFERENCES es_events (global_position)
) ENGINE = InnoDB;
CREATE TABLE IF NOT EXISTS es_read_models (
    name               VARCHAR(500) NOT NULL PRIMARY KEY,
    fingerprint        TEXT         NOT NULL,
    ddl                LONGTEXT     NOT NULL,
    created_at         DATETIME(6)  NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    rebuilt_at         DATETIME(6),
    rebuild_holder     TEXT,
    rebuild_expires_ms BIGINT
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
CREATE TABLE IF NOT EXISTS es_checkpoints (
    projection       VARCHAR(500) NOT NULL PRIMARY KEY,
    position         BIGINT       NOT NULL DEFAULT 0,
    updated_at       DATETIME(6)  NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    last_error       LONGTEXT,
    transaction_id   BIGINT       NOT NULL DEFAULT 0,
    state            VARCHAR(16)  NOT NULL DEFAULT 'idle',
    holder           TEXT,
    lease_expires_ms BIGINT,
    failed_position  BIGINT
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
CREATE TABLE IF NOT EXISTS es_snapshots (
    aggregate_type VARCHAR(500) NOT NULL,
    stream_id      MEDIUMTEXT   NOT NULL,
    stream_hash    BINARY(16)   AS (UNHEX(MD5(stream_id))) STORED,
    shape          BIGINT       NOT NULL,
    stream_version BIGINT       NOT NULL CHECK (stream_version > 0),
    state          LONGTEXT     NOT NULL,
    created_at     DATETIME(6)  NOT NULL,
    UNIQUE KEY es_snapshots_stream (aggregate_type, stream_hash)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
"#,
    ),
    (2, ""),
    (3, ""),
    (4, ""),
    (5, ""),
    (6, ""),
    (7, ""),
    (8, ""),
    (
        9,
        r#"
CREATE TABLE IF NOT EXISTS es_event_tags (
    tag             VARBINARY(512)  NOT NULL,
    global_position BIGINT          NOT NULL,
    event_type      VARBINARY(2000) NOT NULL,
    PRIMARY KEY (tag, global_position),
    KEY es_event_tags_type (event_type(255))
) ENGINE = InnoDB;
CREATE TABLE IF NOT EXISTS es_tag_declarations (
    event_type VARBINARY(2000) NOT NULL PRIMARY KEY,
    spec       LONGTEXT        NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
"#,
    ),
    (10, ""),
    (11, ""),
    (12, ""),
];
