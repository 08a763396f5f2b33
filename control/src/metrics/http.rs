//! The daemon's metrics endpoint: a minimal HTTP/1.1 responder on a `TcpListener` (no web
//! framework). `GET /metrics` (or `HEAD`) answers 200 with the exposition, gathered afresh for
//! each request; any other path 404, any other method 405, a request that is not HTTP 400.
//! Every response closes the connection.
//!
//! One thread serves one connection at a time: Prometheus scrapes rarely and one by one. Each
//! connection is bounded (its request head to [`MAX_HEAD`] bytes, reading and writing to
//! [`IO_TIMEOUT`]), so a client that stalls delays the next scrape by at most that much.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use super::{Scrape, CONTENT_TYPE};
use crate::config::RuntimeDir;

/// Longest request head read; a longer one is answered 400.
pub const MAX_HEAD: usize = 8 * 1024;
/// Bound on reading the request and on writing the response.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds `addr` for the metrics endpoint (before the daemon reports ready, so a bad address
/// fails `freeflow up`).
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr)
}

/// Serves `listener` forever on this thread, each scrape reading `dir` afresh.
pub fn serve(listener: TcpListener, dir: RuntimeDir) {
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                // A client that goes away mid-answer is no concern of the daemon's.
                let _ = answer(stream, &dir);
            }
            Err(e) => {
                crate::daemon::log(format_args!("metrics: accept: {e}"));
                // Out of descriptors or memory: let it pass rather than spin.
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn answer(mut stream: TcpStream, dir: &RuntimeDir) -> io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let head = read_head(&mut stream)?;
    let response = respond(&head, || match Scrape::gather(dir) {
        Ok(scrape) => Ok(scrape.render()),
        Err(e) => Err(e.to_string()),
    });
    stream.write_all(&response)?;
    stream.flush()
}

/// The request head: bytes up to and including the blank line, or what came before the
/// client stopped sending or [`MAX_HEAD`] was reached (then it is malformed).
fn read_head(stream: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(head)
}

/// The whole response to the request head `head`; `metrics` renders the exposition (only
/// called for a metrics request).
pub fn respond(head: &[u8], metrics: impl FnOnce() -> Result<String, String>) -> Vec<u8> {
    let Some((method, target)) = request_line(head) else {
        return response(
            "400 Bad Request",
            "text/plain",
            "not an HTTP request\n",
            true,
        );
    };
    if method != "GET" && method != "HEAD" {
        return response(
            "405 Method Not Allowed",
            "text/plain",
            "only GET and HEAD\n",
            true,
        );
    }
    let path = target.split('?').next().unwrap_or(target);
    if path != "/metrics" {
        return response(
            "404 Not Found",
            "text/plain",
            "try /metrics\n",
            method == "GET",
        );
    }
    match metrics() {
        Ok(text) => response("200 OK", CONTENT_TYPE, &text, method == "GET"),
        Err(e) => response(
            "500 Internal Server Error",
            "text/plain",
            &format!("{e}\n"),
            method == "GET",
        ),
    }
}

/// Method and target of an `HTTP/1.x` request line at the start of a complete head.
fn request_line(head: &[u8]) -> Option<(&str, &str)> {
    if !head.windows(4).any(|w| w == b"\r\n\r\n") {
        return None;
    }
    let end = head.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&head[..end]).ok()?;
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return None;
    }
    Some((method, target))
}

fn response(status: &str, content_type: &str, body: &str, with_body: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n",
        body.len()
    );
    if status.starts_with("405") {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    if with_body {
        bytes.extend_from_slice(body.as_bytes());
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(head: &str) -> String {
        String::from_utf8(respond(head.as_bytes(), || Ok("m 1\n".into()))).unwrap()
    }

    #[test]
    fn metrics_are_served_on_get_and_head() {
        let get = text("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(get.starts_with("HTTP/1.1 200 OK\r\n"), "{get}");
        assert!(get.contains("\r\nContent-Length: 4\r\n"), "{get}");
        assert!(
            get.contains(&format!("\r\nContent-Type: {CONTENT_TYPE}\r\n")),
            "{get}"
        );
        assert!(get.ends_with("\r\n\r\nm 1\n"), "{get}");
        let with_query = text("GET /metrics?x=1 HTTP/1.0\r\n\r\n");
        assert!(
            with_query.starts_with("HTTP/1.1 200 OK\r\n"),
            "{with_query}"
        );
        let head = text("HEAD /metrics HTTP/1.1\r\n\r\n");
        assert!(
            head.contains("Content-Length: 4\r\n") && head.ends_with("\r\n\r\n"),
            "{head}"
        );
    }

    #[test]
    fn other_requests_are_refused() {
        assert!(text("GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404 "));
        let post = text("POST /metrics HTTP/1.1\r\n\r\n");
        assert!(post.starts_with("HTTP/1.1 405 ") && post.contains("Allow: GET, HEAD"));
        for bad in [
            "GET /metrics\r\n\r\n",
            "GET /metrics HTTP/1.1\r\n",
            "\u{1}\r\n\r\n",
        ] {
            assert!(text(bad).starts_with("HTTP/1.1 400 "), "{bad:?}");
        }
        let failed = respond(b"GET /metrics HTTP/1.1\r\n\r\n", || Err("no".into()));
        assert!(failed.starts_with(b"HTTP/1.1 500 "));
    }

    #[test]
    fn the_head_is_read_up_to_the_blank_line_and_bounded() {
        let mut request: &[u8] = b"GET /metrics HTTP/1.1\r\n\r\nextra";
        assert!(read_head(&mut request)
            .unwrap()
            .starts_with(b"GET /metrics"));
        let endless = vec![b'a'; 3 * MAX_HEAD];
        let head = read_head(&mut endless.as_slice()).unwrap();
        assert!(head.len() >= MAX_HEAD && head.len() < MAX_HEAD + 1024);
    }
}
