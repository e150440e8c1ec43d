//! Connections from the activator to instances, kept alive and reused per thread (each
//! activator thread runs its own single-threaded runtime, so a connection and the requests on
//! it stay on one thread). HTTP/1.1: a stack of idle connections per instance, a connection
//! going back on it once its response body has been read to the end. h2c: one multiplexed
//! connection per instance. A request that never started on a reused connection (the
//! instance closed it while idle) is retried once more on another one, as hyper's pooled
//! client does.
use std::{
    cell::RefCell,
    collections::HashMap,
    hash::{BuildHasherDefault, Hasher},
    net::SocketAddr,
    time::{Duration, Instant},
};

use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
    Request, Response,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use super::{deadline::ClientBody, Instance};

/// Idle HTTP/1.1 connections older than this are closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// At most this many idle HTTP/1.1 connections per instance and thread.
const MAX_IDLE: usize = 1024;
/// How often returning a connection also drops expired and closed ones everywhere.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// FxHash-style hasher for instance ids (SipHash costs more than the rest of a pool lookup).
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(*b as u64);
        }
    }
    fn write_u8(&mut self, i: u8) {
        self.write_u64(i as u64);
    }
    fn write_u16(&mut self, i: u16) {
        self.write_u64(i as u64);
    }
    fn write_u32(&mut self, i: u32) {
        self.write_u64(i as u64);
    }
    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(5) ^ i).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_usize(&mut self, i: usize) {
        self.write_u64(i as u64);
    }
}

/// By `Instance::id`.
type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

struct Idle {
    tx: http1::SendRequest<ClientBody>,
    since: Instant,
}

#[derive(Default)]
struct Pool {
    h1: IdMap<Vec<Idle>>,
    h2: IdMap<http2::SendRequest<ClientBody>>,
    swept: Option<Instant>,
}

impl Pool {
    fn sweep(&mut self, now: Instant) {
        self.h1.retain(|_, v| {
            v.retain(|i| !i.tx.is_closed() && now.duration_since(i.since) < IDLE_TIMEOUT);
            !v.is_empty()
        });
        self.h2.retain(|_, tx| !tx.is_closed());
        self.swept = Some(now);
    }
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::default();
}

/// An HTTP/1.1 connection in use; `release` it once its response is read to the end.
pub struct H1 {
    tx: http1::SendRequest<ClientBody>,
    id: u64,
}

impl H1 {
    /// Puts the connection back for the next request (unless it closed meanwhile).
    pub fn release(self) {
        if self.tx.is_closed() {
            return;
        }
        let _ = POOL.try_with(|p| {
            let Ok(mut p) = p.try_borrow_mut() else {
                return;
            };
            let now = Instant::now();
            if p.swept.is_none_or(|s| now.duration_since(s) >= SWEEP_EVERY) {
                p.sweep(now);
            }
            let idle = p.h1.entry(self.id).or_default();
            if idle.len() < MAX_IDLE {
                idle.push(Idle {
                    tx: self.tx,
                    since: now,
                });
            }
        });
    }
}

fn take_h1(id: u64) -> Option<http1::SendRequest<ClientBody>> {
    POOL.try_with(|p| {
        let mut p = p.try_borrow_mut().ok()?;
        let idle = p.h1.get_mut(&id)?;
        // The most recently used first; expired ones go in the sweep.
        while let Some(i) = idle.pop() {
            if !i.tx.is_closed() {
                return Some(i.tx);
            }
        }
        None
    })
    .ok()
    .flatten()
}

/// Why a request could not be sent to an instance.
#[derive(Debug)]
pub enum Error {
    Connect(std::io::Error),
    Http(hyper::Error),
}

impl Error {
    /// No connection to the instance could be made (it is gone, or not listening).
    pub fn is_connect(&self) -> bool {
        matches!(self, Error::Connect(_))
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Connect(e) => write!(f, "connect: {e}"),
            Error::Http(e) => write!(f, "{e}"),
        }
    }
}

impl From<hyper::Error> for Error {
    fn from(e: hyper::Error) -> Self {
        Error::Http(e)
    }
}

async fn connect_h1(addr: SocketAddr) -> Result<http1::SendRequest<ClientBody>, Error> {
    let io = TcpStream::connect(addr).await.map_err(Error::Connect)?;
    let _ = io.set_nodelay(true);
    // Response heads up to the fast path's limit (hyper's default is 400 KiB).
    let (tx, conn) = http1::Builder::new()
        .max_buf_size(super::http::MAX_HEAD)
        .handshake(TokioIo::new(io))
        .await?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream connection ended");
        }
    });
    Ok(tx)
}

async fn connect_h2(addr: SocketAddr) -> Result<http2::SendRequest<ClientBody>, Error> {
    let io = TcpStream::connect(addr).await.map_err(Error::Connect)?;
    let _ = io.set_nodelay(true);
    let (mut tx, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream h2 connection ended");
        }
    });
    tx.ready().await?;
    Ok(tx)
}

