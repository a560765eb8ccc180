//! The DDL `#[derive(ReadModel)]` writes, on every backend: SQL reserved
//! words as table and column names, a primary key of two text columns, an
//! index on a text column, and text keys as long as each backend holds.

use diesel::prelude::*;
use es_diesel::testing::TestDatabase;
use es_diesel::{projector, Backend, Event, ExpectedVersion, ReadModel, Recorded};
use serde::{Deserialize, Serialize};

#[derive(Event, Serialize, Deserialize, Debug, Clone)]
#[event(view = false)]
struct Placed {
    key: String,
    group: String,
    desc: String,
}

#[derive(ReadModel, Debug, Clone, PartialEq)]
#[read_model(table = "order", primary_key(key, group), index(desc))]
struct Order {
    key: String,
    group: String,
    select: i64,
    desc: String,
}

#[projector(on = Placed, key = (key, group))]
fn placed(e: &Recorded<Placed>, row: &mut Option<Order>) {
    let select = row.as_ref().map_or(0, |r| r.select) + 1;
    *row = Some(Order {
        key: e.key.clone(),
        group: e.group.clone(),
        select,
        desc: e.desc.clone(),
    });
}

fn rows(store: &es_diesel::EventStore) -> Vec<Order> {
    let mut conn = store.connection().unwrap();
    order::table
        .order_by((order::key, order::group))
        .load::<Order>(&mut *conn)
        .unwrap()
}

#[test]
fn reserved_words_and_long_text_keys() {
    for db in TestDatabase::all() {
        let store = db.store();
        // Within MySQL's share of an index entry for each of two text key
        // columns (1,504 bytes; this is 540).
        let long = "ключ-".repeat(60);
        assert_eq!(long.chars().count(), 300);
        for (i, (key, group)) in [
            ("a", "select"),
            ("a", "from"),
            (long.as_str(), "where"),
            (long.as_str(), "where"),
        ]
        .into_iter()
        .enumerate()
        {
            store
                .append(
                    &format!("o-{i}"),
                    ExpectedVersion::NoStream,
                    [Placed {
                        key: key.into(),
                        group: group.into(),
                        desc: format!("'desc' \"{i}\" `x`"),
                    }],
                )
                .unwrap_or_else(|e| panic!("{}: {e}", db.backend()));
        }
        // Keys that differ only by trailing spaces are different rows (MySQL's
        // text collations would pad them equal).
        for (i, key) in ["k", "k ", "k  "].into_iter().enumerate() {
            store
                .append(
                    &format!("pad-{i}"),
                    ExpectedVersion::NoStream,
                    [Placed {
                        key: key.into(),
                        group: "g".into(),
                        desc: String::new(),
                    }],
                )
                .unwrap_or_else(|e| panic!("{}: {e}", db.backend()));
        }
        let before = rows(&store);
        assert_eq!(before.len(), 6, "{}", db.backend());
        assert_eq!(before.iter().find(|r| r.key == long).unwrap().select, 2);
        let report = store.rebuild("order").unwrap();
        assert_eq!(report.rows, 6);
        assert_eq!(
            rows(&store),
            before,
            "{}: a rebuild gives the same rows",
            db.backend()
        );

        // Beyond what the backend's key column holds: refused, with the
        // database's reason, and nothing written.
        if db.backend() == Backend::Mysql {
            let head = store.head().unwrap();
            let err = store
                .append(
                    "o-too-long",
                    ExpectedVersion::NoStream,
                    [Placed {
                        key: "k".repeat(2000),
                        group: "g".into(),
                        desc: String::new(),
                    }],
                )
                .unwrap_err();
            assert!(err.to_string().contains("too long"), "{err}");
            assert_eq!(store.head().unwrap(), head, "nothing written");
            assert_eq!(rows(&store), before);
        }
    }
}
