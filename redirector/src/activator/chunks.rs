//! A chunked-body scanner for the fast path: finds where a chunked response body ends
//! without changing its bytes, reading it byte for byte as hyper's decoder does (so both
//! paths agree on where a body ends and on what is malformed).
use super::wire::Error;

/// Where a chunked body is, byte by byte as hyper's decoder reads one (so both agree on
/// where a body ends and on what is malformed): a size line (hex digits, optional spaces,
/// an extension up to CR), chunk data and its CRLF, then trailer lines and the final CRLF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Start,
    Size,
    SizeLws,
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    EndCr,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

/// Bytes of chunk extensions in a body hyper accepts.
const MAX_EXTENSIONS: u64 = 16 * 1024;
/// Trailer bytes and lines hyper accepts.
const MAX_TRAILER: usize = 16 * 1024;
const MAX_TRAILERS: usize = 100;

/// A chunked body being scanned (see `scan`).
#[derive(Debug, Clone)]
pub struct Chunks {
    state: Chunk,
    size: u64,
    ext: u64,
    trailer: Option<Vec<u8>>,
    trailers: usize,
}

impl Default for Chunks {
    fn default() -> Self {
        Self {
            state: Chunk::Start,
            size: 0,
            ext: 0,
            trailer: None,
            trailers: 0,
        }
    }
}

fn hex(b: u8) -> Option<u64> {
    (b as char).to_digit(16).map(u64::from)
}

impl Chunks {
    /// The body ended (its final CRLF was scanned).
    pub fn done(&self) -> bool {
        self.state == Chunk::Done
    }

    fn push(&mut self, b: u8) -> Result<(), Error> {
        if let Some(t) = self.trailer.as_mut() {
            t.push(b);
            if t.len() >= MAX_TRAILER {
                return Err(Error::Chunk);
            }
        }
        Ok(())
    }

    /// How many bytes at the front of `buf` belong to the body (forward them as they are);
    /// stops where it needs more bytes, or at the end of the body (`done`).
    pub fn scan(&mut self, buf: &[u8]) -> Result<usize, Error> {
        use Chunk::*;
        let mut at = 0;
        while at < buf.len() && self.state != Done {
            if self.state == Data {
                let n = self.size.min((buf.len() - at) as u64);
                at += n as usize;
                self.size -= n;
                if self.size == 0 {
                    self.state = DataCr;
                }
                continue;
            }
            let b = buf[at];
            at += 1;
            self.state = match (self.state, b) {
                (Start, b) => {
                    self.size = hex(b).ok_or(Error::Chunk)?;
                    Size
                }
                (Size, b) if hex(b).is_some() => {
                    let d = hex(b).unwrap_or_default();
                    self.size = self
                        .size
                        .checked_mul(16)
                        .and_then(|s| s.checked_add(d))
                        .ok_or(Error::Chunk)?;
                    Size
                }
                (Size | SizeLws, b'\t' | b' ') => SizeLws,
                (Size | SizeLws, b';') => Ext,
                (Size | SizeLws | Ext, b'\r') => SizeLf,
                (Ext, b'\n') => return Err(Error::Chunk),
                (Ext, _) => {
                    self.ext += 1;
                    if self.ext >= MAX_EXTENSIONS {
                        return Err(Error::Chunk);
                    }
                    Ext
                }
                (SizeLf, b'\n') if self.size == 0 => EndCr,
                (SizeLf, b'\n') => Data,
                (DataCr, b'\r') => DataLf,
                (DataLf, b'\n') => Start,
                (EndCr, b'\r') => {
                    self.push(b)?;
                    EndLf
                }
                (EndCr, b) => {
                    match self.trailer.as_mut() {
                        None => self.trailer = Some(vec![b]),
                        Some(_) => self.push(b)?,
                    }
                    Trailer
                }
                (Trailer, b) => {
                    self.push(b)?;
                    if b == b'\r' {
                        TrailerLf
                    } else {
                        Trailer
                    }
                }
                (TrailerLf, b'\n') => {
                    if self.trailers >= MAX_TRAILERS {
                        return Err(Error::Chunk);
                    }
                    self.trailers += 1;
                    self.push(b)?;
                    EndCr
                }
                (EndLf, b'\n') => {
                    self.push(b)?;
                    self.check_trailers()?;
                    Done
                }
                _ => return Err(Error::Chunk),
            };
        }
        Ok(at)
    }

    /// The trailer section as hyper decodes it: header lines with valid names and values.
    fn check_trailers(&self) -> Result<(), Error> {
        let Some(t) = self.trailer.as_deref() else {
            return Ok(());
        };
        let mut headers = vec![httparse::EMPTY_HEADER; self.trailers];
        match httparse::parse_headers(t, &mut headers) {
            Ok(httparse::Status::Complete((_, hs))) => {
                for h in hs.iter() {
                    hyper::header::HeaderName::from_bytes(h.name.as_bytes())
                        .map_err(|_| Error::Chunk)?;
                    hyper::header::HeaderValue::from_bytes(h.value).map_err(|_| Error::Chunk)?;
                }
                Ok(())
            }
            _ => Err(Error::Chunk),
        }
    }
}