/// Sends an HTTP/1.1 request (origin-form URI, Host set) to `inst`; the connection comes
/// back with the response, to be released when the body is done.
pub async fn send_h1(
    inst: &Instance,
    mut req: Request<ClientBody>,
) -> Result<(Response<Incoming>, H1), Error> {
    loop {
        let (mut tx, reused) = match take_h1(inst.id) {
            Some(tx) => (tx, true),
            // Boxed: a new connection is rare, and its handshake future would otherwise
            // make every request's future (held ones included) larger.
            None => (Box::pin(connect_h1(inst.addr)).await?, false),
        };
        if reused && tx.ready().await.is_err() {
            continue; // closed meanwhile; the request was not touched
        }
        match tx.try_send_request(req).await {
            Ok(resp) => return Ok((resp, H1 { tx, id: inst.id })),
            Err(mut e) => match e.take_message() {
                Some(r) if reused => req = r,
                _ => return Err(e.into_error().into()),
            },
        }
    }
}

/// Sends an HTTP/2 request (absolute URI) to `inst` on its shared connection.
pub async fn send_h2(
    inst: &Instance,
    mut req: Request<ClientBody>,
) -> Result<Response<Incoming>, Error> {
    // A request that never started on a shared connection (it was going away) is retried
    // on a new one; the cap only guards against a connection that keeps refusing.
    let mut attempt = 0;
    loop {
        attempt += 1;
        let cached = POOL
            .try_with(|p| {
                let p = p.try_borrow().ok()?;
                p.h2.get(&inst.id).filter(|tx| !tx.is_closed()).cloned()
            })
            .ok()
            .flatten();
        let (mut tx, reused) = match cached {
            Some(tx) => (tx, true),
            None => {
                // Boxed: 1.2 KiB of handshake state, once per instance and thread, kept
                // out of every request's future (10,000 held requests: 12 MiB).
                let tx = Box::pin(connect_h2(inst.addr)).await?;
                let _ = POOL.try_with(|p| {
                    if let Ok(mut p) = p.try_borrow_mut() {
                        p.h2.insert(inst.id, tx.clone());
                    }
                });
                (tx, false)
            }
        };
        match tx.try_send_request(req).await {
            Ok(resp) => return Ok(resp),
            Err(mut e) => match e.take_message() {
                Some(r) if reused && attempt < 3 => {
                    let _ = POOL.try_with(|p| {
                        if let Ok(mut p) = p.try_borrow_mut() {
                            p.h2.remove(&inst.id);
                        }
                    });
                    req = r;
                }
                _ => return Err(e.into_error().into()),
            },
        }
    }
}

/// Plain HTTP/1.1 connections the fast path (`fast.rs`) left idle, per instance and thread.
#[derive(Default)]
struct RawPool {
    idle: IdMap<Vec<(TcpStream, Instant)>>,
    swept: Option<Instant>,
}

thread_local! {
    static RAW: RefCell<RawPool> = RefCell::default();
}

/// True when an idle connection has nothing to read and is not closed: the instance has
/// neither closed it nor sent anything unasked.
pub fn idle_ok(s: &TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut b = 0u8;
    // SAFETY: a one-byte peek into a local buffer on a socket we own.
    let n = unsafe {
        libc::recv(
            s.as_raw_fd(),
            (&mut b as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock
}

/// A kept-alive connection to instance `id` that is still open, if there is one.
pub fn take_raw(id: u64) -> Option<TcpStream> {
    RAW.try_with(|p| {
        let mut p = p.try_borrow_mut().ok()?;
        let idle = p.idle.get_mut(&id)?;
        while let Some((s, since)) = idle.pop() {
            if since.elapsed() < IDLE_TIMEOUT && idle_ok(&s) {
                return Some(s);
            }
        }
        None
    })
    .ok()
    .flatten()
}

/// Keeps a connection to instance `id` (between two messages) for a later request.
pub fn put_raw(id: u64, s: TcpStream) {
    let _ = RAW.try_with(|p| {
        let Ok(mut p) = p.try_borrow_mut() else {
            return;
        };
        let now = Instant::now();
        if p.swept.is_none_or(|s| now.duration_since(s) >= SWEEP_EVERY) {
            p.idle.retain(|_, v| {
                v.retain(|(s, since)| now.duration_since(*since) < IDLE_TIMEOUT && idle_ok(s));
                !v.is_empty()
            });
            p.swept = Some(now);
        }
        let idle = p.idle.entry(id).or_default();
        if idle.len() < MAX_IDLE {
            idle.push((s, now));
        }
    });
}

/// Opens a connection to `addr` for the fast path.
pub async fn connect_raw(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect(addr).await?;
    let _ = s.set_nodelay(true);
    Ok(s)
}
