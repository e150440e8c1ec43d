//! The HTTP/1.1 fast path: owns an accepted HTTP connection while its requests are plain
//! HTTP/1.1 ones (`wire::request`) for a warm HTTP service. One task serves the client
//! connection and its own connection to the instance (kept while the same instance serves
//! the next request, then pooled by instance id: one made to a gone instance is never
//! reused), parsing heads with `httparse` and writing each message with one write when its
//! head and body are at hand; response bodies (Content-Length, chunked or until close) are
//! streamed through a bounded buffer. 502 when the instance fails before its response head
//! (a request to a reused idle connection that failed before any answer is retried once
//! when idempotent), 504 past the service's timeout.
//!
//! Everything else is handed to hyper (`http::serve_conn`) at a message boundary, with the
//! bytes read so far, and stays there: h2c, upgrades, `Expect`, chunked or large request
//! bodies, probes, HTTP/1.0, unknown services (404), H2c services, and requests no instance
//! can take right now (held: cold starts, containerConcurrency full).
use std::{net::SocketAddr, sync::atomic::Ordering, sync::Arc, time::Duration};

use bytes::{Buf, BytesMut};
use hyper_util::server::graceful::Watcher;
use tokio::{io::AsyncWriteExt, net::TcpStream, sync::watch};

use super::{
    fast_io::{by, fill, read_exact_size, write_client, ConnTask, Phase},
    http,
    queue::Slot,
    upstream::{connect_raw, idle_ok, put_raw, take_raw},
    wire::{self, Chunks, Framing, Parsed, Req, Resp},
    Activator, Instance, ServiceState,
};
use crate::config::Protocol;

/// An instance connection idle longer than this is checked before it is written to.
const CHECK_IDLE_AFTER: Duration = Duration::from_millis(500);

/// Serves `stream` (accepted from `peer`) on its own task: the fast path, then hyper if a
/// request needs it. `tracker` and `watcher` keep a drain waiting for it.
///
/// A connection costs nothing here until the fast path really serves it: the first request
/// is read through a per-thread scratch buffer into an exact-size one, and a connection
/// handed to hyper at once (a held request: 10,000 of them at a time) keeps only hyper's
/// own state, on this same task. The fast path's state (its 16 KiB read buffer, its future)
/// is allocated once a request is taken.
pub fn spawn(
    act: Arc<Activator>,
    svc: Option<Arc<ServiceState>>,
    stream: TcpStream,
    peer: SocketAddr,
    watcher: Watcher,
    tracker: impl Send + 'static,
) {
    let stop = act.shutdown.subscribe();
    let limits = act.limits();
    let mut conn = Fast {
        limits: Limits {
            header: limits.header_read_timeout,
            idle: limits.idle_timeout,
            write: limits.write_timeout,
        },
        act,
        svc,
        peer,
        xff: Vec::new(),
        client: stream,
        buf: BytesMut::new(),
        rbuf: BytesMut::new(),
        out: Vec::new(),
        hout: Vec::new(),
        up: None,
        stop,
    };
    // The fast path's part of the connection; yields hyper's future when hyper takes over.
    let fast = async move {
        let next = match conn.first().await {
            // Boxed: its state is only allocated for connections it serves.
            First::Take(take) => Box::pin(conn.run(Some(take))).await,
            First::Hyper => Next::Hyper,
            First::Done => Next::Done,
        };
        match next {
            Next::Done => {
                conn.finish().await;
                None
            }
            Next::Cut => None,
            Next::Hyper => Some(conn.into_hyper(watcher)),
        }
    };
    let task = ConnTask::new(Phase::Fast { fut: fast }, tracker);
    tokio::spawn(task);
}

/// A request the fast path takes: its service, the instance slot and the parsed head (the
/// head and body at the front of `buf`, the head for the instance in `out`).
type Take = (Arc<ServiceState>, Slot, Req);

