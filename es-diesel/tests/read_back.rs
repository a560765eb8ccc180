//! Whatever the store accepts, every read path reads back, on every backend;
//! what it could not read back (or one backend could not store) is refused
//! before anything is written, with the event type and the JSON path.

use diesel::prelude::*;
use es_diesel::runner::{async_read_models, Step};
use es_diesel::serde_json::{self, json, Value};
use es_diesel::testing::TestDatabase;
use es_diesel::{
    projector, upcaster, Aggregate, EncodeError, Error, Event, ExpectedVersion, Metadata, NewEvent,
    ReadModel, Recorded, StreamWrite,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(view = false)]
struct Noted {
    note_id: i64,
    text: String,
}

#[derive(Event, Debug, Clone, PartialEq)]
enum NoteEvent {
    Noted(Noted),
}

/// Counts notes; loading it reads every event's metadata.
#[derive(Default, Debug, Clone, PartialEq)]
struct Notebook {
    notes: i64,
}

impl Aggregate for Notebook {
    const TYPE: &'static str = "notebook";
    type Event = NoteEvent;
    type Command = ();
    type Error = std::convert::Infallible;

    fn apply(&mut self, _: &NoteEvent) {
        self.notes += 1;
    }

    fn handle(&self, _: ()) -> Result<Vec<NoteEvent>, Self::Error> {
        Ok(Vec::new())
    }
}

/// Each note's metadata as projected inline.
#[derive(ReadModel, Debug, Clone, PartialEq)]
#[read_model(table = "seen_metadata", primary_key = note_id)]
struct SeenMetadata {
    note_id: i64,
    metadata: String,
}

/// The same, projected by a runner.
#[derive(ReadModel, Debug, Clone, PartialEq)]
#[read_model(table = "seen_metadata_async", primary_key = note_id, mode = async)]
struct SeenMetadataAsync {
    note_id: i64,
    metadata: String,
}

#[projector(on = Noted, key = note_id)]
fn seen(e: &Recorded<Noted>, row: &mut Option<SeenMetadata>) {
    *row = Some(SeenMetadata {
        note_id: e.note_id,
        metadata: serde_json::to_string(&e.metadata).unwrap(),
    });
}

#[projector(on = Noted, key = note_id)]
fn seen_async(e: &Recorded<Noted>, row: &mut Option<SeenMetadataAsync>) {
    *row = Some(SeenMetadataAsync {
        note_id: e.note_id,
        metadata: serde_json::to_string(&e.metadata).unwrap(),
    });
}

fn nested(depth: usize, leaf: Value) -> Value {
    (0..depth).fold(leaf, |inner, _| json!({ "n": inner }))
}

/// Metadata a user may write, as hostile as it gets.
fn accepted_metadata() -> Vec<Metadata> {
    let id = uuid::Uuid::now_v7();
    let mut keys = Metadata::new();
    for key in [
        "",
        "with \"quotes\" and \\ backslash",
        "a.b[0]",
        "$",
        "ключ🔑",
        " ",
    ] {
        keys = keys.with(key, key);
    }
    vec![
        Metadata::new(),
        Metadata::new()
            .with("correlation_id", id.to_string())
            .with("causation_id", id.simple().to_string())
            .with("actor", "ann"),
        Metadata::new()
            .correlation_id(id)
            .actor("")
            .with("correlation_id", Value::Null)
            .with("tenant", 7),
        Metadata::new()
            .with("u64_max", u64::MAX)
            .with("i64_min", i64::MIN)
            .with("f64_max", f64::MAX)
            .with("f64_min", f64::MIN)
            .with("subnormal", 5e-324)
            .with("min_positive", f64::MIN_POSITIVE)
            .with("sum", 0.1 + 0.2)
            .with("nan_is_null", f64::NAN),
        Metadata::new()
            .actor("x".repeat(1 << 20))
            .with("big", "ü🎉".repeat(100_000)),
        Metadata::new()
            .actor("ünïcödé 🎉 \u{2028}\u{2029} \u{202e}RTL 日本語 e\u{301}")
            .with("controls", "\u{1}\u{1f}\t\n\r\u{7f}")
            .with("not_a_nul", "C:\\u0000 \\\\u0000"),
        keys,
        Metadata::new()
            .with(
                "object",
                json!({"a": {"b": [1, {"c": null}, [], {}]}, "t": true}),
            )
            .with(
                "array",
                json!([[], [[]], {"x": [null, false, 0, -0.0, "s"]}]),
            )
            // With the metadata object, 127 levels: the most serde_json reads.
            .with("deep", nested(126, json!(1))),
    ]
}

