//! The read models' actions: a rebuild runs in the background (the POST
//! returns at once, the page shows its progress); a retry runs one batch of
//! a failed asynchronous read model here and now.

use chrono::{DateTime, Utc};
use es_diesel::runner::{async_read_models, Step};
use es_diesel::{AsyncEventStore, Error, RebuildOptions};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The last action on a read model from this process.
#[derive(Clone, Debug)]
pub(crate) enum Action {
    Rebuilding {
        events: u64,
        position: i64,
        head: i64,
    },
    Rebuilt {
        events: u64,
        rows: i64,
        millis: u128,
        pending: u64,
        at: DateTime<Utc>,
    },
    Failed {
        what: &'static str,
        error: String,
        at: DateTime<Utc>,
    },
    Retried {
        message: String,
        at: DateTime<Utc>,
    },
}

#[derive(Clone, Default)]
pub(crate) struct Actions(Arc<Mutex<HashMap<String, Action>>>);

impl Actions {
    pub(crate) fn get(&self, name: &str) -> Option<Action> {
        self.lock().get(name).cloned()
    }

    fn set(&self, name: &str, action: Action) {
        self.lock().insert(name.to_owned(), action);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Action>> {
        // A panic while holding it leaves a map that is still whole.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts rebuilding `name` unless this process is already at it.
    /// Whether it started.
    pub(crate) fn start_rebuild(&self, store: &AsyncEventStore, name: String) -> bool {
        {
            let mut map = self.lock();
            if matches!(map.get(&name), Some(Action::Rebuilding { .. })) {
                return false;
            }
            map.insert(
                name.clone(),
                Action::Rebuilding {
                    events: 0,
                    position: 0,
                    head: 0,
                },
            );
        }
        let actions = self.clone();
        let store = store.clone();
        tokio::spawn(async move {
            let progress = actions.clone();
            let target = name.clone();
            let result = store
                .run(move |s| {
                    s.rebuild_with(&target, &RebuildOptions::default(), |p| {
                        progress.set(
                            &target,
                            Action::Rebuilding {
                                events: p.events,
                                position: p.position,
                                head: p.head,
                            },
                        )
                    })
                })
                .await;
            let at = Utc::now();
            let action = match result {
                Ok(r) => Action::Rebuilt {
                    events: r.events,
                    rows: r.rows,
                    millis: r.elapsed.as_millis(),
                    pending: r.pending,
                    at,
                },
                Err(e) => Action::Failed {
                    what: "rebuild",
                    error: e.to_string(),
                    at,
                },
            };
            tracing::info!(read_model = %name, ?action, "event browser: rebuild finished");
            actions.set(&name, action);
        });
        true
    }

    /// One batch of `name`'s runner, here: it resumes from the failing
    /// event if its cause is gone. A projection another runner holds is
    /// left to it (it retries by itself, with backoff).
    pub(crate) async fn retry(&self, store: &AsyncEventStore, name: String) {
        let target = name.clone();
        let result = store
            .run(move |s| -> Result<String, Error> {
                let Some(projection) = async_read_models()?
                    .into_iter()
                    .find(|p| p.name() == target)
                else {
                    return Ok(format!("{target} is not an asynchronous read model"));
                };
                let mut runner = s.runner(projection);
                Ok(match runner.step()? {
                    Step::Applied(n) => format!("applied {n} events"),
                    Step::Standby => {
                        "another runner holds it and retries by itself, with backoff".to_owned()
                    }
                    Step::Failed { position } => {
                        format!("it still fails at position {position}")
                    }
                })
                // Dropping the runner releases the lease.
            })
            .await;
        let at = Utc::now();
        self.set(
            &name,
            match result {
                Ok(message) => Action::Retried { message, at },
                Err(e) => Action::Failed {
                    what: "retry",
                    error: e.to_string(),
                    at,
                },
            },
        );
    }
}
