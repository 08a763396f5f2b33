//! The server and client roles of `freeflow-bench tcp`: this binary re-executed inside the
//! simulated hosts' namespaces (`tcp-server PORT`, `tcp-client ADDR SECONDS SAMPLES SETUPS`,
//! `tcp-requests ADDR CLIENTS SECONDS`).

use freeflow_proto::report::{TcpPerRequestSample, TcpSample};
use hdrhistogram::Histogram;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// The size of a connection-per-request request (its first byte is the command 'R') and of
/// its reply.
const REQUEST_BYTES: usize = 64;

/// Server role: every connection starts with one command byte.
/// 'S' stream: read to EOF, answer the byte count (u64). 'E' echo: 64-byte messages back until
/// EOF. 'F' first byte: write one byte at once, then wait for EOF. 'R' request: read the rest
/// of a 64-byte request, answer 64 bytes and close (the server closes first, as an HTTP server
/// with `Connection: close` does, so the clients' ports are not held in TIME_WAIT).
pub fn serve(port: u16) -> Result<(), String> {
    let listener = TcpListener::bind(("0.0.0.0", port)).map_err(|e| format!("bind {port}: {e}"))?;
    println!("READY");
    let _ = std::io::stdout().flush();
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        std::thread::spawn(move || serve_one(conn));
    }
    Ok(())
}

fn serve_one(mut conn: TcpStream) {
    let _ = conn.set_nodelay(true);
    let mut cmd = [0u8; 1];
    if conn.read_exact(&mut cmd).is_err() {
        return;
    }
    match cmd[0] {
        b'S' => {
            let mut buf = vec![0u8; 256 * 1024];
            let mut total = 0u64;
            while let Ok(n) = conn.read(&mut buf) {
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            let _ = conn.write_all(&total.to_le_bytes());
        }
        b'E' => {
            let mut msg = [0u8; 64];
            while conn.read_exact(&mut msg).is_ok() {
                if conn.write_all(&msg).is_err() {
                    break;
                }
            }
        }
        b'F' => {
            let _ = conn.write_all(b"!");
            let mut rest = [0u8; 16];
            let _ = conn.read(&mut rest);
        }
        b'R' => {
            let mut request = [0u8; REQUEST_BYTES - 1];
            if conn.read_exact(&mut request).is_ok() {
                let _ = conn.write_all(&[b'r'; REQUEST_BYTES]);
            }
        }
        _ => {}
    }
}

fn io(what: &'static str) -> impl Fn(std::io::Error) -> String {
    move |err| format!("{what}: {err}")
}

fn histogram() -> Result<Histogram<u64>, String> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).map_err(|x| x.to_string())
}

fn record_since(h: &mut Histogram<u64>, t: Instant) -> Result<(), String> {
    h.record(t.elapsed().as_nanos().max(1) as u64)
        .map_err(|x| x.to_string())
}

/// Client role: runs the three measurements against `addr` and prints a [`TcpSample`] as JSON.
pub fn client(addr: SocketAddr, seconds: f64, rtt_samples: u64, setups: u64) -> Result<(), String> {
    let gbit_per_sec = stream(addr, seconds)?;
    let rtt = round_trips(addr, rtt_samples)?;
    let (setup, connect, setup_seconds) = setups_of(addr, setups)?;
    let sample = TcpSample {
        gbit_per_sec,
        rtt_p50_us: rtt.value_at_quantile(0.5) as f64 / 1000.0,
        rtt_p99_us: rtt.value_at_quantile(0.99) as f64 / 1000.0,
        setup_p50_us: setup.value_at_quantile(0.5) as f64 / 1000.0,
        setup_p99_us: setup.value_at_quantile(0.99) as f64 / 1000.0,
        connect_p50_us: connect.value_at_quantile(0.5) as f64 / 1000.0,
        conns_per_sec: setups as f64 / setup_seconds,
    };
    println!(
        "{}",
        serde_json::to_string(&sample).map_err(|x| x.to_string())?
    );
    Ok(())
}

/// Throughput of one stream for `seconds`, in Gbit/s (until the server has counted it all).
fn stream(addr: SocketAddr, seconds: f64) -> Result<f64, String> {
    let mut s = TcpStream::connect(addr).map_err(io("connect"))?;
    s.write_all(b"S").map_err(io("write"))?;
    let chunk = vec![0x5au8; 256 * 1024];
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        s.write_all(&chunk).map_err(io("stream"))?;
        sent += chunk.len() as u64;
    }
    s.shutdown(Shutdown::Write).map_err(io("shutdown"))?;
    let mut count = [0u8; 8];
    s.read_exact(&mut count).map_err(io("stream count"))?;
    let elapsed = start.elapsed().as_secs_f64();
    if u64::from_le_bytes(count) != sent {
        return Err(format!(
            "server counted {} of {sent} bytes",
            u64::from_le_bytes(count)
        ));
    }
    Ok(sent as f64 * 8.0 / elapsed / 1e9)
}

