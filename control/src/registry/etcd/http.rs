//! A small blocking HTTP/1.1 client for etcd's v3 JSON gateway: one POST per TCP connection
//! (`Connection: close`), every exchange bounded by a deadline, responses bounded in size.
//!
//! Why hand-written: the gateway needs nothing but POST with a JSON body, and the alternatives
//! (the etcd-client crate over gRPC) bring tokio, tonic and a protoc build step for what is a few
//! requests a second. One connection per request keeps the client stateless: a dead endpoint or a
//! half-read response can never poison the next exchange.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Largest response accepted; the whole registry of a big cluster is a few megabytes.
const MAX_RESPONSE: usize = 256 << 20;
/// Largest header section accepted.
const MAX_HEADER: usize = 64 << 10;

/// How one exchange with one endpoint failed.
#[derive(Debug)]
pub(super) enum ExchangeError {
    /// Nothing was sent: the endpoint could not be resolved or connected to. Trying another
    /// endpoint is safe for any request.
    NotSent(String),
    /// The request may have reached etcd, but no complete answer came back.
    NoAnswer(String),
    /// An answer came back that is not HTTP as expected.
    Malformed(String),
    /// A complete HTTP answer with a status other than 200; the body usually says why.
    Status {
        /// The HTTP status code.
        code: u16,
        /// The response body.
        body: Vec<u8>,
    },
}

/// POSTs `body` to `http://<endpoint><path>` and returns the response body of a 200 answer.
/// Everything (resolution aside, connection, sending, receiving) ends by `deadline`.
pub(super) fn post(
    endpoint: &str,
    path: &str,
    body: &[u8],
    deadline: Instant,
) -> Result<Vec<u8>, ExchangeError> {
    let mut stream = send_post(endpoint, path, body, deadline)?;
    let raw = read_to_end(&mut stream, deadline).map_err(|e| no_answer("receiving", e))?;
    parse_response(&raw)
}

/// Connects to `endpoint` and sends a POST of `body` to `path`, by `deadline`; the answer is
/// left in the returned stream.
fn send_post(
    endpoint: &str,
    path: &str,
    body: &[u8],
    deadline: Instant,
) -> Result<TcpStream, ExchangeError> {
    let mut stream = connect(endpoint, deadline)?;
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {endpoint}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    set_timeouts(&stream, deadline).map_err(|e| no_answer("sending", e))?;
    stream
        .write_all(request.as_bytes())
        .and_then(|()| stream.write_all(body))
        .map_err(|e| no_answer("sending", e))?;
    Ok(stream)
}

/// An exchange that may have reached etcd but got no complete answer.
fn no_answer(what: &str, e: io::Error) -> ExchangeError {
    ExchangeError::NoAnswer(format!("{what}: {e}"))
}

/// Largest line of a streamed answer (one watch response: the events of one revision).
const MAX_LINE: usize = 64 << 20;

/// A streamed answer being read: newline-delimited JSON messages (a watch).
#[derive(Debug)]
pub(super) struct LineStream {
    stream: TcpStream,
    /// Received and not decoded yet (chunk framing included).
    raw: Vec<u8>,
    /// Decoded body not yet returned as lines.
    body: Vec<u8>,
    chunked: bool,
    /// The last chunk arrived: nothing more will come.
    ended: bool,
}

