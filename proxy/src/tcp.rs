//! The TCP path: a downstream connection → a chain (by the TLS SNI when the listener
//! inspects it) → a weighted cluster → a host → bytes copied both ways until either side
//! closes. TLS is passed through untouched.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rand::Rng;
use tokio::net::TcpStream;

use crate::Proxy;
use crate::config::ListenerKind;
use crate::config::listener::TcpChain;

/// How long a client may take to send its TLS ClientHello.
const SNI_TIMEOUT: Duration = Duration::from_secs(10);
/// The most of a ClientHello read to find the SNI.
const MAX_HELLO: usize = 16 * 1024;

pub async fn serve(
    proxy: Arc<Proxy>,
    listener: Arc<str>,
    mut down: crate::tls::Io,
    peer: SocketAddr,
    mut drain: tokio::sync::watch::Receiver<bool>,
) {
    let rt = proxy.runtime.load_full();
    let Some(ListenerKind::Tcp { chains, sni }) = rt.snapshot.listeners.get(&*listener).map(|l| l.kind.clone()) else {
        return;
    };
    // SNI routing passes TLS through; a connection whose TLS this proxy terminated has none.
    let server_name = if let (true, crate::tls::Io::Plain(tcp)) = (sni, &down) {
        match tokio::time::timeout(SNI_TIMEOUT, peek_sni(tcp)).await {
            Ok(n) => n,
            Err(_) => return,
        }
    } else {
        None
    };
    let chain: Option<&TcpChain> = chains.iter().find(|c| match &server_name {
        Some(n) => c.server_names.iter().any(|s| s.eq_ignore_ascii_case(n)),
        None => false,
    });
    let chain = chain.or_else(|| chains.iter().find(|c| c.server_names.is_empty()));
    let Some(chain) = chain else {
        tracing::debug!(%peer, sni = ?server_name, "no filter chain matches the connection");
        return;
    };
    let total: u32 = chain.clusters.iter().map(|(_, w)| *w).sum();
    let mut r = rand::rng().random_range(0..total.max(1));
    let name = chain
        .clusters
        .iter()
        .find(|(_, w)| {
            if r < *w {
                true
            } else {
                r -= w;
                false
            }
        })
        .map(|(n, _)| n.clone())
        .unwrap_or_default();
    let Some(cluster) = rt.clusters.get(&name).cloned() else {
        tracing::debug!(cluster = %name, "no such cluster");
        return;
    };
    drop(rt);
    let limits = cluster.config.limits;
    if cluster.connections.load(Ordering::SeqCst) >= limits.max_connections {
        cluster.stats.upstream_cx_overflow.fetch_add(1, Ordering::Relaxed);
        proxy.tcp_closed(&name, "UO", 0, 0);
        return;
    }
    let Some(host) = cluster.pick(None) else {
        proxy.tcp_closed(&name, "UH", 0, 0);
        return;
    };
    cluster.connections.fetch_add(1, Ordering::SeqCst);
    cluster.stats.upstream_cx_total.fetch_add(1, Ordering::Relaxed);
    proxy.tcp_opened(&name);
    let result = match crate::upstream::pool::connect(&cluster, &host).await {
        Ok(mut up) => {
            cluster.record(&host, Some(200));
            let _ = down.tcp().set_nodelay(true);
            tokio::select! {
                r = tokio::io::copy_bidirectional(&mut down, &mut up) => match r {
                    Ok((from_client, to_client)) => ("-", to_client, from_client),
                    Err(_) => ("UC", 0, 0),
                },
                // Draining: existing TCP streams get the drain period, then close.
                _ = async { let _ = drain.wait_for(|d| *d).await; tokio::time::sleep(crate::listeners::DRAIN_TIME).await } => ("DC", 0, 0),
            }
        }
        Err(e) => {
            tracing::debug!(cluster = %name, error = %e, "TCP upstream connect failed");
            cluster.record(&host, None);
            ("UF", 0, 0)
        }
    };
    cluster.connections.fetch_sub(1, Ordering::SeqCst);
    let (flags, sent, received) = result;
    proxy.tcp_closed(&name, flags, sent, received);
}

