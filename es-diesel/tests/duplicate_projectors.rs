//! Two projectors registered under one name: the registry refuses to run
//! either and says where both are.

use es_diesel::testing::TestDatabase;
use es_diesel::{
    projector, registered_projectors, Error, Event, ExpectedVersion, ReadModel, Recorded,
};
use serde::{Deserialize, Serialize};

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(view = false)]
struct BookRegistered {
    book_id: i64,
}

#[derive(ReadModel, Debug, Clone, PartialEq)]
#[read_model(table = "catalogue", primary_key = book_id)]
struct Catalogue {
    book_id: i64,
    copies: i32,
}

#[projector(on = BookRegistered, key = book_id, name = "catalogue.registered")]
fn registered(e: &Recorded<BookRegistered>, row: &mut Option<Catalogue>) {
    *row = Some(Catalogue {
        book_id: e.book_id,
        copies: 1,
    });
}

mod again {
    use super::*;

    #[projector(on = BookRegistered, key = book_id, name = "catalogue.registered")]
    fn registered_twice(e: &Recorded<BookRegistered>, row: &mut Option<Catalogue>) {
        *row = Some(Catalogue {
            book_id: e.book_id,
            copies: 2,
        });
    }
}

#[test]
fn duplicate_names_are_reported_with_their_locations() {
    let err = registered_projectors().unwrap_err();
    let Error::Registry(reg) = &err else {
        panic!("expected a registry error, got {err:?}")
    };
    assert_eq!(reg.duplicates.len(), 1);
    let dup = &reg.duplicates[0];
    assert_eq!(
        (dup.kind, dup.name.as_str()),
        ("projector", "catalogue.registered")
    );
    assert_eq!(dup.locations.len(), 2);
    assert!(
        dup.locations
            .iter()
            .all(|l| l.contains("duplicate_projectors.rs")),
        "{:?}",
        dup.locations
    );
    assert!(
        err.to_string()
            .contains("projector `catalogue.registered` is registered 2 times"),
        "{err}"
    );

    // Nothing runs with an ambiguous registry: neither migrate nor append.
    let db = TestDatabase::sqlite();
    let store = es_diesel::EventStore::open(db.url()).unwrap();
    assert!(matches!(store.migrate(), Err(Error::Registry(_))));
    let append = store.append(
        "book-1",
        ExpectedVersion::NoStream,
        [BookRegistered { book_id: 1 }],
    );
    assert!(matches!(append, Err(Error::Registry(_))), "{append:?}");
}