/// What the first request of a connection decided.
enum First {
    Take(Take),
    Hyper,
    /// The client went away (or the activator drains) before a whole request.
    Done,
}

/// How the fast path left a connection.
enum Next {
    /// Closed cleanly (`finish`).
    Done,
    /// A response was cut off mid-body: nothing more can go to the client.
    Cut,
    /// Hyper serves it from here on.
    Hyper,
}

struct Upstream {
    io: TcpStream,
    id: u64,
    last: std::time::Instant,
}

/// The client-side timeouts of `ActivatorConfig` the fast path applies.
#[derive(Clone, Copy)]
struct Limits {
    /// From a connection's accept (or a request's first byte) to its whole request.
    header: Duration,
    /// Between two requests of a connection.
    idle: Duration,
    /// For each write to the client.
    write: Duration,
}

struct Fast {
    limits: Limits,
    act: Arc<Activator>,
    svc: Option<Arc<ServiceState>>,
    peer: SocketAddr,
    xff: Vec<u8>,
    client: TcpStream,
    /// Bytes from the client not yet forwarded.
    buf: BytesMut,
    /// Bytes from the instance not yet forwarded.
    rbuf: BytesMut,
    /// The request head (and small body) for the instance.
    out: Vec<u8>,
    /// What goes to the client next.
    hout: Vec<u8>,
    up: Option<Upstream>,
    stop: watch::Receiver<bool>,
}

