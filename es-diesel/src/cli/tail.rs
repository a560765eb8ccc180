//! `tail`: the last events of the log, then, optionally, every event
//! committed later, each once, whatever the order of their commits.

use super::event_line;
use crate::backend::rows::Number;
use crate::backend::{read_only_snapshot, Bind, DbConnection, Stmt};
use crate::follow::{read_after, Checkpoint};
use crate::{read, EventStore, Result};
use es_core::RecordedEvent;
use std::collections::HashSet;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Events per query of `tail`.
const TAIL_PAGE: usize = 500;

/// Prints the last `count` events of the log; with `follow`, then keeps
/// printing new events until the flag is set.
///
/// Following goes through [`read_after`], not [`EventStore::read_all`]: on
/// PostgreSQL an event may commit after one with a higher position, and a
/// position-based tail would skip it. Each event is printed once.
/// Stops, quietly, when `out` can no longer be written (its reader went
/// away). `json`: one JSON object per line.
pub fn tail(
    store: &EventStore,
    count: usize,
    json: bool,
    follow: Option<&AtomicBool>,
    out: &mut dyn Write,
) -> Result<()> {
    let mut conn = store.connection()?;
    let print =
        |out: &mut dyn Write, e: &RecordedEvent| writeln!(out, "{}", event_line(e, json)).is_ok();
    let Some(stop) = follow else {
        for e in last_events(&mut conn, count)? {
            if !print(out, &e) {
                break;
            }
        }
        return Ok(());
    };
    let TailStart {
        events,
        mut checkpoint,
        mut shown,
    } = tail_start(&mut conn, count)?;
    for e in &events {
        if !print(out, e) {
            return Ok(());
        }
    }
    while !stop.load(Ordering::Relaxed) {
        let page = read_after(&mut conn, checkpoint, None, TAIL_PAGE)?;
        for f in &page {
            checkpoint = f.checkpoint;
            if !shown.remove(&f.event.global_position) && !print(out, &f.event) {
                return Ok(());
            }
        }
        if out.flush().is_err() {
            return Ok(());
        }
        if page.len() < TAIL_PAGE {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(())
}

/// The last `count` events of the log, by position.
fn last_events(conn: &mut DbConnection, count: usize) -> Result<Vec<RecordedEvent>> {
    let mut after = (read::head(conn)? - i64::try_from(count).unwrap_or(i64::MAX)).max(0);
    let mut events = Vec::new();
    loop {
        let page = read::read_all(conn, after, TAIL_PAGE)?;
        let full = page.len() == TAIL_PAGE;
        after = page.last().map_or(after, |e| e.global_position);
        events.extend(page);
        if !full {
            return Ok(events);
        }
    }
}

struct TailStart {
    /// The last events, by position.
    events: Vec<RecordedEvent>,
    /// Where following starts.
    checkpoint: Checkpoint,
    /// Events after `checkpoint` that were committed already, so are not new.
    shown: HashSet<i64>,
}

/// The last `count` events, and where a follower must start so that it
/// returns every event committed later, whatever its position.
///
/// With a follow horizon `h` (PostgreSQL): every event that is not visible
/// to a later snapshot has an order key of at least `h`. Then, in one such
/// snapshot, the last events and the events with a key of at least `h` that
/// are visible already. The follower starts just below `h` and skips those.
fn tail_start(conn: &mut DbConnection, count: usize) -> Result<TailStart> {
    let Some(horizon) = conn.dialect().settled_horizon(conn)? else {
        // Positions become visible in order.
        let events = last_events(conn, count)?;
        let position = events
            .last()
            .map_or(read::head(conn)?, |e| e.global_position);
        return Ok(TailStart {
            events,
            checkpoint: Checkpoint {
                order_key: 0,
                position,
            },
            shown: HashSet::new(),
        });
    };
    read_only_snapshot(conn, |conn| {
        let shown = Stmt::new("SELECT global_position AS n FROM es_events WHERE order_key >= ?")
            .bind(Bind::BigInt(horizon))
            .load::<Number>(conn)?
            .into_iter()
            .map(|r| r.n)
            .collect();
        Ok(TailStart {
            events: last_events(conn, count)?,
            checkpoint: Checkpoint {
                order_key: horizon - 1,
                position: i64::MAX,
            },
            shown,
        })
    })
}
