//! List-then-watch that survives reconnects and compaction: what every consumer of the store
//! (the xDS index, the API's watch fan-out) builds on.
//!
//! It lists, then watches from the list's revision. When the watch breaks, it resumes from the
//! last revision it delivered, so no event is lost or repeated. When that revision has been
//! compacted, it relists and emits a fresh [`ReflectorEvent::Synced`] snapshot.

use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use trellis_model::{Kind, Resource};

use crate::{Error, ResourceStore, Revision, WatchEvent};

#[derive(Debug, Clone, PartialEq)]
pub enum ReflectorEvent {
    /// The complete current state (first, and again after a relist).
    Synced { items: Vec<Resource>, revision: Revision },
    /// One change after the last snapshot or change.
    Changed(Box<WatchEvent>),
    /// The store failed; the reflector retries with backoff. Informational.
    Retrying { error: String },
}

/// Starts a reflector task over resources of `kind` (all kinds when `None`). It stops when the
/// returned stream is dropped.
pub fn reflector(
    store: ResourceStore,
    kind: Option<Kind>,
    namespace: Option<String>,
) -> impl Stream<Item = ReflectorEvent> + Send + 'static {
    reflector_from(store, kind, namespace, None)
}

/// Like [`reflector`], but resumes after `resume` (a revision the consumer already has, e.g.
/// remembered across a restart) instead of starting with a list. If that revision has been
/// compacted, it relists.
pub fn reflector_from(
    store: ResourceStore,
    kind: Option<Kind>,
    namespace: Option<String>,
    resume: Option<Revision>,
) -> impl Stream<Item = ReflectorEvent> + Send + 'static {
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        let mut resume = resume;
        loop {
            let after = match resume {
                Some(rev) => rev,
                None => match store.list(kind, namespace.as_deref()).await {
                    Ok((items, revision)) => {
                        if tx.send(ReflectorEvent::Synced { items, revision }).await.is_err() {
                            return;
                        }
                        revision
                    }
                    Err(e) => {
                        if !report_and_back_off(&tx, &mut backoff, e).await {
                            return;
                        }
                        continue;
                    }
                },
            };
            resume = Some(after);
            let mut stream = match store.watch(kind, namespace.as_deref(), after).await {
                Ok(s) => s.boxed(),
                Err(Error::Compacted { .. }) => {
                    resume = None;
                    continue;
                }
                Err(e) => {
                    if !report_and_back_off(&tx, &mut backoff, e).await {
                        return;
                    }
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            loop {
                tokio::select! {
                    _ = tx.closed() => return,
                    item = stream.next() => match item {
                        Some(Ok(ev)) => {
                            resume = Some(ev.revision);
                            if tx.send(ReflectorEvent::Changed(Box::new(ev))).await.is_err() {
                                return;
                            }
                        }
                        Some(Err(Error::Compacted { .. })) => {
                            resume = None;
                            break;
                        }
                        Some(Err(e)) => {
                            if !report_and_back_off(&tx, &mut backoff, e).await {
                                return;
                            }
                            break;
                        }
                        None => break,
                    },
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

/// Reports a store failure to the consumer and sleeps with exponential backoff (capped at 5 s).
/// False when the consumer is gone.
async fn report_and_back_off(tx: &mpsc::Sender<ReflectorEvent>, backoff: &mut Duration, e: Error) -> bool {
    if tx.send(ReflectorEvent::Retrying { error: e.to_string() }).await.is_err() {
        return false;
    }
    tokio::time::sleep(*backoff).await;
    *backoff = (*backoff * 2).min(Duration::from_secs(5));
    true
}
