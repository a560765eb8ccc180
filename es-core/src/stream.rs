/// Why a stream id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamIdError {
    /// The empty string names no stream.
    #[error("stream id is empty: name the stream, e.g. \"book-42\"")]
    Empty,
    /// Databases cannot store the NUL character in text columns.
    #[error("stream id contains a NUL character (\\0) at byte {0}; no database text column can store it")]
    Nul(usize),
}

/// Checks that `stream_id` can name a stream: not empty, no NUL character.
/// Any other text (quotes, unicode, kilobytes of it) is stored verbatim.
pub fn validate_stream_id(stream_id: &str) -> Result<(), StreamIdError> {
    if stream_id.is_empty() {
        return Err(StreamIdError::Empty);
    }
    if let Some(at) = stream_id.bytes().position(|b| b == 0) {
        return Err(StreamIdError::Nul(at));
    }
    Ok(())
}