impl LineStream {
    /// POSTs `body` to `http://<endpoint><path>` and reads the answer's header (by `deadline`);
    /// the body is then read line by line with [`LineStream::next_line`].
    pub(super) fn open(
        endpoint: &str,
        path: &str,
        body: &[u8],
        deadline: Instant,
    ) -> Result<LineStream, ExchangeError> {
        let mut stream = send_post(endpoint, path, body, deadline)?;
        let mut raw = Vec::new();
        let mut buf = [0u8; 16 << 10];
        let header_end = loop {
            if let Some(end) = find(&raw, b"\r\n\r\n") {
                break end;
            }
            if raw.len() > MAX_HEADER {
                return Err(ExchangeError::Malformed(
                    "no complete HTTP header".to_owned(),
                ));
            }
            set_timeouts(&stream, deadline).map_err(|e| no_answer("receiving", e))?;
            match stream.read(&mut buf) {
                // Let the parser say what is wrong with what came.
                Ok(0) => {
                    return Err(parse_response(&raw).err().unwrap_or_else(|| {
                        ExchangeError::Malformed("no complete HTTP header".to_owned())
                    }))
                }
                Ok(n) => raw.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(no_answer("receiving", e)),
            }
        };
        // The header alone, with an empty body, tells status and framing.
        let head = &raw[..header_end + 4];
        let chunked = find(&head.to_ascii_lowercase(), b"transfer-encoding: chunked").is_some();
        let status_ok = head.starts_with(b"HTTP/1.1 200 ") || head.starts_with(b"HTTP/1.0 200 ");
        if !status_ok {
            // An error answer is short: read it whole for its message.
            let rest = read_to_end(&mut stream, deadline).map_err(|e| no_answer("receiving", e))?;
            raw.extend_from_slice(&rest);
            return match parse_response(&raw) {
                Ok(_) => Err(ExchangeError::Malformed("unexpected status".to_owned())),
                Err(e) => Err(e),
            };
        }
        let rest = raw.split_off(header_end + 4);
        Ok(LineStream {
            stream,
            raw: rest,
            body: Vec::new(),
            chunked,
            ended: false,
        })
    }

    /// The next complete line of the body; `Ok(None)` when none came within `wait`. An error
    /// when the connection ended or broke, or the answer is malformed.
    pub(super) fn next_line(&mut self, wait: Duration) -> io::Result<Option<Vec<u8>>> {
        let until = Instant::now() + wait;
        let mut buf = [0u8; 16 << 10];
        loop {
            self.decode()?;
            if let Some(end) = self.body.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.body.drain(..=end).collect();
                line.pop();
                return Ok(Some(line));
            }
            if self.body.len() > MAX_LINE {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("a streamed message longer than {MAX_LINE} bytes"),
                ));
            }
            if self.ended {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the streamed answer ended",
                ));
            }
            let remaining = until.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Ok(None);
            }
            self.stream.set_read_timeout(Some(remaining))?;
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the connection closed",
                    ))
                }
                Ok(n) => self.raw.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Moves what can be decoded from `raw` to `body`.
    fn decode(&mut self) -> io::Result<()> {
        if !self.chunked {
            self.body.append(&mut self.raw);
            return Ok(());
        }
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
        while !self.ended {
            let Some(line_end) = find(&self.raw, b"\r\n") else {
                if self.raw.len() > 64 {
                    return Err(bad("bad chunk size line"));
                }
                return Ok(());
            };
            let size = std::str::from_utf8(&self.raw[..line_end])
                .ok()
                .map(|s| s.split(';').next().unwrap_or_default().trim())
                .and_then(|s| usize::from_str_radix(s, 16).ok())
                .ok_or_else(|| bad("bad chunk size"))?;
            if size > MAX_LINE {
                return Err(bad("chunk too large"));
            }
            let needed = line_end + 2 + size + 2;
            if self.raw.len() < needed {
                return Ok(());
            }
            if size == 0 {
                self.ended = true;
            }
            self.body
                .extend_from_slice(&self.raw[line_end + 2..line_end + 2 + size]);
            self.raw.drain(..needed);
        }
        Ok(())
    }
}

fn connect(endpoint: &str, deadline: Instant) -> Result<TcpStream, ExchangeError> {
    let addrs = endpoint
        .to_socket_addrs()
        .map_err(|e| ExchangeError::NotSent(format!("cannot resolve {endpoint}: {e}")))?;
    let mut last = format!("{endpoint} resolves to no address");
    for addr in addrs {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            last = format!("connecting to {addr}: timed out");
            break;
        }
        match TcpStream::connect_timeout(&addr, remaining) {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Err(e) => last = format!("connecting to {addr}: {e}"),
        }
    }
    Err(ExchangeError::NotSent(last))
}

/// Sets both socket timeouts to what is left until `deadline` (a zero timeout means "none" to
/// the socket, so an expired deadline is an error here).
fn set_timeouts(stream: &TcpStream, deadline: Instant) -> io::Result<()> {
    let remaining = deadline.saturating_duration_since(Instant::now());
    if remaining.is_zero() {
        return Err(io::ErrorKind::TimedOut.into());
    }
    stream.set_read_timeout(Some(remaining))?;
    stream.set_write_timeout(Some(remaining))
}

