//! A small HTTP/1.1 client for the Docker engine API over its Unix socket: `GET` with a
//! `Content-Length` or chunked body, and a chunked body read as a stream of lines (`/events`).
//!
//! The engine is trusted no more than a container: every read has a timeout (the event
//! stream's wait for the next event returns [`Next::Quiet`] after the caller's period), header and body
//! sizes are capped, and anything malformed is an [`HttpError`], never a panic or a hang.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Longest status line or header line accepted.
const MAX_HEADER_LINE: usize = 8 * 1024;
/// Most header lines accepted in one response.
const MAX_HEADERS: usize = 100;
/// Largest response body accepted (a container list of a busy host fits easily).
pub const MAX_BODY: usize = 16 * 1024 * 1024;
/// Longest line of an event stream (one event, JSON).
pub const MAX_EVENT_LINE: usize = 1024 * 1024;
/// How long one read or write may take on a request/response exchange.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// What can go wrong talking to the engine.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The socket could not be reached or a read/write failed (also a timeout).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The engine's answer is not HTTP/1.1 as expected.
    #[error("malformed HTTP response from the engine: {0}")]
    Malformed(String),
    /// The engine answered with an error status.
    #[error("the engine answered {status} to {path}: {body}")]
    Status {
        /// The request path.
        path: String,
        /// HTTP status code.
        status: u16,
        /// The start of the body (the engine's error message).
        body: String,
    },
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> HttpError {
    move |source| HttpError::Io { what, source }
}

/// How a response body is delimited.
enum Framing {
    Length(usize),
    Chunked,
    /// Until the engine closes (we send `Connection: close`).
    Close,
}

/// What [`Response::next_line`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// A line, without its newline.
    Line(Vec<u8>),
    /// The body ended.
    End,
    /// Nothing arrived for the quiet period.
    Quiet,
}

/// Asks the engine whether it is alive (`GET /_ping`), each read and write bounded by
/// `io_limit`: an engine that was stopped (SIGSTOP, a hung process) still accepts connections
/// on its socket, but does not answer.
pub fn ping(socket: &Path, io_limit: Duration) -> Result<(), HttpError> {
    get_within(socket, "/_ping", io_limit)?
        .read_body()
        .map(drop)
}

/// An open response whose body is still to be read.
pub struct Response {
    reader: BufReader<UnixStream>,
    framing: Framing,
    /// Bytes left in the current chunk (chunked framing).
    chunk_left: usize,
    /// The last chunk was read.
    done: bool,
}

/// Sends `GET path` to the engine at `socket` and reads the status line and headers; fails on
/// a status other than 2xx (with the engine's message).
pub fn get(socket: &Path, path: &str) -> Result<Response, HttpError> {
    get_within(socket, path, IO_TIMEOUT)
}

/// [`get`], each read and write of the exchange bounded by `io_limit`.
fn get_within(socket: &Path, path: &str, io_limit: Duration) -> Result<Response, HttpError> {
    let stream = UnixStream::connect(socket).map_err(io_err("cannot connect to the engine"))?;
    stream
        .set_read_timeout(Some(io_limit))
        .and_then(|()| stream.set_write_timeout(Some(io_limit)))
        .map_err(io_err("cannot set socket timeouts"))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: docker\r\nUser-Agent: freeflow\r\nConnection: close\r\n\r\n"
    );
    (&stream)
        .write_all(request.as_bytes())
        .map_err(io_err("cannot send the request"))?;
    let mut reader = BufReader::new(stream);
    let status_line = read_line(&mut reader, MAX_HEADER_LINE)?
        .ok_or_else(|| HttpError::Malformed("connection closed before the status line".into()))?;
    let status = parse_status(&status_line)?;
    let mut framing = Framing::Close;
    for _ in 0..=MAX_HEADERS {
        let line = read_line(&mut reader, MAX_HEADER_LINE)?
            .ok_or_else(|| HttpError::Malformed("connection closed in the headers".into()))?;
        if line.is_empty() {
            let mut response = Response {
                reader,
                framing,
                chunk_left: 0,
                done: false,
            };
            if !(200..300).contains(&status) {
                let body = response.read_body().unwrap_or_default();
                let text = String::from_utf8_lossy(&body[..body.len().min(512)]);
                return Err(HttpError::Status {
                    path: path.to_owned(),
                    status,
                    body: text.trim().to_owned(),
                });
            }
            return Ok(response);
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(HttpError::Malformed(format!("header line {line:?}")));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n: usize = value
                .parse()
                .map_err(|_| HttpError::Malformed(format!("Content-Length {value:?}")))?;
            if !matches!(framing, Framing::Chunked) {
                framing = Framing::Length(n);
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if value.eq_ignore_ascii_case("chunked") {
                framing = Framing::Chunked;
            } else {
                return Err(HttpError::Malformed(format!(
                    "unsupported Transfer-Encoding {value:?}"
                )));
            }
        }
    }
    Err(HttpError::Malformed(format!(
        "more than {MAX_HEADERS} header lines"
    )))
}

