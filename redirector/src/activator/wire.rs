//! HTTP/1.1 message heads for the fast path (`fast.rs`): which requests it may take (plain
//! HTTP/1.1, origin form, no body or a small Content-Length one, no upgrade, expectation or
//! probe) and their rewritten head for the instance; the instance's response head rewritten
//! for the client and its body framing (`chunks.rs` finds where a chunked body ends); and
//! `Rewind`, a connection with bytes already read put back in front, for handing a
//! connection to hyper.
use std::{
    io::{self, Write as _},
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::http::MAX_HEAD;

/// Most headers a message may have here (hyper's own limit is 100).
const MAX_HEADERS: usize = 100;
/// Request bodies up to this size are read whole and sent with the head; larger ones go
/// through hyper (streamed).
pub const MAX_BODY: u64 = 64 * 1024;

pub use super::chunks::Chunks;

/// Why a message could not be forwarded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("malformed response head: {0}")]
    Parse(#[from] httparse::Error),
    #[error("malformed chunked body")]
    Chunk,
    #[error("unsupported response: {0}")]
    Unsupported(&'static str),
}

/// A hop-by-hop header (the hyper path's list): not forwarded.
fn hop_by_hop(name: &str) -> bool {
    super::http::HOP_BY_HOP.iter().any(|h| is(name, h.as_str()))
}

fn is(name: &str, want: &str) -> bool {
    name.eq_ignore_ascii_case(want)
}

/// True when a value is text as hyper reads it (`HeaderValue::to_str`: visible ASCII, space,
/// tab); hyper ignores the tokens of any other.
fn is_text(v: &[u8]) -> bool {
    v.iter().all(|b| (0x20..0x7f).contains(b) || *b == b'\t')
}

/// True when a comma-separated header value lists `token`.
fn has_token(v: &[u8], token: &str) -> bool {
    is_text(v)
        && v.split(|b| *b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

fn put_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A request the fast path takes.
#[derive(Debug)]
pub struct Req {
    /// Bytes of the head in the client's buffer.
    pub head_len: usize,
    pub body_len: usize,
    pub head_method: bool,
    /// The client asked to close after this response.
    pub close: bool,
    /// A retry on another connection cannot do harm (RFC 9110 idempotent methods).
    pub idempotent: bool,
    pub has_host: bool,
    /// `Knative-Serving-Namespace` / `-Revision`, when given.
    pub namespace: Option<String>,
    pub revision: Option<String>,
}

/// What to do with the bytes at the front of a client connection.
#[derive(Debug)]
pub enum Parsed {
    /// A request for the fast path; its head for the instance is in `out` without the
    /// final blank line (Host, K-Proxy-Request and X-Forwarded-For still to add).
    Take(Req),
    Partial,
    /// Anything else: hyper serves the connection from here on.
    Hyper,
}

/// Parses a request head from `buf`, writing the head to send into `out`.
pub fn request(buf: &[u8], out: &mut Vec<u8>) -> Parsed {
    if buf.starts_with(b"PRI ") {
        return Parsed::Hyper; // h2c prior knowledge
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut r = httparse::Request::new(&mut headers);
    let head_len = match r.parse(buf) {
        // A head near hyper's buffer limit is hyper's to judge (431 past it).
        Ok(httparse::Status::Complete(n)) if n < MAX_HEAD / 2 => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD / 2 => return Parsed::Partial,
        _ => return Parsed::Hyper, // hyper answers the error
    };
    let (Some(method), Some(path), Some(1)) = (r.method, r.path, r.version) else {
        return Parsed::Hyper;
    };
    if method == "CONNECT" || !(path.starts_with('/') || path == "*") {
        return Parsed::Hyper;
    }
    // The URI as hyper reads it (`http::Uri`): one grammar for both paths (a character it
    // refuses gets hyper's 400, a fragment is dropped).
    let Some(path) = origin_form(path) else {
        return Parsed::Hyper;
    };
    let mut req = Req {
        head_len,
        body_len: 0,
        head_method: method == "HEAD",
        close: false,
        idempotent: matches!(
            method,
            "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE" | "TRACE"
        ),
        has_host: false,
        namespace: None,
        revision: None,
    };
    let mut content_length = None;
    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_str().as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for h in r.headers.iter() {
        let (n, v) = (h.name, h.value);
        if is(n, "content-length") {
            // hyper's server grammar: 1*DIGIT per field line (no sign, list or space).
            let Some(len) = digits(v) else {
                return Parsed::Hyper;
            };
            if content_length.is_some_and(|l| l != len) {
                return Parsed::Hyper;
            }
            content_length = Some(len);
            continue;
        } else if is(n, "transfer-encoding")
            || is(n, "upgrade")
            || is(n, "expect")
            || (is(n, "k-network-probe") && v == b"activator")
            || is(n, "k-kubelet-probe")
        {
            return Parsed::Hyper;
        } else if is(n, "connection") {
            if has_token(v, "upgrade") {
                return Parsed::Hyper;
            }
            req.close |= has_token(v, "close");
            continue;
        } else if hop_by_hop(n) || is(n, "k-proxy-request") {
            continue;
        } else if is(n, "host") {
            req.has_host = true;
        } else if is(n, "knative-serving-revision") {
            req.revision = std::str::from_utf8(v).ok().map(str::to_owned);
        } else if is(n, "knative-serving-namespace") {
            req.namespace = std::str::from_utf8(v).ok().map(str::to_owned);
        }
        put_header(out, n, v);
    }
    match content_length {
        Some(l) if l > MAX_BODY => return Parsed::Hyper,
        Some(l) => {
            req.body_len = l as usize;
            let _ = write!(out, "content-length: {l}\r\n");
        }
        None => {}
    }
    Parsed::Take(req)
}

/// A request target in origin form (or `*`) as hyper parses it, or None.
fn origin_form(path: &str) -> Option<hyper::http::uri::PathAndQuery> {
    let uri = hyper::http::Uri::try_from(path).ok()?;
    if uri.scheme().is_some() || uri.authority().is_some() {
        return None;
    }
    uri.into_parts().path_and_query
}

/// A field value of ASCII digits only (hyper's `from_digits`), or None.
fn digits(v: &[u8]) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    let mut n = 0u64;
    for b in v {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(n)
}

/// Longest body length hyper's decoder accepts.
const MAX_LENGTH: u64 = u64::MAX - 2;

/// A response's Content-Length line as hyper's client reads it: a comma-separated list of
/// digit runs (spaces around them allowed), all equal to each other and to `prev`.
fn response_length(v: &[u8], mut prev: Option<u64>) -> Result<u64, Error> {
    if !is_text(v) {
        return Err(Error::Unsupported("bad content-length"));
    }
    for part in v.split(|b| *b == b',') {
        let n = digits(part.trim_ascii())
            .filter(|n| *n <= MAX_LENGTH)
            .ok_or(Error::Unsupported("bad content-length"))?;
        if prev.is_some_and(|p| p != n) {
            return Err(Error::Unsupported("conflicting content-length"));
        }
        prev = Some(n);
    }
    prev.ok_or(Error::Unsupported("bad content-length"))
}

/// True when a Transfer-Encoding value's final coding is `chunked`.
fn final_chunked(v: &[u8]) -> bool {
    if !is_text(v) {
        return false;
    }
    let last = v.rsplit(|b| *b == b',').next().unwrap_or_default();
    last.trim_ascii().eq_ignore_ascii_case(b"chunked")
}

/// The checks `response` makes on framing, for the hyper path to make the same on a
/// response hyper accepted: no Content-Length beside Transfer-Encoding (RFC 9112 §6.3), a
/// final coding of `chunked`, no Transfer-Encoding in HTTP/1.0, no 101 unasked, and
/// Content-Length values as `response` reads them.
pub fn check_response(
    version: hyper::Version,
    status: u16,
    upgrade: bool,
    headers: &hyper::HeaderMap,
) -> Result<(), Error> {
    if status == 101 && !upgrade {
        return Err(Error::Unsupported("101 without an upgrade"));
    }
    check_response_lengths(headers)?;
    let te = headers.get_all(hyper::header::TRANSFER_ENCODING);
    if te.iter().next().is_none() {
        return Ok(());
    }
    if version == hyper::Version::HTTP_10 {
        return Err(Error::Unsupported("transfer-encoding in HTTP/1.0"));
    }
    if !te.iter().all(|v| final_chunked(v.as_bytes())) {
        return Err(Error::Unsupported("transfer-encoding other than chunked"));
    }
    if headers.contains_key(hyper::header::CONTENT_LENGTH) {
        return Err(Error::Unsupported("content-length with transfer-encoding"));
    }
    Ok(())
}

/// The Content-Length grammar of `response`, which hyper does not check where a response
/// has no body (HEAD, 204, 304).
fn check_response_lengths(headers: &hyper::HeaderMap) -> Result<(), Error> {
    let mut len = None;
    for v in headers.get_all(hyper::header::CONTENT_LENGTH) {
        len = Some(response_length(v.as_bytes(), len)?);
    }
    Ok(())
}

/// Finishes a request head in `out`: Host when the client sent none, the activator's
/// marker, the client's address.
pub fn finish_request(out: &mut Vec<u8>, req: &Req, host: &str, xff: &[u8]) {
    if !req.has_host {
        put_header(out, "host", host.as_bytes());
    }
    out.extend_from_slice(b"k-proxy-request: activator\r\n");
    if !xff.is_empty() {
        put_header(out, "x-forwarded-for", xff);
    }
    out.extend_from_slice(b"\r\n");
}

/// How a response body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    /// Forwarded as is; `Chunks` finds its end.
    Chunked,
    /// Until the instance closes; sent to the client re-chunked.
    Close,
}

/// A response head from an instance.
#[derive(Debug)]
pub struct Resp {
    pub head_len: usize,
    pub status: u16,
    pub framing: Framing,
    /// The instance connection can take another request after this response.
    pub reusable: bool,
}

/// Parses a response head from `buf` (None: incomplete). Informational (1xx) responses
/// come back with `Framing::None` and `status` < 200, for the caller to skip. The head for
/// the client goes to `out` without its final blank line.
pub fn response(buf: &[u8], head_req: bool, out: &mut Vec<u8>) -> Result<Option<Resp>, Error> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut r = httparse::Response::new(&mut headers);
    let head_len = match r.parse(buf)? {
        // The hyper path's limit too (its client's buffer).
        httparse::Status::Complete(n) if n < MAX_HEAD => n,
        httparse::Status::Partial if buf.len() < MAX_HEAD => return Ok(None),
        _ => return Err(Error::Unsupported("head too large")),
    };
    let status = r.code.unwrap_or(0);
    if status == 101 {
        return Err(Error::Unsupported("101 without an upgrade"));
    }
    if status < 100 {
        return Err(Error::Unsupported("status code below 100"));
    }
    if status < 200 {
        // Skipped unread, as hyper does.
        return Ok(Some(Resp {
            head_len,
            status,
            framing: Framing::None,
            reusable: true,
        }));
    }
    let mut reusable = r.version == Some(1);
    let mut length: Option<u64> = None;
    let mut chunked = false;
    out.clear();
    let _ = write!(out, "HTTP/1.1 {status} ");
    out.extend_from_slice(r.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in r.headers.iter() {
        let (n, v) = (h.name, h.value);
        if is(n, "content-length") {
            let first = length.is_none();
            let len = response_length(v, length)?;
            length = Some(len);
            if first {
                // Once, as digits ("+5" or "5, 5" are not passed on).
                let _ = write!(out, "{n}: {len}\r\n");
            }
            continue;
        } else if is(n, "transfer-encoding") {
            if r.version == Some(0) {
                return Err(Error::Unsupported("transfer-encoding in HTTP/1.0"));
            }
            if !final_chunked(v) {
                return Err(Error::Unsupported("transfer-encoding other than chunked"));
            }
            chunked = true;
        } else if is(n, "connection") {
            reusable &= !has_token(v, "close");
            continue;
        } else if hop_by_hop(n) {
            continue;
        }
        put_header(out, n, v);
    }
    if chunked && length.is_some() {
        // RFC 9112 §6.3: a smuggling attempt; hyper's path refuses it too.
        return Err(Error::Unsupported("content-length with transfer-encoding"));
    }
    let framing = if status < 200 || status == 204 || status == 304 || head_req {
        Framing::None
    } else if chunked {
        Framing::Chunked
    } else if let Some(l) = length {
        Framing::Length(l)
    } else {
        reusable = false;
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        Framing::Close
    };
    Ok(Some(Resp {
        head_len,
        status,
        framing,
        reusable,
    }))
}

/// A connection with bytes already read from it in front.
pub struct Rewind<T> {
    pre: Bytes,
    io: T,
}

impl<T> Rewind<T> {
    pub fn new(pre: Bytes, io: T) -> Self {
        Self { pre, io }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            buf.put_slice(&self.pre[..n]);
            self.pre.advance(n);
            if self.pre.is_empty() {
                self.pre = Bytes::new(); // frees the allocation (a held request keeps us)
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