fn note(i: i64) -> Noted {
    Noted {
        note_id: i,
        text: format!("note {i}"),
    }
}

fn stored_metadata(text: &str) -> Metadata {
    Metadata::from_json(text).unwrap()
}

#[test]
fn hostile_metadata_is_read_back_on_every_read_path() {
    let cases = accepted_metadata();
    for db in TestDatabase::all() {
        let backend = db.backend();
        let store = db.store();
        let stream = Notebook::stream_id("hostile");
        for (i, metadata) in cases.iter().enumerate() {
            metadata.validate().unwrap();
            store
                .append_with(&stream, ExpectedVersion::Any, [note(i as i64)], metadata)
                .unwrap_or_else(|e| panic!("{backend}: case {i}: {e}"));
        }
        let expect = |what: &str, got: Vec<Metadata>| {
            assert_eq!(got.len(), cases.len(), "{backend}: {what}");
            for (i, (got, want)) in got.iter().zip(&cases).enumerate() {
                assert!(got == want, "{backend}: {what}: case {i} differs");
            }
        };
        let page = store.read_stream(&stream, 1, 1000).unwrap();
        expect(
            "read_stream",
            page.into_iter().map(|r| r.metadata).collect(),
        );
        let typed = store.load_stream::<NoteEvent>(&stream).unwrap();
        expect(
            "load_stream",
            typed.into_iter().map(|r| r.metadata).collect(),
        );
        let all = store.iter_all(0, 3).map(|r| r.unwrap().metadata).collect();
        expect("iter_all", all);
        let by_type = store.iter_types(&["Noted"], 0, 2);
        expect("iter_types", by_type.map(|r| r.unwrap().metadata).collect());
        let events = store.read_events::<Noted>(0, 1000).unwrap();
        expect(
            "read_events",
            events.into_iter().map(|r| r.metadata).collect(),
        );
        let loaded = store.load_aggregate::<Notebook>("hostile").unwrap();
        assert_eq!(loaded.state.notes, cases.len() as i64, "{backend}");

        let mut conn = store.connection().unwrap();
        let inline = |conn: &mut es_diesel::DbConnection| -> Vec<Metadata> {
            seen_metadata::table
                .order(seen_metadata::note_id)
                .select(seen_metadata::metadata)
                .load::<String>(conn)
                .unwrap()
                .iter()
                .map(|t| stored_metadata(t))
                .collect()
        };
        expect("inline projector", inline(&mut conn));
        drop(conn);
        store.rebuild("seen_metadata").unwrap();
        expect("rebuild", inline(&mut store.connection().unwrap()));

        let projection = async_read_models()
            .unwrap()
            .into_iter()
            .find(|p| p.name() == "seen_metadata_async")
            .unwrap();
        let mut runner = store.runner(projection);
        loop {
            match runner.step().unwrap() {
                Step::Applied(0) => break,
                Step::Applied(_) => {}
                other => panic!("{backend}: runner: {other:?}"),
            }
        }
        let by_runner = seen_metadata_async::table
            .order(seen_metadata_async::note_id)
            .select(seen_metadata_async::metadata)
            .load::<String>(&mut *store.connection().unwrap())
            .unwrap();
        expect(
            "runner",
            by_runner.iter().map(|t| stored_metadata(t)).collect(),
        );
    }
}

