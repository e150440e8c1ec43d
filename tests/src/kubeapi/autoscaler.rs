//! A test stand-in for Knative's autoscaler stat endpoint: a websocket server that takes
//! binary frames, each a protobuf `WireStatMessages`, and records the decoded messages.
//!
//! The decoder here is written from the wire format (package `metrics` of Knative serving),
//! independently of the agent's encoder:
//!
//! ```text
//! message Stat { string pod_name = 1; double average_concurrent_requests = 2;
//!   double average_proxied_concurrent_requests = 3; double request_count = 4;
//!   double proxied_request_count = 5; double process_uptime = 6; int64 timestamp = 7; }
//! message WireStatMessage { string namespace = 1; string name = 2; Stat stat = 3; }
//! message WireStatMessages { repeated WireStatMessage messages = 1; }
//! ```
use std::{
    net::{SocketAddr, TcpListener},
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use futures_util::StreamExt;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;

/// One decoded `WireStatMessage`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatMessage {
    pub namespace: String,
    pub name: String,
    pub pod_name: String,
    pub average_concurrent_requests: f64,
    pub average_proxied_concurrent_requests: f64,
    pub request_count: f64,
    pub proxied_request_count: f64,
    pub process_uptime: f64,
    pub timestamp: i64,
    pub has_stat: bool,
    /// When the frame arrived.
    pub at: Option<Instant>,
}

fn varint(b: &[u8], i: &mut usize) -> Result<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let Some(&c) = b.get(*i) else {
            bail!("truncated varint")
        };
        *i += 1;
        v |= u64::from(c & 0x7f) << shift;
        if c & 0x80 == 0 {
            return Ok(v);
        }
    }
    bail!("varint too long")
}

/// Fields of one protobuf message: (field number, value).
enum Field<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    /// Skipped (no field of these messages is fixed32).
    Fixed32,
}

fn fields(b: &[u8]) -> Result<Vec<(u64, Field<'_>)>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let key = varint(b, &mut i)?;
        let (num, wt) = (key >> 3, key & 7);
        let f = match wt {
            0 => Field::Varint(varint(b, &mut i)?),
            1 => {
                let s = b.get(i..i + 8).context("truncated fixed64")?;
                i += 8;
                Field::Fixed64(u64::from_le_bytes(s.try_into()?))
            }
            2 => {
                let n = varint(b, &mut i)? as usize;
                let s = b.get(i..i + n).context("truncated bytes")?;
                i += n;
                Field::Bytes(s)
            }
            5 => {
                b.get(i..i + 4).context("truncated fixed32")?;
                i += 4;
                Field::Fixed32
            }
            other => bail!("unsupported wire type {other}"),
        };
        out.push((num, f));
    }
    Ok(out)
}

fn text(f: &Field<'_>) -> Result<String> {
    match f {
        Field::Bytes(b) => Ok(String::from_utf8(b.to_vec())?),
        _ => bail!("expected a string"),
    }
}

fn double(f: &Field<'_>) -> Result<f64> {
    match f {
        Field::Fixed64(v) => Ok(f64::from_bits(*v)),
        _ => bail!("expected a double"),
    }
}

