//! Tags of events stored before their type declared them (or before the
//! declaration changed): `migrate` computes them from the stored payloads,
//! so that queries across streams find old events as they find new ones.

use crate::backend::{cached_shape, Bind, DbConnection, Stmt};
use crate::error::{Error, Result};
use diesel::sql_types::{BigInt, SmallInt, Text};
use diesel::QueryableByName;
use es_core::{registered_event_types, EventRegistration};

/// Events decoded per page while tagging.
const PAGE: i64 = 1_000;

#[derive(QueryableByName)]
struct Declared {
    #[diesel(sql_type = Text)]
    event_type: String,
    #[diesel(sql_type = Text)]
    spec: String,
}

fn declared(conn: &mut DbConnection) -> Result<Vec<Declared>> {
    Ok(Stmt::new("SELECT event_type, spec FROM es_tag_declarations").load::<Declared>(conn)?)
}

/// Event types whose stored tags were computed with another declaration
/// than this program's (or never, for a type that now declares tags).
fn outdated(conn: &mut DbConnection) -> Result<Vec<&'static EventRegistration>> {
    let stored = declared(conn)?;
    Ok(registered_event_types()
        .into_iter()
        .filter(|r| !r.copy)
        .filter(|r| match stored.iter().find(|d| d.event_type == r.name) {
            Some(d) => d.spec != r.tag_spec,
            None => !r.tag_spec.is_empty(),
        })
        .collect())
}

/// What `migrate` would re-tag (for `check_migrated`).
pub(crate) fn missing(conn: &mut DbConnection) -> Result<Vec<String>> {
    Ok(outdated(conn)?
        .into_iter()
        .map(|r| {
            format!(
                "the tags of `{}` events (declared: {:?})",
                r.name, r.tag_spec
            )
        })
        .collect())
}

/// Re-tags the stored events of every type whose declaration changed, in
/// the migration transaction. Writers appending meanwhile tag their own
/// events; rows both write are kept once.
pub(crate) fn sync_tags(conn: &mut DbConnection) -> Result<()> {
    for reg in outdated(conn)? {
        let tagged = retag(conn, reg)?;
        Stmt::new("DELETE FROM es_tag_declarations WHERE event_type = ?")
            .bind(Bind::Text(reg.name))
            .execute(conn)?;
        Stmt::new("INSERT INTO es_tag_declarations (event_type, spec) VALUES (?, ?)")
            .bind(Bind::Text(reg.name))
            .bind(Bind::Text(reg.tag_spec))
            .execute(conn)?;
        tracing::info!(event_type = reg.name, tagged, "tagged stored events");
    }
    Ok(())
}

/// Replaces the tag rows of `reg`'s events with the ones its declaration
/// gives. Returns how many events were read.
fn retag(conn: &mut DbConnection, reg: &EventRegistration) -> Result<u64> {
    Stmt::new("DELETE FROM es_event_tags WHERE event_type = ?")
        .bind(Bind::Text(reg.name))
        .execute(conn)?;
    let Some(tags_of) = reg.tags else {
        return Ok(0);
    };
    let d = conn.dialect();
    let sql = format!(
        "SELECT global_position, event_version, {} AS payload, stream_id FROM es_events \
         WHERE event_type = ? AND global_position > ? ORDER BY global_position {}",
        d.as_text("payload"),
        d.limit()
    );
    let (insert, ignore) = d.insert_ignore();
    let mut after = 0;
    let mut read = 0u64;
    loop {
        let page: Vec<(i64, i16, String, String)> = Stmt::new(sql.as_str())
            .rows::<(BigInt, SmallInt, Text, Text)>()
            .bind(Bind::Text(reg.name))
            .bind(Bind::BigInt(after))
            .bind(Bind::BigInt(PAGE))
            .load(conn)?;
        let Some(last) = page.last() else {
            return Ok(read);
        };
        after = last.0;
        read += page.len() as u64;
        let mut rows: Vec<(String, i64)> = Vec::new();
        for (position, version, payload, stream) in page {
            let version = u16::try_from(version).unwrap_or(0);
            let tags = tags_of(version, &payload).map_err(|source| Error::Decode {
                position,
                stream,
                event_type: reg.name.to_owned(),
                event_version: version,
                source,
            })?;
            let mut tags = tags;
            tags.sort_unstable();
            tags.dedup();
            for tag in tags {
                es_core::validate_tag(&tag).map_err(|e| Error::Malformed {
                    position,
                    reason: format!(
                        "the tags `{}` now declares cannot be stored for it ({e}); nothing was \
                         re-tagged: change the declaration so that every stored event gets valid \
                         tags (e.g. `tags = ..` with a function that shortens or hashes the value)",
                        reg.name
                    ),
                })?;
                rows.push((tag, position));
            }
        }
        for chunk in rows.chunks(300) {
            let marks = vec!["(?, ?, ?)"; chunk.len()].join(", ");
            let mut q = Stmt::new(format!(
                "{insert} INTO es_event_tags (tag, global_position, event_type) VALUES {marks}{ignore}"
            ));
            if !cached_shape(chunk.len()) {
                q.dont_cache();
            }
            for (tag, position) in chunk {
                q.push(Bind::Text(tag));
                q.push(Bind::BigInt(*position));
                q.push(Bind::Text(reg.name));
            }
            q.execute(conn)?;
        }
    }
}