/// Metadata the store must refuse, and a part of what the error must say.
fn refused_metadata() -> Vec<(Metadata, &'static str)> {
    let mut refused = Vec::new();
    for (key, wrong) in [
        ("correlation_id", json!("req-42")),
        ("correlation_id", json!(5)),
        ("correlation_id", json!(true)),
        (
            "correlation_id",
            json!(["0191d3e4-7c6b-7000-8000-000000000000"]),
        ),
        ("correlation_id", json!({})),
        ("causation_id", json!(1.5)),
        ("causation_id", json!("")),
        ("actor", json!(5)),
        ("actor", json!(false)),
        ("actor", json!(["ann"])),
        ("actor", json!({"name": "ann"})),
    ] {
        let key_text = match key {
            "actor" => "`actor` is reserved for a string",
            "correlation_id" => "`correlation_id` is reserved for a UUID string",
            _ => "`causation_id` is reserved for a UUID string",
        };
        refused.push((Metadata::new().with(key, wrong), key_text));
    }
    let mut twice = Metadata::new().actor("ann");
    twice.fields.insert("actor".into(), json!("bob"));
    refused.push((twice, "`actor` is given twice"));
    let mut twice = Metadata::new().correlation_id(uuid::Uuid::now_v7());
    twice
        .fields
        .insert("correlation_id".into(), json!(uuid::Uuid::now_v7()));
    refused.push((twice, "`correlation_id` is given twice"));
    refused.push((
        Metadata::new().with("note", "a\0b"),
        "NUL character (\\u0000) at `$.note`",
    ));
    refused.push((
        Metadata::new().with("k\0", 1),
        "NUL character (\\u0000) at `$[\"k\\u0000\"]`",
    ));
    refused.push((
        Metadata::new().actor("\0"),
        "NUL character (\\u0000) at `$.actor`",
    ));
    refused.push((
        Metadata::new().with("list", json!({"items": ["ok", "\u{0}"]})),
        "at `$.list.items[1]`",
    ));
    refused.push((
        Metadata::new().with("deep", nested(127, json!(1))),
        "128 levels deep",
    ));
    refused
}

#[test]
fn metadata_that_could_not_be_read_back_is_refused_and_nothing_is_written() {
    for db in TestDatabase::all() {
        let backend = db.backend();
        let store = db.store();
        for (metadata, says) in refused_metadata() {
            let err = store
                .append_with("refused", ExpectedVersion::Any, [note(1)], &metadata)
                .unwrap_err();
            match &err {
                Error::Encode(EncodeError::Metadata { event_type, .. }) => {
                    assert_eq!(*event_type, "Noted")
                }
                other => {
                    panic!("{backend}: {metadata:?}: expected a metadata error, got {other:?}")
                }
            }
            let text = err.to_string();
            assert!(text.contains(says), "{backend}: {text:?} lacks {says:?}");
            assert!(text.contains("`Noted`"), "{text}");
            // In a batch after a valid stream: nothing of it is written.
            let mut ok = StreamWrite::new("fine", ExpectedVersion::Any);
            ok.push(&note(2)).unwrap();
            let mut bad = StreamWrite::new("refused", ExpectedVersion::Any);
            bad.push_with(&note(3), metadata).unwrap();
            assert!(matches!(
                store.append_streams(&[ok, bad]),
                Err(Error::Encode(EncodeError::Metadata { .. }))
            ));
        }
        assert_eq!(store.head().unwrap(), 0, "{backend}: nothing written");
    }
}

/// Rows written before such metadata was refused stay readable; what does
/// not fit a reserved field is kept among the free fields.
#[test]
fn metadata_stored_by_older_code_is_still_read() {
    let db = TestDatabase::sqlite();
    let store = db.store();
    let mut conn = store.connection().unwrap();
    let rows = [
        r#"{"correlation_id":"req-42","actor":5}"#,
        r#"{"actor":"ann","actor":"bob"}"#,
    ];
    for (i, metadata) in rows.iter().enumerate() {
        diesel::sql_query(
            "INSERT INTO es_events (event_id, stream_id, stream_version, event_type, \
             event_version, payload, metadata, created_at) \
             VALUES (?, 'old', ?, 'Noted', 1, '{\"note_id\":1,\"text\":\"t\"}', ?, '2020-01-01 00:00:00')",
        )
        .bind::<diesel::sql_types::Text, _>(uuid::Uuid::now_v7().to_string())
        .bind::<diesel::sql_types::BigInt, _>(i as i64 + 1)
        .bind::<diesel::sql_types::Text, _>(*metadata)
        .execute(&mut *conn)
        .unwrap();
    }
    drop(conn);
    let events = store.load_stream::<NoteEvent>("old").unwrap();
    assert_eq!(events[0].metadata.correlation_id, None);
    assert_eq!(events[0].metadata.actor, None);
    assert_eq!(
        Value::Object(events[0].metadata.fields.clone()),
        json!({"correlation_id": "req-42", "actor": 5})
    );
    assert_eq!(events[1].metadata.actor.as_deref(), Some("bob"));
    assert_eq!(store.iter_all(0, 10).count(), 2);
}

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(view = false)]
struct Titled {
    book_id: i64,
    title: String,
    counts: BTreeMap<String, i32>,
    tree: Value,
}

