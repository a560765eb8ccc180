//! A read model fed by both a SQL-level projector that inserts rows and a
//! row-level one that changes them: a rebuild gives the inline result.

use diesel::prelude::*;
use es_diesel::testing::TestDatabase;
use es_diesel::{projector, DbConnection, Event, ExpectedVersion, ReadModel, Recorded};
use serde::{Deserialize, Serialize};

#[derive(Event, Serialize, Deserialize, Debug, Clone)]
#[event(view = false)]
struct Opened {
    account: i64,
}

#[derive(Event, Serialize, Deserialize, Debug, Clone)]
#[event(view = false)]
struct Named {
    account: i64,
    name: String,
}

#[derive(ReadModel, Debug, Clone, PartialEq)]
#[read_model(table = "accounts", primary_key = account)]
struct Account {
    account: i64,
    name: Option<String>,
    events: i64,
}

#[derive(ReadModel, Debug, Clone, PartialEq)]
#[read_model(table = "accounts_async", primary_key = account, mode = async)]
struct AccountAsync {
    account: i64,
    name: Option<String>,
    events: i64,
}

fn upsert(conn: &mut DbConnection, table: &str, account: i64) -> QueryResult<()> {
    let on_conflict = match conn.backend() {
        es_diesel::Backend::Mysql => "ON DUPLICATE KEY UPDATE".to_owned(),
        _ => "ON CONFLICT (account) DO UPDATE SET".to_owned(),
    };
    diesel::sql_query(format!(
        "INSERT INTO {table} (account, name, events) VALUES ({account}, NULL, 1) \
         {on_conflict} events = {table}.events + 1"
    ))
    .execute(conn)?;
    Ok(())
}

#[projector(on = Opened, read_model = Account)]
fn opened(e: &Recorded<Opened>, conn: &mut DbConnection) -> QueryResult<()> {
    upsert(conn, "accounts", e.account)
}

#[projector(on = Named, key = account)]
fn named(e: &Recorded<Named>, row: &mut Option<Account>) {
    let events = row.as_ref().map_or(0, |r| r.events) + 1;
    *row = Some(Account {
        account: e.account,
        name: Some(e.name.clone()),
        events,
    });
}

#[projector(on = Opened, read_model = AccountAsync)]
fn opened_async(e: &Recorded<Opened>, conn: &mut DbConnection) -> QueryResult<()> {
    upsert(conn, "accounts_async", e.account)
}

#[projector(on = Named, key = account)]
fn named_async(e: &Recorded<Named>, row: &mut Option<AccountAsync>) {
    let events = row.as_ref().map_or(0, |r| r.events) + 1;
    *row = Some(AccountAsync {
        account: e.account,
        name: Some(e.name.clone()),
        events,
    });
}

/// `accounts` as (account, name, events), by account.
fn account_rows(store: &es_diesel::EventStore) -> Vec<(i64, Option<String>, i64)> {
    accounts::table
        .order(accounts::account)
        .load::<Account>(&mut *store.connection().unwrap())
        .unwrap()
        .into_iter()
        .map(|r| (r.account, r.name, r.events))
        .collect()
}

#[test]
fn rows_inserted_by_a_sql_projector_are_loaded_by_row_projectors_in_a_rebuild() {
    for db in TestDatabase::all() {
        let store = db.store();
        for a in 1..=3 {
            store
                .append(
                    &format!("a-{a}"),
                    ExpectedVersion::NoStream,
                    [Opened { account: a }],
                )
                .unwrap();
        }
        for a in [2, 3, 2] {
            store
                .append(
                    &format!("a-{a}"),
                    ExpectedVersion::Any,
                    [Named {
                        account: a,
                        name: format!("n{a}"),
                    }],
                )
                .unwrap();
        }
        let expected = vec![
            (1, None, 1),
            (2, Some("n2".to_owned()), 3),
            (3, Some("n3".to_owned()), 2),
        ];
        let rows = || account_rows(&store);
        assert_eq!(rows(), expected, "{}: inline", db.backend());
        for batch_size in [1, 2, 100] {
            store
                .rebuild_with(
                    "accounts",
                    &es_diesel::RebuildOptions {
                        batch_size,
                        ..Default::default()
                    },
                    |_| {},
                )
                .unwrap_or_else(|e| panic!("{}: rebuild: {e}", db.backend()));
            assert_eq!(
                rows(),
                expected,
                "{}: rebuilt by {batch_size}",
                db.backend()
            );
            store
                .rebuild_with(
                    "accounts_async",
                    &es_diesel::RebuildOptions {
                        batch_size,
                        ..Default::default()
                    },
                    |_| {},
                )
                .unwrap_or_else(|e| panic!("{}: blue/green rebuild: {e}", db.backend()));
            let async_rows: Vec<(i64, Option<String>, i64)> = accounts_async::table
                .order(accounts_async::account)
                .load::<AccountAsync>(&mut *store.connection().unwrap())
                .unwrap()
                .into_iter()
                .map(|r| (r.account, r.name, r.events))
                .collect();
            assert_eq!(
                async_rows,
                expected,
                "{}: blue/green by {batch_size}",
                db.backend()
            );
        }
    }
}

/// A row folded in memory in one batch, then changed by a SQL-level
/// projector in a later batch: the rows held from earlier batches are
/// written before the SQL runs, so it finds and changes the row.
#[test]
fn a_sql_projector_changes_a_row_folded_in_an_earlier_batch() {
    for db in TestDatabase::all() {
        let store = db.store();
        store
            .append(
                "a-5",
                ExpectedVersion::NoStream,
                [Named {
                    account: 5,
                    name: "five".into(),
                }],
            )
            .unwrap();
        store
            .append("a-5", ExpectedVersion::Exact(1), [Opened { account: 5 }])
            .unwrap();
        let rows = || account_rows(&store);
        let expected = vec![(5, Some("five".to_owned()), 2)];
        assert_eq!(rows(), expected, "{}: inline", db.backend());
        for batch_size in [1, 100] {
            store
                .rebuild_with(
                    "accounts",
                    &es_diesel::RebuildOptions {
                        batch_size,
                        ..Default::default()
                    },
                    |_| {},
                )
                .unwrap_or_else(|e| panic!("{}: rebuild by {batch_size}: {e}", db.backend()));
            assert_eq!(
                rows(),
                expected,
                "{}: rebuilt by {batch_size}",
                db.backend()
            );
        }
    }
}