/// Decodes a `WireStatMessages` frame.
pub fn decode_wire_stat_messages(b: &[u8]) -> Result<Vec<StatMessage>> {
    let mut out = Vec::new();
    for (num, f) in fields(b)? {
        let Field::Bytes(m) = f else {
            bail!("field {num} of WireStatMessages is not a message")
        };
        if num != 1 {
            continue;
        }
        let mut sm = StatMessage::default();
        for (n, f) in fields(m)? {
            match n {
                1 => sm.namespace = text(&f)?,
                2 => sm.name = text(&f)?,
                3 => {
                    let Field::Bytes(s) = f else {
                        bail!("stat is not a message")
                    };
                    sm.has_stat = true;
                    for (n, f) in fields(s)? {
                        match n {
                            1 => sm.pod_name = text(&f)?,
                            2 => sm.average_concurrent_requests = double(&f)?,
                            3 => sm.average_proxied_concurrent_requests = double(&f)?,
                            4 => sm.request_count = double(&f)?,
                            5 => sm.proxied_request_count = double(&f)?,
                            6 => sm.process_uptime = double(&f)?,
                            7 => match f {
                                Field::Varint(v) => sm.timestamp = v as i64,
                                _ => bail!("timestamp is not a varint"),
                            },
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        out.push(sm);
    }
    Ok(out)
}

#[derive(Default)]
struct Recorded {
    messages: Vec<StatMessage>,
    connections: usize,
    errors: Vec<String>,
}

/// The test autoscaler: `ws://127.0.0.1:<port>` (any path), in a network namespace.
pub struct Autoscaler {
    rec: Arc<Mutex<Recorded>>,
    port: u16,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Autoscaler {
    /// Starts on `127.0.0.1:<free port>` in namespace `netns` (None: the current one).
    pub fn start_in(netns: Option<&str>) -> Result<Self> {
        let rec = Arc::new(Mutex::new(Recorded::default()));
        let (tx, rx) = std::sync::mpsc::channel::<Result<u16>>();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let netns = netns.map(str::to_owned);
        let rec2 = rec.clone();
        let thread = std::thread::Builder::new()
            .name("autoscaler".into())
            .spawn(move || {
                let setup = || -> Result<(TcpListener, tokio::runtime::Runtime)> {
                    if let Some(ns) = &netns {
                        crate::coldstart::net::enter(ns)
                            .with_context(|| format!("setns into {ns}"))?;
                    }
                    let l = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
                    l.set_nonblocking(true)?;
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    Ok((l, rt))
                };
                let (l, rt) = match setup() {
                    Ok(v) => v,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let _ = tx.send(Ok(l.local_addr().map(|a| a.port()).unwrap_or(0)));
                rt.block_on(serve(l, rec2, stop_rx));
                rt.shutdown_timeout(Duration::from_millis(200));
            })?;
        let port = rx
            .recv()
            .context("the autoscaler thread died")?
            .context("starting the test autoscaler")?;
        Ok(Self {
            rec,
            port,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `ws://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    pub fn messages(&self) -> Vec<StatMessage> {
        self.rec.lock().unwrap().messages.clone()
    }

    /// Websocket connections accepted so far.
    pub fn connections(&self) -> usize {
        self.rec.lock().unwrap().connections
    }

    /// Frames that did not decode.
    pub fn errors(&self) -> Vec<String> {
        self.rec.lock().unwrap().errors.clone()
    }

    /// Waits for a message matching `pred`.
    pub fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&StatMessage) -> bool,
    ) -> Result<StatMessage> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(m) = self.messages().into_iter().find(|m| pred(m)) {
                return Ok(m);
            }
            if Instant::now() >= deadline {
                bail!(
                    "no matching stat message after {timeout:?}; {} connections, messages: {:?}, \
                     errors: {:?}",
                    self.connections(),
                    self.messages(),
                    self.errors()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Autoscaler {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(l: TcpListener, rec: Arc<Mutex<Recorded>>, mut stop: oneshot::Receiver<()>) {
    let Ok(l) = tokio::net::TcpListener::from_std(l) else {
        return;
    };
    loop {
        tokio::select! {
            _ = &mut stop => return,
            acc = l.accept() => {
                let Ok((stream, _)) = acc else { continue };
                let rec = rec.clone();
                tokio::spawn(async move {
                    let mut ws = match tokio_tungstenite::accept_async(stream).await {
                        Ok(ws) => ws,
                        Err(e) => {
                            rec.lock().unwrap().errors.push(format!("handshake: {e}"));
                            return;
                        }
                    };
                    rec.lock().unwrap().connections += 1;
                    while let Some(msg) = ws.next().await {
                        match msg {
                            Ok(Message::Binary(b)) => {
                                let mut r = rec.lock().unwrap();
                                match decode_wire_stat_messages(&b) {
                                    Ok(ms) => r.messages.extend(ms.into_iter().map(|mut m| {
                                        m.at = Some(Instant::now());
                                        m
                                    })),
                                    Err(e) => r.errors.push(format!("decode: {e:#}")),
                                }
                            }
                            Ok(Message::Text(t)) => {
                                rec.lock().unwrap().errors.push(format!("text frame: {t}"));
                            }
                            Ok(Message::Close(_)) | Err(_) => break,
                            Ok(_) => {}
                        }
                    }
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put_varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn put_bytes(out: &mut Vec<u8>, field: u64, b: &[u8]) {
        put_varint(out, field << 3 | 2);
        put_varint(out, b.len() as u64);
        out.extend_from_slice(b);
    }

    fn put_double(out: &mut Vec<u8>, field: u64, v: f64) {
        put_varint(out, field << 3 | 1);
        out.extend_from_slice(&v.to_bits().to_le_bytes());
    }

    #[test]
    fn decodes_hand_encoded_frame() {
        let mut stat = Vec::new();
        put_bytes(&mut stat, 1, b"activator-node-a");
        put_double(&mut stat, 2, 1.0);
        put_double(&mut stat, 4, 1.0);
        put_varint(&mut stat, 7 << 3);
        put_varint(&mut stat, 1_700_000_000);
        let mut msg = Vec::new();
        put_bytes(&mut msg, 1, b"ns");
        put_bytes(&mut msg, 2, b"hello-00001");
        put_bytes(&mut msg, 3, &stat);
        let mut frame = Vec::new();
        put_bytes(&mut frame, 1, &msg);
        put_bytes(&mut frame, 1, &msg);
        let ms = decode_wire_stat_messages(&frame).unwrap();
        assert_eq!(ms.len(), 2);
        assert_eq!(ms[0].namespace, "ns");
        assert_eq!(ms[0].name, "hello-00001");
        assert_eq!(ms[0].pod_name, "activator-node-a");
        assert_eq!(ms[0].average_concurrent_requests, 1.0);
        assert_eq!(ms[0].request_count, 1.0);
        assert_eq!(ms[0].timestamp, 1_700_000_000);
        assert!(decode_wire_stat_messages(&[0x0a, 0x05, 0x01]).is_err());
    }
}
