//! Listeners at run time: one accept loop per configured listener. Applying a new
//! configuration binds new listeners first (a listener that cannot bind makes the update
//! fail — it is NACKed), then stops and drains removed ones: no new connections, in-flight
//! HTTP requests finish, connections close gracefully, TCP streams get [`DRAIN_TIME`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::Proxy;
use crate::config::{ListenerKind, Snapshot};

/// How long draining connections get before they are closed.
pub const DRAIN_TIME: Duration = Duration::from_secs(5);

#[derive(Debug)]
struct Running {
    address: SocketAddr,
    http: bool,
    /// What it accepts (TLS, plaintext): a change drains its connections, as Envoy drains the
    /// connections of filter chains an update removes.
    transport: crate::config::listener::Transport,
    /// Tells the accept loop and its connections to drain.
    drain: watch::Sender<bool>,
    /// Tells the connections accepted so far to drain (replaced when the transport changes;
    /// the accept loop hands new connections the current receiver).
    connections: watch::Sender<bool>,
    current: Arc<ArcSwap<watch::Receiver<bool>>>,
}

impl Running {
    fn stop(self) {
        let _ = self.drain.send(true);
        let _ = self.connections.send(true);
    }
}

/// Owns the listeners.
#[derive(Debug, Default)]
pub struct Listeners {
    running: BTreeMap<String, Running>,
}

impl Listeners {
    /// Binds what is new in `snap` (or moved to another address); returns the sockets to
    /// start and the names to drain. Nothing changes if any bind fails.
    pub async fn prepare(&self, snap: &Snapshot) -> Result<Prepared, String> {
        let mut bound = Vec::new();
        let mut retransport = Vec::new();
        for (name, l) in &snap.listeners {
            let http = matches!(l.kind, ListenerKind::Http { .. });
            if let Some(r) = self.running.get(name)
                && r.address == l.address
                && r.http == http
            {
                if r.transport != l.transport {
                    // Same socket and accept loop (new connections read the transport from the
                    // configuration); the connections made under the old one drain.
                    retransport.push((name.clone(), l.transport.clone()));
                }
                continue;
            }
            // Warming, as Envoy: a new HTTP listener starts accepting once its routes arrived.
            if let ListenerKind::Http { route, .. } = &l.kind
                && !snap.routes.contains_key(route)
            {
                continue;
            }
            // A listener moving to another address of the same port would collide with itself.
            let moving_here = self.running.iter().any(|(n, r)| n != name && r.address == l.address);
            if moving_here {
                return Err(format!("listener {name}: {} is in use by another listener", l.address));
            }
            let socket = match self.running.get(name) {
                Some(r) if r.address == l.address => None, // same socket, protocol or TLS changed: rebind below
                _ => Some(bind(l.address).map_err(|e| format!("listener {name}: cannot bind {}: {e}", l.address))?),
            };
            bound.push((name.clone(), l.address, http, l.transport.clone(), socket));
        }
        let stop = self.running.keys().filter(|n| !snap.listeners.contains_key(*n)).cloned().collect();
        Ok(Prepared { bound, stop, retransport })
    }

    /// Starts the prepared listeners and drains the removed ones.
    pub fn commit(&mut self, proxy: &Arc<Proxy>, prepared: Prepared) {
        for name in prepared.stop {
            if let Some(r) = self.running.remove(&name) {
                tracing::info!(listener = %name, address = %r.address, "draining removed listener");
                r.stop();
            }
        }
        for (name, transport) in prepared.retransport {
            if let Some(r) = self.running.get_mut(&name) {
                tracing::info!(listener = %name, "TLS settings changed: draining its connections");
                let (tx, rx) = watch::channel(false);
                r.current.store(Arc::new(rx));
                let _ = std::mem::replace(&mut r.connections, tx).send(true);
                r.transport = transport;
            }
        }
        for (name, address, http, transport, socket) in prepared.bound {
            let socket = match socket {
                Some(s) => s,
                None => {
                    // Same address, other protocol: stop the old loop first, then take the port.
                    if let Some(r) = self.running.remove(&name) {
                        r.stop();
                    }
                    match bind(address) {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::error!(listener = %name, %address, error = %e, "cannot rebind listener");
                            continue;
                        }
                    }
                }
            };
            if let Some(r) = self.running.remove(&name) {
                r.stop();
            }
            let (drain, rx) = watch::channel(false);
            let (connections, conn_rx) = watch::channel(false);
            let current = Arc::new(ArcSwap::from_pointee(conn_rx));
            tracing::info!(listener = %name, %address, "listening");
            tokio::spawn(accept_loop(proxy.clone(), Arc::from(name.as_str()), socket, http, rx, current.clone()));
            self.running.insert(name, Running { address, http, transport, drain, connections, current });
        }
    }

    /// Drains every listener (shutdown).
    pub fn drain_all(&mut self) {
        for (_, r) in std::mem::take(&mut self.running) {
            r.stop();
        }
    }

    pub fn addresses(&self) -> Vec<(String, SocketAddr)> {
        self.running.iter().map(|(n, r)| (n.clone(), r.address)).collect()
    }
}

/// Sockets bound for an update, not yet serving.
#[derive(Debug)]
pub struct Prepared {
    bound: Vec<(String, SocketAddr, bool, crate::config::listener::Transport, Option<TcpListener>)>,
    stop: Vec<String>,
    retransport: Vec<(String, crate::config::listener::Transport)>,
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

async fn accept_loop(
    proxy: Arc<Proxy>,
    name: Arc<str>,
    listener: TcpListener,
    http: bool,
    mut drain: watch::Receiver<bool>,
    connections: Arc<ArcSwap<watch::Receiver<bool>>>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = drain.wait_for(|d| *d) => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off a little, keep serving.
                tracing::warn!(listener = %name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (proxy, name, rx) = (proxy.clone(), name.clone(), (**connections.load()).clone());
        let tracker = proxy.connections.clone();
        tokio::spawn(async move {
            let _open = tracker.open();
            let Some((io, mtls)) = crate::tls::accept(&proxy, &name, stream, peer).await else { return };
            if http {
                crate::http::serve(proxy, name, io, peer, mtls, rx).await;
            } else {
                crate::tcp::serve(proxy, name, io, peer, rx).await;
            }
        });
    }
}
