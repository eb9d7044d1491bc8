//! The config index: one task follows the store (list + watch, relisting after compaction),
//! keeps every valid resource parsed, and publishes an immutable [`ConfigSnapshot`] after each
//! batch of changes. The xDS hub translates from it; if the store becomes unreachable the last
//! snapshot keeps being served (static stability).

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::{FutureExt, StreamExt};
use tokio::sync::watch;
use trellis_model::spec::Spec;
use trellis_model::{Resource, ResourceKey, validate_resource};
use trellis_store::{EventType, ReflectorEvent, ResourceStore, reflector};
use trellis_xds::ConfigSnapshot;

fn parse(r: &Resource) -> Option<(ResourceKey, Spec)> {
    let ns = r.namespace().to_string();
    match validate_resource(r, &ns) {
        Ok(parsed) => Some(parsed),
        Err(e) => {
            tracing::warn!(resource = %r.metadata.name, kind = %r.kind, error = %e, "stored resource no longer validates; not served");
            None
        }
    }
}

/// Starts the index; the receiver always holds the latest snapshot.
pub fn spawn(
    store: ResourceStore,
    module_server: Option<std::net::SocketAddr>,
    trust_bundle: Option<Arc<str>>,
    trust_domain: &str,
) -> watch::Receiver<Arc<ConfigSnapshot>> {
    let trust_domain: Arc<str> = trust_domain.into();
    // Before the store's first answer: no configuration yet, but the module server and the
    // trust bundle are known.
    let first = ConfigSnapshot {
        module_server,
        trust_bundle: trust_bundle.clone(),
        trust_domain: trust_domain.clone(),
        ..Default::default()
    };
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(async move {
        let mut items: BTreeMap<ResourceKey, Spec> = BTreeMap::new();
        let mut events = Box::pin(reflector(store, None, None));
        while let Some(ev) = events.next().await {
            let mut next = Some(ev);
            // Apply everything already waiting, then publish once.
            while let Some(ev) = next.take() {
                match ev {
                    ReflectorEvent::Synced { items: all, .. } => {
                        items = all.iter().filter_map(parse).collect();
                    }
                    ReflectorEvent::Changed(ev) => match ev.event_type {
                        EventType::Deleted => {
                            if let Ok(key) = ev.object.key("") {
                                items.remove(&key);
                            }
                        }
                        _ => match parse(&ev.object) {
                            Some((k, s)) => {
                                items.insert(k, s);
                            }
                            None => {
                                if let Ok(key) = ev.object.key("") {
                                    items.remove(&key);
                                }
                            }
                        },
                    },
                    ReflectorEvent::Retrying { error } => {
                        tracing::warn!(%error, "config store unavailable; proxies keep the last published config");
                    }
                }
                next = events.next().now_or_never().flatten();
            }
            let snapshot = ConfigSnapshot {
                items: items.iter().map(|(k, s)| (k.clone(), s.clone())).collect(),
                module_server,
                trust_bundle: trust_bundle.clone(),
                trust_domain: trust_domain.clone(),
            };
            if tx.send(Arc::new(snapshot)).is_err() {
                return;
            }
        }
    });
    rx
}
