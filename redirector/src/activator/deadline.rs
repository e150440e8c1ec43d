//! Deadlines on what a client controls, for the hyper path: `WriteTimeout`, a client
//! connection whose writes fail once the client has taken nothing for the write timeout (a
//! client that never reads cannot keep an instance slot), and `ClientBody`, a request body
//! that fails once the client has sent nothing for the body timeout and records that it
//! was the client's fault (a malformed, aborted or stalled upload is answered 400/408 and
//! never blamed on the instance).
use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Sleep,
};

/// A timer started when an operation first stalls and cleared when it makes progress.
struct Stall {
    limit: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Stall {
    fn new(limit: Duration) -> Self {
        Self { limit, sleep: None }
    }

    /// Called when the operation is pending: true once it has been for `limit`.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let limit = self.limit;
        let s = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        s.as_mut().poll(cx).is_ready()
    }

    fn progress(&mut self) {
        self.sleep = None;
    }

    /// `r` as is, or a timeout error when it has been pending too long.
    fn check<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match r {
            Poll::Pending if self.expired(cx) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "client did not read for the write timeout",
            ))),
            Poll::Pending => Poll::Pending,
            r => {
                self.progress();
                r
            }
        }
    }
}

/// A client connection whose writes fail after stalling for the write timeout.
pub struct WriteTimeout<T> {
    io: T,
    stall: Stall,
}

impl<T> WriteTimeout<T> {
    pub fn new(io: T, limit: Duration) -> Self {
        Self {
            io,
            stall: Stall::new(limit),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteTimeout<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = &mut *self;
        let r = Pin::new(&mut me.io).poll_write(cx, buf);
        me.stall.check(cx, r)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let me = &mut *self;
        let r = Pin::new(&mut me.io).poll_write_vectored(cx, bufs);
        me.stall.check(cx, r)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = &mut *self;
        let r = Pin::new(&mut me.io).poll_flush(cx);
        me.stall.check(cx, r)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = &mut *self;
        let r = Pin::new(&mut me.io).poll_shutdown(cx);
        me.stall.check(cx, r)
    }
}

/// How a client's request body went, as seen by the request it was forwarded with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFault {
    None = 0,
    /// Malformed (bad chunked framing) or cut off (the client went away midway).
    Broken = 1,
    /// Nothing came for the body timeout.
    Stalled = 2,
}

/// Why a client's request body ended early.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("client request body: {0}")]
    Client(#[from] hyper::Error),
    #[error("client request body: nothing received for {0:?}")]
    Stalled(Duration),
}

/// A client's request body on its way to an instance (see the module doc).
pub struct ClientBody {
    inner: Incoming,
    stall: Stall,
    fault: Arc<AtomicU8>,
}

impl ClientBody {
    /// The body and a handle telling afterwards whether the client broke it.
    pub fn new(inner: Incoming, limit: Duration) -> (Self, Fault) {
        let fault = Arc::new(AtomicU8::new(BodyFault::None as u8));
        (
            Self {
                inner,
                stall: Stall::new(limit),
                fault: fault.clone(),
            },
            Fault(fault),
        )
    }

    fn fail(&self, f: BodyFault) {
        self.fault.store(f as u8, Ordering::Relaxed);
    }
}

/// Reads a request body's fault after the request went (or failed to go) out.
#[derive(Debug, Clone)]
pub struct Fault(Arc<AtomicU8>);

impl Fault {
    pub fn get(&self) -> BodyFault {
        match self.0.load(Ordering::Relaxed) {
            1 => BodyFault::Broken,
            2 => BodyFault::Stalled,
            _ => BodyFault::None,
        }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BodyError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let me = &mut *self;
        match Pin::new(&mut me.inner).poll_frame(cx) {
            Poll::Pending => {
                if me.stall.expired(cx) {
                    me.fail(BodyFault::Stalled);
                    return Poll::Ready(Some(Err(BodyError::Stalled(me.stall.limit))));
                }
                Poll::Pending
            }
            Poll::Ready(Some(Err(e))) => {
                me.fail(BodyFault::Broken);
                Poll::Ready(Some(Err(e.into())))
            }
            r => {
                me.stall.progress();
                r.map(|f| f.map(|f| f.map_err(BodyError::from)))
            }
        }
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
