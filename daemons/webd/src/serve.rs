//! The HTTP server: hyper's HTTP/1 connections with a deadline for every
//! request's headers (an idle keep-alive connection included), and caps on
//! what one client address, and all of them together, may hold open. A
//! client that sends half a request, or a thousand of them, only uses up
//! its own share.

use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
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
/// How long, and for how many bytes, a closed connection's late input is
/// read and dropped (see [`Lingering`]).
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 64 << 20;

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

/// A request body that records whether it was read to its end.
struct ReadToEnd {
    inner: hyper::body::Incoming,
    read: Arc<AtomicBool>,
}

impl ReadToEnd {
    fn wrap(
        req: hyper::Request<hyper::body::Incoming>,
    ) -> (hyper::Request<ReadToEnd>, Arc<AtomicBool>) {
        use http_body::Body;
        let read = Arc::new(AtomicBool::new(req.body().is_end_stream()));
        let flag = read.clone();
        (req.map(|inner| ReadToEnd { inner, read: flag }), read)
    }
}

impl http_body::Body for ReadToEnd {
    type Data = hyper::body::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let frame = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(frame, std::task::Poll::Ready(None)) || this.inner.is_end_stream() {
            this.read.store(true, Ordering::Relaxed);
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A client's connection, closed the way clients expect after an early
/// answer (a 413 to a body never read): once hyper is done with it, the
/// answer is out and the sending side is shut, and what the client still
/// sends is read and dropped for a moment. Closed at once instead, the
/// unread input makes the kernel reset the connection, and a reset makes
/// the client's kernel drop the answer it had not read yet. The slot stays
/// held until then.
struct Lingering {
    stream: Option<tokio::net::TcpStream>,
    slot: Option<Slot>,
}

impl Lingering {
    fn stream(self: std::pin::Pin<&mut Self>) -> std::pin::Pin<&mut tokio::net::TcpStream> {
        std::pin::Pin::new(self.get_mut().stream.as_mut().expect("open until dropped"))
    }
}

impl tokio::io::AsyncRead for Lingering {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.stream().poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Lingering {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.stream().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.stream().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.stream().poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.stream().poll_shutdown(cx)
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let (Some(mut stream), slot) = (self.stream.take(), self.slot.take()) else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = stream.shutdown().await;
            let mut buf = vec![0u8; 16 << 10];
            let mut left = LINGER_BYTES;
            let _ = tokio::time::timeout(LINGER, async {
                while left > 0 {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => left = left.saturating_sub(n),
                    }
                }
            })
            .await;
            drop(slot);
        });
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

/// Whether a request came over TLS, in every request's extensions.
#[derive(Debug, Clone, Copy)]
pub struct Secure(pub bool);

/// The first byte of a TLS handshake record; an HTTP request starts with a
/// method's letter.
const TLS_HANDSHAKE: u8 = 0x16;

/// Serves `router` on `listener` until `stop` turns true, then lets open
/// requests finish for a few seconds. With `tls`, a connection that opens
/// with a TLS handshake is served HTTPS and any other plain HTTP, on the
/// same port. Handlers see the peer as `ConnectInfo<SocketAddr>` and the
/// transport as [`Secure`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
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
        let (router, tls, watcher) = (router.clone(), tls.clone(), graceful.watcher());
        tokio::spawn(async move {
            // The handshake, like a request's headers, has a deadline.
            let secure = match &tls {
                Some(_) => {
                    let mut first = [0u8; 1];
                    match tokio::time::timeout(HEADER_TIMEOUT, tcp.peek(&mut first)).await {
                        Ok(Ok(1)) => first[0] == TLS_HANDSHAKE,
                        _ => return,
                    }
                }
                None => false,
            };
            let io = Lingering {
                stream: Some(tcp),
                slot: Some(slot),
            };
            let service = service(router, peer, secure);
            let http = || {
                let mut b = hyper::server::conn::http1::Builder::new();
                b.timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT);
                b
            };
            let served = match (tls, secure) {
                (Some(acceptor), true) => {
                    let stream =
                        match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(io)).await {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, "TLS handshake: {e}");
                                return;
                            }
                            Err(_) => return,
                        };
                    watcher
                        .watch(http().serve_connection(TokioIo::new(stream), service))
                        .await
                }
                _ => {
                    watcher
                        .watch(http().serve_connection(TokioIo::new(io), service))
                        .await
                }
            };
            if let Err(e) = served {
                tracing::debug!(%peer, "connection: {e}");
            }
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

/// One connection's requests into `router`, each told its peer and
/// transport.
fn service(
    router: axum::Router,
    peer: std::net::SocketAddr,
    secure: bool,
) -> impl hyper::service::Service<
    hyper::Request<hyper::body::Incoming>,
    Response = axum::response::Response,
    Error = std::convert::Infallible,
    Future = impl std::future::Future<
        Output = Result<axum::response::Response, std::convert::Infallible>,
    > + Send,
> + Clone {
    hyper::service::service_fn(move |mut req: hyper::Request<_>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        req.extensions_mut().insert(Secure(secure));
        let (req, read) = ReadToEnd::wrap(req);
        let answer = tower_service::Service::call(&mut router.clone(), req);
        async move {
            let mut resp = answer.await?;
            // An answer given before the body was read (a 413, a
            // refusal) ends the connection: say so, or the client
            // would send its next request on it.
            if !read.load(Ordering::Relaxed) {
                resp.headers_mut().insert(
                    axum::http::header::CONNECTION,
                    axum::http::HeaderValue::from_static("close"),
                );
            }
            Ok::<_, std::convert::Infallible>(resp)
        }
    })
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
