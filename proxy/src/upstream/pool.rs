//! Upstream connections. HTTP/1.1: a pool of keep-alive connections per host; a connection
//! returns to it when the response body has been read to the end, and is closed after
//! `max_requests_per_connection` requests or when idle longer than the idle timeout.
//! HTTP/2: one multiplexed connection per host. The cluster's circuit breakers apply as
//! Istio's connectionPool describes them: at most `max_connections` connections (requests
//! beyond wait as pending), at most `max_pending_requests` waiting (more overflow: 503 UO).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use super::{Cluster, Host, UpstreamError};
use crate::BoxBody;

#[derive(Debug, Clone, thiserror::Error)]
pub enum PoolError {
    #[error("upstream overflow: circuit breaker full")]
    Overflow,
    #[error("upstream connect error: {0}")]
    Connect(String),
    #[error("upstream reset: {0}")]
    Reset(String),
}

impl PoolError {
    pub fn kind(&self) -> UpstreamError {
        match self {
            PoolError::Overflow => UpstreamError::Overflow,
            PoolError::Connect(_) => UpstreamError::ConnectFailure,
            PoolError::Reset(_) => UpstreamError::Reset,
        }
    }
}

/// Per-host connections.
#[derive(Debug, Default)]
pub(crate) struct HostPool {
    idle: std::sync::Mutex<Vec<H1Conn>>,
    h2: tokio::sync::Mutex<Option<(http2::SendRequest<BoxBody>, Arc<Permit>)>>,
    /// Open connections to this host.
    pub connections: std::sync::atomic::AtomicU32,
}

/// Accounts for one open connection; releasing it frees capacity for pending requests.
/// Holds its cluster and host weakly: idle connections live in the host, which must not
/// keep itself (or its cluster) alive once configuration drops it.
#[derive(Debug)]
pub(crate) struct Permit {
    cluster: std::sync::Weak<Cluster>,
    host: std::sync::Weak<Host>,
}

impl Permit {
    fn new(cluster: &Arc<Cluster>, host: &Arc<Host>) -> Permit {
        cluster.connections.fetch_add(1, Ordering::SeqCst);
        host.pool.connections.fetch_add(1, Ordering::SeqCst);
        cluster.stats.upstream_cx_total.fetch_add(1, Ordering::Relaxed);
        Permit { cluster: Arc::downgrade(cluster), host: Arc::downgrade(host) }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let Some(cluster) = self.cluster.upgrade() else { return };
        cluster.connections.fetch_sub(1, Ordering::SeqCst);
        if let Some(host) = self.host.upgrade() {
            host.pool.connections.fetch_sub(1, Ordering::SeqCst);
        }
        cluster.freed.notify_waiters();
    }
}

#[derive(Debug)]
pub(crate) struct H1Conn {
    sender: http1::SendRequest<BoxBody>,
    served: u32,
    since: Instant,
    permit: Permit,
}

/// A connection ready for one request.
#[derive(Debug)]
pub(crate) enum Conn {
    H1(H1Conn),
    H2(http2::SendRequest<BoxBody>, Arc<Permit>),
}

/// A connection to `host`: TCP, then the cluster's TLS handshake when it has one.
pub(crate) async fn connect(cluster: &Cluster, host: &Host) -> Result<crate::tls::Io, PoolError> {
    let tcp = connect_tcp(cluster, host).await?;
    let Some(tls) = &cluster.tls else {
        if cluster.config.tls.is_some() {
            // Its TLS could not be set up (logged when the cluster was made): never plaintext.
            return Err(PoolError::Connect(format!("{}: the cluster's TLS is not usable", host.address)));
        }
        return Ok(crate::tls::Io::Plain(tcp));
    };
    tls.connect(tcp).await.map_err(|e| {
        cluster.stats.upstream_cx_connect_fail.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(cluster = %cluster.config.name, upstream = %host.address, error = %e, "TLS handshake failed");
        PoolError::Connect(format!("{}: TLS: {e}", host.address))
    })
}

async fn connect_tcp(cluster: &Cluster, host: &Host) -> Result<TcpStream, PoolError> {
    let timeout = cluster.config.connect_timeout;
    let attempt = async {
        match host.socket {
            Some(addr) => TcpStream::connect(addr).await,
            None => TcpStream::connect(host.address.as_str()).await,
        }
    };
    let stream = match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            cluster.stats.upstream_cx_connect_fail.fetch_add(1, Ordering::Relaxed);
            return Err(PoolError::Connect(format!("{}: {e}", host.address)));
        }
        Err(_) => {
            cluster.stats.upstream_cx_connect_fail.fetch_add(1, Ordering::Relaxed);
            return Err(PoolError::Connect(format!("{}: timed out after {timeout:?}", host.address)));
        }
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

impl HostPool {
    fn take_idle(&self, idle_timeout: Option<Duration>) -> Option<H1Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(c) = idle.pop() {
            if c.sender.is_closed() || idle_timeout.is_some_and(|t| c.since.elapsed() > t) {
                continue; // dropped: closes, frees its permit
            }
            return Some(c);
        }
        None
    }
}

