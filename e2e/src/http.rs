//! A small HTTP/1.1 client for driving traffic through a proxy: keep-alive connections, any
//! Host header, bounded timeouts.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// The answer to one request.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: String,
    pub headers: http::HeaderMap,
}

#[derive(Debug, Clone)]
pub struct ProxyClient {
    proxy: String,
    client: Client<HttpConnector, Empty<Bytes>>,
    with_body: Client<HttpConnector, Full<Bytes>>,
}

impl ProxyClient {
    /// Sends requests to the proxy listening at `proxy` (`IP:PORT`).
    pub fn new(proxy: &str) -> Self {
        let mut c = HttpConnector::new();
        c.set_nodelay(true);
        Self {
            proxy: proxy.to_string(),
            client: Client::builder(TokioExecutor::new()).pool_max_idle_per_host(64).build(c.clone()),
            with_body: Client::builder(TokioExecutor::new()).build(c),
        }
    }

    /// POST `body` to `path` with `Host: host` and extra headers; 10 s deadline.
    pub async fn post(
        &self,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> anyhow::Result<Answer> {
        let mut req = http::Request::post(format!("http://{}{path}", self.proxy)).header("host", host);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::from(body)))?;
        let resp = tokio::time::timeout(Duration::from_secs(10), self.with_body.request(req)).await??;
        answer(resp).await
    }

    /// GET `path` with `Host: host` and extra headers; 10 s deadline.
    pub async fn get(&self, host: &str, path: &str, headers: &[(&str, &str)]) -> anyhow::Result<Answer> {
        let mut req = http::Request::get(format!("http://{}{path}", self.proxy)).header("host", host);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Empty::new())?;
        let resp = tokio::time::timeout(Duration::from_secs(10), self.client.request(req)).await??;
        answer(resp).await
    }
}

async fn answer(resp: http::Response<hyper::body::Incoming>) -> anyhow::Result<Answer> {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect()).await??.to_bytes();
    Ok(Answer { status, body: String::from_utf8_lossy(&body).into_owned(), headers })
}