/// Why an exchange with the instance failed before its response head.
#[derive(Debug, thiserror::Error)]
enum UpError {
    /// The instance refused (or never answered) the connection: nothing was sent.
    #[error("connecting: {0}")]
    Connect(std::io::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the instance closed the connection before answering")]
    Closed,
    #[error(transparent)]
    Wire(#[from] wire::Error),
}

/// One of the activator's own short responses.
fn text(out: &mut Vec<u8>, status: &str, msg: &str, head: bool, close: bool) {
    use std::io::Write as _;
    out.clear();
    let _ = write!(
        out,
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n{}\r\n",
        msg.len() + 1,
        if close { "connection: close\r\n" } else { "" }
    );
    if !head {
        out.extend_from_slice(msg.as_bytes());
        out.push(b'\n');
    }
}

impl Fast {
    /// Reads and parses the connection's first request (at its exact size, see `spawn`)
    /// and decides who serves it.
    async fn first(&mut self) -> First {
        let deadline = tokio::time::Instant::now() + self.limits.header;
        let req = loop {
            let r = if self.buf.is_empty() {
                if *self.stop.borrow() {
                    return First::Done;
                }
                tokio::select! {
                    r = by(deadline, read_exact_size(&self.client, &mut self.buf)) => r,
                    _ = self.stop.changed() => return First::Done,
                }
            } else {
                by(deadline, read_exact_size(&self.client, &mut self.buf)).await
            };
            if !matches!(r, Ok(n) if n > 0) {
                return First::Done;
            }
            match wire::request(&self.buf, &mut self.out) {
                Parsed::Partial => {}
                Parsed::Hyper => return First::Hyper,
                Parsed::Take(req) => break req,
            }
        };
        let Some(svc) = self.service(&req).filter(|s| s.protocol != Protocol::H2c) else {
            return First::Hyper;
        };
        while self.buf.len() < req.head_len + req.body_len {
            let r = by(deadline, read_exact_size(&self.client, &mut self.buf)).await;
            if !matches!(r, Ok(n) if n > 0) {
                return First::Done;
            }
        }
        // Warm only: a request that would wait goes to the hold in the hyper path.
        match svc.try_acquire() {
            Some(slot) => First::Take((svc, slot, req)),
            None => First::Hyper,
        }
    }

    /// Serves requests (`first`, then the next ones) until the connection ends or one
    /// needs hyper.
    async fn run(&mut self, mut first: Option<Take>) -> Next {
        if self.xff.is_empty() {
            self.xff = self.peer.ip().to_string().into_bytes();
        }
        loop {
            let (svc, slot, req) = match first.take() {
                Some(take) => take,
                None => match self.next().await {
                    Ok(take) => take,
                    Err(next) => return next,
                },
            };
            match self.forward(&svc, slot, &req).await {
                Ok(true) => {}
                Ok(false) => return Next::Done,
                Err(e) => {
                    tracing::debug!(service = %svc.name, error = %e, "fast path: response cut off");
                    return Next::Cut;
                }
            }
        }
    }

    /// The next request of a connection the fast path serves, read into its full buffer.
    async fn next(&mut self) -> Result<Take, Next> {
        let now = tokio::time::Instant::now();
        let mut started = !self.buf.is_empty();
        let mut deadline = now
            + if started {
                self.limits.header
            } else {
                self.limits.idle
            };
        let parsed = loop {
            if !self.buf.is_empty() {
                match wire::request(&self.buf, &mut self.out) {
                    Parsed::Partial => {}
                    p => break p,
                }
            }
            let r = if self.buf.is_empty() {
                if *self.stop.borrow() {
                    return Err(Next::Done);
                }
                tokio::select! {
                    r = by(deadline, fill(&mut self.client, &mut self.buf)) => r,
                    _ = self.stop.changed() => return Err(Next::Done),
                }
            } else {
                by(deadline, fill(&mut self.client, &mut self.buf)).await
            };
            if !matches!(r, Ok(n) if n > 0) {
                return Err(Next::Done);
            }
            if !started {
                // The request's first byte: from here its head has the header timeout.
                started = true;
                deadline = tokio::time::Instant::now() + self.limits.header;
            }
        };
        let Parsed::Take(req) = parsed else {
            return Err(Next::Hyper);
        };
        let Some(svc) = self.service(&req).filter(|s| s.protocol != Protocol::H2c) else {
            return Err(Next::Hyper);
        };
        while self.buf.len() < req.head_len + req.body_len {
            let r = by(deadline, fill(&mut self.client, &mut self.buf)).await;
            if !matches!(r, Ok(n) if n > 0) {
                return Err(Next::Done);
            }
        }
        match svc.try_acquire() {
            Some(slot) => Ok((svc, slot, req)),
            None => Err(Next::Hyper),
        }
    }

    /// The service a request is for: by its Knative headers, else the connection's.
    fn service(&self, req: &Req) -> Option<Arc<ServiceState>> {
        req.revision
            .as_deref()
            .and_then(|rev| self.act.service_by_revision(req.namespace.as_deref(), rev))
            .or_else(|| self.svc.clone())
    }

    /// Forwards one request (its head and body at the front of `buf`) and its response;
    /// whether the client connection goes on. Err: failed after the response head went out.
    async fn forward(
        &mut self,
        svc: &Arc<ServiceState>,
        mut slot: Slot,
        req: &Req,
    ) -> std::io::Result<bool> {
        let mut inst = slot.instance.clone();
        // The response must start within the revision's responseStartTimeoutSeconds (at most
        // its timeoutSeconds).
        let deadline = tokio::time::Instant::now() + svc.response_start_timeout();
        let host = if req.has_host {
            String::new()
        } else {
            inst.addr.to_string()
        };
        wire::finish_request(&mut self.out, req, &host, &self.xff);
        let end = req.head_len + req.body_len;
        self.out.extend_from_slice(&self.buf[req.head_len..end]);
        self.buf.advance(end);
        let close = req.close || *self.stop.borrow();
        // An instance that refuses the connection (it just went away, before its endpoint
        // did) got nothing: the request takes another one, or waits for one, as Knative's
        // activator retries its dial.
        // `None`: past the deadline.
        let mut exchanged = tokio::time::timeout_at(deadline, self.exchange(&inst, req))
            .await
            .ok();
        while let Some(Err(UpError::Connect(e))) = &exchanged {
            inst.mark_failed();
            tracing::debug!(service = %svc.name, instance = %inst.addr, error = %e, "instance refused the connection: another one takes the request");
            // (The old slot is given back as the new one is taken: it is the failed one's.)
            let Ok(next) = tokio::time::timeout_at(deadline, svc.acquire()).await else {
                exchanged = None;
                break;
            };
            slot = next;
            inst = slot.instance.clone();
            exchanged = tokio::time::timeout_at(deadline, self.exchange(&inst, req))
                .await
                .ok();
        }
        let inst = &*inst;
        let failed = match exchanged {
            Some(Ok(resp)) => Ok(resp),
            None => {
                svc.timed_out.fetch_add(1, Ordering::Relaxed);
                Err((
                    "504 Gateway Timeout",
                    "redirector activator: instance did not answer in time",
                ))
            }
            Some(Err(e)) => {
                inst.mark_failed();
                tracing::debug!(service = %svc.name, instance = %inst.addr, error = %e, "forwarding failed");
                Err((
                    "502 Bad Gateway",
                    "redirector activator: the instance failed",
                ))
            }
        };
        let resp = match failed {
            Ok(r) => r,
            Err((status, msg)) => {
                self.up = None; // mid-message: never reused
                self.rbuf.clear();
                drop(slot);
                text(&mut self.hout, status, msg, req.head_method, close);
                write_client(&mut self.client, &self.hout, self.limits.write).await?;
                self.hout.clear();
                return Ok(!close);
            }
        };
        svc.forwarded.fetch_add(1, Ordering::Relaxed);
        let done = self.relay(&resp, close, slot, svc.idle_timeout()).await?;
        match self.up.as_mut() {
            Some(u) if resp.reusable && done && self.rbuf.is_empty() => {
                u.last = std::time::Instant::now();
            }
            _ => {
                self.up = None;
                self.rbuf.clear();
            }
        }
        Ok(!close)
    }

    /// Sends the request in `out` to `inst` and reads the response head (into `hout`, its
    /// bytes at the front of `rbuf`), skipping 1xx ones.
    async fn exchange(&mut self, inst: &Instance, req: &Req) -> Result<Resp, UpError> {
        let mut retried = false;
        loop {
            let reused = match self.up.take() {
                Some(u)
                    if u.id == inst.id
                        && (u.last.elapsed() < CHECK_IDLE_AFTER || idle_ok(&u.io)) =>
                {
                    self.up = Some(u);
                    true
                }
                other => {
                    if let Some(u) = other.filter(|u| u.id != inst.id) {
                        put_raw(u.id, u.io);
                    }
                    let (io, reused) = match take_raw(inst.id) {
                        Some(io) => (io, true),
                        None => (
                            Box::pin(connect_raw(inst.addr))
                                .await
                                .map_err(UpError::Connect)?,
                            false,
                        ),
                    };
                    self.up = Some(Upstream {
                        io,
                        id: inst.id,
                        last: std::time::Instant::now(),
                    });
                    reused
                }
            };
            self.rbuf.clear();
            match self.send_and_read_head(req.head_method).await {
                Err(UpError::Io(_) | UpError::Closed)
                    if reused && !retried && req.idempotent && self.rbuf.is_empty() =>
                {
                    // The instance closed an idle connection as the request went out.
                    self.up = None;
                    retried = true;
                }
                r => return r,
            }
        }
    }

    async fn send_and_read_head(&mut self, head_req: bool) -> Result<Resp, UpError> {
        let Some(up) = self.up.as_mut() else {
            return Err(UpError::Closed);
        };
        up.io.write_all(&self.out).await?;
        loop {
            if !self.rbuf.is_empty() {
                if let Some(r) = wire::response(&self.rbuf, head_req, &mut self.hout)? {
                    if r.status >= 200 {
                        return Ok(r);
                    }
                    self.rbuf.advance(r.head_len); // 1xx: not forwarded, as hyper does
                    continue;
                }
            }
            if fill(&mut up.io, &mut self.rbuf).await? == 0 {
                return Err(UpError::Closed);
            }
        }
    }

    /// Sends the response head in `hout` and its body to the client; whether the body
    /// ended where its framing says (false: the instance closed early). The instance slot
    /// is given back as soon as the instance has sent the whole response.
    async fn relay(
        &mut self,
        resp: &Resp,
        close: bool,
        slot: Slot,
        idle: Option<Duration>,
    ) -> std::io::Result<bool> {
        let mut slot = Some(slot);
        if close {
            self.hout.extend_from_slice(b"connection: close\r\n");
        }
        self.hout.extend_from_slice(b"\r\n");
        self.rbuf.advance(resp.head_len);
        let mut left = match resp.framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        let mut chunks = Chunks::default();
        let mut done = false;
        loop {
            // Forward what the buffer holds of the body.
            match resp.framing {
                Framing::None => done = true,
                Framing::Length(_) => {
                    let n = left.min(self.rbuf.len() as u64) as usize;
                    self.hout.extend_from_slice(&self.rbuf[..n]);
                    self.rbuf.advance(n);
                    left -= n as u64;
                    done = left == 0;
                }
                Framing::Chunked => {
                    let n = chunks.scan(&self.rbuf).map_err(std::io::Error::other)?;
                    self.hout.extend_from_slice(&self.rbuf[..n]);
                    self.rbuf.advance(n);
                    done = chunks.done();
                }
                Framing::Close => {
                    if !self.rbuf.is_empty() {
                        use std::io::Write as _;
                        let _ = write!(self.hout, "{:x}\r\n", self.rbuf.len());
                        self.hout.extend_from_slice(&self.rbuf);
                        self.hout.extend_from_slice(b"\r\n");
                        self.rbuf.clear();
                    }
                }
            }
            if done {
                slot = None;
            }
            if !self.hout.is_empty() {
                write_client(&mut self.client, &self.hout, self.limits.write).await?;
                self.hout.clear();
            }
            if done {
                return Ok(true);
            }
            let Some(up) = self.up.as_mut() else {
                return Err(std::io::ErrorKind::NotConnected.into());
            };
            let filled = match idle {
                // The revision's idleTimeoutSeconds: a response that pauses longer is cut.
                Some(d) => tokio::time::timeout(d, fill(&mut up.io, &mut self.rbuf))
                    .await
                    .map_err(|_| {
                        std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "the instance's response paused past idleTimeoutSeconds",
                        )
                    })??,
                None => fill(&mut up.io, &mut self.rbuf).await?,
            };
            if filled == 0 {
                if resp.framing == Framing::Close {
                    drop(slot.take());
                    write_client(&mut self.client, b"0\r\n\r\n", self.limits.write).await?;
                    return Ok(false);
                }
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// The client connection ends: its instance connection is kept for another.
    async fn finish(&mut self) {
        if let Some(u) = self.up.take() {
            if self.rbuf.is_empty() {
                put_raw(u.id, u.io);
            }
        }
        let _ = self.client.shutdown().await;
    }

    /// Hands the connection (and what was read from it) to hyper: everything of the fast
    /// path is freed before hyper's connection future is awaited (it lives as long as a
    /// held request).
    fn into_hyper(mut self, watcher: Watcher) -> impl std::future::Future<Output = ()> {
        if let Some(u) = self.up.take() {
            put_raw(u.id, u.io);
        }
        // The bytes read, without spare room: a first request's buffer is already of that
        // size; the fast path's own (16 KiB) read buffer is not kept for a held request.
        let buf = std::mem::take(&mut self.buf);
        let pre = if buf.capacity() == buf.len() {
            buf.freeze()
        } else {
            bytes::Bytes::copy_from_slice(&buf)
        };
        http::serve_conn(
            self.act,
            self.svc,
            wire::Rewind::new(pre, self.client),
            self.peer,
            watcher,
        )
    }
}
