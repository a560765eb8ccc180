//! The live tail: server-sent events, one per new event, each a table row
//! rendered (and escaped) by the server.
//!
//! It follows the log with [`es_diesel::follow::read_after`], not by
//! position: on PostgreSQL an event may commit after one with a higher
//! position, and a tail by position would skip it. It starts at the
//! follow horizon and leaves out the events already committed then, so
//! each new event is sent once.

use crate::db::{self, Ev};
use crate::html::{self, Ctx};
use crate::{base, St};
use axum::extract::{OriginalUri, State};
use axum::http::Uri;
use axum::response::sse::{Event, KeepAlive, Sse};
use es_diesel::follow::{read_after, Checkpoint};
use es_diesel::{Backend, EventStore};
use futures_util::stream::Stream;
use std::collections::{HashSet, VecDeque};
use std::convert::Infallible;
use std::time::Duration;

/// Events per read.
const PAGE: usize = 200;

/// Where following starts, and the events after it already committed.
fn start(store: &EventStore) -> es_diesel::Result<(Checkpoint, HashSet<i64>)> {
    let mut conn = store.connection()?;
    if conn.backend() != Backend::Postgres {
        // Positions become visible in order.
        let head = db::head(&mut conn)?;
        return Ok((
            Checkpoint {
                order_key: 0,
                position: head,
            },
            HashSet::new(),
        ));
    }
    let horizon = loop {
        // NULL while an append is between announcing itself and drawing
        // its key: a moment.
        if let Some(h) = db::follow_horizon(&mut conn)? {
            break h;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let shown = db::positions_from_key(&mut conn, horizon)?
        .into_iter()
        .collect();
    Ok((
        Checkpoint {
            order_key: horizon - 1,
            position: i64::MAX,
        },
        shown,
    ))
}

struct Follower {
    shared: St,
    base: String,
    at: Option<(Checkpoint, HashSet<i64>)>,
    ready: VecDeque<String>,
    first: bool,
}

impl Follower {
    /// The next row to send, waiting for one as long as it takes.
    async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(row) = self.ready.pop_front() {
                return Some(row);
            }
            if !self.first {
                tokio::time::sleep(self.shared.options.tail_poll).await;
            }
            self.first = false;
            let at = self.at.take();
            let result = self
                .shared
                .store
                .run(move |store| -> es_diesel::Result<_> {
                    let (mut checkpoint, mut shown) = match at {
                        Some(at) => at,
                        None => start(store)?,
                    };
                    let mut conn = store.connection()?;
                    let page = read_after(&mut conn, checkpoint, None, PAGE)?;
                    let mut new = Vec::new();
                    for f in page {
                        checkpoint = f.checkpoint;
                        if !shown.remove(&f.event.global_position) {
                            new.push(Ev::from(&f.event));
                        }
                    }
                    Ok((checkpoint, shown, new))
                })
                .await;
            match result {
                Ok((checkpoint, shown, new)) => {
                    self.at = Some((checkpoint, shown));
                    let ctx = Ctx {
                        base: &self.base,
                        title: &self.shared.options.title,
                        read_only: self.shared.options.read_only,
                        csrf: &self.shared.csrf,
                    };
                    self.ready
                        .extend(new.iter().map(|e| html::event_row(&ctx, e).into_string()));
                }
                Err(e) => {
                    // The browser reconnects; the next connection starts afresh.
                    tracing::warn!(error = %e, "event browser: the live tail failed");
                    return None;
                }
            }
        }
    }
}

pub(crate) async fn events(
    State(shared): State<St>,
    OriginalUri(original): OriginalUri,
    uri: Uri,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let follower = Follower {
        shared,
        base: base(&original, &uri),
        at: None,
        ready: VecDeque::new(),
        first: true,
    };
    let stream = futures_util::stream::unfold(follower, |mut f| async move {
        let row = f.next().await?;
        Some((Ok(Event::default().event("event").data(row)), f))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
