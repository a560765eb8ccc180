//! The store's `tracing` spans: names and fields a subscriber can filter
//! and aggregate on, for appends, commands, projectors, runner batches and
//! rebuilds.

use es_diesel::runner::{async_read_models, Step};
use es_diesel::testing::TestDatabase;
use es_diesel::{
    projector, Aggregate, Backend, Event, EventStore, ExecuteError, ExpectedVersion, ReadModel,
    Recorded, StreamWrite,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::Subscriber;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(view = false)]
struct Opened {
    id: i64,
}

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(view = false)]
struct Deposited {
    id: i64,
    amount: i64,
}

#[derive(Event, Debug, Clone, PartialEq)]
enum AccountEvent {
    Opened(Opened),
    Deposited(Deposited),
}

#[derive(ReadModel, Debug, Clone, PartialEq)]
#[read_model(table = "traced_balances", primary_key = id)]
struct Balance {
    id: i64,
    balance: i64,
}

#[derive(ReadModel, Debug, Clone, PartialEq)]
#[read_model(table = "traced_balances_async", primary_key = id, mode = async)]
struct BalanceAsync {
    id: i64,
    balance: i64,
}

#[projector(on = [Opened, Deposited], key = id)]
fn balance(e: &Recorded<AccountEvent>, row: &mut Option<Balance>) {
    *row = match &e.event {
        AccountEvent::Opened(o) => Some(Balance {
            id: o.id,
            balance: 0,
        }),
        AccountEvent::Deposited(d) => row.take().map(|r| Balance {
            balance: r.balance + d.amount,
            ..r
        }),
    };
}

#[projector(on = [Opened, Deposited], key = id)]
fn balance_async(e: &Recorded<AccountEvent>, row: &mut Option<BalanceAsync>) {
    *row = match &e.event {
        AccountEvent::Opened(o) => Some(BalanceAsync {
            id: o.id,
            balance: 0,
        }),
        AccountEvent::Deposited(d) => row.take().map(|r| BalanceAsync {
            balance: r.balance + d.amount,
            ..r
        }),
    };
}

/// A store that, while set, gets one event appended to the account's
/// stream behind the back of the command being decided: a lost race.
static MEDDLER: Mutex<Option<EventStore>> = Mutex::new(None);

#[derive(Default, Debug, Clone)]
struct Account {
    id: Option<i64>,
}

#[derive(Debug, Clone)]
enum AccountCommand {
    Deposit(i64),
}

#[derive(Debug, thiserror::Error)]
#[error("the account is not open")]
struct NotOpen;

impl Aggregate for Account {
    const TYPE: &'static str = "account";
    type Event = AccountEvent;
    type Command = AccountCommand;
    type Error = NotOpen;

    fn apply(&mut self, event: &AccountEvent) {
        if let AccountEvent::Opened(o) = event {
            self.id = Some(o.id);
        }
    }

    fn handle(&self, command: AccountCommand) -> Result<Vec<AccountEvent>, NotOpen> {
        match command {
            AccountCommand::Deposit(amount) => {
                let id = self.id.ok_or(NotOpen)?;
                if let Some(store) = MEDDLER.lock().unwrap().take() {
                    let stream = Account::stream_id(&id.to_string());
                    store
                        .append(&stream, ExpectedVersion::Any, [Deposited { id, amount: 1 }])
                        .unwrap();
                }
                Ok(vec![Deposited { id, amount }.into()])
            }
        }
    }
}

/// A span as it closed: its name, its fields and its parent's name.
#[derive(Clone, Debug)]
struct Closed {
    name: &'static str,
    parent: Option<&'static str>,
    fields: BTreeMap<String, String>,
}

impl Closed {
    fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }

    fn int(&self, name: &str) -> i64 {
        self.field(name)
            .unwrap_or_else(|| panic!("{} has no field {name}: {self:?}", self.name))
            .parse()
            .unwrap()
    }
}

#[derive(Default)]
struct Fields(BTreeMap<String, String>);

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), value.to_string());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), value.to_string());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

/// Collects every span of the store as it closes, and the events.
#[derive(Clone, Default)]
struct Capture {
    spans: Arc<Mutex<Vec<Closed>>>,
    events: Arc<Mutex<Vec<BTreeMap<String, String>>>>,
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        ctx.span(id).unwrap().extensions_mut().insert(fields);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let span = ctx.span(id).unwrap();
        let mut ext = span.extensions_mut();
        values.record(ext.get_mut::<Fields>().unwrap());
    }

    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        self.events.lock().unwrap().push(fields.0);
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let span = ctx.span(&id).unwrap();
        let fields = span.extensions().get::<Fields>().unwrap().0.clone();
        self.spans.lock().unwrap().push(Closed {
            name: span.name(),
            parent: span.parent().map(|p| p.name()),
            fields,
        });
    }
}

