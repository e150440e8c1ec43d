//! The fast path's parser (`wire`) against hyper on the same bytes, for the fuzz target
//! (`fuzz/`) and the corpus replay test: a request the fast path takes must be the request
//! hyper reads (method, target, body, and where the next one starts); a response it
//! accepts must be the response hyper reads (status, body, where the next one starts), and
//! one it refuses must be refused by hyper or by the hyper path's `wire::check_response`.
//! Requests the fast path leaves to hyper are hyper's by construction.
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::wire::{self, Chunks, Framing, Parsed};

/// A request hyper reads after every message, to check where the message ended.
const NEXT_REQ: &[u8] = b"GET /next-message HTTP/1.1\r\nhost: n\r\n\r\n";
/// A response the instance sends after every message, to check where it ended.
const NEXT_RESP: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nnext";

thread_local! {
    static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime");
}

fn run<T, F: std::future::Future<Output = Result<T, String>>>(f: F) -> Result<T, String> {
    RT.with(|rt| {
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), f)
                .await
                .unwrap_or_else(|_| Err("hyper hung".into()))
        })
    })
}

/// What hyper's server read from a connection: (method, target, body) per request.
type Seen = Vec<(String, String, Vec<u8>)>;

async fn hyper_reads_requests(bytes: Vec<u8>, answers: usize) -> Seen {
    let (mut client, server) = tokio::io::duplex(1 << 20);
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Seen::new()));
    let s2 = seen.clone();
    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let seen = s2.clone();
        async move {
            let m = req.method().to_string();
            let t = req
                .uri()
                .path_and_query()
                .map_or(String::new(), |p| p.to_string());
            let body = req.into_body().collect().await?.to_bytes().to_vec();
            if let Ok(mut s) = seen.lock() {
                s.push((m, t, body));
            }
            Ok::<_, hyper::Error>(hyper::Response::new(Empty::<Bytes>::new()))
        }
    });
    let server = tokio::spawn(
        hyper::server::conn::http1::Builder::new()
            .max_buf_size(super::http::MAX_HEAD)
            .serve_connection(TokioIo::new(server), svc),
    );
    let _ = client.write_all(&bytes).await;
    // Read the answers; once they stop coming, end the stream (a message waiting for
    // bytes that never come is then an error, not a hang).
    let mut sink = Vec::new();
    let mut b = [0u8; 4096];
    let mut eof = false;
    loop {
        match tokio::time::timeout(Duration::from_millis(20), client.read(&mut b)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => {
                sink.extend_from_slice(&b[..n]);
                if sink.windows(9).filter(|w| w == b"HTTP/1.1 ").count() >= answers {
                    break;
                }
            }
            Err(_) if !eof => {
                eof = true;
                let _ = client.shutdown().await;
            }
            Err(_) => break,
        }
    }
    drop(client);
    let _ = server.await;
    let seen = seen.lock().map(|s| s.clone()).unwrap_or_default();
    seen
}

/// Checks one request (the front of `data`) on both parsers.
pub fn request(data: &[u8]) -> Result<(), String> {
    let mut out = Vec::new();
    let Parsed::Take(req) = wire::request(data, &mut out) else {
        return Ok(()); // partial, or hyper's to serve
    };
    let end = req.head_len + req.body_len;
    if data.len() < end {
        return Ok(()); // both wait for the rest of the body
    }
    let line = out.split(|b| *b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line).into_owned();
    let mut parts = line.splitn(3, ' ');
    let (method, target) = (
        parts.next().unwrap_or_default().to_owned(),
        parts.next().unwrap_or_default().to_owned(),
    );
    let body = data[req.head_len..end].to_vec();
    let mut bytes = data[..end].to_vec();
    let mut want = vec![(method, target, body)];
    if !req.close {
        bytes.extend_from_slice(NEXT_REQ);
        want.push(("GET".into(), "/next-message".into(), Vec::new()));
    }
    let seen = run(async { Ok(hyper_reads_requests(bytes, want.len()).await) })?;
    if seen != want {
        return Err(format!("fast path read {want:?}, hyper read {seen:?}"));
    }
    Ok(())
}

/// The fast path's reading of a response: status, body, whether the connection goes on;
/// Err when it refuses the response; None when it needs more bytes than `data`.
type FastResp = Option<(u16, Vec<u8>, bool)>;

fn fast_reads_response(data: &[u8], head_req: bool) -> Result<FastResp, String> {
    let mut out = Vec::new();
    let mut at = 0;
    let resp = loop {
        match wire::response(&data[at..], head_req, &mut out).map_err(|e| e.to_string())? {
            None => return Ok(None),
            Some(r) if r.status < 200 => at += r.head_len,
            Some(r) => break r,
        }
    };
    let start = at + resp.head_len;
    let rest = &data[start..];
    let body = match resp.framing {
        Framing::None => Vec::new(),
        Framing::Length(n) => match rest.get(..n as usize) {
            Some(b) if (n as usize) as u64 == n => b.to_vec(),
            _ => return Ok(None),
        },
        Framing::Close => rest.to_vec(),
        Framing::Chunked => {
            let mut c = Chunks::default();
            let n = c.scan(rest).map_err(|e| e.to_string())?;
            if !c.done() {
                return Ok(None);
            }
            dechunk(&rest[..n]).ok_or("chunk scanner and decoder disagree")?
        }
    };
    Ok(Some((resp.status, body, resp.reusable)))
}

