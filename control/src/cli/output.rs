//! How the commands print: results on stdout (`out!`, aligned tables), warnings on stderr.
//! Writes ignore errors, so a closed pipe (`freeflow status | head`) is not a failure.

use std::io::{self, Write};

/// Prints to stdout, ignoring a closed pipe (`freeflow status | head`).
macro_rules! out {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        let _ = writeln!(::std::io::stdout(), $($arg)*);
    }};
}

/// `freeflow: warning: MESSAGE` on stderr.
pub(super) fn warn(message: impl std::fmt::Display) {
    let _ = writeln!(io::stderr(), "freeflow: warning: {message}");
}

/// Prints `header` and then `rows` as columns two spaces apart, each line after `indent`; the
/// last column is not padded.
pub(super) fn print_table(
    header: &[&str],
    rows: impl IntoIterator<Item = Vec<String>>,
    indent: &str,
) {
    let header = header.iter().map(|&h| h.to_owned()).collect();
    let rows: Vec<Vec<String>> = std::iter::once(header).chain(rows).collect();
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in &rows {
        let mut line = String::from(indent);
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = widths[c]));
            }
        }
        out!("{}", line.trim_end());
    }
}
