//! A tiny HTTP/1.1 client on std::net, run from threads that joined a network namespace
//! with setns(2) (only the calling thread changes namespace; threads it spawns inherit it).
use std::{
    fs::File,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};

/// Moves the calling thread into the network namespace `/run/netns/<ns>`.
pub fn enter(ns: &str) -> Result<()> {
    let path = format!("/run/netns/{ns}");
    let f = File::open(&path).with_context(|| format!("opening {path}"))?;
    // SAFETY: a plain syscall on a valid descriptor; it only changes this thread's namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!("setns({path}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a new thread inside network namespace `ns` and returns its result.
pub fn in_netns<T, F>(ns: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let name = ns.to_owned();
    std::thread::Builder::new()
        .name(format!("netns-{ns}"))
        .spawn(move || {
            enter(&name)?;
            f()
        })
        .context("spawning a thread")?
        .join()
        .map_err(|_| anyhow!("a thread in namespace {ns} panicked"))?
}

/// One response: status, body, time to first byte and to the end of the body, both from
/// just before the request (and the connect, for a new connection) was sent.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: String,
    pub ttfb: Duration,
}

/// A client connection (keep-alive unless a request asks to close).
pub struct Conn {
    r: BufReader<TcpStream>,
    w: TcpStream,
    host: String,
}

impl Conn {
    pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<Self> {
        let s = TcpStream::connect_timeout(&addr, timeout)
            .with_context(|| format!("connecting to {addr}"))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        let w = s.try_clone()?;
        Ok(Self {
            r: BufReader::new(s),
            w,
            host: addr.ip().to_string(),
        })
    }

    /// Sends `GET path` and reads the whole response; `t0` is when timing starts.
    pub fn get_from(&mut self, path: &str, close: bool, t0: Instant) -> Result<Response> {
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: rdemo\r\n{}\r\n",
            self.host,
            if close { "Connection: close\r\n" } else { "" }
        );
        self.w.write_all(req.as_bytes())?;
        read_response(&mut self.r, t0)
    }

    pub fn get(&mut self, path: &str) -> Result<Response> {
        self.get_from(path, false, Instant::now())
    }
}

/// A new connection, one request, closed: the time includes the TCP handshake.
pub fn get_once(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Response> {
    let t0 = Instant::now();
    Conn::connect(addr, timeout)?.get_from(path, true, t0)
}

fn read_response(r: &mut BufReader<TcpStream>, t0: Instant) -> Result<Response> {
    if r.fill_buf().context("waiting for the response")?.is_empty() {
        bail!("connection closed before a response");
    }
    let ttfb = t0.elapsed();
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line {line:?}"))?;
    let (mut len, mut chunked) = (None, false);
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            bail!("connection closed in the response headers");
        }
        let h = h.trim_end().to_ascii_lowercase();
        if h.is_empty() {
            break;
        }
        if let Some(v) = h.strip_prefix("content-length:") {
            len = v.trim().parse::<usize>().ok();
        } else if h.starts_with("transfer-encoding:") && h.contains("chunked") {
            chunked = true;
        }
    }
    let body = match len {
        Some(n) => {
            let mut b = vec![0; n];
            r.read_exact(&mut b)?;
            b
        }
        None if chunked => read_chunked(r)?,
        None => {
            let mut b = Vec::new();
            r.read_to_end(&mut b)?;
            b
        }
    };
    Ok(Response {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
        ttfb,
    })
}

fn read_chunked(r: &mut BufReader<TcpStream>) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let mut size = String::new();
        r.read_line(&mut size)?;
        let hex = size.trim().split(';').next().unwrap_or("");
        let n = usize::from_str_radix(hex, 16).with_context(|| format!("chunk size {size:?}"))?;
        if n == 0 {
            let mut end = String::new();
            while r.read_line(&mut end)? > 2 {
                end.clear();
            }
            return Ok(out);
        }
        let start = out.len();
        out.resize(start + n, 0);
        r.read_exact(&mut out[start..])?;
        let mut crlf = [0u8; 2];
        r.read_exact(&mut crlf)?;
    }
}
