//! A writer into memory that a test reads: what the store traces on a
//! thread, or what a command prints on another.

// Each test binary that includes this uses part of it.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};

/// A writer into a shared buffer (for `tracing`, or any `io::Write`).
#[derive(Clone, Default)]
pub struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    /// A subscriber at the DEBUG level writing here, spans' closes (with
    /// their fields) included.
    pub fn subscriber(&self) -> impl tracing::Subscriber + Send + Sync + 'static {
        let kept = self.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
            .with_writer(move || kept.clone())
            .finish()
    }

    /// Runs `f` with the traces of this thread kept here.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> T {
        tracing::subscriber::with_default(self.subscriber(), f)
    }

    /// Everything traced so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}
