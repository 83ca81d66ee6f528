//! The HTTP server: hyper's HTTP/1 connections with a deadline for every
//! request's headers (an idle keep-alive connection included), and caps on
//! what one client address, and all of them together, may hold open. A
//! client that sends half a request, or a thousand of them, only uses up
//! its own share.

use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a client has to send a request's headers, from the moment the
/// connection is ready for them.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections one client address may hold open (a browser opens six).
pub const CONNECTIONS_PER_ADDRESS: usize = 32;
/// Connections all clients together may hold open, well below the
/// descriptor limit.
pub const CONNECTIONS: usize = 512;
/// Event streams (`/api/events`) one address, and all together, may hold.
pub const EVENT_STREAMS_PER_ADDRESS: usize = 8;
pub const EVENT_STREAMS: usize = 64;
/// How long a stop waits for open connections to finish.
const DRAIN: Duration = Duration::from_secs(5);

/// A bounded count of something held per client address: an IPv4 address,
/// or an IPv6 /64 (one host can hold a whole /64).
#[derive(Debug)]
pub struct Slots {
    per_address: usize,
    total: usize,
    held: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One held slot, given back when dropped.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<Slots>,
    key: IpAddr,
}

impl Slots {
    pub fn new(per_address: usize, total: usize) -> Arc<Slots> {
        Arc::new(Slots {
            per_address,
            total,
            held: Mutex::default(),
        })
    }

    /// A slot for `ip`, or `None` when it or everyone has used theirs.
    pub fn take(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let key = address_key(ip);
        let mut held = self.held.lock().expect("slots");
        let (total, per) = &mut *held;
        let mine = per.entry(key).or_default();
        if *mine >= self.per_address || *total >= self.total {
            if *mine == 0 {
                per.remove(&key);
            }
            return None;
        }
        *mine += 1;
        *total += 1;
        Some(Slot {
            slots: self.clone(),
            key,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.slots.held.lock().expect("slots");
        let (total, per) = &mut *held;
        *total -= 1;
        if let Some(n) = per.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.key);
            }
        }
    }
}

fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Serves `router` on `listener` until `stop` turns true, then lets open
/// requests finish for a few seconds. Handlers see the peer as
/// `ConnectInfo<SocketAddr>`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let slots = Slots::new(CONNECTIONS_PER_ADDRESS, CONNECTIONS);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, most likely: wait for some to close.
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => break,
        };
        let Some(slot) = slots.take(peer.ip()) else {
            tracing::debug!(%peer, "connection refused: too many open");
            continue;
        };
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<_>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            tower_service::Service::call(&mut router.clone(), req)
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .serve_connection(TokioIo::new(tcp), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, "connection: {e}");
            }
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::info!("stopping with connections still open (event streams)");
    }
}

async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_bounded_per_address_and_in_all() {
        let slots = Slots::new(2, 3);
        let a: IpAddr = "192.168.1.2".parse().unwrap();
        let b: IpAddr = "192.168.1.3".parse().unwrap();
        let a1 = slots.take(a).unwrap();
        let _a2 = slots.take(a).unwrap();
        assert!(slots.take(a).is_none(), "a third for one address");
        let _b1 = slots.take(b).unwrap();
        assert!(slots.take(b).is_none(), "a fourth in all");
        drop(a1);
        assert!(slots.take(b).is_some());
        // One IPv6 /64 is one client; a v4-mapped address is its v4 one.
        let slots = Slots::new(1, 10);
        let _x = slots.take("2001:db8::1".parse().unwrap()).unwrap();
        assert!(slots.take("2001:db8::2:3".parse().unwrap()).is_none());
        assert!(slots.take("2001:db8:0:1::1".parse().unwrap()).is_some());
        let _y = slots.take(a).unwrap();
        assert!(slots.take("::ffff:192.168.1.2".parse().unwrap()).is_none());
    }
}