/// The data of a whole chunked body (as `Chunks` found it).
fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let digits = b.iter().take_while(|c| c.is_ascii_hexdigit()).count();
        let size = u64::from_str_radix(std::str::from_utf8(&b[..digits]).ok()?, 16).ok()?;
        let eol = b.windows(2).position(|w| w == b"\r\n")?;
        b = &b[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        let size = usize::try_from(size).ok()?;
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size + 2..)?;
    }
}

/// What the hyper path makes of `bytes` from an instance: status, body, and the body of
/// a second response on the same connection (when it goes on); Err when it refuses it.
async fn hyper_reads_response(
    bytes: Vec<u8>,
    head_req: bool,
    then_next: bool,
) -> Result<(u16, Vec<u8>, Option<Vec<u8>>), String> {
    let (client, mut server) = tokio::io::duplex(1 << 20);
    tokio::spawn(async move {
        // The instance: answers the first request with `bytes`, the second with NEXT_RESP.
        for answer in [&bytes[..], NEXT_RESP].iter().take(1 + then_next as usize) {
            let mut head = Vec::new();
            let mut b = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match server.read(&mut b).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&b[..n]),
                }
            }
            let _ = server.write_all(answer).await;
        }
        let _ = server.shutdown().await;
        let mut sink = Vec::new();
        let _ = server.read_to_end(&mut sink).await;
    });
    let (mut tx, conn) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(super::http::MAX_HEAD)
        .handshake(TokioIo::new(client))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let method = if head_req { "HEAD" } else { "GET" };
    let req = |m: &str| {
        hyper::Request::builder()
            .method(m)
            .uri("/")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())
    };
    let resp = tx
        .send_request(req(method)?)
        .await
        .map_err(|e| e.to_string())?;
    wire::check_response(
        resp.version(),
        resp.status().as_u16(),
        false,
        resp.headers(),
    )
    .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    let body = body.to_bytes().to_vec();
    let next = match tx.ready().await {
        Ok(()) => match tx.send_request(req("GET")?).await {
            Ok(r) => Some(r.into_body().collect().await.map_err(|e| e.to_string())?),
            Err(_) => None,
        },
        Err(_) => None,
    };
    Ok((status, body, next.map(|b| b.to_bytes().to_vec())))
}

/// Checks one response to a GET (to a HEAD when `head_req`) on both parsers.
pub fn response(data: &[u8], head_req: bool) -> Result<(), String> {
    match fast_reads_response(data, head_req) {
        Ok(None) => Ok(()), // both wait for more
        Err(fast) => match run(async {
            let r = hyper_reads_response(data.to_vec(), head_req, false).await;
            match r {
                Ok(h) => Err(format!("fast path refused ({fast}), hyper read {h:?}")),
                Err(_) => Ok(()),
            }
        }) {
            Err(e) if e == "hyper hung" => Ok(()), // refused by hyper too: it waits
            r => r,
        },
        Ok(Some((status, body, reusable))) => {
            let mut bytes = data.to_vec();
            if reusable {
                // Only what the fast path counted as this message (the next follows).
                let used = message_len(data, head_req).ok_or("length lost")?;
                bytes.truncate(used);
            }
            let (hs, hb, next) = run(hyper_reads_response(bytes, head_req, reusable))
                .map_err(|e| format!("fast path read {status}, hyper refused: {e}"))?;
            if (hs, &hb) != (status, &body) {
                return Err(format!(
                    "fast path read {status} {:?}, hyper read {hs} {:?}",
                    String::from_utf8_lossy(&body),
                    String::from_utf8_lossy(&hb)
                ));
            }
            if reusable && next.as_deref() != Some(&b"next"[..]) {
                return Err(format!(
                    "message boundary differs: hyper's next is {next:?}"
                ));
            }
            Ok(())
        }
    }
}

/// Bytes of `data` the fast path counts as one response (1xx heads included).
fn message_len(data: &[u8], head_req: bool) -> Option<usize> {
    let mut out = Vec::new();
    let mut at = 0;
    let resp = loop {
        let r = wire::response(&data[at..], head_req, &mut out).ok()??;
        if r.status >= 200 {
            break r;
        }
        at += r.head_len;
    };
    let start = at + resp.head_len;
    Some(
        start
            + match resp.framing {
                Framing::None => 0,
                Framing::Length(n) => usize::try_from(n).ok()?,
                Framing::Close => data.len() - start,
                Framing::Chunked => {
                    let mut c = Chunks::default();
                    c.scan(&data[start..]).ok()?
                }
            },
    )
}

/// Checks one fuzz input: its first byte picks a request (even) or a response (odd; to a
/// HEAD when bit 1 is set), the rest is the message.
pub fn check(input: &[u8]) -> Result<(), String> {
    match input.split_first() {
        None => Ok(()),
        Some((m, data)) if m & 1 == 0 => request(data),
        Some((m, data)) => response(data, m & 2 != 0),
    }
}

#[cfg(test)]
mod tests {
    /// Every input of the fuzz corpus (`fuzz/corpus/wire`), through the same check.
    #[test]
    fn fuzz_corpus_replays() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus/wire");
        let mut n = 0;
        let mut bad = Vec::new();
        for e in std::fs::read_dir(dir).expect("the fuzz corpus") {
            let path = e.unwrap().path();
            let input = std::fs::read(&path).unwrap();
            if let Err(why) = super::check(&input) {
                bad.push(format!("{}: {why}", path.display()));
            }
            n += 1;
        }
        assert!(n >= 20, "corpus has {n} inputs");
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    }
}