/// Round trips of 64-byte messages: a tenth of `samples` to warm up, then `samples` timed.
fn round_trips(addr: SocketAddr, samples: u64) -> Result<Histogram<u64>, String> {
    let mut s = TcpStream::connect(addr).map_err(io("connect"))?;
    s.set_nodelay(true).map_err(io("nodelay"))?;
    s.write_all(b"E").map_err(io("write"))?;
    let mut rtt = histogram()?;
    let mut msg = [7u8; 64];
    for i in 0..samples + samples / 10 {
        let t = Instant::now();
        s.write_all(&msg).map_err(io("echo write"))?;
        s.read_exact(&mut msg).map_err(io("echo read"))?;
        if i >= samples / 10 {
            record_since(&mut rtt, t)?;
        }
    }
    Ok(rtt)
}

/// Setup: connect until the first byte arrives, one connection after another. Returns the
/// setup and connect-call histograms and the seconds all `setups` took.
fn setups_of(
    addr: SocketAddr,
    setups: u64,
) -> Result<(Histogram<u64>, Histogram<u64>, f64), String> {
    let mut setup = histogram()?;
    let mut connect = histogram()?;
    let start = Instant::now();
    for _ in 0..setups {
        let t = Instant::now();
        let mut c = TcpStream::connect(addr).map_err(io("setup connect"))?;
        record_since(&mut connect, t)?;
        c.write_all(b"F").map_err(io("setup write"))?;
        let mut b = [0u8; 1];
        c.read_exact(&mut b).map_err(io("setup read"))?;
        record_since(&mut setup, t)?;
    }
    Ok((setup, connect, start.elapsed().as_secs_f64()))
}

/// How long one request may wait for its connect, its reply or the server's close before it
/// counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Connection-per-request client role: `clients` threads, each opening a connection per
/// request for `seconds`; prints a [`TcpPerRequestSample`] as JSON. Only requests answered
/// before the end count, and their latency is from the connect call to the reply.
pub fn requests(addr: SocketAddr, clients: usize, seconds: f64) -> Result<(), String> {
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let threads = (0..clients)
        .map(|_| {
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || request_loop(addr, end))
                .map_err(io("thread"))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let mut all = Timings::new()?;
    let mut errors = 0;
    for t in threads {
        let (one, e) = t.join().map_err(|_| "a client thread panicked")??;
        all.latency.add(&one.latency).map_err(|x| x.to_string())?;
        all.connect.add(&one.connect).map_err(|x| x.to_string())?;
        errors += e;
    }
    let us = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let sample = TcpPerRequestSample {
        requests_per_sec: all.latency.len() as f64 / seconds,
        latency_p50_us: us(&all.latency, 0.5),
        latency_p99_us: us(&all.latency, 0.99),
        connect_p50_us: us(&all.connect, 0.5),
        connect_p99_us: us(&all.connect, 0.99),
        errors,
    };
    println!(
        "{}",
        serde_json::to_string(&sample).map_err(|x| x.to_string())?
    );
    Ok(())
}

/// One client's request latencies and connect-call times, in ns.
struct Timings {
    latency: Histogram<u64>,
    connect: Histogram<u64>,
}

impl Timings {
    /// Two significant digits: the histograms per client thread stay small at 400 threads.
    fn new() -> Result<Timings, String> {
        let h =
            || Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 2).map_err(|x| x.to_string());
        Ok(Timings {
            latency: h()?,
            connect: h()?,
        })
    }
}

fn nanos_between(from: Instant, to: Instant) -> u64 {
    to.duration_since(from).as_nanos().max(1) as u64
}

/// One client: requests one after another until `end`; returns the latencies of those
/// answered before `end` and the number that failed.
fn request_loop(addr: SocketAddr, end: Instant) -> Result<(Timings, u64), String> {
    let mut timings = Timings::new()?;
    let mut errors = 0u64;
    loop {
        let t = Instant::now();
        if t >= end {
            break;
        }
        match one_request(addr) {
            Ok((connected, replied)) if replied <= end => {
                let latency = nanos_between(t, replied);
                let connect = nanos_between(t, connected);
                timings.latency.record(latency).map_err(|x| x.to_string())?;
                timings.connect.record(connect).map_err(|x| x.to_string())?;
            }
            Ok(_) => {}
            Err(_) => {
                errors += 1;
                // A refused connect fails at once: do not spin on it.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    Ok((timings, errors))
}

/// Connect, send a request, read the reply, wait for the server's close; returns when the
/// connect call returned and when the reply had arrived.
fn one_request(addr: SocketAddr) -> std::io::Result<(Instant, Instant)> {
    // Bounded like the read: a SYN dropped again and again (a server whose accept queue stays
    // full) would otherwise keep a client in the kernel's retries for minutes.
    let mut c = TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT)?;
    let connected = Instant::now();
    c.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    c.set_nodelay(true)?;
    let mut request = [0u8; REQUEST_BYTES];
    request[0] = b'R';
    c.write_all(&request)?;
    let mut reply = [0u8; REQUEST_BYTES];
    c.read_exact(&mut reply)?;
    let replied = Instant::now();
    let mut more = [0u8; 1];
    match c.read(&mut more)? {
        0 => Ok((connected, replied)),
        _ => Err(std::io::ErrorKind::InvalidData.into()),
    }
}
