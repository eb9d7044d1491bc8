//! The etcd v3 backend: for several control-plane replicas and scale-out.
//!
//! Keys live under a configurable prefix (`/trellis` by default); revisions are etcd's own
//! (`mod_revision`, `create_revision`, the header revision of a read), so two control planes on
//! one etcd see each other's writes through watch. Conditional writes are etcd transactions
//! comparing `mod_revision`. A watch from a compacted revision is reported as
//! [`Error::Compacted`].

use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::{ConfigStore, Error, EventKind, EventStream, KvEntry, KvEvent, Result, Revision};

/// gRPC message limit for etcd responses (lists of many objects).
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    endpoints: Vec<String>,
    /// `/trellis/` — always ends with '/'.
    prefix: String,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore").field("endpoints", &self.endpoints).field("prefix", &self.prefix).finish()
    }
}

impl EtcdStore {
    /// Connects to etcd. `prefix` (e.g. `/trellis`) scopes every key, so several meshes can
    /// share one etcd.
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Self> {
        if endpoints.is_empty() {
            return Err(Error::Invalid("no etcd endpoints given".into()));
        }
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(15))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        let client = Client::connect(endpoints, Some(options)).await.map_err(|e| {
            Error::Unavailable(format!(
                "cannot connect to etcd at {}: {e}; is etcd running and reachable?",
                endpoints.join(",")
            ))
        })?;
        let mut prefix = prefix.trim_end_matches('/').to_string();
        prefix.push('/');
        let store = Self { client, endpoints: endpoints.to_vec(), prefix };
        // One round trip now, so a wrong address fails at start-up rather than on first use.
        store.current_revision().await?;
        Ok(store)
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn unavailable(&self, e: etcd_client::Error) -> Error {
        Error::Unavailable(format!("etcd at {}: {e}", self.endpoints.join(",")))
    }

    fn entry(&self, kv: &etcd_client::KeyValue) -> Result<KvEntry> {
        let key = std::str::from_utf8(kv.key()).map_err(|_| Error::Corrupt("non-UTF-8 key in etcd".into()))?;
        let key = key.strip_prefix(self.prefix.as_str()).unwrap_or(key).to_string();
        Ok(KvEntry {
            key,
            value: kv.value().to_vec(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
        })
    }

    /// Runs a transaction: `cond` holds → `then`; else reads the key to explain the failure.
    async fn txn(&self, key: &str, cond: Compare, then: TxnOp) -> Result<(bool, Revision, Vec<TxnOpResponse>)> {
        let full = self.full(key);
        let txn = Txn::new().when([cond]).and_then([then]).or_else([TxnOp::get(full, None)]);
        let resp = self.client.kv_client().txn(txn).await.map_err(|e| self.unavailable(e))?;
        let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
        Ok((resp.succeeded(), rev, resp.op_responses()))
    }

    /// After a failed conditional write: NotFound or Conflict, from the `or_else` read.
    fn explain(&self, key: &str, expected: Option<Revision>, responses: &[TxnOpResponse]) -> Error {
        let current = responses.iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.mod_revision()),
            _ => None,
        });
        match (current, expected) {
            (None, _) => Error::NotFound { key: key.to_string() },
            (Some(current), Some(expected)) => Error::Conflict { key: key.to_string(), expected, current },
            (Some(_), None) => Error::Unavailable(format!("etcd transaction on {key} failed unexpectedly")),
        }
    }

    fn precondition(&self, key: &str, expected: Option<Revision>) -> Compare {
        match expected {
            Some(rev) => Compare::mod_revision(self.full(key), CompareOp::Equal, rev),
            None => Compare::create_revision(self.full(key), CompareOp::Greater, 0),
        }
    }
}