/// Reads until the server closes the connection (it does: the request said `Connection: close`,
/// and the gateway ends a streamed answer when the request body ended), the deadline passes or
/// the answer grows too big.
fn read_to_end(stream: &mut TcpStream, deadline: Instant) -> io::Result<Vec<u8>> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 << 10];
    loop {
        set_timeouts(stream, deadline)?;
        match stream.read(&mut buf) {
            Ok(0) => return Ok(raw),
            Ok(n) => {
                if raw.len() + n > MAX_RESPONSE {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("answer larger than {MAX_RESPONSE} bytes"),
                    ));
                }
                raw.extend_from_slice(&buf[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Splits a complete HTTP/1.1 response into status and body (de-chunked if need be).
pub(super) fn parse_response(raw: &[u8]) -> Result<Vec<u8>, ExchangeError> {
    let malformed = |what: &str| ExchangeError::Malformed(what.to_owned());
    let header_end = find(raw, b"\r\n\r\n")
        .filter(|&end| end <= MAX_HEADER)
        .ok_or_else(|| {
            if raw.is_empty() {
                ExchangeError::NoAnswer("the connection closed without an answer".to_owned())
            } else {
                malformed("no complete HTTP header")
            }
        })?;
    let head =
        std::str::from_utf8(&raw[..header_end]).map_err(|_| malformed("header not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(malformed("bad status line"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(ExchangeError::Malformed(format!(
            "not an HTTP/1 answer: {status_line:?}"
        )));
    }
    let code: u16 = code
        .parse()
        .map_err(|_| ExchangeError::Malformed(format!("bad status line {status_line:?}")))?;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(ExchangeError::Malformed(format!(
                "bad header line {line:?}"
            )));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.eq_ignore_ascii_case("chunked");
        } else if name.eq_ignore_ascii_case("content-length") {
            length =
                Some(value.parse::<usize>().map_err(|_| {
                    ExchangeError::Malformed(format!("bad content-length {value:?}"))
                })?);
        }
    }
    let rest = &raw[header_end + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(length) = length {
        rest.get(..length)
            .ok_or_else(|| {
                ExchangeError::NoAnswer(format!(
                    "the answer ended after {} of {length} bytes",
                    rest.len()
                ))
            })?
            .to_vec()
    } else {
        rest.to_vec()
    };
    if code != 200 {
        return Err(ExchangeError::Status { code, body });
    }
    Ok(body)
}

/// Decodes a chunked body; a body cut short is "no answer" (the connection broke).
fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, ExchangeError> {
    let cut = || ExchangeError::NoAnswer("the chunked answer was cut short".to_owned());
    let mut body = Vec::new();
    loop {
        let line_end = find(rest, b"\r\n").ok_or_else(cut)?;
        let size_text = std::str::from_utf8(&rest[..line_end])
            .ok()
            .map(|s| s.split(';').next().unwrap_or_default().trim())
            .ok_or_else(|| ExchangeError::Malformed("bad chunk size".to_owned()))?;
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| ExchangeError::Malformed(format!("bad chunk size {size_text:?}")))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        if rest.len() < size.saturating_add(2) {
            return Err(cut());
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_answers() {
        let plain = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(parse_response(plain).unwrap(), b"{}");
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n2\r\n\"}\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), b"{\"a\"}");
        let error = b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\nnope";
        assert!(matches!(
            parse_response(error),
            Err(ExchangeError::Status { code: 404, body }) if body == b"nope"
        ));
    }

    #[test]
    fn refuses_broken_answers() {
        for raw in [
            &b""[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nabc",
        ] {
            assert!(
                matches!(parse_response(raw), Err(ExchangeError::NoAnswer(_))),
                "{raw:?}"
            );
        }
        for raw in [
            &b"SSH-2.0-OpenSSH\r\n\r\n"[..],
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        ] {
            assert!(
                matches!(parse_response(raw), Err(ExchangeError::Malformed(_))),
                "{raw:?}"
            );
        }
    }
}