fn titled(title: &str) -> Titled {
    Titled {
        book_id: 1,
        title: title.into(),
        counts: BTreeMap::new(),
        tree: Value::Null,
    }
}

#[test]
fn a_nul_in_a_payload_is_refused_on_every_backend_with_its_path() {
    let mut in_key = titled("fine");
    in_key.counts.insert("ok".into(), 1);
    in_key.counts.insert("x\0y".into(), 2);
    let mut nested = titled("fine");
    nested.tree = json!({"shelves": [{"label": "A"}, {"label": "B\u{0}"}]});
    let cases = [
        (titled("a\0b"), "$.title"),
        (in_key, "$.counts[\"x\\u0000y\"]"),
        (nested, "$.tree.shelves[1].label"),
    ];
    for (event, path) in &cases {
        match NewEvent::new(event) {
            Err(EncodeError::Nul {
                event_type: "Titled",
                path: p,
            }) => assert_eq!(&p, path),
            other => panic!("expected a NUL error at {path}, got {other:?}"),
        }
    }
    for db in TestDatabase::all() {
        let backend = db.backend();
        let store = db.store();
        for (event, path) in &cases {
            let err = store
                .append("books", ExpectedVersion::Any, [event.clone()])
                .unwrap_err();
            let text = err.to_string();
            assert!(
                matches!(&err, Error::Encode(EncodeError::Nul { .. })),
                "{backend}: {err:?}"
            );
            assert!(
                text.contains("`Titled`") && text.contains(&format!("at `{path}`")),
                "{backend}: {text}"
            );
        }
        // Built by hand, past NewEvent::new: refused by the append itself.
        let mut ok = StreamWrite::new("fine", ExpectedVersion::Any);
        ok.push(&titled("fine")).unwrap();
        let mut bad = StreamWrite::new("books", ExpectedVersion::Any);
        bad.push_new(NewEvent {
            payload: r#"{"book_id":1,"title":"\u0000","counts":{},"tree":null}"#.into(),
            ..NewEvent::new(&titled("fine")).unwrap()
        });
        let err = store.append_streams(&[ok, bad]).unwrap_err();
        assert!(
            matches!(&err, Error::Encode(EncodeError::Nul { event_type: "Titled", path }) if path == "$.title"),
            "{backend}: {err:?}"
        );
        assert_eq!(store.head().unwrap(), 0, "{backend}: nothing written");

        // Six characters that merely look like an escaped NUL are fine.
        let lookalike = titled("C:\\u0000");
        store
            .append("books", ExpectedVersion::Any, [lookalike.clone()])
            .unwrap();
        let back = store.read_events::<Titled>(0, 10).unwrap();
        assert_eq!(back[0].event, lookalike, "{backend}");
    }
}

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Measured {
    sensor: i64,
    #[serde(rename = "reading")]
    value: f64,
    peak: Option<f32>,
}

