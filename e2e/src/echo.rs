//! Echo upstreams: real HTTP/1.1 and h2c servers on loopback that answer with their name,
//! record what they received (path, Host, headers) and can be told to fail or stall. A few
//! paths do more: `/headers` answers the request headers as JSON, `/count` reads the request
//! body as it streams and answers its size, `/trailers` answers with gRPC-style trailers,
//! `/big?n=BYTES` streams a body of that size, `/echo-body` answers the request body.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// What an echo server has seen.
#[derive(Debug, Default)]
pub struct Seen {
    pub requests: AtomicU64,
    /// Requests being served right now, and the most ever at once.
    pub in_flight: AtomicUsize,
    pub max_in_flight: AtomicUsize,
    /// Host headers received, in order (bounded to the last 1,000).
    pub hosts: Mutex<Vec<String>>,
}

/// A running echo server. Dropping it stops accepting.
#[derive(Debug)]
pub struct Echo {
    pub name: String,
    pub addr: SocketAddr,
    pub seen: Arc<Seen>,
    /// Status to answer with (200 unless changed).
    pub status: Arc<AtomicU16>,
    /// Delay before answering, in ms.
    pub delay_ms: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Echo {
    /// Starts an echo server named `name` on 127.0.0.1 (a free port).
    pub async fn start(name: &str) -> std::io::Result<Echo> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let seen = Arc::new(Seen::default());
        let status = Arc::new(AtomicU16::new(200));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let (n, s, st, d) = (name.to_string(), seen.clone(), status.clone(), delay_ms.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let (n, s, st, d) = (n.clone(), s.clone(), st.clone(), d.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (n, s, st, d) = (n.clone(), s.clone(), st.clone(), d.clone());
                        async move {
                            s.requests.fetch_add(1, Ordering::SeqCst);
                            let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                            s.max_in_flight.fetch_max(now, Ordering::SeqCst);
                            let host =
                                req.headers().get("host").and_then(|h| h.to_str().ok()).unwrap_or_default().to_string();
                            {
                                let mut hosts = s.hosts.lock().unwrap_or_else(|p| p.into_inner());
                                if hosts.len() >= 1000 {
                                    hosts.remove(0);
                                }
                                hosts.push(host);
                            }
                            let delay = d.load(Ordering::SeqCst);
                            if delay > 0 {
                                tokio::time::sleep(Duration::from_millis(delay)).await;
                            }
                            let resp = special(&n, req).await.unwrap_or_else(|| {
                                Response::builder()
                                    .status(st.load(Ordering::SeqCst))
                                    .header("x-echo", n.as_str())
                                    .body(Full::new(Bytes::from(n.clone())).map_err(|e| match e {}).boxed())
                                    .unwrap_or_default()
                            });
                            s.in_flight.fetch_sub(1, Ordering::SeqCst);
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        Ok(Echo { name: name.to_string(), addr, seen, status, delay_ms, task })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn requests(&self) -> u64 {
        self.seen.requests.load(Ordering::SeqCst)
    }
}

type EchoBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

/// The paths that do more than answer the name.
async fn special(name: &str, req: Request<Incoming>) -> Option<Response<EchoBody>> {
    use http_body_util::BodyExt;
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let ok = |body: EchoBody| Response::builder().header("x-echo", name).body(body).unwrap_or_default();
    match path.as_str() {
        "/headers" => {
            let map: serde_json::Map<String, serde_json::Value> = req
                .headers()
                .iter()
                .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_str().unwrap_or("").to_string())))
                .collect();
            let mut map = map;
            map.insert(":path".into(), req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default().into());
            map.insert(":version".into(), format!("{:?}", req.version()).into());
            Some(ok(Full::new(Bytes::from(serde_json::Value::Object(map).to_string())).map_err(|e| match e {}).boxed()))
        }
        "/echo-body" => {
            let body = req.into_body().collect().await.ok()?.to_bytes();
            Some(ok(Full::new(body).map_err(|e| match e {}).boxed()))
        }
        "/count" => {
            let mut body = req.into_body();
            let mut n: u64 = 0;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => n += f.data_ref().map(|d| d.len() as u64).unwrap_or(0),
                    Err(_) => return None,
                }
            }
            Some(ok(Full::new(Bytes::from(n.to_string())).map_err(|e| match e {}).boxed()))
        }
        "/trailers" => {
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            trailers.insert("grpc-message", http::HeaderValue::from_static("fine"));
            let frames = vec![
                Ok::<_, hyper::Error>(hyper::body::Frame::data(Bytes::from_static(b"payload"))),
                Ok(hyper::body::Frame::trailers(trailers)),
            ];
            let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
            let mut r = ok(body.boxed());
            r.headers_mut().insert("content-type", http::HeaderValue::from_static("application/grpc"));
            Some(r)
        }
        "/big" => {
            let n: u64 = query.strip_prefix("n=").and_then(|v| v.parse().ok()).unwrap_or(0);
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let chunks = n / chunk.len() as u64;
            let rest = (n % chunk.len() as u64) as usize;
            let stream = futures::stream::iter(
                (0..chunks)
                    .map(move |_| Ok::<_, hyper::Error>(hyper::body::Frame::data(chunk.clone())))
                    .chain((rest > 0).then(|| Ok(hyper::body::Frame::data(Bytes::from(vec![b'x'; rest]))))),
            );
            Some(ok(http_body_util::StreamBody::new(stream).boxed()))
        }
        _ => None,
    }
}

/// A TCP echo server: for each connection, reads one line and answers `NAME:LINE`, then
/// closes. Counts connections.
#[derive(Debug)]
pub struct TcpEcho {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TcpEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TcpEcho {
    pub async fn start(name: &str) -> std::io::Result<TcpEcho> {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let connections = Arc::new(AtomicU64::new(0));
        let (n, c) = (name.to_string(), connections.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                c.fetch_add(1, Ordering::SeqCst);
                let n = n.clone();
                tokio::spawn(async move {
                    let mut tcp = BufReader::new(tcp);
                    let mut line = String::new();
                    // Bounded: one line of at most what arrives before the peer stops.
                    let read = tokio::time::timeout(Duration::from_secs(10), tcp.read_line(&mut line)).await;
                    if matches!(read, Ok(Ok(_))) {
                        let _ = tcp.get_mut().write_all(format!("{n}:{line}").as_bytes()).await;
                        let _ = tcp.get_mut().shutdown().await;
                    }
                });
            }
        });
        Ok(TcpEcho { addr, connections, task })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

/// Connects to `addr`, sends `line` and returns the whole answer.
pub async fn tcp_exchange(addr: &str, line: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("{line}\n").as_bytes()).await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within 10 s"))??;
    Ok(out)
}