impl Capture {
    /// Runs `f` with this layer seeing the current thread's spans, and
    /// returns the spans that closed meanwhile.
    fn during(&self, f: impl FnOnce()) -> Vec<Closed> {
        self.spans.lock().unwrap().clear();
        self.events.lock().unwrap().clear();
        let subscriber = tracing_subscriber::registry().with(self.clone());
        tracing::subscriber::with_default(subscriber, f);
        self.spans.lock().unwrap().clone()
    }
}

fn named<'a>(spans: &'a [Closed], name: &str) -> Vec<&'a Closed> {
    spans.iter().filter(|s| s.name == name).collect()
}

#[test]
fn appends_commands_projectors_runner_batches_and_rebuilds_have_spans() {
    for db in TestDatabase::all() {
        let store = db.store();
        let capture = Capture::default();
        let backend = db.backend();

        // A plain append to two streams.
        let spans = capture.during(|| {
            let mut a = StreamWrite::new("account-1", ExpectedVersion::NoStream);
            a.push(&Opened { id: 1 }).unwrap();
            a.push(&Deposited { id: 1, amount: 5 }).unwrap();
            let mut b = StreamWrite::new("account-2", ExpectedVersion::NoStream);
            b.push(&Opened { id: 2 }).unwrap();
            store.append_streams(&[b, a]).unwrap();
        });
        let append = named(&spans, "es.append");
        assert_eq!(append.len(), 1, "{backend:?}: {spans:?}");
        let append = append[0];
        assert_eq!(append.field("stream"), Some("account-2,account-1"));
        assert_eq!(append.int("streams"), 2);
        assert_eq!(append.int("events"), 3);
        assert_eq!(append.int("first_position"), 1);
        assert_eq!(append.int("last_position"), 3);
        assert_eq!(append.field("outcome"), Some("appended"));
        assert!(append.int("duration_us") >= 0);
        // The inline projector, once per event, inside the append.
        let projected = named(&spans, "es.projector");
        assert_eq!(projected.len(), 3, "{backend:?}: {spans:?}");
        let positions: Vec<i64> = projected.iter().map(|s| s.int("position")).collect();
        assert_eq!(positions, [1, 2, 3]);
        assert!(projected.iter().all(|s| s.parent == Some("es.append")
            && s.field("projector")
                .is_some_and(|p| p.ends_with("::balance"))));
        assert_eq!(projected[1].field("event_type"), Some("Deposited"));
        assert_eq!(projected[1].field("stream"), Some("account-1"));

        // A stale expectation: a conflict.
        let spans = capture.during(|| {
            let mut w = StreamWrite::new("account-1", ExpectedVersion::Exact(1));
            w.push(&Deposited { id: 1, amount: 1 }).unwrap();
            assert!(store.append_streams(&[w]).is_err());
        });
        let append = named(&spans, "es.append");
        assert!(!append.is_empty(), "{backend:?}: {spans:?}");
        assert!(append
            .iter()
            .all(|s| s.field("outcome") == Some("conflict")));
        assert!(append[0].field("first_position").is_none());

        // A command: appended, then refused.
        let spans = capture.during(|| {
            store
                .execute::<Account>("1", AccountCommand::Deposit(7))
                .unwrap();
            let refused = store.execute::<Account>("9", AccountCommand::Deposit(7));
            assert!(matches!(refused, Err(ExecuteError::Domain(NotOpen))));
        });
        let execute = named(&spans, "es.execute");
        assert_eq!(execute.len(), 2, "{backend:?}: {spans:?}");
        assert_eq!(execute[0].field("aggregate"), Some("account"));
        assert_eq!(execute[0].field("stream"), Some("account-1"));
        assert_eq!(execute[0].field("outcome"), Some("appended"));
        assert_eq!(execute[0].int("attempts"), 1);
        assert_eq!(execute[0].int("events"), 1);
        assert_eq!(execute[0].int("version"), 3);
        assert_eq!(execute[1].field("stream"), Some("account-9"));
        assert_eq!(execute[1].field("outcome"), Some("refused"));
        assert!(execute[1].field("events").is_none());
        let append = named(&spans, "es.append");
        assert_eq!(append.len(), 1);
        assert_eq!(append[0].parent, Some("es.execute"));
        assert_eq!(append[0].int("first_position"), 4);

        // A command that loses a race: the decision runs outside a
        // transaction (on SQLite the retry takes the write lock first).
        if backend != Backend::Mysql {
            *MEDDLER.lock().unwrap() = Some(store.clone());
            let spans = capture.during(|| {
                let done = store
                    .execute::<Account>("2", AccountCommand::Deposit(3))
                    .unwrap();
                assert_eq!(done.attempts, 2);
            });
            let execute = named(&spans, "es.execute");
            assert_eq!(execute.len(), 1, "{spans:?}");
            assert_eq!(execute[0].int("attempts"), 2);
            assert_eq!(execute[0].field("outcome"), Some("appended"));
            let outcomes: Vec<_> = named(&spans, "es.append")
                .iter()
                .filter(|s| s.parent == Some("es.execute"))
                .map(|s| s.field("outcome").unwrap().to_owned())
                .collect();
            // The meddler's append, the lost race, the retry.
            assert_eq!(outcomes, ["appended", "conflict", "appended"]);
        }
        let head = store.head().unwrap();

        // A runner batch, with the lag after it.
        let projection = async_read_models()
            .unwrap()
            .into_iter()
            .find(|p| p.name() == "traced_balances_async")
            .unwrap();
        let mut runner = store.runner(projection);
        let spans = capture.during(|| {
            assert_eq!(runner.step().unwrap(), Step::Applied(head as usize));
        });
        let batch = named(&spans, "es.runner.batch");
        assert_eq!(batch.len(), 1, "{backend:?}: {spans:?}");
        let batch = batch[0];
        assert_eq!(batch.field("projection"), Some("traced_balances_async"));
        assert_eq!(batch.int("from_position"), 0);
        assert_eq!(batch.int("to_position"), head);
        assert_eq!(batch.int("events"), head);
        assert_eq!(batch.int("lag"), 0);
        assert!(batch.int("duration_us") >= 0);
        let applied = named(&spans, "es.projector");
        assert_eq!(applied.len(), head as usize);
        assert!(applied.iter().all(|s| s.parent == Some("es.runner.batch")
            && s.field("projector")
                .is_some_and(|p| p.ends_with("::balance_async"))));
        let lag_events: Vec<_> = capture
            .events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.get("projection").map(String::as_str) == Some("traced_balances_async"))
            .filter_map(|e| e.get("lag").cloned())
            .collect();
        assert_eq!(lag_events, ["0"], "{backend:?}");
        assert_eq!(
            store
                .projection_lag()
                .unwrap()
                .into_iter()
                .find(|(name, _)| name == "traced_balances_async"),
            Some(("traced_balances_async".to_owned(), 0))
        );

        // An append the runner has not seen yet is lag; its next batch reports it.
        store
            .append(
                "account-2",
                ExpectedVersion::Any,
                [Deposited { id: 2, amount: 1 }],
            )
            .unwrap();
        assert!(store
            .projection_lag()
            .unwrap()
            .contains(&("traced_balances_async".to_owned(), 1)));
        let spans = capture.during(|| {
            assert_eq!(runner.step().unwrap(), Step::Applied(1));
        });
        let batch = named(&spans, "es.runner.batch");
        assert_eq!(batch[0].int("from_position"), head);
        assert_eq!(batch[0].int("to_position"), head + 1);
        // An idle poll opens no batch span.
        let spans = capture.during(|| {
            assert_eq!(runner.step().unwrap(), Step::Applied(0));
        });
        assert!(named(&spans, "es.runner.batch").is_empty(), "{spans:?}");
        drop(runner);

        // A rebuild.
        let spans = capture.during(|| {
            store.rebuild("traced_balances").unwrap();
        });
        let rebuild = named(&spans, "es.rebuild");
        assert_eq!(rebuild.len(), 1, "{backend:?}: {spans:?}");
        let rebuild = rebuild[0];
        assert_eq!(rebuild.field("read_model"), Some("traced_balances"));
        assert_eq!(rebuild.int("head"), head + 1);
        assert_eq!(rebuild.int("events"), head + 1);
        assert_eq!(rebuild.int("rows"), 2);
        assert_eq!(rebuild.field("outcome"), Some("rebuilt"));
        assert!(rebuild.int("duration_us") >= 0);
        let progress = capture
            .events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.get("message").map(String::as_str) == Some("rebuild progress"))
            .count();
        assert!(progress >= 1, "{backend:?}");
    }
}