/// Reads (without consuming) the TLS ClientHello and returns its server name.
async fn peek_sni(s: &TcpStream) -> Option<String> {
    let mut buf = vec![0u8; MAX_HELLO];
    let mut last = 0;
    loop {
        let n = s.peek(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        match parse_sni(&buf[..n]) {
            Sni::Found(name) => return Some(name),
            Sni::NotTls | Sni::None => return None,
            Sni::Incomplete if n == MAX_HELLO || n == last => {
                // Nothing new yet: wait for more bytes.
                s.readable().await.ok()?;
                if n == MAX_HELLO {
                    return None;
                }
            }
            Sni::Incomplete => {}
        }
        last = n;
        tokio::task::yield_now().await;
    }
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Sni {
    Found(String),
    None,
    NotTls,
    Incomplete,
}

/// Parses the server_name extension out of a TLS ClientHello (RFC 8446 §4.1.2, RFC 6066 §3).
pub(crate) fn parse_sni(b: &[u8]) -> Sni {
    struct R<'a>(&'a [u8], usize);
    impl R<'_> {
        fn take(&mut self, n: usize) -> Option<&[u8]> {
            let s = self.0.get(self.1..self.1 + n)?;
            self.1 += n;
            Some(s)
        }
        fn u8(&mut self) -> Option<usize> {
            self.take(1).map(|s| s[0] as usize)
        }
        fn u16(&mut self) -> Option<usize> {
            self.take(2).map(|s| (s[0] as usize) << 8 | s[1] as usize)
        }
        fn u24(&mut self) -> Option<usize> {
            self.take(3).map(|s| (s[0] as usize) << 16 | (s[1] as usize) << 8 | s[2] as usize)
        }
    }
    if b.is_empty() {
        return Sni::Incomplete;
    }
    if b[0] != 0x16 {
        return Sni::NotTls;
    }
    let mut r = R(b, 0);
    let parse = |r: &mut R<'_>| -> Option<Option<String>> {
        r.take(1)?; // content type
        r.take(2)?; // legacy version
        let rec_len = r.u16()?;
        let record = R(r.take(rec_len)?, 0);
        let mut h = record;
        if h.u8()? != 1 {
            return Some(None); // not a ClientHello
        }
        h.u24()?;
        h.take(2 + 32)?; // version, random
        let sid = h.u8()?;
        h.take(sid)?;
        let cs = h.u16()?;
        h.take(cs)?;
        let cm = h.u8()?;
        h.take(cm)?;
        let ext_len = h.u16()?;
        let mut e = R(h.take(ext_len)?, 0);
        while e.1 < e.0.len() {
            let ty = e.u16()?;
            let len = e.u16()?;
            let body = e.take(len)?;
            if ty == 0 {
                let mut s = R(body, 0);
                s.u16()?;
                while s.1 < s.0.len() {
                    let kind = s.u8()?;
                    let l = s.u16()?;
                    let name = s.take(l)?;
                    if kind == 0 {
                        return Some(std::str::from_utf8(name).ok().map(|n| n.to_ascii_lowercase()));
                    }
                }
            }
        }
        Some(None)
    };
    match parse(&mut r) {
        Some(Some(n)) => Sni::Found(n),
        Some(None) => Sni::None,
        None => Sni::Incomplete,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rand::Rng;

    use super::{Sni, parse_sni};

    /// A real ClientHello, as rustls sends it for `server_name`.
    fn client_hello(server_name: &str) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(server_name.to_string()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn the_server_name_is_read_from_a_real_client_hello() {
        let hello = client_hello("API.example.com");
        assert_eq!(parse_sni(&hello), Sni::Found("api.example.com".into()));
        // Every truncation is incomplete, never a wrong answer or a panic.
        for n in 0..hello.len() {
            assert_eq!(parse_sni(&hello[..n]), Sni::Incomplete, "prefix of {n} bytes");
        }
        assert_eq!(parse_sni(b"GET / HTTP/1.1\r\n"), Sni::NotTls);
    }

    #[test]
    fn hostile_bytes_never_panic_the_parser() {
        let hello = client_hello("example.com");
        let mut rng = rand::rng();
        // Bounded: 20,000 inputs — random bytes after a handshake record type, and the real
        // hello with random bytes flipped.
        let mut still_found = 0;
        for i in 0..20_000 {
            let input: Vec<u8> = if i % 2 == 0 {
                let len = rng.random_range(0..600);
                std::iter::once(0x16u8).chain((0..len).map(|_| rng.random())).collect()
            } else {
                let mut h = hello.clone();
                for _ in 0..rng.random_range(1..8) {
                    let at = rng.random_range(0..h.len());
                    h[at] = rng.random();
                }
                h
            };
            if let Sni::Found(name) = parse_sni(&input) {
                assert!(name.len() < 1 << 16 && name == name.to_ascii_lowercase(), "{name:?}");
                still_found += usize::from(name == "example.com");
            }
        }
        // Flips in the random, session id or cipher list leave the name readable.
        assert!(still_found >= 100, "only {still_found} of 10,000 mutated hellos still parsed");
    }
}