impl Response {
    /// The whole body, at most [`MAX_BODY`] bytes.
    pub fn read_body(&mut self) -> Result<Vec<u8>, HttpError> {
        let mut body = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = self.read_some(&mut buf)?;
            if n == 0 {
                return Ok(body);
            }
            if body.len() + n > MAX_BODY {
                return Err(HttpError::Malformed(format!(
                    "body larger than {MAX_BODY} bytes"
                )));
            }
            body.extend_from_slice(&buf[..n]);
        }
    }

    /// Waits for the body to hold another line and returns it without its newline
    /// ([`Next::Line`]); [`Next::End`] at the end of the body; [`Next::Quiet`] when nothing
    /// arrived for `quiet` (an event stream is quiet while nothing happens: the caller then
    /// checks that the engine still answers, see [`ping`]). Only the wait for the first byte of
    /// more data is bounded by `quiet`, so a quiet stream is never cut inside a chunk; a read
    /// once data flows is bounded by [`IO_TIMEOUT`] (an engine that stops inside a chunk is an
    /// error). A line longer than [`MAX_EVENT_LINE`] is an error. `pending` keeps a partial
    /// line between calls.
    pub fn next_line(&mut self, pending: &mut Vec<u8>, quiet: Duration) -> Result<Next, HttpError> {
        let mut buf = [0u8; 16 * 1024];
        loop {
            if let Some(pos) = pending.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = pending.drain(..=pos).collect();
                line.pop();
                return Ok(Next::Line(line));
            }
            if pending.len() > MAX_EVENT_LINE {
                return Err(HttpError::Malformed(format!(
                    "event line longer than {MAX_EVENT_LINE} bytes"
                )));
            }
            if !self.done && self.reader.buffer().is_empty() && !self.readable_within(quiet)? {
                return Ok(Next::Quiet);
            }
            let n = self.read_some(&mut buf)?;
            if n == 0 {
                if pending.is_empty() {
                    return Ok(Next::End);
                }
                return Ok(Next::Line(std::mem::take(pending)));
            }
            pending.extend_from_slice(&buf[..n]);
        }
    }

    /// Whether the engine's socket becomes readable (data, or its end) within `limit`.
    fn readable_within(&self, limit: Duration) -> Result<bool, HttpError> {
        let fd = self.reader.get_ref().as_fd();
        let ready = freeflow_os::poll::poll_readable(&[fd], limit)
            .map_err(io_err("cannot wait for the event stream"))?;
        Ok(ready.first().copied().unwrap_or(false))
    }

    /// Reads body bytes into `buf`, undoing the framing; 0 at the end of the body.
    fn read_some(&mut self, buf: &mut [u8]) -> Result<usize, HttpError> {
        if self.done {
            return Ok(0);
        }
        match self.framing {
            Framing::Length(ref mut left) => {
                if *left == 0 {
                    self.done = true;
                    return Ok(0);
                }
                let want = buf.len().min(*left);
                let n = self
                    .reader
                    .read(&mut buf[..want])
                    .map_err(io_err("cannot read the response body"))?;
                if n == 0 {
                    return Err(HttpError::Malformed(
                        "connection closed before the end of the body".into(),
                    ));
                }
                *left -= n;
                Ok(n)
            }
            Framing::Close => {
                let n = self
                    .reader
                    .read(buf)
                    .map_err(io_err("cannot read the response body"))?;
                if n == 0 {
                    self.done = true;
                }
                Ok(n)
            }
            Framing::Chunked => {
                if self.chunk_left == 0 {
                    let size_line =
                        read_line(&mut self.reader, MAX_HEADER_LINE)?.ok_or_else(|| {
                            HttpError::Malformed("connection closed before a chunk".into())
                        })?;
                    let digits = size_line.split(';').next().unwrap_or("").trim();
                    let size = usize::from_str_radix(digits, 16).map_err(|_| {
                        HttpError::Malformed(format!("chunk size line {size_line:?}"))
                    })?;
                    if size == 0 {
                        // Trailers, if any, end with an empty line; we stop reading here.
                        self.done = true;
                        return Ok(0);
                    }
                    self.chunk_left = size;
                }
                let want = buf.len().min(self.chunk_left);
                let n = self
                    .reader
                    .read(&mut buf[..want])
                    .map_err(io_err("cannot read a chunk"))?;
                if n == 0 {
                    return Err(HttpError::Malformed(
                        "connection closed inside a chunk".into(),
                    ));
                }
                self.chunk_left -= n;
                if self.chunk_left == 0 {
                    let end = read_line(&mut self.reader, 2)?;
                    if end.as_deref() != Some("") {
                        return Err(HttpError::Malformed("chunk not followed by CRLF".into()));
                    }
                }
                Ok(n)
            }
        }
    }
}

