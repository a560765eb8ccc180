//! MySQL (unlike MariaDB) refuses an `INSERT … VALUES` whose subquery reads
//! the table it inserts into (error 1093, "You can't specify target table
//! … for update in FROM clause"). A command's append on MySQL then falls
//! back, for the rest of the process, to the `INSERT … SELECT` form. This
//! file is a process of its own: the fallback, once taken, stays.
//!
//! MariaDB does not raise that error, so a trigger raises it here, once per
//! session variable set, before the append's own trigger would take the
//! log's head.

use diesel::connection::SimpleConnection;
use diesel::sql_types::BigInt;
use diesel::{Connection, MysqlConnection, QueryableByName, RunQueryDsl};
use es_diesel::testing::TestDatabase;
use es_diesel::{append_in, Error, Event, ExpectedVersion, StreamWrite};
use serde::{Deserialize, Serialize};

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(view = false)]
struct Tick {
    n: u32,
}

fn one(stream: &str, expected: ExpectedVersion, n: u32) -> StreamWrite {
    let mut w = StreamWrite::new(stream, expected);
    w.push(&Tick { n }).unwrap();
    w
}

/// The session's count of internal temporary tables.
fn temporary_tables(conn: &mut es_diesel::PooledConnection) -> i64 {
    #[derive(QueryableByName)]
    struct N {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    diesel::sql_query(
        "SELECT CAST(VARIABLE_VALUE AS SIGNED) AS n FROM information_schema.SESSION_STATUS \
         WHERE VARIABLE_NAME = 'CREATED_TMP_TABLES'",
    )
    .get_result::<N>(conn)
    .unwrap()
    .n
}

#[test]
fn an_append_refused_as_reading_its_own_table_is_made_again_as_insert_select() {
    let Some(db) = TestDatabase::mysql() else {
        return;
    };
    drop(db.store());
    // Created before any connection of the store below prepares a statement
    // on the log (MariaDB fails statements prepared before a trigger).
    let mut admin = MysqlConnection::establish(db.url()).unwrap();
    admin
        .batch_execute(
            "CREATE TRIGGER es_test_refuse_self_read BEFORE INSERT ON es_events FOR EACH ROW \
             PRECEDES es_events_position \
             BEGIN \
                 IF @es_test_refuse = 1 THEN \
                     SET @es_test_refuse = 0; \
                     SIGNAL SQLSTATE 'HY000' SET MESSAGE_TEXT = \
                         'You can''t specify target table ''es_events'' for update in FROM clause'; \
                 END IF; \
             END",
        )
        .unwrap();
    let store = db.store();
    store
        .append("s", ExpectedVersion::NoStream, [Tick { n: 1 }])
        .unwrap();
    let mut conn = store.connection().unwrap();
    let refuse_next = |conn: &mut es_diesel::PooledConnection| {
        conn.batch_execute("SET @es_test_refuse = 1").unwrap();
    };
    // The first append expecting a version meets the refusal, and is made
    // again as an `INSERT … SELECT`, which the trigger lets through.
    refuse_next(&mut conn);
    let rec = append_in(&mut conn, &[one("s", ExpectedVersion::Exact(1), 2)]).unwrap();
    assert_eq!(rec[0].stream_version, 2);
    // From then on the `VALUES` form is not tried: the next append is an
    // `INSERT … SELECT`, which MariaDB runs through an internal temporary
    // table (the `VALUES` form creates none).
    conn.batch_execute("SET @es_test_refuse = 0").unwrap();
    let t0 = temporary_tables(&mut conn);
    let per_read = temporary_tables(&mut conn) - t0;
    let before = temporary_tables(&mut conn);
    let rec = append_in(&mut conn, &[one("s", ExpectedVersion::Exact(2), 3)]).unwrap();
    assert_eq!(rec[0].stream_version, 3);
    assert_eq!(
        temporary_tables(&mut conn) - before - per_read,
        1,
        "the append after the refusal is an INSERT … SELECT"
    );
    // Expectations are still checked the same: stale, ahead, below 0.
    for expected in [
        ExpectedVersion::Exact(1),
        ExpectedVersion::Exact(9),
        ExpectedVersion::Exact(-1),
        ExpectedVersion::NoStream,
    ] {
        match append_in(&mut conn, &[one("s", expected, 99)]) {
            Err(Error::Conflict { actual: 3, .. }) => {}
            other => panic!("{expected}: {other:?}"),
        }
    }
    drop(conn);
    let log: Vec<(i64, i64)> = store
        .read_stream("s", 1, 10)
        .unwrap()
        .iter()
        .map(|e| (e.global_position, e.stream_version))
        .collect();
    assert_eq!(
        log,
        [(1, 1), (2, 2), (3, 3)],
        "the refused statement wrote nothing and gave its position back"
    );
}
