//! Clients that run inside a network namespace: a socket belongs to the namespace of the
//! thread that created it, so a short-lived thread `setns`es into `/run/netns/<name>`,
//! creates the socket and hands it back. Plain HTTP/1.1 requests over such sockets, and an
//! h2c (gRPC-style) request with hyper.
use std::{
    fs::File,
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

/// Moves the calling thread into network namespace `ns` (a name under /run/netns).
pub fn enter(ns: &str) -> io::Result<()> {
    let f = File::open(format!("/run/netns/{ns}"))?;
    // SAFETY: setns on an open namespace fd; only this thread changes namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a new thread inside namespace `ns` and returns its result.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let ns = ns.to_owned();
    std::thread::spawn(move || {
        enter(&ns).with_context(|| format!("setns into {ns}"))?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in a namespace panicked"))?
}

/// A TCP connection made from inside namespace `ns`.
pub fn connect(ns: &str, addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    in_netns(ns, move || {
        let s = TcpStream::connect_timeout(&addr, timeout)
            .with_context(|| format!("connecting to {addr}"))?;
        s.set_nodelay(true)?;
        Ok(s)
    })
}

/// An HTTP response as read off the wire.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A `GET` (or any method) request with `Connection: close`.
pub fn request_text(method: &str, path: &str, host: &str, headers: &[(&str, &str)]) -> String {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str("\r\n");
    r
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(i) = find(b, b"\r\n") {
        let size = std::str::from_utf8(&b[..i])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok())
            .unwrap_or(0);
        if size == 0 || b.len() < i + 2 + size {
            break;
        }
        out.extend_from_slice(&b[i + 2..i + 2 + size]);
        b = &b[(i + 4 + size).min(b.len())..];
    }
    out
}

/// Parses a complete response (status line, headers, body; chunked bodies decoded).
pub fn parse(raw: &[u8]) -> Result<Resp> {
    let Some(end) = find(raw, b"\r\n\r\n") else {
        bail!(
            "incomplete response ({} bytes): {:?}",
            raw.len(),
            String::from_utf8_lossy(raw)
        );
    };
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut resp = Resp {
        status,
        headers,
        body: String::new(),
    };
    let body = &raw[end + 4..];
    let body = if resp
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        dechunk(body)
    } else {
        body.to_vec()
    };
    resp.body = String::from_utf8_lossy(&body).into_owned();
    Ok(resp)
}

/// Writes `req` and reads the response until the server closes.
pub fn exchange(s: &mut TcpStream, req: &[u8], timeout: Duration) -> Result<Resp> {
    s.set_read_timeout(Some(timeout))?;
    s.write_all(req).context("writing the request")?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            // A reset after a complete response (the server closed with unread data).
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset && !raw.is_empty() => break,
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "reading the response (got so far: {:?})",
                        String::from_utf8_lossy(&raw)
                    )
                })
            }
        }
    }
    parse(&raw)
}

/// One HTTP/1.1 request from namespace `ns` to `addr` on a fresh connection.
pub fn http(
    ns: &str,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> Result<Resp> {
    let mut s = connect(ns, addr, Duration::from_secs(5))?;
    let req = request_text(method, path, &addr.to_string(), headers);
    exchange(&mut s, req.as_bytes(), timeout)
}

/// `GET path` from namespace `ns`.
pub fn get(ns: &str, addr: SocketAddr, path: &str, timeout: Duration) -> Result<Resp> {
    http(ns, addr, "GET", path, &[], timeout)
}

/// What an h2c request got back: status, body and trailers.
#[derive(Debug)]
pub struct H2Resp {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Vec<u8>,
    pub trailers: Option<hyper::HeaderMap>,
}

/// A gRPC-style request over h2c with prior knowledge: `POST path`,
/// `content-type: application/grpc`, `te: trailers`, body `body`.
pub fn grpc_call(
    ns: &str,
    addr: SocketAddr,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> Result<H2Resp> {
    grpc_call_with(ns, addr, path, body, &[], timeout)
}

/// [`grpc_call`] with extra request headers (e.g. the `Knative-Serving-Revision` /
/// `-Namespace` an ingress adds).
pub fn grpc_call_with(
    ns: &str,
    addr: SocketAddr,
    path: &str,
    body: &[u8],
    headers: &[(&str, &str)],
    timeout: Duration,
) -> Result<H2Resp> {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let std_stream = connect(ns, addr, Duration::from_secs(5))?;
    std_stream.set_nonblocking(true)?;
    let body = Bytes::copy_from_slice(body);
    let path = path.to_owned();
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let stream = tokio::net::TcpStream::from_std(std_stream)?;
        let call = async {
            let (mut send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                    .await
                    .context("h2 handshake")?;
            tokio::spawn(conn);
            let mut req = hyper::Request::builder()
                .method("POST")
                .uri(format!("http://{addr}{path}"))
                .header("content-type", "application/grpc")
                .header("te", "trailers");
            for (k, v) in &headers {
                req = req.header(k.as_str(), v.as_str());
            }
            let req = req.body(Full::new(body))?;
            let resp = send.send_request(req).await.context("h2 request")?;
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let collected = resp.into_body().collect().await.context("h2 body")?;
            let trailers = collected.trailers().cloned();
            Ok::<_, anyhow::Error>(H2Resp {
                status,
                headers,
                body: collected.to_bytes().to_vec(),
                trailers,
            })
        };
        tokio::time::timeout(timeout, call)
            .await
            .context("h2c call timed out")?
    })
}

/// Wall-clock time of day (UTC) with microseconds, to match the agent's log lines.
pub fn utc_now() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let s = d.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:06}",
        s / 3600,
        s / 60 % 60,
        s % 60,
        d.subsec_micros()
    )
}

/// Outcomes of many requests: successes counted, failures kept with their wall-clock time.
#[derive(Default)]
pub struct Tally {
    pub ok: AtomicUsize,
    pub failures: Mutex<Vec<String>>,
}

impl Tally {
    /// One request from the client namespace; a failure is kept with its wall-clock time.
    pub fn request(&self, env: (&str, SocketAddr)) {
        let t0 = Instant::now();
        match get(env.0, env.1, "/", Duration::from_secs(20)) {
            Ok(r) if r.status == 200 => {
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            other => {
                let what = match other {
                    Ok(r) => format!("{r:?}"),
                    Err(e) => format!("{e:#}"),
                };
                let (at, took) = (utc_now(), t0.elapsed());
                let msg = format!("failed at {at} UTC after {took:?}: {what}");
                self.failures.lock().unwrap().push(msg);
            }
        }
    }
}