/// One CRLF- (or LF-) terminated line of at most `max` bytes, without its terminator; `None`
/// if the connection closed before any byte.
fn read_line(reader: &mut impl BufRead, max: usize) -> Result<Option<String>, HttpError> {
    let mut line = Vec::new();
    let limit = u64::try_from(max).unwrap_or(u64::MAX) + 2;
    let n = reader
        .by_ref()
        .take(limit)
        .read_until(b'\n', &mut line)
        .map_err(io_err("cannot read from the engine"))?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        return Err(HttpError::Malformed(if n as u64 >= limit {
            format!("a line longer than {max} bytes")
        } else {
            "connection closed inside a line".into()
        }));
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line)
        .map(Some)
        .map_err(|_| HttpError::Malformed("a header line that is not UTF-8".into()))
}

/// The status code of `HTTP/1.x NNN reason`.
fn parse_status(line: &str) -> Result<u16, HttpError> {
    let mut parts = line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    let code = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") || code.len() != 3 {
        return Err(HttpError::Malformed(format!("status line {line:?}")));
    }
    code.parse()
        .map_err(|_| HttpError::Malformed(format!("status line {line:?}")))
}

/// `s` percent-encoded for a query string value (unreserved characters kept).
pub fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// Serves one connection on a fresh socket with `reply`, returns the socket path.
    fn serve_once(reply: &'static [u8]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("engine.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut req = [0u8; 1024];
            let _ = conn.read(&mut req);
            let _ = conn.write_all(reply);
        });
        (dir, path)
    }

    #[test]
    fn reads_length_and_chunked_bodies() {
        let (_d, p) = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello");
        assert_eq!(get(&p, "/x").unwrap().read_body().unwrap(), b"hello");
        let (_d, p) = serve_once(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4\r\n\":1}\r\n0\r\n\r\n",
        );
        assert_eq!(get(&p, "/x").unwrap().read_body().unwrap(), b"{\"a\":1}");
    }

    #[test]
    fn event_lines_span_chunks() {
        let (_d, p) = serve_once(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{}\n{\r\n3\r\n}\n\n\r\n0\r\n\r\n",
        );
        let mut r = get(&p, "/events").unwrap();
        let mut pending = Vec::new();
        let mut next = || r.next_line(&mut pending, IO_TIMEOUT).unwrap();
        assert_eq!(next(), Next::Line(b"{}".to_vec()));
        assert_eq!(next(), Next::Line(b"{}".to_vec()));
        assert_eq!(next(), Next::Line(Vec::new()));
        assert_eq!(next(), Next::End);
    }

    /// A stream that goes quiet inside a line (the engine stopped, or nothing happens) gives
    /// Quiet without losing what it already read; the line completes when more comes.
    #[test]
    fn a_quiet_stream_is_reported_and_keeps_its_partial_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("engine.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (go_on, wait) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut req = [0u8; 1024];
            let _ = conn.read(&mut req);
            let _ = conn
                .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n");
            let _ = wait.recv_timeout(Duration::from_secs(10));
            let _ = conn.write_all(b"5\r\n\":1}\n\r\n0\r\n\r\n");
        });
        let mut r = get(&path, "/events").unwrap();
        let mut pending = Vec::new();
        let quiet = Duration::from_millis(50);
        assert_eq!(r.next_line(&mut pending, quiet).unwrap(), Next::Quiet);
        assert_eq!(r.next_line(&mut pending, quiet).unwrap(), Next::Quiet);
        go_on.send(()).unwrap();
        let line = r.next_line(&mut pending, IO_TIMEOUT).unwrap();
        assert_eq!(line, Next::Line(b"{\"a\":1}".to_vec()));
        assert_eq!(r.next_line(&mut pending, IO_TIMEOUT).unwrap(), Next::End);
    }

    /// An engine that accepts but never answers (stopped) fails the ping instead of hanging it.
    #[test]
    fn ping_fails_for_an_engine_that_does_not_answer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("engine.sock");
        // Bound and listening, never accepted: connects succeed, nothing is ever answered.
        let _listener = UnixListener::bind(&path).unwrap();
        match ping(&path, Duration::from_millis(100)) {
            Err(HttpError::Io { .. }) => {}
            other => panic!("ping of a silent engine: {other:?}"),
        }
        let (_d, p) = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK");
        ping(&p, IO_TIMEOUT).unwrap();
    }

    #[test]
    fn malformed_answers_are_errors() {
        for reply in [
            &b"SSH-2.0-hello\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\nbroken header\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        ] {
            let (_d, p) = serve_once(reply);
            let r = get(&p, "/x").and_then(|mut r| r.read_body());
            assert!(r.is_err(), "{:?}", String::from_utf8_lossy(reply));
        }
        let (_d, p) = serve_once(b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nno such c");
        match get(&p, "/containers/x/json") {
            Err(HttpError::Status {
                status: 404, body, ..
            }) => assert_eq!(body, "no such c"),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("404 accepted"),
        }
    }

    #[test]
    fn escapes_query_values() {
        assert_eq!(query_escape("{\"a\":[1]}"), "%7B%22a%22%3A%5B1%5D%7D");
    }
}
