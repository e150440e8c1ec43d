//! L4 mode: raw TCP connections held until an instance is ready, then spliced to it (so
//! non-HTTP services scale to zero too). Bytes the client sends while held are kept (at
//! most `EARLY_MAX`) and replayed; a client that closes while held is dropped.
use std::sync::{atomic::Ordering, Arc};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::{Activator, ServiceState};

const EARLY_MAX: usize = 64 * 1024;

pub async fn handle(act: Arc<Activator>, svc: Arc<ServiceState>, mut client: TcpStream) {
    let limits = act.limits();
    let Ok(held) = svc.admit(&act.global, &limits, 0) else {
        return; // full: close at once
    };
    let deadline = tokio::time::sleep(svc.timeout());
    tokio::pin!(deadline);
    let mut early = Vec::new();
    let mut buf = [0u8; 4096];
    let slot = loop {
        tokio::select! {
            slot = svc.acquire() => break slot,
            r = client.read(&mut buf), if early.len() < EARLY_MAX => match r {
                Ok(0) | Err(_) => return, // client gone while held
                Ok(n) => early.extend_from_slice(&buf[..n]),
            },
            _ = &mut deadline => {
                svc.timed_out.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    };
    drop(held);
    let mut upstream = match TcpStream::connect(slot.instance.addr).await {
        Ok(s) => s,
        Err(e) => {
            slot.instance.mark_failed();
            tracing::debug!(service = %svc.name, error = %e, "L4 connect failed");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    if upstream.write_all(&early).await.is_err() {
        return;
    }
    svc.forwarded.fetch_add(1, Ordering::Relaxed);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    drop(slot);
}