#[test]
fn payloads_that_could_not_be_decoded_again_are_refused() {
    let nan = Measured {
        sensor: 1,
        value: f64::NAN,
        peak: None,
    };
    let inf = Measured {
        sensor: 1,
        value: 1.0,
        peak: Some(f32::NEG_INFINITY),
    };
    let mut deep = titled("deep");
    // The payload object and `tree`'s 127 levels: one too many.
    deep.tree = nested(127, json!(1));
    let mut deepest = titled("deepest that reads back");
    deepest.tree = nested(126, json!(1));
    let extreme = Measured {
        sensor: i64::MIN,
        value: f64::MAX,
        peak: Some(f32::MIN_POSITIVE),
    };
    for db in TestDatabase::all() {
        let backend = db.backend();
        let store = db.store();
        let err = store
            .append("m", ExpectedVersion::Any, [nan.clone()])
            .unwrap_err();
        assert!(
            matches!(
                &err,
                Error::Encode(EncodeError::NonFinite {
                    event_type: "Measured",
                    path: "$.reading",
                    ..
                })
            ),
            "{backend}: {err:?}"
        );
        assert!(err.to_string().contains("NaN"), "{err}");
        let err = store
            .append("m", ExpectedVersion::Any, [inf.clone()])
            .unwrap_err();
        assert!(
            matches!(
                &err,
                Error::Encode(EncodeError::NonFinite { path: "$.peak", .. })
            ),
            "{backend}: {err:?}"
        );
        let err = store
            .append("t", ExpectedVersion::Any, [deep.clone()])
            .unwrap_err();
        assert!(
            matches!(
                &err,
                Error::Encode(EncodeError::TooDeep {
                    event_type: "Titled",
                    depth: 128
                })
            ),
            "{backend}: {err:?}"
        );
        assert_eq!(store.head().unwrap(), 0, "{backend}: nothing written");

        store
            .append("t", ExpectedVersion::Any, [deepest.clone()])
            .unwrap();
        store
            .append("m", ExpectedVersion::Any, [extreme.clone()])
            .unwrap();
        assert_eq!(
            store.read_events::<Titled>(0, 10).unwrap()[0].event,
            deepest,
            "{backend}"
        );
        assert_eq!(
            store.read_events::<Measured>(0, 10).unwrap()[0].event,
            extreme,
            "{backend}"
        );
        let mut conn = store.connection().unwrap();
        let readings: Vec<(f64, Option<f32>)> = measured::table
            .select((measured::value, measured::peak))
            .load(&mut *conn)
            .unwrap();
        assert_eq!(readings, [(f64::MAX, Some(f32::MIN_POSITIVE))], "{backend}");
    }
}

/// Version 1 of `Borrowed`, as the old code wrote it.
mod v1 {
    use super::*;

    #[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
    #[event(name = "Borrowed", view = false, copy)]
    pub struct Borrowed {
        pub book_id: i64,
        pub due: String,
    }
}

/// v2 replaced the free-text due date by a number of days.
#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(version = 2)]
struct Borrowed {
    book_id: i64,
    due_days: i32,
}

#[upcaster(Borrowed, from = 1)]
fn borrowed_v1_to_v2(payload: Value) -> Result<Value, String> {
    Ok(json!({ "book_id": payload["book_id"], "due_days": 14 }))
}

#[test]
fn a_typed_view_shows_only_the_rows_of_its_version() {
    for db in TestDatabase::all() {
        let backend = db.backend();
        let store = db.store();
        store
            .append(
                "book-1",
                ExpectedVersion::NoStream,
                [v1::Borrowed {
                    book_id: 1,
                    due: "in two weeks".into(),
                }],
            )
            .unwrap();
        let current = store
            .append(
                "book-2",
                ExpectedVersion::NoStream,
                [Borrowed {
                    book_id: 2,
                    due_days: 7,
                }],
            )
            .unwrap();
        let mut conn = store.connection().unwrap();
        let rows: Vec<(i64, i64, i32)> = borrowed::table
            .order(borrowed::global_position)
            .select((
                borrowed::global_position,
                borrowed::book_id,
                borrowed::due_days,
            ))
            .load(&mut *conn)
            .unwrap_or_else(|e| panic!("{backend}: {e}"));
        assert_eq!(rows, [(current[0].global_position, 2, 7)], "{backend}");
        drop(conn);
        // The store reads both, the old one upcast.
        let all = store.read_events::<Borrowed>(0, 10).unwrap();
        let days: Vec<i32> = all.iter().map(|r| r.due_days).collect();
        assert_eq!(days, [14, 7], "{backend}");
    }
}
