//! The demo's progress on stderr: one numbered line per step (`[3/16] ...`), and notes under
//! them.

use std::fmt::Display;
use std::io::{self, Write};

use freeflow_proto::report::Progress;

/// One numbered line per step on stderr.
pub(super) struct Steps {
    done: usize,
    total: usize,
}

impl Steps {
    /// No step done yet, `total` expected.
    pub(super) fn new(total: usize) -> Steps {
        Steps { done: 0, total }
    }

    pub(super) fn step(&mut self, what: impl Display) {
        self.done += 1;
        // A step count that grows past the estimate (a changed freeflow-bench) stays readable.
        self.total = self.total.max(self.done);
        let _ = writeln!(io::stderr(), "[{}/{}] {what}", self.done, self.total);
    }

    pub(super) fn note(&self, what: impl Display) {
        let _ = writeln!(io::stderr(), "      {what}");
    }

    /// A line freeflow-bench wrote to stderr that is not one of our steps: a note, as text. Its
    /// own error line (`freeflow-bench: ...`) is left out: it is reported with its exit status.
    pub(super) fn bench_note(&self, line: &str) {
        if line.starts_with("freeflow-bench: ") {
            return;
        }
        match Progress::from_line(line) {
            Some(event) => self.note(event),
            None => self.note(line),
        }
    }
}
