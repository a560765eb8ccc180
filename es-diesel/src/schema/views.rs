//! The typed event views registered by `#[derive(Event)]`: one SQL view
//! per event type and version over `es_events`, with a typed column per
//! field.

use crate::backend::{quote_ident, quote_literal, DbConnection};
use crate::error::Result;
use diesel::connection::SimpleConnection;
use es_core::view::EventView;

/// Creates (or replaces) the view.
pub(crate) fn create_view(conn: &mut DbConnection, view: &EventView) -> Result<()> {
    let d = conn.dialect();
    let mut cols = vec![
        "e.global_position AS global_position".to_owned(),
        "e.stream_id AS stream_id".to_owned(),
        "e.stream_version AS stream_version".to_owned(),
        format!("{} AS created_at", d.utc_timestamp("e.created_at")),
    ];
    for c in view.columns {
        let expr = d.json_field("e.payload", c.json_key, c.ty);
        cols.push(format!("{expr} AS {}", quote_ident(c.name)));
    }
    let name = quote_ident(view.name);
    // Rows of other versions may lack a field or hold it in another type,
    // which would make every query on the view fail.
    let sql = format!(
        "DROP VIEW IF EXISTS {name}; CREATE VIEW {name} AS SELECT {} FROM es_events e \
         WHERE e.event_type = {} AND e.event_version = {}",
        cols.join(", "),
        quote_literal(view.event_type),
        view.event_version
    );
    conn.batch_execute(&sql)?;
    Ok(())
}
