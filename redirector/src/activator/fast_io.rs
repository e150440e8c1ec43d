//! The fast path's connection plumbing (`fast.rs`): the connection task that runs the fast
//! path's future and then, in its place, hyper's; reads sized to what arrived (a first
//! request through a per-thread scratch buffer) or into a buffer with room; and reads and
//! writes bounded by the client timeouts.
use std::time::Duration;

use bytes::BytesMut;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Read size for both sides (buffers stay around this size).
pub const READ: usize = 16 * 1024;

pin_project_lite::pin_project! {
    /// A connection's task: the fast path's future, then (in its place, not beside it: an
    /// `async` block awaiting one after the other would keep room for both) hyper's.
    pub struct ConnTask<F, H, T> {
        #[pin]
        phase: Phase<F, H>,
        _tracker: T,
    }
}

pin_project_lite::pin_project! {
    #[project = PhaseProj]
    #[project_replace = PhaseReplace]
    pub enum Phase<F, H> {
        Fast { #[pin] fut: F },
        Hyper { #[pin] fut: H },
        Done,
    }
}

impl<F, H, T> ConnTask<F, H, T> {
    pub fn new(phase: Phase<F, H>, tracker: T) -> Self {
        Self {
            phase,
            _tracker: tracker,
        }
    }
}

impl<F, H, T> std::future::Future for ConnTask<F, H, T>
where
    F: std::future::Future<Output = Option<H>>,
    H: std::future::Future<Output = ()>,
{
    type Output = ();
    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        use std::task::Poll;
        let mut phase = self.project().phase;
        loop {
            match phase.as_mut().project() {
                PhaseProj::Fast { fut } => match fut.poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Some(h)) => {
                        phase.as_mut().project_replace(Phase::Hyper { fut: h });
                    }
                    Poll::Ready(None) => {
                        phase.as_mut().project_replace(Phase::Done);
                        return Poll::Ready(());
                    }
                },
                PhaseProj::Hyper { fut } => {
                    if fut.poll(cx).is_ready() {
                        phase.as_mut().project_replace(Phase::Done);
                        return Poll::Ready(());
                    }
                    return Poll::Pending;
                }
                PhaseProj::Done => return Poll::Ready(()),
            }
        }
    }
}

thread_local! {
    /// Where first requests are read (copied out at their exact size): a connection that
    /// is handed to hyper never has a read buffer of its own.
    static SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; READ].into_boxed_slice());
}

/// Reads what `io` has into `buf`, growing it by exactly the bytes read; 0 at end of stream.
pub async fn read_exact_size(io: &TcpStream, buf: &mut BytesMut) -> std::io::Result<usize> {
    loop {
        io.readable().await?;
        let r: std::io::Result<usize> = SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            let n = io.try_read(&mut s)?;
            buf.extend_from_slice(&s[..n]);
            Ok(n)
        });
        match r {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

/// Reads into `buf` (at least `READ` bytes of room); 0 at end of stream.
pub async fn fill(io: &mut TcpStream, buf: &mut BytesMut) -> std::io::Result<usize> {
    if buf.capacity() - buf.len() < READ / 2 {
        buf.reserve(READ);
    }
    io.read_buf(buf).await
}

/// Writes all of `buf` to the client, failing when it takes nothing for `limit`.
pub async fn write_client(io: &mut TcpStream, buf: &[u8], limit: Duration) -> std::io::Result<()> {
    match tokio::time::timeout(limit, io.write_all(buf)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "client did not read for the write timeout",
        )),
    }
}

/// `read` unless `deadline` passes first (then an error, as for a broken connection).
pub async fn by<F: std::future::Future<Output = std::io::Result<usize>>>(
    deadline: tokio::time::Instant,
    read: F,
) -> std::io::Result<usize> {
    tokio::time::timeout_at(deadline, read)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}