#[async_trait]
impl ConfigStore for EtcdStore {
    fn backend(&self) -> &'static str {
        "etcd"
    }

    async fn get(&self, key: &str) -> Result<Option<KvEntry>> {
        let resp = self.client.kv_client().get(self.full(key), None).await.map_err(|e| self.unavailable(e))?;
        resp.kvs().first().map(|kv| self.entry(kv)).transpose()
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KvEntry>, Revision)> {
        let mut kv = self.client.kv_client().max_decoding_message_size(MAX_MESSAGE_BYTES);
        let resp =
            kv.get(self.full(prefix), Some(GetOptions::new().with_prefix())).await.map_err(|e| self.unavailable(e))?;
        let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
        let items = resp.kvs().iter().map(|kv| self.entry(kv)).collect::<Result<Vec<_>>>()?;
        Ok((items, rev))
    }

    async fn create(&self, key: &str, value: Vec<u8>) -> Result<Revision> {
        let cond = Compare::create_revision(self.full(key), CompareOp::Equal, 0);
        let (ok, rev, _) = self.txn(key, cond, TxnOp::put(self.full(key), value, None)).await?;
        if ok { Ok(rev) } else { Err(Error::AlreadyExists { key: key.to_string() }) }
    }

    async fn update(&self, key: &str, value: Vec<u8>, expected: Option<Revision>) -> Result<Revision> {
        let (ok, rev, responses) =
            self.txn(key, self.precondition(key, expected), TxnOp::put(self.full(key), value, None)).await?;
        if ok { Ok(rev) } else { Err(self.explain(key, expected, &responses)) }
    }

    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<(KvEntry, Revision)> {
        let op = TxnOp::delete(self.full(key), Some(etcd_client::DeleteOptions::new().with_prev_key()));
        let (ok, rev, responses) = self.txn(key, self.precondition(key, expected), op).await?;
        if !ok {
            return Err(self.explain(key, expected, &responses));
        }
        let prev = responses.iter().find_map(|r| match r {
            TxnOpResponse::Delete(d) => d.prev_kvs().first().cloned(),
            _ => None,
        });
        let prev = prev.ok_or_else(|| Error::NotFound { key: key.to_string() })?;
        let entry = self.entry(&prev)?;
        Ok((KvEntry { mod_revision: rev, ..entry }, rev))
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<EventStream> {
        let options = WatchOptions::new().with_prefix().with_start_revision(after + 1).with_prev_key();
        let mut stream = self
            .client
            .watch_client()
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .watch(self.full(prefix), Some(options))
            .await
            .map_err(|e| self.unavailable(e))?;
        // The first response confirms creation or reports a compacted start revision.
        let first = stream.message().await.map_err(|e| self.unavailable(e))?;
        let (tx, rx) = mpsc::channel::<Result<KvEvent>>(512);
        let store = self.clone();
        let requested = after + 1;
        tokio::spawn(async move {
            let mut pending = first;
            loop {
                let Some(resp) = pending.take() else {
                    let _ = tx
                        .send(Err(Error::Unavailable(format!(
                            "etcd at {} closed the watch",
                            store.endpoints.join(",")
                        ))))
                        .await;
                    return;
                };
                if resp.canceled() {
                    let err = if resp.compact_revision() > 0 {
                        Error::Compacted { requested, compacted: resp.compact_revision() - 1 }
                    } else {
                        Error::Unavailable(format!("etcd cancelled the watch: {}", resp.cancel_reason()))
                    };
                    let _ = tx.send(Err(err)).await;
                    return;
                }
                for ev in resp.events() {
                    let item = match (ev.event_type(), ev.kv()) {
                        (EventType::Put, Some(kv)) => {
                            store.entry(kv).map(|entry| KvEvent { kind: EventKind::Put, entry })
                        }
                        (EventType::Delete, Some(kv)) => {
                            let deleted_at = kv.mod_revision();
                            match ev.prev_kv() {
                                Some(prev) => store.entry(prev).map(|e| KvEvent {
                                    kind: EventKind::Delete,
                                    entry: KvEntry { mod_revision: deleted_at, ..e },
                                }),
                                None => store.entry(kv).map(|e| KvEvent { kind: EventKind::Delete, entry: e }),
                            }
                        }
                        _ => Err(Error::Corrupt("etcd watch event without a key".into())),
                    };
                    let failed = item.is_err();
                    if tx.send(item).await.is_err() || failed {
                        return;
                    }
                }
                tokio::select! {
                    _ = tx.closed() => return,
                    msg = stream.message() => match msg {
                        Ok(m) => pending = m,
                        Err(e) => {
                            let _ = tx.send(Err(store.unavailable(e))).await;
                            return;
                        }
                    },
                }
            }
        });
        Ok(ReceiverStream::new(rx).boxed())
    }

    async fn current_revision(&self) -> Result<Revision> {
        let resp = self
            .client
            .kv_client()
            .get(self.full(""), Some(GetOptions::new().with_prefix().with_count_only()))
            .await
            .map_err(|e| self.unavailable(e))?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        self.client.kv_client().compact(revision, None).await.map_err(|e| self.unavailable(e))?;
        Ok(())
    }
}