/// A connection to `host` for one request, waiting as a pending request while the
/// cluster's connections are all busy.
pub(crate) async fn acquire(cluster: &Arc<Cluster>, host: &Arc<Host>) -> Result<Conn, PoolError> {
    if cluster.config.http2 {
        return acquire_h2(cluster, host).await;
    }
    let limits = cluster.config.limits;
    let mut pending = None::<PendingGuard>;
    loop {
        let freed = cluster.freed.notified();
        tokio::pin!(freed);
        freed.as_mut().enable();
        while let Some(mut c) = host.pool.take_idle(cluster.config.idle_timeout) {
            if c.sender.ready().await.is_ok() {
                return Ok(Conn::H1(c));
            }
        }
        let open = cluster.connections.load(Ordering::SeqCst);
        // A host with no connection at all may always get one (as Envoy does), so a busy
        // cluster cannot starve it; that counts as a connection overflow.
        if open < limits.max_connections || host.pool.connections.load(Ordering::SeqCst) == 0 {
            if open >= limits.max_connections {
                cluster.stats.upstream_cx_overflow.fetch_add(1, Ordering::Relaxed);
            }
            let permit = Permit::new(cluster, host);
            let io = TokioIo::new(connect(cluster, host).await?);
            let (sender, conn) = http1::Builder::new()
                .handshake::<_, BoxBody>(io)
                .await
                .map_err(|e| PoolError::Connect(format!("{}: {e}", host.address)))?;
            let addr = host.address.clone();
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(upstream = %addr, error = %e, "upstream connection ended");
                }
            });
            return Ok(Conn::H1(H1Conn { sender, served: 0, since: Instant::now(), permit }));
        }
        if pending.is_none() {
            cluster.stats.upstream_cx_overflow.fetch_add(1, Ordering::Relaxed);
            let n = cluster.pending_requests.fetch_add(1, Ordering::SeqCst);
            let guard = PendingGuard(cluster.clone());
            if n >= limits.max_pending_requests {
                cluster.stats.upstream_rq_pending_overflow.fetch_add(1, Ordering::Relaxed);
                return Err(PoolError::Overflow);
            }
            pending = Some(guard);
        }
        freed.await;
    }
}

struct PendingGuard(Arc<Cluster>);

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.pending_requests.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn acquire_h2(cluster: &Arc<Cluster>, host: &Arc<Host>) -> Result<Conn, PoolError> {
    let mut slot = host.pool.h2.lock().await;
    if let Some((s, p)) = slot.as_ref()
        && !s.is_closed()
    {
        return Ok(Conn::H2(s.clone(), p.clone()));
    }
    let permit = Arc::new(Permit::new(cluster, host));
    let io = TokioIo::new(connect(cluster, host).await?);
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .handshake::<_, BoxBody>(io)
        .await
        .map_err(|e| PoolError::Connect(format!("{}: {e}", host.address)))?;
    let addr = host.address.clone();
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(upstream = %addr, error = %e, "upstream h2 connection ended");
        }
    });
    *slot = Some((sender.clone(), permit.clone()));
    Ok(Conn::H2(sender, permit))
}

/// A response body that gives its HTTP/1.1 connection back to the pool once read to the
/// end (and drops it — closing the connection — if abandoned earlier).
#[derive(Debug)]
pub struct PooledBody {
    inner: Incoming,
    conn: Option<H1Conn>,
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        // The end of the body: nothing more (None), or the last data frame of a body of known
        // length — after which hyper's server stops polling and drops the body.
        let ended = match &r {
            None => true,
            Some(Ok(_)) => self.inner.is_end_stream(),
            Some(Err(_)) => false,
        };
        if ended && let Some(c) = self.conn.take() {
            give_back(c);
        }
        Poll::Ready(r)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // Read to the end but never polled past it: still reusable.
        if self.inner.is_end_stream()
            && let Some(c) = self.conn.take()
        {
            give_back(c);
        }
    }
}

fn give_back(mut c: H1Conn) {
    c.served += 1;
    let (Some(cluster), Some(host)) = (c.permit.cluster.upgrade(), c.permit.host.upgrade()) else { return };
    let max = cluster.config.max_requests_per_connection;
    if (max > 0 && c.served >= max) || c.sender.is_closed() {
        return; // dropped: the connection closes and its permit frees capacity
    }
    c.since = Instant::now();
    host.pool.idle.lock().unwrap_or_else(|p| p.into_inner()).push(c);
    cluster.freed.notify_waiters();
}

/// Sends a request on a connection; the response body keeps the connection until it ends.
pub(crate) async fn send(conn: Conn, req: Request<BoxBody>) -> Result<Response<BoxBody>, PoolError> {
    match conn {
        Conn::H1(mut c) => {
            let resp = c.sender.send_request(req).await.map_err(|e| PoolError::Reset(e.to_string()))?;
            let (parts, body) = resp.into_parts();
            if parts.status == http::StatusCode::SWITCHING_PROTOCOLS {
                // The connection now belongs to the upgraded stream; it never returns.
                drop(c.permit);
                return Ok(Response::from_parts(parts, crate::boxed(body)));
            }
            let end = body.is_end_stream();
            let pooled = PooledBody { inner: body, conn: Some(c) };
            let mut pooled = pooled;
            if end && let Some(c) = pooled.conn.take() {
                give_back(c);
            }
            Ok(Response::from_parts(parts, crate::boxed(pooled)))
        }
        Conn::H2(mut s, permit) => {
            let resp = s.send_request(req).await.map_err(|e| PoolError::Reset(e.to_string()))?;
            drop(permit);
            Ok(resp.map(crate::boxed))
        }
    }
}
