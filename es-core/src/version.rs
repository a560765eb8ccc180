use std::fmt;

/// What the writer believes about a stream's current version when appending.
///
/// Versions start at 1 for a stream's first event; a stream that does not
/// exist is at version 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExpectedVersion {
    /// Append whatever the stream's version is.
    Any,
    /// The stream must not exist yet.
    NoStream,
    /// The stream must have at least one event.
    StreamExists,
    /// The stream's last event must have exactly this version (0 = no stream).
    Exact(i64),
}

impl ExpectedVersion {
    /// Does a stream at `actual` (0 = no stream) satisfy this expectation?
    pub fn is_satisfied_by(self, actual: i64) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => actual == 0,
            ExpectedVersion::StreamExists => actual > 0,
            ExpectedVersion::Exact(v) => actual == v,
        }
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any version"),
            ExpectedVersion::NoStream => f.write_str("no stream"),
            ExpectedVersion::StreamExists => f.write_str("an existing stream"),
            ExpectedVersion::Exact(v) => write!(f, "version {v}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ExpectedVersion::*;

    #[test]
    fn expectations() {
        assert!(Any.is_satisfied_by(0) && Any.is_satisfied_by(7));
        assert!(NoStream.is_satisfied_by(0) && !NoStream.is_satisfied_by(1));
        assert!(!StreamExists.is_satisfied_by(0) && StreamExists.is_satisfied_by(3));
        assert!(Exact(3).is_satisfied_by(3) && !Exact(3).is_satisfied_by(4));
        assert!(Exact(0).is_satisfied_by(0));
    }
}
